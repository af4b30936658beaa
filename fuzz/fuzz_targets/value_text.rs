//! value_text: one column value in PostgreSQL's text format → JSON, for a
//! built-in type chosen from the input, through `ValueKind::for_builtin_oid`
//! and `write_text_value` (numbers, bool, numeric, bytea hex and escape,
//! date and timestamps with BC and infinities, json, arrays of each).
//!
//! Input: byte 0 picks a type OID from `OIDS`, the rest is the value text.
//!
//! Checks: nothing panics; an error leaves the output buffer as it was; an
//! accepted value of a JSON-free type is exactly one valid JSON value, and
//! an accepted integer is written as the very digits PostgreSQL sent.
#![no_main]

mod kinds;

use libfuzzer_sys::fuzz_target;
use walnats::value::ValueKind;

/// bool, int2/4/8, oid, float4/8, numeric, json, jsonb, bytea, date,
/// timestamp, timestamptz, text, varchar, uuid, interval, then the arrays
/// bool[], int4[], float4[], numeric[], jsonb[], bytea[], date[],
/// timestamp[], timestamptz[], box[] (delimiter ';'), text[].
const OIDS: [u32; 29] = [
    16, 20, 21, 23, 26, 700, 701, 1700, 114, 3802, 17, 1082, 1114, 1184, 25, 1043, 2950, 1186,
    1000, 1007, 1021, 1231, 3807, 1001, 1182, 1115, 1185, 1020, 1009,
];

fuzz_target!(|data: &[u8]| {
    let [o, text @ ..] = data else { return };
    let oid = OIDS[usize::from(*o) % OIDS.len()];
    let Some(kind) = ValueKind::for_builtin_oid(oid) else {
        panic!("built-in oid {oid} has no kind");
    };
    let Some(written) = kinds::write_and_check(&kind, text) else {
        return;
    };
    if kind == ValueKind::Int {
        assert_eq!(written, text, "an integer was rewritten");
    }
});
