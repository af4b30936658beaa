//! Acknowledged → durable → confirmable, in one place.
//!
//! Every message the session publishes (or finds in the stream on resume,
//! or drops by policy) enters the ledger in publish order, paired with the
//! stream sequence that must be stored before it counts. Once JetStream
//! acknowledges that sequence the entry moves the *acknowledged* state
//! (position, stream sequence, `_schema` hashes, open transaction); a
//! checkpoint of it is written to the KV bucket (*durable*); only a durable
//! checkpoint's `confirmed` LSN may be sent to PostgreSQL (*confirmable*).
//!
//! Nothing is written while a resumed session's replay is unproven: a
//! replay that drifts must be refused before it moves anything.
//!
//! No I/O: the session writes what [`Ledger::due`] hands it and reports
//! back with [`Ledger::mark_written`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tracing::info;

use super::{Checkpoint, Cursor, PendingReread, Reread, Target};
use crate::lsn::{Lsn, Position};

/// What an entry turns into once the stream holds its sequence.
pub enum Acked {
    /// Stored by JetStream (or found in the stream on resume) at `seq`.
    Msg {
        seq: u64,
        pos: Option<Position>,
        /// The commit LSN of the transaction it belongs to.
        tx: Option<Lsn>,
        schema: Option<(u32, u64)>,
        /// Counted in `walnats_events_published_total` when published by
        /// this process (not when found in the stream on resume).
        counter: Option<metrics::Counter>,
        commit_time: Option<i64>,
        /// Set on a BEGIN marker: its transaction's commit LSN.
        begin_of: Option<Lsn>,
    },
    /// Not published by policy (oversize "skip"), but done with.
    Dropped { pos: Position, tx: Option<Lsn> },
    /// Every message before this one belongs to transactions that ended
    /// at or before `end`; the one committing at `commit` is complete.
    TxEnd { commit: Lsn, end: Lsn },
    /// `walnats snapshot` asked for these tables (a message in the WAL at
    /// `pos`): they join the checkpoint's re-read queue in stream order.
    Request { pos: Position, targets: Vec<Target> },
    /// A re-read chunk whose batch ends at `end` (`None`: a chunk of no
    /// message) is in the stream.
    Reread {
        chunk: PendingReread,
        end: Option<u64>,
    },
}

/// Metric handles the ledger records into (names live with the metrics).
pub struct Meters {
    /// Commit → acknowledgement, seconds.
    pub latency: metrics::Histogram,
    pub transactions: metrics::Counter,
}

pub struct Ledger {
    /// In publish order: (the stream sequence that must be stored, entry);
    /// 0 for entries that need nothing stored.
    inflight: VecDeque<(u64, Acked)>,
    /// The stream holds every message up to this sequence.
    stored_seq: u64,
    acked: Checkpoint,
    durable: Checkpoint,
    last_write: Instant,
    meters: Meters,
}

/// Now, in PostgreSQL's timestamp unit: microseconds since 2000-01-01.
fn pg_now() -> i64 {
    const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    now_us - PG_EPOCH_UNIX_US
}

impl Ledger {
    /// Starts from a durable checkpoint.
    pub fn new(start: Checkpoint, meters: Meters) -> Ledger {
        Ledger {
            inflight: VecDeque::new(),
            stored_seq: start.stream_seq,
            acked: start.clone(),
            durable: start,
            last_write: Instant::now(),
            meters,
        }
    }

