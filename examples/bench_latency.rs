//! Commit → delivery latency, for `scripts/bench`: commits one-row
//! transactions into the bench table at a steady RATE per second for
//! SECONDS, while a running walnats publishes them, and measures for each
//! row the time from its commit (`source.commit_time` in the body: the
//! timestamp PostgreSQL gives the commit record) to its arrival at
//!   - a core NATS subscriber on the subject (delivered as JetStream
//!     stores it), and
//!   - a JetStream ordered push consumer on the stream (delivered from the
//!     stream, after it is stored).
//!
//! Same clock, same box. The first second is warm-up and not counted.
//! For scale it also prints PostgreSQL's own part, from the commit
//! timestamp to the writer seeing its COMMIT return (the WAL flush), and
//! the rest, from the COMMIT returning to the core subscriber.
//!
//!   cargo run --release --example bench_latency -- PG_URL NATS_URL STREAM SUBJECT FIRST_ID [RATE] [SECONDS]
//!
//! Prints one line per receiver: `latency <receiver>: n=.. p50=..ms p99=..ms max=..ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::push};
use futures::StreamExt;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{Mutex, mpsc};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const INSERT: &str = "INSERT INTO bench SELECT g, g % 1000, 'name ' || g, g * 1.01, now(), \
    'user' || g || '@example.com', jsonb_build_object('k', g, 'tags', jsonb_build_array('a', 'b')), \
    g % 2 = 0, gen_random_uuid(), g % 7 FROM (SELECT $1::bigint AS g) s";

/// Connections that commit: a commit waits for its WAL flush, so one
/// connection alone may not keep the rate on a slow disk.
const WRITERS: usize = 4;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// (row id, commit time in µs since the Unix epoch) from a walnats body.
fn row_commit(payload: &[u8]) -> Option<(i64, i64)> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let id = v.get("after")?.get("id")?.as_i64()?;
    let at = v.get("source")?.get("commit_time")?.as_str()?;
    let t = OffsetDateTime::parse(at, &Rfc3339).ok()?;
    Some((id, i64::try_from(t.unix_timestamp_nanos() / 1000).ok()?))
}

/// By row id, from `counted_from` on: (commit time, arrival), µs since the
/// Unix epoch.
type Samples = Arc<Mutex<HashMap<i64, (i64, i64)>>>;

/// Records a row's arrival now (from the warm-up on); true once the last
/// row has arrived.
async fn arrived(samples: &Samples, payload: &[u8], counted_from: i64, last_id: i64) -> bool {
    let at = now_us();
    let Some((id, commit)) = row_commit(payload) else {
        return false;
    };
    if id >= counted_from {
        samples.lock().await.insert(id, (commit, at));
    }
    id >= last_id
}

fn report(name: &str, samples: &HashMap<i64, (i64, i64)>, want: usize) {
    let mut v: Vec<i64> = samples.values().map(|(commit, at)| at - commit).collect();
    v.sort_unstable();
    let pct = |p: f64| {
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v.get(i).map_or(f64::NAN, |us| *us as f64 / 1000.0)
    };
    println!(
        "latency {name}: n={}/{want} p50={:.2}ms p90={:.2}ms p99={:.2}ms max={:.2}ms",
        v.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [pg_url, nats_url, stream, subject, first_id, rest @ ..] = args.as_slice() else {
        return Err(
            "usage: bench_latency PG_URL NATS_URL STREAM SUBJECT FIRST_ID [RATE] [SECONDS]".into(),
        );
    };
    let first_id: i64 = first_id.parse()?;
    let rate: u64 = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(300);
    let seconds: u64 = rest.get(1).map(|s| s.parse()).transpose()?.unwrap_or(10);
    // Rows committed in the first second are warm-up.
    let counted_from = first_id + i64::try_from(rate)?;
    let total = rate * seconds;
    let last_id = first_id + i64::try_from(total)? - 1;
    let want = usize::try_from(last_id - counted_from + 1)?;

    let nats = async_nats::connect(nats_url.as_str()).await?;
    let core: Samples = Arc::default();
    let mut sub = nats.subscribe(subject.clone()).await?;
    let core_task = {
        let core = Arc::clone(&core);
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if arrived(&core, &m.payload, counted_from, last_id).await {
                    break;
                }
            }
        })
    };
    let js = jetstream::new(nats.clone());
    let consumer = js
        .get_stream(stream)
        .await?
        .create_consumer(push::OrderedConfig {
            deliver_subject: nats.new_inbox(),
            filter_subject: subject.clone(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let ordered: Samples = Arc::default();
    let ordered_task = {
        let ordered = Arc::clone(&ordered);
        tokio::spawn(async move {
            while let Some(Ok(m)) = messages.next().await {
                if arrived(&ordered, &m.payload, counted_from, last_id).await {
                    break;
                }
            }
        })
    };

    // Writers take ids from one queue; the pacer fills it at RATE.
    let (tx, rx) = mpsc::channel::<i64>(1024);
    let rx = Arc::new(Mutex::new(rx));
    let mut writers = Vec::new();
    // When each row's COMMIT returned, by row id.
    let done: Arc<Mutex<HashMap<i64, i64>>> = Arc::default();
    for _ in 0..WRITERS {
        let (client, conn) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let rx = Arc::clone(&rx);
        let done = Arc::clone(&done);
        writers.push(tokio::spawn(async move {
            let stmt = client.prepare(INSERT).await?;
            loop {
                let next = rx.lock().await.recv().await;
                let Some(id) = next else { break };
                client.execute(&stmt, &[&id]).await?;
                done.lock().await.insert(id, now_us());
            }
            Ok::<(), tokio_postgres::Error>(())
        }));
    }
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for id in first_id..=last_id {
        tick.tick().await;
        tx.send(id).await?;
    }
    drop(tx);
    for w in writers {
        w.await??;
    }
    let committed_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "latency: {total} one-row transactions in {committed_s:.2}s ({:.0} tx/s)",
        total as f64 / committed_s
    );
    let wait = Duration::from_secs(10);
    let _ = tokio::time::timeout(wait, core_task).await;
    let _ = tokio::time::timeout(wait, ordered_task).await;
    let core = core.lock().await;
    let done = done.lock().await;
    let pg: HashMap<i64, (i64, i64)> = core
        .iter()
        .filter_map(|(id, (commit, _))| Some((*id, (*commit, *done.get(id)?))))
        .collect();
    report("postgres commit returned", &pg, want);
    // walnats' part and NATS': from the COMMIT returning to the subscriber
    // (the walsender sends once the WAL is flushed, so this can be < 0).
    let after: HashMap<i64, (i64, i64)> = core
        .iter()
        .filter_map(|(id, (_, at))| Some((*id, (*done.get(id)?, *at))))
        .collect();
    report("commit returned -> core subscriber", &after, want);
    report("core subscriber", &core, want);
    report("ordered consumer", &*ordered.lock().await, want);
    Ok(())
}
