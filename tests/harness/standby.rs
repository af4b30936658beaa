//! A PostgreSQL primary with a streaming physical standby, for failover and
//! standby-decoding tests: one pair per test (never the shared servers),
//! stopped and removed on drop.
//!
//! The primary: `wal_level = logical`, a physical slot for the standby and
//! `synchronized_standby_slots` naming it (logical walsenders send nothing
//! the standby has not flushed). The standby: `pg_basebackup -R -S <slot>
//! -X stream` with a dbname in `primary_conninfo` (slot sync needs one),
//! `sync_replication_slots = on`, `hot_standby_feedback = on` (the sync
//! worker refuses without it) and `synchronized_standby_slots = ''` (a copy
//! of the primary's value would make decoding on the promoted server wait
//! for a slot that does not exist there).

use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::postgres::{PgServer, PgVersion};
use super::process;

/// The standby's physical slot on the primary.
pub const PHYSICAL_SLOT: &str = "standby1";

pub struct PgPair {
    pub primary: PgServer,
    pub standby: PgServer,
    /// The primary's walsender to the standby, while `stall_standby`
    /// holds it stopped.
    stalled: Mutex<Option<u32>>,
}

impl PgPair {
    /// Starts the primary, takes a base backup into a new dir, starts the
    /// standby on it and waits until it streams. `version` must be 17+ for
    /// slot sync (16 for decoding on a standby only).
    pub async fn start(version: PgVersion) -> PgPair {
        let primary = PgServer::start_with(
            version,
            &[&format!("synchronized_standby_slots={PHYSICAL_SLOT}")],
        );
        primary
            .execute(
                "postgres",
                &format!("SELECT pg_create_physical_replication_slot('{PHYSICAL_SLOT}')"),
            )
            .await;
        let dir = PgServer::new_dir();
        let data = dir.join("data");
        let conninfo = format!(
            "host=127.0.0.1 port={} dbname=postgres user=postgres",
            primary.port()
        );
        let out = PgServer::tool_of(version, "pg_basebackup")
            .arg("-D")
            .arg(&data)
            .args([
                "-R",
                "-S",
                PHYSICAL_SLOT,
                "-X",
                "stream",
                "-c",
                "fast",
                "-d",
            ])
            .arg(&conninfo)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("cannot run pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            primary.log_tail()
        );
        let standby = PgServer::start_on(
            version,
            &dir,
            data,
            &[
                "sync_replication_slots=on",
                "hot_standby_feedback=on",
                "synchronized_standby_slots=",
                // Status to the primary at least every second, not ten.
                "wal_receiver_status_interval=1s",
            ],
        );
        let pair = PgPair {
            primary,
            standby,
            stalled: Mutex::new(None),
        };
        pair.wait_standby_streaming().await;
        pair
    }

    /// `postgres://...primary,...standby/db?target_session_attrs=read-write`:
    /// whichever of the two is the primary now.
    pub fn multi_host_url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write&sslmode=disable",
            self.primary.port(),
            self.standby.port()
        )
    }

    /// Waits until the standby streams WAL from the primary (its
    /// walreceiver says so; after a restart too).
    pub async fn wait_standby_streaming(&self) {
        let client = self.standby.client("postgres").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows = client
                .query(
                    "SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'",
                    &[],
                )
                .await
                .unwrap();
            if !rows.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the standby does not stream:\n{}\nprimary:\n{}",
                self.standby.log_tail(),
                self.primary.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the standby has replayed everything the primary wrote
    /// so far (a database or table just created there, say). The insert
    /// position, not `pg_current_wal_lsn()` (the write position): the test
    /// servers run with `synchronous_commit = off`, so a commit that just
    /// returned may not be written yet (the WAL writer writes it soon).
    pub async fn wait_replayed(&self) {
        let primary = self.primary.client("postgres").await;
        let standby = self.standby.client("postgres").await;
        let lsn: String = primary
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let done: bool = standby
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&lsn],
                )
                .await
                .unwrap()
                .get(0);
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the standby did not replay up to {lsn}:\n{}",
                self.standby.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the logical slot `slot` is synced and ready on the
    /// standby (`synced and not temporary and invalidation_reason is
    /// null`): only then does it survive a promotion. Logs a running-xacts
    /// record on the primary now and then, which the synced copy waits
    /// for (otherwise up to ~15 s per try).
    pub async fn wait_slot_synced(&self, slot: &str) {
        let primary = self.primary.client("postgres").await;
        let standby = self.standby.client("postgres").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut tries = 0u32;
        loop {
            let ready = standby
                .query(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 \
                     AND synced AND NOT temporary AND invalidation_reason IS NULL",
                    &[&slot],
                )
                .await
                .unwrap();
            if !ready.is_empty() {
                return;
            }
            if tries % 10 == 0 {
                primary
                    .batch_execute("SELECT pg_log_standby_snapshot()")
                    .await
                    .unwrap();
            }
            tries += 1;
            if Instant::now() >= deadline {
                let row = "SELECT concat_ws(' ', slot_name, synced, temporary, invalidation_reason, \
                           restart_lsn, confirmed_flush_lsn, catalog_xmin) FROM pg_replication_slots";
                let show = |rows: Vec<tokio_postgres::Row>| {
                    rows.iter()
                        .map(|r| r.get::<_, String>(0))
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                let on_standby = show(standby.query(row, &[]).await.unwrap_or_default());
                let on_primary = show(primary.query(row, &[]).await.unwrap_or_default());
                panic!(
                    "slot {slot} is not synced on the standby\nstandby's slots:\n{on_standby}\nprimary's:\n{on_primary}\nstandby log:\n{}",
                    self.standby.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops (SIGSTOP) the primary's walsender to the standby, as a
    /// network stall would: from now on the primary commits WAL the
    /// standby never receives (and, with `synchronized_standby_slots`, its
    /// logical walsenders send none of it). Lasts until `kill_primary`.
    pub async fn stall_standby(&self) {
        let pid: i32 = self
            .primary
            .client("postgres")
            .await
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&PHYSICAL_SLOT],
            )
            .await
            .unwrap()
            .get(0);
        let pid = u32::try_from(pid).unwrap();
        // A child of the postmaster this harness started.
        process::signal(pid, libc::SIGSTOP);
        *self.stalled.lock().unwrap() = Some(pid);
    }

    /// `pg_ctl stop -m immediate` of the primary: no shutdown checkpoint,
    /// nothing more sent to the standby. A stalled walsender is killed
    /// first (it would not see the shutdown until continued, and then
    /// could still send).
    pub fn kill_primary(&self) {
        if let Some(pid) = self.stalled.lock().unwrap().take() {
            process::signal(pid, libc::SIGKILL);
        }
        self.primary.stop_immediate();
    }

    /// `SELECT pg_promote()` (it waits until the standby is a primary).
    pub async fn promote(&self) {
        let client = self.standby.client("postgres").await;
        let promoted: bool = client
            .query_one("SELECT pg_promote()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            promoted,
            "the standby was not promoted:\n{}",
            self.standby.log_tail()
        );
    }

    /// Stops the standby (`-m fast`) and starts it again; waits until it
    /// streams again.
    pub async fn restart_standby(&self) {
        self.standby.stop_fast();
        self.standby.start_again();
        self.wait_standby_streaming().await;
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        self.standby.stop_immediate();
        self.primary.stop_immediate();
        for server in [&self.standby, &self.primary] {
            if let Some(dir) = server.data_dir().parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}
