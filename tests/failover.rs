//! Guarantee 7: a PostgreSQL failover to a standby that had synced the slot
//! changes nothing for consumers; and decoding from a hot standby (its
//! restart included) loses and repeats nothing. Each test runs its own
//! PostgreSQL 18 primary and streaming standby (`harness::standby`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::{PgPair, PgServer, PgVersion, WalnatsProc, wait_until};
use crate::support::{Msg, PREFIX, Rng, STREAM, World, assert_exactly_once_in_order};

const TABLE: &str = "numbered";

/// The ids whose COMMIT PostgreSQL acknowledged, in commit order, each
/// with the port of the server that acknowledged it.
type Acked = Arc<Mutex<Vec<(i64, u16)>>>;

/// One writer of numbered rows on `url` until `stop`: transactions of 1-3
/// inserts with ids counting up, so commit order is id order. A commit
/// whose answer is lost is not retried (its ids are never used again: it
/// may or may not have landed); on any error it connects again, to
/// whichever host `url` (several hosts, `target_session_attrs=read-write`)
/// names as the primary now.
fn start_numbered_load(
    url: String,
    stop: Arc<AtomicBool>,
    acked: Acked,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut next: i64 = 1;
        while !stop.load(Ordering::Relaxed) {
            let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
            let client = match tokio::time::timeout(Duration::from_secs(3), connect).await {
                Ok(Ok((client, conn))) => {
                    tokio::spawn(conn);
                    client
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(row) = client.query_one("SELECT inet_server_port()", &[]).await else {
                continue;
            };
            let port = u16::try_from(row.get::<_, i32>(0)).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let n = next % 3 + 1;
                let ids: Vec<i64> = (next..next + n).collect();
                next += n;
                let values: Vec<String> = ids.iter().map(|i| format!("({i}, 'row {i}')")).collect();
                let sql = format!(
                    "BEGIN; INSERT INTO {TABLE} (id, v) VALUES {}; COMMIT;",
                    values.join(", ")
                );
                let done =
                    tokio::time::timeout(Duration::from_secs(5), client.batch_execute(&sql)).await;
                if !matches!(done, Ok(Ok(()))) {
                    break;
                }
                acked.lock().unwrap().extend(ids.iter().map(|&i| (i, port)));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    })
}

/// How many rows `port` (any server: `None`) acknowledged.
fn acked_by(acked: &Acked, port: Option<u16>) -> usize {
    acked
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, p)| port.is_none_or(|want| *p == want))
        .count()
}

/// Waits until `port` (any: `None`) has acknowledged `more` rows more
/// than `from`.
async fn wait_acked(acked: &Acked, port: Option<u16>, from: usize, more: usize, what: &str) {
    wait_until(Duration::from_secs(60), what, || {
        let n = acked_by(acked, port);
        async move { n >= from + more }
    })
    .await;
}

