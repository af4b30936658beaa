//! PostgreSQL values in text format → JSON, as the type table in docs/messages.md
//! says ("Values, by PostgreSQL type").
//!
//! Owns the mapping from a column's type to its JSON form ([`ValueKind`],
//! resolved once per relation column) and the writer for one value
//! ([`write_text_value`]). It must never do I/O, allocate per value on the
//! common paths, panic on any input, or put a value's content into an
//! error (values can be secrets): a value that does not parse is a
//! [`ValueError`] naming its type and what is wrong.
//!
//! Input is what pgoutput sends: the type's output function under the
//! settings walnats fixes in the replication connection's startup packet
//! (`DateStyle=ISO`, `IntervalStyle=postgres`, `TimeZone=UTC`,
//! `extra_float_digits=3`, `bytea_output=hex`, `client_encoding=UTF8`).
//! The walsender honours these (checked against PostgreSQL 15 and 18 with
//! pg_recvlogical); without them it uses the database's and role's
//! defaults, e.g. `22/11/2026` for `DateStyle='SQL, DMY'`, which the date
//! writers refuse rather than misread.
//!
//! Choices where the contract is silent (the tests pin each):
//! - int2/int4/int8/oid: checked to be a JSON integer, copied.
//! - float4/float8: copied when the text is a JSON number (PostgreSQL prints
//!   `-0`, `1e+20`, `1.5e-07`, all valid JSON numbers); `NaN`, `Infinity`,
//!   `-Infinity` become strings; anything else is an error.
//! - numeric: checked to be digits with an optional sign and point, or
//!   `NaN`/`Infinity`/`-Infinity` (numeric_out never uses an exponent),
//!   and written as a string without touching a digit.
//! - json/jsonb: copied raw after checking UTF-8 and that the text starts
//!   and ends like a JSON value. PostgreSQL parsed it on input and jsonb_out
//!   / json_out only print what was parsed, so a full parse here would cost
//!   as much as the rest of the row for no gain. Consequence: what
//!   PostgreSQL's json type accepts is passed on as is, including duplicate
//!   keys, numbers beyond f64 (`1e400`) and lone surrogate escapes
//!   (`"\ud800"`): valid JSON text, but some strict parsers refuse the last.
//! - bytea: hex (`\x…`) and, should a session ever print it, the escape
//!   format are both decoded; written as standard base64 with padding.
//! - date, timestamp, timestamptz: see `datetime` (BC as astronomical years,
//!   `"-0043-03-15"`; timestamptz always in UTC with `Z`).
//! - everything else (text types, uuid, time, timetz, interval, enum,
//!   money, ranges, geometric, composite, …): the printed text as a JSON
//!   string, after checking it is UTF-8.

pub mod array;
pub mod datetime;
pub mod json_str;

use base64::Engine;

use array::write_array;
use datetime::{DateKind, write_datetime};
use json_str::{write_json_string_of, write_plain_json_str};

/// How a column's values are written; resolved once per relation column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueKind {
    /// bool: `true` / `false`.
    Bool,
    /// int2, int4, int8, oid: a JSON number.
    Int,
    /// float4, float8: a number; `NaN` and `±Infinity` as strings.
    Float,
    /// numeric: the string PostgreSQL prints.
    Numeric,
    /// Every type written as the string PostgreSQL prints: text, varchar,
    /// bpchar, name, citext, "char", uuid, time, timetz, interval, enum
    /// labels, ranges, inet, money, geometric, composite, bit, xml, …
    Text,
    /// json, jsonb: the JSON value itself.
    Json,
    /// bytea: base64.
    Bytea,
    /// date: `"2026-11-22"`.
    Date,
    /// timestamp: `"2026-11-22T18:31:10.123456"`.
    Timestamp,
    /// timestamptz: `"2026-11-22T18:31:10.123456Z"`.
    Timestamptz,
    /// An array type: its element kind and the element type's delimiter
    /// (`pg_type.typdelim`: `,` for every built-in type but box's `;`).
    Array { elem: Box<ValueKind>, delim: u8 },
}

/// A value that is not what its type prints. Says which type and what is
/// wrong, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {type_name} value: {problem}")]
pub struct ValueError {
    type_name: &'static str,
    problem: &'static str,
}

impl ValueError {
    pub fn new(type_name: &'static str, problem: &'static str) -> ValueError {
        ValueError { type_name, problem }
    }

