//! Wires source → decode → event → encode → publish → ack → checkpoint →
//! standby status, and restarts the whole session on transient errors.
//!
//! A session is one replication connection and one NATS connection. Any
//! transient failure (PostgreSQL or NATS gone, a publish not acknowledged)
//! ends the session; the next one resumes from the checkpoint and the
//! stream's tail, which is the same path as a restart after `kill -9`, so
//! the recovery that crash tests exercise is the only recovery there is.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::checkpoint::ledger::{Acked, Ledger, Meters};
use crate::checkpoint::replay::Replay;
use crate::checkpoint::{self, Checkpoint, Shape, Store, StoredReader};
use crate::config::{self, Config, OversizePolicy, PgConnectConfig, SnapshotMode};
use crate::encode::{self, Encoder, OutMsg};
use crate::error::{Error, Kind, Result, Retry};
use crate::event::{Body, Event, Op, RelationCache, RelationInfo, TxInfo, TypeResolver};
use crate::http::{self, Health};
use crate::lsn::{Lsn, Position};
use crate::pgoutput::{self, Message};
use crate::sink::oversize::OversizeStore;
use crate::sink::{self, Publisher};
use crate::snapshot::{self, SnapshotState, reread};
use crate::source::upkeep::{self, WalWatch};
use crate::source::{self, ReplicationConn, ReplicationMessage, setup};

/// The pgoutput protocol version to ask for: the highest the server knows.
pub fn proto_version(server_version_num: u32) -> u32 {
    match server_version_num {
        v if v >= 160_000 => 4,
        v if v >= 150_000 => 3,
        v if v >= 140_000 => 2,
        _ => 1,
    }
}

