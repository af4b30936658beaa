//! Starting a session, in order: connect both sides and take walnats' slot
//! lock; make or validate the slot; find where to resume and prove it
//! (checkpoint, stream tail, the WAL's end, the slot's position); decide
//! the settings the session publishes with; run what is left of the initial
//! snapshot; START_REPLICATION; hand the parts to the session.
//!
//! Every check that can refuse a start runs before anything is published
//! or confirmed. The session's own work is in `session`.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_nats::jetstream::stream::Stream;

use tokio::sync::watch;
use tracing::{info, warn};

use super::Ended;
use super::primary;
use super::session::{Readiness, Replayed, Session, Settings, Wal};
use crate::checkpoint::ledger::{Ledger, Meters};
use crate::checkpoint::replay::{Replay, Skip};
use crate::checkpoint::{
    self, Checkpoint, Resume, Shape, SnapshotState, Store, StoredReader, Writer,
};
use crate::config::{self, Config, OversizePolicy, SnapshotMode};
use crate::connect::{self, Connected};
use crate::encode::{self, Encoder};
use crate::error::{Error, Kind, Result};
use crate::event::outbox;
use crate::event::transaction::Assembler;
use crate::event::{RelationCache, TypeResolver};
use crate::lsn::Lsn;
use crate::metrics::{EventCounters, Health};
use crate::pgoutput;
use crate::publish::Outlet;
use crate::sink::oversize::OversizeStore;
use crate::sink::{self, Publisher, StreamSetup};
use crate::snapshot::{self, reread, window::Windows};
use crate::source::feedback::Feedback;
use crate::source::standby::{self, Server};
use crate::source::upkeep::{self, WalWatch};
use crate::source::{self, ReplicationConn, setup};

/// One session: set up, then stream until shutdown, a restart for new
/// settings, or an error.
pub(super) async fn session(
    cfg: &Arc<Config>,
    mut shutdown: watch::Receiver<bool>,
    health: &Arc<Health>,
    wal_watch: &Arc<WalWatch>,
    seen: &primary::ServerSeen,
) -> Result<Ended> {
    let (c, store, mut st, server) = connect_and_lock(cfg).await?;
    let mut conn = primary::connect_replication(&c, seen).await?;
    let mut start = find_start(&c, cfg, &store, &mut conn, &mut st, &server).await?;
    let mut out = open_outlet(&c, cfg, &start).await?;
    if start.resume.state.snapshot.is_some() {
        health.set_ready(true);
        // Chunks go out as fast-ingest batches where the server allows
        // them (nats-server stores an atomic batch's messages twice: they
        // cost it half as much again), as atomic batches otherwise.
        out.publisher =
            streaming_publisher(&c, cfg, &mut st, start.resume.state.stream_seq).await?;
        let mut cache = RelationCache::new(
            start.shape.prefix.clone(),
            TypeResolver::new(Arc::clone(&c.sql)),
        );
        snapshot::Snapshotter {
            cfg,
            pg: &c.pg,
            store: &store,
            out: &mut out,
            cache: &mut cache,
            server_version_num: conn.server_version_num(),
        }
        .run(&mut start.resume.state, start.exported.as_deref())
        .await?;
        start.resume.last_seq = start.resume.state.stream_seq;
        // The connection that exported the snapshot has done its job.
        conn = primary::connect_replication(&c, seen).await?;
    }
    let resume = &start.resume;
    if resume.skip() == 0 && resume.from_checkpoint && !start.created {
        // Nothing to prove: record the settings in force before anything
        // is published with them.
        store.save(&resume.state).await?;
    }
    info!(
        slot = %cfg.postgres.slot,
        stream = %c.stream_name,
        stream_seq = resume.last_seq,
        resume_after = ?resume.state.pos,
        already_in_stream = resume.skip(),
        "resuming"
    );
    start_replication(&mut conn, &cfg.postgres.slot, &start.shape).await?;
    // Counting starts at the checkpoint: the replayed messages that are
    // already in the stream bring it up to `resume.last_seq`.
    out.publisher = streaming_publisher(&c, cfg, &mut st, resume.state.stream_seq).await?;
    let marks = reread::Marks::of(&server);
    let s = assemble(cfg, &c, conn, store, &st, start, out, health, marks)?;
    // Stops with the session.
    let _upkeep = upkeep::start(
        Arc::clone(&c.sql),
        server.writer(&c.sql).cloned(),
        cfg.postgres.slot.clone(),
        cfg.postgres.heartbeat_interval,
        cfg.wal_retained_warn,
        Arc::clone(wal_watch),
    );
    health.set_ready(true);
    Box::pin(s.stream(&mut shutdown)).await
}

