//! Decoding from a hot standby (PostgreSQL 16+): what walnats learns about
//! the server `postgres.url` reaches, and the primary it writes to instead
//! (`postgres.primary_url`).
//!
//! A standby decodes the WAL it replays, but it cannot write: no
//! `pg_logical_emit_message` (heartbeats, `walnats snapshot` requests,
//! re-read watermarks), no `CREATE PUBLICATION`. Those go to the primary,
//! whose WAL the standby replays and decodes in order, so a message written
//! there arrives in walnats' stream like one written on the standby would.
//! The primary given must be the standby's own (same system identifier),
//! out of recovery, on the same database (a logical message is decoded
//! only in its own database) and at `wal_level = logical`: anything else is
//! refused with the fix, since a message written elsewhere would never
//! arrive and a re-read window would wait for it forever.
//!
//! Creating a slot on a standby waits for a running-xacts record from the
//! primary (written every 15 s while the primary is busy, at checkpoints
//! when idle); [`nudge_primary`] asks for one every second with
//! `pg_log_standby_snapshot()` so that it takes seconds. Nothing here ever
//! writes to the standby.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::Client;
use tracing::{info, warn};

use super::replication::{CreatedSlot, ReplicationConn};
use super::setup;
use crate::config::PostgresConfig;
use crate::error::{Error, Kind, Result, pg_query_err};
use crate::lsn::Lsn;

/// The server `postgres.url` reaches, as far as decoding goes.
#[derive(Clone)]
pub enum Server {
    Primary,
    Standby(Standby),
}

/// A hot standby walnats decodes from.
#[derive(Clone)]
pub struct Standby {
    /// `server_version_num` of the standby.
    pub version: u32,
    /// The primary, connected and checked; `None` without
    /// `postgres.primary_url`.
    pub primary: Option<Arc<Client>>,
    /// `primary_url` with its password masked; `None`: not set.
    pub primary_url: Option<String>,
    /// `hot_standby_feedback` on the standby.
    pub feedback: bool,
}

impl Server {
    pub fn standby(&self) -> Option<&Standby> {
        match self {
            Server::Primary => None,
            Server::Standby(s) => Some(s),
        }
    }

    /// Where `pg_logical_emit_message` goes: the server itself when it is
    /// a primary, the primary of a standby, `None` when a standby has no
    /// `primary_url`.
    pub fn writer<'a>(&'a self, sql: &'a Arc<Client>) -> Option<&'a Arc<Client>> {
        match self {
            Server::Primary => Some(sql),
            Server::Standby(s) => s.primary.as_ref(),
        }
    }
}

impl Standby {
    /// One line for `check`, `status` and the log.
    pub fn describe(&self) -> String {
        format!(
            "decoding from a standby (PostgreSQL {}), primary: {}",
            self.version / 10_000,
            self.primary_url.as_deref().unwrap_or("not set")
        )
    }

    /// What does not work on this standby, and why; empty when nothing.
    pub fn unavailable(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.primary_url.is_none() {
            out.push(
                "heartbeats are off (a standby cannot write pg_logical_emit_message; set postgres.primary_url)",
            );
            out.push(
                "`walnats snapshot` is refused (its request and the re-read watermarks are written into the WAL \
                 on the primary; set postgres.primary_url)",
            );
            out.push(
                "creating the slot waits for the primary's next running-xacts record (up to ~15 s on a busy \
                 primary, longer on an idle one; postgres.primary_url makes it seconds)",
            );
        }
        out
    }
}

/// The line refusing a standby below PostgreSQL 16.
pub fn too_old(version: u32) -> Error {
    Error::new(
        Kind::PgSetup,
        format!(
            "postgres.url points at a hot standby running PostgreSQL {}: logical decoding on a standby needs \
             PostgreSQL 16 or later; point postgres.url at the primary, or upgrade",
            version / 10_000
        ),
    )
}

/// Whether the server is in recovery.
pub async fn in_recovery(sql: &Client) -> Result<bool> {
    let row = sql
        .query_one("SELECT pg_catalog.pg_is_in_recovery()", &[])
        .await
        .map_err(|e| pg_query_err("asking whether PostgreSQL is a standby", e))?;
    Ok(row.get(0))
}

/// Warned about once per process, not once per session.
static WARNED_NO_PRIMARY: AtomicBool = AtomicBool::new(false);
static WARNED_NO_FEEDBACK: AtomicBool = AtomicBool::new(false);

/// What `url` reaches, checked for decoding: a standby must run
/// PostgreSQL 16+ at `wal_level = logical` (the primary too), and its
/// `primary_url` must reach its own primary. Warns (once) about
/// `hot_standby_feedback = off` and a missing `primary_url`.
pub async fn probe(sql: &Client, pg: &PostgresConfig) -> Result<Server> {
    if !in_recovery(sql).await? {
        return Ok(Server::Primary);
    }
    let mut s = look(sql, pg).await?;
    if let Some(cfg) = &pg.primary {
        s.primary = Some(Arc::new(connect_primary(sql, cfg).await?));
    }
    info!("{}", s.describe());
    if !s.feedback && !WARNED_NO_FEEDBACK.swap(true, Ordering::Relaxed) {
        warn!("{}", FEEDBACK_OFF);
    }
    if s.primary.is_none() && !WARNED_NO_PRIMARY.swap(true, Ordering::Relaxed) {
        warn!(
            "postgres.url is a hot standby and postgres.primary_url is not set: {}",
            s.unavailable().join("; ")
        );
    }
    Ok(Server::Standby(s))
}

