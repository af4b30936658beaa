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
pub mod nats_jwt;
pub mod postgres;
pub mod process;
pub mod standby;
pub mod walnats;

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use nats::NatsServer;
pub use postgres::{PgServer, PgVersion, shared_pg};
pub use standby::PgPair;
pub use walnats::WalnatsProc;

/// A port nobody listens on right now, from 20000-32000: below the
/// kernel's ephemeral range, so that a server restarted on its port is not
/// beaten to it by some outgoing connection.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..2000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(37)) % 12_000);
        let port = u16::try_from(port).expect("port in range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-32000");
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
