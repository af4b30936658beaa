//! Which PostgreSQL server a session landed on, and whether it may stream
//! there: `postgres.slot_failover`'s prerequisites, a synced slot on a
//! server still in recovery, the proof that the replication connection
//! reached the same server as the SQL session that holds walnats' slot
//! lock, and the one log line when the primary changed since the last
//! session. It decides nothing about positions: the checkpoint rules
//! (`check_slot_not_ahead`, the replay) run after it as they always do.

use std::sync::Mutex;

use tracing::info;

use crate::config::{Config, PgHost};
use crate::connect::Connected;
use crate::error::{Error, Kind, Result};
use crate::source::{ReplicationConn, SystemId, setup};

/// The first PostgreSQL version with failover slots.
const FAILOVER_SLOTS_SINCE: u32 = 170_000;

/// The server the previous session streamed from: its system identifier
/// and timeline (a promoted standby keeps the identifier and starts a new
/// timeline).
#[derive(Debug, Default)]
pub(super) struct ServerSeen {
    last: Mutex<Option<(String, u32)>>,
}

impl ServerSeen {
    /// Logs one line when this session's server is not the last one's.
    fn note(&self, host: &PgHost, id: &SystemId) {
        let now = (id.systemid.clone(), id.timeline);
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        match last.as_ref() {
            None => info!(%host, system_identifier = %id.systemid, timeline = id.timeline,
                "connected to PostgreSQL"),
            Some(before) if *before != now => info!(system_identifier = %id.systemid,
                "PostgreSQL primary changed: host {host}, timeline {}", id.timeline),
            Some(_) => {}
        }
        *last = Some(now);
    }
}

/// Refuses, before anything is touched, a server this session cannot
/// stream from: `slot_failover` below PostgreSQL 17 or on a standby, and
/// a synced slot on a server still in recovery.
pub(super) async fn check_server(c: &Connected, cfg: &Config) -> Result<()> {
    let version = setup::server_version(&c.sql).await?;
    let failover = cfg.postgres.slot_failover;
    if failover && version < FAILOVER_SLOTS_SINCE {
        return Err(Error::new(
            Kind::Config,
            format!(
                "postgres.slot_failover = true needs PostgreSQL 17 or later, and {} runs {}: upgrade \
                 PostgreSQL, or set postgres.slot_failover = false",
                c.pg.server(),
                version_text(version)
            ),
        ));
    }
    let state = crate::source::sql::server_state(&c.sql).await?;
    if !state.in_recovery {
        return Ok(());
    }
    let slot = &cfg.postgres.slot;
    let existing = setup::slot_state(&c.sql, slot).await?;
    if existing.as_ref().and_then(|s| s.synced) == Some(true) {
        // Transient: during a failover the standby may be promoted in a
        // moment; a URL that lists a standby first lands here again.
        return Err(Error::new(
            Kind::PgConnect,
            format!(
                "PostgreSQL at {} is a standby (in recovery) and slot {slot:?} there is a synced copy of the \
                 primary's, which cannot be streamed from until this server is promoted; retrying. To reach \
                 the primary instead, list it in postgres.url and add target_session_attrs=read-write",
                c.pg.server()
            ),
        ));
    }
    if failover {
        return Err(Error::new(
            Kind::Config,
            format!(
                "postgres.slot_failover = true, but PostgreSQL at {} is a standby (in recovery), where \
                 failover slots cannot be made: point postgres.url at the primary (or add \
                 target_session_attrs=read-write), or set postgres.slot_failover = false",
                c.pg.server()
            ),
        ));
    }
    Ok(())
}

/// A replication connection to the session's server, proven to be the
/// server of the SQL session that holds walnats' slot lock.
pub(super) async fn connect_replication(
    c: &Connected,
    seen: &ServerSeen,
) -> Result<ReplicationConn> {
    let (pid, backend_start) = setup::backend_identity(&c.sql).await?;
    let mut conn = ReplicationConn::connect(&c.pg).await?;
    if !conn.sees_backend(pid, &backend_start).await? {
        return Err(Error::new(
            Kind::PgConnect,
            format!(
                "the replication connection to {} reached another server than walnats' SQL session there \
                 (a host name that resolves elsewhere now, after a failover?); starting over",
                c.pg.server()
            ),
        ));
    }
    let id = conn.identify_system().await?;
    seen.note(&c.pg.server(), &id);
    Ok(conn)
}

/// A server's refusal to make `slot` a failover slot, as a definite error
/// with the fix; a lost connection stays what it is.
pub(super) fn refused_failover(e: Error, slot: &str, what: &str) -> Error {
    if e.kind() != Kind::PgQuery {
        return e;
    }
    Error::new(
        Kind::PgSetup,
        format!(
            "PostgreSQL refused to {what} slot {slot:?} ({e}): fix the cause, or set \
             postgres.slot_failover = false"
        ),
    )
}

/// `170004` as `17.4`.
fn version_text(v: u32) -> String {
    format!("PostgreSQL {}.{}", v / 10_000, v % 10_000)
}

/// For a slot that exists: turns `FAILOVER` on when `slot_failover` asks
/// for it and the slot lacks it (never off). The slot must not be in use:
/// walnats holds its slot lock and has not started replication yet.
pub(super) async fn enable_failover(
    cfg: &Config,
    conn: &mut ReplicationConn,
    existing: &setup::SlotState,
) -> Result<()> {
    let slot = &cfg.postgres.slot;
    if !cfg.postgres.slot_failover || existing.failover != Some(false) {
        return Ok(());
    }
    conn.enable_slot_failover(slot)
        .await
        .map_err(|e| refused_failover(e, slot, "turn on failover for"))?;
    info!(%slot, "slot made a failover slot (postgres.slot_failover = true)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_print_as_postgresql_does() {
        assert_eq!(version_text(170_004), "PostgreSQL 17.4");
        assert_eq!(version_text(150_010), "PostgreSQL 15.10");
    }
}