/// The standby `sql` as `check` and `status` show it, without connecting
/// to its primary; refuses one below PostgreSQL 16.
pub async fn look(sql: &Client, pg: &PostgresConfig) -> Result<Standby> {
    let version = setup::server_version(sql).await?;
    if version < 160_000 {
        return Err(too_old(version));
    }
    Ok(Standby {
        version,
        primary: None,
        primary_url: pg.primary.as_ref().map(|p| p.redacted_url()),
        feedback: setting(sql, "hot_standby_feedback").await? == "on",
    })
}

/// Why `hot_standby_feedback = off` matters, and the fix.
pub const FEEDBACK_OFF: &str = "hot_standby_feedback is off on the standby walnats decodes from: the primary's \
     VACUUM may remove catalog rows the slot still needs, and the standby then invalidates the slot when it \
     replays that (rows_removed, pg_replication_slots.conflicting); the slot can no longer be used and only a \
     new slot with a re-snapshot starts again (long re-read queries may also be cancelled by recovery \
     conflicts). Fix: ALTER SYSTEM SET hot_standby_feedback = on on the standby, SELECT pg_reload_conf(), \
     and give the standby a physical replication slot on the primary (primary_slot_name) so the feedback \
     holds across its restarts";

async fn setting(sql: &Client, name: &str) -> Result<String> {
    let row = sql
        .query_one("SELECT pg_catalog.current_setting($1)", &[&name])
        .await
        .map_err(|e| pg_query_err("reading a setting", e))?;
    Ok(row.get(0))
}

