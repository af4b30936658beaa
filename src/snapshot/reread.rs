//! `walnats snapshot TABLE...`: re-reading tables while `run` streams, with
//! DBLog's watermarks.
//!
//! The request travels through NATS and PostgreSQL: the command stores it
//! (the slot and the tables) in walnats' checkpoint bucket under a random
//! nonce, then writes a non-transactional logical message (prefix
//! `walnats.snapshot`, the nonce alone) into the WAL. The walnats streaming
//! that slot finds the message in its own stream, in order, whenever it gets
//! there (also after a restart: the message is part of the WAL it replays),
//! and acts only on a nonce whose request is in the bucket: any database
//! user may write logical messages, but only holders of walnats' NATS
//! credentials can ask for a snapshot. The queue lives in the checkpoint.
//!
//! Each chunk (up to 999 rows after the last primary key read):
//!
//! 1. write a low watermark (`walnats.watermark`, `low:<id>`), SELECT the
//!    chunk, write a high watermark (`high:<id>`), all on the SQL side;
//! 2. while the stream goes from the low to the high watermark, note the
//!    primary key of every change to that table;
//! 3. at the high watermark, drop the chunk's rows whose key changed inside
//!    the window (the streamed change is newer, or as new) and publish the
//!    rest as `read` events at the high watermark's position, as one atomic
//!    batch announced in the checkpoint first (as the initial snapshot's).
//!
//! On a hot standby (`source::standby`) the chunk is read on the standby
//! and the watermarks are written on the primary (`postgres.primary_url`),
//! whose WAL the standby replays and decodes in order ([`Marks`]). A
//! standby's snapshot sees exactly the transactions whose commit records it
//! has replayed, so: write the low watermark on the primary, wait until the
//! standby has replayed past it (every commit before it is then visible),
//! SELECT on the standby, then write the high watermark on the primary. The
//! standby cannot have replayed what the primary had not yet written, so
//! every commit the SELECT saw lies before the high watermark, and every
//! commit between the two is dropped from the chunk as on a primary.
//!
//! A consumer that applies events in stream order ends with the table's
//! current state. Only a plain SELECT runs: no lock beyond what it takes.
//! A table without a primary key cannot be chunked this way and is refused.
//! walnats' own messages (prefix `walnats.`) are never published.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::catalog::{self, Chunk, TablePlan};
use crate::checkpoint::{Cursor, Target};
use crate::error::pg_query_err;
use crate::error::{Error, Kind, Result};
use crate::lsn::Lsn;
use crate::source::standby;

/// The logical message prefix of a request.
pub const REQUEST_PREFIX: &str = "walnats.snapshot";
/// The logical message prefix of the watermarks.
pub const WATERMARK_PREFIX: &str = "walnats.watermark";

/// Whether a logical message is walnats' own (never published).
pub fn is_own_message(prefix: &str) -> bool {
    prefix == REQUEST_PREFIX || prefix == WATERMARK_PREFIX
}

/// What `walnats snapshot` stores in the checkpoint bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub slot: String,
    pub tables: Vec<Target>,
}

pub enum Watermark<'a> {
    Low(&'a str),
    High(&'a str),
}

pub fn parse_watermark(content: &[u8]) -> Option<Watermark<'_>> {
    let s = std::str::from_utf8(content).ok()?;
    if let Some(id) = s.strip_prefix("low:") {
        Some(Watermark::Low(id))
    } else {
        s.strip_prefix("high:").map(Watermark::High)
    }
}

/// At most this many tables in one request.
pub const MAX_TABLES: usize = 1000;

