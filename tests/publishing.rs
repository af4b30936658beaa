//! Both ways of publishing (`nats.fast_ingest`): fast-ingest batches and
//! one acknowledgement per message keep the same guarantees. A message the
//! stream refuses in the middle of a transaction (here: over the stream's
//! own max_msg_size) must end publishing right there: nothing after it may
//! land, or the stream would have a hole that walnats could never fill.
//! Once the cause is fixed, walnats resumes from what the stream holds and
//! publishes the rest exactly once, in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::jetstream::stream;

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
