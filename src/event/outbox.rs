//! The transactional outbox: an insert into an `[[outbox]]` table (or a
//! logical message under an outbox `message_prefix`) is a domain event,
//! routed by its aggregate type, instead of a row change.
//!
//! Here: which entry a table or message prefix belongs to, the outbox
//! columns resolved against a relation, and the event taken from a row.
//! What its message looks like is `encode`'s; which changes of an outbox
//! table are events at all (inserts only) is the session's. No I/O.

use bytes::Bytes;
use tracing::warn;

use super::{ColumnInfo, RelationInfo};
use crate::config::{OutboxConfig, OutboxSource};
use crate::error::{Error, Kind, Result};
use crate::lsn::Position;
use crate::pgoutput::{TupleData, TupleValue};
use crate::value::{ValueKind, bytea_bytes};

pub const JSON: &str = "application/json";
pub const TEXT: &str = "text/plain; charset=utf-8";
pub const BYTES: &str = "application/octet-stream";

/// One domain event, ready to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// The subject's last token (escaped when encoded).
    pub aggregate_type: String,
    /// `Cdc-Event-Id`: the application's id (absent when NULL or for a
    /// message).
    pub event_id: Option<String>,
    /// `Cdc-Aggregate-Id`.
    pub aggregate_id: Option<String>,
    pub payload: Bytes,
    pub content_type: &'static str,
    /// The listed columns: (column name, value); NULLs left out.
    pub headers: Vec<(String, String)>,
    /// The outbox table's OID, 0 for a message (for metrics).
    pub table_oid: u32,
}

/// The `[[outbox]]` entry of table `schema.table`, if it is one.
pub fn table_entry<'a>(
    outboxes: &'a [OutboxConfig],
    schema: &str,
    table: &str,
) -> Option<&'a OutboxConfig> {
    outboxes.iter().find(|o| {
        matches!(&o.source, OutboxSource::Table { schema: s, table: t } if s == schema && t == table)
    })
}

/// The aggregate type of a logical message whose prefix is
/// `<message_prefix>.<aggregate_type>` for an entry's `message_prefix`.
pub fn message_aggregate<'a>(outboxes: &[OutboxConfig], prefix: &'a str) -> Option<&'a str> {
    outboxes.iter().find_map(|o| match &o.source {
        OutboxSource::MessagePrefix(p) => prefix
            .strip_prefix(p.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .filter(|t| !t.is_empty()),
        OutboxSource::Table { .. } => None,
    })
}

/// A message-prefix outbox event: the content is the body.
pub fn message_event(aggregate_type: &str, content: Bytes) -> OutboxEvent {
    OutboxEvent {
        aggregate_type: aggregate_type.to_owned(),
        event_id: None,
        aggregate_id: None,
        payload: content,
        content_type: BYTES,
        headers: Vec::new(),
        table_oid: 0,
    }
}

/// The longest aggregate type, in bytes: a subject token (up to three
/// times longer escaped) must stay far inside NATS's 4 KiB control line.
pub const MAX_AGGREGATE_TYPE: usize = 128;

/// An outbox table's columns, by their place in the relation; `None`: the
/// relation has no such column (the table was altered, or a replay meets
/// rows written before a column was added).
#[derive(Debug)]
pub struct OutboxTable {
    id: Option<usize>,
    aggregate_type: Option<usize>,
    aggregate_id: Option<usize>,
    payload: Option<usize>,
    headers: Vec<(String, Option<usize>)>,
    /// The configured names of aggregate_type and payload, for the error.
    names: (String, String),
}

impl OutboxTable {
    /// Finds `cfg`'s columns among `columns`. A missing one is not an
    /// error here: the relation may describe rows written before the
    /// column existed, which a replay drops unread. A missing id,
    /// aggregate id or header column leaves its header out (warned about);
    /// a missing aggregate type or payload stops at the first row that
    /// needs it ([`OutboxTable::event`]). The start-up check refuses a
    /// table without them.
    pub fn resolve(
        cfg: &OutboxConfig,
        schema: &str,
        table: &str,
        columns: &[ColumnInfo],
    ) -> OutboxTable {
        let find = |key: &str, name: &str| {
            let i = columns.iter().position(|c| c.name == name);
            if i.is_none() {
                warn!(%schema, %table, column = %name, key,
                    "an outbox table lacks a configured column (altered while walnats runs, or rows from before \
                     it was added): its header is left out of their events");
            }
            i
        };
        OutboxTable {
            id: find("id", &cfg.id),
            aggregate_type: find("aggregate_type", &cfg.aggregate_type),
            aggregate_id: find("aggregate_id", &cfg.aggregate_id),
            payload: find("payload", &cfg.payload),
            headers: cfg
                .headers
                .iter()
                .map(|h| (h.clone(), find("headers", h)))
                .collect(),
            names: (cfg.aggregate_type.clone(), cfg.payload.clone()),
        }
    }

