//! The outside of a streaming walnats: subjects, headers, bodies and values
//! exactly as the contract says, on PostgreSQL 15 and 18.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};

use crate::harness::PgVersion;
use crate::support::{PREFIX, World, assert_exactly_once_in_order, lsn, shared};

async fn changes_carry_contract_subjects_headers_and_bodies(version: PgVersion) {
    let world = World::new(shared(version)).await;
    world
        .sql(
            "CREATE TABLE orders (id bigint PRIMARY KEY, status text, amount numeric(10,2), meta jsonb, note text);
             ALTER TABLE orders ALTER COLUMN note SET STORAGE EXTERNAL;
             CREATE TABLE audit (at text, what text);
             ALTER TABLE audit REPLICA IDENTITY FULL;
             CREATE TABLE nokey (v int);",
        )
        .await;
    let mut w = world.spawn_with(
        &world.config(),
        &[("WALNATS_OUTPUT_MESSAGE_PREFIXES", "my.prefix,plain")],
    );
    world.wait_streaming(&mut w).await;
    let big = "x".repeat(10_000);
    // One statement (one transaction) per call: a multi-statement string
    // would run as a single implicit transaction.
    for stmt in [
        format!("INSERT INTO orders VALUES (42, 'new', 19.90, '{{\"k\": 1}}', '{big}')"),
        "UPDATE orders SET status = 'paid' WHERE id = 42".to_owned(),
        "UPDATE orders SET id = 43 WHERE id = 42".to_owned(),
        "DELETE FROM orders WHERE id = 43".to_owned(),
        "INSERT INTO audit VALUES ('a', 'b')".to_owned(),
        "UPDATE audit SET what = 'c'".to_owned(),
        "DELETE FROM audit".to_owned(),
        "INSERT INTO nokey VALUES (1)".to_owned(),
        "BEGIN; INSERT INTO orders VALUES (1, 'x', 1, null, null); SELECT pg_logical_emit_message(true, 'my.prefix', 'hello'); COMMIT;".to_owned(),
        "SELECT pg_logical_emit_message(false, 'plain', '\\x00ff'::bytea)".to_owned(),
        "TRUNCATE orders, audit RESTART IDENTITY CASCADE".to_owned(),
    ] {
        world.sql(&stmt).await;
    }
    let msgs = world.wait_changes(13, &w).await;
    let all = world.read_stream().await;
    assert_exactly_once_in_order(&all);

    let subjects: Vec<&str> = msgs.iter().map(|m| m.subject.as_str()).collect();
    let p = PREFIX;
    assert_eq!(
        subjects,
        vec![
            format!("{p}.public.orders.insert"),
            format!("{p}.public.orders.update"),
            format!("{p}.public.orders.update"),
            format!("{p}.public.orders.delete"),
            format!("{p}.public.audit.insert"),
            format!("{p}.public.audit.update"),
            format!("{p}.public.audit.delete"),
            format!("{p}.public.nokey.insert"),
            format!("{p}.public.orders.insert"),
            format!("{p}._message.my%2Eprefix"),
            format!("{p}._message.plain"),
            format!("{p}.public.orders.truncate"),
            format!("{p}.public.audit.truncate"),
        ]
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
    );

    // Headers of the first insert.
    let ins = &msgs[0];
    let body = ins.json();
    assert_eq!(ins.header("Cdc-Op"), "insert");
    assert_eq!(ins.header("Content-Type"), "application/json");
    assert_eq!(ins.header("Cdc-Seq"), "0");
    assert_eq!(
        ins.header("Nats-Msg-Id"),
        format!(
            "{}:{}:{}:0",
            world.db,
            world.slot(),
            ins.header("Cdc-Commit-Lsn")
        )
    );
    assert_eq!(ins.header("Cdc-Xid"), body["source"]["xid"].to_string());
    assert_eq!(
        ins.header("Cdc-Lsn"),
        body["source"]["lsn"].as_str().unwrap()
    );
    assert_eq!(
        ins.header("Cdc-Commit-Lsn"),
        body["source"]["commit_lsn"].as_str().unwrap()
    );
    assert!(ins.header("Cdc-Lsn").contains('/'));

    // The insert body, field by field.
    assert_eq!(body["op"], "insert");
    assert_eq!(body["schema"], "public");
    assert_eq!(body["table"], "orders");
    assert_eq!(body["key"], json!({"id": 42}));
    assert_eq!(body["before"], Value::Null);
    assert_eq!(
        body["after"],
        json!({"id": 42, "status": "new", "amount": "19.90", "meta": {"k": 1}, "note": big})
    );
    assert_eq!(body["unchanged"], json!([]));
    let src = &body["source"];
    assert_eq!(src["db"], world.db.as_str());
    assert_eq!(src["slot"], world.slot().as_str());
    assert_eq!(src["seq"], 0);
    assert_eq!(src["snapshot"], false);
    let ct = src["commit_time"].as_str().unwrap();
    assert!(
        ct.ends_with('Z') && ct.len() == 27 && &ct[10..11] == "T",
        "{ct}"
    );

    // Update with the TOASTed note unchanged: absent from after, listed.
    let upd = msgs[1].json();
    assert_eq!(upd["before"], Value::Null);
    assert_eq!(
        upd["after"],
        json!({"id": 42, "status": "paid", "amount": "19.90", "meta": {"k": 1}})
    );
    assert_eq!(upd["unchanged"], json!(["note"]));
    assert_eq!(upd["key"], json!({"id": 42}));

    // Key change: before has the old key.
    let keychg = msgs[2].json();
    assert_eq!(keychg["before"], json!({"id": 42}));
    assert_eq!(keychg["key"], json!({"id": 43}));

    // Delete: old key in key and before.
    let del = msgs[3].json();
    assert_eq!(del["key"], json!({"id": 43}));
    assert_eq!(del["before"], json!({"id": 43}));
    assert_eq!(del["after"], Value::Null);

    // REPLICA IDENTITY FULL: whole old rows.
    let aupd = msgs[5].json();
    assert_eq!(aupd["before"], json!({"at": "a", "what": "b"}));
    assert_eq!(aupd["after"], json!({"at": "a", "what": "c"}));
    let adel = msgs[6].json();
    assert_eq!(adel["before"], json!({"at": "a", "what": "c"}));

    // No replica identity: key null.
    assert_eq!(msgs[7].json()["key"], Value::Null);

    // Transactional message: raw bytes, seq 1 after the insert of its tx.
    let m = &msgs[9];
    assert_eq!(m.payload, b"hello");
    assert_eq!(m.header("Cdc-Seq"), "1");
    assert_eq!(m.header("Cdc-Commit-Lsn"), msgs[8].header("Cdc-Commit-Lsn"));
    let plain = &msgs[10];
    assert_eq!(plain.payload, [0u8, 0xff]);

    // Truncate: one per table, options kept.
    let t = msgs[11].json();
    assert_eq!(t["op"], "truncate");
    assert_eq!(
        t["truncate"],
        json!({"cascade": true, "restart_identity": true})
    );
    assert_eq!(t["key"], Value::Null);
    assert_eq!(t["before"], Value::Null);
    assert_eq!(t["after"], Value::Null);
    assert_eq!(msgs[12].header("Cdc-Seq"), "1");

    // A _schema message precedes each table's first change.
    let schema = all
        .iter()
        .find(|m| m.subject == format!("{p}._schema.public.orders"))
        .expect("no _schema message for orders");
    let s = schema.json();
    assert_eq!(
        s["columns"][0],
        json!({"name": "id", "type": "bigint", "type_oid": 20, "key": true})
    );
    assert_eq!(s["columns"][2]["type"], "numeric(10,2)");
    assert!(schema.seq < msgs[0].seq);

    w.sigterm();
    let status = w.wait_exit(std::time::Duration::from_secs(20));
    assert!(
        status.success(),
        "walnats did not exit 0 on SIGTERM:\n{}",
        w.output()
    );
}

