//! PostgreSQL's array text format → nested JSON arrays.
//!
//! `{1,2,NULL}`, `{{1,2},{3,4}}`, `{"a b","c\"d",NULL,"NULL"}`, and with
//! non-default bounds `[0:1]={1,2}` (the bounds are dropped: JSON arrays
//! start at 0). Quoted elements are never NULL; unquoted `NULL` (any case)
//! is. Backslash escapes any byte, quoted or not. Unquoted elements lose
//! surrounding white space. Each element is written by its element kind.

use super::value::{ValueError, ValueKind, write_text_value};

const MAX_DEPTH: usize = 6; // PostgreSQL's MAXDIM

fn err(p: &'static str) -> ValueError {
    ValueError::new("array", p)
}

pub fn write_array(
    elem: &ValueKind,
    delim: u8,
    text: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    let mut i = 0;
    if text.first() == Some(&b'[') {
        // Dimension decoration: [lo:hi][lo:hi]=
        i = text
            .iter()
            .position(|&b| b == b'=')
            .ok_or(err("bounds without '='"))?
            + 1;
    }
    let mut p = Parser {
        s: text,
        i,
        elem,
        delim,
        scratch: Vec::new(),
    };
    p.array(out, 0)?;
    p.ws();
    if p.i != text.len() {
        return Err(err("trailing characters"));
    }
    Ok(())
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    elem: &'a ValueKind,
    delim: u8,
    scratch: Vec<u8>,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn array(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<(), ValueError> {
        if depth >= MAX_DEPTH {
            return Err(err("too many dimensions"));
        }
        self.ws();
        if self.peek() != Some(b'{') {
            return Err(err("expected '{'"));
        }
        self.i += 1;
        out.push(b'[');
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            out.push(b']');
            return Ok(());
        }
        let mut first = true;
        loop {
            if !first {
                out.push(b',');
            }
            first = false;
            self.ws();
            match self.peek() {
                Some(b'{') => self.array(out, depth + 1)?,
                Some(b'"') => self.quoted(out)?,
                Some(_) => self.unquoted(out)?,
                None => return Err(err("unterminated")),
            }
            self.ws();
            match self.peek() {
                Some(b'}') => {
                    self.i += 1;
                    out.push(b']');
                    return Ok(());
                }
                Some(b) if b == self.delim => self.i += 1,
                _ => return Err(err("expected a delimiter or '}'")),
            }
        }
    }

    fn quoted(&mut self, out: &mut Vec<u8>) -> Result<(), ValueError> {
        self.i += 1;
        self.scratch.clear();
        loop {
            match self.peek() {
                None => return Err(err("unterminated quoted element")),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    let b = self
                        .s
                        .get(self.i + 1)
                        .copied()
                        .ok_or(err("dangling backslash"))?;
                    self.scratch.push(b);
                    self.i += 2;
                }
                Some(b) => {
                    self.scratch.push(b);
                    self.i += 1;
                }
            }
        }
        let text = std::mem::take(&mut self.scratch);
        let r = write_text_value(self.elem, &text, out);
        self.scratch = text;
        r
    }

    fn unquoted(&mut self, out: &mut Vec<u8>) -> Result<(), ValueError> {
        self.scratch.clear();
        let mut escaped = false;
        // Length of scratch up to the last byte that is not trailing
        // white space (escaped white space counts as content).
        let mut keep = 0;
        loop {
            match self.peek() {
                None => return Err(err("unterminated")),
                Some(b) if b == self.delim || b == b'}' => break,
                Some(b'{') | Some(b'"') => return Err(err("unexpected '{' or '\"' in an element")),
                Some(b'\\') => {
                    let b = self
                        .s
                        .get(self.i + 1)
                        .copied()
                        .ok_or(err("dangling backslash"))?;
                    self.scratch.push(b);
                    keep = self.scratch.len();
                    escaped = true;
                    self.i += 2;
                }
                Some(b) => {
                    self.scratch.push(b);
                    if !b.is_ascii_whitespace() {
                        keep = self.scratch.len();
                    }
                    self.i += 1;
                }
            }
        }
        self.scratch.truncate(keep);
        if !escaped && self.scratch.eq_ignore_ascii_case(b"NULL") {
            out.extend_from_slice(b"null");
            return Ok(());
        }
        if self.scratch.is_empty() {
            return Err(err("empty unquoted element"));
        }
        let text = std::mem::take(&mut self.scratch);
        let r = write_text_value(self.elem, &text, out);
        self.scratch = text;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn parse(elem: ValueKind, text: &str) -> Result<Value, ValueError> {
        let mut out = Vec::new();
        write_array(&elem, b',', text.as_bytes(), &mut out)?;
        Ok(serde_json::from_slice(&out).unwrap())
    }

    #[test]
    fn arrays_as_postgres_prints_them() {
        assert_eq!(parse(ValueKind::Int, "{}").unwrap(), json!([]));
        assert_eq!(
            parse(ValueKind::Int, "{1,2,NULL}").unwrap(),
            json!([1, 2, null])
        );
        assert_eq!(
            parse(ValueKind::Int, "{{1,2},{3,NULL}}").unwrap(),
            json!([[1, 2], [3, null]])
        );
        assert_eq!(parse(ValueKind::Int, "[0:1]={7,8}").unwrap(), json!([7, 8]));
        assert_eq!(
            parse(ValueKind::Int, "[1:1][1:2]={{7,8}}").unwrap(),
            json!([[7, 8]])
        );
        assert_eq!(
            parse(
                ValueKind::Text,
                r#"{"a,b","c\"d",NULL,"NULL","",null,"\\"}"#
            )
            .unwrap(),
            json!(["a,b", "c\"d", null, "NULL", "", null, "\\"])
        );
        assert_eq!(
            parse(ValueKind::Text, "{ a , b c }").unwrap(),
            json!(["a", "b c"])
        );
        assert_eq!(
            parse(ValueKind::Text, r"{a\ ,b}").unwrap(),
            json!(["a ", "b"])
        );
        assert_eq!(
            parse(ValueKind::Bool, "{t,f}").unwrap(),
            json!([true, false])
        );
        assert_eq!(
            parse(ValueKind::Json, r#"{"{\"a\": 1}",NULL}"#).unwrap(),
            json!([{"a": 1}, null])
        );
        assert_eq!(
            parse(ValueKind::Timestamptz, r#"{"2026-11-22 18:31:10+00"}"#).unwrap(),
            json!(["2026-11-22T18:31:10Z"])
        );
        assert_eq!(
            parse(ValueKind::Float, "{NaN,1.5}").unwrap(),
            json!(["NaN", 1.5])
        );
        let mut out = Vec::new();
        write_array(
            &ValueKind::Text,
            b';',
            b"{(1,1),(0,0);(2,2),(1,1)}",
            &mut out,
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            json!(["(1,1),(0,0)", "(2,2),(1,1)"])
        );
    }

    #[test]
    fn malformed_arrays_are_errors() {
        for bad in [
            "",
            "{",
            "{1,",
            "{1,2",
            "1,2}",
            "{1}x",
            "{\"a}",
            "{a\"b}",
            "[1:2]",
            "{{{{{{{1}}}}}}}",
            "{,}",
            "{1,,2}",
        ] {
            assert!(parse(ValueKind::Text, bad).is_err(), "{bad:?} parsed");
        }
    }

    /// Renders like PostgreSQL's array_out: quotes when needed.
    fn render(v: &Value) -> String {
        match v {
            Value::Array(items) => format!(
                "{{{}}}",
                items.iter().map(render).collect::<Vec<_>>().join(",")
            ),
            Value::Null => "NULL".into(),
            Value::String(s) => {
                let needs = s.is_empty()
                    || s.eq_ignore_ascii_case("null")
                    || s.bytes().any(|b| b"{},\"\\ \t\n".contains(&b));
                if needs {
                    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
                } else {
                    s.clone()
                }
            }
            other => other.to_string(),
        }
    }

    fn nested() -> impl Strategy<Value = Value> {
        // Rectangular: dims of 1..3 levels, each 0..4 long (0 only at top).
        let leaf = prop_oneof![Just(Value::Null), "[ -~]{0,6}".prop_map(Value::String)];
        (1usize..=3, 1usize..4, proptest::collection::vec(leaf, 64)).prop_map(
            |(depth, n, leaves)| {
                let mut it = leaves.into_iter().cycle();
                fn build(d: usize, n: usize, it: &mut impl Iterator<Item = Value>) -> Value {
                    if d == 0 {
                        return it.next().unwrap_or(Value::Null);
                    }
                    Value::Array((0..n).map(|_| build(d - 1, n, it)).collect())
                }
                build(depth, n, &mut it)
            },
        )
    }

    proptest! {
        #[test]
        fn rendered_arrays_parse_back(v in nested()) {
            let text = render(&v);
            prop_assert_eq!(parse(ValueKind::Text, &text).unwrap(), v);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            let _ = write_array(&ValueKind::Text, b',', &b, &mut out);
        }
    }
}
