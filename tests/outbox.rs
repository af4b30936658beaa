//! The transactional outbox (issue 19) from the outside, written to the
//! spec before the feature: a row inserted into an `[[outbox]]` table is
//! one message on `<subject_prefix>._outbox.<aggregate_type>` with the
//! payload as its body, in its transaction's place in the stream; deletes,
//! updates and truncates of the table publish nothing, its own row events
//! and `_schema` never appear; `pg_logical_emit_message` with the
//! configured prefix is an outbox event too; a table walnats cannot use
//! as one stops `run` at start; and kill -9 under an outbox load loses,
//! repeats and reorders no event.
//!
//! The service's tables belong to an unprivileged role that writes them;
//! walnats runs as a REPLICATION role that may not read them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::harness::{PgServer, PgVersion, WalnatsProc, free_port, wait_until};
use crate::support::{
    Msg, PREFIX, Rng, World, assert_exactly_once_in_order, lsn, shared, walnats_bin, with_outbox,
};

const ORDERS: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL)";

/// The spec's default column names, plus a `type` column for `headers`.
const OUTBOX: &str = "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text NOT NULL, aggregateid text NOT NULL, type text, payload jsonb)";

/// The `[[outbox]]` entry most tests use.
const OUTBOX_ENTRY: &str = "table = \"public.outbox\"\nheaders = [\"type\"]";

/// A test's world as a service runs it: the tables belong to `owner` (no
/// superuser, no REPLICATION), which writes them; walnats connects as
/// `walnats` (LOGIN REPLICATION, no SELECT on them) through a publication
/// made beforehand, as an operator would.
struct Service<'a> {
    world: World<'a>,
    owner: String,
    walnats: String,
}

impl<'a> Service<'a> {
    /// `ddl` runs as the owner.
    async fn new(version: PgVersion, ddl: &str) -> Service<'a> {
        let world = World::new(shared(version)).await;
        let owner = format!("svc_{}", world.db);
        let walnats = format!("w_{}", world.db);
        world
            .sql(&format!(
                "CREATE ROLE {owner} LOGIN;
                 CREATE ROLE {walnats} LOGIN REPLICATION;
                 GRANT CREATE ON SCHEMA public TO {owner};
                 SET ROLE {owner}; {ddl}; RESET ROLE;
                 CREATE PUBLICATION walnats FOR ALL TABLES;"
            ))
            .await;
        Service {
            world,
            owner,
            walnats,
        }
    }

    /// The world's config as walnats' role, with these `[[outbox]]` entries.
    fn config(&self, outbox: &[&str]) -> String {
        let config = self.world.config().replace(
            "postgres://postgres@",
            &format!("postgres://{}@", self.walnats),
        );
        with_outbox(&config, outbox)
    }

    fn spawn(&self, outbox: &[&str], env: &[(&str, &str)]) -> WalnatsProc {
        self.world.spawn_with(&self.config(outbox), env)
    }

    /// `sql` as the owner; a string with BEGIN/COMMIT is one transaction,
    /// one without is one implicit transaction.
    async fn write(&self, sql: &str) {
        self.world
            .sql(&format!("SET ROLE {}; {sql}", self.owner))
            .await;
    }
}

/// Waits until the stream holds a message for which `last` holds (the
/// test's final transaction: everything before it has been decoded and
/// published by then), and returns every message of the stream.
async fn read_through(
    world: &World<'_>,
    w: &mut WalnatsProc,
    last: impl Fn(&Msg) -> bool,
) -> Vec<Msg> {
    for _ in 0..600 {
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        let all = world.read_stream().await;
        if all.iter().any(&last) {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the test's last transaction never reached the stream; it holds {:?}\n{}",
        subjects(&world.read_stream().await),
        w.output()
    );
}

fn subjects(msgs: &[Msg]) -> Vec<&str> {
    msgs.iter().map(|m| m.subject.as_str()).collect()
}

fn changes(all: &[Msg]) -> Vec<&Msg> {
    all.iter().filter(|m| m.is_change()).collect()
}

fn event_id_is(id: &str) -> impl Fn(&Msg) -> bool + '_ {
    move |m| m.header("Cdc-Event-Id") == id
}

/// No row event and no `_schema` of `table` anywhere in the stream.
fn assert_no_row_events_of(all: &[Msg], table: &str) {
    let rows = format!("{PREFIX}.public.{table}.");
    let schema = format!("{PREFIX}._schema.public.{table}");
    let leaked: Vec<&str> = subjects(all)
        .into_iter()
        .filter(|s| s.starts_with(&rows) || *s == schema)
        .collect();
    assert!(
        leaked.is_empty(),
        "the outbox table's own events were published: {} messages, the first {:?}",
        leaked.len(),
        &leaked[..leaked.len().min(5)]
    );
}

