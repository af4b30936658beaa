//! End-to-end tests of `Config::from_toml`: file, environment and
//! validation together, as `walnats` reads them. Each section's own
//! branches are tested beside it.

use std::collections::BTreeSet;
use std::time::Duration;

use super::keys::known;
use super::*;

const EXAMPLE: &str = include_str!("../../config/walnats.example.toml");

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config> {
    Config::from_toml(
        text,
        "test.toml",
        env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
}

const MIN: &str = "[postgres]\nurl = \"postgres://u@h/app\"\n";

#[test]
fn defaults_follow_the_contract() {
    let c = load(MIN, &[]).unwrap();
    assert_eq!(c.postgres.slot, "walnats");
    assert_eq!(c.postgres.publication, "walnats");
    assert!(c.postgres.tables.is_empty());
    assert_eq!(c.nats.url.expose(), "nats://127.0.0.1:4222");
    assert_eq!(c.nats.replicas, 1);
    assert_eq!(c.nats.subject_prefix_for("app"), "cdc.app");
    assert_eq!(c.nats.stream_for("app"), "CDC_APP");
    assert_eq!(c.snapshot, SnapshotMode::Initial);
    assert_eq!(c.output.format, OutputFormat::Json);
    assert!(!c.output.tx_markers);
    assert_eq!(c.on_oversize, OversizePolicy::Fail);
    assert_eq!(c.object_store_bucket, "walnats_oversize");
    assert_eq!(c.postgres.heartbeat_interval, Some(Duration::from_secs(30)));
    assert_eq!(c.wal_retained_warn, Some(1 << 30));
    assert_eq!(c.http_listen, Some("127.0.0.1:9750".parse().unwrap()));
}

#[test]
fn env_overrides_file_and_keeps_types() {
    let c = load(
        MIN,
        &[
            ("WALNATS_POSTGRES_SLOT", "other"),
            ("WALNATS_NATS_PASSWORD", "1234"),
            ("WALNATS_NATS_USER", "bob"),
            ("WALNATS_NATS_REPLICAS", "3"),
            ("WALNATS_OUTPUT_TX_MARKERS", "true"),
            ("WALNATS_POSTGRES_TABLES", "public.orders, billing.*"),
            ("WALNATS_LIMITS_ON_OVERSIZE", "object_store"),
            ("WALNATS_LIMITS_OBJECT_STORE_BUCKET", "big_rows"),
            ("WALNATS_POSTGRES_HEARTBEAT_INTERVAL", "0"),
            ("WALNATS_LIMITS_WAL_RETAINED_WARN", "512MiB"),
            ("WALNATS_SNAPSHOT_PARALLELISM", "4"),
            ("WALNATS_SNAPSHOT_CHUNK_ROWS", "50"),
            ("WALNATS_SNAPSHOT_CHUNK_BYTES", "2MiB"),
            ("WALNATS_LOG", "debug"),
            ("WALNATS_PG15_BIN", "/x"),
        ],
    )
    .unwrap();
    assert_eq!(c.postgres.slot, "other");
    assert_eq!(c.nats.replicas, 3);
    assert!(c.output.tx_markers);
    assert_eq!(c.on_oversize, OversizePolicy::ObjectStore);
    assert_eq!(c.object_store_bucket, "big_rows");
    assert_eq!(c.postgres.heartbeat_interval, None);
    assert_eq!(c.wal_retained_warn, Some(512 << 20));
    assert_eq!(c.snapshot_reading.parallelism, 4);
    assert_eq!(c.snapshot_reading.chunk_rows, 50);
    assert_eq!(c.snapshot_reading.chunk_bytes, 2 << 20);
    assert_eq!(
        c.nats.auth,
        NatsAuth::UserPassword {
            user: "bob".into(),
            password: Secret::new("1234")
        }
    );
    assert_eq!(c.postgres.tables.len(), 2);
    assert_eq!(c.postgres.tables[1].table, None);
    assert!(c.env_ignored.is_empty(), "{:?}", c.env_ignored);
    let t = load(
        MIN,
        &[
            ("WALNATS_POSTGRES_SLOTT", "x"),
            ("WALNATS_NATS_SERVER", "/bin/x"),
        ],
    )
    .unwrap();
    assert_eq!(
        t.env_ignored,
        vec![
            "WALNATS_POSTGRES_SLOTT".to_owned(),
            "WALNATS_NATS_SERVER".to_owned()
        ]
    );
}

#[test]
fn mistakes_name_the_key() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("", &[], "postgres.url is missing"),
        ("[postgres]\nurl = \"mysql://x\"\n", &[], "postgres.url"),
        (
            "[postgres]\nurl = \"postgres://h/a\"\nslott = \"x\"\n",
            &[],
            "slott",
        ),
        (
            "[postgres]\nurl = \"postgres://h/a\"\nslot = 5\n",
            &[],
            "slot",
        ),
        (
            MIN,
            &[("WALNATS_NATS_REPLICAS", "three")],
            "WALNATS_NATS_REPLICAS",
        ),
        (
            MIN,
            &[("WALNATS_POSTGRES_SLOT", "Bad-Name")],
            "postgres.slot",
        ),
        (
            MIN,
            &[("WALNATS_NATS_SUBJECT_PREFIX", "a..b")],
            "nats.subject_prefix",
        ),
        (MIN, &[("WALNATS_NATS_STREAM", "a.b")], "nats.stream"),
        (
            MIN,
            &[("WALNATS_SNAPSHOT_MODE", "sometimes")],
            "snapshot.mode",
        ),
        (
            MIN,
            &[("WALNATS_LIMITS_ON_OVERSIZE", "drop")],
            "limits.on_oversize",
        ),
        (
            MIN,
            &[("WALNATS_LIMITS_OBJECT_STORE_BUCKET", "a.b")],
            "limits.object_store_bucket",
        ),
        (
            MIN,
            &[("WALNATS_POSTGRES_HEARTBEAT_INTERVAL", "often")],
            "postgres.heartbeat_interval",
        ),
        (
            MIN,
            &[("WALNATS_LIMITS_WAL_RETAINED_WARN", "1 gig")],
            "limits.wal_retained_warn",
        ),
        (MIN, &[("WALNATS_NATS_USER", "bob")], "nats.user"),
        (MIN, &[("WALNATS_NATS_URL", "http://x y")], "nats.url"),
        (MIN, &[("WALNATS_HTTP_LISTEN", "nowhere")], "http.listen"),
        (
            MIN,
            &[("WALNATS_POSTGRES_TABLES", "orders")],
            "postgres.tables",
        ),
        ("[postgres\n", &[], "test.toml"),
    ];
    for (text, env, want) in cases {
        let err = load(text, env).unwrap_err();
        assert_eq!(err.kind(), Kind::Config);
        assert!(
            err.to_string().contains(want),
            "{want:?} not in {:?}",
            err.to_string()
        );
    }
}

