//! JetStream: connection, stream setup, and ordered, pipelined publishing.
//!
//! Owns everything walnats says to NATS about the change stream. Publishes
//! go out in order with `Nats-Expected-Last-Sequence`, so that when one
//! publish fails no later one can land after a gap: the server rejects it,
//! the session restarts and resumes from what the stream holds. It never
//! parses pgoutput and never decides what is safe to confirm to PostgreSQL.

pub mod outbox;
pub mod oversize;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType, Stream};
use async_nats::jetstream::{self, context::PublishAckFuture, context::PublishErrorKind};

use crate::config::{FastIngest, NatsAuth, NatsConfig};
use crate::encode::OutMsg;
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
            if !subjects
                .iter()
                .any(|s| crate::subject::covers_prefix(s, prefix))
            {
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
    server_version(client) >= (2, 12, 1)
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

fn server_version(client: &async_nats::Client) -> (u32, u32, u32) {
    let info = client.server_info();
    let mut parts = info
        .version
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// Whether the server takes fast-ingest batches (ADR-50, nats-server 2.14+).
pub fn supports_fast_ingest(client: &async_nats::Client) -> bool {
    server_version(client) >= (2, 14, 0)
}

/// Turns on fast-ingest batches (`allow_batched`) on the stream, which
/// changes nothing for other publishers. `Ok(false)`: the server is too
/// old, or the stream cannot be changed, and `nats.fast_ingest` is
/// "auto": walnats publishes one by one and says why.
pub async fn allow_fast_ingest(
    js: &jetstream::Context,
    stream: &mut Stream,
    mode: FastIngest,
) -> Result<bool> {
    if mode == FastIngest::Off {
        return Ok(false);
    }
    let cfg = stream.cached_info().config.clone();
    if cfg.allow_batch_publish {
        return Ok(true);
    }
    let name = cfg.name.clone();
    let version = js.client().server_info().version;
    if !supports_fast_ingest(&js.client()) {
        if mode == FastIngest::On {
            return Err(Error::new(
                Kind::NatsSetup,
                format!(
                    "nats.fast_ingest = \"on\" needs nats-server 2.14 or newer (this one is {version}): \
                     upgrade nats-server, or set nats.fast_ingest = \"auto\" or \"off\""
                ),
            ));
        }
        tracing::info!(
            %version,
            "nats-server has no fast-ingest batches (2.14+): one acknowledgement per message"
        );
        return Ok(false);
    }
    let updated = js
        .update_stream(StreamConfig {
            allow_batch_publish: true,
            ..cfg
        })
        .await;
    if let Err(e) = updated {
        if mode == FastIngest::On {
            return Err(Error::with_source(
                Kind::NatsSetup,
                format!(
                    "cannot turn on fast-ingest batches (allow_batched) on stream {name:?}: \
                     run `nats stream edit {name} --allow-batch-publish` as an admin, or set nats.fast_ingest = \"off\""
                ),
                e,
            ));
        }
        tracing::warn!(
            stream = %name,
            error = %e,
            "cannot turn on fast-ingest batches (allow_batched) on the stream: one acknowledgement per message, \
             which is slower; let walnats edit the stream, or set nats.fast_ingest = \"off\" to silence this"
        );
        return Ok(false);
    }
    *stream = js.get_stream(&name).await.map_err(|e| {
        Error::with_source(Kind::NatsConnect, format!("cannot read stream {name:?}"), e)
    })?;
    if stream.cached_info().config.allow_batch_publish {
        return Ok(true);
    }
    // Accepted but not kept (a cluster with an older server in it?).
    if mode == FastIngest::On {
        return Err(Error::new(
            Kind::NatsSetup,
            format!(
                "stream {name:?} did not keep allow_batched (fast-ingest batches): is every server of the cluster \
                 2.14 or newer? Upgrade them, or set nats.fast_ingest = \"auto\" or \"off\""
            ),
        ));
    }
    tracing::warn!(
        stream = %name,
        "stream did not keep allow_batched (fast-ingest batches): one acknowledgement per message"
    );
    Ok(false)
}

/// The most messages nats-server takes in one atomic batch.
pub const MAX_BATCH: usize = 1000;

/// Messages per fast-ingest batch. Each batch is committed by its last
/// message (or, when walnats runs out of work first, by an end-of-batch
/// marker that is not stored) and acknowledged once, with the stream
/// sequence of its last message and its count.
pub const FAST_BATCH: u64 = 500;

/// Publishes in order. Every message is at a known stream sequence: each
/// one-by-one publish names the sequence it must follow, and each fast
/// batch names it on its first message and fails whole at the first gap.
pub struct Publisher {
    js: jetstream::Context,
    /// The stream sequence of the last message walnats published (or
    /// found in the stream at start).
    last_seq: u64,
    max_payload: usize,
    acks: Acks,
}

type EachAck = Pin<Box<dyn Future<Output = Result<u64>> + Send>>;

/// How publishes come back acknowledged.
enum Acks {
    /// One pub ack per message, in order.
    Each(FuturesOrdered<EachAck>),
    /// ADR-50 fast-ingest batches (nats-server 2.14+): one ack per batch.
    Fast(Box<Fast>),
}

/// Fast-ingest state. The batch id and the message's place in it travel in
/// the reply subject (`<inbox>.<id>.<flow>.fail.<n>.<op>.$FI`); replies
/// for every batch of this publisher arrive on one subscription, in order.
/// Gap mode `fail`: a message JetStream refuses (a limit, a size) ends the
/// batch there, so nothing later can land after a hole; the commit's ack
/// says how many were stored, and anything short of all of them is an
/// error that makes walnats resume from what the stream holds.
struct Fast {
    client: async_nats::Client,
    sub: async_nats::Subscriber,
    inbox: String,
    /// Unique to this publisher: batch ids are `<token><number>`.
    token: String,
    next_id: u64,
    /// Where end-of-batch markers go: `<prefix>._batch`, inside the
    /// stream but no table's subject (see [`batch_marker_subject`]).
    end_subject: async_nats::Subject,
    open: Option<OpenBatch>,
    /// Committed batches waiting for their ack, oldest first.
    sent: VecDeque<SentBatch>,
    timeout: Duration,
}

struct OpenBatch {
    id: u64,
    /// The reply subject up to the message's place:
    /// `<inbox>.<token><id>.<flow>.fail.`, written once per batch.
    reply_prefix: String,
    /// The stream sequence before the batch's first message.
    base: u64,
    /// Messages published in the batch so far.
    n: u64,
    since: std::time::Instant,
}

struct SentBatch {
    id: u64,
    base: u64,
    n: u64,
    at: std::time::Instant,
}

/// Room for the control headers walnats adds to a message at publish time:
/// `Nats-Expected-Last-Sequence: <u64>` (51 bytes), or an atomic batch's
/// `Nats-Batch-Id` (≤ 64 + 15), `Nats-Batch-Sequence` (≤ 25) and
/// `Nats-Batch-Commit` (21) with the expected last sequence on its first.
const CONTROL_HEADERS: usize = 200;

/// At most this many fast batches wait for their acknowledgement at once
/// (nats-server keeps at most 50 batches in flight per stream, and ADR-50
/// wants the outstanding acks bounded): 4,000 messages.
const MAX_BATCHES_IN_FLIGHT: usize = 8;

/// Fast-ingest operations, the reply subject's second-to-last token.
const OP_START: u8 = 0;
const OP_APPEND: u8 = 1;
const OP_COMMIT: u8 = 2;
const OP_END: u8 = 3;

impl Publisher {
    /// A publisher with one acknowledgement per message.
    pub fn new(js: jetstream::Context, last_seq: u64) -> Publisher {
        let max_payload = js.client().server_info().max_payload;
        Publisher {
            js,
            last_seq,
            max_payload,
            acks: Acks::Each(FuturesOrdered::new()),
        }
    }

    /// A publisher of fast-ingest batches; the stream must allow them
    /// (`allow_fast_ingest`) and capture `<prefix>.>`.
    pub async fn fast(
        js: jetstream::Context,
        prefix: &str,
        last_seq: u64,
        timeout: Duration,
    ) -> Result<Publisher> {
        let client = js.client();
        let inbox = client.new_inbox();
        let sub = client.subscribe(format!("{inbox}.>")).await.map_err(|e| {
            Error::with_source(
                Kind::NatsConnect,
                "cannot subscribe to the reply inbox for fast-ingest acknowledgements",
                e,
            )
        })?;
        let token = inbox.rsplit('.').next().unwrap_or("walnats").to_owned();
        let mut p = Publisher::new(js, last_seq);
        p.acks = Acks::Fast(Box::new(Fast {
            client,
            sub,
            inbox,
            token,
            next_id: 1,
            end_subject: batch_marker_subject(prefix).into(),
            open: None,
            sent: VecDeque::new(),
            timeout,
        }));
        Ok(p)
    }

    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Counts a message that the stream already holds (resume). Only
    /// before anything is published.
    pub fn assume_published(&mut self) -> u64 {
        self.last_seq += 1;
        self.last_seq
    }

    /// The size NATS counts against max_payload: headers plus payload,
    /// with room for the headers walnats adds when it publishes
    /// (`Nats-Expected-Last-Sequence`, or an atomic batch's id, sequence
    /// and commit), so that a message near the limit is caught here, where
    /// `limits.on_oversize` applies, and not refused on the way out.
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
        msg.payload.len() + headers + 12 + CONTROL_HEADERS
    }

    /// Sends `msg`; returns the stream sequence it must land at. Its
    /// acknowledgement comes from [`Publisher::next_ack`].
    pub async fn publish(&mut self, msg: OutMsg) -> Result<u64> {
        let expected = self.last_seq;
        match &mut self.acks {
            Acks::Each(acks) => {
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
                acks.push_back(Box::pin(await_ack(ack, expected + 1)));
            }
            Acks::Fast(f) => f.publish(msg, expected).await?,
        }
        self.last_seq = expected + 1;
        Ok(expected + 1)
    }

    /// Whether another message may be published now: fast batches waiting
    /// for their acknowledgement are bounded.
    pub fn ready(&self) -> bool {
        match &self.acks {
            Acks::Each(_) => true,
            Acks::Fast(f) => f.sent.len() < MAX_BATCHES_IN_FLIGHT,
        }
    }

    /// Whether the open fast batch should end now: nothing else is waiting
    /// for an acknowledgement (so this batch's would be the next), or it
    /// has been open for a second (JetStream drops a batch idle for 10 s).
    /// While earlier batches are awaited, messages gather in the open one.
    pub fn should_flush(&self) -> bool {
        match &self.acks {
            Acks::Fast(f) => f
                .open
                .as_ref()
                .is_some_and(|o| f.sent.is_empty() || o.since.elapsed() > Duration::from_secs(1)),
            Acks::Each(_) => false,
        }
    }

    /// Ends the open fast batch, if any, so that its acknowledgement comes
    /// without waiting for more messages. Call it when there is nothing
    /// else to publish right now: JetStream drops a batch idle for 10 s.
    pub async fn flush(&mut self) -> Result<()> {
        match &mut self.acks {
            Acks::Fast(f) => f.end().await,
            Acks::Each(_) => Ok(()),
        }
    }

    /// Whether acknowledgements are awaited (a publish not yet confirmed
    /// and not in an open batch).
    pub fn awaiting(&self) -> bool {
        match &self.acks {
            Acks::Each(acks) => !acks.is_empty(),
            Acks::Fast(f) => !f.sent.is_empty(),
        }
    }

    /// The next acknowledgement: every message up to the returned stream
    /// sequence is stored. Pending forever when nothing is awaited.
    /// Cancel-safe (it sits in the pipeline's `select!`).
    pub async fn next_ack(&mut self) -> Result<u64> {
        match &mut self.acks {
            Acks::Each(acks) => match acks.next().await {
                Some(r) => r,
                None => std::future::pending().await,
            },
            Acks::Fast(f) => f.next_ack().await,
        }
    }

    /// Fails when the oldest fast batch has waited for its acknowledgement
    /// longer than the timeout (one-by-one publishes time out by
    /// themselves). Called on the pipeline's status tick.
    pub fn overdue(&self) -> Result<()> {
        if let Acks::Fast(f) = &self.acks
            && let Some(oldest) = f.sent.front()
            && oldest.at.elapsed() > f.timeout
        {
            return Err(batch_ack_timeout());
        }
        Ok(())
    }

    /// Ends the open batch and waits for every acknowledgement; returns
    /// the last confirmed sequence (the last published one).
    pub async fn drain(&mut self) -> Result<u64> {
        self.flush().await?;
        let timeout = match &self.acks {
            Acks::Fast(f) => f.timeout,
            Acks::Each(_) => Duration::MAX,
        };
        while self.awaiting() {
            tokio::time::timeout(timeout, self.next_ack())
                .await
                .map_err(|_| batch_ack_timeout())??;
        }
        Ok(self.last_seq)
    }
}

fn batch_ack_timeout() -> Error {
    Error::new(
        Kind::Publish,
        "JetStream did not acknowledge a batch of publishes in time",
    )
}

impl OpenBatch {
    /// The reply subject of the batch's `n`th message (1-based) with
    /// operation `op`: `<reply_prefix><n>.<op>.$FI`, without `fmt` (this
    /// runs once per published row).
    fn reply(&self, n: u64, op: u8) -> String {
        let mut digits = itoa::Buffer::new();
        let n = digits.format(n);
        let mut r = String::with_capacity(self.reply_prefix.len() + n.len() + 6);
        r.push_str(&self.reply_prefix);
        r.push_str(n);
        r.push('.');
        r.push(char::from(b'0' + op));
        r.push_str(".$FI");
        r
    }
}

/// The subject of fast-ingest end-of-batch markers: `<prefix>._batch`.
/// The stream captures `<prefix>.>`, so the marker reaches it (on a
/// subject outside the stream it would reach no stream, and the batch
/// would never commit). It has one token after the prefix where a table's
/// subject has three, so no subscription to table subjects, wildcards or
/// not, receives it; only `<prefix>.>` does. The marker is never stored.
fn batch_marker_subject(prefix: &str) -> String {
    format!("{prefix}._batch")
}

/// A fast batch's id: unique to its publisher (`token`) and numbered.
fn batch_id(token: &str, id: u64) -> String {
    format!("{token}{id}")
}

/// The part of a fast batch's reply subjects that is the same for all of
/// its messages: the inbox, the batch id, the flow and the gap mode.
fn batch_reply_prefix(inbox: &str, token: &str, id: u64) -> String {
    format!("{inbox}.{}.{FAST_BATCH}.fail.", batch_id(token, id))
}

impl Fast {
    async fn publish(&mut self, msg: OutMsg, expected: u64) -> Result<()> {
        let mut headers = msg.headers;
        let open = match &mut self.open {
            Some(o) => o,
            None => {
                // The first message of a batch names where it must start.
                headers.insert(
                    "Nats-Expected-Last-Sequence",
                    itoa::Buffer::new().format(expected),
                );
                let id = self.next_id;
                self.next_id += 1;
                let reply_prefix = batch_reply_prefix(&self.inbox, &self.token, id);
                self.open.insert(OpenBatch {
                    id,
                    reply_prefix,
                    base: expected,
                    n: 0,
                    since: std::time::Instant::now(),
                })
            }
        };
        open.n += 1;
        let n = open.n;
        let op = match n {
            1 => OP_START,
            FAST_BATCH => OP_COMMIT,
            _ => OP_APPEND,
        };
        let reply = open.reply(n, op);
        self.client
            .publish_with_reply_and_headers(msg.subject, reply, headers, msg.payload)
            .await
            .map_err(publish_error)?;
        if op == OP_COMMIT {
            self.committed();
        }
        Ok(())
    }

    /// Sends the end-of-batch marker (not stored) of the open batch. It
    /// goes to `end_subject`, not to a row's subject: core NATS delivers
    /// it to every subscriber of its subject, and a table's subscribers
    /// must get that table's changes only. JetStream finds the batch by
    /// the id in the reply subject, whatever subject the marker has.
    async fn end(&mut self) -> Result<()> {
        let Some(open) = &self.open else {
            return Ok(());
        };
        let reply = open.reply(open.n + 1, OP_END);
        self.client
            .publish_with_reply(self.end_subject.clone(), reply, bytes::Bytes::new())
            .await
            .map_err(publish_error)?;
        self.committed();
        Ok(())
    }

    fn committed(&mut self) {
        if let Some(o) = self.open.take() {
            self.sent.push_back(SentBatch {
                id: o.id,
                base: o.base,
                n: o.n,
                at: std::time::Instant::now(),
            });
        }
    }

    async fn next_ack(&mut self) -> Result<u64> {
        loop {
            let Some(oldest) = self.sent.front() else {
                return std::future::pending().await;
            };
            let (id, n, base) = (oldest.id, oldest.n, oldest.base);
            // No timer here: this future is made anew on every turn of the
            // pipeline's loop; `overdue` checks the deadline instead.
            let Some(msg) = self.sub.next().await else {
                return Err(Error::new(
                    Kind::Publish,
                    "the fast-ingest acknowledgement subscription ended",
                ));
            };
            if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                return Err(Error::new(
                    Kind::Publish,
                    "no JetStream stream takes walnats' subjects any more (was it deleted?)",
                ));
            }
            match fast_reply(&msg.payload)? {
                FastReply::Flow => continue,
                FastReply::Committed { seq, batch, count } => {
                    let want_id = batch_id(&self.token, id);
                    if batch != want_id || count != n || seq != base + n {
                        return Err(Error::new(
                            Kind::Publish,
                            format!(
                                "JetStream stored {count} of a batch of {n} publishes ending at sequence {seq} \
                                 (batch {batch:?}), walnats expected them to end at {}: resuming from the stream",
                                base + n
                            ),
                        ));
                    }
                    self.sent.pop_front();
                    return Ok(seq);
                }
            }
        }
    }
}