    /// The event an inserted row `new` of `rel` carries, at `pos` (named in
    /// the error when its aggregate type is missing).
    pub fn event(&self, rel: &RelationInfo, new: &TupleData, pos: Position) -> Result<OutboxEvent> {
        let stop = |what: String, fix: &str| {
            Error::new(
                Kind::Decode,
                format!(
                    "the outbox row of {}.{} at position {}:{} {what}: {fix}; nothing was confirmed past it",
                    rel.schema, rel.table, pos.commit_lsn, pos.seq
                ),
            )
        };
        let (agg_col, payload_col) = (&self.names.0, &self.names.1);
        let (Some(agg), Some(payload)) = (self.aggregate_type, self.payload) else {
            return Err(stop(
                format!(
                    "has no column {agg_col:?} or {payload:?}",
                    payload = payload_col
                ),
                "the table lost its aggregate type or payload column; add it back, or name the right one in \
                 [[outbox]]",
            ));
        };
        let aggregate_type = text(new, Some(agg)).filter(|t| !t.is_empty()).ok_or_else(|| {
            stop(
                format!("has no aggregate type (column {agg_col:?} is NULL or empty), so it has no subject"),
                "make the column NOT NULL with a non-empty CHECK",
            )
        })?;
        if aggregate_type.len() > MAX_AGGREGATE_TYPE {
            return Err(stop(
                format!(
                    "has an aggregate type of {} bytes, over {MAX_AGGREGATE_TYPE}",
                    aggregate_type.len()
                ),
                "keep aggregate types short (they are subject tokens); add a CHECK on the column's length",
            ));
        }
        let kind = rel.columns.get(payload).map(|c| &c.kind);
        let (payload, content_type) = match (new.get(payload), kind) {
            (Some(TupleValue::Text(b)), Some(ValueKind::Bytea)) => {
                (Bytes::from(bytea_bytes(b)?), BYTES)
            }
            (Some(TupleValue::Text(b)), Some(ValueKind::Json)) => (Bytes::copy_from_slice(b), JSON),
            (Some(TupleValue::Text(b)), _) => (Bytes::copy_from_slice(b), TEXT),
            (_, Some(ValueKind::Bytea)) => (Bytes::new(), BYTES),
            (_, Some(ValueKind::Json)) => (Bytes::new(), JSON),
            (_, _) => (Bytes::new(), TEXT),
        };
        Ok(OutboxEvent {
            aggregate_type,
            event_id: text(new, self.id),
            aggregate_id: text(new, self.aggregate_id),
            payload,
            content_type,
            headers: self
                .headers
                .iter()
                .filter_map(|(name, i)| text(new, *i).map(|v| (name.clone(), v)))
                .collect(),
            table_oid: rel.oid.0,
        })
    }
}

