//! PostgreSQL's array text format (what `array_out` prints) → nested JSON
//! arrays, each element written by its element kind.
//!
//! Owns the parsing of `{1,2,NULL}`, `{{1,2},{3,4}}`,
//! `{"a b","c\"d",NULL,"NULL"}`, `{}`, `[0:1]={1,2}` (bounds other than 1
//! are printed as a decoration; they are checked and dropped, since JSON
//! arrays start at 0) and box's `{(1,1),(0,0);(2,2),(1,1)}` (the delimiter
//! is the element type's `typdelim`). Rules, as `array_in` reads them:
//! - an unquoted `NULL` (any case) is null; a quoted `"NULL"` is the string;
//! - a backslash takes the next byte literally, quoted or not;
//! - white space (`array_in`'s set: space, `\t`, `\n`, `\r`, `\v`, `\f`)
//!   around an element is dropped unless quoted or escaped.
//!
//! The shape is checked as `array_in` would: rectangular, at most 6
//! dimensions (MAXDIM), the same length for every sub-array of a level,
//! and the decoration's dimensions when there is one. Text that
//! `array_out` cannot print (an element mixing quoted and unquoted parts,
//! an empty unquoted element, `{}` inside an array) is an error, never a
//! guess. Nothing is allocated unless an element contains a backslash.

use super::{ValueError, ValueKind, write_value};

/// PostgreSQL's MAXDIM.
const MAX_DIMS: usize = 6;

fn err(problem: &'static str) -> ValueError {
    ValueError::new("array", problem)
}

/// `array_in`'s white space (`scanner_isspace`); note `\v`, which
/// `u8::is_ascii_whitespace` leaves out.
fn is_pg_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Appends the JSON array for `text`, an array of `elem` values separated
/// by `delim`.
pub(crate) fn write_array(
    elem: &ValueKind,
    delim: u8,
    text: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    if delim == b'"' || delim == b'\\' || delim == b'{' || delim == b'}' || is_pg_space(delim) {
        return Err(err("unsupported element delimiter"));
    }
    let mut p = Parser {
        s: text,
        i: 0,
        elem,
        delim,
        scratch: Vec::new(),
        ndims: None,
        lens: [None; MAX_DIMS],
    };
    p.skip_space();
    if p.peek() == Some(b'[') {
        p.bounds()?;
    }
    p.skip_space();
    if p.peek() != Some(b'{') {
        return Err(err("expected '{'"));
    }
    p.i += 1;
    p.level(0, out)?;
    p.skip_space();
    if p.i != text.len() {
        return Err(err("unexpected characters after the array"));
    }
    Ok(())
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    elem: &'a ValueKind,
    delim: u8,
    /// Holds an element with backslash escapes, unescaped.
    scratch: Vec<u8>,
    /// The number of dimensions, once known: from the decoration or from
    /// the depth of the first element.
    ndims: Option<usize>,
    /// The length of each dimension, once known.
    lens: [Option<usize>; MAX_DIMS],
}

