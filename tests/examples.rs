//! The examples downstream teams copy, run as processes against real
//! servers: `work_queue_import.rs` (walnats streams a table, the example
//! applies it to another database) and `outbox.rs` (a service writes
//! orders with their events, a consumer handles each event once).

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

/// An example binary, next to this test binary's folder (`cargo build
/// --examples`; scripts/test builds it).
fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: run cargo build --examples",
        bin.display()
    );
    bin
}

/// An example running as a process, its output appended to `log`; killed
/// on drop.
struct Example {
    child: Child,
    log: PathBuf,
}

impl Example {
    fn spawn(name: &str, args: &[&str], log: &Path) -> Example {
        let mut cmd = Command::new(example_bin(name));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(process::append_log(log))
            .stderr(process::append_log(log));
        let child = process::spawn_tied(cmd).expect("cannot start the example");
        Example {
            child,
            log: log.to_path_buf(),
        }
    }

    fn output(&self) -> String {
        process::tail(&self.log, 100)
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        process::signal(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// work_queue_import of `public.orders` into the table of `target_url`.
fn importer(world: &World<'_>, target_url: &str, max_deliver: u32, log: &Path) -> Example {
    let nats = world.nats.url();
    let filter = format!("{PREFIX}.public.orders.>");
    let max_deliver = max_deliver.to_string();
    Example::spawn(
        "work_queue_import",
        &[
            "--nats-url",
            &nats,
            "--stream",
            STREAM,
            "--filter",
            &filter,
            "--durable",
            "orders-import",
            "--max-deliver",
            &max_deliver,
            "--target-url",
            target_url,
            "--target-table",
            "public.orders",
        ],
        log,
    )
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
    imp: &Example,
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
    let mut imp = importer(&world, &world.pg.url(&target_db), 3, &log);
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
    imp = importer(&world, &world.pg.url(&target_db), 3, &log);
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
    imp = importer(&world, &world.pg.url(&target_db), 3, &log);
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
    let imp = importer(&world, &target_pg.url(&target_db), 1, &log);
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

/// `outbox service`, run to its end; what it printed.
fn outbox_service(world: &World<'_>, orders: u32) -> String {
    let out = Command::new(example_bin("outbox"))
        .args(["service", "--database-url", &world.pg_url()])
        .args(["--orders", &orders.to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let placed = String::from_utf8_lossy(&out.stdout).into_owned();
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "outbox service failed:\n{placed}{errors}"
    );
    placed
}

/// `examples/outbox.rs`: the service's orders reach the consumer as
/// `OrderCreated` events through walnats' `[[outbox]]`, each handled once;
/// an event seen again (same `Cdc-Event-Id`) is skipped and acked.
#[tokio::test(flavor = "multi_thread")]
async fn outbox_example_handles_each_order_event_once_and_skips_a_repeat() {
    let world = World::new(shared(PgVersion::V15)).await;
    // The service makes its tables; walnats checks the outbox's at start.
    outbox_service(&world, 0);
    let config = crate::support::with_outbox(
        &world.config(),
        &["table = \"public.outbox\"\nheaders = [\"type\"]"],
    );
    let mut w = world.spawn_with(&config, &[]);
    world.wait_streaming(&mut w).await;
    let log = harness::temp_dir("walnats-example-").join("outbox.log");
    let subject = format!("{PREFIX}._outbox.order");
    let nats = world.nats.url();
    let args = [
        "consume",
        "--nats-url",
        &nats,
        "--stream",
        STREAM,
        "--subject",
        &subject,
        "--durable",
        "order-events",
        "--remember",
        "3",
    ];
    let consumer = Example::spawn("outbox", &args, &log);
    let placed = outbox_service(&world, 5);
    let handled = |out: &str| out.matches("handled OrderCreated").count();
    harness::wait_until(Duration::from_secs(60), "5 handled events", || async {
        handled(&consumer.output()) >= 5
    })
    .await;
    let out = consumer.output();
    assert_eq!(handled(&out), 5, "{out}");
    // Each event the service placed, handled once, with its order's data.
    for line in placed.lines().filter(|l| l.starts_with("placed order")) {
        let (order, event) = line
            .trim_start_matches("placed order ")
            .split_once(": event ")
            .unwrap();
        let want = format!("handled OrderCreated {event}: order {order} for ada totalling ");
        assert_eq!(out.matches(&want).count(), 1, "{want:?} in:\n{out}");
    }

    // walnats is the stream's only writer: stop it, then publish the last
    // event again as a new message (another Nats-Msg-Id).
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(20)).success());
    let last = world
        .read_stream()
        .await
        .into_iter()
        .rfind(|m| m.subject == subject)
        .unwrap();
    let mut headers = HeaderMap::new();
    for (k, v) in &last.headers {
        if k != "Nats-Msg-Id" {
            headers.insert(k.as_str(), v.as_str());
        }
    }
    let js = world.js().await;
    js.publish_with_headers(subject.clone(), headers, last.payload.clone().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let skipped = format!("skipped duplicate {}", last.header("Cdc-Event-Id"));
    harness::wait_until(Duration::from_secs(30), "the repeat skipped", || async {
        consumer.output().contains(&skipped)
    })
    .await;
    assert_eq!(handled(&consumer.output()), 5, "{}", consumer.output());
    // Everything acked.
    let stream = js.get_stream(STREAM).await.unwrap();
    harness::wait_until(Duration::from_secs(10), "no pending acks", || async {
        let mut c = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("order-events")
            .await
            .unwrap();
        c.info()
            .await
            .is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
    })
    .await;
}
