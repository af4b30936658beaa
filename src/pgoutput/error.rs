//! Why a pgoutput message could not be decoded.
//!
//! Owns [`DecodeError`]: which message, which field, at which byte offset,
//! and what was wrong ([`DecodeErrorKind`], for tests and metrics). The text
//! never contains a row value: only names of fields, offsets and lengths.

use std::fmt;

/// What was wrong with the bytes. Tests match on this, never on the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeErrorKind {
    /// The message has no bytes at all, not even a tag.
    Empty,
    /// The first byte is not a pgoutput message tag.
    UnknownTag(u8),
    /// The field needs `needed` bytes and only `remaining` are left.
    Truncated { needed: usize, remaining: usize },
    /// A string has no NUL terminator before the end of the message.
    UnterminatedString,
    /// A string is not valid UTF-8.
    InvalidUtf8,
    /// A length or count field is negative.
    NegativeLength(i32),
    /// A count of items cannot fit in what is left of the message, even at
    /// the smallest possible item size; refused before allocating for it.
    CountTooLarge { count: usize, remaining: usize },
    /// A tuple column is neither 'n', 'u', 't' nor 'b'.
    UnknownColumnKind(u8),
    /// A tuple is introduced by a byte other than the expected 'N', 'K' or 'O'.
    UnexpectedTupleTag(u8),
    /// A relation's replica identity is neither 'd', 'n', 'f' nor 'i'.
    UnknownReplicaIdentity(u8),
    /// A boolean byte is neither 0 nor 1.
    InvalidBool(u8),
    /// Bytes are left after the last field of the message.
    TrailingBytes(usize),
    /// Stream Start arrived while a stream block was already open.
    StreamStartInStream,
    /// Stream Stop arrived while no stream block was open.
    StreamStopOutsideStream,
}

impl fmt::Display for DecodeErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DecodeErrorKind::Empty => f.write_str("the message is empty"),
            DecodeErrorKind::UnknownTag(t) => write!(f, "unknown message tag {}", Byte(t)),
            DecodeErrorKind::Truncated { needed, remaining } => {
                write!(f, "needs {needed} bytes but only {remaining} remain")
            }
            DecodeErrorKind::UnterminatedString => f.write_str("string has no NUL terminator"),
            DecodeErrorKind::InvalidUtf8 => f.write_str("string is not valid UTF-8"),
            DecodeErrorKind::NegativeLength(n) => write!(f, "negative length {n}"),
            DecodeErrorKind::CountTooLarge { count, remaining } => {
                write!(
                    f,
                    "count {count} cannot fit in the {remaining} bytes that remain"
                )
            }
            DecodeErrorKind::UnknownColumnKind(k) => {
                write!(f, "unknown column kind {} (expected n, u, t or b)", Byte(k))
            }
            DecodeErrorKind::UnexpectedTupleTag(t) => {
                write!(f, "unexpected tuple tag {}", Byte(t))
            }
            DecodeErrorKind::UnknownReplicaIdentity(r) => {
                write!(
                    f,
                    "unknown replica identity {} (expected d, n, f or i)",
                    Byte(r)
                )
            }
            DecodeErrorKind::InvalidBool(b) => write!(f, "boolean byte is {b}, not 0 or 1"),
            DecodeErrorKind::TrailingBytes(n) => write!(f, "{n} unexpected bytes after the end"),
            DecodeErrorKind::StreamStartInStream => {
                f.write_str("Stream Start inside an open stream block")
            }
            DecodeErrorKind::StreamStopOutsideStream => {
                f.write_str("Stream Stop without an open stream block")
            }
        }
    }
}

/// A byte printed as its ASCII character when it is a printable one, so
/// that an unknown tag reads like the documentation ('X' (0x58)).
struct Byte(u8);

impl fmt::Display for Byte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}' (0x{:02x})", char::from(self.0), self.0)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// A pgoutput message that could not be decoded: which message, which
/// field, the byte offset of that field from the start of the message (the
/// tag is at offset 0), and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput {message} message, field {field} at byte {offset}: {kind}")]
pub struct DecodeError {
    kind: DecodeErrorKind,
    message: &'static str,
    field: &'static str,
    offset: usize,
}

impl DecodeError {
    pub(crate) fn new(
        kind: DecodeErrorKind,
        message: &'static str,
        field: &'static str,
        offset: usize,
    ) -> DecodeError {
        DecodeError {
            kind,
            message,
            field,
            offset,
        }
    }

    pub fn kind(&self) -> DecodeErrorKind {
        self.kind
    }

    /// The message's name as the PostgreSQL documentation spells it
    /// ("Insert", "Stream Abort", ...), or "unknown" before the tag is read.
    pub fn message(&self) -> &'static str {
        self.message
    }

    /// The field being read ("column value length", "relation name", ...).
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// Offset of the field's first byte from the start of the message.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

impl From<DecodeError> for crate::error::Error {
    fn from(err: DecodeError) -> crate::error::Error {
        crate::error::Error::with_source(
            crate::error::Kind::Decode,
            "PostgreSQL sent a pgoutput message that walnats cannot decode; \
             retrying will not help: report it with the PostgreSQL version and this log",
            err,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_message_field_offset_and_problem() {
        let err = DecodeError::new(
            DecodeErrorKind::Truncated {
                needed: 4,
                remaining: 1,
            },
            "Insert",
            "relation oid",
            1,
        );
        assert_eq!(
            err.to_string(),
            "pgoutput Insert message, field relation oid at byte 1: needs 4 bytes but only 1 remain"
        );
        let err = DecodeError::new(DecodeErrorKind::UnknownTag(b'X'), "unknown", "tag", 0);
        assert!(err.to_string().ends_with("unknown message tag 'X' (0x58)"));
        let err = DecodeError::new(DecodeErrorKind::UnknownTag(0), "unknown", "tag", 0);
        assert!(err.to_string().ends_with("unknown message tag 0x00"));
    }

    #[test]
    fn converts_to_a_definite_decode_error() {
        let err = DecodeError::new(DecodeErrorKind::Empty, "unknown", "tag", 0);
        let err = crate::error::Error::from(err);
        assert_eq!(err.kind(), crate::error::Kind::Decode);
        assert_eq!(err.retry(), crate::error::Retry::Definite);
        assert!(err.to_string().contains("the message is empty"));
    }
}
