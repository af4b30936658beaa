//! Every type the checkpoint persists, and the rules that move it past a
//! batch it announced.
//!
//! The checkpoint is JSON in the KV bucket; these types are its schema, so
//! a field is only ever added (with a default) and never renamed. They live
//! here, not with the code that fills them (`snapshot`, `pipeline`), so
//! that the checkpoint depends on nothing that depends on it.
//!
//! A snapshot or re-read chunk goes out as a batch that the checkpoint
//! announces first (write-ahead): on resume, how far the stream's last
//! sequence is past each announced chunk's start, and the batch ids where
//! chunks would end, tell which landed ([`Checkpoint::settle_snapshot`],
//! [`Checkpoint::settle_rereads`]). No I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{Config, OutboxConfig, OutputFormat, OversizePolicy};
use crate::error::{Error, Kind, Result};
use crate::lsn::{Lsn, Position};

/// The settings that decide which messages replaying the slot produces,
/// and so what the stream holds: recorded with every checkpoint, so that a
/// change made while walnats was down takes effect at a transaction
/// boundary and never renumbers, loses or repeats a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// Which changes pgoutput sends (and so each change's `Cdc-Seq`).
    pub publication: String,
    /// Every subject, and so what a replay is compared with.
    pub prefix: String,
    /// `_tx` markers are messages of their own.
    pub tx_markers: bool,
    /// The body, and so whether a row is over max_payload.
    pub format: OutputFormat,
    /// Whether an oversized row is a message (object store), none (skip)
    /// or a stop.
    pub on_oversize: OversizePolicy,
    /// Which `pg_logical_emit_message` prefixes are published (a
    /// transactional one published takes a `Cdc-Seq`).
    #[serde(default = "all_messages")]
    pub message_prefixes: Vec<String>,
    /// `[[outbox]]`: which changes and messages are domain events (an
    /// outbox table's deletes and updates take no position).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<OutboxConfig>,
}

/// What walnats published before `output.message_prefixes` existed.
fn all_messages() -> Vec<String> {
    vec!["*".to_owned()]
}

impl Shape {
    /// The shape `cfg` asks for, with the subject prefix resolved.
    pub fn of(cfg: &Config, prefix: &str) -> Shape {
        Shape {
            publication: cfg.postgres.publication.clone(),
            prefix: prefix.to_owned(),
            tx_markers: cfg.output.tx_markers,
            format: cfg.output.format,
            on_oversize: cfg.on_oversize,
            message_prefixes: cfg.output.message_prefixes.clone(),
            outbox: cfg.outbox.clone(),
        }
    }

    /// The settings that differ in `to`, as `key: old -> new`.
    pub fn changes(&self, to: &Shape) -> Vec<String> {
        let mut out = Vec::new();
        if self.publication != to.publication {
            out.push(format!(
                "postgres.publication {:?} -> {:?}",
                self.publication, to.publication
            ));
        }
        if self.prefix != to.prefix {
            out.push(format!(
                "nats.subject_prefix {:?} -> {:?}",
                self.prefix, to.prefix
            ));
        }
        if self.tx_markers != to.tx_markers {
            out.push(format!(
                "output.tx_markers {} -> {}",
                self.tx_markers, to.tx_markers
            ));
        }
        if self.format != to.format {
            out.push(format!(
                "output.format {:?} -> {:?}",
                self.format, to.format
            ));
        }
        if self.on_oversize != to.on_oversize {
            out.push(format!(
                "limits.on_oversize {:?} -> {:?}",
                self.on_oversize, to.on_oversize
            ));
        }
        // Which changes and messages are events, and their subjects, decide
        // positions and what a replay is compared with; the other outbox
        // columns only fill bodies and headers and may change at once.
        let routing = |s: &Shape| {
            s.outbox
                .iter()
                .map(|o| (o.source.clone(), o.aggregate_type.clone()))
                .collect::<Vec<_>>()
        };
        if routing(self) != routing(to) {
            out.push(format!(
                "[[outbox]] tables, prefixes or aggregate_type columns ({} -> {} entries)",
                self.outbox.len(),
                to.outbox.len()
            ));
        }
        if self.message_prefixes != to.message_prefixes {
            out.push(format!(
                "output.message_prefixes {:?} -> {:?}",
                self.message_prefixes, to.message_prefixes
            ));
        }
        out
    }
}

impl Checkpoint {
    /// The settings the messages after this checkpoint were published
    /// with; for a checkpoint older than the record of them, `now` with the
    /// `tx_markers` it did record.
    pub fn shape_or(&self, now: &Shape) -> Shape {
        self.shape.clone().unwrap_or_else(|| Shape {
            tx_markers: self.legacy_tx_markers,
            message_prefixes: all_messages(),
            outbox: Vec::new(),
            ..now.clone()
        })
    }
}

/// What is published, as of one acknowledged message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Checkpoint {
    pub version: u32,
    /// The last change whose publish JetStream acknowledged; every
    /// position at or before it is in the stream.
    pub pos: Option<Position>,
    /// The stream sequence of the last acknowledged message.
    pub stream_seq: u64,
    /// The slot may be confirmed up to here: the end LSN of the last
    /// transaction whose every message is acknowledged, or a keepalive
    /// position reached while nothing was in flight.
    pub confirmed: Lsn,
    /// Relation OID → hash of the column set last published on `_schema`.
    pub schemas: BTreeMap<u32, u64>,
    /// The settings the messages after this checkpoint were published
    /// with. `None` in checkpoints older than this field (their
    /// `tx_markers` is read from `legacy_tx_markers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Shape>,
    /// Before `shape`: whether `_tx` markers were being published.
    #[serde(default, rename = "tx_markers", skip_serializing)]
    pub legacy_tx_markers: bool,
    /// The commit LSN of a transaction with messages in the stream whose
    /// end is not: it must be finished with the settings it began with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_tx: Option<Lsn>,
    /// The commit LSN of the last transaction whose BEGIN marker is
    /// acknowledged: a BEGIN precedes its transaction's first position, so
    /// the position alone cannot say it is out.
    #[serde(default)]
    pub begun: Option<Lsn>,
    /// The initial snapshot, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotState>,
    /// Tables `walnats snapshot` asked to re-read; the first is in progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rereads: Vec<Reread>,
    /// Re-read chunks announced before their batches were published, in
    /// publish order; the first still awaits its acknowledgement. A list
    /// under the name that held one chunk before several could be in
    /// flight: an older walnats cannot read it and refuses to start,
    /// rather than miss the chunks it does not know about.
    #[serde(
        rename = "pending_reread",
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub pending_rereads: Vec<PendingReread>,
}

