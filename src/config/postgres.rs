//! The `[postgres]` section: the connection URL, parsed once into typed
//! settings, and the slot, publication, tables and timers beside it. It
//! only reads and checks; connecting is `source`'s job.
//!
//! `postgres://user:password@host:port/dbname?sslmode=...&sslrootcert=...
//! &application_name=...&connect_timeout=...`. Unknown query parameters are
//! refused (a typo in `sslmode` must not silently mean "no TLS"). The
//! password is a [`Secret`] and never appears in errors or logs.
//!
//! The sslmode is settled here, once: without one, `sslrootcert` means
//! `verify-full` (a CA given is a CA meant to be checked) and no
//! `sslrootcert` means `prefer`; `require` with `sslrootcert` checks the
//! chain as `verify-ca` does (as libpq does); `verify-ca` without
//! `sslrootcert` is refused, since any certificate a public CA issued for
//! any name would pass it; and so are `disable` and `prefer` with
//! `sslrootcert`, which would ignore it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::secret::one_secret;
use super::{Secret, config_err, redact_url};
use crate::error::{Error, Kind, Result};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPostgres {
    url: Option<Secret>,
    password: Option<Secret>,
    password_file: Option<PathBuf>,
    slot: Option<String>,
    publication: Option<String>,
    tables: Option<Vec<String>>,
    status_interval_ms: Option<u64>,
    heartbeat_interval: Option<String>,
    slot_failover: Option<bool>,
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
    /// PostgreSQL 17+: create the slot with `FAILOVER` (and turn it on for
    /// an existing slot), so that standbys sync it. `false` never turns an
    /// existing slot's failover off.
    pub slot_failover: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSelector {
    pub schema: String,
    /// `None` for `schema.*`.
    pub table: Option<String>,
}

impl PostgresConfig {
    pub(super) fn from_raw(raw: RawPostgres) -> Result<PostgresConfig> {
        let url = url_given(raw.url)?;
        let slot = slot_name(raw.slot)?;
        let publication = publication_name(raw.publication)?;
        let tables = raw
            .tables
            .unwrap_or_default()
            .iter()
            .map(|s| parse_table_selector(s))
            .collect::<Result<Vec<_>>>()?;
        let status_interval = Duration::from_millis(raw.status_interval_ms.unwrap_or(1000));
        if status_interval.is_zero() || status_interval > Duration::from_secs(30) {
            return Err(config_err(
                "postgres.status_interval_ms must be between 1 and 30000 (well inside wal_sender_timeout)",
            ));
        }
        let heartbeat_interval = heartbeat(raw.heartbeat_interval.as_deref())?;
        let password = one_secret(raw.password, raw.password_file, "postgres.password")?;
        // Every URL parameter is checked now, before anything is touched,
        // and kept parsed for every connection made later.
        let connect = PgConnectConfig::parse(url.expose(), password.clone())?;
        Ok(PostgresConfig {
            url,
            password,
            connect,
            slot,
            publication,
            tables,
            status_interval,
            heartbeat_interval,
            slot_failover: raw.slot_failover.unwrap_or(false),
        })
    }
}

fn url_given(url: Option<Secret>) -> Result<Secret> {
    let url = url.ok_or_else(|| {
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
    Ok(url)
}

/// A replication slot name: PostgreSQL allows lower-case letters, digits and
/// underscores, at most 63 bytes.
fn slot_name(slot: Option<String>) -> Result<String> {
    let slot = slot.unwrap_or_else(|| "walnats".to_owned());
    let valid = !slot.is_empty()
        && slot.len() <= 63
        && slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid {
        return Err(config_err(
            "postgres.slot is not a valid slot name: use lower-case letters, digits and _ (at most 63)",
        ));
    }
    Ok(slot)
}

fn publication_name(publication: Option<String>) -> Result<String> {
    let publication = publication.unwrap_or_else(|| "walnats".to_owned());
    if publication.is_empty() || publication.len() > 63 || publication.contains('\0') {
        return Err(config_err(
            "postgres.publication must be 1 to 63 bytes long",
        ));
    }
    Ok(publication)
}

fn parse_table_selector(s: &str) -> Result<TableSelector> {
    let err = || {
        config_err(
            "postgres.tables: an entry is not \"schema.table\" or \"schema.*\"; \
             double-quote a part that holds dots, e.g. '\"my.schema\".orders'",
        )
    };
    let (Some(schema), table) = qualified_name(s).ok_or_else(err)? else {
        return Err(err());
    };
    if schema.is_star() {
        return Err(err());
    }
    Ok(TableSelector {
        schema: schema.name,
        table: (!table.is_star()).then_some(table.name),
    })
}

/// One part of a table's name as the config writes it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct NamePart {
    /// Exact: PostgreSQL's name, case kept, quotes taken off.
    pub(super) name: String,
    /// Written in double quotes: `"*"` is a name, `*` is every table.
    pub(super) quoted: bool,
}

impl NamePart {
    pub(super) fn is_star(&self) -> bool {
        !self.quoted && self.name == "*"
    }
}

/// `schema.table` or `table`, each part as is or in double quotes to hold
/// dots (`"my.schema"."my.table"`, `""` inside for a quote): the one
/// reading of a table's name for `postgres.tables` and `[[outbox]]`.
/// Names are exact either way (nothing is folded to lower case, since
/// walnats quotes every name it sends). `None`: an empty part, a stray
/// quote, or more than two parts.
pub(super) fn qualified_name(s: &str) -> Option<(Option<NamePart>, NamePart)> {
    let mut parts = Vec::new();
    let mut rest = s;
    loop {
        let (part, after) = name_part(rest)?;
        parts.push(part);
        match after.strip_prefix('.') {
            Some(next) => rest = next,
            None if after.is_empty() => break,
            None => return None,
        }
    }
    let table = parts.pop()?;
    let schema = parts.pop();
    parts.is_empty().then_some((schema, table))
}

/// The part at the start of `s`, and what follows it.
fn name_part(s: &str) -> Option<(NamePart, &str)> {
    let Some(mut rest) = s.strip_prefix('"') else {
        let end = s.find('.').unwrap_or(s.len());
        let (name, after) = s.split_at(end);
        if name.is_empty() || name.contains('"') {
            return None;
        }
        let name = name.to_owned();
        return Some((
            NamePart {
                name,
                quoted: false,
            },
            after,
        ));
    };
    let mut name = String::new();
    loop {
        let close = rest.find('"')?;
        let (piece, after) = rest.split_at(close);
        name.push_str(piece);
        match after.strip_prefix("\"\"") {
            Some(more) => {
                name.push('"');
                rest = more;
            }
            None => {
                rest = after.get(1..)?;
                break;
            }
        }
    }
    (!name.is_empty()).then_some((NamePart { name, quoted: true }, rest))
}

/// `postgres.heartbeat_interval`, default 30 s; `None` for `"0"` (off).
fn heartbeat(text: Option<&str>) -> Result<Option<Duration>> {
    let interval = parse_duration(text.unwrap_or("30s")).ok_or_else(|| {
        config_err(
            "postgres.heartbeat_interval must be a duration like \"30s\", \"500ms\", \"5m\", or \"0\" (off)",
        )
    })?;
    Ok((!interval.is_zero()).then_some(interval))
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// As written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// TLS is on and the server's certificate is checked against a CA:
    /// only then may a password (or its MD5 equivalent) be sent, because
    /// only then is the server known to be the one meant.
    pub fn verifies_server(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// One server of `postgres.url`: walnats connects by TCP only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgHost {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for PgHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// libpq's `target_session_attrs`: which of the listed servers a session
/// may use. Checked after connecting, on each server in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetSessionAttrs {
    /// The first server that accepts the connection.
    #[default]
    Any,
    /// Not read-only: `transaction_read_only` is off (a primary, unless
    /// `default_transaction_read_only` is on for the role or database).
    ReadWrite,
    /// `transaction_read_only` is on (a standby, or read-only by default).
    ReadOnly,
    /// Not in recovery.
    Primary,
    /// In recovery (a hot standby).
    Standby,
    /// A standby if any server is one, else any server.
    PreferStandby,
}

impl TargetSessionAttrs {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    fn parse(s: &str) -> Option<TargetSessionAttrs> {
        Some(match s {
            "any" => TargetSessionAttrs::Any,
            "read-write" => TargetSessionAttrs::ReadWrite,
            "read-only" => TargetSessionAttrs::ReadOnly,
            "primary" => TargetSessionAttrs::Primary,
            "standby" => TargetSessionAttrs::Standby,
            "prefer-standby" => TargetSessionAttrs::PreferStandby,
            _ => return None,
        })
    }

    /// Whether a server in this state is one to keep at once (for
    /// `prefer-standby`: a standby; the fallback is [`choose_server`]'s).
    pub fn accepts(self, s: ServerState) -> bool {
        match self {
            TargetSessionAttrs::Any => true,
            TargetSessionAttrs::ReadWrite => !s.read_only,
            TargetSessionAttrs::ReadOnly => s.read_only,
            TargetSessionAttrs::Primary => !s.in_recovery,
            TargetSessionAttrs::Standby | TargetSessionAttrs::PreferStandby => s.in_recovery,
        }
    }
}

/// What a session on a server reported: `pg_is_in_recovery()` and
/// `transaction_read_only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerState {
    pub in_recovery: bool,
    pub read_only: bool,
}

/// Which server a session uses, libpq's way: the first, in the URL's
/// order, that `attrs` accepts; for `prefer-standby` with no standby, the
/// first reachable one. `observed[i]` is `None` for a server that could not
/// be reached.
pub fn choose_server(attrs: TargetSessionAttrs, observed: &[Option<ServerState>]) -> Option<usize> {
    observed
        .iter()
        .position(|s| s.is_some_and(|s| attrs.accepts(s)))
        .or_else(|| {
            (attrs == TargetSessionAttrs::PreferStandby)
                .then(|| observed.iter().position(Option::is_some))
                .flatten()
        })
}

#[derive(Debug, Clone)]
pub struct PgConnectConfig {
    /// The server this config connects to: the first of `hosts`, or the
    /// one a session was pinned to ([`PgConnectConfig::pinned`]).
    pub host: String,
    pub port: u16,
    /// Every server of the URL, in its order (one after pinning).
    pub hosts: Vec<PgHost>,
    pub target_session_attrs: TargetSessionAttrs,
    pub user: String,
    pub password: Option<Secret>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub application_name: String,
    pub connect_timeout: Duration,
    redacted: String,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(Kind::Config, format!("postgres.url: {}", msg.into()))
}

fn pct_decode(s: &str) -> Result<String> {
    // Userinfo and path are percent-encoded, where '+' is a literal '+'.
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or_else(|| bad("bad percent-encoding"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad("bad percent-encoding"))?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad("percent-encoding is not UTF-8"))
}

/// Stands in for the URL's host list, which the `url` crate cannot read
/// (`a:5432,b:5432`): the rest of the URL is parsed with the crate.
const HOSTS_STAND_IN: &str = "walnats-host-list.invalid";

/// A URL's authority split libpq's way: the URL with its host list
/// replaced by [`HOSTS_STAND_IN`], the host list as written, and each
/// host with its port (`None`: none written).
struct SplitUrl {
    single: String,
    host_list: String,
    hosts: Vec<(String, Option<u16>)>,
}

fn split_hosts(url_text: &str) -> Result<SplitUrl> {
    let (scheme, rest) = url_text
        .split_once("://")
        .ok_or_else(|| bad("not a URL: use postgres://user@host:5432/db"))?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, host_list) = match authority.rfind('@') {
        Some(at) => (
            authority.get(..=at).unwrap_or(""),
            authority.get(at + 1..).unwrap_or(""),
        ),
        None => ("", authority),
    };
    let hosts = if host_list.is_empty() {
        Vec::new()
    } else {
        host_list.split(',').map(host_port).collect::<Result<_>>()?
    };
    // Also for no host at all (`postgres://u@/db?host=a,b`), which the url
    // crate refuses when a user is given.
    Ok(SplitUrl {
        single: format!("{scheme}://{userinfo}{HOSTS_STAND_IN}{tail}"),
        host_list: host_list.to_owned(),
        hosts,
    })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn host_port(s: &str) -> Result<(String, Option<u16>)> {
    let (host, port) = match s.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address misses its closing ]: write [::1]:5432"))?;
            match after {
                "" => (host.to_owned(), None),
                p => (
                    host.to_owned(),
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| bad("write an IPv6 host as [::1]:5432"))?,
                    ),
                ),
            }
        }
        None => match s.split_once(':') {
            Some((h, p)) => (pct_decode(h)?, Some(p)),
            None => (pct_decode(s)?, None),
        },
    };
    if host.is_empty() {
        return Err(bad(
            "a host in the list is empty: write postgres://user@a:5432,b:5432/db",
        ));
    }
    let port = port.filter(|p| !p.is_empty()).map(parse_port).transpose()?;
    Ok((host, port))
}

