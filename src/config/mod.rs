//! Configuration: the TOML file plus `WALNATS_<SECTION>_<KEY>` overrides,
//! validated once into typed values.
//!
//! Owns every setting and its default. A wrong, missing or contradictory
//! setting stops the program here, before anything is touched, with one
//! line naming the key and the fix. Secrets are wrapped in [`Secret`] so
//! that no `Debug` or `Display` can print them. It knows no connection,
//! source or sink: it only reads and checks.
//!
//! The way in: `file` reads the TOML and refuses unknown keys and wrong
//! types, `env` lays the overrides over it, serde fills [`RawConfig`], and
//! each section's file (`postgres`, `nats`, `output`, `limits`, `http`,
//! `outbox`) turns its raw section into typed settings. `keys` reads the list of
//! known keys off the `Raw*` structs, so that a key exists by being a
//! field.

mod env;
mod file;
mod http;
mod keys;
mod limits;
mod nats;
mod outbox;
mod output;
mod postgres;
mod secret;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

pub use limits::OversizePolicy;
pub use nats::{FastIngest, NatsAuth, NatsConfig, valid_stream_name, valid_subject_prefix};
pub use outbox::{OutboxConfig, OutboxSource};
pub use output::{
    DEFAULT_CHUNK_BYTES, OutputConfig, OutputFormat, SnapshotMode, SnapshotReading,
    publishes_message,
};
pub use postgres::{
    PgConnectConfig, PgHost, PostgresConfig, ServerState, SslMode, TableSelector,
    TargetSessionAttrs, choose_server,
};
pub use secret::Secret;

use crate::error::{Error, Kind, Result};

/// The file's shape: one struct per section, each in its section's file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    postgres: postgres::RawPostgres,
    #[serde(default)]
    nats: nats::RawNats,
    #[serde(default)]
    snapshot: output::RawSnapshot,
    #[serde(default)]
    output: output::RawOutput,
    #[serde(default)]
    limits: limits::RawLimits,
    #[serde(default)]
    http: http::RawHttp,
    /// `[[outbox]]`: an array of tables, so no `WALNATS_*` variable.
    #[serde(default)]
    outbox: Vec<outbox::RawOutbox>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub nats: NatsConfig,
    pub snapshot: SnapshotMode,
    /// `[snapshot]` parallelism and chunk size.
    pub snapshot_reading: SnapshotReading,
    pub output: OutputConfig,
    pub on_oversize: OversizePolicy,
    /// The Object Store bucket for oversized bodies (`on_oversize =
    /// "object_store"`).
    pub object_store_bucket: String,
    /// Warn when the slot retains more WAL than this; `None`: never.
    pub wal_retained_warn: Option<u64>,
    /// `None` when `[http] listen = ""`.
    pub http_listen: Option<SocketAddr>,
    /// From `http.token`, `http.token_file` or `WALNATS_HTTP_TOKEN`: when
    /// set, every HTTP endpoint but `/healthz` and `/readyz` asks for it.
    pub http_token: Option<Secret>,
    /// `[[outbox]]` entries, in file order.
    pub outbox: Vec<OutboxConfig>,
    /// `WALNATS_<SECTION>_*` variables that name no key (warned about).
    pub env_ignored: Vec<String>,
}

fn config_err(msg: impl Into<String>) -> Error {
    Error::new(Kind::Config, msg)
}

/// `value` as a count within `range`, or the refusal naming `key`.
fn count(value: i64, range: std::ops::RangeInclusive<i64>, key: &str) -> Result<usize> {
    range
        .contains(&value)
        .then(|| usize::try_from(value).ok())
        .flatten()
        .ok_or_else(|| {
            config_err(format!(
                "{key} must be between {} and {}",
                range.start(),
                range.end()
            ))
        })
}

impl Config {
    /// Reads `path` (which may be missing when every required key comes
    /// from the environment) and applies `WALNATS_*` overrides from `env`.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(config_err(format!(
                    "cannot read config file {}: {e}; fix the path given with --config",
                    path.display()
                )));
            }
        };
        Config::from_toml(&text, &path.display().to_string(), env)
    }

    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let keys = keys::known()?;
        let mut table = file::parse(text, origin, keys)?;
        let env_ignored = env::apply(&mut table, env, keys)?;
        // The file's types are checked by now and the environment's are
        // made to fit: what is left is a number out of range. serde's own
        // message would repeat the value.
        let raw: RawConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let path = e.path().to_string();
                let what = keys
                    .at_path(&path)
                    .map_or("see config/walnats.example.toml", keys::KeyType::expected);
                config_err(format!(
                    "{origin}: {path} must be {what}, in range (the value is not shown: it may be a secret)"
                ))
            })?;
        let mut config = raw.validate()?;
        config.env_ignored = env_ignored;
        Ok(config)
    }
}

impl RawConfig {
    /// Each section on its own, in the file's order: the first mistake
    /// found is the one reported.
    fn validate(self) -> Result<Config> {
        let postgres = PostgresConfig::from_raw(self.postgres)?;
        let nats = NatsConfig::from_raw(self.nats)?;
        let (snapshot, snapshot_reading) = SnapshotMode::from_raw(self.snapshot)?;
        let output = OutputConfig::from_raw(self.output)?;
        let limits = limits::Limits::from_raw(self.limits)?;
        let http = http::Http::from_raw(self.http)?;
        let outbox = OutboxConfig::from_raw(self.outbox)?;
        Ok(Config {
            postgres,
            nats,
            snapshot,
            snapshot_reading,
            output,
            on_oversize: limits.on_oversize,
            object_store_bucket: limits.object_store_bucket,
            wal_retained_warn: limits.wal_retained_warn,
            http_listen: http.listen,
            http_token: http.token,
            outbox,
            env_ignored: Vec::new(),
        })
    }
}

/// A config dump for `check`/`status` with every secret masked.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            let pairs: BTreeMap<String, String> = u
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k.contains("password") || k.contains("token") {
                        "***".to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            if !pairs.is_empty() {
                let q: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                u.set_query(Some(&q.join("&")));
            }
            u.to_string()
        }
        Err(_) => "<unparsable url>".to_owned(),
    }
}
