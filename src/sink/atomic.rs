//! Atomic batches (ADR-50, nats-server 2.12.1+): a chunk of messages that
//! the stream stores whole, right after a known sequence, or not at all.
//! Snapshots publish each chunk of rows this way.
//!
//! It owns the batch headers and checks the replies to the first message
//! and to the commit. [`Pipe`] keeps several batches in flight (the
//! initial snapshot's chunks; re-read chunks among streamed changes): each
//! names the end of what was sent before it in
//! `Nats-Expected-Last-Sequence`, which nats-server checks at the commit,
//! so batch k+1 lands only if batch k did and the stream holds a prefix of
//! what was sent. It never retries: after a failure walnats resumes from
//! what the stream holds.
//!
//! What nats-server (2.12+, `server/stream.go`) does with atomic batches:
//! a batch is staged by its `Nats-Batch-Id` until its commit, so batches
//! from one client may interleave; a message before the commit that has a
//! reply subject is answered with an empty reply once staged (or an
//! error); the commit is checked (expected last sequence included) and
//! stored under the stream's lock, in the order the commits arrive; a
//! stream holds at most 50 open batches (`max_batch_inflight_per_stream`),
//! each at most 1000 messages, abandoned after 10 s without a commit.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::OutMsg;
use super::publisher::{ApiError, refused};
use crate::error::{Error, Kind, Result};

/// The most messages nats-server takes in one atomic batch.
pub const MAX_BATCH: usize = 1000;

/// At most this many atomic batches of one [`Pipe`] wait for their commit
/// (nats-server keeps at most 50 open per stream).
pub const MAX_IN_FLIGHT: usize = 8;

/// How long a batch may wait for its commit's acknowledgement.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Atomic batches in flight: their messages go out at once, and the
/// replies (to each batch's first message and its commit) come back on one
/// subscription, `<inbox>.<n>.f` and `<inbox>.<n>.c`, in the order
/// nats-server handled the messages.
pub(super) struct Pipe {
    client: async_nats::Client,
    sub: async_nats::Subscriber,
    inbox: String,
    next: u64,
    /// Committed batches awaiting their acknowledgement, oldest first.
    sent: VecDeque<Sent>,
}

struct Sent {
    n: u64,
    id: String,
    expected: u64,
    len: usize,
    at: Instant,
}

impl Pipe {
    pub(super) async fn new(client: async_nats::Client) -> Result<Pipe> {
        let inbox = client.new_inbox();
        let sub = client.subscribe(format!("{inbox}.>")).await.map_err(|e| {
            Error::with_source(
                Kind::NatsConnect,
                "cannot subscribe to the reply inbox for atomic batch acknowledgements",
                e,
            )
        })?;
        Ok(Pipe {
            client,
            sub,
            inbox,
            next: 1,
            sent: VecDeque::new(),
        })
    }

    pub(super) fn in_flight(&self) -> usize {
        self.sent.len()
    }

    /// Sends `msgs` as one atomic batch that must start right after stream
    /// sequence `expected`, without waiting; returns where it ends.
    /// `id` must be unique to this batch (at most 64 characters).
    pub(super) async fn send(&mut self, expected: u64, id: &str, msgs: Vec<OutMsg>) -> Result<u64> {
        let n = msgs.len();
        if n == 0 {
            return Ok(expected);
        }
        if n > MAX_BATCH {
            return Err(too_big(n));
        }
        if self.sent.len() >= MAX_IN_FLIGHT {
            return Err(Error::new(
                Kind::Publish,
                format!("more than {MAX_IN_FLIGHT} atomic batches in flight"),
            ));
        }
        let token = self.next;
        self.next += 1;
        let id = id.to_owned();
        let mut digits = itoa::Buffer::new();
        let token_text = digits.format(token).to_owned();
        for (i, m) in msgs.into_iter().enumerate() {
            let headers = batch_headers(m.headers, &id, i, n, expected);
            let commit = i + 1 == n;
            let reply = if commit {
                Some(format!("{}.{token_text}.c", self.inbox))
            } else if i == 0 {
                // So that a refusal (no atomic batches, too many open)
                // comes back before the commit's.
                Some(format!("{}.{token_text}.f", self.inbox))
            } else {
                None
            };
            let sent = match reply {
                Some(r) => {
                    self.client
                        .publish_with_reply_and_headers(m.subject, r, headers, m.payload)
                        .await
                }
                None => {
                    self.client
                        .publish_with_headers(m.subject, headers, m.payload)
                        .await
                }
            };
            sent.map_err(|e| batch_error("cannot publish", Box::new(e)))?;
        }
        self.sent.push_back(Sent {
            n: token,
            id,
            expected,
            len: n,
            at: Instant::now(),
        });
        Ok(expected + n as u64)
    }

    /// Waits for the oldest batch's commit; returns the stream sequence of
    /// its last message. Pending forever when no batch is in flight.
    /// Cancel-safe: a reply is taken off the subscription only to be
    /// handled at once.
    pub(super) async fn next_commit(&mut self) -> Result<u64> {
        loop {
            let Some(head) = self.sent.front() else {
                return std::future::pending().await;
            };
            let left = COMMIT_TIMEOUT.saturating_sub(head.at.elapsed());
            let reply = match tokio::time::timeout(left, self.sub.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Err(Error::new(
                        Kind::Publish,
                        "atomic batch: the reply subscription ended",
                    ));
                }
                Err(_) => {
                    return Err(Error::new(
                        Kind::Publish,
                        "JetStream did not acknowledge an atomic batch in time: resuming from the stream",
                    ));
                }
            };
            let mut parts = reply.subject.as_str().rsplit('.');
            let (kind, token) = (parts.next(), parts.next());
            match kind {
                Some("f") => check_batch_reply(&reply.payload)?,
                Some("c") if token == Some(itoa::Buffer::new().format(head.n)) => {
                    check_batch_reply(&reply.payload)?;
                    let seq = check_commit(&reply.payload, &head.id, head.expected, head.len)?;
                    self.sent.pop_front();
                    return Ok(seq);
                }
                _ => {
                    check_batch_reply(&reply.payload)?;
                    return Err(Error::new(
                        Kind::Publish,
                        "atomic batch: a commit was acknowledged out of order: resuming from the stream",
                    ));
                }
            }
        }
    }
}

