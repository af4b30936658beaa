//! Decode + encode, no I/O: the CPU walnats spends per row before NATS.
//! A 10-column row (bigint, int, text, numeric, timestamptz, text, jsonb,
//! bool, uuid, int) from pgoutput bytes to subject, headers and JSON body.
//!
//! `cargo bench --bench encode`; throughput is in rows (elements) per second.

use std::hint::black_box;

// The walnats binary runs on mimalloc; measure with the same allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use walnats::config::OutputFormat;
use walnats::encode::{Encoder, Source};
use walnats::event::{Body, ColumnInfo, Event, Op, RelationInfo, TxInfo};
use walnats::lsn::{Lsn, Position};
use walnats::pgoutput::{
    Decoder, Insert, Message, Oid, ReplicaIdentity, TupleData, TupleValue, Xid, to_bytes,
};
use walnats::value::ValueKind;

const COLUMNS: [(&str, u32, &str); 10] = [
    ("id", 20, "bigint"),
    ("n", 23, "integer"),
    ("name", 25, "text"),
    ("amount", 1700, "numeric(12,2)"),
    ("at", 1184, "timestamp with time zone"),
    ("email", 25, "text"),
    ("doc", 3802, "jsonb"),
    ("flag", 16, "boolean"),
    ("uid", 2950, "uuid"),
    ("qty", 23, "integer"),
];

fn relation() -> Arc<RelationInfo> {
    let columns = COLUMNS
        .iter()
        .map(|(name, oid, type_name)| ColumnInfo {
            name: (*name).to_owned(),
            json_key: format!("\"{name}\":").into_bytes().into_boxed_slice(),
            type_oid: *oid,
            type_modifier: -1,
            type_name: (*type_name).to_owned(),
            kind: ValueKind::for_builtin_oid(*oid).unwrap_or(ValueKind::Text),
            key: *name == "id",
        })
        .collect();
    Arc::new(RelationInfo {
        oid: Oid(16384),
        schema: "public".into(),
        table: "bench".into(),
        replica_identity: ReplicaIdentity::Default,
        columns,
        subject_base: "cdc.app.public.bench.".into(),
        schema_subject: "cdc.app._schema.public.bench".into(),
        schema_hash: 1,
        outbox: None,
    })
}

fn insert_bytes() -> Bytes {
    let text = |s: &'static str| TupleValue::Text(s.as_bytes());
    to_bytes(&Message::Insert(Insert {
        xid: None,
        oid: Oid(16384),
        new: TupleData::from_values(vec![
            text("424242"),
            text("242"),
            text("name 424242"),
            text("428484.42"),
            text("2026-11-22 18:31:10.123456+00"),
            text("user424242@example.com"),
            text("{\"k\": 424242, \"tags\": [\"a\", \"b\"]}"),
            text("t"),
            text("3f2504e0-4f89-11d3-9a0c-0305e82c3301"),
            text("4"),
        ]),
    }))
    .unwrap_or_default()
}

fn bench(c: &mut Criterion) {
    let rel = relation();
    let bytes = insert_bytes();
    let tx = TxInfo {
        xid: Xid(731),
        commit_lsn: Lsn::from_u64(0x16B3800),
        commit_time: 817_151_470_123_456,
    };
    let mut g = c.benchmark_group("row");
    g.throughput(Throughput::Elements(1));
    for (name, format) in [
        ("json", OutputFormat::Json),
        ("debezium", OutputFormat::Debezium),
    ] {
        let mut decoder = Decoder::new();
        let mut encoder = Encoder::new(
            Source {
                db: "app".into(),
                slot: "walnats".into(),
                prefix: "cdc.app".into(),
            },
            format,
        );
        g.bench_function(format!("decode + encode 10 columns ({name})"), |b| {
            b.iter(|| {
                let Ok(Message::Insert(ins)) = decoder.decode(black_box(bytes.clone())) else {
                    return None;
                };
                let ev = Event {
                    pos: Position::new(tx.commit_lsn, 0),
                    lsn: Lsn::from_u64(0x16B3748),
                    tx: Some(tx),
                    snapshot: false,
                    body: Body::Row {
                        op: Op::Insert,
                        rel: Arc::clone(&rel),
                        old: None,
                        new: Some(ins.new),
                    },
                };
                encoder.encode(&ev).ok()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
