//! `/metrics` (Prometheus text), `/healthz`, `/readyz` and `/status`.
//!
//! Owns the metric names and the readiness flag. It only reads: a request
//! never changes what walnats streams. `/readyz` is 200 only while a session
//! streams with both PostgreSQL and NATS connected; `/status` gathers the
//! same figures as `walnats status --json`, from a cache that one refresh
//! at a time fills (`status`). Whoever reaches the port is untrusted: the
//! accept loop caps connections and times them out (`server`), `http.token`
//! guards all but the probes (`auth`), and no answer names a host, a user
//! or a database.

mod auth;
mod server;
mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::Config;
use crate::error::{Error, Kind, Result};

pub const EVENTS_PUBLISHED: &str = "walnats_events_published_total";
pub const TRANSACTIONS: &str = "walnats_transactions_total";
pub const REPLICATION_LAG: &str = "walnats_replication_lag_bytes";
pub const CONFIRMED_FLUSH_LSN: &str = "walnats_confirmed_flush_lsn";
pub const PUBLISH_LATENCY: &str = "walnats_publish_latency_seconds";
pub const SNAPSHOT_ROWS: &str = "walnats_snapshot_rows_total";
pub const ERRORS: &str = "walnats_errors_total";
pub const OVERSIZE_SKIPPED: &str = "walnats_oversize_skipped_total";
pub const READY: &str = "walnats_ready";
pub const OVERSIZE_STORED: &str = "walnats_oversize_stored_total";
pub const SLOT_WAL_RETAINED: &str = "walnats_slot_wal_retained_bytes";
pub const MESSAGES_IGNORED: &str = "walnats_messages_ignored_total";

/// Whether a session is streaming right now.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    /// Also the `walnats_ready` gauge, so that "nothing streams" is an
    /// alert on `/metrics` alone.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        metrics::gauge!(READY).set(if ready { 1.0 } else { 0.0 });
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Installs the Prometheus recorder (once per process), describes every
/// metric, so that each appears in `/metrics` from the start, and drains
/// histogram samples every 5 s. Must run inside the Tokio runtime.
pub fn install_metrics() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ])
        .map_err(|e| Error::with_source(Kind::Config, "bad histogram buckets", e))?
        .install_recorder()
        .map_err(|e| Error::with_source(Kind::Io, "cannot install the metrics recorder", e))?;
    metrics::describe_counter!(
        EVENTS_PUBLISHED,
        "change events acknowledged by JetStream, by table and op"
    );
    metrics::describe_counter!(
        MESSAGES_IGNORED,
        "pg_logical_emit_message messages not published: their prefix is not in output.message_prefixes, \
         or a walnats control message that was malformed or not authorized"
    );
    metrics::describe_counter!(
        TRANSACTIONS,
        "transactions whose every event JetStream acknowledged"
    );
    metrics::describe_gauge!(
        REPLICATION_LAG,
        "bytes of WAL between the server's position and the slot's confirmed position"
    );
    metrics::describe_gauge!(
        CONFIRMED_FLUSH_LSN,
        "the LSN walnats last confirmed to the slot, as a number"
    );
    metrics::describe_histogram!(
        PUBLISH_LATENCY,
        metrics::Unit::Seconds,
        "commit in PostgreSQL to acknowledgement by JetStream"
    );
    metrics::describe_counter!(SNAPSHOT_ROWS, "rows published by snapshots");
    metrics::describe_counter!(
        ERRORS,
        "errors that ended a session or the process, by kind"
    );
    metrics::describe_gauge!(
        READY,
        "1 while a session streams with PostgreSQL and NATS connected (as /readyz), else 0"
    );
    metrics::gauge!(READY).set(0.0);
    metrics::describe_gauge!(
        SLOT_WAL_RETAINED,
        "bytes of WAL the slot keeps on the server (its WAL position minus the slot's restart_lsn)"
    );
    metrics::describe_counter!(
        OVERSIZE_SKIPPED,
        "messages over max_payload not published (limits.on_oversize = skip), by subject"
    );
    metrics::describe_counter!(
        OVERSIZE_STORED,
        "messages over max_payload stored in the Object Store, a claim check published instead, by subject"
    );
    metrics::counter!(SNAPSHOT_ROWS).absolute(0);
    metrics::counter!(TRANSACTIONS).absolute(0);
    // Histogram samples pile up until drained into their buckets: drain
    // them whether or not anything scrapes (with HTTP off they grew by ~8
    // bytes per published change, without bound).
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
    status: Arc<status::StatusCache>,
}

/// Binds `addr` and serves in a background task; fails at once when the
/// address cannot be bound (a port in use is a setup error, not a retry).
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    cfg: Arc<Config>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::with_source(
            Kind::Config,
            format!("http.listen: cannot listen on {addr}: set another address, or \"\" to turn HTTP off"),
            e,
        )
    })?;
    let mut app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_handler))
        .with_state(AppState {
            metrics,
            health,
            status: Arc::new(status::StatusCache::new(Arc::clone(&cfg))),
        });
    // On the whole router, so that a path added later (and the 404 of an
    // unknown one) is guarded too.
    if let Some(token) = &cfg.http_token {
        app = app.layer(axum::middleware::from_fn_with_state(
            auth::Token::new(token),
            auth::require,
        ));
    }
    let auth = if cfg.http_token.is_some() {
        "bearer token (http.token) on all but /healthz and /readyz"
    } else {
        "none"
    };
    tracing::info!(%addr, auth, "HTTP listening (/metrics, /healthz, /readyz, /status)");
    if cfg.http_token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "http.listen is not a loopback address and http.token is not set: whoever reaches \
             it reads /metrics and /status (table names, slot, stream); set http.token, or \
             restrict who reaches the port"
        );
    }
    // (Named tasks need tokio_unstable; the span names it in logs.)
    tokio::spawn(tracing::Instrument::instrument(
        server::accept_loop(listener, app),
        tracing::info_span!("http", %addr),
    ));
    Ok(())
}

async fn metrics_handler(State(s): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not streaming\n").into_response()
    }
}

async fn status_handler(State(s): State<AppState>) -> Response {
    match s.status.get().await {
        status::Answer::Ok(json) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            json,
        )
            .into_response(),
        // What failed and where is in the log; the client learns the kind.
        status::Answer::Unavailable(kind) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({
                "error": "the status cannot be gathered now: see walnats' log",
                "kind": kind.name(),
            })),
        )
            .into_response(),
    }
}
