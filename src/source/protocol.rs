//! The bytes of the replication connection, without I/O: backend frames
//! split off what has been read (a large logical message that nobody asked
//! for is told from its first bytes and skipped unread), the CopyBoth
//! stream's XLogData and primary keepalive, the standby status update
//! walnats sends, and the other backend messages the connection reads
//! (authentication requests, ParameterStatus, DataRow, ErrorResponse and
//! NoticeResponse fields).
//!
//! Every length is checked before it is used: short or malformed bytes are
//! `Kind::Protocol` errors, never a panic, and an unknown CopyData kind is
//! an error. This module never touches a socket or reads the clock (the
//! caller passes the time), and it decides no policy: which authentication
//! request is answered is `auth`'s, what a server error means is
//! `replication::server_error`'s.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Error, Kind, Result};
use crate::lsn::Lsn;

/// How much room a read into the frame buffer is given.
const READ_CHUNK: usize = 256 * 1024;
const MAX_FRAME: usize = 1 << 30;
/// A frame larger than this is looked at before it is read whole: a
/// logical message that nobody asked for (any database user can write one
/// of up to 1 GB) is skipped without ever being held in memory.
const LOOK_FIRST: usize = 1 << 20;
/// How far into a logical message its prefix is looked for; a longer one
/// is nobody's.
const MAX_PREFIX: usize = 64 * 1024;
/// The internal tag of a frame skipped by the message filter; its body is
/// the message's wal_end and its size, read by [`parse_skipped`].
pub(super) const SKIPPED: u8 = 0;
/// Microseconds from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// SSLRequest: length 8, code 80877103.
pub(super) const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Which `pg_logical_emit_message` prefixes the reader keeps whole.
pub type MessageFilter = std::sync::Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

pub(super) fn proto(msg: impl Into<String>) -> Error {
    Error::new(
        Kind::Protocol,
        format!("PostgreSQL replication protocol: {}", msg.into()),
    )
}

/// A backend message with a tag that has no place `when` (e.g. "during
/// startup").
pub(super) fn unexpected(tag: u8, when: &str) -> Error {
    proto(format!("unexpected message {:?} {when}", char::from(tag)))
}

/// A server ErrorResponse, with the fields walnats uses.
#[derive(Debug, Clone, Default)]
pub struct ServerError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

/// The detail is never printed: PostgreSQL may put row values there.
impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// One backend message: its tag and body (without the length).
pub(super) struct Frame {
    pub(super) tag: u8,
    pub(super) body: Bytes,
}

/// What has been read from the server and not yet taken as frames. Reads
/// go in through [`FrameBuffer::spare`]; many frames are taken per read,
/// and an XLogData payload stays a zero-copy slice of the buffer.
pub(super) struct FrameBuffer {
    buf: BytesMut,
    /// Large logical messages whose prefix this refuses are skipped.
    keep_message: Option<MessageFilter>,
    /// Bytes of a skipped frame still to be read and dropped.
    discard: usize,
}

impl FrameBuffer {
    pub(super) fn new() -> FrameBuffer {
        FrameBuffer {
            buf: BytesMut::with_capacity(READ_CHUNK),
            keep_message: None,
            discard: 0,
        }
    }

    pub(super) fn skip_unwanted_messages(&mut self, keep: MessageFilter) {
        self.keep_message = Some(keep);
    }

    /// The buffer to read into, with room for a chunk.
    pub(super) fn spare(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        &mut self.buf
    }

    /// The next whole frame, once the rest of a skipped one is dropped;
    /// `None` until more bytes are read.
    pub(super) fn next_frame(&mut self) -> Result<Option<Frame>> {
        if self.discard > 0 {
            let n = self.discard.min(self.buf.len());
            self.buf.advance(n);
            self.discard -= n;
        }
        if self.discard > 0 {
            return Ok(None);
        }
        self.take_frame()
    }