/// The table's ids on `pg`, in order.
async fn table_ids(pg: &PgServer, db: &str) -> Vec<i64> {
    pg.client(db)
        .await
        .query(&format!("SELECT id FROM {TABLE} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn insert_subject() -> String {
    format!("{PREFIX}.public.{TABLE}.insert")
}

/// The ids of the stream's inserts, in stream order.
fn streamed_ids(msgs: &[Msg]) -> Vec<i64> {
    let subject = insert_subject();
    msgs.iter()
        .filter(|m| m.subject == subject)
        .map(|m| m.json()["after"]["id"].as_i64().unwrap())
        .collect()
}

/// The id of the last insert in the stream, if any.
async fn last_streamed_id(world: &World<'_>) -> Option<i64> {
    let js = world.js().await;
    let stream = js.get_stream(STREAM).await.ok()?;
    let m = stream
        .get_last_raw_message_by_subject(&insert_subject())
        .await
        .ok()?;
    let body: serde_json::Value = serde_json::from_slice(&m.payload).ok()?;
    body["after"]["id"].as_i64()
}

/// The last commit LSN walnats published, if any.
async fn last_streamed_commit(world: &World<'_>) -> Option<String> {
    let js = world.js().await;
    let stream = js.get_stream(STREAM).await.ok()?;
    let m = stream
        .get_last_raw_message_by_subject(&insert_subject())
        .await
        .ok()?;
    m.headers
        .get("Cdc-Commit-Lsn")
        .map(|v| v.as_str().to_owned())
}

/// Waits until the stream's last insert is the table's last row (walnats
/// is alive all along), gives a duplicate a moment to show, and returns
/// what a consumer reads.
async fn settle(world: &World<'_>, w: &mut WalnatsProc, last: i64) -> Vec<Msg> {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if last_streamed_id(world).await == Some(last) {
            break;
        }
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        assert!(
            std::time::Instant::now() < deadline,
            "row {last} never reached the stream (last there: {:?}):\n{}",
            last_streamed_id(world).await,
            w.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    world.read_stream().await
}

/// The stream, made before walnats starts, with a duplicate window of one
/// second: past it JetStream keeps a re-published message, so only
/// walnats' own proof of what it published keeps the stream free of
/// copies (the default two minutes would hide a re-published replay).
async fn create_stream_forgetting_ids(world: &World<'_>) {
    use async_nats::jetstream::stream;
    world
        .js()
        .await
        .create_stream(stream::Config {
            name: STREAM.to_owned(),
            subjects: vec![format!("{PREFIX}.>")],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(1),
            // As walnats makes it: re-read chunks are atomic batches.
            allow_atomic_publish: true,
            allow_direct: true,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// `config` with `line` added to its `[postgres]` section.
fn with_postgres_key(config: &str, line: &str) -> String {
    assert!(config.contains("[postgres]\n"));
    config.replacen("[postgres]\n", &format!("[postgres]\n{line}\n"), 1)
}

/// The stream holds exactly the rows of `truth` (the surviving server's
/// table), each once, in commit order, and the contract's order and
/// uniqueness hold for every message.
fn assert_stream_is(msgs: &[Msg], truth: &[i64]) {
    // Re-read rows (`read`) have an order of their own; ids stay unique.
    let mut ids = BTreeSet::new();
    for m in msgs {
        assert!(
            ids.insert(m.header("Nats-Msg-Id")),
            "duplicate message {} at stream seq {}",
            m.header("Nats-Msg-Id"),
            m.seq
        );
    }
    let changes: Vec<Msg> = msgs
        .iter()
        .filter(|m| !m.subject.ends_with(".read"))
        .cloned()
        .collect();
    assert_exactly_once_in_order(&changes);
    let streamed = streamed_ids(msgs);
    let have: BTreeSet<i64> = truth.iter().copied().collect();
    let extra: Vec<i64> = streamed
        .iter()
        .filter(|i| !have.contains(i))
        .copied()
        .collect();
    assert!(
        extra.is_empty(),
        "the stream holds rows the surviving server does not have: {extra:?}"
    );
    let got: BTreeSet<i64> = streamed.iter().copied().collect();
    let missing: Vec<i64> = truth.iter().filter(|i| !got.contains(i)).copied().collect();
    assert!(missing.is_empty(), "rows never streamed: {missing:?}");
    assert_eq!(
        streamed.len(),
        truth.len(),
        "{} inserts streamed, {} rows",
        streamed.len(),
        truth.len()
    );
    assert_eq!(streamed, truth, "the stream's order is not commit order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_synced_standby_loses_and_duplicates_nothing_pg18() {
    failover(false).await;
}

/// The same with walnats killed -9 during the failover, twice: after the
/// primary died (started again at once, with no primary to connect to)
/// and as soon as it streams from the promoted server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_with_walnats_killed_9_during_it_loses_and_duplicates_nothing_pg18() {
    failover(true).await;
}

async fn failover(kill_walnats: bool) {
    let mut rng = Rng::from_env();
    let pair = PgPair::start(PgVersion::V18).await;
    let world = World::new(&pair.primary).await;
    world
        .sql(&format!(
            "CREATE TABLE {TABLE} (id int8 PRIMARY KEY, v text NOT NULL)"
        ))
        .await;
    let url = pair.multi_host_url(&world.db);
    // The slot confirms every 3 s, not every 200 ms: its synced copy is
    // then most likely behind what walnats published when the primary
    // dies, and the replay after the promotion must be skipped and proven.
    let cfg = with_postgres_key(
        &world
            .config()
            .replace(&world.pg_url(), &url)
            .replace("status_interval_ms = 200", "status_interval_ms = 3000"),
        "slot_failover = true",
    );
    create_stream_forgetting_ids(&world).await;
    let mut w = world.spawn_with(&cfg, &[]);
    world.wait_streaming(&mut w).await;
    let slot = world.slot();

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let load = start_numbered_load(url.clone(), Arc::clone(&stop), Arc::clone(&acked));
    wait_acked(&acked, None, 0, 150, "the load's first rows").await;
    pair.wait_slot_synced(&slot).await;
    // Load past the sync, so that walnats published beyond what the synced
    // copy confirms when the primary dies.
    let synced_at = acked_by(&acked, None);
    wait_acked(&acked, None, synced_at, 150, "rows after the slot synced").await;
    // The standby stops receiving while the primary commits more: those
    // rows are acknowledged and lost with the primary, and walnats must
    // never have published them.
    pair.stall_standby().await;
    let stalled_at = acked_by(&acked, None);
    // Short against the slot's 3 s status interval: the synced copy
    // stays behind what walnats published.
    wait_acked(
        &acked,
        None,
        stalled_at,
        15,
        "rows while the standby is stalled",
    )
    .await;
    pair.kill_primary();
    let acked_at_kill = acked_by(&acked, None);
    let published = last_streamed_commit(&world).await;
    if kill_walnats {
        // Killed while no server is the primary, and started again at
        // once: it must wait for one, not give up.
        tokio::time::sleep(Duration::from_millis(rng.range(0, 500))).await;
        w.kill9();
        w = world.spawn_with(&cfg, &[]);
    }
    // Over the stream's duplicate window: whatever walnats published
    // before the failover, JetStream no longer drops a copy of.
    tokio::time::sleep(Duration::from_millis(rng.range(1000, 2000))).await;
    pair.promote().await;
    let (_, promoted_flush) = slot_on(&pair.standby, &slot).await;
    eprintln!(
        "promoted: the synced slot confirmed {promoted_flush:?}; walnats had published up to commit {published:?}"
    );
    if kill_walnats {
        // Killed again as soon as it streams from the new primary, maybe
        // while it skips the replay the synced slot sends again.
        world.wait_streaming_on(&pair.standby, &mut w).await;
        tokio::time::sleep(Duration::from_millis(rng.range(0, 200))).await;
        w.kill9();
        w = world.spawn_with(&cfg, &[]);
    }
    // The load goes on against the new primary, and walnats with it.
    let new_primary = Some(pair.standby.port());
    wait_acked(&acked, new_primary, 0, 200, "rows on the new primary").await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    let truth = table_ids(&pair.standby, &world.db).await;
    let acked: Vec<(i64, u16)> = acked.lock().unwrap().clone();
    let have: BTreeSet<i64> = truth.iter().copied().collect();
    let lost: Vec<(i64, u16)> = acked
        .iter()
        .filter(|(i, _)| !have.contains(i))
        .copied()
        .collect();
    eprintln!(
        "{} rows acknowledged, {} on the new primary; acknowledged by the old primary and never replicated (lost by PostgreSQL, expected missing from the stream): {:?}",
        acked.len(),
        truth.len(),
        lost.iter().map(|(i, _)| i).collect::<Vec<_>>()
    );
    // Only the old primary can have lost an acknowledged row, and it lost
    // every one committed after the stall (one transaction, at most 3
    // rows, may have committed before it and been counted after).
    assert!(
        lost.iter().all(|(_, port)| *port == pair.primary.port()),
        "rows the new primary acknowledged are missing: {lost:?}"
    );
    let expected: Vec<i64> = acked[stalled_at + 3..acked_at_kill]
        .iter()
        .map(|(i, _)| *i)
        .collect();
    eprintln!("expected lost (committed while the standby was stalled): {expected:?}");
    let lost_ids: BTreeSet<i64> = lost.iter().map(|(i, _)| *i).collect();
    assert!(
        expected.iter().all(|i| lost_ids.contains(i)),
        "rows committed while the standby was stalled reached it: the stall did not hold"
    );
    let last = *truth.last().unwrap();
    let msgs = settle(&world, &mut w, last).await;
    let log = std::fs::read_to_string(&world.log).unwrap_or_default();
    for line in log.lines().filter(|l| {
        l.contains("resuming")
            || l.contains("primary changed")
            || l.contains("connected to PostgreSQL")
    }) {
        eprintln!("walnats: {line}");
    }
    assert_stream_is(&msgs, &truth);
    assert!(
        w.is_running(),
        "walnats stopped after the failover:\n{}",
        w.output()
    );
    // walnats streams from the slot that was synced, on the new primary.
    let (failover, _) = slot_on(&pair.standby, &slot).await;
    assert_eq!(failover, Some(true), "the slot on the new primary");
    w.sigterm();
}

/// The slot's `failover` flag and `confirmed_flush_lsn` on `pg`.
async fn slot_on(pg: &PgServer, slot: &str) -> (Option<bool>, Option<String>) {
    let rows = pg
        .client("postgres")
        .await
        .query(
            "SELECT failover, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    match rows.first() {
        Some(r) => (r.get(0), r.get(1)),
        None => (None, None),
    }
}

/// Decoding from a hot standby (`postgres.url` the standby,
/// `postgres.primary_url` the primary) under a write load on the primary:
/// walnats makes its slot on the standby (it logs running-xacts records on
/// the primary meanwhile), `walnats snapshot` re-reads the table (its
/// watermarks written on the primary, its chunks read on the standby),
/// and the standby is restarted once while walnats runs: every committed
/// row once, in commit order, and the re-read holds every row committed
/// before it was asked for, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoding_from_a_restarted_standby_loses_and_duplicates_nothing_pg18() {
    let pair = PgPair::start(PgVersion::V18).await;
    let world = World::new(&pair.primary).await;
    world
        .sql(&format!(
            "CREATE TABLE {TABLE} (id int8 PRIMARY KEY, v text NOT NULL)"
        ))
        .await;
    pair.wait_replayed().await;
    let standby_url = format!("{}?sslmode=disable", pair.standby.url(&world.db));
    let cfg = with_postgres_key(
        &world.config().replace(&world.pg_url(), &standby_url),
        &format!("primary_url = \"{}\"", world.pg_url()),
    );
    create_stream_forgetting_ids(&world).await;
    let mut w = world.spawn_with(&cfg, &[]);
    world.wait_streaming_on(&pair.standby, &mut w).await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let load = start_numbered_load(world.pg_url(), Arc::clone(&stop), Arc::clone(&acked));
    wait_acked(&acked, None, 0, 150, "the load's first rows").await;
    // A re-read while decoding from the standby.
    let requested_at = acked_by(&acked, None);
    let (code, out, err) = crate::cli::run(&["snapshot", &format!("public.{TABLE}")], &cfg, &[]);
    assert_eq!(code, 0, "walnats snapshot on a standby:\n{out}{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&world.log)
        .unwrap_or_default()
        .contains("snapshot of table complete")
    {
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        assert!(
            std::time::Instant::now() < deadline,
            "the re-read did not complete:\n{}",
            w.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Down for longer than the stream's duplicate window: a replay walnats
    // re-published would stay in the stream as a copy.
    pair.standby.stop_fast();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    pair.standby.start_again();
    pair.wait_standby_streaming().await;
    let restarted_at = acked_by(&acked, None);
    wait_acked(
        &acked,
        None,
        restarted_at,
        300,
        "rows after the standby's restart",
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    let truth = table_ids(&pair.primary, &world.db).await;
    let acked: Vec<i64> = acked.lock().unwrap().iter().map(|(i, _)| *i).collect();
    assert_eq!(acked, truth, "the primary lost an acknowledged row");
    let msgs = settle(&world, &mut w, *truth.last().unwrap()).await;
    assert_stream_is(&msgs, &truth);
    let read_subject = format!("{PREFIX}.public.{TABLE}.read");
    let reads: Vec<i64> = msgs
        .iter()
        .filter(|m| m.subject == read_subject)
        .map(|m| m.json()["after"]["id"].as_i64().unwrap())
        .collect();
    eprintln!(
        "{} rows streamed, {} re-read ({requested_at} committed before the request)",
        truth.len(),
        reads.len()
    );
    let log = std::fs::read_to_string(&world.log).unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("resuming")) {
        eprintln!("walnats: {line}");
    }
    let read_set: BTreeSet<i64> = reads.iter().copied().collect();
    assert_eq!(read_set.len(), reads.len(), "a row was read twice");
    let unread: Vec<i64> = acked[..requested_at]
        .iter()
        .filter(|i| !read_set.contains(i))
        .copied()
        .collect();
    assert!(
        unread.is_empty(),
        "rows committed before the re-read was asked for and not read: {unread:?}"
    );
    let have: BTreeSet<i64> = truth.iter().copied().collect();
    assert!(
        read_set.is_subset(&have),
        "rows read that the table never had"
    );
    assert!(w.is_running(), "walnats stopped:\n{}", w.output());
    // The slot is the standby's own; the primary has none.
    assert_eq!(slot_on(&pair.primary, &world.slot()).await, (None, None));
    w.sigterm();
}
