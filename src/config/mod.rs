//! Configuration: the TOML file plus `WALNATS_<SECTION>_<KEY>` overrides,
//! validated once into typed values.
//!
//! Owns every setting and its default. A wrong, missing or contradictory
//! setting stops the program here, before anything is touched, with one
//! line naming the key and the fix. Secrets are wrapped in [`Secret`] so
//! that no `Debug` or `Display` can print them.

mod file;
mod postgres;

pub use postgres::{PgConnectConfig, SslMode};

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Kind, Result};

/// A string that must never be printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

// ---------------------------------------------------------------- raw file

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    postgres: RawPostgres,
    #[serde(default)]
    nats: RawNats,
    #[serde(default)]
    snapshot: RawSnapshot,
    #[serde(default)]
    output: RawOutput,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    http: RawHttp,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    url: Option<Secret>,
    password: Option<Secret>,
    password_file: Option<PathBuf>,
    slot: Option<String>,
    publication: Option<String>,
    tables: Option<Vec<String>>,
    status_interval_ms: Option<u64>,
    heartbeat_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNats {
    url: Option<Secret>,
    stream: Option<String>,
    subject_prefix: Option<String>,
    replicas: Option<i64>,
    checkpoint_bucket: Option<String>,
    max_in_flight: Option<i64>,
    ack_timeout_ms: Option<u64>,
    fast_ingest: Option<String>,
    creds_file: Option<PathBuf>,
    nkey_file: Option<PathBuf>,
    nkey: Option<Secret>,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    user: Option<String>,
    password: Option<Secret>,
    password_file: Option<PathBuf>,
    tls_required: Option<bool>,
    tls_ca_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSnapshot {
    mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    format: Option<String>,
    tx_markers: Option<bool>,
    message_prefixes: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    on_oversize: Option<String>,
    object_store_bucket: Option<String>,
    wal_retained_warn: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
}

/// The type of each key, so that an environment override is read as what
/// the key expects (a password of digits stays a string).
#[derive(Clone, Copy)]
enum KeyType {
    Str,
    Int,
    Bool,
    StrList,
}

const KEYS: &[(&str, &[(&str, KeyType)])] = &[
    (
        "postgres",
        &[
            ("url", KeyType::Str),
            ("password", KeyType::Str),
            ("password_file", KeyType::Str),
            ("slot", KeyType::Str),
            ("publication", KeyType::Str),
            ("tables", KeyType::StrList),
            ("status_interval_ms", KeyType::Int),
            ("heartbeat_interval", KeyType::Str),
        ],
    ),
    (
        "nats",
        &[
            ("url", KeyType::Str),
            ("stream", KeyType::Str),
            ("subject_prefix", KeyType::Str),
            ("replicas", KeyType::Int),
            ("checkpoint_bucket", KeyType::Str),
            ("max_in_flight", KeyType::Int),
            ("ack_timeout_ms", KeyType::Int),
            ("fast_ingest", KeyType::Str),
            ("creds_file", KeyType::Str),
            ("nkey_file", KeyType::Str),
            ("nkey", KeyType::Str),
            ("token", KeyType::Str),
            ("token_file", KeyType::Str),
            ("user", KeyType::Str),
            ("password", KeyType::Str),
            ("password_file", KeyType::Str),
            ("tls_required", KeyType::Bool),
            ("tls_ca_file", KeyType::Str),
            ("tls_cert_file", KeyType::Str),
            ("tls_key_file", KeyType::Str),
        ],
    ),
    ("snapshot", &[("mode", KeyType::Str)]),
    (
        "output",
        &[
            ("format", KeyType::Str),
            ("tx_markers", KeyType::Bool),
            ("message_prefixes", KeyType::StrList),
        ],
    ),
    (
        "limits",
        &[
            ("on_oversize", KeyType::Str),
            ("object_store_bucket", KeyType::Str),
            ("wal_retained_warn", KeyType::Str),
        ],
    ),
    (
        "http",
        &[
            ("listen", KeyType::Str),
            ("token", KeyType::Str),
            ("token_file", KeyType::Str),
        ],
    ),
];

// ------------------------------------------------------------ typed config

#[derive(Debug, Clone)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub nats: NatsConfig,
    pub snapshot: SnapshotMode,
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
    /// `WALNATS_<SECTION>_*` variables that name no key (warned about).
    pub env_ignored: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// The URL as given; may hold a password, hence `Secret`.
    pub url: Secret,
    /// From `password`, `password_file` or `WALNATS_POSTGRES_PASSWORD`;
    /// wins over a password in the URL.
    pub password: Option<Secret>,
    /// `url` and `password`, parsed and checked once.
    pub connect: PgConnectConfig,
    pub slot: String,
    pub publication: String,
    /// Empty: all tables.
    pub tables: Vec<TableSelector>,
    pub status_interval: Duration,
    /// `pg_logical_emit_message` heartbeats; `None`: off.
    pub heartbeat_interval: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSelector {
    pub schema: String,
    /// `None` for `schema.*`.
    pub table: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub url: Secret,
    /// `None`: derived from the database name once connected.
    pub stream: Option<String>,
    /// `None`: `cdc.<database name>`.
    pub subject_prefix: Option<String>,
    pub replicas: usize,
    pub checkpoint_bucket: String,
    pub max_in_flight: usize,
    pub ack_timeout: Duration,
    pub fast_ingest: FastIngest,
    pub auth: NatsAuth,
    pub tls_required: bool,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_client: Option<(PathBuf, PathBuf)>,
}

/// `nats.fast_ingest`: how publishes are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastIngest {
    /// Fast-ingest batches when the server has them (2.14+), else one
    /// acknowledgement per message.
    Auto,
    /// Fast-ingest batches or refuse to start.
    On,
    /// One acknowledgement per message.
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    None,
    CredsFile(PathBuf),
    NkeySeed(Secret),
    Token(Secret),
    UserPassword { user: String, password: Secret },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    Initial,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    Json,
    Debezium,
}

