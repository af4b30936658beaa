//! Publication and slot state, over the SQL connection.
//!
//! Creates the publication when missing (never alters or drops one), and
//! reads the slot's state so the pipeline can refuse a slot of another
//! plugin or database, notice a lost slot, and stand by while another
//! walsender holds it.

use tokio_postgres::Client;

use crate::config::{PostgresConfig, TableSelector};
use crate::error::pg_query_err;
use crate::error::{Error, Kind, Result};
use crate::lsn::Lsn;

/// `"ident"` with inner quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub async fn database_name(sql: &Client) -> Result<String> {
    let row = sql
        .query_one("SELECT pg_catalog.current_database()::text", &[])
        .await
        .map_err(|e| pg_query_err("reading the database name", e))?;
    Ok(row.get(0))
}

/// `server_version_num`: 150004 for 15.4.
pub async fn server_version(sql: &Client) -> Result<u32> {
    let row = sql
        .query_one(
            "SELECT pg_catalog.current_setting('server_version_num')::int4",
            &[],
        )
        .await
        .map_err(|e| pg_query_err("reading the server version", e))?;
    Ok(u32::try_from(row.get::<_, i32>(0)).unwrap_or(0))
}

pub async fn require_logical_wal(sql: &Client) -> Result<()> {
    let row = sql
        .query_one("SELECT pg_catalog.current_setting('wal_level')", &[])
        .await
        .map_err(|e| pg_query_err("reading wal_level", e))?;
    let level: String = row.get(0);
    if level != "logical" {
        return Err(Error::new(
            Kind::PgSetup,
            format!(
                "PostgreSQL runs with wal_level = {level}, logical decoding needs logical: \
                 ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
            ),
        ));
    }
    Ok(())
}

