//! Wires source → decode → event → encode → publish → ack → checkpoint →
//! standby status, and restarts the whole session on transient errors.
//!
//! A session is one replication connection and one NATS connection. Any
//! transient failure (PostgreSQL or NATS gone, a publish not acknowledged)
//! ends the session; the next one resumes from the checkpoint and the
//! stream's tail, which is the same path as a restart after `kill -9`, so
//! the recovery that crash tests exercise is the only recovery there is.
//!
//! The parts: `run` here (retries, backoff, standing by while another
//! walnats holds the slot); `startup` (lock, slot, resume, snapshot,
//! START_REPLICATION); `session` (the select loop that wires the parts to
//! the sockets); `emit` (pgoutput messages → events → the outlet and the
//! ledger); `rereads` (`walnats snapshot` requests and their windows). The
//! decisions live in parts without I/O, each with its own tests:
//! `event::transaction`, `checkpoint::{ledger, replay, record}`,
//! `snapshot::window`, `source::feedback`, `publish`.

mod emit;
mod primary;
mod rereads;
mod session;
mod startup;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::error::{Kind, Result, Retry};
use crate::lsn::Lsn;
use crate::metrics::Health;
use crate::source::upkeep::WalWatch;

/// The pgoutput protocol version to ask for: the highest the server knows.
pub fn proto_version(server_version_num: u32) -> u32 {
    match server_version_num {
        v if v >= 160_000 => 4,
        v if v >= 150_000 => 3,
        v if v >= 140_000 => 2,
        _ => 1,
    }
}

/// Runs sessions until shutdown or a definite error. Transient errors
/// restart the session after a capped, jittered exponential backoff; a slot
/// held by another walsender makes this process a standby that polls.
pub async fn run(
    cfg: Arc<Config>,
    mut shutdown: watch::Receiver<bool>,
    health: Arc<Health>,
) -> Result<()> {
    let mut failures: u32 = 0;
    let mut standby = false;
    let wal_watch = Arc::new(WalWatch::default());
    let seen = primary::ServerSeen::default();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        let result = Box::pin(startup::session(
            &cfg,
            shutdown.clone(),
            &health,
            &wal_watch,
            &seen,
        ))
        .await;
        health.set_ready(false);
        let err = match result {
            Ok(Ended::Shutdown) => return Ok(()),
            Ok(Ended::Restart) => {
                // Give the walsender a moment to let go of the slot.
                failures = 0;
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            Err(e) => e,
        };
        metrics::counter!(crate::metrics::ERRORS, "kind" => err.kind().name()).increment(1);
        if err.retry() == Retry::Definite {
            return Err(err);
        }
        if started.elapsed() > Duration::from_secs(60) {
            failures = 0;
        }
        let delay = if err.kind() == Kind::SlotInUse {
            if !standby {
                info!(slot = %cfg.postgres.slot, cause = %err, "slot is in use; standing by");
                standby = true;
            }
            Duration::from_secs(1)
        } else {
            standby = false;
            failures = failures.saturating_add(1);
            let d = backoff(failures);
            warn!(error = %err, kind = err.kind().name(), retry_in_ms = d.as_millis() as u64, "session ended; resuming");
            d
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// How a session ended without an error.
enum Ended {
    /// SIGTERM/SIGINT: drained, checkpoint written.
    Shutdown,
    /// Settings changed while a transaction was partly published: it is
    /// finished with the settings it began with, and the next session
    /// starts at its end with the new ones.
    Restart,
}

/// The position of a non-transactional message. pgoutput gives a
/// message the LSN where its WAL record *ends*, which is where the next
/// record starts, and that can be a commit record: a transaction
/// committing right after the message would share the LSN (and with seq
/// 0, the message id, which JetStream then drops as a duplicate). One
/// byte earlier is still inside the message's own record, where no commit
/// record can start, and sorts before that transaction.
pub fn record_inside(end: Lsn) -> Lsn {
    Lsn::from_u64(end.as_u64().saturating_sub(1))
}

/// 200 ms doubling to 30 s, with up to 25% jitter so that a fleet does not
/// reconnect in lockstep.
fn backoff(failures: u32) -> Duration {
    let base = 200u64.saturating_mul(1u64 << failures.min(8).saturating_sub(1));
    let base = base.min(30_000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let jitter = base / 4 * u64::from(nanos % 1000) / 1000;
    Duration::from_millis(base + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_with_bounded_jitter() {
        for (failures, base) in [
            (1, 200),
            (2, 400),
            (3, 800),
            (8, 25_600),
            (9, 25_600),
            (40, 25_600),
        ] {
            let d = backoff(failures).as_millis() as u64;
            assert!(
                (base..=base + base / 4).contains(&d),
                "{failures} failures: {d} ms"
            );
        }
    }

    #[test]
    fn a_message_sorts_inside_its_own_record() {
        assert_eq!(record_inside(Lsn::from_u64(0x100)), Lsn::from_u64(0xFF));
        assert_eq!(record_inside(Lsn::ZERO), Lsn::ZERO);
    }

    #[test]
    fn the_highest_protocol_the_server_knows() {
        assert_eq!(proto_version(150_018), 3);
        assert_eq!(proto_version(180_001), 4);
        assert_eq!(proto_version(140_000), 2);
        assert_eq!(proto_version(130_000), 1);
    }
}
