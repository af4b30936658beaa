//! The initial snapshot: rows that existed before the slot arrive as `read`
//! events ahead of the stream, and a consumer that applies the stream in
//! order ends with exactly the tables' rows, also when walnats is killed
//! with -9 during the snapshot and during streaming, under concurrent
//! writes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use futures::StreamExt;
use serde_json::Value;

use crate::harness::{PgVersion, WalnatsProc};
use crate::support::{Rng, STREAM, World, lsn, shared};

/// Table → row key (JSON text) → row (JSON text with sorted keys).
pub(crate) type Model = BTreeMap<String, BTreeMap<String, String>>;

fn project(row: &serde_json::Map<String, Value>, names: &[String]) -> String {
    let m: BTreeMap<&str, &Value> = names
        .iter()
        .filter_map(|n| row.get(n).map(|v| (n.as_str(), v)))
        .collect();
    serde_json::to_string(&m).unwrap()
}

/// What a consumer that applies every event in stream order ends with;
/// checks ids are unique and positions increase on the way. Returns the
/// model and the number of reads.
pub(crate) async fn rebuild(
    world: &World<'_>,
    initial: bool,
    trace: Option<String>,
) -> (Model, u64, Vec<String>) {
    let js = world.js().await;
    let mut s = js.get_stream(STREAM).await.unwrap();
    let last = s.info().await.unwrap().state.last_sequence;
    let consumer = s
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut model: Model = BTreeMap::new();
    let mut ids: HashSet<String> = HashSet::new();
    let mut prev: (u64, u32) = (0, 0);
    let mut reads = 0u64;
    // No row is read twice (a chunk that landed is never read again).
    let mut read_keys: HashSet<(String, String)> = HashSet::new();
    let mut subjects_seen = Vec::new();
    let mut read_phase_over = false;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(20), messages.next()).await {
        let m = m.unwrap();
        let seq = m.info().unwrap().stream_sequence;
        let h = m.headers.as_ref().unwrap();
        let get = |n: &str| h.get(n).map(|v| v.as_str().to_owned()).unwrap_or_default();
        let id = get("Nats-Msg-Id");
        assert!(
            ids.insert(id.clone()),
            "duplicate message {id} at seq {seq}"
        );
        let subject = m.subject.to_string();
        if !subject.contains("._schema.") && !subject.ends_with("._tx") {
            let pos = (lsn(&get("Cdc-Commit-Lsn")), get("Cdc-Seq").parse().unwrap());
            assert!(pos > prev, "out of order: {id} at seq {seq} after {prev:?}");
            prev = pos;
            let body: Value = serde_json::from_slice(&m.payload).unwrap();
            let op = body["op"].as_str().unwrap().to_owned();
            if op == "read" {
                assert!(
                    !(initial && read_phase_over),
                    "read {id} after a streamed change"
                );
                assert_eq!(body["source"]["snapshot"], Value::Bool(true));
                reads += 1;
            } else {
                read_phase_over = true;
            }
            let table = format!(
                "{}.{}",
                body["schema"].as_str().unwrap(),
                body["table"].as_str().unwrap()
            );
            if subjects_seen.len() < 64 && !subjects_seen.contains(&subject) {
                subjects_seen.push(subject.clone());
            }
            if trace.as_deref() == Some(body["key"].to_string().as_str()) {
                eprintln!(
                    "trace {}: seq {seq} {id} {op} after {} (Cdc-Lsn {})",
                    body["key"],
                    body["after"],
                    get("Cdc-Lsn")
                );
            }
            let table_name = table.clone();
            let t = model.entry(table).or_default();
            // Key column names: from `key`, or every column of a table
            // without one (REPLICA IDENTITY FULL there).
            let key_names = |row: &serde_json::Map<String, Value>| -> Vec<String> {
                match body["key"].as_object() {
                    Some(k) => k.keys().cloned().collect(),
                    None => row.keys().cloned().collect(),
                }
            };
            match op.as_str() {
                "read" | "insert" | "update" => {
                    let after = body["after"].as_object().unwrap();
                    let names = key_names(after);
                    if op == "read" {
                        let k = (table_name.clone(), project(after, &names));
                        assert!(read_keys.insert(k.clone()), "{k:?} read twice ({id})");
                    }
                    if let Some(before) = body["before"].as_object() {
                        t.remove(&project(before, &names));
                    }
                    let k = project(after, &names);
                    let mut row: BTreeMap<String, Value> = t
                        .get(&k)
                        .map(|s| serde_json::from_str(s).unwrap())
                        .unwrap_or_default();
                    for (c, v) in after {
                        row.insert(c.clone(), v.clone());
                    }
                    t.insert(k, serde_json::to_string(&row).unwrap());
                }
                "delete" => {
                    let before = body["before"].as_object().unwrap();
                    let names = key_names(before);
                    // After a resumed snapshot a row deleted meanwhile was
                    // never read: its delete removes nothing.
                    t.remove(&project(before, &names));
                }
                "truncate" => t.clear(),
                other => panic!("unexpected op {other}"),
            }
        }
        if seq >= last {
            break;
        }
    }
    (model, reads, subjects_seen)
}

