//! What walnats tells the walsender, and what it knows of the server's
//! WAL: the furthest position received, the server's WAL end (keepalives
//! and walnats' own heartbeats), when the next standby status update is
//! due, and whether the stream has gone quiet.
//!
//! The flush position it reports is never its own idea: it is the
//! checkpoint's durable `confirmed` LSN, handed in by the session. No I/O.

use std::time::{Duration, Instant};

use crate::lsn::Lsn;

/// One standby status update: written up to `write`, flushed (and
/// applied) up to `flush`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub write: Lsn,
    pub flush: Lsn,
    /// Bytes of WAL between the server's end and `flush`.
    pub lag: u64,
}

pub struct Feedback {
    /// The end of the last XLogData (or skipped message) received.
    received: Lsn,
    /// The server's WAL end, as far as walnats knows.
    server_end: Lsn,
    due: bool,
    last_data: Instant,
}

impl Default for Feedback {
    fn default() -> Feedback {
        Feedback {
            received: Lsn::ZERO,
            server_end: Lsn::ZERO,
            due: false,
            last_data: Instant::now(),
        }
    }
}

impl Feedback {
    /// A keepalive: the server's WAL reaches `wal_end`.
    pub fn on_keepalive(&mut self, wal_end: Lsn) {
        self.server_end = self.server_end.max(wal_end);
    }

    /// Data up to `wal_end` arrived (decoded or skipped unread).
    pub fn on_data(&mut self, wal_end: Lsn) {
        self.received = self.received.max(wal_end);
        self.last_data = Instant::now();
    }

    /// A position the server's WAL reached that walnats never publishes
    /// (its own non-transactional heartbeat): like a keepalive.
    pub fn on_passed(&mut self, lsn: Lsn) {
        self.server_end = self.server_end.max(lsn);
    }

    pub fn server_end(&self) -> Lsn {
        self.server_end
    }

    pub fn received(&self) -> Lsn {
        self.received
    }

    /// A status update should go out at the next opportunity.
    pub fn set_due(&mut self) {
        self.due = true;
    }

    /// Whether one is due; clears it.
    pub fn take_due(&mut self) -> bool {
        std::mem::take(&mut self.due)
    }

    /// The update to send when the slot may be confirmed up to `confirmable`.
    pub fn status(&self, confirmable: Lsn) -> Status {
        let write = self.received.max(confirmable);
        Status {
            write,
            flush: confirmable,
            lag: self.server_end.max(write).bytes_since(confirmable),
        }
    }

    /// Nothing arrived for `quiet`, and the keepalives say the server has
    /// nothing more than what arrived: the stream has caught up.
    pub fn caught_up_for(&self, quiet: Duration) -> bool {
        self.last_data.elapsed() >= quiet && self.server_end >= self.received
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(n: u64) -> Lsn {
        Lsn::from_u64(n)
    }

    #[test]
    fn flush_is_what_is_confirmable_and_write_never_behind_it() {
        let mut f = Feedback::default();
        f.on_data(lsn(500));
        f.on_keepalive(lsn(800));
        assert_eq!(
            f.status(lsn(300)),
            Status {
                write: lsn(500),
                flush: lsn(300),
                lag: 500
            }
        );
        // Confirmed past what this session received (a checkpoint from
        // before it): write follows flush.
        let s = Feedback::default().status(lsn(300));
        assert_eq!((s.write, s.flush, s.lag), (lsn(300), lsn(300), 0));
    }

    #[test]
    fn positions_only_move_forward() {
        let mut f = Feedback::default();
        f.on_keepalive(lsn(800));
        f.on_keepalive(lsn(700));
        f.on_passed(lsn(600));
        assert_eq!(f.server_end(), lsn(800));
        f.on_data(lsn(900));
        f.on_data(lsn(850));
        assert_eq!(f.received(), lsn(900));
    }

    #[test]
    fn due_is_taken_once() {
        let mut f = Feedback::default();
        assert!(!f.take_due());
        f.set_due();
        assert!(f.take_due());
        assert!(!f.take_due());
    }

    #[test]
    fn caught_up_needs_quiet_and_the_server_no_further_than_received() {
        let mut f = Feedback::default();
        f.on_data(lsn(900));
        assert!(!f.caught_up_for(Duration::from_secs(3600)), "not quiet");
        assert!(
            !f.caught_up_for(Duration::ZERO),
            "keepalive behind what arrived"
        );
        f.on_keepalive(lsn(900));
        assert!(f.caught_up_for(Duration::ZERO));
    }
}
