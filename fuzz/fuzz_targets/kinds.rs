//! What the value targets share: checking that what was written is the
//! JSON it should be.

use serde::de::IgnoredAny;
use walnats::value::ValueKind;

/// json and jsonb text is copied after a shallow check (value.rs says
/// why), so only JSON-free kinds promise a fully valid JSON output.
pub fn has_json(kind: &ValueKind) -> bool {
    match kind {
        ValueKind::Json => true,
        ValueKind::Array { elem, .. } => has_json(elem),
        _ => false,
    }
}

/// Writes `text` as `kind` after a prefix (as into a row's body) and checks
/// the contract of `write_text_value`: on error the buffer is as it was and
/// the error names a type and a problem; on success the prefix is intact
/// and, unless json is involved, what follows is exactly one JSON value by
/// the grammar. The grammar, not serde_json's `Value`: JSON puts no bound on
/// numbers and `Value` refuses those beyond f64 (`1.8e+308`), text
/// PostgreSQL's float output never prints but the writer, which copies
/// what is a JSON number, accepts; the unit tests check the same way.
/// Returns the bytes written.
pub fn write_and_check(kind: &ValueKind, text: &[u8]) -> Option<Vec<u8>> {
    const PREFIX: &[u8] = b"{\"c\":";
    let mut out = PREFIX.to_vec();
    match walnats::value::write_text_value(kind, text, &mut out) {
        Err(e) => {
            assert_eq!(out, PREFIX, "{e}: the buffer was not restored");
            assert!(!e.type_name().is_empty() && !e.problem().is_empty());
            None
        }
        Ok(()) => {
            assert!(out.starts_with(PREFIX), "the prefix was overwritten");
            let written = &out[PREFIX.len()..];
            if has_json(kind) {
                return None;
            }
            if let Err(e) = serde_json::from_slice::<IgnoredAny>(written) {
                panic!(
                    "{kind:?} wrote invalid JSON ({e}): {:?}",
                    String::from_utf8_lossy(written)
                );
            }
            Some(written.to_vec())
        }
    }
}
