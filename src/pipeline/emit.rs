//! pgoutput messages → events → the outlet (`publish`) and the ledger.
//!
//! Each change gets its position from the transaction assembler; one the
//! replay already covers is dropped; the rest go through the outlet
//! (`_schema` first, the oversize policy) and are either compared with
//! the stream's copy (an unproven replay) or published, and enter the
//! ledger in order. walnats' own logical messages (heartbeats, snapshot
//! requests, watermarks) are never published; other messages only when
//! `output.message_prefixes` asks for their prefix.

use std::sync::Arc;

use tracing::warn;

use super::record_inside;
use super::session::Session;
use crate::checkpoint::ledger::Acked;
use crate::config;
use crate::error::{Error, Kind, Result};
use crate::event::outbox::{self, OutboxTable};
use crate::event::{Body, Event, Op, RelationInfo};
use crate::lsn::{Lsn, Position};
use crate::pgoutput::{Commit, LogicalMessage, Message, Oid, OldTuple, Truncate, TupleData};
use crate::publish::Prepared;
use crate::snapshot::reread;
use crate::source::upkeep;

impl Session {
    pub(super) async fn on_pgoutput(&mut self, m: Message, lsn: Lsn) -> Result<()> {
        match m {
            Message::Begin(b) => {
                if let Some(marker) = self.tx.begin(&b, lsn)? {
                    self.emit_marker(marker, false).await?;
                }
            }
            Message::Commit(c) => self.on_commit(&c, lsn).await?,
            Message::Relation(r) => {
                self.cache.update(&r).await?;
            }
            Message::Type(_) | Message::Origin(_) => {}
            Message::Insert(i) => {
                self.emit_row(Op::Insert, i.oid, None, Some(i.new), lsn)
                    .await?
            }
            Message::Update(u) => {
                self.emit_row(Op::Update, u.oid, u.old, Some(u.new), lsn)
                    .await?
            }
            Message::Delete(d) => {
                self.emit_row(Op::Delete, d.oid, Some(d.old), None, lsn)
                    .await?
            }
            Message::Truncate(t) => self.on_truncate(t, lsn).await?,
            Message::LogicalMessage(m) => self.on_message(m).await?,
            other => {
                return Err(Error::new(
                    Kind::Protocol,
                    format!(
                        "pgoutput sent {}, which walnats did not ask for (no streaming, no two-phase)",
                        other.name()
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn on_commit(&mut self, c: &Commit, lsn: Lsn) -> Result<()> {
        let done = self.tx.commit(c, lsn)?;
        self.settings.on_commit(c.commit_lsn);
        if let Some(marker) = done.marker {
            self.emit_marker(marker, true).await?;
        }
        self.ledger.push(
            0,
            Acked::TxEnd {
                commit: done.info.commit_lsn,
                end: done.end,
            },
        );
        Ok(())
    }

    async fn emit_row(
        &mut self,
        op: Op,
        oid: Oid,
        old: Option<OldTuple>,
        new: Option<TupleData>,
        lsn: Lsn,
    ) -> Result<()> {
        let rel = Arc::clone(self.cache.get(oid)?);
        if let Some(outbox) = rel.outbox.clone() {
            return self.emit_outbox_row(op, &rel, &outbox, new, lsn).await;
        }
        if let Some(w) = self.windows.current() {
            w.observe_row(&rel, op, old.as_ref(), new.as_ref());
        }
        let (pos, tx) = self.tx.next(op.as_str(), Some(&rel))?;
        self.emit_change(Event {
            pos,
            lsn,
            tx: Some(tx),
            snapshot: false,
            body: Body::Row { op, rel, old, new },
        })
        .await
    }

    /// An `[[outbox]]` table's change: an insert is a domain event at the
    /// insert's position; a delete (the insert-then-delete pattern keeps
    /// the table empty) and an update are not events and take no position.
    async fn emit_outbox_row(
        &mut self,
        op: Op,
        rel: &Arc<RelationInfo>,
        outbox: &OutboxTable,
        new: Option<TupleData>,
        lsn: Lsn,
    ) -> Result<()> {
        let new = match (op, new) {
            (Op::Insert, Some(new)) => new,
            (Op::Update, _) => {
                // Never the row: it may hold anything.
                warn!(schema = %rel.schema, table = %rel.table, %lsn,
                    "an outbox row was updated: outbox rows are events, an update is not one and is not published \
                     (insert a new row instead)");
                metrics::counter!(crate::metrics::MESSAGES_IGNORED).increment(1);
                return Ok(());
            }
            _ => return Ok(()),
        };
        let (pos, tx) = self.tx.next("an insert", Some(rel))?;
        if self.replay.is_through(pos) {
            return Ok(());
        }
        let event = outbox.event(rel, &new, pos)?;
        self.emit_change(Event {
            pos,
            lsn,
            tx: Some(tx),
            snapshot: false,
            body: Body::Outbox(event),
        })
        .await
    }

    async fn on_truncate(&mut self, t: Truncate, lsn: Lsn) -> Result<()> {
        for oid in &t.oids {
            if let Some(w) = self.windows.current() {
                w.observe_truncate(oid.0);
            }
            let rel = Arc::clone(self.cache.get(*oid)?);
            if rel.outbox.is_some() {
                // An outbox table's rows are events, not state.
                continue;
            }
            let (pos, tx) = self.tx.next("a truncate", Some(&rel))?;
            self.emit_change(Event {
                pos,
                lsn,
                tx: Some(tx),
                snapshot: false,
                body: Body::Truncate {
                    rel,
                    cascade: t.cascade(),
                    restart_identity: t.restart_identity(),
                },
            })
            .await?;
        }
        Ok(())
    }

    async fn on_message(&mut self, m: LogicalMessage) -> Result<()> {
        if m.prefix == upkeep::HEARTBEAT_PREFIX {
            // walnats' own heartbeat (filtered by its prefix alone, so a
            // replay drops exactly what the first pass did): never
            // published. Like a keepalive, it is a position an idle slot
            // may confirm: a replay from there sends it again and it is
            // dropped again.
            if !m.transactional {
                self.wal.feedback.on_passed(m.lsn);
            }
            return Ok(());
        }
        if reread::is_own_message(&m.prefix) {
            // walnats' own messages are never published; those at or
            // before the checkpoint were handled before it.
            let pos = Position::new(record_inside(m.lsn), 0);
            if m.transactional || self.replay.is_through(pos) {
                return Ok(());
            }
            return if m.prefix == reread::REQUEST_PREFIX {
                self.on_request(&m.content, pos).await
            } else {
                self.on_watermark(&m.content, m.lsn).await
            };
        }
        if let Some(aggregate_type) =
            outbox::message_aggregate(&self.settings.shape.outbox, &m.prefix)
        {
            if aggregate_type.len() > outbox::MAX_AGGREGATE_TYPE {
                // Any role may write one: ignored (and not numbered), never a stop.
                warn!(bytes = aggregate_type.len(), lsn = %m.lsn,
                    "an outbox message's aggregate type is over 128 bytes; ignored");
                metrics::counter!(crate::metrics::MESSAGES_IGNORED).increment(1);
                return Ok(());
            }
            let event = outbox::message_event(aggregate_type, m.content);
            return self
                .emit_message(m.transactional, m.lsn, Body::Outbox(event))
                .await;
        }
        if !config::publishes_message(&self.settings.shape.message_prefixes, m.prefix.as_bytes()) {
            // Any database user can write one: only the prefixes asked
            // for are published (and numbered, when transactional).
            metrics::counter!(crate::metrics::MESSAGES_IGNORED).increment(1);
            return Ok(());
        }
        let body = Body::Message {
            transactional: m.transactional,
            prefix: m.prefix,
            content: m.content,
        };
        self.emit_message(m.transactional, m.lsn, body).await
    }

    /// A logical message's event: in its transaction when transactional,
    /// else at its own position.
    async fn emit_message(&mut self, transactional: bool, lsn: Lsn, body: Body) -> Result<()> {
        let (pos, tx) = if transactional {
            let (p, t) = self.tx.next("a transactional message", None)?;
            (p, Some(t))
        } else {
            (Position::new(record_inside(lsn), 0), None)
        };
        self.emit_change(Event {
            pos,
            lsn,
            tx,
            snapshot: false,
            body,
        })
        .await
    }

    /// BEGIN rides with the first change (dropped once that is published);
    /// END carries the transaction's last position.
    async fn emit_marker(&mut self, ev: Event, is_end: bool) -> Result<()> {
        let out = if is_end {
            self.replay.is_through(ev.pos)
        } else {
            self.replay.is_begun(ev.pos.commit_lsn)
        };
        if out {
            return Ok(());
        }
        let pos = is_end.then_some(ev.pos);
        self.emit_one(&ev, pos, None).await
    }

    async fn emit_change(&mut self, ev: Event) -> Result<()> {
        if self.replay.is_through(ev.pos) {
            return Ok(());
        }
        if let Some((schema_ev, schema)) = self.out.schema_first(&ev) {
            self.emit_one(&schema_ev, None, Some(schema)).await?;
        }
        let pos = ev.pos;
        self.emit_one(&ev, Some(pos), None).await
    }

    /// One message out: through the outlet, then compared with the
    /// stream's copy (an unproven replay) or published, and into the
    /// ledger. `pos`: the position it completes (`None` for a `_schema`
    /// or a BEGIN marker, which ride with the change after them).
    async fn emit_one(
        &mut self,
        ev: &Event,
        pos: Option<Position>,
        schema: Option<(u32, u64)>,
    ) -> Result<()> {
        let tx = ev.tx.map(|t| t.commit_lsn);
        let proven = self.replay.proven();
        let msg = match (self.out.prepare(ev, pos.is_some(), proven).await?, pos) {
            (Prepared::Send(msg), _) => msg,
            (Prepared::Skipped, Some(pos)) => {
                self.ledger.push(0, Acked::Dropped { pos, tx });
                return Ok(());
            }
            (Prepared::Skipped, None) => {
                return Err(Error::new(
                    Kind::Oversize,
                    "internal: a message without a position of its own was skipped",
                ));
            }
        };
        let (need, seq, counter, commit_time) = match self
            .replay
            .already_stored(&msg, &mut self.out.publisher)
            .await?
        {
            Some(seq) => (0, seq, None, None),
            None => {
                let counter = ev.is_change().then(|| self.counter(ev));
                let commit_time = ev.tx.map(|t| t.commit_time).filter(|_| ev.is_change());
                let seq = self.out.publisher.publish(msg).await?;
                (seq, seq, counter, commit_time)
            }
        };
        self.ledger.push(
            need,
            Acked::Msg {
                seq,
                pos,
                tx,
                schema,
                counter,
                commit_time,
                begin_of: matches!(ev.body, Body::TxBegin).then_some(ev.pos.commit_lsn),
            },
        );
        // Re-read chunks in the stream right after it (a resumed replay
        // steps over them): counted by the publisher (its next publish
        // follows them), recorded in turn, their `_schema` as sent.
        for s in self.replay.take_stepped() {
            self.out.publisher.assume_published_through(s.last)?;
            if let Some(schema) = s.chunk.schema {
                self.out.schema_stored(schema);
            }
            self.ledger.push(
                0,
                Acked::Reread {
                    chunk: s.chunk,
                    end: Some(s.last),
                },
            );
        }
        Ok(())
    }

    /// The `walnats_events_published_total{table,op}` handle of `ev`.
    fn counter(&mut self, ev: &Event) -> metrics::Counter {
        match &ev.body {
            Body::Row { rel, .. } | Body::Truncate { rel, .. } | Body::Schema { rel } => {
                self.counters.get(rel.oid.0, ev.op_name(), || {
                    format!("{}.{}", rel.schema, rel.table)
                })
            }
            Body::Outbox(o) => {
                // The label is made once per table, not per event.
                let cache = &self.cache;
                self.counters.get(o.table_oid, ev.op_name(), || {
                    cache.get(Oid(o.table_oid)).map_or_else(
                        |_| "_message".to_owned(),
                        |r| format!("{}.{}", r.schema, r.table),
                    )
                })
            }
            Body::Message { .. } | Body::TxBegin | Body::TxEnd { .. } => {
                self.counters.get(0, ev.op_name(), || "_message".to_owned())
            }
        }
    }
}