/// `SELECT *` of each table, keyed like the model.
pub(crate) async fn truth(world: &World<'_>, tables: &[(&str, &[&str])]) -> Model {
    let client = world.client().await;
    let mut out = BTreeMap::new();
    for (table, key) in tables {
        let rows = client
            .query(&format!("SELECT row_to_json(t)::text FROM {table} t"), &[])
            .await
            .unwrap();
        let mut m = BTreeMap::new();
        for r in rows {
            let v: Value = serde_json::from_str(&r.get::<_, String>(0)).unwrap();
            let obj = v.as_object().unwrap();
            let names: Vec<String> = if key.is_empty() {
                obj.keys().cloned().collect()
            } else {
                key.iter().map(|s| (*s).to_owned()).collect()
            };
            let sorted: BTreeMap<&String, &Value> = obj.iter().collect();
            m.insert(
                project(obj, &names),
                serde_json::to_string(&sorted).unwrap(),
            );
        }
        out.insert(format!("public.{}", table.replace('"', "")), m);
    }
    out
}

/// Random updates, inserts and deletes on `table` (id bigint identity
/// primary key, n int, v text) until `stop`.
fn start_churn(
    url: String,
    table: &'static str,
    max_id: i64,
    stop: Arc<AtomicBool>,
    txs: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut rng = Rng::from_env();
        while !stop.load(Ordering::Relaxed) {
            let a = rng.range(1, max_id as u64);
            let b = rng.range(1, max_id as u64);
            let sql = format!(
                "BEGIN; UPDATE {table} SET n = n + 1, v = md5(random()::text) WHERE id = {a};
                 DELETE FROM {table} WHERE id = {b};
                 INSERT INTO {table} (n, v) VALUES ({a}, 'new'); COMMIT;"
            );
            if client.batch_execute(&sql).await.is_err() {
                break;
            }
            txs.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    })
}

/// `start_churn` on `big`, with its stop flag and transaction count.
fn churn_big(
    world: &World<'_>,
    max_id: i64,
) -> (Arc<AtomicBool>, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let txs = Arc::new(AtomicU64::new(0));
    let churn = start_churn(
        world.pg_url(),
        "big",
        max_id,
        Arc::clone(&stop),
        Arc::clone(&txs),
    );
    (stop, txs, churn)
}

fn log_count(world: &World<'_>, needle: &str) -> usize {
    let log = std::fs::read_to_string(&world.log).unwrap_or_default();
    log.matches(needle).count()
}

fn snapshot_done(world: &World<'_>) -> bool {
    log_count(world, "snapshot complete") > 0
}

