//! The initial snapshot: the rows that existed before the slot, published
//! as `read` events ahead of the first streamed change.
//!
//! How it stays exactly-once:
//!
//! - A new slot exports its snapshot; walnats imports it into a
//!   REPEATABLE READ transaction and reads every published table inside it,
//!   so the rows are exactly the state at the slot's consistent point and
//!   the stream continues from there: nothing lost, nothing doubled at the
//!   boundary.
//! - Rows go out in chunks (up to 999 rows by primary key; three heap pages
//!   for a table without one), each published as one JetStream atomic batch:
//!   a chunk is wholly in the stream or not at all. Before a batch goes out,
//!   the checkpoint records it (where it ends, how many messages); on
//!   restart the stream's last sequence says whether it landed. So a
//!   `kill -9` at any moment neither republishes a row nor loses one.
//! - An exported snapshot dies with its connection, so after a restart the
//!   remaining chunks are read in a new snapshot. Rows that changed in
//!   between are read at their newer state, and their changes still follow
//!   in the stream (they committed after the consistent point): a consumer
//!   that applies events in stream order ends with the table's state.
//!
//! Every read's position is (consistent point − 1, n): every streamed
//! transaction commits at or after the consistent point, so read message
//! ids never collide with a change's and sort before all of them.

pub mod catalog;
pub mod reread;
pub mod window;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::checkpoint::{Checkpoint, Cursor, PendingChunk, Store, TableProgress};
use crate::config::{Config, PgConnectConfig};
use crate::error::{Error, Kind, Result};
use crate::event::{RelationCache, outbox};
use crate::lsn::{Lsn, Position};
use crate::publish::Outlet;
use crate::sink::MAX_BATCH;
use crate::source;

/// Rows per chunk: one atomic batch holds at most 1000 messages, and a
/// table's first chunk carries its `_schema` message too.
pub const CHUNK_ROWS: usize = MAX_BATCH - 1;

/// Values per chunk, roughly: bounds memory when rows are wide.
pub const CHUNK_BYTES: usize = 16 << 20;

/// What the snapshot reads with and publishes through.
pub struct Snapshotter<'a> {
    pub cfg: &'a Config,
    pub pg: &'a PgConnectConfig,
    pub store: &'a Store,
    pub out: &'a mut Outlet,
    pub cache: &'a mut RelationCache,
    pub server_version_num: u32,
}

