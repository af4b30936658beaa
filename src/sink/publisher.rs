//! The publisher: every message lands at a known stream sequence, and
//! acknowledgements come back in order, one per message or one per
//! fast-ingest batch (`fast`).
//!
//! It owns the stream sequence walnats has published up to, the one-by-one
//! publishes with `Nats-Expected-Last-Sequence` and their acks, the size a
//! message counts against max_payload, and JetStream's error replies. It
//! never decides what is safe to confirm to PostgreSQL (an ack says what is
//! stored; the caller moves the checkpoint) and never retries a publish:
//! after a failure walnats resumes from what the stream holds.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, context::PublishAckFuture, context::PublishErrorKind};
use futures::StreamExt;
use futures::stream::FuturesOrdered;

use super::OutMsg;
use super::atomic;
use super::fast::Fast;
use crate::error::{Error, Kind, Result};

/// Publishes in order. Every message is at a known stream sequence: each
/// one-by-one publish names the sequence it must follow, and each fast
/// batch names it on its first message and fails whole at the first gap.
pub struct Publisher {
    js: jetstream::Context,
    /// The stream sequence of the last message walnats published (or
    /// found in the stream at start).
    last_seq: u64,
    max_payload: usize,
    acks: Acks,
    /// Atomic batches in flight (the initial snapshot), opened at the first.
    batches: Option<atomic::Pipe>,
}

type EachAck = Pin<Box<dyn Future<Output = Result<u64>> + Send>>;

/// How publishes come back acknowledged.
enum Acks {
    /// One pub ack per message, in order.
    Each(FuturesOrdered<EachAck>),
    /// ADR-50 fast-ingest batches (nats-server 2.14+): one ack per batch.
    Fast(Box<Fast>),
}

/// Room for the control headers walnats adds to a message at publish time:
/// `Nats-Expected-Last-Sequence: <u64>` (51 bytes), or an atomic batch's
/// `Nats-Batch-Id` (≤ 64 + 15), `Nats-Batch-Sequence` (≤ 25) and
/// `Nats-Batch-Commit` (21) with the expected last sequence on its first.
const CONTROL_HEADERS: usize = 200;

impl Publisher {
    /// A publisher with one acknowledgement per message.
    pub fn new(js: jetstream::Context, last_seq: u64) -> Publisher {
        let max_payload = js.client().server_info().max_payload;
        Publisher {
            js,
            last_seq,
            max_payload,
            acks: Acks::Each(FuturesOrdered::new()),
            batches: None,
        }
    }

    /// A publisher of fast-ingest batches; the stream must allow them
    /// (`allow_fast_ingest`) and capture `<prefix>.>`.
    pub async fn fast(
        js: jetstream::Context,
        prefix: &str,
        last_seq: u64,
        timeout: Duration,
    ) -> Result<Publisher> {
        let fast = Fast::new(js.client(), prefix, timeout).await?;
        let mut p = Publisher::new(js, last_seq);
        p.acks = Acks::Fast(Box::new(fast));
        Ok(p)
    }

    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Counts a message that the stream already holds (resume). Only
    /// before anything is published.
    pub fn assume_published(&mut self) -> u64 {
        self.last_seq += 1;
        self.last_seq
    }

