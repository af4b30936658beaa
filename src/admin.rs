//! The operator commands: `check`, `status` and `slot drop`.
//!
//! They read state and print it; only `slot drop` changes anything, and
//! only when told to with `--yes`.

use std::io::Write;

use serde::Serialize;

/// Prints a line; a closed stdout (`walnats check | head -1`) is not an
/// error worth a panic.
macro_rules! say {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

use crate::checkpoint::Checkpoint;
use crate::config::{Config, OutboxSource};
use crate::connect;
use crate::error::{Error, Kind, Result};
use crate::lsn::Lsn;
use crate::sink;
use crate::snapshot::reread;
use crate::source::{self, ReplicationConn, outbox, setup, standby};
use crate::subject;

struct Checklist {
    ok: bool,
}

impl Checklist {
    fn pass(&mut self, what: &str) {
        say!("[ok]   {what}");
    }
    fn note(&mut self, what: &str) {
        say!("[info] {what}");
    }
    fn fail(&mut self, what: &str, fix: &str) {
        self.ok = false;
        say!("[FAIL] {what}\n       fix: {fix}");
    }
    /// Worth fixing, but `run` works without: does not fail the check.
    fn warn(&mut self, what: &str, fix: &str) {
        say!("[warn] {what}\n       fix: {fix}");
    }
}

/// Prints one line per prerequisite; true only when every one passes.
/// Reports everything that applies at once instead of stopping at the
/// first failure.
pub async fn check(cfg: &Config) -> bool {
    let mut c = Checklist { ok: true };
    c.pass("configuration is valid");
    let db = check_postgres(cfg, &mut c).await;
    check_nats(cfg, db.as_deref(), &mut c).await;
    if c.ok {
        say!("all checks passed");
    } else {
        say!("some checks failed");
    }
    c.ok
}

async fn check_postgres(cfg: &Config, c: &mut Checklist) -> Option<String> {
    let (sql, pg) = match source::connect_session(&cfg.postgres.connect).await {
        Ok(s) => s,
        Err(e) => {
            c.fail(
                &format!("PostgreSQL at {}: {e}", cfg.postgres.connect.redacted_url()),
                "check postgres.url, the server and pg_hba.conf",
            );
            return None;
        }
    };
    let pg = &pg;
    c.pass(&format!(
        "PostgreSQL reachable at {} (server {})",
        pg.redacted_url(),
        pg.server()
    ));
    let db = setup::database_name(&sql).await.ok()?;
    match setup::require_logical_wal(&sql).await {
        Ok(()) => c.pass("wal_level = logical"),
        Err(e) => c.fail(
            &e.to_string(),
            "ALTER SYSTEM SET wal_level = logical; restart PostgreSQL",
        ),
    }
    let on_standby = check_standby(cfg, &sql, c).await;
    match sql
        .query_one(
            "SELECT rolreplication OR rolsuper, current_user::text, rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
    {
        Ok(r) if r.get::<_, bool>(0) => {
            c.pass("role has the REPLICATION privilege");
            if r.get::<_, bool>(2) {
                c.note(&format!(
                    "role {:?} is a superuser: walnats never needs one; give it a role of its own with \
                     REPLICATION and SELECT on the published tables (docs/configuration.md, The PostgreSQL role)",
                    r.get::<_, String>(1)
                ));
            }
        }
        Ok(r) => {
            let user: String = r.get(1);
            c.fail(
                &format!("role {user:?} has no REPLICATION privilege"),
                &format!("ALTER ROLE {} REPLICATION", setup::quote_ident(&user)),
            )
        }
        Err(e) => c.fail(&format!("cannot read the role: {e}"), "check the role's permissions"),
    }
    match ReplicationConn::connect(pg).await {
        Ok(conn) => {
            c.pass("replication connection accepted");
            let _ = conn.close().await;
        }
        Err(e) => c.fail(
            &format!("replication connection: {e}"),
            "allow `replication` for this role in pg_hba.conf",
        ),
    }
    let publication = &cfg.postgres.publication;
    match setup::publication_exists(&sql, publication).await {
        Ok(true) => c.pass(&format!("publication {publication:?} exists")),
        Ok(false) if on_standby && cfg.postgres.primary.is_none() => c.fail(
            &format!("publication {publication:?} is missing, and a standby cannot create it"),
            &format!(
                "create it on the primary ({}), or set postgres.primary_url",
                setup::create_publication_sql(publication, &cfg.postgres.tables)
            ),
        ),
        Ok(false) => c.note(&format!(
            "publication {publication:?} is missing; `walnats run` creates it{} ({})",
            if on_standby { " on the primary" } else { "" },
            setup::create_publication_sql(publication, &cfg.postgres.tables)
        )),
        Err(e) => c.fail(&e.to_string(), "check the role's permissions"),
    }
    match setup::slot_state(&sql, &cfg.postgres.slot).await {
        Ok(Some(s)) => match setup::validate_slot(&s, &cfg.postgres.slot, &db) {
            Ok(()) => c.pass(&format!(
                "slot {:?} uses pgoutput (active: {}, confirmed_flush_lsn: {})",
                cfg.postgres.slot,
                s.active,
                s.confirmed_flush.map(|l| l.to_string()).unwrap_or_default()
            )),
            Err(e) => c.fail(&e.to_string(), "see above"),
        },
        Ok(None) => c.note(&format!(
            "slot {:?} is missing; `walnats run` creates it",
            cfg.postgres.slot
        )),
        Err(e) => c.fail(&e.to_string(), "check the role's permissions"),
    }
    // Tables that publish updates or deletes need a replica identity, or
    // PostgreSQL rejects those statements on the primary.
    let rows = sql
        .query(
            "SELECT n.nspname::text, c.relname::text \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg_toast%' \
               AND (NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1) \
                    OR EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables pt \
                               WHERE pt.pubname = $1 AND pt.schemaname = n.nspname AND pt.tablename = c.relname)) \
               AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS \
                    (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))) \
             ORDER BY 1, 2",
            &[publication],
        )
        .await;
    match rows {
        Ok(rows) if rows.is_empty() => c.pass("every published table has a replica identity"),
        Ok(rows) => {
            for r in rows {
                let (schema, table): (String, String) = (r.get(0), r.get(1));
                c.fail(
                    &format!("table {schema}.{table} has no replica identity: its updates and deletes will fail once published"),
                    &format!(
                        "add a primary key, or ALTER TABLE {}.{} REPLICA IDENTITY FULL",
                        setup::quote_ident(&schema),
                        setup::quote_ident(&table)
                    ),
                );
            }
        }
        Err(e) => c.fail(
            &format!("cannot list published tables: {e}"),
            "check the role's permissions",
        ),
    }
    check_outboxes(cfg, &sql, c).await;
    check_failover(cfg, &sql, pg, &db, c).await;
    Some(db)
}

/// PostgreSQL 17+: the primary's `synchronized_standby_slots` (a physical
/// slot named there that is missing or inactive stalls logical decoding of
/// failover slots), and with `slot_failover` every other host of the URL
/// that is a standby: does it sync walnats' slot, and is its copy ready.
async fn check_failover(
    cfg: &Config,
    sql: &tokio_postgres::Client,
    pg: &crate::config::PgConnectConfig,
    db: &str,
    c: &mut Checklist,
) {
    let version = setup::server_version(sql).await.unwrap_or(0);
    if version < 170_000 {
        if cfg.postgres.slot_failover {
            c.fail(
                &format!("postgres.slot_failover = true needs PostgreSQL 17 or later ({} runs {version})", pg.server()),
                "upgrade PostgreSQL, or set postgres.slot_failover = false",
            );
        }
        return;
    }
    let setting = |name: &'static str| async move {
        sql.query_one("SELECT pg_catalog.current_setting($1)", &[&name])
            .await
            .map(|r| r.get::<_, String>(0))
    };
    let standby_slots = setting("synchronized_standby_slots")
        .await
        .unwrap_or_default();
    let names: Vec<&str> = standby_slots
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        let line = "synchronized_standby_slots is empty: a standby promoted after a failover may lack changes \
                    walnats already published from this server";
        if cfg.postgres.slot_failover {
            c.warn(line, "name the standbys' physical slots in synchronized_standby_slots (docs/high-availability.md)");
        }
    } else {
        c.note(&format!("synchronized_standby_slots = {standby_slots:?}"));
    }
    for name in names {
        let row = sql
            .query_opt(
                "SELECT active FROM pg_catalog.pg_replication_slots WHERE slot_name = $1 AND slot_type = 'physical'",
                &[&name],
            )
            .await;
        match row {
            Ok(Some(r)) if r.get::<_, bool>(0) => {
                c.pass(&format!("physical slot {name:?} of synchronized_standby_slots is active"))
            }
            Ok(found) => c.warn(
                &format!(
                    "synchronized_standby_slots names physical slot {name:?}, which {}: logical decoding of \
                     failover slots on this server waits for it (walnats stalls)",
                    if found.is_some() { "is inactive (its standby is not connected)" } else { "does not exist" }
                ),
                "bring the standby back, or take the slot out of synchronized_standby_slots",
            ),
            Err(e) => c.warn(&format!("cannot read slot {name:?}: {e}"), "check the role's permissions"),
        }
    }
    if !cfg.postgres.slot_failover {
        return;
    }
    for host in cfg
        .postgres
        .connect
        .hosts
        .iter()
        .filter(|h| **h != pg.server())
    {
        check_synced_copy(cfg, &pg.pinned(host), db, c).await;
    }
}

