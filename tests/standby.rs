//! Decoding from a hot standby (PostgreSQL 18, `harness::standby`), from
//! the outside: without `postgres.primary_url` walnats streams and says
//! what it cannot do; a `primary_url` that is not the standby's primary is
//! refused in one line before a slot is made; `status --json` shows the
//! standby with `primary_url` redacted; and a `walnats snapshot` re-read
//! on the standby under concurrent updates rebuilds the table exactly.
//! (The standby restarted under load is in the failover tests.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{PgPair, PgServer, PgVersion, WalnatsProc};
use crate::snapshot::{Model, assert_model_equals, rebuild, truth, wait_fence, wait_log};
use crate::support::{Rng, World, assert_exactly_once_in_order, shared};

/// `config` with `line` added to its `[postgres]` section.
fn with_postgres_key(config: &str, line: &str) -> String {
    assert!(config.contains("[postgres]\n"));
    config.replacen("[postgres]\n", &format!("[postgres]\n{line}\n"), 1)
}

/// The world's config with `postgres.url` the standby's (same database).
fn on_standby(world: &World<'_>, pair: &PgPair) -> String {
    let standby_url = format!("{}?sslmode=disable", pair.standby.url(&world.db));
    world.config().replace(&world.pg_url(), &standby_url)
}

