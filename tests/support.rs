//! What the walnats tests share on top of the harness: a fresh database and
//! nats-server per test, walnats configs, reading the stream back, and the
//! checks that define "exactly once, in order".

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures::StreamExt;

use crate::harness::{self, NatsServer, PgServer, PgVersion, WalnatsProc};

pub const STREAM: &str = "CDC_TEST";
pub const PREFIX: &str = "cdc.test";

pub fn walnats_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_walnats"))
}

/// One test's world: a database of its own on a (possibly shared)
/// PostgreSQL, and a nats-server of its own.
pub struct World<'a> {
    pub pg: &'a PgServer,
    pub nats: NatsServer,
    pub db: String,
    /// Every walnats run of this world appends here.
    pub log: std::path::PathBuf,
}

impl<'a> World<'a> {
    pub async fn new(pg: &'a PgServer) -> World<'a> {
        let db = pg.create_database().await;
        let nats = NatsServer::start().await;
        let log = harness::temp_dir("walnats-world-").join("walnats.log");
        World { pg, nats, db, log }
    }

    pub fn pg_url(&self) -> String {
        format!("{}?sslmode=disable", self.pg.url(&self.db))
    }

    /// A config for this world; `extra` is appended (later keys of a
    /// section must not repeat: use `env` overrides for those).
    pub fn config(&self) -> String {
        format!(
            "[postgres]\nurl = \"{}\"\nslot = \"{}\"\nstatus_interval_ms = 200\n\
             [nats]\nurl = \"{}\"\nstream = \"{STREAM}\"\nsubject_prefix = \"{PREFIX}\"\n\
             [snapshot]\nmode = \"never\"\n[http]\nlisten = \"\"\n",
            self.pg_url(),
            self.slot(),
            self.nats.url()
        )
    }

    pub fn slot(&self) -> String {
        format!("s_{}", self.db)
    }

    pub fn spawn(&self) -> WalnatsProc {
        self.spawn_with(&self.config(), &[])
    }

    pub fn spawn_with(&self, config: &str, env: &[(&str, &str)]) -> WalnatsProc {
        let mut env: Vec<(&str, &str)> = env.to_vec();
        env.push(("WALNATS_LOG", "walnats=debug,info"));
        env.push(("NO_COLOR", "1"));
        WalnatsProc::spawn_logged(walnats_bin(), &["run"], config, &env, &self.log)
    }

    pub async fn sql(&self, sql: &str) {
        self.pg.execute(&self.db, sql).await;
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        self.pg.client(&self.db).await
    }

    pub async fn js(&self) -> jetstream::Context {
        let client = async_nats::connect(self.nats.url())
            .await
            .expect("connect to nats");
        jetstream::new(client)
    }

    /// Waits until walnats holds the slot and streams (the slot is active
    /// and made: while CREATE_REPLICATION_SLOT waits for other databases'
    /// transactions to end, the slot is already active but has no
    /// consistent point, and a row written then is before the slot).
    pub async fn wait_streaming(&self, w: &mut WalnatsProc) {
        self.wait_streaming_on(self.pg, w).await;
    }

    /// As `wait_streaming`, for a slot on `pg`, which holds this world's
    /// database too (a standby of `self.pg`, or the server promoted in its
    /// place).
    pub async fn wait_streaming_on(&self, pg: &PgServer, w: &mut WalnatsProc) {
        let client = pg.client(&self.db).await;
        let slot = self.slot();
        let mut tries = 0;
        loop {
            let rows = client
                .query(
                    "SELECT active AND confirmed_flush_lsn IS NOT NULL \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .unwrap();
            if rows.first().is_some_and(|r| r.get::<_, bool>(0)) {
                return;
            }
            tries += 1;
            assert!(w.is_running(), "walnats exited:\n{}", w.output());
            assert!(
                tries < 300,
                "walnats did not start streaming:\n{}",
                w.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (up to 10 s) until no walsender holds the slot: a walnats that
    /// exited may have sent a last status update its walsender has not read
    /// yet, and the slot moves once it does.
    pub async fn wait_slot_released(&self) {
        let client = self.client().await;
        for _ in 0..100 {
            let rows = client
                .query(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.slot()],
                )
                .await
                .unwrap();
            if !rows.first().is_some_and(|r| r.get::<_, bool>(0)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("slot {} is still held by a walsender", self.slot());
    }

    pub async fn confirmed_flush(&self) -> Option<String> {
        let client = self.client().await;
        let rows = client
            .query(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot()],
            )
            .await
            .unwrap();
        rows.first().and_then(|r| r.get(0))
    }

    pub async fn read_stream(&self) -> Vec<Msg> {
        read_stream(&self.js().await, STREAM).await
    }

    /// Waits until the stream holds at least `n` change messages.
    pub async fn wait_changes(&self, n: usize, w: &WalnatsProc) -> Vec<Msg> {
        let js = self.js().await;
        let mut last = 0;
        // Generous: every walsender of the shared server decodes all of the
        // cluster's WAL, so under a loaded machine a slot can lag a while.
        for _ in 0..1800 {
            // A walnats that stopped will not deliver: fail now, with its log.
            if let Some(pid) = w.pid() {
                assert!(
                    harness::process::is_alive(pid),
                    "walnats exited:\n{}",
                    w.output()
                );
            }
            let msgs = read_stream(&js, STREAM).await;
            let changes: Vec<Msg> = msgs.into_iter().filter(Msg::is_change).collect();
            if changes.len() >= n {
                return changes;
            }
            last = changes.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("only {last} of {n} changes arrived:\n{}", w.output());
    }
}

/// One message as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub seq: u64,
    pub subject: String,
    pub headers: BTreeMap<String, String>,
    pub payload: Vec<u8>,
}

impl Msg {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "body of {} is not JSON ({e}): {:?}",
                self.subject,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }

    /// Changes and `_message`s carry a position; `_schema` and `_tx`
    /// messages do not count.
    pub fn is_change(&self) -> bool {
        !self.subject.contains("._schema.") && !self.subject.ends_with("._tx")
    }

    pub fn position(&self) -> (u64, u32) {
        (
            lsn(self.header("Cdc-Commit-Lsn")),
            self.header("Cdc-Seq").parse().unwrap(),
        )
    }
}

pub fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap_or_else(|| panic!("bad LSN {s:?}"));
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn to_msg(seq: u64, subject: &str, headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Msg {
    let mut h = BTreeMap::new();
    if let Some(hs) = headers {
        for (k, vs) in hs.iter() {
            let name: &str = k.as_ref();
            if let Some(v) = vs.first() {
                h.insert(name.to_owned(), v.as_str().to_owned());
            }
        }
    }
    Msg {
        seq,
        subject: subject.to_owned(),
        headers: h,
        payload: payload.to_vec(),
    }
}

/// Every message the stream still holds, in stream order.
pub async fn read_stream(js: &jetstream::Context, stream: &str) -> Vec<Msg> {
    let Ok(mut s) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let info = s.info().await.unwrap().clone();
    if info.state.messages == 0 {
        return Vec::new();
    }
    let last = info.state.last_sequence;
    // A cluster that just lost its stream leader can time out a consumer
    // create while it elects another: try again for a while.
    let mut tries = 0;
    let consumer = loop {
        match s
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
        {
            Ok(c) => break c,
            Err(e) if tries < 10 => {
                tries += 1;
                eprintln!("read_stream: creating the consumer failed ({e}); trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("cannot create a consumer on {stream}: {e}"),
        }
    };
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
        let m = m.unwrap();
        let seq = m.info().unwrap().stream_sequence;
        out.push(to_msg(
            seq,
            m.subject.as_str(),
            m.headers.as_ref(),
            &m.payload,
        ));
        if seq >= last {
            break;
        }
    }
    out
}

/// The contract's order and uniqueness, checked on what a consumer read:
/// no `Nats-Msg-Id` twice, positions strictly increasing, and within each
/// transaction `Cdc-Seq` running 0, 1, 2... without a gap.
pub fn assert_exactly_once_in_order(msgs: &[Msg]) {
    let mut ids = HashSet::new();
    for m in msgs {
        assert!(
            ids.insert(m.header("Nats-Msg-Id").to_owned()),
            "duplicate message {} at stream seq {}",
            m.header("Nats-Msg-Id"),
            m.seq
        );
    }
    assert_tx_markers_frame_transactions(msgs);
    let changes: Vec<&Msg> = msgs.iter().filter(|m| m.is_change()).collect();
    for w in changes.windows(2) {
        assert!(
            w[0].position() < w[1].position(),
            "out of order: {} (seq {}) then {} (seq {})",
            w[0].header("Nats-Msg-Id"),
            w[0].seq,
            w[1].header("Nats-Msg-Id"),
            w[1].seq
        );
        let (a, b) = (w[0].position(), w[1].position());
        if a.0 == b.0 {
            assert_eq!(
                b.1,
                a.1 + 1,
                "gap inside transaction {}",
                w[1].header("Cdc-Commit-Lsn")
            );
        } else if !w[1].header("Cdc-Xid").is_empty() {
            assert_eq!(
                b.1,
                0,
                "transaction {} starts at seq {}",
                w[1].header("Cdc-Commit-Lsn"),
                b.1
            );
        }
    }
}

/// When `_tx` markers are present: each transaction's changes stand between
/// exactly one BEGIN and one END of its commit LSN, and END's counts equal
/// the changes in between.
pub fn assert_tx_markers_frame_transactions(msgs: &[Msg]) {
    if !msgs.iter().any(|m| m.subject.ends_with("._tx")) {
        return;
    }
    let mut open: Option<(String, u64)> = None;
    for m in msgs {
        if m.subject.ends_with("._tx") {
            let body = m.json();
            let commit = m.header("Cdc-Commit-Lsn").to_owned();
            match body["type"].as_str() {
                Some("BEGIN") => {
                    assert!(open.is_none(), "BEGIN {commit} inside {open:?}");
                    open = Some((commit, 0));
                }
                Some("END") => {
                    let (c, n) = open
                        .take()
                        .unwrap_or_else(|| panic!("END {commit} without BEGIN"));
                    assert_eq!(c, commit, "END of another transaction");
                    assert_eq!(
                        body["event_count"].as_u64(),
                        Some(n),
                        "END {commit} counts {n} changes"
                    );
                }
                other => panic!("bad _tx type {other:?}"),
            }
        } else if m.is_change() && !m.header("Cdc-Xid").is_empty() {
            let (c, n) = open
                .as_mut()
                .unwrap_or_else(|| panic!("change {} outside BEGIN/END", m.header("Nats-Msg-Id")));
            assert_eq!(
                *c,
                m.header("Cdc-Commit-Lsn"),
                "change of another transaction inside BEGIN/END"
            );
            *n += 1;
        }
    }
    assert!(open.is_none(), "a transaction has no END");
}

/// A small deterministic PRNG (xorshift) so that fault timings vary per
/// run but a failing seed can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn from_env() -> Rng {
        let seed = std::env::var("WALNATS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("WALNATS_TEST_SEED={seed}");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

pub fn shared(version: PgVersion) -> &'static PgServer {
    harness::shared_pg(version)
}

/// A test certificate authority: its PEM and the issuer that signs leaves.
pub fn test_ca() -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "walnats test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = ca.self_signed(&key).unwrap();
    (cert.pem(), rcgen::Issuer::new(ca, key))
}

/// A certificate for `names` (DNS names or IP addresses) signed by
/// `issuer`: (certificate PEM, key PEM).
pub fn test_leaf(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    names: &[&str],
) -> (String, String) {
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .unwrap();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().copied().unwrap_or("walnats"),
    );
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The peak resident set size of a running process (`VmHWM` in
/// `/proc/<pid>/status`), in bytes; `None` once it is gone.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// `config` with one `[[outbox]]` table appended per entry, an entry being
/// that table's keys (`"table = \"public.outbox\"\nheaders = [\"type\"]"`).
/// Arrays of tables go after every plain section, so this comes last.
pub fn with_outbox(config: &str, entries: &[&str]) -> String {
    let mut out = config.to_owned();
    if !out.ends_with('\n') {
        out.push('\n');
    }
    for entry in entries {
        out.push_str("[[outbox]]\n");
        out.push_str(entry);
        out.push('\n');
    }
    out
}