    /// The type, e.g. `timestamptz` or `array`.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// What is wrong, without the value.
    pub fn problem(&self) -> &'static str {
        self.problem
    }
}

impl From<ValueError> for crate::error::Error {
    fn from(e: ValueError) -> Self {
        crate::error::Error::new(crate::error::Kind::Decode, e.to_string())
    }
}

fn array_of(elem: ValueKind) -> ValueKind {
    ValueKind::Array {
        elem: Box::new(elem),
        delim: b',',
    }
}

impl ValueKind {
    /// Every type of PostgreSQL's own catalog (`pg_type.dat`, OIDs below
    /// 10000, the same in PostgreSQL 15 to 18): base, composite, range and
    /// multirange types and their arrays. `None` for pseudo-types, which no
    /// column has, and for every OID from 10000 on: the caller resolves
    /// enums, domains, extension types and their arrays from `pg_type`.
    pub fn for_builtin_oid(oid: u32) -> Option<ValueKind> {
        use ValueKind::*;
        Some(match oid {
            16 => Bool,
            20 | 21 | 23 | 26 => Int,
            700 | 701 => Float,
            1700 => Numeric,
            114 | 3802 => Json,
            17 => Bytea,
            1082 => Date,
            1114 => Timestamp,
            1184 => Timestamptz,
            1000 => array_of(Bool),
            1005 | 1007 | 1016 | 1028 => array_of(Int),
            1021 | 1022 => array_of(Float),
            1231 => array_of(Numeric),
            199 | 3807 => array_of(Json),
            1001 => array_of(Bytea),
            1182 => array_of(Date),
            1115 => array_of(Timestamp),
            1185 => array_of(Timestamptz),
            // box[]: box's delimiter is ';' since a box prints with commas.
            1020 => Array {
                elem: Box::new(Text),
                delim: b';',
            },
            // Every other built-in array type, its elements printed as
            // strings (text[], varchar[], uuid[], interval[], inet[], ...).
            143 | 210 | 270 | 271 | 272 | 273 | 629 | 651 | 719 | 775 | 791 | 1002 | 1003
            | 1006 | 1008 | 1009 | 1010 | 1011 | 1012 | 1013 | 1014 | 1015 | 1017 | 1018 | 1019
            | 1027 | 1034 | 1040 | 1041 | 1183 | 1187 | 1263 | 1270 | 1561 | 1563 | 2201 | 2207
            | 2208 | 2209 | 2210 | 2211 | 2949 | 2951 | 3221 | 3643 | 3644 | 3645 | 3735 | 3770
            | 3905 | 3907 | 3909 | 3911 | 3913 | 3927 | 4073 | 4090 | 4097 | 4192 | 5039 | 6150
            | 6151 | 6152 | 6153 | 6155 | 6157 => array_of(Text),
            // Every other built-in base, composite, range and multirange
            // type: text, varchar, bpchar, name, "char", uuid, time, timetz,
            // interval, money, inet, geometric, bit, xml, ranges, reg*,
            // and int2vector/oidvector, which print "1 2", not "{1,2}".
            18 | 19 | 22 | 24 | 25 | 27 | 28 | 29 | 30 | 71 | 75 | 81 | 83 | 142 | 194 | 600
            | 601 | 602 | 603 | 604 | 628 | 650 | 718 | 774 | 790 | 829 | 869 | 1033 | 1042
            | 1043 | 1083 | 1186 | 1248 | 1266 | 1560 | 1562 | 1790 | 2202 | 2203 | 2204 | 2205
            | 2206 | 2842 | 2843 | 2950 | 2970 | 3220 | 3361 | 3402 | 3614 | 3615 | 3642 | 3734
            | 3769 | 3904 | 3906 | 3908 | 3910 | 3912 | 3926 | 4066 | 4072 | 4089 | 4096 | 4191
            | 4451 | 4532 | 4533 | 4534 | 4535 | 4536 | 4600 | 4601 | 5017 | 5038 | 5069 | 6101 => {
                Text
            }
            _ => return None,
        })
    }

    /// The name errors use for a value of this kind.
    pub fn name(&self) -> &'static str {
        match self {
            ValueKind::Bool => "bool",
            ValueKind::Int => "integer",
            ValueKind::Float => "float",
            ValueKind::Numeric => "numeric",
            ValueKind::Text => "text",
            ValueKind::Json => "json",
            ValueKind::Bytea => "bytea",
            ValueKind::Date => "date",
            ValueKind::Timestamp => "timestamp",
            ValueKind::Timestamptz => "timestamptz",
            ValueKind::Array { .. } => "array",
        }
    }
}

