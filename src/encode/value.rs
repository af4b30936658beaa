//! PostgreSQL values in text format → JSON, as the contract's type table
//! says.
//!
//! The replication connection fixes DateStyle ISO, IntervalStyle postgres,
//! TimeZone UTC, extra_float_digits 3 and bytea_output hex, so every value
//! arrives in one known spelling. Writers append straight to the caller's
//! buffer; nothing is allocated per value on the common paths. A value
//! that does not parse is an error naming its type, never its content
//! (values can be secrets).
//!
//! Choices where the contract is silent:
//! - BC dates and timestamps use ISO 8601 expanded years with astronomical
//!   numbering (`0044-03-15 BC` → `-0043-03-15`): sortable, reversible.
//! - A float that PostgreSQL printed in a form JSON cannot hold as a number
//!   (none is known with extra_float_digits 3) is kept as a string.
//! - json and jsonb are copied raw: PostgreSQL validated them on input.

use base64::Engine;

use super::array::write_array;
use super::json_str::{write_json_str_unchecked, write_json_string};

/// How a column's values are written; resolved once per relation column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueKind {
    Bool,
    /// int2, int4, int8, oid: a JSON number.
    Int,
    /// float4, float8: a number; NaN and ±Infinity as strings.
    Float,
    /// numeric: the string PostgreSQL prints.
    Numeric,
    /// Every type written as the string PostgreSQL prints (text, uuid,
    /// time, interval, enum labels, ranges, inet...).
    Text,
    /// json, jsonb: the JSON value itself.
    Json,
    /// bytea: base64.
    Bytea,
    Date,
    Timestamp,
    Timestamptz,
    Array {
        elem: Box<ValueKind>,
        delim: u8,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{type_name} value is malformed: {problem}")]
pub struct ValueError {
    type_name: &'static str,
    problem: &'static str,
}

impl ValueError {
    pub fn new(type_name: &'static str, problem: &'static str) -> ValueError {
        ValueError { type_name, problem }
    }
}

impl From<ValueError> for crate::error::Error {
    fn from(e: ValueError) -> Self {
        crate::error::Error::new(crate::error::Kind::Decode, e.to_string())
    }
}

fn array_of(elem: ValueKind) -> Option<ValueKind> {
    Some(ValueKind::Array {
        elem: Box::new(elem),
        delim: b',',
    })
}

impl ValueKind {
    /// The built-in types whose JSON form is not a plain string, their
    /// arrays, and the common text types. `None` for everything else: the
    /// caller asks `pg_type` (enums, domains, other arrays...).
    pub fn for_builtin_oid(oid: u32) -> Option<ValueKind> {
        use ValueKind::*;
        match oid {
            16 => Some(Bool),
            20 | 21 | 23 | 26 => Some(Int),
            700 | 701 => Some(Float),
            1700 => Some(Numeric),
            25 | 1043 | 1042 | 19 | 18 | 2950 | 1083 | 1266 | 1186 => Some(Text),
            114 | 3802 => Some(Json),
            17 => Some(Bytea),
            1082 => Some(Date),
            1114 => Some(Timestamp),
            1184 => Some(Timestamptz),
            1000 => array_of(Bool),
            1005 | 1007 | 1016 | 1028 => array_of(Int),
            1021 | 1022 => array_of(Float),
            1231 => array_of(Numeric),
            1009 | 1015 | 1014 | 1003 | 1002 | 2951 | 1183 | 1270 | 1187 => array_of(Text),
            199 | 3807 => array_of(Json),
            1001 => array_of(Bytea),
            1182 => array_of(Date),
            1115 => array_of(Timestamp),
            1185 => array_of(Timestamptz),
            // box[] is the one built-in array whose delimiter is ';'.
            1020 => Some(Array {
                elem: Box::new(Text),
                delim: b';',
            }),
            _ => None,
        }
    }
}

/// Appends one JSON value for `text`, a value in PostgreSQL's text format.
pub fn write_text_value(
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
            if !is_integer(text) {
                return Err(ValueError::new("integer", "not a whole number"));
            }
            out.extend_from_slice(text);
        }
        ValueKind::Float => match text {
            b"NaN" | b"Infinity" | b"-Infinity" => write_json_str_unchecked(text, out),
            _ if is_json_number(text) => out.extend_from_slice(text),
            _ => write_json_string(text, out)?,
        },
        ValueKind::Numeric => {
            if !text
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
            {
                return Err(ValueError::new("numeric", "unexpected characters"));
            }
            write_json_str_unchecked(text, out);
        }
        ValueKind::Text => write_json_string(text, out)?,
        ValueKind::Json => {
            if std::str::from_utf8(text).is_err() {
                return Err(ValueError::new("json", "not valid UTF-8"));
            }
            if text.iter().all(u8::is_ascii_whitespace) {
                return Err(ValueError::new("json", "empty"));
            }
            out.extend_from_slice(text);
        }
        ValueKind::Bytea => write_bytea(text, out)?,
        ValueKind::Date => write_datetime(text, out, DateKind::Date)?,
        ValueKind::Timestamp => write_datetime(text, out, DateKind::Timestamp)?,
        ValueKind::Timestamptz => write_datetime(text, out, DateKind::Timestamptz)?,
        ValueKind::Array { elem, delim } => write_array(elem, *delim, text, out)?,
    }
    Ok(())
}

