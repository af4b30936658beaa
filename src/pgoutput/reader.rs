//! A checked big-endian reader over one pgoutput message.
//!
//! Owns bounds checking: every read checks the length first and returns a
//! [`DecodeError`] naming the message, the field and its offset; nothing here
//! indexes unchecked or panics, whatever the bytes. Strings are
//! NUL-terminated UTF-8; byte fields are zero-copy `Bytes` slices of the
//! message (a reference-count bump, no copy). It never allocates for a count
//! read from the wire before checking that the count can fit in what is left.

use bytes::Bytes;

use super::error::{DecodeError, DecodeErrorKind};
use crate::lsn::Lsn;

pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
    /// The message being read, for error text; set once the tag is known.
    message: &'static str,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Reader {
        Reader {
            buf,
            pos: 0,
            message: "unknown",
        }
    }

    pub(crate) fn set_message(&mut self, message: &'static str) {
        self.message = message;
    }

    pub(crate) fn offset(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// An error about the field that starts at `offset`.
    pub(crate) fn error_at(
        &self,
        offset: usize,
        field: &'static str,
        kind: DecodeErrorKind,
    ) -> DecodeError {
        DecodeError::new(kind, self.message, field, offset)
    }

    /// An error about the field that starts at the current offset.
    pub(crate) fn error(&self, field: &'static str, kind: DecodeErrorKind) -> DecodeError {
        self.error_at(self.pos, field, kind)
    }

    fn truncated(&self, field: &'static str, needed: usize) -> DecodeError {
        self.error(
            field,
            DecodeErrorKind::Truncated {
                needed,
                remaining: self.remaining(),
            },
        )
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self
            .pos
            .checked_add(N)
            .and_then(|end| self.buf.get(self.pos..end))
            .and_then(|s| <[u8; N]>::try_from(s).ok());
        match bytes {
            Some(b) => {
                self.pos += N;
                Ok(b)
            }
            None => Err(self.truncated(field, N)),
        }
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    pub(crate) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    pub(crate) fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    pub(crate) fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field)
            .map(|b| Lsn::from_u64(u64::from_be_bytes(b)))
    }

    /// A byte that must be 0 or 1.
    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        let at = self.pos;
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.error_at(at, field, DecodeErrorKind::InvalidBool(b))),
        }
    }

    /// An Int32 length or count: negative is an error, never a huge usize.
    pub(crate) fn len_i32(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.i32(field)?;
        usize::try_from(n).map_err(|_| self.error_at(at, field, DecodeErrorKind::NegativeLength(n)))
    }

    /// Checks that `count` items of at least `min_item_len` bytes each can
    /// fit in what is left, so that a hostile count never makes us allocate.
    /// `at` is the offset of the count field.
    pub(crate) fn check_count(
        &self,
        at: usize,
        count: usize,
        min_item_len: usize,
        field: &'static str,
    ) -> Result<(), DecodeError> {
        let remaining = self.remaining();
        match count.checked_mul(min_item_len) {
            Some(needed) if needed <= remaining => Ok(()),
            _ => Err(self.error_at(
                at,
                field,
                DecodeErrorKind::CountTooLarge { count, remaining },
            )),
        }
    }

    /// `len` bytes as a zero-copy slice of the message.
    pub(crate) fn bytes(&mut self, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        match self.pos.checked_add(len) {
            Some(end) if end <= self.buf.len() => {
                let out = self.buf.slice(self.pos..end);
                self.pos = end;
                Ok(out)
            }
            _ => Err(self.truncated(field, len)),
        }
    }

    /// Skips `len` bytes and returns their offset (the hot path: a tuple
    /// keeps the message once and where each value is in it).
    pub(crate) fn skip(&mut self, len: usize, field: &'static str) -> Result<usize, DecodeError> {
        match self.pos.checked_add(len) {
            Some(end) if end <= self.buf.len() => {
                let start = self.pos;
                self.pos = end;
                Ok(start)
            }
            _ => Err(self.truncated(field, len)),
        }
    }

    /// The whole message.
    pub(crate) fn buffer(&self) -> &Bytes {
        &self.buf
    }

    /// A NUL-terminated UTF-8 string; the NUL is consumed, not returned.
    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(self.error(field, DecodeErrorKind::UnterminatedString));
        };
        let text = rest
            .get(..len)
            .and_then(|s| std::str::from_utf8(s).ok())
            .ok_or_else(|| self.error(field, DecodeErrorKind::InvalidUtf8))?
            .to_owned();
        self.pos += len + 1;
        Ok(text)
    }

    /// Ends the message: any byte left over is an error.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(self.error("end of message", DecodeErrorKind::TrailingBytes(n))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(b: &'static [u8]) -> Reader {
        Reader::new(Bytes::from_static(b))
    }

    #[test]
    fn reads_big_endian_integers_and_lsns() -> Result<(), DecodeError> {
        let mut r = reader(&[
            0x01, 0x02, 0x03, 0x00, 0x00, 0x00, 0x04, 0xff, 0xff, 0xff, 0xfe, 0, 0, 0, 1, 0, 0, 0,
            2,
        ]);
        assert_eq!(r.u8("a")?, 1);
        assert_eq!(r.u16("b")?, 0x0203);
        assert_eq!(r.u32("c")?, 4);
        assert_eq!(r.i32("d")?, -2);
        assert_eq!(r.lsn("e")?, Lsn::from_u64(0x1_0000_0002));
        assert_eq!(r.remaining(), 0);
        r.finish()
    }

    #[test]
    fn short_read_names_field_offset_and_sizes_and_consumes_nothing() {
        let mut r = reader(&[0, 1, 2]);
        r.set_message("Begin");
        assert_eq!(r.u8("x").ok(), Some(0));
        let err = r.i64("final lsn").err();
        let err = err.as_ref();
        assert_eq!(
            err.map(DecodeError::kind),
            Some(DecodeErrorKind::Truncated {
                needed: 8,
                remaining: 2
            })
        );
        assert_eq!(err.map(DecodeError::offset), Some(1));
        assert_eq!(err.map(DecodeError::field), Some("final lsn"));
        assert_eq!(err.map(DecodeError::message), Some("Begin"));
        assert_eq!(r.offset(), 1);
    }

    #[test]
    fn strings_are_nul_terminated_utf8() {
        let mut r = reader(b"public\0\xc3\xbc\0");
        assert_eq!(r.string("ns").ok().as_deref(), Some("public"));
        assert_eq!(r.string("name").ok().as_deref(), Some("ü"));
        assert_eq!(r.remaining(), 0);

        let mut r = reader(b"abc");
        assert_eq!(
            r.string("s").err().map(|e| e.kind()),
            Some(DecodeErrorKind::UnterminatedString)
        );
        let mut r = reader(b"");
        assert_eq!(
            r.string("s").err().map(|e| e.kind()),
            Some(DecodeErrorKind::UnterminatedString)
        );
        let mut r = reader(b"\xc3\0");
        assert_eq!(
            r.string("s").err().map(|e| e.kind()),
            Some(DecodeErrorKind::InvalidUtf8)
        );
        assert_eq!(r.offset(), 0);
    }

    #[test]
    fn byte_slices_share_the_message_buffer() {
        let msg = Bytes::from_static(b"xhello");
        let mut r = Reader::new(msg.clone());
        assert_eq!(r.u8("tag").ok(), Some(b'x'));
        let v = r.bytes(5, "value").ok();
        assert_eq!(v.as_deref(), Some(&b"hello"[..]));
        assert_eq!(v.map(|v| v.as_ptr()), msg.get(1..).map(<[u8]>::as_ptr));
        assert!(r.bytes(1, "value").is_err());
        assert!(r.bytes(usize::MAX, "value").is_err());
    }

    #[test]
    fn negative_lengths_and_oversized_counts_are_errors() {
        let mut r = reader(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            r.len_i32("len").err().map(|e| e.kind()),
            Some(DecodeErrorKind::NegativeLength(-1))
        );
        let r = reader(&[0; 10]);
        assert!(r.check_count(0, 10, 1, "n").is_ok());
        assert!(r.check_count(0, 11, 1, "n").is_err());
        assert!(r.check_count(0, usize::MAX, 2, "n").is_err());
    }

    #[test]
    fn booleans_are_zero_or_one() {
        let mut r = reader(&[0, 1, 2]);
        assert_eq!(r.bool("b").ok(), Some(false));
        assert_eq!(r.bool("b").ok(), Some(true));
        let err = r.bool("b").err();
        assert_eq!(
            err.as_ref().map(|e| e.kind()),
            Some(DecodeErrorKind::InvalidBool(2))
        );
        assert_eq!(err.map(|e| e.offset()), Some(2));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut r = reader(&[1, 2]);
        assert_eq!(r.u8("a").ok(), Some(1));
        assert_eq!(
            r.finish().err().map(|e| e.kind()),
            Some(DecodeErrorKind::TrailingBytes(1))
        );
    }
}
