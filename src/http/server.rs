//! The HTTP accept loop, with the limits `axum::serve` does not set.
//!
//! Anyone who can reach the port is a client, so no client may hold
//! resources for long: at most [`MAX_CONNECTIONS`] connections at once
//! (past that a new one is closed at once), the request head within
//! [`HEADER_TIMEOUT`] (also the idle limit between keep-alive requests),
//! and every connection ends within [`CONNECTION_LIFETIME`] plus
//! [`GRACE`], which bounds a slow request body (no endpoint reads one:
//! hyper drops the connection rather than drain it) and a client that
//! reads its answer slowly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub const MAX_CONNECTIONS: usize = 64;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// After [`CONNECTION_LIFETIME`], a request under way may finish.
const GRACE: Duration = Duration::from_secs(5);
/// Request heads larger than this are refused (hyper's default is 400 KiB).
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Accepts until the process ends.
pub async fn accept_loop(listener: TcpListener, app: Router) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut last_full_warning: Option<Instant> = None;
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors, mostly: wait rather than spin.
                tracing::warn!(error = %e, "HTTP: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            if last_full_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    "HTTP: connection limit reached; new connections are closed at once"
                );
                last_full_warning = Some(Instant::now());
            }
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = match tokio::time::timeout(CONNECTION_LIFETIME, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(GRACE, conn.as_mut()).await {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        };
        tokio::spawn(tracing::Instrument::instrument(
            connection,
            tracing::debug_span!("http_connection"),
        ));
    }
}