#[tokio::test]
async fn changes_carry_contract_subjects_headers_and_bodies_pg15() {
    changes_carry_contract_subjects_headers_and_bodies(PgVersion::V15).await;
}

#[tokio::test]
async fn changes_carry_contract_subjects_headers_and_bodies_pg18() {
    changes_carry_contract_subjects_headers_and_bodies(PgVersion::V18).await;
}

/// Every row of the contract's type table, with a database whose defaults
/// would change how PostgreSQL prints values if walnats did not fix them.
async fn values_follow_the_type_table_under_hostile_defaults(version: PgVersion) {
    let world = World::new(shared(version)).await;
    world
        .sql(&format!(
            "ALTER DATABASE {db} SET datestyle = 'SQL, DMY';
             ALTER DATABASE {db} SET timezone = 'America/New_York';
             ALTER DATABASE {db} SET intervalstyle = 'iso_8601';
             ALTER DATABASE {db} SET bytea_output = 'escape';
             ALTER DATABASE {db} SET extra_float_digits = 0;",
            db = world.db
        ))
        .await;
    world
        .sql(
            "CREATE TYPE mood AS ENUM ('sad', 'happy');
             CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
             CREATE TABLE v (
               id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, o oid,
               f4 float4, f8 float8, f8nan float8, f8inf float8, f8ninf float8,
               n numeric, nnan numeric, t text, vc varchar(10), c char(3), nm name,
               j json, jb jsonb, u uuid, by bytea, d date, ts timestamp, tstz timestamptz,
               tm time, tmtz timetz, iv interval, dinf date, tsinf timestamp, tstzninf timestamptz,
               ai int4[], at text[], aa int8[], m mood, dm posint, am mood[],
               inet_ inet, rng int4range, pt point, bits bit(3), mac macaddr, mo money)",
        )
        .await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world
        .sql(
            r#"SET timezone = 'Asia/Tokyo';
               INSERT INTO v VALUES (
               1, true, -2, 2147483647, 9223372036854775807, 4294967295,
               1.5, 0.1, 'NaN', 'Infinity', '-Infinity',
               '19.90', 'NaN', E'h\u00e9 "q"\n\\', 'ab', 'ab', 'nm',
               '{"a": [1, 2.50]}', '{"b": null}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\x0102ff',
               '2026-11-22', '2026-11-22 18:31:10.123456', '2026-11-22 18:31:10.123456+00',
               '18:31:10', '18:31:10+02', '1 day 02:03:04', 'infinity', '-infinity', '-infinity',
               '{{1,2},{3,NULL}}', '{"a,b","c\"d",NULL,"NULL",""}', '{}', 'happy', 5, '{sad,happy}',
               '10.0.0.1', '[1,5)', '(1,2)', B'101', '08:00:2b:01:02:03', 12.5)"#,
        )
        .await;
    let msgs = world.wait_changes(1, &w).await;
    let after = msgs[0].json()["after"].clone();
    let want = json!({
        "id": 1, "b": true, "i2": -2, "i4": 2147483647, "i8": 9223372036854775807_i64, "o": 4294967295_u32,
        "f4": 1.5, "f8": 0.1, "f8nan": "NaN", "f8inf": "Infinity", "f8ninf": "-Infinity",
        "n": "19.90", "nnan": "NaN", "t": "hé \"q\"\n\\", "vc": "ab", "c": "ab ", "nm": "nm",
        "j": {"a": [1, 2.50]}, "jb": {"b": null}, "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "by": "AQL/",
        "d": "2026-11-22", "ts": "2026-11-22T18:31:10.123456", "tstz": "2026-11-22T18:31:10.123456Z",
        "tm": "18:31:10", "tmtz": "18:31:10+02", "iv": "1 day 02:03:04",
        "dinf": "infinity", "tsinf": "-infinity", "tstzninf": "-infinity",
        "ai": [[1, 2], [3, null]], "at": ["a,b", "c\"d", null, "NULL", ""], "aa": [],
        "m": "happy", "dm": 5, "am": ["sad", "happy"],
        "inet_": "10.0.0.1", "rng": "[1,5)", "pt": "(1,2)", "bits": "101", "mac": "08:00:2b:01:02:03", "mo": "$12.50"
    });
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(&after[k], v, "column {k}: got {} want {v}", after[k]);
    }
    // Big integers keep every digit in the body (no float rounding).
    let raw = String::from_utf8_lossy(&msgs[0].payload).into_owned();
    assert!(raw.contains("\"i8\":9223372036854775807"), "{raw}");
    w.sigterm();
}

