//! Guarantee 3: memory stays bounded whatever the size of a transaction or
//! of a row. walnats' peak resident set (`VmHWM`) is read from `/proc`
//! while it runs, after the work is done. Each test has a PostgreSQL of its
//! own: the shared server's other walsenders would have to read this WAL.
//!
//! `WALNATS_TEST_HUGE_TX_ROWS` sets the transaction's size (default
//! 300,000 rows, which a debug build streams in well under a minute on two
//! cores); `WALNATS_TEST_HUGE_ROW_MIB` the wide row's (default 100).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use crate::harness::{PgServer, PgVersion};
use crate::support::{STREAM, World, peak_rss};

const MIB: u64 = 1024 * 1024;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Waits until the stream holds `n` messages; returns its last sequence.
async fn wait_messages(world: &World<'_>, n: u64, w: &crate::harness::WalnatsProc) -> u64 {
    let js = world.js().await;
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        if let Ok(mut s) = js.get_stream(STREAM).await {
            let info = s.info().await.unwrap();
            if info.state.messages >= n {
                return info.state.last_sequence;
            }
        }
        let pid = w.pid().unwrap();
        assert!(
            crate::harness::process::is_alive(pid),
            "walnats exited:\n{}",
            w.output()
        );
        assert!(Instant::now() < deadline, "timed out:\n{}", w.output());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One transaction of many narrow rows: PostgreSQL sends it at commit as
/// one long run of changes; walnats holds at most `max_in_flight` of them.
/// Buffering the transaction would take hundreds of bytes per row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transaction_of_many_rows_streams_in_bounded_memory() {
    let rows = env_u64("WALNATS_TEST_HUGE_TX_ROWS", 300_000);
    let pg = PgServer::start(PgVersion::V15);
    let world = World::new(&pg).await;
    world.sql("CREATE TABLE narrow (id int PRIMARY KEY)").await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    let started = Instant::now();
    world
        .sql(&format!(
            "INSERT INTO narrow SELECT generate_series(1, {rows})"
        ))
        .await;
    let committed = started.elapsed();
    // A `_schema` message, then every row.
    let last = wait_messages(&world, rows + 1, &w).await;
    let streamed = started.elapsed();
    let peak = peak_rss(w.pid().unwrap()).unwrap();
    eprintln!(
        "{rows} rows in one transaction: committed in {committed:?}, in the stream after {streamed:?}, \
         walnats peak RSS {} MiB",
        peak / MIB
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let js = world.js().await;
    let mut stream = js.get_stream(STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, rows + 1);
    let first = stream.get_raw_message(2).await.unwrap();
    let tail = stream.get_raw_message(last).await.unwrap();
    let header = |m: &async_nats::jetstream::message::StreamMessage, h: &str| {
        m.headers.get(h).unwrap().as_str().to_owned()
    };
    assert_eq!(
        header(&first, "Cdc-Commit-Lsn"),
        header(&tail, "Cdc-Commit-Lsn")
    );
    assert_eq!(header(&tail, "Cdc-Seq"), (rows - 1).to_string());
    let body: serde_json::Value = serde_json::from_slice(&tail.payload).unwrap();
    assert_eq!(body["after"]["id"].as_u64(), Some(rows));
    assert!(
        peak < 160 * MIB,
        "walnats peaked at {} MiB streaming one transaction of {rows} rows",
        peak / MIB
    );
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(60)).success());
}

/// One row with a text value of ~100 MiB (over any NATS max_payload, so it
/// goes to the Object Store): walnats holds the row as PostgreSQL sent it
/// and its encoded body, and little more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_row_goes_to_the_object_store_in_bounded_memory() {
    let size = env_u64("WALNATS_TEST_HUGE_ROW_MIB", 100) * MIB;
    let pg = PgServer::start(PgVersion::V15);
    let world = World::new(&pg).await;
    world
        .sql("CREATE TABLE wide (id int PRIMARY KEY, v text)")
        .await;
    let mut w = world.spawn_with(
        &world.config(),
        &[("WALNATS_LIMITS_ON_OVERSIZE", "object_store")],
    );
    world.wait_streaming(&mut w).await;
    let before = peak_rss(w.pid().unwrap()).unwrap();
    let started = Instant::now();
    world
        .sql(&format!(
            "INSERT INTO wide VALUES (1, repeat('x', {size})); INSERT INTO wide VALUES (2, 'small')"
        ))
        .await;
    let msgs = world.wait_changes(2, &w).await;
    let streamed = started.elapsed();
    let peak = peak_rss(w.pid().unwrap()).unwrap();
    eprintln!(
        "a {} MiB row: in the stream after {streamed:?}, walnats peak RSS {} MiB (before the row: {} MiB)",
        size / MIB,
        peak / MIB,
        before / MIB
    );
    let claim = &msgs[0];
    let body_size: u64 = claim.header("Cdc-Body-Size").parse().unwrap();
    assert!(body_size > size, "{body_size}");
    let name = claim.json()["claim_check"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let store = world
        .js()
        .await
        .get_object_store("walnats_oversize")
        .await
        .unwrap();
    assert_eq!(store.info(&name).await.unwrap().size as u64, body_size);
    assert_eq!(msgs[1].json()["after"]["id"], 2);
    // The row arrives once as PostgreSQL's text and is encoded once.
    let bound = before + 2 * size + size / 2;
    assert!(
        peak < bound,
        "walnats peaked at {} MiB for a {} MiB row (bound {} MiB)",
        peak / MIB,
        size / MIB,
        bound / MIB
    );
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(60)).success());
}