/// The nonce a `walnats.snapshot` message carries, if it is one (anything
/// else, such as a request written by hand, is not).
pub fn parse_nonce(content: &[u8]) -> Option<&str> {
    (content.len() == 32
        && content
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    .then(|| std::str::from_utf8(content).ok())
    .flatten()
}

/// Resolves `schema.table` names (or bare names, in `public`) against the
/// publication; refuses a table that is not published or has no primary
/// key.
pub async fn resolve(
    sql: &Client,
    publication: &str,
    slot: &str,
    names: &[String],
    server_version_num: u32,
) -> Result<Request> {
    if names.len() > MAX_TABLES {
        return Err(Error::new(
            Kind::Config,
            format!("at most {MAX_TABLES} tables in one request"),
        ));
    }
    let mut tables = Vec::new();
    for name in names {
        let (schema, table) = match name.split_once('.') {
            Some((s, t)) => (s.to_owned(), t.to_owned()),
            None => ("public".to_owned(), name.clone()),
        };
        let rows = sql
            .query(
                "SELECT c.oid::int8 FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &table],
            )
            .await
            .map_err(|e| pg_query_err("looking up a table", e))?;
        let Some(oid) = rows
            .first()
            .and_then(|r| u32::try_from(r.get::<_, i64>(0)).ok())
        else {
            return Err(Error::new(
                Kind::Config,
                format!("table {schema}.{table} does not exist (give it as schema.table)"),
            ));
        };
        let Some(plan) = catalog::plan(sql, publication, oid, server_version_num).await? else {
            return Err(Error::new(
                Kind::Config,
                format!(
                    "table {schema}.{table} is not in publication {publication:?}: walnats does not stream it, \
                     so there is nothing to re-read; add it to the publication first"
                ),
            ));
        };
        if let Some(e) = plan.row_security_refusal() {
            return Err(e);
        }
        if let Some(why) = &plan.unkeyed {
            return Err(Error::new(
                Kind::Config,
                format!(
                    "table {schema}.{table} cannot be re-read: an on-demand snapshot reads in primary key chunks \
                     while the stream runs, and {why}; drop the slot and let a new initial snapshot read it by \
                     heap pages (`walnats slot drop --yes`)"
                ),
            ));
        }
        if !plan.has_primary_key() {
            return Err(Error::new(
                Kind::Config,
                format!(
                    "table {schema}.{table} has no primary key: an on-demand snapshot reads in primary key \
                     chunks while the stream runs, so it cannot re-read it; add a primary key, or drop the \
                     slot and let a new initial snapshot read it (`walnats slot drop --yes`)"
                ),
            ));
        }
        tables.push(Target { oid, schema, table });
    }
    Ok(Request {
        slot: slot.to_owned(),
        tables,
    })
}

/// Writes the message that points at the request stored under `nonce`
/// into the WAL; returns its LSN.
pub async fn announce(sql: &Client, nonce: &str) -> Result<String> {
    let row = sql
        .query_one(EMIT_FLUSHED, &[&REQUEST_PREFIX, &nonce])
        .await
        .map_err(|e| pg_query_err("writing the snapshot request into the WAL", e))?;
    Ok(row.get(0))
}

/// Whether `t` still names the table it was resolved to (an OID can be
/// reused by another table once the first is dropped).
pub async fn still_names(sql: &Client, t: &Target) -> Result<bool> {
    let oid = i64::from(t.oid);
    let rows = sql
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::int8::oid",
            &[&oid],
        )
        .await
        .map_err(|e| pg_query_err("checking a requested table", e))?;
    Ok(rows
        .first()
        .is_some_and(|r| r.get::<_, String>(0) == t.schema && r.get::<_, String>(1) == t.table))
}

/// Where a window's watermarks are written, given where its chunk is read.
#[derive(Clone)]
pub enum Marks {
    /// On the server that is read: a primary.
    Here,
    /// On the primary of the standby that is read (`postgres.primary_url`).
    Primary(std::sync::Arc<Client>),
    /// Nowhere: a standby without `postgres.primary_url`, where no window
    /// can open.
    Nowhere,
}

impl Marks {
    /// Where a session on `server` writes its watermarks.
    pub fn of(server: &standby::Server) -> Marks {
        match server {
            standby::Server::Primary => Marks::Here,
            standby::Server::Standby(s) => s.primary.clone().map_or(Marks::Nowhere, Marks::Primary),
        }
    }
}

/// Why a standby without `primary_url` re-reads nothing.
pub const NO_PRIMARY: &str = "a re-read writes its watermarks into the WAL, which a hot standby cannot: set \
     postgres.primary_url to the standby's primary";

