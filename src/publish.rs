//! One way out for every message, streamed, snapshot or re-read: encode →
//! `_schema` first → the oversize policy → the publisher.
//!
//! The decisions that must come out the same on every pass over the same
//! WAL live here once: whether a change needs a `_schema` message before
//! it (the column set the stream last saw for its relation), and what an
//! oversized message becomes (`limits.on_oversize`: a stop, nothing, or a
//! claim check to a body in the Object Store). A replay that decided either
//! differently would number the stream differently. Which messages are
//! already in the stream, and what is acknowledged, is not its business
//! (`checkpoint`), and neither is how a message goes over the wire
//! (`sink`, which never sees an encoder).

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{error, info, warn};

use crate::config::OversizePolicy;
use crate::encode::{Encoder, OutMsg};
use crate::error::{Error, Kind, Result};
use crate::event::{Body, Event, Op, RelationInfo};
use crate::lsn::{Lsn, Position};
use crate::pgoutput::TupleData;
use crate::sink::Publisher;
use crate::sink::oversize::OversizeStore;

/// What becomes of one event.
pub enum Prepared {
    /// Publish this (the message, or the claim check of its body).
    Send(OutMsg),
    /// Over max_payload and `limits.on_oversize = "skip"`: not published.
    Skipped,
}

/// Read events of one chunk, encoded, with the table's `_schema` first when
/// the stream has not seen this column set.
pub struct Reads {
    pub msgs: Vec<OutMsg>,
    /// The `_schema` the chunk carries.
    pub schema: Option<(u32, u64)>,
    /// The `Cdc-Seq` after the chunk's last read.
    pub next_seq: u32,
}

pub struct Outlet {
    pub publisher: Publisher,
    encoder: Encoder,
    policy: OversizePolicy,
    /// Where oversized bodies go with `on_oversize = "object_store"`.
    oversize: Option<OversizeStore>,
    stream: String,
    schemas: SchemasSent,
    /// The [`CURSOR_HEADER`] of the next message [`Outlet::prepare`]
    /// encodes (a snapshot read's).
    cursor: Option<String>,
}

/// On each message of a snapshot chunk published as a fast-ingest batch:
/// `<chunk id>` on its `_schema` message, `<chunk id> <key>` on a row's,
/// the key being a JSON array of its primary key values as PostgreSQL
/// prints them. A chunk may land in part; on resume, the stream's last
/// message says whose chunk it is and which row the snapshot goes on after.
pub const CURSOR_HEADER: &str = "Cdc-Snapshot-Cursor";

/// Relation OID → the column set last handed to the publisher on `_schema`
/// (the checkpoint's, at the start).
pub struct SchemasSent(BTreeMap<u32, u64>);

impl SchemasSent {
    /// The `_schema` event that must go before `ev`: `ev` is a row or a
    /// truncate of a column set the stream has not seen. Recorded as sent.
    pub fn before(&mut self, ev: &Event) -> Option<(Event, (u32, u64))> {
        let rel = match &ev.body {
            Body::Row { rel, .. } | Body::Truncate { rel, .. } => rel,
            _ => return None,
        };
        if self.0.get(&rel.oid.0) == Some(&rel.schema_hash) {
            return None;
        }
        self.0.insert(rel.oid.0, rel.schema_hash);
        let schema = Event {
            body: Body::Schema {
                rel: Arc::clone(rel),
            },
            ..ev.clone()
        };
        Some((schema, (rel.oid.0, rel.schema_hash)))
    }
}

impl Outlet {
    pub fn new(
        publisher: Publisher,
        encoder: Encoder,
        policy: OversizePolicy,
        oversize: Option<OversizeStore>,
        stream: &str,
        schemas: BTreeMap<u32, u64>,
    ) -> Outlet {
        Outlet {
            publisher,
            encoder,
            policy,
            oversize,
            stream: stream.to_owned(),
            schemas: SchemasSent(schemas),
            cursor: None,
        }
    }

    /// The `_schema` event that must go out before `ev`, and its (relation,
    /// hash) for the checkpoint; recorded as sent.
    pub fn schema_first(&mut self, ev: &Event) -> Option<(Event, (u32, u64))> {
        self.schemas.before(ev)
    }

    /// A `_schema` message found in the stream (a re-read chunk a resumed
    /// replay steps over): `(relation, hash)` is what the stream has now.
    pub fn schema_stored(&mut self, (oid, hash): (u32, u64)) {
        self.schemas.0.insert(oid, hash);
    }

