//! Where a session resumes: the checkpoint, and the stream's tail when the
//! checkpoint is gone, with the stream's messages read back to compare
//! with the replay ([`StoredReader`]). Whatever it cannot prove to be
//! walnats' own is a refusal.

use async_nats::jetstream::stream::{RawMessageError, RawMessageErrorKind, Stream};

use super::{Checkpoint, ChunkTail, Store, replay};
use crate::encode;
use crate::error::{Error, Kind, Result};
use crate::lsn::{Lsn, Position};

/// A stream message read back, or `None` when it is gone (deleted by
/// retention or a consumer, or nothing at or after the sequence asked);
/// any other failure is `what` went wrong reading it.
fn unless_gone<T>(
    got: std::result::Result<T, RawMessageError>,
    what: impl FnOnce() -> String,
) -> Result<Option<T>> {
    match got {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(Error::with_source(Kind::NatsConnect, what(), e)),
    }
}

/// How a session picks up: what the stream already holds of the replay.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The checkpointed state: replayed changes at or before `state.pos`
    /// are dropped without a trace; the stream holds the replayed messages
    /// after it up to `last_seq`.
    pub state: Checkpoint,
    /// The stream's last sequence when the session started.
    pub last_seq: u64,
    /// Whether `state` was read from a saved checkpoint (otherwise it is a
    /// fresh start, or a position proven by the stream's tail).
    pub from_checkpoint: bool,
}

impl Resume {
    /// Replayed messages after the checkpoint that the stream holds.
    pub fn skip(&self) -> u64 {
        self.last_seq.saturating_sub(self.state.stream_seq)
    }
}

/// How far back from the stream's tail a lost checkpoint is looked for in
/// the stream: past `_schema` and `_tx` messages to the last change.
const TAIL_WALK: u64 = 10_000;

/// What one of the stream's messages proves about where walnats got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// A change of this slot at this position.
    Change(Position),
    /// This slot's `_schema` or `_tx` message: it proves no position
    /// (it precedes or follows a change), so the walk goes on before it.
    Marker,
    /// A snapshot read: its progress lived in the checkpoint.
    Read,
    /// Not walnats' (from this database and slot).
    Foreign,
}

fn header<'a>(h: &'a async_nats::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.as_str())
}

/// Classifies a message from the stream by its headers.
fn classify(h: Option<&async_nats::HeaderMap>, src: &encode::Source) -> Tail {
    let Some(h) = h else {
        return Tail::Foreign;
    };
    let Some(id) = header(h, "Nats-Msg-Id") else {
        return Tail::Foreign;
    };
    let own = encode::msg_id(src, Position::new(Lsn::ZERO, 0));
    let own_prefix = own.strip_suffix("0/0:0").unwrap_or(&own);
    if !id.starts_with(own_prefix) {
        return Tail::Foreign;
    }
    match header(h, "Cdc-Op") {
        Some("read") => Tail::Read,
        Some("schema" | "begin" | "end") => Tail::Marker,
        Some("insert" | "update" | "delete" | "truncate" | "message" | "outbox") => {
            let pos = header(h, "Cdc-Commit-Lsn")
                .and_then(|l| l.parse::<Lsn>().ok())
                .zip(header(h, "Cdc-Seq").and_then(|s| s.parse::<u32>().ok()))
                .map(|(l, s)| Position::new(l, s));
            match pos {
                Some(p) if encode::msg_id(src, p) == id => Tail::Change(p),
                _ => Tail::Foreign,
            }
        }
        _ => Tail::Foreign,
    }
}

