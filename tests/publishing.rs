//! Both ways of publishing (`nats.fast_ingest`): fast-ingest batches and
//! one acknowledgement per message keep the same guarantees. A message the
//! stream refuses in the middle of a transaction (here: over the stream's
//! own max_msg_size) must end publishing right there: nothing after it may
//! land, or the stream would have a hole that walnats could never fill.
//! Once the cause is fixed, walnats resumes from what the stream holds and
//! publishes the rest exactly once, in order. And in both, a plain NATS
//! subscriber of a table's subject gets that table's changes and nothing
//! else: no batch machinery travels on a row's subject.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::jetstream::stream;
use futures::StreamExt;

use crate::harness::PgVersion;
use crate::support::{Msg, PREFIX, STREAM, World, assert_exactly_once_in_order, shared};

#[tokio::test]
async fn a_message_the_stream_refuses_mid_batch_leaves_no_gap_fast_ingest() {
    a_message_the_stream_refuses_leaves_no_gap("on").await;
}

#[tokio::test]
async fn a_message_the_stream_refuses_leaves_no_gap_one_ack_per_message() {
    a_message_the_stream_refuses_leaves_no_gap("off").await;
}

fn ids(msgs: &[Msg]) -> Vec<i64> {
    msgs.iter()
        .filter(|m| m.is_change())
        .map(|m| m.json()["after"]["id"].as_i64().unwrap())
        .collect()
}

async fn a_message_the_stream_refuses_leaves_no_gap(fast_ingest: &str) {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await;
    let js = world.js().await;
    js.create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec![format!("{PREFIX}.>")],
        storage: stream::StorageType::File,
        max_message_size: 2048,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut w = world.spawn_with(
        &world.config(),
        &[("WALNATS_NATS_FAST_INGEST", fast_ingest)],
    );
    world.wait_streaming(&mut w).await;
    // Rows 1-30, a 4 KB row 31 the stream refuses, rows 32-61, all in one
    // transaction (one batch); then another transaction.
    world
        .sql(
            "INSERT INTO t SELECT g, CASE WHEN g = 31 THEN repeat('x', 4000) ELSE 'small' END \
             FROM generate_series(1, 61) g",
        )
        .await;
    world
        .sql("INSERT INTO t SELECT g, 'after' FROM generate_series(62, 70) g")
        .await;
    world.wait_changes(30, &w).await;
    // walnats retries, and JetStream refuses again: wait for two refusals.
    for _ in 0..300 {
        if w.output().matches("exceeds maximum").count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = w.output();
    assert!(
        out.matches("exceeds maximum").count() >= 2,
        "no refusal logged:\n{out}"
    );
    let mode = if fast_ingest == "on" {
        "publishing in fast-ingest batches"
    } else {
        "publishing with one acknowledgement per message"
    };
    assert!(out.contains(mode), "not {mode:?}:\n{out}");
    let held = world.read_stream().await;
    assert_eq!(
        ids(&held),
        (1..=30).collect::<Vec<_>>(),
        "the stream holds something after the refused row"
    );
    // The fix: lift the stream's limit. walnats publishes the rest.
    let mut cfg = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    cfg.max_message_size = -1;
    js.update_stream(cfg).await.unwrap();
    world.wait_changes(70, &w).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let msgs = world.read_stream().await;
    assert_exactly_once_in_order(&msgs);
    assert_eq!(ids(&msgs), (1..=70).collect::<Vec<_>>());
    w.sigterm();
}

#[tokio::test]
async fn a_core_subscriber_of_a_table_subject_gets_only_its_changes_fast_ingest() {
    a_core_subscriber_of_a_table_subject_gets_only_its_changes("on").await;
}

#[tokio::test]
async fn a_core_subscriber_of_a_table_subject_gets_only_its_changes_one_ack_per_message() {
    a_core_subscriber_of_a_table_subject_gets_only_its_changes("off").await;
}

/// 600 one-row transactions, so that fast batches end both full (500) and
/// early, with an end-of-batch marker, whenever walnats runs dry. A core
/// NATS subscriber (no JetStream) of the table's insert subject must see
/// exactly the 600 change events; the markers go to `<prefix>._batch`.
async fn a_core_subscriber_of_a_table_subject_gets_only_its_changes(fast_ingest: &str) {
    const ROWS: i64 = 600;
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await;
    let nats = async_nats::connect(world.nats.url()).await.unwrap();
    let subject = format!("{PREFIX}.public.t.insert");
    let mut table = nats.subscribe(subject.clone()).await.unwrap();
    let mut everything = nats.subscribe(format!("{PREFIX}.>")).await.unwrap();
    nats.flush().await.unwrap();
    let mut w = world.spawn_with(
        &world.config(),
        &[("WALNATS_NATS_FAST_INGEST", fast_ingest)],
    );
    world.wait_streaming(&mut w).await;
    let client = world.client().await;
    for id in 1..=ROWS {
        // One statement outside a transaction block: one transaction each.
        client
            .execute(
                "INSERT INTO t VALUES ($1, 'v')",
                &[&i32::try_from(id).unwrap()],
            )
            .await
            .unwrap();
    }
    world.wait_changes(usize::try_from(ROWS).unwrap(), &w).await;

    let mut ids = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), table.next()).await {
        assert_eq!(m.subject.as_str(), subject);
        assert!(
            !m.payload.is_empty(),
            "an empty message on {subject} (headers {:?}, reply {:?}) after {} changes",
            m.headers,
            m.reply,
            ids.len()
        );
        let body: serde_json::Value = serde_json::from_slice(&m.payload)
            .unwrap_or_else(|e| panic!("not a change event on {subject} ({e}): {:?}", m.payload));
        assert_eq!(
            (&body["op"], &body["schema"], &body["table"]),
            (&"insert".into(), &"public".into(), &"t".into()),
            "{body}"
        );
        ids.push(body["after"]["id"].as_i64().unwrap());
    }
    assert_eq!(ids, (1..=ROWS).collect::<Vec<_>>());

    // What else went out under the prefix: `_schema` and, with fast-ingest
    // batches, empty end-of-batch markers on `_batch` (never stored).
    let mut markers = 0;
    while let Ok(Some(m)) =
        tokio::time::timeout(Duration::from_millis(500), everything.next()).await
    {
        match m.subject.as_str() {
            s if s == subject => assert!(!m.payload.is_empty()),
            s if s == format!("{PREFIX}._schema.public.t") => {}
            s if s == format!("{PREFIX}._batch") => {
                assert!(m.payload.is_empty(), "a marker with a body");
                markers += 1;
            }
            other => panic!("unexpected message on {other}"),
        }
    }
    if fast_ingest == "on" {
        assert!(markers > 0, "no batch ended early: the test proved nothing");
    } else {
        assert_eq!(markers, 0);
    }
    let held = world.read_stream().await;
    assert!(held.iter().all(|m| !m.subject.ends_with("._batch")));
    assert_exactly_once_in_order(&held);
    w.sigterm();
}