    /// A whole frame from the buffer, if one is there.
    fn take_frame(&mut self) -> Result<Option<Frame>> {
        let Some(&[tag, a, b, c, d]) = self.buf.get(..5) else {
            return Ok(None);
        };
        let len = usize::try_from(u32::from_be_bytes([a, b, c, d])).unwrap_or(usize::MAX);
        if !(4..=MAX_FRAME).contains(&len) {
            return Err(proto(format!("frame length {len} out of range")));
        }
        if self.buf.len() < 1 + len {
            if tag == b'd'
                && len > LOOK_FIRST
                && let Some(keep) = &self.keep_message
            {
                match unwanted_message(self.buf.get(5..).unwrap_or_default(), keep.as_ref()) {
                    // Wait for the prefix before making room for the frame.
                    None => return Ok(None),
                    Some(true) => return Ok(Some(self.skip(len))),
                    Some(false) => {}
                }
            }
            self.buf.reserve(1 + len - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(1 + len).freeze();
        frame.advance(5);
        Ok(Some(Frame { tag, body: frame }))
    }

    /// The CopyData frame of `len` whose start is in the buffer, skipped:
    /// the rest is dropped as it arrives.
    fn skip(&mut self, len: usize) -> Frame {
        // Its wal_end and size, for the session.
        let mut body = BytesMut::with_capacity(16);
        body.put_slice(self.buf.get(14..22).unwrap_or_default());
        body.put_u64(len as u64);
        self.discard = 1 + len - self.buf.len();
        self.buf.clear();
        Frame {
            tag: SKIPPED,
            body: body.freeze(),
        }
    }
}

/// For the first bytes of a CopyData body (its kind byte on): whether it is
/// an XLogData carrying a logical message whose prefix `keep` refuses;
/// `None` until enough bytes are there to tell.
fn unwanted_message(body: &[u8], keep: &dyn Fn(&[u8]) -> bool) -> Option<bool> {
    // 'w', wal_start, wal_end, send_time; then pgoutput's 'M', flags, lsn.
    const PREFIX_AT: usize = 1 + 24 + 1 + 1 + 8;
    let head = body.get(..PREFIX_AT)?;
    if head.first() != Some(&b'w') || head.get(25) != Some(&b'M') {
        return Some(false);
    }
    let rest = body.get(PREFIX_AT..).unwrap_or_default();
    match rest.iter().take(MAX_PREFIX).position(|&b| b == 0) {
        Some(n) => Some(!keep(rest.get(..n).unwrap_or_default())),
        None if rest.len() >= MAX_PREFIX => Some(true),
        None => None,
    }
}

/// The body of a [`SKIPPED`] frame: the message's wal_end and size.
pub(super) fn parse_skipped(mut body: Bytes) -> Result<(Lsn, usize)> {
    let wal_end = Lsn::from_u64(get_u64(&mut body)?);
    let bytes = usize::try_from(get_u64(&mut body)?).unwrap_or(usize::MAX);
    Ok((wal_end, bytes))
}

/// XLogData ('w'): WAL from `wal_start`; `data` is the pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct XLogData {
    pub(super) wal_start: Lsn,
    pub(super) wal_end: Lsn,
    /// The server's clock, microseconds since 2000-01-01.
    pub(super) send_time: i64,
    pub(super) data: Bytes,
}

/// Primary keepalive ('k').
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PrimaryKeepalive {
    pub(super) wal_end: Lsn,
    pub(super) send_time: i64,
    pub(super) reply_requested: bool,
}

/// A CopyData message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum CopyData {
    XLogData(XLogData),
    Keepalive(PrimaryKeepalive),
}

/// A CopyData body (its kind byte on).
pub(super) fn parse_copy_data(mut b: Bytes) -> Result<CopyData> {
    let Some(&kind) = b.first() else {
        return Err(proto("empty CopyData"));
    };
    b.advance(1);
    match kind {
        b'w' => {
            let wal_start = Lsn::from_u64(get_u64(&mut b)?);
            let wal_end = Lsn::from_u64(get_u64(&mut b)?);
            let send_time = get_i64(&mut b)?;
            Ok(CopyData::XLogData(XLogData {
                wal_start,
                wal_end,
                send_time,
                data: b,
            }))
        }
        b'k' => {
            let wal_end = Lsn::from_u64(get_u64(&mut b)?);
            let send_time = get_i64(&mut b)?;
            let reply = *b.first().ok_or_else(|| proto("short keepalive"))?;
            Ok(CopyData::Keepalive(PrimaryKeepalive {
                wal_end,
                send_time,
                reply_requested: reply == 1,
            }))
        }
        other => Err(proto(format!(
            "unknown CopyData kind {:?}",
            char::from(other)
        ))),
    }
}

/// Standby status update ('r'): what walnats has received, and what
/// PostgreSQL may consider flushed (the slot's confirmed_flush_lsn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StandbyStatusUpdate {
    pub(super) write: Lsn,
    pub(super) flush: Lsn,
    pub(super) apply: Lsn,
    /// The client's clock, microseconds since 2000-01-01 ([`pg_clock`]).
    pub(super) clock: i64,
    pub(super) reply_requested: bool,
}

