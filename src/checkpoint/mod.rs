//! The resume position: what is durable, what to skip on restart, and what
//! is safe to confirm to PostgreSQL.
//!
//! The only module that decides what the slot may confirm. Three facts make
//! exactly-once work across `kill -9`, long outages and any retention:
//!
//! 1. Replaying the slot from a checkpoint emits the same messages in the
//!    same order: the messages are a function of the WAL and of the
//!    checkpointed state (which `_schema` messages were already published).
//! 2. walnats is the stream's only writer and publishes with
//!    `Nats-Expected-Last-Sequence`, so the stream holds a gap-free prefix
//!    of that replay: the stream's `last_seq` minus the checkpoint's
//!    `stream_seq` is exactly how many replayed messages are already in the
//!    stream, even when consumers or limits have deleted them.
//! 3. The slot is confirmed only up to a checkpoint that is durable in the
//!    KV bucket, so a replay always starts at or before the checkpoint.
//!
//! `Nats-Msg-Id` dedup is a second line of defence, not the mechanism: the
//! duplicate window forgets.

use std::collections::BTreeMap;
use std::time::Instant;

use async_nats::jetstream::{self, kv, stream::Stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Kind, Result};
use crate::lsn::{Lsn, Position};

/// What is published, as of one acknowledged message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Checkpoint {
    pub version: u32,
    /// The last change whose publish JetStream acknowledged; every
    /// position at or before it is in the stream.
    pub pos: Option<Position>,
    /// The stream sequence of the last acknowledged message.
    pub stream_seq: u64,
    /// The slot may be confirmed up to here: the end LSN of the last
    /// transaction whose every message is acknowledged, or a keepalive
    /// position reached while nothing was in flight.
    pub confirmed: Lsn,
    /// Relation OID → hash of the column set last published on `_schema`.
    pub schemas: BTreeMap<u32, u64>,
    /// Whether `_tx` markers were being published: a replay must emit the
    /// same messages the stream already holds, even if the setting changed.
    #[serde(default)]
    pub tx_markers: bool,
    /// The commit LSN of the last transaction whose BEGIN marker is
    /// acknowledged: a BEGIN precedes its transaction's first position, so
    /// the position alone cannot say it is out.
    #[serde(default)]
    pub begun: Option<Lsn>,
    /// The initial snapshot, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<crate::snapshot::SnapshotState>,
    /// Tables `walnats snapshot` asked to re-read; the first is in progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rereads: Vec<crate::snapshot::reread::Reread>,
    /// A re-read chunk announced before its batch is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_reread: Option<crate::snapshot::reread::PendingReread>,
}

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

    pub async fn delete(&self) -> Result<()> {
        self.kv
            .purge(self.key.clone())
            .await
            .map_err(|e| kv_err("cannot delete the checkpoint", e))
    }
}

/// How a session picks up: what the stream already holds of the replay.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The checkpointed state: replayed changes at or before `state.pos`
    /// are dropped without a trace.
    pub state: Checkpoint,
    /// After those, this many replayed messages are in the stream already.
    pub skip: u64,
    /// The stream's last sequence when the session started.
    pub last_seq: u64,
    /// `Nats-Msg-Id` of the stream's last message, when it is still there:
    /// the last skipped message must carry it.
    pub last_msg_id: Option<String>,
    /// Whether `state` was read from a saved checkpoint (otherwise it is a
    /// fresh start and takes the current settings).
    pub from_checkpoint: bool,
}

/// Reads the checkpoint and the stream's tail and decides where to resume.
/// `slot_created` is true when this start created the slot: a stream that
/// holds messages then holds them from an earlier slot.
pub async fn resume(store: &Store, stream: &mut Stream, slot_created: bool) -> Result<Resume> {
    let info = stream
        .info()
        .await
        .map_err(|e| Error::with_source(Kind::NatsConnect, "cannot read the stream's state", e))?;
    let last_seq = info.state.last_sequence;
    let name = info.config.name.clone();
    let last_msg = if last_seq > 0 {
        stream.get_raw_message(last_seq).await.ok()
    } else {
        None
    };
    let last_msg_id = last_msg
        .as_ref()
        .and_then(|m| m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned()));
    let saved = if slot_created {
        None
    } else {
        store.load().await?
    };
    match saved {
        Some(state) => {
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
            Ok(Resume {
                from_checkpoint: true,
                skip: last_seq - state.stream_seq,
                last_seq,
                last_msg_id: if last_seq > state.stream_seq {
                    last_msg_id
                } else {
                    None
                },
                state,
            })
        }
        None if last_seq == 0 || slot_created => Ok(Resume {
            state: Checkpoint {
                version: 1,
                stream_seq: last_seq,
                ..Default::default()
            },
            skip: 0,
            last_seq,
            last_msg_id: None,
            from_checkpoint: false,
        }),
        None => {
            // The slot exists but the checkpoint is gone. The stream's last
            // message says how far walnats got, if it is still there.
            let pos = last_msg.as_ref().and_then(|m| {
                let lsn = m
                    .headers
                    .get("Cdc-Commit-Lsn")?
                    .as_str()
                    .parse::<Lsn>()
                    .ok()?;
                let seq = m.headers.get("Cdc-Seq")?.as_str().parse::<u32>().ok()?;
                Some(Position::new(lsn, seq))
            });
            match pos {
                Some(pos) => {
                    tracing::warn!(stream = %name, %last_seq, commit_lsn = %pos.commit_lsn, seq = pos.seq,
                        "no checkpoint found; resuming after the stream's last message");
                    Ok(Resume {
                        state: Checkpoint {
                            version: 1,
                            pos: Some(pos),
                            stream_seq: last_seq,
                            ..Default::default()
                        },
                        skip: 0,
                        last_seq,
                        last_msg_id: None,
                        from_checkpoint: false,
                    })
                }
                None => Err(Error::new(
                    Kind::Checkpoint,
                    format!(
                        "no checkpoint {:?} in the checkpoint bucket, and stream {name:?}'s last message \
                         (sequence {last_seq}) is gone, so walnats cannot tell what it already published: \
                         run `walnats slot drop --yes` to start over from the current WAL position",
                        store.key()
                    ),
                )),
            }
        }
    }
}