/// A list, or the single value (or `null`) that older checkpoints held.
fn one_or_many<'de, D, T>(d: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        Many(Vec<T>),
        One(T),
        None,
    }
    Ok(match Option::<OneOrMany<T>>::deserialize(d)? {
        Some(OneOrMany::Many(v)) => v,
        Some(OneOrMany::One(t)) => vec![t],
        Some(OneOrMany::None) | None => Vec::new(),
    })
}

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
    /// its batch is published. Only in checkpoints from before `in_flight`
    /// (read on resume, never written).
    pub pending: Option<PendingChunk>,
    /// The chunks announced before their batches were published, in
    /// publish order: after `stream_seq` the stream holds a prefix of them
    /// (each batch names where the one before it ends).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_flight: Vec<PendingChunk>,
    /// Chains of chunks that earlier starts announced and found not (yet)
    /// landed, newest last, all after this same `stream_seq`: a batch sent
    /// just before a crash can still be stored after the next start read
    /// the stream's end. It then holds a prefix of one of these chains
    /// (or of `in_flight`: each chain's first batch names the same
    /// sequence, so only one chain can start), told apart by batch id.
    /// Cleared once anything lands.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late: Vec<Vec<PendingChunk>>,
    /// When this process started reading, and the rows done then: the
    /// rate and ETA `walnats status` shows, from any process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunStart>,
}

/// The start of one process's part of the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStart {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub rows: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableProgress {
    pub oid: u32,
    pub schema: String,
    pub table: String,
    /// Where the next chunk starts, for a table read as one unit.
    pub after: Cursor,
    pub done: bool,
    pub rows: u64,
    pub estimate: u64,
    /// A big table read in ranges, each a work unit with its own cursor;
    /// empty: the table is one unit (`after`). Set once, before any of
    /// its rows is announced; the table is done when all are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<RangeProgress>,
    /// When this process published the table's first chunk, and its rows
    /// done then: its rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunStart>,
}

/// One range of a big table: a work unit of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeProgress {
    pub span: Span,
    /// Where the range's next chunk starts.
    pub after: Cursor,
    pub done: bool,
    pub rows: u64,
}

/// Which rows a range holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Span {
    /// Rows whose leading primary key column is above `above` (if any)
    /// and at most `upto` (if any), as text of the column's type.
    Key {
        above: Option<String>,
        upto: Option<String>,
    },
    /// Heap pages from `from` up to, not including, `to` (the table's end
    /// if none).
    Page { from: u64, to: Option<u64> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingChunk {
    pub table: usize,
    /// The range of the table (its index in `ranges`), or none when the
    /// table is one unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<usize>,
    pub end: Cursor,
    pub last: bool,
    /// Messages in the batch: the stream grows by exactly this many if it
    /// landed.
    pub messages: u64,
    pub rows: u64,
    pub next_seq: u32,
    /// The `_schema` the batch carries.
    pub schema: Option<(u32, u64)>,
    /// The batch's `Nats-Batch-Id`, stored with each of its messages:
    /// which announcement the stream's messages belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    /// Sent as a fast-ingest batch: a prefix of it may have landed, its
    /// messages naming their chunk (`batch`) and row in
    /// `Cdc-Snapshot-Cursor`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fast: bool,
}

/// Chains of chunks kept as possibly landing late: a start with more
/// restarts in a row than this, without any chunk landing, forgets the
/// oldest (seconds have passed: a batch of a dead connection is stored
/// or dropped by then).
const LATE_CHAINS: usize = 16;

impl SnapshotState {
    /// The stream sequences where each announced chunk (and each chunk of a
    /// late chain) would end if its chain landed after `stream_seq`, up
    /// to `last_seq`: what [`Checkpoint::settle_snapshot`] checks.
    pub fn chunk_ends(&self, stream_seq: u64, last_seq: u64) -> Vec<u64> {
        let announced: Vec<&PendingChunk> = self.pending.iter().chain(&self.in_flight).collect();
        let chains = std::iter::once(announced).chain(self.late.iter().map(|c| c.iter().collect()));
        let mut ends = Vec::new();
        for chain in chains {
            let mut end = stream_seq;
            for p in chain {
                end += p.messages;
                if end > last_seq {
                    break;
                }
                if p.messages > 0 {
                    ends.push(end);
                }
            }
        }
        ends.sort_unstable();
        ends.dedup();
        ends
    }

    /// Whether chunks were announced that may not be in the stream yet.
    pub fn announced(&self) -> bool {
        self.pending.is_some() || !self.in_flight.is_empty() || !self.late.is_empty()
    }

    /// The position shared by every read: one byte before the consistent
    /// point.
    pub fn read_lsn(&self) -> Lsn {
        let cp = self.consistent_point.unwrap_or(Lsn::ZERO);
        Lsn::from_u64(cp.as_u64().saturating_sub(1))
    }

    pub fn tables_done(&self) -> usize {
        self.tables.iter().filter(|t| t.done).count()
    }
}

/// How far the snapshot is and how fast it goes, as `walnats status`
/// shows it: computed from the checkpoint, so any process can.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotProgress {
    pub rows: u64,
    pub estimate: u64,
    /// Rows per second since this walnats process started on the snapshot.
    pub rows_per_second: Option<u64>,
    /// Seconds left at that rate, from the planner's estimate.
    pub eta_seconds: Option<u64>,
    pub tables: Vec<TableRate>,
}

/// One table's part of [`SnapshotProgress`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableRate {
    pub schema: String,
    pub table: String,
    pub rows: u64,
    pub estimate: u64,
    pub done: bool,
    /// Work units: 1, or its ranges.
    pub units: usize,
    pub units_done: usize,
    /// While it is read: rows per second since its first chunk of this run.
    pub rows_per_second: Option<u64>,
    pub eta_seconds: Option<u64>,
}

/// Rows per second from `since` to `now_ms` with `rows` done now, and the
/// seconds left to `estimate`; none within the first second.
fn rate(
    since: Option<RunStart>,
    rows: u64,
    estimate: u64,
    now_ms: u64,
) -> (Option<u64>, Option<u64>) {
    let Some(s) = since else {
        return (None, None);
    };
    let ms = now_ms.saturating_sub(s.at_ms);
    if ms < 1000 {
        return (None, None);
    }
    let per_s = rows.saturating_sub(s.rows).saturating_mul(1000) / ms;
    let eta = (per_s > 0).then(|| estimate.saturating_sub(rows).div_ceil(per_s));
    (Some(per_s), eta)
}

impl SnapshotState {
    /// Rows done, estimate, rate and ETA, overall and per table, at
    /// `now_ms` (milliseconds since the Unix epoch).
    pub fn progress(&self, now_ms: u64) -> SnapshotProgress {
        let (rows_per_second, eta_seconds) = rate(self.run, self.rows, self.estimate, now_ms);
        let tables = self
            .tables
            .iter()
            .map(|t| {
                let (r, eta) = if t.done {
                    (None, Some(0))
                } else {
                    rate(t.run, t.rows, t.estimate, now_ms)
                };
                TableRate {
                    schema: t.schema.clone(),
                    table: t.table.clone(),
                    rows: t.rows,
                    estimate: t.estimate,
                    done: t.done,
                    units: t.ranges.len().max(1),
                    units_done: if t.ranges.is_empty() {
                        usize::from(t.done)
                    } else {
                        t.ranges.iter().filter(|r| r.done).count()
                    },
                    rows_per_second: r,
                    eta_seconds: eta,
                }
            })
            .collect();
        SnapshotProgress {
            rows: self.rows,
            estimate: self.estimate,
            rows_per_second,
            eta_seconds,
            tables,
        }
    }
}