/// Waits (up to 3 minutes) until walnats' log holds `needle` `n` times;
/// fails at once, with the log, if `w` exits.
pub(crate) async fn wait_log(world: &World<'_>, w: &mut WalnatsProc, needle: &str, n: usize) {
    for _ in 0..1800 {
        if log_count(world, needle) >= n {
            return;
        }
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{needle:?} never appeared {n} time(s):\n{}", w.output());
}

/// Waits until the stream holds the fence row's insert: everything
/// committed before it is in the stream then.
pub(crate) async fn wait_fence(world: &World<'_>, w: &mut WalnatsProc, n: i32) {
    world.sql(&format!("INSERT INTO fence VALUES ({n})")).await;
    let js = world.js().await;
    for _ in 0..1800 {
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        let mut s = js.get_stream(STREAM).await.unwrap();
        let info = s.info().await.unwrap().clone();
        if info.state.last_sequence > 0
            && let Ok(m) = s
                .get_last_raw_message_by_subject("cdc.test.public.fence.insert")
                .await
        {
            let body: Value = serde_json::from_slice(&m.payload).unwrap();
            if body["after"]["n"] == n {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the fence row never arrived:\n{}", w.output());
}

async fn create_tables(world: &World<'_>, big_rows: i64) {
    world
        .sql(&format!(
            "CREATE TABLE big (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n int NOT NULL, v text);
             INSERT INTO big (id, n, v) SELECT g, 0, md5(g::text) FROM generate_series(1, {big_rows}) g;
             SELECT setval(pg_get_serial_sequence('big', 'id'), {big_rows});
             CREATE TABLE \"odd.name\" (a text, b int, PRIMARY KEY (a, b), note text);
             INSERT INTO \"odd.name\" SELECT 'k' || (g % 7), g, repeat('x', g % 50) FROM generate_series(1, 3000) g;
             CREATE TABLE nopk (x int, y text);
             ALTER TABLE nopk REPLICA IDENTITY FULL;
             INSERT INTO nopk SELECT g % 100, 'row ' || g FROM generate_series(1, 5000) g;
             CREATE TABLE fence (n int PRIMARY KEY);
             ANALYZE;"
        ))
        .await;
}

const TABLES: &[(&str, &[&str])] = &[
    ("big", &["id"]),
    ("\"odd.name\"", &["a", "b"]),
    ("nopk", &[]),
    ("fence", &["n"]),
];

fn config(world: &World<'_>) -> String {
    world
        .config()
        .replace("mode = \"never\"", "mode = \"initial\"")
}

async fn assert_rebuild_equals_tables(world: &World<'_>, min_reads: u64) {
    let (model, reads, subjects) = rebuild(world, true, None).await;
    assert!(reads >= min_reads, "only {reads} reads");
    assert!(
        subjects
            .iter()
            .any(|s| s == "cdc.test.public.odd%2Ename.read"),
        "no read of the odd table: {subjects:?}"
    );
    assert_model_equals(&model, &truth(world, TABLES).await);
}

pub(crate) fn assert_model_equals(model: &Model, want: &Model) {
    for (table, rows) in want {
        let got = model.get(table).cloned().unwrap_or_default();
        if &got != rows {
            let missing: Vec<_> = rows
                .keys()
                .filter(|k| !got.contains_key(*k))
                .take(5)
                .collect();
            let extra: Vec<_> = got
                .keys()
                .filter(|k| !rows.contains_key(*k))
                .take(5)
                .collect();
            let differ: Vec<_> = rows
                .iter()
                .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
                .take(3)
                .collect();
            panic!(
                "{table}: rebuilt {} rows, table has {}; missing {missing:?}, extra {extra:?}, differ {differ:?}",
                got.len(),
                rows.len()
            );
        }
    }
}

/// Several tables, one of a million rows, under concurrent writes; walnats
/// killed with -9 twice during the snapshot and twice while streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_snapshot_survives_kill_9_and_rebuilds_every_table_at_parallelism_1() {
    initial_snapshot_survives_kill_9_and_rebuilds_every_table_with("1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_snapshot_survives_kill_9_and_rebuilds_every_table_at_parallelism_4() {
    initial_snapshot_survives_kill_9_and_rebuilds_every_table_with("4").await;
}

async fn initial_snapshot_survives_kill_9_and_rebuilds_every_table_with(parallelism: &str) {
    let env = [("WALNATS_SNAPSHOT_PARALLELISM", parallelism)];
    let world = World::new(shared(PgVersion::V15)).await;
    const BIG: i64 = 1_000_000;
    create_tables(&world, BIG).await;
    let mut rng = Rng::from_env();
    let cfg = config(&world);
    let mut w = world.spawn_with(&cfg, &env);
    let (stop, txs, churn) = churn_big(&world, BIG);
    // Kill during the snapshot: wait for some progress each time.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(rng.range(1500, 4000))).await;
        assert!(
            !snapshot_done(&world),
            "the snapshot finished before the kill; make the table bigger"
        );
        w.kill9();
        w = world.spawn_with(&cfg, &env);
    }
    wait_log(&world, &mut w, "snapshot complete", 1).await;
    assert!(
        snapshot_done(&world),
        "snapshot never completed:\n{}",
        w.output()
    );
    // Kill while streaming.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(rng.range(300, 1500))).await;
        w.kill9();
        w = world.spawn_with(&cfg, &env);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    churn.await.unwrap();
    assert!(
        txs.load(Ordering::Relaxed) > 50,
        "the load wrote too little"
    );
    wait_fence(&world, &mut w, 1).await;
    assert_rebuild_equals_tables(&world, BIG as u64).await;
    let log = std::fs::read_to_string(&world.log).unwrap_or_default();
    assert!(log.contains("snapshot progress") || log.contains("snapshot of table complete"));
    w.sigterm();
}

/// PostgreSQL 18 (pgoutput v4): the snapshot under concurrent writes, no
/// faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_snapshot_on_postgres_18_rebuilds_every_table_at_parallelism_1() {
    initial_snapshot_on_postgres_18_rebuilds_every_table_with("1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_snapshot_on_postgres_18_rebuilds_every_table_at_parallelism_4() {
    initial_snapshot_on_postgres_18_rebuilds_every_table_with("4").await;
}

async fn initial_snapshot_on_postgres_18_rebuilds_every_table_with(parallelism: &str) {
    let env = [("WALNATS_SNAPSHOT_PARALLELISM", parallelism)];
    let world = World::new(shared(PgVersion::V18)).await;
    const BIG: i64 = 30_000;
    create_tables(&world, BIG).await;
    let (stop, txs, churn) = churn_big(&world, BIG);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut w = world.spawn_with(&config(&world), &env);
    world.wait_streaming(&mut w).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    churn.await.unwrap();
    assert!(
        txs.load(Ordering::Relaxed) > 20,
        "the load wrote too little"
    );
    wait_fence(&world, &mut w, 1).await;
    assert_rebuild_equals_tables(&world, 30_000).await;
    w.sigterm();
}

/// `walnats snapshot` while pgbench writes: the tables existed before the
/// slot (`snapshot.mode = "never"`), so only the re-read brings their rows;
/// with the stream's changes, a consumer ends with exactly the tables.
/// Publishing one by one (`nats.fast_ingest = "off"`, as on servers before
/// 2.14); the kill -9 re-read test below publishes in fast batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_snapshot_under_pgbench_rebuilds_the_tables_at_parallelism_1() {
    on_demand_snapshot_under_pgbench_rebuilds_the_tables_with("1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_snapshot_under_pgbench_rebuilds_the_tables_at_parallelism_4() {
    on_demand_snapshot_under_pgbench_rebuilds_the_tables_with("4").await;
}

async fn on_demand_snapshot_under_pgbench_rebuilds_the_tables_with(parallelism: &str) {
    let env = [("WALNATS_SNAPSHOT_PARALLELISM", parallelism)];
    let world = World::new(shared(PgVersion::V15)).await;
    let url = world.pg.url(&world.db);
    let pgbench = world.pg.bin("pgbench");
    let init = std::process::Command::new(&pgbench)
        .args(["-i", "-s", "1", "-q", &url])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    world.sql("CREATE TABLE fence (n int PRIMARY KEY)").await;
    let cfg = world.config();
    let mut w = world.spawn_with(&cfg, &[("WALNATS_NATS_FAST_INGEST", "off"), env[0]]);
    world.wait_streaming(&mut w).await;
    let out = w.output();
    assert!(
        out.contains("publishing with one acknowledgement per message"),
        "{out}"
    );
    let mut bench = std::process::Command::new(&pgbench)
        .args(["-c", "4", "-T", "12", "-n", &url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A table without a primary key is refused, with the reason.
    let (code, _, err) = crate::cli::run(&["snapshot", "public.pgbench_history"], &cfg, &[]);
    assert_ne!(code, 0);
    assert!(err.contains("no primary key"), "{err}");
    let (code, out, err) = crate::cli::run(
        &[
            "snapshot",
            "pgbench_accounts",
            "public.pgbench_branches",
            "public.pgbench_tellers",
        ],
        &cfg,
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("requested a snapshot"), "{out}");
    // The re-read finishes while pgbench still writes.
    wait_log(&world, &mut w, "snapshot of table complete", 3).await;
    let log = std::fs::read_to_string(&world.log).unwrap_or_default();
    assert_eq!(
        log.matches("snapshot of table complete").count(),
        3,
        "{}",
        w.output()
    );
    let status = bench.wait().unwrap();
    let mut err = String::new();
    use std::io::Read;
    bench
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "pgbench: {err}");
    wait_fence(&world, &mut w, 1).await;
    let log = std::fs::read_to_string(&world.log).unwrap_or_default();
    assert!(!log.contains("session ended"), "a session failed:\n{log}");
    let (model, reads, _) = rebuild(&world, false, None).await;
    assert!(reads >= 90_000, "only {reads} reads");
    let want = truth(
        &world,
        &[
            ("pgbench_accounts", &["aid"]),
            ("pgbench_branches", &["bid"]),
            ("pgbench_tellers", &["tid"]),
        ],
    )
    .await;
    let got: Model = model
        .into_iter()
        .filter(|(t, _)| want.contains_key(t))
        .collect();
    for (table, rows) in &want {
        let g = got.get(table).cloned().unwrap_or_default();
        if let Some((k, v)) = rows.iter().find(|(k, v)| g.get(*k) != Some(*v)) {
            eprintln!("{table} {k}: table {v}, rebuilt {:?}", g.get(k));
            let log = std::fs::read_to_string(&world.log).unwrap_or_default();
            for l in log
                .lines()
                .filter(|l| !l.contains("DEBUG") || l.contains("chunk"))
            {
                eprintln!("log: {l}");
            }
            let _ = rebuild(&world, false, Some(k.clone())).await;
        }
    }
    assert_model_equals(&got, &want);
    w.sigterm();
}

/// A standby started while the active walnats is still snapshotting (no
/// walsender holds the slot yet) waits, and takes the snapshot over when
/// the active one is killed: still no row twice, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_waits_during_the_snapshot_and_takes_it_over_at_parallelism_1() {
    a_standby_waits_during_the_snapshot_and_takes_it_over_with("1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_waits_during_the_snapshot_and_takes_it_over_at_parallelism_4() {
    a_standby_waits_during_the_snapshot_and_takes_it_over_with("4").await;
}

async fn a_standby_waits_during_the_snapshot_and_takes_it_over_with(parallelism: &str) {
    let env = [("WALNATS_SNAPSHOT_PARALLELISM", parallelism)];
    let world = World::new(shared(PgVersion::V15)).await;
    const BIG: i64 = 200_000;
    create_tables(&world, BIG).await;
    let cfg = config(&world);
    let mut a = world.spawn_with(&cfg, &env);
    wait_log(&world, &mut a, "snapshot of table", 1).await;
    // Same config, its own HTTP port (none): the standby.
    let mut b = world.spawn_with(&cfg, &env);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !snapshot_done(&world),
        "the snapshot finished before the standby could wait"
    );
    assert!(b.is_running(), "the standby exited:\n{}", b.output());
    let log = std::fs::read_to_string(&world.log).unwrap_or_default();
    assert!(log.contains("standing by"), "no standby line:\n{log}");
    a.kill9();
    wait_log(&world, &mut b, "snapshot complete", 1).await;
    assert!(
        snapshot_done(&world),
        "the standby never completed the snapshot:\n{}",
        b.output()
    );
    wait_fence(&world, &mut b, 1).await;
    assert_rebuild_equals_tables(&world, BIG as u64).await;
    b.sigterm();
}

/// `walnats snapshot` interrupted by kill -9 twice: the queue and the
/// announced chunk live in the checkpoint, so the re-read goes on after
/// each restart with no row twice or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_snapshot_survives_kill_9_at_parallelism_1() {
    an_on_demand_snapshot_survives_kill_9_with("1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_snapshot_survives_kill_9_at_parallelism_4() {
    an_on_demand_snapshot_survives_kill_9_with("4").await;
}

async fn an_on_demand_snapshot_survives_kill_9_with(parallelism: &str) {
    let env = [("WALNATS_SNAPSHOT_PARALLELISM", parallelism)];
    let world = World::new(shared(PgVersion::V15)).await;
    const BIG: i64 = 150_000;
    create_tables(&world, BIG).await;
    let cfg = world.config();
    let mut w = world.spawn_with(&cfg, &env);
    world.wait_streaming(&mut w).await;
    let (stop, txs, churn) = churn_big(&world, BIG);
    let (code, out, err) = crate::cli::run(&["snapshot", "public.big"], &cfg, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let mut rng = Rng::from_env();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(rng.range(800, 2500))).await;
        assert!(
            log_count(&world, "snapshot of table complete") == 0,
            "the re-read finished before the kill; make the table bigger"
        );
        w.kill9();
        w = world.spawn_with(&cfg, &env);
    }
    wait_log(&world, &mut w, "snapshot of table complete", 1).await;
    assert_reread_rebuilds_big(&world, &mut w, BIG, (stop, txs, churn)).await;
    w.sigterm();
}

/// The checkpoint walnats left, as JSON; null when there is none.
async fn checkpoint_json(world: &World<'_>) -> Value {
    crate::resume::checkpoint(world)
        .await
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap_or(Value::Null)
}

/// After a re-read of `big` (`rows` rows at the start) under `churn`
/// (`churn_big`), stopped here: once the stream has caught up, a
/// consumer's model of `big` from the stream equals the table, and nearly
/// every row was read (once: `rebuild` fails on a row read twice).
async fn assert_reread_rebuilds_big(
    world: &World<'_>,
    w: &mut WalnatsProc,
    rows: i64,
    churn: (Arc<AtomicBool>, Arc<AtomicU64>, tokio::task::JoinHandle<()>),
) {
    let (stop, txs, churn) = churn;
    stop.store(true, Ordering::Relaxed);
    churn.await.unwrap();
    assert!(
        txs.load(Ordering::Relaxed) > 20,
        "the load wrote too little"
    );
    wait_fence(world, w, 1).await;
    let (model, reads, _) = rebuild(world, false, None).await;
    assert!(reads >= rows as u64 * 9 / 10, "only {reads} reads");
    let want = truth(world, &[("big", &["id"])]).await;
    let got: Model = model
        .into_iter()
        .filter(|(t, _)| want.contains_key(t))
        .collect();
    assert_model_equals(&got, &want);
}

/// `walnats snapshot` under churn (100-row chunks) keeps several re-read
/// chunks in flight among the streamed changes: walnats is killed with -9 until, twice, the
/// checkpoint it left announced two or more of them, and a next start found
/// one in the stream after changes it still had to prove (the replay steps
/// over it). The re-read ends with every row read once (`rebuild` fails on
/// a row read twice) and the table rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_with_several_reread_chunks_in_flight_gives_each_row_once() {
    let world = World::new(shared(PgVersion::V15)).await;
    const BIG: i64 = 200_000;
    create_tables(&world, BIG).await;
    let cfg = world.config();
    // Small chunks: many of them, each a write-ahead and a batch.
    let env = [("WALNATS_SNAPSHOT_CHUNK_ROWS", "100")];
    let mut w = world.spawn_with(&cfg, &env);
    world.wait_streaming(&mut w).await;
    let (stop, txs, churn) = churn_big(&world, BIG);
    let (code, out, err) = crate::cli::run(&["snapshot", "public.big"], &cfg, &[]);
    assert_eq!(code, 0, "{out}{err}");
    const STEPPED: &str = "the replay steps over them";
    let mut rng = Rng::from_env();
    let mut several = 0;
    for i in 0..30 {
        // A start waits 2 s for a dead process' last batches before it
        // settles: later kills give it time to get on.
        let wait = if i == 0 { (500, 1000) } else { (2800, 3500) };
        tokio::time::sleep(Duration::from_millis(rng.range(wait.0, wait.1))).await;
        assert!(
            log_count(&world, "snapshot of table complete") == 0,
            "the re-read finished before the kills; make the table bigger"
        );
        w.kill9();
        let cp = checkpoint_json(&world).await;
        if cp["pending_reread"].as_array().map_or(0, Vec::len) >= 2 {
            several += 1;
        }
        w = world.spawn_with(&cfg, &env);
        if several >= 2 && log_count(&world, STEPPED) > 0 {
            break;
        }
    }
    assert!(
        several >= 2,
        "no two kills found two re-read chunks in flight"
    );
    wait_log(&world, &mut w, "snapshot of table complete", 1).await;
    assert!(
        log_count(&world, STEPPED) > 0,
        "no start stepped over a chunk"
    );
    assert_reread_rebuilds_big(&world, &mut w, BIG, (stop, txs, churn)).await;
    w.sigterm();
}

/// Several chunks in flight (parallelism 4, 50-row chunks, a big table in
/// key ranges): walnats is killed with -9 until, twice, the checkpoint it
/// left lists two or more chunks announced and maybe in the stream; each
/// restart settles the prefix that landed, and a consumer ends with every
/// row exactly once (`rebuild` fails on a row read twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_with_several_chunks_in_flight_gives_each_row_once() {
    let world = World::new(shared(PgVersion::V15)).await;
    const BIG: i64 = 300_000;
    create_tables(&world, BIG).await;
    let mut rng = Rng::from_env();
    let cfg = config(&world);
    let env = [
        ("WALNATS_SNAPSHOT_PARALLELISM", "4"),
        ("WALNATS_SNAPSHOT_CHUNK_ROWS", "50"),
    ];
    let mut w = world.spawn_with(&cfg, &env);
    let (mut several, mut ranges) = (0, 0);
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(rng.range(400, 1200))).await;
        assert!(
            !snapshot_done(&world),
            "the snapshot finished before the kills; make the table bigger"
        );
        w.kill9();
        let cp = checkpoint_json(&world).await;
        let in_flight = cp["snapshot"]["in_flight"].as_array().map_or(0, Vec::len);
        if let Some(tables) = cp["snapshot"]["tables"].as_array() {
            ranges = tables
                .iter()
                .filter(|t| t["table"] == "big")
                .map(|t| t["ranges"].as_array().map_or(0, Vec::len))
                .sum::<usize>()
                .max(ranges);
        }
        w = world.spawn_with(&cfg, &env);
        if in_flight >= 2 {
            several += 1;
            if several == 2 {
                break;
            }
        }
    }
    assert_eq!(several, 2, "no kill found two chunks in flight");
    assert!(ranges >= 2, "the big table was not read in ranges");
    wait_log(&world, &mut w, "snapshot complete", 1).await;
    wait_fence(&world, &mut w, 1).await;
    assert_rebuild_equals_tables(&world, BIG as u64).await;
    w.sigterm();
}