fn parse_port(p: &str) -> Result<u16> {
    p.parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| bad("port must be a number from 1 to 65535"))
}

/// The hosts with their ports, libpq's way: one port for every host, or
/// one per host; a host without a port gets 5432.
fn pair_ports(hosts: Vec<String>, ports: Vec<Option<u16>>) -> Result<Vec<PgHost>> {
    let ports = if ports.iter().all(Option::is_none) {
        Vec::new()
    } else {
        ports
    };
    let port_of = |i: usize| -> Option<u16> {
        match ports.len() {
            1 => ports.first().copied().flatten(),
            _ => ports.get(i).copied().flatten(),
        }
    };
    if ports.len() > 1 && ports.len() != hosts.len() {
        return Err(bad(format!(
            "{} ports for {} hosts: give one port for all, or one per host",
            ports.len(),
            hosts.len()
        )));
    }
    let mut out = Vec::with_capacity(hosts.len());
    for (i, host) in hosts.into_iter().enumerate() {
        if host.is_empty() {
            return Err(bad(
                "a host in the list is empty: write host=a,b with a name or address each",
            ));
        }
        if host.starts_with('/') {
            return Err(bad(
                "Unix sockets are not supported: use a TCP host such as 127.0.0.1",
            ));
        }
        out.push(PgHost {
            host,
            port: port_of(i).unwrap_or(5432),
        });
    }
    Ok(out)
}