#[test]
fn the_example_config_loads_and_documents_every_key() {
    let c = load(EXAMPLE, &[]).unwrap();
    assert_eq!(c.postgres.heartbeat_interval, Some(Duration::from_secs(30)));
    for section in known().unwrap().sections() {
        let name = section.name;
        assert!(EXAMPLE.contains(&format!("[{name}]")), "[{name}]");
        for (key, _) in &section.keys {
            assert!(
                EXAMPLE.contains(&format!("{key} =")),
                "{name}.{key} is not in config/walnats.example.toml"
            );
        }
    }
}

/// Commented-out keys too: the example must not teach a key walnats
/// refuses, and must show every key there is.
#[test]
fn the_example_holds_every_key_and_no_other() {
    let keys = known().unwrap();
    let mut section = "";
    let mut in_example = BTreeSet::new();
    for line in EXAMPLE.lines() {
        let line = line.strip_prefix('#').unwrap_or(line).trim_start();
        // `[section]`, or `[[section]]` (commented out: none by default).
        if let Some(header) = line.strip_prefix('[') {
            section = header.trim_start_matches('[').split(']').next().unwrap();
            continue;
        }
        if let Some((key, _)) = line.split_once(" = ")
            && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            in_example.insert(format!("{section}.{key}"));
        }
    }
    let known: BTreeSet<String> = keys
        .sections()
        .iter()
        .flat_map(|s| s.keys.iter().map(|(k, _)| format!("{}.{k}", s.name)))
        .collect();
    assert_eq!(in_example, known);
}

