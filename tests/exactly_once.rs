//! Contract guarantees 1 and 2 under faults: every committed change reaches
//! the stream exactly once and in order across kill -9 of walnats, restarts
//! of nats-server and PostgreSQL, restarts after the duplicate window, and
//! every retention policy; the slot never confirms past an unacknowledged
//! event.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use futures::StreamExt;
use tokio::sync::Mutex;

use crate::harness::{PgServer, PgVersion};
use crate::support::{Msg, PREFIX, Rng, STREAM, World, assert_exactly_once_in_order, shared};

/// Writes transactions of 1..=5 inserts plus one update into `table` until
/// `stop`, reconnecting when PostgreSQL goes away. The table itself is the
/// truth afterwards (a commit cut by a restart may or may not have landed).
fn start_load(
    url: String,
    table: &'static str,
    stop: Arc<AtomicBool>,
    txs: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut k: i64 = 1;
        while !stop.load(Ordering::Relaxed) {
            let client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    client
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            while !stop.load(Ordering::Relaxed) {
                k = k % 5 + 1;
                let sql = format!(
                    "BEGIN; INSERT INTO {table} (v) SELECT md5(g::text) FROM generate_series(1, {k}) g;
                     UPDATE {table} SET n = n + 1 WHERE id = (SELECT max(id) FROM {table}); COMMIT;"
                );
                if client.batch_execute(&sql).await.is_err() {
                    break;
                }
                txs.fetch_add(1, Ordering::Relaxed);
                // Enough load to interleave with every fault, not so much
                // that the shared server's other walsenders fall behind.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    })
}

/// The stream's inserts of `table` are exactly the table's rows, in id
/// order (one writer per table, so commit order is id order), and its
/// updates are exactly the sum of the table's `n`.
async fn assert_stream_equals_table(world: &World<'_>, msgs: &[Msg], table: &str) {
    let client = world.client().await;
    let ids: Vec<i64> = client
        .query(&format!("SELECT id FROM {table} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let updates: i64 = client
        .query_one(
            &format!("SELECT coalesce(sum(n), 0)::int8 FROM {table}"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let ins_subject = format!("{PREFIX}.public.{table}.insert");
    let upd_subject = format!("{PREFIX}.public.{table}.update");
    let streamed: Vec<i64> = msgs
        .iter()
        .filter(|m| m.subject == ins_subject)
        .map(|m| m.json()["after"]["id"].as_i64().unwrap())
        .collect();
    let streamed_updates = msgs.iter().filter(|m| m.subject == upd_subject).count() as i64;
    assert_eq!(
        streamed.len(),
        ids.len(),
        "{table}: {} inserts streamed, {} rows in the table",
        streamed.len(),
        ids.len()
    );
    assert_eq!(
        streamed, ids,
        "{table}: streamed inserts differ from the table's rows"
    );
    assert_eq!(
        streamed_updates, updates,
        "{table}: {streamed_updates} updates streamed, {updates} made"
    );
}

async fn create_load_tables(world: &World<'_>) {
    world
        .sql(
            "CREATE TABLE load_a (id bigserial PRIMARY KEY, v text, n int NOT NULL DEFAULT 0);
             CREATE TABLE load_b (id bigserial PRIMARY KEY, v text, n int NOT NULL DEFAULT 0);",
        )
        .await;
}

/// Waits until the stream has as many inserts of both tables as the
/// tables have rows, then returns what a consumer reads.
async fn settle(world: &World<'_>, w: &crate::harness::WalnatsProc) -> Vec<Msg> {
    let client = world.client().await;
    let want: i64 = client
        .query_one("SELECT (SELECT count(*) FROM load_a) + (SELECT count(*) FROM load_b) + (SELECT coalesce(sum(n),0) FROM load_a) + (SELECT coalesce(sum(n),0) FROM load_b)", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    world.wait_changes(want as usize, w).await;
    // A little longer: a duplicate would arrive now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    world.read_stream().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_and_duplicates_nothing() {
    kill_9_under_load(false, "on").await;
}

/// The same with `_tx` markers, which must replay as deterministically as
/// the changes they frame, and with one acknowledgement per message (the
/// first test publishes in fast-ingest batches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_with_tx_markers_loses_and_duplicates_nothing() {
    kill_9_under_load(true, "off").await;
}

async fn kill_9_under_load(tx_markers: bool, fast_ingest: &str) {
    let world = World::new(shared(PgVersion::V15)).await;
    create_load_tables(&world).await;
    let mut rng = Rng::from_env();
    let markers = if tx_markers { "true" } else { "false" };
    let spawn = || {
        world.spawn_with(
            &world.config(),
            &[
                ("WALNATS_OUTPUT_TX_MARKERS", markers),
                ("WALNATS_NATS_FAST_INGEST", fast_ingest),
            ],
        )
    };
    let mut w = spawn();
    world.wait_streaming(&mut w).await;
    let stop = Arc::new(AtomicBool::new(false));
    let txs = Arc::new(AtomicU64::new(0));
    let la = start_load(
        world.pg_url(),
        "load_a",
        Arc::clone(&stop),
        Arc::clone(&txs),
    );
    let lb = start_load(
        world.pg_url(),
        "load_b",
        Arc::clone(&stop),
        Arc::clone(&txs),
    );
    for round in 0..8 {
        // Sometimes right after start (during setup/resume), sometimes
        // mid-stream.
        let wait = if round % 3 == 0 {
            rng.range(0, 300)
        } else {
            rng.range(300, 2000)
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        w.kill9();
        w = spawn();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    la.await.unwrap();
    lb.await.unwrap();
    assert!(
        txs.load(Ordering::Relaxed) > 50,
        "the load wrote too little to prove anything"
    );
    let msgs = settle(&world, &w).await;
    assert_exactly_once_in_order(&msgs);
    assert_eq!(msgs.iter().any(|m| m.subject.ends_with("._tx")), tx_markers);
    assert_stream_equals_table(&world, &msgs, "load_a").await;
    assert_stream_equals_table(&world, &msgs, "load_b").await;
    w.sigterm();
}

/// Past the duplicate window JetStream forgets message ids, so only
/// walnats' own resume logic can prevent a duplicate; with work-queue and
/// interest retention the stream's last message is gone too.
async fn restart_after_duplicate_window(retention: stream::RetentionPolicy) {
    let world = World::new(shared(PgVersion::V15)).await;
    create_load_tables(&world).await;
    let js = world.js().await;
    js.create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec![format!("{PREFIX}.>")],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(1),
        retention,
        ..Default::default()
    })
    .await
    .unwrap();
    // With work-queue/interest retention a consumer deletes what it acks:
    // collect everything it receives.
    let received: Arc<Mutex<Vec<Msg>>> = Arc::new(Mutex::new(Vec::new()));
    let consuming = retention != stream::RetentionPolicy::Limits;
    let reader = if consuming {
        let s = js.get_stream(STREAM).await.unwrap();
        let c = s
            .create_consumer(consumer::pull::Config {
                durable_name: Some("reader".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .unwrap();
        let received = Arc::clone(&received);
        Some(tokio::spawn(async move {
            let mut msgs = c.messages().await.unwrap();
            while let Some(Ok(m)) = msgs.next().await {
                let seq = m.info().unwrap().stream_sequence;
                let mut h = std::collections::BTreeMap::new();
                if let Some(hs) = m.headers.as_ref() {
                    for (k, vs) in hs.iter() {
                        let name: &str = k.as_ref();
                        h.insert(name.to_owned(), vs[0].as_str().to_owned());
                    }
                }
                received.lock().await.push(Msg {
                    seq,
                    subject: m.subject.to_string(),
                    headers: h,
                    payload: m.payload.to_vec(),
                });
                m.ack().await.unwrap();
            }
        }))
    } else {
        None
    };

    let stop = Arc::new(AtomicBool::new(false));
    let txs = Arc::new(AtomicU64::new(0));
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    let la = start_load(
        world.pg_url(),
        "load_a",
        Arc::clone(&stop),
        Arc::clone(&txs),
    );
    let mut rng = Rng::from_env();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(rng.range(300, 1200))).await;
        w.kill9();
        // Longer than the duplicate window.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        w = world.spawn();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    la.await.unwrap();

    let client = world.client().await;
    let want: i64 = client
        .query_one("SELECT count(*) + coalesce(sum(n), 0) FROM load_a", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    let msgs = if consuming {
        for _ in 0..600 {
            let n = received
                .lock()
                .await
                .iter()
                .filter(|m| m.is_change())
                .count() as i64;
            if n >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if let Some(r) = reader {
            r.abort();
        }
        let mut v = received.lock().await.clone();
        v.sort_by_key(|m| m.seq);
        v
    } else {
        world.wait_changes(want as usize, &w).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        world.read_stream().await
    };
    assert_exactly_once_in_order(&msgs);
    assert_stream_equals_table(&world, &msgs, "load_a").await;
    w.sigterm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_duplicate_window_publishes_no_duplicate_limits() {
    restart_after_duplicate_window(stream::RetentionPolicy::Limits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_duplicate_window_publishes_no_duplicate_work_queue() {
    restart_after_duplicate_window(stream::RetentionPolicy::WorkQueue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_duplicate_window_publishes_no_duplicate_interest() {
    restart_after_duplicate_window(stream::RetentionPolicy::Interest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restart_mid_stream_loses_and_duplicates_nothing() {
    nats_server_restart_mid_stream("on").await;
}

/// The same publishing one by one (`nats.fast_ingest = "off"`, as on
/// servers before 2.14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restart_mid_stream_one_ack_per_message_loses_and_duplicates_nothing() {
    nats_server_restart_mid_stream("off").await;
}

async fn nats_server_restart_mid_stream(fast_ingest: &str) {
    let world = World::new(shared(PgVersion::V15)).await;
    create_load_tables(&world).await;
    let mut w = world.spawn_with(
        &world.config(),
        &[("WALNATS_NATS_FAST_INGEST", fast_ingest)],
    );
    world.wait_streaming(&mut w).await;
    let stop = Arc::new(AtomicBool::new(false));
    let txs = Arc::new(AtomicU64::new(0));
    let la = start_load(
        world.pg_url(),
        "load_a",
        Arc::clone(&stop),
        Arc::clone(&txs),
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    world.nats.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    world.nats.start_again().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    world.nats.stop();
    world.nats.start_again().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    la.await.unwrap();
    let msgs = settle(&world, &w).await;
    assert!(
        w.is_running(),
        "walnats gave up instead of resuming:\n{}",
        w.output()
    );
    assert_exactly_once_in_order(&msgs);
    assert_stream_equals_table(&world, &msgs, "load_a").await;
    w.sigterm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream_loses_and_duplicates_nothing() {
    let pg = PgServer::start(PgVersion::V15);
    let world = World::new(&pg).await;
    create_load_tables(&world).await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    let stop = Arc::new(AtomicBool::new(false));
    let txs = Arc::new(AtomicU64::new(0));
    let la = start_load(
        world.pg_url(),
        "load_a",
        Arc::clone(&stop),
        Arc::clone(&txs),
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    pg.stop_immediate();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    pg.start_again();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.kill9();
    pg.start_again();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.stop_fast();
    pg.start_again();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    la.await.unwrap();
    let msgs = settle(&world, &w).await;
    assert!(
        w.is_running(),
        "walnats gave up instead of resuming:\n{}",
        w.output()
    );
    assert_exactly_once_in_order(&msgs);
    assert_stream_equals_table(&world, &msgs, "load_a").await;
    w.sigterm();
}

/// Guarantee 2: while JetStream acknowledges nothing, the slot's
/// confirmed_flush_lsn stays behind every unpublished transaction; when
/// NATS returns it moves past them.
#[tokio::test]
async fn slot_never_confirms_past_unacknowledged_events() {
    let world = World::new(shared(PgVersion::V15)).await;
    create_load_tables(&world).await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO load_a (v) VALUES ('before')").await;
    world.wait_changes(1, &w).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    world.nats.kill9();
    let client = world.client().await;
    let before: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    for i in 0..20 {
        world
            .sql(&format!("INSERT INTO load_a (v) VALUES ('during {i}')"))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let confirmed = world.confirmed_flush().await.unwrap();
    assert!(
        crate::support::lsn(&confirmed) <= crate::support::lsn(&before),
        "slot confirmed {confirmed} past {before} while NATS was down"
    );
    world.nats.start_again().await;
    let msgs = world.wait_changes(21, &w).await;
    assert_exactly_once_in_order(&msgs);
    let after: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let mut moved = false;
    for _ in 0..100 {
        let c = world.confirmed_flush().await.unwrap();
        if crate::support::lsn(&c) > crate::support::lsn(&before) {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        moved,
        "slot did not move past {before} (now {after}) after NATS returned:\n{}",
        w.output()
    );
    w.sigterm();
}

/// Guarantee 5: a second walnats on the same slot stands by while the first
/// streams, and takes over within seconds when the first dies; the stream
/// still holds every change exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_walnats_dies() {
    let world = World::new(shared(PgVersion::V15)).await;
    create_load_tables(&world).await;
    let mut first = world.spawn();
    world.wait_streaming(&mut first).await;
    let mut second = world.spawn();
    let stop = Arc::new(AtomicBool::new(false));
    let txs = Arc::new(AtomicU64::new(0));
    let la = start_load(
        world.pg_url(),
        "load_a",
        Arc::clone(&stop),
        Arc::clone(&txs),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        second.is_running(),
        "the standby exited:\n{}",
        second.output()
    );
    assert!(
        second.output().contains("standing by"),
        "no standby:\n{}",
        second.output()
    );
    let pid_before = slot_pid(&world).await;
    first.kill9();
    let mut took_over = false;
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let pid = slot_pid(&world).await;
        if pid.is_some() && pid != pid_before {
            took_over = true;
            break;
        }
    }
    assert!(
        took_over,
        "the standby did not take over within 15 s:\n{}",
        second.output()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    la.await.unwrap();
    let msgs = settle(&world, &second).await;
    assert_exactly_once_in_order(&msgs);
    assert_stream_equals_table(&world, &msgs, "load_a").await;
    second.sigterm();
}

async fn slot_pid(world: &World<'_>) -> Option<i32> {
    let c = world.client().await;
    c.query_one(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
        &[&world.slot()],
    )
    .await
    .unwrap()
    .get(0)
}

/// An idle slot must not pin WAL: with nothing in flight, walnats confirms
/// the keepalive position (after a checkpoint), so the slot follows WAL
/// written by other databases.
#[tokio::test]
async fn an_idle_slot_follows_the_server_wal_position() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql("CREATE TABLE quiet (id int PRIMARY KEY)").await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    let other = world.pg.create_database().await;
    world.pg.execute(&other, "CREATE TABLE busy (v text); INSERT INTO busy SELECT md5(g::text) FROM generate_series(1, 2000) g").await;
    let client = world.client().await;
    let target: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let mut moved = false;
    // Generous: on a loaded machine the walsender may take a while to
    // decode the other database's WAL before its keepalive reaches it.
    for _ in 0..900 {
        let c = world.confirmed_flush().await.unwrap();
        if crate::support::lsn(&c) >= crate::support::lsn(&target) {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        moved,
        "the idle slot stayed behind {target}:\n{}",
        w.output()
    );
    w.sigterm();
}
