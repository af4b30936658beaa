//! What a restart skips, and what it has proven.
//!
//! A session resumes from a checkpoint: changes at or before its position
//! were published by an earlier session, and the stream holds
//! `last_seq - stream_seq` more messages that replaying the slot produces
//! again, in the same order. [`Replay`] pairs each replayed message with the
//! stream's message at the same sequence and compares subject and
//! `Nats-Msg-Id`: a message walnats did not write, or one that differs
//! (another writer, a setting that changed what the replay produces), is a
//! refusal, never a guess. A message that retention or a consumer already
//! deleted cannot be compared; it is counted, as the stream's numbering
//! still proves it was walnats' (the stream has one writer, and every
//! publish names the sequence it must follow).
//!
//! Re-read chunks that landed after changes the replay still has to prove
//! are stepped over ([`Skip`]): the slot does not replay them, and the
//! resume already checked their batch ids.
//!
//! Until the whole range is proven nothing may be confirmed: the ledger asks
//! [`Replay::proven`] before it writes a checkpoint.
//!
//! No I/O here: the session fetches the stored messages and hands them in.

use std::collections::VecDeque;

pub use super::record::Skip;
use crate::error::{Error, Kind, Result};
use crate::lsn::{Lsn, Position};

/// A message as the stream holds it: what the replay is compared with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub subject: String,
    /// `Nats-Msg-Id`, if it has one.
    pub msg_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Replay {
    /// Changes at or before this were published in an earlier session.
    through: Option<Position>,
    /// The transaction whose BEGIN marker is out already.
    begun: Option<Lsn>,
    /// The checkpoint's confirmed LSN: every transaction committing before
    /// it was published whole (it moves only past acknowledged
    /// transactions), whatever the replay numbers its changes now.
    confirmed: Lsn,
    /// The stream sequence the next replayed message pairs with.
    next: u64,
    /// The stream's last sequence when the session started: the range's end.
    last: u64,
    compared: u64,
    deleted: u64,
    /// Stretches ahead to step over, in order.
    skips: VecDeque<Skip>,
    /// Stretches stepped over, not yet taken by the session.
    stepped: Vec<Skip>,
}

impl Replay {
    /// A replay after `through` (and every transaction committing before
    /// `confirmed`), where the stream holds the messages
    /// `stream_seq + 1 ..= last_seq` from an earlier session.
    pub fn new(
        through: Option<Position>,
        begun: Option<Lsn>,
        confirmed: Lsn,
        stream_seq: u64,
        last_seq: u64,
    ) -> Replay {
        Replay {
            through,
            begun,
            confirmed,
            next: stream_seq.saturating_add(1),
            last: last_seq,
            compared: 0,
            deleted: 0,
            skips: VecDeque::new(),
            stepped: Vec::new(),
        }
    }

    /// The same replay, stepping over `skips` (in stream order, each after
    /// at least one message the replay compares).
    pub fn with_skips(mut self, skips: Vec<Skip>) -> Result<Replay> {
        let mut after = self.next;
        for s in &skips {
            if s.first <= after || s.last < s.first || s.last > self.last {
                return Err(Error::new(
                    Kind::Checkpoint,
                    "internal: a re-read chunk to step over lies outside the replayed range",
                ));
            }
            after = s.last;
        }
        self.skips = skips.into();
        Ok(self)
    }

    /// The stretches stepped over since the last call: the session counts
    /// them as stored, in order with the replayed messages.
    pub fn take_stepped(&mut self) -> Vec<Skip> {
        std::mem::take(&mut self.stepped)
    }

    /// Changes at or before this were published before.
    pub fn through(&self) -> Option<Position> {
        self.through
    }

    /// Messages of the range the replay has not produced yet.
    pub fn pending(&self) -> u64 {
        let skipped: u64 = self.skips.iter().map(|s| s.last + 1 - s.first).sum();
        (self.last + 1)
            .saturating_sub(self.next)
            .saturating_sub(skipped)
    }

    /// Every message of the range is matched: from here on what the
    /// session publishes is new, and confirming is safe.
    pub fn proven(&self) -> bool {
        self.next > self.last
    }

    /// The stream sequence the next replayed message is compared with.
    pub fn next_seq(&self) -> Option<u64> {
        (!self.proven()).then_some(self.next)
    }

    /// The range's last sequence.
    pub fn last_seq(&self) -> u64 {
        self.last
    }

    /// How many messages were compared, and how many were gone from the
    /// stream (deleted by retention or a consumer) and only counted.
    pub fn counts(&self) -> (u64, u64) {
        (self.compared, self.deleted)
    }

    /// Whether a change (or the END marker) at `pos` was published before.
    pub fn is_through(&self, pos: Position) -> bool {
        self.through.is_some_and(|p| pos <= p) || pos.commit_lsn < self.confirmed
    }