#[tokio::test]
async fn values_follow_the_type_table_under_hostile_defaults_pg15() {
    values_follow_the_type_table_under_hostile_defaults(PgVersion::V15).await;
}

#[tokio::test]
async fn values_follow_the_type_table_under_hostile_defaults_pg18() {
    values_follow_the_type_table_under_hostile_defaults(PgVersion::V18).await;
}

/// Schema and table names with dots, spaces, quotes and non-ASCII map to
/// one reversible subject token each.
#[tokio::test]
async fn odd_names_are_escaped_into_single_reversible_tokens() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql(
            r#"CREATE SCHEMA "my.schema";
               CREATE TABLE "my.schema"."Odd ""T"" ü.x" (id int PRIMARY KEY);
               CREATE TABLE "a b*>" (id int PRIMARY KEY);"#,
        )
        .await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world
        .sql(
            r#"INSERT INTO "my.schema"."Odd ""T"" ü.x" VALUES (1);
               INSERT INTO "a b*>" VALUES (2);"#,
        )
        .await;
    let msgs = world.wait_changes(2, &w).await;
    assert_eq!(
        msgs[0].subject,
        format!("{PREFIX}.my%2Eschema.Odd%20%22T%22%20%C3%BC%2Ex.insert")
    );
    assert_eq!(
        msgs[1].subject,
        format!("{PREFIX}.public.a%20b%2A%3E.insert")
    );
    assert_eq!(msgs[0].json()["schema"], "my.schema");
    assert_eq!(msgs[0].json()["table"], "Odd \"T\" ü.x");
    w.sigterm();
}

