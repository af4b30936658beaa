//! pgoutput messages as typed values, and their decoding.
//!
//! Owns the message types and the bytes → [`Message`] direction: the
//! stateful [`Decoder`] (which tracks whether a stream block is open, since
//! that decides whether change messages carry a leading xid) and the
//! stateless [`decode_message`]. Field layouts are in the module docs of
//! [`crate::pgoutput`]. It never interprets column values (they stay the
//! bytes PostgreSQL sent) and never touches a socket.

use std::fmt;

use bytes::Bytes;

use super::error::{DecodeError, DecodeErrorKind};
use super::reader::Reader;
use crate::lsn::Lsn;

/// A PostgreSQL transaction id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Xid(pub u32);

impl fmt::Display for Xid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A PostgreSQL object id: a relation or a type.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Oid(pub u32);

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// 'B': a transaction starts. Timestamps here and below are microseconds
/// since 2000-01-01 00:00:00 UTC, as PostgreSQL sends them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    pub final_lsn: Lsn,
    pub commit_time: i64,
    pub xid: Xid,
}

/// 'C': a transaction commits. `flags` is currently always 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

/// 'O': the transaction was replicated from elsewhere; `commit_lsn` is the
/// commit LSN on the origin server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// A table's replica identity: which old values updates and deletes carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// 'd': the primary key.
    Default,
    /// 'n': nothing.
    Nothing,
    /// 'f': all columns.
    Full,
    /// 'i': the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    pub fn from_byte(b: u8) -> Option<ReplicaIdentity> {
        match b {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }

    pub fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }
}

/// One column of a [`Relation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (bit 0 of `flags`).
    pub key: bool,
    /// The flags byte as sent. Only bit 0 is defined today; the rest is kept
    /// so that re-encoding gives back the same bytes. The encoder writes
    /// `flags` with bit 0 taken from `key`.
    pub flags: u8,
    pub name: String,
    pub type_oid: Oid,
    /// atttypmod: -1 when the type has none (e.g. `varchar(20)` sends 24).
    pub type_modifier: i32,
}

/// 'R': a table's shape. Sent before the first change of a table in a
/// session and again whenever it changes; changes refer to it by `oid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// Present inside a stream block only.
    pub xid: Option<Xid>,
    pub oid: Oid,
    /// Empty for `pg_catalog`, as sent.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

/// 'Y': a non-built-in type used by a column. For a domain, `oid` is the
/// domain's and `namespace`/`name` are its base type's (empty namespace for
/// `pg_catalog`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeMsg {
    /// Present inside a stream block only.
    pub xid: Option<Xid>,
    pub oid: Oid,
    pub namespace: String,
    pub name: String,
}

/// One column value of a tuple, borrowed from the tuple's message bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TupleValue<'a> {
    /// 'n': SQL NULL.
    Null,
    /// 'u': an unchanged TOASTed value that PostgreSQL did not send.
    Unchanged,
    /// 't': the value in text format (bytes in the server encoding, as sent).
    Text(&'a [u8]),
    /// 'b': the value in binary format (only with the `binary` option).
    Binary(&'a [u8]),
}

/// The kind byte of a column, as [`TupleData`] keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueKind {
    Null,
    Unchanged,
    Text,
    Binary,
}

/// Where one column's value is in the tuple's bytes.
#[derive(Clone, Copy, Debug)]
struct Slot {
    kind: ValueKind,
    start: usize,
    len: usize,
}

/// The column values of one row, in the column order of its [`Relation`].
///
/// The hot path keeps the message once (one `Bytes`, one reference count)
/// and per column its kind, offset and length, rather than one `Bytes` per
/// column (an atomic increment and decrement each); values are read as
/// [`TupleValue`]s borrowing from it. Equality compares the values, not
/// where they are stored.
#[derive(Clone, Default)]
pub struct TupleData {
    buf: Bytes,
    slots: Vec<Slot>,
}

impl TupleData {
    /// A tuple holding copies of `values` (tests, snapshots, benches).
    pub fn from_values<'v>(values: impl IntoIterator<Item = TupleValue<'v>>) -> TupleData {
        let mut buf = Vec::new();
        let mut slots = Vec::new();
        for v in values {
            let (kind, bytes): (ValueKind, &[u8]) = match v {
                TupleValue::Null => (ValueKind::Null, &[]),
                TupleValue::Unchanged => (ValueKind::Unchanged, &[]),
                TupleValue::Text(b) => (ValueKind::Text, b),
                TupleValue::Binary(b) => (ValueKind::Binary, b),
            };
            slots.push(Slot {
                kind,
                start: buf.len(),
                len: bytes.len(),
            });
            buf.extend_from_slice(bytes);
        }
        TupleData {
            buf: Bytes::from(buf),
            slots,
        }
    }

    /// The number of columns.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The value of column `i`, if there is one.
    pub fn get(&self, i: usize) -> Option<TupleValue<'_>> {
        self.slots.get(i).map(|s| self.value(s))
    }

    /// The values in column order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = TupleValue<'_>> + Clone + '_ {
        self.slots.iter().map(|s| self.value(s))
    }

    /// The values, collected (tests).
    pub fn values(&self) -> Vec<TupleValue<'_>> {
        self.iter().collect()
    }

    fn value(&self, s: &Slot) -> TupleValue<'_> {
        // Every slot was checked against `buf` when it was made.
        let bytes = || {
            s.start
                .checked_add(s.len)
                .and_then(|end| self.buf.get(s.start..end))
                .unwrap_or_default()
        };
        match s.kind {
            ValueKind::Null => TupleValue::Null,
            ValueKind::Unchanged => TupleValue::Unchanged,
            ValueKind::Text => TupleValue::Text(bytes()),
            ValueKind::Binary => TupleValue::Binary(bytes()),
        }
    }
}

impl PartialEq for TupleData {
    fn eq(&self, other: &TupleData) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for TupleData {}

impl fmt::Debug for TupleData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TupleData")
            .field("columns", &self.values())
            .finish()
    }
}

/// The old row sent by updates and deletes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': the replica identity columns (others are Null).
    Key(TupleData),
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

impl OldTuple {
    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// 'I': a row was inserted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insert {
    /// Present inside a stream block only.
    pub xid: Option<Xid>,
    pub oid: Oid,
    pub new: TupleData,
}

