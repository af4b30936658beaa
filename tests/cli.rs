//! The command line from the outside: config mistakes, `check`, `status`,
//! `slot drop`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

use std::process::Command;

use crate::harness::PgVersion;
use crate::support::{World, shared, walnats_bin};

pub(crate) fn run(args: &[&str], config: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walnats.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(walnats_bin());
    cmd.args(args).arg("--config").arg(&path);
    // Hermetic: the harness's own WALNATS_* variables stay out.
    for (k, _) in std::env::vars() {
        if k.starts_with("WALNATS_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_mistakes_stop_with_one_line_naming_the_key() {
    let base = "[postgres]\nurl = \"postgres://u@127.0.0.1:1/db\"\n";
    let cases: &[(&str, &[(&str, &str)], &str)] = &[
        ("[postgres]\nslott = 1\n", &[], "postgres.slott"),
        ("[postgress]\nurl = \"x\"\n", &[], "postgress"),
        (
            base,
            &[("WALNATS_NATS_REPLICAS", "x")],
            "WALNATS_NATS_REPLICAS",
        ),
        (
            base,
            &[("WALNATS_POSTGRES_SLOT", "Has Space")],
            "postgres.slot",
        ),
        (
            base,
            &[("WALNATS_POSTGRES_URL", "postgres://u@h/d?sslmode=sometimes")],
            "sslmode",
        ),
        (
            "[nats]\nurl = \"nats://x:4222\"\n",
            &[],
            "postgres.url is missing",
        ),
        (base, &[("WALNATS_OUTPUT_FORMAT", "xml")], "output.format"),
    ];
    for (config, env, want) in cases {
        let (code, _, stderr) = run(&["run"], config, env);
        assert_eq!(code, 2, "{want}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "more than one line: {stderr}"
        );
        assert!(stderr.contains(want), "{want:?} not in {stderr:?}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn secrets_never_reach_an_error_line() {
    let config = "[postgres]\nurl = \"postgres://u:hunter2@127.0.0.1:1/db?sslmode=bogus\"\n";
    let (code, out, err) = run(&["run"], config, &[]);
    assert_eq!(code, 2);
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{err}"
    );
}

#[tokio::test]
async fn check_passes_on_a_ready_setup_and_reports_every_failure_at_once() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql("CREATE TABLE keyless (v int)").await;
    let config = world.config();
    let (code, out, _) = run(&["check"], &config, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[ok]   PostgreSQL reachable"), "{out}");
    assert!(
        out.contains("[FAIL] table public.keyless has no replica identity"),
        "{out}"
    );
    world.sql("ALTER TABLE keyless REPLICA IDENTITY FULL").await;
    let (code, out, _) = run(&["check"], &config, &[]);
    assert_eq!(code, 0, "{out}");
    // The harness connects as the superuser: a note, not a failure.
    assert!(
        out.contains("[info] role \"postgres\" is a superuser: walnats never needs one"),
        "{out}"
    );
    // NATS gone and PostgreSQL ok: both reported.
    let (code, out, _) = run(
        &["check"],
        &config,
        &[("WALNATS_NATS_URL", "nats://127.0.0.1:1")],
    );
    assert_eq!(code, 1);
    assert!(
        out.contains("[FAIL] NATS") && out.contains("[ok]   wal_level = logical"),
        "{out}"
    );
}

/// `check` with `[[outbox]]`: a fitting outbox table passes; a missing
/// column, a payload of another type and a publication without the table
/// are each a failed item naming them, a nullable aggregate type a warning.
#[tokio::test]
async fn check_reports_each_outbox_table_problem_naming_the_column() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql(
            "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, \
             aggregateid text, payload jsonb, traceparent text)",
        )
        .await;
    let config = format!(
        "{}[[outbox]]\ntable = \"public.outbox\"\nheaders = [\"traceparent\"]\n",
        world.config()
    );
    let (code, out, err) = run(&["check"], &config, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("[ok]   outbox tables public.outbox are published"),
        "{out}"
    );
    assert!(!out.contains("[warn]"), "{out}");

    world
        .sql("ALTER TABLE outbox ALTER COLUMN aggregatetype DROP NOT NULL")
        .await;
    let (code, out, _) = run(&["check"], &config, &[]);
    assert_eq!(code, 0, "a warning is not a failure: {out}");
    assert!(
        out.contains("[warn] column aggregatetype of outbox table public.outbox is nullable"),
        "{out}"
    );

    world
        .sql(
            "ALTER TABLE outbox DROP COLUMN aggregateid; \
             ALTER TABLE outbox ALTER COLUMN payload TYPE integer USING 0",
        )
        .await;
    let (code, out, _) = run(&["check"], &config, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "[FAIL] outbox table public.outbox has no column aggregateid (outbox[0].aggregate_id)"
        ),
        "{out}"
    );
    assert!(
        out.contains("[FAIL] column payload of outbox table public.outbox is integer"),
        "{out}"
    );
    assert!(
        out.contains("fix: ALTER TABLE \"public\".\"outbox\" ALTER COLUMN \"payload\" TYPE jsonb"),
        "{out}"
    );
    assert!(
        !out.contains("outbox tables public.outbox are published"),
        "{out}"
    );

    world
        .sql("CREATE TABLE other (id int PRIMARY KEY); CREATE PUBLICATION walnats FOR TABLE other")
        .await;
    let (code, out, _) = run(&["check"], &config, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("[FAIL] outbox table public.outbox is not in publication \"walnats\"")
            && out.contains("fix: ALTER PUBLICATION \"walnats\" ADD TABLE \"public\".\"outbox\""),
        "{out}"
    );
}

#[tokio::test]
async fn status_json_and_slot_drop() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO t VALUES (1)").await;
    world.wait_changes(1, &w).await;
    w.sigterm();
    assert!(w.wait_exit(std::time::Duration::from_secs(20)).success());
    let config = world.config();
    let (code, out, err) = run(&["status", "--json"], &config, &[]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["slot"]["exists"], true);
    assert_eq!(v["stream"]["last_seq"], 2, "{out}");
    assert_eq!(v["checkpoint"]["stream_seq"], 2, "{out}");
    let (code, _, err) = run(&["slot", "drop"], &config, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--yes"));
    let (code, _, err) = run(&["slot", "drop", "--yes"], &config, &[]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run(&["status", "--json"], &config, &[]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["slot"]["exists"], false);
    assert_eq!(v["checkpoint"], serde_json::Value::Null);
}