/// The outbox's own text for one of its values, as PostgreSQL prints it.
async fn pg_text(world: &World<'_>, sql: &str) -> String {
    world
        .client()
        .await
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

async fn an_outbox_insert_is_one_event_on_its_aggregate_subject(version: PgVersion) {
    let s = Service::new(version, &format!("{ORDERS}; {OUTBOX}")).await;
    let mut w = s.spawn(&[OUTBOX_ENTRY], &[]);
    s.world.wait_streaming(&mut w).await;
    let created = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d";
    let shipped = "1b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d";
    let untyped = "2b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d";
    s.write(&format!(
        "BEGIN;
         INSERT INTO orders VALUES (42, 'new');
         INSERT INTO outbox VALUES ('{created}', 'order', '42', 'OrderCreated',
           '{{\"orderId\": 42, \"total\": \"19.90\", \"lines\": [1, 2]}}');
         COMMIT;"
    ))
    .await;
    // A header value cannot hold CR or LF; a NULL header column is no header.
    s.write(&format!(
        "INSERT INTO outbox VALUES ('{shipped}', 'order', '42', E'Order\\r\\nShipped', '{{}}')"
    ))
    .await;
    s.write(&format!(
        "BEGIN; INSERT INTO outbox VALUES ('{untyped}', 'order', '43', NULL, '[]');
         INSERT INTO orders VALUES (43, 'last'); COMMIT;"
    ))
    .await;
    let all = read_through(&s.world, &mut w, |m| {
        m.subject.ends_with(".orders.insert") && m.json()["after"]["id"] == 43
    })
    .await;
    assert_exactly_once_in_order(&all);
    assert_no_row_events_of(&all, "outbox");
    let changes = changes(&all);
    let p = PREFIX;
    let got: Vec<&str> = changes.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        got,
        [
            format!("{p}.public.orders.insert"),
            format!("{p}._outbox.order"),
            format!("{p}._outbox.order"),
            format!("{p}._outbox.order"),
            format!("{p}.public.orders.insert"),
        ]
    );
    assert!(
        all.iter()
            .any(|m| m.subject == format!("{p}._schema.public.orders")),
        "orders has no _schema message"
    );

    // The order and its event: one transaction, consecutive positions.
    let (order, ev) = (changes[0], changes[1]);
    assert_eq!(order.json()["after"], json!({"id": 42, "status": "new"}));
    let payload = pg_text(
        &s.world,
        &format!("SELECT payload::text FROM outbox WHERE id = '{created}'"),
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&ev.payload),
        payload,
        "the body is not the payload column's text"
    );
    assert_eq!(
        ev.json(),
        json!({"orderId": 42, "total": "19.90", "lines": [1, 2]})
    );
    assert_eq!(ev.header("Content-Type"), "application/json");
    assert_eq!(ev.header("Cdc-Op"), "outbox");
    assert_eq!(ev.header("Cdc-Event-Id"), created);
    assert_eq!(ev.header("Cdc-Aggregate-Id"), "42");
    assert_eq!(ev.header("type"), "OrderCreated");
    assert_eq!(ev.header("Cdc-Seq"), "1");
    let commit = order.header("Cdc-Commit-Lsn");
    assert_eq!(ev.header("Cdc-Commit-Lsn"), commit);
    assert_eq!(ev.header("Cdc-Xid"), order.header("Cdc-Xid"));
    assert!(!ev.header("Cdc-Xid").is_empty());
    assert_eq!(
        ev.header("Nats-Msg-Id"),
        format!("{}:{}:{commit}:1", s.world.db, s.world.slot())
    );
    let (order_lsn, ev_lsn) = (lsn(order.header("Cdc-Lsn")), lsn(ev.header("Cdc-Lsn")));
    assert!(
        order_lsn < ev_lsn && ev_lsn < lsn(commit),
        "Cdc-Lsn {} is not between the order's {} and the commit {commit}",
        ev.header("Cdc-Lsn"),
        order.header("Cdc-Lsn")
    );

    let shipped_ev = changes[2];
    assert_eq!(shipped_ev.header("Cdc-Event-Id"), shipped);
    assert_eq!(shipped_ev.header("type"), "Order%0D%0AShipped");
    assert_eq!(shipped_ev.header("Cdc-Seq"), "0");
    assert_eq!(shipped_ev.payload, b"{}");

    let untyped_ev = changes[3];
    assert_eq!(untyped_ev.header("Cdc-Event-Id"), untyped);
    assert_eq!(untyped_ev.header("Cdc-Aggregate-Id"), "43");
    assert!(
        !untyped_ev.headers.contains_key("type"),
        "a NULL header column gave a header: {:?}",
        untyped_ev.headers
    );
    assert_eq!(untyped_ev.payload, b"[]");
    // The order after it in the same transaction keeps counting.
    assert_eq!(changes[4].header("Cdc-Seq"), "1");
    assert_eq!(
        changes[4].header("Cdc-Commit-Lsn"),
        untyped_ev.header("Cdc-Commit-Lsn")
    );
    w.sigterm();
    assert!(
        w.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        w.output()
    );
}

#[tokio::test]
async fn an_outbox_insert_is_one_event_on_its_aggregate_subject_pg15() {
    an_outbox_insert_is_one_event_on_its_aggregate_subject(PgVersion::V15).await;
}

#[tokio::test]
async fn an_outbox_insert_is_one_event_on_its_aggregate_subject_pg18() {
    an_outbox_insert_is_one_event_on_its_aggregate_subject(PgVersion::V18).await;
}

/// One outbox table per payload type; `ob_bytea` also has its own column
/// names, `ob_varchar` a varchar aggregate type.
const PAYLOAD_TABLES: &str = "
    CREATE DOMAIN event_body AS jsonb;
    CREATE TABLE ob_json (id bigint PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text NOT NULL, payload json);
    CREATE TABLE ob_jsonb (id uuid PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text NOT NULL, payload jsonb);
    CREATE TABLE ob_domain (id uuid PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text NOT NULL, payload event_body);
    CREATE TABLE ob_text (id uuid PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text NOT NULL, payload text);
    CREATE TABLE ob_varchar (id uuid PRIMARY KEY, aggregatetype varchar(20) NOT NULL, aggregateid text NOT NULL, payload varchar(200));
    CREATE TABLE ob_bytea (event_id uuid PRIMARY KEY, kind text NOT NULL, key text NOT NULL, data bytea)";

const JSON_CT: &str = "application/json";
const TEXT_CT: &str = "text/plain; charset=utf-8";
const BYTES_CT: &str = "application/octet-stream";

