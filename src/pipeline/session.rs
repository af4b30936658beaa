//! The streaming session: one select loop that wires the parts to the
//! sockets. It reads the replication stream while the publisher has room,
//! hands acknowledgements to the ledger, writes checkpoints the ledger
//! says are due, sends standby status updates, and drains on shutdown.
//!
//! What a message means is decided elsewhere: `emit` turns pgoutput
//! messages into events and publishes them, `rereads` runs `walnats
//! snapshot` windows; the parts without I/O decide positions
//! (`event::transaction`), what is acknowledged and confirmable
//! (`checkpoint::ledger`), what a restart already published
//! (`checkpoint::replay`) and what to tell the walsender
//! (`source::feedback`).

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Interval;
use tracing::{debug, info, warn};

use super::Ended;
use crate::checkpoint::ledger::Ledger;
use crate::checkpoint::replay::Replay;
use crate::checkpoint::{Shape, StoredReader, Writer};
use crate::config::Config;
use crate::encode::OutMsg;
use crate::error::{Error, Kind, Result};
use crate::event::RelationCache;
use crate::event::transaction::Assembler;
use crate::lsn::Lsn;
use crate::metrics::{EventCounters, Health};
use crate::pgoutput;
use crate::publish::Outlet;
use crate::sink::Publisher;
use crate::snapshot::window::Windows;
use crate::source::feedback::Feedback;
use crate::source::{ReplicationConn, ReplicationMessage};

/// The replication connection, its decoder, and what walnats tells the
/// walsender.
pub(super) struct Wal {
    pub conn: ReplicationConn,
    pub decoder: pgoutput::Decoder,
    pub feedback: Feedback,
}

/// What the stream already holds of this session's replay (compared with
/// the stream's messages as the replay produces them), and how much of it
/// is proven.
pub(super) struct Replayed {
    replay: Replay,
    /// The stream's messages that `replay` compares with.
    stored: StoredReader,
    /// The replay was already reported as stuck short of the stream.
    stall_warned: bool,
}

impl Deref for Replayed {
    type Target = Replay;
    fn deref(&self) -> &Replay {
        &self.replay
    }
}

impl DerefMut for Replayed {
    fn deref_mut(&mut self) -> &mut Replay {
        &mut self.replay
    }
}

impl Replayed {
    pub fn new(replay: Replay, stored: StoredReader) -> Replayed {
        Replayed {
            replay,
            stored,
            stall_warned: false,
        }
    }

    /// While the replay is unproven, `msg` is the stream's next message of
    /// the replayed range: compared with it, and counted instead of
    /// published. Returns its sequence then; `None` once the range is done.
    pub async fn already_stored(
        &mut self,
        msg: &OutMsg,
        publisher: &mut Publisher,
    ) -> Result<Option<u64>> {
        let Some(next) = self.replay.next_seq() else {
            return Ok(None);
        };
        let stored = self.stored.at(next, self.replay.last_seq()).await?;
        let seq = self
            .replay
            .check(&msg.subject, msg.msg_id(), stored.as_ref())?;
        // The publisher counts it too: its next publish must name the
        // range's end as the sequence to follow.
        if publisher.assume_published() != seq {
            return Err(Error::new(
                Kind::Checkpoint,
                format!(
                    "internal: the publisher's count disagrees with the replay at sequence {seq}"
                ),
            ));
        }
        tracing::trace!(seq, "already in the stream");
        if self.replay.proven() {
            let (compared, deleted) = self.replay.counts();
            info!(
                compared,
                deleted, "the replay matches what the stream holds; publishing from here"
            );
        }
        Ok(Some(seq))
    }

    /// The stream holds `skip` more messages than the replay has produced,
    /// and the replay has gone quiet (no data for 10 s, nothing open, the
    /// keepalives at or past what arrived): say so once instead of waiting
    /// silently. It may be a false alarm while the server decodes a huge
    /// transaction before its first change, hence a warning, not an error:
    /// walnats keeps waiting and publishes nothing new until they match.
    fn warn_if_stalled(&mut self, feedback: &Feedback, tx_open: bool) {
        const QUIET: Duration = Duration::from_secs(10);
        if self.stall_warned || self.replay.proven() || tx_open || !feedback.caught_up_for(QUIET) {
            return;
        }
        self.stall_warned = true;
        warn!(
            expected = self.replay.pending(),
            wal_end = %feedback.server_end(),
            after = ?self.replay.through(),
            "the replay of the slot from the checkpoint seems to have reached the end of the WAL (nothing \
             for 10 s), but the stream holds {} more message(s) than the replay produced; walnats publishes \
             nothing new until the replay matches them. Unless the server is still decoding a large \
             transaction, something other than walnats published to the stream's subjects, or the \
             publication or output settings changed since those messages were published: see \
             docs/guarantees.md, The slot and its WAL",
            self.replay.pending()
        );
    }
}

