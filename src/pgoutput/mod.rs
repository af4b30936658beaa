//! The pgoutput decoder: bytes in, typed messages out.
//!
//! Owns the logical replication message format of the `pgoutput` plugin,
//! protocol versions 1 to 4 (PostgreSQL docs, "Logical Replication Message
//! Formats"): [`Decoder`] / [`decode_message`] turn the payload of one
//! XLogData into a [`Message`], [`encode`] turns it back into the same
//! bytes. It is pure and synchronous: it never touches a socket, never
//! blocks, never interprets column values (they stay the bytes PostgreSQL
//! sent, borrowed from the message a tuple holds once) and never panics, whatever the
//! input. Malformed input is a [`DecodeError`] naming the message, the
//! field, the byte offset and what was wrong.
//!
//! # Format notes
//!
//! Integers are big-endian. `Lsn` is Int64, `Xid` and `Oid` Int32 (read as
//! unsigned), times Int64 microseconds since 2000-01-01 UTC. A String is
//! UTF-8 ended by a NUL; the empty namespace means `pg_catalog`.
//!
//! | tag | message | fields after the tag |
//! | --- | --- | --- |
//! | `B` | Begin | final LSN, commit time, xid |
//! | `C` | Commit | flags (0), commit LSN, end LSN, commit time |
//! | `O` | Origin | origin commit LSN, name |
//! | `R` | Relation | \[xid\], oid, namespace, name, replica identity (`d` `n` `f` `i`), Int16 n, n × (flags (bit 0: key), name, type oid, Int32 typmod) |
//! | `Y` | Type | \[xid\], oid, namespace, name |
//! | `I` | Insert | \[xid\], relation oid, `N`, tuple |
//! | `U` | Update | \[xid\], relation oid, optional (`K` or `O`, tuple), `N`, tuple |
//! | `D` | Delete | \[xid\], relation oid, `K` or `O`, tuple |
//! | `T` | Truncate | \[xid\], Int32 n, options (bit 0 cascade, bit 1 restart identity), n × oid |
//! | `M` | Message | \[xid\], flags (bit 0 transactional), LSN, prefix, Int32 n, n bytes |
//! | `S` | Stream Start | xid, first segment (0 or 1) |
//! | `E` | Stream Stop | — |
//! | `c` | Stream Commit | xid, flags (0), commit LSN, end LSN, commit time |
//! | `A` | Stream Abort | xid, subxact xid, \[abort LSN, abort time\] |
//! | `b` | Begin Prepare | prepare LSN, end LSN, prepare time, xid, gid |
//! | `P` | Prepare | flags (0), prepare LSN, end LSN, prepare time, xid, gid |
//! | `K` | Commit Prepared | flags (0), commit LSN, end LSN, commit time, xid, gid |
//! | `r` | Rollback Prepared | flags (0), prepare end LSN, rollback end LSN, prepare time, rollback time, xid, gid |
//! | `p` | Stream Prepare | as Prepare |
//!
//! A tuple is Int16 n, then n × a kind byte: `n` null, `u` unchanged TOASTed
//! value (not sent), `t` text or `b` binary, each of the last two followed
//! by Int32 length and that many bytes.
//!
//! Versions: 1 is the base; 2 (PostgreSQL 14+) streams large in-progress
//! transactions: between Stream Start and Stream Stop, the messages marked
//! \[xid\] above carry that leading xid, which is why decoding needs to know
//! whether a stream block is open ([`Decoder`] tracks it). That xid is the
//! (sub)transaction that made the change, so inside a subtransaction it
//! differs from the Stream Start xid (seen in the PostgreSQL 15 fixtures):
//! group streamed changes by the Stream Start xid. 3 (15+) adds
//! two-phase (`b` `P` `K` `r` `p`). 4 (16+) adds the bracketed Stream Abort
//! fields, sent only when `streaming = parallel` was requested: the
//! [`Decoder`] is told so, [`decode_message`] infers it from the length.
//! Messages are not tied to a version here: PostgreSQL only sends what the
//! session asked for, and the decoder accepts every tag.

mod encode;
mod error;
mod message;
mod reader;