async fn payloads_become_bodies_with_the_content_type_of_their_column(version: PgVersion) {
    let s = Service::new(version, PAYLOAD_TABLES).await;
    // A database default that would change how bytea reaches walnats.
    s.world
        .sql(&format!(
            "ALTER DATABASE {} SET bytea_output = 'escape'",
            s.world.db
        ))
        .await;
    let mut w = s.spawn(
        &[
            "table = \"public.ob_json\"",
            "table = \"public.ob_jsonb\"",
            "table = \"public.ob_domain\"",
            "table = \"ob_text\"",
            "table = \"public.ob_varchar\"",
            "table = \"public.ob_bytea\"\nid = \"event_id\"\naggregate_type = \"kind\"\n\
             aggregate_id = \"key\"\npayload = \"data\"",
        ],
        &[],
    );
    s.world.wait_streaming(&mut w).await;
    let json_text = r#"{"b": 1,  "a": [1, 2.50], "a": "dup"}"#;
    let jsonb_in = r#"{"b": 1, "a": [1, 2.50]}"#;
    let text = "héllo\n\"wörld\"\\";
    let uuid = |n: u32| format!("00000000-0000-4000-8000-{n:012}");
    // Values in one transaction, NULLs in the next.
    s.write(&format!(
        "BEGIN;
         INSERT INTO ob_json VALUES (101, 'json', 'a', '{json_text}');
         INSERT INTO ob_jsonb VALUES ('{}', 'jsonb', 'a', '{jsonb_in}');
         INSERT INTO ob_domain VALUES ('{}', 'domain', 'a', '{jsonb_in}');
         INSERT INTO ob_text VALUES ('{}', 'text', 'a', E'h\\u00e9llo\\n\"w\\u00f6rld\"\\\\');
         INSERT INTO ob_varchar VALUES ('{}', 'varchar', 'a', 'ab  ');
         INSERT INTO ob_bytea VALUES ('{}', 'bytea', 'a', '\\x00ff10'::bytea);
         COMMIT;",
        uuid(1),
        uuid(2),
        uuid(3),
        uuid(4),
        uuid(5)
    ))
    .await;
    s.write(&format!(
        "BEGIN;
         INSERT INTO ob_json VALUES (102, 'json', 'b', NULL);
         INSERT INTO ob_jsonb VALUES ('{}', 'jsonb', 'b', NULL);
         INSERT INTO ob_domain VALUES ('{}', 'domain', 'b', NULL);
         INSERT INTO ob_text VALUES ('{}', 'text', 'b', NULL);
         INSERT INTO ob_varchar VALUES ('{}', 'varchar', 'b', NULL);
         INSERT INTO ob_bytea VALUES ('{}', 'bytea', 'b', NULL);
         COMMIT;",
        uuid(11),
        uuid(12),
        uuid(13),
        uuid(14),
        uuid(15)
    ))
    .await;
    let last = uuid(15);
    let all = read_through(&s.world, &mut w, event_id_is(&last)).await;
    assert_exactly_once_in_order(&all);
    for t in [
        "ob_json",
        "ob_jsonb",
        "ob_domain",
        "ob_text",
        "ob_varchar",
        "ob_bytea",
    ] {
        assert_no_row_events_of(&all, t);
    }
    let changes = changes(&all);
    assert_eq!(changes.len(), 12, "{:?}", subjects(&all));
    let jsonb_out = pg_text(&s.world, &format!("SELECT '{jsonb_in}'::jsonb::text")).await;
    // (aggregate type, event id, body, Content-Type)
    let want: Vec<(&str, String, Vec<u8>, &str)> = vec![
        ("json", "101".into(), json_text.into(), JSON_CT),
        ("jsonb", uuid(1), jsonb_out.clone().into_bytes(), JSON_CT),
        ("domain", uuid(2), jsonb_out.into_bytes(), JSON_CT),
        ("text", uuid(3), text.into(), TEXT_CT),
        ("varchar", uuid(4), b"ab  ".to_vec(), TEXT_CT),
        ("bytea", uuid(5), vec![0x00, 0xff, 0x10], BYTES_CT),
        ("json", "102".into(), Vec::new(), JSON_CT),
        ("jsonb", uuid(11), Vec::new(), JSON_CT),
        ("domain", uuid(12), Vec::new(), JSON_CT),
        ("text", uuid(13), Vec::new(), TEXT_CT),
        ("varchar", uuid(14), Vec::new(), TEXT_CT),
        ("bytea", uuid(15), Vec::new(), BYTES_CT),
    ];
    for (m, (kind, id, body, ct)) in changes.iter().zip(&want) {
        assert_eq!(m.subject, format!("{PREFIX}._outbox.{kind}"));
        assert_eq!(m.header("Cdc-Event-Id"), id, "{kind}");
        let aggregate = if body.is_empty() { "b" } else { "a" };
        assert_eq!(m.header("Cdc-Aggregate-Id"), aggregate, "{kind}");
        assert_eq!(m.header("Content-Type"), *ct, "{kind} {id}");
        assert_eq!(
            m.payload,
            *body,
            "{kind} {id}: body {:?}, want {:?}",
            String::from_utf8_lossy(&m.payload),
            String::from_utf8_lossy(body)
        );
    }
    w.sigterm();
}

#[tokio::test]
async fn payloads_become_bodies_with_the_content_type_of_their_column_pg15() {
    payloads_become_bodies_with_the_content_type_of_their_column(PgVersion::V15).await;
}

#[tokio::test]
async fn payloads_become_bodies_with_the_content_type_of_their_column_pg18() {
    payloads_become_bodies_with_the_content_type_of_their_column(PgVersion::V18).await;
}

/// The sum of a counter over all its label sets.
fn counter_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Deletes (also of a row inserted in the same transaction), updates and
/// truncates of an outbox table publish nothing and take no position: the
/// changes around them keep their `Cdc-Seq` without a gap. An update is a
/// warning and counts as ignored; walnats keeps streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_updates_and_truncates_of_outbox_rows_publish_nothing() {
    let s = Service::new(PgVersion::V15, &format!("{ORDERS}; {OUTBOX}")).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut w = s.spawn(&[OUTBOX_ENTRY], &[("WALNATS_HTTP_LISTEN", &listen)]);
    s.world.wait_streaming(&mut w).await;
    let (a, b, c) = (
        "a0000000-0000-4000-8000-000000000000",
        "b0000000-0000-4000-8000-000000000000",
        "c0000000-0000-4000-8000-000000000000",
    );
    for sql in [
        format!(
            "BEGIN; INSERT INTO outbox VALUES ('{a}', 'order', '1', 'T', '{{\"n\": 1}}');
             DELETE FROM outbox WHERE id = '{a}'; COMMIT;"
        ),
        format!("INSERT INTO outbox VALUES ('{b}', 'order', '2', 'T', '{{\"n\": 2}}')"),
        format!("UPDATE outbox SET payload = '{{\"n\": 20}}' WHERE id = '{b}'"),
        format!(
            "BEGIN; INSERT INTO orders VALUES (1, 'x');
             UPDATE outbox SET type = 'U' WHERE id = '{b}';
             DELETE FROM outbox WHERE id = '{b}';
             INSERT INTO orders VALUES (2, 'y'); COMMIT;"
        ),
        "DELETE FROM outbox".to_owned(),
        "TRUNCATE outbox".to_owned(),
        "TRUNCATE outbox, orders".to_owned(),
        format!("INSERT INTO outbox VALUES ('{c}', 'order', '3', 'T', '{{\"n\": 3}}')"),
    ] {
        s.write(&sql).await;
    }
    let all = read_through(&s.world, &mut w, event_id_is(c)).await;
    assert_exactly_once_in_order(&all);
    assert_no_row_events_of(&all, "outbox");
    let changes = changes(&all);
    let got: Vec<(&str, &str, &str)> = changes
        .iter()
        .map(|m| {
            (
                m.subject.as_str(),
                m.header("Cdc-Event-Id"),
                m.header("Cdc-Seq"),
            )
        })
        .collect();
    let p = PREFIX;
    let (ob, ins, tr) = (
        format!("{p}._outbox.order"),
        format!("{p}.public.orders.insert"),
        format!("{p}.public.orders.truncate"),
    );
    assert_eq!(
        got,
        [
            (ob.as_str(), a, "0"),
            (ob.as_str(), b, "0"),
            (ins.as_str(), "", "0"),
            (ins.as_str(), "", "1"),
            (tr.as_str(), "", "0"),
            (ob.as_str(), c, "0"),
        ]
    );
    assert_eq!(changes[0].json(), json!({"n": 1}));
    assert!(w.is_running(), "walnats stopped:\n{}", w.output());
    let log = std::fs::read_to_string(&s.world.log).unwrap_or_default();
    assert!(
        log.matches("an update is not one").count() >= 2,
        "no warning per outbox update:\n{}",
        w.output()
    );
    wait_until(
        Duration::from_secs(10),
        "walnats_messages_ignored_total to count the 2 updates",
        || async {
            let body = crate::http::get(port, "/metrics")
                .await
                .map(|r| r.1)
                .unwrap_or_default();
            counter_sum(&body, "walnats_messages_ignored_total") >= 2.0
        },
    )
    .await;
    w.sigterm();
}

