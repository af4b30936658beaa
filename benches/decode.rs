//! Decode throughput of the pgoutput hot path: an Insert of a 10-column row.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use walnats::lsn::Lsn;
use walnats::pgoutput::{
    Decoder, Insert, LogicalMessage, Message, Oid, TupleData, TupleValue, decode_message, to_bytes,
};

fn ten_column_insert() -> Bytes {
    let text = |s: &'static str| TupleValue::Text(Bytes::from_static(s.as_bytes()));
    let msg = Message::Insert(Insert {
        xid: None,
        oid: Oid(16384),
        new: TupleData {
            columns: vec![
                text("424242"),
                text("7"),
                text("paid"),
                text("19.90"),
                text("2026-11-22 18:31:10.123456+00"),
                text("alice@example.com"),
                text("t"),
                TupleValue::Null,
                text("{\"k\": 1}"),
                text("3f2504e0-4f89-11d3-9a0c-0305e82c3301"),
            ],
        },
    });
    to_bytes(&msg).unwrap_or_default()
}

fn bench(c: &mut Criterion) {
    let insert = ten_column_insert();
    let mut g = c.benchmark_group("pgoutput");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode insert 10 columns", |b| {
        let mut d = Decoder::new();
        b.iter(|| d.decode(black_box(insert.clone())))
    });
    let message = to_bytes(&Message::LogicalMessage(LogicalMessage {
        xid: None,
        transactional: true,
        flags: 1,
        lsn: Lsn::from_u64(0x16B3748),
        prefix: "walnats".into(),
        content: Bytes::from_static(b"hello"),
    }))
    .unwrap_or_default();
    g.bench_function("decode logical message", |b| {
        b.iter(|| decode_message(black_box(message.clone()), false))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