/// Settles the snapshot chunks the checkpoint announced against what the
/// stream holds past it: the batch of its first message, its last message
/// (the end of a fast chunk that landed in part), and the id at each place
/// an announced chunk would end (a chunk counts as landed only if the
/// stream's message there is its own).
async fn settle_snapshot(stream: &Stream, resume: &mut Resume) -> Result<()> {
    let (first, tail) = match resume.last_seq > resume.state.stream_seq {
        true => (
            checkpoint::batch_id_at(stream, resume.state.stream_seq + 1).await?,
            checkpoint::chunk_tail_at(stream, resume.last_seq).await?,
        ),
        false => (None, None),
    };
    let seqs = resume.state.snapshot.as_ref().map_or_else(Vec::new, |s| {
        s.chunk_ends(resume.state.stream_seq, resume.last_seq)
    });
    // A message gone (limits, a purge) proves nothing either way.
    let ends = batches_at(stream, seqs)
        .await?
        .into_iter()
        .filter_map(|(seq, batch)| batch.map(|b| (seq, b)))
        .collect();
    resume
        .state
        .settle_snapshot(resume.last_seq, first.as_deref(), tail.as_ref(), &ends)
}

/// Both sides connected, walnats' slot lock held, the database ready for
/// logical decoding, the publication and the stream there.
async fn connect_and_lock(cfg: &Config) -> Result<(Connected, Arc<Store>, StreamSetup, Server)> {
    let c = connect::both(cfg).await?;
    primary::check_server(&c, cfg).await?;
    sink::require_jetstream(&c.js).await?;
    // The lock's secret lives in the checkpoint bucket.
    let store = Arc::new(c.store(cfg).await?);
    hold_slot_lock(&c.sql, &cfg.postgres.slot, &store).await?;
    setup::require_logical_wal(&c.sql).await?;
    // A hot standby (PostgreSQL 16+) decodes too; what it cannot write
    // goes to postgres.primary_url.
    let server = standby::probe(&c.sql, &cfg.postgres).await?;
    standby::ensure_publication(&c.sql, &server, &cfg.postgres).await?;
    let problems = source::outbox::outbox_problems(&c.sql, &cfg.postgres, &cfg.outbox).await?;
    if !problems.is_empty() {
        let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return Err(Error::new(
            Kind::Config,
            format!("[[outbox]]: {}", all.join("; ")),
        ));
    }
    let st = sink::ensure_stream(&c.js, &c.stream_name, &c.prefix, cfg.nats.replicas).await?;
    if st.created {
        info!(stream = %c.stream_name, subjects = %format!("{}.>", c.prefix), "stream created");
    }
    Ok((c, store, st, server))
}

/// Where a session starts, proven, and the settings it publishes with.
pub(super) struct Start {
    pub resume: Resume,
    pub shape: Shape,
    /// The configured settings, when the session must first finish a
    /// transaction with the old ones (`shape`).
    pub switch_to: Option<Shape>,
    /// The new slot's exported snapshot.
    exported: Option<String>,
    /// This session made the slot.
    created: bool,
    /// Re-read chunks in the stream that the replay steps over.
    skips: Vec<Skip>,
}

