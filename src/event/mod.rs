//! The change event that every stage shares, and the relation cache.
//!
//! Owns what a decoded change *means*: which table (resolved column names,
//! value kinds, key columns, subject tokens), which op, which position.
//! It never touches a socket and never formats a message body: the source
//! feeds it pgoutput messages, the encoder turns its events into bytes.

pub mod outbox;
pub mod relation;
#[cfg(test)]
pub mod testing;
pub mod transaction;

use bytes::Bytes;
use std::sync::Arc;

use crate::lsn::{Lsn, Position};
use crate::pgoutput::{OldTuple, TupleData, Xid};

pub use relation::{ColumnInfo, RelationCache, RelationInfo, TypeResolver};

/// The op of a change, as it appears in subjects and `Cdc-Op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
    Read,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
            Op::Read => "read",
        }
    }
}

/// The transaction a change belongs to. The commit LSN is known from the
/// Begin message, before any change arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxInfo {
    pub xid: Xid,
    pub commit_lsn: Lsn,
    /// Microseconds since 2000-01-01 00:00:00 UTC, as PostgreSQL sends it.
    pub commit_time: i64,
}

#[derive(Debug, Clone)]
pub enum Body {
    /// insert, update, delete or read.
    Row {
        op: Op,
        rel: Arc<RelationInfo>,
        old: Option<OldTuple>,
        new: Option<TupleData>,
    },
    Truncate {
        rel: Arc<RelationInfo>,
        cascade: bool,
        restart_identity: bool,
    },
    /// `pg_logical_emit_message` content.
    Message {
        transactional: bool,
        prefix: String,
        content: Bytes,
    },
    /// A table's column set, published before its first change and when
    /// it changes.
    Schema { rel: Arc<RelationInfo> },
    /// `[[outbox]]`: a domain event (an outbox table's insert, or a message
    /// under an outbox prefix).
    Outbox(outbox::OutboxEvent),
    /// `[output] tx_markers`: a transaction starts.
    TxBegin,
    /// `[output] tx_markers`: a transaction ended, with its change count
    /// per table (`schema.table`, or `_message`), in first-seen order.
    TxEnd { counts: Vec<(String, u64)> },
}

/// One message-to-be. `pos` orders it in the stream; a `Schema` event
/// shares the position of the change it precedes.
#[derive(Debug, Clone)]
pub struct Event {
    pub pos: Position,
    /// The LSN of this change's WAL record.
    pub lsn: Lsn,
    /// `None` for a non-transactional message.
    pub tx: Option<TxInfo>,
    pub snapshot: bool,
    pub body: Body,
}

impl Event {
    pub fn op_name(&self) -> &'static str {
        match &self.body {
            Body::Row { op, .. } => op.as_str(),
            Body::Truncate { .. } => "truncate",
            Body::Message { .. } => "message",
            Body::Outbox(_) => "outbox",
            Body::Schema { .. } => "schema",
            Body::TxBegin => "begin",
            Body::TxEnd { .. } => "end",
        }
    }

    /// Whether this event counts as a change of its transaction (and so has
    /// its own `Cdc-Seq`); schema events ride along with the next change,
    /// transaction markers frame them.
    pub fn is_change(&self) -> bool {
        !matches!(
            self.body,
            Body::Schema { .. } | Body::TxBegin | Body::TxEnd { .. }
        )
    }
}