#[derive(Debug, Clone)]
pub struct OutputConfig {
    pub format: OutputFormat,
    pub tx_markers: bool,
    /// `pg_logical_emit_message` prefixes published on `_message`
    /// subjects; `"*"` publishes every one. Empty: none (any database user
    /// can write such messages, so only those asked for are published).
    pub message_prefixes: Vec<String>,
}

impl OutputConfig {
    /// Whether `_message`s with this prefix are published.
    pub fn publishes_message(&self, prefix: &[u8]) -> bool {
        publishes_message(&self.message_prefixes, prefix)
    }
}

/// Whether `prefix` is in `list` (`"*"`: every prefix). Exact, byte for
/// byte: a prefix is an identifier, not a pattern.
pub fn publishes_message(list: &[String], prefix: &[u8]) -> bool {
    list.iter().any(|p| p == "*" || p.as_bytes() == prefix)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OversizePolicy {
    Fail,
    Skip,
    ObjectStore,
}

fn config_err(msg: impl Into<String>) -> Error {
    Error::new(Kind::Config, msg)
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
        let mut table = file::parse(text, origin)?;
        let env_ignored = apply_env(&mut table, env)?;
        // The file's types are checked by now and the environment's are
        // made to fit: what is left is a number out of range. serde's own
        // message would repeat the value.
        let raw: RawConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let path = e.path().to_string();
                let ty = KEYS.iter().find_map(|(section, keys)| {
                    let key = path.strip_prefix(section)?.strip_prefix('.')?;
                    keys.iter().find(|(k, _)| *k == key).map(|(_, ty)| *ty)
                });
                let what = ty.map_or("see config/walnats.example.toml", file::expected);
                config_err(format!(
                    "{origin}: {path} must be {what}, in range (the value is not shown: it may be a secret)"
                ))
            })?;
        let mut config = raw.validate()?;
        config.env_ignored = env_ignored;
        Ok(config)
    }
}