/// The slot, the checkpoint and the stream, checked against each other.
async fn find_start(
    c: &Connected,
    cfg: &Config,
    store: &Store,
    conn: &mut ReplicationConn,
    st: &mut StreamSetup,
    server: &Server,
) -> Result<Start> {
    let slot = &cfg.postgres.slot;
    let existing = setup::slot_state(&c.sql, slot).await?;
    let want_snapshot = cfg.snapshot == SnapshotMode::Initial;
    let (created_at, exported) =
        take_slot(c, cfg, store, conn, st, existing.as_ref(), server).await?;
    let src = encode::Source {
        db: c.db.clone(),
        slot: slot.clone(),
        prefix: c.prefix.clone(),
    };
    let mut resume = checkpoint::resume(
        store,
        &mut st.stream,
        created_at.is_some(),
        want_snapshot,
        &src,
    )
    .await?;
    if resume.from_checkpoint {
        check_not_past_wal_end(&c.sql, &resume.state, server.standby().is_some()).await?;
    }
    let (shape, switch_to) = choose_shape(c, cfg, &mut resume, &st.stream).await?;
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
    if resume.state.snapshot.is_some() || !resume.state.rereads.is_empty() {
        // A queued `walnats snapshot` re-read publishes atomic batches too:
        // a stream made without them (or changed while walnats was down)
        // refuses its first chunk, and this session's successor lands here.
        sink::allow_atomic_batches(&c.js, &mut st.stream).await?;
    }
    if resume.state.snapshot.is_some() {
        if resume
            .state
            .snapshot
            .as_ref()
            .is_some_and(|s| s.announced())
        {
            resume.last_seq = checkpoint::quiet_last_seq(
                &mut st.stream,
                resume.last_seq,
                std::time::Duration::from_secs(2),
            )
            .await?;
        }
        settle_snapshot(&st.stream, &mut resume).await?;
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
    }
    // A re-read chunk is only ever announced while streaming, never
    // together with an initial snapshot's.
    let skips = settle_rereads(&mut st.stream, &mut resume).await?;
    Ok(Start {
        resume,
        shape,
        switch_to,
        exported,
        created: created_at.is_some(),
        skips,
    })
}

/// The batch of the stream's message at each of `seqs`, as
/// `checkpoint::batch_of` reads it (`None`: the message is gone).
async fn batches_at(
    stream: &Stream,
    seqs: Vec<u64>,
) -> Result<BTreeMap<u64, Option<Option<String>>>> {
    let mut out = BTreeMap::new();
    for seq in seqs {
        out.insert(seq, checkpoint::batch_of(stream, seq).await?);
    }
    Ok(out)
}

/// Settles the re-read chunks the checkpoint announced against what the
/// stream holds: after the stream has been quiet a moment (a batch the
/// last process sent just before it died may still be stored), the batch
/// id where each chunk would end.
async fn settle_rereads(stream: &mut Stream, resume: &mut Resume) -> Result<Vec<Skip>> {
    if resume.state.pending_rereads.is_empty() {
        return Ok(Vec::new());
    }
    resume.last_seq =
        checkpoint::quiet_last_seq(stream, resume.last_seq, std::time::Duration::from_secs(2))
            .await?;
    let batches = batches_at(stream, resume.state.reread_ends(resume.last_seq)).await?;
    let skips = resume.state.settle_rereads(resume.last_seq, &batches)?;
    if !skips.is_empty() {
        info!(
            chunks = skips.len(),
            "re-read chunks landed after changes still to be proven: the replay steps over them"
        );
    }
    Ok(skips)
}

