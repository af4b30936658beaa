//! Assembling one transaction from pgoutput's Begin … Commit: the position
//! of each change (the commit LSN and the `Cdc-Seq` counted from 0), the
//! checks that Begin and Commit pair up, and the `_tx` markers with the
//! END marker's per-table counts.
//!
//! It decides positions only: whether a change is published, replayed or
//! dropped is the session's business. No I/O.

use std::sync::Arc;

use crate::error::{Error, Kind, Result};
use crate::event::{Body, Event, RelationInfo, TxInfo};
use crate::lsn::{Lsn, Position};
use crate::pgoutput::{Begin, Commit};

/// The transaction between a Begin and its Commit.
struct Open {
    info: TxInfo,
    next_seq: u32,
    /// Changes per table, for the END marker (only with markers).
    counts: Vec<(String, u64)>,
}

/// What a Commit closed.
#[derive(Debug)]
pub struct Committed {
    pub info: TxInfo,
    /// The end LSN of the commit record: the slot may be confirmed here
    /// once every message of the transaction is in the stream.
    pub end: Lsn,
    /// The END marker, when markers are on: after every change of the
    /// transaction (seq `u32::MAX`), so once it is acknowledged all of the
    /// transaction is in the stream.
    pub marker: Option<Event>,
}

/// Positions for the changes of the transaction in progress.
pub struct Assembler {
    open: Option<Open>,
    /// Whether `_tx` markers go out (and so whether tables are counted).
    markers: bool,
}