/// An aggregate type is one subject token, escaped as table names are.
#[tokio::test]
async fn aggregate_types_are_escaped_into_one_subject_token() {
    let s = Service::new(PgVersion::V18, OUTBOX).await;
    let mut w = s.spawn(&[OUTBOX_ENTRY], &[]);
    s.world.wait_streaming(&mut w).await;
    let kinds = [
        ("order.v2", "order%2Ev2"),
        ("Bestellung ü", "Bestellung%20%C3%BC"),
        ("a*b>c", "a%2Ab%3Ec"),
        ("plain_Type-1", "plain_Type-1"),
    ];
    let values: Vec<String> = kinds
        .iter()
        .map(|(k, _)| format!("('{k}', '1', '{{}}')"))
        .collect();
    s.write(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, payload) VALUES {}",
        values.join(", ")
    ))
    .await;
    let all = read_through(&s.world, &mut w, |m| m.subject.ends_with("plain_Type-1")).await;
    let got: Vec<String> = changes(&all).iter().map(|m| m.subject.clone()).collect();
    let want: Vec<String> = kinds
        .iter()
        .map(|(_, token)| format!("{PREFIX}._outbox.{token}"))
        .collect();
    assert_eq!(got, want);
    w.sigterm();
}

/// `message_prefix = "outbox"`: `pg_logical_emit_message` with prefix
/// `outbox.<type>`, transactional or not, is an outbox event on
/// `_outbox.<type>` and never also a `_message`, whatever
/// `output.message_prefixes` says. `outbox` alone and `outboxes.x` are
/// ordinary messages.
async fn message_prefix_outbox_events_take_the_outbox_subject(
    version: PgVersion,
    message_prefixes: &str,
) {
    let world = World::new(shared(version)).await;
    world.sql(ORDERS).await;
    let config = with_outbox(&world.config(), &["message_prefix = \"outbox\""]);
    let mut w = world.spawn_with(
        &config,
        &[("WALNATS_OUTPUT_MESSAGE_PREFIXES", message_prefixes)],
    );
    world.wait_streaming(&mut w).await;
    for sql in [
        "BEGIN; INSERT INTO orders VALUES (1, 'x');
         SELECT pg_logical_emit_message(true, 'outbox.invoice', '{\"n\":1}'); COMMIT;",
        "SELECT pg_logical_emit_message(false, 'outbox.invoice', '{\"n\":2}')",
        "SELECT pg_logical_emit_message(true, 'outbox.order.v2', 'x')",
        "SELECT pg_logical_emit_message(true, 'outbox', 'not an event')",
        "SELECT pg_logical_emit_message(true, 'outboxes.x', 'not an event')",
        "SELECT pg_logical_emit_message(true, 'plain', 'p')",
        "INSERT INTO orders VALUES (2, 'last')",
    ] {
        world.sql(sql).await;
    }
    let all = read_through(&world, &mut w, |m| {
        m.subject.ends_with(".orders.insert") && m.json()["after"]["id"] == 2
    })
    .await;
    assert_exactly_once_in_order(&all);
    let p = PREFIX;
    let mut want = vec![
        format!("{p}.public.orders.insert"),
        format!("{p}._outbox.invoice"),
        format!("{p}._outbox.invoice"),
        format!("{p}._outbox.order%2Ev2"),
    ];
    if message_prefixes == "*" {
        want.push(format!("{p}._message.outbox"));
        want.push(format!("{p}._message.outboxes%2Ex"));
    }
    want.push(format!("{p}._message.plain"));
    want.push(format!("{p}.public.orders.insert"));
    let changes = changes(&all);
    let got: Vec<&str> = changes.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(got, want);

    let (order, tx_ev, plain_ev) = (changes[0], changes[1], changes[2]);
    assert_eq!(tx_ev.payload, br#"{"n":1}"#);
    assert_eq!(plain_ev.payload, br#"{"n":2}"#);
    assert_eq!(changes[3].payload, b"x");
    for ev in [tx_ev, plain_ev, changes[3]] {
        assert_eq!(ev.header("Content-Type"), BYTES_CT);
        assert_eq!(ev.header("Cdc-Op"), "outbox");
        for absent in ["Cdc-Event-Id", "Cdc-Aggregate-Id"] {
            assert!(
                !ev.headers.contains_key(absent),
                "{absent} on a message-prefix event"
            );
        }
    }
    // Transactional: in its transaction, after the order.
    assert_eq!(tx_ev.header("Cdc-Seq"), "1");
    assert_eq!(
        tx_ev.header("Cdc-Commit-Lsn"),
        order.header("Cdc-Commit-Lsn")
    );
    assert_eq!(
        tx_ev.header("Nats-Msg-Id"),
        format!(
            "{}:{}:{}:1",
            world.db,
            world.slot(),
            order.header("Cdc-Commit-Lsn")
        )
    );
    w.sigterm();
}

/// No `output.message_prefixes` entry is needed for the outbox prefix.
#[tokio::test]
async fn message_prefix_outbox_events_take_the_outbox_subject_pg15() {
    message_prefix_outbox_events_take_the_outbox_subject(PgVersion::V15, "plain").await;
}

/// `"*"` (every prefix) still does not publish an outbox event twice.
#[tokio::test]
async fn message_prefix_outbox_events_are_never_also_messages_pg18() {
    message_prefix_outbox_events_take_the_outbox_subject(PgVersion::V18, "*").await;
}

/// Runs walnats `args` with a log of its own; its exit code and output.
fn run_to_exit(config: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut env = env.to_vec();
    env.push(("NO_COLOR", "1"));
    let mut w = WalnatsProc::spawn(walnats_bin(), args, config, &env);
    let status = w.wait_exit(Duration::from_secs(30));
    (status.code(), w.output())
}

/// The line of `out` that holds every one of `words`, if any.
fn line_with<'o>(out: &'o str, words: &[&str]) -> Option<&'o str> {
    out.lines().find(|l| words.iter().all(|w| l.contains(w)))
}

