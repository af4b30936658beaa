//! The NATS connection: options, auth and TLS from `[nats]`, and the
//! JetStream context walnats publishes through.
//!
//! It turns a failed connect into an error that says which setting to
//! fix, and never puts a secret in that error. It does not look at
//! streams or publish anything: that is `stream` and the publishers.

use std::time::Duration;

use async_nats::jetstream;

use crate::config::{NatsAuth, NatsConfig};
use crate::error::{Error, Kind, Result};

/// Connects to NATS with the configured auth and TLS. Secrets never reach
/// an error message.
pub async fn connect(cfg: &NatsConfig) -> Result<async_nats::Client> {
    let mut opts = async_nats::ConnectOptions::new()
        .name("walnats")
        // Every subject walnats publishes to is valid by construction: a
        // prefix checked at config load (`config::valid_subject_prefix`)
        // and tokens escaped to `A-Z a-z 0-9 _ - %` (`crate::subject`), or
        // inboxes and object-store subjects async-nats makes itself; the
        // check would scan every row's subject and reply again.
        // Subscriptions are still checked.
        .skip_subject_validation(true)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(cfg.ack_timeout))
        .max_reconnects(None);
    opts = match &cfg.auth {
        NatsAuth::None => opts,
        NatsAuth::CredsFile(path) => opts.credentials_file(path).await.map_err(|e| {
            Error::with_source(
                Kind::Config,
                format!(
                    "nats.creds_file: cannot read {}: fix the path or its permissions",
                    path.display()
                ),
                e,
            )
        })?,
        NatsAuth::NkeySeed(seed) => opts.nkey(seed.expose().to_owned()),
        NatsAuth::Token(t) => opts.token(t.expose().to_owned()),
        NatsAuth::UserPassword { user, password } => {
            opts.user_and_password(user.clone(), password.expose().to_owned())
        }
    };
    if cfg.tls_required {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &cfg.tls_client {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    let urls: Vec<async_nats::ServerAddr> = cfg
        .url
        .expose()
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::new(Kind::Config, "nats.url is not a valid NATS URL list"))?;
    opts.connect(urls).await.map_err(|e| {
        use async_nats::ConnectErrorKind as K;
        let (kind, what) = match e.kind() {
            K::Authentication | K::AuthorizationViolation => (
                Kind::NatsAuth,
                "NATS refused walnats' credentials: check nats.creds_file / nkey / token / user+password",
            ),
            K::Tls => (
                Kind::NatsSetup,
                "TLS with NATS failed: check nats.tls_ca_file, tls_cert_file, tls_key_file and the server's TLS settings",
            ),
            K::ServerParse | K::Dns => (Kind::Config, "nats.url names no reachable server"),
            _ => (
                Kind::NatsConnect,
                "cannot connect to NATS: is nats-server running at nats.url?",
            ),
        };
        Error::with_source(kind, what, e)
    })
}

/// The JetStream context: a publish times out after `nats.ack_timeout`,
/// and at most `nats.max_in_flight` (and a little room) acks are awaited
/// at once; past that, publishing waits.
pub fn context(client: async_nats::Client, cfg: &NatsConfig) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(cfg.ack_timeout)
        .max_ack_inflight(cfg.max_in_flight.saturating_add(16))
        .backpressure_on_inflight(true)
        .build(client)
}
