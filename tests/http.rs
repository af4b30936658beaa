//! `/metrics`, `/healthz`, `/readyz` and `/status` from the outside.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{PgVersion, free_port, wait_until};
use crate::support::{World, shared};

/// A plain HTTP/1.1 GET: (status, body). `None` when nothing listens.
pub async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    get_with(port, path, "").await
}

/// As [`get`], with `headers` (each ending in `\r\n`) added.
pub async fn get_with(port: u16, path: &str, headers: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

pub fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_published_and_readyz_follows_nats() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE m (id int PRIMARY KEY, v text)")
        .await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut w = world.spawn_with(&world.config(), &[("WALNATS_HTTP_LISTEN", &listen)]);
    world.wait_streaming(&mut w).await;
    assert_eq!(get(port, "/healthz").await.map(|r| r.0), Some(200));
    wait_until(Duration::from_secs(10), "/readyz 200", || async {
        get(port, "/readyz").await.map(|r| r.0) == Some(200)
    })
    .await;

    for i in 0..10 {
        world.sql(&format!("INSERT INTO m VALUES ({i}, 'x')")).await;
    }
    world.sql("DELETE FROM m WHERE id < 3").await;
    world.wait_changes(13, &w).await;
    wait_until(Duration::from_secs(10), "the delete counter", || async {
        let body = get(port, "/metrics").await.map(|r| r.1).unwrap_or_default();
        metric(
            &body,
            "walnats_events_published_total{table=\"public.m\",op=\"delete\"}",
        ) == Some(3.0)
    })
    .await;
    let body = get(port, "/metrics").await.unwrap().1;
    assert_eq!(
        metric(
            &body,
            "walnats_events_published_total{table=\"public.m\",op=\"insert\"}"
        ),
        Some(10.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, "walnats_transactions_total"),
        Some(11.0),
        "{body}"
    );
    assert!(
        metric(&body, "walnats_confirmed_flush_lsn").is_some_and(|v| v > 0.0),
        "{body}"
    );
    assert!(body.contains("walnats_replication_lag_bytes"), "{body}");
    assert!(
        body.contains("walnats_publish_latency_seconds_bucket"),
        "{body}"
    );
    assert!(body.contains("walnats_snapshot_rows_total"), "{body}");
    assert_eq!(metric(&body, "walnats_ready"), Some(1.0), "{body}");

    let (code, status) = get(port, "/status").await.unwrap();
    assert_eq!(code, 200, "{status}");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["slot"]["active"], true, "{status}");

    world.nats.kill9();
    wait_until(
        Duration::from_secs(30),
        "/readyz 503 while NATS is down",
        || async { get(port, "/readyz").await.map(|r| r.0) == Some(503) },
    )
    .await;
    let body = get(port, "/metrics").await.unwrap().1;
    assert_eq!(metric(&body, "walnats_ready"), Some(0.0), "{body}");
    world.nats.start_again().await;
    wait_until(
        Duration::from_secs(60),
        "/readyz 200 once NATS is back",
        || async { get(port, "/readyz").await.map(|r| r.0) == Some(200) },
    )
    .await;
    // Nothing was in flight during the outage: the session survives it and
    // streams on.
    world.sql("INSERT INTO m VALUES (100, 'after')").await;
    world.wait_changes(14, &w).await;
    w.sigterm();
}