/// `WALNATS_<SECTION>_<KEY>=value` overrides `[section] key`. Variables
/// that name no key (`WALNATS_LOG`, or a tool's own `WALNATS_NATS_SERVER`)
/// are returned so the caller can warn about them: refusing them would break
/// environments that share the prefix, and a typo still shows in the log.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>> {
    let mut ignored = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("WALNATS_") else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let found = KEYS.iter().find_map(|(section, keys)| {
            let key = rest.strip_prefix(section)?.strip_prefix('_')?;
            let (_, ty) = keys.iter().find(|(k, _)| *k == key)?;
            Some((*section, key.to_owned(), *ty))
        });
        let Some((section, key, ty)) = found else {
            if KEYS.iter().any(|(s, _)| rest.starts_with(&format!("{s}_"))) {
                ignored.push(name);
            }
            continue;
        };
        let key = key.as_str();
        let parsed = match ty {
            KeyType::Str => toml::Value::String(value),
            KeyType::Int => value
                .trim()
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|_| config_err(format!("{name} must be a whole number")))?,
            KeyType::Bool => match value.trim() {
                "true" | "1" | "yes" => toml::Value::Boolean(true),
                "false" | "0" | "no" => toml::Value::Boolean(false),
                _ => return Err(config_err(format!("{name} must be true or false"))),
            },
            KeyType::StrList => {
                let items = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_owned()))
                    .collect();
                toml::Value::Array(items)
            }
        };
        let entry = table
            .entry((*section).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => {
                t.insert(key.to_owned(), parsed);
            }
            _ => return Err(config_err(format!("[{section}] must be a table"))),
        }
    }
    Ok(ignored)
}

fn read_secret_file(path: &Path, key: &str) -> Result<Secret> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        config_err(format!(
            "{key}: cannot read {}: {e}; fix the path or the file's permissions",
            path.display()
        ))
    })?;
    Ok(Secret::new(text.trim_end_matches(['\r', '\n'])))
}

fn one_secret(inline: Option<Secret>, file: Option<PathBuf>, key: &str) -> Result<Option<Secret>> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(config_err(format!(
            "both {key} and {key}_file are set: keep one"
        ))),
        (Some(s), None) => Ok(Some(s)),
        (None, Some(p)) => read_secret_file(&p, &format!("{key}_file")).map(Some),
        (None, None) => Ok(None),
    }
}

/// Checks `nats.url` and takes credentials out of it: async-nats would
/// ignore them and logs the server's URL at debug. `user:password@` becomes
/// user and password, `token@` a token, as other NATS clients read them.
fn split_nats_credentials(urls: &Secret) -> Result<(Secret, Option<NatsAuth>)> {
    let not_a_url = || {
        config_err("nats.url is not a NATS URL: use nats://host:4222 (several separated by commas)")
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|d| d.into_owned())
            .map_err(|_| {
                config_err("nats.url: its credentials are not valid percent-encoded UTF-8")
            })
    };
    let mut auth: Option<NatsAuth> = None;
    let mut clean = Vec::new();
    for part in urls.expose().split(',') {
        let part = part.trim();
        let with_scheme = if part.contains("://") {
            part.to_owned()
        } else {
            format!("nats://{part}")
        };
        let mut u = url::Url::parse(&with_scheme).map_err(|_| not_a_url())?;
        if !matches!(u.scheme(), "nats" | "tls" | "ws" | "wss") || u.host().is_none() {
            return Err(not_a_url());
        }
        if u.username().is_empty() && u.password().is_none() {
            clean.push(part.to_owned());
            continue;
        }
        let user = decode(u.username())?;
        let here = match u.password() {
            Some(p) => NatsAuth::UserPassword {
                user,
                password: Secret::new(decode(p)?),
            },
            None => NatsAuth::Token(Secret::new(user)),
        };
        if auth.as_ref().is_some_and(|a| *a != here) {
            return Err(config_err(
                "nats.url: its URLs carry different credentials: give them once, as nats.user + \
                 nats.password (or nats.token), and leave them out of the URLs",
            ));
        }
        auth = Some(here);
        if u.set_username("").is_err() || u.set_password(None).is_err() {
            return Err(not_a_url());
        }
        clean.push(u.to_string());
    }
    Ok((Secret::new(clean.join(",")), auth))
}

/// A replication slot name: PostgreSQL allows lower-case letters, digits and
/// underscores, at most 63 bytes.
fn valid_slot_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A NATS subject made of literal tokens (no wildcards, no spaces).
pub fn valid_subject_prefix(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && t.bytes()
                    .all(|b| b > b' ' && b != 0x7f && b != b'*' && b != b'>')
        })
}

/// JetStream stream and KV bucket names: no spaces, dots, wildcards or
/// path separators.
pub fn valid_stream_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b > b' ' && b != 0x7f && !matches!(b, b'.' | b'*' | b'>' | b'/' | b'\\'))
}