    /// Whether the stream has (or will have, from what was handed over)
    /// `rel`'s column set on `_schema`.
    pub fn schema_sent(&self, rel: &RelationInfo) -> bool {
        self.schemas.0.get(&rel.oid.0) == Some(&rel.schema_hash)
    }

    /// Encodes `ev` and applies the oversize policy. `skippable`: the event
    /// has a position of its own that the policy may drop (a change or a
    /// read; not a `_schema` or a BEGIN marker, which others depend on).
    /// `store_bodies`: false while the message is already in the stream (an
    /// unproven replay), whose body was stored before it was published and
    /// is not stored again.
    pub async fn prepare(
        &mut self,
        ev: &Event,
        skippable: bool,
        store_bodies: bool,
    ) -> Result<Prepared> {
        // Encode first: whether a message is over the limit must be decided
        // the same way when it is replayed.
        let mut msg = self.encoder.encode(ev)?;
        if let Some(c) = self.cursor.take() {
            msg.headers.insert(CURSOR_HEADER, c);
        }
        let size = Publisher::wire_size(&msg);
        let max = self.publisher.max_payload();
        if size <= max {
            return Ok(Prepared::Send(msg));
        }
        let what = describe(ev, size, max);
        match self.policy {
            OversizePolicy::Skip if skippable => {
                warn!(subject = %msg.subject, size, lsn = %ev.lsn, "oversized message skipped (limits.on_oversize = skip)");
                metrics::counter!(crate::metrics::OVERSIZE_SKIPPED, "subject" => msg.subject)
                    .increment(1);
                Ok(Prepared::Skipped)
            }
            OversizePolicy::ObjectStore if store_bodies => {
                // A big put can take longer than JetStream keeps an idle
                // fast batch open.
                self.publisher.flush().await?;
                self.check_in(ev, msg, &what).await.map(Prepared::Send)
            }
            OversizePolicy::ObjectStore => Ok(Prepared::Send(msg)),
            _ => {
                error!(subject = %msg.subject, size, lsn = %ev.lsn, "oversized message");
                Err(Error::new(
                    Kind::Oversize,
                    format!(
                        "{what}: raise max_payload on the NATS server, or set limits.on_oversize = \
                         \"object_store\" or \"skip\"; nothing was confirmed past it"
                    ),
                ))
            }
        }
    }

    /// Stores an oversized body in the Object Store and returns the claim
    /// check to publish in its place. The put is acknowledged before the
    /// claim is published, so no consumer sees a dangling reference; a
    /// replay after a crash in between puts the same bytes again.
    async fn check_in(&mut self, ev: &Event, msg: OutMsg, what: &str) -> Result<OutMsg> {
        let store = self.oversize.as_ref().ok_or_else(|| {
            Error::new(
                Kind::Oversize,
                format!("{what}, and the Object Store bucket is not open"),
            )
        })?;
        let claim = store.put_message(&self.stream, &msg).await?;
        let subject = msg.subject.clone();
        let out = self.encoder.claim_check(ev, msg, &claim)?;
        let claim_size = Publisher::wire_size(&out);
        if claim_size > self.publisher.max_payload() {
            return Err(Error::new(
                Kind::Oversize,
                format!(
                    "{what}, and even its claim check is {claim_size} bytes (its key is that large): \
                     raise max_payload on the NATS server; nothing was confirmed past it"
                ),
            ));
        }
        info!(%subject, size = claim.size, bucket = %claim.bucket, object = %claim.name,
            "oversized message stored in the Object Store; its claim check goes to the stream");
        metrics::counter!(crate::metrics::OVERSIZE_STORED, "subject" => subject).increment(1);
        Ok(out)
    }