/// `walnats snapshot` on a stream made without atomic batches (by an
/// operator, before walnats): the first re-read chunk is refused, and the
/// next session turns `allow_atomic` on because a re-read is queued; the
/// re-read then finishes with every row once (it used to retry forever).
#[tokio::test]
async fn a_reread_on_a_stream_without_atomic_batches_turns_them_on() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 50) g")
        .await;
    let js = world.js().await;
    js.create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec![format!("{PREFIX}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let cfg = world.config();
    let mut w = world.spawn_with(&cfg, &[]);
    world.wait_streaming(&mut w).await;
    let (code, out, err) = crate::cli::run(&["snapshot", "public.t"], &cfg, &[]);
    assert_eq!(code, 0, "{out}{err}");
    for _ in 0..600 {
        if w.output().contains("snapshot of table complete") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = w.output();
    assert!(
        out.contains("snapshot of table complete"),
        "the re-read never finished:\n{out}"
    );
    let info = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert!(info.config.allow_atomic_publish, "allow_atomic still off");
    let msgs = world.read_stream().await;
    let mut reads: Vec<i64> = msgs
        .iter()
        .filter(|m| m.header("Cdc-Op") == "read")
        .map(|m| m.json()["after"]["id"].as_i64().unwrap())
        .collect();
    reads.sort_unstable();
    assert_eq!(reads, (1..=50).collect::<Vec<_>>());
    w.sigterm();
}
