//! Decode throughput of the pgoutput hot path, walnats next to the
//! `pg_walstream` crate's parser on the same bytes in the same run:
//! an Insert of the `scripts/bench` table's 10-column row, a transaction of
//! 1000 such rows (Begin, Relation, 1000 Inserts, Commit), and the real
//! protocol 1 capture from PostgreSQL 15 (`tests/fixtures/pgoutput/pg15_v1.hex`).
//!
//! `cargo bench --bench decode`. Neither decoder copies column values:
//! walnats keeps offsets into the input, `pg_walstream` `Bytes` slices of
//! it, so this compares parsing alone.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pg_walstream::LogicalReplicationParser;
use walnats::lsn::Lsn;
use walnats::pgoutput::{
    Begin, Column, Commit, Decoder, Insert, LogicalMessage, Message, Oid, Relation,
    ReplicaIdentity, TupleData, TupleValue, Xid, decode_message, to_bytes,
};

const COLUMNS: [(&str, u32); 10] = [
    ("id", 20),
    ("n", 23),
    ("name", 25),
    ("amount", 1700),
    ("at", 1184),
    ("email", 25),
    ("doc", 3802),
    ("flag", 16),
    ("uid", 2950),
    ("qty", 23),
];

fn insert(id: u64) -> Bytes {
    let values = [
        id.to_string(),
        (id % 1000).to_string(),
        format!("name {id}"),
        format!("{}.{:02}", id + id / 100, id % 100),
        "2026-11-22 18:31:10.123456+00".into(),
        format!("user{id}@example.com"),
        format!("{{\"k\": {id}, \"tags\": [\"a\", \"b\"]}}"),
        "t".into(),
        "3f2504e0-4f89-11d3-9a0c-0305e82c3301".into(),
        (id % 7).to_string(),
    ];
    to_bytes(&Message::Insert(Insert {
        xid: None,
        oid: Oid(16384),
        new: TupleData::from_values(values.iter().map(|s| TupleValue::Text(s.as_bytes()))),
    }))
    .unwrap_or_default()
}

/// Begin, Relation, `rows` Inserts, Commit: what one `INSERT ... SELECT`
/// transaction of the end-to-end bench sends.
fn transaction(rows: u64) -> Vec<Bytes> {
    let lsn = Lsn::from_u64(0x16B_3800);
    let mut msgs = vec![
        to_bytes(&Message::Begin(Begin {
            final_lsn: lsn,
            commit_time: 817_151_470_123_456,
            xid: Xid(731),
        })),
        to_bytes(&Message::Relation(Relation {
            xid: None,
            oid: Oid(16384),
            namespace: "public".into(),
            name: "bench".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: COLUMNS
                .iter()
                .map(|(name, oid)| Column {
                    key: *name == "id",
                    flags: u8::from(*name == "id"),
                    name: (*name).into(),
                    type_oid: Oid(*oid),
                    type_modifier: -1,
                })
                .collect(),
        })),
    ];
    msgs.extend((1..=rows).map(|id| Ok(insert(424_000 + id))));
    msgs.push(to_bytes(&Message::Commit(Commit {
        flags: 0,
        commit_lsn: lsn,
        end_lsn: Lsn::from_u64(0x16B_3830),
        commit_time: 817_151_470_123_456,
    })));
    msgs.into_iter().filter_map(Result::ok).collect()
}

/// The real protocol 1 capture: one hex-encoded message per line.
fn capture() -> Vec<Bytes> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pgoutput/pg15_v1.hex"
    );
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let nibble = |c: u8| match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => 0,
    };
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            l.as_bytes()
                .chunks(2)
                .map(|p| (nibble(p[0]) << 4) | nibble(*p.get(1).unwrap_or(&b'0')))
                .collect::<Vec<u8>>()
                .into()
        })
        .collect()
}

/// Decodes every message with walnats; the number that decoded.
fn walnats_all(d: &mut Decoder, msgs: &[Bytes]) -> usize {
    msgs.iter()
        .filter(|m| black_box(d.decode((*m).clone())).is_ok())
        .count()
}

/// Decodes every message with pg_walstream; the number that decoded.
fn walstream_all(p: &mut LogicalReplicationParser, msgs: &[Bytes]) -> usize {
    msgs.iter()
        .filter(|m| black_box(p.parse_wal_message_bytes((*m).clone())).is_ok())
        .count()
}

fn versus(c: &mut Criterion) {
    let one = insert(424_242);
    let mut g = c.benchmark_group("insert 10 columns");
    g.throughput(Throughput::Elements(1));
    g.bench_function("walnats", |b| {
        let mut d = Decoder::new();
        b.iter(|| d.decode(black_box(one.clone())))
    });
    g.bench_function("pg_walstream", |b| {
        let mut p = LogicalReplicationParser::with_protocol_version(1);
        b.iter(|| p.parse_wal_message_bytes(black_box(one.clone())))
    });
    g.finish();

    let tx = transaction(1000);
    let cap = capture();
    for (name, msgs) in [("transaction of 1000 rows", &tx), ("pg15_v1 capture", &cap)] {
        // Both must decode every message, or the comparison is not fair.
        let ours = walnats_all(&mut Decoder::new(), msgs);
        let theirs = walstream_all(
            &mut LogicalReplicationParser::with_protocol_version(1),
            msgs,
        );
        eprintln!(
            "{name}: {} messages, walnats decoded {ours}, pg_walstream {theirs}",
            msgs.len()
        );
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(msgs.len() as u64));
        g.bench_function("walnats", |b| {
            let mut d = Decoder::new();
            b.iter(|| walnats_all(&mut d, msgs))
        });
        g.bench_function("pg_walstream", |b| {
            let mut p = LogicalReplicationParser::with_protocol_version(1);
            b.iter(|| walstream_all(&mut p, msgs))
        });
        g.finish();
    }
}

fn bench(c: &mut Criterion) {
    let message = to_bytes(&Message::LogicalMessage(LogicalMessage {
        xid: None,
        transactional: true,
        flags: 1,
        lsn: Lsn::from_u64(0x16B3748),
        prefix: "walnats".into(),
        content: Bytes::from_static(b"hello"),
    }))
    .unwrap_or_default();
    let mut g = c.benchmark_group("pgoutput");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode logical message", |b| {
        b.iter(|| decode_message(black_box(message.clone()), false))
    });
    g.finish();
}

criterion_group!(benches, versus, bench);
criterion_main!(benches);
