//! The bad-input catalogue: each setup mistake stops walnats with one line
//! that names the cause and the fix, a non-zero exit, no panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::harness::{NatsServer, PgServer, PgVersion, WalnatsProc};
use crate::support::{World, shared, walnats_bin};

fn assert_refused(w: &mut WalnatsProc, wants: &[&str]) {
    let status = w.wait_exit(Duration::from_secs(60));
    let out = w.output();
    assert_eq!(status.code(), Some(1), "{out}");
    let last = out
        .lines()
        .rev()
        .find(|l| l.starts_with("walnats: "))
        .unwrap_or_else(|| panic!("no error line:\n{out}"));
    for want in wants {
        assert!(last.contains(want), "{want:?} not in {last:?}");
    }
    assert!(
        !out.contains("panicked") && !out.contains("stack backtrace"),
        "{out}"
    );
}

#[tokio::test]
async fn wal_level_replica_is_refused_with_the_fix() {
    let pg = PgServer::start_with(PgVersion::V15, &["wal_level=replica"]);
    let world = World::new(&pg).await;
    let mut w = world.spawn();
    assert_refused(
        &mut w,
        &["wal_level", "ALTER SYSTEM SET wal_level = logical"],
    );
}

#[tokio::test]
async fn a_slot_of_another_plugin_is_refused_and_kept() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql(&format!(
            "SELECT pg_create_logical_replication_slot('{}', 'test_decoding')",
            world.slot()
        ))
        .await;
    let mut w = world.spawn();
    assert_refused(&mut w, &["test_decoding", "walnats slot drop --yes"]);
    let c = world.client().await;
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&world.slot()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "walnats must never drop a slot on its own");
}

#[tokio::test]
async fn a_publication_for_a_missing_table_is_refused() {
    let world = World::new(shared(PgVersion::V15)).await;
    let mut w = world.spawn_with(
        &world.config(),
        &[("WALNATS_POSTGRES_TABLES", "public.nosuchtable")],
    );
    assert_refused(&mut w, &["cannot create publication", "postgres.tables"]);
}

#[tokio::test]
async fn nats_without_jetstream_is_refused() {
    let mut world = World::new(shared(PgVersion::V15)).await;
    world.nats = NatsServer::start_without_jetstream().await;
    let mut w = world.spawn();
    assert_refused(&mut w, &["JetStream is not enabled", "-js"]);
}

#[tokio::test]
async fn check_reports_every_failure_with_a_fix() {
    // PostgreSQL unreachable and NATS unreachable: both reported, exit 1.
    let config = "[postgres]\nurl = \"postgres://u@127.0.0.1:1/db?sslmode=disable\"\n[nats]\nurl = \"nats://127.0.0.1:1\"\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(walnats_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("[FAIL] PostgreSQL at") && text.contains("fix:"),
        "{text}"
    );
    assert!(text.contains("[FAIL] NATS"), "{text}");
}

/// A slot invalidated by max_slot_wal_keep_size has lost changes: walnats
/// stops with the fix and never recreates it silently.
#[tokio::test]
async fn a_slot_invalidated_by_max_slot_wal_keep_size_is_refused() {
    let pg = PgServer::start_with(
        PgVersion::V15,
        &[
            "max_slot_wal_keep_size=1MB",
            "min_wal_size=32MB",
            "max_wal_size=64MB",
        ],
    );
    let world = World::new(&pg).await;
    world.sql("CREATE TABLE t (v text)").await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    w.sigterm();
    assert!(
        w.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        w.output()
    );
    // Push the slot's restart point out of the kept WAL.
    for _ in 0..4 {
        world.sql("INSERT INTO t SELECT md5(g::text) FROM generate_series(1, 20000) g; SELECT pg_switch_wal();").await;
    }
    world.sql("CHECKPOINT").await;
    let c = world.client().await;
    let status: Option<String> = c
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&world.slot()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        status.as_deref(),
        Some("lost"),
        "the test did not manage to invalidate the slot"
    );
    let mut w = world.spawn();
    assert_refused(&mut w, &["invalidated", "walnats slot drop --yes"]);
}

/// A slot dropped behind walnats' back (by hand, a major upgrade, a
/// failover) while its checkpoint survives: the changes in between are
/// gone, so walnats refuses to paper over it with a new slot, until
/// `slot drop --yes` removes the checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_slot_with_a_checkpoint_is_refused_until_slot_drop() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO t VALUES (1)").await;
    world.wait_changes(1, &w).await;
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(30)).success());
    world
        .sql(&format!(
            "SELECT pg_drop_replication_slot('{}')",
            world.slot()
        ))
        .await;
    world.sql("INSERT INTO t VALUES (2)").await;
    let mut w = world.spawn();
    assert_refused(&mut w, &["is gone", "slot drop --yes"]);
    let (code, out, err) = crate::cli::run(&["slot", "drop", "--yes"], &world.config(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    w.sigterm();
}
