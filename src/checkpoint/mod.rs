//! The resume position: what is durable, what to skip on restart, and what
//! is safe to confirm to PostgreSQL.
//!
//! The only module that decides what the slot may confirm. Three facts make
//! exactly-once work across `kill -9`, long outages and any retention:
//!
//! 1. Replaying the slot from a checkpoint emits the same messages in the
//!    same order: the messages are a function of the WAL, of the
//!    checkpointed state (which `_schema` messages were already published)
//!    and of the settings that shape them, which the checkpoint records
//!    ([`Shape`]) so that a change takes effect only at a transaction
//!    boundary.
//! 2. walnats is the stream's only writer and publishes with
//!    `Nats-Expected-Last-Sequence`, so the stream holds a gap-free prefix
//!    of that replay: the stream's `last_seq` minus the checkpoint's
//!    `stream_seq` is exactly how many replayed messages are already in the
//!    stream, even when consumers or limits have deleted them. Every one
//!    that is still there is compared with the replay ([`replay`]); one
//!    walnats did not write is a refusal.
//! 3. The slot is confirmed only up to a checkpoint that is durable in the
//!    KV bucket and written after the replay is proven ([`ledger`]), so a
//!    replay always starts at or before the checkpoint.
//!
//! `Nats-Msg-Id` dedup is a second line of defence, not the mechanism: the
//! duplicate window forgets.

pub mod ledger;
pub mod record;
pub mod replay;

pub use record::{
    Checkpoint, Cursor, PendingChunk, PendingReread, Reread, Shape, SnapshotState, TableProgress,
    Target,
};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_nats::jetstream::{self, kv, stream::Stream};
use bytes::Bytes;

use crate::encode;
use crate::error::{Error, Kind, Result};
use crate::lsn::{Lsn, Position};

/// Where checkpoints live: one key per (stream, database, slot) in a KV
/// bucket on the same NATS.
pub struct Store {
    kv: kv::Store,
    key: String,
}

/// KV keys allow `[-/_=.a-zA-Z0-9]`; other bytes become `=XX`.
fn key_token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("=00");
    }
    out
}

fn kv_err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::with_source(Kind::NatsConnect, format!("checkpoint bucket: {what}"), e)
}

impl Store {
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
        stream: &str,
        db: &str,
        slot: &str,
    ) -> Result<Store> {
        let kv = match js.get_key_value(bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: bucket.to_owned(),
                    description: "walnats resume positions".to_owned(),
                    history: 5,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| kv_err(&format!("cannot create KV bucket {bucket:?}"), e))?,
        };
        Ok(Store {
            kv,
            key: format!(
                "{}.{}.{}",
                key_token(stream),
                key_token(db),
                key_token(slot)
            ),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub async fn load(&self) -> Result<Option<Checkpoint>> {
        let Some(bytes) = self
            .kv
            .get(self.key.clone())
            .await
            .map_err(|e| kv_err("cannot read the checkpoint", e))?
        else {
            return Ok(None);
        };
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::with_source(
                Kind::Checkpoint,
                format!(
                    "the checkpoint {:?} is not readable: it was written by something else; \
                     drop the slot and checkpoint with `walnats slot drop --yes` to start over",
                    self.key
                ),
                e,
            )
        })
    }

    pub async fn save(&self, c: &Checkpoint) -> Result<()> {
        let body = serde_json::to_vec(c)
            .map_err(|e| Error::with_source(Kind::Checkpoint, "cannot encode checkpoint", e))?;
        self.kv
            .put(self.key.clone(), Bytes::from(body))
            .await
            .map_err(|e| kv_err("cannot write the checkpoint", e))?;
        Ok(())
    }

    /// Where `walnats snapshot` leaves a request for the WAL message that
    /// names `nonce`: only a holder of NATS credentials can write it, so a
    /// database user who writes a `walnats.snapshot` message cannot steer
    /// walnats.
    fn request_key(&self, nonce: &str) -> String {
        format!("{}.request.{nonce}", self.key)
    }

    pub async fn save_request(&self, nonce: &str, body: Bytes) -> Result<()> {
        self.kv
            .put(self.request_key(nonce), body)
            .await
            .map_err(|e| kv_err("cannot write the snapshot request", e))?;
        Ok(())
    }

    /// The request `walnats snapshot` stored under `nonce`, if any.
    pub async fn load_request(&self, nonce: &str) -> Result<Option<Bytes>> {
        self.kv
            .get(self.request_key(nonce))
            .await
            .map_err(|e| kv_err("cannot read a snapshot request", e))
    }

    /// The secret part of walnats' single-writer lock key, and its
    /// revision: made on first use. Advisory lock keys show in `pg_locks`
    /// to every database user, so one who saw the key could take it while
    /// walnats is down; then walnats makes a new secret (see
    /// [`Store::rotate_lock_secret`]) that only holders of its NATS
    /// credentials can read.
    pub async fn lock_secret(&self) -> Result<(String, u64)> {
        let key = format!("{}.lock", self.key);
        loop {
            let entry = self
                .kv
                .entry(key.clone())
                .await
                .map_err(|e| kv_err("cannot read the lock secret", e))?;
            if let Some(e) = entry.filter(|e| e.operation == kv::Operation::Put) {
                return Ok((String::from_utf8_lossy(&e.value).into_owned(), e.revision));
            }
            let secret = crate::nonce::new()?;
            // Two walnats starting at once: one creates it, both read it.
            if let Ok(revision) = self.kv.create(key.clone(), secret.clone().into()).await {
                return Ok((secret, revision));
            }
        }
    }

    /// Replaces the lock secret at `revision` (if nobody else did already).
    pub async fn rotate_lock_secret(&self, revision: u64) -> Result<()> {
        let secret = crate::nonce::new()?;
        let key = format!("{}.lock", self.key);
        // Lost races are fine: someone else rotated it.
        let _ = self.kv.update(key, secret.into(), revision).await;
        Ok(())
    }

    pub async fn delete(&self) -> Result<()> {
        self.kv
            .purge(self.key.clone())
            .await
            .map_err(|e| kv_err("cannot delete the checkpoint", e))
    }
}

