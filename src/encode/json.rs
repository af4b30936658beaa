//! The `format = "json"` body of the contract.

use crate::encode::{Claim, Source};
use crate::error::{Error, Kind, Result};
use crate::event::{Body, ColumnInfo, Event, RelationInfo, TxInfo};
use crate::lsn::Lsn;
use crate::pgoutput::{OldTuple, TupleData, TupleValue};
use crate::value::json_str::{write_json_str, write_json_string};
use crate::value::write_text_value;

pub(crate) fn push_str(out: &mut Vec<u8>, s: &str) -> Result<()> {
    write_json_string(s.as_bytes(), out).map_err(Error::from)
}

/// Microseconds since 2000-01-01 UTC (PostgreSQL's epoch) as RFC 3339 UTC
/// with six fractional digits.
pub fn write_pg_time(out: &mut Vec<u8>, us: i64) {
    const PG_EPOCH_DAYS: i64 = 10_957; // 1970-01-01 → 2000-01-01
    let days = us.div_euclid(86_400_000_000) + PG_EPOCH_DAYS;
    let rem = us.rem_euclid(86_400_000_000);
    let (y, m, d) = civil_from_days(days);
    let secs = rem / 1_000_000;
    let frac = rem % 1_000_000;
    // Every field but an out-of-range year has a fixed width: fill a
    // template on the stack and append it once.
    let mut t = *b"\"0000-00-00T00:00:00.000000Z\"";
    put_digits(&mut t[6..8], u64::from(m));
    put_digits(&mut t[9..11], u64::from(d));
    put_digits(&mut t[12..14], (secs / 3600) as u64);
    put_digits(&mut t[15..17], ((secs / 60) % 60) as u64);
    put_digits(&mut t[18..20], (secs % 60) as u64);
    put_digits(&mut t[21..27], frac as u64);
    if (0..=9999).contains(&y) {
        put_digits(&mut t[1..5], y as u64);
        out.extend_from_slice(&t);
    } else {
        // Outside what PostgreSQL's commit timestamps reach; keep it exact.
        out.push(b'"');
        out.extend_from_slice(format!("{y:04}").as_bytes());
        out.extend_from_slice(&t[5..]);
    }
}