/// Another client writes to walnats' subjects while walnats is down, so
/// its message is most likely the stream's last: refuse at once, rather
/// than when the replay reaches it (which waits for the next change). The
/// replay still compares every message of the range.
async fn refuse_foreign_tail(stream: &Stream, last_seq: u64, src: &encode::Source) -> Result<()> {
    let got = stream.get_raw_message(last_seq).await;
    // Gone (retention, a consumer): the replay counts it.
    let Some(msg) = unless_gone(got, || {
        format!("cannot read the stream's last message ({last_seq})")
    })?
    else {
        return Ok(());
    };
    if classify(Some(&msg.headers), src) != Tail::Foreign {
        return Ok(());
    }
    Err(Error::new(
        Kind::Checkpoint,
        format!(
            "the stream's last message (sequence {last_seq}, subject {:?}, Nats-Msg-Id {:?}) was not published by \
             walnats from slot {:?}, yet it lies in the range walnats would count as its own replay: another client \
             publishes to walnats' subjects, or another walnats shares the stream. Make walnats the only writer of \
             its subjects (NATS permissions), then start over with `walnats slot drop --yes`; deleting the message \
             does not help, as walnats could no longer tell it from one of its own",
            msg.subject.as_str(),
            msg.headers.get("Nats-Msg-Id").map_or("", |v| v.as_str()),
            src.slot
        ),
    ))
}

/// The stream's last sequence once it has not moved for `quiet`: batches a
/// crashed walnats sent just before it died may still be stored a moment
/// after a new start first reads the stream (its connection's last bytes
/// are still on their way), and a new announcement sent meanwhile could
/// land among them. Called only when a snapshot announcement may be out.
pub async fn quiet_last_seq(
    stream: &mut Stream,
    mut last_seq: u64,
    quiet: std::time::Duration,
) -> Result<u64> {
    let step = std::time::Duration::from_millis(250);
    let mut still = std::time::Duration::ZERO;
    while still < quiet {
        tokio::time::sleep(step).await;
        let now = stream
            .info()
            .await
            .map_err(|e| {
                Error::with_source(Kind::NatsConnect, "cannot read the stream's state", e)
            })?
            .state
            .last_sequence;
        if now == last_seq {
            still += step;
        } else {
            last_seq = now;
            still = std::time::Duration::ZERO;
        }
    }
    Ok(last_seq)
}

/// The batch of the stream's message at `seq` (the first after the
/// checkpoint): which announced chain of snapshot chunks landed. An atomic
/// batch's `Nats-Batch-Id`, or the chunk id in a fast chunk's
/// `Cdc-Snapshot-Cursor`; `None` when the message is gone or has neither.
pub async fn batch_id_at(stream: &Stream, seq: u64) -> Result<Option<String>> {
    Ok(batch_of(stream, seq).await?.flatten())
}

/// The batch of the stream's message at `seq` as [`batch_id_at`] reads
/// it; `None` when the message is gone, `Some(None)` when it has none.
pub async fn batch_of(stream: &Stream, seq: u64) -> Result<Option<Option<String>>> {
    let Some(msg) = message_at(stream, seq).await? else {
        return Ok(None);
    };
    if let Some(id) = msg.headers.get("Nats-Batch-Id") {
        return Ok(Some(Some(id.as_str().to_owned())));
    }
    Ok(Some(
        msg.headers
            .get(crate::publish::CURSOR_HEADER)
            .and_then(|v| v.as_str().split(' ').next())
            .map(str::to_owned),
    ))
}

/// The stream's message at `seq`; `None` when it is gone.
async fn message_at(
    stream: &Stream,
    seq: u64,
) -> Result<Option<async_nats::jetstream::message::StreamMessage>> {
    let got = stream.get_raw_message(seq).await;
    unless_gone(got, || {
        format!("cannot read the stream's message at sequence {seq}")
    })
}

/// The stream's message at `seq` (its last) as the end of a snapshot chunk
/// sent as a fast-ingest batch; `None` when it is gone or not such a row.
pub async fn chunk_tail_at(stream: &Stream, seq: u64) -> Result<Option<ChunkTail>> {
    let Some(msg) = message_at(stream, seq).await? else {
        return Ok(None);
    };
    let cursor = msg
        .headers
        .get(crate::publish::CURSOR_HEADER)
        .map(|v| v.as_str().to_owned());
    let msg_id = msg
        .headers
        .get("Nats-Msg-Id")
        .map(|v| v.as_str().to_owned());
    Ok(cursor.and_then(|c| parse_chunk_tail(&c, msg_id.as_deref())))
}