/// `_schema` goes out before a table's first change and again when its
/// columns change; a restart does not repeat it (the checkpoint knows).
#[tokio::test]
async fn schema_messages_follow_column_changes_and_survive_restarts() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE s (id int PRIMARY KEY, a text)")
        .await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO s VALUES (1, 'x')").await;
    world.wait_changes(1, &w).await;
    world.sql("ALTER TABLE s ADD COLUMN b int").await;
    world.sql("INSERT INTO s VALUES (2, 'y', 3)").await;
    world.wait_changes(2, &w).await;
    w.sigterm();
    assert!(
        w.wait_exit(std::time::Duration::from_secs(20)).success(),
        "{}",
        w.output()
    );
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    world.sql("INSERT INTO s VALUES (3, 'z', 4)").await;
    world.wait_changes(3, &w).await;
    let all = world.read_stream().await;
    let schemas: Vec<_> = all
        .iter()
        .filter(|m| m.subject == format!("{PREFIX}._schema.public.s"))
        .collect();
    assert_eq!(
        schemas.len(),
        2,
        "{:?}",
        all.iter().map(|m| &m.subject).collect::<Vec<_>>()
    );
    assert_eq!(schemas[0].json()["columns"].as_array().unwrap().len(), 2);
    assert_eq!(schemas[1].json()["columns"][2]["name"], "b");
    assert_eq!(
        all.last().unwrap().json()["after"],
        json!({"id": 3, "a": "z", "b": 4})
    );
    assert_exactly_once_in_order(&all);
    w.sigterm();
}

/// A stream that exists with other subjects is refused, with the fix.
#[tokio::test]
async fn a_stream_that_does_not_cover_the_prefix_is_refused() {
    let world = World::new(shared(PgVersion::V15)).await;
    let js = world.js().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: crate::support::STREAM.to_owned(),
        subjects: vec!["other.>".to_owned()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut w = world.spawn();
    let status = w.wait_exit(std::time::Duration::from_secs(30));
    let out = w.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("do not cover \"cdc.test.>\"") && out.contains("nats stream edit"),
        "{out}"
    );
}