/// Runs sessions until shutdown or a definite error. Transient errors
/// restart the session after a capped, jittered exponential backoff; a slot
/// held by another walsender makes this process a standby that polls.
pub async fn run(
    cfg: Arc<Config>,
    mut shutdown: watch::Receiver<bool>,
    health: Arc<Health>,
) -> Result<()> {
    let mut failures: u32 = 0;
    let mut standby = false;
    let wal_watch = Arc::new(WalWatch::default());
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        let result = Box::pin(session(&cfg, shutdown.clone(), &health, &wal_watch)).await;
        health.set_ready(false);
        let err = match result {
            Ok(Ended::Shutdown) => return Ok(()),
            Ok(Ended::Restart) => {
                // Give the walsender a moment to let go of the slot.
                failures = 0;
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            Err(e) => e,
        };
        metrics::counter!(http::ERRORS, "kind" => err.kind().name()).increment(1);
        if err.retry() == Retry::Definite {
            return Err(err);
        }
        if started.elapsed() > Duration::from_secs(60) {
            failures = 0;
        }
        let delay = if err.kind() == Kind::SlotInUse {
            if !standby {
                info!(slot = %cfg.postgres.slot, cause = %err, "slot is in use; standing by");
                standby = true;
            }
            Duration::from_secs(1)
        } else {
            standby = false;
            failures = failures.saturating_add(1);
            let d = backoff(failures);
            warn!(error = %err, kind = err.kind().name(), retry_in_ms = d.as_millis() as u64, "session ended; resuming");
            d
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// How a session ended without an error.
enum Ended {
    /// SIGTERM/SIGINT: drained, checkpoint written.
    Shutdown,
    /// Settings changed while a transaction was partly published: it is
    /// finished with the settings it began with, and the next session
    /// starts at its end with the new ones.
    Restart,
}

/// The position of a non-transactional message. pgoutput gives a
/// message the LSN where its WAL record *ends*, which is where the next
/// record starts, and that can be a commit record: a transaction
/// committing right after the message would share the LSN (and with seq
/// 0, the message id, which JetStream then drops as a duplicate). One
/// byte earlier is still inside the message's own record, where no commit
/// record can start, and sorts before that transaction.
pub fn record_inside(end: Lsn) -> Lsn {
    Lsn::from_u64(end.as_u64().saturating_sub(1))
}

/// One walnats per slot, also while no walsender holds it (the initial
/// snapshot reads before streaming starts): a session-level advisory lock
/// on the SQL connection, released when the session's connection closes
/// (or the process dies). A second walnats finds it taken and stands by.
///
/// Any database user may take any advisory lock, and `pg_locks` shows
/// every held key. So the key includes a secret kept in the checkpoint
/// bucket, and a holder that is not walnats' own role is an impostor that
/// saw the key: walnats makes a new secret and locks that instead. Every
/// walnats of a slot reads the secret before it locks, so they all
/// contend for the same key (they must run as the same role).
async fn hold_slot_lock(sql: &tokio_postgres::Client, slot: &str, store: &Store) -> Result<()> {
    for _ in 0..3 {
        let (secret, revision) = store.lock_secret().await?;
        let key = format!("walnats slot {slot} {secret}");
        let row = sql
            .query_one(
                "SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtextextended($1, 0)), \
                 pg_catalog.hashtextextended($1, 0), current_user::text",
                &[&key],
            )
            .await
            .map_err(|e| crate::event::relation::pg_query_err("taking walnats' slot lock", e))?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        let (lock, me): (i64, String) = (row.get(1), row.get(2));
        let holder = sql
            .query_opt(
                "SELECT l.pid, a.usename::text, a.application_name FROM pg_catalog.pg_locks l \
                 JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                 AND ((l.classid::int8 << 32) | l.objid::int8) = $1 LIMIT 1",
                &[&lock],
            )
            .await
            .map_err(|e| {
                crate::event::relation::pg_query_err("looking up who holds walnats' slot lock", e)
            })?
            .map(|r| {
                (
                    r.get::<_, i32>(0),
                    r.get::<_, Option<String>>(1),
                    r.get::<_, Option<String>>(2),
                )
            });
        let (pid, user, app) = holder.unwrap_or((0, None, None));
        let user = user.unwrap_or_default();
        if user != me && pid != 0 {
            warn!(%slot, pid, holder_user = %user, application_name = %app.unwrap_or_default(),
                "walnats' slot lock is held by a session of another role, not a walnats: it saw the key in \
                 pg_locks; taking a new secret key (end that session with pg_terminate_backend)");
            store.rotate_lock_secret(revision).await?;
            continue;
        }
        return Err(Error::new(
            Kind::SlotInUse,
            format!(
                "slot {slot:?} is held by another walnats (its lock is taken by pid {pid}, user {user:?}, \
                 application_name {:?})",
                app.unwrap_or_default()
            ),
        ));
    }
    Err(Error::new(
        Kind::SlotInUse,
        format!("slot {slot:?}: other roles keep taking walnats' lock; retrying"),
    ))
}

/// 200 ms doubling to 30 s, with up to 25% jitter so that a fleet does not
/// reconnect in lockstep.
fn backoff(failures: u32) -> Duration {
    let base = 200u64.saturating_mul(1u64 << failures.min(8).saturating_sub(1));
    let base = base.min(30_000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let jitter = base / 4 * u64::from(nanos % 1000) / 1000;
    Duration::from_millis(base + jitter)
}

/// Everything a session needs from PostgreSQL's SQL side and NATS, set up
/// and checked; shared by `run`, `check` and `status`.
pub struct Connected {
    pub pg: PgConnectConfig,
    pub sql: Arc<tokio_postgres::Client>,
    pub db: String,
    pub prefix: String,
    pub stream_name: String,
    pub js: async_nats::jetstream::Context,
}

impl Connected {
    /// The checkpoint store of this stream, database and slot; creates the
    /// bucket when it is missing.
    pub async fn store(&self, cfg: &Config) -> Result<Store> {
        Store::open(
            &self.js,
            &cfg.nats.checkpoint_bucket,
            cfg.nats.replicas,
            &self.stream_name,
            &self.db,
            &cfg.postgres.slot,
        )
        .await
    }

    /// As `store`, but `None` when the bucket does not exist: commands that
    /// only read or delete must not create it.
    pub async fn existing_store(&self, cfg: &Config) -> Result<Option<Store>> {
        if self
            .js
            .get_key_value(&cfg.nats.checkpoint_bucket)
            .await
            .is_err()
        {
            return Ok(None);
        }
        self.store(cfg).await.map(Some)
    }
}

pub async fn connect_both(cfg: &Config) -> Result<Connected> {
    let pg = cfg.postgres.connect.clone();
    let sql = Arc::new(source::connect_sql(&pg).await?);
    let db = setup::database_name(&sql).await?;
    let nats = sink::connect(&cfg.nats).await?;
    let js = sink::context(nats, &cfg.nats);
    Ok(Connected {
        prefix: cfg.nats.subject_prefix_for(&db),
        stream_name: cfg.nats.stream_for(&db),
        pg,
        sql,
        db,
        js,
    })
}

/// NATS alone, for commands that only read the stream: the database name
/// (for default names) comes from PostgreSQL only when the config does not
/// name both the stream and the prefix.
pub async fn connect_nats_only(
    cfg: &Config,
) -> Result<(async_nats::jetstream::Context, String, String)> {
    let (prefix, stream) = match (&cfg.nats.subject_prefix, &cfg.nats.stream) {
        (Some(p), Some(s)) => (p.clone(), s.clone()),
        _ => {
            let sql = source::connect_sql(&cfg.postgres.connect).await?;
            let db = setup::database_name(&sql).await?;
            (cfg.nats.subject_prefix_for(&db), cfg.nats.stream_for(&db))
        }
    };
    let nats = sink::connect(&cfg.nats).await?;
    Ok((sink::context(nats, &cfg.nats), prefix, stream))
}

type WriteFuture = Pin<Box<dyn Future<Output = Result<Checkpoint>> + Send>>;

/// Keys a re-read window remembers before it gives up on its chunk.
const MAX_WINDOW_KEYS: usize = 100_000;

/// The re-read chunk between its watermarks.
struct Window {
    id: String,
    oid: u32,
    pk: Vec<String>,
    /// The table as the catalog describes it now, for the reads.
    rel: Arc<RelationInfo>,
    task: Option<tokio::task::JoinHandle<Result<snapshot::catalog::Chunk>>>,
    chunk: Option<snapshot::catalog::Chunk>,
    open: bool,
    /// Primary keys changed between the low and the high watermark.
    changed: std::collections::HashSet<Vec<String>>,
    /// A change whose key the window could not tell: read the chunk again.
    unknown: bool,
}

impl Drop for Window {
    /// A session that ends mid-window must not leave its reader running on
    /// the session's SQL connection (which holds the slot lock).
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

struct OpenTx {
    info: TxInfo,
    next_seq: u32,
    /// Changes per table, for the END marker (only with tx_markers).
    counts: Vec<(String, u64)>,
}

struct Session {
    cfg: Arc<Config>,
    conn: ReplicationConn,
    decoder: pgoutput::Decoder,
    cache: RelationCache,
    encoder: Encoder,
    publisher: Publisher,
    /// Where oversized bodies go with `on_oversize = "object_store"`.
    oversize: Option<OversizeStore>,
    stream_name: String,
    store: Arc<Store>,
    /// Acknowledged → durable → confirmable.
    ledger: Ledger,
    writing: Option<WriteFuture>,
    tx: Option<OpenTx>,
    /// What the stream already holds of this session's replay, and how much
    /// of it is proven.
    replay: Replay,
    /// The stream's messages that `replay` compares with.
    stored: StoredReader,
    /// The settings this session publishes with: the checkpoint's while a
    /// transaction they began is unfinished, else the configured ones.
    shape: Shape,
    /// The configured settings, when they differ from `shape`: the session
    /// ends at the first transaction boundary and the next one uses them.
    switch_to: Option<Shape>,
    /// The commit LSN of a transaction partly in the stream when the
    /// session started, until its Commit is replayed.
    unfinished: Option<Lsn>,
    /// When the last pgoutput message arrived, and whether the replay was
    /// already reported as stuck short of the stream.
    last_data: Instant,
    stall_warned: bool,
    /// `_schema` state as of the last emitted message.
    emitted_schemas: BTreeMap<u32, u64>,
    received: Lsn,
    server_end: Lsn,
    status_due: bool,
    health: Arc<Health>,
    nats: async_nats::Client,
    counters: std::collections::HashMap<(u32, &'static str), metrics::Counter>,
    /// The handle `counter_for` gave last: rows come in runs of one table
    /// and op, and the map's SipHash of the key cost ~400 instructions a row.
    last_counter: Option<((u32, &'static str), metrics::Counter)>,
    sql: Arc<tokio_postgres::Client>,
    server_version_num: u32,
    window: Option<Window>,
    windows_opened: u64,
    /// Tells this session's watermarks from a dead one's, and from any a
    /// database user writes: 128 random bits, never guessable.
    run_id: String,
}

/// The resume position must lie in the WAL that exists: a checkpoint past
/// the server's WAL end (edited by hand, or from another cluster restored
/// under the same name) would confirm the slot past every change to come.
async fn check_not_past_wal_end(sql: &tokio_postgres::Client, cp: &Checkpoint) -> Result<()> {
    let Some(end) = setup::wal_end(sql).await? else {
        return Ok(());
    };
    let furthest = [Some(cp.confirmed), cp.pos.map(|p| p.commit_lsn), cp.open_tx]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(Lsn::ZERO);
    if furthest > end {
        return Err(Error::new(
            Kind::Checkpoint,
            format!(
                "walnats' checkpoint is at {furthest}, past the end of the WAL (pg_current_wal_lsn() is {end}): \
                 it was edited, or it belongs to another cluster of the same name; walnats would confirm the \
                 slot past changes it never published. Run `walnats slot drop --yes` to start over"
            ),
        ));
    }
    Ok(())
}

/// Which settings the session publishes with, given those the checkpoint
/// recorded: a change applies at once when nothing of a transaction is in
/// the stream, and after the unfinished transaction otherwise (returned as
/// the shape to switch to).
async fn choose_shape(
    c: &Connected,
    cfg: &Config,
    resume: &mut checkpoint::Resume,
    stream: &async_nats::jetstream::stream::Stream,
) -> Result<(Shape, Option<Shape>)> {
    let want = Shape::of(cfg, &c.prefix);
    if !resume.from_checkpoint {
        // Nothing of this slot's checkpoint is known: what follows is
        // published with today's settings (a replay the stream holds is
        // still compared with them).
        resume.state.shape = Some(want.clone());
        return Ok((want, None));
    }
    let had = resume.state.shape_or(&want);
    let changes = had.changes(&want);
    if changes.is_empty() {
        resume.state.shape = Some(want.clone());
        return Ok((want, None));
    }
    let changes = changes.join(", ");
    if resume.skip() == 0 && resume.state.open_tx.is_none() {
        info!(%changes, "settings changed since the checkpoint; they take effect now, at a transaction boundary");
        resume.state.shape = Some(want.clone());
        return Ok((want, None));
    }
    // A transaction is partly in the stream: finish it as it began.
    if had.publication != want.publication
        && !setup::publication_exists(&c.sql, &had.publication).await?
    {
        return Err(Error::new(
            Kind::Checkpoint,
            format!(
                "settings changed ({changes}) while a transaction was partly published (commit {}), and \
                 publication {:?} that it began with is gone, so walnats cannot finish it as it began: \
                 recreate that publication as it was, or start over with `walnats slot drop --yes`",
                resume
                    .state
                    .open_tx
                    .map_or_else(|| "unknown".to_owned(), |l| l.to_string()),
                had.publication
            ),
        ));
    }
    let subjects = &stream.cached_info().config.subjects;
    if !subjects
        .iter()
        .any(|s| sink::subject::covers_prefix(s, &had.prefix))
    {
        return Err(Error::new(
            Kind::Checkpoint,
            format!(
                "settings changed ({changes}) while a transaction was partly published, and stream {:?} no \
                 longer takes subjects under \"{}.>\" that it began with: add them back to the stream until \
                 walnats logs that the new settings took effect, or start over with `walnats slot drop --yes`",
                c.stream_name, had.prefix
            ),
        ));
    }
    warn!(%changes, open_tx = ?resume.state.open_tx, already_in_stream = resume.skip(),
        "settings changed while a transaction was partly published: finishing it with the settings it began \
         with; the new ones take effect right after it");
    resume.state.shape = Some(had.clone());
    Ok((had, Some(want)))
}

/// The slot: validated when it exists (and not held by a walsender), made
/// when it does not, unless a checkpoint says one existed. Returns the new
/// slot's consistent point and exported snapshot.
async fn take_slot(
    c: &Connected,
    cfg: &Config,
    store: &Store,
    conn: &mut ReplicationConn,
    st: &mut sink::StreamSetup,
    existing: Option<&setup::SlotState>,
) -> Result<(Option<Lsn>, Option<String>)> {
    let slot = &cfg.postgres.slot;
    if let Some(s) = existing {
        setup::validate_slot(s, slot, &c.db)?;
        if s.active {
            return Err(Error::new(
                Kind::SlotInUse,
                format!(
                    "slot {slot:?} is active in walsender pid {}",
                    s.active_pid.unwrap_or(0)
                ),
            ));
        }
        return Ok((None, None));
    }
    // A checkpoint without its slot: the slot was dropped (by hand, by a
    // major upgrade before PostgreSQL 17, by a failover), and the changes
    // since the checkpoint are gone with it. Never paper over that with a
    // new slot; only the write-ahead record of a start that died before
    // creating its slot is fine.
    if let Some(cp) = store.load().await?
        && cp
            .snapshot
            .as_ref()
            .is_none_or(|s| s.consistent_point.is_some())
    {
        return Err(Error::new(
            Kind::Checkpoint,
            format!(
                "slot {slot:?} is gone but walnats' checkpoint for it is there (last confirmed {}): \
                 the slot was dropped (by hand, a major upgrade, a failover), so changes written since \
                 were never published; run `walnats slot drop --yes` to remove the checkpoint and start \
                 over (a new slot takes an initial snapshot with snapshot.mode = \"initial\"; or re-read \
                 tables with `walnats snapshot`)",
                cp.confirmed
            ),
        ));
    }
    let want_snapshot = cfg.snapshot == SnapshotMode::Initial;
    if want_snapshot {
        // Refuse before making a slot if chunks cannot be atomic.
        sink::allow_atomic_batches(&c.js, &mut st.stream).await?;
        // Write-ahead: if this process dies between creating the slot and
        // saving its first checkpoint, the next start finds this and still
        // snapshots.
        store
            .save(&Checkpoint {
                version: 1,
                stream_seq: st.stream.cached_info().state.last_sequence,
                shape: Some(Shape::of(cfg, &c.prefix)),
                snapshot: Some(SnapshotState::default()),
                ..Default::default()
            })
            .await?;
    }
    let made = conn.create_logical_slot(slot, want_snapshot).await?;
    info!(%slot, consistent_point = %made.consistent_point, "replication slot created");
    Ok((Some(made.consistent_point), made.snapshot_name))
}

/// The slot must never be ahead of what walnats confirmed: if something
/// advanced it, changes in between were never published.
fn check_slot_not_ahead(slot: &str, s: &setup::SlotState, cp: &Checkpoint) -> Result<()> {
    if cp.confirmed > Lsn::ZERO
        && let Some(flush) = s.confirmed_flush
        && flush > cp.confirmed
    {
        return Err(Error::new(
            Kind::Checkpoint,
            format!(
                "slot {slot:?} was advanced to {flush} by something other than walnats, \
                 past walnats' checkpoint at {}: the changes in between were never published; \
                 run `walnats slot drop --yes` and re-snapshot",
                cp.confirmed
            ),
        ));
    }
    Ok(())
}

async fn session(
    cfg: &Arc<Config>,
    mut shutdown: watch::Receiver<bool>,
    health: &Arc<Health>,
    wal_watch: &Arc<WalWatch>,
) -> Result<Ended> {
    let c = connect_both(cfg).await?;
    sink::require_jetstream(&c.js).await?;
    // The lock's secret lives in the checkpoint bucket.
    let store = Arc::new(c.store(cfg).await?);
    hold_slot_lock(&c.sql, &cfg.postgres.slot, &store).await?;
    setup::require_logical_wal(&c.sql).await?;
    setup::ensure_publication(&c.sql, &cfg.postgres).await?;
    let mut st = sink::ensure_stream(&c.js, &c.stream_name, &c.prefix, cfg.nats.replicas).await?;
    if st.created {
        info!(stream = %c.stream_name, subjects = %format!("{}.>", c.prefix), "stream created");
    }

    let slot = &cfg.postgres.slot;
    let mut conn = ReplicationConn::connect(&c.pg).await?;
    let existing = setup::slot_state(&c.sql, slot).await?;
    let want_snapshot = cfg.snapshot == SnapshotMode::Initial;
    let (created_at, exported) =
        take_slot(&c, cfg, &store, &mut conn, &mut st, existing.as_ref()).await?;
    let src = encode::Source {
        db: c.db.clone(),
        slot: slot.clone(),
        prefix: c.prefix.clone(),
    };
    let mut resume = checkpoint::resume(
        &store,
        &mut st.stream,
        created_at.is_some(),
        want_snapshot,
        &src,
    )
    .await?;
    if resume.from_checkpoint {
        check_not_past_wal_end(&c.sql, &resume.state).await?;
    }
    let (shape, switch_to) = choose_shape(&c, cfg, &mut resume, &st.stream).await?;
    let oversize = match shape.on_oversize {
        OversizePolicy::ObjectStore => Some(
            OversizeStore::open(
                &c.js,
                &cfg.object_store_bucket,
                cfg.nats.replicas,
                c.js.client().server_info().max_payload,
            )
            .await?,
        ),
        _ => None,
    };
    if let Some(cp) = created_at {
        resume.state.confirmed = cp;
        if want_snapshot {
            resume.state.snapshot = Some(SnapshotState {
                consistent_point: Some(cp),
                ..Default::default()
            });
        }
        store.save(&resume.state).await?;
    } else if let Some(s) = &existing {
        check_slot_not_ahead(slot, s, &resume.state)?;
    }
    let src = encode::Source {
        prefix: shape.prefix.clone(),
        ..src
    };
    if resume.state.snapshot.is_some() {
        sink::allow_atomic_batches(&c.js, &mut st.stream).await?;
        snapshot::settle(&mut resume.state, resume.last_seq)?;
        if let Some(snap) = resume.state.snapshot.as_mut()
            && snap.consistent_point.is_none()
        {
            // The slot was made by a start that died before saying where.
            let cp = existing
                .as_ref()
                .and_then(|s| s.confirmed_flush)
                .unwrap_or(Lsn::ZERO);
            snap.consistent_point = Some(cp);
            resume.state.confirmed = resume.state.confirmed.max(cp);
        }
        health.set_ready(true);
        let mut publisher = Publisher::new(c.js.clone(), resume.state.stream_seq);
        let mut encoder = Encoder::new(src.clone(), shape.format);
        let mut cache =
            RelationCache::new(shape.prefix.clone(), TypeResolver::new(Arc::clone(&c.sql)));
        snapshot::Snapshotter {
            cfg,
            pg: &c.pg,
            store: &store,
            publisher: &mut publisher,
            encoder: &mut encoder,
            cache: &mut cache,
            server_version_num: conn.server_version_num(),
            oversize: oversize.as_ref(),
            stream_name: &c.stream_name,
        }
        .run(&mut resume.state, exported.as_deref())
        .await?;
        resume.last_seq = resume.state.stream_seq;
        // The connection that exported the snapshot has done its job.
        conn = ReplicationConn::connect(&c.pg).await?;
    }
    if resume.state.pending_reread.is_some() {
        reread::settle(&mut resume.state, resume.last_seq)?;
    }
    if resume.skip() == 0 && resume.from_checkpoint && created_at.is_none() {
        // Nothing to prove: record the settings in force before anything
        // is published with them.
        store.save(&resume.state).await?;
    }
    info!(
        %slot,
        stream = %c.stream_name,
        stream_seq = resume.last_seq,
        resume_after = ?resume.state.pos,
        already_in_stream = resume.skip(),
        "resuming"
    );

    let conn_version = conn.server_version_num();
    let version = proto_version(conn_version);
    let proto = version.to_string();
    let pubs = format!("\"{}\"", shape.publication.replace('"', "\"\""));
    conn.start_replication(
        slot,
        Lsn::ZERO,
        &[
            ("proto_version", proto.as_str()),
            ("publication_names", pubs.as_str()),
            ("messages", "true"),
        ],
    )
    .await?;
    info!(%slot, proto_version = version, "streaming");
    let keep = shape.message_prefixes.clone();
    conn.skip_unwanted_messages(Arc::new(move |p| config::publishes_message(&keep, p)));

    // Counting starts at the checkpoint: the replayed messages that are
    // already in the stream bring it up to `resume.last_seq`.
    let publisher = if sink::allow_fast_ingest(&c.js, &mut st.stream, cfg.nats.fast_ingest).await? {
        info!(
            batch = sink::FAST_BATCH,
            "publishing in fast-ingest batches"
        );
        Publisher::fast(
            c.js.clone(),
            &c.prefix,
            resume.state.stream_seq,
            cfg.nats.ack_timeout,
        )
        .await?
    } else {
        info!("publishing with one acknowledgement per message");
        Publisher::new(c.js.clone(), resume.state.stream_seq)
    };
    let meters = Meters {
        latency: metrics::histogram!(http::PUBLISH_LATENCY),
        transactions: metrics::counter!(http::TRANSACTIONS),
    };
    let mut s = Session {
        cfg: Arc::clone(cfg),
        conn,
        decoder: pgoutput::Decoder::default(),
        cache: RelationCache::new(shape.prefix.clone(), TypeResolver::new(Arc::clone(&c.sql))),
        encoder: Encoder::new(src, shape.format),
        publisher,
        oversize,
        stream_name: c.stream_name.clone(),
        store,
        replay: Replay::new(
            resume.state.pos,
            resume.state.begun,
            resume.state.confirmed,
            resume.state.stream_seq,
            resume.last_seq,
        ),
        stored: StoredReader::new(st.stream.clone()),
        shape,
        switch_to,
        unfinished: resume.state.open_tx,
        ledger: Ledger::new(resume.state.clone(), meters),
        writing: None,
        tx: None,
        last_data: Instant::now(),
        stall_warned: false,
        emitted_schemas: resume.state.schemas.clone(),
        received: Lsn::ZERO,
        server_end: Lsn::ZERO,
        status_due: false,
        health: Arc::clone(health),
        nats: c.js.client(),
        counters: std::collections::HashMap::new(),
        last_counter: None,
        sql: Arc::clone(&c.sql),
        server_version_num: conn_version,
        window: None,
        windows_opened: 0,
        run_id: reread::new_nonce()?,
    };
    // Stops with the session.
    let _upkeep = upkeep::start(
        Arc::clone(&c.sql),
        slot.clone(),
        cfg.postgres.heartbeat_interval,
        cfg.wal_retained_warn,
        Arc::clone(wal_watch),
    );
    health.set_ready(true);
    s.stream(&mut shutdown).await
}

/// walnats' own heartbeats (`postgres.heartbeat_interval`): filtered by
/// their prefix alone, so a replay drops exactly what the first pass did.
fn is_own_heartbeat(prefix: &str) -> bool {
    prefix == upkeep::HEARTBEAT_PREFIX
}

impl Session {
    async fn stream(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<Ended> {
        let mut status = tokio::time::interval(self.cfg.postgres.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let max_in_flight = self.cfg.nats.max_in_flight;
        let mut draining = *shutdown.borrow();
        let mut ended = Ended::Shutdown;
        loop {
            let can_read =
                !draining && self.ledger.inflight() < max_in_flight && self.publisher.ready();
            tokio::select! {
                biased;
                _ = shutdown.changed(), if !draining => {
                    info!("shutting down: draining acknowledgements");
                    draining = true;
                }
                seq = self.publisher.next_ack(), if self.publisher.awaiting() => {
                    self.ledger.stored(seq?);
                }
                written = async { match self.writing.as_mut() { Some(f) => f.await, None => std::future::pending().await } },
                    if self.writing.is_some() => {
                    self.writing = None;
                    let written = written?;
                    debug!(stream_seq = written.stream_seq, pos = ?written.pos, confirmed = %written.confirmed, "checkpoint written");
                    self.ledger.mark_written(written);
                    self.status_due = true;
                }
                _ = status.tick() => {
                    self.publisher.overdue()?;
                    if self.publisher.should_flush() {
                        self.publisher.flush().await?;
                    }
                    self.status_due = true;
                    self.warn_if_replay_stalled();
                }
                read = async {
                    match self.window.as_mut().and_then(|w| w.task.as_mut()) {
                        Some(t) => t.await,
                        None => std::future::pending().await,
                    }
                }, if self.window.as_ref().is_some_and(|w| w.task.is_some()) => {
                    let chunk = read.map_err(|e| Error::new(Kind::Io, format!("snapshot chunk reader failed: {e}")))??;
                    if let Some(w) = self.window.as_mut() {
                        w.task = None;
                        w.chunk = Some(chunk);
                    }
                }
                msg = self.conn.recv(), if can_read => {
                    self.on_replication(msg?).await?;
                    if self.at_switch_point() {
                        info!("the transaction begun with the old settings is published; restarting with the new ones");
                        draining = true;
                        ended = Ended::Restart;
                    }
                }
                // Nothing else to do right now: end the open fast batch so
                // that its acknowledgement comes without more messages.
                () = std::future::ready(()), if self.publisher.should_flush() => {
                    self.publisher.flush().await?;
                }
            }
            self.ledger.settle();
            // Idle: nothing open or in flight, and the replay has caught up
            // with what the stream holds (a replay still pending at the end
            // of the WAL must never be confirmed away).
            let proven = self.replay.proven();
            if self.tx.is_none() && proven && self.server_end > self.ledger.acked().confirmed {
                self.ledger.on_idle(self.server_end);
            }
            if self.writing.is_none() {
                let gap = if draining {
                    Duration::ZERO
                } else {
                    Duration::from_millis(100)
                };
                if let Some(c) = self.ledger.due(gap, proven) {
                    let store = Arc::clone(&self.store);
                    self.writing = Some(Box::pin(async move {
                        store.save(&c).await?;
                        Ok(c)
                    }));
                }
            }
            if !draining {
                self.start_window().await?;
            }
            if self.status_due {
                self.status_due = false;
                self.send_status(false).await?;
            }
            if draining
                && self.ledger.inflight() == 0
                && self.writing.is_none()
                && self.ledger.due(Duration::ZERO, proven).is_none()
            {
                self.send_status(false).await?;
                info!(confirmed = %self.ledger.confirmable(), "drained; checkpoint written");
                return Ok(ended);
            }
        }
    }

    /// Settings changed while a transaction was partly published, and it
    /// is now finished (replay proven, no transaction open or unfinished):
    /// time to stop and start again with the new settings.
    fn at_switch_point(&self) -> bool {
        self.switch_to.is_some()
            && self.replay.proven()
            && self.tx.is_none()
            && self.unfinished.is_none()
    }

    /// The stream holds `skip` more messages than the replay has produced,
    /// and the replay has gone quiet (no data for 10 s, nothing open, the
    /// keepalives at or past what arrived): say so once instead of waiting
    /// silently. It may be a false alarm while the server decodes a huge
    /// transaction before its first change, hence a warning, not an error:
    /// walnats keeps waiting and publishes nothing new until they match.
    fn warn_if_replay_stalled(&mut self) {
        const QUIET: Duration = Duration::from_secs(10);
        if self.stall_warned
            || self.replay.proven()
            || self.tx.is_some()
            || self.last_data.elapsed() < QUIET
            || self.server_end < self.received
        {
            return;
        }
        self.stall_warned = true;
        warn!(
            expected = self.replay.pending(),
            wal_end = %self.server_end,
            after = ?self.replay.through(),
            "the replay of the slot from the checkpoint seems to have reached the end of the WAL (nothing \
             for 10 s), but the stream holds {} more message(s) than the replay produced; walnats publishes \
             nothing new until the replay matches them. Unless the server is still decoding a large \
             transaction, something other than walnats published to the stream's subjects, or the \
             publication or output settings changed since those messages were published: see README, \
             The slot and its WAL",
            self.replay.pending()
        );
    }

    async fn send_status(&mut self, reply: bool) -> Result<()> {
        let flush = self.ledger.confirmable();
        let write = self.received.max(flush);
        // Lossy on purpose: a gauge is an f64; LSNs below 2^53 are exact.
        metrics::gauge!(http::CONFIRMED_FLUSH_LSN).set(flush.as_u64() as f64);
        metrics::gauge!(http::REPLICATION_LAG)
            .set(self.server_end.max(write).bytes_since(flush) as f64);
        self.health.set_ready(matches!(
            self.nats.connection_state(),
            async_nats::connection::State::Connected
        ));
        self.conn
            .send_standby_status(write, flush, flush, reply)
            .await
    }

    async fn on_replication(&mut self, msg: ReplicationMessage) -> Result<()> {
        match msg {
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.server_end = self.server_end.max(wal_end);
                if reply_requested {
                    self.send_status(false).await?;
                }
                Ok(())
            }
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data,
                ..
            } => {
                self.received = self.received.max(wal_end);
                self.last_data = Instant::now();
                let m = self.decoder.decode(data).map_err(Error::from)?;
                self.on_pgoutput(m, wal_start).await
            }
            ReplicationMessage::CopyDone => Err(Error::new(
                Kind::PgConnect,
                "PostgreSQL ended the replication stream",
            )),
            ReplicationMessage::Skipped { wal_end, bytes } => {
                // A large logical message nobody asked for, never read
                // whole: like the small ones, not published or numbered.
                self.received = self.received.max(wal_end);
                self.last_data = Instant::now();
                metrics::counter!(http::MESSAGES_IGNORED).increment(1);
                debug!(bytes, %wal_end, "skipped a large logical message whose prefix is not in output.message_prefixes");
                Ok(())
            }
        }
    }

    fn next_pos(&mut self, what: &str, table: Option<&RelationInfo>) -> Result<(Position, TxInfo)> {
        let markers = self.markers();
        let tx = self.tx.as_mut().ok_or_else(|| {
            Error::new(
                Kind::Protocol,
                format!("pgoutput sent {what} outside a transaction"),
            )
        })?;
        if markers {
            let name = table.map_or_else(
                || "_message".to_owned(),
                |r| format!("{}.{}", r.schema, r.table),
            );
            match tx.counts.iter_mut().find(|(t, _)| *t == name) {
                Some((_, n)) => *n += 1,
                None => tx.counts.push((name, 1)),
            }
        }
        let pos = Position::new(tx.info.commit_lsn, tx.next_seq);
        // u32::MAX is the END marker's position.
        tx.next_seq = tx
            .next_seq
            .checked_add(1)
            .filter(|n| *n < u32::MAX)
            .ok_or_else(|| {
                Error::new(
                    Kind::Protocol,
                    "a transaction with more than 4 billion changes",
                )
            })?;
        Ok((pos, tx.info))
    }

    async fn on_pgoutput(&mut self, m: Message, lsn: Lsn) -> Result<()> {
        match m {
            Message::Begin(b) => {
                if self.tx.is_some() {
                    return Err(Error::new(
                        Kind::Protocol,
                        "pgoutput sent Begin inside a transaction",
                    ));
                }
                let info = TxInfo {
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                    commit_time: b.commit_time,
                };
                self.tx = Some(OpenTx {
                    info,
                    next_seq: 0,
                    counts: Vec::new(),
                });
                if self.markers() {
                    let ev = Event {
                        pos: Position::new(info.commit_lsn, 0),
                        lsn,
                        tx: Some(info),
                        snapshot: false,
                        body: Body::TxBegin,
                    };
                    self.emit_marker(ev, false).await?;
                }
            }
            Message::Commit(c) => {
                let tx = self.tx.take().ok_or_else(|| {
                    Error::new(Kind::Protocol, "pgoutput sent Commit outside a transaction")
                })?;
                if self.unfinished.is_some_and(|u| u <= c.commit_lsn) {
                    self.unfinished = None;
                }
                if tx.info.commit_lsn != c.commit_lsn {
                    return Err(Error::new(
                        Kind::Protocol,
                        format!(
                            "pgoutput's Commit at {} does not match its Begin's {}",
                            c.commit_lsn, tx.info.commit_lsn
                        ),
                    ));
                }
                if self.markers() {
                    let ev = Event {
                        // After every change of the transaction: once its
                        // END is acknowledged, all of it is in the stream.
                        pos: Position::new(tx.info.commit_lsn, u32::MAX),
                        lsn,
                        tx: Some(tx.info),
                        snapshot: false,
                        body: Body::TxEnd { counts: tx.counts },
                    };
                    self.emit_marker(ev, true).await?;
                }
                self.ledger.push(
                    0,
                    Acked::TxEnd {
                        commit: c.commit_lsn,
                        end: c.end_lsn,
                    },
                );
            }
            Message::Relation(r) => {
                self.cache.update(&r).await?;
            }
            Message::Type(_) | Message::Origin(_) => {}
            Message::Insert(i) => {
                self.emit_row(Op::Insert, i.oid, None, Some(i.new), lsn)
                    .await?;
            }
            Message::Update(u) => {
                self.emit_row(Op::Update, u.oid, u.old, Some(u.new), lsn)
                    .await?;
            }
            Message::Delete(d) => {
                self.emit_row(Op::Delete, d.oid, Some(d.old), None, lsn)
                    .await?;
            }
            Message::Truncate(t) => {
                for oid in &t.oids {
                    if let Some(w) = self.window.as_mut()
                        && w.open
                        && w.oid == oid.0
                    {
                        w.unknown = true;
                    }
                    let rel = Arc::clone(self.cache.get(*oid)?);
                    let (pos, tx) = self.next_pos("a truncate", Some(&rel))?;
                    self.emit_change(Event {
                        pos,
                        lsn,
                        tx: Some(tx),
                        snapshot: false,
                        body: Body::Truncate {
                            rel,
                            cascade: t.cascade(),
                            restart_identity: t.restart_identity(),
                        },
                    })
                    .await?;
                }
            }
            Message::LogicalMessage(m) if is_own_heartbeat(&m.prefix) => {
                // Never published. Like a keepalive, it is a position an
                // idle slot may confirm: a replay from there sends it again
                // and it is dropped again.
                if !m.transactional {
                    self.server_end = self.server_end.max(m.lsn);
                }
            }
            Message::LogicalMessage(m) if reread::is_own_message(&m.prefix) => {
                // walnats' own messages are never published; those at or
                // before the checkpoint were handled before it.
                let pos = Position::new(record_inside(m.lsn), 0);
                if m.transactional || self.replay.is_through(pos) {
                    return Ok(());
                }
                if m.prefix == reread::REQUEST_PREFIX {
                    self.on_request(&m.content, pos).await?;
                } else {
                    self.on_watermark(&m.content, m.lsn).await?;
                }
            }
            Message::LogicalMessage(m)
                if !config::publishes_message(
                    &self.shape.message_prefixes,
                    m.prefix.as_bytes(),
                ) =>
            {
                // Any database user can write one: only the prefixes asked
                // for are published (and numbered, when transactional).
                metrics::counter!(http::MESSAGES_IGNORED).increment(1);
            }
            Message::LogicalMessage(m) => {
                let (pos, tx) = if m.transactional {
                    let (p, t) = self.next_pos("a transactional message", None)?;
                    (p, Some(t))
                } else {
                    (Position::new(record_inside(m.lsn), 0), None)
                };
                self.emit_change(Event {
                    pos,
                    lsn: m.lsn,
                    tx,
                    snapshot: false,
                    body: Body::Message {
                        transactional: m.transactional,
                        prefix: m.prefix,
                        content: m.content,
                    },
                })
                .await?;
            }
            other => {
                return Err(Error::new(
                    Kind::Protocol,
                    format!(
                        "pgoutput sent {}, which walnats did not ask for (no streaming, no two-phase)",
                        other.name()
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn emit_row(
        &mut self,
        op: Op,
        oid: crate::pgoutput::Oid,
        old: Option<crate::pgoutput::OldTuple>,
        new: Option<crate::pgoutput::TupleData>,
        lsn: Lsn,
    ) -> Result<()> {
        let rel = Arc::clone(self.cache.get(oid)?);
        if let Some(w) = self.window.as_mut()
            && w.open
            && !w.unknown
            && w.oid == oid.0
        {
            let old = old.as_ref().map(|o| match o {
                crate::pgoutput::OldTuple::Key(t) | crate::pgoutput::OldTuple::Full(t) => t,
            });
            for t in [old, new.as_ref()].into_iter().flatten() {
                match reread::key_of(&rel, &w.pk, t) {
                    Some(k) => {
                        w.changed.insert(k);
                    }
                    None => w.unknown = true,
                }
            }
            if op == Op::Delete && old.is_none() {
                w.unknown = true;
            }
            // A window held open long (a transaction in progress at its
            // low watermark that does not end) must not grow without
            // bound: past this many keys the chunk is read again instead.
            if w.changed.len() > MAX_WINDOW_KEYS {
                w.unknown = true;
            }
            if w.unknown {
                w.changed = Default::default();
            }
        }
        let (pos, tx) = self.next_pos(op.as_str(), Some(&rel))?;
        self.emit_change(Event {
            pos,
            lsn,
            tx: Some(tx),
            snapshot: false,
            body: Body::Row { op, rel, old, new },
        })
        .await
    }

    /// A `walnats.snapshot` message: acted on only when it names a request
    /// that `walnats snapshot` stored in the checkpoint bucket (writing to
    /// the WAL is open to every database user; the bucket is not), for this
    /// slot, with tables that still have the names they were asked by.
    async fn on_request(&mut self, content: &[u8], pos: Position) -> Result<()> {
        let ignore = |why: &str| {
            metrics::counter!(http::MESSAGES_IGNORED).increment(1);
            // Never the content: anyone may have written it.
            warn!(lsn = %pos.commit_lsn, bytes = content.len(), "walnats.snapshot message ignored: {why}");
            Ok(())
        };
        let Some(nonce) = reread::parse_nonce(content) else {
            return ignore("it is not a request written by `walnats snapshot`");
        };
        let Some(body) = self.store.load_request(nonce).await? else {
            return ignore("no request with its nonce in the checkpoint bucket");
        };
        let req: reread::Request = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(_) => return ignore("its request in the checkpoint bucket is unreadable"),
        };
        if req.slot != self.cfg.postgres.slot {
            return Ok(());
        }
        let mut targets = Vec::new();
        for t in req.tables.into_iter().take(reread::MAX_TABLES) {
            if reread::still_names(&self.sql, &t).await? {
                targets.push(t);
            } else {
                warn!(schema = %t.schema, table = %t.table, "snapshot of table not started: it was dropped or renamed since it was requested");
            }
        }
        self.ledger.push(0, Acked::Request { pos, targets });
        Ok(())
    }

    /// Starts the next re-read chunk when none is under way and the queue
    /// has a table: low watermark, SELECT, high watermark on the SQL side.
    async fn start_window(&mut self) -> Result<()> {
        if self.window.is_some() || !self.replay.proven() {
            return Ok(());
        }
        let Some(r) = self.ledger.acked().rereads.first().cloned() else {
            return Ok(());
        };
        let plan = snapshot::catalog::plan(
            &self.sql,
            &self.cfg.postgres.publication,
            r.target.oid,
            self.server_version_num,
        )
        .await?;
        let why = match &plan {
            None => Some("it is gone or no longer published".to_owned()),
            Some(p) => match (p.row_security_refusal(), &p.unkeyed) {
                (Some(e), _) => Some(e.to_string()),
                (None, Some(why)) => Some(why.clone()),
                (None, None) if !p.has_primary_key() => Some("it has no primary key".to_owned()),
                (None, None) => None,
            },
        };
        let plan = match (plan, why) {
            (Some(p), None) => p,
            (_, why) => {
                let why = why.unwrap_or_default();
                warn!(schema = %r.target.schema, table = %r.target.table, "snapshot of table abandoned: {why}");
                self.ledger.acked_mut().rereads.remove(0);
                return Ok(());
            }
        };
        let rel = self.cache.describe(&plan.relation).await?;
        self.windows_opened += 1;
        let id = format!("{}-{}", self.run_id, self.windows_opened);
        let sql = Arc::clone(&self.sql);
        let (task_id, after, task_plan) = (id.clone(), r.after.clone(), plan.clone());
        let task = tokio::spawn(async move {
            snapshot::reread::read_window(
                &sql,
                &task_plan,
                &after,
                &task_id,
                snapshot::CHUNK_ROWS,
                snapshot::CHUNK_BYTES,
            )
            .await
        });
        self.window = Some(Window {
            id,
            oid: r.target.oid,
            pk: plan.pk_names.clone(),
            rel,
            task: Some(task),
            chunk: None,
            open: false,
            changed: Default::default(),
            unknown: false,
        });
        Ok(())
    }

    async fn on_watermark(&mut self, content: &[u8], lsn: Lsn) -> Result<()> {
        let Some(w) = self.window.as_mut() else {
            return Ok(());
        };
        match reread::parse_watermark(content) {
            Some(reread::Watermark::Low(id)) if id == w.id => {
                w.open = true;
                Ok(())
            }
            Some(reread::Watermark::High(id)) if id == w.id => self.close_window(lsn).await,
            _ => Ok(()),
        }
    }

    /// The high watermark: the chunk minus the rows changed inside the
    /// window goes out as reads at its position, as one atomic batch that
    /// the checkpoint announces first.
    async fn close_window(&mut self, hw: Lsn) -> Result<()> {
        let Some(mut w) = self.window.take() else {
            return Ok(());
        };
        let mut chunk = match (w.chunk.take(), w.task.take()) {
            (Some(c), _) => c,
            (None, Some(t)) => t.await.map_err(|e| {
                Error::new(Kind::Io, format!("snapshot chunk reader failed: {e}"))
            })??,
            (None, None) => return Ok(()),
        };
        if w.unknown || !w.open {
            debug!("re-read chunk saw a change it cannot key; reading it again");
            return Ok(());
        }
        reread::without_changed(&mut chunk, &w.changed);
        // Everything before the high watermark must be acknowledged and
        // the checkpoint quiet: the write-ahead record has to be exact.
        let stored = self.publisher.drain().await?;
        self.ledger.stored(stored);
        self.ledger.settle();
        if let Some(f) = self.writing.take() {
            let c = f.await?;
            self.ledger.mark_written(c);
        }
        let rows = chunk.rows.len() as u64;
        // Right after the high watermark's own position (hw - 1, 0), before
        // any transaction that commits after it.
        let at = Position::new(record_inside(hw), 0);
        let reads = snapshot::encode_reads(
            &self.cfg,
            &mut self.encoder,
            self.oversize
                .as_ref()
                .map(|o| (o, self.stream_name.as_str())),
            self.publisher.max_payload(),
            &self.emitted_schemas,
            &w.rel,
            chunk.rows,
            at.commit_lsn,
            1,
            hw,
        )
        .await?;
        let n = reads.msgs.len() as u64;
        let last_pos =
            (reads.next_seq > 1).then(|| Position::new(at.commit_lsn, reads.next_seq - 1));
        let pending = reread::PendingReread {
            messages: n,
            end: chunk.end,
            last: chunk.last,
            rows,
            schema: reads.schema,
            last_pos,
        };
        {
            let a = self.ledger.acked_mut();
            a.pending_reread = Some(pending.clone());
            a.stream_seq = self.publisher.last_seq();
            if a.pos.is_none_or(|p| p < at) {
                a.pos = Some(at);
            }
            let c = a.clone();
            self.store.save(&c).await?;
            self.ledger.mark_written(c);
        }
        let seq = self.publisher.publish_batch(reads.msgs).await?;
        if let Some(s) = reads.schema {
            self.emitted_schemas.insert(s.0, s.1);
        }
        let done = reread::apply(self.ledger.acked_mut(), &pending, seq);
        metrics::counter!(http::SNAPSHOT_ROWS).increment(n);
        if let Some(r) = done {
            info!(schema = %r.target.schema, table = %r.target.table, rows = r.rows, "snapshot of table complete");
        }
        Ok(())
    }

    /// Whether `_tx` markers go out in this session (its shape: a change
    /// of the setting waits for the unfinished transaction to end).
    fn markers(&self) -> bool {
        self.shape.tx_markers
    }

    /// BEGIN rides with the first change (dropped once that is published);
    /// END carries the transaction's last position.
    async fn emit_marker(&mut self, ev: Event, is_end: bool) -> Result<()> {
        let out = if is_end {
            self.replay.is_through(ev.pos)
        } else {
            self.replay.is_begun(ev.pos.commit_lsn)
        };
        if out {
            return Ok(());
        }
        let pos = is_end.then_some(ev.pos);
        self.emit_one(&ev, pos, None).await
    }

    async fn emit_change(&mut self, ev: Event) -> Result<()> {
        if self.replay.is_through(ev.pos) {
            return Ok(());
        }
        let rel = match &ev.body {
            Body::Row { rel, .. } | Body::Truncate { rel, .. } => Some(Arc::clone(rel)),
            _ => None,
        };
        if let Some(rel) = rel
            && self.emitted_schemas.get(&rel.oid.0) != Some(&rel.schema_hash)
        {
            self.emitted_schemas.insert(rel.oid.0, rel.schema_hash);
            let schema = Some((rel.oid.0, rel.schema_hash));
            let sev = Event {
                pos: ev.pos,
                lsn: ev.lsn,
                tx: ev.tx,
                snapshot: ev.snapshot,
                body: Body::Schema { rel },
            };
            self.emit_one(&sev, None, schema).await?;
        }
        let pos = ev.pos;
        self.emit_one(&ev, Some(pos), None).await
    }

    /// The `walnats_events_published_total{table,op}` handle, made once
    /// per (relation, op) so the hot path does no label formatting.
    fn counter_for(&mut self, ev: &Event) -> metrics::Counter {
        let (oid, table) = match &ev.body {
            Body::Row { rel, .. } | Body::Truncate { rel, .. } | Body::Schema { rel } => {
                (rel.oid.0, Some(rel))
            }
            Body::Message { .. } | Body::TxBegin | Body::TxEnd { .. } => (0, None),
        };
        let key = (oid, ev.op_name());
        if let Some((last, counter)) = &self.last_counter
            && *last == key
        {
            return counter.clone();
        }
        let counter = self
            .counters
            .entry(key)
            .or_insert_with(|| {
                let table = table
                    .map(|r| format!("{}.{}", r.schema, r.table))
                    .unwrap_or_else(|| "_message".to_owned());
                metrics::counter!(http::EVENTS_PUBLISHED, "table" => table, "op" => key.1)
            })
            .clone();
        self.last_counter = Some((key, counter.clone()));
        counter
    }

    /// Stores an oversized body in the Object Store and returns the claim
    /// check to publish in its place. The put is acknowledged before the
    /// claim is published, so no consumer sees a dangling reference; a
    /// replay after a crash in between puts the same bytes again.
    async fn check_in(&mut self, ev: &Event, msg: OutMsg, what: &str) -> Result<OutMsg> {
        let store = self.oversize.as_ref().ok_or_else(|| {
            Error::new(
                Kind::Oversize,
                format!("{what}, and the Object Store bucket is not open"),
            )
        })?;
        let claim = store.put_message(&self.stream_name, &msg).await?;
        let subject = msg.subject.clone();
        let out = self.encoder.claim_check(ev, msg, &claim)?;
        let claim_size = Publisher::wire_size(&out);
        if claim_size > self.publisher.max_payload() {
            return Err(Error::new(
                Kind::Oversize,
                format!(
                    "{what}, and even its claim check is {claim_size} bytes (its key is that large): \
                     raise max_payload on the NATS server; nothing was confirmed past it"
                ),
            ));
        }
        info!(%subject, size = claim.size, bucket = %claim.bucket, object = %claim.name,
            "oversized message stored in the Object Store; its claim check goes to the stream");
        metrics::counter!(http::OVERSIZE_STORED, "subject" => subject).increment(1);
        Ok(out)
    }

    /// While the replay is unproven, `msg` is the stream's next message of
    /// the replayed range: compared with it, and counted instead of
    /// published. Returns its sequence then; `None` once the range is done.
    async fn already_stored(&mut self, msg: &OutMsg) -> Result<Option<u64>> {
        let Some(next) = self.replay.next_seq() else {
            return Ok(None);
        };
        let stored = self.stored.at(next, self.replay.last_seq()).await?;
        let seq = self
            .replay
            .check(&msg.subject, msg.msg_id(), stored.as_ref())?;
        // The publisher counts it too: its next publish must name the
        // range's end as the sequence to follow.
        if self.publisher.assume_published() != seq {
            return Err(Error::new(
                Kind::Checkpoint,
                format!(
                    "internal: the publisher's count disagrees with the replay at sequence {seq}"
                ),
            ));
        }
        tracing::trace!(seq, "already in the stream");
        if self.replay.proven() {
            let (compared, deleted) = self.replay.counts();
            info!(
                compared,
                deleted, "the replay matches what the stream holds; publishing from here"
            );
        }
        Ok(Some(seq))
    }

    async fn emit_one(
        &mut self,
        ev: &Event,
        pos: Option<Position>,
        schema: Option<(u32, u64)>,
    ) -> Result<()> {
        let begin_of = matches!(ev.body, Body::TxBegin).then_some(ev.pos.commit_lsn);
        // Encode first: whether a message is dropped by the oversize policy
        // must be decided the same way when it is replayed, or the count of
        // messages already in the stream would drift.
        let mut msg = self.encoder.encode(ev)?;
        let size = Publisher::wire_size(&msg);
        if size > self.publisher.max_payload() {
            let what = format!(
                "the {} message for position {}:{} (LSN {}) is {size} bytes, over the NATS server's max_payload of {}",
                ev.op_name(),
                ev.pos.commit_lsn,
                ev.pos.seq,
                ev.lsn,
                self.publisher.max_payload()
            );
            match (self.shape.on_oversize, pos) {
                (OversizePolicy::Skip, Some(p)) => {
                    warn!(subject = %msg.subject, size, lsn = %ev.lsn, "oversized message skipped (limits.on_oversize = skip)");
                    metrics::counter!(http::OVERSIZE_SKIPPED, "subject" => msg.subject.clone())
                        .increment(1);
                    let tx = ev.tx.map(|t| t.commit_lsn);
                    self.ledger.push(0, Acked::Dropped { pos: p, tx });
                    return Ok(());
                }
                // Already in the stream (replay unproven): its body was
                // stored before it was published, and only its id and
                // subject are compared.
                (OversizePolicy::ObjectStore, _) if self.replay.proven() => {
                    // A big put can take longer than JetStream keeps an
                    // idle fast batch open.
                    self.publisher.flush().await?;
                    msg = self.check_in(ev, msg, &what).await?;
                }
                (OversizePolicy::ObjectStore, _) => {}
                _ => {
                    error!(subject = %msg.subject, size, lsn = %ev.lsn, "oversized message");
                    return Err(Error::new(
                        Kind::Oversize,
                        format!(
                            "{what}: raise max_payload on the NATS server, or set limits.on_oversize = \"object_store\" \
                             or \"skip\"; nothing was confirmed past it"
                        ),
                    ));
                }
            }
        }
        let tx = ev.tx.map(|t| t.commit_lsn);
        let (need, seq, counter, commit_time) = match self.already_stored(&msg).await? {
            Some(seq) => (0, seq, None, None),
            None => {
                let counter = ev.is_change().then(|| self.counter_for(ev));
                let commit_time = ev.tx.map(|t| t.commit_time).filter(|_| ev.is_change());
                let seq = self.publisher.publish(msg).await?;
                (seq, seq, counter, commit_time)
            }
        };
        self.ledger.push(
            need,
            Acked::Msg {
                seq,
                pos,
                tx,
                schema,
                counter,
                commit_time,
                begin_of,
            },
        );
        Ok(())
    }
}
