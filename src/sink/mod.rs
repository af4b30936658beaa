//! JetStream: connection, stream setup, and ordered, pipelined publishing.
//!
//! Owns everything walnats says to NATS about the change stream. Publishes
//! go out in order with `Nats-Expected-Last-Sequence`, so that when one
//! publish fails no later one can land after a gap: the server rejects it,
//! the session restarts and resumes from what the stream holds. It never
//! parses pgoutput and never decides what is safe to confirm to PostgreSQL.

pub mod oversize;
pub mod subject;

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType, Stream};
use async_nats::jetstream::{self, context::PublishAckFuture, context::PublishErrorKind};

use crate::config::{NatsAuth, NatsConfig};
use crate::encode::OutMsg;
use crate::error::{Error, Kind, Result};

/// Connects to NATS with the configured auth and TLS. Secrets never reach
/// an error message.
pub async fn connect(cfg: &NatsConfig) -> Result<async_nats::Client> {
    let mut opts = async_nats::ConnectOptions::new()
        .name("walnats")
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

pub fn context(client: async_nats::Client, cfg: &NatsConfig) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(cfg.ack_timeout)
        .max_ack_inflight(cfg.max_in_flight.saturating_add(16))
        .backpressure_on_inflight(true)
        .build(client)
}

/// Fails with a fix when the server has no JetStream.
pub async fn require_jetstream(js: &jetstream::Context) -> Result<()> {
    use jetstream::context::AccountErrorKind as K;
    js.query_account()
        .await
        .map(|_| ())
        .map_err(|e| match e.kind() {
            // No responders, or the server's own "not enabled": a setup fix.
            K::JetStreamUnavailable | K::JetStream(_) => Error::with_source(
                Kind::NatsSetup,
                "JetStream is not enabled for this NATS account: start nats-server with -js \
             (or a jetstream {} block in its config)",
                e,
            ),
            // A cluster still electing its meta leader answers late: retry.
            K::TimedOut | K::Other => {
                Error::with_source(Kind::NatsConnect, "JetStream did not answer yet", e)
            }
        })
}

/// What walnats found or made.
pub struct StreamSetup {
    pub stream: Stream,
    pub created: bool,
}

/// Gets the stream, or creates it with subjects `<prefix>.>` on file
/// storage. An existing stream whose subjects do not cover the prefix is
/// refused: walnats would publish into the void.
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    prefix: &str,
    replicas: usize,
) -> Result<StreamSetup> {
    match js.get_stream(name).await {
        Ok(stream) => {
            let subjects = &stream.cached_info().config.subjects;
            if !subjects.iter().any(|s| subject::covers_prefix(s, prefix)) {
                return Err(Error::new(
                    Kind::NatsSetup,
                    format!(
                        "stream {name:?} has subjects {subjects:?}, which do not cover \"{prefix}.>\": \
                         add it (nats stream edit {name} --subjects \"{prefix}.>\"), or set nats.stream / nats.subject_prefix"
                    ),
                ));
            }
            Ok(StreamSetup {
                stream,
                created: false,
            })
        }
        Err(e) => {
            let not_found = matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            );
            if !not_found {
                return Err(Error::with_source(
                    Kind::NatsConnect,
                    format!("cannot look up JetStream stream {name:?}"),
                    e,
                ));
            }
            let stream = js
                .create_stream(StreamConfig {
                    name: name.to_owned(),
                    subjects: vec![format!("{prefix}.>")],
                    storage: StorageType::File,
                    num_replicas: replicas,
                    allow_direct: true,
                    description: Some("PostgreSQL changes published by walnats".to_owned()),
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    use jetstream::context::CreateStreamErrorKind as K;
                    let overlap = matches!(
                        e.kind(),
                        K::JetStream(ref j) if j.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP
                    );
                    if overlap {
                        Error::with_source(
                            Kind::NatsSetup,
                            format!(
                                "cannot create JetStream stream {name:?}: another stream already holds subjects \
                                 under \"{prefix}.>\"; set nats.stream to that stream"
                            ),
                            e,
                        )
                    } else {
                        // A cluster still electing its leader, a timeout:
                        // worth another try.
                        Error::with_source(
                            Kind::NatsConnect,
                            format!("cannot create JetStream stream {name:?} yet"),
                            e,
                        )
                    }
                })?;
            Ok(StreamSetup {
                stream,
                created: true,
            })
        }
    }
}

/// Publishes in order; each publish names the sequence it must follow.
pub struct Publisher {
    js: jetstream::Context,
    /// The stream sequence of the last message walnats published (or
    /// found in the stream at start).
    last_seq: u64,
    max_payload: usize,
}

pub struct Pending {
    /// The sequence the stream must assign to this message.
    pub seq: u64,
    pub ack: PublishAckFuture,
}

impl Publisher {
    pub fn new(js: jetstream::Context, last_seq: u64) -> Publisher {
        let max_payload = js.client().server_info().max_payload;
        Publisher {
            js,
            last_seq,
            max_payload,
        }
    }

    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Counts a message that the stream already holds (resume).
    pub fn assume_published(&mut self) -> u64 {
        self.last_seq += 1;
        self.last_seq
    }

    /// The size NATS counts against max_payload: headers plus payload.
    pub fn wire_size(msg: &OutMsg) -> usize {
        let headers: usize = msg
            .headers
            .iter()
            .map(|(k, vs)| {
                let name: &str = k.as_ref();
                vs.iter()
                    .map(|v| name.len() + v.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum();
        msg.payload.len() + headers + 12
    }

    pub async fn publish(&mut self, msg: OutMsg) -> Result<Pending> {
        let expected = self.last_seq;
        let publish = PublishMessage::build()
            .headers(msg.headers)
            .payload(msg.payload)
            .expected_last_sequence(expected);
        let ack = self
            .js
            .send_publish(msg.subject, publish)
            .await
            .map_err(|e| {
                let kind = match e.kind() {
                    PublishErrorKind::MaxPayloadExceeded => Kind::Oversize,
                    _ => Kind::Publish,
                };
                Error::with_source(kind, "cannot publish to JetStream", e)
            })?;
        self.last_seq = expected + 1;
        Ok(Pending {
            seq: expected + 1,
            ack,
        })
    }
}

/// Awaits one publish's acknowledgement and checks it is where it must be.
pub async fn await_ack(p: Pending) -> Result<u64> {
    let ack = p.ack.await.map_err(|e| {
        let detail = match e.kind() {
            PublishErrorKind::WrongLastSequence => {
                "JetStream refused a publish: the stream's last sequence is not what walnats expected \
                 (an earlier publish failed, or another client publishes to this stream); resuming from the stream"
            }
            PublishErrorKind::TimedOut => "JetStream did not acknowledge a publish in time",
            _ => "JetStream did not acknowledge a publish",
        };
        Error::with_source(Kind::Publish, detail, e)
    })?;
    if ack.duplicate || ack.sequence != p.seq {
        return Err(Error::new(
            Kind::Publish,
            format!(
                "JetStream stored a message at sequence {} (duplicate: {}), walnats expected {}: resuming from the stream",
                ack.sequence, ack.duplicate, p.seq
            ),
        ));
    }
    Ok(ack.sequence)
}
