//! array_parse: PostgreSQL's array text format (`{1,2}`, `[0:1]={a,b}`,
//! `{{"a b",NULL}}`, box's `;`) → JSON, through `write_text_value`.
//!
//! Input: byte 0 picks the element kind (`kind`), byte 1 the
//! delimiter (0 is `,`, 1 is `;`, any other byte is itself, so unsupported
//! delimiters are tried too), the rest is the array text.
//!
//! Checks: nothing panics; an error leaves the output buffer as it was; an
//! accepted array of JSON-free elements is valid JSON, an array, and
//! rectangular with at most 6 dimensions, as `array_in` would require.
#![no_main]

mod kinds;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use walnats::value::ValueKind;

fuzz_target!(|data: &[u8]| {
    let [e, d, text @ ..] = data else { return };
    let elem = kind(*e);
    let nested = matches!(elem, ValueKind::Array { .. });
    let delim = match *d {
        0 => b',',
        1 => b';',
        b => b,
    };
    let kind = ValueKind::Array {
        elem: Box::new(elem),
        delim,
    };
    let Some(written) = kinds::write_and_check(&kind, text) else {
        return;
    };
    assert_eq!(written.first(), Some(&b'['), "not an array");
    // Fails only on a float beyond f64, checked by the grammar above.
    let Ok(v) = serde_json::from_slice::<Value>(&written) else {
        return;
    };
    if !nested {
        check_shape(&v);
    }
});

/// The element kinds, chosen by `byte % 11`; 10 is an array of integers
/// (an array of a domain over an array, as `intarr[]` in the fixtures).
pub fn kind(byte: u8) -> ValueKind {
    match byte % 11 {
        0 => ValueKind::Bool,
        1 => ValueKind::Int,
        2 => ValueKind::Float,
        3 => ValueKind::Numeric,
        4 => ValueKind::Text,
        5 => ValueKind::Json,
        6 => ValueKind::Bytea,
        7 => ValueKind::Date,
        8 => ValueKind::Timestamp,
        9 => ValueKind::Timestamptz,
        _ => ValueKind::Array {
            elem: Box::new(ValueKind::Int),
            delim: b',',
        },
    }
}

/// Every sub-array of a level has the first one's length, leaves are all
/// at the same depth, and there are at most 6 levels (MAXDIM). `[]` is the
/// empty array, of no dimension.
fn check_shape(v: &Value) {
    let mut lens = Vec::new();
    let mut first = v;
    while let Value::Array(a) = first {
        lens.push(a.len());
        match a.first() {
            Some(x) => first = x,
            None => break,
        }
    }
    assert!(lens.len() <= 6, "{} dimensions: {v}", lens.len());
    if lens == [0] {
        return;
    }
    assert!(!lens.contains(&0), "an empty sub-array: {v}");
    fn walk(v: &Value, lens: &[usize], whole: &Value) {
        match (v, lens.split_first()) {
            (Value::Array(a), Some((&n, rest))) => {
                assert_eq!(a.len(), n, "not rectangular: {whole}");
                for x in a {
                    walk(x, rest, whole);
                }
            }
            (Value::Array(_), None) => panic!("an array as element: {whole}"),
            (_, Some(_)) => panic!("an element where a sub-array belongs: {whole}"),
            (_, None) => {}
        }
    }
    walk(v, &lens, v);
}
