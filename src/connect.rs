//! Connecting to both sides for a command: PostgreSQL's SQL side, NATS and
//! JetStream, and the names (database, subject prefix, stream) that follow
//! from the database's. Shared by `run`, `check`, `status`, `tail` and the
//! admin commands; nothing here streams or publishes.

use std::sync::Arc;

use crate::checkpoint::Store;
use crate::config::{Config, PgConnectConfig};
use crate::error::Result;
use crate::sink;

use crate::source::{self, setup};

/// Everything a session needs from PostgreSQL's SQL side and NATS, set up
/// and checked; shared by `run`, `check` and `status`.
pub struct Connected {
    /// `postgres.url` pinned to the one server this session uses.
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

/// PostgreSQL's SQL side and NATS, with the names that follow from the
/// database's.
pub async fn both(cfg: &Config) -> Result<Connected> {
    // The server is chosen once: `pg` is pinned to it, so that every other
    // connection of the session (replication, snapshot readers) goes there.
    let (sql, pg) = source::connect_session(&cfg.postgres.connect).await?;
    let sql = Arc::new(sql);
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
pub async fn nats_only(cfg: &Config) -> Result<(async_nats::jetstream::Context, String, String)> {
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