/// The way out for the snapshot and then the stream: publishing with one
/// acknowledgement per message until `streaming_publisher` replaces it.
async fn open_outlet(c: &Connected, cfg: &Config, start: &Start) -> Result<Outlet> {
    let shape = &start.shape;
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
    let src = encode::Source {
        db: c.db.clone(),
        slot: cfg.postgres.slot.clone(),
        prefix: shape.prefix.clone(),
    };
    let state = &start.resume.state;
    Ok(Outlet::new(
        Publisher::new(c.js.clone(), state.stream_seq),
        Encoder::new(src, shape.format),
        shape.on_oversize,
        oversize,
        &c.stream_name,
        state.schemas.clone(),
    ))
}

/// START_REPLICATION with the session's publication, and the filter that
/// skips large logical messages nobody asked for unread.
async fn start_replication(conn: &mut ReplicationConn, slot: &str, shape: &Shape) -> Result<()> {
    let version = super::proto_version(conn.server_version_num());
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
    let (keep, outboxes) = (shape.message_prefixes.clone(), shape.outbox.clone());
    conn.skip_unwanted_messages(Arc::new(move |p| {
        config::publishes_message(&keep, p)
            || std::str::from_utf8(p)
                .is_ok_and(|p| outbox::message_aggregate(&outboxes, p).is_some())
    }));
    Ok(())
}

/// Fast-ingest batches when the server and stream allow them and the
/// config asks; one acknowledgement per message otherwise.
async fn streaming_publisher(
    c: &Connected,
    cfg: &Config,
    st: &mut StreamSetup,
    stream_seq: u64,
) -> Result<Publisher> {
    if sink::allow_fast_ingest(&c.js, &mut st.stream, cfg.nats.fast_ingest).await? {
        info!(
            batch = sink::FAST_BATCH,
            "publishing in fast-ingest batches"
        );
        Publisher::fast(c.js.clone(), &c.prefix, stream_seq, cfg.nats.ack_timeout).await
    } else {
        info!("publishing with one acknowledgement per message");
        Ok(Publisher::new(c.js.clone(), stream_seq))
    }
}

/// The session's parts, from where the start left them.
#[allow(clippy::too_many_arguments)]
fn assemble(
    cfg: &Arc<Config>,
    c: &Connected,
    conn: ReplicationConn,
    store: Arc<Store>,
    st: &StreamSetup,
    start: Start,
    out: Outlet,
    health: &Arc<Health>,
    marks: reread::Marks,
) -> Result<Session> {
    let state = start.resume.state;
    let meters = Meters {
        latency: metrics::histogram!(crate::metrics::PUBLISH_LATENCY),
        transactions: metrics::counter!(crate::metrics::TRANSACTIONS),
    };
    let server_version_num = conn.server_version_num();
    Ok(Session {
        cfg: Arc::clone(cfg),
        wal: Wal {
            conn,
            decoder: pgoutput::Decoder::default(),
            feedback: Feedback::default(),
        },
        cache: RelationCache::new(
            start.shape.prefix.clone(),
            TypeResolver::new(Arc::clone(&c.sql)),
        )
        .with_outboxes(start.shape.outbox.clone()),
        tx: Assembler::new(start.shape.tx_markers),
        out,
        replay: Replayed::new(
            Replay::new(
                state.pos,
                state.begun,
                state.confirmed,
                state.stream_seq,
                start.resume.last_seq,
            )
            .with_skips(start.skips)?,
            StoredReader::new(st.stream.clone()),
        ),
        settings: Settings::new(start.shape, start.switch_to, state.open_tx),
        ledger: Ledger::new(state, meters),
        writer: Writer::new(store),
        windows: Windows::new(
            Arc::clone(&c.sql),
            marks,
            &cfg.postgres.publication,
            server_version_num,
            &cfg.snapshot_reading,
        )?,
        readiness: Readiness {
            health: Arc::clone(health),
            nats: c.js.client(),
        },
        counters: EventCounters::default(),
    })
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
            .map_err(|e| crate::error::pg_query_err("taking walnats' slot lock", e))?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        let (lock, me): (i64, String) = (row.get(1), row.get(2));
        let (pid, user, app) = lock_holder(sql, lock).await?;
        if user != me && pid != 0 {
            warn!(%slot, pid, holder_user = %user, application_name = %app,
                "walnats' slot lock is held by a session of another role, not a walnats: it saw the key in \
                 pg_locks; taking a new secret key (end that session with pg_terminate_backend)");
            store.rotate_lock_secret(revision).await?;
            continue;
        }
        return Err(Error::new(
            Kind::SlotInUse,
            format!(
                "slot {slot:?} is held by another walnats (its lock is taken by pid {pid}, user {user:?}, \
                 application_name {app:?})"
            ),
        ));
    }
    Err(Error::new(
        Kind::SlotInUse,
        format!("slot {slot:?}: other roles keep taking walnats' lock; retrying"),
    ))
}

