//! What a streaming session does now and then over its SQL connection:
//! heartbeats into the WAL, and watching how much WAL the slot retains.
//!
//! A heartbeat is `pg_logical_emit_message(false, 'walnats.heartbeat', '')`:
//! a record in this database's WAL that the slot decodes and sends, so an
//! idle slot on a server busy with other databases still gets a position
//! it may confirm, whatever keepalives the server sends. The pipeline never
//! publishes it (`pipeline::is_own_heartbeat`). Retained WAL (the server's
//! WAL position minus the slot's `restart_lsn`) goes to the gauge
//! `walnats_slot_wal_retained_bytes` and, past `limits.wal_retained_warn`,
//! to one warning per crossing. On a hot standby the heartbeat is written
//! on the primary (`postgres.primary_url`): the standby replays it and the
//! slot there decodes it; without one there are no heartbeats
//! (`standby::probe` warned). Nothing here touches the replication
//! connection or decides what is confirmed; a failure here is logged, never
//! fatal to the session.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{debug, info, warn};

/// The `pg_logical_emit_message` prefix of walnats' heartbeats.
pub const HEARTBEAT_PREFIX: &str = "walnats.heartbeat";

/// How often the slot's retained WAL is read.
const RETAINED_POLL: Duration = Duration::from_secs(5);

/// Whether retained WAL is over the threshold: kept across sessions so that
/// a reconnect does not repeat the warning.
#[derive(Default)]
pub struct WalWatch {
    over: AtomicBool,
}

/// What one reading means for the warning.
#[derive(Debug, PartialEq, Eq)]
enum Crossing {
    Up,
    Down,
    Same,
}

impl WalWatch {
    fn observe(&self, retained: u64, threshold: u64) -> Crossing {
        let over = retained > threshold;
        match (self.over.swap(over, Ordering::Relaxed), over) {
            (false, true) => Crossing::Up,
            (true, false) => Crossing::Down,
            _ => Crossing::Same,
        }
    }
}

/// The running upkeep of one session; stops when dropped.
pub struct Upkeep {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upkeep {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the upkeep of a session on `slot`: heartbeats every `heartbeat`
/// (`None`: off) written through `writer` (the primary; `None`: a standby
/// without `primary_url`, no heartbeats), retained WAL read on `sql` every
/// few seconds, warned about above `warn_above` bytes (`None`: never).
pub fn start(
    sql: Arc<tokio_postgres::Client>,
    writer: Option<Arc<tokio_postgres::Client>>,
    slot: String,
    heartbeat: Option<Duration>,
    warn_above: Option<u64>,
    watch: Arc<WalWatch>,
) -> Upkeep {
    let beats = writer.zip(heartbeat);
    let task = tokio::spawn(tracing::Instrument::instrument(
        run(sql, slot, beats, warn_above, watch),
        tracing::info_span!("upkeep"),
    ));
    Upkeep { task }
}

async fn run(
    sql: Arc<tokio_postgres::Client>,
    slot: String,
    beats: Option<(Arc<tokio_postgres::Client>, Duration)>,
    warn_above: Option<u64>,
    watch: Arc<WalWatch>,
) {
    // An interval of a day stands for "off": its ticks are skipped.
    let every = beats.as_ref().map(|b| b.1);
    let mut beat = tokio::time::interval(every.unwrap_or(Duration::from_secs(86_400)));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(RETAINED_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beat_failed = false;
    loop {
        tokio::select! {
            _ = beat.tick(), if every.is_some() => {
                let Some((writer, _)) = &beats else { continue };
                let sent = writer
                    .execute(
                        "SELECT pg_catalog.pg_logical_emit_message(false, $1, '')",
                        &[&HEARTBEAT_PREFIX],
                    )
                    .await;
                match sent {
                    Ok(_) => debug!("heartbeat written"),
                    Err(e) if !beat_failed => {
                        beat_failed = true;
                        warn!(error = %e,
                            "cannot write a heartbeat with pg_logical_emit_message: an idle slot may then \
                             pin WAL while other databases write; grant the role EXECUTE on \
                             pg_logical_emit_message, or set postgres.heartbeat_interval = \"0\"");
                    }
                    Err(e) => debug!(error = %e, "heartbeat failed again"),
                }
            }
            _ = poll.tick() => {
                let Some(retained) = retained_wal(&sql, &slot).await else {
                    continue;
                };
                // Lossy on purpose: a gauge is an f64.
                metrics::gauge!(crate::metrics::SLOT_WAL_RETAINED).set(retained as f64);
                let Some(threshold) = warn_above else {
                    continue;
                };
                match watch.observe(retained, threshold) {
                    Crossing::Up => warn!(
                        %slot, retained_bytes = retained, threshold_bytes = threshold,
                        "the slot retains more WAL than limits.wal_retained_warn: PostgreSQL keeps every \
                         WAL file from the slot's restart_lsn on; check that walnats keeps up \
                         (walnats status) and that no long transaction holds the slot back"
                    ),
                    Crossing::Down => info!(
                        %slot, retained_bytes = retained, threshold_bytes = threshold,
                        "the slot's retained WAL is back under limits.wal_retained_warn"
                    ),
                    Crossing::Same => {}
                }
            }
        }
    }
}

/// The server's WAL position (replay position on a standby) minus the
/// slot's `restart_lsn`; `None` when it cannot be read right now.
async fn retained_wal(sql: &tokio_postgres::Client, slot: &str) -> Option<u64> {
    let row = sql
        .query_opt(
            "SELECT ((CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
                      ELSE pg_catalog.pg_current_wal_lsn() END) - restart_lsn)::int8 \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
    match row {
        Ok(Some(r)) => r
            .try_get::<_, Option<i64>>(0)
            .ok()
            .flatten()
            .map(|n| u64::try_from(n).unwrap_or(0)),
        Ok(None) => None,
        Err(e) => {
            debug!(error = %e, "cannot read the slot's retained WAL");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warning_fires_once_per_crossing() {
        let w = WalWatch::default();
        assert_eq!(w.observe(10, 100), Crossing::Same);
        assert_eq!(w.observe(101, 100), Crossing::Up);
        assert_eq!(w.observe(500, 100), Crossing::Same);
        assert_eq!(w.observe(100, 100), Crossing::Down);
        assert_eq!(w.observe(50, 100), Crossing::Same);
        assert_eq!(w.observe(200, 100), Crossing::Up);
    }
}
