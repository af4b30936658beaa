//! The inverse of decoding: [`Message`] → pgoutput bytes, exactly as
//! PostgreSQL writes them.
//!
//! Owns the message → bytes direction, for round-trip tests, property
//! tests, benches and fuzz seeds; walnats itself never sends pgoutput. An
//! optional xid is written when it is `Some` (the caller decides whether
//! the message is inside a stream block), and Stream Abort's parallel
//! fields when `parallel` is `Some`. A value the format cannot carry (a
//! string with a NUL, more than 65535 columns, a length over `i32::MAX`)
//! is an [`EncodeError`], never a panic or a silently wrong message.

use bytes::{BufMut, Bytes, BytesMut};

use super::message::{Column, Message, OldTuple, Prepare, Relation, TupleData, TupleValue, Xid};
use crate::lsn::Lsn;

/// A message that the pgoutput format cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode pgoutput {message} message: {problem}")]
pub struct EncodeError {
    message: &'static str,
    problem: &'static str,
}

impl EncodeError {
    /// The message's name ("Insert", ...).
    pub fn message(&self) -> &'static str {
        self.message
    }

    /// What the format cannot carry.
    pub fn problem(&self) -> &'static str {
        self.problem
    }
}

/// Encodes `msg` into a new buffer.
pub fn to_bytes(msg: &Message) -> Result<Bytes, EncodeError> {
    let mut out = BytesMut::new();
    encode(msg, &mut out)?;
    Ok(out.freeze())
}

/// Appends the encoding of `msg` to `out`. On error `out` may hold part of
/// the message.
pub fn encode(msg: &Message, out: &mut BytesMut) -> Result<(), EncodeError> {
    let mut w = Writer {
        out,
        message: msg.name(),
    };
    w.out.put_u8(msg.tag());
    match msg {
        Message::Begin(m) => {
            w.lsn(m.final_lsn);
            w.out.put_i64(m.commit_time);
            w.xid(m.xid);
        }
        Message::Commit(m) => {
            w.out.put_u8(m.flags);
            w.lsn(m.commit_lsn);
            w.lsn(m.end_lsn);
            w.out.put_i64(m.commit_time);
        }
        Message::Origin(m) => {
            w.lsn(m.commit_lsn);
            w.string(&m.name)?;
        }
        Message::Relation(m) => w.relation(m)?,
        Message::Type(m) => {
            w.opt_xid(m.xid);
            w.out.put_u32(m.oid.0);
            w.string(&m.namespace)?;
            w.string(&m.name)?;
        }
        Message::Insert(m) => {
            w.opt_xid(m.xid);
            w.out.put_u32(m.oid.0);
            w.out.put_u8(b'N');
            w.tuple(&m.new)?;
        }
        Message::Update(m) => {
            w.opt_xid(m.xid);
            w.out.put_u32(m.oid.0);
            if let Some(old) = &m.old {
                w.old_tuple(old)?;
            }
            w.out.put_u8(b'N');
            w.tuple(&m.new)?;
        }
        Message::Delete(m) => {
            w.opt_xid(m.xid);
            w.out.put_u32(m.oid.0);
            w.old_tuple(&m.old)?;
        }
        Message::Truncate(m) => {
            w.opt_xid(m.xid);
            w.len_i32(m.oids.len(), "more than i32::MAX relations")?;
            w.out.put_u8(m.options);
            for oid in &m.oids {
                w.out.put_u32(oid.0);
            }
        }
        Message::LogicalMessage(m) => {
            w.opt_xid(m.xid);
            w.out.put_u8((m.flags & !1) | u8::from(m.transactional));
            w.lsn(m.lsn);
            w.string(&m.prefix)?;
            w.len_i32(m.content.len(), "content longer than i32::MAX")?;
            w.out.put_slice(&m.content);
        }
        Message::StreamStart(m) => {
            w.xid(m.xid);
            w.out.put_u8(u8::from(m.first_segment));
        }
        Message::StreamStop => {}
        Message::StreamCommit(m) => {
            w.xid(m.xid);
            w.out.put_u8(m.flags);
            w.lsn(m.commit_lsn);
            w.lsn(m.end_lsn);
            w.out.put_i64(m.commit_time);
        }
        Message::StreamAbort(m) => {
            w.xid(m.xid);
            w.xid(m.subxid);
            if let Some(p) = &m.parallel {
                w.lsn(p.abort_lsn);
                w.out.put_i64(p.abort_time);
            }
        }
        Message::BeginPrepare(m) => {
            w.lsn(m.prepare_lsn);
            w.lsn(m.end_lsn);
            w.out.put_i64(m.prepare_time);
            w.xid(m.xid);
            w.string(&m.gid)?;
        }
        Message::Prepare(m) | Message::StreamPrepare(m) => w.prepare(m)?,
        Message::CommitPrepared(m) => {
            w.out.put_u8(m.flags);
            w.lsn(m.commit_lsn);
            w.lsn(m.end_lsn);
            w.out.put_i64(m.commit_time);
            w.xid(m.xid);
            w.string(&m.gid)?;
        }
        Message::RollbackPrepared(m) => {
            w.out.put_u8(m.flags);
            w.lsn(m.prepare_end_lsn);
            w.lsn(m.rollback_end_lsn);
            w.out.put_i64(m.prepare_time);
            w.out.put_i64(m.rollback_time);
            w.xid(m.xid);
            w.string(&m.gid)?;
        }
    }
    Ok(())
}