impl StandbyStatusUpdate {
    /// The whole CopyData frame, appended to `out`.
    pub(super) fn encode(&self, out: &mut BytesMut) {
        out.put_u8(b'd');
        out.put_i32(4 + 1 + 8 * 4 + 1);
        out.put_u8(b'r');
        out.put_u64(self.write.as_u64());
        out.put_u64(self.flush.as_u64());
        out.put_u64(self.apply.as_u64());
        out.put_i64(self.clock);
        out.put_u8(u8::from(self.reply_requested));
    }
}

/// `now` as PostgreSQL's protocol counts time: microseconds since
/// 2000-01-01.
pub(super) fn pg_clock(now: SystemTime) -> i64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
        - PG_EPOCH_OFFSET_US
}

/// CopyDone ('c'), appended to `out`.
pub(super) fn copy_done(out: &mut BytesMut) {
    out.put_u8(b'c');
    out.put_i32(4);
}

/// An Authentication ('R') request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AuthRequest {
    /// AuthenticationOk (0).
    Ok,
    /// AuthenticationCleartextPassword (3).
    Cleartext,
    /// AuthenticationMD5Password (5); no salt when the message is too
    /// short for one, an error only once the policy allows an answer.
    Md5 { salt: Option<[u8; 4]> },
    /// AuthenticationSASL (10), with the mechanisms offered.
    Sasl { mechanisms: Vec<String> },
    /// AuthenticationSASLContinue (11), with the server's SCRAM data.
    SaslContinue(Bytes),
    /// AuthenticationSASLFinal (12), with the server's SCRAM data.
    SaslFinal(Bytes),
    /// Any other method, by its code.
    Other(i32),
}

pub(super) fn parse_auth(mut b: Bytes) -> Result<AuthRequest> {
    if b.len() < 4 {
        return Err(proto("short authentication message"));
    }
    Ok(match b.get_i32() {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => AuthRequest::Md5 {
            salt: b.get(..4).and_then(|s| s.try_into().ok()),
        },
        10 => {
            let mut mechanisms = Vec::new();
            while b.first().is_some_and(|&c| c != 0) {
                mechanisms.push(cstr(&mut b)?);
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(b),
        12 => AuthRequest::SaslFinal(b),
        other => AuthRequest::Other(other),
    })
}

/// ParameterStatus ('S'): a setting's name and value.
pub(super) fn parse_parameter_status(mut b: Bytes) -> Result<(String, String)> {
    let name = cstr(&mut b)?;
    let value = cstr(&mut b)?;
    Ok((name, value))
}

/// DataRow ('D') of a simple query: the columns as text.
pub(super) fn parse_data_row(mut b: Bytes) -> Result<Vec<Option<String>>> {
    if b.len() < 2 {
        return Err(proto("short DataRow"));
    }
    let n = b.get_i16();
    let mut row = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(64));
    for _ in 0..n {
        if b.len() < 4 {
            return Err(proto("short DataRow"));
        }
        // Negative: NULL.
        let Ok(len) = usize::try_from(b.get_i32()) else {
            row.push(None);
            continue;
        };
        if b.len() < len {
            return Err(proto("short DataRow"));
        }
        let v = b.split_to(len);
        row.push(Some(
            String::from_utf8(v.to_vec()).map_err(|_| proto("column is not UTF-8"))?,
        ));
    }
    Ok(row)
}

/// The fields of an ErrorResponse ('E'), or of a NoticeResponse ('N'),
/// which has the same layout; a malformed field ends the list.
pub(super) fn parse_error(mut body: Bytes) -> ServerError {
    let mut e = ServerError::default();
    while let Some(&field) = body.first() {
        body.advance(1);
        if field == 0 {
            break;
        }
        let Ok(v) = cstr(&mut body) else { break };
        match field {
            b'C' => e.code = v,
            b'M' => e.message = v,
            b'D' => e.detail = Some(v),
            b'H' => e.hint = Some(v),
            _ => {}
        }
    }
    e
}

/// `15.18 (Debian 15.18-0+deb12u1)` → 150018; `18.6` → 180006.
pub(super) fn parse_server_version(v: &str) -> u32 {
    let num: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = num.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    if major >= 10 {
        major * 10_000 + minor
    } else {
        major * 10_000 + minor * 100 + parts.next().unwrap_or(0)
    }
}

fn cstr(b: &mut Bytes) -> Result<String> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| proto("unterminated string"))?;
    let s = b.split_to(end);
    b.advance(1);
    String::from_utf8(s.to_vec()).map_err(|_| proto("string is not UTF-8"))
}