/// The URL with its password masked and every host kept, for logs, errors
/// and `status`.
fn redact_pg_url(url_text: &str) -> String {
    match split_hosts(url_text) {
        Ok(split) => {
            let masked = redact_url(&split.single);
            // The url crate writes the stand-in as given (lower case).
            masked.replacen(HOSTS_STAND_IN, &split.host_list, 1)
        }
        Err(_) => redact_url(url_text),
    }
}

impl PgConnectConfig {
    /// `password`, when given (from `postgres.password`, a file or the
    /// environment), wins over a password in the URL.
    pub fn parse(url_text: &str, password: Option<Secret>) -> Result<PgConnectConfig> {
        let split = split_hosts(url_text)?;
        let u = url::Url::parse(&split.single)
            .map_err(|e| bad(format!("not a URL ({e}): use postgres://user@host:5432/db")))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err(bad("must start with postgres:// or postgresql://"));
        }
        let (mut hosts, mut ports): (Vec<String>, Vec<Option<u16>>) =
            split.hosts.into_iter().unzip();
        let mut user = (!u.username().is_empty())
            .then(|| pct_decode(u.username()))
            .transpose()?;
        let mut url_password = u.password().map(pct_decode).transpose()?;
        let mut sslmode = None;
        let mut sslrootcert = None;
        let mut application_name = "walnats".to_owned();
        let mut connect_timeout = Duration::from_secs(10);
        let mut target_session_attrs = TargetSessionAttrs::Any;
        let mut dbname = {
            let p = u.path().trim_start_matches('/');
            (!p.is_empty()).then(|| pct_decode(p)).transpose()?
        };
        for (k, v) in u.query_pairs() {
            let v = v.into_owned();
            match k.as_ref() {
                "sslmode" => {
                    sslmode = Some(match v.as_str() {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        _ => {
                            return Err(bad(
                                "sslmode is unknown: use disable, prefer, require, verify-ca or verify-full",
                            ));
                        }
                    })
                }
                "sslrootcert" => sslrootcert = Some(PathBuf::from(v)),
                "application_name" => application_name = v,
                "connect_timeout" => {
                    let secs: u64 = v
                        .parse()
                        .map_err(|_| bad("connect_timeout must be whole seconds"))?;
                    connect_timeout = Duration::from_secs(secs.max(1));
                }
                "target_session_attrs" => {
                    target_session_attrs = TargetSessionAttrs::parse(&v).ok_or_else(|| {
                        bad(
                            "target_session_attrs is unknown: use any, read-write, read-only, primary, \
                             standby or prefer-standby",
                        )
                    })?;
                }
                "host" => hosts = v.split(',').map(str::to_owned).collect(),
                "port" => {
                    ports = v
                        .split(',')
                        .map(|p| (!p.is_empty()).then(|| parse_port(p)).transpose())
                        .collect::<Result<_>>()?;
                }
                "user" => user = Some(v),
                "password" => url_password = Some(v),
                "dbname" => dbname = Some(v),
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?}: supported are sslmode, sslrootcert, application_name, \
                         connect_timeout, target_session_attrs, host, port, user, password, dbname"
                    )));
                }
            }
        }
        if hosts.is_empty() {
            return Err(bad("no host: use postgres://user@host:5432/db"));
        }
        let hosts = pair_ports(hosts, ports)?;
        let first = hosts
            .first()
            .cloned()
            .ok_or_else(|| bad("no host: use postgres://user@host:5432/db"))?;
        let user = user.unwrap_or_else(|| "postgres".to_owned());
        let sslmode = settle_sslmode(sslmode, sslrootcert.is_some())?;
        Ok(PgConnectConfig {
            dbname: dbname.unwrap_or_else(|| user.clone()),
            host: first.host,
            port: first.port,
            hosts,
            target_session_attrs,
            password: password.or(url_password.map(Secret::new)),
            user,
            sslmode,
            sslrootcert,
            application_name,
            connect_timeout,
            redacted: redact_pg_url(url_text),
        })
    }

    /// The URL with its password masked, for logs and errors.
    pub fn redacted_url(&self) -> String {
        self.redacted.clone()
    }

    /// This config, for `host` alone: what one session's every connection
    /// uses once the session has chosen its server. TLS names and checks
    /// `host` itself.
    pub fn pinned(&self, host: &PgHost) -> PgConnectConfig {
        PgConnectConfig {
            host: host.host.clone(),
            port: host.port,
            hosts: vec![host.clone()],
            target_session_attrs: TargetSessionAttrs::Any,
            ..self.clone()
        }
    }

    /// The server this config connects to.
    pub fn server(&self) -> PgHost {
        PgHost {
            host: self.host.clone(),
            port: self.port,
        }
    }
}