/// `[output] format = "debezium"`: the same subjects and headers, bodies in
/// Debezium's PostgreSQL envelope (the payload object of its JSON converter).
#[tokio::test]
async fn debezium_format_writes_debeziums_envelope_for_c_u_d_t() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql(
            "CREATE TABLE orders (id bigint PRIMARY KEY, status text, amount numeric(10,2), note text);
             ALTER TABLE orders ALTER COLUMN note SET STORAGE EXTERNAL;
             CREATE TABLE audit (at text, what text);
             ALTER TABLE audit REPLICA IDENTITY FULL;",
        )
        .await;
    let mut w = world.spawn_with(
        &world.config(),
        &[
            ("WALNATS_OUTPUT_FORMAT", "debezium"),
            ("WALNATS_OUTPUT_MESSAGE_PREFIXES", "p"),
        ],
    );
    world.wait_streaming(&mut w).await;
    let big = "x".repeat(10_000);
    let before_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for stmt in [
        format!("INSERT INTO orders VALUES (42, 'new', 19.90, '{big}')"),
        "UPDATE orders SET status = 'paid' WHERE id = 42".to_owned(),
        "DELETE FROM orders WHERE id = 42".to_owned(),
        "INSERT INTO audit VALUES ('a', 'b')".to_owned(),
        "DELETE FROM audit".to_owned(),
        "SELECT pg_logical_emit_message(true, 'p', 'hello')".to_owned(),
        "TRUNCATE orders".to_owned(),
    ] {
        world.sql(&stmt).await;
    }
    let msgs = world.wait_changes(7, &w).await;
    let all = world.read_stream().await;
    assert_exactly_once_in_order(&all);

    let p = PREFIX;
    let subjects: Vec<String> = msgs.iter().map(|m| m.subject.clone()).collect();
    assert_eq!(
        subjects,
        vec![
            format!("{p}.public.orders.insert"),
            format!("{p}.public.orders.update"),
            format!("{p}.public.orders.delete"),
            format!("{p}.public.audit.insert"),
            format!("{p}.public.audit.delete"),
            format!("{p}._message.p"),
            format!("{p}.public.orders.truncate"),
        ]
    );

    // Every row change: exactly Debezium's field set, source filled from
    // the same facts as the headers.
    let mut prev_ts = 0;
    for m in msgs.iter().filter(|m| !m.subject.contains("._message.")) {
        let body = m.json();
        let keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "after",
                "before",
                "op",
                "source",
                "transaction",
                "ts_ms",
                "ts_ns",
                "ts_us"
            ],
            "{}",
            m.subject
        );
        assert_eq!(body["transaction"], Value::Null);
        let src = &body["source"];
        let mut skeys: Vec<&str> = src
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        skeys.sort_unstable();
        assert_eq!(
            skeys,
            [
                "connector",
                "db",
                "lsn",
                "name",
                "schema",
                "sequence",
                "snapshot",
                "table",
                "ts_ms",
                "ts_ns",
                "ts_us",
                "txId",
                "version",
                "xmin"
            ]
        );
        assert_eq!(src["connector"], "postgresql");
        assert_eq!(src["name"], PREFIX);
        assert_eq!(src["db"], world.db.as_str());
        assert_eq!(src["schema"], "public");
        assert_eq!(src["snapshot"], "false");
        assert_eq!(src["xmin"], Value::Null);
        assert!(src["version"].is_string());
        assert_eq!(
            src["txId"].as_u64().unwrap().to_string(),
            m.header("Cdc-Xid")
        );
        assert_eq!(src["lsn"].as_u64().unwrap(), lsn(m.header("Cdc-Lsn")));
        let seq: Vec<String> = serde_json::from_str(src["sequence"].as_str().unwrap()).unwrap();
        assert_eq!(
            seq,
            [
                lsn(m.header("Cdc-Commit-Lsn")).to_string(),
                lsn(m.header("Cdc-Lsn")).to_string()
            ]
        );
        // Commit time and encoding time, in Unix milliseconds.
        let commit_ms = src["ts_ms"].as_i64().unwrap();
        let ts_ms = body["ts_ms"].as_i64().unwrap();
        assert!(commit_ms >= before_ms - 60_000, "{commit_ms} {before_ms}");
        assert!(commit_ms >= prev_ts, "commit times go backwards");
        assert!(ts_ms >= commit_ms - 1_000, "{ts_ms} {commit_ms}");
        prev_ts = commit_ms;
        // The same times in µs and ns, as Debezium 2.6+ adds them.
        for t in [src, &body] {
            let us = t["ts_us"].as_i64().unwrap();
            assert_eq!(us.div_euclid(1000), t["ts_ms"].as_i64().unwrap());
            assert_eq!(t["ts_ns"].as_i64().unwrap(), us * 1000);
        }
        // Headers are those of the json format.
        assert_eq!(m.header("Content-Type"), "application/json");
        assert!(
            m.header("Nats-Msg-Id")
                .starts_with(&format!("{}:", world.db))
        );
    }

    let ins = msgs[0].json();
    assert_eq!(msgs[0].header("Cdc-Op"), "insert");
    assert_eq!(ins["op"], "c");
    assert_eq!(ins["source"]["table"], "orders");
    assert_eq!(ins["before"], Value::Null);
    assert_eq!(
        ins["after"],
        json!({"id": 42, "status": "new", "amount": "19.90", "note": big})
    );

    // The TOASTed note did not change: Debezium's placeholder, not absent.
    let upd = msgs[1].json();
    assert_eq!(upd["op"], "u");
    assert_eq!(upd["before"], Value::Null);
    assert_eq!(
        upd["after"],
        json!({"id": 42, "status": "paid", "amount": "19.90",
               "note": "__debezium_unavailable_value"})
    );

    // Default replica identity: the old key only.
    let del = msgs[2].json();
    assert_eq!(del["op"], "d");
    assert_eq!(del["before"], json!({"id": 42}));
    assert_eq!(del["after"], Value::Null);

    // REPLICA IDENTITY FULL: the whole old row.
    let adel = msgs[4].json();
    assert_eq!(adel["op"], "d");
    assert_eq!(adel["source"]["table"], "audit");
    assert_eq!(adel["before"], json!({"at": "a", "what": "b"}));

    // `_message` stays raw bytes.
    assert_eq!(msgs[5].payload, b"hello");
    assert_eq!(msgs[5].header("Content-Type"), "application/octet-stream");

    let tr = msgs[6].json();
    assert_eq!(tr["op"], "t");
    assert_eq!(tr["before"], Value::Null);
    assert_eq!(tr["after"], Value::Null);
    assert_eq!(tr["source"]["table"], "orders");

    // `_schema` stays walnats' JSON.
    let schema = all
        .iter()
        .find(|m| m.subject == format!("{p}._schema.public.orders"))
        .expect("a _schema message for orders");
    let s = schema.json();
    assert_eq!(s["table"], "orders");
    assert_eq!(s["columns"][0]["name"], "id");
    drop(w);
}

