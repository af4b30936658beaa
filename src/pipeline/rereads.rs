//! `walnats snapshot` while streaming: a request found in the WAL joins the
//! checkpoint's queue (only when the checkpoint bucket holds it: any
//! database user can write the WAL message), and the queue's tables are
//! re-read one window at a time (`snapshot::window`). At a window's high
//! watermark its rows go out as reads, as one atomic batch that the
//! checkpoint announces first; the next window opens without waiting for
//! it.

use tracing::warn;

use super::record_inside;
use super::session::Session;
use crate::checkpoint::PendingReread;
use crate::checkpoint::ledger::Acked;
use crate::error::Result;
use crate::lsn::{Lsn, Position};
use crate::snapshot::reread;
use crate::snapshot::window::{Started, Window};

/// Re-read chunks whose batch may wait for its commit at once: while one
/// is stored, the next windows are read and decoded.
pub const REREADS_IN_FLIGHT: usize = 4;

impl Session {
    /// A `walnats.snapshot` message: acted on only when it names a request
    /// that `walnats snapshot` stored in the checkpoint bucket (writing to
    /// the WAL is open to every database user; the bucket is not), for this
    /// slot, with tables that still have the names they were asked by.
    pub(super) async fn on_request(&mut self, content: &[u8], pos: Position) -> Result<()> {
        let ignore = |why: &str| {
            metrics::counter!(crate::metrics::MESSAGES_IGNORED).increment(1);
            // Never the content: anyone may have written it.
            warn!(lsn = %pos.commit_lsn, bytes = content.len(), "walnats.snapshot message ignored: {why}");
            Ok(())
        };
        let Some(nonce) = reread::parse_nonce(content) else {
            return ignore("it is not a request written by `walnats snapshot`");
        };
        let Some(body) = self.writer.store().load_request(nonce).await? else {
            return ignore("no request with its nonce in the checkpoint bucket");
        };
        let req: reread::Request = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(_) => return ignore("its request in the checkpoint bucket is unreadable"),
        };
        if req.slot != self.cfg.postgres.slot {
            return Ok(());
        }
        let mut targets = Vec::new();
        for t in req.tables.into_iter().take(reread::MAX_TABLES) {
            if reread::still_names(self.windows.sql(), &t).await? {
                targets.push(t);
            } else {
                warn!(schema = %t.schema, table = %t.table, "snapshot of table not started: it was dropped or renamed since it was requested");
            }
        }
        self.ledger.push(0, Acked::Request { pos, targets });
        Ok(())
    }

    /// Starts the next re-read chunk when none is under way, the replay is
    /// proven and the queue has a table.
    pub(super) async fn start_window(&mut self) -> Result<()> {
        if !self.replay.proven() || self.windows.under_way() {
            return Ok(());
        }
        let mut head = self.ledger.acked().rereads.first().cloned();
        if let Some(h) = head.as_mut()
            && let Some(sent) = self.ledger.reread_in_flight(h.target.oid)
        {
            if sent.last {
                // Its last chunk is on its way: the table leaves the queue
                // when that lands.
                return Ok(());
            }
            h.after = sent.end.clone();
        }
        if self.windows.start(head.as_ref(), &mut self.cache).await? == Started::Abandoned {
            self.ledger.abandon_reread();
        }
        Ok(())
    }

    pub(super) async fn on_watermark(&mut self, content: &[u8], lsn: Lsn) -> Result<()> {
        match self.windows.on_watermark(content) {
            Some(w) => self.close_window(w, lsn).await,
            None => Ok(()),
        }
    }

    /// The high watermark: the chunk minus the rows changed inside the
    /// window goes out as reads at its position, as one atomic batch that
    /// the checkpoint announces first. Nothing waits for the changes in
    /// flight before it, nor for the batch: the next window opens at once,
    /// and up to [`REREADS_IN_FLIGHT`] chunks (fewer when they are large)
    /// are in flight, each named in the checkpoint with the stream
    /// sequence its batch follows.
    async fn close_window(&mut self, w: Window, hw: Lsn) -> Result<()> {
        let Some((chunk, rel)) = w.finish().await? else {
            return Ok(());
        };
        let rows = chunk.rows.len() as u64;
        // Right after the high watermark's own position (hw - 1, 0), before
        // any transaction that commits after it.
        let at = Position::new(record_inside(hw), 0);
        let reads = self
            .out
            .reads(&rel, chunk.rows, Position::new(at.commit_lsn, 1), hw, None)
            .await?;
        let window = self
            .cfg
            .snapshot_reading
            .chunks_in_flight(REREADS_IN_FLIGHT);
        while self.out.publisher.atomic_in_flight() >= window {
            let seq = self.out.publisher.atomic_landed().await?;
            self.ledger.stored(seq);
        }
        let n = reads.msgs.len() as u64;
        let pending = PendingReread {
            // Not the window's id: that stays out of the stream, where
            // anyone who may read it could use it to forge a watermark.
            id: crate::sink::unique_batch_id(),
            after_seq: Some(self.out.publisher.last_seq()),
            oid: rel.oid.0,
            messages: n,
            end: chunk.end,
            last: chunk.last,
            rows,
            schema: reads.schema,
            last_pos: (reads.next_seq > 1)
                .then(|| Position::new(at.commit_lsn, reads.next_seq - 1)),
        };
        if n == 0 {
            // Every row changed inside the window: only the cursor moves,
            // in turn with what is in flight.
            self.ledger.push(
                0,
                Acked::Reread {
                    chunk: pending,
                    end: None,
                },
            );
            return Ok(());
        }
        // Write-ahead: durable before any of it can land. A checkpoint
        // write under way (of an older state) ends first.
        if let Some(c) = self.writer.finish().await? {
            self.ledger.mark_written(c);
        }
        let c = self.ledger.announce_reread(pending.clone());
        self.writer.store().save(&c).await?;
        self.ledger.mark_written(c);
        let end = self
            .out
            .publisher
            .send_atomic(&pending.id, reads.msgs)
            .await?;
        metrics::counter!(crate::metrics::SNAPSHOT_ROWS).increment(n);
        self.ledger.push(
            end,
            Acked::Reread {
                chunk: pending,
                end: Some(end),
            },
        );
        Ok(())
    }
}
