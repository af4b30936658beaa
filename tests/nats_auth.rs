//! Every NATS auth method walnats offers, against a nats-server configured
//! for it; a wrong credential is a clear, non-retried error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use crate::harness::{NatsServer, PgVersion};
use crate::support::{World, shared, walnats_bin};

/// `walnats check` with the world's PostgreSQL and `nats` as the `[nats]`
/// section's extra keys: (exit code, output).
fn check(world: &World<'_>, url: &str, nats: &str) -> (i32, String) {
    let config = format!(
        "[postgres]\nurl = \"{}\"\nslot = \"{}\"\n[nats]\nurl = \"{url}\"\nstream = \"CDC_TEST\"\nsubject_prefix = \"cdc.test\"\n{nats}\n\
         [snapshot]\nmode = \"never\"\n[http]\nlisten = \"\"\n",
        world.pg_url(),
        world.slot()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(walnats_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn assert_connects(r: (i32, String)) {
    assert!(
        r.0 == 0 && r.1.contains("[ok]   JetStream enabled"),
        "{}",
        r.1
    );
}

fn assert_refused(r: (i32, String), secret: &str) {
    assert!(r.0 == 1 && r.1.contains("[FAIL] NATS"), "{}", r.1);
    assert!(!r.1.contains(secret), "a secret was printed:\n{}", r.1);
}

#[tokio::test]
async fn user_password_nkey_and_token_connect_and_wrong_ones_are_refused() {
    let mut world = World::new(shared(PgVersion::V15)).await;
    let nkey = nkeys::KeyPair::new_user();
    let seed = nkey.seed().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("walnats.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).unwrap();
    let other_seed = nkeys::KeyPair::new_user().seed().unwrap();
    world.nats = NatsServer::start_with(Some(&format!(
        "authorization {{ users = [ {{user: walnats, password: \"pw-s3cret\"}}, {{nkey: \"{}\"}} ] }}\n",
        nkey.public_key()
    )))
    .await;
    let url = world.nats.url();
    assert_connects(check(
        &world,
        &url,
        "user = \"walnats\"\npassword = \"pw-s3cret\"",
    ));
    assert_connects(check(
        &world,
        &url,
        &format!("nkey_file = \"{}\"", seed_file.display()),
    ));
    assert_connects(check(&world, &url, &format!("nkey = \"{seed}\"")));
    assert_refused(
        check(
            &world,
            &url,
            "user = \"walnats\"\npassword = \"wrong-s3cret\"",
        ),
        "wrong-s3cret",
    );
    assert_refused(
        check(&world, &url, &format!("nkey = \"{other_seed}\"")),
        &other_seed,
    );
    assert_refused(check(&world, &url, ""), "pw-s3cret");
}

fn certificates(dir: &std::path::Path) -> (String, String, String, String, String) {
    let write = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let (ca, issuer) = crate::support::test_ca();
    let (srv_cert, srv_key) = crate::support::test_leaf(&issuer, &["localhost", "127.0.0.1"]);
    let (cli_cert, cli_key) = crate::support::test_leaf(&issuer, &["walnats"]);
    (
        write("ca.pem", ca),
        write("server.pem", srv_cert),
        write("server-key.pem", srv_key),
        write("client.pem", cli_cert),
        write("client-key.pem", cli_key),
    )
}

#[tokio::test]
async fn tls_with_a_custom_ca_and_a_client_certificate() {
    let mut world = World::new(shared(PgVersion::V15)).await;
    let dir = crate::harness::temp_dir("walnats-nats-tls-");
    let (ca, cert, key, client_cert, client_key) = certificates(&dir);
    world.nats = NatsServer::start_with(Some(&format!(
        "tls {{ cert_file: \"{cert}\"\n key_file: \"{key}\"\n ca_file: \"{ca}\"\n verify: true }}\n"
    )))
    .await;
    let url = world.nats.url();
    assert_connects(check(
        &world,
        &url,
        &format!(
            "tls_required = true\ntls_ca_file = \"{ca}\"\ntls_cert_file = \"{client_cert}\"\ntls_key_file = \"{client_key}\""
        ),
    ));
    // Without the client certificate the server refuses the handshake.
    let (code, out) = check(
        &world,
        &url,
        &format!("tls_required = true\ntls_ca_file = \"{ca}\""),
    );
    assert!(code == 1 && out.contains("[FAIL] NATS"), "{out}");
    // Without the CA walnats refuses the server's certificate.
    let (code, out) = check(
        &world,
        &url,
        &format!(
            "tls_required = true\ntls_cert_file = \"{client_cert}\"\ntls_key_file = \"{client_key}\""
        ),
    );
    assert!(code == 1 && out.contains("[FAIL] NATS"), "{out}");
}

/// Operator mode, as `nsc` sets it up: walnats authenticates with a
/// `.creds` file (user JWT + seed) of an account that has JetStream.
#[tokio::test]
async fn creds_file_in_operator_mode_streams_and_a_foreign_user_is_refused() {
    use crate::harness::WalnatsProc;
    use crate::harness::nats_jwt::{Operator, creds, user_jwt};
    use crate::support::{PREFIX, STREAM, read_stream};

    let mut world = World::new(shared(PgVersion::V15)).await;
    let op = Operator::new();
    world.nats = NatsServer::start_with(Some(&op.server_config())).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let with_creds = |path: &str| {
        world.config().replace(
            "[snapshot]",
            &format!("creds_file = \"{path}\"\n[snapshot]"),
        )
    };

    // Without credentials the server lets nobody in: the test really runs
    // against an authenticating server.
    let (code, out) = check(&world, &world.nats.url(), "");
    assert!(code == 1 && out.contains("[FAIL] NATS"), "{out}");

    let (walnats_creds, seed) = op.app_user("walnats");
    let good = write("walnats.creds", &walnats_creds);
    world
        .sql("CREATE TABLE orders (id int PRIMARY KEY, status text)")
        .await;
    let mut w = world.spawn_with(&with_creds(&good), &[]);
    world.wait_streaming(&mut w).await;
    world
        .sql("INSERT INTO orders VALUES (1, 'via creds')")
        .await;
    // A consumer of the same account, with creds of its own.
    let (reader, _) = op.app_user("reader");
    let client = async_nats::ConnectOptions::with_credentials(&reader)
        .unwrap()
        .connect(world.nats.url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let subject = format!("{PREFIX}.public.orders.insert");
    let mut found = None;
    for _ in 0..600 {
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        found = read_stream(&js, STREAM)
            .await
            .into_iter()
            .find(|m| m.subject == subject);
        if found.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let msg = found.unwrap_or_else(|| panic!("no {subject} in the stream:\n{}", w.output()));
    assert_eq!(msg.json()["after"]["status"], "via creds");
    w.sigterm();
    assert!(
        w.wait_exit(std::time::Duration::from_secs(20)).success(),
        "{}",
        w.output()
    );
    assert!(!w.output().contains(&seed), "the seed was printed");

    // Refused: a user issued by an account this operator never signed, and
    // a creds file whose seed is not the key its JWT names.
    let foreign_account = nkeys::KeyPair::new_account();
    let foreign_user = nkeys::KeyPair::new_user();
    let foreign_seed = foreign_user.seed().unwrap();
    let foreign = write(
        "foreign.creds",
        &creds(
            &user_jwt(&foreign_account, &foreign_user, "walnats"),
            &foreign_seed,
        ),
    );
    let (_, other_seed) = op.app_user("other");
    let jwt = walnats_creds.lines().nth(1).unwrap();
    let mismatched = write("mismatched.creds", &creds(jwt, &other_seed));
    // `check` agrees with `run` on both.
    let url = world.nats.url();
    assert_connects(check(&world, &url, &format!("creds_file = \"{good}\"")));
    assert_refused(
        check(&world, &url, &format!("creds_file = \"{foreign}\"")),
        &foreign_seed,
    );
    for (path, secret) in [(&foreign, &foreign_seed), (&mismatched, &other_seed)] {
        let mut w = WalnatsProc::spawn(walnats_bin(), &["run"], &with_creds(path), &[]);
        let status = w.wait_exit(std::time::Duration::from_secs(60));
        let out = w.output();
        assert_eq!(status.code(), Some(1), "{out}");
        let last = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap();
        assert!(
            last.starts_with("walnats: NATS refused walnats' credentials")
                && last.contains("nats.creds_file"),
            "{out}"
        );
        assert!(
            !out.contains(secret.as_str()),
            "the seed was printed:\n{out}"
        );
    }
}
