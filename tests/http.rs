//! `/metrics`, `/healthz`, `/readyz` and `/status` from the outside.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{PgVersion, free_port, wait_until};
use crate::support::{World, shared};

/// A plain HTTP/1.1 GET: (status, body). `None` when nothing listens.
pub async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
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