/// Appends one JSON value for `text`, a value in PostgreSQL's text format.
/// On error `out` is left as it was.
pub fn write_text_value(
    kind: &ValueKind,
    text: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    let len = out.len();
    let r = write_value(kind, text, out);
    if r.is_err() {
        out.truncate(len);
    }
    r
}

/// [`write_text_value`] without the clean-up, for the array writer, whose
/// caller cleans up once.
pub(crate) fn write_value(
    kind: &ValueKind,
    text: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    match kind {
        ValueKind::Bool => match text {
            b"t" => out.extend_from_slice(b"true"),
            b"f" => out.extend_from_slice(b"false"),
            _ => return Err(ValueError::new("bool", "expected t or f")),
        },
        ValueKind::Int => {
            if !is_json_integer(text) {
                return Err(ValueError::new("integer", "not a whole number"));
            }
            out.extend_from_slice(text);
        }
        ValueKind::Float => match text {
            b"NaN" | b"Infinity" | b"-Infinity" => write_plain_json_str(text, out),
            _ if is_json_number(text) => out.extend_from_slice(text),
            _ => return Err(ValueError::new("float", "not a number")),
        },
        ValueKind::Numeric => {
            if !is_numeric(text) {
                return Err(ValueError::new("numeric", "not a decimal number"));
            }
            write_plain_json_str(text, out);
        }
        ValueKind::Text => write_json_string_of(text, out, "text")?,
        ValueKind::Json => write_json(text, out)?,
        ValueKind::Bytea => write_bytea(text, out)?,
        ValueKind::Date => write_datetime(DateKind::Date, text, out)?,
        ValueKind::Timestamp => write_datetime(DateKind::Timestamp, text, out)?,
        ValueKind::Timestamptz => write_datetime(DateKind::Timestamptz, text, out)?,
        ValueKind::Array { elem, delim } => write_array(elem, *delim, text, out)?,
    }
    Ok(())
}

/// `-?(0|[1-9][0-9]*)`: what int2out/int4out/int8out/oidout print.
fn is_json_integer(t: &[u8]) -> bool {
    let digits = t.strip_prefix(b"-").unwrap_or(t);
    match digits {
        [b'0'] => true,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// JSON's number grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn is_json_number(t: &[u8]) -> bool {
    let mut c = Scan { t, i: 0 };
    c.eat(b'-');
    if !c.eat(b'0') && c.digits() == 0 {
        return false;
    }
    if c.eat(b'.') && c.digits() == 0 {
        return false;
    }
    if c.eat(b'e') || c.eat(b'E') {
        if !c.eat(b'+') {
            c.eat(b'-');
        }
        if c.digits() == 0 {
            return false;
        }
    }
    c.i == t.len()
}

/// numeric_out: `-?[0-9]+(\.[0-9]+)?`, `NaN`, `Infinity` or `-Infinity`.
fn is_numeric(t: &[u8]) -> bool {
    if matches!(t, b"NaN" | b"Infinity" | b"-Infinity") {
        return true;
    }
    let mut c = Scan { t, i: 0 };
    c.eat(b'-');
    if c.digits() == 0 {
        return false;
    }
    if c.eat(b'.') && c.digits() == 0 {
        return false;
    }
    c.i == t.len()
}

struct Scan<'a> {
    t: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn eat(&mut self, b: u8) -> bool {
        let hit = self.t.get(self.i) == Some(&b);
        if hit {
            self.i += 1;
        }
        hit
    }

    fn digits(&mut self) -> usize {
        let n = self
            .t
            .get(self.i..)
            .unwrap_or_default()
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        self.i += n;
        n
    }
}