/// The settings this session publishes with: the checkpoint's while a
/// transaction they began is unfinished, else the configured ones.
pub(super) struct Settings {
    pub shape: Shape,
    /// The configured settings, when they differ from `shape`: the session
    /// ends at the first transaction boundary and the next one uses them.
    switch_to: Option<Shape>,
    /// The commit LSN of a transaction partly in the stream when the
    /// session started, until its Commit is replayed.
    unfinished: Option<Lsn>,
}

impl Settings {
    pub fn new(shape: Shape, switch_to: Option<Shape>, unfinished: Option<Lsn>) -> Settings {
        Settings {
            shape,
            switch_to,
            unfinished,
        }
    }

    /// A transaction committing at `commit` was replayed or published.
    pub fn on_commit(&mut self, commit: Lsn) {
        if self.unfinished.is_some_and(|u| u <= commit) {
            self.unfinished = None;
        }
    }

    /// Settings changed while a transaction was partly published, and it
    /// is now finished (replay proven, no transaction open or unfinished):
    /// time to stop and start again with the new settings.
    fn switch_due(&self, proven: bool, tx_open: bool) -> bool {
        self.switch_to.is_some() && proven && !tx_open && self.unfinished.is_none()
    }
}

/// `/readyz` and `walnats_ready`: streaming with NATS connected.
pub(super) struct Readiness {
    pub health: Arc<Health>,
    pub nats: async_nats::Client,
}

impl Readiness {
    fn update(&self) {
        self.health.set_ready(matches!(
            self.nats.connection_state(),
            async_nats::connection::State::Connected
        ));
    }
}

pub(super) struct Session {
    pub cfg: Arc<Config>,
    pub wal: Wal,
    pub cache: RelationCache,
    /// The transaction being assembled.
    pub tx: Assembler,
    /// Encode → `_schema` first → oversize policy → publish.
    pub out: Outlet,
    pub replay: Replayed,
    /// Acknowledged → durable → confirmable.
    pub ledger: Ledger,
    pub writer: Writer,
    pub settings: Settings,
    /// `walnats snapshot` re-reads.
    pub windows: Windows,
    pub readiness: Readiness,
    pub counters: EventCounters,
}

/// What one turn of the loop asks of the next.
enum Turn {
    Go,
    /// Shutdown asked: publish nothing new, finish what is in flight.
    Drain,
    /// The switch point for new settings: drain, then restart.
    Restart,
}

