//! `walnats tail` prints events for a human, in stream order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::PgVersion;
use crate::support::{World, shared, walnats_bin};

#[tokio::test]
async fn tail_prints_events_in_order_with_a_filter() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
        .await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO a VALUES (1)").await;
    world.sql("INSERT INTO b VALUES (2)").await;
    world.sql("DELETE FROM a").await;
    world.wait_changes(3, &w).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.toml");
    std::fs::write(&path, world.config()).unwrap();
    let mut child = Command::new(walnats_bin())
        .args(["tail", "--from-start", "--config"])
        .arg(&path)
        .arg("public.a")
        .env("WALNATS_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("cdc.test.public.a.insert") && lines[0].contains("\"id\":1"),
        "{text}"
    );
    assert!(lines[1].contains("cdc.test.public.a.delete"), "{text}");
    w.sigterm();
}