fn is_integer(t: &[u8]) -> bool {
    let digits = t.strip_prefix(b"-").unwrap_or(t);
    !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
}

/// JSON's number grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
fn is_json_number(t: &[u8]) -> bool {
    let mut i = 0;
    let at = |i: usize| t.get(i).copied();
    if at(i) == Some(b'-') {
        i += 1;
    }
    match at(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while matches!(at(i), Some(b'0'..=b'9')) {
                i += 1;
            }
        }
        _ => return false,
    }
    if at(i) == Some(b'.') {
        i += 1;
        let s = i;
        while matches!(at(i), Some(b'0'..=b'9')) {
            i += 1;
        }
        if i == s {
            return false;
        }
    }
    if matches!(at(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(at(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let s = i;
        while matches!(at(i), Some(b'0'..=b'9')) {
            i += 1;
        }
        if i == s {
            return false;
        }
    }
    i == t.len()
}

fn write_bytea(text: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    let hex = text
        .strip_prefix(b"\\x")
        .ok_or(ValueError::new("bytea", "expected hex format (\\x...)"))?;
    if hex.len() % 2 != 0 {
        return Err(ValueError::new("bytea", "odd number of hex digits"));
    }
    let mut raw = Vec::with_capacity(hex.len() / 2);
    for pair in hex.chunks_exact(2) {
        let (Some(h), Some(l)) = (
            pair.first().and_then(|b| hex_val(*b)),
            pair.get(1).and_then(|b| hex_val(*b)),
        ) else {
            return Err(ValueError::new("bytea", "not a hex digit"));
        };
        raw.push((h << 4) | l);
    }
    out.push(b'"');
    // Standard alphabet, padded: 4 output bytes per 3 input bytes.
    let start = out.len();
    out.resize(start + raw.len().div_ceil(3) * 4, 0);
    if let Some(dst) = out.get_mut(start..) {
        let n = base64::engine::general_purpose::STANDARD
            .encode_slice(&raw, dst)
            .map_err(|_| ValueError::new("bytea", "base64 buffer too small"))?;
        out.truncate(start + n);
    }
    out.push(b'"');
    Ok(())
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DateKind {
    Date,
    Timestamp,
    Timestamptz,
}

impl DateKind {
    fn name(self) -> &'static str {
        match self {
            DateKind::Date => "date",
            DateKind::Timestamp => "timestamp",
            DateKind::Timestamptz => "timestamptz",
        }
    }
}

/// ISO-style output: `YYYY-MM-DD[ HH:MM:SS[.ffffff][+HH[:MM[:SS]]]][ BC]`.
fn write_datetime(text: &[u8], out: &mut Vec<u8>, kind: DateKind) -> Result<(), ValueError> {
    let bad = |p| ValueError::new(kind.name(), p);
    if text == b"infinity" || text == b"-infinity" {
        write_json_str_unchecked(text, out);
        return Ok(());
    }
    let (body, bc) = match text.strip_suffix(b" BC") {
        Some(b) => (b, true),
        None => (text, false),
    };
    if !body.is_ascii() {
        return Err(bad("not ASCII"));
    }
    // The year runs to the first '-' (it may have more than 4 digits).
    let dash = body.iter().position(|&b| b == b'-').ok_or(bad("no date"))?;
    let (year, rest) = body.split_at(dash);
    if year.is_empty() || !year.iter().all(u8::is_ascii_digit) || year.len() > 9 {
        return Err(bad("bad year"));
    }
    // rest = "-MM-DD..." ; date part is 6 bytes.
    let md = rest.get(..6).ok_or(bad("short date"))?;
    if !(md.first() == Some(&b'-')
        && md.get(3) == Some(&b'-')
        && md
            .get(1..3)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
        && md
            .get(4..6)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit)))
    {
        return Err(bad("bad month or day"));
    }
    let time = rest.get(6..).unwrap_or_default();
    out.push(b'"');
    if bc {
        // 1 BC is year 0, 2 BC is -1: astronomical numbering.
        let y: u64 = std::str::from_utf8(year)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(bad("bad year"))?;
        let astro = y.saturating_sub(1);
        if astro == 0 {
            out.extend_from_slice(b"0000");
        } else {
            out.extend_from_slice(format!("-{astro:04}").as_bytes());
        }
    } else {
        out.extend_from_slice(year);
    }
    out.extend_from_slice(md);
    match kind {
        DateKind::Date => {
            if !time.is_empty() {
                return Err(bad("trailing characters"));
            }
        }
        DateKind::Timestamp | DateKind::Timestamptz => {
            let t = time.strip_prefix(b" ").ok_or(bad("no time"))?;
            // HH:MM:SS
            let hms = t.get(..8).ok_or(bad("short time"))?;
            if !(hms.get(2) == Some(&b':') && hms.get(5) == Some(&b':')) {
                return Err(bad("bad time"));
            }
            let mut i = 8;
            if t.get(i) == Some(&b'.') {
                i += 1;
                while t.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
            }
            let (clock, zone) = t.split_at(i);
            if !clock
                .iter()
                .all(|b| b.is_ascii_digit() || *b == b':' || *b == b'.')
            {
                return Err(bad("bad time"));
            }
            out.push(b'T');
            out.extend_from_slice(clock);
            match kind {
                DateKind::Timestamp => {
                    if !zone.is_empty() {
                        return Err(bad("trailing characters"));
                    }
                }
                _ => write_zone(zone, out).ok_or(bad("bad time zone"))?,
            }
        }
    }
    out.push(b'"');
    Ok(())
}