fn get_u64(b: &mut Bytes) -> Result<u64> {
    if b.len() < 8 {
        return Err(proto("message too short"));
    }
    Ok(b.get_u64())
}

fn get_i64(b: &mut Bytes) -> Result<i64> {
    if b.len() < 8 {
        return Err(proto("message too short"));
    }
    Ok(b.get_i64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xlogdata(wal_start: u64, wal_end: u64, clock: i64, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![b'w'];
        b.extend_from_slice(&wal_start.to_be_bytes());
        b.extend_from_slice(&wal_end.to_be_bytes());
        b.extend_from_slice(&clock.to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn keepalive(wal_end: u64, clock: i64, reply: u8) -> Vec<u8> {
        let mut b = vec![b'k'];
        b.extend_from_slice(&wal_end.to_be_bytes());
        b.extend_from_slice(&clock.to_be_bytes());
        b.push(reply);
        b
    }

    /// A backend message: tag, length, body.
    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![tag];
        f.extend_from_slice(&(4 + body.len() as u32).to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    fn is_protocol_error<T>(r: Result<T>) -> bool {
        matches!(r, Err(e) if e.kind() == Kind::Protocol)
    }

    #[test]
    fn xlogdata_gives_its_start_end_server_clock_and_payload() {
        let body = xlogdata(0x1_0000_0028, 0x1_0000_0100, -5, b"B\x01payload");
        let m = parse_copy_data(Bytes::from(body)).unwrap();
        assert_eq!(
            m,
            CopyData::XLogData(XLogData {
                wal_start: Lsn::from_u64(0x1_0000_0028),
                wal_end: Lsn::from_u64(0x1_0000_0100),
                send_time: -5,
                data: Bytes::from_static(b"B\x01payload"),
            })
        );
    }

    #[test]
    fn keepalive_gives_its_position_clock_and_reply_flag() {
        for (byte, reply_requested) in [(1, true), (0, false)] {
            let m = parse_copy_data(Bytes::from(keepalive(0x2A, 7, byte))).unwrap();
            assert_eq!(
                m,
                CopyData::Keepalive(PrimaryKeepalive {
                    wal_end: Lsn::from_u64(0x2A),
                    send_time: 7,
                    reply_requested,
                })
            );
        }
    }

    #[test]
    fn unknown_or_empty_copydata_is_a_protocol_error() {
        // As long as a keepalive, so that only the kind byte is wrong.
        let mut unknown = keepalive(1, 2, 0);
        unknown[0] = b'r';
        assert!(is_protocol_error(parse_copy_data(Bytes::from(unknown))));
        assert!(is_protocol_error(parse_copy_data(Bytes::new())));
    }

    #[test]
    fn every_truncation_of_a_message_is_a_protocol_error_not_a_panic() {
        let x = xlogdata(1, 2, 3, b"");
        for n in 0..x.len() {
            let short = Bytes::copy_from_slice(&x[..n]);
            assert!(is_protocol_error(parse_copy_data(short)), "XLogData {n}");
        }
        let k = keepalive(1, 2, 1);
        for n in 0..k.len() {
            let short = Bytes::copy_from_slice(&k[..n]);
            assert!(is_protocol_error(parse_copy_data(short)), "keepalive {n}");
        }
        let row = b"\0\x02\0\0\0\x02ab\xff\xff\xff\xff";
        for n in 0..row.len() {
            let short = Bytes::copy_from_slice(&row[..n]);
            assert!(is_protocol_error(parse_data_row(short)), "DataRow {n}");
        }
        let status = b"server_version\x0018.6\0";
        for n in 0..status.len() {
            let short = Bytes::copy_from_slice(&status[..n]);
            assert!(
                is_protocol_error(parse_parameter_status(short)),
                "status {n}"
            );
        }
        let sasl = b"\0\0\0\x0aSCRAM-SHA-256\0\0";
        for n in 0..4 {
            let short = Bytes::copy_from_slice(&sasl[..n]);
            assert!(is_protocol_error(parse_auth(short)), "auth {n}");
        }
        for n in 5..sasl.len() - 1 {
            let short = Bytes::copy_from_slice(&sasl[..n]);
            assert!(is_protocol_error(parse_auth(short)), "SASL {n}");
        }
        let skipped = [0u8; 16];
        for n in 0..skipped.len() {
            let short = Bytes::copy_from_slice(&skipped[..n]);
            assert!(is_protocol_error(parse_skipped(short)), "skipped {n}");
        }
        // ErrorResponse fields end where the bytes do.
        let error = b"SERROR\0C42501\0Mmust be superuser\0\0";
        for n in 0..error.len() {
            let _ = parse_error(Bytes::copy_from_slice(&error[..n]));
        }
    }

    #[test]
    fn a_whole_message_parses() {
        let row = parse_data_row(Bytes::from_static(b"\0\x02\0\0\0\x02ab\xff\xff\xff\xff"));
        assert_eq!(row.unwrap(), vec![Some("ab".to_owned()), None]);
        let bad = parse_data_row(Bytes::from_static(b"\0\x01\0\0\0\x01\xff"));
        assert!(is_protocol_error(bad));
        let status = parse_parameter_status(Bytes::from_static(b"server_version\x0018.6\0"));
        assert_eq!(status.unwrap(), ("server_version".into(), "18.6".into()));
        let sasl = parse_auth(Bytes::from_static(
            b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0",
        ));
        let mechanisms = vec!["SCRAM-SHA-256-PLUS".to_owned(), "SCRAM-SHA-256".to_owned()];
        assert_eq!(sasl.unwrap(), AuthRequest::Sasl { mechanisms });
        let md5 = parse_auth(Bytes::from_static(b"\0\0\0\x05salt"));
        assert_eq!(
            md5.unwrap(),
            AuthRequest::Md5 {
                salt: Some(*b"salt")
            }
        );
        // Too short for a salt: refused only if the policy allows an answer.
        let md5 = parse_auth(Bytes::from_static(b"\0\0\0\x05sal"));
        assert_eq!(md5.unwrap(), AuthRequest::Md5 { salt: None });
        let skipped = parse_skipped(Bytes::from_static(
            b"\0\0\0\x01\0\0\0\x28\0\0\0\0\0\x20\0\0",
        ));
        assert_eq!(skipped.unwrap(), (Lsn::from_u64(0x1_0000_0028), 0x20_0000));
    }

    #[test]
    fn the_standby_status_update_is_r_write_flush_apply_clock_reply() {
        let update = StandbyStatusUpdate {
            write: Lsn::from_u64(0x0102_0304_0506_0708),
            flush: Lsn::from_u64(0x10),
            apply: Lsn::from_u64(0x20),
            clock: 0x0A0B_0C0D,
            reply_requested: true,
        };
        let mut out = BytesMut::new();
        update.encode(&mut out);
        let mut expected = vec![b'd', 0, 0, 0, 38, b'r'];
        expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x10]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x20]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0x0A, 0x0B, 0x0C, 0x0D]);
        expected.push(1);
        assert_eq!(&out[..], &expected[..]);
        let mut out = BytesMut::new();
        StandbyStatusUpdate {
            reply_requested: false,
            ..update
        }
        .encode(&mut out);
        assert_eq!(out.last(), Some(&0));
    }

    #[test]
    fn the_clock_counts_microseconds_from_2000() {
        let y2k = UNIX_EPOCH + std::time::Duration::from_secs(946_684_800);
        assert_eq!(pg_clock(y2k), 0);
        assert_eq!(
            pg_clock(y2k + std::time::Duration::from_micros(1_500)),
            1_500
        );
    }

    /// Feeds `bytes` in pieces of `step`, taking every frame as it is whole.
    fn split(frames: &mut FrameBuffer, bytes: &[u8], step: usize) -> Vec<(u8, Bytes)> {
        let mut out = Vec::new();
        for piece in bytes.chunks(step) {
            frames.spare().extend_from_slice(piece);
            while let Some(f) = frames.next_frame().unwrap() {
                out.push((f.tag, f.body));
            }
        }
        out
    }

    #[test]
    fn frames_are_taken_whole_however_the_reads_cut_them() {
        let copy = xlogdata(1, 2, 3, b"payload");
        let mut bytes = frame(b'd', &copy);
        bytes.extend(frame(b'Z', b"I"));
        bytes.extend(frame(b'c', b""));
        for step in [1, 2, 5, 6, 7, 1000] {
            let got = split(&mut FrameBuffer::new(), &bytes, step);
            let expected = vec![
                (b'd', Bytes::from(copy.clone())),
                (b'Z', Bytes::from_static(b"I")),
                (b'c', Bytes::new()),
            ];
            assert_eq!(got, expected, "step {step}");
        }
        // Nothing until the last byte of a frame is there.
        let mut frames = FrameBuffer::new();
        let one = frame(b'd', &copy);
        assert!(split(&mut frames, &one[..one.len() - 1], 1).is_empty());
        assert_eq!(split(&mut frames, &one[one.len() - 1..], 1).len(), 1);
    }

    #[test]
    fn a_frame_length_out_of_range_is_a_protocol_error() {
        for len in [0u32, 3, (1 << 30) + 1, u32::MAX] {
            let mut frames = FrameBuffer::new();
            frames.spare().put_u8(b'd');
            frames.spare().put_u32(len);
            assert!(is_protocol_error(frames.next_frame()), "{len}");
        }
    }

    fn message_frame(prefix: &[u8], content: usize) -> Vec<u8> {
        let mut b = vec![b'w'];
        b.extend_from_slice(&[0; 24]);
        b.push(b'M');
        b.push(0);
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(prefix);
        b.push(0);
        b.extend_from_slice(&(content as u32).to_be_bytes());
        b
    }

    #[test]
    fn a_message_nobody_asked_for_is_told_from_its_first_bytes() {
        let keep = |p: &[u8]| p == b"wanted";
        let wanted = message_frame(b"wanted", 10);
        assert_eq!(unwanted_message(&wanted, &keep), Some(false));
        let other = message_frame(b"other", 10);
        assert_eq!(unwanted_message(&other, &keep), Some(true));
        // Not enough bytes yet to see the prefix's end.
        assert_eq!(unwanted_message(&other[..30], &keep), None);
        assert_eq!(unwanted_message(&other[..38], &keep), None);
        // A row change is never skipped.
        let mut insert = other.clone();
        insert[25] = b'I';
        assert_eq!(unwanted_message(&insert, &keep), Some(false));
        // A prefix without an end within 64 KiB is nobody's.
        let mut long = message_frame(b"", 0);
        long.truncate(35);
        long.extend(std::iter::repeat_n(b'x', MAX_PREFIX));
        assert_eq!(unwanted_message(&long, &keep), Some(true));
    }

    /// A CopyData frame of a logical message with `prefix`, 2 MiB long,
    /// whose XLogData says wal_end 0x42.
    fn large_message(prefix: &[u8]) -> Vec<u8> {
        let mut body = message_frame(prefix, 0);
        body[9..17].copy_from_slice(&0x42u64.to_be_bytes());
        body.resize(2 << 20, b'x');
        frame(b'd', &body)
    }

    #[test]
    fn a_large_message_nobody_asked_for_is_skipped_unread() {
        let mut frames = FrameBuffer::new();
        frames.skip_unwanted_messages(std::sync::Arc::new(|p: &[u8]| p == b"wanted"));
        let unwanted = large_message(b"other");
        let mut bytes = unwanted.clone();
        bytes.extend(frame(b'k', &keepalive(1, 2, 0)));
        let got = split(&mut frames, &bytes, 64 * 1024);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, SKIPPED);
        let (wal_end, size) = parse_skipped(got[0].1.clone()).unwrap();
        assert_eq!((wal_end, size + 1), (Lsn::from_u64(0x42), unwanted.len()));
        assert_eq!(got[1].0, b'k');
        // A wanted one comes whole.
        let wanted = large_message(b"wanted");
        let got = split(&mut frames, &wanted, 64 * 1024);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.len() + 5, wanted.len());
    }

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.18 (Debian 15.18-0+deb12u1)"),
            150018
        );
        assert_eq!(parse_server_version("18.6"), 180006);
        assert_eq!(parse_server_version("9.6.24"), 90624);
        assert_eq!(parse_server_version("17devel"), 170000);
    }

    #[test]
    fn error_fields_parse_and_unknown_fields_are_skipped() {
        let body = Bytes::from_static(b"SERROR\0C42501\0Mmust be superuser\0Xwhat\0\0");
        let e = parse_error(body);
        assert_eq!(e.code, "42501");
        assert_eq!(e.message, "must be superuser");
        let truncated = parse_error(Bytes::from_static(b"C4250"));
        assert_eq!(truncated.code, "");
    }
}