/// Who holds advisory lock `lock`: pid (0: nobody now), user and
/// application name.
async fn lock_holder(sql: &tokio_postgres::Client, lock: i64) -> Result<(i32, String, String)> {
    let holder = sql
        .query_opt(
            "SELECT l.pid, a.usename::text, a.application_name FROM pg_catalog.pg_locks l \
             JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
             AND ((l.classid::int8 << 32) | l.objid::int8) = $1 LIMIT 1",
            &[&lock],
        )
        .await
        .map_err(|e| crate::error::pg_query_err("looking up who holds walnats' slot lock", e))?;
    Ok(holder.map_or((0, String::new(), String::new()), |r| {
        (
            r.get::<_, i32>(0),
            r.get::<_, Option<String>>(1).unwrap_or_default(),
            r.get::<_, Option<String>>(2).unwrap_or_default(),
        )
    }))
}

/// The resume position must lie in the WAL that exists: a checkpoint past
/// the server's WAL end (edited by hand, or from another cluster restored
/// under the same name) would confirm the slot past every change to come.
/// A standby's end is what it has replayed, which after its restart is
/// behind for a while: there walnats waits (retries) instead of refusing.
async fn check_not_past_wal_end(
    sql: &tokio_postgres::Client,
    cp: &Checkpoint,
    standby: bool,
) -> Result<()> {
    let Some(end) = setup::wal_end(sql).await? else {
        return Ok(());
    };
    let furthest = [Some(cp.confirmed), cp.pos.map(|p| p.commit_lsn), cp.open_tx]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(Lsn::ZERO);
    if furthest > end && standby {
        return Err(Error::new(
            Kind::PgQuery,
            format!(
                "walnats' checkpoint is at {furthest}, past what the standby has replayed ({end}): waiting for \
                 it to catch up (after a restart it replays from its last restartpoint); if this goes on, the \
                 checkpoint belongs to another cluster of the same name: `walnats slot drop --yes` starts over"
            ),
        ));
    }
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
    resume: &mut Resume,
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
        .any(|s| crate::subject::covers_prefix(s, &had.prefix))
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
    st: &mut StreamSetup,
    existing: Option<&setup::SlotState>,
    server: &Server,
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
        primary::enable_failover(cfg, conn, s).await?;
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
                "slot {slot:?} is gone but walnats' checkpoint for it is there (PostgreSQL at {}, last \
                 confirmed {}): the slot was dropped (by hand, a major upgrade), or this server became the \
                 primary in a failover before it had synced the slot (a slot not yet synced at promotion is \
                 lost; see docs/high-availability.md), so changes written since were never published; run \
                 `walnats slot drop --yes` to remove the checkpoint and start over (a new slot takes an \
                 initial snapshot with snapshot.mode = \"initial\"; or re-read tables with `walnats snapshot`)",
                c.pg.server(),
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
    let failover = cfg.postgres.slot_failover;
    let made = standby::create_slot(conn, server, slot, want_snapshot, failover)
        .await
        .map_err(|e| primary::refused_failover(e, slot, "create the failover"))?;
    info!(%slot, consistent_point = %made.consistent_point, failover, "replication slot created");
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