/// `"30s"`, `"500ms"`, `"5m"`, `"1h"`, or `"0"`.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// `"1GiB"`, `"512MiB"`, `"64KiB"` (powers of 1024), `"10GB"`, `"500MB"`,
/// `"1kB"` (powers of 1000), `"1048576"` or `"1048576B"` (bytes).
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// KV and Object Store bucket names: letters, digits, `_` and `-`.
fn valid_bucket_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parse_table_selector(s: &str) -> Result<TableSelector> {
    // Quoted identifiers are not supported here: names with dots would be
    // ambiguous; such tables are selected through a publication made by hand.
    let err = || {
        config_err(
            "postgres.tables: an entry is not \"schema.table\" or \"schema.*\"; \
             for names with dots or quotes create the publication yourself and leave tables empty",
        )
    };
    let (schema, table) = s.split_once('.').ok_or_else(err)?;
    if schema.is_empty() || table.is_empty() || table.contains('.') || schema == "*" {
        return Err(err());
    }
    Ok(TableSelector {
        schema: schema.to_owned(),
        table: (table != "*").then(|| table.to_owned()),
    })
}

impl RawConfig {
    fn validate(self) -> Result<Config> {
        let pg = self.postgres;
        let url = pg.url.ok_or_else(|| {
            config_err(
                "postgres.url is missing: set it in the config file or WALNATS_POSTGRES_URL, \
                 e.g. postgres://walnats@127.0.0.1:5432/app",
            )
        })?;
        if !(url.expose().starts_with("postgres://") || url.expose().starts_with("postgresql://")) {
            return Err(config_err(
                "postgres.url must start with postgres:// or postgresql://",
            ));
        }
        let slot = pg.slot.unwrap_or_else(|| "walnats".to_owned());
        if !valid_slot_name(&slot) {
            return Err(config_err(
                "postgres.slot is not a valid slot name: use lower-case letters, digits and _ (at most 63)",
            ));
        }
        let publication = pg.publication.unwrap_or_else(|| "walnats".to_owned());
        if publication.is_empty() || publication.len() > 63 || publication.contains('\0') {
            return Err(config_err(
                "postgres.publication must be 1 to 63 bytes long",
            ));
        }
        let tables = pg
            .tables
            .unwrap_or_default()
            .iter()
            .map(|s| parse_table_selector(s))
            .collect::<Result<Vec<_>>>()?;
        let status_interval = Duration::from_millis(pg.status_interval_ms.unwrap_or(1000));
        if status_interval.is_zero() || status_interval > Duration::from_secs(30) {
            return Err(config_err(
                "postgres.status_interval_ms must be between 1 and 30000 (well inside wal_sender_timeout)",
            ));
        }
        let heartbeat_interval =
            parse_duration(pg.heartbeat_interval.as_deref().unwrap_or("30s")).ok_or_else(|| {
                config_err(
                    "postgres.heartbeat_interval must be a duration like \"30s\", \"500ms\", \"5m\", or \"0\" (off)",
                )
            })?;
        let heartbeat_interval = (!heartbeat_interval.is_zero()).then_some(heartbeat_interval);
        let pg_password = one_secret(pg.password, pg.password_file, "postgres.password")?;
        // Every URL parameter is checked now, before anything is touched,
        // and kept parsed for every connection made later.
        let connect = PgConnectConfig::parse(url.expose(), pg_password.clone())?;

        let n = self.nats;
        let nats_url = n
            .url
            .unwrap_or_else(|| Secret::new("nats://127.0.0.1:4222"));
        let (nats_url, url_auth) = split_nats_credentials(&nats_url)?;
        if let Some(s) = &n.stream
            && !valid_stream_name(s)
        {
            return Err(config_err(
                "nats.stream is not a valid stream name: no spaces, dots, '*', '>', '/' or '\\'",
            ));
        }
        if let Some(p) = &n.subject_prefix
            && !valid_subject_prefix(p)
        {
            return Err(config_err(
                "nats.subject_prefix is not a subject of literal tokens: no wildcards, spaces or empty tokens",
            ));
        }
        let replicas = n.replicas.unwrap_or(1);
        if !(1..=5).contains(&replicas) {
            return Err(config_err("nats.replicas must be between 1 and 5"));
        }
        let checkpoint_bucket = n.checkpoint_bucket.unwrap_or_else(|| "walnats".to_owned());
        if !valid_bucket_name(&checkpoint_bucket) {
            return Err(config_err(
                "nats.checkpoint_bucket may only hold letters, digits, _ and -",
            ));
        }
        let max_in_flight = n.max_in_flight.unwrap_or(4096);
        if !(1..=1_000_000).contains(&max_in_flight) {
            return Err(config_err(
                "nats.max_in_flight must be between 1 and 1000000",
            ));
        }
        let ack_timeout = Duration::from_millis(n.ack_timeout_ms.unwrap_or(10_000));
        if ack_timeout < Duration::from_millis(100) {
            return Err(config_err("nats.ack_timeout_ms must be at least 100"));
        }
        let fast_ingest = match n.fast_ingest.as_deref().unwrap_or("auto") {
            "auto" => FastIngest::Auto,
            "on" => FastIngest::On,
            "off" => FastIngest::Off,
            _ => {
                return Err(config_err(
                    "nats.fast_ingest is unknown: use \"auto\", \"on\" or \"off\"",
                ));
            }
        };
        let token = one_secret(n.token, n.token_file, "nats.token")?;
        let nkey = one_secret(n.nkey, n.nkey_file, "nats.nkey")?;
        let nats_password = one_secret(n.password, n.password_file, "nats.password")?;
        let mut methods = Vec::new();
        if let Some(c) = n.creds_file {
            methods.push(NatsAuth::CredsFile(c));
        }
        if let Some(k) = nkey {
            methods.push(NatsAuth::NkeySeed(k));
        }
        if let Some(t) = token {
            methods.push(NatsAuth::Token(t));
        }
        match (n.user, nats_password) {
            (Some(user), Some(password)) => methods.push(NatsAuth::UserPassword { user, password }),
            (None, None) => {}
            _ => {
                return Err(config_err(
                    "nats.user and nats.password go together: set both or neither",
                ));
            }
        }
        if let Some(auth) = url_auth {
            if !methods.is_empty() {
                return Err(config_err(
                    "nats.url holds credentials (user:password@ or token@) and another NATS auth method \
                     is set: keep one, preferably nats.user + nats.password_file (or nats.token_file)",
                ));
            }
            methods.push(auth);
        }
        if methods.len() > 1 {
            return Err(config_err(
                "more than one NATS auth method is set (creds_file, nkey, token, user+password): keep one",
            ));
        }
        let auth = methods.pop().unwrap_or(NatsAuth::None);
        let tls_client = match (n.tls_cert_file, n.tls_key_file) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(config_err(
                    "nats.tls_cert_file and nats.tls_key_file go together: set both or neither",
                ));
            }
        };

        let snapshot = match self.snapshot.mode.as_deref().unwrap_or("initial") {
            "initial" => SnapshotMode::Initial,
            "never" => SnapshotMode::Never,
            _ => {
                return Err(config_err(
                    "snapshot.mode is unknown: use \"initial\" or \"never\"",
                ));
            }
        };
        let format = match self.output.format.as_deref().unwrap_or("json") {
            "json" => OutputFormat::Json,
            "debezium" => OutputFormat::Debezium,
            _ => {
                return Err(config_err(
                    "output.format is unknown: use \"json\" or \"debezium\"",
                ));
            }
        };
        let message_prefixes = self.output.message_prefixes.clone().unwrap_or_default();
        if message_prefixes.iter().any(|p| p.is_empty()) {
            return Err(config_err(
                "output.message_prefixes has an empty entry: list the pg_logical_emit_message prefixes to \
                 publish, or \"*\" for every one",
            ));
        }
        if message_prefixes.iter().any(|p| p.starts_with("walnats.")) {
            return Err(config_err(
                "output.message_prefixes lists a prefix starting with \"walnats.\": those are walnats' own \
                 (heartbeats, snapshot requests, watermarks) and are never published; remove it",
            ));
        }
        let on_oversize = match self.limits.on_oversize.as_deref().unwrap_or("fail") {
            "fail" => OversizePolicy::Fail,
            "skip" => OversizePolicy::Skip,
            "object_store" => OversizePolicy::ObjectStore,
            _ => {
                return Err(config_err(
                    "limits.on_oversize is unknown: use \"fail\", \"skip\" or \"object_store\"",
                ));
            }
        };
        let object_store_bucket = self
            .limits
            .object_store_bucket
            .unwrap_or_else(|| "walnats_oversize".to_owned());
        if !valid_bucket_name(&object_store_bucket) {
            return Err(config_err(
                "limits.object_store_bucket may only hold letters, digits, _ and -",
            ));
        }
        let wal_retained_warn = parse_bytes(
            self.limits.wal_retained_warn.as_deref().unwrap_or("1GiB"),
        )
        .ok_or_else(|| {
            config_err(
                "limits.wal_retained_warn must be a size like \"1GiB\", \"512MiB\", \"10GB\", or \"0\" (never warn)",
            )
        })?;
        let wal_retained_warn = (wal_retained_warn > 0).then_some(wal_retained_warn);
        let http_listen = match self.http.listen.as_deref().unwrap_or("127.0.0.1:9750") {
            "" => None,
            s => Some(s.parse::<SocketAddr>().map_err(|_| {
                config_err(
                    "http.listen is not an address:port like 127.0.0.1:9750 (\"\" turns HTTP off)",
                )
            })?),
        };

        let http_token = one_secret(self.http.token, self.http.token_file, "http.token")?;
        if let Some(t) = &http_token
            && (t.expose().is_empty() || !t.expose().bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(config_err(
                "http.token must be printable ASCII without spaces (it travels in an \
                 Authorization header), and not empty: e.g. 32 random characters from \
                 `openssl rand -hex 32`; remove it to leave HTTP open",
            ));
        }

        Ok(Config {
            postgres: PostgresConfig {
                url,
                password: pg_password,
                connect,
                slot,
                publication,
                tables,
                status_interval,
                heartbeat_interval,
            },
            nats: NatsConfig {
                url: nats_url,
                stream: n.stream,
                subject_prefix: n.subject_prefix,
                replicas: replicas as usize,
                checkpoint_bucket,
                max_in_flight: max_in_flight as usize,
                ack_timeout,
                fast_ingest,
                auth,
                tls_required: n.tls_required.unwrap_or(false),
                tls_ca_file: n.tls_ca_file,
                tls_client,
            },
            snapshot,
            output: OutputConfig {
                format,
                tx_markers: self.output.tx_markers.unwrap_or(false),
                message_prefixes,
            },
            on_oversize,
            object_store_bucket,
            wal_retained_warn,
            http_listen,
            http_token,
            env_ignored: Vec::new(),
        })
    }
}