    /// `rows` of `rel` as reads at positions (`lsn`, `first_seq`…), with
    /// `cdc_lsn` in `Cdc-Lsn`: the snapshot's and a re-read's chunk.
    ///
    /// `cursor`: the chunk's id and each row's key, for a chunk published
    /// as a fast-ingest batch: each message then carries [`CURSOR_HEADER`].
    pub async fn reads(
        &mut self,
        rel: &Arc<RelationInfo>,
        rows: Vec<TupleData>,
        at: Position,
        cdc_lsn: Lsn,
        cursor: Option<(&str, &[Vec<String>])>,
    ) -> Result<Reads> {
        let mut seq = at.seq;
        let mut msgs = Vec::with_capacity(rows.len() + 1);
        let mut schema = None;
        for (i, row) in rows.into_iter().enumerate() {
            let ev = Event {
                pos: Position::new(at.commit_lsn, seq),
                lsn: cdc_lsn,
                tx: None,
                snapshot: true,
                body: Body::Row {
                    op: Op::Read,
                    rel: Arc::clone(rel),
                    old: None,
                    new: Some(row),
                },
            };
            seq = seq.checked_add(1).ok_or_else(|| {
                Error::new(Kind::Protocol, "a snapshot of more than 4 billion rows")
            })?;
            if let Some((sev, s)) = self.schema_first(&ev) {
                schema = Some(s);
                self.cursor = cursor.map(|(id, _)| id.to_owned());
                if let Prepared::Send(m) = self.prepare(&sev, false, true).await? {
                    msgs.push(m);
                }
            }
            if let Some((id, keys)) = cursor {
                let key = keys.get(i).ok_or_else(|| {
                    Error::new(Kind::Protocol, "internal: a snapshot row without its key")
                })?;
                let key = serde_json::to_string(key).map_err(|e| {
                    Error::new(Kind::Protocol, format!("internal: a key as JSON: {e}"))
                })?;
                self.cursor = Some(format!("{id} {key}"));
            }
            if let Prepared::Send(m) = self.prepare(&ev, true, true).await? {
                msgs.push(m);
            }
        }
        Ok(Reads {
            msgs,
            schema,
            next_seq: seq,
        })
    }
}

/// Names an oversized message for logs and errors: its op, table and place,
/// never a value (row values can be secrets).
fn describe(ev: &Event, size: usize, max: usize) -> String {
    let table = match &ev.body {
        Body::Row { rel, .. } | Body::Truncate { rel, .. } | Body::Schema { rel } => {
            format!(" of {}.{}", rel.schema, rel.table)
        }
        _ => String::new(),
    };
    format!(
        "the {} message{table} for position {}:{} (LSN {}) is {size} bytes, over the NATS server's \
         max_payload of {max}",
        ev.op_name(),
        ev.pos.commit_lsn,
        ev.pos.seq,
        ev.lsn
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::testing::test_relation;

    fn row(rel: &Arc<RelationInfo>, seq: u32) -> Event {
        Event {
            pos: Position::new(Lsn::from_u64(0x100), seq),
            lsn: Lsn::from_u64(0xF0),
            tx: None,
            snapshot: false,
            body: Body::Row {
                op: Op::Insert,
                rel: Arc::clone(rel),
                old: None,
                new: None,
            },
        }
    }

    #[test]
    fn a_schema_goes_first_once_per_column_set() {
        let rel = test_relation("public", "t");
        let mut sent = SchemasSent(BTreeMap::new());
        let (schema, record) = sent.before(&row(&rel, 0)).unwrap();
        assert!(matches!(schema.body, Body::Schema { .. }));
        assert_eq!(
            schema.pos,
            Position::new(Lsn::from_u64(0x100), 0),
            "the change's position"
        );
        assert_eq!(record, (16_384, 0));
        assert!(sent.before(&row(&rel, 1)).is_none(), "already sent");
        // The column set changed (a new hash): sent again.
        let mut changed = crate::event::testing::relation(
            16_384,
            "public",
            "t",
            crate::pgoutput::ReplicaIdentity::Default,
            Vec::new(),
        );
        Arc::get_mut(&mut changed).unwrap().schema_hash = 9;
        assert_eq!(
            sent.before(&row(&changed, 2)).map(|(_, r)| r),
            Some((16_384, 9))
        );
    }

    #[test]
    fn what_the_checkpoint_recorded_is_not_sent_again_and_messages_need_none() {
        let rel = test_relation("public", "t");
        let mut sent = SchemasSent(BTreeMap::from([(16_384, 0)]));
        assert!(sent.before(&row(&rel, 0)).is_none());
        let msg = Event {
            body: Body::Message {
                transactional: false,
                prefix: "app".to_owned(),
                content: bytes::Bytes::new(),
            },
            ..row(&rel, 0)
        };
        let mut empty = SchemasSent(BTreeMap::new());
        assert!(empty.before(&msg).is_none());
    }

    #[test]
    fn an_oversized_message_is_named_without_its_values() {
        let rel = test_relation("public", "t");
        let text = describe(&row(&rel, 3), 10_669, 4096);
        assert_eq!(
            text,
            "the insert message of public.t for position 0/100:3 (LSN 0/F0) is 10669 bytes, over the NATS \
             server's max_payload of 4096"
        );
    }
}