/// One other host of the URL, when it can be reached and is a standby.
async fn check_synced_copy(
    cfg: &Config,
    pg: &crate::config::PgConnectConfig,
    db: &str,
    c: &mut Checklist,
) {
    let host = pg.server();
    let Ok(sql) = source::connect_sql(pg).await else {
        c.note(&format!(
            "{host}: cannot connect; its slot sync is not checked"
        ));
        return;
    };
    match source::sql::server_state(&sql).await {
        Ok(s) if s.in_recovery => {}
        _ => {
            c.note(&format!(
                "{host}: not a standby; its slot sync is not checked"
            ));
            return;
        }
    }
    for (name, want) in [
        ("sync_replication_slots", "on"),
        ("hot_standby_feedback", "on"),
    ] {
        match sql
            .query_one("SELECT pg_catalog.current_setting($1)", &[&name])
            .await
        {
            Ok(r) if r.get::<_, String>(0) == want => {
                c.pass(&format!("standby {host}: {name} = {want}"))
            }
            Ok(r) => c.warn(
                &format!(
                    "standby {host}: {name} = {}: walnats' slot is not synced there",
                    r.get::<_, String>(0)
                ),
                &format!(
                    "ALTER SYSTEM SET {name} = {want} on the standby; SELECT pg_reload_conf()"
                ),
            ),
            Err(e) => c.warn(
                &format!("standby {host}: cannot read {name}: {e}"),
                "check the role's permissions",
            ),
        }
    }
    match sql
        .query_one("SELECT pg_catalog.current_setting('primary_conninfo')", &[])
        .await
    {
        Ok(r) if r.get::<_, String>(0).contains("dbname=") => {
            c.pass(&format!("standby {host}: primary_conninfo has a dbname"))
        }
        Ok(_) => c.warn(
            &format!("standby {host}: primary_conninfo has no dbname: slot sync needs one"),
            "add dbname=... to primary_conninfo on the standby",
        ),
        Err(_) => c.note(&format!(
            "standby {host}: primary_conninfo cannot be read by this role (pg_read_all_settings)"
        )),
    }
    let slot = &cfg.postgres.slot;
    let ready = sql
        .query_opt(
            "SELECT synced AND NOT temporary AND invalidation_reason IS NULL, database::text \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await;
    match ready {
        Ok(Some(r)) if r.get::<_, Option<bool>>(0) == Some(true) && r.get::<_, Option<String>>(1).as_deref() == Some(db) => {
            c.pass(&format!("standby {host}: slot {slot:?} is synced and ready for a failover"))
        }
        Ok(Some(_)) => c.warn(
            &format!("standby {host}: slot {slot:?} is there but not ready (synced, not temporary, not invalidated)"),
            "wait for the sync worker; SELECT pg_log_standby_snapshot() on the primary speeds it up",
        ),
        Ok(None) => c.warn(
            &format!("standby {host}: slot {slot:?} is not synced there: a failover to it now loses the slot"),
            "check sync_replication_slots, hot_standby_feedback and primary_conninfo on the standby",
        ),
        Err(e) => c.warn(&format!("standby {host}: cannot read its slots: {e}"), "check the role's permissions"),
    }
}

/// When `postgres.url` is a hot standby: its version, its
/// `hot_standby_feedback`, `primary_url` (connected and checked) and what
/// does not work without it. Whether it is a standby.
async fn check_standby(cfg: &Config, sql: &tokio_postgres::Client, c: &mut Checklist) -> bool {
    match standby::in_recovery(sql).await {
        Ok(false) => return false,
        Ok(true) => {}
        Err(e) => {
            c.fail(&e.to_string(), "check the role's permissions");
            return false;
        }
    }
    let s = match standby::look(sql, &cfg.postgres).await {
        Ok(s) => s,
        Err(e) => {
            c.fail(
                &e.to_string(),
                "point postgres.url at the primary, or upgrade the standby to PostgreSQL 16+",
            );
            return true;
        }
    };
    c.note(&s.describe());
    if s.feedback {
        c.pass("hot_standby_feedback = on");
    } else {
        c.warn(
            standby::FEEDBACK_OFF,
            "ALTER SYSTEM SET hot_standby_feedback = on; SELECT pg_reload_conf(); on the standby",
        );
    }
    if let Some(p) = &cfg.postgres.primary {
        match standby::connect_primary(sql, p).await {
            Ok(_) => c.pass(&format!(
                "postgres.primary_url reaches the standby's primary at {} (wal_level = logical, same database)",
                p.redacted_url()
            )),
            Err(e) => c.fail(&e.to_string(), "fix postgres.primary_url"),
        }
    }
    for what in s.unavailable() {
        c.warn(
            &format!("on this standby without postgres.primary_url, {what}"),
            "set postgres.primary_url",
        );
    }
    true
}

/// The `[[outbox]]` tables against the catalog; nothing without one.
async fn check_outboxes(cfg: &Config, sql: &tokio_postgres::Client, c: &mut Checklist) {
    let tables: Vec<String> = cfg
        .outbox
        .iter()
        .filter_map(|o| match &o.source {
            OutboxSource::Table { schema, table } => Some(format!("{schema}.{table}")),
            OutboxSource::MessagePrefix(_) => None,
        })
        .collect();
    if tables.is_empty() {
        return;
    }
    let found = async {
        let problems = outbox::outbox_problems(sql, &cfg.postgres, &cfg.outbox).await?;
        let warnings = outbox::outbox_warnings(sql, &cfg.postgres, &cfg.outbox).await?;
        Ok::<_, Error>((problems, warnings))
    };
    let (problems, warnings) = match found.await {
        Ok(f) => f,
        Err(e) => {
            c.fail(
                &format!("cannot check the outbox tables: {e}"),
                "check the role's permissions",
            );
            return;
        }
    };
    if problems.is_empty() {
        c.pass(&format!(
            "outbox tables {} are published, with the configured columns and types",
            tables.join(", ")
        ));
    }
    for p in &problems {
        c.fail(&p.what, &p.fix);
    }
    for w in &warnings {
        c.warn(&w.what, &w.fix);
    }
}

/// `db` (when PostgreSQL answered) gives the default stream and prefix.
async fn check_nats(cfg: &Config, db: Option<&str>, c: &mut Checklist) {
    let client = match sink::connect(&cfg.nats).await {
        Ok(cl) => cl,
        Err(e) => {
            c.fail(
                &format!("NATS: {e}"),
                "check nats.url and the NATS credentials",
            );
            return;
        }
    };
    c.pass("NATS reachable");
    let js = sink::context(client, &cfg.nats);
    if let Err(e) = sink::require_jetstream(&js).await {
        c.fail(&e.to_string(), "start nats-server with -js");
        return;
    }
    c.pass("JetStream enabled");
    let version = js.client().server_info().version;
    if cfg.snapshot == crate::config::SnapshotMode::Initial {
        if sink::supports_atomic_batches(&js.client()) {
            c.pass(&format!(
                "nats-server {version} takes atomic batches (the initial snapshot's chunks)"
            ));
        } else {
            c.fail(
                &format!(
                    "nats-server {version} has no atomic batches, which the initial snapshot needs (2.12.1 or newer)"
                ),
                "upgrade nats-server, or set snapshot.mode = \"never\"",
            );
        }
    }
    match (
        cfg.nats.fast_ingest,
        sink::supports_fast_ingest(&js.client()),
    ) {
        (crate::config::FastIngest::Off, _) => {
            c.note("nats.fast_ingest = \"off\": one acknowledgement per message")
        }
        (_, true) => c.pass(&format!(
            "nats-server {version} takes fast-ingest batches (walnats turns on allow_batched on its stream)"
        )),
        (crate::config::FastIngest::On, false) => c.fail(
            &format!("nats-server {version} has no fast-ingest batches (2.14 or newer), which nats.fast_ingest = \"on\" needs"),
            "upgrade nats-server, or set nats.fast_ingest = \"auto\"",
        ),
        (crate::config::FastIngest::Auto, false) => c.note(&format!(
            "nats-server {version} has no fast-ingest batches (2.14+): one acknowledgement per message, slower"
        )),
    }
    let (stream, prefix) = match (db, &cfg.nats.stream, &cfg.nats.subject_prefix) {
        (Some(db), _, _) => (cfg.nats.stream_for(db), cfg.nats.subject_prefix_for(db)),
        (None, Some(s), Some(p)) => (s.clone(), p.clone()),
        _ => {
            c.note("the stream and prefix default to the database's name, which PostgreSQL did not give");
            return;
        }
    };
    match js.get_stream(&stream).await {
        Ok(s) => {
            let info = s.cached_info();
            if info
                .config
                .subjects
                .iter()
                .any(|p| subject::covers_prefix(p, &prefix))
            {
                c.pass(&format!("stream {stream:?} covers \"{prefix}.>\""));
            } else {
                c.fail(
                    &format!(
                        "stream {stream:?} has subjects {:?}, which do not cover \"{prefix}.>\"",
                        info.config.subjects
                    ),
                    &format!("nats stream edit {stream} --subjects \"{prefix}.>\""),
                );
            }
            let durable = info.config.num_replicas >= 3;
            let line = format!(
                "stream {stream:?}: {:?} storage, {} replica(s); {}",
                info.config.storage,
                info.config.num_replicas,
                if durable {
                    "acknowledged messages survive the loss of a server"
                } else {
                    "an acknowledged message can be lost on power loss unless nats-server runs with sync_interval: always (docs/guarantees.md, Durability)"
                }
            );
            c.note(&line);
        }
        Err(_) => c.note(&format!(
            "stream {stream:?} is missing; `walnats run` creates it"
        )),
    }
}

#[derive(Serialize)]
pub struct Status {
    database: String,
    /// The server of `postgres.url` this status was read from (the one
    /// `target_session_attrs` picks, as `run` does).
    host: String,
    slot: SlotStatus,
    checkpoint: Option<Checkpoint>,
    /// While the initial snapshot runs: rows done, estimate, rate and ETA,
    /// overall and per table.
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_progress: Option<crate::checkpoint::SnapshotProgress>,
    stream: Option<StreamStatus>,
    /// `null` when `postgres.url` is a primary.
    standby: Option<StandbyStatus>,
    #[serde(skip)]
    stream_name: String,
}

/// `postgres.url` is a hot standby.
#[derive(Serialize)]
struct StandbyStatus {
    /// The major version.
    postgresql: u32,
    /// Redacted; `null`: not set.
    primary_url: Option<String>,
    hot_standby_feedback: bool,
    /// What does not work without `primary_url`, and why.
    unavailable: Vec<&'static str>,
}

#[derive(Serialize)]
struct SlotStatus {
    name: String,
    exists: bool,
    active: bool,
    active_pid: Option<i32>,
    confirmed_flush_lsn: Option<Lsn>,
    restart_lsn: Option<Lsn>,
    wal_status: Option<String>,
    /// PostgreSQL 17+ (`null` below): a failover slot, a synced copy, and
    /// why the slot was invalidated.
    failover: Option<bool>,
    synced: Option<bool>,
    invalidation_reason: Option<String>,
    current_wal_lsn: Lsn,
    /// Bytes of WAL between the server's position and the confirmed one.
    lag_bytes: Option<u64>,
    /// Bytes of WAL the slot keeps from being recycled.
    retained_wal_bytes: Option<u64>,
}

#[derive(Serialize)]
struct StreamStatus {
    name: String,
    subjects: Vec<String>,
    messages: u64,
    bytes: u64,
    first_seq: u64,
    last_seq: u64,
    replicas: usize,
}

/// Slot, checkpoint and stream figures, as `status --json` and `/status`
/// print them.
pub async fn gather_status(cfg: &Config) -> Result<Status> {
    let c = connect::both(cfg).await?;
    let slot = setup::slot_state(&c.sql, &cfg.postgres.slot).await?;
    let standby = if standby::in_recovery(&c.sql).await? {
        Some(standby::look(&c.sql, &cfg.postgres).await?)
    } else {
        None
    };
    // On a standby: the last replayed position (there is no write position).
    let current = match &standby {
        None => setup::current_wal_lsn(&c.sql).await?,
        Some(_) => setup::wal_end(&c.sql).await?.unwrap_or(Lsn::ZERO),
    };
    let stream = match c.js.get_stream(&c.stream_name).await {
        Ok(mut s) => {
            let info = s
                .info()
                .await
                .map_err(|e| Error::with_source(Kind::NatsConnect, "cannot read the stream", e))?;
            Some(StreamStatus {
                name: info.config.name.clone(),
                subjects: info.config.subjects.clone(),
                messages: info.state.messages,
                bytes: info.state.bytes,
                first_seq: info.state.first_sequence,
                last_seq: info.state.last_sequence,
                replicas: info.config.num_replicas,
            })
        }
        Err(_) => None,
    };
    let checkpoint = match c.existing_store(cfg).await? {
        Some(store) => store.load().await?,
        None => None,
    };
    let st = Status {
        database: c.db.clone(),
        host: c.pg.server().to_string(),
        slot: SlotStatus {
            name: cfg.postgres.slot.clone(),
            exists: slot.is_some(),
            active: slot.as_ref().is_some_and(|s| s.active),
            active_pid: slot.as_ref().and_then(|s| s.active_pid),
            confirmed_flush_lsn: slot.as_ref().and_then(|s| s.confirmed_flush),
            restart_lsn: slot.as_ref().and_then(|s| s.restart_lsn),
            wal_status: slot.as_ref().and_then(|s| s.wal_status.clone()),
            failover: slot.as_ref().and_then(|s| s.failover),
            synced: slot.as_ref().and_then(|s| s.synced),
            invalidation_reason: slot.as_ref().and_then(|s| s.invalidation_reason.clone()),
            current_wal_lsn: current,
            lag_bytes: slot
                .as_ref()
                .and_then(|s| s.confirmed_flush)
                .map(|f| current.bytes_since(f)),
            retained_wal_bytes: slot
                .as_ref()
                .and_then(|s| s.restart_lsn)
                .map(|r| current.bytes_since(r)),
        },
        snapshot_progress: checkpoint
            .as_ref()
            .and_then(|c| c.snapshot.as_ref())
            .map(|s| s.progress(now_ms())),
        checkpoint,
        stream,
        standby: standby.map(|s| StandbyStatus {
            postgresql: s.version / 10_000,
            primary_url: s.primary_url.clone(),
            hot_standby_feedback: s.feedback,
            unavailable: s.unavailable(),
        }),
        stream_name: c.stream_name.clone(),
    };
    Ok(st)
}

pub async fn status(cfg: &Config, json: bool) -> Result<()> {
    let st = gather_status(cfg).await?;
    if json {
        let text = serde_json::to_string_pretty(&st)
            .map_err(|e| Error::with_source(Kind::Io, "cannot encode status", e))?;
        say!("{text}");
        return Ok(());
    }
    say!("database   {} on {}", st.database, st.host);
    if let Some(s) = &st.standby {
        say!(
            "server     decoding from a standby (PostgreSQL {}), primary: {}",
            s.postgresql,
            s.primary_url.as_deref().unwrap_or("not set")
        );
        if !s.hot_standby_feedback {
            say!(
                "warning    hot_standby_feedback is off: the slot can be invalidated by recovery conflicts"
            );
        }
        for what in &s.unavailable {
            say!("warning    {what}");
        }
    }
    let s = &st.slot;
    if s.exists {
        if let Some(failover) = s.failover {
            say!(
                "slot       failover {failover}, synced {}, invalidation_reason {}",
                s.synced.unwrap_or(false),
                s.invalidation_reason.as_deref().unwrap_or("-")
            );
        }
        say!(
            "slot       {} ({}), confirmed {}, lag {} bytes, WAL retained {} bytes, wal_status {}",
            s.name,
            if s.active { "active" } else { "inactive" },
            s.confirmed_flush_lsn
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            s.lag_bytes.unwrap_or(0),
            s.retained_wal_bytes.unwrap_or(0),
            s.wal_status.as_deref().unwrap_or("-")
        );
    } else {
        say!("slot       {} (missing)", s.name);
    }
    match &st.checkpoint {
        Some(cp) => say!(
            "checkpoint after {} (stream seq {}), confirmable {}",
            cp.pos
                .map(|p| format!("{}:{}", p.commit_lsn, p.seq))
                .unwrap_or_else(|| "start".into()),
            cp.stream_seq,
            cp.confirmed
        ),
        None => say!("checkpoint none"),
    }
    if let Some(snap) = st.checkpoint.as_ref().and_then(|c| c.snapshot.as_ref()) {
        let p = st
            .snapshot_progress
            .clone()
            .unwrap_or_else(|| snap.progress(now_ms()));
        say!(
            "snapshot   running: {} of ~{} rows, {} of {} tables done{}",
            p.rows,
            p.estimate,
            snap.tables_done(),
            snap.tables.len(),
            rate_text(p.rows_per_second, p.eta_seconds)
        );
        let queued = p.tables.iter().filter(|t| !t.done && t.rows == 0).count();
        for t in p.tables.iter().filter(|t| !t.done && t.rows > 0) {
            say!(
                "snapshot   reading {}.{}: {} of ~{} rows, {} of {} ranges done{}",
                t.schema,
                t.table,
                t.rows,
                t.estimate,
                t.units_done,
                t.units,
                rate_text(t.rows_per_second, t.eta_seconds)
            );
        }
        if queued > 0 {
            say!("snapshot   {queued} table(s) not started yet");
        }
    }
    for (i, r) in st
        .checkpoint
        .iter()
        .flat_map(|c| c.rereads.iter())
        .enumerate()
    {
        say!(
            "snapshot   {} {}.{}: {} rows so far",
            if i == 0 { "reading" } else { "queued " },
            r.target.schema,
            r.target.table,
            r.rows
        );
    }
    match &st.stream {
        Some(x) => say!(
            "stream     {} {:?}: {} messages, {} bytes, last seq {}, {} replica(s)",
            x.name,
            x.subjects,
            x.messages,
            x.bytes,
            x.last_seq,
            x.replicas
        ),
        None => say!("stream     {} (missing)", st.stream_name),
    }
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `, 1234 rows/s, about 56 s left`, or nothing before a rate is known.
fn rate_text(rate: Option<u64>, eta: Option<u64>) -> String {
    match (rate, eta) {
        (Some(r), Some(e)) => format!(", {r} rows/s, about {e} s left"),
        (Some(r), None) => format!(", {r} rows/s"),
        _ => String::new(),
    }
}

/// Drops the slot and the checkpoint; the publication and the stream stay.
pub async fn slot_drop(cfg: &Config) -> Result<()> {
    let c = connect::both(cfg).await?;
    let dropped = setup::drop_slot(&c.sql, &cfg.postgres.slot).await?;
    if let Some(store) = c.existing_store(cfg).await? {
        store.delete().await?;
    }
    if dropped {
        say!("dropped slot {:?} and its checkpoint", cfg.postgres.slot);
    } else {
        say!(
            "slot {:?} did not exist; checkpoint removed",
            cfg.postgres.slot
        );
    }
    Ok(())
}

/// `walnats snapshot TABLE...`: checks the tables, stores the request in
/// the checkpoint bucket under a random nonce and writes the nonce into the
/// WAL, where the walnats streaming this slot finds it.
pub async fn snapshot_request(cfg: &Config, tables: &[String]) -> Result<()> {
    let c = crate::connect::both(cfg).await?;
    let sql = &c.sql;
    let slot = &cfg.postgres.slot;
    // A standby cannot write the request into the WAL: its primary does,
    // and the standby replays it to the walnats decoding there.
    let primary = if standby::in_recovery(sql).await? {
        standby::look(sql, &cfg.postgres).await?;
        let Some(p) = &cfg.postgres.primary else {
            return Err(Error::new(
                Kind::Config,
                format!(
                    "postgres.url is a hot standby and postgres.primary_url is not set: {}",
                    reread::NO_PRIMARY
                ),
            ));
        };
        Some(standby::connect_primary(sql, p).await?)
    } else {
        None
    };
    let writer = primary.as_ref().unwrap_or(&**sql);
    if setup::slot_state(sql, slot).await?.is_none() {
        return Err(Error::new(
            Kind::Config,
            format!(
                "slot {slot:?} does not exist: start `walnats run` first (a new slot takes an initial snapshot \
                 of every published table when snapshot.mode = \"initial\")"
            ),
        ));
    }
    let Some(store) = c.existing_store(cfg).await? else {
        return Err(Error::new(
            Kind::Config,
            format!(
                "checkpoint bucket {:?} does not exist: start `walnats run` first",
                cfg.nats.checkpoint_bucket
            ),
        ));
    };
    let version = setup::server_version(sql).await?;
    let req = reread::resolve(sql, &cfg.postgres.publication, slot, tables, version).await?;
    if let Some(t) = req
        .tables
        .iter()
        .find(|t| crate::event::outbox::table_entry(&cfg.outbox, &t.schema, &t.table).is_some())
    {
        return Err(Error::new(
            Kind::Config,
            format!(
                "table {}.{} is an [[outbox]] table: its rows are events, not state, so there is nothing to \
                 re-read; leave it out",
                t.schema, t.table
            ),
        ));
    }
    let body = serde_json::to_vec(&req)
        .map_err(|e| Error::with_source(Kind::Io, "cannot encode the request", e))?;
    let nonce = crate::nonce::new()?;
    store.save_request(&nonce, body.into()).await?;
    let lsn = reread::announce(writer, &nonce).await?;
    let names: Vec<String> = req
        .tables
        .iter()
        .map(|t| format!("{}.{}", t.schema, t.table))
        .collect();
    say!(
        "requested a snapshot of {} at WAL position {lsn}: the walnats streaming slot {slot:?} re-reads them \
         in chunks when its stream reaches that position (progress: `walnats status`, and its log)",
        names.join(", ")
    );
    Ok(())
}
