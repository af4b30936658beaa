//! `examples/work_queue_import.rs`, the consumer pattern downstream teams
//! copy, run as a process against real servers: walnats streams a table,
//! the example applies it to another database.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt;

use crate::harness::{self, PgServer, PgVersion, process};
use crate::support::{PREFIX, STREAM, World, shared};

const TABLE: &str = "CREATE TABLE orders (id int PRIMARY KEY, status text NOT NULL,
    amount numeric(10,2), meta jsonb, tags text[], at timestamptz)";

/// The example binary, next to this test binary's folder (`cargo build
/// --examples`; scripts/test builds it).
fn example_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples/work_queue_import");
    assert!(
        bin.exists(),
        "{} is missing: run cargo build --examples",
        bin.display()
    );
    bin
}

struct Importer {
    child: Child,
    log: PathBuf,
}

impl Importer {
    fn spawn(world: &World<'_>, target_url: &str, max_deliver: u32, log: &Path) -> Importer {
        let mut cmd = Command::new(example_bin());
        cmd.args(["--nats-url", &world.nats.url(), "--stream", STREAM])
            .args(["--filter", &format!("{PREFIX}.public.orders.>")])
            .args(["--durable", "orders-import"])
            .args(["--max-deliver", &max_deliver.to_string()])
            .args(["--target-url", target_url])
            .args(["--target-table", "public.orders"])
            .stdin(Stdio::null())
            .stdout(process::append_log(log))
            .stderr(process::append_log(log));
        let child = process::spawn_tied(cmd).expect("cannot start the example");
        Importer {
            child,
            log: log.to_path_buf(),
        }
    }

    fn output(&self) -> String {
        process::tail(&self.log, 100)
    }
}