/// JSON white space (PostgreSQL's json lexer accepts exactly these).
fn is_json_space(b: &u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// json/jsonb: raw, after the cheap checks the module doc explains.
fn write_json(text: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    let bad = |p| ValueError::new("json", p);
    let start = text.iter().position(|b| !is_json_space(b));
    let end = text.iter().rposition(|b| !is_json_space(b));
    let (Some(&first), Some(&last)) = (
        start.and_then(|i| text.get(i)),
        end.and_then(|i| text.get(i)),
    ) else {
        return Err(bad("empty"));
    };
    let starts_right = matches!(
        first,
        b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n'
    );
    let ends_right = matches!(last, b'}' | b']' | b'"' | b'0'..=b'9' | b'e' | b'l');
    if !starts_right || !ends_right {
        return Err(bad("does not start and end like a JSON value"));
    }
    if std::str::from_utf8(text).is_err() {
        return Err(bad("not valid UTF-8"));
    }
    out.extend_from_slice(text);
    Ok(())
}

/// Raw bytes decoded per chunk before base64: a multiple of 3, so every
/// chunk but the last encodes without padding.
const BYTEA_CHUNK: usize = 384;

/// bytea → `"base64"`, decoding through a stack buffer: no allocation.
fn write_bytea(text: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    let bad = |p| ValueError::new("bytea", p);
    let mut raw = [0u8; BYTEA_CHUNK];
    let mut n = 0;
    out.push(b'"');
    if let Some(hex) = text.strip_prefix(b"\\x") {
        if hex.len() % 2 != 0 {
            return Err(bad("odd number of hex digits"));
        }
        out.reserve(hex.len() / 2 * 4 / 3 + 4);
        for pair in hex.chunks_exact(2) {
            let (Some(hi), Some(lo)) = (
                pair.first().and_then(|b| hex_val(*b)),
                pair.get(1).and_then(|b| hex_val(*b)),
            ) else {
                return Err(bad("not a hex digit"));
            };
            push_raw(&mut raw, &mut n, (hi << 4) | lo, out);
        }
    } else {
        // The escape format: `\\` is a backslash, `\ooo` an octal byte,
        // every other byte itself.
        let mut i = 0;
        while let Some(&b) = text.get(i) {
            if b != b'\\' {
                push_raw(&mut raw, &mut n, b, out);
                i += 1;
            } else if text.get(i + 1) == Some(&b'\\') {
                push_raw(&mut raw, &mut n, b'\\', out);
                i += 2;
            } else {
                let byte = text
                    .get(i + 1..i + 4)
                    .and_then(octal_byte)
                    .ok_or(bad("bad escape (bytea_output must be hex)"))?;
                push_raw(&mut raw, &mut n, byte, out);
                i += 4;
            }
        }
    }
    encode_base64(raw.get(..n).unwrap_or_default(), out);
    out.push(b'"');
    Ok(())
}

/// A bytea value's bytes, from PostgreSQL's hex output (`\\x00ff`; the
/// connection pins `bytea_output = hex`).
pub fn bytea_bytes(text: &[u8]) -> Result<Vec<u8>, ValueError> {
    let bad = |p| ValueError::new("bytea", p);
    let hex = text
        .strip_prefix(b"\\x")
        .ok_or(bad("not in hex format (bytea_output must be hex)"))?;
    if hex.len() % 2 != 0 {
        return Err(bad("odd number of hex digits"));
    }
    hex.chunks_exact(2)
        .map(|d| match (hex_val(d[0]), hex_val(d[1])) {
            (Some(h), Some(l)) => Ok(h << 4 | l),
            _ => Err(bad("bad hex digit")),
        })
        .collect()
}

fn push_raw(raw: &mut [u8; BYTEA_CHUNK], n: &mut usize, b: u8, out: &mut Vec<u8>) {
    if let Some(slot) = raw.get_mut(*n) {
        *slot = b;
        *n += 1;
    }
    if *n == BYTEA_CHUNK {
        encode_base64(raw, out);
        *n = 0;
    }
}

fn encode_base64(raw: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + raw.len().div_ceil(3) * 4, 0);
    let written = out.get_mut(start..).map(|dst| {
        base64::engine::general_purpose::STANDARD
            .encode_slice(raw, dst)
            .unwrap_or(0)
    });
    // The slice was sized for the output, so `written` is the full size;
    // truncating keeps `out` well-formed even if it were not.
    out.truncate(start + written.unwrap_or(0));
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Three octal digits, at most `\377`.
fn octal_byte(d: &[u8]) -> Option<u8> {
    let [a, b, c] = *d else { return None };
    let digit = |x: u8| matches!(x, b'0'..=b'7').then(|| u32::from(x - b'0'));
    let v = digit(a)? * 64 + digit(b)? * 8 + digit(c)?;
    u8::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn w(kind: &ValueKind, text: &str) -> Result<String, ValueError> {
        let mut out = Vec::new();
        write_text_value(kind, text.as_bytes(), &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    /// A kind spec of the fixture: `bool|int|float|numeric|text|json|bytea|
    /// date|timestamp|timestamptz|array<delim><spec>`.
    fn spec(s: &str) -> ValueKind {
        use ValueKind::*;
        if let Some(rest) = s.strip_prefix("array") {
            let delim = rest.as_bytes()[0];
            return Array {
                elem: Box::new(spec(&rest[1..])),
                delim,
            };
        }
        match s {
            "bool" => Bool,
            "int" => Int,
            "float" => Float,
            "numeric" => Numeric,
            "text" => Text,
            "json" => Json,
            "bytea" => Bytea,
            "date" => Date,
            "timestamp" => Timestamp,
            "timestamptz" => Timestamptz,
            other => panic!("unknown kind spec {other}"),
        }
    }

    struct Row {
        line: usize,
        versions: String,
        type_name: String,
        oid: u32,
        kind: ValueKind,
        text: String,
        expected: String,
    }

    fn fixture() -> Vec<Row> {
        let tsv = include_str!("../../tests/fixtures/values/values.tsv");
        tsv.lines()
            .enumerate()
            .filter(|(_, l)| !l.starts_with('#'))
            .map(|(i, l)| {
                let f: Vec<&str> = l.split('\t').collect();
                assert_eq!(f.len(), 6, "line {}", i + 1);
                Row {
                    line: i + 1,
                    versions: f[0].to_string(),
                    type_name: f[1].to_string(),
                    oid: f[2].parse().unwrap(),
                    kind: spec(f[3]),
                    text: serde_json::from_str(f[4]).unwrap(),
                    expected: serde_json::from_str(f[5]).unwrap(),
                }
            })
            .collect()
    }

    /// The expected JSON in the fixture was computed by PostgreSQL from the
    /// typed value (to_json, encode(..., 'base64'), extract, to_char), and
    /// the text was checked to be what a walsender sends; see
    /// tests/fixtures/values/capture.py.
    #[test]
    fn every_fixture_value_is_written_as_postgresql_computed_it() {
        let rows = fixture();
        assert!(rows.len() > 250, "fixture has {} rows", rows.len());
        for r in &rows {
            let got = w(&r.kind, &r.text).unwrap_or_else(|e| {
                panic!(
                    "line {} ({}, PG {}): {e}: {:?}",
                    r.line, r.type_name, r.versions, r.text
                )
            });
            assert_eq!(
                got, r.expected,
                "line {} ({}, PG {})",
                r.line, r.type_name, r.versions
            );
        }
    }

    #[test]
    fn fixture_types_resolve_to_their_kind_by_oid() {
        for r in fixture().iter().filter(|r| r.oid != 0) {
            assert_eq!(
                ValueKind::for_builtin_oid(r.oid).as_ref(),
                Some(&r.kind),
                "line {} ({})",
                r.line,
                r.type_name
            );
        }
    }

    /// Every output is JSON, and a value parses back to what PostgreSQL
    /// meant: arrays have the same shape and nulls, strings the same text.
    #[test]
    fn every_fixture_output_is_valid_json() {
        for r in fixture() {
            let got = w(&r.kind, &r.text).unwrap();
            let v: Value = match serde_json::from_str(&got) {
                Ok(v) => v,
                // Raw json that serde_json cannot hold in a Value (1e400 is
                // beyond f64, "\ud800" is a lone surrogate; see the module
                // doc): check the grammar alone.
                Err(_) if has_json(&r.kind) => {
                    assert!(
                        serde_json::from_str::<serde::de::IgnoredAny>(&got).is_ok(),
                        "line {}: {got} is not JSON",
                        r.line
                    );
                    continue;
                }
                Err(e) => panic!("line {}: {got} is not JSON: {e}", r.line),
            };
            let want: Value = serde_json::from_str(&r.expected).unwrap();
            assert_eq!(v, want, "line {}", r.line);
            match (&r.kind, &v) {
                (ValueKind::Array { .. }, Value::Array(_)) => {}
                (ValueKind::Array { .. }, _) => panic!("line {}: not an array", r.line),
                (ValueKind::Bool, Value::Bool(_)) | (ValueKind::Int, Value::Number(_)) => {}
                (ValueKind::Bool | ValueKind::Int, _) => panic!("line {}: wrong JSON type", r.line),
                _ => {}
            }
        }
    }

    #[test]
    fn every_builtin_type_of_postgresql_has_a_kind() {
        let tsv = include_str!("../../tests/fixtures/values/builtin_types.tsv");
        let mut types = std::collections::HashMap::new();
        let rows: Vec<Vec<&str>> = tsv
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split('\t').collect())
            .collect();
        for f in &rows {
            types.insert(f[1].parse::<u32>().unwrap(), f.clone());
        }
        let scalar = |typname: &str| -> ValueKind {
            use ValueKind::*;
            match typname {
                "bool" => Bool,
                "int2" | "int4" | "int8" | "oid" => Int,
                "float4" | "float8" => Float,
                "numeric" => Numeric,
                "json" | "jsonb" => Json,
                "bytea" => Bytea,
                "date" => Date,
                "timestamp" => Timestamp,
                "timestamptz" => Timestamptz,
                _ => Text,
            }
        };
        assert!(rows.len() > 190);
        for f in &rows {
            let (oid, typname, typtype, elem_oid, elem_name, elem_delim) =
                (f[1].parse::<u32>().unwrap(), f[2], f[3], f[6], f[7], f[8]);
            let want = if typtype == "p" {
                None
            } else if !elem_oid.is_empty() {
                let elem_typtype = types[&elem_oid.parse::<u32>().unwrap()][3];
                // An array of a pseudo-type (cstring[]) prints its
                // elements as strings.
                let elem = if elem_typtype == "p" {
                    ValueKind::Text
                } else {
                    scalar(elem_name)
                };
                Some(ValueKind::Array {
                    elem: Box::new(elem),
                    delim: elem_delim.as_bytes()[0],
                })
            } else {
                Some(scalar(typname))
            };
            assert_eq!(ValueKind::for_builtin_oid(oid), want, "{oid} {typname}");
        }
        assert_eq!(ValueKind::for_builtin_oid(10_000), None);
        assert_eq!(ValueKind::for_builtin_oid(16_384), None);
        assert_eq!(ValueKind::for_builtin_oid(u32::MAX), None);
    }

    #[test]
    fn scalars_the_fixture_cannot_produce() {
        use ValueKind::*;
        let cases: &[(ValueKind, &str, &str)] = &[
            // bytea in the escape format (bytea_output=escape).
            (Bytea, "\\000\\377A\\\\", "\"AP9BXA==\""),
            (Bytea, "", "\"\""),
            (Bytea, "\\x0102FF", "\"AQL/\""),
            (Float, "1E+20", "1E+20"),
            (Json, "\n[1]\n", "\n[1]\n"),
            (Json, "true", "true"),
            (Int, "-0", "-0"),
        ];
        for (k, input, want) in cases {
            assert_eq!(w(k, input).as_deref(), Ok(*want), "{k:?} {input:?}");
        }
    }

    #[test]
    fn long_bytea_crosses_chunks() {
        for len in [0, 1, 2, 3, 383, 384, 385, 767, 768, 769, 1000, 5000] {
            let raw: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let want = format!(
                "\"{}\"",
                base64::engine::general_purpose::STANDARD.encode(&raw)
            );
            assert_eq!(
                w(&ValueKind::Bytea, &format!("\\x{hex}")).unwrap(),
                want,
                "{len}"
            );
            let esc: String = raw.iter().map(|b| format!("\\{b:03o}")).collect();
            assert_eq!(w(&ValueKind::Bytea, &esc).unwrap(), want, "{len} escaped");
        }
    }

    #[test]
    fn malformed_values_are_errors_without_their_content() {
        use ValueKind::*;
        let cases: &[(ValueKind, &str)] = &[
            (Bool, "true"),
            (Bool, ""),
            (Int, "1.5"),
            (Int, ""),
            (Int, "-"),
            (Int, "007"),
            (Int, "+1"),
            (Int, "1e3"),
            (Int, " 1"),
            (Float, "inf"),
            (Float, "nan"),
            (Float, "1."),
            (Float, ".5"),
            (Float, "1e"),
            (Float, "+1"),
            (Float, "0x10"),
            (Float, "01"),
            (Float, ""),
            (Numeric, "1e5"),
            (Numeric, "1,5"),
            (Numeric, "1."),
            (Numeric, ""),
            (Numeric, "nan"),
            (Numeric, "\"1\""),
            (Json, ""),
            (Json, " \n"),
            (Json, "secret"),
            (Json, "{\"a\":1,"),
            (Bytea, "abc\\"),
            (Bytea, "\\x0"),
            (Bytea, "\\xzz"),
            (Bytea, "\\400"),
            (Bytea, "\\12"),
            (Date, "22/11/2026"),
            (Timestamptz, "2026-11-22 18:31:10 EST"),
            (
                Array {
                    elem: Box::new(Int),
                    delim: b',',
                },
                "{1,x}",
            ),
        ];
        for (k, input) in cases {
            let mut out = b"[".to_vec();
            let e = write_text_value(k, input.as_bytes(), &mut out).expect_err(input);
            assert_eq!(out, b"[", "{k:?} {input:?} left output behind");
            if input.len() > 2 {
                assert!(!e.to_string().contains(input), "{e} leaks the value");
            }
            let err: crate::error::Error = e.into();
            assert_eq!(err.kind(), crate::error::Kind::Decode);
        }
        for (k, bytes) in [
            (Text, &[0xc3][..]),
            (Json, b"\"\xff\""),
            (Text, b"a\xed\xa0\x80"),
        ] {
            assert!(
                write_text_value(&k, bytes, &mut Vec::new()).is_err(),
                "{k:?} {bytes:?}"
            );
        }
    }

    /// Whether raw json can be part of the output (only cheaply checked).
    fn has_json(k: &ValueKind) -> bool {
        match k {
            ValueKind::Json => true,
            ValueKind::Array { elem, .. } => has_json(elem),
            _ => false,
        }
    }

    fn all_kinds() -> Vec<ValueKind> {
        use ValueKind::*;
        let scalars = vec![
            Bool,
            Int,
            Float,
            Numeric,
            Text,
            Json,
            Bytea,
            Date,
            Timestamp,
            Timestamptz,
        ];
        let mut kinds = scalars.clone();
        for s in scalars {
            kinds.push(Array {
                elem: Box::new(s.clone()),
                delim: b',',
            });
            kinds.push(Array {
                elem: Box::new(s),
                delim: b';',
            });
        }
        kinds.push(Array {
            elem: Box::new(Array {
                elem: Box::new(Int),
                delim: b',',
            }),
            delim: b',',
        });
        kinds
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_for_any_kind(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            for k in all_kinds() {
                let mut out = Vec::new();
                match write_text_value(&k, &b, &mut out) {
                    // Everything but raw json is checked here to be JSON.
                    Ok(()) if !has_json(&k) => prop_assert!(
                        serde_json::from_slice::<serde::de::IgnoredAny>(&out).is_ok(), "{:?}", k
                    ),
                    Ok(()) => {}
                    Err(_) => prop_assert!(out.is_empty(), "an error left output behind"),
                }
            }
        }

        #[test]
        fn value_shaped_noise_never_panics(s in "[-+0-9a-zA-Z.:{}\\[\\]=,;\"\\\\ \t\n]{0,40}") {
            for k in all_kinds() {
                let mut out = Vec::new();
                if write_text_value(&k, s.as_bytes(), &mut out).is_ok() && !has_json(&k) {
                    prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&out).is_ok(), "{:?} {:?}", k, s);
                }
            }
        }

        #[test]
        fn every_f64_and_f32_as_rust_prints_it_is_a_number(f in any::<f64>(), g in any::<f32>()) {
            for s in [format!("{f:e}"), format!("{f}"), format!("{g:e}"), format!("{g}")] {
                let mut out = Vec::new();
                match write_text_value(&ValueKind::Float, s.as_bytes(), &mut out) {
                    Ok(()) => { serde_json::from_slice::<serde::de::IgnoredAny>(&out).unwrap(); }
                    Err(_) => prop_assert!(s.contains("inf") || s.contains("NaN"), "{}", s),
                }
            }
        }

        #[test]
        fn integers_are_copied(i in any::<i64>(), u in any::<u32>()) {
            prop_assert_eq!(w(&ValueKind::Int, &i.to_string()).unwrap(), i.to_string());
            prop_assert_eq!(w(&ValueKind::Int, &u.to_string()).unwrap(), u.to_string());
        }

        #[test]
        fn bytea_hex_is_base64_of_the_bytes(raw in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let got = w(&ValueKind::Bytea, &format!("\\x{hex}")).unwrap();
            let s: String = serde_json::from_str(&got).unwrap();
            prop_assert_eq!(base64::engine::general_purpose::STANDARD.decode(s).unwrap(), raw);
        }
    }
}