/// `+00` → `Z`; any other offset `+HH[:MM[:SS]]` → `+HH:MM[:SS]`.
fn write_zone(zone: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let sign = *zone.first()?;
    if sign != b'+' && sign != b'-' {
        return None;
    }
    let parts: Vec<&[u8]> = zone.get(1..)?.split(|&b| b == b':').collect();
    if parts.is_empty()
        || parts.len() > 3
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.iter().all(u8::is_ascii_digit))
    {
        return None;
    }
    if parts.iter().all(|p| *p == b"00") {
        out.push(b'Z');
        return Some(());
    }
    out.push(sign);
    out.extend_from_slice(parts.first()?);
    out.push(b':');
    out.extend_from_slice(parts.get(1).copied().unwrap_or(b"00"));
    if let Some(s) = parts.get(2) {
        out.push(b':');
        out.extend_from_slice(s);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(kind: &ValueKind, text: &str) -> Result<String, ValueError> {
        let mut out = Vec::new();
        write_text_value(kind, text.as_bytes(), &mut out)?;
        let s = String::from_utf8(out).unwrap();
        serde_json::from_str::<serde_json::Value>(&s)
            .unwrap_or_else(|e| panic!("{s} is not JSON: {e}"));
        Ok(s)
    }

    #[test]
    fn scalars_follow_the_contract() {
        use ValueKind::*;
        let cases: &[(ValueKind, &str, &str)] = &[
            (Bool, "t", "true"),
            (Bool, "f", "false"),
            (Int, "-32768", "-32768"),
            (Int, "9223372036854775807", "9223372036854775807"),
            (Int, "4294967295", "4294967295"),
            (Float, "1.5", "1.5"),
            (Float, "-0", "-0"),
            (Float, "1e+20", "1e+20"),
            (Float, "1.2345678e-05", "1.2345678e-05"),
            (Float, "0.1", "0.1"),
            (Float, "NaN", "\"NaN\""),
            (Float, "Infinity", "\"Infinity\""),
            (Float, "-Infinity", "\"-Infinity\""),
            (Numeric, "19.90", "\"19.90\""),
            (Numeric, "NaN", "\"NaN\""),
            (
                Numeric,
                "-1234567890123456789012345678901234567890.5",
                "\"-1234567890123456789012345678901234567890.5\"",
            ),
            (Numeric, "Infinity", "\"Infinity\""),
            (Text, "hé \"q\"\n\\", "\"hé \\\"q\\\"\\n\\\\\""),
            (Json, "{\"a\": [1, 2.50]}", "{\"a\": [1, 2.50]}"),
            (Json, "\"s\"", "\"s\""),
            (Bytea, "\\x0102ff", "\"AQL/\""),
            (Bytea, "\\x", "\"\""),
            (Date, "2026-11-22", "\"2026-11-22\""),
            (Date, "infinity", "\"infinity\""),
            (Date, "-infinity", "\"-infinity\""),
            (Date, "0044-03-15 BC", "\"-0043-03-15\""),
            (Date, "0001-01-01 BC", "\"0000-01-01\""),
            (Date, "12345-01-01", "\"12345-01-01\""),
            (
                Timestamp,
                "2026-11-22 18:31:10.123456",
                "\"2026-11-22T18:31:10.123456\"",
            ),
            (Timestamp, "2026-11-22 18:31:10", "\"2026-11-22T18:31:10\""),
            (
                Timestamp,
                "2026-11-22 18:31:10.5",
                "\"2026-11-22T18:31:10.5\"",
            ),
            (
                Timestamp,
                "0044-03-15 12:00:00 BC",
                "\"-0043-03-15T12:00:00\"",
            ),
            (Timestamp, "-infinity", "\"-infinity\""),
            (
                Timestamptz,
                "2026-11-22 18:31:10.123456+00",
                "\"2026-11-22T18:31:10.123456Z\"",
            ),
            (
                Timestamptz,
                "2026-11-22 18:31:10+00",
                "\"2026-11-22T18:31:10Z\"",
            ),
            (
                Timestamptz,
                "2026-11-22 18:31:10+05:30",
                "\"2026-11-22T18:31:10+05:30\"",
            ),
            (
                Timestamptz,
                "2026-11-22 18:31:10-03",
                "\"2026-11-22T18:31:10-03:00\"",
            ),
            (
                Timestamptz,
                "0044-03-15 12:00:00+00 BC",
                "\"-0043-03-15T12:00:00Z\"",
            ),
            (Timestamptz, "infinity", "\"infinity\""),
        ];
        for (k, input, want) in cases {
            assert_eq!(w(k, input).as_deref(), Ok(*want), "{k:?} {input:?}");
        }
    }

    #[test]
    fn malformed_values_are_errors_without_their_content() {
        use ValueKind::*;
        for (k, input) in [
            (Bool, "true"),
            (Int, "1.5"),
            (Int, ""),
            (Int, "-"),
            (Bytea, "abc"),
            (Bytea, "\\x0"),
            (Bytea, "\\xzz"),
            (Date, "22/11/2026"),
            (Date, "2026-11-22x"),
            (Timestamp, "2026-11-22T18:31:10"),
            (Timestamptz, "2026-11-22 18:31:10 EST"),
            (Text, "\u{0}"),
            (Json, " "),
        ] {
            let r = w(&k, input);
            if k == Text {
                assert!(r.is_ok(), "NUL escapes in text are fine");
                continue;
            }
            let e = r.expect_err(input);
            if !input.is_empty() && input.len() > 2 {
                assert!(!e.to_string().contains(input), "{e} leaks the value");
            }
        }
        let mut out = Vec::new();
        assert!(write_text_value(&Text, &[0xc3], &mut out).is_err());
    }

    #[test]
    fn builtin_kinds() {
        assert_eq!(ValueKind::for_builtin_oid(20), Some(ValueKind::Int));
        assert_eq!(
            ValueKind::for_builtin_oid(1020),
            Some(ValueKind::Array {
                elem: Box::new(ValueKind::Text),
                delim: b';'
            })
        );
        assert_eq!(
            ValueKind::for_builtin_oid(869),
            None,
            "inet comes from pg_type"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..48), k in 0usize..11) {
            let kinds = [ValueKind::Bool, ValueKind::Int, ValueKind::Float, ValueKind::Numeric, ValueKind::Text,
                ValueKind::Json, ValueKind::Bytea, ValueKind::Date, ValueKind::Timestamp, ValueKind::Timestamptz,
                ValueKind::Array { elem: Box::new(ValueKind::Int), delim: b',' }];
            let mut out = Vec::new();
            let _ = write_text_value(&kinds[k], &b, &mut out);
        }

        #[test]
        fn json_numbers_accepted_are_json(f in any::<f64>()) {
            let s = format!("{f:e}");
            if is_json_number(s.as_bytes()) {
                prop_assert!(serde_json::from_str::<serde_json::Value>(&s).is_ok());
            }
        }
    }
}
