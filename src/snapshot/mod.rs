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
//! - `snapshot.parallelism` connections import that one snapshot and take
//!   work units from one queue: whole tables, and ranges of big ones (of
//!   the leading primary key column, split at sampled values; or of heap
//!   pages for a table read by pages), so that several tables and ranges
//!   are read at once. Each unit has its own cursor in the checkpoint; a
//!   table is done when all its units are.
//! - Rows go out in chunks (up to `snapshot.chunk_rows` rows by primary
//!   key; up to three heap pages for a table without one), up to 16 in
//!   flight (8 atomic batches), so that the stream holds a prefix of what was sent. Before a
//!   chunk goes out, the checkpoint lists it among the chunks in flight
//!   (in order: where each ends, how many messages, its id); on restart
//!   the stream's growth past the checkpoint says which prefix landed (any
//!   other growth is another writer: refused). So a `kill -9` at any
//!   moment neither republishes a row nor loses one. A chunk is one
//!   fast-ingest batch where the server has them, each message naming the
//!   stream sequence it must follow (so nothing lands after a hole) and
//!   carrying its chunk id and row key (`Cdc-Snapshot-Cursor`): a chunk may
//!   land in part, and the stream's last message says which row the unit
//!   goes on after. Otherwise, and in a run with a table read by heap
//!   pages (no key to go on after), a chunk is one atomic batch, naming
//!   where the one before it ends: wholly in the stream or not at all.
//!   nats-server stores an atomic batch's messages twice (staged, then
//!   committed), so the fast batches are what lets the snapshot run at the
//!   speed of streaming.
//! - An exported snapshot dies with its connection, so after a restart the
//!   remaining chunks are read in a new snapshot. Rows that changed in
//!   between are read at their newer state, and their changes still follow
//!   in the stream (they committed after the consistent point): a consumer
//!   that applies events in stream order ends with the table's state. A
//!   key range is fixed by values of the key, not by where rows are, so
//!   every key still falls in exactly one range, read once.
//!
//! Every read's position is (consistent point − 1, n): every streamed
//! transaction commits at or after the consistent point, so read message
//! ids never collide with a change's and sort before all of them.

pub mod catalog;
pub mod reread;
pub mod window;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::checkpoint::{
    Checkpoint, Cursor, PendingChunk, RangeProgress, RunStart, Span, Store, TableProgress,
};
use crate::config::{Config, PgConnectConfig, SnapshotReading};
use crate::encode::OutMsg;
use crate::error::{Error, Kind, Result};
use crate::event::{RelationCache, RelationInfo, outbox};
use crate::lsn::{Lsn, Position};
use crate::publish::Outlet;
use crate::sink::{MAX_BATCH, MAX_BATCHES_IN_FLIGHT, unique_batch_id};
use crate::source;

/// Rows per re-read chunk: one atomic batch holds at most 1000 messages,
/// and a table's first chunk carries its `_schema` message too.
pub const CHUNK_ROWS: usize = MAX_BATCH - 1;

/// Fast-ingest chunks in flight at most (atomic batches: 8): enough that
/// nats-server still has chunks to store while walnats saves the
/// checkpoint that announces the next ones.
const FAST_CHUNKS_IN_FLIGHT: usize = 16;

/// Ranges per reader at most: more units than readers, so that a reader
/// done early takes another.
const RANGES_PER_READER: usize = 4;

/// What the snapshot reads with and publishes through.
pub struct Snapshotter<'a> {
    pub cfg: &'a Config,
    pub pg: &'a PgConnectConfig,
    pub store: &'a Store,
    pub out: &'a mut Outlet,
    pub cache: &'a mut RelationCache,
    pub server_version_num: u32,
}

/// One work unit: a whole table, or one range of a big one.
struct Unit {
    table: usize,
    range: Option<usize>,
    span: Option<Span>,
    after: Cursor,
    plan: Arc<catalog::TablePlan>,
}

/// A chunk a reader read, and the unit it belongs to.
struct Got {
    table: usize,
    range: Option<usize>,
    chunk: catalog::Chunk,
}

