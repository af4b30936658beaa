//! `/metrics` (Prometheus text), `/healthz`, `/readyz` and `/status`.
//!
//! It serves what `crate::metrics` names and records. It only reads: a request
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

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::Config;
use crate::error::{Error, Kind, Result};
use crate::metrics::Health;

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
