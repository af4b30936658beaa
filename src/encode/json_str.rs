//! JSON string escaping straight into the output buffer.
//!
//! The fast path copies runs of bytes that need no escaping with one
//! `extend_from_slice`; only `"`, `\` and control characters are escaped.
//! Input must be UTF-8: invalid bytes are an error, never replaced, since a
//! silently altered value is data loss.

use super::value::ValueError;

/// 0: copy as is; 1: needs an escape.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` as a JSON string (with quotes).
pub fn write_json_string(s: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    if std::str::from_utf8(s).is_err() {
        return Err(ValueError::new("text", "not valid UTF-8"));
    }
    write_json_str_unchecked(s, out);
    Ok(())
}

/// As [`write_json_string`] for bytes already known to be UTF-8.
pub(crate) fn write_json_str_unchecked(s: &[u8], out: &mut Vec<u8>) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        if !NEEDS_ESCAPE[usize::from(b)] {
            continue;
        }
        if let Some(run) = s.get(start..i) {
            out.extend_from_slice(run);
        }
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        start = i + 1;
    }
    if let Some(run) = s.get(start..) {
        out.extend_from_slice(run);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(s: &str) -> String {
        let mut out = Vec::new();
        write_json_string(s.as_bytes(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn escapes_what_json_requires() {
        assert_eq!(enc("plain"), "\"plain\"");
        assert_eq!(enc("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(
            enc("\n\r\t\u{8}\u{c}\u{1}\u{1f}"),
            "\"\\n\\r\\t\\b\\f\\u0001\\u001f\""
        );
        assert_eq!(enc("hé ü 日本"), "\"hé ü 日本\"");
        assert_eq!(enc(""), "\"\"");
    }

    #[test]
    fn refuses_invalid_utf8() {
        let mut out = Vec::new();
        assert!(write_json_string(&[b'a', 0xff], &mut out).is_err());
    }

    proptest! {
        #[test]
        fn any_string_round_trips_through_serde_json(s in "\\PC*|[\\x00-\\x1f\"\\\\]*") {
            let mut out = Vec::new();
            write_json_string(s.as_bytes(), &mut out).unwrap();
            let back: String = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(back, s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            if write_json_string(&b, &mut out).is_ok() {
                let back: String = serde_json::from_slice(&out).unwrap();
                prop_assert_eq!(back.as_bytes(), &b[..]);
            }
        }
    }
}