/// Where an element's text is, once read.
enum Elem {
    Null,
    /// A range of the input, no escapes in it.
    Slice(usize, usize),
    /// Unescaped into `scratch`.
    Scratch,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(is_pg_space) {
            self.i += 1;
        }
    }

    /// `[lo:hi][lo:hi]...=`: checks the bounds, keeps the lengths.
    fn bounds(&mut self) -> Result<(), ValueError> {
        let mut n = 0;
        while self.peek() == Some(b'[') {
            self.i += 1;
            let first = self.int()?;
            let (lo, hi) = if self.peek() == Some(b':') {
                self.i += 1;
                (first, self.int()?)
            } else {
                (1, first)
            };
            if self.peek() != Some(b']') {
                return Err(err("expected ']' in the dimensions"));
            }
            self.i += 1;
            let len = hi
                .checked_sub(lo)
                .and_then(|d| usize::try_from(d).ok())
                .and_then(|d| d.checked_add(1))
                .ok_or(err("upper bound below lower bound"))?;
            let slot = self.lens.get_mut(n).ok_or(err("more than 6 dimensions"))?;
            *slot = Some(len);
            n += 1;
        }
        self.skip_space();
        if self.peek() != Some(b'=') {
            return Err(err("expected '=' after the dimensions"));
        }
        self.i += 1;
        self.ndims = Some(n);
        Ok(())
    }

    fn int(&mut self) -> Result<i64, ValueError> {
        let neg = self.peek() == Some(b'-');
        if neg || self.peek() == Some(b'+') {
            self.i += 1;
        }
        let start = self.i;
        let mut v: i64 = 0;
        while let Some(d) = self.peek().filter(u8::is_ascii_digit) {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(i64::from(d - b'0')))
                .filter(|v| *v <= i64::from(i32::MAX) + 1)
                .ok_or(err("bound out of range"))?;
            self.i += 1;
        }
        if self.i == start {
            return Err(err("expected a bound"));
        }
        Ok(if neg { -v } else { v })
    }

    /// One `{...}` level whose `{` is consumed; its items sit at `depth`.
    fn level(&mut self, depth: usize, out: &mut Vec<u8>) -> Result<(), ValueError> {
        if depth >= MAX_DIMS {
            return Err(err("more than 6 dimensions"));
        }
        self.skip_space();
        if self.peek() == Some(b'}') {
            self.i += 1;
            // `{}` is the empty array, which has no dimensions; array_out
            // never prints an empty sub-array.
            if depth != 0 || self.ndims.is_some() {
                return Err(err("empty sub-array"));
            }
            out.extend_from_slice(b"[]");
            return Ok(());
        }
        out.push(b'[');
        let mut count = 0usize;
        loop {
            if count > 0 {
                out.push(b',');
            }
            self.skip_space();
            if self.peek() == Some(b'{') {
                if self.ndims.is_some_and(|n| n <= depth + 1) {
                    return Err(err("sub-array where an element belongs"));
                }
                self.i += 1;
                self.level(depth + 1, out)?;
            } else {
                match self.ndims {
                    None => self.ndims = Some(depth + 1),
                    Some(n) if n == depth + 1 => {}
                    Some(_) => return Err(err("element where a sub-array belongs")),
                }
                self.element(out)?;
            }
            count += 1;
            self.skip_space();
            match self.peek() {
                Some(b'}') => {
                    self.i += 1;
                    break;
                }
                Some(b) if b == self.delim => self.i += 1,
                Some(_) => return Err(err("expected a delimiter or '}'")),
                None => return Err(err("unterminated array")),
            }
        }
        let len = self
            .lens
            .get_mut(depth)
            .ok_or(err("more than 6 dimensions"))?;
        match *len {
            None => *len = Some(count),
            Some(n) if n == count => {}
            Some(_) => return Err(err("sub-arrays of different lengths")),
        }
        out.push(b']');
        Ok(())
    }

    fn element(&mut self, out: &mut Vec<u8>) -> Result<(), ValueError> {
        let e = if self.peek() == Some(b'"') {
            self.quoted()?
        } else {
            self.unquoted()?
        };
        match e {
            Elem::Null => out.extend_from_slice(b"null"),
            Elem::Slice(a, b) => {
                let text = self.s.get(a..b).ok_or(err("element out of bounds"))?;
                write_value(self.elem, text, out)?;
            }
            Elem::Scratch => write_value(self.elem, &self.scratch, out)?,
        }
        Ok(())
    }

    /// `"..."` with `\x` escapes; never NULL.
    fn quoted(&mut self) -> Result<Elem, ValueError> {
        self.i += 1;
        let start = self.i;
        let rest = self.s.get(start..).unwrap_or_default();
        let stop = rest
            .iter()
            .position(|&b| b == b'"' || b == b'\\')
            .ok_or(err("unterminated quoted element"))?;
        if rest.get(stop) == Some(&b'"') {
            self.i = start + stop + 1;
            return Ok(Elem::Slice(start, start + stop));
        }
        // Escapes: unescape into scratch.
        self.scratch.clear();
        self.scratch
            .extend_from_slice(rest.get(..stop).unwrap_or_default());
        self.i = start + stop;
        loop {
            match self.peek() {
                None => return Err(err("unterminated quoted element")),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(Elem::Scratch);
                }
                Some(b'\\') => {
                    let b = self
                        .s
                        .get(self.i + 1)
                        .copied()
                        .ok_or(err("unterminated quoted element"))?;
                    self.scratch.push(b);
                    self.i += 2;
                }
                Some(b) => {
                    self.scratch.push(b);
                    self.i += 1;
                }
            }
        }
    }

    /// Up to the delimiter or `}`, trailing white space dropped.
    fn unquoted(&mut self) -> Result<Elem, ValueError> {
        let start = self.i;
        // End of the content seen so far, without trailing white space.
        let mut end = start;
        let mut escaped = false;
        loop {
            match self.peek() {
                None => return Err(err("unterminated array")),
                Some(b) if b == self.delim || b == b'}' => break,
                Some(b'"' | b'{') => return Err(err("'\"' or '{' inside an unquoted element")),
                Some(b'\\') => {
                    if !escaped {
                        self.scratch.clear();
                        self.scratch
                            .extend_from_slice(self.s.get(start..self.i).unwrap_or_default());
                        escaped = true;
                    }
                    let b = self
                        .s
                        .get(self.i + 1)
                        .copied()
                        .ok_or(err("unterminated array"))?;
                    self.scratch.push(b);
                    self.i += 2;
                    end = self.scratch.len();
                }
                Some(b) => {
                    if escaped {
                        self.scratch.push(b);
                    }
                    self.i += 1;
                    if !is_pg_space(b) {
                        end = if escaped { self.scratch.len() } else { self.i };
                    }
                }
            }
        }
        if escaped {
            self.scratch.truncate(end);
            return Ok(Elem::Scratch);
        }
        let text = self.s.get(start..end).unwrap_or_default();
        if text.is_empty() {
            return Err(err("empty unquoted element"));
        }
        if text.eq_ignore_ascii_case(b"NULL") {
            return Ok(Elem::Null);
        }
        Ok(Elem::Slice(start, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::write_text_value;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn parse_delim(elem: ValueKind, delim: u8, text: &str) -> Result<Value, ValueError> {
        let mut out = Vec::new();
        write_text_value(
            &ValueKind::Array {
                elem: Box::new(elem),
                delim,
            },
            text.as_bytes(),
            &mut out,
        )?;
        Ok(serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{text:?}: {e}")))
    }

    fn parse(elem: ValueKind, text: &str) -> Result<Value, ValueError> {
        parse_delim(elem, b',', text)
    }

    #[test]
    fn what_array_in_accepts_beyond_array_out() {
        use ValueKind::*;
        assert_eq!(parse(Text, " { a , b c } ").unwrap(), json!(["a", "b c"]));
        assert_eq!(parse(Text, "{\u{b}a\u{c}}").unwrap(), json!(["a"]));
        assert_eq!(parse(Text, r"{a\ ,b}").unwrap(), json!(["a ", "b"]));
        assert_eq!(
            parse(Text, r"{\ a\,b,\N\U\L\L}").unwrap(),
            json!([" a,b", "NULL"])
        );
        assert_eq!(parse(Text, r"{nUlL,\NULL}").unwrap(), json!([null, "NULL"]));
        assert_eq!(parse(Text, "{ \"x\" ,\"\"}").unwrap(), json!(["x", ""]));
        assert_eq!(parse(Int, "[3]={1,2,3}").unwrap(), json!([1, 2, 3]));
        assert_eq!(parse(Int, "[+1:+2] = {1,2}").unwrap(), json!([1, 2]));
        assert_eq!(
            parse(Int, "[-2147483648:-2147483647]={1,2}").unwrap(),
            json!([1, 2])
        );
    }

    #[test]
    fn malformed_arrays_are_errors() {
        for bad in [
            "",
            " ",
            "{",
            "}",
            "{1,",
            "{1,2",
            "1,2}",
            "{1}x",
            "{1}}",
            "{\"a}",
            "{a\"b\"}",
            "{\"a\"b}",
            "{a{b}",
            "{,}",
            "{1,,2}",
            "{1,}",
            "{,1}",
            "[1:2]",
            "[1:2]{1,2}",
            "[1:2]={1}",
            "[1:2]={1,2,3}",
            "[2:1]={}",
            "[1:1]={}",
            "[1:1][1:1]={1}",
            "[1:1]={{1}}",
            "[x]={1}",
            "[1:2={1,2}",
            "{{{{{{{1}}}}}}}",
            "{{1},2}",
            "{1,{2}}",
            "{{1,2},{3}}",
            "{{1},{2,3}}",
            "{{}}",
            "{{},{}}",
            "{{1},{}}",
            "{\\",
            "{\"\\",
            "{a\\",
            "[1:2][1:1][1:1][1:1][1:1][1:1][1:1]={}",
            "[99999999999:1]={1}",
            "[1:2]x={1,2}",
            "{1};",
            "{{1};{2}}",
        ] {
            assert!(parse(ValueKind::Text, bad).is_err(), "{bad:?} parsed");
        }
        for bad in ["{1,x}", "{1.5}", "{\"\"}", "{ }x"] {
            assert!(
                parse(ValueKind::Int, bad).is_err(),
                "{bad:?} parsed as int[]"
            );
        }
        let mut out = Vec::new();
        let text_arr = |delim| ValueKind::Array {
            elem: Box::new(ValueKind::Text),
            delim,
        };
        for delim in [b'"', b'\\', b'{', b'}', b' ', b'\t'] {
            assert!(write_text_value(&text_arr(delim), b"{a}", &mut out).is_err());
        }
    }

    #[test]
    fn box_arrays_split_on_semicolons_only() {
        assert_eq!(
            parse_delim(ValueKind::Text, b';', "{(1,1),(0,0);(2,2),(1,1);NULL}").unwrap(),
            json!(["(1,1),(0,0)", "(2,2),(1,1)", null])
        );
        assert_eq!(
            parse_delim(ValueKind::Text, b';', "{a,b}").unwrap(),
            json!(["a,b"])
        );
    }

    #[test]
    fn elements_are_written_by_their_kind() {
        use ValueKind::*;
        assert_eq!(
            parse(Bool, "{t,f,NULL}").unwrap(),
            json!([true, false, null])
        );
        assert_eq!(
            parse(Json, r#"{"{\"a\": 1}",NULL,"null"}"#).unwrap(),
            json!([{"a": 1}, null, null])
        );
        assert_eq!(parse(Float, "{NaN,1.5}").unwrap(), json!(["NaN", 1.5]));
        let nested = Array {
            elem: Box::new(Int),
            delim: b',',
        };
        assert_eq!(
            parse(nested, r#"{"{1,2}","[0:0]={3}",NULL,"{}"}"#).unwrap(),
            json!([[1, 2], [3], null, []])
        );
    }

    /// Renders `v` as PostgreSQL's array_out would: quotes an element when
    /// it is empty, is `NULL` in any case, or holds `{ } " \`, the
    /// delimiter or white space; escapes `"` and `\` inside quotes. With
    /// `lower` it adds a bounds decoration for that lower bound.
    fn render(v: &Value, delim: char, lower: Option<i64>) -> String {
        fn dims(v: &Value, acc: &mut Vec<usize>) {
            if let Value::Array(items) = v {
                acc.push(items.len());
                if let Some(first) = items.first() {
                    dims(first, acc);
                }
            }
        }
        fn body(v: &Value, delim: char) -> String {
            match v {
                Value::Array(items) => {
                    let parts: Vec<String> = items.iter().map(|i| body(i, delim)).collect();
                    format!("{{{}}}", parts.join(&delim.to_string()))
                }
                Value::Null => "NULL".into(),
                Value::String(s) => {
                    let needs = s.is_empty()
                        || s.eq_ignore_ascii_case("null")
                        || s.chars().any(|c| {
                            "{}\"\\".contains(c)
                                || c == delim
                                || matches!(c, ' ' | '\t' | '\n' | '\r' | '\u{b}' | '\u{c}')
                        });
                    if needs {
                        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
                    } else {
                        s.clone()
                    }
                }
                other => other.to_string(),
            }
        }
        let mut prefix = String::new();
        if let Some(lo) = lower {
            let mut d = Vec::new();
            dims(v, &mut d);
            if d.first() != Some(&0) {
                for len in d {
                    prefix += &format!("[{lo}:{}]", lo + len as i64 - 1);
                }
                prefix.push('=');
            }
        }
        prefix + &body(v, delim)
    }

    /// Rectangular nested arrays of 1 to 6 dimensions (or the empty array)
    /// with string and null leaves.
    fn nested() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            1 => Just(Value::Null),
            1 => prop_oneof![Just("NULL"), Just("null"), Just(""), Just(" "), Just("\\"), Just("\"")]
                .prop_map(|s| Value::String(s.into())),
            6 => "(\\PC|[{}\",;\\\\ \t\n\u{b}\u{c}\u{1}])*".prop_map(Value::String),
        ];
        (
            0usize..=6,
            proptest::collection::vec(1usize..4, 6),
            proptest::collection::vec(leaf, 1..64),
        )
            .prop_map(|(ndims, lens, leaves)| {
                fn build(d: usize, lens: &[usize], it: &mut impl Iterator<Item = Value>) -> Value {
                    match lens.get(d) {
                        None => it.next().unwrap_or(Value::Null),
                        Some(&n) => Value::Array((0..n).map(|_| build(d + 1, lens, it)).collect()),
                    }
                }
                if ndims == 0 {
                    return Value::Array(vec![]);
                }
                let mut it = leaves.into_iter().cycle();
                build(0, &lens[..ndims], &mut it)
            })
    }

    proptest! {
        #[test]
        fn rendered_arrays_parse_back_to_the_same_structure(
            v in nested(),
            lower in prop_oneof![Just(None), (-5i64..5).prop_map(Some)],
            semicolon in any::<bool>(),
        ) {
            let delim = if semicolon { ';' } else { ',' };
            let text = render(&v, delim, lower);
            let got = parse_delim(ValueKind::Text, delim as u8, &text)
                .unwrap_or_else(|e| panic!("{text:?}: {e}"));
            prop_assert_eq!(got, v, "{}", text);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            for elem in [ValueKind::Text, ValueKind::Int, ValueKind::Json] {
                let mut out = Vec::new();
                let _ = write_text_value(&ValueKind::Array { elem: Box::new(elem), delim: b',' }, &b, &mut out);
            }
        }

        #[test]
        fn array_shaped_noise_never_panics(s in "[\\[\\]0-9:=\\-{}\",;\\\\ aNUL]{0,48}") {
            let mut out = Vec::new();
            let kind = ValueKind::Array { elem: Box::new(ValueKind::Text), delim: b',' };
            if write_text_value(&kind, s.as_bytes(), &mut out).is_ok() {
                prop_assert!(serde_json::from_slice::<Value>(&out).is_ok());
            }
        }
    }
}
