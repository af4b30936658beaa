//! The `[nats]` section: servers, stream and subject names, the in-flight
//! window, how publishes are acknowledged, and the one auth method.
//!
//! Owns the names' syntax (streams, buckets, subject prefixes) and takes
//! credentials out of `nats.url`, so that no URL that is logged holds
//! them. It only reads and checks; connecting is `sink`'s job.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::secret::one_secret;
use super::{Secret, config_err, count};
use crate::error::Result;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNats {
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

impl NatsConfig {
    pub(super) fn from_raw(raw: RawNats) -> Result<NatsConfig> {
        let url = raw
            .url
            .unwrap_or_else(|| Secret::new("nats://127.0.0.1:4222"));
        let (url, url_auth) = split_nats_credentials(&url)?;
        check_names(raw.stream.as_deref(), raw.subject_prefix.as_deref())?;
        let replicas = count(raw.replicas.unwrap_or(1), 1..=5, "nats.replicas")?;
        let checkpoint_bucket =
            bucket_name(raw.checkpoint_bucket, "walnats", "nats.checkpoint_bucket")?;
        let max_in_flight = count(
            raw.max_in_flight.unwrap_or(4096),
            1..=1_000_000,
            "nats.max_in_flight",
        )?;
        let ack_timeout = Duration::from_millis(raw.ack_timeout_ms.unwrap_or(10_000));
        if ack_timeout < Duration::from_millis(100) {
            return Err(config_err("nats.ack_timeout_ms must be at least 100"));
        }
        let fast_ingest = parse_fast_ingest(raw.fast_ingest.as_deref())?;
        let token = one_secret(raw.token, raw.token_file, "nats.token")?;
        let nkey = one_secret(raw.nkey, raw.nkey_file, "nats.nkey")?;
        let password = one_secret(raw.password, raw.password_file, "nats.password")?;
        let auth = one_auth(raw.creds_file, nkey, token, (raw.user, password), url_auth)?;
        Ok(NatsConfig {
            url,
            stream: raw.stream,
            subject_prefix: raw.subject_prefix,
            replicas,
            checkpoint_bucket,
            max_in_flight,
            ack_timeout,
            fast_ingest,
            auth,
            tls_required: raw.tls_required.unwrap_or(false),
            tls_ca_file: raw.tls_ca_file,
            tls_client: tls_client(raw.tls_cert_file, raw.tls_key_file)?,
        })
    }
}

/// Settings whose effective value depends on the database name.
impl NatsConfig {
    pub fn subject_prefix_for(&self, database: &str) -> String {
        match &self.subject_prefix {
            Some(p) => p.clone(),
            None => format!("cdc.{}", crate::subject::escape_token(database)),
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

fn check_names(stream: Option<&str>, subject_prefix: Option<&str>) -> Result<()> {
    if let Some(s) = stream
        && !valid_stream_name(s)
    {
        return Err(config_err(
            "nats.stream is not a valid stream name: no spaces, dots, '*', '>', '/' or '\\'",
        ));
    }
    if let Some(p) = subject_prefix
        && !valid_subject_prefix(p)
    {
        return Err(config_err(
            "nats.subject_prefix is not a subject of literal tokens: no wildcards, spaces or empty tokens",
        ));
    }
    Ok(())
}

fn parse_fast_ingest(text: Option<&str>) -> Result<FastIngest> {
    match text.unwrap_or("auto") {
        "auto" => Ok(FastIngest::Auto),
        "on" => Ok(FastIngest::On),
        "off" => Ok(FastIngest::Off),
        _ => Err(config_err(
            "nats.fast_ingest is unknown: use \"auto\", \"on\" or \"off\"",
        )),
    }
}

/// The one auth method among the keys and the URL's credentials.
fn one_auth(
    creds_file: Option<PathBuf>,
    nkey: Option<Secret>,
    token: Option<Secret>,
    user_password: (Option<String>, Option<Secret>),
    url_auth: Option<NatsAuth>,
) -> Result<NatsAuth> {
    let mut methods = Vec::new();
    if let Some(c) = creds_file {
        methods.push(NatsAuth::CredsFile(c));
    }
    if let Some(k) = nkey {
        methods.push(NatsAuth::NkeySeed(k));
    }
    if let Some(t) = token {
        methods.push(NatsAuth::Token(t));
    }
    match user_password {
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
    Ok(methods.pop().unwrap_or(NatsAuth::None))
}

fn tls_client(cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<(PathBuf, PathBuf)>> {
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        _ => Err(config_err(
            "nats.tls_cert_file and nats.tls_key_file go together: set both or neither",
        )),
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

/// The bucket name in `key`, or `default`, when valid.
pub(super) fn bucket_name(value: Option<String>, default: &str, key: &str) -> Result<String> {
    let name = value.unwrap_or_else(|| default.to_owned());
    if !valid_bucket_name(&name) {
        return Err(config_err(format!(
            "{key} may only hold letters, digits, _ and -"
        )));
    }
    Ok(name)
}

/// KV and Object Store bucket names: letters, digits, `_` and `-`.
fn valid_bucket_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::super::tests::assert_refused;
    use super::*;

    fn nats(raw: RawNats) -> Result<NatsConfig> {
        NatsConfig::from_raw(raw)
    }

    fn secret(s: &str) -> Option<Secret> {
        Some(Secret::new(s))
    }

    #[test]
    fn the_section_takes_its_values_and_defaults() {
        let c = nats(RawNats::default()).unwrap();
        assert_eq!(c.url.expose(), "nats://127.0.0.1:4222");
        assert_eq!((c.replicas, c.max_in_flight), (1, 4096));
        assert_eq!(c.checkpoint_bucket, "walnats");
        assert_eq!(c.ack_timeout, Duration::from_secs(10));
        assert_eq!(
            (c.fast_ingest, c.auth.clone()),
            (FastIngest::Auto, NatsAuth::None)
        );
        assert_eq!(c.tls_client, None);
        for (text, mode) in [("on", FastIngest::On), ("off", FastIngest::Off)] {
            let fast_ingest = Some(text.to_owned());
            let c = nats(RawNats {
                fast_ingest,
                ..RawNats::default()
            })
            .unwrap();
            assert_eq!(c.fast_ingest, mode);
        }
        let c = nats(RawNats {
            tls_cert_file: Some("c.pem".into()),
            tls_key_file: Some("k.pem".into()),
            nkey: secret("SUAB"),
            ..RawNats::default()
        })
        .unwrap();
        assert_eq!(c.tls_client, Some(("c.pem".into(), "k.pem".into())));
        assert_eq!(c.auth, NatsAuth::NkeySeed(Secret::new("SUAB")));
    }

    #[test]
    fn section_mistakes_name_the_key_and_the_fix() {
        let raw = RawNats::default;
        let text = |t: &str| Some(t.to_owned());
        let path = |p: &str| Some(PathBuf::from(p));
        let url_fix = "use nats://host:4222";
        #[rustfmt::skip]
        let cases = [
            (RawNats { replicas: Some(0), ..raw() }, "nats.replicas", "between 1 and 5"),
            (RawNats { replicas: Some(6), ..raw() }, "nats.replicas", "between 1 and 5"),
            (RawNats { max_in_flight: Some(0), ..raw() }, "nats.max_in_flight", "between 1 and 1000000"),
            (RawNats { max_in_flight: Some(1_000_001), ..raw() }, "nats.max_in_flight", "between 1 and 1000000"),
            (RawNats { ack_timeout_ms: Some(99), ..raw() }, "nats.ack_timeout_ms", "at least 100"),
            (RawNats { checkpoint_bucket: text("a.b"), ..raw() }, "nats.checkpoint_bucket", "letters, digits, _ and -"),
            (RawNats { fast_ingest: text("maybe"), ..raw() }, "nats.fast_ingest", "use \"auto\", \"on\" or \"off\""),
            (RawNats { password: secret("pw"), ..raw() }, "nats.user and nats.password", "set both or neither"),
            (RawNats { nkey: secret("SU"), nkey_file: path("/seed"), ..raw() }, "nats.nkey", "keep one"),
            (RawNats { token: secret("t"), creds_file: path("/c"), ..raw() }, "more than one NATS auth method", "keep one"),
            (RawNats { tls_key_file: path("k.pem"), ..raw() }, "nats.tls_cert_file and nats.tls_key_file", "set both or neither"),
            (RawNats { url: secret("nats://%ff@h"), ..raw() }, "nats.url", "percent-encoded UTF-8"),
            (RawNats { url: secret("http://h:4222"), ..raw() }, "nats.url", url_fix),
            (RawNats { url: secret("nats://"), ..raw() }, "nats.url", url_fix),
            (RawNats { url: secret("nats://a b"), ..raw() }, "nats.url", url_fix),
        ];
        for (raw, key, fix) in cases {
            assert_refused(nats(raw), key, fix);
        }
    }

    #[test]
    fn names_follow_nats_rules() {
        assert!(valid_subject_prefix("cdc.app-1"));
        for bad in ["", "a..b", ".a", "a.", "a.*", "a.>", "a b", "a\u{7f}"] {
            assert!(!valid_subject_prefix(bad), "{bad:?}");
        }
        assert!(valid_stream_name("CDC_APP-1"));
        for bad in [
            "",
            "a.b",
            "a*",
            "a>",
            "a/b",
            "a\\b",
            "a b",
            &"s".repeat(256),
        ] {
            assert!(!valid_stream_name(bad), "{bad:?}");
        }
        assert!(valid_bucket_name("walnats_oversize-1"));
        assert!(!valid_bucket_name("") && !valid_bucket_name("a.b"));
        let c = nats(RawNats::default()).unwrap();
        assert_eq!(c.stream_for("my-db.x"), "CDC_MY_DB_X");
    }
}