async fn system_id(sql: &Client) -> Result<String> {
    let row = sql
        .query_one(
            "SELECT system_identifier::text FROM pg_catalog.pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| pg_query_err("reading the system identifier", e))?;
    Ok(row.get(0))
}

/// `primary_url`, connected, and checked against the standby `sql`.
pub async fn connect_primary(sql: &Client, cfg: &crate::config::PgConnectConfig) -> Result<Client> {
    let primary = super::connect_sql(cfg).await?;
    let shown = cfg.redacted_url();
    let refuse = |why: String| {
        Error::new(
            Kind::PgSetup,
            format!("postgres.primary_url ({shown}) {why}"),
        )
    };
    if in_recovery(&primary).await? {
        return Err(refuse(
            "is in recovery too, not a primary: point it at the primary of the standby in postgres.url".into(),
        ));
    }
    let (mine, theirs) = (system_id(sql).await?, system_id(&primary).await?);
    if mine != theirs {
        return Err(refuse(format!(
            "is another cluster (system identifier {theirs}, the standby's is {mine}): what walnats writes \
             there would never reach the standby; point it at the standby's primary"
        )));
    }
    let (db, primary_db) = (
        setup::database_name(sql).await?,
        setup::database_name(&primary).await?,
    );
    if db != primary_db {
        return Err(refuse(format!(
            "names database {primary_db:?}, the standby's is {db:?}: a logical message is decoded only in the \
             database that wrote it; use the same database name in both URLs"
        )));
    }
    let level = setting(&primary, "wal_level").await?;
    if level != "logical" {
        return Err(refuse(format!(
            "runs with wal_level = {level}: decoding on a standby needs wal_level = logical on the primary \
             (ALTER SYSTEM SET wal_level = logical there, then restart it)"
        )));
    }
    Ok(primary)
}

/// `CREATE_REPLICATION_SLOT` on `conn`; on a standby, with the primary
/// asked for a running-xacts record every second meanwhile (without
/// `primary_url`, one line says what the wait is).
pub async fn create_slot(
    conn: &mut ReplicationConn,
    server: &Server,
    slot: &str,
    export_snapshot: bool,
    failover: bool,
) -> Result<CreatedSlot> {
    let Server::Standby(s) = server else {
        return conn
            .create_logical_slot(slot, export_snapshot, failover)
            .await;
    };
    // A failover slot cannot be made on a standby: refused before this
    // (`pipeline::primary::check_server`).
    let Some(primary) = &s.primary else {
        info!(%slot,
            "creating the slot on the standby: it waits for the primary's next running-xacts record (up to ~15 s \
             on a busy primary, longer on an idle one; postgres.primary_url makes it seconds)");
        return conn.create_logical_slot(slot, export_snapshot, false).await;
    };
    info!(%slot, "creating the slot on the standby, asking the primary for running-xacts records meanwhile");
    tokio::select! {
        made = conn.create_logical_slot(slot, export_snapshot, false) => made,
        never = nudge_primary(primary) => match never {},
    }
}

/// Asks the primary for a running-xacts record every second, forever
/// (until dropped). A failure is logged once, with the fix, and the
/// asking goes on.
async fn nudge_primary(primary: &Client) -> std::convert::Infallible {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut warned = false;
    loop {
        tick.tick().await;
        if let Err(e) = primary
            .execute("SELECT pg_catalog.pg_log_standby_snapshot()", &[])
            .await
            && !warned
        {
            warned = true;
            warn!(error = %crate::error::pg_error_text(&e),
                "cannot call pg_log_standby_snapshot() on the primary, so creating the slot on the standby waits \
                 for the primary's next running-xacts record (up to ~15 s on a busy primary, longer on an idle \
                 one); fix: GRANT EXECUTE ON FUNCTION pg_catalog.pg_log_standby_snapshot() TO the role, on the \
                 primary");
        }
    }
}

/// Waits until the standby `sql` has replayed the WAL up to `lsn` (a
/// position the primary wrote). Warns every 30 s while it lags. A standby
/// promoted meanwhile no longer replays the primary's WAL: what was
/// written there will never arrive, so that ends the session, and the next
/// one writes on the promoted server itself.
pub async fn wait_replayed(sql: &Client, lsn: Lsn) -> Result<()> {
    let started = std::time::Instant::now();
    let mut warn_at = Duration::from_secs(10);
    loop {
        let row = sql
            .query_one(
                "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.pg_last_wal_replay_lsn()::text",
                &[],
            )
            .await
            .map_err(|e| pg_query_err("reading the standby's replay position", e))?;
        if !row.get::<_, bool>(0) {
            return Err(Error::new(
                Kind::PgQuery,
                "the standby walnats decodes from was promoted while a re-read chunk waited for its low \
                 watermark, written on the old primary; the chunk is read again on the promoted server",
            ));
        }
        let replayed = row
            .get::<_, Option<String>>(1)
            .and_then(|s| s.parse::<Lsn>().ok());
        if replayed.is_some_and(|r| r >= lsn) {
            return Ok(());
        }
        if started.elapsed() > warn_at {
            warn!(%lsn, waited_s = started.elapsed().as_secs(),
                "a re-read chunk waits for the standby to replay its low watermark (the standby lags, or its \
                 replay is paused: pg_is_wal_replay_paused())");
            warn_at += Duration::from_secs(30);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The publication, made when missing: on the primary for a standby (a
/// standby cannot create it), then waited for until the standby has
/// replayed it. Without `primary_url` a standby refuses with the fix.
pub async fn ensure_publication(sql: &Client, server: &Server, pg: &PostgresConfig) -> Result<()> {
    let Server::Standby(s) = server else {
        setup::ensure_publication(sql, pg).await?;
        return Ok(());
    };
    if setup::publication_exists(sql, &pg.publication).await? {
        return Ok(());
    }
    let Some(primary) = &s.primary else {
        return Err(Error::new(
            Kind::PgSetup,
            format!(
                "publication {:?} does not exist on the standby walnats decodes from, and a standby cannot \
                 create it: create it on the primary ({}), or set postgres.primary_url",
                pg.publication,
                setup::create_publication_sql(&pg.publication, &pg.tables)
            ),
        ));
    };
    setup::ensure_publication(primary, pg).await?;
    let started = std::time::Instant::now();
    while !setup::publication_exists(sql, &pg.publication).await? {
        if started.elapsed() > Duration::from_secs(60) {
            return Err(Error::new(
                Kind::PgQuery,
                format!(
                    "publication {:?} exists on the primary but has not reached the standby after 60 s: the \
                     standby lags or its replay is paused; retrying",
                    pg.publication
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(primary_url: Option<&str>) -> Standby {
        Standby {
            version: 180_001,
            primary: None,
            primary_url: primary_url.map(str::to_owned),
            feedback: true,
        }
    }

    #[test]
    fn a_standby_says_what_it_is_and_what_it_cannot_do_without_a_primary() {
        let without = standby(None);
        assert_eq!(
            without.describe(),
            "decoding from a standby (PostgreSQL 18), primary: not set"
        );
        let missing = without.unavailable();
        assert_eq!(missing.len(), 3, "{missing:?}");
        assert!(
            missing.iter().all(|m| m.contains("postgres.primary_url")),
            "{missing:?}"
        );
        assert!(missing.iter().any(|m| m.contains("heartbeats are off")));
        assert!(
            missing
                .iter()
                .any(|m| m.contains("`walnats snapshot` is refused"))
        );
        let with = standby(Some("postgres://w:***@p:5432/app"));
        assert_eq!(
            with.describe(),
            "decoding from a standby (PostgreSQL 18), primary: postgres://w:***@p:5432/app"
        );
        assert!(with.unavailable().is_empty());
    }

    #[test]
    fn a_standby_below_16_is_refused_with_the_fix() {
        let e = too_old(150_004);
        assert_eq!(e.kind(), Kind::PgSetup);
        let text = e.to_string();
        assert!(
            text.contains("PostgreSQL 15") && text.contains("16 or later"),
            "{text}"
        );
        assert!(text.contains("point postgres.url at the primary"), "{text}");
    }
}