/// Low watermark, the chunk, high watermark: in that order, on `sql`, or
/// with the watermarks on the primary when `sql` is a standby (see the
/// module's header).
///
/// One more step makes the window exact: a transaction can have its commit
/// record in the WAL (so the stream delivers its change before the low
/// watermark) and still be invisible to a SELECT for a moment (it leaves
/// the proc array after writing the record; much longer when it waits for
/// a synchronous standby). So after the low watermark walnats waits until
/// every transaction that was in progress then has finished, and only then
/// SELECTs: every transaction the SELECT cannot see commits after the low
/// watermark, inside the window, and its rows are dropped from the chunk.
pub async fn read_window(
    sql: &Client,
    marks: &Marks,
    plan: &TablePlan,
    after: &Cursor,
    id: &str,
    limit: usize,
    max_bytes: usize,
) -> Result<Chunk> {
    match marks {
        Marks::Here => {}
        Marks::Primary(primary) => {
            let low = emit_watermark(primary, &format!("low:{id}")).await?;
            standby::wait_replayed(sql, low).await?;
            let chunk = catalog::read_chunk(sql, plan, None, after, limit, max_bytes).await?;
            emit_watermark(primary, &format!("high:{id}")).await?;
            return Ok(chunk);
        }
        Marks::Nowhere => return Err(Error::new(Kind::Config, NO_PRIMARY)),
    }
    emit_watermark(sql, &format!("low:{id}")).await?;
    let row = sql
        .query_one(
            "SELECT ARRAY(SELECT pg_catalog.pg_snapshot_xip(pg_catalog.pg_current_snapshot())::text)",
            &[],
        )
        .await
        .map_err(|e| pg_query_err("reading the transactions in progress", e))?;
    let running: Vec<String> = row.get(0);
    let started = std::time::Instant::now();
    let mut warned = std::time::Duration::from_secs(10);
    while !running.is_empty() {
        let row = sql
            .query_one(
                // Not `pg_xact_status(x) = 'in progress'`: a transaction is
                // committed in the commit log a moment before it leaves the
                // proc array, and in that moment a new snapshot (the
                // SELECT's) still does not see it, while its change is
                // already in the stream before the low watermark: the read
                // would be older than the change. A fresh snapshot that sees
                // it as finished is what the SELECT's will see.
                "SELECT pg_catalog.count(*) FROM pg_catalog.unnest($1::text[]) x \
                 WHERE NOT pg_catalog.pg_visible_in_snapshot(x::xid8, pg_catalog.pg_current_snapshot())",
                &[&running],
            )
            .await
            .map_err(|e| pg_query_err("waiting for transactions in progress", e))?;
        if row.get::<_, i64>(0) == 0 {
            break;
        }
        if started.elapsed() > warned {
            tracing::warn!(
                transactions = ?running,
                waited_s = started.elapsed().as_secs(),
                "snapshot chunk waits for transactions that were in progress at its low watermark \
                 (a long transaction holding writes, or a synchronous standby not answering)"
            );
            warned += std::time::Duration::from_secs(30);
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let chunk = catalog::read_chunk(sql, plan, None, after, limit, max_bytes).await?;
    emit_watermark(sql, &format!("high:{id}")).await?;
    Ok(chunk)
}

/// Writes a non-transactional logical message and flushes the WAL up to
/// it; returns the end of its record. Without the flush the message
/// waits in the WAL buffers for the WAL writer (up to `wal_writer_delay`,
/// 200 ms by default), as nothing else commits: the walsender sends only
/// flushed WAL, so every re-read chunk (and a request) would wait that
/// long before walnats sees it. The statement takes a transaction id, so
/// its commit writes a record and flushes the WAL through the message;
/// `synchronous_commit` is set on for that commit, whatever the
/// database's default says.
const EMIT_FLUSHED: &str = "SELECT pg_catalog.pg_logical_emit_message(false, $1, $2)::text, \
     pg_catalog.set_config('synchronous_commit', 'on', true), pg_catalog.txid_current()";

/// Writes a watermark, flushed; returns the end of its WAL record.
async fn emit_watermark(sql: &Client, content: &str) -> Result<Lsn> {
    let row = sql
        .query_one(EMIT_FLUSHED, &[&WATERMARK_PREFIX, &content])
        .await
        .map_err(|e| pg_query_err("writing a snapshot watermark", e))?;
    row.get::<_, String>(0).parse().map_err(|e| {
        Error::with_source(Kind::Protocol, "bad LSN from pg_logical_emit_message()", e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_well_formed_nonce_is_one() {
        let n = crate::nonce::new().unwrap();
        assert_eq!(parse_nonce(n.as_bytes()), Some(n.as_str()));
        assert_ne!(crate::nonce::new().unwrap(), n);
        assert_eq!(parse_nonce(br#"{"slot":"walnats","tables":[]}"#), None);
        assert_eq!(parse_nonce(&[b'a'; 31]), None);
        assert_eq!(parse_nonce(&[b'A'; 32]), None);
        assert_eq!(parse_nonce(&[b'a'; 1_500_000]), None);
    }
}