/// A chunk encoded and not yet announced.
type Staged = (PendingChunk, Vec<OutMsg>);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Snapshotter<'_> {
    /// Reads every table still to do and publishes its rows; `exported` is
    /// the slot's exported snapshot on the first pass. Leaves
    /// `cp.snapshot` empty when done.
    pub async fn run(&mut self, cp: &mut Checkpoint, exported: Option<&str>) -> Result<()> {
        let reading = self.cfg.snapshot_reading;
        // Every reader imports the exported snapshot before anything else
        // happens on the connection that exported it.
        let mut readers = open_readers(self.pg, exported, reading.parallelism).await?;
        let mut snap = cp.snapshot.take().unwrap_or_default();
        if exported.is_none() && snap.planned {
            info!(
                tables_done = snap.tables_done(),
                tables = snap.tables.len(),
                rows_done = snap.rows,
                "snapshot resumes in new transactions: rows changed since the slot's consistent point are read \
                 at their current state, and their changes follow in the stream"
            );
        }
        if !snap.planned {
            let sql = readers
                .first()
                .ok_or_else(|| Error::new(Kind::Config, "snapshot.parallelism is 0"))?;
            let mut listed = catalog::published_tables(sql, &self.cfg.postgres.publication).await?;
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
                    ranges: Vec::new(),
                    run: None,
                })
                .collect();
            snap.planned = true;
            info!(
                tables = snap.tables.len(),
                estimated_rows = snap.estimate,
                parallelism = reading.parallelism,
                "snapshot started"
            );
        }
        snap.run = Some(RunStart {
            at_ms: now_ms(),
            rows: snap.rows,
        });
        for t in &mut snap.tables {
            t.run = None;
        }
        cp.snapshot = Some(snap);
        cp.stream_seq = self.out.publisher.last_seq();
        let (units, rels) = match readers.first() {
            Some(sql) => self.plan_units(cp, sql, reading.parallelism).await?,
            None => (VecDeque::new(), BTreeMap::new()),
        };
        if self.out.publisher.chunks_fast() && units.iter().any(|u| u.plan.unkeyed.is_some()) {
            // A chunk of heap pages has no key to go on after a part of it
            // that landed: every chunk of this run lands whole or not at all.
            info!("a table read by heap pages: the snapshot publishes atomic batches");
            self.out.publisher.chunks_atomic()?;
        }
        self.store.save(cp).await?;

        let started = Instant::now();
        // Readers take units from the queue and hand chunks over in a
        // channel of `parallelism` places: with the chunk each reader is
        // reading, memory holds about 2 x parallelism chunks read, plus
        // the chunks being published.
        let queue = Arc::new(Mutex::new(units));
        let (tx, rx) = mpsc::channel(reading.parallelism.max(1));
        let tasks: Vec<_> = readers
            .drain(..)
            .map(|sql| tokio::spawn(read_units(sql, Arc::clone(&queue), tx.clone(), reading)))
            .collect();
        drop(tx);
        let published = self.publish_all(cp, rx, &rels).await;
        for t in tasks {
            if published.is_err() {
                t.abort();
            } else {
                // Each reader commits (releasing the snapshot) before it ends.
                t.await
                    .map_err(|e| Error::new(Kind::Io, format!("snapshot reader failed: {e}")))?;
            }
        }
        published?;
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

    /// Plans every table still to do (inside the snapshot of `sql`): a
    /// table that is gone is done; a big one not yet started is split into
    /// ranges, recorded in the checkpoint before any of its rows can be
    /// announced. Returns the work units in table order and each table's
    /// relation.
    async fn plan_units(
        &mut self,
        cp: &mut Checkpoint,
        sql: &tokio_postgres::Client,
        parallelism: usize,
    ) -> Result<(VecDeque<Unit>, BTreeMap<usize, Arc<RelationInfo>>)> {
        let mut units = VecDeque::new();
        let mut rels = BTreeMap::new();
        let Some(snap) = cp.snapshot.as_mut() else {
            return Ok((units, rels));
        };
        for (i, t) in snap.tables.iter_mut().enumerate() {
            if t.done {
                continue;
            }
            let plan = match catalog::plan(
                sql,
                &self.cfg.postgres.publication,
                t.oid,
                self.server_version_num,
            )
            .await?
            {
                Some(p) => p,
                None => {
                    warn!(schema = %t.schema, table = %t.table, "table is gone or no longer published; snapshot skips it");
                    t.done = true;
                    continue;
                }
            };
            if let Some(e) = plan.row_security_refusal() {
                return Err(e);
            }
            if let Some(why) = &plan.unkeyed {
                warn!(schema = %t.schema, table = %t.table,
                    "snapshot reads the table by heap pages, not by primary key: {why}; \
                     a restart during its read may then read a row changed meanwhile twice or not at all \
                     (its change follows in the stream), and `walnats snapshot` cannot re-read it");
            }
            rels.insert(i, self.cache.update(&plan.relation).await?);
            let fresh = t.ranges.is_empty() && t.after == Cursor::Start && t.rows == 0;
            if fresh && parallelism > 1 {
                let n = (parallelism * RANGES_PER_READER)
                    .min(usize::try_from(plan.pages / catalog::MIN_RANGE_PAGES).unwrap_or(1));
                t.ranges = catalog::split(sql, &plan, n)
                    .await?
                    .into_iter()
                    .map(|span| RangeProgress {
                        span,
                        after: Cursor::Start,
                        done: false,
                        rows: 0,
                    })
                    .collect();
            }
            info!(schema = %t.schema, table = %t.table, estimated_rows = t.estimate,
                by = if plan.has_primary_key() { "primary key" } else { "heap pages" },
                ranges = t.ranges.len().max(1), "snapshot of table");
            let plan = Arc::new(plan);
            if t.ranges.is_empty() {
                units.push_back(Unit {
                    table: i,
                    range: None,
                    span: None,
                    after: t.after.clone(),
                    plan,
                });
            } else {
                for (r, range) in t.ranges.iter().enumerate().filter(|(_, r)| !r.done) {
                    units.push_back(Unit {
                        table: i,
                        range: Some(r),
                        span: Some(range.span.clone()),
                        after: range.after.clone(),
                        plan: Arc::clone(&plan),
                    });
                }
            }
        }
        Ok((units, rels))
    }

    /// Encodes the chunks as they come, announces them in the checkpoint
    /// (several per save), sends their batches without waiting, and
    /// records each as it lands, in order.
    async fn publish_all(
        &mut self,
        cp: &mut Checkpoint,
        mut rx: mpsc::Receiver<Result<Got>>,
        rels: &BTreeMap<usize, Arc<RelationInfo>>,
    ) -> Result<()> {
        let mut next_seq = cp.snapshot.as_ref().map_or(0, |s| s.next_seq);
        let mut staged: Vec<Staged> = Vec::new();
        let mut open = true;
        let mut progress = Progress::new(Instant::now());
        // Fast chunks are acknowledged one by one as they are stored;
        // nats-server keeps at most 50 atomic batches open per stream.
        let window =
            self.cfg
                .snapshot_reading
                .chunks_in_flight(match self.out.publisher.chunks_fast() {
                    true => FAST_CHUNKS_IN_FLIGHT,
                    false => MAX_BATCHES_IN_FLIGHT,
                });
        loop {
            self.apply_empty_heads(cp);
            let announced = cp.snapshot.as_ref().map_or(0, |s| s.in_flight.len());
            let room = window.saturating_sub(announced + staged.len());
            if !staged.is_empty() && (room == 0 || !open || rx.is_empty()) {
                self.announce_and_send(cp, &mut staged).await?;
                continue;
            }
            if !open && announced == 0 {
                return Ok(());
            }
            tokio::select! {
                biased;
                seq = self.out.publisher.batch_landed(), if self.out.publisher.batches_in_flight() > 0 => {
                    self.landed(cp, seq?, &mut progress)?;
                }
                got = rx.recv(), if open && room > 0 => match got {
                    None => open = false,
                    Some(got) => {
                        let got = got?;
                        let rel = rels.get(&got.table).ok_or_else(|| {
                            Error::new(Kind::Protocol, "snapshot chunk of a table not planned")
                        })?;
                        self.encode(cp, got, rel, &mut next_seq, &mut staged).await?;
                    }
                },
            }
        }
    }

    /// Encodes one chunk as reads; a chunk of 1000 rows whose table's
    /// `_schema` goes first becomes two, so that no batch is over 1000.
    async fn encode(
        &mut self,
        cp: &Checkpoint,
        got: Got,
        rel: &Arc<RelationInfo>,
        next_seq: &mut u32,
        staged: &mut Vec<Staged>,
    ) -> Result<()> {
        let snap = cp
            .snapshot
            .as_ref()
            .ok_or_else(|| Error::new(Kind::Checkpoint, "snapshot state vanished"))?;
        let lsn = snap.read_lsn();
        let cp_lsn = snap.consistent_point.unwrap_or(Lsn::ZERO);
        let Got {
            table,
            range,
            chunk,
        } = got;
        let parts = if !self.out.schema_sent(rel) && chunk.rows.len() >= MAX_BATCH {
            split_for_schema(chunk)?
        } else {
            vec![chunk]
        };
        let fast = self.out.publisher.chunks_fast();
        for chunk in parts {
            let rows = chunk.rows.len() as u64;
            let id = unique_batch_id();
            let cursor = fast.then_some((id.as_str(), chunk.keys.as_slice()));
            let reads = self
                .out
                .reads(
                    rel,
                    chunk.rows,
                    Position::new(lsn, *next_seq),
                    cp_lsn,
                    cursor,
                )
                .await?;
            *next_seq = reads.next_seq;
            let pending = PendingChunk {
                table,
                range,
                end: chunk.end,
                last: chunk.last,
                messages: reads.msgs.len() as u64,
                rows,
                next_seq: reads.next_seq,
                schema: reads.schema,
                batch: (!reads.msgs.is_empty()).then_some(id),
                fast,
            };
            staged.push((pending, reads.msgs));
        }
        Ok(())
    }

    /// Write-ahead: one checkpoint save lists the staged chunks after those
    /// in flight, before any of their batches can be in the stream; then
    /// their batches go out, each right after the one before.
    async fn announce_and_send(
        &mut self,
        cp: &mut Checkpoint,
        staged: &mut Vec<Staged>,
    ) -> Result<()> {
        let snap = cp
            .snapshot
            .as_mut()
            .ok_or_else(|| Error::new(Kind::Checkpoint, "snapshot state vanished"))?;
        snap.in_flight.extend(staged.iter().map(|(p, _)| p.clone()));
        let t0 = Instant::now();
        self.store.save(cp).await?;
        let t1 = Instant::now();
        let chunks = staged.len();
        for (p, msgs) in staged.drain(..) {
            if let Some(id) = &p.batch {
                self.out.publisher.send_batch(id, msgs).await?;
            }
        }
        debug!(
            chunks,
            in_flight = self.out.publisher.batches_in_flight(),
            checkpoint_us = (t1 - t0).as_micros() as u64,
            send_us = t1.elapsed().as_micros() as u64,
            "snapshot chunks announced and sent"
        );
        Ok(())
    }

    /// Records the oldest chunk in flight as in the stream, ending at
    /// `seq`.
    fn landed(&mut self, cp: &mut Checkpoint, seq: u64, progress: &mut Progress) -> Result<()> {
        self.apply_empty_heads(cp);
        let head = cp
            .snapshot
            .as_mut()
            .filter(|s| !s.in_flight.is_empty())
            .map(|s| s.in_flight.remove(0))
            .ok_or_else(|| {
                Error::new(
                    Kind::Publish,
                    "an atomic batch landed that no chunk announced",
                )
            })?;
        if seq != cp.stream_seq + head.messages {
            return Err(Error::new(
                Kind::Publish,
                format!(
                    "a snapshot chunk of {} messages after stream sequence {} landed ending at {seq}: resuming \
                     from the stream",
                    head.messages, cp.stream_seq
                ),
            ));
        }
        self.record(cp, &head, seq);
        progress.tick(cp);
        Ok(())
    }

    /// Chunks of no message (every row skipped as oversized) at the head
    /// of those in flight: in the stream as soon as all before them are.
    fn apply_empty_heads(&mut self, cp: &mut Checkpoint) {
        while let Some(head) = cp
            .snapshot
            .as_mut()
            .filter(|s| s.in_flight.first().is_some_and(|p| p.messages == 0))
            .map(|s| s.in_flight.remove(0))
        {
            let seq = cp.stream_seq;
            self.record(cp, &head, seq);
        }
    }

    fn record(&mut self, cp: &mut Checkpoint, p: &PendingChunk, seq: u64) {
        let before = cp
            .snapshot
            .as_ref()
            .and_then(|s| s.tables.get(p.table))
            .map(|t| (t.run.is_none(), t.rows));
        cp.apply_chunk(p, seq);
        let Some(t) = cp.snapshot.as_mut().and_then(|s| s.tables.get_mut(p.table)) else {
            return;
        };
        if let Some((true, rows)) = before {
            t.run = Some(RunStart {
                at_ms: now_ms(),
                rows,
            });
        }
        metrics::counter!(crate::metrics::SNAPSHOT_ROWS).increment(p.rows);
        metrics::counter!(crate::metrics::EVENTS_PUBLISHED, "table" => format!("{}.{}", t.schema, t.table), "op" => "read")
            .increment(p.rows);
        if p.last && t.done {
            info!(schema = %t.schema, table = %t.table, rows = t.rows, "snapshot of table complete");
        }
    }
}