impl Assembler {
    pub fn new(markers: bool) -> Assembler {
        Assembler {
            open: None,
            markers,
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// A transaction begins; returns its BEGIN marker when markers are on.
    /// `lsn` is the Begin message's WAL position.
    pub fn begin(&mut self, b: &Begin, lsn: Lsn) -> Result<Option<Event>> {
        if self.open.is_some() {
            return Err(Error::new(
                Kind::Protocol,
                "pgoutput sent Begin inside a transaction",
            ));
        }
        let info = TxInfo {
            xid: b.xid,
            commit_lsn: b.final_lsn,
            commit_time: b.commit_time,
        };
        self.open = Some(Open {
            info,
            next_seq: 0,
            counts: Vec::new(),
        });
        Ok(self.markers.then(|| Event {
            pos: Position::new(info.commit_lsn, 0),
            lsn,
            tx: Some(info),
            snapshot: false,
            body: Body::TxBegin,
        }))
    }

    /// The position of the transaction's next change: `what` names it in
    /// the error when no transaction is open; `table` is counted for the
    /// END marker (`None`: a logical message).
    pub fn next(
        &mut self,
        what: &str,
        table: Option<&Arc<RelationInfo>>,
    ) -> Result<(Position, TxInfo)> {
        let markers = self.markers;
        let tx = self.open.as_mut().ok_or_else(|| {
            Error::new(
                Kind::Protocol,
                format!("pgoutput sent {what} outside a transaction"),
            )
        })?;
        if markers {
            let name = table.map_or_else(
                || "_message".to_owned(),
                |r| format!("{}.{}", r.schema, r.table),
            );
            match tx.counts.iter_mut().find(|(t, _)| *t == name) {
                Some((_, n)) => *n += 1,
                None => tx.counts.push((name, 1)),
            }
        }
        let pos = Position::new(tx.info.commit_lsn, tx.next_seq);
        // u32::MAX is the END marker's position.
        tx.next_seq = tx
            .next_seq
            .checked_add(1)
            .filter(|n| *n < u32::MAX)
            .ok_or_else(|| {
                Error::new(
                    Kind::Protocol,
                    "a transaction with more than 4 billion changes",
                )
            })?;
        Ok((pos, tx.info))
    }

    /// The transaction commits: it must be the one that began.
    pub fn commit(&mut self, c: &Commit, lsn: Lsn) -> Result<Committed> {
        let tx = self.open.take().ok_or_else(|| {
            Error::new(Kind::Protocol, "pgoutput sent Commit outside a transaction")
        })?;
        if tx.info.commit_lsn != c.commit_lsn {
            return Err(Error::new(
                Kind::Protocol,
                format!(
                    "pgoutput's Commit at {} does not match its Begin's {}",
                    c.commit_lsn, tx.info.commit_lsn
                ),
            ));
        }
        let marker = self.markers.then(|| Event {
            pos: Position::new(tx.info.commit_lsn, u32::MAX),
            lsn,
            tx: Some(tx.info),
            snapshot: false,
            body: Body::TxEnd { counts: tx.counts },
        });
        Ok(Committed {
            info: tx.info,
            end: c.end_lsn,
            marker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::testing::test_relation;
    use crate::pgoutput::Xid;

    fn begin(commit: u64) -> Begin {
        Begin {
            final_lsn: Lsn::from_u64(commit),
            commit_time: 7,
            xid: Xid(42),
        }
    }

    fn commit(commit: u64) -> Commit {
        Commit {
            flags: 0,
            commit_lsn: Lsn::from_u64(commit),
            end_lsn: Lsn::from_u64(commit + 8),
            commit_time: 7,
        }
    }

    #[test]
    fn changes_are_numbered_from_zero_at_the_commit_lsn() {
        let mut a = Assembler::new(false);
        assert!(a.begin(&begin(100), Lsn::from_u64(50)).unwrap().is_none());
        let rel = test_relation("public", "t");
        for n in 0..3 {
            let (pos, tx) = a.next("an insert", Some(&rel)).unwrap();
            assert_eq!(pos, Position::new(Lsn::from_u64(100), n));
            assert_eq!(tx.xid, Xid(42));
        }
        let done = a.commit(&commit(100), Lsn::from_u64(99)).unwrap();
        assert_eq!(done.end, Lsn::from_u64(108));
        assert!(done.marker.is_none());
        assert!(!a.is_open());
        // The next transaction counts from 0 again.
        a.begin(&begin(200), Lsn::from_u64(150)).unwrap();
        let (pos, _) = a.next("a message", None).unwrap();
        assert_eq!(pos, Position::new(Lsn::from_u64(200), 0));
    }

    #[test]
    fn markers_frame_the_transaction_and_count_per_table() {
        let mut a = Assembler::new(true);
        let b = a.begin(&begin(100), Lsn::from_u64(50)).unwrap().unwrap();
        assert_eq!(b.pos, Position::new(Lsn::from_u64(100), 0));
        assert!(matches!(b.body, Body::TxBegin));
        let (t, u) = (test_relation("public", "t"), test_relation("s", "u"));
        a.next("an insert", Some(&t)).unwrap();
        a.next("an insert", Some(&u)).unwrap();
        a.next("an update", Some(&t)).unwrap();
        a.next("a message", None).unwrap();
        let done = a.commit(&commit(100), Lsn::from_u64(99)).unwrap();
        let end = done.marker.unwrap();
        assert_eq!(end.pos, Position::new(Lsn::from_u64(100), u32::MAX));
        let Body::TxEnd { counts } = end.body else {
            panic!("not an END marker: {:?}", end.body);
        };
        assert_eq!(
            counts,
            vec![
                ("public.t".to_owned(), 2),
                ("s.u".to_owned(), 1),
                ("_message".to_owned(), 1)
            ]
        );
    }

    #[test]
    fn begin_and_commit_must_pair_up() {
        let mut a = Assembler::new(false);
        let e = a.next("an insert", None).unwrap_err();
        assert!(
            e.to_string().contains("an insert outside a transaction"),
            "{e}"
        );
        assert!(a.commit(&commit(100), Lsn::ZERO).is_err());
        a.begin(&begin(100), Lsn::ZERO).unwrap();
        assert!(
            a.begin(&begin(200), Lsn::ZERO).is_err(),
            "Begin inside a transaction"
        );
        let e = a.commit(&commit(300), Lsn::ZERO).unwrap_err();
        assert!(e.to_string().contains("does not match its Begin"), "{e}");
        assert_eq!(e.kind(), Kind::Protocol);
    }

    #[test]
    fn the_end_markers_seq_is_never_a_changes() {
        let mut a = Assembler::new(true);
        a.begin(&begin(100), Lsn::ZERO).unwrap();
        a.open.as_mut().unwrap().next_seq = u32::MAX - 2;
        let (pos, _) = a.next("an insert", None).unwrap();
        assert_eq!(pos.seq, u32::MAX - 2);
        let e = a.next("an insert", None).unwrap_err();
        assert!(e.to_string().contains("4 billion"), "{e}");
    }
}