/// Settings whose effective value depends on the database name.
impl NatsConfig {
    pub fn subject_prefix_for(&self, database: &str) -> String {
        match &self.subject_prefix {
            Some(p) => p.clone(),
            None => format!("cdc.{}", crate::sink::subject::escape_token(database)),
        }
    }

    pub fn stream_for(&self, database: &str) -> String {
        match &self.stream {
            Some(s) => s.clone(),
            None => {
                let up: String = database
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_uppercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                format!("CDC_{up}")
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config> {
        Config::from_toml(
            text,
            "test.toml",
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    const MIN: &str = "[postgres]\nurl = \"postgres://u@h/app\"\n";

    #[test]
    fn defaults_follow_the_contract() {
        let c = load(MIN, &[]).unwrap();
        assert_eq!(c.postgres.slot, "walnats");
        assert_eq!(c.postgres.publication, "walnats");
        assert!(c.postgres.tables.is_empty());
        assert_eq!(c.nats.url.expose(), "nats://127.0.0.1:4222");
        assert_eq!(c.nats.replicas, 1);
        assert_eq!(c.nats.subject_prefix_for("app"), "cdc.app");
        assert_eq!(c.nats.stream_for("app"), "CDC_APP");
        assert_eq!(c.snapshot, SnapshotMode::Initial);
        assert_eq!(c.output.format, OutputFormat::Json);
        assert!(!c.output.tx_markers);
        assert_eq!(c.on_oversize, OversizePolicy::Fail);
        assert_eq!(c.object_store_bucket, "walnats_oversize");
        assert_eq!(c.postgres.heartbeat_interval, Some(Duration::from_secs(30)));
        assert_eq!(c.wal_retained_warn, Some(1 << 30));
        assert_eq!(c.http_listen, Some("127.0.0.1:9750".parse().unwrap()));
    }

    #[test]
    fn env_overrides_file_and_keeps_types() {
        let c = load(
            MIN,
            &[
                ("WALNATS_POSTGRES_SLOT", "other"),
                ("WALNATS_NATS_PASSWORD", "1234"),
                ("WALNATS_NATS_USER", "bob"),
                ("WALNATS_NATS_REPLICAS", "3"),
                ("WALNATS_OUTPUT_TX_MARKERS", "true"),
                ("WALNATS_POSTGRES_TABLES", "public.orders, billing.*"),
                ("WALNATS_LIMITS_ON_OVERSIZE", "object_store"),
                ("WALNATS_LIMITS_OBJECT_STORE_BUCKET", "big_rows"),
                ("WALNATS_POSTGRES_HEARTBEAT_INTERVAL", "0"),
                ("WALNATS_LIMITS_WAL_RETAINED_WARN", "512MiB"),
                ("WALNATS_LOG", "debug"),
                ("WALNATS_PG15_BIN", "/x"),
            ],
        )
        .unwrap();
        assert_eq!(c.postgres.slot, "other");
        assert_eq!(c.nats.replicas, 3);
        assert!(c.output.tx_markers);
        assert_eq!(c.on_oversize, OversizePolicy::ObjectStore);
        assert_eq!(c.object_store_bucket, "big_rows");
        assert_eq!(c.postgres.heartbeat_interval, None);
        assert_eq!(c.wal_retained_warn, Some(512 << 20));
        assert_eq!(
            c.nats.auth,
            NatsAuth::UserPassword {
                user: "bob".into(),
                password: Secret::new("1234")
            }
        );
        assert_eq!(c.postgres.tables.len(), 2);
        assert_eq!(c.postgres.tables[1].table, None);
        assert!(c.env_ignored.is_empty(), "{:?}", c.env_ignored);
        let t = load(
            MIN,
            &[
                ("WALNATS_POSTGRES_SLOTT", "x"),
                ("WALNATS_NATS_SERVER", "/bin/x"),
            ],
        )
        .unwrap();
        assert_eq!(
            t.env_ignored,
            vec![
                "WALNATS_POSTGRES_SLOTT".to_owned(),
                "WALNATS_NATS_SERVER".to_owned()
            ]
        );
    }

    #[test]
    fn mistakes_name_the_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("", &[], "postgres.url is missing"),
            ("[postgres]\nurl = \"mysql://x\"\n", &[], "postgres.url"),
            (
                "[postgres]\nurl = \"postgres://h/a\"\nslott = \"x\"\n",
                &[],
                "slott",
            ),
            (
                "[postgres]\nurl = \"postgres://h/a\"\nslot = 5\n",
                &[],
                "slot",
            ),
            (
                MIN,
                &[("WALNATS_NATS_REPLICAS", "three")],
                "WALNATS_NATS_REPLICAS",
            ),
            (
                MIN,
                &[("WALNATS_POSTGRES_SLOT", "Bad-Name")],
                "postgres.slot",
            ),
            (
                MIN,
                &[("WALNATS_NATS_SUBJECT_PREFIX", "a..b")],
                "nats.subject_prefix",
            ),
            (MIN, &[("WALNATS_NATS_STREAM", "a.b")], "nats.stream"),
            (
                MIN,
                &[("WALNATS_SNAPSHOT_MODE", "sometimes")],
                "snapshot.mode",
            ),
            (
                MIN,
                &[("WALNATS_LIMITS_ON_OVERSIZE", "drop")],
                "limits.on_oversize",
            ),
            (
                MIN,
                &[("WALNATS_LIMITS_OBJECT_STORE_BUCKET", "a.b")],
                "limits.object_store_bucket",
            ),
            (
                MIN,
                &[("WALNATS_POSTGRES_HEARTBEAT_INTERVAL", "often")],
                "postgres.heartbeat_interval",
            ),
            (
                MIN,
                &[("WALNATS_LIMITS_WAL_RETAINED_WARN", "1 gig")],
                "limits.wal_retained_warn",
            ),
            (MIN, &[("WALNATS_NATS_USER", "bob")], "nats.user"),
            (MIN, &[("WALNATS_NATS_URL", "http://x y")], "nats.url"),
            (MIN, &[("WALNATS_HTTP_LISTEN", "nowhere")], "http.listen"),
            (
                MIN,
                &[("WALNATS_POSTGRES_TABLES", "orders")],
                "postgres.tables",
            ),
            ("[postgres\n", &[], "test.toml"),
        ];
        for (text, env, want) in cases {
            let err = load(text, env).unwrap_err();
            assert_eq!(err.kind(), Kind::Config);
            assert!(
                err.to_string().contains(want),
                "{want:?} not in {:?}",
                err.to_string()
            );
        }
    }

    #[test]
    fn the_example_config_loads_and_documents_every_key() {
        let text = include_str!("../../config/walnats.example.toml");
        let c = load(text, &[]).unwrap();
        assert_eq!(c.postgres.heartbeat_interval, Some(Duration::from_secs(30)));
        for (section, keys) in KEYS {
            assert!(text.contains(&format!("[{section}]")), "[{section}]");
            for (key, _) in *keys {
                assert!(
                    text.contains(&format!("{key} =")),
                    "{section}.{key} is not in config/walnats.example.toml"
                );
            }
        }
    }

    #[test]
    fn the_http_token_comes_from_the_file_the_key_or_the_environment() {
        assert!(load(MIN, &[]).unwrap().http_token.is_none());
        let c = load(MIN, &[("WALNATS_HTTP_TOKEN", "from-env")]).unwrap();
        assert_eq!(c.http_token, Some(Secret::new("from-env")));
        let c = load(&format!("{MIN}[http]\ntoken = \"from-key\"\n"), &[]).unwrap();
        assert_eq!(c.http_token, Some(Secret::new("from-key")));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let c = load(
            &format!(
                "{MIN}[http]\ntoken_file = {:?}\n",
                file.display().to_string()
            ),
            &[],
        )
        .unwrap();
        assert_eq!(c.http_token, Some(Secret::new("from-file")));
        for (env, want) in [
            (&[("WALNATS_HTTP_TOKEN", "")][..], "http.token"),
            (&[("WALNATS_HTTP_TOKEN", "has space")][..], "http.token"),
            (
                &[
                    ("WALNATS_HTTP_TOKEN", "a"),
                    ("WALNATS_HTTP_TOKEN_FILE", "/x"),
                ][..],
                "http.token",
            ),
        ] {
            let err = load(MIN, env).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert!(!err.contains("has space"), "{err}");
        }
        assert!(!format!("{c:?}").contains("from-file"));
    }

    #[test]
    fn credentials_leave_the_nats_url_for_connect_options() {
        let c = load(
            MIN,
            &[(
                "WALNATS_NATS_URL",
                "nats://bob:p%40ss@a:4222, nats://bob:p%40ss@b:4222,c:4222",
            )],
        )
        .unwrap();
        assert_eq!(c.nats.url.expose(), "nats://a:4222,nats://b:4222,c:4222");
        assert_eq!(
            c.nats.auth,
            NatsAuth::UserPassword {
                user: "bob".into(),
                password: Secret::new("p@ss")
            }
        );
        let c = load(MIN, &[("WALNATS_NATS_URL", "tls://t0k3n@a:4222")]).unwrap();
        assert_eq!(c.nats.url.expose(), "tls://a:4222");
        assert_eq!(c.nats.auth, NatsAuth::Token(Secret::new("t0k3n")));
        for env in [
            &[("WALNATS_NATS_URL", "nats://u:pw-one@a,nats://u:pw-two@b")][..],
            &[
                ("WALNATS_NATS_URL", "nats://u:pw-one@a"),
                ("WALNATS_NATS_TOKEN", "pw-two"),
            ][..],
        ] {
            let err = load(MIN, env).unwrap_err().to_string();
            assert!(err.contains("nats.url"), "{err}");
            assert!(!err.contains("pw-one") && !err.contains("pw-two"), "{err}");
        }
    }

    #[test]
    fn durations_and_sizes_parse_with_their_units() {
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_bytes("0"), Some(0));
        assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
        assert_eq!(parse_bytes("1gib"), Some(1 << 30));
        assert_eq!(parse_bytes("10GB"), Some(10_000_000_000));
        assert_eq!(parse_bytes("64KiB"), Some(65_536));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("4096B"), Some(4096));
        assert_eq!(parse_bytes("1 PiB"), None);
        assert_eq!(parse_bytes("99999999999TiB"), None);
    }

    #[test]
    fn secrets_never_print() {
        let c = load(
            "[postgres]\nurl = \"postgres://u:hunter2@h/app\"\n[nats]\ntoken = \"s3cr3t\"\n",
            &[],
        )
        .unwrap();
        let dump = format!("{c:?}");
        assert!(
            !dump.contains("hunter2") && !dump.contains("s3cr3t"),
            "{dump}"
        );
        assert_eq!(
            redact_url("postgres://u:hunter2@h/app?sslmode=require"),
            "postgres://u:***@h/app?sslmode=require"
        );
    }
}