impl TableProgress {
    /// Where the unit `range` (or the whole table) goes on, unless done.
    pub fn unit_after(&self, range: Option<usize>) -> Option<&Cursor> {
        match range {
            None if !self.done => Some(&self.after),
            Some(r) => self.ranges.get(r).filter(|r| !r.done).map(|r| &r.after),
            None => None,
        }
    }
}

/// Where a table's next chunk starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Cursor {
    Start,
    Key { values: Vec<String> },
    Page { page: u64 },
}

/// A table `walnats snapshot` asked for: its OID and the names it had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub oid: u32,
    pub schema: String,
    pub table: String,
}

/// A table being re-read, in the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reread {
    pub target: Target,
    pub after: Cursor,
    pub rows: u64,
}

/// A re-read chunk announced in the checkpoint before its atomic batch
/// goes out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingReread {
    /// Its batch's `Nats-Batch-Id`; empty in checkpoints from before
    /// several chunks could be in flight.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The stream sequence its batch must follow (streamed changes may be
    /// in flight before it); `None` in older checkpoints, where it is the
    /// checkpoint's own `stream_seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_seq: Option<u64>,
    /// The table it is of; 0 in older checkpoints: the queue's first.
    #[serde(default)]
    pub oid: u32,
    pub messages: u64,
    pub end: Cursor,
    pub last: bool,
    pub rows: u64,
    pub schema: Option<(u32, u64)>,
    /// The position of the last read in the batch.
    pub last_pos: Option<Position>,
}

/// How many of the `announced` chunks (in publish order) landed, given
/// that the stream holds `extra` messages after the checkpoint's
/// `stream_seq`: the longest prefix whose messages add up to `extra`
/// (a chunk of no message lands with the one before it). Batch k+1 names
/// where batch k ends, so the stream holds a prefix or nothing; any other
/// count means another client wrote to the stream.
fn landed_prefix(announced: &[PendingChunk], extra: u64) -> Result<(usize, u64)> {
    let mut sum = 0u64;
    let mut found = (extra == 0).then_some((0, 0));
    for (i, p) in announced.iter().enumerate() {
        if p.fast && sum < extra && extra < sum.saturating_add(p.messages) {
            // A fast-ingest chunk lands as a prefix: this one in part.
            return Ok((i, extra - sum));
        }
        sum = sum.saturating_add(p.messages);
        if sum == extra {
            found = Some((i + 1, 0));
        } else if sum > extra {
            break;
        }
    }
    found.ok_or_else(|| {
        let sizes: Vec<String> = announced.iter().map(|p| p.messages.to_string()).collect();
        Error::new(
            Kind::Checkpoint,
            format!(
                "the stream holds {extra} message(s) after the checkpoint, which is no prefix of the snapshot \
                 chunks it announced (of [{}] messages): another client publishes to the stream's subjects; \
                 walnats must be its only writer",
                sizes.join(", ")
            ),
        )
    })
}

/// The stream's last message when it is a row (or the `_schema`) of a
/// snapshot chunk sent as a fast-ingest batch, from its
/// `Cdc-Snapshot-Cursor` and `Nats-Msg-Id`: where a chunk that landed in
/// part ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkTail {
    /// The chunk's id (its `batch` in the checkpoint).
    pub chunk: String,
    /// The row's primary key values and its place among the reads; none
    /// on the chunk's `_schema` message.
    pub row: Option<(Vec<String>, u32)>,
}

impl Checkpoint {
    /// Records an initial-snapshot chunk as in the stream.
    pub fn apply_chunk(&mut self, p: &PendingChunk, stream_seq: u64) {
        if let Some(snap) = self.snapshot.as_mut() {
            if p.messages > 0 {
                // Every late chain names a stream sequence this one is past:
                // none can land any more.
                snap.late.clear();
            }
            if let Some(t) = snap.tables.get_mut(p.table) {
                match p.range.and_then(|r| t.ranges.get_mut(r)) {
                    Some(r) => {
                        r.after = p.end.clone();
                        r.done = p.last;
                        r.rows += p.rows;
                        t.done = t.ranges.iter().all(|r| r.done);
                    }
                    None => {
                        t.after = p.end.clone();
                        t.done = p.last;
                    }
                }
                t.rows += p.rows;
            }
            snap.rows += p.rows;
            snap.next_seq = p.next_seq;
        }
        self.stream_seq = stream_seq;
        if let Some((oid, hash)) = p.schema {
            self.schemas.insert(oid, hash);
        }
    }

    /// On resume: which of the snapshot chunks the checkpoint announced
    /// landed (the stream grew by exactly the size of a prefix of them:
    /// the longest such prefix); moves the snapshot state past those. The
    /// announcement is cleared either way: the rest are read again.
    ///
    /// `first_batch` is the `Nats-Batch-Id` of the stream's first message
    /// after the checkpoint: the chain it starts is the one that landed,
    /// the announcement of this checkpoint's last start or of one before
    /// it whose batches were stored late (see `SnapshotState::late`).
    ///
    /// A chunk sent as a fast-ingest batch may have landed in part: then
    /// `tail`, the stream's last message, must be of that chunk, and the
    /// snapshot goes on after the row it names; the rest of the chunk is
    /// kept as possibly landing late, like any chunk that did not land.
    ///
    /// `ends` holds the batch (or fast chunk) id of the stream's message at
    /// each sequence where an announced chunk would end
    /// ([`SnapshotState::chunk_ends`]); a chunk counted as landed must end
    /// with its own id there, or walnats refuses: the stream holds a batch
    /// out of turn, and which rows it holds cannot be told.
    pub fn settle_snapshot(
        &mut self,
        last_seq: u64,
        first_batch: Option<&str>,
        tail: Option<&ChunkTail>,
        ends: &BTreeMap<u64, Option<String>>,
    ) -> Result<()> {
        let extra = last_seq.saturating_sub(self.stream_seq);
        let Some(snap) = self.snapshot.as_mut() else {
            return Ok(());
        };
        let announced: Vec<PendingChunk> = snap
            .pending
            .take()
            .into_iter()
            .chain(std::mem::take(&mut snap.in_flight))
            .collect();
        let mut late = std::mem::take(&mut snap.late);
        // The highest read number any announced chunk took: new reads go
        // past it whichever chain landed (see below).
        let highest = announced
            .iter()
            .chain(late.iter().flatten())
            .map(|p| p.next_seq)
            .max();
        // Whether `first_batch` is the batch of the chain's first message.
        let starts = |chain: &[PendingChunk]| {
            chain
                .iter()
                .find(|p| p.messages > 0)
                .is_some_and(|p| p.batch.is_some() && p.batch.as_deref() == first_batch)
        };
        let chain = if extra == 0 || starts(&announced) {
            announced
        } else {
            match late.iter().rposition(|c| starts(c)) {
                Some(i) => late.swap_remove(i),
                None => announced,
            }
        };
        let (k, part) = landed_prefix(&chain, extra)?;
        let touched = k + usize::from(part > 0);
        let landed = chain[..touched].iter().find(|p| p.messages > 0);
        if landed.is_some_and(|p| p.batch.is_some()) && !starts(&chain) {
            return Err(Error::new(
                Kind::Checkpoint,
                format!(
                    "the stream's messages after the checkpoint are of batch {first_batch:?}, which the checkpoint \
                     never announced: another client publishes to the stream's subjects; walnats must be its \
                     only writer"
                ),
            ));
        }
        for p in &chain[..k] {
            let end = self.stream_seq + p.messages;
            if let Some(id) = p.batch.as_deref().filter(|_| p.messages > 0)
                && let Some(found) = ends.get(&end)
                && found.as_deref() != Some(id)
            {
                return Err(Error::new(
                    Kind::Checkpoint,
                    format!(
                        "the stream's message at sequence {end} is of batch {found:?}, where the snapshot chunk \
                         {id:?} the checkpoint announced would end: another client publishes to the stream's \
                         subjects (walnats must be its only writer), or a batch of a killed walnats was stored \
                         out of turn; which rows the stream holds cannot be told: delete the stream and \
                         walnats' checkpoint (and its slot) to take the snapshot again"
                    ),
                ));
            }
            self.apply_chunk(p, end);
        }
        // What was sent and is not in the stream may still be stored: the
        // rest of the chain that landed, or, when none did, every chain.
        let mut rest = chain[k..].to_vec();
        if part > 0
            && let Some(first) = rest.first_mut()
        {
            let landed_rows = self.apply_part(first, part, tail)?;
            first.messages -= part;
            first.rows = first.rows.saturating_sub(landed_rows);
            first.schema = None;
        }
        let mut keep = if landed.is_some() { Vec::new() } else { late };
        if rest.iter().any(|p| p.messages > 0) {
            keep.push(rest);
        }
        if keep.len() > LATE_CHAINS {
            keep.remove(0);
        }
        if let Some(snap) = self.snapshot.as_mut() {
            // Reads from now on take numbers (and so message ids) no chunk
            // that may still land has: JetStream would drop one of two
            // messages with the same id without a word, letting the other
            // sender's next message land in its place.
            snap.next_seq = snap.next_seq.max(highest.unwrap_or(0));
            snap.late = keep;
        }
        Ok(())
    }

