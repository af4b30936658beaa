//! Input that cannot be published is never dropped silently (guarantee 4):
//! a row over the server's max_payload stops walnats by default, without
//! confirming past it; with `on_oversize = "skip"` it is logged and counted
//! and the stream goes on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::harness::{NatsServer, PgVersion};
use crate::support::{PREFIX, World, assert_exactly_once_in_order, shared};

async fn world_with_small_payload() -> World<'static> {
    let mut world = World::new(shared(PgVersion::V15)).await;
    world.nats = NatsServer::start_with(Some("max_payload: 4096\n")).await;
    world
        .sql("CREATE TABLE big (id int PRIMARY KEY, v text)")
        .await;
    world
}

#[tokio::test]
async fn an_oversized_row_stops_walnats_and_confirms_nothing_past_it() {
    let world = world_with_small_payload().await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO big VALUES (1, 'small')").await;
    world.wait_changes(1, &w).await;
    world
        .sql(&format!(
            "INSERT INTO big VALUES (2, '{}')",
            "x".repeat(10_000)
        ))
        .await;
    let status = w.wait_exit(Duration::from_secs(30));
    let out = w.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("max_payload") && out.contains("limits.on_oversize"),
        "{out}"
    );
    assert!(
        !out.contains("xxxxxxxxxx"),
        "a row value was printed:\n{out}"
    );
    // The error names the position (commit LSN:seq); the slot may have
    // followed other databases' WAL up to it, never to or past it.
    let commit = out
        .split("for position ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("no position in the error:\n{out}"))
        .to_owned();
    let confirmed = world.confirmed_flush().await.unwrap();
    assert!(
        crate::support::lsn(&confirmed) < crate::support::lsn(&commit),
        "the slot moved past the oversized transaction: {confirmed} >= {commit}"
    );
    // Restarting does not skip it either.
    let mut again = world.spawn();
    let status = again.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", again.output());
}

#[tokio::test]
async fn with_skip_an_oversized_row_is_logged_and_the_stream_goes_on() {
    let world = world_with_small_payload().await;
    let mut w = world.spawn_with(&world.config(), &[("WALNATS_LIMITS_ON_OVERSIZE", "skip")]);
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO big VALUES (1, 'small')").await;
    world
        .sql(&format!(
            "INSERT INTO big VALUES (2, '{}')",
            "x".repeat(10_000)
        ))
        .await;
    world.sql("INSERT INTO big VALUES (3, 'small')").await;
    let msgs = world.wait_changes(2, &w).await;
    let ids: Vec<i64> = msgs
        .iter()
        .filter(|m| m.subject == format!("{PREFIX}.public.big.insert"))
        .map(|m| m.json()["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 3]);
    assert!(
        w.output().contains("oversized message skipped"),
        "{}",
        w.output()
    );
    // A restart replays nothing twice around the skipped row.
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(20)).success());
    let mut w = world.spawn_with(&world.config(), &[("WALNATS_LIMITS_ON_OVERSIZE", "skip")]);
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO big VALUES (4, 'small')").await;
    world.wait_changes(3, &w).await;
    assert_exactly_once_in_order(&world.read_stream().await);
    w.sigterm();
}