    /// An entry that counts once the stream holds `need` (0: at once).
    pub fn push(&mut self, need: u64, a: Acked) {
        self.inflight.push_back((need, a));
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// JetStream acknowledged everything up to `seq`.
    pub fn stored(&mut self, seq: u64) {
        self.stored_seq = self.stored_seq.max(seq);
    }

    /// Hands over, in order, every entry the stream now holds.
    pub fn settle(&mut self) {
        // Read the clock once per run of acknowledgements.
        let mut now = None;
        while let Some((need, _)) = self.inflight.front()
            && *need <= self.stored_seq
        {
            if let Some((_, a)) = self.inflight.pop_front() {
                self.apply(a, &mut now);
            }
        }
    }

    fn apply(&mut self, a: Acked, now: &mut Option<i64>) {
        let c = &mut self.acked;
        match a {
            Acked::Msg {
                seq,
                pos,
                tx,
                schema,
                counter,
                commit_time,
                begin_of,
            } => {
                c.stream_seq = seq;
                if begin_of.is_some() {
                    c.begun = begin_of;
                }
                if let Some(p) = pos {
                    c.pos = Some(p);
                }
                if tx.is_some() {
                    c.open_tx = tx;
                }
                if let Some((oid, hash)) = schema {
                    c.schemas.insert(oid, hash);
                }
                if let Some(counter) = counter {
                    counter.increment(1);
                }
                if let Some(t) = commit_time {
                    let now = *now.get_or_insert_with(pg_now);
                    self.meters.latency.record((now - t).max(0) as f64 / 1e6);
                }
            }
            Acked::Dropped { pos, tx } => {
                c.pos = Some(pos);
                if tx.is_some() {
                    c.open_tx = tx;
                }
            }
            Acked::Request { pos, targets } => {
                c.pos = Some(pos);
                for t in targets {
                    if c.rereads.iter().any(|r| r.target.oid == t.oid) {
                        continue;
                    }
                    info!(schema = %t.schema, table = %t.table, "snapshot of table requested");
                    c.rereads.push(Reread {
                        target: t,
                        after: Cursor::Start,
                        rows: 0,
                    });
                }
            }
            Acked::Reread { chunk, end } => {
                c.apply_reread(&chunk, end);
            }
            Acked::TxEnd { commit, end } => {
                c.confirmed = c.confirmed.max(end);
                // Transactions end in commit order: a later one ending
                // means the open one is done too (pgoutput sends nothing
                // for a transaction with no published change).
                if c.open_tx.is_some_and(|open| open <= commit) {
                    c.open_tx = None;
                }
                self.meters.transactions.increment(1);
            }
        }
    }

    /// Nothing is in flight and the server is at `wal_end`: the slot may
    /// move there once this is durable (idle slots must not pin WAL).
    pub fn on_idle(&mut self, wal_end: Lsn) {
        if self.inflight.is_empty() && self.acked.open_tx.is_none() {
            self.acked.confirmed = self.acked.confirmed.max(wal_end);
        }
    }

    pub fn acked(&self) -> &Checkpoint {
        &self.acked
    }

    /// The re-read queue's first table cannot be read: it leaves the queue.
    pub fn abandon_reread(&mut self) {
        if !self.acked.rereads.is_empty() {
            self.acked.rereads.remove(0);
        }
    }

    /// Write-ahead for a re-read chunk about to go out (streamed changes
    /// may still be in flight before it): the checkpoint to write,
    /// synchronously, before its batch is published. Its
    /// [`Acked::Reread`] records it once the stream holds it.
    pub fn announce_reread(&mut self, pending: PendingReread) -> Checkpoint {
        self.acked.pending_rereads.push(pending);
        self.acked.clone()
    }

    /// The last re-read chunk of table `oid` that is sent and not yet in
    /// the acknowledged state: the next chunk starts where it ends.
    pub fn reread_in_flight(&self, oid: u32) -> Option<&PendingReread> {
        self.inflight.iter().rev().find_map(|(_, a)| match a {
            Acked::Reread { chunk, .. } if chunk.oid == oid => Some(chunk),
            _ => None,
        })
    }

    /// A checkpoint to write, if the acknowledged state moved on and the
    /// replay is `proven`: an unproven replay confirms nothing.
    pub fn due(&self, min_gap: Duration, proven: bool) -> Option<Checkpoint> {
        (proven && self.acked != self.durable && self.last_write.elapsed() >= min_gap)
            .then(|| self.acked.clone())
    }

    pub fn mark_written(&mut self, c: Checkpoint) {
        self.durable = c;
        self.last_write = Instant::now();
    }

    /// The LSN the slot may be confirmed to.
    pub fn confirmable(&self) -> Lsn {
        self.durable.confirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Target;

    fn meters() -> Meters {
        Meters {
            latency: metrics::Histogram::noop(),
            transactions: metrics::Counter::noop(),
        }
    }

    fn msg(seq: u64, commit: u64, n: u32) -> Acked {
        Acked::Msg {
            seq,
            pos: Some(Position::new(Lsn::from_u64(commit), n)),
            tx: Some(Lsn::from_u64(commit)),
            schema: None,
            counter: None,
            commit_time: None,
            begin_of: None,
        }
    }

    fn end(commit: u64) -> Acked {
        Acked::TxEnd {
            commit: Lsn::from_u64(commit),
            end: Lsn::from_u64(commit + 8),
        }
    }

    #[test]
    fn confirm_moves_only_with_durable_checkpoints() {
        let mut l = Ledger::new(Checkpoint::default(), meters());
        l.push(1, msg(1, 100, 0));
        l.push(0, end(100));
        l.stored(1);
        l.settle();
        assert_eq!(l.confirmable(), Lsn::ZERO, "acked is not durable");
        let c = l.due(Duration::ZERO, true).unwrap();
        assert_eq!(c.confirmed, Lsn::from_u64(108));
        l.mark_written(c);
        assert_eq!(l.confirmable(), Lsn::from_u64(108));
        assert!(l.due(Duration::ZERO, true).is_none());
    }

    #[test]
    fn entries_count_only_once_their_sequence_is_stored_and_in_order() {
        let mut l = Ledger::new(Checkpoint::default(), meters());
        l.push(1, msg(1, 100, 0));
        l.push(2, msg(2, 100, 1));
        l.push(0, end(100));
        l.stored(1);
        l.settle();
        assert_eq!(l.acked().stream_seq, 1);
        assert_eq!(l.acked().confirmed, Lsn::ZERO, "the END waits for seq 2");
        assert_eq!(l.acked().open_tx, Some(Lsn::from_u64(100)));
        l.stored(2);
        l.settle();
        assert_eq!(l.acked().confirmed, Lsn::from_u64(108));
        assert_eq!(l.acked().open_tx, None);
    }

    #[test]
    fn an_unproven_replay_writes_no_checkpoint() {
        let mut l = Ledger::new(Checkpoint::default(), meters());
        l.push(0, msg(1, 100, 0));
        l.push(0, end(100));
        l.settle();
        assert!(l.due(Duration::ZERO, false).is_none());
        assert!(l.due(Duration::ZERO, true).is_some());
    }

    #[test]
    fn idle_confirms_nothing_inside_an_open_transaction() {
        let mut l = Ledger::new(Checkpoint::default(), meters());
        l.push(0, msg(1, 100, 0));
        l.settle();
        l.on_idle(Lsn::from_u64(500));
        assert_eq!(l.acked().confirmed, Lsn::ZERO);
        l.push(0, end(100));
        l.settle();
        l.on_idle(Lsn::from_u64(500));
        assert_eq!(l.acked().confirmed, Lsn::from_u64(500));
    }

    fn request(commit: u64, oids: &[u32]) -> Acked {
        Acked::Request {
            pos: Position::new(Lsn::from_u64(commit), 0),
            targets: oids
                .iter()
                .map(|&oid| Target {
                    oid,
                    schema: "public".to_owned(),
                    table: format!("t{oid}"),
                })
                .collect(),
        }
    }

    #[test]
    fn a_skipped_message_moves_the_position_without_a_sequence() {
        let mut l = Ledger::new(Checkpoint::default(), meters());
        let pos = Position::new(Lsn::from_u64(100), 0);
        l.push(
            0,
            Acked::Dropped {
                pos,
                tx: Some(Lsn::from_u64(100)),
            },
        );
        l.push(0, end(100));
        l.settle();
        assert_eq!(l.acked().pos, Some(pos));
        assert_eq!(l.acked().stream_seq, 0);
        assert_eq!(l.acked().confirmed, Lsn::from_u64(108));
        assert_eq!(l.acked().open_tx, None);
    }

    #[test]
    fn schemas_and_begin_markers_count_once_stored() {
        let mut l = Ledger::new(Checkpoint::default(), meters());
        l.push(
            1,
            Acked::Msg {
                seq: 1,
                pos: None,
                tx: Some(Lsn::from_u64(100)),
                schema: None,
                counter: None,
                commit_time: None,
                begin_of: Some(Lsn::from_u64(100)),
            },
        );
        l.push(
            2,
            Acked::Msg {
                seq: 2,
                pos: None,
                tx: Some(Lsn::from_u64(100)),
                schema: Some((7, 42)),
                counter: None,
                commit_time: None,
                begin_of: None,
            },
        );
        l.settle();
        assert_eq!(l.acked().begun, None, "nothing is stored yet");
        l.stored(2);
        l.settle();
        assert_eq!(l.acked().begun, Some(Lsn::from_u64(100)));
        assert_eq!(l.acked().schemas.get(&7), Some(&42));
        assert_eq!(l.acked().pos, None, "a _schema has no position of its own");
        assert_eq!(l.acked().stream_seq, 2);
    }

    #[test]
    fn a_later_transaction_ending_closes_the_open_one() {
        // pgoutput sends nothing for a transaction without published
        // changes, and transactions end in commit order.
        let mut l = Ledger::new(Checkpoint::default(), meters());
        l.push(0, msg(1, 100, 0));
        l.push(0, end(200));
        l.settle();
        assert_eq!(l.acked().open_tx, None);
        assert_eq!(l.acked().confirmed, Lsn::from_u64(208));
    }

    #[test]
    fn requested_tables_join_the_queue_once_in_stream_order() {
        let mut l = Ledger::new(Checkpoint::default(), meters());
        l.push(1, msg(1, 100, 0));
        l.push(0, request(150, &[5, 6]));
        l.push(0, request(160, &[6, 7]));
        l.settle();
        assert!(
            l.acked().rereads.is_empty(),
            "behind an unacknowledged message"
        );
        l.stored(1);
        l.settle();
        let oids: Vec<u32> = l.acked().rereads.iter().map(|r| r.target.oid).collect();
        assert_eq!(oids, [5, 6, 7]);
        assert_eq!(l.acked().pos, Some(Position::new(Lsn::from_u64(160), 0)));
        l.abandon_reread();
        assert_eq!(l.acked().rereads[0].target.oid, 6);
    }

    /// A chunk of `messages` rows of table 5 after stream sequence 1,
    /// ending at key `end`.
    fn reread_chunk(messages: u64, end: &str) -> PendingReread {
        PendingReread {
            id: format!("w1-2-{end}"),
            after_seq: Some(1),
            oid: 5,
            messages,
            end: Cursor::Key {
                values: vec![end.to_owned()],
            },
            last: false,
            rows: messages,
            schema: None,
            last_pos: None,
        }
    }

    #[test]
    fn a_reread_chunk_is_announced_then_recorded_in_turn_with_changes_in_flight() {
        let mut l = Ledger::new(Checkpoint::default(), meters());
        l.push(0, request(150, &[5]));
        l.settle();
        // A change in flight before the chunk: not waited for.
        l.push(1, msg(1, 180, 0));
        let pending = PendingReread {
            last: true,
            schema: Some((5, 1)),
            last_pos: Some(Position::new(Lsn::from_u64(199), 3)),
            ..reread_chunk(3, "9")
        };
        let c = l.announce_reread(pending.clone());
        assert_eq!(
            c.pending_rereads,
            std::slice::from_ref(&pending),
            "written before the batch"
        );
        assert_eq!(
            c.stream_seq, 0,
            "the acknowledged state, not what is in flight"
        );
        l.mark_written(c);
        l.push(
            4,
            Acked::Reread {
                chunk: pending.clone(),
                end: Some(4),
            },
        );
        l.push(5, msg(5, 300, 0));
        l.stored(1);
        l.settle();
        assert_eq!(
            l.acked().pending_rereads.len(),
            1,
            "its batch is not stored yet"
        );
        // An atomic batch's commit: everything before it is stored too.
        l.stored(4);
        l.settle();
        let a = l.acked();
        assert_eq!((a.stream_seq, a.pos), (4, pending.last_pos));
        assert!(
            a.pending_rereads.is_empty() && a.rereads.is_empty(),
            "the table is done"
        );
        assert_eq!(a.schemas.get(&5), Some(&1));
        assert_eq!(l.inflight(), 1);
    }

    #[test]
    fn a_reread_chunk_of_no_message_moves_only_the_cursor() {
        let mut l = Ledger::new(Checkpoint::default(), meters());
        l.push(0, request(150, &[5]));
        l.push(1, msg(1, 180, 0));
        let chunk = reread_chunk(0, "4");
        l.push(0, Acked::Reread { chunk, end: None });
        l.settle();
        assert_eq!(
            l.acked().rereads[0].after,
            Cursor::Start,
            "behind the change in flight"
        );
        l.stored(1);
        l.settle();
        let a = l.acked();
        assert_eq!(a.stream_seq, 1);
        assert_eq!(
            a.rereads[0].after,
            Cursor::Key {
                values: vec!["4".to_owned()]
            }
        );
    }

    #[test]
    fn acknowledgements_out_of_order_still_settle_in_publish_order() {
        let mut l = Ledger::new(Checkpoint::default(), meters());
        for n in 0..3 {
            l.push(u64::from(n) + 1, msg(u64::from(n) + 1, 100, n));
        }
        l.stored(3);
        l.stored(1);
        l.settle();
        assert_eq!(l.inflight(), 0);
        assert_eq!(l.acked().stream_seq, 3);
        assert_eq!(l.acked().pos, Some(Position::new(Lsn::from_u64(100), 2)));
    }
}