/// 'U': a row was updated. `old` is sent only when the replica identity
/// changed (Key) or with REPLICA IDENTITY FULL (Full).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// Present inside a stream block only.
    pub xid: Option<Xid>,
    pub oid: Oid,
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

/// 'D': a row was deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delete {
    /// Present inside a stream block only.
    pub xid: Option<Xid>,
    pub oid: Oid,
    pub old: OldTuple,
}

/// 'T': tables were truncated together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    /// Present inside a stream block only.
    pub xid: Option<Xid>,
    /// Bit 0: CASCADE, bit 1: RESTART IDENTITY.
    pub options: u8,
    pub oids: Vec<Oid>,
}

impl Truncate {
    pub fn cascade(&self) -> bool {
        self.options & 1 != 0
    }

    pub fn restart_identity(&self) -> bool {
        self.options & 2 != 0
    }
}

/// 'M': `pg_logical_emit_message(transactional, prefix, content)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Present inside a stream block only.
    pub xid: Option<Xid>,
    /// Bit 0 of `flags`.
    pub transactional: bool,
    /// The flags byte as sent; the encoder writes it with bit 0 taken from
    /// `transactional`.
    pub flags: u8,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// 'S': a block of a large in-progress transaction starts (protocol 2+).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: Xid,
    /// The first block of this transaction.
    pub first_segment: bool,
}

/// 'c': a streamed transaction commits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: Xid,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

/// The fields protocol 4 adds to Stream Abort with `streaming = parallel`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbortInfo {
    pub abort_lsn: Lsn,
    pub abort_time: i64,
}

/// 'A': a streamed transaction (`subxid == xid`) or one of its
/// subtransactions aborted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: Xid,
    pub subxid: Xid,
    /// Present with protocol 4 and `streaming = parallel` only.
    pub parallel: Option<AbortInfo>,
}

/// 'b': a prepared transaction's changes follow (two-phase, protocol 3+).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BeginPrepare {
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: i64,
    pub xid: Xid,
    pub gid: String,
}

/// 'P' (Prepare) and 'p' (Stream Prepare): the transaction was prepared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepare {
    pub flags: u8,
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: i64,
    pub xid: Xid,
    pub gid: String,
}

/// 'K': a prepared transaction was committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitPrepared {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
    pub xid: Xid,
    pub gid: String,
}

/// 'r': a prepared transaction was rolled back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollbackPrepared {
    pub flags: u8,
    pub prepare_end_lsn: Lsn,
    pub rollback_end_lsn: Lsn,
    pub prepare_time: i64,
    pub rollback_time: i64,
    pub xid: Xid,
    pub gid: String,
}

/// One pgoutput message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeMsg),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    LogicalMessage(LogicalMessage),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
    BeginPrepare(BeginPrepare),
    Prepare(Prepare),
    CommitPrepared(CommitPrepared),
    RollbackPrepared(RollbackPrepared),
    StreamPrepare(Prepare),
}

impl Message {
    /// The tag byte that starts this message on the wire.
    pub fn tag(&self) -> u8 {
        match self {
            Message::Begin(_) => b'B',
            Message::Commit(_) => b'C',
            Message::Origin(_) => b'O',
            Message::Relation(_) => b'R',
            Message::Type(_) => b'Y',
            Message::Insert(_) => b'I',
            Message::Update(_) => b'U',
            Message::Delete(_) => b'D',
            Message::Truncate(_) => b'T',
            Message::LogicalMessage(_) => b'M',
            Message::StreamStart(_) => b'S',
            Message::StreamStop => b'E',
            Message::StreamCommit(_) => b'c',
            Message::StreamAbort(_) => b'A',
            Message::BeginPrepare(_) => b'b',
            Message::Prepare(_) => b'P',
            Message::CommitPrepared(_) => b'K',
            Message::RollbackPrepared(_) => b'r',
            Message::StreamPrepare(_) => b'p',
        }
    }

    /// The message's name as the PostgreSQL documentation spells it.
    pub fn name(&self) -> &'static str {
        tag_name(self.tag()).unwrap_or("unknown")
    }
}

/// The documented name of a message tag, `None` for an unknown tag.
pub fn tag_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        b'p' => "Stream Prepare",
        _ => return None,
    })
}

/// Decodes the messages of one replication session in order.
///
/// It remembers whether a stream block is open (between Stream Start and
/// Stream Stop), because inside one Relation, Type, Insert, Update, Delete,
/// Truncate and Message carry a leading xid; and whether Stream Abort
/// carries the protocol 4 parallel fields, which PostgreSQL sends only when
/// `streaming = parallel` was requested. Use one decoder per session.
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    in_stream: bool,
    parallel_abort: bool,
}

impl Decoder {
    /// A decoder for a session that did not request `streaming = parallel`.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Set when the session requested `proto_version 4` with
    /// `streaming = parallel`: Stream Abort then carries abort LSN and time.
    pub fn parallel_streaming(mut self, parallel: bool) -> Decoder {
        self.parallel_abort = parallel;
        self
    }

