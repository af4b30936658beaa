//! `walnats snapshot` while streaming: a request found in the WAL joins the
//! checkpoint's queue (only when the checkpoint bucket holds it: any
//! database user can write the WAL message), and the queue's tables are
//! re-read one window at a time (`snapshot::window`). At a window's high
//! watermark its rows go out as reads, as one atomic batch that the
//! checkpoint announces first.

use tracing::{info, warn};

use super::record_inside;
use super::session::Session;
use crate::checkpoint::PendingReread;
use crate::checkpoint::ledger::Acked;
use crate::error::Result;
use crate::lsn::{Lsn, Position};
use crate::snapshot::reread;
use crate::snapshot::window::{Started, Window};

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
        if !self.replay.proven() {
            return Ok(());
        }
        let head = self.ledger.acked().rereads.first().cloned();
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
    /// the checkpoint announces first.
    async fn close_window(&mut self, w: Window, hw: Lsn) -> Result<()> {
        let Some((chunk, rel)) = w.finish().await? else {
            return Ok(());
        };
        // Everything before the high watermark must be acknowledged and
        // the checkpoint quiet: the write-ahead record has to be exact.
        let stored = self.out.publisher.drain().await?;
        self.ledger.stored(stored);
        self.ledger.settle();
        if let Some(c) = self.writer.finish().await? {
            self.ledger.mark_written(c);
        }
        let rows = chunk.rows.len() as u64;
        // Right after the high watermark's own position (hw - 1, 0), before
        // any transaction that commits after it.
        let at = Position::new(record_inside(hw), 0);
        let reads = self
            .out
            .reads(&rel, chunk.rows, Position::new(at.commit_lsn, 1), hw, None)
            .await?;
        let n = reads.msgs.len() as u64;
        let pending = PendingReread {
            messages: n,
            end: chunk.end,
            last: chunk.last,
            rows,
            schema: reads.schema,
            last_pos: (reads.next_seq > 1)
                .then(|| Position::new(at.commit_lsn, reads.next_seq - 1)),
        };
        let c = self
            .ledger
            .announce_reread(pending.clone(), at, self.out.publisher.last_seq());
        self.writer.store().save(&c).await?;
        self.ledger.mark_written(c);
        let seq = self.out.publisher.publish_batch(reads.msgs).await?;
        metrics::counter!(crate::metrics::SNAPSHOT_ROWS).increment(n);
        if let Some(r) = self.ledger.reread_landed(&pending, seq) {
            info!(schema = %r.target.schema, table = %r.target.table, rows = r.rows, "snapshot of table complete");
        }
        Ok(())
    }
}