impl Snapshotter<'_> {
    /// Reads every table still to do and publishes its rows; `exported` is
    /// the slot's exported snapshot on the first pass. Leaves
    /// `cp.snapshot` empty when done.
    pub async fn run(&mut self, cp: &mut Checkpoint, exported: Option<&str>) -> Result<()> {
        let sql = source::connect_sql(self.pg).await?;
        let begin = match exported {
            Some(name) => format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
                name.replace('\'', "''")
            ),
            None => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".to_owned(),
        };
        sql.batch_execute(&begin)
            .await
            .map_err(|e| crate::error::pg_query_err("starting the snapshot transaction", e))?;
        let mut snap = cp.snapshot.take().unwrap_or_default();
        if exported.is_none() && snap.planned {
            info!(
                tables_done = snap.tables_done(),
                tables = snap.tables.len(),
                rows_done = snap.rows,
                "snapshot resumes in a new transaction: rows changed since the slot's consistent point are read \
                 at their current state, and their changes follow in the stream"
            );
        }
        if !snap.planned {
            let mut listed =
                catalog::published_tables(&sql, &self.cfg.postgres.publication).await?;
            // An outbox table's rows are events, not state: never read.
            listed.retain(|t| outbox::table_entry(&self.cfg.outbox, &t.schema, &t.table).is_none());
            snap.estimate = listed.iter().map(|t| t.estimate).sum();
            snap.tables = listed
                .into_iter()
                .map(|t| TableProgress {
                    oid: t.oid,
                    schema: t.schema,
                    table: t.table,
                    after: Cursor::Start,
                    done: false,
                    rows: 0,
                    estimate: t.estimate,
                })
                .collect();
            snap.planned = true;
            info!(
                tables = snap.tables.len(),
                estimated_rows = snap.estimate,
                "snapshot started"
            );
        }
        cp.snapshot = Some(snap);
        self.store.save(cp).await?;

        let started = Instant::now();
        let mut progress = Progress::new(started);
        // A reader task walks the tables and reads chunk after chunk while
        // this one publishes: the next chunk is read while the last batch
        // commits. Two chunks wait at most, so memory stays bounded.
        let todo: Vec<(usize, TableProgress)> = cp
            .snapshot
            .as_ref()
            .map(|s| {
                s.tables
                    .iter()
                    .cloned()
                    .enumerate()
                    .filter(|(_, t)| !t.done)
                    .collect()
            })
            .unwrap_or_default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let reader = tokio::spawn(read_tables(
            sql,
            self.cfg.postgres.publication.clone(),
            self.server_version_num,
            todo,
            tx,
        ));
        let mut rel = None;
        while let Some(item) = rx.recv().await {
            match item? {
                Read::Table(i, plan) => {
                    let t = table_of(cp, i)?;
                    info!(schema = %t.schema, table = %t.table, estimated_rows = t.estimate,
                        by = if plan.has_primary_key() { "primary key" } else { "heap pages" },
                        "snapshot of table");
                    if let Some(why) = &plan.unkeyed {
                        warn!(schema = %t.schema, table = %t.table,
                            "snapshot reads the table by heap pages, not by primary key: {why}; \
                             a restart during its read may then read a row changed meanwhile twice or not at all \
                             (its change follows in the stream), and `walnats snapshot` cannot re-read it");
                    }
                    rel = Some((i, self.cache.update(&plan.relation).await?));
                }
                Read::Gone(i) => {
                    let t = table_of(cp, i)?;
                    warn!(schema = %t.schema, table = %t.table, "table is gone or no longer published; snapshot skips it");
                    if let Some(tp) = cp.snapshot.as_mut().and_then(|s| s.tables.get_mut(i)) {
                        tp.done = true;
                    }
                }
                Read::Chunk(i, chunk) => {
                    let r = match &rel {
                        Some((j, r)) if *j == i => Arc::clone(r),
                        _ => {
                            return Err(Error::new(
                                Kind::Protocol,
                                "snapshot chunk before its table",
                            ));
                        }
                    };
                    let last = chunk.last;
                    self.chunk(cp, i, &r, chunk).await?;
                    progress.tick(cp);
                    if last {
                        let t = table_of(cp, i)?;
                        info!(schema = %t.schema, table = %t.table, rows = t.rows, "snapshot of table complete");
                    }
                }
            }
        }
        // The reader commits (releasing the snapshot) before it ends.
        reader
            .await
            .map_err(|e| Error::new(Kind::Io, format!("snapshot reader failed: {e}")))?;
        if let Some(s) = cp.snapshot.take() {
            let secs = started.elapsed().as_secs_f64();
            info!(
                tables = s.tables.len(),
                rows = s.rows,
                seconds = format!("{secs:.1}"),
                "snapshot complete"
            );
        }
        self.store.save(cp).await?;
        Ok(())
    }

    /// Encodes one chunk, announces it in the checkpoint, publishes it as
    /// one atomic batch and records it.
    async fn chunk(
        &mut self,
        cp: &mut Checkpoint,
        index: usize,
        rel: &Arc<crate::event::RelationInfo>,
        chunk: catalog::Chunk,
    ) -> Result<()> {
        let snap = cp
            .snapshot
            .as_ref()
            .ok_or_else(|| Error::new(Kind::Checkpoint, "snapshot state vanished"))?;
        let lsn = snap.read_lsn();
        let cp_lsn = snap.consistent_point.unwrap_or(Lsn::ZERO);
        let rows = chunk.rows.len() as u64;
        let reads = self
            .out
            .reads(rel, chunk.rows, Position::new(lsn, snap.next_seq), cp_lsn)
            .await?;
        let (msgs, schema, seq) = (reads.msgs, reads.schema, reads.next_seq);
        let pending = PendingChunk {
            table: index,
            end: chunk.end,
            last: chunk.last,
            messages: msgs.len() as u64,
            rows,
            next_seq: seq,
            schema,
        };
        let t0 = Instant::now();
        if !msgs.is_empty() {
            // Write-ahead: the checkpoint says what this batch is before it
            // can be in the stream.
            if let Some(snap) = cp.snapshot.as_mut() {
                snap.pending = Some(pending.clone());
            }
            cp.stream_seq = self.out.publisher.last_seq();
            self.store.save(cp).await?;
        }
        let t1 = Instant::now();
        let seq = self.out.publisher.publish_batch(msgs).await?;
        tracing::debug!(
            rows,
            checkpoint_us = (t1 - t0).as_micros() as u64,
            batch_us = t1.elapsed().as_micros() as u64,
            "snapshot chunk published"
        );
        cp.apply_chunk(&pending, seq);
        metrics::counter!(crate::metrics::SNAPSHOT_ROWS).increment(rows);
        metrics::counter!(crate::metrics::EVENTS_PUBLISHED, "table" => format!("{}.{}", rel.schema, rel.table), "op" => "read")
            .increment(rows);
        Ok(())
    }
}