    /// Whether a stream block is open.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Decodes one message (the payload of one XLogData). On error the
    /// decoder's state is unchanged.
    pub fn decode(&mut self, data: Bytes) -> Result<Message, DecodeError> {
        let abort = if self.parallel_abort {
            AbortFields::Present
        } else {
            AbortFields::Absent
        };
        let msg = decode(data, self.in_stream, abort)?;
        match (&msg, self.in_stream) {
            (Message::StreamStart(_), true) => {
                return Err(stream_state_error(
                    "Stream Start",
                    DecodeErrorKind::StreamStartInStream,
                ));
            }
            (Message::StreamStart(_), false) => self.in_stream = true,
            (Message::StreamStop, false) => {
                return Err(stream_state_error(
                    "Stream Stop",
                    DecodeErrorKind::StreamStopOutsideStream,
                ));
            }
            (Message::StreamStop, true) => self.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }
}

fn stream_state_error(message: &'static str, kind: DecodeErrorKind) -> DecodeError {
    DecodeError::new(kind, message, "tag", 0)
}

/// Decodes one message without session state: `in_stream` says whether it
/// is inside a stream block. A Stream Abort's protocol 4 parallel fields are
/// read when the message is long enough to hold them (25 bytes rather
/// than 9), since the message alone cannot say whether they were requested.
pub fn decode_message(data: Bytes, in_stream: bool) -> Result<Message, DecodeError> {
    decode(data, in_stream, AbortFields::ByLength)
}

/// Whether Stream Abort carries abort LSN and time.
#[derive(Clone, Copy)]
enum AbortFields {
    Absent,
    Present,
    ByLength,
}

fn decode(data: Bytes, in_stream: bool, abort: AbortFields) -> Result<Message, DecodeError> {
    let mut r = Reader::new(data);
    if r.remaining() == 0 {
        return Err(r.error("tag", DecodeErrorKind::Empty));
    }
    let tag = r.u8("tag")?;
    let Some(name) = tag_name(tag) else {
        return Err(r.error_at(0, "tag", DecodeErrorKind::UnknownTag(tag)));
    };
    r.set_message(name);
    let r = &mut r;
    let msg = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.lsn("final lsn")?,
            commit_time: r.i64("commit time")?,
            xid: xid(r, "xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("end lsn")?,
            commit_time: r.i64("commit time")?,
        }),
        b'O' => Message::Origin(Origin {
            commit_lsn: r.lsn("origin commit lsn")?,
            name: r.string("origin name")?,
        }),
        b'R' => Message::Relation(relation(r, in_stream)?),
        b'Y' => Message::Type(TypeMsg {
            xid: stream_xid(r, in_stream)?,
            oid: oid(r, "type oid")?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        }),
        b'I' => {
            let xid = stream_xid(r, in_stream)?;
            let oid = oid(r, "relation oid")?;
            expect_tuple_tag(r, b'N', "new tuple tag")?;
            Message::Insert(Insert {
                xid,
                oid,
                new: tuple(r)?,
            })
        }
        b'U' => Message::Update(update(r, in_stream)?),
        b'D' => {
            let xid = stream_xid(r, in_stream)?;
            let oid = oid(r, "relation oid")?;
            let at = r.offset();
            let old = match r.u8("old tuple tag")? {
                b'K' => OldTuple::Key(tuple(r)?),
                b'O' => OldTuple::Full(tuple(r)?),
                t => {
                    return Err(r.error_at(
                        at,
                        "old tuple tag",
                        DecodeErrorKind::UnexpectedTupleTag(t),
                    ));
                }
            };
            Message::Delete(Delete { xid, oid, old })
        }
        b'T' => Message::Truncate(truncate(r, in_stream)?),
        b'M' => {
            let xid = stream_xid(r, in_stream)?;
            let flags = r.u8("flags")?;
            let lsn = r.lsn("message lsn")?;
            let prefix = r.string("prefix")?;
            let len = r.len_i32("content length")?;
            Message::LogicalMessage(LogicalMessage {
                xid,
                transactional: flags & 1 != 0,
                flags,
                lsn,
                prefix,
                content: r.bytes(len, "content")?,
            })
        }
        b'S' => Message::StreamStart(StreamStart {
            xid: xid(r, "xid")?,
            first_segment: r.bool("first segment")?,
        }),
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit(StreamCommit {
            xid: xid(r, "xid")?,
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("end lsn")?,
            commit_time: r.i64("commit time")?,
        }),
        b'A' => {
            let xid = xid(r, "xid")?;
            let subxid = self::xid(r, "subtransaction xid")?;
            let parallel = match abort {
                AbortFields::Absent => false,
                AbortFields::Present => true,
                AbortFields::ByLength => r.remaining() > 0,
            };
            let parallel = if parallel {
                Some(AbortInfo {
                    abort_lsn: r.lsn("abort lsn")?,
                    abort_time: r.i64("abort time")?,
                })
            } else {
                None
            };
            Message::StreamAbort(StreamAbort {
                xid,
                subxid,
                parallel,
            })
        }
        b'b' => Message::BeginPrepare(BeginPrepare {
            prepare_lsn: r.lsn("prepare lsn")?,
            end_lsn: r.lsn("end lsn")?,
            prepare_time: r.i64("prepare time")?,
            xid: xid(r, "xid")?,
            gid: r.string("gid")?,
        }),
        b'P' => Message::Prepare(prepare(r)?),
        b'p' => Message::StreamPrepare(prepare(r)?),
        b'K' => Message::CommitPrepared(CommitPrepared {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("end lsn")?,
            commit_time: r.i64("commit time")?,
            xid: xid(r, "xid")?,
            gid: r.string("gid")?,
        }),
        b'r' => Message::RollbackPrepared(RollbackPrepared {
            flags: r.u8("flags")?,
            prepare_end_lsn: r.lsn("prepare end lsn")?,
            rollback_end_lsn: r.lsn("rollback end lsn")?,
            prepare_time: r.i64("prepare time")?,
            rollback_time: r.i64("rollback time")?,
            xid: xid(r, "xid")?,
            gid: r.string("gid")?,
        }),
        // tag_name() above knows exactly the tags matched here.
        _ => return Err(r.error_at(0, "tag", DecodeErrorKind::UnknownTag(tag))),
    };
    r.finish()?;
    Ok(msg)
}

fn xid(r: &mut Reader, field: &'static str) -> Result<Xid, DecodeError> {
    r.u32(field).map(Xid)
}

fn oid(r: &mut Reader, field: &'static str) -> Result<Oid, DecodeError> {
    r.u32(field).map(Oid)
}

fn stream_xid(r: &mut Reader, in_stream: bool) -> Result<Option<Xid>, DecodeError> {
    if in_stream {
        xid(r, "streamed transaction xid").map(Some)
    } else {
        Ok(None)
    }
}

fn expect_tuple_tag(r: &mut Reader, want: u8, field: &'static str) -> Result<(), DecodeError> {
    let at = r.offset();
    match r.u8(field)? {
        t if t == want => Ok(()),
        t => Err(r.error_at(at, field, DecodeErrorKind::UnexpectedTupleTag(t))),
    }
}