/// The headers of message `i` (0-based) of an atomic batch of `n` with id
/// `id` that must start right after stream sequence `expected`: the id and
/// place on each, the expected sequence on the first, the commit on the
/// last.
fn batch_headers(
    mut headers: async_nats::HeaderMap,
    id: &str,
    i: usize,
    n: usize,
    expected: u64,
) -> async_nats::HeaderMap {
    headers.insert("Nats-Batch-Id", id);
    headers.insert("Nats-Batch-Sequence", itoa::Buffer::new().format(i + 1));
    if i == 0 {
        headers.insert(
            "Nats-Expected-Last-Sequence",
            itoa::Buffer::new().format(expected),
        );
    }
    if i + 1 == n {
        headers.insert("Nats-Batch-Commit", "1");
    }
    headers
}

fn too_big(n: usize) -> Error {
    Error::new(
        Kind::Publish,
        format!("a batch of {n} messages is over nats-server's limit of {MAX_BATCH}"),
    )
}

/// A batch id unique to this process and attempt (a chunk sent again must
/// not join a batch abandoned on the server), for [`Pipe::send`] and fast
/// snapshot chunks: `w<nanoseconds at start>-<pid>-<n>`, in hex, where `n`
/// counts the process' batches. Short: a fast chunk's id is in a header of
/// each of its messages, and nats-server scans a message's headers once
/// for each it looks up.
pub fn unique_batch_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    static START: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let start = START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    });
    format!("w{start:x}-{:x}-{n:x}", std::process::id())
}

fn batch_error(what: &str, e: Box<dyn std::error::Error + Send + Sync>) -> Error {
    Error::with_source(Kind::Publish, format!("atomic batch: {what}"), e)
}

/// Reads the commit's pub ack: the batch `id` of `n` messages must end at
/// `expected + n`, which it returns.
fn check_commit(payload: &[u8], id: &str, expected: u64, n: usize) -> Result<u64> {
    let ack: BatchAck = serde_json::from_slice(payload)
        .map_err(|e| batch_error("unreadable commit acknowledgement", Box::new(e)))?;
    let want = expected + n as u64;
    if ack.seq != want || ack.count != n as u64 || ack.batch != id {
        return Err(Error::new(
            Kind::Publish,
            format!(
                "JetStream committed a batch of {} ending at sequence {}, walnats expected {n} ending at {want}: \
                 resuming from the stream",
                ack.count, ack.seq
            ),
        ));
    }
    Ok(want)
}

#[derive(serde::Deserialize)]
struct BatchAck {
    seq: u64,
    #[serde(default)]
    count: u64,
    #[serde(default)]
    batch: String,
}

/// An empty reply (batch started) or a pub ack is fine; an error reply
/// names what JetStream refused.
fn check_batch_reply(payload: &[u8]) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Reply {
        error: Option<ApiError>,
    }
    if payload.is_empty() {
        return Ok(());
    }
    let reply: Reply = serde_json::from_slice(payload).map_err(|e| {
        Error::with_source(
            Kind::Publish,
            "atomic batch: unreadable reply from JetStream",
            e,
        )
    })?;
    match reply.error {
        None => Ok(()),
        Some(e) => Err(refused("an atomic batch", &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What nats-server answers to an atomic batch's first message or
    /// commit: nothing (the batch goes on), a pub ack, or an error that
    /// walnats passes on with its fix.
    #[test]
    fn batch_replies_pass_unless_jetstream_refused() {
        assert!(check_batch_reply(b"").is_ok());
        assert!(check_batch_reply(br#"{"stream":"S","seq":12,"batch":"b","count":4}"#).is_ok());
        let refused = check_batch_reply(
            br#"{"error":{"code":400,"err_code":10174,"description":"atomic publish is disabled"}}"#,
        )
        .err()
        .map(|e| (e.kind(), e.to_string()));
        let Some((kind, text)) = refused else {
            panic!("an error reply read as fine");
        };
        assert_eq!(kind, Kind::Publish);
        assert!(text.contains("atomic publish is disabled"), "{text}");
        assert!(text.contains("(allow_atomic)"), "{text}");
        let unreadable = check_batch_reply(b"<html>").err().map(|e| e.kind());
        assert_eq!(unreadable, Some(Kind::Publish));
    }

    /// A commit counts only when it stored this batch, all of it, right
    /// after the sequence walnats expected; anything else makes walnats
    /// resume from the stream.
    #[test]
    fn a_commit_must_store_the_whole_batch_where_expected() {
        let ack = |seq: u64, batch: &str, count: u64| {
            format!(r#"{{"stream":"S","seq":{seq},"batch":"{batch}","count":{count}}}"#)
        };
        let check = |payload: String| check_commit(payload.as_bytes(), "b1", 10, 4);
        assert_eq!(check(ack(14, "b1", 4)).ok(), Some(14));
        for wrong in [
            ack(15, "b1", 4),
            ack(14, "b1", 3),
            ack(14, "b2", 4),
            r#"{"stream":"S","seq":14}"#.to_owned(),
            "not json".to_owned(),
        ] {
            assert_eq!(
                check(wrong.clone()).err().map(|e| e.kind()),
                Some(Kind::Publish),
                "{wrong}"
            );
        }
    }
}
