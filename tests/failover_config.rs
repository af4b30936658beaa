//! `postgres.slot_failover` and a multi-host `postgres.url` from the
//! outside: the refusal below PostgreSQL 17, failover slots made and
//! turned on on PostgreSQL 18, a dead first host skipped, and a read-only
//! server skipped with `target_session_attrs=read-write`. (The failover
//! itself, a standby promoted under load, is in the failover tests.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::harness::{PgServer, PgVersion, WalnatsProc, free_port};
use crate::support::{World, shared};

/// walnats exits with `code` (2: a setting is wrong) and its last
/// `walnats:` line holds every one of `wants`.
fn assert_refused(w: &mut WalnatsProc, code: i32, wants: &[&str]) -> String {
    let status = w.wait_exit(Duration::from_secs(60));
    let out = w.output();
    assert_eq!(status.code(), Some(code), "{out}");
    let last = out
        .lines()
        .rev()
        .find(|l| l.starts_with("walnats: "))
        .unwrap_or_else(|| panic!("no error line:\n{out}"))
        .to_owned();
    for want in wants {
        assert!(last.contains(want), "{want:?} not in {last:?}");
    }
    assert!(!out.contains("panicked"), "{out}");
    last
}

/// `failover` of the world's slot, `None` when there is no slot.
async fn slot_failover(world: &World<'_>) -> Option<bool> {
    let rows = world
        .client()
        .await
        .query(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&world.slot()],
        )
        .await
        .unwrap();
    rows.first().map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_failover_on_postgresql_15_is_refused_in_one_line_before_a_slot_is_made() {
    let world = World::new(shared(PgVersion::V15)).await;
    let mut w = world.spawn_with(
        &world.config(),
        &[("WALNATS_POSTGRES_SLOT_FAILOVER", "true")],
    );
    assert_refused(
        &mut w,
        2,
        &["postgres.slot_failover", "17", "slot_failover = false"],
    );
    let rows = world
        .client()
        .await
        .query(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&world.slot()],
        )
        .await
        .unwrap();
    assert!(rows.is_empty(), "a slot was made before the refusal");
}

/// The slot is made with FAILOVER in the command that exports the initial
/// snapshot (which must still be usable: the row written before arrives as
/// a `read`), and a change made after streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_failover_makes_a_failover_slot_that_still_exports_its_snapshot() {
    let world = World::new(shared(PgVersion::V18)).await;
    world
        .sql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .await;
    let mut w = world.spawn_with(
        &world.config(),
        &[
            ("WALNATS_POSTGRES_SLOT_FAILOVER", "true"),
            ("WALNATS_SNAPSHOT_MODE", "initial"),
        ],
    );
    world.wait_streaming(&mut w).await;
    assert_eq!(slot_failover(&world).await, Some(true));
    world.sql("INSERT INTO t VALUES (2)").await;
    let changes = world.wait_changes(2, &w).await;
    let ops: Vec<&str> = changes.iter().map(|m| m.header("Cdc-Op")).collect();
    assert_eq!(ops, ["read", "insert"]);
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}

/// A slot made without failover gets it at the next start with
/// `slot_failover = true`; `slot_failover = false` never turns it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_failover_turns_failover_on_for_an_existing_slot_and_never_off() {
    let world = World::new(shared(PgVersion::V18)).await;
    world.sql("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    assert_eq!(slot_failover(&world).await, Some(false));
    world.sql("INSERT INTO t VALUES (1)").await;
    world.wait_changes(1, &w).await;
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(30)).success());
    world.wait_slot_released().await;

    world.sql("INSERT INTO t VALUES (2)").await;
    let mut w = world.spawn_with(
        &world.config(),
        &[("WALNATS_POSTGRES_SLOT_FAILOVER", "true")],
    );
    world.wait_streaming(&mut w).await;
    assert_eq!(slot_failover(&world).await, Some(true));
    world.wait_changes(2, &w).await;
    // status shows the slot's PostgreSQL 17 columns and the server.
    let (code, out, err) = crate::cli::run(&["status", "--json"], &world.config(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["slot"]["failover"], true, "{out}");
    assert_eq!(st["slot"]["synced"], false, "{out}");
    assert!(st["slot"]["invalidation_reason"].is_null(), "{out}");
    assert_eq!(
        st["host"],
        format!("127.0.0.1:{}", world.pg.port()),
        "{out}"
    );
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(30)).success());
    world.wait_slot_released().await;

    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    assert_eq!(slot_failover(&world).await, Some(true));
    world.sql("INSERT INTO t VALUES (3)").await;
    let changes = world.wait_changes(3, &w).await;
    assert_eq!(changes.len(), 3, "duplicates after the restarts");
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}

