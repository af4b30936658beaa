//! The slot and the WAL it keeps: heartbeats move an idle slot and are
//! never published, retained WAL is measured and warned about once per
//! crossing, and a replay that cannot produce what the stream holds says so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::harness::{PgVersion, free_port, wait_until};
use crate::http::{get, metric};
use crate::support::{PREFIX, World, lsn, shared};

async fn current_wal(world: &World<'_>) -> String {
    world
        .client()
        .await
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// A heartbeat is a `walnats.heartbeat` message in this database's WAL
/// (seen through a test_decoding slot of the test's own): walnats never
/// publishes it, and the slot confirms past it while the published tables
/// are idle and another database writes.
#[tokio::test]
async fn heartbeats_are_written_to_the_wal_never_published_and_move_an_idle_slot_pg15() {
    heartbeats(PgVersion::V15).await;
}

/// PostgreSQL 17 added a `flush` argument to `pg_logical_emit_message`.
#[tokio::test]
async fn heartbeats_are_written_to_the_wal_never_published_and_move_an_idle_slot_pg18() {
    heartbeats(PgVersion::V18).await;
}

async fn heartbeats(version: PgVersion) {
    let world = World::new(shared(version)).await;
    world.sql("CREATE TABLE quiet (id int PRIMARY KEY)").await;
    let peek = format!("peek_{}", world.db);
    world
        .sql(&format!(
            "SELECT pg_create_logical_replication_slot('{peek}', 'test_decoding')"
        ))
        .await;
    let mut w = world.spawn_with(
        &world.config(),
        &[("WALNATS_POSTGRES_HEARTBEAT_INTERVAL", "500ms")],
    );
    world.wait_streaming(&mut w).await;
    let other = world.pg.create_database().await;
    world
        .pg
        .execute(
            &other,
            "CREATE TABLE busy (v text); INSERT INTO busy SELECT md5(g::text) FROM generate_series(1, 2000) g",
        )
        .await;
    let target = current_wal(&world).await;
    let mut confirmed = String::new();
    for _ in 0..900 {
        confirmed = world.confirmed_flush().await.unwrap();
        if lsn(&confirmed) >= lsn(&target) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = world.client().await;
    // Periodic: at least two, however fast the slot moved.
    let mut beats: i64 = 0;
    for _ in 0..100 {
        beats = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM pg_logical_slot_peek_changes('{peek}', NULL, NULL) \
                     WHERE data LIKE 'message: transactional: 0 prefix: walnats.heartbeat%'"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if beats >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&peek])
        .await
        .unwrap();
    assert!(
        lsn(&confirmed) >= lsn(&target),
        "the idle slot stayed at {confirmed}, behind {target}:\n{}",
        w.output()
    );
    assert!(beats >= 2, "{beats} heartbeats in the WAL:\n{}", w.output());
    let published = world.read_stream().await;
    assert!(
        published.is_empty(),
        "heartbeats were published: {:?}",
        published.iter().map(|m| &m.subject).collect::<Vec<_>>()
    );
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(20)).success());
}

/// `walnats_slot_wal_retained_bytes` follows the slot, and crossing
/// `limits.wal_retained_warn` logs one warning, not one per poll.
#[tokio::test]
async fn retained_wal_is_measured_and_warned_about_once_per_crossing() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql("CREATE TABLE t (id int PRIMARY KEY)").await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut w = world.spawn_with(
        &world.config(),
        &[
            ("WALNATS_HTTP_LISTEN", &listen),
            ("WALNATS_LIMITS_WAL_RETAINED_WARN", "1B"),
        ],
    );
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO t VALUES (1)").await;
    wait_until(
        Duration::from_secs(30),
        "walnats_slot_wal_retained_bytes",
        || async {
            let body = get(port, "/metrics").await.map(|r| r.1).unwrap_or_default();
            metric(&body, "walnats_slot_wal_retained_bytes").is_some_and(|v| v > 1.0)
        },
    )
    .await;
    // Two more polls (every 5 s) above the threshold.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let out = w.output();
    let up = out
        .matches("retains more WAL than limits.wal_retained_warn")
        .count();
    let down = out.matches("back under limits.wal_retained_warn").count();
    assert!(up >= 1, "no warning:\n{out}");
    assert_eq!(up, down + 1, "one warning per crossing:\n{out}");
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(20)).success());
}

/// The stream holds a message that no replay of the slot produces, though
/// it looks like walnats' own (its headers and id agree; a message without
/// an id or with another slot's is refused at once, see tests/resume.rs):
/// walnats says so once when the replay reaches the end of the WAL, then
/// stops at the first replayed message that does not match.
#[tokio::test]
async fn a_replay_short_of_what_the_stream_holds_is_reported() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO t VALUES (1)").await;
    let changes = world.wait_changes(1, &w).await;
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(20)).success());

    // The next position of the same transaction, as walnats would write it.
    let last = &changes[0];
    let (_, seq) = last.position();
    let id = last.header("Nats-Msg-Id");
    let forged = format!("{}:{}", id.rsplit_once(':').unwrap().0, seq + 1);
    let js = world.js().await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", forged.as_str());
    headers.insert("Cdc-Op", "insert");
    headers.insert("Cdc-Commit-Lsn", last.header("Cdc-Commit-Lsn"));
    headers.insert("Cdc-Seq", (seq + 1).to_string().as_str());
    js.publish_with_headers(format!("{PREFIX}.public.t.insert"), headers, "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    wait_until(
        Duration::from_secs(60),
        "the replay-stalled warning",
        || {
            let out = w.output();
            async move { out.contains("seems to have reached the end of the WAL") }
        },
    )
    .await;
    world.sql("INSERT INTO t VALUES (2)").await;
    let status = w.wait_exit(Duration::from_secs(60));
    let out = w.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert_eq!(
        out.matches("seems to have reached the end of the WAL")
            .count(),
        1,
        "{out}"
    );
    assert!(out.contains(&forged), "{out}");
    assert!(out.contains("not published by walnats"), "{out}");
}