/// Backends connected to the world's database, other than the asking one.
async fn backends(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_concurrent_status_requests_open_at_most_one_more_postgres_backend() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql("CREATE TABLE t (id int PRIMARY KEY)").await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut w = world.spawn_with(&world.config(), &[("WALNATS_HTTP_LISTEN", &listen)]);
    world.wait_streaming(&mut w).await;
    wait_until(Duration::from_secs(10), "/readyz 200", || async {
        get(port, "/readyz").await.map(|r| r.0) == Some(200)
    })
    .await;
    let client = world.client().await;
    // The session's own connections settle (the walsender, its SQL
    // connection) before the baseline is taken.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = backends(&client).await;

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = std::sync::Arc::clone(&done);
        tokio::spawn(async move {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(backends(&client).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peak
        })
    };
    let requests: Vec<_> = (0..60)
        .map(|_| tokio::spawn(async move { get(port, "/status").await }))
        .collect();
    let mut codes = Vec::new();
    for r in requests {
        codes.push(r.await.unwrap().map(|(code, _)| code));
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    assert!(
        peak <= baseline + 1,
        "60 /status requests raised the backends from {baseline} to {peak}"
    );
    assert!(
        codes.iter().all(|c| *c == Some(200)),
        "every /status request is answered from the cache: {codes:?}"
    );
    w.sigterm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_mid_header_is_disconnected_within_the_timeout() {
    let world = World::new(shared(PgVersion::V15)).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut w = world.spawn_with(&world.config(), &[("WALNATS_HTTP_LISTEN", &listen)]);
    wait_until(Duration::from_secs(30), "/healthz 200", || async {
        get(port, "/healthz").await.map(|r| r.0) == Some(200)
    })
    .await;
    let start = std::time::Instant::now();
    let mut partial = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    partial
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    for (what, s) in [("partial header", &mut partial), ("silent", &mut silent)] {
        let mut buf = [0u8; 512];
        // Closed (0 bytes, a reset, or a 408 and then the close) well within
        // 15 s: the header timeout is 5 s.
        let closed = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "{what} connection still open after {:?}",
            start.elapsed()
        );
    }
    assert!(start.elapsed() < Duration::from_secs(15));
    w.sigterm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_error_names_no_host_user_or_database() {
    let world = World::new(shared(PgVersion::V15)).await;
    let port = free_port();
    let pg_port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // Nothing listens on pg_port: walnats retries, /status fails.
    let config = world.config().replace(
        &world.pg_url(),
        &format!("postgres://status_probe_user:status-pw@127.0.0.1:{pg_port}/status_probe_db?sslmode=disable"),
    );
    let mut w = world.spawn_with(&config, &[("WALNATS_HTTP_LISTEN", &listen)]);
    wait_until(Duration::from_secs(30), "/healthz 200", || async {
        get(port, "/healthz").await.map(|r| r.0) == Some(200)
    })
    .await;
    let (code, body) = get(port, "/status").await.unwrap();
    assert_eq!(code, 503, "{body}");
    for secret in [
        "status_probe_user",
        "status_probe_db",
        "status-pw",
        "127.0.0.1",
        &pg_port.to_string(),
        &world.nats.port().to_string(),
    ] {
        assert!(!body.contains(secret), "{secret:?} in the 503 body: {body}");
    }
    assert!(w.is_running(), "{}", w.output());
    // The details are in the log (without the password).
    wait_until(Duration::from_secs(10), "the cause in the log", || async {
        let log = w.output();
        log.lines()
            .any(|l| l.contains("/status: cannot gather") && l.contains(&pg_port.to_string()))
    })
    .await;
    assert!(!w.output().contains("status-pw"), "{}", w.output());
    w.sigterm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_metrics_and_status_need_it_and_probes_do_not() {
    const TOKEN: &str = "http-s3cret-token";
    let world = World::new(shared(PgVersion::V15)).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut w = world.spawn_with(
        &world.config(),
        &[
            ("WALNATS_HTTP_LISTEN", &listen),
            ("WALNATS_HTTP_TOKEN", TOKEN),
        ],
    );
    world.wait_streaming(&mut w).await;
    wait_until(
        Duration::from_secs(10),
        "/readyz 200 without a token",
        || async { get(port, "/readyz").await.map(|r| r.0) == Some(200) },
    )
    .await;
    assert_eq!(get(port, "/healthz").await.map(|r| r.0), Some(200));
    let good = format!("Authorization: Bearer {TOKEN}\r\n");
    for path in ["/metrics", "/status"] {
        let (code, body) = get(port, path).await.unwrap();
        assert_eq!(code, 401, "{path} without a token: {body}");
        for wrong in [
            "Authorization: Bearer nope\r\n",
            "Authorization: Bearer http-s3cret-tokenX\r\n",
            "Authorization: Basic aHR0cC1zM2NyZXQtdG9rZW4=\r\n",
            "Authorization: http-s3cret-token\r\n",
        ] {
            let (code, body) = get_with(port, path, wrong).await.unwrap();
            assert_eq!(code, 401, "{path} with {wrong:?}: {body}");
            assert!(!body.contains(TOKEN), "{body}");
        }
        let (code, body) = get_with(port, path, &good).await.unwrap();
        assert_eq!(code, 200, "{path} with the token: {body}");
    }
    w.sigterm();
    w.wait_exit(Duration::from_secs(20));
    assert!(!w.output().contains(TOKEN), "{}", w.output());
}
