//! Secrets never appear in logs, errors, `status` or `check` output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use crate::harness::{NatsServer, PgVersion, WalnatsProc, wait_until};
use crate::support::{STREAM, World, read_stream, shared, walnats_bin};

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

/// A config mistake names the key, the line and what was expected, and
/// never echoes the value: a secret on the wrong line would show.
#[test]
fn config_errors_name_the_key_and_line_never_the_value() {
    const PW: &str = "pw-s3cret-in-a-mistake";
    let head = "[postgres]\nurl = \"postgres://walnats@127.0.0.1:1/app\"\n";
    let cases: Vec<(String, &[&str])> = vec![
        // A TOML syntax error on the password's line: an unterminated string.
        (
            format!("{head}password = \"{PW}\n"),
            &["line 3", "postgres.password"],
        ),
        // Unquoted.
        (
            format!("{head}password = {PW}\n"),
            &["line 3", "postgres.password"],
        ),
        // Something after the value.
        (
            format!("{head}password = \"{PW}\" {PW}\n"),
            &["line 3", "postgres.password"],
        ),
        // A whole number where a string belongs.
        (
            format!("{head}password = 12345678\n"),
            &["line 3", "postgres.password", "a string"],
        ),
        (
            format!("{head}[nats]\nuser = \"u\"\npassword = 12345678.5\n"),
            &["line 5", "nats.password", "a string"],
        ),
        (
            format!("{head}[nats]\ntoken = [\"{PW}\"]\n"),
            &["line 4", "nats.token", "a string"],
        ),
        (
            format!("{head}[http]\ntoken = {{ t = \"{PW}\" }}\n"),
            &["line 4", "http.token", "a string"],
        ),
        (
            "[postgres]\nurl = 12345678\n".to_owned(),
            &["line 2", "postgres.url", "a string"],
        ),
    ];
    for (config, wants) in cases {
        let (code, out) = run(&["check"], &config);
        assert_eq!(code, 2, "{config}\n{out}");
        for secret in [PW, "12345678"] {
            assert!(
                !out.contains(secret),
                "the error echoes the value:\n{config}\n{out}"
            );
        }
        for want in wants {
            assert!(out.contains(want), "{want:?} missing:\n{config}\n{out}");
        }
    }
}

/// Credentials in nats.url reach neither the log (async-nats logs the
/// server address at debug) nor any output, and still authenticate.
#[tokio::test]
async fn a_password_in_the_nats_url_never_shows_even_at_debug() {
    const NATS_PW: &str = "nats-url-s3cret-pw";
    let mut world = World::new(shared(PgVersion::V15)).await;
    world.nats = NatsServer::start_with(Some(&format!(
        "authorization {{ user: \"walnats\", password: \"{NATS_PW}\" }}\n"
    )))
    .await;
    world.sql("CREATE TABLE t (id int PRIMARY KEY)").await;
    let url = world
        .nats
        .url()
        .replace("nats://", &format!("nats://walnats:{NATS_PW}@"));
    let config = world.config().replace(&world.nats.url(), &url);
    assert!(config.contains(NATS_PW));
    let mut outputs = Vec::new();
    for args in [&["check"][..], &["status"][..]] {
        let (_, out) = run(args, &config);
        outputs.push((args.join(" "), out));
    }
    let mut w = WalnatsProc::spawn(
        walnats_bin(),
        &["run"],
        &config,
        &[("WALNATS_LOG", "debug")],
    );
    for (what, out) in &outputs {
        assert!(
            !out.contains(NATS_PW),
            "`{what}` printed the NATS password:\n{out}"
        );
    }
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO t VALUES (1)").await;
    // The URL's credentials authenticated: the change is in the stream.
    let js = async_nats::jetstream::new(
        async_nats::ConnectOptions::with_user_and_password("walnats".into(), NATS_PW.into())
            .connect(world.nats.url())
            .await
            .unwrap(),
    );
    wait_until(
        Duration::from_secs(30),
        "the insert in the stream",
        || async {
            read_stream(&js, STREAM)
                .await
                .iter()
                .any(|m| m.subject.ends_with(".t.insert"))
        },
    )
    .await;
    w.sigterm();
    assert!(
        w.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        w.output()
    );
    let out = w.output();
    assert!(
        !out.contains(NATS_PW),
        "`run` printed the NATS password:\n{out}"
    );
    // The same password in the URL and in nats.password: one place only.
    let both = config.replace(
        "[nats]\n",
        &format!("[nats]\nuser = \"walnats\"\npassword = \"{NATS_PW}\"\n"),
    );
    let (code, out) = run(&["check"], &both);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("nats.url"), "{out}");
    assert!(!out.contains(NATS_PW), "{out}");
}
