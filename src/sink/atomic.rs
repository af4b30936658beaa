//! Atomic batches (ADR-50, nats-server 2.12.1+): a chunk of messages that
//! the stream stores whole, right after a known sequence, or not at all.
//! Snapshots publish each chunk of rows this way.
//!
//! It owns the batch headers and checks the replies to the first message
//! and to the commit. It waits for the commit, so nothing else may be in
//! flight meanwhile; it never pipelines and never retries: after a failure
//! walnats resumes from what the stream holds.

use super::OutMsg;
use super::publisher::{ApiError, refused};
use crate::error::{Error, Kind, Result};

/// The most messages nats-server takes in one atomic batch.
pub const MAX_BATCH: usize = 1000;

/// Publishes `msgs` as one atomic batch that must start right after
/// stream sequence `expected`; returns the sequence of the last one.
pub(super) async fn publish(
    client: &async_nats::Client,
    expected: u64,
    msgs: Vec<OutMsg>,
) -> Result<u64> {
    let n = msgs.len();
    if n == 0 {
        return Ok(expected);
    }
    if n > MAX_BATCH {
        return Err(Error::new(
            Kind::Publish,
            format!("a batch of {n} messages is over nats-server's limit of {MAX_BATCH}"),
        ));
    }
    let id = batch_id(expected);
    let mut last = None;
    for (i, m) in msgs.into_iter().enumerate() {
        let mut headers = m.headers;
        headers.insert("Nats-Batch-Id", id.as_str());
        headers.insert("Nats-Batch-Sequence", itoa::Buffer::new().format(i + 1));
        if i == 0 {
            headers.insert(
                "Nats-Expected-Last-Sequence",
                itoa::Buffer::new().format(expected),
            );
        }
        let commit = i + 1 == n;
        if commit {
            headers.insert("Nats-Batch-Commit", "1");
        }
        if i == 0 || commit {
            // The first message is a request so that a refusal (no
            // atomic batches on this stream) comes back at once.
            let reply = client
                .request_with_headers(m.subject, headers, m.payload)
                .await
                .map_err(|e| batch_error("no reply from JetStream", Box::new(e)))?;
            check_batch_reply(&reply.payload)?;
            if commit {
                last = Some(reply);
            }
        } else {
            client
                .publish_with_headers(m.subject, headers, m.payload)
                .await
                .map_err(|e| batch_error("cannot publish", Box::new(e)))?;
        }
    }
    let reply = last.ok_or_else(|| Error::new(Kind::Publish, "atomic batch: no commit"))?;
    check_commit(&reply.payload, &id, expected, n)
}

/// Unique per attempt (a retried chunk must not join an abandoned batch);
/// at most 64 characters.
fn batch_id(expected: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("walnats-{expected}-{nanos}")
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