struct Writer<'a> {
    out: &'a mut BytesMut,
    message: &'static str,
}

impl Writer<'_> {
    fn error(&self, problem: &'static str) -> EncodeError {
        EncodeError {
            message: self.message,
            problem,
        }
    }

    fn lsn(&mut self, lsn: Lsn) {
        self.out.put_u64(lsn.as_u64());
    }

    fn xid(&mut self, xid: Xid) {
        self.out.put_u32(xid.0);
    }

    fn opt_xid(&mut self, xid: Option<Xid>) {
        if let Some(xid) = xid {
            self.xid(xid);
        }
    }

    fn string(&mut self, s: &str) -> Result<(), EncodeError> {
        if s.as_bytes().contains(&0) {
            return Err(self.error("a string contains a NUL byte"));
        }
        self.out.put_slice(s.as_bytes());
        self.out.put_u8(0);
        Ok(())
    }

    fn len_i32(&mut self, len: usize, problem: &'static str) -> Result<(), EncodeError> {
        let len = i32::try_from(len).map_err(|_| self.error(problem))?;
        self.out.put_i32(len);
        Ok(())
    }

    fn count_u16(&mut self, count: usize) -> Result<(), EncodeError> {
        let count = u16::try_from(count).map_err(|_| self.error("more than 65535 columns"))?;
        self.out.put_u16(count);
        Ok(())
    }

    fn relation(&mut self, m: &Relation) -> Result<(), EncodeError> {
        self.opt_xid(m.xid);
        self.out.put_u32(m.oid.0);
        self.string(&m.namespace)?;
        self.string(&m.name)?;
        self.out.put_u8(m.replica_identity.as_byte());
        self.count_u16(m.columns.len())?;
        for c in &m.columns {
            self.column(c)?;
        }
        Ok(())
    }

    fn column(&mut self, c: &Column) -> Result<(), EncodeError> {
        self.out.put_u8((c.flags & !1) | u8::from(c.key));
        self.string(&c.name)?;
        self.out.put_u32(c.type_oid.0);
        self.out.put_i32(c.type_modifier);
        Ok(())
    }

    fn old_tuple(&mut self, old: &OldTuple) -> Result<(), EncodeError> {
        let (tag, tuple) = match old {
            OldTuple::Key(t) => (b'K', t),
            OldTuple::Full(t) => (b'O', t),
        };
        self.out.put_u8(tag);
        self.tuple(tuple)
    }

    fn tuple(&mut self, t: &TupleData) -> Result<(), EncodeError> {
        self.count_u16(t.len())?;
        for v in t.iter() {
            let (kind, bytes) = match v {
                TupleValue::Null => (b'n', None),
                TupleValue::Unchanged => (b'u', None),
                TupleValue::Text(b) => (b't', Some(b)),
                TupleValue::Binary(b) => (b'b', Some(b)),
            };
            self.out.put_u8(kind);
            if let Some(b) = bytes {
                self.len_i32(b.len(), "a column value longer than i32::MAX")?;
                self.out.put_slice(b);
            }
        }
        Ok(())
    }

    fn prepare(&mut self, m: &Prepare) -> Result<(), EncodeError> {
        self.out.put_u8(m.flags);
        self.lsn(m.prepare_lsn);
        self.lsn(m.end_lsn);
        self.out.put_i64(m.prepare_time);
        self.xid(m.xid);
        self.string(&m.gid)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::pgoutput::message::*;
    use crate::pgoutput::{DecodeError, Decoder, decode_message};
    use proptest::prelude::*;

    fn lsn() -> impl Strategy<Value = Lsn> {
        any::<u64>().prop_map(Lsn::from_u64)
    }

    fn xid() -> impl Strategy<Value = Xid> {
        any::<u32>().prop_map(Xid)
    }

    fn oid() -> impl Strategy<Value = Oid> {
        any::<u32>().prop_map(Oid)
    }

    /// Any text without NUL, which the format cannot carry in a string.
    fn string() -> impl Strategy<Value = String> {
        "[^\\x00]{0,12}"
    }

    fn bytes() -> impl Strategy<Value = Bytes> {
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
    }

    fn tuple() -> impl Strategy<Value = TupleData> {
        // (kind, bytes): 0 Null, 1 Unchanged, 2 Text, 3 Binary.
        let value = prop_oneof![
            Just((0u8, Bytes::new())),
            Just((1u8, Bytes::new())),
            bytes().prop_map(|b| (2u8, b)),
            bytes().prop_map(|b| (3u8, b)),
        ];
        prop::collection::vec(value, 0..12).prop_map(|columns| {
            TupleData::from_values(columns.iter().map(|(kind, b)| match kind {
                0 => TupleValue::Null,
                1 => TupleValue::Unchanged,
                2 => TupleValue::Text(b),
                _ => TupleValue::Binary(b),
            }))
        })
    }

    fn old_tuple() -> impl Strategy<Value = OldTuple> {
        prop_oneof![
            tuple().prop_map(OldTuple::Key),
            tuple().prop_map(OldTuple::Full)
        ]
    }

    fn column() -> impl Strategy<Value = Column> {
        (any::<u8>(), string(), oid(), any::<i32>()).prop_map(|(flags, name, type_oid, typmod)| {
            Column {
                key: flags & 1 != 0,
                flags,
                name,
                type_oid,
                type_modifier: typmod,
            }
        })
    }

    fn replica_identity() -> impl Strategy<Value = ReplicaIdentity> {
        prop::sample::select(vec![
            ReplicaIdentity::Default,
            ReplicaIdentity::Nothing,
            ReplicaIdentity::Full,
            ReplicaIdentity::Index,
        ])
    }

    fn prepare() -> impl Strategy<Value = Prepare> {
        (any::<u8>(), lsn(), lsn(), any::<i64>(), xid(), string()).prop_map(
            |(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| Prepare {
                flags,
                prepare_lsn,
                end_lsn,
                prepare_time,
                xid,
                gid,
            },
        )
    }

    /// Any message, with whether it sits inside a stream block: messages
    /// that take a leading xid there have one exactly when they do.
    fn message() -> impl Strategy<Value = (Message, bool)> {
        any::<bool>().prop_flat_map(|in_stream| {
            let sx = move || xid().prop_map(move |x| in_stream.then_some(x));
            let m = prop_oneof![
                (lsn(), any::<i64>(), xid()).prop_map(|(final_lsn, commit_time, xid)| {
                    Message::Begin(Begin {
                        final_lsn,
                        commit_time,
                        xid,
                    })
                }),
                (any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(|(flags, c, e, t)| {
                    Message::Commit(Commit {
                        flags,
                        commit_lsn: c,
                        end_lsn: e,
                        commit_time: t,
                    })
                }),
                (lsn(), string())
                    .prop_map(|(commit_lsn, name)| Message::Origin(Origin { commit_lsn, name })),
                (
                    sx(),
                    oid(),
                    string(),
                    string(),
                    replica_identity(),
                    prop::collection::vec(column(), 0..6)
                )
                    .prop_map(
                        |(xid, oid, namespace, name, replica_identity, columns)| {
                            Message::Relation(Relation {
                                xid,
                                oid,
                                namespace,
                                name,
                                replica_identity,
                                columns,
                            })
                        }
                    ),
                (sx(), oid(), string(), string()).prop_map(|(xid, oid, namespace, name)| {
                    Message::Type(TypeMsg {
                        xid,
                        oid,
                        namespace,
                        name,
                    })
                }),
                (sx(), oid(), tuple()).prop_map(|(xid, oid, new)| Message::Insert(Insert {
                    xid,
                    oid,
                    new
                })),
                (sx(), oid(), prop::option::of(old_tuple()), tuple()).prop_map(
                    |(xid, oid, old, new)| Message::Update(Update { xid, oid, old, new })
                ),
                (sx(), oid(), old_tuple()).prop_map(|(xid, oid, old)| Message::Delete(Delete {
                    xid,
                    oid,
                    old
                })),
                (sx(), any::<u8>(), prop::collection::vec(oid(), 0..8)).prop_map(
                    |(xid, options, oids)| Message::Truncate(Truncate { xid, options, oids })
                ),
                (sx(), any::<u8>(), lsn(), string(), bytes()).prop_map(
                    |(xid, flags, lsn, prefix, content)| {
                        Message::LogicalMessage(LogicalMessage {
                            xid,
                            transactional: flags & 1 != 0,
                            flags,
                            lsn,
                            prefix,
                            content,
                        })
                    }
                ),
                (xid(), any::<bool>()).prop_map(|(xid, first_segment)| {
                    Message::StreamStart(StreamStart { xid, first_segment })
                }),
                Just(Message::StreamStop),
                (xid(), any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(
                    |(xid, flags, c, e, t)| Message::StreamCommit(StreamCommit {
                        xid,
                        flags,
                        commit_lsn: c,
                        end_lsn: e,
                        commit_time: t,
                    })
                ),
                (
                    xid(),
                    xid(),
                    prop::option::of((lsn(), any::<i64>()).prop_map(|(abort_lsn, abort_time)| {
                        AbortInfo {
                            abort_lsn,
                            abort_time,
                        }
                    }))
                )
                    .prop_map(|(xid, subxid, parallel)| {
                        Message::StreamAbort(StreamAbort {
                            xid,
                            subxid,
                            parallel,
                        })
                    }),
                (lsn(), lsn(), any::<i64>(), xid(), string()).prop_map(
                    |(prepare_lsn, end_lsn, prepare_time, xid, gid)| {
                        Message::BeginPrepare(BeginPrepare {
                            prepare_lsn,
                            end_lsn,
                            prepare_time,
                            xid,
                            gid,
                        })
                    }
                ),
                prepare().prop_map(Message::Prepare),
                prepare().prop_map(Message::StreamPrepare),
                (any::<u8>(), lsn(), lsn(), any::<i64>(), xid(), string()).prop_map(
                    |(flags, commit_lsn, end_lsn, commit_time, xid, gid)| {
                        Message::CommitPrepared(CommitPrepared {
                            flags,
                            commit_lsn,
                            end_lsn,
                            commit_time,
                            xid,
                            gid,
                        })
                    }
                ),
                (
                    any::<u8>(),
                    lsn(),
                    lsn(),
                    any::<i64>(),
                    any::<i64>(),
                    xid(),
                    string()
                )
                    .prop_map(|(flags, pe, re, pt, rt, xid, gid)| {
                        Message::RollbackPrepared(RollbackPrepared {
                            flags,
                            prepare_end_lsn: pe,
                            rollback_end_lsn: re,
                            prepare_time: pt,
                            rollback_time: rt,
                            xid,
                            gid,
                        })
                    }),
            ];
            (m, Just(in_stream))
        })
    }

    /// Bytes starting with a known tag most of the time, so that fuzzing
    /// reaches past the tag check.
    fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
        let tags: Vec<u8> = (0..=u8::MAX).filter(|&t| tag_name(t).is_some()).collect();
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            (
                prop::sample::select(tags),
                prop::collection::vec(any::<u8>(), 0..96)
            )
                .prop_map(|(t, mut rest)| {
                    rest.insert(0, t);
                    rest
                }),
        ]
    }

    /// Decodes `data` every way there is; none may panic, and whatever is
    /// accepted must encode back to exactly `data`.
    fn decode_every_way(data: &[u8]) -> Result<(), TestCaseError> {
        let data = Bytes::copy_from_slice(data);
        let mut results: Vec<Result<Message, DecodeError>> = Vec::new();
        for in_stream in [false, true] {
            results.push(decode_message(data.clone(), in_stream));
        }
        for parallel in [false, true] {
            results.push(
                Decoder::new()
                    .parallel_streaming(parallel)
                    .decode(data.clone()),
            );
        }
        for m in results.into_iter().flatten() {
            prop_assert_eq!(to_bytes(&m).unwrap(), data.clone());
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn every_message_round_trips((m, in_stream) in message()) {
            let b = to_bytes(&m).unwrap();
            prop_assert_eq!(b[0], m.tag());
            prop_assert_eq!(decode_message(b.clone(), in_stream), Ok(m.clone()));
            // And through the stateful decoder, for messages whose meaning
            // does not depend on an open stream block.
            if !in_stream && !matches!(m, Message::StreamStop) {
                let parallel = matches!(
                    &m,
                    Message::StreamAbort(StreamAbort { parallel: Some(_), .. })
                );
                let mut d = Decoder::new().parallel_streaming(parallel);
                prop_assert_eq!(d.decode(b), Ok(m));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in wire_bytes()) {
            decode_every_way(&data)?;
        }

        #[test]
        fn mutated_messages_never_panic(
            (m, _) in message(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            how in 0..4u8,
        ) {
            let mut data = to_bytes(&m).unwrap().to_vec();
            let i = at.index(data.len());
            match how {
                0 => data[i] = byte,
                1 => data.truncate(i),
                2 => data.insert(i, byte),
                _ => { data.remove(i); }
            }
            decode_every_way(&data)?;
        }
    }

    #[test]
    fn what_the_format_cannot_carry_is_an_error() {
        let e = to_bytes(&Message::Origin(Origin {
            commit_lsn: Lsn::ZERO,
            name: "a\0b".into(),
        }))
        .unwrap_err();
        assert_eq!(
            (e.message(), e.problem()),
            ("Origin", "a string contains a NUL byte")
        );
        let e = to_bytes(&Message::Insert(Insert {
            xid: None,
            oid: Oid(1),
            new: TupleData::from_values(vec![TupleValue::Null; 65536]),
        }))
        .unwrap_err();
        assert_eq!(e.problem(), "more than 65535 columns");
        assert!(
            e.to_string()
                .starts_with("cannot encode pgoutput Insert message")
        );
    }

    #[test]
    fn key_and_transactional_decide_bit_zero() {
        let m = Message::Relation(Relation {
            xid: None,
            oid: Oid(1),
            namespace: String::new(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                key: true,
                flags: 0x80,
                name: "c".into(),
                type_oid: Oid(23),
                type_modifier: -1,
            }],
        });
        let b = to_bytes(&m).unwrap();
        // tag, oid, "", "t\0", 'd', count, then the column flags
        assert_eq!(b[11], 0x81);
        let m = Message::LogicalMessage(LogicalMessage {
            xid: None,
            transactional: false,
            flags: 1,
            lsn: Lsn::ZERO,
            prefix: String::new(),
            content: Bytes::new(),
        });
        assert_eq!(to_bytes(&m).unwrap()[1], 0);
    }
}