/// `v`'s last `dst.len()` decimal digits into `dst`, with leading zeros.
fn put_digits(dst: &mut [u8], mut v: u64) {
    for d in dst.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// A number in decimal, without allocating.
pub(crate) fn push_int(out: &mut Vec<u8>, v: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Howard Hinnant's days → (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn write_lsn(out: &mut Vec<u8>, lsn: Lsn) {
    out.push(b'"');
    lsn.write_to(out);
    out.push(b'"');
}

fn decode_err(rel: &RelationInfo, column: &str, lsn: Lsn, e: impl std::fmt::Display) -> Error {
    Error::new(
        Kind::Decode,
        format!(
            "cannot decode column {column:?} of {}.{} at LSN {lsn}: {e}; \
             walnats stopped without confirming this change (nothing is lost)",
            rel.schema, rel.table
        ),
    )
}

/// What [`write_tuple`] does with an unchanged TOAST value, which
/// PostgreSQL did not send.
pub(crate) enum Unchanged<'a> {
    /// Leave the column out of the object.
    Omit,
    /// Leave it out and push its column index here.
    Report(&'a mut Vec<usize>),
    /// Write the column with this value (a placeholder) instead.
    Placeholder(fn(&ColumnInfo, &mut Vec<u8>)),
}

/// Writes `{"col":value,...}` for the columns `pick` selects; unchanged
/// TOAST values are handled as `unchanged` says.
pub(crate) fn write_tuple(
    out: &mut Vec<u8>,
    rel: &RelationInfo,
    tuple: &TupleData,
    lsn: Lsn,
    pick: impl Fn(usize, &TupleValue<'_>) -> bool,
    unchanged: Unchanged<'_>,
) -> Result<()> {
    check_width(rel, tuple, lsn)?;
    let columns = rel
        .columns
        .iter()
        .zip(tuple.iter())
        .enumerate()
        .filter(|(i, (_, val))| pick(*i, val))
        .map(|(i, (col, val))| (i, col, val));
    write_object(out, rel, lsn, columns, unchanged)
}

/// A tuple has one value per column of its Relation message.
fn check_width(rel: &RelationInfo, tuple: &TupleData, lsn: Lsn) -> Result<()> {
    if tuple.len() == rel.columns.len() {
        return Ok(());
    }
    Err(Error::new(
        Kind::Protocol,
        format!(
            "a change of {}.{} at LSN {lsn} has {} columns, its Relation message {}",
            rel.schema,
            rel.table,
            tuple.len(),
            rel.columns.len()
        ),
    ))
}

/// Writes `{"col":value,...}` for `(column index, column, value)` in the
/// order given; unchanged TOAST values are handled as `unchanged` says.
fn write_object<'c, 'v>(
    out: &mut Vec<u8>,
    rel: &RelationInfo,
    lsn: Lsn,
    columns: impl Iterator<Item = (usize, &'c ColumnInfo, TupleValue<'v>)>,
    mut unchanged: Unchanged<'_>,
) -> Result<()> {
    out.push(b'{');
    let mut first = true;
    for (i, col, val) in columns {
        let placeholder = match (&mut unchanged, val) {
            (Unchanged::Omit, TupleValue::Unchanged) => continue,
            (Unchanged::Report(u), TupleValue::Unchanged) => {
                u.push(i);
                continue;
            }
            (Unchanged::Placeholder(f), TupleValue::Unchanged) => Some(*f),
            _ => None,
        };
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(&col.json_key);
        if let Some(write_placeholder) = placeholder {
            write_placeholder(col, out);
            continue;
        }
        match val {
            TupleValue::Null => out.extend_from_slice(b"null"),
            TupleValue::Text(b) => write_text_value(&col.kind, b, out)
                .map_err(|e| decode_err(rel, &col.name, lsn, e))?,
            TupleValue::Binary(_) => {
                return Err(decode_err(
                    rel,
                    &col.name,
                    lsn,
                    "a binary-format value arrived, but walnats asked for text format",
                ));
            }
            TupleValue::Unchanged => {}
        }
    }
    out.push(b'}');
    Ok(())
}

/// `before`: the old key ('K': only key columns carry values) or the whole
/// old row ('O'), or `null`; shared by every body format.
pub(crate) fn write_old(
    out: &mut Vec<u8>,
    rel: &RelationInfo,
    old: Option<(&TupleData, bool)>,
    lsn: Lsn,
    unchanged: Unchanged<'_>,
) -> Result<()> {
    match old {
        Some((t, true)) => write_tuple(
            out,
            rel,
            t,
            lsn,
            |i, _| rel.columns.get(i).is_some_and(|c| c.key),
            unchanged,
        ),
        Some((t, false)) => write_tuple(out, rel, t, lsn, |_, _| true, unchanged),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

/// The old tuple and whether it holds only the key ('K') rather than the
/// whole row ('O').
pub(crate) fn old_tuple(old: &Option<OldTuple>) -> Option<(&TupleData, bool)> {
    match old {
        Some(OldTuple::Key(t)) => Some((t, true)),
        Some(OldTuple::Full(t)) => Some((t, false)),
        None => None,
    }
}

pub fn write_row(out: &mut Vec<u8>, text: &mut SourceText, ev: &Event) -> Result<()> {
    let (op, rel, old, new, truncate) = match &ev.body {
        Body::Row { op, rel, old, new } => (op.as_str(), rel, old_tuple(old), new.as_ref(), None),
        Body::Truncate {
            rel,
            cascade,
            restart_identity,
        } => (
            "truncate",
            rel,
            None,
            None,
            Some((*cascade, *restart_identity)),
        ),
        _ => return Ok(()),
    };
    out.extend_from_slice(b"{\"op\":\"");
    out.extend_from_slice(op.as_bytes());
    out.extend_from_slice(b"\",\"schema\":");
    push_str(out, &rel.schema)?;
    out.extend_from_slice(b",\"table\":");
    push_str(out, &rel.table)?;

    out.extend_from_slice(b",\"key\":");
    write_key(out, rel, old, new, ev.lsn)?;

    out.extend_from_slice(b",\"before\":");
    write_old(out, rel, old, ev.lsn, Unchanged::Omit)?;

    out.extend_from_slice(b",\"after\":");
    let mut unchanged = Vec::new();
    match new {
        Some(t) => write_tuple(
            out,
            rel,
            t,
            ev.lsn,
            |_, _| true,
            Unchanged::Report(&mut unchanged),
        )?,
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"unchanged\":[");
    for (n, i) in unchanged.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        if let Some(c) = rel.columns.get(*i) {
            push_str(out, &c.name)?;
        }
    }
    out.push(b']');
    if let Some((cascade, restart_identity)) = truncate {
        out.extend_from_slice(b",\"truncate\":{\"cascade\":");
        out.extend_from_slice(if cascade { b"true" } else { b"false" });
        out.extend_from_slice(b",\"restart_identity\":");
        out.extend_from_slice(if restart_identity { b"true" } else { b"false" });
        out.push(b'}');
    }
    write_source(out, text, ev);
    out.push(b'}');
    Ok(())
}

/// `key`: the replica-identity columns, from the new row, or the old key
/// on delete; `null` without a key. A key column whose new value
/// PostgreSQL did not send (unchanged TOAST) takes its value from the old
/// tuple, when there is one; every other column comes from the new row.
/// (With `REPLICA IDENTITY FULL` every column is a key column, and an
/// update that leaves one TOASTed column alone still changes the others.)
fn write_key(
    out: &mut Vec<u8>,
    rel: &RelationInfo,
    old: Option<(&TupleData, bool)>,
    new: Option<&TupleData>,
    lsn: Lsn,
) -> Result<()> {
    let old = old.map(|(t, _)| t);
    let Some(row) = new.or(old).filter(|_| rel.has_key()) else {
        out.extend_from_slice(b"null");
        return Ok(());
    };
    check_width(rel, row, lsn)?;
    let columns = rel
        .columns
        .iter()
        .zip(row.iter())
        .enumerate()
        .filter(|(_, (col, _))| col.key)
        .map(|(i, (col, val))| {
            let val = match val {
                TupleValue::Unchanged => {
                    old.and_then(|o| o.get(i)).unwrap_or(TupleValue::Unchanged)
                }
                v => v,
            };
            (i, col, val)
        });
    write_object(out, rel, lsn, columns, Unchanged::Omit)
}

/// The body of a claim check (`limits.on_oversize = "object_store"`):
/// where the real body is, and enough to route on without fetching it:
/// `{"claim_check": {"bucket", "name", "size", "digest"}, "op", "schema",
/// "table", "key", "source"}` for changes (`"prefix"` instead of schema,
/// table and key for `_message`).
pub fn write_claim(
    out: &mut Vec<u8>,
    text: &mut SourceText,
    ev: &Event,
    claim: &Claim,
) -> Result<()> {
    out.extend_from_slice(b"{\"claim_check\":{\"bucket\":");
    push_str(out, &claim.bucket)?;
    out.extend_from_slice(b",\"name\":");
    push_str(out, &claim.name)?;
    out.extend_from_slice(b",\"size\":");
    push_int(out, claim.size);
    out.extend_from_slice(b",\"digest\":");
    push_str(out, &claim.digest)?;
    out.extend_from_slice(b"},\"op\":\"");
    out.extend_from_slice(ev.op_name().as_bytes());
    out.push(b'"');
    match &ev.body {
        Body::Row { rel, old, new, .. } => {
            write_names(out, rel)?;
            out.extend_from_slice(b",\"key\":");
            write_key(out, rel, old_tuple(old), new.as_ref(), ev.lsn)?;
        }
        Body::Truncate { rel, .. } => {
            write_names(out, rel)?;
            out.extend_from_slice(b",\"key\":null");
        }
        Body::Schema { rel } => write_names(out, rel)?,
        Body::Message { prefix, .. } => {
            out.extend_from_slice(b",\"prefix\":");
            push_str(out, prefix)?;
        }
        Body::Outbox(o) => {
            out.extend_from_slice(b",\"aggregate_type\":");
            push_str(out, &o.aggregate_type)?;
            if let Some(id) = &o.event_id {
                out.extend_from_slice(b",\"event_id\":");
                push_str(out, id)?;
            }
        }
        Body::TxBegin | Body::TxEnd { .. } => {}
    }
    write_source(out, text, ev);
    out.push(b'}');
    Ok(())
}

fn write_names(out: &mut Vec<u8>, rel: &RelationInfo) -> Result<()> {
    out.extend_from_slice(b",\"schema\":");
    push_str(out, &rel.schema)?;
    out.extend_from_slice(b",\"table\":");
    push_str(out, &rel.table)
}

/// The text of `source` that repeats from message to message, written once
/// and copied after: the head (`db`, `slot`) is the same for every message
/// of an encoder, and `commit_lsn`, `xid` and `commit_time` are the same for
/// every change of a transaction.
#[derive(Debug)]
pub struct SourceText {
    /// `,"source":{"db":…,"slot":…,"lsn":`
    head: Vec<u8>,
    /// What `tx_part` was written for.
    tx_key: Option<(Lsn, Option<TxInfo>)>,
    /// `,"commit_lsn":…,"xid":…,"commit_time":…`
    tx_part: Vec<u8>,
}

impl SourceText {
    pub fn new(src: &Source) -> SourceText {
        let mut head = b",\"source\":{\"db\":".to_vec();
        write_json_str(&src.db, &mut head);
        head.extend_from_slice(b",\"slot\":");
        write_json_str(&src.slot, &mut head);
        head.extend_from_slice(b",\"lsn\":");
        SourceText {
            head,
            tx_key: None,
            tx_part: Vec::new(),
        }
    }

    fn tx_part(&mut self, commit_lsn: Lsn, tx: Option<TxInfo>) -> &[u8] {
        if self.tx_key != Some((commit_lsn, tx)) {
            let out = &mut self.tx_part;
            out.clear();
            out.extend_from_slice(b",\"commit_lsn\":");
            write_lsn(out, commit_lsn);
            out.extend_from_slice(b",\"xid\":");
            match &tx {
                Some(tx) => push_int(out, tx.xid.0),
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"commit_time\":");
            match &tx {
                Some(tx) => write_pg_time(out, tx.commit_time),
                None => out.extend_from_slice(b"null"),
            }
            self.tx_key = Some((commit_lsn, tx));
        }
        &self.tx_part
    }
}

fn write_source(out: &mut Vec<u8>, text: &mut SourceText, ev: &Event) {
    out.extend_from_slice(&text.head);
    write_lsn(out, ev.lsn);
    out.extend_from_slice(text.tx_part(ev.pos.commit_lsn, ev.tx));
    out.extend_from_slice(b",\"seq\":");
    push_int(out, ev.pos.seq);
    out.extend_from_slice(b",\"snapshot\":");
    out.extend_from_slice(if ev.snapshot { b"true" } else { b"false" });
    out.push(b'}');
}

/// `_tx` body: `{"type": "BEGIN"|"END", "xid", "commit_lsn", "commit_time",
/// "db"}`, and on END `"event_count"` and `"data_collections": [{
/// "data_collection": "public.orders", "event_count": 2}]` (Debezium's
/// transaction metadata names).
pub fn write_tx_marker(out: &mut Vec<u8>, src: &Source, ev: &Event) -> Result<()> {
    let end = match &ev.body {
        Body::TxBegin => None,
        Body::TxEnd { counts } => Some(counts),
        _ => return Ok(()),
    };
    out.extend_from_slice(if end.is_some() {
        b"{\"type\":\"END\""
    } else {
        b"{\"type\":\"BEGIN\""
    });
    out.extend_from_slice(b",\"xid\":");
    match &ev.tx {
        Some(tx) => push_int(out, tx.xid.0),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"commit_lsn\":");
    write_lsn(out, ev.pos.commit_lsn);
    out.extend_from_slice(b",\"commit_time\":");
    match &ev.tx {
        Some(tx) => write_pg_time(out, tx.commit_time),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"db\":");
    push_str(out, &src.db)?;
    if let Some(counts) = end {
        let total: u64 = counts.iter().map(|(_, n)| n).sum();
        out.extend_from_slice(b",\"event_count\":");
        push_int(out, total);
        out.extend_from_slice(b",\"data_collections\":[");
        for (i, (table, n)) in counts.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"data_collection\":");
            push_str(out, table)?;
            out.extend_from_slice(b",\"event_count\":");
            push_int(out, *n);
            out.push(b'}');
        }
        out.push(b']');
    }
    out.push(b'}');
    Ok(())
}

/// `_schema` body: the table's column set.
pub fn write_schema(
    out: &mut Vec<u8>,
    text: &mut SourceText,
    ev: &Event,
    rel: &RelationInfo,
) -> Result<()> {
    out.extend_from_slice(b"{\"schema\":");
    push_str(out, &rel.schema)?;
    out.extend_from_slice(b",\"table\":");
    push_str(out, &rel.table)?;
    out.extend_from_slice(b",\"relation_oid\":");
    push_int(out, rel.oid.0);
    out.extend_from_slice(b",\"replica_identity\":\"");
    out.extend_from_slice(rel.replica_identity_name().as_bytes());
    out.extend_from_slice(b"\",\"columns\":[");
    for (i, c) in rel.columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"name\":");
        push_str(out, &c.name)?;
        out.extend_from_slice(b",\"type\":");
        push_str(out, &c.type_name)?;
        out.extend_from_slice(b",\"type_oid\":");
        push_int(out, c.type_oid);
        out.extend_from_slice(b",\"key\":");
        out.extend_from_slice(if c.key { b"true" } else { b"false" });
        out.push(b'}');
    }
    out.push(b']');
    write_source(out, text, ev);
    out.push(b'}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    mod key {
        #![allow(clippy::unwrap_used)]

        use std::sync::Arc;

        use serde_json::{Value, json};

        use super::super::*;
        use crate::event::Op;
        use crate::lsn::Position;
        use crate::pgoutput::{OldTuple, ReplicaIdentity, Xid};
        use crate::value::ValueKind;

        fn col(name: &str, key: bool) -> ColumnInfo {
            let kind = if name == "id" {
                ValueKind::Int
            } else {
                ValueKind::Text
            };
            crate::event::testing::column(name, kind, key)
        }

        /// toast.sql's `toasted_several`: an id and three TOASTable text
        /// columns. Under `REPLICA IDENTITY FULL` pgoutput flags every
        /// column as a key column; by default only the primary key.
        fn toasted_several(ri: ReplicaIdentity) -> Arc<RelationInfo> {
            let full = ri == ReplicaIdentity::Full;
            crate::event::testing::relation(
                16_384,
                "public",
                "toasted_several",
                ri,
                vec![
                    col("id", true),
                    col("toasted_key", full),
                    col("toasted_col1", full),
                    col("toasted_col2", full),
                ],
            )
        }

        fn text(s: &str) -> TupleValue<'_> {
            TupleValue::Text(s.as_bytes())
        }

        fn event(
            op: Op,
            rel: Arc<RelationInfo>,
            old: Option<OldTuple>,
            new: Option<TupleData>,
        ) -> Event {
            Event {
                pos: Position::new(Lsn::from_u64(0x16B_3800), 0),
                lsn: Lsn::from_u64(0x16B_3748),
                tx: Some(TxInfo {
                    xid: Xid(731),
                    commit_lsn: Lsn::from_u64(0x16B_3800),
                    commit_time: 0,
                }),
                snapshot: false,
                body: Body::Row { op, rel, old, new },
            }
        }

        fn src() -> Source {
            Source {
                db: "app".to_owned(),
                slot: "walnats".to_owned(),
                prefix: "cdc.app".to_owned(),
            }
        }

        fn body(ev: &Event) -> Value {
            let mut out = Vec::new();
            write_row(&mut out, &mut SourceText::new(&src()), ev).unwrap();
            serde_json::from_slice(&out).unwrap()
        }

        /// The claim check's `key`, which is the only `key` a message has
        /// with `format = "debezium"` (its envelope has none).
        fn claim_key(ev: &Event) -> Value {
            let claim = Claim {
                bucket: "walnats_oversize".to_owned(),
                name: "CDC_APP/x".to_owned(),
                size: 1,
                digest: "SHA-256=x".to_owned(),
            };
            let mut out = Vec::new();
            write_claim(&mut out, &mut SourceText::new(&src()), ev, &claim).unwrap();
            let v: Value = serde_json::from_slice(&out).unwrap();
            v["key"].clone()
        }

        #[test]
        fn full_identity_update_takes_a_changed_key_column_from_the_new_row() {
            let old = TupleData::from_values([text("1"), text("k"), TupleValue::Null, text("b")]);
            let new = TupleData::from_values([text("1"), text("k"), text("a"), text("b")]);
            let ev = event(
                Op::Update,
                toasted_several(ReplicaIdentity::Full),
                Some(OldTuple::Full(old)),
                Some(new),
            );
            let want =
                json!({"id": 1, "toasted_key": "k", "toasted_col1": "a", "toasted_col2": "b"});
            let v = body(&ev);
            assert_eq!(v["key"], want);
            assert_eq!(v["after"], want);
            assert_eq!(
                v["before"],
                json!({"id": 1, "toasted_key": "k", "toasted_col1": null, "toasted_col2": "b"})
            );
            assert_eq!(claim_key(&ev), want);
        }

        /// toast.sql: `UPDATE toasted_several SET toasted_col1 = toasted_key`
        /// sends `toasted_key` as unchanged TOAST ('u') in the new tuple.
        #[test]
        fn full_identity_update_takes_an_unchanged_toast_key_column_from_the_old_row() {
            let big = "9876543210".repeat(10_000);
            let old =
                TupleData::from_values([text("1"), text(&big), TupleValue::Null, TupleValue::Null]);
            let new = TupleData::from_values([
                text("1"),
                TupleValue::Unchanged,
                text(&big),
                TupleValue::Null,
            ]);
            let ev = event(
                Op::Update,
                toasted_several(ReplicaIdentity::Full),
                Some(OldTuple::Full(old)),
                Some(new),
            );
            let v = body(&ev);
            let want =
                json!({"id": 1, "toasted_key": big, "toasted_col1": big, "toasted_col2": null});
            assert_eq!(v["key"], want);
            assert_eq!(
                v["after"],
                json!({"id": 1, "toasted_col1": big, "toasted_col2": null})
            );
            assert_eq!(v["unchanged"], json!(["toasted_key"]));
            assert_eq!(claim_key(&ev), want);
        }

        #[test]
        fn default_identity_update_key_is_the_new_primary_key() {
            // The key changed: PostgreSQL sends the old key ('K').
            let old = TupleData::from_values([
                text("1"),
                TupleValue::Null,
                TupleValue::Null,
                TupleValue::Null,
            ]);
            let new = TupleData::from_values([
                text("2"),
                TupleValue::Unchanged,
                text("a"),
                TupleValue::Null,
            ]);
            let ev = event(
                Op::Update,
                toasted_several(ReplicaIdentity::Default),
                Some(OldTuple::Key(old)),
                Some(new.clone()),
            );
            let v = body(&ev);
            assert_eq!(v["key"], json!({"id": 2}));
            assert_eq!(v["before"], json!({"id": 1}));
            assert_eq!(claim_key(&ev), json!({"id": 2}));
            // The key did not change: no old tuple, the key is the new row's.
            let mut values = new.values();
            values[0] = text("1");
            let ev = event(
                Op::Update,
                toasted_several(ReplicaIdentity::Default),
                None,
                Some(TupleData::from_values(values)),
            );
            let v = body(&ev);
            assert_eq!(v["key"], json!({"id": 1}));
            assert_eq!(v["before"], Value::Null);
        }

        #[test]
        fn delete_key_is_the_old_key() {
            let old = TupleData::from_values([
                text("7"),
                TupleValue::Null,
                TupleValue::Null,
                TupleValue::Null,
            ]);
            let ev = event(
                Op::Delete,
                toasted_several(ReplicaIdentity::Default),
                Some(OldTuple::Key(old)),
                None,
            );
            let v = body(&ev);
            assert_eq!(v["key"], json!({"id": 7}));
            assert_eq!(v["after"], Value::Null);
            assert_eq!(claim_key(&ev), json!({"id": 7}));

            let old = TupleData::from_values([text("7"), text("k"), text("a"), TupleValue::Null]);
            let ev = event(
                Op::Delete,
                toasted_several(ReplicaIdentity::Full),
                Some(OldTuple::Full(old)),
                None,
            );
            let want =
                json!({"id": 7, "toasted_key": "k", "toasted_col1": "a", "toasted_col2": null});
            assert_eq!(body(&ev)["key"], want);
            assert_eq!(claim_key(&ev), want);
        }

        #[test]
        fn a_key_column_unsent_and_without_an_old_row_is_left_out_not_null() {
            let new = TupleData::from_values([
                text("1"),
                TupleValue::Unchanged,
                text("a"),
                TupleValue::Null,
            ]);
            let ev = event(
                Op::Update,
                toasted_several(ReplicaIdentity::Full),
                None,
                Some(new),
            );
            assert_eq!(
                body(&ev)["key"],
                json!({"id": 1, "toasted_col1": "a", "toasted_col2": null})
            );
        }
    }

    #[test]
    fn pg_epoch_times_print_as_rfc3339() {
        let mut out = Vec::new();
        write_pg_time(&mut out, 0);
        assert_eq!(out, b"\"2000-01-01T00:00:00.000000Z\"");
        out.clear();
        // 2026-11-22T18:31:10.123456Z
        let us = ((9822_i64 * 86_400) + 18 * 3600 + 31 * 60 + 10) * 1_000_000 + 123_456;
        write_pg_time(&mut out, us);
        assert_eq!(out, b"\"2026-11-22T18:31:10.123456Z\"");
        out.clear();
        write_pg_time(&mut out, -1);
        assert_eq!(out, b"\"1999-12-31T23:59:59.999999Z\"");
    }

    /// `source` written through one `SourceText` across transactions (and
    /// a change without one) is what a fresh `SourceText` writes for each:
    /// the per-transaction part is never carried over to another.
    #[test]
    fn source_text_is_rewritten_when_the_transaction_changes() {
        use crate::lsn::Position;
        use crate::pgoutput::Xid;

        let src = Source {
            db: "a\"pp\n".to_owned(),
            slot: "walnats".to_owned(),
            prefix: "cdc.app".to_owned(),
        };
        let tx = |xid: u32, commit: u64, time: i64| TxInfo {
            xid: Xid(xid),
            commit_lsn: Lsn::from_u64(commit),
            commit_time: time,
        };
        let ev = |seq: u32, tx: Option<TxInfo>, commit: u64| Event {
            pos: Position::new(Lsn::from_u64(commit), seq),
            lsn: Lsn::from_u64(commit - 0x40 + u64::from(seq)),
            tx,
            snapshot: tx.is_none(),
            body: Body::TxBegin,
        };
        let events = [
            ev(0, Some(tx(731, 0x16B_3800, 1)), 0x16B_3800),
            ev(1, Some(tx(731, 0x16B_3800, 1)), 0x16B_3800),
            ev(0, Some(tx(732, 0x16B_3900, 1)), 0x16B_3900),
            ev(0, Some(tx(732, 0x16B_3900, 2)), 0x16B_3900),
            ev(0, None, 0x16B_3900),
            ev(0, Some(tx(733, 0x1_0000_0000, 3)), 0x1_0000_0000),
        ];
        let mut shared = SourceText::new(&src);
        for e in &events {
            let (mut kept, mut fresh) = (Vec::new(), Vec::new());
            write_source(&mut kept, &mut shared, e);
            write_source(&mut fresh, &mut SourceText::new(&src), e);
            assert_eq!(
                String::from_utf8_lossy(&kept),
                String::from_utf8_lossy(&fresh)
            );
            let body = kept.strip_prefix(b",\"source\":").unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            assert_eq!(v["db"], "a\"pp\n");
            assert_eq!(v["commit_lsn"], e.pos.commit_lsn.to_string());
            assert_eq!(
                v["xid"],
                e.tx.map_or(serde_json::Value::Null, |t| t.xid.0.into())
            );
            assert_eq!(v["seq"], e.pos.seq);
        }
    }
}
