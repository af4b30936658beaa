//! Guarantee 6 at resume (issue 14): when the stream, the checkpoint, the
//! slot and the settings do not prove where to resume, walnats finishes the
//! transaction as it began it, or stops with a line naming the cause. It
//! never loses, repeats or renumbers a change, and never confirms the slot
//! (or writes a checkpoint) past what it has proven. Also what operators do
//! behind its back: purge the stream, drop the slot, recreate the
//! publication, run a second walnats on the stream, edit the checkpoint.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;

use crate::harness::{self, PgVersion, WalnatsProc};
use crate::support::{
    Msg, PREFIX, STREAM, World, assert_exactly_once_in_order, assert_tx_markers_frame_transactions,
    lsn, shared, walnats_bin,
};

/// `nats.checkpoint_bucket`'s default.
const BUCKET: &str = "walnats";

/// How long a refusal may take, from the start of `walnats run`.
const REFUSAL: Duration = Duration::from_secs(30);

/// A checkpoint key token, as `checkpoint::key_token` writes it.
fn key_token(s: &str) -> String {
    let mut out = String::new();
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// `<stream>.<database>.<slot>`, as `checkpoint::Store` names it.
pub(crate) fn checkpoint_key(world: &World<'_>) -> String {
    format!(
        "{}.{}.{}",
        key_token(STREAM),
        key_token(&world.db),
        key_token(&world.slot())
    )
}

/// The world's checkpoint as the KV bucket holds it, byte for byte;
/// `None` without a bucket or a key.
pub(crate) async fn checkpoint(world: &World<'_>) -> Option<Vec<u8>> {
    let js = world.js().await;
    let kv = js.get_key_value(BUCKET).await.ok()?;
    kv.get(checkpoint_key(world))
        .await
        .unwrap()
        .map(|b| b.to_vec())
}

async fn put_checkpoint(world: &World<'_>, bytes: Vec<u8>) {
    let js = world.js().await;
    let kv = js.get_key_value(BUCKET).await.unwrap();
    kv.put(checkpoint_key(world), bytes.into()).await.unwrap();
}

fn parse(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

fn show(bytes: Option<&[u8]>) -> String {
    bytes.map_or_else(
        || "<none>".to_owned(),
        |b| String::from_utf8_lossy(b).into_owned(),
    )
}

async fn delete_checkpoint_bucket(world: &World<'_>) {
    world.js().await.delete_key_value(BUCKET).await.unwrap();
}

async fn last_seq(world: &World<'_>) -> u64 {
    match world.js().await.get_stream(STREAM).await {
        Ok(mut s) => s.info().await.unwrap().state.last_sequence,
        Err(_) => 0,
    }
}

/// Waits until the stream's last sequence reaches `at_least`, polling
/// often: the tests catch walnats in the middle of a transaction.
async fn wait_stream_seq(world: &World<'_>, w: &mut WalnatsProc, at_least: u64) {
    let js = world.js().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut stream = None;
    loop {
        if stream.is_none() {
            stream = js.get_stream(STREAM).await.ok();
        }
        let last = match stream.as_mut() {
            Some(s) => s.info().await.unwrap().state.last_sequence,
            None => 0,
        };
        if last >= at_least {
            return;
        }
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        assert!(
            Instant::now() < deadline,
            "the stream reached sequence {last}, not {at_least}:\n{}",
            w.output()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the durable checkpoint covers the whole stream, so that a
/// kill -9 now leaves nothing after it.
async fn wait_checkpoint_at_tail(world: &World<'_>, w: &mut WalnatsProc) {
    let mut last = (None, 0);
    for _ in 0..600 {
        let tail = last_seq(world).await;
        let cp = checkpoint(world)
            .await
            .map(|b| parse(&b)["stream_seq"].clone());
        if tail > 0 && cp.as_ref().and_then(serde_json::Value::as_u64) == Some(tail) {
            return;
        }
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        last = (cp, tail);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the checkpoint ({:?}) never reached the stream's tail ({}):\n{}",
        last.0,
        last.1,
        w.output()
    );
}

/// Waits until the stream's last insert into `table` is the row `id`:
/// everything committed before that row is in the stream then.
async fn wait_for_insert(world: &World<'_>, w: &mut WalnatsProc, table: &str, id: i64) {
    let js = world.js().await;
    let subject = format!("{PREFIX}.public.{table}.insert");
    for _ in 0..1200 {
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        if let Ok(s) = js.get_stream(STREAM).await
            && let Ok(m) = s.get_last_raw_message_by_subject(&subject).await
        {
            let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            if body["after"]["id"].as_i64() == Some(id) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{table} row {id} never reached the stream:\n{}", w.output());
}

/// Whether the stream's last insert into `table` is the row `id`.
async fn has_insert(js: &jetstream::Context, table: &str, id: i64) -> bool {
    let subject = format!("{PREFIX}.public.{table}.insert");
    let Ok(s) = js.get_stream(STREAM).await else {
        return false;
    };
    let Ok(m) = s.get_last_raw_message_by_subject(&subject).await else {
        return false;
    };
    let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    body["after"]["id"].as_i64() == Some(id)
}

/// The last `lines` lines of `text`.
fn tail_text(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What the last `walnats` started in this world printed.
fn last_run_output(world: &World<'_>) -> String {
    read_last_run(&world.log)
}

fn read_last_run(log: &Path) -> String {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    log.rsplit("===== walnats")
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Waits up to `REFUSAL` for `w` to exit: it must exit non-zero and, when
/// `needles` is not empty, say one of them. Returns what this run printed.
/// When walnats is still running at the deadline, `diagnose` says what it
/// did instead (it is still running then), and the test fails with that.
async fn assert_refuses<F, Fut>(
    world: &World<'_>,
    w: &mut WalnatsProc,
    needles: &[&str],
    diagnose: F,
) -> String
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = String>,
{
    let deadline = Instant::now() + REFUSAL;
    while w.is_running() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if w.is_running() {
        let what = diagnose().await;
        w.kill9();
        panic!(
            "walnats did not refuse: still running after {REFUSAL:?}; {what}\n--- this run's output:\n{}",
            tail_text(&last_run_output(world), 60)
        );
    }
    let status = w.wait_exit(Duration::from_secs(5));
    let out = last_run_output(world);
    assert!(
        !status.success(),
        "walnats exited 0 instead of refusing:\n{out}"
    );
    assert!(
        needles.is_empty() || needles.iter().any(|n| out.contains(n)),
        "walnats refused ({status}) without saying any of {needles:?}:\n{out}"
    );
    out
}

/// A plain JetStream publish by another client into walnats' stream, with
/// or without a `Nats-Msg-Id`.
async fn foreign_publish(world: &World<'_>, msg_id: Option<&str>) {
    let js = world.js().await;
    let subject = format!("{PREFIX}.ops.note");
    let ack = match msg_id {
        None => js.publish(subject, "note".into()).await.unwrap(),
        Some(id) => {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", id);
            js.publish_with_headers(subject, h, "note".into())
                .await
                .unwrap()
        }
    };
    ack.await.unwrap();
}

/// The stream's change messages of walnats (those with a position).
fn positioned(msgs: &[Msg]) -> Vec<Msg> {
    msgs.iter()
        .filter(|m| !m.header("Cdc-Commit-Lsn").is_empty())
        .cloned()
        .collect()
}

/// Inserts into `table` in the stream: row id → how many times.
fn insert_counts(msgs: &[Msg], table: &str) -> BTreeMap<i64, usize> {
    let subject = format!("{PREFIX}.public.{table}.insert");
    let mut out = BTreeMap::new();
    for m in msgs.iter().filter(|m| m.subject == subject) {
        *out.entry(m.json()["after"]["id"].as_i64().unwrap())
            .or_insert(0) += 1;
    }
    out
}

/// The ids of `want` that the stream lacks or holds more than once, as a
/// short text ("" when it holds each exactly once).
fn missing_or_doubled(counts: &BTreeMap<i64, usize>, want: impl Iterator<Item = i64>) -> String {
    let want: BTreeSet<i64> = want.collect();
    let missing: Vec<i64> = want
        .iter()
        .filter(|i| !counts.contains_key(i))
        .copied()
        .collect();
    let doubled: Vec<i64> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(i, _)| *i)
        .collect();
    let extra: Vec<i64> = counts
        .keys()
        .filter(|i| !want.contains(i))
        .copied()
        .collect();
    if missing.is_empty() && doubled.is_empty() && extra.is_empty() {
        return String::new();
    }
    let head = |v: &[i64]| format!("{} {:?}", v.len(), &v[..v.len().min(8)]);
    format!(
        "missing {}, twice or more {}, unexpected {}",
        head(&missing),
        head(&doubled),
        head(&extra)
    )
}

/// Waits (bounded) until the stream stops growing, then says what it holds
/// of `table`'s rows `want`: for the failure message of a walnats that
/// streamed on instead of refusing.
async fn stream_verdict(
    world: &World<'_>,
    table: &str,
    want: std::ops::RangeInclusive<i64>,
) -> String {
    let mut last = u64::MAX;
    for _ in 0..30 {
        let now = last_seq(world).await;
        if now == last {
            break;
        }
        last = now;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let msgs = world.read_stream().await;
    let counts = insert_counts(&msgs, table);
    let verdict = missing_or_doubled(&counts, want.clone());
    format!(
        "the stream holds {} of {table}'s {} rows {want:?}: {}",
        counts.len(),
        want.clone().count(),
        if verdict.is_empty() {
            "each exactly once".to_owned()
        } else {
            verdict
        }
    )
}

fn big_insert(table: &str, from: i64, to: i64) -> String {
    format!(
        "INSERT INTO {table} (id, v) SELECT g, md5(g::text) FROM generate_series({from}, {to}) g"
    )
}

/// Rows in the big transactions: large enough that walnats is caught in
/// the middle of publishing one.
const BIG: i64 = 60_000;

/// Starts walnats on table `t`, publishes a warm-up row (so the table's
/// `_schema` is out), commits one transaction of rows 1..=BIG and kills
/// walnats with -9 once part of it is in the stream.
async fn kill_9_inside_a_big_transaction(world: &World<'_>, env: &[(&str, &str)]) {
    world
        .sql("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await;
    let mut w = world.spawn_with(&world.config(), env);
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO t VALUES (0, 'warm-up')").await;
    wait_for_insert(world, &mut w, "t", 0).await;
    let base = last_seq(world).await;
    world.sql(&big_insert("t", 1, BIG)).await;
    wait_stream_seq(world, &mut w, base + 2000).await;
    w.kill9();
    assert_partly_published(world, "t", 1..=BIG).await;
}

/// The test's premise: some, not all, of these rows are in the stream.
async fn assert_partly_published(
    world: &World<'_>,
    table: &str,
    rows: std::ops::RangeInclusive<i64>,
) {
    let msgs = world.read_stream().await;
    let counts = insert_counts(&msgs, table);
    let n = rows.clone().filter(|i| counts.contains_key(i)).count();
    assert!(
        n > 0 && n < rows.clone().count(),
        "premise: part of the transaction is in the stream, but {n} of its {} rows are; make it bigger",
        rows.count()
    );
}

// ---------------------------------------------------------------------------
// 1. Another writer on the stream.

/// Issue 14, 1: walnats was killed with messages after its checkpoint;
/// while it is down another client publishes without a `Nats-Msg-Id`.
/// Counting what the stream holds after the checkpoint would take that
/// message for one of walnats' own and skip a real row: walnats must
/// refuse, and move neither the checkpoint nor the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_without_id_after_unconfirmed_messages_is_refused_and_moves_nothing() {
    let world = World::new(shared(PgVersion::V15)).await;
    kill_9_inside_a_big_transaction(&world, &[]).await;
    let before = checkpoint(&world).await.expect("no checkpoint");
    let tail = last_seq(&world).await;
    let cp_seq = parse(&before)["stream_seq"].as_u64().unwrap();
    assert!(
        tail > cp_seq,
        "premise: the stream holds messages after the checkpoint ({cp_seq}), but ends at {tail}"
    );
    foreign_publish(&world, None).await;
    let slot_before = world.confirmed_flush().await;
    let mut w = world.spawn();
    assert_refuses(&world, &mut w, &["not published by walnats"], || {
        stream_verdict(&world, "t", 0..=BIG)
    })
    .await;
    let after = checkpoint(&world).await;
    assert_eq!(
        after.as_deref(),
        Some(&before[..]),
        "the checkpoint moved: {} -> {}",
        show(Some(&before)),
        show(after.as_deref())
    );
    assert_eq!(world.confirmed_flush().await, slot_before, "the slot moved");
}

/// Issue 14, 1: the same with nothing of walnats' after its checkpoint:
/// the foreign message is the only one past it, and would be counted as
/// the first replayed change (the next row written would be skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_without_id_after_a_complete_checkpoint_is_refused_and_moves_nothing() {
    foreign_message_after_a_complete_checkpoint(None, &["not published by walnats"]).await;
}

/// The same with a `Nats-Msg-Id` that is not walnats': refused already
/// (the last skipped message's id is checked); a guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_with_another_id_is_refused_and_moves_nothing() {
    foreign_message_after_a_complete_checkpoint(Some("someone-else:1"), &[]).await;
}

async fn foreign_message_after_a_complete_checkpoint(msg_id: Option<&str>, needles: &[&str]) {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world
        .sql("INSERT INTO t VALUES (1, 'a'); INSERT INTO t VALUES (2, 'b')")
        .await;
    wait_for_insert(&world, &mut w, "t", 2).await;
    wait_checkpoint_at_tail(&world, &mut w).await;
    w.kill9();
    let before = checkpoint(&world).await.expect("no checkpoint");
    foreign_publish(&world, msg_id).await;
    let slot_before = world.confirmed_flush().await;
    let mut w = world.spawn();
    // Rows for the replay to count against the foreign message.
    for i in 3..=5 {
        world
            .sql(&format!("INSERT INTO t VALUES ({i}, 'after')"))
            .await;
    }
    assert_refuses(&world, &mut w, needles, || {
        stream_verdict(&world, "t", 1..=5)
    })
    .await;
    let after = checkpoint(&world).await;
    assert_eq!(
        after.as_deref(),
        Some(&before[..]),
        "the checkpoint moved: {} -> {}",
        show(Some(&before)),
        show(after.as_deref())
    );
    assert_eq!(world.confirmed_flush().await, slot_before, "the slot moved");
}

// ---------------------------------------------------------------------------
// 2. Checkpoint bucket lost, the stream ends with a `_schema`.

/// Issue 14, 2: a new table's first row is refused by the stream (over its
/// `max_msg_size`), so the stream's last message is that table's
/// `_schema` while walnats retries; walnats is stopped, the checkpoint
/// bucket is lost, the cause is fixed. Resuming "after the stream's last
/// message" takes the `_schema`'s position (its row's) for the row's own
/// and loses the row, and publishes the `_schema` again.
///
/// The stream's limit, not the server's max_payload with
/// `on_oversize = "fail"`: walnats checks max_payload before publishing
/// and exits before the `_schema` it queued just before is sent, so that
/// path does not leave a `_schema` last in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_checkpoint_bucket_with_a_schema_last_in_the_stream_loses_no_row_and_repeats_no_schema()
 {
    let world = World::new(shared(PgVersion::V15)).await;
    let js = world.js().await;
    let config = jetstream::stream::Config {
        name: STREAM.to_owned(),
        subjects: vec![format!("{PREFIX}.>")],
        storage: jetstream::stream::StorageType::File,
        max_message_size: 4096,
        ..Default::default()
    };
    js.create_stream(config).await.unwrap();
    world
        .sql("CREATE TABLE early (id bigint PRIMARY KEY)")
        .await;
    // One acknowledgement per message: the `_schema` is stored on its own.
    let one_by_one = [("WALNATS_NATS_FAST_INGEST", "off")];
    let mut w = world.spawn_with(&world.config(), &one_by_one);
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO early VALUES (1)").await;
    wait_for_insert(&world, &mut w, "early", 1).await;
    world
        .sql("CREATE TABLE fresh (id bigint PRIMARY KEY, v text)")
        .await;
    world
        .sql(&format!(
            "INSERT INTO fresh VALUES (1, '{}')",
            "x".repeat(10_000)
        ))
        .await;
    let schema_subject = format!("{PREFIX}._schema.public.fresh");
    let mut stream = js.get_stream(STREAM).await.unwrap();
    for _ in 0..600 {
        let last = stream.info().await.unwrap().state.last_sequence;
        let ends_with_schema = stream
            .get_raw_message(last)
            .await
            .is_ok_and(|m| m.subject.as_str() == schema_subject);
        let refused = std::fs::read_to_string(&world.log)
            .unwrap_or_default()
            .contains("session ended");
        if ends_with_schema && refused {
            break;
        }
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.sigterm();
    w.wait_exit(Duration::from_secs(30));
    let msgs = world.read_stream().await;
    assert_eq!(
        msgs.last().map(|m| m.subject.as_str()),
        Some(schema_subject.as_str()),
        "premise: the stream ends with fresh's _schema:\n{}",
        w.output()
    );
    delete_checkpoint_bucket(&world).await;
    let mut fixed = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    fixed.max_message_size = -1;
    js.update_stream(fixed).await.unwrap();
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO fresh VALUES (2, 'small')").await;
    wait_for_insert(&world, &mut w, "fresh", 2).await;
    let msgs = world.read_stream().await;
    let rows = missing_or_doubled(&insert_counts(&msgs, "fresh"), 1..=2);
    let schemas = msgs.iter().filter(|m| m.subject == schema_subject).count();
    assert!(
        rows.is_empty() && schemas == 1,
        "fresh's rows 1..=2 in the stream: {}; fresh's _schema is in the stream {schemas} times",
        if rows.is_empty() { "each once" } else { &rows }
    );
    assert_exactly_once_in_order(&msgs);
    w.sigterm();
}

// ---------------------------------------------------------------------------
// 3. Checkpoint bucket lost around the initial snapshot.

fn initial_snapshot(world: &World<'_>) -> String {
    world
        .config()
        .replace("mode = \"never\"", "mode = \"initial\"")
}

/// After a restart with no checkpoint, either walnats refuses (non-zero,
/// naming the snapshot) or every row of `big` (1..=rows) is read exactly
/// once and the fence row inserted after the restart follows.
async fn assert_refused_or_every_row_read_once(world: &World<'_>, w: &mut WalnatsProc, rows: i64) {
    world.sql("INSERT INTO fence VALUES (1)").await;
    let js = world.js().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if !w.is_running() {
            let status = w.wait_exit(Duration::from_secs(5));
            let out = last_run_output(world);
            assert!(!status.success(), "walnats exited 0:\n{out}");
            assert!(
                out.contains("snapshot"),
                "walnats refused ({status}) without naming the snapshot:\n{out}"
            );
            return;
        }
        if has_insert(&js, "fence", 1).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "walnats neither refused nor streamed the fence row within 60 s:\n{}",
            w.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let msgs = world.read_stream().await;
    let read_subject = format!("{PREFIX}.public.big.read");
    let mut reads: BTreeMap<i64, usize> = BTreeMap::new();
    for m in msgs.iter().filter(|m| m.subject == read_subject) {
        *reads
            .entry(m.json()["after"]["id"].as_i64().unwrap())
            .or_insert(0) += 1;
    }
    assert_eq!(
        missing_or_doubled(&reads, 1..=rows),
        "",
        "walnats streamed on without refusing, but the stream's reads of big are not its {rows} rows exactly once"
    );
    assert_exactly_once_in_order(&msgs);
    w.sigterm();
}

async fn create_big(world: &World<'_>, rows: i64) {
    world
        .sql(&format!(
            "CREATE TABLE big (id bigint PRIMARY KEY, v text);
             INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, {rows}) g;
             CREATE TABLE fence (id bigint PRIMARY KEY);
             ANALYZE;"
        ))
        .await;
}

/// A table of `rows` rows, and walnats killed with -9 during its initial
/// snapshot once part of it is in the stream; returns walnats' config.
async fn killed_during_the_initial_snapshot(world: &World<'_>, rows: i64) -> String {
    create_big(world, rows).await;
    let cfg = initial_snapshot(world);
    let mut w = world.spawn_with(&cfg, &[]);
    wait_stream_seq(world, &mut w, 3000).await;
    w.kill9();
    let log = std::fs::read_to_string(&world.log).unwrap_or_default();
    assert!(
        !log.contains("snapshot complete"),
        "premise: the snapshot was still running at the kill; make the table bigger"
    );
    cfg
}

/// Issue 14, 3: kill -9 during the initial snapshot and the checkpoint
/// bucket (which held the snapshot's progress) is lost. Resuming after the
/// stream's last read would never publish the rest of the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_bucket_lost_during_the_initial_snapshot_is_refused_or_every_row_is_read_once()
{
    let world = World::new(shared(PgVersion::V15)).await;
    const ROWS: i64 = 120_000;
    let cfg = killed_during_the_initial_snapshot(&world, ROWS).await;
    assert!(
        last_seq(&world).await < ROWS as u64,
        "premise: part of the snapshot is in the stream"
    );
    delete_checkpoint_bucket(&world).await;
    let mut w = world.spawn_with(&cfg, &[]);
    assert_refused_or_every_row_read_once(&world, &mut w, ROWS).await;
}

/// kill -9 during the initial snapshot, then another client publishes into
/// walnats' stream while it is down, a copy of walnats' last read under an
/// id of its own: what the stream holds past the checkpoint is no longer
/// what the announced chunks say (a chunk in part would end with the
/// stranger's message, or a chunk's end holds it), so the next start
/// refuses in one line naming the other writer, and publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_writer_after_an_interrupted_snapshot_is_refused() {
    let world = World::new(shared(PgVersion::V15)).await;
    const ROWS: i64 = 120_000;
    let cfg = killed_during_the_initial_snapshot(&world, ROWS).await;
    // What the dead process had on its way is stored by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A stranger that republishes walnats' last read under an id of its
    // own passes for a read of walnats' (a plain publish is refused before,
    // by `a_foreign_message_*`): only the snapshot's chunks can tell.
    let js = world.js().await;
    let last = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .get_raw_message(last_seq(&world).await)
        .await
        .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in last.headers.iter() {
        let name: &str = name.as_ref();
        // Not its id, its cursor, nor the expected sequence it was stored with.
        if name.starts_with("Nats-") || name == "Cdc-Snapshot-Cursor" {
            continue;
        }
        for v in values {
            headers.insert(name, v.as_str());
        }
    }
    let id = last.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned();
    let (head, seq) = id.rsplit_once(':').unwrap();
    let seq: u64 = seq.parse().unwrap();
    headers.insert(
        "Nats-Msg-Id",
        format!("{head}:{}", seq + 1_000_000).as_str(),
    );
    js.publish_with_headers(last.subject.to_string(), headers, last.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    let tail = last_seq(&world).await;
    let mut w = world.spawn_with(&cfg, &[]);
    assert_refuses(&world, &mut w, &["only writer"], || async {
        "it went on with the snapshot".to_owned()
    })
    .await;
    assert_eq!(last_seq(&world).await, tail, "published after the stranger");
}

/// Issue 14, 3: the slot is there but the checkpoint bucket and the stream
/// are gone (deleted by hand), with `snapshot.mode = "initial"`. Starting
/// as if fresh, with no snapshot, would never publish the table's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_slot_without_checkpoint_or_stream_is_refused_or_every_row_is_read_once() {
    let world = World::new(shared(PgVersion::V15)).await;
    const ROWS: i64 = 5_000;
    create_big(&world, ROWS).await;
    let cfg = initial_snapshot(&world);
    let mut w = world.spawn_with(&cfg, &[]);
    world.wait_streaming(&mut w).await;
    w.sigterm();
    assert!(
        w.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        w.output()
    );
    assert!(
        world.confirmed_flush().await.is_some(),
        "premise: the slot exists"
    );
    delete_checkpoint_bucket(&world).await;
    world.js().await.delete_stream(STREAM).await.unwrap();
    let mut w = world.spawn_with(&cfg, &[]);
    assert_refused_or_every_row_read_once(&world, &mut w, ROWS).await;
}

// ---------------------------------------------------------------------------
// 4, 5. tx_markers changed while a transaction is partly published.

/// The commit LSN of the transaction that inserted row `id` into `table`.
fn commit_of(msgs: &[Msg], table: &str, id: i64) -> String {
    let subject = format!("{PREFIX}.public.{table}.insert");
    msgs.iter()
        .find(|m| m.subject == subject && m.json()["after"]["id"].as_i64() == Some(id))
        .unwrap_or_else(|| panic!("no insert of {table} row {id} in the stream"))
        .header("Cdc-Commit-Lsn")
        .to_owned()
}

/// `_tx` markers of the transaction committed at `commit`: their types in
/// stream order.
fn markers_of(msgs: &[Msg], commit: &str) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.subject == format!("{PREFIX}._tx") && m.header("Cdc-Commit-Lsn") == commit)
        .map(|m| m.json()["type"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The messages of the transactions committed at `commits` (changes,
/// `_schema`s and markers).
fn of_transactions(msgs: &[Msg], commits: &[&str]) -> Vec<Msg> {
    msgs.iter()
        .filter(|m| commits.contains(&m.header("Cdc-Commit-Lsn")))
        .cloned()
        .collect()
}

/// Rows 0 (warm-up), 1..=BIG (the big transaction) and -1, -2 (one later
/// transaction) each in the stream once, in order; changes without the
/// markers are exactly once and in order.
fn assert_every_row_once(msgs: &[Msg]) {
    let counts = insert_counts(msgs, "t");
    assert_eq!(
        missing_or_doubled(&counts, -2..=BIG),
        "",
        "table t's rows in the stream"
    );
    let unmarked: Vec<Msg> = msgs
        .iter()
        .filter(|m| !m.subject.ends_with("._tx"))
        .cloned()
        .collect();
    assert_exactly_once_in_order(&unmarked);
}

/// Issue 14, 4: `tx_markers` on, kill -9 inside a large transaction (its
/// BEGIN and part of its rows are out), restart with `tx_markers` off.
/// The transaction is finished as it began: its END follows its last
/// change; transactions after it carry no markers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_markers_turned_off_inside_a_transaction_finish_it_with_its_end_marker() {
    let world = World::new(shared(PgVersion::V15)).await;
    kill_9_inside_a_big_transaction(&world, &[("WALNATS_OUTPUT_TX_MARKERS", "true")]).await;
    let mut w = world.spawn_with(&world.config(), &[("WALNATS_OUTPUT_TX_MARKERS", "false")]);
    world.wait_streaming(&mut w).await;
    world
        .sql("INSERT INTO t VALUES (-1, 'later'), (-2, 'later')")
        .await;
    wait_for_insert(&world, &mut w, "t", -2).await;
    let msgs = world.read_stream().await;
    let big = commit_of(&msgs, "t", 1);
    let later = commit_of(&msgs, "t", -1);
    assert_eq!(
        markers_of(&msgs, &big),
        ["BEGIN", "END"],
        "the big transaction's markers"
    );
    let warm = commit_of(&msgs, "t", 0);
    assert_tx_markers_frame_transactions(&of_transactions(&msgs, &[&warm, &big]));
    assert_eq!(
        markers_of(&msgs, &later),
        Vec::<String>::new(),
        "a transaction committed after the switch to tx_markers = false has markers"
    );
    assert_every_row_once(&msgs);
    w.sigterm();
}

/// Issue 14, 5: `tx_markers` off, kill -9 inside a large transaction,
/// restart with `tx_markers` on. The transaction that began unmarked ends
/// unmarked (no END without BEGIN); later transactions get both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_markers_turned_on_inside_a_transaction_leave_it_unmarked_and_mark_the_next() {
    let world = World::new(shared(PgVersion::V15)).await;
    kill_9_inside_a_big_transaction(&world, &[("WALNATS_OUTPUT_TX_MARKERS", "false")]).await;
    let mut w = world.spawn_with(&world.config(), &[("WALNATS_OUTPUT_TX_MARKERS", "true")]);
    world.wait_streaming(&mut w).await;
    world
        .sql("INSERT INTO t VALUES (-1, 'later'), (-2, 'later')")
        .await;
    wait_for_insert(&world, &mut w, "t", -2).await;
    let msgs = world.read_stream().await;
    let big = commit_of(&msgs, "t", 1);
    let later = commit_of(&msgs, "t", -1);
    assert_eq!(
        markers_of(&msgs, &big),
        Vec::<String>::new(),
        "the big transaction began without markers"
    );
    assert_eq!(
        markers_of(&msgs, &later),
        ["BEGIN", "END"],
        "a transaction committed after the switch to tx_markers = true"
    );
    assert_tx_markers_frame_transactions(&of_transactions(&msgs, &[&later]));
    assert_every_row_once(&msgs);
    w.sigterm();
}

// ---------------------------------------------------------------------------
// 6. The publication switched while a transaction is partly published.

/// Issue 14, 6: a transaction with rows of `a` and `b` interleaved is
/// partly published when walnats stops cleanly; it restarts with a
/// publication of `a` alone. The transaction is finished with the
/// publication it began with (every row of both tables once, `Cdc-Seq`
/// 0..n without a gap or a renumbering); later ones follow the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_switched_inside_a_transaction_finishes_it_with_the_old_publication() {
    let world = World::new(shared(PgVersion::V15)).await;
    const N: i64 = 20_000;
    world
        .sql(
            "CREATE TABLE a (id bigint PRIMARY KEY); CREATE TABLE b (id bigint PRIMARY KEY);
             CREATE PUBLICATION p_both FOR TABLE a, b; CREATE PUBLICATION p_a FOR TABLE a;",
        )
        .await;
    let both = [
        ("WALNATS_POSTGRES_PUBLICATION", "p_both"),
        // One acknowledgement per message: slow enough to stop inside it.
        ("WALNATS_NATS_FAST_INGEST", "off"),
    ];
    let mut w = world.spawn_with(&world.config(), &both);
    world.wait_streaming(&mut w).await;
    world
        .sql("BEGIN; INSERT INTO a VALUES (0); INSERT INTO b VALUES (0); COMMIT;")
        .await;
    wait_for_insert(&world, &mut w, "b", 0).await;
    let base = last_seq(&world).await;
    world
        .sql(&format!(
            "DO $$ BEGIN FOR i IN 1..{N} LOOP
                INSERT INTO a VALUES (i); INSERT INTO b VALUES (i);
             END LOOP; END $$"
        ))
        .await;
    wait_stream_seq(&world, &mut w, base + 1000).await;
    w.sigterm();
    assert!(
        w.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        w.output()
    );
    assert_partly_published(&world, "b", 1..=N).await;

    let mut w = world.spawn_with(&world.config(), &[("WALNATS_POSTGRES_PUBLICATION", "p_a")]);
    world.wait_streaming(&mut w).await;
    world
        .sql("BEGIN; INSERT INTO a VALUES (-1); INSERT INTO b VALUES (-1); COMMIT;")
        .await;
    world.sql("INSERT INTO a VALUES (-2)").await;
    wait_for_insert(&world, &mut w, "a", -2).await;
    let msgs = world.read_stream().await;
    let a = missing_or_doubled(&insert_counts(&msgs, "a"), -2..=N);
    // b's row -1 committed after the switch to p_a.
    let b = missing_or_doubled(&insert_counts(&msgs, "b"), 0..=N);
    let big = commit_of(&msgs, "a", 1);
    let seqs: Vec<u32> = positioned(&msgs)
        .iter()
        .filter(|m| m.header("Cdc-Commit-Lsn") == big)
        .map(|m| m.position().1)
        .collect();
    let contiguous = seqs.iter().copied().eq(0..2 * N as u32);
    assert!(
        a.is_empty() && b.is_empty() && contiguous,
        "table a's rows -2..={N}: {}; table b's rows 0..={N}: {}; the big transaction has {} changes, \
         Cdc-Seq {}contiguous 0..{}",
        if a.is_empty() { "each once" } else { &a },
        if b.is_empty() { "each once" } else { &b },
        seqs.len(),
        if contiguous { "" } else { "not " },
        2 * N
    );
    assert_exactly_once_in_order(&msgs);
    w.sigterm();
}

// ---------------------------------------------------------------------------
// 7. Nothing is confirmed while the replayed range is unproven.

/// Issue 14, 7: the stream holds many of walnats' own messages after its
/// checkpoint, then a message with a `Nats-Msg-Id` that is not walnats'.
/// The replayed range is refused; while it was being skipped nothing was
/// proven, so neither the checkpoint nor the slot may have moved.
///
/// To make the skipping long: the checkpoint is put back to one written
/// early in the transaction (as a checkpoint write that is slow to land
/// leaves it; the slot cannot be past it, the transaction being
/// unfinished), and the transaction holds a million changes of a table
/// outside the publication between its published rows, which PostgreSQL
/// filters for a second or more in the middle of the replayed range: longer
/// than walnats' 100 ms between checkpoint writes and its status interval.
/// The transaction is unfinished, so today's walnats has nothing to confirm
/// to the slot in that range: only the checkpoint part fails on today's
/// code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_replay_range_writes_no_checkpoint_and_confirms_nothing() {
    let world = World::new(shared(PgVersion::V15)).await;
    const FIRST: i64 = 30_000;
    world
        .sql(
            "CREATE TABLE t (id bigint PRIMARY KEY, v text); CREATE TABLE unpublished (n int);
             CREATE PUBLICATION only_t FOR TABLE t;",
        )
        .await;
    let env = [("WALNATS_POSTGRES_PUBLICATION", "only_t")];
    let mut w = world.spawn_with(&world.config(), &env);
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO t VALUES (0, 'warm-up')").await;
    wait_for_insert(&world, &mut w, "t", 0).await;
    let base = last_seq(&world).await;
    world
        .sql(&format!(
            "BEGIN; {}; INSERT INTO unpublished SELECT g FROM generate_series(1, 1000000) g; {}; COMMIT;",
            big_insert("t", 1, FIRST),
            big_insert("t", FIRST + 1, BIG)
        ))
        .await;
    // A checkpoint from early in the transaction, well before the rows of
    // `unpublished`.
    let kv = world.js().await.get_key_value(BUCKET).await.unwrap();
    let key = checkpoint_key(&world);
    let mut early = None;
    for _ in 0..6000 {
        if let Some(b) = kv.get(key.clone()).await.unwrap() {
            let seq = parse(&b)["stream_seq"].as_u64().unwrap();
            assert!(
                seq < base + FIRST as u64 - 5000,
                "premise: a checkpoint inside the transaction's first rows; the first is at {seq}, \
                 the transaction starts after {base}: make FIRST bigger"
            );
            if seq > base + 100 {
                early = Some(b.to_vec());
                break;
            }
        }
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let early = early.expect("no checkpoint inside the big transaction");
    wait_stream_seq(&world, &mut w, base + FIRST as u64 + 5000).await;
    w.kill9();
    assert_partly_published(&world, "t", 1..=BIG).await;
    put_checkpoint(&world, early).await;
    foreign_publish(&world, Some("someone-else:1")).await;
    let slot_before = world.confirmed_flush().await;
    let before = checkpoint(&world).await;
    let mut w = world.spawn_with(&world.config(), &env);
    assert_refuses(&world, &mut w, &[], || stream_verdict(&world, "t", 0..=BIG)).await;
    let after = checkpoint(&world).await;
    let slot_after = world.confirmed_flush().await;
    assert!(
        after == before && slot_after == slot_before,
        "while the refused range was skipped, the checkpoint went {} -> {}, the slot {slot_before:?} -> {slot_after:?}",
        show(before.as_deref()),
        show(after.as_deref())
    );
}

// ---------------------------------------------------------------------------
// Operator actions.

/// The stream purged while walnats is down (a clean stop): what is written
/// after the purge, while down and after the restart, reaches it exactly
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_purged_while_walnats_is_down_loses_nothing_written_after() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    for i in 1..=5 {
        world.sql(&format!("INSERT INTO t VALUES ({i}, 'x')")).await;
    }
    wait_for_insert(&world, &mut w, "t", 5).await;
    w.sigterm();
    assert!(
        w.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        w.output()
    );
    world
        .js()
        .await
        .get_stream(STREAM)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    for i in 6..=8 {
        world.sql(&format!("INSERT INTO t VALUES ({i}, 'x')")).await;
    }
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    for i in 9..=10 {
        world.sql(&format!("INSERT INTO t VALUES ({i}, 'x')")).await;
    }
    wait_for_insert(&world, &mut w, "t", 10).await;
    let msgs = world.read_stream().await;
    assert_eq!(
        missing_or_doubled(&insert_counts(&msgs, "t"), 6..=10),
        "",
        "rows written after the purge"
    );
    assert_exactly_once_in_order(&msgs);
    w.sigterm();
}

/// The slot dropped and created again by hand while walnats is down: the
/// changes in between are gone with the old slot, so walnats refuses, and
/// moves neither its checkpoint nor the new slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_and_recreated_by_hand_is_refused() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO t VALUES (1, 'x')").await;
    wait_for_insert(&world, &mut w, "t", 1).await;
    w.sigterm();
    assert!(
        w.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        w.output()
    );
    let slot = world.slot();
    world
        .sql("INSERT INTO t VALUES (2, 'lost with the slot')")
        .await;
    world
        .sql(&format!(
            "SELECT pg_drop_replication_slot('{slot}');
             SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');"
        ))
        .await;
    world.sql("INSERT INTO t VALUES (3, 'x')").await;
    let before = checkpoint(&world).await;
    let slot_before = world.confirmed_flush().await;
    let mut w = world.spawn();
    assert_refuses(&world, &mut w, &[], || stream_verdict(&world, "t", 1..=3)).await;
    assert_eq!(checkpoint(&world).await, before, "the checkpoint moved");
    assert_eq!(world.confirmed_flush().await, slot_before, "the slot moved");
}

/// The publication dropped and created again with the same name while
/// walnats is down, with rows written before, between and after: nothing
/// lost, or a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_recreated_while_walnats_is_down_loses_nothing_or_is_refused() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO t VALUES (1, 'x')").await;
    wait_for_insert(&world, &mut w, "t", 1).await;
    w.sigterm();
    assert!(
        w.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        w.output()
    );
    world.sql("INSERT INTO t VALUES (2, 'x')").await;
    world.sql("DROP PUBLICATION walnats").await;
    world.sql("INSERT INTO t VALUES (3, 'x')").await;
    world.sql("CREATE PUBLICATION walnats FOR ALL TABLES").await;
    world.sql("INSERT INTO t VALUES (4, 'x')").await;
    let mut w = world.spawn();
    world.sql("INSERT INTO t VALUES (5, 'x')").await;
    let js = world.js().await;
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        if !w.is_running() {
            let status = w.wait_exit(Duration::from_secs(5));
            assert!(
                !status.success(),
                "walnats exited 0:\n{}",
                last_run_output(&world)
            );
            return;
        }
        if has_insert(&js, "t", 5).await {
            break;
        }
        if Instant::now() >= deadline {
            let what = stream_verdict(&world, "t", 1..=5).await;
            panic!(
                "walnats neither refused nor published row 5 within 45 s; {what}\n{}",
                w.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let msgs = world.read_stream().await;
    assert_eq!(
        missing_or_doubled(&insert_counts(&msgs, "t"), 1..=5),
        "",
        "walnats streamed on without refusing, but not every row is in the stream once"
    );
    assert_exactly_once_in_order(&msgs);
    w.sigterm();
}

/// Waits until `slot` is held by a walsender and has reached its
/// consistent point. A slot being made is active already while it waits
/// for the cluster's running transactions (other tests' too, on the shared
/// server): a row committed then is before the slot, and never decoded.
async fn wait_slot_active(world: &World<'_>, slot: &str, w: &mut WalnatsProc) {
    let client = world.client().await;
    for _ in 0..600 {
        let active = client
            .query(
                "SELECT active AND confirmed_flush_lsn IS NOT NULL FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .first()
            .is_some_and(|r| r.get::<_, bool>(0));
        if active {
            return;
        }
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("slot {slot} never became active:\n{}", w.output());
}

fn spawn_logged(world: &World<'_>, env: &[(&str, &str)], log: &Path) -> WalnatsProc {
    let mut env = env.to_vec();
    env.push(("WALNATS_LOG", "walnats=debug,info"));
    env.push(("NO_COLOR", "1"));
    WalnatsProc::spawn_logged(walnats_bin(), &["run"], &world.config(), &env, log)
}

/// Two walnats with different slots publish to one stream: at least one
/// refuses, saying the stream holds messages not published by it, and no
/// slot is confirmed past a transaction whose changes are not in the
/// stream under that slot's own message ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_walnats_with_different_slots_on_one_stream_refuse_and_confirm_nothing_unproven() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await;
    let slot_a = world.slot();
    let slot_b = format!("{slot_a}_b");
    let dir = harness::temp_dir("walnats-two-");
    let (log_a, log_b) = (dir.join("a.log"), dir.join("b.log"));
    let mut a = spawn_logged(&world, &[], &log_a);
    wait_slot_active(&world, &slot_a, &mut a).await;
    let mut b = spawn_logged(
        &world,
        &[("WALNATS_POSTGRES_SLOT", slot_b.as_str())],
        &log_b,
    );
    wait_slot_active(&world, &slot_b, &mut b).await;
    // One row a transaction; the WAL insert position right after each
    // commit is past its commit record.
    let client = world.client().await;
    let mut after_commit: Vec<(i64, u64)> = Vec::new();
    for i in 1..=30 {
        client
            .batch_execute(&format!("INSERT INTO t VALUES ({i}, 'x')"))
            .await
            .unwrap();
        let at: String = client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        after_commit.push((i, lsn(&at)));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + REFUSAL;
    while a.is_running() && b.is_running() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give the other one a moment to refuse too, or to publish on.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut refusals = Vec::new();
    for (name, w, log) in [("A", &mut a, &log_a), ("B", &mut b, &log_b)] {
        if w.is_running() {
            w.kill9();
            continue;
        }
        let status = w.wait_exit(Duration::from_secs(5));
        refusals.push((name, status, read_last_run(log)));
    }
    let msgs = world.read_stream().await;
    let mut problems = Vec::new();
    for slot in [&slot_a, &slot_b] {
        let confirmed: Option<String> = client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[slot],
            )
            .await
            .unwrap()
            .get(0);
        let confirmed = lsn(&confirmed.unwrap());
        let own = format!(":{slot}:");
        let published: BTreeSet<i64> = msgs
            .iter()
            .filter(|m| m.subject == format!("{PREFIX}.public.t.insert"))
            .filter(|m| m.header("Nats-Msg-Id").contains(&own))
            .map(|m| m.json()["after"]["id"].as_i64().unwrap())
            .collect();
        let unproven: Vec<i64> = after_commit
            .iter()
            .filter(|(i, at)| *at <= confirmed && !published.contains(i))
            .map(|(i, _)| *i)
            .collect();
        if !unproven.is_empty() {
            problems.push(format!(
                "slot {slot} is confirmed at {:X}/{:X}, past rows {unproven:?} whose inserts are not in the stream under its ids",
                confirmed >> 32,
                confirmed & 0xFFFF_FFFF
            ));
        }
    }
    if refusals.is_empty() {
        problems.push(format!("neither walnats refused within {REFUSAL:?}"));
    } else if !refusals
        .iter()
        .any(|(_, s, out)| !s.success() && out.contains("not published by walnats"))
    {
        problems.push(format!(
            "no walnats refused saying `not published by walnats`:\n{}",
            refusals
                .iter()
                .map(|(n, s, out)| format!("{n} ({s}):\n{}", tail_text(out, 3)))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A checkpoint edited in KV to a position far past the end of the WAL:
/// walnats refuses instead of confirming the slot past every change that
/// follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_edited_past_the_end_of_the_wal_is_refused() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO t VALUES (1, 'x')").await;
    wait_for_insert(&world, &mut w, "t", 1).await;
    w.sigterm();
    assert!(
        w.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        w.output()
    );
    world.wait_slot_released().await;
    let mut cp = parse(&checkpoint(&world).await.expect("no checkpoint"));
    cp["confirmed"] = "FF/0".into();
    cp["pos"] = serde_json::json!({"commit_lsn": "FF/0", "seq": 0});
    put_checkpoint(&world, serde_json::to_vec(&cp).unwrap()).await;
    let before = checkpoint(&world).await;
    let slot_before = world.confirmed_flush().await;
    let mut w = world.spawn();
    for i in 2..=3 {
        world.sql(&format!("INSERT INTO t VALUES ({i}, 'x')")).await;
    }
    assert_refuses(
        &world,
        &mut w,
        &["pg_current_wal_lsn", "past the end of the WAL"],
        || async {
            let verdict = stream_verdict(&world, "t", 1..=3).await;
            format!(
                "{verdict}; the slot is confirmed at {:?}",
                world.confirmed_flush().await
            )
        },
    )
    .await;
    assert_eq!(checkpoint(&world).await, before, "the checkpoint moved");
    assert_eq!(world.confirmed_flush().await, slot_before, "the slot moved");
    let client = world.client().await;
    let wal: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let confirmed = world.confirmed_flush().await.unwrap();
    assert!(
        lsn(&confirmed) <= lsn(&wal),
        "the slot is confirmed at {confirmed}, past the end of the WAL ({wal})"
    );
}
