//! Production runs NATS as a cluster: three nats-servers on loopback, an
//! R3 stream, and the stream's leader killed under load. walnats follows
//! the cluster's other URLs and loses or doubles nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::harness::{NatsServer, PgVersion, WalnatsProc, free_port};
use crate::support::{
    Msg, PREFIX, STREAM, assert_exactly_once_in_order, read_stream, shared, walnats_bin,
};

async fn cluster() -> Vec<NatsServer> {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let routes: Vec<String> = ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect();
    let mut nodes = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let conf = format!(
            "server_name: n{i}\ncluster {{\n  name: walnats\n  listen: 127.0.0.1:{p}\n  routes: [{}]\n}}\n",
            routes.join(", ")
        );
        nodes.push(NatsServer::start_with(Some(&conf)).await);
    }
    nodes
}

/// walnats streaming `db` on `nodes` into an R3 stream; `env` for its
/// process. Returns it, once its slot is active, with its config and a
/// JetStream context on the cluster.
async fn walnats_on_cluster(
    pg: &crate::harness::PgServer,
    db: &str,
    nodes: &[NatsServer],
    env: &[(&str, &str)],
) -> (WalnatsProc, String, async_nats::jetstream::Context) {
    let urls: Vec<String> = nodes.iter().map(NatsServer::url).collect();
    let config = format!(
        "[postgres]\nurl = \"{}?sslmode=disable\"\nslot = \"c_{db}\"\nstatus_interval_ms = 200\n\
         [nats]\nurl = \"{}\"\nstream = \"{STREAM}\"\nsubject_prefix = \"{PREFIX}\"\nreplicas = 3\nack_timeout_ms = 3000\n\
         [snapshot]\nmode = \"never\"\n[http]\nlisten = \"\"\n",
        pg.url(db),
        urls.join(",")
    );
    let mut env = env.to_vec();
    env.push(("WALNATS_LOG", "walnats=debug,info"));
    let mut w = WalnatsProc::spawn(walnats_bin(), &["run"], &config, &env);
    let addrs: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().unwrap()).collect();
    let client = async_nats::ConnectOptions::new()
        .connect(addrs)
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let slot = format!("c_{db}");
    let mut streaming = false;
    for _ in 0..600 {
        let c = pg.client(db).await;
        let active: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE active AND slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        if active == 1 {
            streaming = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        streaming,
        "walnats did not stream on the cluster:\n{}",
        w.output()
    );
    assert!(w.is_running(), "{}", w.output());
    (w, config, js)
}

/// Three-row inserts into `load_a`, every 5 ms, until `stop`.
fn insert_load(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) {
            c.batch_execute("BEGIN; INSERT INTO load_a (v) SELECT md5(g::text) FROM generate_series(1, 3) g; COMMIT;")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_of_a_3_node_cluster_loses_and_duplicates_nothing() {
    let pg = shared(PgVersion::V15);
    let db = pg.create_database().await;
    pg.execute(
        &db,
        "CREATE TABLE load_a (id bigserial PRIMARY KEY, v text, n int NOT NULL DEFAULT 0)",
    )
    .await;
    let nodes = cluster().await;
    let (mut w, _, js) = walnats_on_cluster(pg, &db, &nodes, &[]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = insert_load(
        format!("{}?sslmode=disable", pg.url(&db)),
        Arc::clone(&stop),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leader = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .expect("no stream leader");
    let idx: usize = leader.trim_start_matches('n').parse().unwrap();
    nodes[idx].kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    nodes[idx].start_again().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    let c = pg.client(&db).await;
    let ids: Vec<i64> = c
        .query("SELECT id FROM load_a ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let subject = format!("{PREFIX}.public.load_a.insert");
    for _ in 0..600 {
        let msgs: Vec<Msg> = read_stream(&js, STREAM).await;
        if msgs.iter().filter(|m| m.subject == subject).count() >= ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let msgs = read_stream(&js, STREAM).await;
    assert!(w.is_running(), "walnats gave up:\n{}", w.output());
    assert_exactly_once_in_order(&msgs);
    let streamed: Vec<i64> = msgs
        .iter()
        .filter(|m| m.subject == subject)
        .map(|m| m.json()["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(streamed, ids, "stream and table differ:\n{}", w.output());
    w.sigterm();
}

/// `walnats snapshot` on an R3 stream under an insert load, in 50-row
/// chunks: each chunk's atomic batch goes out among the fast-ingest
/// batches of the streamed changes, several in flight, and names the
/// sequence it must follow, which the cluster checks at its commit. Every
/// row arrives once as a read, the stream holds every message once and in
/// order, and no publish was refused on the way (a batch stored out of
/// turn would be, and walnats would start over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reread_on_a_3_node_cluster_among_streamed_changes_reads_every_row_once() {
    const ROWS: i64 = 5000;
    let pg = shared(PgVersion::V15);
    let db = pg.create_database().await;
    pg.execute(
        &db,
        &format!(
            "CREATE TABLE load_a (id bigserial PRIMARY KEY, v text, n int NOT NULL DEFAULT 0);
             CREATE TABLE big (id bigint PRIMARY KEY, v text);
             INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g;"
        ),
    )
    .await;
    let nodes = cluster().await;
    let env = [("WALNATS_SNAPSHOT_CHUNK_ROWS", "50")];
    let (mut w, config, js) = walnats_on_cluster(pg, &db, &nodes, &env).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = insert_load(
        format!("{}?sslmode=disable", pg.url(&db)),
        Arc::clone(&stop),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, out, err) = crate::cli::run(&["snapshot", "public.big"], &config, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let mut done = false;
    for _ in 0..1200 {
        if w.output().contains("snapshot of table complete") {
            done = true;
            break;
        }
        assert!(w.is_running(), "walnats gave up:\n{}", w.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(done, "the re-read did not finish:\n{}", w.output());
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let c = pg.client(&db).await;
    let inserted: i64 = c
        .query_one("SELECT count(*) FROM load_a", &[])
        .await
        .unwrap()
        .get(0);
    let inserts = format!("{PREFIX}.public.load_a.insert");
    let mut msgs: Vec<Msg> = Vec::new();
    for _ in 0..600 {
        msgs = read_stream(&js, STREAM).await;
        if msgs.iter().filter(|m| m.subject == inserts).count() as i64 >= inserted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_exactly_once_in_order(&msgs);
    let log = w.output();
    for refusal in ["JetStream refused", "resuming from the stream"] {
        assert!(!log.contains(refusal), "a publish was refused:\n{log}");
    }
    let mut read: Vec<i64> = msgs
        .iter()
        .filter(|m| m.subject == format!("{PREFIX}.public.big.read"))
        .map(|m| m.json()["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(read.len() as i64, ROWS, "every row once");
    read.sort_unstable();
    assert_eq!(read, (1..=ROWS).collect::<Vec<_>>());
    assert_eq!(
        msgs.iter().filter(|m| m.subject == inserts).count() as i64,
        inserted
    );
    w.sigterm();
}