/// A chunk of 1000 rows read by key, as two: 999 rows (room for the
/// `_schema` message) and the last row.
fn split_for_schema(mut chunk: catalog::Chunk) -> Result<Vec<catalog::Chunk>> {
    let cut = MAX_BATCH - 1;
    let end = match chunk.keys.get(cut - 1) {
        Some(k) if !k.is_empty() => Cursor::Key { values: k.clone() },
        _ => {
            return Err(Error::new(
                Kind::Protocol,
                "a snapshot chunk of 1000 rows without a key to split it at",
            ));
        }
    };
    let rest = catalog::Chunk {
        rows: chunk.rows.split_off(cut),
        keys: chunk.keys.split_off(cut),
        end: chunk.end,
        last: chunk.last,
    };
    let first = catalog::Chunk {
        rows: chunk.rows,
        keys: chunk.keys,
        end,
        last: false,
    };
    Ok(vec![first, rest])
}

/// `n` connections, each in a REPEATABLE READ READ ONLY transaction that
/// imports `exported` (or takes its own snapshot after a restart).
async fn open_readers(
    pg: &PgConnectConfig,
    exported: Option<&str>,
    n: usize,
) -> Result<Vec<tokio_postgres::Client>> {
    let begin = match exported {
        Some(name) => format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            name.replace('\'', "''")
        ),
        None => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".to_owned(),
    };
    let opened = (0..n.max(1)).map(|_| async {
        let sql = source::connect_sql(pg).await?;
        sql.batch_execute(&begin)
            .await
            .map_err(|e| crate::error::pg_query_err("starting the snapshot transaction", e))?;
        Ok::<_, Error>(sql)
    });
    futures::future::try_join_all(opened).await
}