#[test]
fn an_unknown_key_in_any_section_is_refused_by_name() {
    for section in known().unwrap().sections() {
        let name = section.name;
        let (header, key) = if section.many {
            (format!("[[{name}]]"), format!("{name}[0].no_such_key"))
        } else {
            (format!("[{name}]"), format!("{name}.no_such_key"))
        };
        let err = load(&format!("{header}\nno_such_key = 1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "test.toml line 2: unknown key {key}: see config/walnats.example.toml"
            )),
            "{err}"
        );
    }
    let err = load(
        "[postgress]
url = \"x\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("unknown section [postgress]: the sections are postgres, nats, snapshot, output, limits, http, outbox"),
        "{err}"
    );
}

#[test]
fn outbox_entries_are_read_in_file_order() {
    let text = format!(
        "{MIN}
[[outbox]]
table = '\"my.schema\".\"my.outbox\"'
id = \"event_id\"
aggregate_type = \"kind\"
aggregate_id = \"key\"
payload = \"body\"
headers = [\"type\", \"trace_id\"]

[[outbox]]
message_prefix = \"outbox\"
"
    );
    let c = load(&text, &[]).unwrap();
    assert_eq!(
        c.outbox,
        [
            OutboxConfig {
                source: OutboxSource::Table {
                    schema: "my.schema".into(),
                    table: "my.outbox".into()
                },
                id: "event_id".into(),
                aggregate_type: "kind".into(),
                aggregate_id: "key".into(),
                payload: "body".into(),
                headers: vec!["type".into(), "trace_id".into()],
            },
            OutboxConfig {
                source: OutboxSource::MessagePrefix("outbox".into()),
                id: "id".into(),
                aggregate_type: "aggregatetype".into(),
                aggregate_id: "aggregateid".into(),
                payload: "payload".into(),
                headers: Vec::new(),
            },
        ]
    );
    assert!(load(MIN, &[]).unwrap().outbox.is_empty());
}

/// The example's `[[outbox]]`, uncommented but for `message_prefix`, is
/// the defaults.
#[test]
fn the_example_outbox_shows_the_defaults() {
    let start = EXAMPLE.find("# [[outbox]]").unwrap();
    let entry: String = EXAMPLE[start..]
        .lines()
        .filter(|l| !l.contains("message_prefix ="))
        .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap()))
        .collect();
    let c = load(&format!("{MIN}{entry}"), &[]).unwrap();
    let d = load(&format!("{MIN}[[outbox]]\ntable = \"outbox\"\n"), &[]).unwrap();
    assert_eq!(c.outbox.len(), 1);
    assert_eq!(c.outbox, d.outbox);
}

#[test]
fn outbox_mistakes_in_the_file_name_the_entry_and_line() {
    let entry = "[[outbox]]\ntable = \"outbox\"\n";
    for (text, want) in [
        (
            format!("{MIN}{entry}{entry}tabel = \"x\"\n"),
            "test.toml line 7: unknown key outbox[1].tabel: see config/walnats.example.toml",
        ),
        (
            format!("{MIN}{entry}headers = \"x\"\n"),
            "test.toml line 5: outbox[0].headers must be a list of strings",
        ),
        (
            format!("{MIN}{entry}headers = [1]\n"),
            "test.toml line 5: outbox[0].headers must be a list of strings",
        ),
        (
            format!("{MIN}{entry}id = 7\n"),
            "test.toml line 5: outbox[0].id must be a string",
        ),
        (
            format!("{MIN}[outbox]\ntable = \"outbox\"\n"),
            "test.toml line 3: outbox must be written [[outbox]]",
        ),
        (
            format!("outbox = \"x\"\n{MIN}"),
            "test.toml line 1: outbox must be written [[outbox]]",
        ),
        (
            format!("outbox = [\"x\"]\n{MIN}"),
            "test.toml line 1: outbox must be written [[outbox]]",
        ),
        (
            format!("{MIN}{entry}{entry}"),
            "outbox[1].table is outbox[0].table",
        ),
    ] {
        let err = load(&text, &[]).unwrap_err();
        assert_eq!(err.kind(), Kind::Config);
        assert!(err.to_string().contains(want), "{want:?} not in {err}");
    }
}