fn relation(r: &mut Reader, in_stream: bool) -> Result<Relation, DecodeError> {
    let xid = stream_xid(r, in_stream)?;
    let oid = oid(r, "relation oid")?;
    let namespace = r.string("relation namespace")?;
    let name = r.string("relation name")?;
    let at = r.offset();
    let ri = r.u8("replica identity")?;
    let replica_identity = ReplicaIdentity::from_byte(ri).ok_or_else(|| {
        r.error_at(
            at,
            "replica identity",
            DecodeErrorKind::UnknownReplicaIdentity(ri),
        )
    })?;
    let at = r.offset();
    let count = usize::from(r.u16("column count")?);
    // flags (1) + name (at least its NUL, 1) + type oid (4) + typmod (4)
    r.check_count(at, count, 10, "column count")?;
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        let flags = r.u8("column flags")?;
        columns.push(Column {
            key: flags & 1 != 0,
            flags,
            name: r.string("column name")?,
            type_oid: self::oid(r, "column type oid")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        xid,
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn update(r: &mut Reader, in_stream: bool) -> Result<Update, DecodeError> {
    let xid = stream_xid(r, in_stream)?;
    let oid = oid(r, "relation oid")?;
    let at = r.offset();
    let old = match r.u8("tuple tag")? {
        b'N' => None,
        b'K' => Some(OldTuple::Key(tuple(r)?)),
        b'O' => Some(OldTuple::Full(tuple(r)?)),
        t => {
            return Err(r.error_at(at, "tuple tag", DecodeErrorKind::UnexpectedTupleTag(t)));
        }
    };
    if old.is_some() {
        expect_tuple_tag(r, b'N', "new tuple tag")?;
    }
    Ok(Update {
        xid,
        oid,
        old,
        new: tuple(r)?,
    })
}

fn truncate(r: &mut Reader, in_stream: bool) -> Result<Truncate, DecodeError> {
    let xid = stream_xid(r, in_stream)?;
    let at = r.offset();
    let count = r.len_i32("relation count")?;
    let options = r.u8("options")?;
    r.check_count(at, count, 4, "relation count")?;
    let mut oids = Vec::with_capacity(count);
    for _ in 0..count {
        oids.push(oid(r, "relation oid")?);
    }
    Ok(Truncate { xid, options, oids })
}

fn prepare(r: &mut Reader) -> Result<Prepare, DecodeError> {
    Ok(Prepare {
        flags: r.u8("flags")?,
        prepare_lsn: r.lsn("prepare lsn")?,
        end_lsn: r.lsn("end lsn")?,
        prepare_time: r.i64("prepare time")?,
        xid: xid(r, "xid")?,
        gid: r.string("gid")?,
    })
}

/// TupleData: Int16 column count, then per column a kind byte and, for 't'
/// and 'b', an Int32 length and that many bytes. The hot path: one Vec per
/// row, sized from the count once the count is known to fit, and values as
/// offsets into the message, which the tuple holds once.
fn tuple(r: &mut Reader) -> Result<TupleData, DecodeError> {
    let at = r.offset();
    let count = usize::from(r.u16("tuple column count")?);
    // Every column takes at least its kind byte.
    r.check_count(at, count, 1, "tuple column count")?;
    let mut slots = Vec::with_capacity(count);
    for _ in 0..count {
        let at = r.offset();
        let kind = match r.u8("column kind")? {
            b'n' => ValueKind::Null,
            b'u' => ValueKind::Unchanged,
            b't' => ValueKind::Text,
            b'b' => ValueKind::Binary,
            k => {
                return Err(r.error_at(at, "column kind", DecodeErrorKind::UnknownColumnKind(k)));
            }
        };
        let (start, len) = match kind {
            ValueKind::Text | ValueKind::Binary => {
                let len = r.len_i32("column value length")?;
                (r.skip(len, "column value")?, len)
            }
            ValueKind::Null | ValueKind::Unchanged => (0, 0),
        };
        slots.push(Slot { kind, start, len });
    }
    Ok(TupleData {
        buf: r.buffer().clone(),
        slots,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Builds message bytes field by field, the way PostgreSQL writes them.
    #[derive(Default)]
    struct B(Vec<u8>);

    impl B {
        fn tag(t: u8) -> B {
            B(vec![t])
        }
        fn u8(mut self, v: u8) -> B {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> B {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> B {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> B {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> B {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn raw(mut self, v: &[u8]) -> B {
            self.0.extend_from_slice(v);
            self
        }
        fn str(self, s: &str) -> B {
            self.raw(s.as_bytes()).u8(0)
        }
        fn text(self, v: &str) -> B {
            let len = i32::try_from(v.len()).unwrap();
            self.u8(b't').i32(len).raw(v.as_bytes())
        }
        fn bytes(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    const LSN1: u64 = 0x0000_0001_0000_00A0;
    const LSN2: u64 = 0x0000_0001_0000_00B8;
    const T: i64 = 817_000_000_000_000;

    fn lsn(v: u64) -> Lsn {
        Lsn::from_u64(v)
    }

    fn ok(b: B) -> Message {
        decode_message(b.bytes(), false).unwrap()
    }

    fn ok_in_stream(b: B) -> Message {
        decode_message(b.bytes(), true).unwrap()
    }

    fn err(b: B) -> DecodeError {
        decode_message(b.bytes(), false).unwrap_err()
    }

    fn text(s: &'static str) -> TupleValue<'static> {
        TupleValue::Text(s.as_bytes())
    }

    #[test]
    fn begin() {
        let m = ok(B::tag(b'B').i64(LSN1 as i64).i64(T).u32(731));
        assert_eq!(
            m,
            Message::Begin(Begin {
                final_lsn: lsn(LSN1),
                commit_time: T,
                xid: Xid(731)
            })
        );
        assert_eq!(m.name(), "Begin");
    }

    #[test]
    fn commit() {
        let m = ok(B::tag(b'C').u8(0).i64(LSN1 as i64).i64(LSN2 as i64).i64(T));
        assert_eq!(
            m,
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: lsn(LSN1),
                end_lsn: lsn(LSN2),
                commit_time: T
            })
        );
    }

    #[test]
    fn origin() {
        let m = ok(B::tag(b'O').i64(0xABCDEF).str("origin_a"));
        assert_eq!(
            m,
            Message::Origin(Origin {
                commit_lsn: lsn(0xABCDEF),
                name: "origin_a".into()
            })
        );
    }

    fn relation_bytes(xid: Option<u32>) -> B {
        let b = B::tag(b'R');
        let b = match xid {
            Some(x) => b.u32(x),
            None => b,
        };
        b.u32(16384)
            .str("public")
            .str("orders")
            .u8(b'd')
            .u16(2)
            .u8(1)
            .str("id")
            .u32(23)
            .i32(-1)
            .u8(0)
            .str("name")
            .u32(1043)
            .i32(24)
    }

    #[test]
    fn relation() {
        let Message::Relation(r) = ok(relation_bytes(None)) else {
            panic!("not a relation")
        };
        assert_eq!(r.xid, None);
        assert_eq!(r.oid, Oid(16384));
        assert_eq!(
            (r.namespace.as_str(), r.name.as_str()),
            ("public", "orders")
        );
        assert_eq!(r.replica_identity, ReplicaIdentity::Default);
        assert_eq!(
            r.columns,
            vec![
                Column {
                    key: true,
                    flags: 1,
                    name: "id".into(),
                    type_oid: Oid(23),
                    type_modifier: -1
                },
                Column {
                    key: false,
                    flags: 0,
                    name: "name".into(),
                    type_oid: Oid(1043),
                    type_modifier: 24
                },
            ]
        );
        let Message::Relation(r) = ok_in_stream(relation_bytes(Some(900))) else {
            panic!("not a relation")
        };
        assert_eq!(r.xid, Some(Xid(900)));
    }

    #[test]
    fn relation_replica_identities() {
        for (b, ri) in [
            (b'd', ReplicaIdentity::Default),
            (b'n', ReplicaIdentity::Nothing),
            (b'f', ReplicaIdentity::Full),
            (b'i', ReplicaIdentity::Index),
        ] {
            let m = ok(B::tag(b'R').u32(1).str("").str("t").u8(b).u16(0));
            let Message::Relation(r) = m else {
                panic!("not a relation")
            };
            assert_eq!(r.replica_identity, ri);
            assert_eq!(ri.as_byte(), b);
        }
        let e = err(B::tag(b'R').u32(1).str("").str("t").u8(b'x').u16(0));
        assert_eq!(e.kind(), DecodeErrorKind::UnknownReplicaIdentity(b'x'));
        assert_eq!((e.field(), e.offset()), ("replica identity", 8));
    }

    #[test]
    fn type_message() {
        let m = ok(B::tag(b'Y').u32(16390).str("public").str("mood"));
        assert_eq!(
            m,
            Message::Type(TypeMsg {
                xid: None,
                oid: Oid(16390),
                namespace: "public".into(),
                name: "mood".into()
            })
        );
        let m = ok_in_stream(B::tag(b'Y').u32(7).u32(16390).str("").str("int4"));
        let Message::Type(t) = m else { panic!() };
        assert_eq!((t.xid, t.namespace.as_str()), (Some(Xid(7)), ""));
    }

    #[test]
    fn insert_with_every_column_kind() {
        let m = ok(B::tag(b'I')
            .u32(16384)
            .u8(b'N')
            .u16(4)
            .text("42")
            .u8(b'n')
            .u8(b'u')
            .u8(b'b')
            .i32(2)
            .raw(&[0, 0xff]));
        assert_eq!(
            m,
            Message::Insert(Insert {
                xid: None,
                oid: Oid(16384),
                new: TupleData::from_values(vec![
                    text("42"),
                    TupleValue::Null,
                    TupleValue::Unchanged,
                    TupleValue::Binary(&[0, 0xff])
                ])
            })
        );
        let m = ok(B::tag(b'I').u32(1).u8(b'N').u16(1).text(""));
        let Message::Insert(i) = m else { panic!() };
        assert_eq!(i.new.values(), vec![text("")]);
        let m = ok(B::tag(b'I').u32(1).u8(b'N').u16(0));
        let Message::Insert(i) = m else { panic!() };
        assert!(i.new.is_empty());
    }

    #[test]
    fn insert_needs_new_tuple_tag() {
        let e = err(B::tag(b'I').u32(1).u8(b'K').u16(0));
        assert_eq!(e.kind(), DecodeErrorKind::UnexpectedTupleTag(b'K'));
        assert_eq!((e.message(), e.offset()), ("Insert", 5));
    }

    #[test]
    fn update_without_old_with_key_and_with_full() {
        let m = ok(B::tag(b'U').u32(5).u8(b'N').u16(1).text("a"));
        assert_eq!(
            m,
            Message::Update(Update {
                xid: None,
                oid: Oid(5),
                old: None,
                new: TupleData::from_values(vec![text("a")])
            })
        );
        let m = ok(B::tag(b'U')
            .u32(5)
            .u8(b'K')
            .u16(2)
            .text("1")
            .u8(b'n')
            .u8(b'N')
            .u16(2)
            .text("2")
            .u8(b'u'));
        let Message::Update(u) = m else { panic!() };
        assert_eq!(
            u.old,
            Some(OldTuple::Key(TupleData::from_values(vec![
                text("1"),
                TupleValue::Null
            ])))
        );
        assert_eq!(u.new.values(), vec![text("2"), TupleValue::Unchanged]);
        let m = ok(B::tag(b'U')
            .u32(5)
            .u8(b'O')
            .u16(1)
            .text("x")
            .u8(b'N')
            .u16(1)
            .text("y"));
        let Message::Update(u) = m else { panic!() };
        assert!(matches!(u.old, Some(OldTuple::Full(_))));
        assert_eq!(u.old.as_ref().map(|o| o.tuple().len()), Some(1));
    }

    #[test]
    fn update_rejects_a_second_old_tuple_or_a_bad_tag() {
        let e = err(B::tag(b'U').u32(5).u8(b'K').u16(0).u8(b'K').u16(0));
        assert_eq!(e.kind(), DecodeErrorKind::UnexpectedTupleTag(b'K'));
        assert_eq!((e.field(), e.offset()), ("new tuple tag", 8));
        let e = err(B::tag(b'U').u32(5).u8(b'X').u16(0));
        assert_eq!(e.kind(), DecodeErrorKind::UnexpectedTupleTag(b'X'));
        assert_eq!(e.offset(), 5);
    }

    #[test]
    fn delete_with_key_and_full() {
        let m = ok(B::tag(b'D').u32(5).u8(b'K').u16(1).text("1"));
        assert_eq!(
            m,
            Message::Delete(Delete {
                xid: None,
                oid: Oid(5),
                old: OldTuple::Key(TupleData::from_values(vec![text("1")]))
            })
        );
        let m = ok(B::tag(b'D').u32(5).u8(b'O').u16(0));
        let Message::Delete(d) = m else { panic!() };
        assert!(matches!(d.old, OldTuple::Full(_)));
        let e = err(B::tag(b'D').u32(5).u8(b'N').u16(0));
        assert_eq!(e.kind(), DecodeErrorKind::UnexpectedTupleTag(b'N'));
    }

    #[test]
    fn truncate() {
        let m = ok(B::tag(b'T').i32(2).u8(3).u32(10).u32(11));
        let Message::Truncate(t) = m else { panic!() };
        assert_eq!(t.oids, vec![Oid(10), Oid(11)]);
        assert!(t.cascade() && t.restart_identity());
        let Message::Truncate(t) = ok(B::tag(b'T').i32(1).u8(2).u32(10)) else {
            panic!()
        };
        assert!(!t.cascade() && t.restart_identity());
        let Message::Truncate(t) = ok(B::tag(b'T').i32(1).u8(1).u32(10)) else {
            panic!()
        };
        assert!(t.cascade() && !t.restart_identity());
    }

    #[test]
    fn logical_message() {
        let m = ok(B::tag(b'M')
            .u8(1)
            .i64(LSN1 as i64)
            .str("walnats")
            .i32(3)
            .raw(b"a\0b"));
        assert_eq!(
            m,
            Message::LogicalMessage(LogicalMessage {
                xid: None,
                transactional: true,
                flags: 1,
                lsn: lsn(LSN1),
                prefix: "walnats".into(),
                content: Bytes::from_static(b"a\0b")
            })
        );
        let m = ok_in_stream(B::tag(b'M').u32(9).u8(0).i64(1).str("p").i32(0));
        let Message::LogicalMessage(l) = m else {
            panic!()
        };
        assert_eq!(
            (l.xid, l.transactional, l.content.len()),
            (Some(Xid(9)), false, 0)
        );
    }

    #[test]
    fn stream_start_stop_commit() {
        let m = ok(B::tag(b'S').u32(77).u8(1));
        assert_eq!(
            m,
            Message::StreamStart(StreamStart {
                xid: Xid(77),
                first_segment: true
            })
        );
        let Message::StreamStart(s) = ok(B::tag(b'S').u32(77).u8(0)) else {
            panic!()
        };
        assert!(!s.first_segment);
        let e = err(B::tag(b'S').u32(77).u8(2));
        assert_eq!(e.kind(), DecodeErrorKind::InvalidBool(2));
        assert_eq!(ok(B::tag(b'E')), Message::StreamStop);
        let m = ok(B::tag(b'c')
            .u32(77)
            .u8(0)
            .i64(LSN1 as i64)
            .i64(LSN2 as i64)
            .i64(T));
        assert_eq!(
            m,
            Message::StreamCommit(StreamCommit {
                xid: Xid(77),
                flags: 0,
                commit_lsn: lsn(LSN1),
                end_lsn: lsn(LSN2),
                commit_time: T
            })
        );
    }

    #[test]
    fn stream_abort_with_and_without_parallel_fields() {
        let short = || B::tag(b'A').u32(77).u32(78);
        let long = || short().i64(LSN1 as i64).i64(T);
        let plain = Message::StreamAbort(StreamAbort {
            xid: Xid(77),
            subxid: Xid(78),
            parallel: None,
        });
        let parallel = Message::StreamAbort(StreamAbort {
            xid: Xid(77),
            subxid: Xid(78),
            parallel: Some(AbortInfo {
                abort_lsn: lsn(LSN1),
                abort_time: T,
            }),
        });
        // Stateless: inferred from the length.
        assert_eq!(ok(short()), plain);
        assert_eq!(ok(long()), parallel);
        // Stateful: as the session asked.
        assert_eq!(Decoder::new().decode(short().bytes()), Ok(plain));
        let e = Decoder::new().decode(long().bytes()).unwrap_err();
        assert_eq!(e.kind(), DecodeErrorKind::TrailingBytes(16));
        let mut d = Decoder::new().parallel_streaming(true);
        assert_eq!(d.decode(long().bytes()), Ok(parallel));
        let e = d.decode(short().bytes()).unwrap_err();
        assert_eq!(
            (e.field(), e.offset(), e.kind()),
            (
                "abort lsn",
                9,
                DecodeErrorKind::Truncated {
                    needed: 8,
                    remaining: 0
                }
            )
        );
    }

    #[test]
    fn two_phase_messages() {
        let m = ok(B::tag(b'b')
            .i64(LSN1 as i64)
            .i64(LSN2 as i64)
            .i64(T)
            .u32(5)
            .str("g1"));
        assert_eq!(
            m,
            Message::BeginPrepare(BeginPrepare {
                prepare_lsn: lsn(LSN1),
                end_lsn: lsn(LSN2),
                prepare_time: T,
                xid: Xid(5),
                gid: "g1".into()
            })
        );
        let prep = Prepare {
            flags: 0,
            prepare_lsn: lsn(LSN1),
            end_lsn: lsn(LSN2),
            prepare_time: T,
            xid: Xid(5),
            gid: "g1".into(),
        };
        let body = |t| {
            B::tag(t)
                .u8(0)
                .i64(LSN1 as i64)
                .i64(LSN2 as i64)
                .i64(T)
                .u32(5)
                .str("g1")
        };
        assert_eq!(ok(body(b'P')), Message::Prepare(prep.clone()));
        assert_eq!(ok(body(b'p')), Message::StreamPrepare(prep));
        let m = ok(body(b'K'));
        assert_eq!(
            m,
            Message::CommitPrepared(CommitPrepared {
                flags: 0,
                commit_lsn: lsn(LSN1),
                end_lsn: lsn(LSN2),
                commit_time: T,
                xid: Xid(5),
                gid: "g1".into()
            })
        );
        let m = ok(B::tag(b'r')
            .u8(0)
            .i64(LSN1 as i64)
            .i64(LSN2 as i64)
            .i64(T)
            .i64(T + 1)
            .u32(5)
            .str("g1"));
        assert_eq!(
            m,
            Message::RollbackPrepared(RollbackPrepared {
                flags: 0,
                prepare_end_lsn: lsn(LSN1),
                rollback_end_lsn: lsn(LSN2),
                prepare_time: T,
                rollback_time: T + 1,
                xid: Xid(5),
                gid: "g1".into()
            })
        );
    }

    #[test]
    fn stream_blocks_switch_the_xid_prefix_on_and_off() {
        let mut d = Decoder::new();
        let insert = |xid: Option<u32>| {
            let b = B::tag(b'I');
            let b = match xid {
                Some(x) => b.u32(x),
                None => b,
            };
            b.u32(16384).u8(b'N').u16(1).text("1").bytes()
        };
        let Message::Insert(i) = d.decode(insert(None)).unwrap() else {
            panic!()
        };
        assert_eq!(i.xid, None);
        d.decode(B::tag(b'S').u32(900).u8(1).bytes()).unwrap();
        assert!(d.in_stream());
        let Message::Insert(i) = d.decode(insert(Some(900))).unwrap() else {
            panic!()
        };
        assert_eq!((i.xid, i.oid), (Some(Xid(900)), Oid(16384)));
        // The same bytes without the xid do not parse inside a stream block.
        assert!(d.decode(insert(None)).is_err());
        assert!(d.in_stream());
        d.decode(B::tag(b'E').bytes()).unwrap();
        assert!(!d.in_stream());
        let Message::Insert(i) = d.decode(insert(None)).unwrap() else {
            panic!()
        };
        assert_eq!(i.xid, None);
    }

    #[test]
    fn stream_block_nesting_errors_leave_the_state_alone() {
        let mut d = Decoder::new();
        let e = d.decode(B::tag(b'E').bytes()).unwrap_err();
        assert_eq!(e.kind(), DecodeErrorKind::StreamStopOutsideStream);
        assert!(!d.in_stream());
        d.decode(B::tag(b'S').u32(1).u8(1).bytes()).unwrap();
        let e = d.decode(B::tag(b'S').u32(1).u8(0).bytes()).unwrap_err();
        assert_eq!(e.kind(), DecodeErrorKind::StreamStartInStream);
        assert_eq!(e.message(), "Stream Start");
        assert!(d.in_stream());
        // A truncated Stream Start does not open a block.
        let mut d = Decoder::new();
        assert!(d.decode(B::tag(b'S').u32(1).bytes()).is_err());
        assert!(!d.in_stream());
    }

    #[test]
    fn empty_input_is_an_error() {
        let e = decode_message(Bytes::new(), false).unwrap_err();
        assert_eq!((e.kind(), e.offset()), (DecodeErrorKind::Empty, 0));
    }

    #[test]
    fn every_unknown_tag_is_an_error() {
        for t in 0..=u8::MAX {
            if tag_name(t).is_some() {
                continue;
            }
            let e = decode_message(Bytes::from(vec![t, 0, 0, 0, 0]), false).unwrap_err();
            assert_eq!((e.kind(), e.offset()), (DecodeErrorKind::UnknownTag(t), 0));
        }
        assert_eq!((0..=u8::MAX).filter(|&t| tag_name(t).is_some()).count(), 19);
    }

    /// One valid message of every kind, with how to decode it.
    fn samples() -> Vec<(B, bool, AbortFields)> {
        let tuple = |b: B| b.u16(3).text("abc").u8(b'n').u8(b'u');
        vec![
            (
                B::tag(b'B').i64(1).i64(T).u32(3),
                false,
                AbortFields::Absent,
            ),
            (
                B::tag(b'C').u8(0).i64(1).i64(2).i64(T),
                false,
                AbortFields::Absent,
            ),
            (B::tag(b'O').i64(1).str("o"), false, AbortFields::Absent),
            (relation_bytes(None), false, AbortFields::Absent),
            (relation_bytes(Some(4)), true, AbortFields::Absent),
            (
                B::tag(b'Y').u32(1).str("ns").str("t"),
                false,
                AbortFields::Absent,
            ),
            (
                tuple(B::tag(b'I').u32(1).u8(b'N')),
                false,
                AbortFields::Absent,
            ),
            (
                tuple(B::tag(b'I').u32(9).u32(1).u8(b'N')),
                true,
                AbortFields::Absent,
            ),
            (
                tuple(tuple(B::tag(b'U').u32(1).u8(b'O')).u8(b'N')),
                false,
                AbortFields::Absent,
            ),
            (
                tuple(B::tag(b'D').u32(1).u8(b'K')),
                false,
                AbortFields::Absent,
            ),
            (
                B::tag(b'T').i32(2).u8(1).u32(1).u32(2),
                false,
                AbortFields::Absent,
            ),
            (
                B::tag(b'M').u32(9).u8(1).i64(1).str("p").i32(2).raw(b"hi"),
                true,
                AbortFields::Absent,
            ),
            (B::tag(b'S').u32(1).u8(1), false, AbortFields::Absent),
            (
                B::tag(b'c').u32(1).u8(0).i64(1).i64(2).i64(T),
                false,
                AbortFields::Absent,
            ),
            (B::tag(b'A').u32(1).u32(2), false, AbortFields::Absent),
            (
                B::tag(b'A').u32(1).u32(2).i64(1).i64(T),
                false,
                AbortFields::Present,
            ),
            (
                B::tag(b'b').i64(1).i64(2).i64(T).u32(1).str("g"),
                false,
                AbortFields::Absent,
            ),
            (
                B::tag(b'P').u8(0).i64(1).i64(2).i64(T).u32(1).str("g"),
                false,
                AbortFields::Absent,
            ),
            (
                B::tag(b'K').u8(0).i64(1).i64(2).i64(T).u32(1).str("g"),
                false,
                AbortFields::Absent,
            ),
            (
                B::tag(b'r')
                    .u8(0)
                    .i64(1)
                    .i64(2)
                    .i64(T)
                    .i64(T)
                    .u32(1)
                    .str("g"),
                false,
                AbortFields::Absent,
            ),
            (
                B::tag(b'p').u8(0).i64(1).i64(2).i64(T).u32(1).str("g"),
                false,
                AbortFields::Absent,
            ),
        ]
    }

    #[test]
    fn every_truncation_of_every_message_is_an_error() {
        for (b, in_stream, abort) in samples() {
            let full = b.bytes();
            let m = decode(full.clone(), in_stream, abort).unwrap();
            assert_eq!(crate::pgoutput::to_bytes(&m).unwrap(), full, "{m:?}");
            for len in 0..full.len() {
                let e = decode(full.slice(..len), in_stream, abort).unwrap_err();
                let expected = match len {
                    0 => matches!(e.kind(), DecodeErrorKind::Empty),
                    _ => matches!(
                        e.kind(),
                        DecodeErrorKind::Truncated { .. }
                            | DecodeErrorKind::UnterminatedString
                            | DecodeErrorKind::CountTooLarge { .. }
                    ),
                };
                assert!(expected, "{} cut to {len}: {e}", m.name());
                assert!(e.offset() <= len, "{} cut to {len}: {e}", m.name());
            }
        }
    }

    #[test]
    fn every_message_with_a_trailing_byte_is_an_error() {
        for (b, in_stream, abort) in samples() {
            let len = b.0.len();
            let e = decode(b.u8(0).bytes(), in_stream, abort).unwrap_err();
            assert_eq!(
                (e.kind(), e.offset()),
                (DecodeErrorKind::TrailingBytes(1), len)
            );
        }
    }

    #[test]
    fn truncated_column_value_names_the_field() {
        let e = err(B::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(5)
            .raw(b"ab"));
        assert_eq!(
            (e.message(), e.field(), e.offset(), e.kind()),
            (
                "Insert",
                "column value",
                13,
                DecodeErrorKind::Truncated {
                    needed: 5,
                    remaining: 2
                }
            )
        );
        assert_eq!(
            e.to_string(),
            "pgoutput Insert message, field column value at byte 13: needs 5 bytes but only 2 remain"
        );
    }

    #[test]
    fn overflowing_lengths_are_errors_not_allocations() {
        let e = err(B::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(i32::MAX)
            .raw(b"ab"));
        assert!(matches!(e.kind(), DecodeErrorKind::Truncated { .. }));
        let e = err(B::tag(b'I').u32(1).u8(b'N').u16(1).u8(b'b').i32(-1));
        assert_eq!(
            (e.kind(), e.offset()),
            (DecodeErrorKind::NegativeLength(-1), 9)
        );
        let e = err(B::tag(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(i32::MIN));
        assert_eq!(e.kind(), DecodeErrorKind::NegativeLength(i32::MIN));
        // 65535 columns announced, 10 bytes left.
        let e = err(B::tag(b'I').u32(1).u8(b'N').u16(u16::MAX).raw(&[b'n'; 10]));
        assert_eq!(
            (e.field(), e.offset(), e.kind()),
            (
                "tuple column count",
                6,
                DecodeErrorKind::CountTooLarge {
                    count: 65535,
                    remaining: 10
                }
            )
        );
        let e = err(B::tag(b'R')
            .u32(1)
            .str("")
            .str("t")
            .u8(b'd')
            .u16(u16::MAX)
            .raw(&[0; 30]));
        assert_eq!(
            e.kind(),
            DecodeErrorKind::CountTooLarge {
                count: 65535,
                remaining: 30
            }
        );
        let e = err(B::tag(b'T').i32(i32::MAX).u8(0).u32(1));
        assert_eq!(
            (e.offset(), e.kind()),
            (
                1,
                DecodeErrorKind::CountTooLarge {
                    count: i32::MAX as usize,
                    remaining: 4
                }
            )
        );
        let e = err(B::tag(b'T').i32(-2).u8(0));
        assert_eq!(e.kind(), DecodeErrorKind::NegativeLength(-2));
        let e = err(B::tag(b'M').u8(0).i64(1).str("p").i32(-1));
        assert_eq!(e.kind(), DecodeErrorKind::NegativeLength(-1));
        let e = err(B::tag(b'M').u8(0).i64(1).str("p").i32(i32::MAX).raw(b"x"));
        assert_eq!(
            (e.field(), e.kind()),
            (
                "content",
                DecodeErrorKind::Truncated {
                    needed: i32::MAX as usize,
                    remaining: 1
                }
            )
        );
    }

    #[test]
    fn unknown_column_kind_is_an_error() {
        let e = err(B::tag(b'I').u32(1).u8(b'N').u16(2).u8(b'n').u8(b'x'));
        assert_eq!(
            (e.field(), e.offset(), e.kind()),
            ("column kind", 9, DecodeErrorKind::UnknownColumnKind(b'x'))
        );
    }

    #[test]
    fn bad_utf8_in_any_string_is_an_error() {
        let bad = b"\xff\xfe";
        let cases = [
            B::tag(b'O').i64(1).raw(bad).u8(0),
            B::tag(b'R').u32(1).raw(bad).u8(0).str("t").u8(b'd').u16(0),
            B::tag(b'R').u32(1).str("").raw(bad).u8(0).u8(b'd').u16(0),
            B::tag(b'R')
                .u32(1)
                .str("")
                .str("t")
                .u8(b'd')
                .u16(1)
                .u8(0)
                .raw(bad)
                .u8(0)
                .u32(23)
                .i32(-1),
            B::tag(b'Y').u32(1).str("").raw(bad).u8(0),
            B::tag(b'M').u8(0).i64(1).raw(bad).u8(0).i32(0),
            B::tag(b'b').i64(1).i64(2).i64(T).u32(1).raw(bad).u8(0),
            B::tag(b'K')
                .u8(0)
                .i64(1)
                .i64(2)
                .i64(T)
                .u32(1)
                .raw(bad)
                .u8(0),
        ];
        for b in cases {
            let e = err(b);
            assert_eq!(e.kind(), DecodeErrorKind::InvalidUtf8, "{e}");
        }
    }

    #[test]
    fn text_values_are_not_checked_for_utf8() {
        // Text is in the server encoding; interpreting it is not our job.
        let m = ok(B::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(1)
            .raw(b"\xff"));
        let Message::Insert(i) = m else { panic!() };
        assert_eq!(i.new.values(), vec![TupleValue::Text(b"\xff")]);
    }
}