/// `[output] tx_markers`: BEGIN and END on `<prefix>._tx` around each
/// transaction, END with its change count per table.
#[tokio::test]
async fn tx_markers_frame_each_transaction_with_counts_per_table() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE ta (id int PRIMARY KEY); CREATE TABLE tb (id int PRIMARY KEY)")
        .await;
    let mut w = world.spawn_with(
        &world.config(),
        &[
            ("WALNATS_OUTPUT_TX_MARKERS", "true"),
            ("WALNATS_OUTPUT_MESSAGE_PREFIXES", "p"),
        ],
    );
    world.wait_streaming(&mut w).await;
    world
        .sql("BEGIN; INSERT INTO ta VALUES (1), (2); INSERT INTO tb VALUES (3); SELECT pg_logical_emit_message(true, 'p', 'x'); COMMIT;")
        .await;
    world.sql("INSERT INTO tb VALUES (4)").await;
    world.wait_changes(5, &w).await;
    let all = world.read_stream().await;
    assert_exactly_once_in_order(&all);
    let tx: Vec<_> = all
        .iter()
        .filter(|m| m.subject == format!("{PREFIX}._tx"))
        .collect();
    assert_eq!(
        tx.len(),
        4,
        "{:?}",
        all.iter().map(|m| &m.subject).collect::<Vec<_>>()
    );
    let end = tx[1].json();
    assert_eq!(end["type"], "END");
    assert_eq!(end["event_count"], 4);
    assert_eq!(
        end["data_collections"],
        json!([
            {"data_collection": "public.ta", "event_count": 2},
            {"data_collection": "public.tb", "event_count": 1},
            {"data_collection": "_message", "event_count": 1}
        ])
    );
    assert_eq!(tx[0].json()["type"], "BEGIN");
    assert_eq!(tx[0].header("Cdc-Op"), "begin");
    assert_eq!(
        tx[0].header("Nats-Msg-Id"),
        format!(
            "{}:{}:{}:0:begin",
            world.db,
            world.slot(),
            tx[0].header("Cdc-Commit-Lsn")
        )
    );
    assert_eq!(tx[3].json()["event_count"], 1);
    w.sigterm();
}