#[test]
fn the_http_token_comes_from_the_file_the_key_or_the_environment() {
    assert!(load(MIN, &[]).unwrap().http_token.is_none());
    let c = load(MIN, &[("WALNATS_HTTP_TOKEN", "from-env")]).unwrap();
    assert_eq!(c.http_token, Some(Secret::new("from-env")));
    let c = load(&format!("{MIN}[http]\ntoken = \"from-key\"\n"), &[]).unwrap();
    assert_eq!(c.http_token, Some(Secret::new("from-key")));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "from-file\n").unwrap();
    let c = load(
        &format!(
            "{MIN}[http]\ntoken_file = {:?}\n",
            file.display().to_string()
        ),
        &[],
    )
    .unwrap();
    assert_eq!(c.http_token, Some(Secret::new("from-file")));
    for (env, want) in [
        (&[("WALNATS_HTTP_TOKEN", "")][..], "http.token"),
        (&[("WALNATS_HTTP_TOKEN", "has space")][..], "http.token"),
        (
            &[
                ("WALNATS_HTTP_TOKEN", "a"),
                ("WALNATS_HTTP_TOKEN_FILE", "/x"),
            ][..],
            "http.token",
        ),
    ] {
        let err = load(MIN, env).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
        assert!(!err.contains("has space"), "{err}");
    }
    assert!(!format!("{c:?}").contains("from-file"));
}

#[test]
fn credentials_leave_the_nats_url_for_connect_options() {
    let c = load(
        MIN,
        &[(
            "WALNATS_NATS_URL",
            "nats://bob:p%40ss@a:4222, nats://bob:p%40ss@b:4222,c:4222",
        )],
    )
    .unwrap();
    assert_eq!(c.nats.url.expose(), "nats://a:4222,nats://b:4222,c:4222");
    assert_eq!(
        c.nats.auth,
        NatsAuth::UserPassword {
            user: "bob".into(),
            password: Secret::new("p@ss")
        }
    );
    let c = load(MIN, &[("WALNATS_NATS_URL", "tls://t0k3n@a:4222")]).unwrap();
    assert_eq!(c.nats.url.expose(), "tls://a:4222");
    assert_eq!(c.nats.auth, NatsAuth::Token(Secret::new("t0k3n")));
    for env in [
        &[("WALNATS_NATS_URL", "nats://u:pw-one@a,nats://u:pw-two@b")][..],
        &[
            ("WALNATS_NATS_URL", "nats://u:pw-one@a"),
            ("WALNATS_NATS_TOKEN", "pw-two"),
        ][..],
    ] {
        let err = load(MIN, env).unwrap_err().to_string();
        assert!(err.contains("nats.url"), "{err}");
        assert!(!err.contains("pw-one") && !err.contains("pw-two"), "{err}");
    }
}

#[test]
fn secrets_never_print() {
    let c = load(
        "[postgres]\nurl = \"postgres://u:hunter2@h/app\"\n[nats]\ntoken = \"s3cr3t\"\n",
        &[],
    )
    .unwrap();
    let dump = format!("{c:?}");
    assert!(
        !dump.contains("hunter2") && !dump.contains("s3cr3t"),
        "{dump}"
    );
    assert_eq!(
        redact_url("postgres://u:hunter2@h/app?sslmode=require"),
        "postgres://u:***@h/app?sslmode=require"
    );
}

/// For the sections' own tests: `result` is a config error whose text
/// names `key` and says `fix`.
pub(super) fn assert_refused<T>(result: Result<T>, key: &str, fix: &str) {
    let Err(err) = result else {
        panic!("{key}: accepted, should be refused with {fix:?}");
    };
    assert_eq!(err.kind(), Kind::Config);
    let text = err.to_string();
    assert!(
        text.contains(key) && text.contains(fix),
        "{key:?} and {fix:?} not both in {text:?}"
    );
}