/// Reads `<chunk id>` or `<chunk id> <key as a JSON array>`, and the read's
/// place from the last field of its `Nats-Msg-Id`. `None` when malformed:
/// the settling then refuses, naming another writer.
fn parse_chunk_tail(cursor: &str, msg_id: Option<&str>) -> Option<ChunkTail> {
    match cursor.split_once(' ') {
        None => Some(ChunkTail {
            chunk: cursor.to_owned(),
            row: None,
        }),
        Some((chunk, key)) => {
            let key: Vec<String> = serde_json::from_str(key).ok()?;
            let seq = msg_id?.rsplit(':').next()?.parse().ok()?;
            Some(ChunkTail {
                chunk: chunk.to_owned(),
                row: Some((key, seq)),
            })
        }
    }
}

/// Reads the checkpoint and the stream's tail and decides where to resume.
/// `slot_created` is true when this start created the slot: a stream that
/// holds messages then holds them from an earlier slot. `snapshot_wanted`:
/// `snapshot.mode = "initial"`, which an existing slot cannot honour
/// without its checkpoint.
pub async fn resume(
    store: &Store,
    stream: &mut Stream,
    slot_created: bool,
    snapshot_wanted: bool,
    src: &encode::Source,
) -> Result<Resume> {
    let info = stream
        .info()
        .await
        .map_err(|e| Error::with_source(Kind::NatsConnect, "cannot read the stream's state", e))?;
    let last_seq = info.state.last_sequence;
    let name = info.config.name.clone();
    let saved = if slot_created {
        None
    } else {
        store.load().await?
    };
    if let Some(state) = saved {
        if last_seq < state.stream_seq {
            return Err(Error::new(
                Kind::Checkpoint,
                format!(
                    "stream {name:?} ends at sequence {last_seq}, before the checkpoint's {}: \
                     the stream was deleted or reset; to start over, run `walnats slot drop --yes` \
                     (the new slot starts at the current WAL position)",
                    state.stream_seq
                ),
            ));
        }
        if last_seq > state.stream_seq {
            refuse_foreign_tail(stream, last_seq, src).await?;
        }
        return Ok(Resume {
            state,
            last_seq,
            from_checkpoint: true,
        });
    }
    let fresh = |stream_seq| Resume {
        state: Checkpoint {
            version: 1,
            stream_seq,
            ..Default::default()
        },
        last_seq,
        from_checkpoint: false,
    };
    if slot_created {
        return Ok(fresh(last_seq));
    }
    if last_seq == 0 {
        if snapshot_wanted {
            return Err(Error::new(
                Kind::Checkpoint,
                format!(
                    "slot {:?} exists but walnats has no checkpoint {:?} for it and stream {name:?} is empty, \
                     so walnats cannot tell whether the slot's initial snapshot was ever published (the \
                     checkpoint bucket was deleted, or the slot was made by hand): run `walnats slot drop --yes` \
                     to start over with a new slot and its snapshot, or set snapshot.mode = \"never\" to stream \
                     from the slot's position without one",
                    src.slot,
                    store.key()
                ),
            ));
        }
        return Ok(fresh(0));
    }
    // The slot exists but the checkpoint is gone. The stream's last change
    // says how far walnats got, if it is still there; the `_schema` and
    // `_tx` messages after it are part of the replay and are compared.
    let mut seq = last_seq;
    loop {
        let gone = |why: &str| {
            Error::new(
                Kind::Checkpoint,
                format!(
                    "no checkpoint {:?} in the checkpoint bucket, and {why}, so walnats cannot tell what it \
                     already published: run `walnats slot drop --yes` to start over from the current WAL \
                     position (with snapshot.mode = \"initial\", a new snapshot)",
                    store.key()
                ),
            )
        };
        if seq == 0 || last_seq - seq >= TAIL_WALK {
            return Err(gone(&format!(
                "none of stream {name:?}'s last {} message(s) is a change of slot {:?}",
                last_seq - seq,
                src.slot
            )));
        }
        let got = stream.get_raw_message(seq).await;
        let Some(msg) = unless_gone(got, || {
            format!("cannot read message {seq} of stream {name:?}")
        })?
        else {
            return Err(gone(&format!(
                "stream {name:?}'s message at sequence {seq} is gone (deleted by retention or a consumer)"
            )));
        };
        match classify(Some(&msg.headers), src) {
            Tail::Change(pos) => {
                tracing::warn!(stream = %name, stream_seq = seq, %last_seq, commit_lsn = %pos.commit_lsn,
                    seq = pos.seq, "no checkpoint found; resuming after the stream's last change, \
                    comparing the messages after it with the replay");
                let mut r = fresh(seq);
                r.state.pos = Some(pos);
                return Ok(r);
            }
            Tail::Marker => seq -= 1,
            Tail::Read => {
                return Err(gone(&format!(
                    "stream {name:?}'s message at sequence {seq} is a snapshot read: a snapshot was under way \
                     and its progress lived in the lost checkpoint"
                )));
            }
            Tail::Foreign => {
                return Err(gone(&format!(
                    "stream {name:?}'s message at sequence {seq} (subject {:?}) was not published by walnats \
                     from slot {:?}",
                    msg.subject.as_str(),
                    src.slot
                )));
            }
        }
    }
}

