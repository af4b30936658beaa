//! Secrets never appear in logs, errors, `status` or `check` output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use crate::harness::{NatsServer, PgVersion, WalnatsProc};
use crate::support::{World, shared, walnats_bin};

const PG_PASSWORD: &str = "pg-s3cret-pw";
const TOKEN: &str = "nats-s3cret-token";

fn run(args: &[&str], config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(walnats_bin())
        .args(args)
        .arg("--config")
        .arg(&path)
        .env("WALNATS_LOG", "debug")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn no_output_of_any_command_contains_a_secret() {
    let mut world = World::new(shared(PgVersion::V15)).await;
    world.nats =
        NatsServer::start_with(Some(&format!("authorization {{ token: \"{TOKEN}\" }}\n"))).await;
    world.sql("CREATE TABLE t (id int PRIMARY KEY)").await;
    // The shared server trusts 127.0.0.1, so the password is accepted and
    // unused: what matters is that walnats never prints it.
    let config = format!(
        "[postgres]\nurl = \"postgres://postgres:{PG_PASSWORD}@127.0.0.1:{}/{}?sslmode=disable\"\nslot = \"{}\"\n\
         [nats]\nurl = \"{}\"\ntoken = \"{TOKEN}\"\nstream = \"CDC_TEST\"\nsubject_prefix = \"cdc.test\"\n\
         [snapshot]\nmode = \"never\"\n[http]\nlisten = \"\"\n",
        world.pg.port(),
        world.db,
        world.slot(),
        world.nats.url()
    );
    let mut w = WalnatsProc::spawn(
        walnats_bin(),
        &["run"],
        &config,
        &[("WALNATS_LOG", "debug")],
    );
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO t VALUES (1)").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    w.sigterm();
    assert!(
        w.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        w.output()
    );
    let mut outputs = vec![("run".to_owned(), w.output())];
    for args in [&["check"][..], &["status"][..], &["status", "--json"][..]] {
        let (_, out) = run(args, &config);
        outputs.push((args.join(" "), out));
    }
    // Failures print the URL and the auth method, never the secrets.
    let wrong_token = config.replace(TOKEN, "wrong-but-secret-token");
    let (code, out) = run(&["run"], &wrong_token);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NATS refused"), "{out}");
    assert!(!out.contains("wrong-but-secret-token"), "{out}");
    outputs.push(("run with a wrong token".to_owned(), out));
    let bad_url = config.replace("sslmode=disable", "sslmode=nope");
    let (code, out) = run(&["run"], &bad_url);
    assert_eq!(code, 2, "{out}");
    outputs.push(("run with a bad url".to_owned(), out));
    for (what, out) in outputs {
        assert!(
            !out.contains(PG_PASSWORD),
            "`{what}` printed the PostgreSQL password:\n{out}"
        );
        assert!(
            !out.contains(TOKEN),
            "`{what}` printed the NATS token:\n{out}"
        );
    }
}
