//! The PostgreSQL side from the outside: every auth method, every sslmode,
//! the refusals a user meets first (wrong password, no REPLICATION), and
//! impostors that try to take the password (`fake`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fake;

use std::process::Command;
use std::time::Duration;

use crate::harness::{NatsServer, PgServer, PgVersion, WalnatsProc};
use crate::support::{World, shared, walnats_bin};
use fake::{Attack, Attacked, FakePg, TlsRelay, frontend_tags};

/// A CA and a server certificate for `localhost` only, so that
/// verify-full against 127.0.0.1 must fail while verify-ca passes.
fn certificates() -> (String, String, String) {
    let (ca, issuer) = crate::support::test_ca();
    let (cert, key) = crate::support::test_leaf(&issuer, &["localhost"]);
    (ca, cert, key)
}

struct Setup {
    pg: PgServer,
    nats: NatsServer,
    ca: std::path::PathBuf,
}

async fn setup() -> Setup {
    let (ca_pem, cert_pem, key_pem) = certificates();
    let pg = PgServer::start(PgVersion::V15);
    pg.put_file("server.crt", cert_pem.as_bytes());
    pg.put_file("server.key", key_pem.as_bytes());
    let dir = crate::harness::temp_dir("walnats-ca-");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    for stmt in [
        "ALTER SYSTEM SET ssl = on",
        "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN REPLICATION SUPERUSER PASSWORD 'md5 pw'",
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE scramuser LOGIN REPLICATION SUPERUSER PASSWORD 'scr:am/pw@'",
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE scramplain LOGIN REPLICATION SUPERUSER PASSWORD 'plain pw'",
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE relayuser LOGIN REPLICATION SUPERUSER PASSWORD 'relay pw'",
        "CREATE ROLE clearuser LOGIN REPLICATION SUPERUSER PASSWORD 'clear'",
        "CREATE ROLE norepl LOGIN NOREPLICATION",
        "SELECT pg_reload_conf()",
    ] {
        pg.execute("postgres", stmt).await;
    }
    pg.set_hba(
        "local all all trust
         host all postgres 127.0.0.1/32 trust
         host replication postgres 127.0.0.1/32 trust
         host all md5user 127.0.0.1/32 md5
         host replication md5user 127.0.0.1/32 md5
         hostssl all scramuser 127.0.0.1/32 scram-sha-256
         hostssl all scramuser 127.0.0.2/32 scram-sha-256
         hostssl replication scramuser 127.0.0.1/32 scram-sha-256
         host all scramplain 127.0.0.1/32 scram-sha-256
         host replication scramplain 127.0.0.1/32 scram-sha-256
         hostssl all relayuser 127.0.0.2/32 trust
         hostssl all relayuser 127.0.0.1/32 scram-sha-256
         host all clearuser 127.0.0.1/32 password
         host replication clearuser 127.0.0.1/32 password
         host all norepl 127.0.0.1/32 trust
         host replication norepl 127.0.0.1/32 trust
",
    );
    let nats = NatsServer::start().await;
    Setup { pg, nats, ca }
}

impl Setup {
    fn config(&self, url: &str) -> String {
        format!(
            "[postgres]\nurl = \"{url}\"\n[nats]\nurl = \"{}\"\n[snapshot]\nmode = \"never\"\n[http]\nlisten = \"\"\n",
            self.nats.url()
        )
    }

    fn url(&self, userinfo: &str, host: &str, params: &str) -> String {
        format!(
            "postgres://{userinfo}@{host}:{}/postgres?{params}",
            self.pg.port()
        )
    }