/// A table walnats cannot use as an outbox (missing, not published, a
/// column missing, a payload or aggregate type it cannot take) stops
/// `walnats run` at start with one line naming it; a contradictory entry
/// stops it before it connects (exit 2, the key named). Nothing is
/// published.
#[tokio::test]
async fn an_unusable_outbox_stops_run_at_start_with_one_line_naming_it() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql(
            "CREATE TABLE orders (id int PRIMARY KEY);
             CREATE TABLE ob_noaggid (id uuid PRIMARY KEY, aggregatetype text NOT NULL, payload jsonb);
             CREATE TABLE ob_badbody (id uuid PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text, payload int);
             CREATE TABLE ob_inttype (id uuid PRIMARY KEY, aggregatetype int NOT NULL, aggregateid text, payload jsonb);
             CREATE TABLE ob_noheader (id uuid PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text, payload jsonb);
             CREATE TABLE ob_unpublished (id uuid PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text, payload jsonb);
             CREATE PUBLICATION p_some FOR TABLE orders, ob_noaggid, ob_badbody, ob_inttype, ob_noheader;",
        )
        .await;
    let env = [("WALNATS_POSTGRES_PUBLICATION", "p_some")];
    let checked: &[(&str, &[&str])] = &[
        (
            "table = \"public.ob_noaggid\"",
            &["ob_noaggid", "aggregateid"],
        ),
        ("table = \"public.ob_badbody\"", &["ob_badbody", "payload"]),
        (
            "table = \"public.ob_inttype\"",
            &["ob_inttype", "aggregatetype"],
        ),
        (
            "table = \"public.ob_noheader\"\nheaders = [\"trace_id\"]",
            &["ob_noheader", "trace_id"],
        ),
        (
            "table = \"public.ob_unpublished\"",
            &["ob_unpublished", "publication"],
        ),
        ("table = \"public.ob_missing\"", &["ob_missing"]),
    ];
    for (entry, words) in checked {
        let config = with_outbox(&world.config(), &[entry]);
        let (code, out) = run_to_exit(&config, &["run"], &env);
        assert!(
            code.is_some_and(|c| c != 0),
            "{entry:?}: exit {code:?}, not a refusal:\n{out}"
        );
        assert!(
            line_with(&out, words).is_some(),
            "{entry:?}: no line names {words:?}:\n{out}"
        );
        assert!(!out.contains("panicked"), "{out}");
    }
    // `walnats check` reports it too, and fails.
    let config = with_outbox(&world.config(), &[checked[1].0]);
    let (code, out) = run_to_exit(&config, &["check"], &env);
    assert!(code.is_some_and(|c| c != 0), "check passed:\n{out}");
    assert!(
        line_with(&out, &["ob_badbody", "payload"]).is_some(),
        "{out}"
    );

    let contradictory: &[(&str, &str)] = &[
        (
            "table = \"public.outbox\"\nmessage_prefix = \"outbox\"",
            "outbox[0]",
        ),
        (
            "table = \"public.outbox\"\nheaders = [\"Cdc-Type\"]",
            "outbox[0].headers",
        ),
        ("message_prefix = \"walnats.x\"", "outbox[0].message_prefix"),
    ];
    for (entry, key) in contradictory {
        let config = with_outbox(&world.config(), &[entry]);
        let (code, out) = run_to_exit(&config, &["run"], &[]);
        assert_eq!(code, Some(2), "{entry:?}:\n{out}");
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| !l.starts_with("=====") && !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "{entry:?}: not one line:\n{out}");
        assert!(lines[0].contains(key), "{key:?} not in {:?}", lines[0]);
    }
    let all = world.read_stream().await;
    assert!(all.is_empty(), "published: {:?}", subjects(&all));
}

/// An outbox row whose aggregate type is NULL or empty has no subject:
/// walnats stops with one line naming the table and the fix, and stops
/// again at the same row after a restart (had it confirmed the slot or its
/// checkpoint past the row, the restart would not see it); nothing of it
/// is published.
async fn a_row_without_an_aggregate_type_stops_walnats_and_is_never_skipped(
    version: PgVersion,
    bad: &str,
) {
    let nullable = "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text,
        aggregateid text NOT NULL, type text, payload jsonb)";
    let s = Service::new(version, nullable).await;
    let mut w = s.spawn(&[OUTBOX_ENTRY], &[]);
    s.world.wait_streaming(&mut w).await;
    let good = "a0000000-0000-4000-8000-000000000000";
    s.write(&format!(
        "INSERT INTO outbox VALUES ('{good}', 'order', '1', 'T', '{{}}')"
    ))
    .await;
    read_through(&s.world, &mut w, event_id_is(good)).await;
    s.write(&format!(
        "INSERT INTO outbox VALUES ('b0000000-0000-4000-8000-000000000000', {bad}, '2', 'T', '{{}}')"
    ))
    .await;
    // Lines naming the table and the fix, in the log of every run so far.
    let stops = || {
        std::fs::read_to_string(&s.world.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("outbox") && l.to_lowercase().contains("not null"))
            .count()
    };
    for run in 1..=2 {
        let status = w.wait_exit(Duration::from_secs(30));
        let out = w.output();
        assert!(!status.success(), "run {run}: exit 0:\n{out}");
        assert!(
            stops() >= run,
            "run {run}: no line names the table and the fix:\n{out}"
        );
        if run == 1 {
            w = s.spawn(&[OUTBOX_ENTRY], &[]);
        }
    }
    let all = s.world.read_stream().await;
    let got: Vec<&str> = changes(&all)
        .iter()
        .map(|m| m.header("Cdc-Event-Id"))
        .collect();
    assert_eq!(got, [good], "{:?}", subjects(&all));
}

