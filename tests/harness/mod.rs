//! Real PostgreSQL and nats-server processes for the integration tests, on
//! free ports in temp dirs, that tests can kill and restart; and a runner
//! for the walnats binary. No mocks.
//!
//! Binaries come from `WALNATS_PG15_BIN`, `WALNATS_PG18_BIN` (with
//! `WALNATS_PG18_LIB`) and `WALNATS_NATS_SERVER`, which `scripts/deps`
//! prints; without them the `.deps/` layout of this repository is used.
//! Every child dies with the test binary (parent-death signal).

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

pub mod nats;
pub mod postgres;
pub mod process;
pub mod walnats;

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use nats::NatsServer;
pub use postgres::{PgServer, PgVersion, shared_pg};
pub use walnats::WalnatsProc;

/// A port nobody listens on right now (the small race with other
/// processes is accepted; starts retry on a new port).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot find a free port")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A temp dir that outlives nothing: removed when the binary exits.
pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("cannot create a temp dir")
        .keep();
    process::remove_at_exit(&dir);
    dir
}

/// Polls `f` until it is true; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