/// The names of the logical slots on `pg`.
async fn slots_on(pg: &PgServer) -> Vec<String> {
    pg.client("postgres")
        .await
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'logical'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The walsender holding the world's slot on the standby, once the slot is
/// made (active, with a consistent point). Without `primary_url` walnats
/// cannot ask the primary for the running-xacts record the slot's creation
/// waits for: the test asks for one every 200 ms meanwhile (walnats' own
/// wait for an idle primary is not what is tested here).
async fn wait_streaming_nudged(world: &World<'_>, pair: &PgPair, w: &mut WalnatsProc) -> i32 {
    let primary = pair.primary.client("postgres").await;
    let standby = pair.standby.client("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = standby
            .query(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 \
                 AND active AND confirmed_flush_lsn IS NOT NULL",
                &[&world.slot()],
            )
            .await
            .unwrap();
        if let Some(pid) = rows.first().and_then(|r| r.get::<_, Option<i32>>(0)) {
            return pid;
        }
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        assert!(
            Instant::now() < deadline,
            "walnats did not start streaming on the standby:\n{}",
            w.output()
        );
        primary
            .batch_execute("SELECT pg_log_standby_snapshot()")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Inserts ids `from..to` on the primary, three per transaction.
async fn insert_ids(world: &World<'_>, from: i64, to: i64) {
    let client = world.client().await;
    let mut id = from;
    while id < to {
        let end = (id + 3).min(to);
        let values: Vec<String> = (id..end).map(|i| format!("({i})")).collect();
        client
            .batch_execute(&format!(
                "BEGIN; INSERT INTO t (id) VALUES {}; COMMIT;",
                values.join(", ")
            ))
            .await
            .unwrap();
        id = end;
    }
}

fn log_count(world: &World<'_>, needle: &str) -> usize {
    std::fs::read_to_string(&world.log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// A standby without `postgres.primary_url`: walnats makes its slot there
/// and streams what the primary commits, once, in order, across a session
/// restart (its walsender terminated on the standby); the warning that
/// heartbeats are off and `walnats snapshot` is refused is logged once per
/// process, not per session; `walnats check` shows each thing that does
/// not work as a warning naming `postgres.primary_url`; and `walnats
/// snapshot` exits non-zero with one line naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_without_primary_url_streams_and_says_what_it_cannot_do_pg18() {
    let pair = PgPair::start(PgVersion::V18).await;
    let world = World::new(&pair.primary).await;
    // A standby cannot create the publication: made on the primary, as
    // the refusal without it says.
    world
        .sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION walnats FOR ALL TABLES")
        .await;
    pair.wait_replayed().await;
    let cfg = on_standby(&world, &pair);
    let mut w = world.spawn_with(&cfg, &[]);
    let first = wait_streaming_nudged(&world, &pair, &mut w).await;
    insert_ids(&world, 1, 31).await;
    world.wait_changes(30, &w).await;

    // A new session in the same process: its walsender is terminated, and
    // walnats connects again and probes the standby again.
    let standby = pair.standby.client("postgres").await;
    standby
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = standby
            .query(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&world.slot()],
            )
            .await
            .unwrap();
        if rows
            .first()
            .and_then(|r| r.get::<_, Option<i32>>(0))
            .is_some_and(|pid| pid != first)
        {
            break;
        }
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        assert!(
            Instant::now() < deadline,
            "walnats did not take the slot again:\n{}",
            w.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    insert_ids(&world, 31, 61).await;
    let changes = world.wait_changes(60, &w).await;
    assert_exactly_once_in_order(&changes);
    let ids: Vec<i64> = changes
        .iter()
        .map(|m| m.json()["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..61).collect::<Vec<_>>());
    assert_eq!(
        log_count(
            &world,
            "decoding from a standby (PostgreSQL 18), primary: not set"
        ),
        2,
        "one probe per session:\n{}",
        w.output()
    );
    let warned = log_count(
        &world,
        "postgres.url is a hot standby and postgres.primary_url is not set: heartbeats are off",
    );
    assert_eq!(warned, 1, "the warning once per process:\n{}", w.output());
    assert_eq!(log_count(&world, "hot_standby_feedback is off"), 0);

    // check: warnings, each naming postgres.primary_url; nothing fails.
    let (code, out, err) = crate::cli::run(&["check"], &cfg, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("[info] decoding from a standby (PostgreSQL 18), primary: not set"),
        "{out}"
    );
    let warnings: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("[warn] on this standby without postgres.primary_url"))
        .collect();
    assert_eq!(warnings.len(), 3, "{out}");
    assert_eq!(
        out.matches("\n       fix: set postgres.primary_url\n")
            .count(),
        3,
        "{out}"
    );
    for want in [
        "heartbeats are off",
        "`walnats snapshot` is refused",
        "creating the slot waits",
    ] {
        assert!(
            warnings.iter().any(|l| l.contains(want)),
            "no warning about {want:?}:\n{out}"
        );
    }

    // snapshot: refused in one line, naming the key.
    let (code, out, err) = crate::cli::run(&["snapshot", "public.t"], &cfg, &[]);
    assert_ne!(code, 0, "{out}{err}");
    let lines: Vec<&str> = err.trim().lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {err}");
    assert!(
        lines[0].starts_with("walnats: ") && lines[0].contains("postgres.primary_url"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Nothing was asked of the walnats that runs.
    insert_ids(&world, 61, 62).await;
    let changes = world.wait_changes(61, &w).await;
    assert!(changes.iter().all(|m| m.header("Cdc-Op") != "read"));
    assert!(w.is_running(), "walnats stopped:\n{}", w.output());
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}

/// walnats run exits 1 with a last `walnats:` line naming
/// `postgres.primary_url` and `why`; `secret` appears nowhere.
fn assert_refused(w: &mut WalnatsProc, why: &str, secret: &str) {
    // The refusal comes before any waiting: seconds, not minutes.
    let status = w.wait_exit(Duration::from_secs(20));
    let out = w.output();
    assert_eq!(status.code(), Some(1), "{out}");
    let last = out
        .lines()
        .rev()
        .find(|l| l.starts_with("walnats: "))
        .unwrap_or_else(|| panic!("no error line:\n{out}"));
    assert!(
        last.contains("postgres.primary_url") && last.contains(why),
        "{why:?} not in {last:?}"
    );
    assert!(!out.contains(secret), "the password was printed:\n{out}");
    assert!(!out.contains("panicked"), "{out}");
}

/// A `primary_url` that is not the standby's primary (another cluster with
/// a database of the same name; the standby itself; the right cluster but
/// another database) is refused at start in one line naming
/// `postgres.primary_url`, exit 1, before any slot is made on the
/// standby; `walnats check` fails on it too. The URLs' password is never
/// printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_url_that_is_not_the_standbys_primary_is_refused_pg18() {
    let pair = PgPair::start(PgVersion::V18).await;
    let world = World::new(&pair.primary).await;
    world.sql("CREATE TABLE t (id int8 PRIMARY KEY)").await;
    pair.wait_replayed().await;
    // Another cluster with the same database name: only the system
    // identifier tells it apart.
    let other = shared(PgVersion::V18);
    other
        .execute("postgres", &format!("CREATE DATABASE {}", world.db))
        .await;
    let secret = "Pw-n0t-the-primary";
    let with_pw = |port: u16, db: &str| {
        format!("postgres://postgres:{secret}@127.0.0.1:{port}/{db}?sslmode=disable")
    };
    let cases = [
        (with_pw(other.port(), &world.db), "is another cluster"),
        (
            with_pw(pair.standby.port(), &world.db),
            "is in recovery too, not a primary",
        ),
        (with_pw(pair.primary.port(), "postgres"), "the standby's is"),
    ];
    let cfg = on_standby(&world, &pair);
    for (url, why) in &cases {
        let cfg = with_postgres_key(&cfg, &format!("primary_url = \"{url}\""));
        let mut w = world.spawn_with(&cfg, &[]);
        assert_refused(&mut w, why, secret);
        assert_eq!(
            slots_on(&pair.standby).await,
            Vec::<String>::new(),
            "a slot was made on the standby before the refusal"
        );
        let (code, out, err) = crate::cli::run(&["check"], &cfg, &[]);
        assert_ne!(code, 0, "{out}{err}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("[FAIL] postgres.primary_url") && l.contains(why)),
            "{why:?}:\n{out}"
        );
        assert!(!out.contains(secret) && !err.contains(secret), "{out}{err}");
    }
    assert_eq!(slots_on(&pair.primary).await, Vec::<String>::new());
    other
        .execute("postgres", &format!("DROP DATABASE {}", world.db))
        .await;
}

/// `walnats status --json` on a standby: a `standby` object (version,
/// `primary_url` with its password masked, `hot_standby_feedback`, nothing
/// unavailable), the slot the standby's; the password in `primary_url`
/// appears in no output of `status`, `status --json`, `check` or `run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_on_a_standby_shows_it_with_primary_url_redacted_pg18() {
    let pair = PgPair::start(PgVersion::V18).await;
    let world = World::new(&pair.primary).await;
    world.sql("CREATE TABLE t (id int8 PRIMARY KEY)").await;
    pair.wait_replayed().await;
    let secret = "Pw-s3cret-of-the-primary";
    let cfg = with_postgres_key(
        &on_standby(&world, &pair),
        &format!(
            "primary_url = \"postgres://postgres:{secret}@127.0.0.1:{}/{}?sslmode=disable\"",
            pair.primary.port(),
            world.db
        ),
    );
    let mut w = world.spawn_with(&cfg, &[]);
    world.wait_streaming_on(&pair.standby, &mut w).await;
    insert_ids(&world, 1, 4).await;
    world.wait_changes(3, &w).await;

    let (code, out, err) = crate::cli::run(&["status", "--json"], &cfg, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains(secret) && !err.contains(secret), "{out}{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = &st["standby"];
    assert!(s.is_object(), "no standby object: {out}");
    assert_eq!(s["postgresql"], 18, "{out}");
    assert_eq!(s["hot_standby_feedback"], true, "{out}");
    assert_eq!(s["unavailable"], serde_json::json!([]), "{out}");
    let shown = s["primary_url"].as_str().unwrap();
    assert!(
        shown.contains("***") && shown.contains(&pair.primary.port().to_string()),
        "primary_url {shown:?}"
    );
    assert_eq!(st["slot"]["exists"], true, "{out}");
    assert_eq!(st["slot"]["active"], true, "{out}");
    assert!(
        st["host"]
            .as_str()
            .unwrap()
            .contains(&pair.standby.port().to_string()),
        "{out}"
    );

    let (code, out, err) = crate::cli::run(&["status"], &cfg, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("server     decoding from a standby (PostgreSQL 18), primary: postgres://"),
        "{out}"
    );
    assert!(!out.contains(secret) && !err.contains(secret), "{out}{err}");
    let (code, out, err) = crate::cli::run(&["check"], &cfg, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("[ok]   postgres.primary_url reaches the standby's primary"),
        "{out}"
    );
    assert!(!out.contains(secret) && !err.contains(secret), "{out}{err}");
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(30)).success());
    assert!(
        !w.output().contains(secret),
        "the password was logged:\n{}",
        w.output()
    );
    // A primary has no standby object.
    let (code, out, err) = crate::cli::run(&["status", "--json"], &world.config(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(st["standby"].is_null(), "{out}");
}

/// Writers updating random rows of `big` (ids 1..=rows) on `url`, two
/// rows per transaction, until `stop`; counts their commits.
fn start_updates(
    url: String,
    rows: u64,
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
            let (a, b) = (rng.range(1, rows), rng.range(1, rows));
            let sql = format!(
                "BEGIN; UPDATE big SET n = n + 1, v = md5(random()::text) WHERE id = {a};
                 UPDATE big SET n = n + 1, v = md5(random()::text) WHERE id = {b}; COMMIT;"
            );
            // Two writers can deadlock on (a, b) and (b, a): try again.
            if client.batch_execute(&sql).await.is_ok() {
                txs.fetch_add(1, Ordering::Relaxed);
            } else {
                let _ = client.batch_execute("ROLLBACK").await;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// `walnats snapshot` on a standby (`primary_url` the primary) while four
/// writers update random rows of a keyed table of 5000 rows on the
/// primary: the re-read runs in six chunks (999 rows each), each between
/// watermarks written on the primary, its SELECT on the standby; the
/// stream applied in order equals the table at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_read_on_a_standby_under_concurrent_updates_rebuilds_the_table_pg18() {
    const ROWS: u64 = 5000;
    let pair = PgPair::start(PgVersion::V18).await;
    let world = World::new(&pair.primary).await;
    world
        .sql(&format!(
            "CREATE TABLE big (id int8 PRIMARY KEY, n int NOT NULL, v text);
             INSERT INTO big SELECT g, 0, md5(g::text) FROM generate_series(1, {ROWS}) g;
             CREATE TABLE fence (n int PRIMARY KEY);
             ANALYZE;"
        ))
        .await;
    pair.wait_replayed().await;
    let cfg = with_postgres_key(
        &on_standby(&world, &pair),
        &format!("primary_url = \"{}\"", world.pg_url()),
    );
    let mut w = world.spawn_with(&cfg, &[]);
    world.wait_streaming_on(&pair.standby, &mut w).await;

    let stop = Arc::new(AtomicBool::new(false));
    let txs = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4)
        .map(|_| start_updates(world.pg_url(), ROWS, Arc::clone(&stop), Arc::clone(&txs)))
        .collect();
    crate::harness::wait_until(
        Duration::from_secs(30),
        "the writers' first updates",
        || {
            let n = txs.load(Ordering::Relaxed);
            async move { n >= 100 }
        },
    )
    .await;
    let before = txs.load(Ordering::Relaxed);
    let (code, out, err) = crate::cli::run(&["snapshot", "public.big"], &cfg, &[]);
    assert_eq!(code, 0, "walnats snapshot on a standby:\n{out}{err}");
    wait_log(&world, &mut w, "snapshot of table complete", 1).await;
    let during = txs.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(during >= 20, "only {during} updates during the re-read");
    wait_fence(&world, &mut w, 1).await;

    let (model, reads, _) = rebuild(&world, false, None).await;
    let want = truth(&world, &[("big", &["id"])]).await;
    let got: Model = model
        .into_iter()
        .filter(|(t, _)| want.contains_key(t))
        .collect();
    eprintln!(
        "{reads} rows re-read, {} updates committed in all ({during} during the re-read)",
        txs.load(Ordering::Relaxed)
    );
    // Rows changed inside a chunk's window are left out of the chunk:
    // their change carries them.
    assert!(reads >= ROWS / 2, "only {reads} rows re-read");
    assert_model_equals(&got, &want);
    // Each chunk's reads share the position of its high watermark.
    let chunks: std::collections::BTreeSet<String> = world
        .read_stream()
        .await
        .iter()
        .filter(|m| m.subject == "cdc.test.public.big.read")
        .map(|m| m.header("Cdc-Commit-Lsn").to_owned())
        .collect();
    eprintln!("{} chunks", chunks.len());
    assert!(chunks.len() >= 5, "only {} chunks", chunks.len());
    let log = std::fs::read_to_string(&world.log).unwrap_or_default();
    assert!(!log.contains("session ended"), "a session failed:\n{log}");
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}