#[tokio::test]
async fn a_row_with_an_empty_aggregate_type_stops_walnats_and_is_never_skipped_pg15() {
    a_row_without_an_aggregate_type_stops_walnats_and_is_never_skipped(PgVersion::V15, "''").await;
}

#[tokio::test]
async fn a_row_with_a_null_aggregate_type_stops_walnats_and_is_never_skipped_pg18() {
    a_row_without_an_aggregate_type_stops_walnats_and_is_never_skipped(PgVersion::V18, "NULL")
        .await;
}

/// Events are not state: the initial snapshot reads `orders`, not the
/// outbox rows that were there before walnats.
#[tokio::test]
async fn the_initial_snapshot_does_not_read_outbox_tables() {
    let s = Service::new(PgVersion::V15, &format!("{ORDERS}; {OUTBOX}")).await;
    s.write(&format!(
        "INSERT INTO orders VALUES (1, 'a'), (2, 'b');
         INSERT INTO outbox (aggregatetype, aggregateid, payload) VALUES ('order', '1', '{{}}'), ('order', '2', '{{}}');
         GRANT SELECT ON orders, outbox TO {}",
        s.walnats
    ))
    .await;
    let config = s
        .config(&[OUTBOX_ENTRY])
        .replace("mode = \"never\"", "mode = \"initial\"");
    let mut w = s.world.spawn_with(&config, &[]);
    s.world.wait_streaming(&mut w).await;
    let last = "c0000000-0000-4000-8000-000000000000";
    s.write(&format!(
        "INSERT INTO outbox VALUES ('{last}', 'order', '3', NULL, '{{}}')"
    ))
    .await;
    let all = read_through(&s.world, &mut w, event_id_is(last)).await;
    assert_no_row_events_of(&all, "outbox");
    let got: Vec<(&str, &str)> = changes(&all)
        .iter()
        .map(|m| (m.subject.as_str(), m.header("Cdc-Event-Id")))
        .collect();
    let read = format!("{PREFIX}.public.orders.read");
    let ob = format!("{PREFIX}._outbox.order");
    assert_eq!(
        got,
        [
            (read.as_str(), ""),
            (read.as_str(), ""),
            (ob.as_str(), last)
        ]
    );
    w.sigterm();
}

const AGGREGATE_TYPES: [&str; 3] = ["order", "invoice", "customer"];
const AGGREGATE_IDS: usize = 4;