impl Session {
    pub async fn stream(mut self, shutdown: &mut watch::Receiver<bool>) -> Result<Ended> {
        let mut status = tokio::time::interval(self.cfg.postgres.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut draining = *shutdown.borrow();
        let mut ended = Ended::Shutdown;
        loop {
            match self.turn(shutdown, &mut status, draining).await? {
                Turn::Go => {}
                Turn::Drain => draining = true,
                Turn::Restart => {
                    draining = true;
                    ended = Ended::Restart;
                }
            }
            if self.after_turn(draining).await? {
                return Ok(ended);
            }
        }
    }

    /// Waits for the first thing to do, and does it.
    async fn turn(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        status: &mut Interval,
        draining: bool,
    ) -> Result<Turn> {
        let can_read = !draining
            && self.ledger.inflight() < self.cfg.nats.max_in_flight
            && self.out.publisher.ready();
        tokio::select! {
            biased;
            _ = shutdown.changed(), if !draining => {
                info!("shutting down: draining acknowledgements");
                return Ok(Turn::Drain);
            }
            seq = self.out.publisher.next_stored(), if self.out.publisher.awaiting_any() => {
                self.ledger.stored(seq?);
            }
            written = self.writer.done(), if self.writer.busy() => {
                let written = written?;
                debug!(stream_seq = written.stream_seq, pos = ?written.pos, confirmed = %written.confirmed, "checkpoint written");
                self.ledger.mark_written(written);
                self.wal.feedback.set_due();
            }
            _ = status.tick() => {
                self.out.publisher.overdue()?;
                if self.out.publisher.should_flush() {
                    self.out.publisher.flush().await?;
                }
                self.wal.feedback.set_due();
                self.replay.warn_if_stalled(&self.wal.feedback, self.tx.is_open());
            }
            read = self.windows.read(), if self.windows.reading() => read?,
            msg = self.wal.conn.recv(), if can_read => {
                self.on_replication(msg?).await?;
                if self.settings.switch_due(self.replay.proven(), self.tx.is_open()) {
                    info!("the transaction begun with the old settings is published; restarting with the new ones");
                    return Ok(Turn::Restart);
                }
            }
            // Nothing else to do right now: end the open fast batch so
            // that its acknowledgement comes without more messages.
            () = std::future::ready(()), if self.out.publisher.should_flush() => {
                self.out.publisher.flush().await?;
            }
        }
        Ok(Turn::Go)
    }

    /// After each turn: settle acknowledgements, confirm an idle slot,
    /// start a checkpoint write or a re-read window, send a due status.
    /// Whether the session has drained.
    async fn after_turn(&mut self, draining: bool) -> Result<bool> {
        self.ledger.settle();
        // Idle: nothing open or in flight, and the replay has caught up
        // with what the stream holds (a replay still pending at the end
        // of the WAL must never be confirmed away).
        let proven = self.replay.proven();
        let server_end = self.wal.feedback.server_end();
        if !self.tx.is_open() && proven && server_end > self.ledger.acked().confirmed {
            self.ledger.on_idle(server_end);
        }
        if !self.writer.busy() {
            let gap = if draining {
                Duration::ZERO
            } else {
                Duration::from_millis(100)
            };
            if let Some(c) = self.ledger.due(gap, proven) {
                self.writer.start(c);
            }
        }
        if !draining {
            self.start_window().await?;
        }
        if self.wal.feedback.take_due() {
            self.send_status(false).await?;
        }
        if draining
            && self.ledger.inflight() == 0
            && !self.writer.busy()
            && self.ledger.due(Duration::ZERO, proven).is_none()
        {
            self.send_status(false).await?;
            info!(confirmed = %self.ledger.confirmable(), "drained; checkpoint written");
            return Ok(true);
        }
        Ok(false)
    }

    pub async fn send_status(&mut self, reply: bool) -> Result<()> {
        let s = self.wal.feedback.status(self.ledger.confirmable());
        // Lossy on purpose: a gauge is an f64; LSNs below 2^53 are exact.
        metrics::gauge!(crate::metrics::CONFIRMED_FLUSH_LSN).set(s.flush.as_u64() as f64);
        metrics::gauge!(crate::metrics::REPLICATION_LAG).set(s.lag as f64);
        self.readiness.update();
        self.wal
            .conn
            .send_standby_status(s.write, s.flush, s.flush, reply)
            .await
    }

    async fn on_replication(&mut self, msg: ReplicationMessage) -> Result<()> {
        match msg {
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.wal.feedback.on_keepalive(wal_end);
                if reply_requested {
                    self.send_status(false).await?;
                }
                Ok(())
            }
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data,
                ..
            } => {
                self.wal.feedback.on_data(wal_end);
                let m = self.wal.decoder.decode(data).map_err(Error::from)?;
                self.on_pgoutput(m, wal_start).await
            }
            ReplicationMessage::CopyDone => Err(Error::new(
                Kind::PgConnect,
                "PostgreSQL ended the replication stream",
            )),
            ReplicationMessage::Skipped { wal_end, bytes } => {
                // A large logical message nobody asked for, never read
                // whole: like the small ones, not published or numbered.
                self.wal.feedback.on_data(wal_end);
                metrics::counter!(crate::metrics::MESSAGES_IGNORED).increment(1);
                debug!(bytes, %wal_end, "skipped a large logical message whose prefix is not in output.message_prefixes");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OutputFormat, OversizePolicy};

    fn shape(prefix: &str) -> Shape {
        Shape {
            publication: "walnats".to_owned(),
            prefix: prefix.to_owned(),
            tx_markers: false,
            format: OutputFormat::Json,
            on_oversize: OversizePolicy::Fail,
            message_prefixes: vec!["*".to_owned()],
            outbox: Vec::new(),
        }
    }

    #[test]
    fn new_settings_wait_for_the_unfinished_transaction_and_a_proven_replay() {
        let lsn = Lsn::from_u64;
        let mut s = Settings::new(shape("cdc.old"), Some(shape("cdc.new")), Some(lsn(500)));
        assert!(
            !s.switch_due(true, false),
            "the unfinished transaction is not replayed yet"
        );
        s.on_commit(lsn(400));
        assert!(!s.switch_due(true, false), "an earlier transaction ended");
        s.on_commit(lsn(500));
        assert!(!s.switch_due(false, false), "the replay is unproven");
        assert!(!s.switch_due(true, true), "a transaction is open");
        assert!(s.switch_due(true, false));
        // Without new settings there is nothing to switch to.
        let s = Settings::new(shape("cdc.app"), None, None);
        assert!(!s.switch_due(true, false));
    }
}