/// Whether the publication exists.
pub async fn publication_exists(sql: &Client, name: &str) -> Result<bool> {
    let rows = sql
        .query(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(|e| pg_query_err("looking up the publication", e))?;
    Ok(!rows.is_empty())
}

pub fn create_publication_sql(name: &str, tables: &[TableSelector]) -> String {
    if tables.is_empty() {
        return format!("CREATE PUBLICATION {} FOR ALL TABLES", quote_ident(name));
    }
    let objects: Vec<String> = tables
        .iter()
        .map(|t| match &t.table {
            Some(table) => format!("TABLE {}.{}", quote_ident(&t.schema), quote_ident(table)),
            None => format!("TABLES IN SCHEMA {}", quote_ident(&t.schema)),
        })
        .collect();
    format!(
        "CREATE PUBLICATION {} FOR {}",
        quote_ident(name),
        objects.join(", ")
    )
}

/// Creates the publication when it is missing; an existing one is used as
/// it is (walnats never alters or drops a publication).
pub async fn ensure_publication(sql: &Client, pg: &PostgresConfig) -> Result<bool> {
    if publication_exists(sql, &pg.publication).await? {
        return Ok(false);
    }
    let stmt = create_publication_sql(&pg.publication, &pg.tables);
    sql.batch_execute(&stmt).await.map_err(|e| {
        let hint = match e.code().map(|c| c.code()) {
            Some("42501") => {
                "the role may not create it: CREATE PUBLICATION ... FOR ALL TABLES needs a superuser; \
                 create it as one, or list postgres.tables owned by this role"
            }
            Some("42P01") | Some("3F000") => {
                "a table or schema in postgres.tables does not exist: fix postgres.tables"
            }
            _ => "create it by hand or fix postgres.tables",
        };
        Error::new(
            Kind::PgSetup,
            format!(
                "cannot create publication {:?} ({}): {hint}",
                pg.publication,
                crate::error::pg_error_text(&e)
            ),
        )
    })?;
    tracing::info!(publication = %pg.publication, "publication created");
    Ok(true)
}

#[derive(Debug, Clone)]
pub struct SlotState {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    pub two_phase: bool,
    /// PostgreSQL 17+ (`None` below): synced to standbys that sync slots.
    pub failover: Option<bool>,
    /// PostgreSQL 17+: a copy a standby's slot sync worker keeps.
    pub synced: Option<bool>,
    /// PostgreSQL 17+: why the slot cannot be used any more.
    pub invalidation_reason: Option<String>,
}

pub async fn slot_state(sql: &Client, slot: &str) -> Result<Option<SlotState>> {
    let rows = sql
        .query(
            // The PostgreSQL 17 columns through to_jsonb, so that one query
            // serves every version (absent: NULL).
            "SELECT plugin::text, database::text, active, active_pid, confirmed_flush_lsn::text, \
                    restart_lsn::text, wal_status, two_phase, \
                    (pg_catalog.to_jsonb(s) ->> 'failover')::bool, \
                    (pg_catalog.to_jsonb(s) ->> 'synced')::bool, \
                    pg_catalog.to_jsonb(s) ->> 'invalidation_reason' \
             FROM pg_catalog.pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| pg_query_err("reading the replication slot", e))?;
    let Some(r) = rows.first() else {
        return Ok(None);
    };
    let lsn =
        |i: usize| -> Option<Lsn> { r.get::<_, Option<String>>(i).and_then(|s| s.parse().ok()) };
    Ok(Some(SlotState {
        plugin: r.get(0),
        database: r.get(1),
        active: r.get::<_, Option<bool>>(2).unwrap_or(false),
        active_pid: r.get(3),
        confirmed_flush: lsn(4),
        restart_lsn: lsn(5),
        wal_status: r.get(6),
        two_phase: r.get::<_, Option<bool>>(7).unwrap_or(false),
        failover: r.get(8),
        synced: r.get(9),
        invalidation_reason: r.get(10),
    }))
}

/// This SQL session's backend pid and start time (as text in the
/// session's settings), which a replication connection looks up to prove
/// it reached the same server.
pub async fn backend_identity(sql: &Client) -> Result<(i32, String)> {
    let row = sql
        .query_one(
            "SELECT pid, backend_start::text FROM pg_catalog.pg_stat_activity \
             WHERE pid = pg_catalog.pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| pg_query_err("reading this session's backend", e))?;
    Ok((
        row.get(0),
        row.get::<_, Option<String>>(1).unwrap_or_default(),
    ))
}

/// Refuses a slot walnats cannot stream from, with the fix.
pub fn validate_slot(s: &SlotState, slot: &str, db: &str) -> Result<()> {
    match s.plugin.as_deref() {
        Some("pgoutput") => {}
        Some(other) => {
            return Err(Error::new(
                Kind::PgSetup,
                format!(
                    "slot {slot:?} uses plugin {other}, not pgoutput: drop it with `walnats slot drop --yes`, \
                     or set postgres.slot to another name"
                ),
            ));
        }
        None => {
            return Err(Error::new(
                Kind::PgSetup,
                format!("slot {slot:?} is a physical slot: set postgres.slot to another name"),
            ));
        }
    }
    if s.database.as_deref() != Some(db) {
        return Err(Error::new(
            Kind::PgSetup,
            format!(
                "slot {slot:?} belongs to database {:?}, walnats is connected to {db:?}: \
                 set postgres.slot to another name or fix postgres.url",
                s.database.as_deref().unwrap_or("?")
            ),
        ));
    }
    if s.wal_status.as_deref() == Some("lost") {
        return Err(Error::new(
            Kind::PgSetup,
            format!(
                "slot {slot:?} was invalidated (wal_status = lost: max_slot_wal_keep_size exceeded, or on a \
                 standby a recovery conflict, see invalidation_reason in pg_replication_slots): changes are \
                 missing and walnats will not recreate it silently; run `walnats slot drop --yes` and re-snapshot"
            ),
        ));
    }
    Ok(())
}

pub async fn drop_slot(sql: &Client, slot: &str) -> Result<bool> {
    let rows = sql
        .query(
            "SELECT pg_catalog.pg_drop_replication_slot(slot_name) \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| {
            let kind = if e.code().map(|c| c.code()) == Some("55006") {
                Kind::SlotInUse
            } else {
                Kind::PgQuery
            };
            Error::new(
                kind,
                format!(
                    "cannot drop slot {slot:?} ({}): stop every walnats streaming from it first",
                    crate::error::pg_error_text(&e)
                ),
            )
        })?;
    Ok(!rows.is_empty())
}

/// The server's current WAL write position.
pub async fn current_wal_lsn(sql: &Client) -> Result<Lsn> {
    wal_position(sql, "SELECT pg_catalog.pg_current_wal_lsn()::text")
        .await?
        .ok_or_else(|| Error::new(Kind::Protocol, "pg_current_wal_lsn() returned NULL"))
}

/// The end of the WAL that exists here: the write position on a primary,
/// the last replayed one on a standby (`None` while it has replayed none).
pub async fn wal_end(sql: &Client) -> Result<Option<Lsn>> {
    wal_position(
        sql,
        "SELECT (CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
         ELSE pg_catalog.pg_current_wal_lsn() END)::text",
    )
    .await
}

async fn wal_position(sql: &Client, query: &str) -> Result<Option<Lsn>> {
    let row = sql
        .query_one(query, &[])
        .await
        .map_err(|e| pg_query_err("reading the WAL position", e))?;
    row.get::<_, Option<String>>(0)
        .map(|s| {
            s.parse().map_err(|e| {
                Error::with_source(Kind::Protocol, "bad LSN from pg_current_wal_lsn()", e)
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_sql_quotes_names() {
        assert_eq!(
            create_publication_sql("walnats", &[]),
            "CREATE PUBLICATION \"walnats\" FOR ALL TABLES"
        );
        let t = vec![
            TableSelector {
                schema: "public".into(),
                table: Some("my\"t".into()),
            },
            TableSelector {
                schema: "billing".into(),
                table: None,
            },
        ];
        assert_eq!(
            create_publication_sql("p", &t),
            "CREATE PUBLICATION \"p\" FOR TABLE \"public\".\"my\"\"t\", TABLES IN SCHEMA \"billing\""
        );
    }
}