/// The first host of the list has nothing listening: walnats goes on to
/// the second, streams, and its log names both hosts, no password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_host_is_skipped_for_the_next_one() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dead = free_port();
    let url = format!(
        "postgres://postgres:hunter2@127.0.0.1:{dead},127.0.0.1:{}/{}?sslmode=disable&connect_timeout=2",
        world.pg.port(),
        world.db
    );
    let mut w = world.spawn_with(&world.config(), &[("WALNATS_POSTGRES_URL", &url)]);
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO t VALUES (1)").await;
    world.wait_changes(1, &w).await;
    let out = w.output();
    assert!(
        out.contains(&format!("127.0.0.1:{}", world.pg.port())),
        "the log does not say which server walnats uses:\n{out}"
    );
    assert!(!out.contains("hunter2"), "{out}");
    // status goes to the same server, says which, and on PostgreSQL 15
    // has no failover columns (null).
    let (code, out, err) = crate::cli::run(
        &["status", "--json"],
        &world.config(),
        &[("WALNATS_POSTGRES_URL", &url)],
    );
    assert_eq!(code, 0, "{out}{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        st["host"],
        format!("127.0.0.1:{}", world.pg.port()),
        "{out}"
    );
    assert_eq!(st["slot"]["exists"], true, "{out}");
    assert!(st["slot"]["failover"].is_null(), "{out}");
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}

/// The first host is read-only for walnats (its database defaults to
/// `default_transaction_read_only = on`, which libpq counts as read-only):
/// with `target_session_attrs=read-write` walnats skips it and makes its
/// publication and slot on the second. With `any` it would have stopped at
/// the first, where it cannot create the publication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_skips_a_read_only_server() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql("CREATE TABLE t (id int PRIMARY KEY)").await;
    let read_only = PgServer::start(PgVersion::V15);
    read_only
        .execute("postgres", &format!("CREATE DATABASE {}", world.db))
        .await;
    read_only
        .execute(
            "postgres",
            &format!(
                "ALTER DATABASE {} SET default_transaction_read_only = on",
                world.db
            ),
        )
        .await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?sslmode=disable&target_session_attrs=read-write",
        read_only.port(),
        world.pg.port(),
        world.db
    );
    let mut w = world.spawn_with(&world.config(), &[("WALNATS_POSTGRES_URL", &url)]);
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO t VALUES (1)").await;
    world.wait_changes(1, &w).await;
    let on_read_only = read_only
        .client(&world.db)
        .await
        .query(
            "SELECT (SELECT count(*) FROM pg_replication_slots), (SELECT count(*) FROM pg_publication)",
            &[],
        )
        .await
        .unwrap();
    let (slots, pubs): (i64, i64) = (on_read_only[0].get(0), on_read_only[0].get(1));
    assert_eq!((slots, pubs), (0, 0), "walnats used the read-only server");
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}

/// `walnats check` on PostgreSQL 18 prints the primary's
/// `synchronized_standby_slots` and warns when a physical slot named there
/// is inactive (decoding of failover slots waits for it). A server of its
/// own: the setting would stall every failover slot of a shared one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_about_an_inactive_slot_in_synchronized_standby_slots() {
    let pg = PgServer::start(PgVersion::V18);
    let world = World::new(&pg).await;
    for stmt in [
        "SELECT pg_create_physical_replication_slot('standby_gone')",
        "ALTER SYSTEM SET synchronized_standby_slots = 'standby_gone'",
        "SELECT pg_reload_conf()",
    ] {
        pg.execute("postgres", stmt).await;
    }
    // The reload is asynchronous: wait until a new session sees it.
    for _ in 0..100 {
        let rows = pg
            .client("postgres")
            .await
            .query("SHOW synchronized_standby_slots", &[])
            .await
            .unwrap();
        if rows[0].get::<_, String>(0) == "standby_gone" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, out, err) = crate::cli::run(
        &["check"],
        &world.config(),
        &[("WALNATS_POSTGRES_SLOT_FAILOVER", "true")],
    );
    assert!(
        out.contains("synchronized_standby_slots = \"standby_gone\""),
        "{out}{err}"
    );
    assert!(
        out.contains("[warn] synchronized_standby_slots names physical slot \"standby_gone\", which is inactive"),
        "{out}{err}"
    );
}