/// Writes checkpoints to the store one at a time, off the session's path:
/// the session starts a write when the ledger says one is due and hears
/// back when it is durable.
pub struct Writer {
    store: Arc<Store>,
    writing: Option<Pin<Box<dyn Future<Output = Result<Checkpoint>> + Send>>>,
}

impl Writer {
    pub fn new(store: Arc<Store>) -> Writer {
        Writer {
            store,
            writing: None,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A write is under way.
    pub fn busy(&self) -> bool {
        self.writing.is_some()
    }

    /// Starts writing `c` (the caller checks that none is under way).
    pub fn start(&mut self, c: Checkpoint) {
        let store = Arc::clone(&self.store);
        self.writing = Some(Box::pin(async move {
            store.save(&c).await?;
            Ok(c)
        }));
    }

    /// The write under way, once durable; waits forever when none is.
    pub async fn done(&mut self) -> Result<Checkpoint> {
        let Some(f) = self.writing.as_mut() else {
            return std::future::pending().await;
        };
        let written = f.await;
        self.writing = None;
        written
    }

    /// Waits for the write under way, if any.
    pub async fn finish(&mut self) -> Result<Option<Checkpoint>> {
        if self.writing.is_none() {
            return Ok(None);
        }
        self.done().await.map(Some)
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
        Some("insert" | "update" | "delete" | "truncate" | "message") => {
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
    let msg = match stream.get_raw_message(last_seq).await {
        Ok(m) => m,
        // Gone (retention, a consumer): the replay counts it.
        Err(e)
            if e.kind() == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
        {
            return Ok(());
        }
        Err(e) => {
            return Err(Error::with_source(
                Kind::NatsConnect,
                format!("cannot read the stream's last message ({last_seq})"),
                e,
            ));
        }
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
        let msg = match stream.get_raw_message(seq).await {
            Ok(m) => m,
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                return Err(gone(&format!(
                    "stream {name:?}'s message at sequence {seq} is gone (deleted by retention or a consumer)"
                )));
            }
            Err(e) => {
                return Err(Error::with_source(
                    Kind::NatsConnect,
                    format!("cannot read message {seq} of stream {name:?}"),
                    e,
                ));
            }
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
        let m = match got {
            Ok(m) => m,
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                self.end = true;
                return Ok(None);
            }
            Err(e) => {
                return Err(Error::with_source(
                    Kind::NatsConnect,
                    format!(
                        "cannot read message {seq} of the stream to compare it with the replay"
                    ),
                    e,
                ));
            }
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
    use crate::config::{OutputFormat, OversizePolicy};

    #[test]
    fn key_tokens_are_kv_safe_and_distinct() {
        assert_eq!(key_token("CDC_APP"), "CDC_APP");
        assert_eq!(key_token("my.db"), "my=2Edb");
        assert_ne!(key_token("a.b"), key_token("a_b"));
        assert_eq!(key_token(""), "=00");
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

    #[test]
    fn a_setting_change_is_named_with_both_values() {
        let a = Shape {
            publication: "p1".to_owned(),
            prefix: "cdc.app".to_owned(),
            tx_markers: false,
            format: OutputFormat::Json,
            on_oversize: OversizePolicy::Fail,
            message_prefixes: Vec::new(),
        };
        assert!(a.changes(&a).is_empty());
        let b = Shape {
            publication: "p2".to_owned(),
            tx_markers: true,
            ..a.clone()
        };
        assert_eq!(
            a.changes(&b),
            vec![
                "postgres.publication \"p1\" -> \"p2\"".to_owned(),
                "output.tx_markers false -> true".to_owned()
            ]
        );
    }

    #[test]
    fn old_checkpoints_keep_their_tx_markers() {
        let c: Checkpoint =
            serde_json::from_str(r#"{"version":1,"pos":null,"stream_seq":3,"confirmed":"0/0","schemas":{},"tx_markers":true}"#)
                .unwrap();
        let now = Shape {
            publication: "p".to_owned(),
            prefix: "cdc.app".to_owned(),
            tx_markers: false,
            format: OutputFormat::Json,
            on_oversize: OversizePolicy::Fail,
            message_prefixes: Vec::new(),
        };
        assert!(c.shape_or(&now).tx_markers);
        let back = serde_json::to_string(&Checkpoint {
            shape: Some(now.clone()),
            ..c
        })
        .unwrap();
        let again: Checkpoint = serde_json::from_str(&back).unwrap();
        assert_eq!(again.shape, Some(now));
    }
}