impl Drop for Importer {
    fn drop(&mut self) {
        process::signal(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

async fn rows(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query("SELECT to_jsonb(o)::text FROM orders o ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn wait_equal(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    imp: &Importer,
) {
    for _ in 0..600 {
        if rows(source).await == rows(target).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "target never matched the source:\nsource {:?}\ntarget {:?}\n{}",
        rows(source).await,
        rows(target).await,
        imp.output()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn work_queue_import_mirrors_a_table_skips_redeliveries_and_dead_letters_poison() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql(TABLE).await;
    let target_db = world.pg.create_database().await;
    world.pg.execute(&target_db, TABLE).await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;

    let log = harness::temp_dir("walnats-example-").join("import.log");
    let mut imp = Importer::spawn(&world, &world.pg.url(&target_db), 3, &log);
    world
        .sql(
            "INSERT INTO orders SELECT i, 'new', i * 1.5, jsonb_build_object('i', i),
               ARRAY['a', NULL, 'c'], '2026-11-22 18:31:10.123456+00'
             FROM generate_series(1, 200) i;
             UPDATE orders SET status = 'paid' WHERE id % 3 = 0;
             DELETE FROM orders WHERE id % 7 = 0;
             UPDATE orders SET id = id + 1000 WHERE id % 10 = 1;",
        )
        .await;
    // kill -9 mid-import: the unacked event comes back and is applied once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(imp);
    imp = Importer::spawn(&world, &world.pg.url(&target_db), 3, &log);
    world
        .sql(
            "TRUNCATE orders;
             INSERT INTO orders VALUES (1, 'after truncate', 2.00, '{\"k\": [1, 2]}', '{}', NULL),
                                       (2, 'x', NULL, 'null', NULL, '-infinity');
             BEGIN; UPDATE orders SET status = 'y' WHERE id = 2; DELETE FROM orders WHERE id = 1; COMMIT;",
        )
        .await;
    let source = world.client().await;
    let target = world.pg.client(&target_db).await;
    wait_equal(&source, &target, &imp).await;

    // A redelivery is a no-op: change the target behind the importer's back,
    // make JetStream deliver every event again (a new consumer), and the
    // stored position keeps the target as it is.
    target
        .execute("UPDATE orders SET status = 'changed in target'", &[])
        .await
        .unwrap();
    drop(imp);
    let js = world.js().await;
    let stream = js.get_stream(STREAM).await.unwrap();
    stream.delete_consumer("orders-import").await.unwrap();
    imp = Importer::spawn(&world, &world.pg.url(&target_db), 3, &log);
    harness::wait_until(Duration::from_secs(30), "the replay to finish", || async {
        let mut c = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("orders-import")
            .await;
        match c.as_mut() {
            Ok(c) => c.info().await.is_ok_and(|i| {
                i.num_pending == 0 && i.num_ack_pending == 0 && i.delivered.stream_sequence > 0
            }),
            Err(_) => false,
        }
    })
    .await;
    let statuses: Vec<String> = target
        .query("SELECT DISTINCT status FROM orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["changed in target"], "{}", imp.output());

    // Poison: walnats is the stream's only writer, so stop it first. A body
    // that is not JSON goes to the dead-letter subject at once; an event
    // the target cannot take (a column it lacks) after --max-deliver tries.
    w.sigterm();
    w.wait_exit(Duration::from_secs(30));
    let nats = async_nats::connect(world.nats.url()).await.unwrap();
    let mut dead = nats.subscribe("dlq.>").await.unwrap();
    nats.flush().await.unwrap();
    let subject = format!("{PREFIX}.public.orders.insert");
    js.publish(subject.clone(), "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("Cdc-Commit-Lsn", "FF/0");
    headers.insert("Cdc-Seq", "0");
    let body =
        r#"{"op":"insert","key":{"id":9},"before":null,"after":{"id":9,"status":"s","nope":1}}"#;
    js.publish_with_headers(subject.clone(), headers, body.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(30), dead.next())
            .await
            .unwrap_or_else(|_| panic!("no dead letter:\n{}", imp.output()))
            .unwrap();
        assert_eq!(m.subject.as_str(), format!("dlq.{subject}"));
        let reason = m.headers.as_ref().and_then(|h| h.get("Dlq-Reason"));
        reasons.push(reason.map(|v| v.as_str().to_owned()).unwrap_or_default());
    }
    assert!(reasons[0].contains("missing"), "{reasons:?}");
    assert!(reasons[1].contains("attempt 3 of 3"), "{reasons:?}");
    let nine = target
        .query_one("SELECT count(*) FROM orders WHERE id = 9", &[])
        .await
        .unwrap();
    assert_eq!(nine.get::<_, i64>(0), 0);
}

/// The target database going away is not the events' fault: the importer
/// reconnects and applies the event it holds within the same delivery, so
/// even with --max-deliver 1 nothing reaches the dead-letter subject.
#[tokio::test(flavor = "multi_thread")]
async fn work_queue_import_waits_out_a_target_outage_without_dead_letters() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql(TABLE).await;
    let target_pg = PgServer::start(PgVersion::V15);
    let target_db = target_pg.create_database().await;
    target_pg.execute(&target_db, TABLE).await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    let nats = async_nats::connect(world.nats.url()).await.unwrap();
    let mut dead = nats.subscribe("dlq.>").await.unwrap();
    nats.flush().await.unwrap();

    let log = harness::temp_dir("walnats-example-").join("import.log");
    let imp = Importer::spawn(&world, &target_pg.url(&target_db), 1, &log);
    let insert = |from: i32| {
        format!(
            "INSERT INTO orders SELECT i, 'new', i, NULL, NULL, now() FROM generate_series({from}, {}) i;
             UPDATE orders SET status = 'paid' WHERE id % 2 = 0",
            from + 99
        )
    };
    world.sql(&insert(1)).await;
    let source = world.client().await;
    wait_equal(&source, &target_pg.client(&target_db).await, &imp).await;

    target_pg.kill9();
    world.sql(&insert(101)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    target_pg.start_again();
    wait_equal(&source, &target_pg.client(&target_db).await, &imp).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), dead.next())
            .await
            .is_err(),
        "an event went to the dead-letter subject:\n{}",
        imp.output()
    );
    assert!(
        imp.output().contains("target database unreachable"),
        "{}",
        imp.output()
    );
    w.sigterm();
}
