//! Input that cannot be published is never dropped silently (guarantee 4):
//! a row over the server's max_payload stops walnats by default, without
//! confirming past it; with `on_oversize = "skip"` it is logged and counted
//! and the stream goes on; with `on_oversize = "object_store"` its body
//! goes to an Object Store bucket and a claim check to the stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::harness::{NatsServer, PgVersion};
use crate::support::{Msg, PREFIX, Rng, World, assert_exactly_once_in_order, shared};

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

/// Reads an object of the claim check `m` points to, checking the claim
/// against what the Object Store holds: (claim body, object bytes).
async fn claimed_object(world: &World<'_>, m: &Msg) -> (serde_json::Value, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let claim = m.json();
    let bucket = claim["claim_check"]["bucket"].as_str().unwrap().to_owned();
    let name = claim["claim_check"]["name"].as_str().unwrap().to_owned();
    assert_eq!(bucket, "walnats_oversize");
    assert_eq!(m.header("Cdc-Claim-Check"), format!("{bucket}/{name}"));
    let store = world.js().await.get_object_store(&bucket).await.unwrap();
    let info = store.info(&name).await.unwrap();
    assert_eq!(
        claim["claim_check"]["digest"].as_str(),
        info.digest.as_deref()
    );
    let mut bytes = Vec::new();
    store
        .get(&name)
        .await
        .unwrap()
        .read_to_end(&mut bytes)
        .await
        .unwrap();
    assert_eq!(
        claim["claim_check"]["size"].as_u64(),
        Some(bytes.len() as u64)
    );
    assert_eq!(m.header("Cdc-Body-Size"), bytes.len().to_string());
    (claim, bytes)
}

#[tokio::test]
async fn with_object_store_an_oversized_row_goes_to_the_bucket_and_a_claim_check_to_the_stream() {
    let world = world_with_small_payload().await;
    let env = [
        ("WALNATS_LIMITS_ON_OVERSIZE", "object_store"),
        ("WALNATS_OUTPUT_MESSAGE_PREFIXES", "blob"),
    ];
    let mut w = world.spawn_with(&world.config(), &env);
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO big VALUES (1, 'small')").await;
    world
        .sql(&format!(
            "INSERT INTO big VALUES (2, '{}')",
            "x".repeat(10_000)
        ))
        .await;
    world
        .sql(&format!(
            "SELECT pg_logical_emit_message(true, 'blob', '{}')",
            "y".repeat(10_000)
        ))
        .await;
    world.sql("INSERT INTO big VALUES (3, 'small')").await;
    let msgs = world.wait_changes(4, &w).await;
    assert_exactly_once_in_order(&world.read_stream().await);
    let subjects: Vec<&str> = msgs.iter().map(|m| m.subject.as_str()).collect();
    let insert = format!("{PREFIX}.public.big.insert");
    let message = format!("{PREFIX}._message.blob");
    assert_eq!(subjects, [&insert, &insert, &message, &insert]);
    assert!(msgs[0].header("Cdc-Claim-Check").is_empty());

    // The row: the claim routes like the change (op, table, key, source),
    // the object is the whole body walnats would have published.
    let m = &msgs[1];
    assert_eq!(m.header("Cdc-Op"), "insert");
    assert_eq!(m.header("Content-Type"), "application/json");
    let (claim, bytes) = claimed_object(&world, m).await;
    assert_eq!(claim["op"], "insert");
    assert_eq!(claim["schema"], "public");
    assert_eq!(claim["table"], "big");
    assert_eq!(claim["key"], serde_json::json!({"id": 2}));
    assert_eq!(claim["source"]["lsn"], m.header("Cdc-Lsn"));
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "op": "insert", "schema": "public", "table": "big",
            "key": {"id": 2}, "before": null,
            "after": {"id": 2, "v": "x".repeat(10_000)},
            "unchanged": [],
            "source": claim["source"].clone(),
        })
    );

    // A `_message`: the object holds its raw bytes.
    let m = &msgs[2];
    let (claim, bytes) = claimed_object(&world, m).await;
    assert_eq!(claim["op"], "message");
    assert_eq!(claim["prefix"], "blob");
    assert_eq!(bytes, "y".repeat(10_000).into_bytes());
    assert!(
        !w.output().contains("xxxxxxxxxx"),
        "a row value was logged:\n{}",
        w.output()
    );
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(20)).success());
}

/// kill -9 at random moments (between a put and its claim's publish, among
/// others) while transactions with oversized rows stream: every change is
/// in the stream exactly once, and every claim check resolves to its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_object_store_kill_9_loses_and_duplicates_nothing() {
    let world = world_with_small_payload().await;
    let env = [("WALNATS_LIMITS_ON_OVERSIZE", "object_store")];
    let spawn = || world.spawn_with(&world.config(), &env);
    let mut w = spawn();
    world.wait_streaming(&mut w).await;
    let url = world.pg_url();
    const TXS: i64 = 40;
    let writer = tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        for i in 0..TXS {
            client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO big VALUES ({}, 'small');
                     INSERT INTO big VALUES ({}, repeat(md5('{i}'), 6400)); COMMIT;",
                    2 * i,
                    2 * i + 1
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut rng = Rng::from_env();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(rng.range(20, 500))).await;
        w.kill9();
        w = spawn();
    }
    writer.await.unwrap();
    let msgs = world.wait_changes(2 * TXS as usize, &w).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = world.read_stream().await;
    assert_exactly_once_in_order(&all);
    let msgs: Vec<&Msg> = msgs.iter().filter(|m| m.is_change()).collect();
    assert_eq!(msgs.len(), 2 * TXS as usize);
    for (n, m) in msgs.iter().enumerate() {
        let id = n as i64;
        if id % 2 == 0 {
            assert_eq!(m.json()["after"]["id"].as_i64(), Some(id));
            continue;
        }
        let (claim, bytes) = claimed_object(&world, m).await;
        assert_eq!(claim["key"]["id"].as_i64(), Some(id));
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["after"]["id"].as_i64(), Some(id));
        assert_eq!(body["after"]["v"].as_str().map(str::len), Some(32 * 6400));
        assert_eq!(body["source"], claim["source"]);
    }
    w.sigterm();
}
