//! What the value targets share: checking that what was written is the
//! JSON it should be.

use serde_json::Value;
use walnats::encode::value::ValueKind;

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
/// and, unless json is involved, what follows is exactly one JSON value.
/// Returns that value and the bytes written for it.
pub fn write_and_check(kind: &ValueKind, text: &[u8]) -> Option<(Value, Vec<u8>)> {
    const PREFIX: &[u8] = b"{\"c\":";
    let mut out = PREFIX.to_vec();
    match walnats::encode::value::write_text_value(kind, text, &mut out) {
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
            match serde_json::from_slice::<Value>(written) {
                Ok(v) => Some((v, written.to_vec())),
                Err(e) => panic!(
                    "{kind:?} wrote invalid JSON ({e}): {:?}",
                    String::from_utf8_lossy(written)
                ),
            }
        }
    }
}
