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
                    // Snapshots publish each chunk as one atomic batch.
                    allow_atomic_publish: supports_atomic_batches(&js.client()),
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

/// Whether the server stores atomic batches (nats-server 2.12.1+, which
/// also deduplicates `Nats-Msg-Id` inside a batch).
pub fn supports_atomic_batches(client: &async_nats::Client) -> bool {
    let info = client.server_info();
    let mut parts = info
        .version
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let v = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    v >= (2, 12, 1)
}

/// Makes sure the stream takes atomic batches: snapshots need them so that
/// a chunk of rows is either wholly in the stream or not at all. Turning
/// the setting on changes nothing for other publishers.
pub async fn allow_atomic_batches(js: &jetstream::Context, stream: &mut Stream) -> Result<()> {
    let cfg = stream.cached_info().config.clone();
    if cfg.allow_atomic_publish {
        return Ok(());
    }
    let name = cfg.name.clone();
    if !supports_atomic_batches(&js.client()) {
        return Err(Error::new(
            Kind::NatsSetup,
            format!(
                "a snapshot publishes each chunk of rows as one atomic batch, which needs nats-server 2.12.1 or newer \
                 (this one is {}): upgrade nats-server, or set snapshot.mode = \"never\"",
                js.client().server_info().version
            ),
        ));
    }
    js.update_stream(StreamConfig {
        allow_atomic_publish: true,
        ..cfg
    })
    .await
    .map_err(|e| {
        Error::with_source(
            Kind::NatsSetup,
            format!(
                "cannot turn on atomic batches (allow_atomic) on stream {name:?}, which snapshots need: \
                 run `nats stream edit {name} --allow-batch`, or set snapshot.mode = \"never\""
            ),
            e,
        )
    })?;
    *stream = js.get_stream(&name).await.map_err(|e| {
        Error::with_source(Kind::NatsConnect, format!("cannot read stream {name:?}"), e)
    })?;
    Ok(())
}

/// The most messages nats-server takes in one atomic batch.
pub const MAX_BATCH: usize = 1000;

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

impl Publisher {
    /// Publishes `msgs` as one atomic batch (ADR-50): the stream stores all
    /// of them, right after `last_seq`, or none. Returns the sequence of the
    /// last one. Waits for the commit: nothing else may be in flight.
    pub async fn publish_batch(&mut self, msgs: Vec<OutMsg>) -> Result<u64> {
        let n = msgs.len();
        if n == 0 {
            return Ok(self.last_seq);
        }
        if n > MAX_BATCH {
            return Err(Error::new(
                Kind::Publish,
                format!("a batch of {n} messages is over nats-server's limit of {MAX_BATCH}"),
            ));
        }
        let expected = self.last_seq;
        let client = self.js.client();
        // Unique per attempt (a retried chunk must not join an abandoned
        // batch); at most 64 characters.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!("walnats-{expected}-{nanos}");
        let batch_err = |what: &str, e: Box<dyn std::error::Error + Send + Sync>| {
            Error::with_source(Kind::Publish, format!("atomic batch: {what}"), e)
        };
        let mut last = None;
        for (i, m) in msgs.into_iter().enumerate() {
            let mut headers = m.headers;
            headers.insert("Nats-Batch-Id", id.as_str());
            headers.insert("Nats-Batch-Sequence", itoa::Buffer::new().format(i + 1));
            if i == 0 {
                headers.insert(
                    "Nats-Expected-Last-Sequence",
                    itoa::Buffer::new().format(expected),
                );
            }
            let commit = i + 1 == n;
            if commit {
                headers.insert("Nats-Batch-Commit", "1");
            }
            if i == 0 || commit {
                // The first message is a request so that a refusal (no
                // atomic batches on this stream) comes back at once.
                let reply = client
                    .request_with_headers(m.subject, headers, m.payload)
                    .await
                    .map_err(|e| batch_err("no reply from JetStream", Box::new(e)))?;
                check_batch_reply(&reply.payload)?;
                if commit {
                    last = Some(reply);
                }
            } else {
                client
                    .publish_with_headers(m.subject, headers, m.payload)
                    .await
                    .map_err(|e| batch_err("cannot publish", Box::new(e)))?;
            }
        }
        let reply = last.ok_or_else(|| Error::new(Kind::Publish, "atomic batch: no commit"))?;
        let ack: BatchAck = serde_json::from_slice(&reply.payload)
            .map_err(|e| batch_err("unreadable commit acknowledgement", Box::new(e)))?;
        let want = expected + n as u64;
        if ack.seq != want || ack.count != n as u64 || ack.batch != id {
            return Err(Error::new(
                Kind::Publish,
                format!(
                    "JetStream committed a batch of {} ending at sequence {}, walnats expected {n} ending at {want}: \
                     resuming from the stream",
                    ack.count, ack.seq
                ),
            ));
        }
        self.last_seq = want;
        Ok(want)
    }
}

#[derive(serde::Deserialize)]
struct BatchAck {
    seq: u64,
    #[serde(default)]
    count: u64,
    #[serde(default)]
    batch: String,
}

/// An empty reply (batch started) or a pub ack is fine; an error reply
/// names what JetStream refused.
fn check_batch_reply(payload: &[u8]) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Reply {
        error: Option<ApiError>,
    }
    #[derive(serde::Deserialize)]
    struct ApiError {
        #[serde(default)]
        err_code: u64,
        #[serde(default)]
        description: String,
    }
    if payload.is_empty() {
        return Ok(());
    }
    let reply: Reply = serde_json::from_slice(payload).map_err(|e| {
        Error::with_source(
            Kind::Publish,
            "atomic batch: unreadable reply from JetStream",
            e,
        )
    })?;
    match reply.error {
        None => Ok(()),
        Some(e) => {
            let hint = match e.err_code {
                10174 => ": the stream does not allow atomic batches (allow_atomic)",
                10071 => {
                    ": the stream's last sequence is not what walnats expected (another client publishes to it?)"
                }
                _ => "",
            };
            Err(Error::new(
                Kind::Publish,
                format!(
                    "JetStream refused an atomic batch: {} (error {}){hint}",
                    e.description, e.err_code
                ),
            ))
        }
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