/// One reader: takes units from `queue` until it is empty and reads each
/// chunk after chunk into `tx`, then commits. Stops early when the
/// receiver is gone.
async fn read_units(
    sql: tokio_postgres::Client,
    queue: Arc<Mutex<VecDeque<Unit>>>,
    tx: mpsc::Sender<Result<Got>>,
    reading: SnapshotReading,
) {
    loop {
        let unit = match queue.lock() {
            Ok(mut q) => q.pop_front(),
            Err(_) => None,
        };
        let Some(u) = unit else { break };
        let mut after = u.after.clone();
        loop {
            let read = catalog::read_chunk(
                &sql,
                &u.plan,
                u.span.as_ref(),
                &after,
                reading.chunk_rows,
                reading.chunk_bytes,
            )
            .await;
            let chunk = match read {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let last = chunk.last;
            after = chunk.end.clone();
            let got = Got {
                table: u.table,
                range: u.range,
                chunk,
            };
            if tx.send(Ok(got)).await.is_err() {
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
    rows_at_start: Option<u64>,
}

impl Progress {
    fn new(started: Instant) -> Progress {
        Progress {
            started,
            last: started,
            rows_at_start: None,
        }
    }

    fn tick(&mut self, cp: &Checkpoint) {
        let Some(s) = &cp.snapshot else { return };
        let base = *self.rows_at_start.get_or_insert(s.rows);
        if self.last.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        info!(
            rows_done = s.rows,
            estimated_rows = s.estimate,
            tables_done = s.tables_done(),
            tables = s.tables.len(),
            rows_per_second = (s.rows.saturating_sub(base) as f64 / secs) as u64,
            "snapshot progress"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::TupleData;

    fn chunk(n: usize, last: bool) -> catalog::Chunk {
        catalog::Chunk {
            rows: (0..n).map(|_| TupleData::from_values(Vec::new())).collect(),
            keys: (0..n).map(|i| vec![i.to_string()]).collect(),
            end: Cursor::Key {
                values: vec![(n - 1).to_string()],
            },
            last,
        }
    }

    /// A table's first chunk of 1000 rows needs 1001 messages with its
    /// `_schema`: it goes out as 999 rows (ending at the 999th key) and 1.
    #[test]
    fn a_full_chunk_with_its_schema_becomes_two_batches() {
        let parts = split_for_schema(chunk(1000, true)).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].rows.len(), 999);
        assert_eq!(
            parts[0].end,
            Cursor::Key {
                values: vec!["998".into()]
            }
        );
        assert!(!parts[0].last);
        assert_eq!(parts[1].rows.len(), 1);
        assert_eq!(
            parts[1].end,
            Cursor::Key {
                values: vec!["999".into()]
            }
        );
        assert!(
            parts[1].last,
            "the second part ends the unit as the chunk did"
        );
        let mut unkeyed = chunk(1000, false);
        unkeyed.keys = vec![Vec::new(); 1000];
        assert!(split_for_schema(unkeyed).is_err());
    }
}
