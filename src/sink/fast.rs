//! Fast-ingest batches (ADR-50, nats-server 2.14+): messages go out as
//! core publishes whose reply subjects carry a batch id and each message's
//! place, and JetStream acknowledges a batch once, at its commit.
//!
//! It owns the batch ids, the reply subjects and the end-of-batch marker,
//! and matches each commit's acknowledgement to the batch it closes. It
//! never publishes one by one or atomically (`publisher`, `atomic`), and
//! it decides nothing on a failure but to report it: walnats then resumes
//! from what the stream holds.

use std::collections::VecDeque;
use std::time::Duration;

use futures::StreamExt;

use super::OutMsg;
use super::publisher::{ApiError, refused};
use crate::error::{Error, Kind, Result};

/// Messages per fast-ingest batch. Each batch is committed by its last
/// message (or, when walnats runs out of work first, by an end-of-batch
/// marker that is not stored) and acknowledged once, with the stream
/// sequence of its last message and its count.
pub const FAST_BATCH: u64 = 500;

/// Fast-ingest state. The batch id and the message's place in it travel in
/// the reply subject (`<inbox>.<id>.<flow>.fail.<n>.<op>.$FI`); replies
/// for every batch of this publisher arrive on one subscription, in order.
/// Gap mode `fail`: a message JetStream refuses (a limit, a size) ends the
/// batch there, so nothing later can land after a hole; the commit's ack
/// says how many were stored, and anything short of all of them is an
/// error that makes walnats resume from what the stream holds.
pub(super) struct Fast {
    client: async_nats::Client,
    sub: async_nats::Subscriber,
    inbox: String,
    /// Unique to this publisher: batch ids are `<token><number>`.
    token: String,
    next_id: u64,
    /// Where end-of-batch markers go: `<prefix>._batch`, inside the
    /// stream but no table's subject (see [`batch_marker_subject`]).
    end_subject: async_nats::Subject,
    open: Option<OpenBatch>,
    /// Committed batches waiting for their ack, oldest first.
    sent: VecDeque<SentBatch>,
    timeout: Duration,
}

struct OpenBatch {
    id: u64,
    /// The reply subject up to the message's place:
    /// `<inbox>.<token><id>.<flow>.fail.`, written once per batch.
    reply_prefix: String,
    /// The stream sequence before the batch's first message.
    base: u64,
    /// Messages published in the batch so far.
    n: u64,
    since: std::time::Instant,
}

struct SentBatch {
    id: u64,
    base: u64,
    n: u64,
    at: std::time::Instant,
}

/// At most this many fast batches wait for their acknowledgement at once
/// (nats-server keeps at most 50 batches in flight per stream, and ADR-50
/// wants the outstanding acks bounded): 4,000 messages.
const MAX_BATCHES_IN_FLIGHT: usize = 8;

/// Fast-ingest operations, the reply subject's second-to-last token.
const OP_START: u8 = 0;
const OP_APPEND: u8 = 1;
const OP_COMMIT: u8 = 2;
const OP_END: u8 = 3;

fn batch_ack_timeout() -> Error {
    Error::new(
        Kind::Publish,
        "JetStream did not acknowledge a batch of publishes in time",
    )
}

impl OpenBatch {
    /// The reply subject of the batch's `n`th message (1-based) with
    /// operation `op`: `<reply_prefix><n>.<op>.$FI`, without `fmt` (this
    /// runs once per published row).
    fn reply(&self, n: u64, op: u8) -> String {
        let mut digits = itoa::Buffer::new();
        let n = digits.format(n);
        let mut r = String::with_capacity(self.reply_prefix.len() + n.len() + 6);
        r.push_str(&self.reply_prefix);
        r.push_str(n);
        r.push('.');
        r.push(char::from(b'0' + op));
        r.push_str(".$FI");
        r
    }
}

/// The subject of fast-ingest end-of-batch markers: `<prefix>._batch`.
/// The stream captures `<prefix>.>`, so the marker reaches it (on a
/// subject outside the stream it would reach no stream, and the batch
/// would never commit). It has one token after the prefix where a table's
/// subject has three, so no subscription to table subjects, wildcards or
/// not, receives it; only `<prefix>.>` does. The marker is never stored.
fn batch_marker_subject(prefix: &str) -> String {
    format!("{prefix}._batch")
}

/// A fast batch's id: unique to its publisher (`token`) and numbered.
fn batch_id(token: &str, id: u64) -> String {
    format!("{token}{id}")
}

/// The part of a fast batch's reply subjects that is the same for all of
/// its messages: the inbox, the batch id, the flow and the gap mode.
fn batch_reply_prefix(inbox: &str, token: &str, id: u64) -> String {
    format!("{inbox}.{}.{FAST_BATCH}.fail.", batch_id(token, id))
}