/// pgoutput gives a non-transactional message the LSN where its record
/// ends, which is where the commit record of the transaction that emitted
/// it starts: message and first change must not share a message id (the
/// change would be dropped as a duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_right_before_a_commit_loses_nothing() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql("CREATE TABLE edge (id int PRIMARY KEY)").await;
    let mut w = world.spawn_with(&world.config(), &[("WALNATS_OUTPUT_MESSAGE_PREFIXES", "*")]);
    world.wait_streaming(&mut w).await;
    for i in 0..20 {
        world
            .sql(&format!(
                "BEGIN; INSERT INTO edge VALUES ({i}); \
                 SELECT pg_logical_emit_message(false, 'edge', 'x'); COMMIT;"
            ))
            .await;
    }
    let msgs = world.wait_changes(40, &w).await;
    let inserts = msgs
        .iter()
        .filter(|m| m.subject.ends_with(".edge.insert"))
        .count();
    let messages = msgs
        .iter()
        .filter(|m| m.subject.contains("._message."))
        .count();
    assert_eq!((inserts, messages), (20, 20));
    assert_exactly_once_in_order(&msgs);
    let log = std::fs::read_to_string(&world.log).unwrap_or_default();
    assert!(!log.contains("session ended"), "{log}");
    w.sigterm();
}

/// PostgreSQL's `toast.sql` on `REPLICA IDENTITY FULL` (every column is a
/// key column): an update that copies one TOASTed column into another
/// sends the untouched one as unchanged TOAST. `key` must take that column
/// from the old row and every other from the new one, so it shows the
/// new `toasted_col1`, not the old row's null.
#[tokio::test]
async fn full_identity_key_takes_new_values_and_unchanged_toast_from_the_old_row() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql(
            "CREATE TABLE toasted_several (id int PRIMARY KEY, toasted_key text, toasted_col1 text, toasted_col2 text);
             ALTER TABLE toasted_several REPLICA IDENTITY FULL;
             ALTER TABLE toasted_several ALTER COLUMN toasted_key SET STORAGE EXTERNAL;
             ALTER TABLE toasted_several ALTER COLUMN toasted_col1 SET STORAGE EXTERNAL;
             ALTER TABLE toasted_several ALTER COLUMN toasted_col2 SET STORAGE EXTERNAL;",
        )
        .await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    for stmt in [
        "INSERT INTO toasted_several (id, toasted_key) VALUES (1, repeat('9876543210', 10000))",
        "UPDATE toasted_several SET toasted_col1 = toasted_key",
        "UPDATE toasted_several SET toasted_col2 = toasted_col1",
    ] {
        world.sql(stmt).await;
    }
    let msgs = world.wait_changes(3, &w).await;
    assert_exactly_once_in_order(&world.read_stream().await);
    let big = "9876543210".repeat(10_000);
    let bodies: Vec<Value> = msgs.iter().map(|m| m.json()).collect();
    let ops: Vec<&Value> = bodies.iter().map(|b| &b["op"]).collect();
    assert_eq!(ops, [&json!("insert"), &json!("update"), &json!("update")]);

    let first = &bodies[1];
    assert_eq!(
        first["unchanged"],
        json!(["toasted_key"]),
        "the test needs an unchanged TOAST value"
    );
    same_json(
        &first["key"],
        &json!({"id": 1, "toasted_key": big, "toasted_col1": big, "toasted_col2": null}),
    );
    same_json(
        &first["after"],
        &json!({"id": 1, "toasted_col1": big, "toasted_col2": null}),
    );
    same_json(
        &first["before"],
        &json!({"id": 1, "toasted_key": big, "toasted_col1": null, "toasted_col2": null}),
    );

    let second = &bodies[2];
    assert_eq!(second["unchanged"], json!(["toasted_key", "toasted_col1"]));
    same_json(
        &second["key"],
        &json!({"id": 1, "toasted_key": big, "toasted_col1": big, "toasted_col2": big}),
    );
    same_json(&second["after"], &json!({"id": 1, "toasted_col2": big}));
    w.sigterm();
}

/// `assert_eq!` on JSON holding 100 kB strings, printing them shortened.
fn same_json(actual: &Value, expected: &Value) {
    fn short(v: &Value) -> Value {
        match v {
            Value::String(s) if s.len() > 40 => json!(format!(
                "{}... ({} chars)",
                s.chars().take(20).collect::<String>(),
                s.len()
            )),
            Value::Object(o) => {
                Value::Object(o.iter().map(|(k, v)| (k.clone(), short(v))).collect())
            }
            other => other.clone(),
        }
    }
    assert!(
        actual == expected,
        "got {}, want {}",
        short(actual),
        short(expected)
    );
}