fn table_of(cp: &Checkpoint, i: usize) -> Result<TableProgress> {
    cp.snapshot
        .as_ref()
        .and_then(|s| s.tables.get(i))
        .cloned()
        .ok_or_else(|| Error::new(Kind::Checkpoint, "snapshot table index out of range"))
}

/// What the reader task hands over, in order.
enum Read {
    Table(usize, catalog::TablePlan),
    Gone(usize),
    Chunk(usize, catalog::Chunk),
}

/// Plans and reads every table in `todo` inside the snapshot transaction
/// of `sql`, then commits it. Stops early when the receiver is gone.
async fn read_tables(
    sql: tokio_postgres::Client,
    publication: String,
    server_version_num: u32,
    todo: Vec<(usize, TableProgress)>,
    tx: tokio::sync::mpsc::Sender<Result<Read>>,
) {
    for (i, t) in todo {
        let plan = match catalog::plan(&sql, &publication, t.oid, server_version_num).await {
            Ok(Some(p)) => match p.row_security_refusal() {
                Some(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                None => p,
            },
            Ok(None) => {
                if tx.send(Ok(Read::Gone(i))).await.is_err() {
                    return;
                }
                continue;
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        if tx.send(Ok(Read::Table(i, plan.clone()))).await.is_err() {
            return;
        }
        let mut after = t.after.clone();
        loop {
            let chunk =
                match catalog::read_chunk(&sql, &plan, &after, CHUNK_ROWS, CHUNK_BYTES).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
            let last = chunk.last;
            after = chunk.end.clone();
            if tx.send(Ok(Read::Chunk(i, chunk))).await.is_err() {
                return;
            }
            if last {
                break;
            }
        }
    }
    let _ = sql.batch_execute("COMMIT").await;
}

/// A log line every few seconds: rows done of the estimate, and the rate.
struct Progress {
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new(started: Instant) -> Progress {
        Progress {
            started,
            last: started,
        }
    }

    fn tick(&mut self, cp: &Checkpoint) {
        if self.last.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.last = Instant::now();
        let Some(s) = &cp.snapshot else { return };
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        info!(
            rows_done = s.rows,
            estimated_rows = s.estimate,
            tables_done = s.tables_done(),
            tables = s.tables.len(),
            rows_per_second = (s.rows as f64 / secs) as u64,
            "snapshot progress"
        );
    }
}