    /// Records the first `part` messages of fast chunk `p` as in the
    /// stream, `tail` being the last of them; returns the rows they hold.
    fn apply_part(&mut self, p: &PendingChunk, part: u64, tail: Option<&ChunkTail>) -> Result<u64> {
        let tail = tail.filter(|t| p.batch.as_deref() == Some(t.chunk.as_str())).ok_or_else(|| {
            Error::new(
                Kind::Checkpoint,
                format!(
                    "the stream's last message after the checkpoint is not of the snapshot chunk {:?} the \
                     checkpoint announced there: another client publishes to the stream's subjects; walnats \
                     must be its only writer",
                    p.batch
                ),
            )
        })?;
        let stream_seq = self.stream_seq + part;
        let schema = u64::from(p.schema.is_some());
        let (after, rows, next_seq) = match &tail.row {
            Some((key, seq)) => (
                Some(Cursor::Key {
                    values: key.clone(),
                }),
                part.saturating_sub(schema),
                Some(seq.saturating_add(1)),
            ),
            // Only the chunk's `_schema` landed: its first message.
            None if part == 1 && schema == 1 => (None, 0, None),
            None => {
                return Err(Error::new(
                    Kind::Checkpoint,
                    format!(
                        "the stream's message at sequence {stream_seq} is the `_schema` of snapshot chunk {:?}, \
                         which the checkpoint does not place there: another client publishes to the stream's \
                         subjects; walnats must be its only writer",
                        p.batch
                    ),
                ));
            }
        };
        if let Some(snap) = self.snapshot.as_mut() {
            if let Some(t) = snap.tables.get_mut(p.table) {
                let cursor = match p.range.and_then(|r| t.ranges.get_mut(r)) {
                    Some(r) => {
                        r.rows += rows;
                        &mut r.after
                    }
                    None => &mut t.after,
                };
                if let Some(after) = after {
                    *cursor = after;
                }
                t.rows += rows;
            }
            snap.rows += rows;
            if let Some(n) = next_seq {
                snap.next_seq = n;
            }
        }
        self.stream_seq = stream_seq;
        if let Some((oid, hash)) = p.schema {
            self.schemas.insert(oid, hash);
        }
        tracing::info!(
            landed = part,
            of = p.messages,
            stream_seq,
            "a snapshot chunk landed in part: the snapshot goes on after its last row in the stream"
        );
        Ok(rows)
    }

    /// Records a re-read chunk that is in the stream, its batch ending at
    /// `end`: it leaves the announced list, the queue's cursor moves, and
    /// a finished table leaves the queue (returned). `end` is `None` for a
    /// chunk of no message (every row changed inside its window).
    pub fn apply_reread(&mut self, p: &PendingReread, end: Option<u64>) -> Option<Reread> {
        if let Some(i) = self.pending_rereads.iter().position(|q| q == p) {
            self.pending_rereads.remove(i);
        }
        if let Some(end) = end {
            self.stream_seq = end;
            if let Some(pos) = p.last_pos
                && self.pos.is_none_or(|q| q < pos)
            {
                self.pos = Some(pos);
            }
        }
        self.reread_moved(p)
    }

    /// The queue's side of a landed re-read chunk: cursor, rows, `_schema`.
    fn reread_moved(&mut self, p: &PendingReread) -> Option<Reread> {
        if let Some((oid, hash)) = p.schema {
            self.schemas.insert(oid, hash);
        }
        // Its table may have left the queue meanwhile (abandoned: dropped
        // or unpublished while the chunk was in flight).
        let i = match p.oid {
            0 => 0,
            oid => self.rereads.iter().position(|r| r.target.oid == oid)?,
        };
        let r = self.rereads.get_mut(i)?;
        r.after = p.end.clone();
        r.rows += p.rows;
        if p.last {
            tracing::info!(schema = %r.target.schema, table = %r.target.table, rows = r.rows, "snapshot of table complete");
            Some(self.rereads.remove(i))
        } else {
            None
        }
    }

    /// The stream sequences whose batch ids [`Checkpoint::settle_rereads`]
    /// needs: the last message of each announced re-read chunk the stream
    /// reaches, given its last sequence.
    pub fn reread_ends(&self, last_seq: u64) -> Vec<u64> {
        self.pending_rereads
            .iter()
            .filter_map(|p| {
                let end = p
                    .after_seq
                    .unwrap_or(self.stream_seq)
                    .saturating_add(p.messages);
                (last_seq >= end).then_some(end)
            })
            .collect()
    }

