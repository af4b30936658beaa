//! Subject tokens: the reversible escaping of schema, table and message
//! prefix names.
//!
//! A token keeps `A-Z a-z 0-9 _ -`; every other byte of the UTF-8 form is
//! written `%XX` (upper-case hex), so `my.table` becomes `my%2Etable` and the
//! mapping can be reversed. An empty name (possible only for a
//! `pg_logical_emit_message` prefix) is written `%00`: PostgreSQL strings
//! never contain NUL, so this cannot collide.

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn keeps(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Appends the escaped form of `name` to `out`.
pub fn push_escaped(out: &mut String, name: &str) {
    if name.is_empty() {
        out.push_str("%00");
        return;
    }
    for &b in name.as_bytes() {
        if keeps(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
}

pub fn escape_token(name: &str) -> String {
    let mut s = String::with_capacity(name.len());
    push_escaped(&mut s, name);
    s
}

/// The inverse of [`escape_token`]; `None` for a token that escaping cannot
/// have produced.
pub fn unescape_token(token: &str) -> Option<String> {
    if token == "%00" {
        return Some(String::new());
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = hex_val(*bytes.get(i + 1)?)?;
            let lo = hex_val(*bytes.get(i + 2)?)?;
            out.push((hi << 4) | lo);
            i += 3;
        } else if keeps(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether the stream subject filter `pattern` matches every subject below
/// `prefix` (i.e. covers `<prefix>.>`).
pub fn covers_prefix(pattern: &str, prefix: &str) -> bool {
    let mut pat = pattern.split('.');
    for token in prefix.split('.') {
        match pat.next() {
            Some(">") => return true,
            Some("*") => {}
            Some(p) if p == token => {}
            _ => return false,
        }
    }
    matches!(pat.next(), Some(">")) && pat.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn escapes_as_the_contract_says() {
        assert_eq!(escape_token("orders"), "orders");
        assert_eq!(escape_token("my.table"), "my%2Etable");
        assert_eq!(escape_token("a b"), "a%20b");
        assert_eq!(escape_token("Ünï"), "%C3%9Cn%C3%AF");
        assert_eq!(escape_token("x*>y"), "x%2A%3Ey");
        assert_eq!(escape_token("%"), "%25");
        assert_eq!(escape_token(""), "%00");
        assert_eq!(escape_token("Order_Items-2"), "Order_Items-2");
    }

    #[test]
    fn coverage_of_prefix() {
        assert!(covers_prefix("cdc.app.>", "cdc.app"));
        assert!(covers_prefix("cdc.>", "cdc.app"));
        assert!(covers_prefix(">", "cdc.app"));
        assert!(covers_prefix("cdc.*.>", "cdc.app"));
        assert!(!covers_prefix("cdc.app.*", "cdc.app"));
        assert!(!covers_prefix("cdc.app", "cdc.app"));
        assert!(!covers_prefix("cdc.other.>", "cdc.app"));
        assert!(!covers_prefix("cdc.app.x.>", "cdc.app"));
    }

    proptest! {
        #[test]
        fn escaping_reverses_and_yields_one_valid_token(s in "\\PC*") {
            let t = escape_token(&s);
            prop_assert!(!t.is_empty());
            prop_assert!(t.bytes().all(|b| keeps(b) || b == b'%'));
            prop_assert_eq!(unescape_token(&t), Some(s));
        }
    }
}