    /// The size NATS counts against max_payload: headers plus payload,
    /// with room for the headers walnats adds when it publishes
    /// (`Nats-Expected-Last-Sequence`, or an atomic batch's id, sequence
    /// and commit), so that a message near the limit is caught here, where
    /// `limits.on_oversize` applies, and not refused on the way out.
    pub fn wire_size(msg: &OutMsg) -> usize {
        let headers: usize = msg
            .headers
            .iter()
            .map(|(k, vs)| {
                let name: &str = k.as_ref();
                vs.iter()
                    .map(|v| name.len() + v.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum();
        msg.payload.len() + headers + 12 + CONTROL_HEADERS
    }

    /// Sends `msg`; returns the stream sequence it must land at. Its
    /// acknowledgement comes from [`Publisher::next_stored`].
    pub async fn publish(&mut self, msg: OutMsg) -> Result<u64> {
        let expected = self.last_seq;
        match &mut self.acks {
            Acks::Each(acks) => {
                let publish = PublishMessage::build()
                    .headers(msg.headers)
                    .payload(msg.payload)
                    .expected_last_sequence(expected);
                let ack = self
                    .js
                    .send_publish(msg.subject, publish)
                    .await
                    .map_err(|e| {
                        let kind = match e.kind() {
                            PublishErrorKind::MaxPayloadExceeded => Kind::Oversize,
                            _ => Kind::Publish,
                        };
                        Error::with_source(kind, "cannot publish to JetStream", e)
                    })?;
                acks.push_back(Box::pin(await_ack(ack, expected + 1)));
            }
            Acks::Fast(f) => f.publish(msg, expected).await?,
        }
        self.last_seq = expected + 1;
        Ok(expected + 1)
    }

    /// Whether another message may be published now: fast batches waiting
    /// for their acknowledgement are bounded.
    pub fn ready(&self) -> bool {
        match &self.acks {
            Acks::Each(_) => true,
            Acks::Fast(f) => f.ready(),
        }
    }

    /// Whether the open fast batch should end now: nothing else is waiting
    /// for an acknowledgement (so this batch's would be the next), or it
    /// has been open for a second (JetStream drops a batch idle for 10 s).
    /// While earlier batches are awaited, messages gather in the open one.
    pub fn should_flush(&self) -> bool {
        match &self.acks {
            Acks::Fast(f) => f.should_end(),
            Acks::Each(_) => false,
        }
    }

    /// Ends the open fast batch, if any, so that its acknowledgement comes
    /// without waiting for more messages. Call it when there is nothing
    /// else to publish right now: JetStream drops a batch idle for 10 s.
    pub async fn flush(&mut self) -> Result<()> {
        match &mut self.acks {
            Acks::Fast(f) => f.end().await,
            Acks::Each(_) => Ok(()),
        }
    }

    /// Whether acknowledgements are awaited (a publish not yet confirmed
    /// and not in an open batch).
    pub fn awaiting(&self) -> bool {
        match &self.acks {
            Acks::Each(acks) => !acks.is_empty(),
            Acks::Fast(f) => f.awaiting(),
        }
    }

    /// Whether anything awaits its acknowledgement: a publish or fast
    /// batch, or an atomic batch's commit.
    pub fn awaiting_any(&self) -> bool {
        self.awaiting() || self.atomic_in_flight() > 0
    }

    /// The next acknowledgement of either kind (see
    /// [`Publisher::awaiting_any`]): every message up to the returned
    /// stream sequence is stored. Pending forever when nothing is awaited;
    /// cancel-safe.
    pub async fn next_stored(&mut self) -> Result<u64> {
        let (awaiting, atomic) = (self.awaiting(), self.atomic_in_flight() > 0);
        let (acks, batches) = (&mut self.acks, &mut self.batches);
        tokio::select! {
            r = next_of(acks), if awaiting => r,
            r = commit_of(batches), if atomic => r,
            else => std::future::pending().await,
        }
    }

    /// Fails when the oldest fast batch has waited for its acknowledgement
    /// longer than the timeout (one-by-one publishes time out by
    /// themselves). Called on the pipeline's status tick.
    pub fn overdue(&self) -> Result<()> {
        match &self.acks {
            Acks::Fast(f) => f.overdue(),
            Acks::Each(_) => Ok(()),
        }
    }

    /// Counts the stream's messages up to `seq` as published (resume: a
    /// re-read chunk the replay steps over). Only before anything is
    /// published.
    pub fn assume_published_through(&mut self, seq: u64) -> Result<()> {
        if seq < self.last_seq {
            return Err(Error::new(
                Kind::Checkpoint,
                format!(
                    "internal: the replay stepped back to sequence {seq} from {}",
                    self.last_seq
                ),
            ));
        }
        self.last_seq = seq;
        Ok(())
    }

    /// Sends `msgs` (a re-read chunk) as one atomic batch with id `id`
    /// right after everything sent so far, changes in flight included,
    /// without waiting: the stream stores all of them or none, and what is
    /// sent after it lands only if it did. Ends the open fast batch first.
    /// Returns where it ends; its commit comes from
    /// [`Publisher::atomic_landed`].
    pub async fn send_atomic(&mut self, id: &str, msgs: Vec<OutMsg>) -> Result<u64> {
        if let Acks::Fast(f) = &mut self.acks {
            f.end().await?;
        }
        let pipe = match &mut self.batches {
            Some(p) => p,
            None => self
                .batches
                .insert(atomic::Pipe::new(self.js.client()).await?),
        };
        self.last_seq = pipe.send(self.last_seq, id, msgs).await?;
        Ok(self.last_seq)
    }

    /// Atomic batches sent by [`Publisher::send_atomic`] and not yet
    /// committed.
    pub fn atomic_in_flight(&self) -> usize {
        self.batches.as_ref().map_or(0, atomic::Pipe::in_flight)
    }

    /// The oldest atomic batch's commit: the stream holds everything up to
    /// the returned sequence. Pending forever when none is in flight;
    /// cancel-safe.
    pub async fn atomic_landed(&mut self) -> Result<u64> {
        commit_of(&mut self.batches).await
    }
}

impl Publisher {
    /// Whether snapshot chunks go out as fast-ingest batches (nats-server
    /// 2.14+, the stream allowing them): a prefix of a chunk may land, and
    /// each message says which row it is. Atomic batches otherwise: a
    /// chunk lands whole or not at all.
    pub fn chunks_fast(&self) -> bool {
        matches!(self.acks, Acks::Fast(_))
    }

    /// Publishes snapshot chunks as atomic batches from now on (a table
    /// read by heap pages has no key to resume a chunk's prefix from).
    /// Only while nothing is in flight.
    pub fn chunks_atomic(&mut self) -> Result<()> {
        if self.awaiting() || self.batches_in_flight() > 0 {
            return Err(Error::new(
                Kind::Publish,
                "internal: publishing switched while batches are in flight",
            ));
        }
        self.acks = Acks::Each(FuturesOrdered::new());
        Ok(())
    }

    /// Sends `msgs` (a snapshot chunk) right after the last one sent,
    /// without waiting for earlier chunks: as one atomic batch with id
    /// `id` that lands only if they did, or as one fast-ingest batch
    /// ([`Publisher::chunks_fast`]) whose messages each name the one
    /// before. Returns the stream sequence it ends at; its acknowledgement
    /// comes from [`Publisher::batch_landed`], in order. At most
    /// [`atomic::MAX_IN_FLIGHT`] wait.
    pub async fn send_batch(&mut self, id: &str, msgs: Vec<OutMsg>) -> Result<u64> {
        if let Acks::Fast(f) = &mut self.acks {
            if msgs.is_empty() {
                return Ok(self.last_seq);
            }
            self.last_seq = f.send_chunk(msgs, self.last_seq).await?;
            return Ok(self.last_seq);
        }
        self.send_atomic(id, msgs).await
    }

    /// Snapshot chunks sent and not yet acknowledged.
    pub fn batches_in_flight(&self) -> usize {
        match &self.acks {
            Acks::Fast(f) => f.in_flight(),
            Acks::Each(_) => self.atomic_in_flight(),
        }
    }

    /// The oldest sent chunk's acknowledgement: returns the stream
    /// sequence of its last message. Pending forever when none is in
    /// flight; cancel-safe.
    pub async fn batch_landed(&mut self) -> Result<u64> {
        if let Acks::Fast(f) = &mut self.acks {
            return f.next_ack_in_time().await;
        }
        self.atomic_landed().await
    }
}

/// The oldest atomic batch's commit (see [`Publisher::atomic_landed`]).
async fn commit_of(batches: &mut Option<atomic::Pipe>) -> Result<u64> {
    match batches {
        Some(p) => p.next_commit().await,
        None => std::future::pending().await,
    }
}

/// The next acknowledgement of `acks`: every message up to the returned
/// stream sequence is stored. Pending forever when nothing is awaited.
async fn next_of(acks: &mut Acks) -> Result<u64> {
    match acks {
        Acks::Each(acks) => match acks.next().await {
            Some(r) => r,
            None => std::future::pending().await,
        },
        Acks::Fast(f) => f.next_ack().await,
    }
}

#[derive(serde::Deserialize)]
pub(super) struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// An error reply from JetStream, with the fix where walnats knows one.
pub(super) fn refused(what: &str, e: &ApiError) -> Error {
    let hint = match e.err_code {
        10174 => ": the stream does not allow atomic batches (allow_atomic)",
        10205 => {
            ": the stream does not allow fast-ingest batches (allow_batched); set nats.fast_ingest = \"off\" or let walnats turn it on"
        }
        10071 => {
            ": the stream's last sequence is not what walnats expected (another client publishes to it?)"
        }
        _ => "",
    };
    Error::new(
        Kind::Publish,
        format!(
            "JetStream refused {what}: {} (error {}){hint}; resuming from the stream",
            e.description, e.err_code
        ),
    )
}

/// Awaits one publish's acknowledgement and checks it is where it must be.
async fn await_ack(ack: PublishAckFuture, want: u64) -> Result<u64> {
    let ack = ack.await.map_err(|e| {
        let detail = match e.kind() {
            PublishErrorKind::WrongLastSequence => {
                "JetStream refused a publish: the stream's last sequence is not what walnats expected \
                 (an earlier publish failed, or another client publishes to this stream); resuming from the stream"
            }
            PublishErrorKind::TimedOut => "JetStream did not acknowledge a publish in time",
            _ => "JetStream did not acknowledge a publish",
        };
        Error::with_source(Kind::Publish, detail, e)
    })?;
    if ack.duplicate || ack.sequence != want {
        return Err(Error::new(
            Kind::Publish,
            format!(
                "JetStream stored a message at sequence {} (duplicate: {}), walnats expected {}: resuming from the stream",
                ack.sequence, ack.duplicate, want
            ),
        ));
    }
    Ok(ack.sequence)
}

#[cfg(test)]
mod tests {
    use async_nats::HeaderMap;

    use super::*;

    /// The header block as NATS puts it on the wire: `NATS/1.0`, one
    /// `Name: value` line a value, an empty line.
    fn header_block(headers: &HeaderMap) -> usize {
        let mut block = String::from("NATS/1.0\r\n");
        for (name, values) in headers.iter() {
            for v in values {
                block.push_str(&format!("{}: {}\r\n", name.as_ref() as &str, v.as_str()));
            }
        }
        block.push_str("\r\n");
        block.len()
    }

    fn msg(headers: HeaderMap, payload: &'static [u8]) -> OutMsg {
        OutMsg {
            subject: "cdc.app.public.t.insert".to_owned(),
            headers,
            payload: bytes::Bytes::from_static(payload),
        }
    }

    /// A message's size counts its payload and each header value exactly
    /// as NATS sends them, with or without headers, plus the fixed room
    /// for what walnats adds when it publishes.
    #[test]
    fn wire_size_counts_payload_and_headers_as_sent() {
        let bare = msg(HeaderMap::new(), b"{}");
        assert_eq!(
            Publisher::wire_size(&bare),
            2 + header_block(&bare.headers) + CONTROL_HEADERS
        );
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "0/16B3748:0");
        headers.insert("Content-Type", "application/json");
        headers.append("X-Twice", "a");
        headers.append("X-Twice", "bc");
        let m = msg(headers, b"{\"id\":1}");
        assert_eq!(
            Publisher::wire_size(&m),
            8 + header_block(&m.headers) + CONTROL_HEADERS
        );
    }

    /// The room for control headers holds the most walnats adds to one
    /// message: the one message of an atomic batch of one, which is its
    /// first (expected last sequence) and its commit, with the longest
    /// batch id nats-server takes and the largest numbers.
    #[test]
    fn wire_size_leaves_room_for_the_headers_added_at_publish() {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "0/16B3748:0");
        let m = msg(headers, b"{}");
        let mut sent = m.headers.clone();
        sent.insert("Nats-Batch-Id", "b".repeat(64).as_str());
        sent.insert(
            "Nats-Batch-Sequence",
            super::super::MAX_BATCH.to_string().as_str(),
        );
        sent.insert("Nats-Batch-Commit", "1");
        sent.insert("Nats-Expected-Last-Sequence", u64::MAX.to_string().as_str());
        assert!(Publisher::wire_size(&m) >= 2 + header_block(&sent));
    }
}