impl Fast {
    /// Subscribes to a fresh inbox for the batches' replies; markers go
    /// to `<prefix>._batch`.
    pub(super) async fn new(
        client: async_nats::Client,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Fast> {
        let inbox = client.new_inbox();
        let sub = client.subscribe(format!("{inbox}.>")).await.map_err(|e| {
            Error::with_source(
                Kind::NatsConnect,
                "cannot subscribe to the reply inbox for fast-ingest acknowledgements",
                e,
            )
        })?;
        let token = inbox.rsplit('.').next().unwrap_or("walnats").to_owned();
        Ok(Fast {
            client,
            sub,
            inbox,
            token,
            next_id: 1,
            end_subject: batch_marker_subject(prefix).into(),
            open: None,
            sent: VecDeque::new(),
            timeout,
        })
    }

    /// Whether another message may go out: committed batches awaiting
    /// their acknowledgement are bounded.
    pub(super) fn ready(&self) -> bool {
        self.sent.len() < MAX_BATCHES_IN_FLIGHT
    }

    /// Whether the open batch should end now: nothing else awaits an
    /// acknowledgement, or it has been open for a second.
    pub(super) fn should_end(&self) -> bool {
        self.open
            .as_ref()
            .is_some_and(|o| self.sent.is_empty() || o.since.elapsed() > Duration::from_secs(1))
    }

    /// Whether committed batches await their acknowledgement.
    pub(super) fn awaiting(&self) -> bool {
        !self.sent.is_empty()
    }

    /// Fails when the oldest committed batch has waited longer than the
    /// timeout for its acknowledgement.
    pub(super) fn overdue(&self) -> Result<()> {
        match self.sent.front() {
            Some(oldest) if oldest.at.elapsed() > self.timeout => Err(batch_ack_timeout()),
            _ => Ok(()),
        }
    }

    /// Sends `msg` in the open batch, opening one that must start after
    /// `expected` when none is; the batch's `FAST_BATCH`th message commits it.
    pub(super) async fn publish(&mut self, msg: OutMsg, expected: u64) -> Result<()> {
        let mut headers = msg.headers;
        if self.open.is_none() {
            // The first message of a batch names where it must start.
            headers.insert(
                "Nats-Expected-Last-Sequence",
                itoa::Buffer::new().format(expected),
            );
        }
        let open = self.open_batch(expected);
        open.n += 1;
        let n = open.n;
        let op = match n {
            1 => OP_START,
            FAST_BATCH => OP_COMMIT,
            _ => OP_APPEND,
        };
        let reply = open.reply(n, op);
        self.client
            .publish_with_reply_and_headers(msg.subject, reply, headers, msg.payload)
            .await
            .map_err(publish_error)?;
        if op == OP_COMMIT {
            self.committed();
        }
        Ok(())
    }

    /// The open batch, opening one that must start after `expected` when
    /// none is.
    fn open_batch(&mut self, expected: u64) -> &mut OpenBatch {
        let (inbox, token, next_id) = (&self.inbox, &self.token, &mut self.next_id);
        self.open.get_or_insert_with(|| {
            let id = *next_id;
            *next_id += 1;
            OpenBatch {
                id,
                reply_prefix: batch_reply_prefix(inbox, token, id),
                base: expected,
                n: 0,
                since: std::time::Instant::now(),
            }
        })
    }

    /// Sends `msgs` as one batch of their own (a snapshot chunk), each
    /// naming the stream sequence it must follow, and ends it: a message
    /// that does not land right after the one before it ends the batch
    /// there, so the stream holds a prefix of the chunk, and nothing sent
    /// later (a batch of a process killed meanwhile included) can land
    /// after a hole. Returns the sequence the chunk ends at.
    pub(super) async fn send_chunk(&mut self, msgs: Vec<OutMsg>, expected: u64) -> Result<u64> {
        if self.open.is_some() {
            return Err(Error::new(
                Kind::Publish,
                "internal: a snapshot chunk while a batch of changes is open",
            ));
        }
        let mut seq = expected;
        for msg in msgs {
            let mut headers = msg.headers;
            headers.insert(
                "Nats-Expected-Last-Sequence",
                itoa::Buffer::new().format(seq),
            );
            let open = self.open_batch(expected);
            open.n += 1;
            let op = if open.n == 1 { OP_START } else { OP_APPEND };
            let reply = open.reply(open.n, op);
            self.client
                .publish_with_reply_and_headers(msg.subject, reply, headers, msg.payload)
                .await
                .map_err(publish_error)?;
            seq += 1;
        }
        self.end().await?;
        Ok(seq)
    }

    /// [`Fast::next_ack`], failing once the oldest batch has waited longer
    /// than the timeout.
    pub(super) async fn next_ack_in_time(&mut self) -> Result<u64> {
        // Replies already here count whatever the clock says (the caller
        // may have been busy past the deadline while they arrived); flow
        // acks can be many, so without tokio's per-task budget.
        if let Some(r) =
            futures::FutureExt::now_or_never(tokio::task::unconstrained(self.next_ack()))
        {
            return r;
        }
        let left = match self.sent.front() {
            Some(oldest) => self.timeout.saturating_sub(oldest.at.elapsed()),
            None => return std::future::pending().await,
        };
        tokio::time::timeout(left, self.next_ack())
            .await
            .map_err(|_| batch_ack_timeout())?
    }

    /// Batches sent and not yet acknowledged.
    pub(super) fn in_flight(&self) -> usize {
        self.sent.len()
    }

    /// Sends the end-of-batch marker (not stored) of the open batch. It
    /// goes to `end_subject`, not to a row's subject: core NATS delivers
    /// it to every subscriber of its subject, and a table's subscribers
    /// must get that table's changes only. JetStream finds the batch by
    /// the id in the reply subject, whatever subject the marker has.
    pub(super) async fn end(&mut self) -> Result<()> {
        let Some(open) = &self.open else {
            return Ok(());
        };
        let reply = open.reply(open.n + 1, OP_END);
        self.client
            .publish_with_reply(self.end_subject.clone(), reply, bytes::Bytes::new())
            .await
            .map_err(publish_error)?;
        self.committed();
        Ok(())
    }

    fn committed(&mut self) {
        if let Some(o) = self.open.take() {
            self.sent.push_back(SentBatch {
                id: o.id,
                base: o.base,
                n: o.n,
                at: std::time::Instant::now(),
            });
        }
    }

    pub(super) async fn next_ack(&mut self) -> Result<u64> {
        loop {
            let Some(oldest) = self.sent.front() else {
                return std::future::pending().await;
            };
            let (id, n, base) = (oldest.id, oldest.n, oldest.base);
            // No timer here: this future is made anew on every turn of the
            // pipeline's loop; `overdue` checks the deadline instead.
            let Some(msg) = self.sub.next().await else {
                return Err(Error::new(
                    Kind::Publish,
                    "the fast-ingest acknowledgement subscription ended",
                ));
            };
            if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                return Err(Error::new(
                    Kind::Publish,
                    "no JetStream stream takes walnats' subjects any more (was it deleted?)",
                ));
            }
            match fast_reply(&msg.payload)? {
                FastReply::Flow => continue,
                FastReply::Committed { seq, batch, count } => {
                    let want_id = batch_id(&self.token, id);
                    if batch != want_id || count != n || seq != base + n {
                        return Err(Error::new(
                            Kind::Publish,
                            format!(
                                "JetStream stored {count} of a batch of {n} publishes ending at sequence {seq} \
                                 (batch {batch:?}), walnats expected them to end at {}: resuming from the stream",
                                base + n
                            ),
                        ));
                    }
                    self.sent.pop_front();
                    return Ok(seq);
                }
            }
        }
    }
}