/// The acknowledged state, the durable state, and what may be confirmed.
pub struct Tracker {
    acked: Checkpoint,
    durable: Checkpoint,
    last_write: Instant,
}

impl Tracker {
    pub fn new(start: Checkpoint) -> Tracker {
        Tracker {
            acked: start.clone(),
            durable: start,
            last_write: Instant::now(),
        }
    }

    /// A message JetStream stored at `seq` (or that the stream already
    /// held, on resume).
    pub fn on_message(
        &mut self,
        seq: u64,
        pos: Option<Position>,
        schema: Option<(u32, u64)>,
        begin_of: Option<Lsn>,
    ) {
        self.acked.stream_seq = seq;
        if begin_of.is_some() {
            self.acked.begun = begin_of;
        }
        if let Some(p) = pos {
            self.acked.pos = Some(p);
        }
        if let Some((oid, hash)) = schema {
            self.acked.schemas.insert(oid, hash);
        }
    }

    /// Every message of the transaction ending at `end` is acknowledged.
    pub fn on_tx_end(&mut self, end: Lsn) {
        self.acked.confirmed = self.acked.confirmed.max(end);
    }

    /// Nothing is in flight and the server is at `wal_end`: the slot may
    /// move there once this is durable (idle slots must not pin WAL).
    pub fn on_idle(&mut self, wal_end: Lsn) {
        self.acked.confirmed = self.acked.confirmed.max(wal_end);
    }

    /// From now on checkpoints record this `tx_markers` setting.
    pub fn set_tx_markers(&mut self, on: bool) {
        self.acked.tx_markers = on;
    }

    pub fn acked(&self) -> &Checkpoint {
        &self.acked
    }

    /// For state that changes between messages (the re-read queue), and
    /// for a write-ahead checkpoint while nothing is in flight.
    pub fn acked_mut(&mut self) -> &mut Checkpoint {
        &mut self.acked
    }

    pub fn durable(&self) -> &Checkpoint {
        &self.durable
    }

    /// A checkpoint to write, if the acknowledged state moved on.
    pub fn due(&self, min_gap: std::time::Duration) -> Option<Checkpoint> {
        (self.acked != self.durable && self.last_write.elapsed() >= min_gap)
            .then(|| self.acked.clone())
    }

    pub fn mark_written(&mut self, c: Checkpoint) {
        self.durable = c;
        self.last_write = Instant::now();
    }

    /// The LSN the slot may be confirmed to.
    pub fn confirmable(&self) -> Lsn {
        self.durable.confirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_tokens_are_kv_safe_and_distinct() {
        assert_eq!(key_token("CDC_APP"), "CDC_APP");
        assert_eq!(key_token("my.db"), "my=2Edb");
        assert_ne!(key_token("a.b"), key_token("a_b"));
        assert_eq!(key_token(""), "=00");
    }

    #[test]
    fn confirm_moves_only_with_durable_checkpoints() {
        let mut t = Tracker::new(Checkpoint::default());
        t.on_message(1, Some(Position::new(Lsn::from_u64(100), 0)), None, None);
        t.on_tx_end(Lsn::from_u64(120));
        assert_eq!(t.confirmable(), Lsn::ZERO, "acked is not durable");
        let c = t.due(std::time::Duration::ZERO).unwrap();
        t.mark_written(c);
        assert_eq!(t.confirmable(), Lsn::from_u64(120));
        assert!(t.due(std::time::Duration::ZERO).is_none());
    }
}