/// A core publish that did not go out; over max_payload is not worth a retry.
fn publish_error(e: async_nats::PublishError) -> Error {
    let kind = match e.kind() {
        async_nats::client::PublishErrorKind::MaxPayloadExceeded => Kind::Oversize,
        _ => Kind::Publish,
    };
    Error::with_source(kind, "cannot publish to JetStream", e)
}

enum FastReply {
    /// A flow acknowledgement: progress inside a batch, not a commit.
    Flow,
    Committed {
        seq: u64,
        batch: String,
        count: u64,
    },
}

/// Reads a reply on the fast-ingest inbox: a flow ack, a commit's pub ack,
/// or an error (a gap, a refused message, an unknown batch).
fn fast_reply(payload: &[u8]) -> Result<FastReply> {
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(rename = "type", default)]
        kind: Option<String>,
        #[serde(default)]
        seq: u64,
        #[serde(default)]
        last_seq: u64,
        #[serde(default)]
        count: u64,
        #[serde(default)]
        batch: String,
        error: Option<ApiError>,
    }
    let r: Reply = serde_json::from_slice(payload).map_err(|e| {
        Error::with_source(
            Kind::Publish,
            "unreadable acknowledgement from JetStream",
            e,
        )
    })?;
    if let Some(e) = r.error {
        return Err(refused("a publish", &e));
    }
    match r.kind.as_deref() {
        Some("ack") => Ok(FastReply::Flow),
        Some("gap") => Err(Error::new(
            Kind::Publish,
            format!(
                "JetStream missed publishes {}..{} of a batch (dropped on the way, e.g. a slow or restarting \
                 server); the batch ended there: resuming from the stream",
                r.last_seq + 1,
                r.seq.saturating_sub(1)
            ),
        )),
        Some(other) => Err(Error::new(
            Kind::Publish,
            format!("JetStream sent an unknown batch reply {other:?}: resuming from the stream"),
        )),
        None => Ok(FastReply::Committed {
            seq: r.seq,
            batch: r.batch,
            count: r.count,
        }),
    }
}