    /// On resume: which announced re-read chunks landed, given the stream's
    /// last sequence and the batch at each chunk's end (as
    /// `resume::batch_of` reads it: `None` when the message is gone). Each
    /// batch names the sequence it must follow and lands whole or not at
    /// all, and so does everything walnats sends after it: the stream
    /// holds a prefix of the list. A chunk right after the checkpoint's
    /// `stream_seq` moves it; one after streamed changes that the replay
    /// must still prove is returned as a stretch of the stream the replay
    /// steps over ([`Skip`]). Any other count, or another batch where a
    /// chunk ends, means another writer: a refusal.
    pub fn settle_rereads(
        &mut self,
        last_seq: u64,
        batches: &BTreeMap<u64, Option<Option<String>>>,
    ) -> Result<Vec<Skip>> {
        let mut skips = Vec::new();
        for p in std::mem::take(&mut self.pending_rereads) {
            let after = p.after_seq.unwrap_or(self.stream_seq);
            let end = after.saturating_add(p.messages);
            if last_seq <= after {
                break;
            }
            if last_seq < end || !p.id_matches(batches.get(&end)) {
                return Err(Error::new(
                    Kind::Checkpoint,
                    format!(
                        "the stream's messages {}..={end} should be the re-read chunk {:?} that the checkpoint \
                         announced, but the stream ends at {last_seq} or holds another batch there: another \
                         client publishes to the stream's subjects; walnats must be its only writer",
                        after + 1,
                        p.id
                    ),
                ));
            }
            if after == self.stream_seq {
                self.apply_reread(&p, Some(end));
            } else {
                // Recorded when the replay gets there, in turn with the
                // changes before it: its `_schema` and the queue's
                // cursor must not be in force before them.
                skips.push(Skip {
                    first: after + 1,
                    last: end,
                    chunk: p,
                });
            }
        }
        Ok(skips)
    }
}

impl PendingReread {
    /// Whether the stream's message at the chunk's end (`None`: not read;
    /// `Some(None)`: gone) may be its last: its batch id, when it has one
    /// and the chunk recorded its own.
    fn id_matches(&self, at_end: Option<&Option<Option<String>>>) -> bool {
        match at_end {
            _ if self.id.is_empty() => true,
            Some(Some(Some(id))) => *id == self.id,
            Some(Some(None)) | None => false,
            Some(None) => true,
        }
    }
}