    fn check(&self, url: &str, env: &[(&str, &str)]) -> (bool, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(&path, self.config(url)).unwrap();
        let mut cmd = Command::new(walnats_bin());
        cmd.args(["check", "--config"]).arg(&path);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_method_and_sslmode_connects_where_allowed_and_refusals_say_why() {
    let s = setup().await;
    let ca = s.ca.display().to_string();
    let verify_ca = format!("sslmode=verify-ca&sslrootcert={ca}");
    let verify_full = format!("sslmode=verify-full&sslrootcert={ca}");

    // SCRAM over every transport; cleartext and MD5 only to a server whose
    // certificate walnats has verified (their password, or its MD5
    // equivalent, would go to whoever answers).
    let ok_cases = [
        s.url("scramplain:plain%20pw", "127.0.0.1", "sslmode=disable"),
        // The default sslmode (prefer): TLS, as the server offers it.
        s.url("scramplain:plain%20pw", "127.0.0.1", ""),
        s.url("scramuser:scr%3Aam%2Fpw%40", "127.0.0.1", "sslmode=require"),
        s.url("scramuser:scr%3Aam%2Fpw%40", "127.0.0.1", &verify_ca),
        s.url("scramuser:scr%3Aam%2Fpw%40", "localhost", &verify_full),
        // sslrootcert alone means verify-full.
        s.url(
            "scramuser:scr%3Aam%2Fpw%40",
            "localhost",
            &format!("sslrootcert={ca}"),
        ),
        s.url("md5user:md5%20pw", "127.0.0.1", &verify_ca),
        // require with sslrootcert checks the chain, as libpq does.
        s.url(
            "md5user:md5%20pw",
            "127.0.0.1",
            &format!("sslmode=require&sslrootcert={ca}"),
        ),
        s.url("clearuser:clear", "localhost", &verify_full),
    ];
    for url in &ok_cases {
        let (ok, out) = s.check(url, &[]);
        assert!(
            ok && out.contains("[ok]   replication connection accepted"),
            "{url}:\n{out}"
        );
        assert!(
            !out.contains("md5 pw") && !out.contains("scr:am") && !out.contains("plain pw"),
            "a password leaked:\n{out}"
        );
    }
    // The password from the environment instead of the URL.
    let (ok, out) = s.check(
        &s.url("scramplain", "127.0.0.1", "sslmode=disable"),
        &[("WALNATS_POSTGRES_PASSWORD", "plain pw")],
    );
    assert!(ok, "{out}");

    // Cleartext and MD5 to a server walnats has not verified: refused
    // before anything is sent, naming the cause and both fixes.
    for (url, method) in [
        (
            s.url("md5user:md5%20pw", "127.0.0.1", "sslmode=disable"),
            "MD5",
        ),
        (s.url("md5user:md5%20pw", "127.0.0.1", ""), "MD5"),
        (
            s.url("clearuser:clear", "127.0.0.1", "sslmode=require"),
            "in clear text",
        ),
    ] {
        let (ok, out) = s.check(&url, &[]);
        assert!(
            !ok && out.contains(method)
                && out.contains("password_encryption = scram-sha-256")
                && out.contains("sslmode=verify-full"),
            "{url}:\n{out}"
        );
        assert!(!out.contains("md5 pw") && !out.contains("clear@"), "{out}");
    }

    // Refusals, each naming the cause.
    let (ok, out) = s.check(
        &s.url("scramplain:wrong", "127.0.0.1", "sslmode=disable"),
        &[],
    );
    assert!(!ok && out.contains("refused user \"scramplain\""), "{out}");
    assert!(
        !out.contains("wrong"),
        "the wrong password was printed:\n{out}"
    );
    for params in [verify_full.clone(), format!("sslrootcert={ca}")] {
        let (ok, out) = s.check(
            &s.url("scramuser:scr%3Aam%2Fpw%40", "127.0.0.1", &params),
            &[],
        );
        assert!(
            !ok && out.contains("TLS"),
            "verify-full must check the host name ({params}):\n{out}"
        );
    }
    // verify-ca against the public CAs would accept anyone's certificate.
    let (ok, out) = s.check(
        &s.url(
            "scramuser:scr%3Aam%2Fpw%40",
            "127.0.0.1",
            "sslmode=verify-ca",
        ),
        &[],
    );
    assert!(!ok && out.contains("sslrootcert"), "{out}");
    let (ok, out) = s.check(
        &s.url("scramuser:scr%3Aam%2Fpw%40", "127.0.0.1", "sslmode=disable"),
        &[],
    );
    assert!(!ok && out.contains("pg_hba.conf"), "{out}");
    let (ok, out) = s.check(&s.url("norepl", "127.0.0.1", "sslmode=disable"), &[]);
    assert!(
        !ok && out.contains("ALTER ROLE norepl REPLICATION")
            || out.contains("ALTER ROLE \"norepl\" REPLICATION"),
        "{out}"
    );
    let (ok, out) = s.check(
        &format!("postgres://postgres@127.0.0.1:{}/nosuchdb", s.pg.port()),
        &[],
    );
    assert!(!ok && out.contains("nosuchdb"), "{out}");

    // And a real stream over SCRAM + verify-full.
    let url = s.url(
        "scramuser:scr%3Aam%2Fpw%40",
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    s.pg.execute("postgres", "CREATE TABLE t (id int PRIMARY KEY)")
        .await;
    let mut w = WalnatsProc::spawn(walnats_bin(), &["run"], &s.config(&url), &[]);
    let js = async_nats::jetstream::new(async_nats::connect(s.nats.url()).await.unwrap());
    crate::harness::wait_until(Duration::from_secs(30), "the slot to be active", || async {
        let c = s.pg.client("postgres").await;
        c.query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE active",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 1
    })
    .await;
    s.pg.execute("postgres", "INSERT INTO t VALUES (7)").await;
    crate::harness::wait_until(
        Duration::from_secs(30),
        "the insert to reach the stream",
        || async {
            crate::support::read_stream(&js, "CDC_POSTGRES")
                .await
                .iter()
                .any(|m| m.subject == "cdc.postgres.public.t.insert")
        },
    )
    .await;
    assert!(w.is_running(), "{}", w.output());
    w.sigterm();
}

#[tokio::test]
async fn run_exits_non_zero_with_the_fix_when_retrying_cannot_help() {
    let pg = crate::support::shared(PgVersion::V15);
    let nats = NatsServer::start().await;
    pg.execute("postgres", "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'plainuser') THEN CREATE ROLE plainuser LOGIN; END IF; END $$").await;
    let config = format!(
        "[postgres]\nurl = \"postgres://plainuser@127.0.0.1:{}/postgres?sslmode=disable\"\nslot = \"plain\"\n[nats]\nurl = \"{}\"\n[snapshot]\nmode = \"never\"\n[http]\nlisten = \"\"\n",
        pg.port(),
        nats.url()
    );
    let mut w = WalnatsProc::spawn(walnats_bin(), &["run"], &config, &[]);
    let status = w.wait_exit(Duration::from_secs(30));
    let out = w.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("CREATE PUBLICATION") && out.contains("superuser"),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
}

/// The password the impostors try to take.
const PASSWORD: &str = "s3cret-pw";

/// Which of walnats' connections meets the impostor: the SQL connection is
/// walnats' first; for the replication connection the fake server passes
/// the SQL connections on to a real server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Sql,
    Replication,
}

/// Runs `walnats run` against a fake server (default sslmode, or
/// `sslmode=require` with `tls`: a certificate nobody vouches for) until
/// the fake has met one connection and walnats has exited: what the fake
/// received, the exit code and walnats' output.
async fn run_against(attack: Attack, tls: bool, target: Target) -> (Attacked, Option<i32>, String) {
    let world = World::new(shared(PgVersion::V15)).await;
    let fake = FakePg::start(
        attack,
        tls.then(fake::self_signed_tls),
        (target == Target::Replication).then(|| world.pg.port()),
    )
    .await;
    let sslmode = if tls { "?sslmode=require" } else { "" };
    let config = format!(
        "[postgres]\nurl = \"postgres://postgres:{PASSWORD}@127.0.0.1:{}/{}{sslmode}\"\nslot = \"{}\"\n\
         [nats]\nurl = \"{}\"\nstream = \"CDC_TEST\"\nsubject_prefix = \"cdc.test\"\n\
         [snapshot]\nmode = \"never\"\n[http]\nlisten = \"\"\n",
        fake.port(),
        world.db,
        world.slot(),
        world.nats.url()
    );
    let mut w = WalnatsProc::spawn(walnats_bin(), &["run"], &config, &[]);
    let attacked = fake.first_attacked(Duration::from_secs(60)).await;
    assert_eq!(
        attacked.replication,
        target == Target::Replication,
        "the attack met the wrong connection:\n{}",
        w.output()
    );
    // What the fake received is checked before waiting for the exit, so
    // that a leak fails the test at once with what was sent.
    let what = format!("{attack:?} on the {target:?} connection (tls: {tls})");
    let tags = frontend_tags(&attacked.after_request);
    assert!(
        !tags.contains(&'p')
            && !attacked
                .after_request
                .windows(PASSWORD.len())
                .any(|w| w == PASSWORD.as_bytes()),
        "{what}: walnats answered the fake server with messages {tags:?}: {:?}\n{}",
        String::from_utf8_lossy(&attacked.after_request),
        w.output()
    );
    assert!(
        attacked.hung_up,
        "{what}: walnats kept the connection open, as to a server it believed:\n{}",
        w.output()
    );
    let status = w.wait_exit(Duration::from_secs(30));
    let out = w.output();
    assert!(
        !out.contains(PASSWORD),
        "{what}: the password was printed:\n{out}"
    );
    (attacked, status.code(), out)
}

/// The one line walnats exits with (`walnats: ...`), which must contain
/// each of `words`; no other line may repeat the fix.
fn assert_refusal_line(out: &str, words: &[&str]) {
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("walnats: ")).collect();
    assert_eq!(lines.len(), 1, "one refusal line expected:\n{out}");
    for w in words {
        assert!(
            lines[0].contains(w),
            "the refusal does not say {w:?}:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_server_asking_for_a_cleartext_password_gets_none() {
    for target in [Target::Sql, Target::Replication] {
        for tls in [false, true] {
            let (attacked, code, out) = run_against(Attack::Cleartext, tls, target).await;
            assert!(
                attacked.after_request.is_empty(),
                "{:?}",
                attacked.after_request
            );
            assert_eq!(code, Some(1), "{out}");
            assert_refusal_line(
                &out,
                &[
                    "in clear text",
                    "password_encryption = scram-sha-256",
                    "sslmode=verify-full",
                    "sslrootcert",
                ],
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_server_asking_for_an_md5_password_gets_none() {
    for target in [Target::Sql, Target::Replication] {
        for tls in [false, true] {
            let (attacked, code, out) = run_against(Attack::Md5, tls, target).await;
            assert!(
                attacked.after_request.is_empty(),
                "{:?}",
                attacked.after_request
            );
            assert_eq!(code, Some(1), "{out}");
            assert_refusal_line(
                &out,
                &[
                    "MD5",
                    "password_encryption = scram-sha-256",
                    "sslmode=verify-full",
                    "sslrootcert",
                ],
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_server_that_does_not_prove_it_knows_the_scram_password_is_refused() {
    for target in [Target::Sql, Target::Replication] {
        for attack in [
            Attack::ScramOkWithoutServerFinal,
            Attack::ScramWrongServerSignature,
        ] {
            let (attacked, code, out) = run_against(attack, false, target).await;
            assert_eq!(attacked.mechanism.as_deref(), Some("SCRAM-SHA-256"));
            // Not a word after the fake AuthenticationOk (no query).
            assert!(
                attacked.after_request.is_empty(),
                "{attack:?} on the {target:?} connection: walnats went on with messages {:?}\n{out}",
                frontend_tags(&attacked.after_request)
            );
            assert_eq!(
                code,
                Some(1),
                "{attack:?} on the {target:?} connection:\n{out}"
            );
            assert_refusal_line(&out, &["SCRAM", "right server"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_with_channel_binding_connects_over_tls_and_a_tls_relay_cannot_pass_it_on() {
    let s = setup().await;
    let ca = s.ca.display().to_string();
    // Directly, verified: the server offers SCRAM-SHA-256-PLUS over TLS.
    let (ok, out) = s.check(
        &s.url(
            "scramuser:scr%3Aam%2Fpw%40",
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        &[],
    );
    assert!(
        ok && out.contains("[ok]   replication connection accepted"),
        "{out}"
    );
    // Through a relay that terminates TLS with a certificate of its own,
    // which sslmode=require does not check: the SQL connection (trusted
    // from the relay's 127.0.0.2) passes, the SCRAM of the replication
    // connection is bound to the relay's certificate, and PostgreSQL
    // refuses it.
    let relay = TlsRelay::start(s.pg.port(), &std::fs::read_to_string(&s.ca).unwrap()).await;
    let url = format!(
        "postgres://relayuser:relay%20pw@127.0.0.1:{}/postgres?sslmode=require",
        relay.port()
    );
    let (ok, out) = s.check(&url, &[]);
    assert!(out.contains("[ok]   PostgreSQL reachable"), "{out}");
    let sent = relay.sent_by_clients();
    assert!(
        sent.windows(19).any(|w| w == b"SCRAM-SHA-256-PLUS\0"),
        "the replication connection did not use channel binding: {:?}\n{out}",
        String::from_utf8_lossy(&sent)
    );
    assert!(
        !ok && out.contains("[FAIL] replication connection") && out.contains("channel binding"),
        "a relay passed SCRAM on:\n{out}"
    );
    assert!(!out.contains("relay pw"), "{out}");
    // A role with SCRAM on both connections: the SQL connection binds too.
    let url = format!(
        "postgres://scramuser:scr%3Aam%2Fpw%40@127.0.0.1:{}/postgres?sslmode=require",
        relay.port()
    );
    let (ok, out) = s.check(&url, &[]);
    assert!(
        !ok && out.contains("[FAIL] PostgreSQL at") && out.contains("channel binding"),
        "a relay passed the SQL connection's SCRAM on:\n{out}"
    );
    assert!(!out.contains("scr:am"), "{out}");
}