/// Reads the stream's messages of a replayed range in order, for
/// [`replay::Replay::check`] to compare with: one request per message, each
/// asking for the first message at or after a sequence, so a run of
/// deleted ones costs one request.
pub struct StoredReader {
    stream: Stream,
    /// A message past the sequence last asked for (the ones in between
    /// are gone).
    peek: Option<replay::Stored>,
    /// Nothing at or after the last sequence asked for is left in range.
    end: bool,
}

impl StoredReader {
    pub fn new(stream: Stream) -> StoredReader {
        StoredReader {
            stream,
            peek: None,
            end: false,
        }
    }

    /// The stream's message at `seq`, `None` when it is gone; `last` is the
    /// range's end.
    pub async fn at(&mut self, seq: u64, last: u64) -> Result<Option<replay::Stored>> {
        if let Some(p) = &self.peek {
            if p.seq > seq {
                return Ok(None);
            }
            if p.seq == seq {
                return Ok(self.peek.take());
            }
            self.peek = None;
        }
        if self.end {
            return Ok(None);
        }
        let got = self
            .stream
            .raw_message_builder()
            .sequence(seq)
            .next_by_subject(">")
            .send()
            .await;
        let what =
            || format!("cannot read message {seq} of the stream to compare it with the replay");
        let Some(m) = unless_gone(got, what)? else {
            self.end = true;
            return Ok(None);
        };
        if m.sequence > last {
            self.end = true;
            return Ok(None);
        }
        let stored = replay::Stored {
            seq: m.sequence,
            subject: m.subject.to_string(),
            msg_id: m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned()),
        };
        if stored.seq == seq {
            Ok(Some(stored))
        } else {
            self.peek = Some(stored);
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fast chunk's message names its chunk, and its row by key and by
    /// the last field of `Nats-Msg-Id` (a database name may hold `:`).
    #[test]
    fn a_chunk_tail_is_read_from_the_cursor_header_and_the_message_id() {
        let row = parse_chunk_tail(
            r#"walnats-1-2-3 ["a b","7"]"#,
            Some("d:b:x:walnats:0/FF:41"),
        );
        assert_eq!(
            row,
            Some(ChunkTail {
                chunk: "walnats-1-2-3".into(),
                row: Some((vec!["a b".into(), "7".into()], 41)),
            })
        );
        let schema = parse_chunk_tail("walnats-1-2-3", None);
        assert_eq!(schema.map(|t| t.row), Some(None));
        for (cursor, id) in [
            ("c [1]", Some("d:s:0/1:2")),
            ("c not json", Some("d:s:0/1:2")),
            (r#"c ["1"]"#, None),
            (r#"c ["1"]"#, Some("d:s:0/1:x")),
        ] {
            assert_eq!(parse_chunk_tail(cursor, id), None, "{cursor} {id:?}");
        }
    }

    fn src() -> encode::Source {
        encode::Source {
            db: "app".to_owned(),
            slot: "walnats".to_owned(),
            prefix: "cdc.app".to_owned(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, *v);
        }
        h
    }

    #[test]
    fn a_change_of_this_slot_proves_its_position() {
        let h = headers(&[
            ("Nats-Msg-Id", "app:walnats:0/16B3800:2"),
            ("Cdc-Op", "update"),
            ("Cdc-Commit-Lsn", "0/16B3800"),
            ("Cdc-Seq", "2"),
        ]);
        let want = Position::new("0/16B3800".parse().unwrap(), 2);
        assert_eq!(classify(Some(&h), &src()), Tail::Change(want));
        // An outbox event takes its change's position too.
        let outbox = headers(&[
            ("Nats-Msg-Id", "app:walnats:0/16B3800:2"),
            ("Cdc-Op", "outbox"),
            ("Cdc-Commit-Lsn", "0/16B3800"),
            ("Cdc-Seq", "2"),
        ]);
        assert_eq!(classify(Some(&outbox), &src()), Tail::Change(want));
    }

    #[test]
    fn what_proves_no_position_is_told_apart() {
        let schema = headers(&[
            ("Nats-Msg-Id", "app:walnats:0/16B3800:2:schema"),
            ("Cdc-Op", "schema"),
            ("Cdc-Commit-Lsn", "0/16B3800"),
            ("Cdc-Seq", "2"),
        ]);
        assert_eq!(classify(Some(&schema), &src()), Tail::Marker);
        let end = headers(&[
            ("Nats-Msg-Id", "app:walnats:0/16B3800:0:end"),
            ("Cdc-Op", "end"),
        ]);
        assert_eq!(classify(Some(&end), &src()), Tail::Marker);
        let read = headers(&[
            ("Nats-Msg-Id", "app:walnats:0/16B37FF:7"),
            ("Cdc-Op", "read"),
            ("Cdc-Commit-Lsn", "0/16B37FF"),
            ("Cdc-Seq", "7"),
        ]);
        assert_eq!(classify(Some(&read), &src()), Tail::Read);
    }

    #[test]
    fn another_writer_proves_nothing() {
        assert_eq!(classify(None, &src()), Tail::Foreign);
        let no_id = headers(&[("Cdc-Op", "insert")]);
        assert_eq!(classify(Some(&no_id), &src()), Tail::Foreign);
        // Another slot's walnats on the same stream.
        let other = headers(&[
            ("Nats-Msg-Id", "app:other:0/16B3800:0"),
            ("Cdc-Op", "insert"),
            ("Cdc-Commit-Lsn", "0/16B3800"),
            ("Cdc-Seq", "0"),
        ]);
        assert_eq!(classify(Some(&other), &src()), Tail::Foreign);
        // Headers that do not add up to the id they carry.
        let forged = headers(&[
            ("Nats-Msg-Id", "app:walnats:0/16B3800:0"),
            ("Cdc-Op", "insert"),
            ("Cdc-Commit-Lsn", "0/16B3800"),
            ("Cdc-Seq", "9"),
        ]);
        assert_eq!(classify(Some(&forged), &src()), Tail::Foreign);
    }
}
