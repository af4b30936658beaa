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

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::checkpoint::{Checkpoint, Store};
use crate::config::{Config, OversizePolicy, PgConnectConfig};
use crate::encode::{Encoder, OutMsg};
use crate::error::{Error, Kind, Result};
use crate::event::{Body, Event, Op, RelationCache};
use crate::http;
use crate::lsn::{Lsn, Position};
use crate::sink::oversize::OversizeStore;
use crate::sink::{MAX_BATCH, Publisher};
use crate::source;

pub use catalog::Cursor;

/// Rows per chunk: one atomic batch holds at most 1000 messages, and a
/// table's first chunk carries its `_schema` message too.
pub const CHUNK_ROWS: usize = MAX_BATCH - 1;

/// Values per chunk, roughly: bounds memory when rows are wide.
pub const CHUNK_BYTES: usize = 16 << 20;

/// How far the initial snapshot got: saved in the checkpoint while it runs,
/// gone once it is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SnapshotState {
    /// The slot's consistent point: the rows are the state as of here (on
    /// the first pass). `None` until the slot exists.
    pub consistent_point: Option<Lsn>,
    /// Whether `tables` is the list of tables to read.
    pub planned: bool,
    pub tables: Vec<TableProgress>,
    /// The `Cdc-Seq` of the next read.
    pub next_seq: u32,
    pub rows: u64,
    /// The planner's estimate of all rows, for progress reports.
    pub estimate: u64,
    /// A chunk that may be in the stream: the checkpoint is written before
    /// its batch is published.
    pub pending: Option<PendingChunk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableProgress {
    pub oid: u32,
    pub schema: String,
    pub table: String,
    pub after: Cursor,
    pub done: bool,
    pub rows: u64,
    pub estimate: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingChunk {
    pub table: usize,
    pub end: Cursor,
    pub last: bool,
    /// Messages in the batch: the stream grows by exactly this many if it
    /// landed.
    pub messages: u64,
    pub rows: u64,
    pub next_seq: u32,
    /// The `_schema` the batch carries.
    pub schema: Option<(u32, u64)>,
}

impl SnapshotState {
    /// The position shared by every read: one byte before the consistent
    /// point.
    fn read_lsn(&self) -> Lsn {
        let cp = self.consistent_point.unwrap_or(Lsn::ZERO);
        Lsn::from_u64(cp.as_u64().saturating_sub(1))
    }

    pub fn tables_done(&self) -> usize {
        self.tables.iter().filter(|t| t.done).count()
    }
}

/// Records a chunk as in the stream.
fn apply(cp: &mut Checkpoint, p: &PendingChunk, stream_seq: u64) {
    if let Some(snap) = cp.snapshot.as_mut() {
        snap.pending = None;
        if let Some(t) = snap.tables.get_mut(p.table) {
            t.after = p.end.clone();
            t.done = p.last;
            t.rows += p.rows;
        }
        snap.rows += p.rows;
        snap.next_seq = p.next_seq;
    }
    cp.stream_seq = stream_seq;
    if let Some((oid, hash)) = p.schema {
        cp.schemas.insert(oid, hash);
    }
}

/// Decides, from the stream's last sequence, whether the chunk the
/// checkpoint announced landed, and moves the snapshot state past it if so.
pub fn settle(cp: &mut Checkpoint, last_seq: u64) -> Result<()> {
    let Some(snap) = cp.snapshot.as_mut() else {
        return Ok(());
    };
    let extra = last_seq.saturating_sub(cp.stream_seq);
    match snap.pending.take() {
        Some(p) if extra == p.messages => {
            apply(cp, &p, last_seq);
            Ok(())
        }
        _ if extra == 0 => Ok(()),
        p => Err(Error::new(
            Kind::Checkpoint,
            format!(
                "the stream holds {extra} message(s) after the snapshot's checkpoint, but the chunk it announced \
                 has {}: another client publishes to the stream's subjects; walnats must be its only writer",
                p.map_or(0, |p| p.messages)
            ),
        )),
    }
}

/// What the snapshot reads with and publishes through.
pub struct Snapshotter<'a> {
    pub cfg: &'a Config,
    pub pg: &'a PgConnectConfig,
    pub store: &'a Store,
    pub publisher: &'a mut Publisher,
    pub encoder: &'a mut Encoder,
    pub cache: &'a mut RelationCache,
    pub server_version_num: u32,
    pub oversize: Option<&'a OversizeStore>,
    pub stream_name: &'a str,
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
        sql.batch_execute(&begin).await.map_err(|e| {
            crate::event::relation::pg_query_err("starting the snapshot transaction", e)
        })?;
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
            let listed = catalog::published_tables(&sql, &self.cfg.postgres.publication).await?;
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
        let reads = encode_reads(
            self.cfg,
            self.encoder,
            self.oversize.map(|o| (o, self.stream_name)),
            self.publisher.max_payload(),
            &cp.schemas,
            rel,
            chunk.rows,
            lsn,
            snap.next_seq,
            cp_lsn,
        )
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
            cp.stream_seq = self.publisher.last_seq();
            self.store.save(cp).await?;
        }
        let t1 = Instant::now();
        let seq = self.publisher.publish_batch(msgs).await?;
        tracing::debug!(
            rows,
            checkpoint_us = (t1 - t0).as_micros() as u64,
            batch_us = t1.elapsed().as_micros() as u64,
            "snapshot chunk published"
        );
        apply(cp, &pending, seq);
        metrics::counter!(http::SNAPSHOT_ROWS).increment(rows);
        metrics::counter!(http::EVENTS_PUBLISHED, "table" => format!("{}.{}", rel.schema, rel.table), "op" => "read")
            .increment(rows);
        Ok(())
    }
}

