//! The `format = "debezium"` body: the value of a Debezium PostgreSQL
//! connector change event as Kafka Connect's JSON converter writes it with
//! `schemas.enable=false` (the payload object alone), so that consumers
//! written for Debezium read walnats' messages unchanged.
//!
//! Owns the envelope only (`before`, `after`, `source`, `op`, `ts_ms`,
//! `ts_us`, `ts_ns`, `transaction`); column values go through
//! `value::write_text_value`, so they follow the type table in docs/messages.md
//! exactly as in `json.rs`. Subjects and headers are the encoder's and do
//! not change with the format. Like every encoder it must never do I/O or
//! put a value into an error.
//!
//! Where walnats differs from Debezium, on purpose (docs/messages.md lists these):
//! - `source.sequence` is `["<commit LSN>","<LSN>"]` (decimal strings):
//!   Debezium puts the previous transaction's commit LSN first, which a
//!   replay from a checkpoint could not reproduce; this transaction's own
//!   commit LSN orders events the same way and replays byte for byte.
//! - An update that changes the key stays one `u` event with the old key in
//!   `before` (Debezium splits it into a delete and a create); one change is
//!   one message, with one position.
//! - Truncates are always published (`op: "t"`); there are no tombstones.
//! - `source.version` is walnats' own version.
//! - `source.snapshot` is `"true"` on every snapshot read and `"false"`
//!   otherwise: Debezium also marks a snapshot's first and last rows
//!   (`"first"`, `"last"`, `"first_in_data_collection"`...), which an event
//!   alone cannot know.

use base64::Engine;

use crate::encode::Source;
use crate::encode::json::{Unchanged, old_tuple, push_str, write_old, write_tuple};
use crate::error::Result;
use crate::event::{Body, ColumnInfo, Event, Op};
use crate::value::ValueKind;

/// What Debezium writes for an unchanged TOAST value that PostgreSQL did
/// not send (its `unavailable.value.placeholder` default).
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";

/// Microseconds from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// Writes the placeholder as Debezium types it: bytes (base64 in JSON) for
/// bytea, a one-element array for arrays, a string otherwise.
fn write_unavailable(col: &ColumnInfo, out: &mut Vec<u8>) {
    match &col.kind {
        ValueKind::Bytea => {
            out.push(b'"');
            let b64 = base64::engine::general_purpose::STANDARD.encode(UNAVAILABLE);
            out.extend_from_slice(b64.as_bytes());
            out.push(b'"');
        }
        ValueKind::Array { .. } => {
            out.extend_from_slice(b"[\"");
            out.extend_from_slice(UNAVAILABLE.as_bytes());
            out.extend_from_slice(b"\"]");
        }
        _ => {
            out.push(b'"');
            out.extend_from_slice(UNAVAILABLE.as_bytes());
            out.push(b'"');
        }
    }
}

fn op_code(op: Op) -> &'static [u8] {
    match op {
        Op::Insert => b"c",
        Op::Update => b"u",
        Op::Delete => b"d",
        Op::Read => b"r",
        Op::Truncate => b"t",
    }
}

/// Writes `"ts_ms":…,"ts_us":…,"ts_ns":…` for a Unix time in µs, as
/// Debezium (2.6+) gives every timestamp of the envelope and `source`.
fn push_times(out: &mut Vec<u8>, unix_us: i64) {
    out.extend_from_slice(b"\"ts_ms\":");
    crate::encode::json::push_int(out, unix_us.div_euclid(1000));
    out.extend_from_slice(b",\"ts_us\":");
    crate::encode::json::push_int(out, unix_us);
    out.extend_from_slice(b",\"ts_ns\":");
    crate::encode::json::push_int(out, unix_us.saturating_mul(1000));
}