pub use encode::{EncodeError, encode, to_bytes};
pub use error::{DecodeError, DecodeErrorKind};
pub use message::{
    AbortInfo, Begin, BeginPrepare, Column, Commit, CommitPrepared, Decoder, Delete, Insert,
    LogicalMessage, Message, Oid, OldTuple, Origin, Prepare, Relation, ReplicaIdentity,
    RollbackPrepared, StreamAbort, StreamCommit, StreamStart, Truncate, TupleData, TupleValue,
    TypeMsg, Update, Xid, decode_message, tag_name,
};

/// Real bytes captured from PostgreSQL 15 and 18 (tests/fixtures/pgoutput,
/// made by capture.sh from workload.sql): every message decodes, encodes
/// back to the same bytes, and carries the values the workload wrote.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod fixture_tests {
    use super::*;
    use crate::lsn::Lsn;
    use bytes::Bytes;
    use std::path::PathBuf;

    struct Fixture {
        name: String,
        parallel: bool,
        messages: Vec<Bytes>,
    }

    fn unhex(line: &str) -> Bytes {
        let digit = |c: u8| match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not a lower-case hex digit: {c:?}"),
        };
        let line = line.as_bytes();
        assert_eq!(line.len() % 2, 0, "odd hex line");
        line.chunks(2)
            .map(|p| (digit(p[0]) << 4) | digit(p[1]))
            .collect::<Vec<u8>>()
            .into()
    }

    fn fixtures() -> Vec<Fixture> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pgoutput");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("hex") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let header: String = text.lines().take_while(|l| l.starts_with('#')).collect();
            out.push(Fixture {
                name: path.file_stem().unwrap().to_string_lossy().into_owned(),
                parallel: header.contains("streaming parallel"),
                messages: text
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.is_empty())
                    .map(unhex)
                    .collect(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn decoded(name: &str) -> Vec<Message> {
        let f = fixtures().into_iter().find(|f| f.name == name).unwrap();
        let mut d = Decoder::new().parallel_streaming(f.parallel);
        f.messages
            .into_iter()
            .map(|m| d.decode(m).unwrap())
            .collect()
    }

    #[test]
    fn every_fixture_decodes_and_encodes_back_byte_for_byte() {
        let fixtures = fixtures();
        let names: Vec<&str> = fixtures.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "pg15_v1",
                "pg15_v2_stream",
                "pg15_v3_stream_2pc",
                "pg18_v1_binary",
                "pg18_v4_parallel_2pc",
                "pg18_v4_stream_2pc"
            ]
        );
        let mut total = 0;
        for f in fixtures {
            let mut d = Decoder::new().parallel_streaming(f.parallel);
            for (i, bytes) in f.messages.iter().enumerate() {
                let in_stream = d.in_stream();
                let m = d
                    .decode(bytes.clone())
                    .unwrap_or_else(|e| panic!("{} message {i}: {e}", f.name));
                assert_eq!(to_bytes(&m).unwrap(), bytes, "{} message {i}", f.name);
                assert_eq!(decode_message(bytes.clone(), in_stream), Ok(m));
                total += 1;
            }
            assert!(!d.in_stream(), "{} ends inside a stream block", f.name);
        }
        assert!(total > 1000, "only {total} messages");
    }

    fn text<'a>(v: &TupleValue<'a>) -> &'a [u8] {
        match v {
            TupleValue::Text(b) => b,
            other => panic!("not text: {other:?}"),
        }
    }

    fn relation<'a>(msgs: &'a [Message], name: &str) -> &'a Relation {
        msgs.iter()
            .find_map(|m| match m {
                Message::Relation(r) if r.name == name => Some(r),
                _ => None,
            })
            .unwrap()
    }

    fn first<T>(msgs: &[Message], f: impl Fn(&Message) -> Option<&T>) -> &T {
        msgs.iter().find_map(f).unwrap()
    }

    #[test]
    fn pg15_v1_carries_what_the_workload_wrote() {
        let msgs = decoded("pg15_v1");
        let Some(Message::Begin(_)) = msgs.first() else {
            panic!("does not start with Begin")
        };

        // Types: the enum, and the domain (sent under its base type's name).
        let types: Vec<&TypeMsg> = msgs
            .iter()
            .filter_map(|m| match m {
                Message::Type(t) => Some(t),
                _ => None,
            })
            .collect();
        let mood = types.iter().find(|t| t.name == "mood").unwrap();
        assert_eq!(mood.namespace, "public");
        let domain = types.iter().find(|t| t.name == "int4").unwrap();
        assert_eq!(domain.namespace, "");

        let t = relation(&msgs, "t_default");
        assert_eq!(
            (t.namespace.as_str(), t.replica_identity),
            ("public", ReplicaIdentity::Default)
        );
        let cols: Vec<(&str, bool, u32, i32)> = t
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.key, c.type_oid.0, c.type_modifier))
            .collect();
        assert_eq!(
            cols,
            [
                ("id", true, 23, -1),
                ("name", false, 1043, 24),
                ("m", false, mood.oid.0, -1),
                ("amount", false, 1700, (10 << 16 | 2) + 4),
                ("big", false, 25, -1),
                ("extra", false, domain.oid.0, -1),
            ]
        );

        let changes_of = |oid: Oid| -> Vec<&Message> {
            msgs.iter()
                .filter(|m| match m {
                    Message::Insert(i) => i.oid == oid,
                    Message::Update(u) => u.oid == oid,
                    Message::Delete(d) => d.oid == oid,
                    _ => false,
                })
                .collect()
        };
        let changes = changes_of(t.oid);
        let [
            Message::Insert(i1),
            Message::Insert(i2),
            Message::Update(u1),
            Message::Update(u2),
            Message::Delete(d),
        ] = changes.as_slice()
        else {
            panic!("t_default changes: {changes:?}")
        };
        let v = &i1.new.values();
        assert_eq!(v.len(), 6);
        assert_eq!(
            [
                text(&v[0]),
                text(&v[1]),
                text(&v[2]),
                text(&v[3]),
                text(&v[5])
            ],
            [&b"1"[..], b"alice", b"happy", b"19.90", b"7"]
        );
        assert_eq!(text(&v[4]), vec![b'x'; 2500].as_slice());
        assert_eq!(i2.new.values()[1..], [const { TupleValue::Null }; 5]);
        // The TOASTed column was not updated, so it was not sent.
        assert_eq!(
            (u1.old.as_ref(), &u1.new.values()[4]),
            (None, &TupleValue::Unchanged)
        );
        assert_eq!(text(&u1.new.values()[1]), b"alice2");
        // The key changed: the old key comes along, other columns Null.
        let Some(OldTuple::Key(old)) = &u2.old else {
            panic!("no old key: {u2:?}")
        };
        assert_eq!(text(&old.values()[0]), b"2");
        assert_eq!(old.values()[1..], [const { TupleValue::Null }; 5]);
        assert_eq!(text(&u2.new.values()[0]), b"10");
        let OldTuple::Key(old) = &d.old else {
            panic!("{d:?}")
        };
        assert_eq!(text(&old.values()[0]), b"10");

        // REPLICA IDENTITY FULL: every column is key, old rows are whole.
        let full = relation(&msgs, "t_full");
        assert_eq!(full.replica_identity, ReplicaIdentity::Full);
        assert!(full.columns.iter().all(|c| c.key));
        let changes = changes_of(full.oid);
        let Some(Message::Update(u)) = changes.get(1) else {
            panic!("{changes:?}")
        };
        let Some(OldTuple::Full(old)) = &u.old else {
            panic!("{u:?}")
        };
        assert_eq!(
            old.values().iter().map(text).collect::<Vec<_>>(),
            [&b"1"[..], b"one", b"2026-11-22 18:31:10.123456+00"]
        );
        let Some(Message::Delete(Delete {
            old: OldTuple::Full(_),
            ..
        })) = changes.get(2)
        else {
            panic!("{changes:?}")
        };

        // REPLICA IDENTITY USING INDEX: key columns a, b.
        let idx = relation(&msgs, "t_index");
        assert_eq!(idx.replica_identity, ReplicaIdentity::Index);
        assert_eq!(
            idx.columns.iter().map(|c| c.key).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert_eq!(
            relation(&msgs, "t_nothing").replica_identity,
            ReplicaIdentity::Nothing
        );

        // Non-ASCII names; the dropped column is not sent.
        let x = relation(&msgs, "tbl.x");
        assert_eq!(x.namespace, "Ünï Schema");
        assert_eq!(
            x.columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["col ü", "kept"]
        );

        let logical: Vec<&LogicalMessage> = msgs
            .iter()
            .filter_map(|m| match m {
                Message::LogicalMessage(l) => Some(l),
                _ => None,
            })
            .collect();
        let summary: Vec<(bool, &str, &[u8])> = logical
            .iter()
            .map(|l| (l.transactional, l.prefix.as_str(), &l.content[..]))
            .collect();
        assert_eq!(
            summary[..3],
            [
                (false, "walnats", &b"non-transactional"[..]),
                (true, "walnats", b"transactional"),
                (true, "bin", b"\x00\xff\x00"),
            ]
        );

        let truncates: Vec<&Truncate> = msgs
            .iter()
            .filter_map(|m| match m {
                Message::Truncate(t) => Some(t),
                _ => None,
            })
            .collect();
        let parent = relation(&msgs, "parent").oid;
        let child = relation(&msgs, "child").oid;
        assert_eq!(truncates[0].options, 0);
        assert!(truncates[1].cascade() && truncates[1].restart_identity());
        assert_eq!(truncates[1].oids, [parent, child]);
        assert!(!truncates[2].cascade() && truncates[2].restart_identity());
        assert_eq!(truncates[2].oids, [idx.oid]);

        // The origin transaction: its commit time is the one given to
        // pg_replication_origin_xact_setup, 2026-11-22 18:31:10 UTC.
        let at = msgs
            .iter()
            .position(|m| matches!(m, Message::Origin(_)))
            .unwrap();
        let (Message::Begin(b), Message::Origin(o)) = (&msgs[at - 1], &msgs[at]) else {
            panic!("Origin does not follow Begin")
        };
        assert_eq!(
            (o.name.as_str(), o.commit_lsn),
            ("origin_a", Lsn::from_u64(0xABCDEF))
        );
        assert_eq!(b.commit_time, 848_687_470_000_000);

        // Two-phase.
        let bp = first(&msgs, |m| match m {
            Message::BeginPrepare(b) if b.gid == "gid_commit" => Some(b),
            _ => None,
        });
        let cp = first(&msgs, |m| match m {
            Message::CommitPrepared(c) if c.gid == "gid_commit" => Some(c),
            _ => None,
        });
        assert_eq!((cp.xid, cp.commit_lsn), (bp.xid, bp.end_lsn));
        let p = first(&msgs, |m| match m {
            Message::Prepare(p) if p.gid == "gid_rollback" => Some(p),
            _ => None,
        });
        let rp = first(&msgs, |m| match m {
            Message::RollbackPrepared(r) if r.gid == "gid_rollback" => Some(r),
            _ => None,
        });
        assert_eq!(
            (rp.xid, rp.prepare_end_lsn, rp.prepare_time),
            (p.xid, p.end_lsn, p.prepare_time)
        );
    }

    /// The streamed transactions of workload steps 13 to 16.
    fn check_streams(name: &str, top_level_abort: bool) {
        let msgs = decoded(name);
        let starts: Vec<&StreamStart> = msgs
            .iter()
            .filter_map(|m| match m {
                Message::StreamStart(s) => Some(s),
                _ => None,
            })
            .collect();
        assert!(starts.len() > 10, "{name}: {} stream blocks", starts.len());
        assert!(starts[0].first_segment && !starts[1].first_segment);
        assert_eq!(starts[0].xid, starts[1].xid);
        let big = starts[0].xid;

        // Inside the block every change carries an xid; after Stream Commit
        // of the same xid.
        let mut in_block = false;
        for m in &msgs {
            match m {
                Message::StreamStart(_) => in_block = true,
                Message::StreamStop => in_block = false,
                Message::Insert(Insert { xid, .. })
                | Message::Update(Update { xid, .. })
                | Message::Delete(Delete { xid, .. })
                | Message::Truncate(Truncate { xid, .. })
                | Message::Relation(Relation { xid, .. })
                | Message::Type(TypeMsg { xid, .. }) => {
                    assert_eq!(xid.is_some(), in_block, "{name}: {m:?}")
                }
                Message::LogicalMessage(l) if in_block => assert!(l.xid.is_some()),
                _ => {}
            }
        }
        let in_stream = first(&msgs, |m| match m {
            Message::LogicalMessage(l) if l.content[..] == b"in stream"[..] => Some(l),
            _ => None,
        });
        assert_eq!(in_stream.xid, Some(big));
        let t = first(&msgs, |m| match m {
            Message::Truncate(t) if t.xid.is_some() => Some(t),
            _ => None,
        });
        assert_eq!(t.xid, Some(big));
        let sc = first(&msgs, |m| match m {
            Message::StreamCommit(c) => Some(c),
            _ => None,
        });
        assert_eq!(sc.xid, big);
        assert!(sc.end_lsn > sc.commit_lsn);

        let aborts: Vec<&StreamAbort> = msgs
            .iter()
            .filter_map(|m| match m {
                Message::StreamAbort(a) => Some(a),
                _ => None,
            })
            .collect();
        let expected = if top_level_abort { 2 } else { 1 };
        assert_eq!(aborts.len(), expected, "{name}");
        assert_eq!(aborts[0].xid == aborts[0].subxid, top_level_abort);
        if let Some(sub) = aborts.get(1) {
            assert_ne!(sub.xid, sub.subxid);
        }

        let sp = first(&msgs, |m| match m {
            Message::StreamPrepare(p) => Some(p),
            _ => None,
        });
        assert_eq!(sp.gid, "gid_stream");
        let Some(Message::CommitPrepared(cp)) = msgs.last() else {
            panic!("{name} does not end with Commit Prepared")
        };
        assert_eq!((cp.xid, cp.gid.as_str()), (sp.xid, "gid_stream"));
    }

    #[test]
    fn pg15_streams_large_transactions() {
        // PostgreSQL 15 still streams the start of the rolled-back step 14.
        check_streams("pg15_v2_stream", true);
        check_streams("pg15_v3_stream_2pc", true);
    }

    #[test]
    fn pg18_streams_large_transactions() {
        // PostgreSQL 16+ skips streaming a transaction already known aborted.
        check_streams("pg18_v4_stream_2pc", false);
        check_streams("pg18_v4_parallel_2pc", false);
    }

    #[test]
    fn streamed_changes_of_a_subtransaction_carry_its_xid() {
        // Workload step 15: the rolled-back savepoint's inserts are streamed
        // under the top-level Stream Start xid but carry the subxact xid.
        let msgs = decoded("pg15_v2_stream");
        let abort = first(&msgs, |m| match m {
            Message::StreamAbort(a) if a.xid != a.subxid => Some(a),
            _ => None,
        });
        let mut block = None;
        let mut sub_inserts = 0;
        for m in &msgs {
            match m {
                Message::StreamStart(s) => block = Some(s.xid),
                Message::StreamStop => block = None,
                Message::Insert(i) if i.xid == Some(abort.subxid) => {
                    assert_eq!(block, Some(abort.xid));
                    sub_inserts += 1;
                }
                _ => {}
            }
        }
        assert!(sub_inserts > 3, "{sub_inserts}");
    }

    #[test]
    fn parallel_streaming_adds_abort_lsn_and_time() {
        let abort = |name| {
            decoded(name)
                .into_iter()
                .find_map(|m| match m {
                    Message::StreamAbort(a) => Some(a),
                    _ => None,
                })
                .unwrap()
        };
        let plain = abort("pg18_v4_stream_2pc");
        let parallel = abort("pg18_v4_parallel_2pc");
        assert_eq!((plain.xid, plain.subxid), (parallel.xid, parallel.subxid));
        assert_eq!(plain.parallel, None);
        let info = parallel.parallel.unwrap();
        assert!(!info.abort_lsn.is_zero());
        assert!(info.abort_time > 800_000_000_000_000);
    }

    #[test]
    fn binary_option_sends_binary_values() {
        let msgs = decoded("pg18_v1_binary");
        let t = relation(&msgs, "t_default");
        let i = first(&msgs, |m| match m {
            Message::Insert(i) if i.oid == t.oid => Some(i),
            _ => None,
        });
        assert_eq!(i.new.values()[0], TupleValue::Binary(&[0, 0, 0, 1]));
        assert_eq!(i.new.values()[1], TupleValue::Binary(b"alice"));
        assert_eq!(i.new.values()[5], TupleValue::Binary(&[0, 0, 0, 7]));
    }

    #[test]
    fn decoding_without_the_stream_state_misreads_streamed_changes() {
        // Why the decoder keeps state: the same bytes decoded as if outside
        // a stream block are an error or a different message.
        let f = fixtures()
            .into_iter()
            .find(|f| f.name == "pg15_v2_stream")
            .unwrap();
        let mut d = Decoder::new();
        let mut checked = 0;
        for b in f.messages {
            let in_stream = d.in_stream();
            let m = d.decode(b.clone()).unwrap();
            if in_stream && matches!(m, Message::Insert(_)) {
                assert_ne!(decode_message(b, false).ok(), Some(m));
                checked += 1;
            }
        }
        assert!(checked > 10);
    }
}
