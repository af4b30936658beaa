//! What a database user with no privileges can do to walnats through the
//! WAL and the server's shared state (issue 15): nothing that steers it,
//! stops it or grows it. The attacker is an ordinary LOGIN role.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::harness::{PgVersion, wait_until};
use crate::support::{PREFIX, World, peak_rss, shared};

/// An ordinary role of this world's database: LOGIN, nothing granted.
async fn attacker(world: &World<'_>) -> tokio_postgres::Client {
    let role = format!("mallory_{}", world.db);
    world
        .sql(&format!(
            "DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ))
        .await;
    let url = format!(
        "postgres://{role}@127.0.0.1:{}/{}?sslmode=disable",
        world.pg.port(),
        world.db
    );
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Waits until the stream holds the insert of `id` into `t`.
async fn wait_row(world: &World<'_>, id: i64, w: &mut crate::harness::WalnatsProc) {
    wait_until(Duration::from_secs(30), "the marker row", || {
        let ok = w.is_running();
        async move {
            assert!(ok, "walnats exited");
            world.read_stream().await.iter().any(|m| {
                m.subject == format!("{PREFIX}.public.t.insert") && m.json()["after"]["id"] == id
            })
        }
    })
    .await;
}

/// High 1: any role could write a `walnats.snapshot` message naming a table
/// it may not even read, and walnats re-read and published it (and a 1.5 MB
/// field broke every later checkpoint write). Now a request only counts
/// when `walnats snapshot` stored it in the checkpoint bucket.
#[tokio::test]
async fn a_snapshot_request_written_by_any_database_user_is_ignored() {
    let world = World::new(shared(PgVersion::V15)).await;
    world
        .sql("CREATE TABLE t (id int8 PRIMARY KEY); INSERT INTO t SELECT g FROM generate_series(1, 50) g")
        .await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    let mallory = attacker(&world).await;
    let oid: i64 = world
        .client()
        .await
        .query_one("SELECT 't'::regclass::oid::int8", &[])
        .await
        .unwrap()
        .get(0);
    let slot = world.slot();
    let forged =
        format!(r#"{{"slot":"{slot}","tables":[{{"oid":{oid},"schema":"public","table":"t"}}]}}"#);
    let huge = format!(
        r#"{{"slot":"{slot}","tables":[{{"oid":{oid},"schema":"public","table":"t{}"}}]}}"#,
        "x\nFORGED-LOG-LINE ".repeat(100_000)
    );
    for content in [
        forged.as_str(),
        huge.as_str(),
        "0123456789abcdef0123456789abcdef",
    ] {
        mallory
            .query_one(
                "SELECT pg_logical_emit_message(false, 'walnats.snapshot', $1)::text",
                &[&content],
            )
            .await
            .unwrap();
    }
    world.sql("INSERT INTO t VALUES (1000)").await;
    wait_row(&world, 1000, &mut w).await;
    // Time for a re-read to start, had one been accepted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    world.sql("INSERT INTO t VALUES (1001)").await;
    wait_row(&world, 1001, &mut w).await;
    let msgs = world.read_stream().await;
    assert!(
        !msgs.iter().any(|m| m.subject.ends_with(".read")),
        "a forged request was acted on"
    );
    let out = w.output();
    assert!(
        !out.contains("FORGED-LOG-LINE"),
        "the request's content reached the log"
    );
    assert!(out.contains("walnats.snapshot message ignored"), "{out}");

    // The real command still works.
    let (code, o, e) = crate::cli::run(&["snapshot", "public.t"], &world.config(), &[]);
    assert_eq!(code, 0, "{o}{e}");
    wait_until(Duration::from_secs(60), "the requested re-read", || async {
        world
            .read_stream()
            .await
            .iter()
            .filter(|m| m.subject.ends_with(".read"))
            .count()
            == 52
    })
    .await;
    assert!(w.is_running());
    w.sigterm();
}

/// High 3: one large logical message from any role stopped walnats for
/// good (`on_oversize = "fail"` applied to it), and a huge one took its
/// memory. Now only listed prefixes are published; others, whatever their
/// size, are dropped unread and take no `Cdc-Seq`.
#[tokio::test]
async fn a_large_logical_message_from_any_user_neither_stops_nor_bloats_walnats() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql("CREATE TABLE t (id int8 PRIMARY KEY)").await;
    world.sql("GRANT INSERT ON t TO PUBLIC").await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    let mallory = attacker(&world).await;
    // 2 MB, over max_payload: stopped walnats. 96 MB: its memory.
    mallory
        .batch_execute(
            "SELECT pg_logical_emit_message(false, 'spam', repeat('x', 2000000)); \
             BEGIN; SELECT pg_logical_emit_message(true, 'spam', repeat('y', 2000000)); \
             INSERT INTO t VALUES (1); COMMIT; \
             SELECT pg_logical_emit_message(false, 'walnats.watermark', repeat('z', 96000000));",
        )
        .await
        .unwrap();
    world.sql("INSERT INTO t VALUES (2)").await;
    wait_row(&world, 2, &mut w).await;
    let msgs = world.read_stream().await;
    assert!(!msgs.iter().any(|m| m.subject.contains("._message.")));
    let one = msgs
        .iter()
        .find(|m| m.subject == format!("{PREFIX}.public.t.insert") && m.json()["after"]["id"] == 1)
        .expect("row 1");
    assert_eq!(
        one.header("Cdc-Seq"),
        "0",
        "an unpublished message took a Cdc-Seq"
    );
    let rss = peak_rss(w.pid().unwrap()).unwrap();
    assert!(
        rss < 64 << 20,
        "a 96 MB message nobody asked for took walnats to {} MiB",
        rss >> 20
    );
    assert!(w.is_running());
    w.sigterm();
}

/// Medium 4: any role could take walnats' advisory lock (its key shows in
/// `pg_locks`) while walnats was down, and walnats stood by forever
/// without saying who held it. Now the key has a secret part from the
/// checkpoint bucket; a holder of another role gets a new secret and a
/// warning that names it.
#[tokio::test]
async fn the_slot_lock_taken_by_another_role_neither_stops_walnats_nor_goes_unnamed() {
    let world = World::new(shared(PgVersion::V15)).await;
    world.sql("CREATE TABLE t (id int8 PRIMARY KEY)").await;
    let mut w = world.spawn();
    world.wait_streaming(&mut w).await;
    let mallory = attacker(&world).await;
    // What any role sees while walnats runs.
    let key: i64 = mallory
        .query_one(
            "SELECT (classid::int8 << 32) | objid::int8 FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    w.kill9();
    let mut taken = false;
    for _ in 0..100 {
        taken = mallory
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .unwrap()
            .get(0);
        if taken {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(taken, "the dead walnats' lock was never released");
    let mut w = world.spawn();
    world.sql("INSERT INTO t VALUES (1)").await;
    wait_row(&world, 1, &mut w).await;
    let out = w.output();
    assert!(
        out.contains(&format!("holder_user=mallory_{}", world.db)),
        "{out}"
    );
    w.sigterm();
}