/// The Debezium envelope of a row change or a truncate; `now_us` is the
/// envelope's `ts_ms`/`ts_us`/`ts_ns`, when walnats encoded the event
/// (Unix epoch, µs). Other events have no Debezium form and write nothing.
pub fn write_row(out: &mut Vec<u8>, src: &Source, ev: &Event, now_us: i64) -> Result<()> {
    let (op, rel, old, new) = match &ev.body {
        Body::Row { op, rel, old, new } => (*op, rel, old_tuple(old), new.as_ref()),
        Body::Truncate { rel, .. } => (Op::Truncate, rel, None, None),
        _ => return Ok(()),
    };

    out.extend_from_slice(b"{\"before\":");
    // 'K' holds the key columns only, as Debezium gives them with the
    // default replica identity.
    write_old(
        out,
        rel,
        old,
        ev.lsn,
        Unchanged::Placeholder(write_unavailable),
    )?;

    out.extend_from_slice(b",\"after\":");
    match new {
        Some(t) => write_tuple(
            out,
            rel,
            t,
            ev.lsn,
            |_, _| true,
            Unchanged::Placeholder(write_unavailable),
        )?,
        None => out.extend_from_slice(b"null"),
    }

    out.extend_from_slice(b",\"source\":{\"version\":\"");
    out.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
    out.extend_from_slice(b"\",\"connector\":\"postgresql\",\"name\":");
    push_str(out, &src.prefix)?;
    out.push(b',');
    match &ev.tx {
        Some(tx) => push_times(out, tx.commit_time.saturating_add(PG_EPOCH_US)),
        None => out.extend_from_slice(b"\"ts_ms\":null,\"ts_us\":null,\"ts_ns\":null"),
    }
    out.extend_from_slice(b",\"snapshot\":");
    out.extend_from_slice(if ev.snapshot {
        b"\"true\""
    } else {
        b"\"false\""
    });
    out.extend_from_slice(b",\"db\":");
    push_str(out, &src.db)?;
    // A JSON array of two decimal strings, itself in a string, as Debezium.
    out.extend_from_slice(b",\"sequence\":\"[\\\"");
    crate::encode::json::push_int(out, ev.pos.commit_lsn.as_u64());
    out.extend_from_slice(b"\\\",\\\"");
    crate::encode::json::push_int(out, ev.lsn.as_u64());
    out.extend_from_slice(b"\\\"]\",\"schema\":");
    push_str(out, &rel.schema)?;
    out.extend_from_slice(b",\"table\":");
    push_str(out, &rel.table)?;
    out.extend_from_slice(b",\"txId\":");
    match &ev.tx {
        Some(tx) => crate::encode::json::push_int(out, tx.xid.0),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"lsn\":");
    crate::encode::json::push_int(out, ev.lsn.as_u64());
    out.extend_from_slice(b",\"xmin\":null},\"op\":\"");
    out.extend_from_slice(op_code(op));
    out.extend_from_slice(b"\",");
    push_times(out, now_us);
    out.extend_from_slice(b",\"transaction\":null}");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use serde_json::{Value, json};

    use super::*;
    use crate::event::{RelationInfo, TxInfo};
    use crate::lsn::{Lsn, Position};
    use crate::pgoutput::{OldTuple, ReplicaIdentity, TupleData, TupleValue, Xid};

    fn col(name: &str, kind: ValueKind, key: bool) -> ColumnInfo {
        crate::event::testing::column(name, kind, key)
    }

    fn orders(ri: ReplicaIdentity) -> Arc<RelationInfo> {
        crate::event::testing::relation(
            16_384,
            "public",
            "orders",
            ri,
            vec![
                col("id", ValueKind::Int, true),
                col("status", ValueKind::Text, false),
                col("amount", ValueKind::Numeric, false),
                col("blob", ValueKind::Bytea, false),
                col("tags", ValueKind::for_builtin_oid(1009).unwrap(), false),
            ],
        )
    }

    fn text(s: &str) -> TupleValue<'_> {
        TupleValue::Text(s.as_bytes())
    }

    fn row(id: &str, status: &str) -> TupleData {
        TupleData::from_values(vec![
            text(id),
            text(status),
            text("19.90"),
            text("\\x00ff"),
            text("{a,b}"),
        ])
    }

    fn src() -> Source {
        Source {
            db: "app".to_owned(),
            slot: "walnats".to_owned(),
            prefix: "cdc.app".to_owned(),
        }
    }

    // 2026-11-22T18:31:10.123456Z in PostgreSQL's microseconds.
    const COMMIT_US: i64 = ((9822 * 86_400) + 18 * 3600 + 31 * 60 + 10) * 1_000_000 + 123_456;
    const COMMIT_UNIX_US: i64 = 1_795_372_270_123_456;
    const NOW_US: i64 = 1_795_372_271_000_789;

    fn event(body: Body) -> Event {
        Event {
            pos: Position::new(Lsn::from_u64(0x16B_3800), 0),
            lsn: Lsn::from_u64(0x16B_3748),
            tx: Some(TxInfo {
                xid: Xid(731),
                commit_lsn: Lsn::from_u64(0x16B_3800),
                commit_time: COMMIT_US,
            }),
            snapshot: false,
            body,
        }
    }

    fn encode(ev: &Event) -> Value {
        let mut out = Vec::new();
        write_row(&mut out, &src(), ev, NOW_US).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn source() -> Value {
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "connector": "postgresql",
            "name": "cdc.app",
            "ts_ms": 1_795_372_270_123_i64,
            "ts_us": COMMIT_UNIX_US,
            "ts_ns": COMMIT_UNIX_US * 1000,
            "snapshot": "false",
            "db": "app",
            "sequence": format!("[\"{}\",\"{}\"]", 0x16B_3800, 0x16B_3748),
            "schema": "public",
            "table": "orders",
            "txId": 731,
            "lsn": 0x16B_3748,
            "xmin": null
        })
    }

    fn full(id: i64, status: &str) -> Value {
        json!({"id": id, "status": status, "amount": "19.90", "blob": "AP8=", "tags": ["a", "b"]})
    }

    #[test]
    fn commit_time_converts_to_unix_microseconds() {
        // The constant above, checked once by a second route.
        assert_eq!(COMMIT_US + PG_EPOCH_US, COMMIT_UNIX_US);
    }

    #[test]
    fn insert_is_op_c_with_after_only() {
        let ev = event(Body::Row {
            op: Op::Insert,
            rel: orders(ReplicaIdentity::Default),
            old: None,
            new: Some(row("42", "new")),
        });
        assert_eq!(
            encode(&ev),
            json!({
                "before": null,
                "after": full(42, "new"),
                "source": source(),
                "op": "c",
                "ts_ms": 1_795_372_271_000_i64,
                "ts_us": NOW_US,
                "ts_ns": NOW_US * 1000,
                "transaction": null
            })
        );
    }

    #[test]
    fn snapshot_read_is_op_r_with_snapshot_true() {
        let mut ev = event(Body::Row {
            op: Op::Read,
            rel: orders(ReplicaIdentity::Default),
            old: None,
            new: Some(row("42", "new")),
        });
        ev.snapshot = true;
        let mut expected_source = source();
        expected_source["snapshot"] = json!("true");
        assert_eq!(
            encode(&ev),
            json!({
                "before": null,
                "after": full(42, "new"),
                "source": expected_source,
                "op": "r",
                "ts_ms": 1_795_372_271_000_i64,
                "ts_us": NOW_US,
                "ts_ns": NOW_US * 1000,
                "transaction": null
            })
        );
    }

    #[test]
    fn update_puts_the_placeholder_for_unchanged_toast_values() {
        let row = row("42", "paid");
        let mut values = row.values();
        values[1] = TupleValue::Unchanged;
        values[3] = TupleValue::Unchanged;
        values[4] = TupleValue::Unchanged;
        let new = TupleData::from_values(values);
        let ev = event(Body::Row {
            op: Op::Update,
            rel: orders(ReplicaIdentity::Default),
            old: None,
            new: Some(new),
        });
        let b64 = base64::engine::general_purpose::STANDARD.encode(UNAVAILABLE);
        assert_eq!(
            encode(&ev),
            json!({
                "before": null,
                "after": {"id": 42, "status": UNAVAILABLE, "amount": "19.90",
                          "blob": b64, "tags": [UNAVAILABLE]},
                "source": source(),
                "op": "u",
                "ts_ms": 1_795_372_271_000_i64,
                "ts_us": NOW_US,
                "ts_ns": NOW_US * 1000,
                "transaction": null
            })
        );
    }

    #[test]
    fn update_with_replica_identity_full_has_the_whole_old_row() {
        let ev = event(Body::Row {
            op: Op::Update,
            rel: orders(ReplicaIdentity::Full),
            old: Some(OldTuple::Full(row("42", "new"))),
            new: Some(row("42", "paid")),
        });
        let body = encode(&ev);
        assert_eq!(body["before"], full(42, "new"));
        assert_eq!(body["after"], full(42, "paid"));
        assert_eq!(body["op"], "u");
    }

    #[test]
    fn delete_is_op_d_with_the_old_key_in_before() {
        let old = TupleData::from_values(vec![
            text("43"),
            TupleValue::Null,
            TupleValue::Null,
            TupleValue::Null,
            TupleValue::Null,
        ]);
        let ev = event(Body::Row {
            op: Op::Delete,
            rel: orders(ReplicaIdentity::Default),
            old: Some(OldTuple::Key(old)),
            new: None,
        });
        assert_eq!(
            encode(&ev),
            json!({
                "before": {"id": 43},
                "after": null,
                "source": source(),
                "op": "d",
                "ts_ms": 1_795_372_271_000_i64,
                "ts_us": NOW_US,
                "ts_ns": NOW_US * 1000,
                "transaction": null
            })
        );
    }

    #[test]
    fn truncate_is_op_t_with_neither_before_nor_after() {
        let ev = event(Body::Truncate {
            rel: orders(ReplicaIdentity::Default),
            cascade: true,
            restart_identity: false,
        });
        assert_eq!(
            encode(&ev),
            json!({
                "before": null,
                "after": null,
                "source": source(),
                "op": "t",
                "ts_ms": 1_795_372_271_000_i64,
                "ts_us": NOW_US,
                "ts_ns": NOW_US * 1000,
                "transaction": null
            })
        );
    }

    #[test]
    fn a_value_that_cannot_be_decoded_is_an_error_without_the_value() {
        let row = row("42", "new");
        let mut values = row.values();
        values[0] = text("secret-not-a-number");
        let new = TupleData::from_values(values);
        let ev = event(Body::Row {
            op: Op::Insert,
            rel: orders(ReplicaIdentity::Default),
            old: None,
            new: Some(new),
        });
        let mut out = Vec::new();
        let err = write_row(&mut out, &src(), &ev, NOW_US).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