/// A core publish that did not go out; over max_payload is not worth a retry.
fn publish_error(e: async_nats::PublishError) -> Error {
    let kind = match e.kind() {
        async_nats::client::PublishErrorKind::MaxPayloadExceeded => Kind::Oversize,
        _ => Kind::Publish,
    };
    Error::with_source(kind, "cannot publish to JetStream", e)
}

enum FastReply {
    /// A flow acknowledgement: progress inside a batch, not a commit.
    Flow,
    Committed {
        seq: u64,
        batch: String,
        count: u64,
    },
}

/// Reads a reply on the fast-ingest inbox: a flow ack, a commit's pub ack,
/// or an error (a gap, a refused message, an unknown batch).
fn fast_reply(payload: &[u8]) -> Result<FastReply> {
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(rename = "type", default)]
        kind: Option<String>,
        #[serde(default)]
        seq: u64,
        #[serde(default)]
        last_seq: u64,
        #[serde(default)]
        count: u64,
        #[serde(default)]
        batch: String,
        error: Option<ApiError>,
    }
    let r: Reply = serde_json::from_slice(payload).map_err(|e| {
        Error::with_source(
            Kind::Publish,
            "unreadable acknowledgement from JetStream",
            e,
        )
    })?;
    if let Some(e) = r.error {
        return Err(refused("a publish", &e));
    }
    match r.kind.as_deref() {
        Some("ack") => Ok(FastReply::Flow),
        Some("gap") => Err(Error::new(
            Kind::Publish,
            format!(
                "JetStream missed publishes {}..{} of a batch (dropped on the way, e.g. a slow or restarting \
                 server); the batch ended there: resuming from the stream",
                r.last_seq + 1,
                r.seq.saturating_sub(1)
            ),
        )),
        Some(other) => Err(Error::new(
            Kind::Publish,
            format!("JetStream sent an unknown batch reply {other:?}: resuming from the stream"),
        )),
        None => Ok(FastReply::Committed {
            seq: r.seq,
            batch: r.batch,
            count: r.count,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(payload: &str) -> (u64, String, u64) {
        match fast_reply(payload.as_bytes()) {
            Ok(FastReply::Committed { seq, batch, count }) => (seq, batch, count),
            Ok(FastReply::Flow) => panic!("{payload}: read as a flow ack"),
            Err(e) => panic!("{payload}: {e}"),
        }
    }

    fn refusal(payload: &str) -> String {
        match fast_reply(payload.as_bytes()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{payload}: not read as an error"),
        }
    }

    /// The replies nats-server 2.15 sends on a fast-ingest inbox, as seen
    /// on the wire.
    #[test]
    fn fast_ingest_replies_are_read_as_the_server_means_them() {
        assert!(matches!(
            fast_reply(br#"{"type":"ack","seq":0,"msgs":500}"#),
            Ok(FastReply::Flow)
        ));
        assert_eq!(
            committed(r#"{"stream":"S","seq":12,"batch":"abc3","count":4}"#),
            (12, "abc3".to_owned(), 4)
        );
        let gap = refusal(r#"{"type":"gap","last_seq":5,"seq":7}"#);
        assert!(gap.contains("6..6"), "{gap}");
        let refused = refusal(
            r#"{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"},"stream":"S","seq":0}"#,
        );
        assert!(
            refused.contains("message size exceeds maximum allowed"),
            "{refused}"
        );
        let unknown = refusal(
            r#"{"error":{"code":400,"err_code":10205,"description":"batch publish is disabled"}}"#,
        );
        assert!(unknown.contains("nats.fast_ingest"), "{unknown}");
        let err = refusal(
            r#"{"type":"err","seq":1,"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 7"}}"#,
        );
        assert!(err.contains("another client"), "{err}");
        assert!(refusal(r#"{"type":"stall"}"#).contains("unknown"));
        assert!(refusal("not json").contains("unreadable"));
    }

    /// Whether `subject` matches the NATS `pattern` (`*` one token, `>`
    /// the rest).
    fn subject_matches(pattern: &str, subject: &str) -> bool {
        let mut subject = subject.split('.');
        for p in pattern.split('.') {
            match (p, subject.next()) {
                (">", Some(_)) => return true,
                ("*", Some(_)) => {}
                (p, Some(t)) if p == t => {}
                _ => return false,
            }
        }
        subject.next().is_none()
    }

    /// The end-of-batch marker reaches the stream (`<prefix>.>`) but no
    /// subscriber of table subjects: those have three tokens after the
    /// prefix, whatever the schema and table are called.
    #[test]
    fn end_of_batch_markers_go_to_a_control_subject_inside_the_stream() {
        let marker = batch_marker_subject("cdc.app");
        assert_eq!(marker, "cdc.app._batch");
        assert!(subject_matches("cdc.app.>", &marker));
        for tables in [
            "cdc.app.*.*.*",
            "cdc.app.*.*.>",
            "cdc.app.*.*.insert",
            "cdc.app._batch.*.*",
            "cdc.app._batch.>",
            "cdc.app.public.t.insert",
        ] {
            assert!(
                !subject_matches(tables, &marker),
                "{tables} matches {marker}"
            );
        }
        assert!(subject_matches("cdc.app.*.*.*", "cdc.app._batch.t.insert"));
    }

    /// ADR-50's reply subject: `<inbox>.<batch id>.<flow>.<gap mode>.<n>.<op>.$FI`.
    #[test]
    fn fast_ingest_reply_subjects_name_batch_place_and_operation() {
        let batch = OpenBatch {
            id: 7,
            reply_prefix: batch_reply_prefix("_INBOX.abc", "abc", 7),
            base: 0,
            n: 0,
            since: std::time::Instant::now(),
        };
        assert_eq!(batch.reply(1, OP_START), "_INBOX.abc.abc7.500.fail.1.0.$FI");
        assert_eq!(
            batch.reply(42, OP_APPEND),
            "_INBOX.abc.abc7.500.fail.42.1.$FI"
        );
        assert_eq!(
            batch.reply(FAST_BATCH, OP_COMMIT),
            "_INBOX.abc.abc7.500.fail.500.2.$FI"
        );
        assert_eq!(
            batch.reply(18446744073709551615, OP_END),
            "_INBOX.abc.abc7.500.fail.18446744073709551615.3.$FI"
        );
    }
}
