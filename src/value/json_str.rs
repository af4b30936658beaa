//! JSON string escaping straight into the output buffer.
//!
//! Owns the one way walnats writes a JSON string: `"`, `\` and the control
//! characters below U+0020 are escaped (as `\"`, `\\`, `\n`, `\r`, `\t`,
//! `\b`, `\f` or `\u00XX`, the same choices as PostgreSQL's `to_json`);
//! every other byte is copied. Runs of bytes that need no escaping are found
//! eight at a time and copied with one `extend_from_slice`.
//!
//! It must never write a string that is not valid UTF-8: input bytes are
//! checked and refused, never replaced, since a silently altered value is
//! data loss. It never allocates beyond growing the caller's buffer.

use super::ValueError;

/// Bytes that JSON requires to be escaped inside a string.
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
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any of the eight bytes of `w` needs escaping. Exact (no false
/// negatives, no false positives): the classic "has a byte less than n"
/// and "has a zero byte" word tricks, for n = 0x20, `"` and `\`.
#[inline]
fn word_needs_escape(w: u64) -> bool {
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    let q = w ^ (ONES * u64::from(b'"'));
    let quote = q.wrapping_sub(ONES) & !q & HIGHS;
    let b = w ^ (ONES * u64::from(b'\\'));
    let backslash = b.wrapping_sub(ONES) & !b & HIGHS;
    (below_space | quote | backslash) != 0
}

/// Appends `s` as a JSON string (with its quotes). `s` must be UTF-8;
/// otherwise nothing is written and the error names `text`.
pub fn write_json_string(s: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    write_json_string_of(s, out, "text")
}

/// As [`write_json_string`] for a `&str`, which cannot fail.
pub fn write_json_str(s: &str, out: &mut Vec<u8>) {
    write_json_str_unchecked(s.as_bytes(), out);
}

/// As [`write_json_string`], with the type name the error should carry.
pub(crate) fn write_json_string_of(
    s: &[u8],
    out: &mut Vec<u8>,
    type_name: &'static str,
) -> Result<(), ValueError> {
    // The escaping pass notes whether any byte is above ASCII, so that the
    // common all-ASCII value is not read a second time to check its UTF-8.
    let len = out.len();
    if write_escaped(s, out) && std::str::from_utf8(s).is_err() {
        out.truncate(len);
        return Err(ValueError::new(type_name, "not valid UTF-8"));
    }
    Ok(())
}

/// Escapes and quotes bytes already known to be UTF-8 (or ASCII).
pub(crate) fn write_json_str_unchecked(s: &[u8], out: &mut Vec<u8>) {
    write_escaped(s, out);
}

/// Escapes and quotes `s`; true if a byte of it is above ASCII.
#[inline]
fn write_escaped(s: &[u8], out: &mut Vec<u8>) -> bool {
    let mut seen = 0u64;
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < s.len() {
        if let Some(chunk) = s.get(i..).and_then(|rest| rest.first_chunk::<8>()) {
            let w = u64::from_le_bytes(*chunk);
            seen |= w;
            if !word_needs_escape(w) {
                i += 8;
                continue;
            }
        }
        let Some(&b) = s.get(i) else { break };
        seen |= u64::from(b);
        if NEEDS_ESCAPE[usize::from(b)] {
            if let Some(run) = s.get(start..i) {
                out.extend_from_slice(run);
            }
            push_escape(b, out);
            start = i + 1;
        }
        i += 1;
    }
    if let Some(run) = s.get(start..) {
        out.extend_from_slice(run);
    }
    out.push(b'"');
    seen & HIGHS != 0
}

/// Writes a string that needs no escaping at all (the caller checked that
/// it is printable ASCII without `"` and `\`).
pub(crate) fn write_plain_json_str(s: &[u8], out: &mut Vec<u8>) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s);
    out.push(b'"');
}

fn push_escape(b: u8, out: &mut Vec<u8>) {
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
    fn escapes_what_json_requires_and_nothing_else() {
        assert_eq!(enc("plain"), "\"plain\"");
        assert_eq!(enc(""), "\"\"");
        assert_eq!(enc("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(
            enc("\n\r\t\u{8}\u{c}\u{0}\u{1}\u{1f}"),
            "\"\\n\\r\\t\\b\\f\\u0000\\u0001\\u001f\""
        );
        assert_eq!(
            enc("hé ü 日本 😀 \u{7f} \u{2028}"),
            "\"hé ü 日本 😀 \u{7f} \u{2028}\""
        );
        // Escapes at every position of an 8-byte word, and runs longer
        // than one word on both sides.
        for pos in 0..20 {
            let mut s = "x".repeat(20);
            s.replace_range(pos..pos + 1, "\"");
            let want = format!("\"{}\"", s.replace('"', "\\\""));
            assert_eq!(enc(&s), want);
        }
    }

    #[test]
    fn word_check_matches_the_table_for_every_byte() {
        for b in 0..=255u8 {
            for pos in 0..8 {
                let mut w = [b'a'; 8];
                w[pos] = b;
                assert_eq!(
                    word_needs_escape(u64::from_le_bytes(w)),
                    NEEDS_ESCAPE[usize::from(b)],
                    "byte {b:#x} at {pos}"
                );
            }
        }
    }

    #[test]
    fn refuses_invalid_utf8_and_writes_nothing() {
        let mut out = b"[".to_vec();
        let e = write_json_string(&[b'a', 0xff], &mut out).unwrap_err();
        assert_eq!(out, b"[");
        assert_eq!(e.type_name(), "text");
        assert!(
            write_json_string(&[0xed, 0xa0, 0x80], &mut out).is_err(),
            "surrogate"
        );
        assert!(write_json_string(&[0xc3], &mut out).is_err(), "truncated");
    }

    proptest! {
        #[test]
        fn any_string_round_trips_through_serde_json(s in "\\PC*|[\\x00-\\x1f\"\\\\a-z]*|.*") {
            let mut out = Vec::new();
            write_json_string(s.as_bytes(), &mut out).unwrap();
            let back: String = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(back, s);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_round_trip_when_utf8(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut out = Vec::new();
            match write_json_string(&b, &mut out) {
                Ok(()) => {
                    let back: String = serde_json::from_slice(&out).unwrap();
                    prop_assert_eq!(back.as_bytes(), &b[..]);
                }
                Err(_) => {
                    prop_assert!(std::str::from_utf8(&b).is_err());
                    prop_assert!(out.is_empty());
                }
            }
        }
    }
}