/// The sslmode settled once: see the module's header for the rules.
fn settle_sslmode(sslmode: Option<SslMode>, rootcert: bool) -> Result<SslMode> {
    match (sslmode, rootcert) {
        (None, true) => Ok(SslMode::VerifyFull),
        (None, false) => Ok(SslMode::Prefer),
        (Some(SslMode::Require), true) => Ok(SslMode::VerifyCa),
        (Some(SslMode::VerifyCa), false) => Err(bad(
            "sslmode=verify-ca needs sslrootcert (the CA that signed the server's certificate): \
                 checked against the public CAs, any certificate issued for any name would pass; \
                 set sslrootcert, or use sslmode=verify-full",
        )),
        (Some(mode @ (SslMode::Disable | SslMode::Prefer)), true) => Err(bad(format!(
            "sslmode={} never checks the server's certificate, so sslrootcert would be ignored: \
                 use sslmode=verify-full (or leave sslmode out), or drop sslrootcert",
            mode.as_str()
        ))),
        (Some(mode), _) => Ok(mode),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::assert_refused;
    use super::*;

    fn section(raw: RawPostgres) -> Result<PostgresConfig> {
        PostgresConfig::from_raw(RawPostgres {
            url: raw.url.or(Some(Secret::new("postgres://u@h/app"))),
            ..raw
        })
    }

    #[test]
    fn the_section_takes_its_defaults_and_selectors() {
        let c = section(RawPostgres {
            tables: Some(vec!["public.orders".into(), "billing.*".into()]),
            heartbeat_interval: Some("0".into()),
            ..RawPostgres::default()
        })
        .unwrap();
        assert_eq!(
            (c.slot.as_str(), c.publication.as_str()),
            ("walnats", "walnats")
        );
        assert_eq!(c.status_interval, Duration::from_secs(1));
        assert_eq!(c.heartbeat_interval, None);
        assert_eq!(
            c.tables,
            [
                TableSelector {
                    schema: "public".into(),
                    table: Some("orders".into())
                },
                TableSelector {
                    schema: "billing".into(),
                    table: None
                }
            ]
        );
        assert_eq!(c.connect.dbname, "app");
    }

    #[test]
    fn a_table_selector_may_quote_a_part_that_holds_dots() {
        let c = section(RawPostgres {
            tables: Some(vec![
                "\"my.schema\".\"my.table\"".into(),
                "\"my.schema\".*".into(),
                "app.\"*\"".into(),
            ]),
            ..RawPostgres::default()
        })
        .unwrap();
        let selector = |schema: &str, table: Option<&str>| TableSelector {
            schema: schema.into(),
            table: table.map(str::to_owned),
        };
        assert_eq!(
            c.tables,
            [
                selector("my.schema", Some("my.table")),
                selector("my.schema", None),
                selector("app", Some("*")),
            ]
        );
    }

    #[test]
    fn section_mistakes_name_the_key_and_the_fix() {
        assert_refused(
            PostgresConfig::from_raw(RawPostgres::default()),
            "postgres.url is missing",
            "WALNATS_POSTGRES_URL",
        );
        let raw = RawPostgres::default;
        let url = |u: &str| Some(Secret::new(u));
        let text = |t: &str| Some(t.to_owned());
        let table = |t: &str| Some(vec![t.to_owned()]);
        let slot_fix = "lower-case letters, digits and _ (at most 63)";
        let tables_fix = "double-quote a part that holds dots";
        let interval_fix = "between 1 and 30000";
        #[rustfmt::skip]
        let cases = [
            (RawPostgres { url: url("http://h/app"), ..raw() }, "postgres.url", "postgres:// or postgresql://"),
            (RawPostgres { url: url("postgres://u@h/a?sslmode=x"), ..raw() }, "postgres.url", "sslmode"),
            (RawPostgres { slot: text(""), ..raw() }, "postgres.slot", slot_fix),
            (RawPostgres { slot: text("Upper"), ..raw() }, "postgres.slot", slot_fix),
            (RawPostgres { slot: text("a-b"), ..raw() }, "postgres.slot", slot_fix),
            (RawPostgres { slot: Some("s".repeat(64)), ..raw() }, "postgres.slot", slot_fix),
            (RawPostgres { publication: text(""), ..raw() }, "postgres.publication", "1 to 63 bytes"),
            (RawPostgres { publication: text("a\0b"), ..raw() }, "postgres.publication", "1 to 63 bytes"),
            (RawPostgres { publication: Some("p".repeat(64)), ..raw() }, "postgres.publication", "1 to 63 bytes"),
            (RawPostgres { tables: table("orders"), ..raw() }, "postgres.tables", tables_fix),
            (RawPostgres { tables: table("*.orders"), ..raw() }, "postgres.tables", tables_fix),
            (RawPostgres { tables: table(".orders"), ..raw() }, "postgres.tables", tables_fix),
            (RawPostgres { tables: table("public."), ..raw() }, "postgres.tables", tables_fix),
            (RawPostgres { tables: table("a.b.c"), ..raw() }, "postgres.tables", tables_fix),
            (RawPostgres { tables: table("\"a.b.c"), ..raw() }, "postgres.tables", tables_fix),
            (RawPostgres { tables: table("\"a.b\""), ..raw() }, "postgres.tables", tables_fix),
            (RawPostgres { status_interval_ms: Some(0), ..raw() }, "postgres.status_interval_ms", interval_fix),
            (RawPostgres { status_interval_ms: Some(30_001), ..raw() }, "postgres.status_interval_ms", interval_fix),
            (RawPostgres { heartbeat_interval: text("30"), ..raw() }, "postgres.heartbeat_interval", "like \"30s\""),
            (RawPostgres { password: url("pw"), password_file: Some("/x".into()), ..raw() }, "postgres.password", "keep one"),
        ];
        for (raw, key, fix) in cases {
            assert_refused(section(raw), key, fix);
        }
    }

    #[test]
    fn durations_parse_with_their_units() {
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("99999999999999999h"), None);
    }

    #[test]
    fn parses_urls_like_libpq() {
        let c = PgConnectConfig::parse(
            "postgresql://b%40b:p%2Fw@db.example:6543/my%20db?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
            None,
        )
        .unwrap();
        assert_eq!(c.host, "db.example");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "b@b");
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("p/w"));
        assert_eq!(c.dbname, "my db");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(c.application_name, "x");
        let d = PgConnectConfig::parse("postgres://h", Some(Secret::new("s"))).unwrap();
        assert_eq!(
            (d.user.as_str(), d.dbname.as_str(), d.port, d.sslmode),
            ("postgres", "postgres", 5432, SslMode::Prefer)
        );
        assert_eq!(d.password.as_ref().map(Secret::expose), Some("s"));
        let ip6 = PgConnectConfig::parse("postgres://u@[::1]:5/d", None).unwrap();
        assert_eq!(ip6.host, "::1");
    }

    #[test]
    fn a_root_certificate_means_verification() {
        let mode = |q: &str| {
            PgConnectConfig::parse(&format!("postgres://u@h/d?{q}"), None).map(|c| c.sslmode)
        };
        assert_eq!(mode("").unwrap(), SslMode::Prefer);
        assert_eq!(mode("sslrootcert=/ca.pem").unwrap(), SslMode::VerifyFull);
        assert_eq!(
            mode("sslmode=require&sslrootcert=/ca.pem").unwrap(),
            SslMode::VerifyCa
        );
        assert_eq!(mode("sslmode=require").unwrap(), SslMode::Require);
        for contradiction in ["sslmode=prefer", "sslmode=disable"] {
            let e = mode(&format!("{contradiction}&sslrootcert=/ca.pem")).unwrap_err();
            assert_eq!(e.kind(), Kind::Config);
        }
        assert_eq!(mode("sslmode=verify-full").unwrap(), SslMode::VerifyFull);
        let e = mode("sslmode=verify-ca").unwrap_err();
        assert_eq!(e.kind(), Kind::Config);
        assert!(e.to_string().contains("sslrootcert"), "{e}");
        assert!(!SslMode::Require.verifies_server());
        assert!(SslMode::VerifyCa.verifies_server());
    }

    #[test]
    fn refuses_what_it_cannot_honour_without_leaking_the_password() {
        for bad_url in [
            "mysql://u@h/d",
            "postgres://u:hunter2@h/d?sslmode=maybe",
            "postgres://u:hunter2@h/d?ssl=true",
            "postgres:///d",
            "postgres://u:hunter2@h/d?port=x",
        ] {
            let e = PgConnectConfig::parse(bad_url, None).unwrap_err();
            assert_eq!(e.kind(), Kind::Config);
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        let c = PgConnectConfig::parse("postgres://u:hunter2@h/d", None).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!c.redacted_url().contains("hunter2"));
    }
    fn hosts(url: &str) -> Vec<String> {
        PgConnectConfig::parse(url, None)
            .unwrap()
            .hosts
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_url_lists_several_hosts_as_libpq_does() {
        assert_eq!(
            hosts("postgres://u:pw@a:5433,b,[::1]:6000,[fe80::2]/app"),
            ["a:5433", "b:5432", "[::1]:6000", "[fe80::2]:5432"]
        );
        let c = PgConnectConfig::parse(
            "postgresql://u:pw@a:5433,b:5434/app?target_session_attrs=read-write&sslmode=require",
            None,
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("a", 5433));
        assert_eq!(c.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert_eq!((c.user.as_str(), c.dbname.as_str()), ("u", "app"));
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("pw"));
        assert_eq!(c.sslmode, SslMode::Require);
        // host= and port= as comma lists; one port for all, or one each.
        assert_eq!(
            hosts("postgres://u@/app?host=a,b&port=6000"),
            ["a:6000", "b:6000"]
        );
        assert_eq!(
            hosts("postgres://u@/app?host=a,b,c&port=1,,3"),
            ["a:1", "b:5432", "c:3"]
        );
        assert_eq!(hosts("postgres://x:7/app?host=a,b"), ["a:7", "b:7"]);
        assert_eq!(
            hosts("postgres:///app?host=::1,h"),
            ["[::1]:5432", "h:5432"]
        );
        let one = PgConnectConfig::parse("postgres://u@h/app", None).unwrap();
        assert_eq!(one.target_session_attrs, TargetSessionAttrs::Any);
        assert_eq!(
            one.hosts,
            [PgHost {
                host: "h".into(),
                port: 5432
            }]
        );
        for (attrs, want) in [
            ("any", TargetSessionAttrs::Any),
            ("read-only", TargetSessionAttrs::ReadOnly),
            ("primary", TargetSessionAttrs::Primary),
            ("standby", TargetSessionAttrs::Standby),
            ("prefer-standby", TargetSessionAttrs::PreferStandby),
        ] {
            let c = PgConnectConfig::parse(
                &format!("postgres://a,b/d?target_session_attrs={attrs}"),
                None,
            )
            .unwrap();
            assert_eq!(c.target_session_attrs, want);
            assert_eq!(want.as_str(), attrs);
        }
    }

    #[test]
    fn a_bad_host_list_is_refused_with_the_fix_and_no_password() {
        for (url, fix) in [
            ("postgres://u:hunter2@a,,b/d", "empty"),
            ("postgres://u:hunter2@a,/d", "empty"),
            ("postgres://u:hunter2@a:x,b/d", "port must be a number"),
            ("postgres://u:hunter2@a:0/d", "port must be a number"),
            ("postgres://u:hunter2@a:70000/d", "port must be a number"),
            ("postgres://u:hunter2@[::1/d", "closing ]"),
            ("postgres://u:hunter2@[::1]x/d", "[::1]:5432"),
            (
                "postgres://u:hunter2@/d?host=a,b&port=1,2,3",
                "3 ports for 2 hosts",
            ),
            (
                "postgres://u:hunter2@a:1,b:2,c:3/d?host=a,b",
                "3 ports for 2 hosts",
            ),
            ("postgres://u:hunter2@/d?host=a,/tmp", "Unix sockets"),
            (
                "postgres://u:hunter2@a,b/d?target_session_attrs=master",
                "prefer-standby",
            ),
        ] {
            let e = PgConnectConfig::parse(url, None).unwrap_err();
            assert_eq!(e.kind(), Kind::Config, "{url}");
            let text = e.to_string();
            assert!(text.starts_with("postgres.url"), "{url}: {text}");
            assert!(text.contains(fix), "{url}: {text}");
            assert!(!text.contains("hunter2"), "{url}: {text}");
        }
    }

    #[test]
    fn the_redacted_url_keeps_every_host_and_no_password() {
        let c = PgConnectConfig::parse(
            "postgres://u:hunter2@a:5432,[::1]:5433,b/app?target_session_attrs=read-write&password=hunter3",
            None,
        )
        .unwrap();
        let shown = c.redacted_url();
        assert!(shown.contains("a:5432,[::1]:5433,b/app"), "{shown}");
        assert!(shown.contains("target_session_attrs=read-write"), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
        assert!(!format!("{c:?}").contains("hunter2"));
        // One host: as before.
        let one = PgConnectConfig::parse("postgres://u:hunter2@h:1/d", None).unwrap();
        assert_eq!(one.redacted_url(), "postgres://u:***@h:1/d");
    }

    #[test]
    fn a_pinned_config_connects_to_its_one_host() {
        let c = PgConnectConfig::parse(
            "postgres://u@a:1,b:2/d?target_session_attrs=read-write&sslmode=verify-full",
            None,
        )
        .unwrap();
        let second = c.hosts[1].clone();
        let p = c.pinned(&second);
        assert_eq!((p.host.as_str(), p.port), ("b", 2));
        assert_eq!(p.hosts, std::slice::from_ref(&second));
        assert_eq!(p.target_session_attrs, TargetSessionAttrs::Any);
        assert_eq!(p.sslmode, SslMode::VerifyFull);
        assert_eq!(p.server(), second);
        assert_eq!(p.redacted_url(), c.redacted_url());
    }

    #[test]
    fn the_session_attributes_pick_the_server_as_libpq_does() {
        use TargetSessionAttrs as T;
        let primary = Some(ServerState {
            in_recovery: false,
            read_only: false,
        });
        let standby = Some(ServerState {
            in_recovery: true,
            read_only: true,
        });
        // A primary whose role or database defaults to read-only.
        let ro_primary = Some(ServerState {
            in_recovery: false,
            read_only: true,
        });
        let down = None;
        type Case<'a> = (T, &'a [Option<ServerState>], Option<usize>);
        let cases: &[Case] = &[
            (T::Any, &[down, standby, primary], Some(1)),
            (T::Any, &[down, down], None),
            (T::ReadWrite, &[standby, ro_primary, primary], Some(2)),
            (T::ReadWrite, &[standby, ro_primary], None),
            (T::ReadOnly, &[primary, ro_primary, standby], Some(1)),
            (T::Primary, &[standby, ro_primary, primary], Some(1)),
            (T::Primary, &[standby, down], None),
            (T::Standby, &[primary, down, standby], Some(2)),
            (T::Standby, &[primary, ro_primary], None),
            (T::PreferStandby, &[primary, standby], Some(1)),
            (T::PreferStandby, &[down, primary, ro_primary], Some(1)),
            (T::PreferStandby, &[down, down], None),
        ];
        for (attrs, observed, want) in cases {
            assert_eq!(
                choose_server(*attrs, observed),
                *want,
                "{attrs:?} {observed:?}"
            );
        }
    }

    #[test]
    fn slot_failover_is_off_unless_asked_for() {
        let c = section(RawPostgres::default()).unwrap();
        assert!(!c.slot_failover);
        let c = section(RawPostgres {
            slot_failover: Some(true),
            ..RawPostgres::default()
        })
        .unwrap();
        assert!(c.slot_failover);
    }
}