/// Read events, encoded, with the table's `_schema` first when the stream
/// has not seen this column set.
pub(crate) struct Reads {
    pub msgs: Vec<OutMsg>,
    pub schema: Option<(u32, u64)>,
    pub next_seq: u32,
}

/// Encodes `rows` as reads at positions (`lsn`, `first_seq`...), `cdc_lsn`
/// in `Cdc-Lsn`; applies the oversize policy.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn encode_reads(
    cfg: &Config,
    encoder: &mut Encoder,
    oversize: Option<(&OversizeStore, &str)>,
    max_payload: usize,
    schemas: &std::collections::BTreeMap<u32, u64>,
    rel: &Arc<crate::event::RelationInfo>,
    rows: Vec<crate::pgoutput::TupleData>,
    lsn: Lsn,
    first_seq: u32,
    cdc_lsn: Lsn,
) -> Result<Reads> {
    let mut seq = first_seq;
    let mut msgs: Vec<OutMsg> = Vec::with_capacity(rows.len() + 1);
    let mut schema = None;
    for row in rows {
        let ev = Event {
            pos: Position::new(lsn, seq),
            lsn: cdc_lsn,
            tx: None,
            snapshot: true,
            body: Body::Row {
                op: Op::Read,
                rel: Arc::clone(rel),
                old: None,
                new: Some(row),
            },
        };
        seq = seq
            .checked_add(1)
            .ok_or_else(|| Error::new(Kind::Protocol, "a snapshot of more than 4 billion rows"))?;
        if schema.is_none() && schemas.get(&rel.oid.0) != Some(&rel.schema_hash) {
            schema = Some((rel.oid.0, rel.schema_hash));
            let sev = Event {
                body: Body::Schema {
                    rel: Arc::clone(rel),
                },
                ..ev.clone()
            };
            msgs.push(encoder.encode(&sev)?);
        }
        let mut msg = encoder.encode(&ev)?;
        let mut size = Publisher::wire_size(&msg);
        if size > max_payload
            && cfg.on_oversize == OversizePolicy::ObjectStore
            && let Some((store, stream)) = oversize
        {
            // The body goes to the bucket before the batch that carries its
            // claim check can be in the stream.
            let claim = store.put_message(stream, &msg).await?;
            msg = encoder.claim_check(&ev, msg, &claim)?;
            metrics::counter!(http::OVERSIZE_STORED, "subject" => msg.subject.clone()).increment(1);
            size = Publisher::wire_size(&msg);
        }
        if size > max_payload {
            // Not the key: it is a row value, and row values stay out of logs.
            let what = format!(
                "the read of {}.{} at position {}:{} is {size} bytes, over the NATS server's max_payload of {max_payload}",
                rel.schema, rel.table, ev.pos.commit_lsn, ev.pos.seq,
            );
            if cfg.on_oversize == OversizePolicy::Skip {
                warn!(subject = %msg.subject, size, "oversized snapshot row skipped (limits.on_oversize = skip)");
                metrics::counter!(http::OVERSIZE_SKIPPED, "subject" => msg.subject.clone())
                    .increment(1);
                continue;
            }
            return Err(Error::new(
                Kind::Oversize,
                format!(
                    "{what}: raise max_payload on the NATS server, or set limits.on_oversize = \"object_store\" or \"skip\""
                ),
            ));
        }
        msgs.push(msg);
    }
    Ok(Reads {
        msgs,
        schema,
        next_seq: seq,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn in_progress(stream_seq: u64, messages: u64) -> Checkpoint {
        Checkpoint {
            stream_seq,
            snapshot: Some(SnapshotState {
                consistent_point: Some(Lsn::from_u64(0x100)),
                planned: true,
                tables: vec![TableProgress {
                    oid: 1,
                    schema: "public".into(),
                    table: "t".into(),
                    after: Cursor::Start,
                    done: false,
                    rows: 0,
                    estimate: 10,
                }],
                pending: Some(PendingChunk {
                    table: 0,
                    end: Cursor::Key {
                        values: vec!["7".into()],
                    },
                    last: true,
                    messages,
                    rows: messages - 1,
                    next_seq: 9,
                    schema: Some((1, 42)),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_chunk_that_landed_is_applied() {
        let mut cp = in_progress(5, 3);
        settle(&mut cp, 8).unwrap();
        let s = cp.snapshot.as_ref().unwrap();
        assert!(s.pending.is_none());
        assert!(s.tables[0].done);
        assert_eq!(s.rows, 2);
        assert_eq!(s.next_seq, 9);
        assert_eq!(cp.stream_seq, 8);
        assert_eq!(cp.schemas.get(&1), Some(&42));
    }

    #[test]
    fn a_chunk_that_did_not_land_is_read_again() {
        let mut cp = in_progress(5, 3);
        settle(&mut cp, 5).unwrap();
        let s = cp.snapshot.as_ref().unwrap();
        assert!(s.pending.is_none());
        assert_eq!(s.tables[0].after, Cursor::Start);
        assert!(!s.tables[0].done);
        assert_eq!(cp.stream_seq, 5);
        assert!(cp.schemas.is_empty());
    }

    #[test]
    fn part_of_a_chunk_means_another_writer() {
        let mut cp = in_progress(5, 3);
        assert!(settle(&mut cp, 7).is_err());
        let mut cp = in_progress(5, 3);
        assert!(settle(&mut cp, 9).is_err());
    }

    #[test]
    fn reads_sort_before_every_streamed_change() {
        let s = SnapshotState {
            consistent_point: Some(Lsn::from_u64(0x1000)),
            ..Default::default()
        };
        assert!(
            Position::new(s.read_lsn(), u32::MAX - 1) < Position::new(Lsn::from_u64(0x1000), 0)
        );
    }
}