    /// Whether a BEGIN marker of the transaction committing at `commit` was
    /// published before.
    pub fn is_begun(&self, commit: Lsn) -> bool {
        self.is_through(Position::new(commit, 0)) || self.begun == Some(commit)
    }

    /// The replayed message (`subject`, `msg_id`) takes the range's next
    /// sequence; `stored` is the stream's message at that sequence, `None`
    /// when it is gone. Returns the sequence, or refuses when the stream
    /// holds something else there.
    pub fn check(&mut self, subject: &str, msg_id: &str, stored: Option<&Stored>) -> Result<u64> {
        let seq = self.next;
        if seq > self.last {
            return Err(Error::new(
                Kind::Checkpoint,
                "internal: a replayed message was compared past the end of the replayed range",
            ));
        }
        match stored {
            None => self.deleted += 1,
            Some(s) if s.seq != seq => {
                return Err(Error::new(
                    Kind::Checkpoint,
                    format!(
                        "internal: the replay was handed the stream's message {} to compare with sequence {seq}",
                        s.seq
                    ),
                ));
            }
            Some(s) => match s.msg_id.as_deref() {
                None => return Err(foreign(s, msg_id, subject)),
                Some(id) if id != msg_id || s.subject != subject => {
                    return Err(differs(s, id, msg_id, subject));
                }
                Some(_) => self.compared += 1,
            },
        }
        self.next += 1;
        while let Some(s) = self.skips.front()
            && s.first == self.next
        {
            self.next = s.last + 1;
            self.stepped.extend(self.skips.pop_front());
        }
        Ok(seq)
    }
}

/// The refusal for a message without an id in the replayed range.
fn foreign(s: &Stored, want: &str, subject: &str) -> Error {
    Error::new(
        Kind::Checkpoint,
        format!(
            "the stream's message at sequence {} (subject {:?}) has no Nats-Msg-Id, so it was not published by \
             walnats: another client publishes to walnats' subjects, and walnats would have counted it as its own \
             {want:?} on {subject:?} and skipped that change. Make walnats the only writer of its subjects (NATS \
             permissions, see docs/security.md and docs/guarantees.md, What walnats refuses), then start over with `walnats slot drop --yes`; deleting the \
             message does not help, as walnats could no longer tell it from one of its own",
            s.seq, s.subject
        ),
    )
}