/// A column's value as text (`None`: no such column, NULL, or not sent).
fn text(t: &TupleData, i: Option<usize>) -> Option<String> {
    match t.get(i?)? {
        TupleValue::Text(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::testing::{column, relation};
    use crate::lsn::Lsn;
    use crate::pgoutput::ReplicaIdentity;

    fn entry(source: OutboxSource) -> OutboxConfig {
        OutboxConfig {
            source,
            id: "id".to_owned(),
            aggregate_type: "aggregatetype".to_owned(),
            aggregate_id: "aggregateid".to_owned(),
            payload: "payload".to_owned(),
            headers: vec!["type".to_owned()],
        }
    }

    fn table() -> OutboxConfig {
        entry(OutboxSource::Table {
            schema: "public".to_owned(),
            table: "outbox".to_owned(),
        })
    }

    fn outbox_rel(payload: ValueKind) -> std::sync::Arc<RelationInfo> {
        relation(
            20_000,
            "public",
            "outbox",
            ReplicaIdentity::Default,
            vec![
                column("id", ValueKind::Text, true),
                column("aggregatetype", ValueKind::Text, false),
                column("aggregateid", ValueKind::Text, false),
                column("type", ValueKind::Text, false),
                column("payload", payload, false),
            ],
        )
    }

    fn row(values: [Option<&str>; 5]) -> TupleData {
        TupleData::from_values(
            values.map(|v| v.map_or(TupleValue::Null, |s| TupleValue::Text(s.as_bytes()))),
        )
    }

    fn pos() -> Position {
        Position::new(Lsn::from_u64(0x100), 2)
    }

    #[test]
    fn entries_are_found_by_table_and_by_message_prefix() {
        let all = [
            table(),
            entry(OutboxSource::MessagePrefix("outbox".to_owned())),
        ];
        assert!(table_entry(&all, "public", "outbox").is_some());
        assert!(table_entry(&all, "public", "orders").is_none());
        assert!(table_entry(&all, "other", "outbox").is_none());
        assert_eq!(message_aggregate(&all, "outbox.order"), Some("order"));
        assert_eq!(message_aggregate(&all, "outbox.order.v2"), Some("order.v2"));
        assert_eq!(message_aggregate(&all, "outbox"), None, "no aggregate type");
        assert_eq!(message_aggregate(&all, "outbox."), None);
        assert_eq!(message_aggregate(&all, "outboxes.order"), None);
    }

    #[test]
    fn an_inserted_row_is_an_event_with_its_columns_as_headers() {
        let rel = outbox_rel(ValueKind::Json);
        let t = OutboxTable::resolve(&table(), "public", "outbox", &rel.columns);
        let ev = t
            .event(
                &rel,
                &row([
                    Some("e-1"),
                    Some("order"),
                    Some("42"),
                    Some("OrderCreated"),
                    Some(r#"{"n":1}"#),
                ]),
                pos(),
            )
            .unwrap();
        assert_eq!(ev.aggregate_type, "order");
        assert_eq!(ev.event_id.as_deref(), Some("e-1"));
        assert_eq!(ev.aggregate_id.as_deref(), Some("42"));
        assert_eq!(ev.payload.as_ref(), br#"{"n":1}"#);
        assert_eq!(ev.content_type, JSON);
        assert_eq!(
            ev.headers,
            vec![("type".to_owned(), "OrderCreated".to_owned())]
        );
        assert_eq!(ev.table_oid, 20_000);
    }

    #[test]
    fn the_payload_is_json_text_or_bytes_by_its_type_and_null_is_empty() {
        let cases = [
            (ValueKind::Text, Some("hello"), b"hello".to_vec(), TEXT),
            (ValueKind::Bytea, Some("\\x00ff10"), vec![0, 255, 16], BYTES),
            (ValueKind::Json, None, Vec::new(), JSON),
            (ValueKind::Bytea, None, Vec::new(), BYTES),
        ];
        for (kind, payload, body, content_type) in cases {
            let rel = outbox_rel(kind);
            let t = OutboxTable::resolve(&table(), "public", "outbox", &rel.columns);
            let ev = t
                .event(&rel, &row([None, Some("a"), None, None, payload]), pos())
                .unwrap();
            assert_eq!((ev.payload.to_vec(), ev.content_type), (body, content_type));
            assert_eq!(
                (ev.event_id, ev.aggregate_id),
                (None, None),
                "NULLs are left out"
            );
            assert!(ev.headers.is_empty());
        }
    }

    #[test]
    fn no_aggregate_type_is_a_stop_naming_the_place_and_the_fix() {
        let rel = outbox_rel(ValueKind::Json);
        let t = OutboxTable::resolve(&table(), "public", "outbox", &rel.columns);
        for agg in [None, Some("")] {
            let e = t
                .event(&rel, &row([Some("e"), agg, None, None, None]), pos())
                .unwrap_err();
            let s = e.to_string();
            assert!(
                s.contains("public.outbox") && s.contains("0/100:2") && s.contains("NOT NULL"),
                "{s}"
            );
        }
    }

    #[test]
    fn a_missing_column_stops_only_the_rows_that_need_it() {
        let rel = outbox_rel(ValueKind::Json);
        let r = row([Some("e"), Some("order"), Some("42"), Some("t"), Some("{}")]);
        // Headers: left out.
        let mut cfg = table();
        cfg.headers = vec!["traceparent".to_owned()];
        cfg.id = "event_id".to_owned();
        let ev = OutboxTable::resolve(&cfg, "public", "outbox", &rel.columns)
            .event(&rel, &r, pos())
            .unwrap();
        assert_eq!((ev.event_id, ev.headers.len()), (None, 0));
        assert_eq!(ev.aggregate_id.as_deref(), Some("42"));
        // The payload: a stop naming the row and the column.
        let mut cfg = table();
        cfg.payload = "body".to_owned();
        let e = OutboxTable::resolve(&cfg, "public", "outbox", &rel.columns)
            .event(&rel, &r, pos())
            .unwrap_err();
        assert!(
            e.to_string().contains("\"body\"") && e.to_string().contains("0/100:2"),
            "{e}"
        );
    }

    #[test]
    fn an_over_long_aggregate_type_is_a_stop() {
        let rel = outbox_rel(ValueKind::Json);
        let t = OutboxTable::resolve(&table(), "public", "outbox", &rel.columns);
        let long = "a".repeat(MAX_AGGREGATE_TYPE + 1);
        let e = t
            .event(&rel, &row([None, Some(&long), None, None, None]), pos())
            .unwrap_err();
        assert!(e.to_string().contains("over 128"), "{e}");
        let fits = "a".repeat(MAX_AGGREGATE_TYPE);
        assert!(
            t.event(&rel, &row([None, Some(&fits), None, None, None]), pos())
                .is_ok()
        );
    }
}