/// Inserts `total` outbox rows as the owner in transactions of 1 to 5
/// rows, spread over 12 aggregates; each payload carries its aggregate's
/// running count `n` (1, 2, ...). Counts the rows written in `written`.
fn start_event_writer(
    pg: &'static PgServer,
    db: String,
    owner: String,
    total: usize,
    written: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = pg.client(&db).await;
        client
            .batch_execute(&format!("SET ROLE {owner}"))
            .await
            .unwrap();
        let mut counts: BTreeMap<usize, u64> = BTreeMap::new();
        let mut done = 0;
        let mut size = 0;
        while done < total {
            size = size % 5 + 1;
            let rows: Vec<String> = (done..(done + size).min(total))
                .map(|i| {
                    let aggregate = (i * 7) % (AGGREGATE_TYPES.len() * AGGREGATE_IDS);
                    let n = counts.entry(aggregate).or_default();
                    *n += 1;
                    let kind = AGGREGATE_TYPES[aggregate % AGGREGATE_TYPES.len()];
                    let id = aggregate / AGGREGATE_TYPES.len();
                    format!("('{kind}', '{id}', '{{\"n\": {n}}}')")
                })
                .collect();
            client
                .batch_execute(&format!(
                    "INSERT INTO outbox (aggregatetype, aggregateid, payload) VALUES {}",
                    rows.join(", ")
                ))
                .await
                .unwrap();
            done += rows.len();
            written.store(done, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// Guarantee 1 for outbox events: kill -9 of walnats three times while a
/// service writes 3,000 events; afterwards every event id of the table is
/// on `_outbox.>` exactly once, nothing else is, and each aggregate's
/// events arrive in the order they were inserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_an_outbox_load_loses_repeats_and_reorders_no_event() {
    const TOTAL: usize = 3_000;
    let s = Service::new(PgVersion::V15, OUTBOX).await;
    let mut rng = Rng::from_env();
    let mut w = s.spawn(&[OUTBOX_ENTRY], &[]);
    s.world.wait_streaming(&mut w).await;
    let written = Arc::new(AtomicUsize::new(0));
    let writer = start_event_writer(
        s.world.pg,
        s.world.db.clone(),
        s.owner.clone(),
        TOTAL,
        Arc::clone(&written),
    );
    for round in 0..3 {
        let wait = if round == 0 {
            rng.range(100, 400)
        } else {
            rng.range(400, 1500)
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        w.kill9();
        w = s.spawn(&[OUTBOX_ENTRY], &[]);
    }
    // At 5 ms or more per transaction the writer outlasts the kills.
    assert!(
        !writer.is_finished(),
        "the writer finished before the last kill ({} rows): the kills hit no load",
        written.load(Ordering::Relaxed)
    );
    writer.await.unwrap();
    s.world.wait_changes(TOTAL, &w).await;
    // A little longer: a duplicate would arrive now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = s.world.read_stream().await;
    assert_exactly_once_in_order(&all);
    assert_no_row_events_of(&all, "outbox");
    let events = changes(&all);
    let stray: Vec<&str> = events
        .iter()
        .map(|m| m.subject.as_str())
        .filter(|s| !s.starts_with(&format!("{PREFIX}._outbox.")))
        .collect();
    assert!(stray.is_empty(), "not outbox events: {stray:?}");

    let client = s.world.client().await;
    let ids: HashSet<String> = client
        .query("SELECT id::text FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), TOTAL);
    let mut streamed = HashSet::new();
    for m in &events {
        let id = m.header("Cdc-Event-Id");
        assert!(streamed.insert(id.to_owned()), "event {id} twice");
    }
    let missing = ids.iter().filter(|id| !streamed.contains(*id)).count();
    let unknown = streamed.iter().filter(|id| !ids.contains(*id)).count();
    assert_eq!(
        (missing, unknown),
        (0, 0),
        "{missing} events of the table never arrived, {unknown} arrived that the table lacks"
    );
    // Per aggregate (subject and Cdc-Aggregate-Id), n runs 1, 2, 3...
    let mut next: BTreeMap<(String, String), u64> = BTreeMap::new();
    for m in &events {
        let key = (m.subject.clone(), m.header("Cdc-Aggregate-Id").to_owned());
        let n = m.json()["n"].as_u64().unwrap();
        let want = next.entry(key.clone()).or_insert(1);
        assert_eq!(n, *want, "{key:?}: event {n} arrived where {want} belongs");
        *want += 1;
    }
    assert_eq!(next.len(), AGGREGATE_TYPES.len() * AGGREGATE_IDS);
    w.sigterm();
}

// ---------------------------------------------------------------------------
// From the review of the outbox.

/// `[[outbox]]` with no header columns, and with `traceparent`.
const HEADERLESS: &str = "table = \"public.outbox\"";
const TRACED: &str = "table = \"public.outbox\"\nheaders = [\"traceparent\"]";

fn traced_event_id(n: u32) -> String {
    format!("e0000000-0000-4000-8000-{n:012}")
}

fn traceparent(n: u32) -> String {
    format!("00-4bf92f3577b34da6a3ce929d0e0e{n:04}-00f067aa0ba902b7-01")
}

/// Order `n` and its event, in one transaction (the usual pattern); the
/// event's `traceparent` set when `traced` (the column exists then).
fn order_and_event(n: u32, traced: bool) -> String {
    let (cols, vals) = if traced {
        (", traceparent", format!(", '{}'", traceparent(n)))
    } else {
        ("", String::new())
    };
    format!(
        "BEGIN; INSERT INTO orders VALUES ({n}, 'new');
         INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload{cols})
           VALUES ('{}', 'order', '{n}', 'OrderCreated', '{{\"n\": {n}}}'{vals});
         COMMIT;",
        traced_event_id(n)
    )
}

/// Rows in the transaction that a kill -9 interrupts.
const BULK: i64 = 5_000;

/// Waits until the stream's last sequence reaches `at_least`, polling
/// often (to catch walnats inside a transaction).
async fn wait_last_seq(world: &World<'_>, w: &mut WalnatsProc, at_least: u64) {
    let js = world.js().await;
    for _ in 0..3000 {
        let last = match js.get_stream(crate::support::STREAM).await {
            Ok(mut s) => s.info().await.unwrap().state.last_sequence,
            Err(_) => 0,
        };
        if last >= at_least {
            return;
        }
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the stream never reached sequence {at_least}:\n{}",
        w.output()
    );
}

/// Events are pending in the slot (written while walnats was down, or the
/// rest of a transaction a kill -9 interrupted) when the outbox gains a
/// header column and walnats restarts naming it: the replay reads rows
/// whose relation lacks the column. Every event once, in order; those
/// written before the column without the header, those after with it;
/// walnats keeps running.
async fn a_header_column_added_while_events_are_pending(kill_inside_a_transaction: bool) {
    let s = Service::new(PgVersion::V15, &format!("{ORDERS}; {OUTBOX}")).await;
    // One acknowledgement per message: slow enough to stop inside a transaction.
    let slow: &[(&str, &str)] = if kill_inside_a_transaction {
        &[("WALNATS_NATS_FAST_INGEST", "off")]
    } else {
        &[]
    };
    let mut w = s.spawn(&[HEADERLESS], slow);
    s.world.wait_streaming(&mut w).await;
    s.write(&order_and_event(1, false)).await;
    read_through(&s.world, &mut w, event_id_is(&traced_event_id(1))).await;
    if kill_inside_a_transaction {
        let base = s.world.read_stream().await.last().map_or(0, |m| m.seq);
        s.write(&format!(
            "BEGIN; INSERT INTO orders VALUES (100, 'bulk');
             INSERT INTO outbox (id, aggregatetype, aggregateid, payload)
               SELECT ('f0000000-0000-4000-8000-' || lpad(g::text, 12, '0'))::uuid, 'order', g::text,
                      jsonb_build_object('n', g)
               FROM generate_series(1, {BULK}) g;
             COMMIT;"
        ))
        .await;
        wait_last_seq(&s.world, &mut w, base + 200).await;
        w.kill9();
        let bulk = s
            .world
            .read_stream()
            .await
            .iter()
            .filter(|m| m.header("Cdc-Event-Id").starts_with("f0000000-"))
            .count();
        eprintln!("the kill left {bulk} of the {BULK} bulk events in the stream");
        assert!(
            bulk > 0 && bulk < BULK as usize,
            "premise: part of the bulk transaction is in the stream, but {bulk} of its {BULK} events are"
        );
    } else {
        w.sigterm();
        assert!(
            w.wait_exit(Duration::from_secs(20)).success(),
            "{}",
            w.output()
        );
    }
    for n in 2..=4 {
        s.write(&order_and_event(n, false)).await;
    }
    s.write("ALTER TABLE outbox ADD COLUMN traceparent text")
        .await;
    for n in 5..=6 {
        s.write(&order_and_event(n, true)).await;
    }
    let mut w = s.spawn(&[TRACED], &[]);
    let all = read_through(&s.world, &mut w, event_id_is(&traced_event_id(6))).await;
    assert_exactly_once_in_order(&all);
    assert_no_row_events_of(&all, "outbox");
    let events: Vec<&Msg> = changes(&all)
        .into_iter()
        .filter(|m| m.subject == format!("{PREFIX}._outbox.order"))
        .collect();
    let bulk = if kill_inside_a_transaction { BULK } else { 0 };
    let want: Vec<String> = std::iter::once(traced_event_id(1))
        .chain((1..=bulk).map(|g| format!("f0000000-0000-4000-8000-{g:012}")))
        .chain((2..=6).map(traced_event_id))
        .collect();
    let got: Vec<&str> = events.iter().map(|m| m.header("Cdc-Event-Id")).collect();
    assert!(
        got == want,
        "{} events, want {}; the first differing: {:?}",
        got.len(),
        want.len(),
        got.iter()
            .zip(&want)
            .find(|(g, w)| *g != w)
            .map(|(g, w)| (g.to_string(), w.clone()))
    );
    for ev in &events {
        let id = ev.header("Cdc-Event-Id");
        let traced = (5..=6).find(|n| traced_event_id(*n) == id);
        match traced {
            Some(n) => assert_eq!(ev.header("traceparent"), traceparent(n), "event {id}"),
            None => assert!(
                !ev.headers.contains_key("traceparent"),
                "event {id}, written before the column, has a traceparent: {:?}",
                ev.headers
            ),
        }
    }
    assert!(w.is_running(), "walnats stopped:\n{}", w.output());
    w.sigterm();
    assert!(
        w.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        w.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_column_added_while_events_are_pending_does_not_stop_the_resume() {
    a_header_column_added_while_events_are_pending(false).await;
}

/// The same with the first run killed inside a transaction of events:
/// the rest of it is finished after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_column_added_after_a_kill_9_inside_a_transaction_does_not_stop_the_resume() {
    a_header_column_added_while_events_are_pending(true).await;
}

/// PostgreSQL pads a char(n) with spaces, which would be part of every
/// subject: `walnats run` refuses such an aggregate type column at start,
/// in one line naming the column and `char(n)`; nothing is published.
#[tokio::test]
async fn a_char_n_aggregate_type_is_refused_at_start() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql(
            "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype char(10) NOT NULL,
               aggregateid text NOT NULL, payload jsonb);
             CREATE PUBLICATION p_char FOR TABLE outbox;",
        )
        .await;
    let config = with_outbox(&world.config(), &[HEADERLESS]);
    let mut w = WalnatsProc::spawn(
        walnats_bin(),
        &["run"],
        &config,
        &[
            ("WALNATS_POSTGRES_PUBLICATION", "p_char"),
            ("NO_COLOR", "1"),
        ],
    );
    let status = w.wait_exit(Duration::from_secs(15));
    let out = w.output();
    assert!(!status.success(), "exit 0, not a refusal:\n{out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("char(n)")).collect();
    assert_eq!(lines.len(), 1, "not one line on char(n):\n{out}");
    assert!(
        lines[0].contains("aggregatetype") && lines[0].contains("outbox"),
        "the line does not name the column: {:?}",
        lines[0]
    );
    assert!(!out.contains("panicked"), "{out}");
    let all = world.read_stream().await;
    assert!(all.is_empty(), "published: {:?}", subjects(&all));
}

/// An outbox row's aggregate type over 128 bytes stops walnats with a line
/// saying so (one of 128 is published); nothing of it is published. A
/// message-prefix outbox message's, which any role may write, is ignored
/// instead (taking no position): the next message is published and
/// walnats keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_aggregate_type_stops_walnats_and_an_over_long_message_one_is_ignored() {
    // A table row.
    let s = Service::new(PgVersion::V15, OUTBOX).await;
    let mut w = s.spawn(&[OUTBOX_ENTRY], &[]);
    s.world.wait_streaming(&mut w).await;
    let fits = "a0000000-0000-4000-8000-000000000000";
    s.write(&format!(
        "INSERT INTO outbox VALUES ('{fits}', repeat('a', 128), '1', 'T', '{{}}')"
    ))
    .await;
    read_through(&s.world, &mut w, event_id_is(fits)).await;
    s.write(
        "INSERT INTO outbox VALUES ('b0000000-0000-4000-8000-000000000000', repeat('b', 129), '2', 'T', '{}')",
    )
    .await;
    let status = w.wait_exit(Duration::from_secs(20));
    let out = w.output();
    assert!(!status.success(), "exit 0:\n{out}");
    assert!(
        line_with(&out, &["outbox", "over 128"]).is_some(),
        "no line says the aggregate type is over 128 bytes:\n{out}"
    );
    let all = s.world.read_stream().await;
    let got: Vec<(&str, &str)> = changes(&all)
        .iter()
        .map(|m| (m.subject.as_str(), m.header("Cdc-Event-Id")))
        .collect();
    let a128 = format!("{PREFIX}._outbox.{}", "a".repeat(128));
    assert_eq!(got, [(a128.as_str(), fits)]);

    // A logical message, inside a transaction and on its own.
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql(ORDERS).await;
    let config = with_outbox(&world.config(), &["message_prefix = \"outbox\""]);
    let mut w = world.spawn_with(&config, &[]);
    world.wait_streaming(&mut w).await;
    for sql in [
        "BEGIN; INSERT INTO orders VALUES (1, 'x');
         SELECT pg_logical_emit_message(true, 'outbox.' || repeat('a', 129), '{}');
         INSERT INTO orders VALUES (2, 'y'); COMMIT;",
        "SELECT pg_logical_emit_message(true, 'outbox.' || repeat('a', 129), '{}')",
        "SELECT pg_logical_emit_message(true, 'outbox.invoice', '{\"n\":1}')",
    ] {
        world.sql(sql).await;
    }
    let all = read_through(&world, &mut w, |m| m.subject.ends_with("._outbox.invoice")).await;
    assert_exactly_once_in_order(&all);
    let p = PREFIX;
    assert_eq!(
        subjects(&changes(&all).into_iter().cloned().collect::<Vec<_>>()),
        [
            format!("{p}.public.orders.insert"),
            format!("{p}.public.orders.insert"),
            format!("{p}._outbox.invoice"),
        ]
    );
    // A duplicate would have arrived by now; so would a stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(w.is_running(), "walnats stopped:\n{}", w.output());
    let again = world.read_stream().await;
    assert_eq!(subjects(&again), subjects(&all));
    w.sigterm();
}

/// `ALTER TABLE outbox RENAME` while walnats streams: the table is no
/// longer the configured outbox, and its inserts would go out as row
/// changes. walnats stops with a line saying it was renamed; nothing of
/// the renamed table is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renaming_an_outbox_table_while_running_stops_walnats() {
    let s = Service::new(PgVersion::V15, &format!("{ORDERS}; {OUTBOX}")).await;
    let mut w = s.spawn(&[OUTBOX_ENTRY], &[]);
    s.world.wait_streaming(&mut w).await;
    let first = "a0000000-0000-4000-8000-000000000000";
    s.write(&format!(
        "INSERT INTO outbox VALUES ('{first}', 'order', '1', 'T', '{{}}')"
    ))
    .await;
    read_through(&s.world, &mut w, event_id_is(first)).await;
    s.write("ALTER TABLE outbox RENAME TO outbox2").await;
    s.write(
        "INSERT INTO outbox2 VALUES ('b0000000-0000-4000-8000-000000000000', 'order', '2', 'T', '{}')",
    )
    .await;
    let status = w.wait_exit(Duration::from_secs(20));
    let out = w.output();
    assert!(!status.success(), "exit 0:\n{out}");
    assert!(
        line_with(&out, &["outbox", "was renamed"]).is_some(),
        "no line says the outbox table was renamed:\n{out}"
    );
    let all = s.world.read_stream().await;
    assert_no_row_events_of(&all, "outbox2");
    let got: Vec<&str> = changes(&all)
        .iter()
        .map(|m| m.header("Cdc-Event-Id"))
        .collect();
    assert_eq!(got, [first], "{:?}", subjects(&all));
}
