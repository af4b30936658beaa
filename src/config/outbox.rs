//! `[[outbox]]`: tables (or logical-message prefixes) whose inserts are
//! domain events, published on `<subject_prefix>._outbox.<aggregate_type>`
//! instead of as row changes.
//!
//! Only the settings live here; which columns exist and have which types
//! is checked against the database at start (`source::setup`), and the
//! event is made in `event::outbox`.

use serde::{Deserialize, Serialize};

/// One `[[outbox]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxConfig {
    /// Where its events come from.
    pub source: OutboxSource,
    /// The column whose value is `Cdc-Event-Id` (the application's id).
    pub id: String,
    /// The column that routes: `<subject_prefix>._outbox.<its value>`.
    pub aggregate_type: String,
    /// The column whose value is `Cdc-Aggregate-Id`.
    pub aggregate_id: String,
    /// The column that is the body.
    pub payload: String,
    /// More columns, each a header named after the column.
    pub headers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxSource {
    /// `table = "schema.table"`: inserts into this table.
    Table { schema: String, table: String },
    /// `message_prefix = "p"`: `pg_logical_emit_message` messages whose
    /// prefix is `p.<aggregate_type>`.
    MessagePrefix(String),
}