/// The refusal for a message that is not the one the replay produces.
fn differs(s: &Stored, id: &str, want: &str, subject: &str) -> Error {
    Error::new(
        Kind::Checkpoint,
        format!(
            "the stream's message at sequence {} is {id:?} on {:?}, but replaying the slot from the checkpoint \
             gives {want:?} on {subject:?} there: it was not published by walnats from this slot with these \
             settings (another client writes to walnats' subjects, another walnats shares the stream, or a \
             setting that shapes the messages was changed by hand in the checkpoint). Make walnats the stream's \
             only writer, then start over with `walnats slot drop --yes`",
            s.seq, s.subject
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(seq: u64, subject: &str, id: Option<&str>) -> Stored {
        Stored {
            seq,
            subject: subject.to_owned(),
            msg_id: id.map(str::to_owned),
        }
    }

    fn pos(lsn: u64, seq: u32) -> Position {
        Position::new(Lsn::from_u64(lsn), seq)
    }

    #[test]
    fn an_empty_range_is_proven_at_once() {
        let r = Replay::new(Some(pos(100, 3)), None, Lsn::ZERO, 7, 7);
        assert!(r.proven());
        assert_eq!(r.pending(), 0);
        assert!(r.is_through(pos(100, 3)));
        assert!(!r.is_through(pos(100, 4)));
        assert_eq!(r.next_seq(), None);
    }

    #[test]
    fn a_reread_chunk_after_a_compared_message_is_stepped_over() {
        let skip = |first: u64, last: u64| Skip {
            first,
            last,
            chunk: crate::checkpoint::PendingReread {
                id: format!("b{first}"),
                after_seq: Some(first - 1),
                oid: 1,
                messages: last + 1 - first,
                end: crate::checkpoint::Cursor::Start,
                last: false,
                rows: last + 1 - first,
                schema: None,
                last_pos: Some(pos(150, last as u32)),
            },
        };
        let r = Replay::new(None, None, Lsn::ZERO, 5, 12);
        assert!(
            r.clone().with_skips(vec![skip(6, 7)]).is_err(),
            "nothing before it to compare"
        );
        assert!(
            r.clone().with_skips(vec![skip(11, 13)]).is_err(),
            "past the range"
        );
        let mut r = r.with_skips(vec![skip(8, 10)]).unwrap();
        assert_eq!(r.pending(), 4);
        for seq in [6, 7] {
            let s = stored(seq, "p.s.t.insert", Some("id"));
            assert_eq!(r.check("p.s.t.insert", "id", Some(&s)).unwrap(), seq);
        }
        assert_eq!(r.take_stepped(), [skip(8, 10)]);
        assert_eq!(r.take_stepped(), []);
        assert_eq!((r.next_seq(), r.pending()), (Some(11), 2));
        for seq in [11, 12] {
            let s = stored(seq, "p.s.t.insert", Some("id"));
            assert_eq!(r.check("p.s.t.insert", "id", Some(&s)).unwrap(), seq);
        }
        assert!(r.proven());
        // A chunk at the range's very end: proven once the message before it is.
        let mut r = Replay::new(None, None, Lsn::ZERO, 5, 9)
            .with_skips(vec![skip(7, 9)])
            .unwrap();
        let s = stored(6, "p.s.t.insert", Some("id"));
        r.check("p.s.t.insert", "id", Some(&s)).unwrap();
        assert!(r.proven());
        assert_eq!(r.take_stepped(), [skip(7, 9)]);
    }

    #[test]
    fn every_message_of_the_range_is_compared_in_order() {
        let mut r = Replay::new(Some(pos(100, 0)), None, Lsn::ZERO, 10, 12);
        assert!(!r.is_through(pos(100, 1)));
        assert_eq!(r.next_seq(), Some(11));
        let a = stored(11, "p.s.t.insert", Some("db:s:0/64:1"));
        assert_eq!(
            r.check("p.s.t.insert", "db:s:0/64:1", Some(&a)).ok(),
            Some(11)
        );
        assert!(!r.proven());
        let b = stored(12, "p.s.t.insert", Some("db:s:0/64:2"));
        assert_eq!(
            r.check("p.s.t.insert", "db:s:0/64:2", Some(&b)).ok(),
            Some(12)
        );
        assert!(r.proven());
        assert_eq!(r.counts(), (2, 0));
        assert_eq!(r.next_seq(), None);
    }

    #[test]
    fn a_message_without_an_id_is_refused_not_counted() {
        let mut r = Replay::new(None, None, Lsn::ZERO, 0, 1);
        let other = stored(1, "p.ops.note", None);
        let e = r
            .check("p.s.t.insert", "db:s:0/64:0", Some(&other))
            .unwrap_err();
        assert_eq!(e.kind(), Kind::Checkpoint);
        assert!(e.to_string().contains("not published by walnats"), "{e}");
        assert!(!r.proven(), "a refused message proves nothing");
    }

    #[test]
    fn another_id_or_subject_at_the_same_sequence_is_refused() {
        let mut r = Replay::new(None, None, Lsn::ZERO, 0, 1);
        let s = stored(1, "p.s.t.insert", Some("db:s:0/64:1"));
        let e = r
            .check("p.s.t.insert", "db:s:0/64:0", Some(&s))
            .unwrap_err();
        assert!(e.to_string().contains("not published by walnats"), "{e}");
        // Renumbered: same id, another table (a publication switched).
        let mut r = Replay::new(None, None, Lsn::ZERO, 0, 1);
        let s = stored(1, "p.s.u.insert", Some("db:s:0/64:0"));
        assert!(r.check("p.s.t.insert", "db:s:0/64:0", Some(&s)).is_err());
    }

    #[test]
    fn a_message_gone_from_the_stream_is_counted_not_compared() {
        let mut r = Replay::new(None, None, Lsn::ZERO, 4, 6);
        assert_eq!(r.check("x", "a", None).ok(), Some(5));
        let s = stored(6, "x", Some("b"));
        assert_eq!(r.check("x", "b", Some(&s)).ok(), Some(6));
        assert_eq!(r.counts(), (1, 1));
        assert!(r.proven());
    }

    #[test]
    fn a_stored_message_of_another_sequence_is_an_internal_error() {
        let mut r = Replay::new(None, None, Lsn::ZERO, 4, 6);
        let s = stored(6, "x", Some("a"));
        assert!(r.check("x", "a", Some(&s)).is_err());
    }

    #[test]
    fn a_transaction_before_the_confirmed_lsn_is_out_whatever_its_numbering() {
        // Through (100, 2), confirmed at 150: a transaction committing at
        // 120 is out whole even if the replay numbers it past 2 now.
        let r = Replay::new(Some(pos(100, 2)), None, Lsn::from_u64(150), 0, 0);
        assert!(r.is_through(pos(120, 7)));
        assert!(r.is_through(pos(100, 9)));
        assert!(r.is_begun(Lsn::from_u64(120)));
        assert!(!r.is_through(pos(150, 0)));
    }

    #[test]
    fn begin_markers_out_already_are_known() {
        let r = Replay::new(Some(pos(100, 2)), Some(Lsn::from_u64(200)), Lsn::ZERO, 0, 0);
        assert!(r.is_begun(Lsn::from_u64(100)), "a change of it is out");
        assert!(r.is_begun(Lsn::from_u64(200)), "the checkpoint says so");
        assert!(!r.is_begun(Lsn::from_u64(300)));
    }
}