/// Every table keyed, so chunks go out as fast-ingest batches: killed with
/// -9 while several are in flight, a chunk lands in part (logged by the
/// next start), and the snapshot goes on after its last row in the stream:
/// every row once, in order, the table rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_chunk_that_landed_in_part_goes_on_after_its_last_row() {
    let world = World::new(shared(PgVersion::V15)).await;
    const BIG: i64 = 300_000;
    world
        .sql(&format!(
            "CREATE TABLE big (id bigint PRIMARY KEY, n int NOT NULL, v text);
             INSERT INTO big SELECT g, 0, md5(g::text) FROM generate_series(1, {BIG}) g;
             CREATE TABLE fence (n int PRIMARY KEY);
             ANALYZE;"
        ))
        .await;
    let mut rng = Rng::from_env();
    let cfg = config(&world);
    let env = [
        ("WALNATS_SNAPSHOT_PARALLELISM", "4"),
        ("WALNATS_SNAPSHOT_CHUNK_ROWS", "200"),
    ];
    let mut w = world.spawn_with(&cfg, &env);
    wait_log(&world, &mut w, "snapshot of table", 1).await;
    let part = "a snapshot chunk landed in part";
    for kill in 1..=12 {
        tokio::time::sleep(Duration::from_millis(rng.range(300, 900))).await;
        assert!(
            !snapshot_done(&world),
            "the snapshot finished before the kills; make the table bigger"
        );
        w.kill9();
        w = world.spawn_with(&cfg, &env);
        wait_log(&world, &mut w, "snapshot resumes", kill).await;
        if log_count(&world, part) >= 2 {
            break;
        }
    }
    assert!(
        log_count(&world, part) >= 1,
        "no kill left a chunk in part in the stream"
    );
    wait_log(&world, &mut w, "snapshot complete", 1).await;
    wait_fence(&world, &mut w, 1).await;
    let (model, reads, _) = rebuild(&world, true, None).await;
    assert!(reads >= BIG as u64, "only {reads} reads");
    assert_model_equals(
        &model,
        &truth(&world, &[("big", &["id"]), ("fence", &["n"])]).await,
    );
    w.sigterm();
}