/// A stretch of the stream that a resumed replay steps over: a re-read
/// chunk that landed after streamed changes the replay still has to prove.
/// The session records it (`Acked::Reread`) when the replay gets there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub first: u64,
    pub last: u64,
    pub chunk: PendingReread,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OutputFormat, OversizePolicy};

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
                    ranges: Vec::new(),
                    run: None,
                }],
                pending: Some(PendingChunk {
                    table: 0,
                    range: None,
                    end: Cursor::Key {
                        values: vec!["7".into()],
                    },
                    last: true,
                    messages,
                    rows: messages - 1,
                    next_seq: 9,
                    schema: Some((1, 42)),
                    batch: None,
                    fast: false,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_chunk_that_landed_is_applied() {
        let mut cp = in_progress(5, 3);
        cp.settle_snapshot(8, None, None, &BTreeMap::new()).unwrap();
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
        cp.settle_snapshot(5, None, None, &BTreeMap::new()).unwrap();
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
        assert!(cp.settle_snapshot(7, None, None, &BTreeMap::new()).is_err());
        let mut cp = in_progress(5, 3);
        assert!(cp.settle_snapshot(9, None, None, &BTreeMap::new()).is_err());
    }

    /// A table in two key ranges with four chunks announced in publish
    /// order: range 0's two chunks (the first with the `_schema`), then
    /// range 1's two.
    fn four_in_flight(stream_seq: u64) -> Checkpoint {
        let key = |k: &str| Cursor::Key {
            values: vec![k.into()],
        };
        let chunk =
            |range, end: &str, last, messages: u64, next_seq, schema: Option<(u32, u64)>| {
                PendingChunk {
                    table: 0,
                    range: Some(range),
                    end: key(end),
                    last,
                    messages,
                    rows: if schema.is_some() {
                        messages - 1
                    } else {
                        messages
                    },
                    next_seq,
                    schema,
                    batch: Some(format!("b{next_seq}")),
                    fast: false,
                }
            };
        let mut cp = in_progress(stream_seq, 3);
        let snap = cp.snapshot.as_mut().unwrap();
        snap.pending = None;
        let range = |above: Option<&str>, upto: Option<&str>| RangeProgress {
            span: Span::Key {
                above: above.map(str::to_owned),
                upto: upto.map(str::to_owned),
            },
            after: Cursor::Start,
            done: false,
            rows: 0,
        };
        snap.tables[0].ranges = vec![range(None, Some("50")), range(Some("50"), None)];
        snap.in_flight = vec![
            chunk(0, "10", false, 11, 10, Some((1, 42))),
            chunk(1, "60", false, 10, 20, None),
            chunk(0, "50", true, 5, 25, None),
            chunk(1, "99", true, 7, 32, None),
        ];
        cp
    }

    #[test]
    fn every_prefix_of_the_chunks_in_flight_is_applied_in_order() {
        let sizes = [0, 11, 21, 26, 33];
        for (k, extra) in sizes.into_iter().enumerate() {
            let mut cp = four_in_flight(100);
            let first = (k > 0).then_some("b10");
            cp.settle_snapshot(100 + extra, first, None, &BTreeMap::new())
                .unwrap();
            assert_eq!(cp.stream_seq, 100 + extra, "prefix {k}");
            let s = cp.snapshot.as_ref().unwrap();
            assert!(s.in_flight.is_empty() && s.pending.is_none());
            let t = &s.tables[0];
            let rows = [0, 10, 20, 25, 32][k];
            assert_eq!((s.rows, t.rows), (rows, rows), "prefix {k}");
            assert_eq!(
                s.next_seq, 32,
                "reads go on past every chunk that may still land (prefix {k})"
            );
            assert_eq!(cp.schemas.contains_key(&1), k >= 1);
            let after = |r: usize| t.ranges[r].after.clone();
            let key = |v: &str| Cursor::Key {
                values: vec![v.into()],
            };
            match k {
                0 => assert_eq!((after(0), after(1)), (Cursor::Start, Cursor::Start)),
                1 => assert_eq!((after(0), after(1)), (key("10"), Cursor::Start)),
                2 => assert_eq!((after(0), after(1)), (key("10"), key("60"))),
                _ => assert_eq!(after(0), key("50")),
            }
            assert_eq!(t.ranges[0].done, k >= 3);
            assert_eq!(t.ranges[1].done, k >= 4);
            assert_eq!(t.done, k == 4, "a table is done when all its ranges are");
            assert_eq!(
                t.after,
                Cursor::Start,
                "a table in ranges keeps no cursor of its own"
            );
        }
    }

    #[test]
    fn a_count_that_is_no_prefix_means_another_writer() {
        for extra in [1, 10, 12, 20, 22, 25, 27, 32, 34, 100] {
            let mut cp = four_in_flight(100);
            let e = cp
                .settle_snapshot(100 + extra, Some("b10"), None, &BTreeMap::new())
                .unwrap_err();
            assert_eq!(e.kind(), Kind::Checkpoint);
            assert!(e.to_string().contains("only writer"), "{e}");
            assert!(e.to_string().contains("[11, 10, 5, 7]"), "{e}");
        }
    }

    /// Chunks sent as fast-ingest batches land as a prefix of what was
    /// sent: a chunk that landed in part is settled from the stream's last
    /// message (whose chunk it is, which row), and the rest of it is kept
    /// as possibly landing late.
    #[test]
    fn a_fast_chunk_that_landed_in_part_goes_on_after_its_last_row() {
        let fast = || {
            let mut cp = four_in_flight(100);
            for p in &mut cp.snapshot.as_mut().unwrap().in_flight {
                p.fast = true;
            }
            cp
        };
        let tail = |chunk: &str, row: Option<(&str, u32)>| ChunkTail {
            chunk: chunk.into(),
            row: row.map(|(k, seq)| (vec![k.to_owned()], seq)),
        };
        let key = |v: &str| Cursor::Key {
            values: vec![v.into()],
        };
        // Chunk b10 whole (11 messages, its `_schema` first), then 4 of
        // chunk b20's 10 (range 1, reads 10..19): the last is read 13.
        let mut cp = fast();
        cp.settle_snapshot(
            115,
            Some("b10"),
            Some(&tail("b20", Some(("54", 13)))),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(cp.stream_seq, 115);
        let s = cp.snapshot.as_ref().unwrap();
        let t = &s.tables[0];
        assert_eq!(t.ranges[0].after, key("10"));
        assert_eq!(t.ranges[1].after, key("54"), "goes on after the last row");
        assert!(!t.ranges[1].done);
        assert_eq!((s.rows, t.rows, t.ranges[1].rows), (14, 14, 4));
        assert_eq!(
            s.next_seq, 32,
            "the next read is numbered past every chunk that may still land"
        );
        assert_eq!(s.late.len(), 1);
        assert_eq!(s.late[0].len(), 3, "the rest of b20, then b25 and b32");
        assert_eq!((s.late[0][0].messages, s.late[0][0].rows), (6, 6));
        // The next start finds the rest of b20 stored late: applied whole.
        let mut later = cp.clone();
        later
            .settle_snapshot(
                121,
                Some("b20"),
                Some(&tail("b20", Some(("60", 19)))),
                &BTreeMap::new(),
            )
            .unwrap();
        let s = later.snapshot.as_ref().unwrap();
        assert_eq!(s.tables[0].ranges[1].after, key("60"));
        assert_eq!((s.rows, s.next_seq, later.stream_seq), (20, 32, 121));

        // Only the first chunk's `_schema` landed.
        let mut cp = fast();
        cp.settle_snapshot(101, Some("b10"), Some(&tail("b10", None)), &BTreeMap::new())
            .unwrap();
        let s = cp.snapshot.as_ref().unwrap();
        assert_eq!(s.tables[0].ranges[0].after, Cursor::Start);
        assert_eq!((s.rows, cp.stream_seq), (0, 101));
        assert!(
            cp.schemas.contains_key(&1),
            "its `_schema` is in the stream"
        );
        assert_eq!(s.late[0][0].schema, None, "the rest has no `_schema`");

        // The last message is of another chunk, or a `_schema` out of place,
        // or has no cursor: someone else wrote it.
        for wrong in [
            Some(tail("b25", Some(("54", 13)))),
            Some(tail("b20", None)),
            None,
        ] {
            let mut cp = fast();
            let e = cp
                .settle_snapshot(115, Some("b10"), wrong.as_ref(), &BTreeMap::new())
                .unwrap_err();
            assert_eq!(e.kind(), Kind::Checkpoint);
            assert!(e.to_string().contains("only writer"), "{e}");
        }
    }

    /// A chunk counts as landed only if the stream's message where it would
    /// end is its own: a batch stored out of turn (another writer, or a
    /// killed walnats' batch after a same-sized one of its successor) is
    /// refused, not taken for the chunk announced there.
    #[test]
    fn a_chunk_whose_end_holds_another_batch_is_refused() {
        let cp = four_in_flight(100);
        assert_eq!(
            cp.snapshot.as_ref().unwrap().chunk_ends(100, 126),
            vec![111, 121, 126]
        );
        let ends = |pairs: &[(u64, Option<&str>)]| -> BTreeMap<u64, Option<String>> {
            pairs
                .iter()
                .map(|(k, v)| (*k, v.map(str::to_owned)))
                .collect()
        };
        let settle = |e: &BTreeMap<u64, Option<String>>| {
            cp.clone().settle_snapshot(121, Some("b10"), None, e)
        };
        assert!(settle(&ends(&[(111, Some("b10")), (121, Some("b20"))])).is_ok());
        assert!(settle(&ends(&[])).is_ok(), "messages gone prove nothing");
        for wrong in [
            ends(&[(111, Some("b10")), (121, Some("x"))]),
            ends(&[(121, None)]),
            ends(&[(111, Some("b20"))]),
        ] {
            let e = settle(&wrong).unwrap_err();
            assert_eq!(e.kind(), Kind::Checkpoint);
            assert!(e.to_string().contains("out of turn"), "{e}");
        }
    }

    /// Once a chunk of this process lands, no chain an earlier start kept
    /// as possibly late can land (each names a sequence the stream is now
    /// past): they are dropped, and no later start waits or looks for them.
    #[test]
    fn a_chunk_landing_drops_the_late_chains() {
        let mut cp = four_in_flight(100);
        cp.settle_snapshot(100, None, None, &BTreeMap::new())
            .unwrap();
        let s = cp.snapshot.as_mut().unwrap();
        assert_eq!(s.late.len(), 1);
        let mut empty = s.late[0][0].clone();
        empty.messages = 0;
        let mut full = s.late[0][0].clone();
        full.batch = Some("n1".into());
        cp.apply_chunk(&empty, 100);
        assert_eq!(
            cp.snapshot.as_ref().unwrap().late.len(),
            1,
            "nothing landed"
        );
        cp.apply_chunk(&full, 111);
        assert!(cp.snapshot.as_ref().unwrap().late.is_empty());
    }

    #[test]
    fn a_chunk_of_no_message_lands_with_the_one_before_it() {
        let mut cp = four_in_flight(100);
        let snap = cp.snapshot.as_mut().unwrap();
        // Every row of range 1's first chunk was skipped as oversized.
        snap.in_flight[1].messages = 0;
        snap.in_flight[1].rows = 10;
        cp.clone()
            .settle_snapshot(100, None, None, &BTreeMap::new())
            .unwrap();
        let mut none = cp.clone();
        none.settle_snapshot(100, None, None, &BTreeMap::new())
            .unwrap();
        assert_eq!(none.snapshot.as_ref().unwrap().rows, 0);
        cp.settle_snapshot(111, Some("b10"), None, &BTreeMap::new())
            .unwrap();
        let s = cp.snapshot.as_ref().unwrap();
        assert_eq!(s.rows, 20, "the empty chunk after the first landed with it");
        assert_eq!(cp.stream_seq, 111);
    }

    /// A start found none of its predecessor's batches in the stream, and
    /// announced its own; then the predecessor's first batch was stored
    /// late (its connection's bytes were still on their way), so the new
    /// one could not land. The next start applies the late chain by its
    /// batch id, not the new announcement of the same size.
    #[test]
    fn a_chain_stored_after_the_next_start_is_told_apart_by_batch_id() {
        let mut cp = four_in_flight(100);
        cp.settle_snapshot(100, None, None, &BTreeMap::new())
            .unwrap();
        let s = cp.snapshot.as_mut().unwrap();
        assert_eq!(s.late.len(), 1, "kept: it may still land");
        // The new start read range 1 first: a chunk of the same size.
        let mut n1 = s.late[0][1].clone();
        n1.messages = 11;
        n1.rows = 11;
        n1.batch = Some("n1".into());
        // Numbered after everything the late chain holds.
        n1.next_seq = 40;
        s.in_flight = vec![n1];
        let mut late = cp.clone();
        late.settle_snapshot(111, Some("b10"), None, &BTreeMap::new())
            .unwrap();
        let s = late.snapshot.as_ref().unwrap();
        assert_eq!(
            s.tables[0].ranges[0].after,
            Cursor::Key {
                values: vec!["10".into()]
            },
            "the late chunk of range 0 landed"
        );
        assert_eq!(s.tables[0].ranges[1].after, Cursor::Start, "not n1");
        assert_eq!(
            s.next_seq, 40,
            "new reads go past n1, which may still land out of turn"
        );
        assert_eq!(s.late.len(), 1, "the rest of the late chain may still land");
        assert_eq!(s.late[0].len(), 3);
        // The new announcement landed: applied as usual.
        let mut new = cp.clone();
        new.settle_snapshot(111, Some("n1"), None, &BTreeMap::new())
            .unwrap();
        let s = new.snapshot.as_ref().unwrap();
        assert_eq!(
            s.tables[0].ranges[1].after,
            Cursor::Key {
                values: vec!["60".into()]
            }
        );
        assert!(s.late.is_empty(), "no older chain can land after it");
        // A batch nobody announced.
        let e = cp
            .settle_snapshot(111, Some("x"), None, &BTreeMap::new())
            .unwrap_err();
        assert!(e.to_string().contains("never announced"), "{e}");
    }

    #[test]
    fn a_checkpoint_from_before_chunks_in_flight_settles_its_one_chunk() {
        // Written by a walnats with one chunk in flight: `pending`, no
        // `in_flight`, no ranges, no `range` in the chunk.
        let old = r#"{"version":1,"pos":null,"stream_seq":5,"confirmed":"0/100","schemas":{},
            "snapshot":{"consistent_point":"0/100","planned":true,"tables":[{"oid":1,"schema":"public",
            "table":"t","after":{"by":"key","values":["3"]},"done":false,"rows":3,"estimate":10}],
            "next_seq":4,"rows":3,"estimate":10,"pending":{"table":0,"end":{"by":"key","values":["7"]},
            "last":true,"messages":4,"rows":4,"next_seq":8,"schema":null}}}"#;
        let cp: Checkpoint = serde_json::from_str(old).unwrap();
        let mut landed = cp.clone();
        landed
            .settle_snapshot(9, None, None, &BTreeMap::new())
            .unwrap();
        let s = landed.snapshot.as_ref().unwrap();
        assert!(s.tables[0].done && s.pending.is_none());
        assert_eq!((s.rows, s.next_seq, landed.stream_seq), (7, 8, 9));
        let mut not = cp.clone();
        not.settle_snapshot(5, None, None, &BTreeMap::new())
            .unwrap();
        let s = not.snapshot.as_ref().unwrap();
        assert_eq!(
            s.tables[0].after,
            Cursor::Key {
                values: vec!["3".into()]
            }
        );
        assert!(!s.tables[0].done && s.pending.is_none());
        assert!(
            cp.clone()
                .settle_snapshot(7, None, None, &BTreeMap::new())
                .is_err()
        );
        // Written back, it has no `pending` and reads the same.
        let back: Checkpoint =
            serde_json::from_str(&serde_json::to_string(&landed).unwrap()).unwrap();
        assert_eq!(back, landed);
    }

    #[test]
    fn progress_gives_each_table_its_rate_and_eta() {
        let mut cp = four_in_flight(100);
        let s = cp.snapshot.as_mut().unwrap();
        s.rows = 3000;
        s.estimate = 10_000;
        s.run = Some(RunStart {
            at_ms: 10_000,
            rows: 1000,
        });
        let t = &mut s.tables[0];
        t.rows = 3000;
        t.estimate = 10_000;
        t.run = Some(RunStart {
            at_ms: 11_000,
            rows: 2000,
        });
        t.ranges[0].done = true;
        let p = s.progress(12_000);
        // 2000 rows in 2 s overall; 1000 rows in 1 s for the table.
        assert_eq!((p.rows_per_second, p.eta_seconds), (Some(1000), Some(7)));
        let t = &p.tables[0];
        assert_eq!((t.rows_per_second, t.eta_seconds), (Some(1000), Some(7)));
        assert_eq!((t.units, t.units_done, t.done), (2, 1, false));
        // Within the first second: no rate yet.
        assert_eq!(s.progress(11_500).tables[0].rows_per_second, None);
        // Not started in this run: no rate.
        s.tables[0].run = None;
        assert_eq!(s.progress(12_000).tables[0].eta_seconds, None);
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

    fn chunk(id: &str, after_seq: Option<u64>, messages: u64, key: &str) -> PendingReread {
        PendingReread {
            id: id.to_owned(),
            after_seq,
            oid: 1,
            messages,
            end: Cursor::Key {
                values: vec![key.into()],
            },
            last: false,
            rows: messages,
            schema: None,
            last_pos: Some(Position::new(Lsn::from_u64(0x200), messages as u32)),
        }
    }

    /// A checkpoint at `stream_seq` re-reading `public.t` with `chunks`
    /// announced.
    fn rereading(stream_seq: u64, chunks: Vec<PendingReread>) -> Checkpoint {
        let target = Target {
            oid: 1,
            schema: "public".into(),
            table: "t".into(),
        };
        Checkpoint {
            stream_seq,
            rereads: vec![Reread {
                target,
                after: Cursor::Start,
                rows: 0,
            }],
            pending_rereads: chunks,
            ..Default::default()
        }
    }

    fn ends(pairs: &[(u64, Option<&str>)]) -> BTreeMap<u64, Option<Option<String>>> {
        pairs
            .iter()
            .map(|(seq, id)| (*seq, Some(id.map(str::to_owned))))
            .collect()
    }

    fn after(cp: &Checkpoint) -> &Cursor {
        &cp.rereads[0].after
    }

    #[test]
    fn a_reread_chunk_right_after_the_checkpoint_moves_it() {
        for last_seq in [8, 12] {
            let mut cp = rereading(5, vec![chunk("b1", Some(5), 3, "7")]);
            let skips = cp
                .settle_rereads(last_seq, &ends(&[(8, Some("b1"))]))
                .unwrap();
            assert!(skips.is_empty() && cp.pending_rereads.is_empty());
            assert_eq!(cp.stream_seq, 8, "the batch's own end, not the stream's");
            assert_eq!(cp.rereads[0].rows, 3);
            assert_eq!(cp.pos, Some(Position::new(Lsn::from_u64(0x200), 3)));
        }
    }

    #[test]
    fn a_reread_chunk_after_changes_in_flight_is_stepped_over_by_the_replay() {
        // Changes 6..=7, chunk b1 at 8..=10, a change at 11, chunk b2 at
        // 12..=13, then more changes; b3 (after 20) did not land.
        let b1 = PendingReread {
            schema: Some((1, 42)),
            ..chunk("b1", Some(7), 3, "3")
        };
        let mut cp = rereading(
            5,
            vec![
                b1.clone(),
                chunk("b2", Some(11), 2, "5"),
                chunk("b3", Some(20), 2, "9"),
            ],
        );
        let skips = cp
            .settle_rereads(15, &ends(&[(10, Some("b1")), (13, Some("b2"))]))
            .unwrap();
        // The changes before b1 may be of the table's older column set:
        // its `_schema` counts once the replay is past them.
        assert_eq!(skips[0].chunk, b1);
        assert!(cp.schemas.is_empty());
        assert_eq!(
            skips.iter().map(|s| (s.first, s.last)).collect::<Vec<_>>(),
            [(8, 10), (12, 13)]
        );
        assert_eq!(
            cp.stream_seq, 5,
            "the changes before them are still to prove"
        );
        assert_eq!(
            after(&cp),
            &Cursor::Start,
            "moved when the replay gets there"
        );
        assert_eq!(cp.rereads[0].rows, 0);
        assert_eq!(skips[1].chunk.id, "b2");
        assert!(cp.pending_rereads.is_empty());
    }

    #[test]
    fn a_reread_chunk_that_did_not_land_is_read_again() {
        for last_seq in [5, 7] {
            let mut cp = rereading(
                5,
                vec![chunk("b1", Some(7), 3, "7"), chunk("b2", Some(10), 1, "8")],
            );
            assert!(
                cp.settle_rereads(last_seq, &BTreeMap::new())
                    .unwrap()
                    .is_empty()
            );
            assert!(cp.pending_rereads.is_empty());
            assert_eq!(after(&cp), &Cursor::Start);
            assert_eq!(cp.stream_seq, 5);
        }
    }

    #[test]
    fn part_of_a_reread_chunk_or_another_batch_at_its_end_means_another_writer() {
        let mut cp = rereading(5, vec![chunk("b1", Some(5), 3, "7")]);
        let e = cp.settle_rereads(7, &BTreeMap::new()).unwrap_err();
        assert!(e.to_string().contains("only writer"), "{e}");
        for other in [Some("b9"), None] {
            let mut cp = rereading(5, vec![chunk("b1", Some(5), 3, "7")]);
            let e = cp.settle_rereads(9, &ends(&[(8, other)])).unwrap_err();
            assert!(e.to_string().contains("only writer"), "{e}");
        }
        // Gone (a work queue, limits): the numbering still proves it.
        let mut cp = rereading(5, vec![chunk("b1", Some(5), 3, "7")]);
        let gone = BTreeMap::from([(8, None)]);
        assert!(cp.settle_rereads(9, &gone).is_ok());
        assert_eq!(cp.stream_seq, 8);
    }

    #[test]
    fn a_reread_chunk_announced_by_an_older_walnats_follows_the_checkpoint() {
        // One chunk, no id, no sequence of its own: the old format.
        let mut json = serde_json::to_value(rereading(5, Vec::new())).unwrap();
        let old = serde_json::json!({"messages": 3, "end": {"by": "key", "values": ["7"]},
            "last": false, "rows": 3, "schema": null, "last_pos": null});
        json["pending_reread"] = old;
        let mut cp: Checkpoint = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(cp.pending_rereads.len(), 1);
        assert_eq!(cp.reread_ends(9), [8]);
        cp.settle_rereads(9, &ends(&[(8, Some("w-any"))])).unwrap();
        assert_eq!(cp.stream_seq, 8);
        json["pending_reread"] = serde_json::Value::Null;
        let none: Checkpoint = serde_json::from_value(json).unwrap();
        assert!(none.pending_rereads.is_empty());
        // And a list, as written now, round trips.
        let many = rereading(
            5,
            vec![chunk("b1", Some(6), 2, "3"), chunk("b2", Some(9), 1, "4")],
        );
        let back: Checkpoint =
            serde_json::from_str(&serde_json::to_string(&many).unwrap()).unwrap();
        assert_eq!(back, many);
    }

    #[test]
    fn a_finished_table_leaves_the_queue() {
        let mut p = chunk("b1", Some(5), 3, "7");
        p.last = true;
        let mut cp = rereading(5, vec![p.clone()]);
        let done = cp.apply_reread(&p, Some(8)).unwrap();
        assert_eq!(done.target.oid, 1);
        assert!(cp.rereads.is_empty() && cp.pending_rereads.is_empty());
    }

    #[test]
    fn without_an_announced_chunk_the_snapshot_allows_no_extra_message() {
        let mut cp = in_progress(5, 3);
        cp.snapshot.as_mut().unwrap().pending = None;
        assert!(cp.settle_snapshot(5, None, None, &BTreeMap::new()).is_ok());
        assert!(cp.settle_snapshot(6, None, None, &BTreeMap::new()).is_err());
        let mut cp = rereading(5, Vec::new());
        assert!(
            cp.settle_rereads(9, &BTreeMap::new()).is_ok(),
            "streaming went on"
        );
    }

    #[test]
    fn a_setting_change_is_named_with_both_values() {
        let a = Shape {
            publication: "p1".to_owned(),
            prefix: "cdc.app".to_owned(),
            tx_markers: false,
            format: OutputFormat::Json,
            on_oversize: OversizePolicy::Fail,
            message_prefixes: Vec::new(),
            outbox: Vec::new(),
        };
        assert!(a.changes(&a).is_empty());
        let b = Shape {
            publication: "p2".to_owned(),
            tx_markers: true,
            ..a.clone()
        };
        assert_eq!(
            a.changes(&b),
            vec![
                "postgres.publication \"p1\" -> \"p2\"".to_owned(),
                "output.tx_markers false -> true".to_owned()
            ]
        );
    }

    #[test]
    fn old_checkpoints_keep_their_tx_markers() {
        let c: Checkpoint =
            serde_json::from_str(r#"{"version":1,"pos":null,"stream_seq":3,"confirmed":"0/0","schemas":{},"tx_markers":true}"#)
                .unwrap();
        let now = Shape {
            publication: "p".to_owned(),
            prefix: "cdc.app".to_owned(),
            tx_markers: false,
            format: OutputFormat::Json,
            on_oversize: OversizePolicy::Fail,
            message_prefixes: Vec::new(),
            outbox: Vec::new(),
        };
        assert!(c.shape_or(&now).tx_markers);
        let back = serde_json::to_string(&Checkpoint {
            shape: Some(now.clone()),
            ..c
        })
        .unwrap();
        let again: Checkpoint = serde_json::from_str(&back).unwrap();
        assert_eq!(again.shape, Some(now));
    }
}