#[derive(serde::Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// An error reply from JetStream, with the fix where walnats knows one.
fn refused(what: &str, e: &ApiError) -> Error {
    let hint = match e.err_code {
        10174 => ": the stream does not allow atomic batches (allow_atomic)",
        10205 => {
            ": the stream does not allow fast-ingest batches (allow_batched); set nats.fast_ingest = \"off\" or let walnats turn it on"
        }
        10071 => {
            ": the stream's last sequence is not what walnats expected (another client publishes to it?)"
        }
        _ => "",
    };
    Error::new(
        Kind::Publish,
        format!(
            "JetStream refused {what}: {} (error {}){hint}; resuming from the stream",
            e.description, e.err_code
        ),
    )
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
        Some(e) => Err(refused("an atomic batch", &e)),
    }
}

/// Awaits one publish's acknowledgement and checks it is where it must be.
async fn await_ack(ack: PublishAckFuture, want: u64) -> Result<u64> {
    let ack = ack.await.map_err(|e| {
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
    if ack.duplicate || ack.sequence != want {
        return Err(Error::new(
            Kind::Publish,
            format!(
                "JetStream stored a message at sequence {} (duplicate: {}), walnats expected {}: resuming from the stream",
                ack.sequence, ack.duplicate, want
            ),
        ));
    }
    Ok(ack.sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(payload: &str) -> (u64, String, u64) {
        match fast_reply(payload.as_bytes()) {
            Ok(FastReply::Committed { seq, batch, count }) => (seq, batch, count),
            Ok(FastReply::Flow) => panic!("{payload}: read as a flow ack"),
            Err(e) => panic!("{payload}: {e}"),
        }
    }

    fn refusal(payload: &str) -> String {
        match fast_reply(payload.as_bytes()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{payload}: not read as an error"),
        }
    }

    /// The replies nats-server 2.15 sends on a fast-ingest inbox, as seen
    /// on the wire.
    #[test]
    fn fast_ingest_replies_are_read_as_the_server_means_them() {
        assert!(matches!(
            fast_reply(br#"{"type":"ack","seq":0,"msgs":500}"#),
            Ok(FastReply::Flow)
        ));
        assert_eq!(
            committed(r#"{"stream":"S","seq":12,"batch":"abc3","count":4}"#),
            (12, "abc3".to_owned(), 4)
        );
        let gap = refusal(r#"{"type":"gap","last_seq":5,"seq":7}"#);
        assert!(gap.contains("6..6"), "{gap}");
        let refused = refusal(
            r#"{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"},"stream":"S","seq":0}"#,
        );
        assert!(
            refused.contains("message size exceeds maximum allowed"),
            "{refused}"
        );
        let unknown = refusal(
            r#"{"error":{"code":400,"err_code":10205,"description":"batch publish is disabled"}}"#,
        );
        assert!(unknown.contains("nats.fast_ingest"), "{unknown}");
        let err = refusal(
            r#"{"type":"err","seq":1,"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 7"}}"#,
        );
        assert!(err.contains("another client"), "{err}");
        assert!(refusal(r#"{"type":"stall"}"#).contains("unknown"));
        assert!(refusal("not json").contains("unreadable"));
    }

    /// Whether `subject` matches the NATS `pattern` (`*` one token, `>`
    /// the rest).
    fn subject_matches(pattern: &str, subject: &str) -> bool {
        let mut subject = subject.split('.');
        for p in pattern.split('.') {
            match (p, subject.next()) {
                (">", Some(_)) => return true,
                ("*", Some(_)) => {}
                (p, Some(t)) if p == t => {}
                _ => return false,
            }
        }
        subject.next().is_none()
    }

    /// The end-of-batch marker reaches the stream (`<prefix>.>`) but no
    /// subscriber of table subjects: those have three tokens after the
    /// prefix, whatever the schema and table are called.
    #[test]
    fn end_of_batch_markers_go_to_a_control_subject_inside_the_stream() {
        let marker = batch_marker_subject("cdc.app");
        assert_eq!(marker, "cdc.app._batch");
        assert!(subject_matches("cdc.app.>", &marker));
        for tables in [
            "cdc.app.*.*.*",
            "cdc.app.*.*.>",
            "cdc.app.*.*.insert",
            "cdc.app._batch.*.*",
            "cdc.app._batch.>",
            "cdc.app.public.t.insert",
        ] {
            assert!(
                !subject_matches(tables, &marker),
                "{tables} matches {marker}"
            );
        }
        assert!(subject_matches("cdc.app.*.*.*", "cdc.app._batch.t.insert"));
    }

    /// ADR-50's reply subject: `<inbox>.<batch id>.<flow>.<gap mode>.<n>.<op>.$FI`.
    #[test]
    fn fast_ingest_reply_subjects_name_batch_place_and_operation() {
        let batch = OpenBatch {
            id: 7,
            reply_prefix: batch_reply_prefix("_INBOX.abc", "abc", 7),
            base: 0,
            n: 0,
            since: std::time::Instant::now(),
        };
        assert_eq!(batch.reply(1, OP_START), "_INBOX.abc.abc7.500.fail.1.0.$FI");
        assert_eq!(
            batch.reply(42, OP_APPEND),
            "_INBOX.abc.abc7.500.fail.42.1.$FI"
        );
        assert_eq!(
            batch.reply(FAST_BATCH, OP_COMMIT),
            "_INBOX.abc.abc7.500.fail.500.2.$FI"
        );
        assert_eq!(
            batch.reply(18446744073709551615, OP_END),
            "_INBOX.abc.abc7.500.fail.18446744073709551615.3.$FI"
        );
    }
}
