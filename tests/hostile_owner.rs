//! A table owner's code never runs as walnats' role.
//!
//! The attacker is an unprivileged role that owns a published table;
//! walnats runs as a REPLICATION role (not a superuser) that may read a
//! secret table. The attacker's function, reached through a domain CHECK on
//! the primary key, a row-level security policy, or an overload of a
//! function walnats might call without its schema, copies the secret into
//! the attacker's table (inside the snapshot's read-only transaction, into
//! a logical message, which walnats would publish) and leaves a WARNING in
//! the server log. Each test checks that none of those traces exists after
//! the initial snapshot and after `walnats snapshot TABLE`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::harness::{PgVersion, WalnatsProc};
use crate::support::{Msg, PREFIX, World, shared};

/// One world with its two roles, the secret and the attacker's function.
struct Hostile<'a> {
    world: World<'a>,
    /// walnats' role: LOGIN REPLICATION, SELECT on `public.secret`.
    role: String,
    attacker: String,
    secret: String,
}

impl<'a> Hostile<'a> {
    async fn new(version: PgVersion) -> Hostile<'a> {
        let world = World::new(shared(version)).await;
        let role = format!("w_{}", world.db);
        let attacker = format!("a_{}", world.db);
        let secret = format!("secret-of-{}", world.db);
        world
            .sql(&format!(
                "CREATE ROLE {role} LOGIN REPLICATION;
                 CREATE ROLE {attacker} LOGIN;
                 CREATE TABLE public.secret (s text);
                 INSERT INTO public.secret VALUES ('{secret}');
                 GRANT SELECT ON public.secret TO {role};
                 CREATE SCHEMA evil AUTHORIZATION {attacker};
                 CREATE SCHEMA stash AUTHORIZATION {attacker};
                 SET ROLE {attacker};
                 GRANT USAGE ON SCHEMA evil, stash TO PUBLIC;
                 CREATE TABLE stash.loot (s text, who text);
                 GRANT INSERT ON stash.loot TO PUBLIC;
                 CREATE FUNCTION stash.steal() RETURNS boolean LANGUAGE plpgsql AS $f$
                 BEGIN
                   IF pg_catalog.has_table_privilege('public.secret', 'SELECT') THEN
                     RAISE WARNING 'attacker code ran as % in %.', current_user, pg_catalog.current_database();
                     BEGIN
                       INSERT INTO stash.loot SELECT s, current_user FROM public.secret;
                     EXCEPTION WHEN read_only_sql_transaction THEN
                       PERFORM pg_catalog.pg_logical_emit_message(false, 'loot', s) FROM public.secret;
                     END;
                   END IF;
                   RETURN true;
                 END $f$;
                 RESET ROLE;"
            ))
            .await;
        Hostile {
            world,
            role,
            attacker,
            secret,
        }
    }

    /// As the attacker.
    async fn as_attacker(&self, sql: &str) {
        self.world
            .sql(&format!("SET ROLE {}; {sql}; RESET ROLE;", self.attacker))
            .await;
    }

    /// walnats' config: its own role, the snapshot mode given.
    fn config(&self, initial: bool) -> String {
        let cfg = self.world.config().replace(
            "postgres://postgres@",
            &format!("postgres://{}@", self.role),
        );
        if initial {
            cfg.replace("mode = \"never\"", "mode = \"initial\"")
        } else {
            cfg
        }
    }

    /// Fails when the attacker's function ran as walnats' role: the secret
    /// in the attacker's table, its WARNING in the server log, or the
    /// secret in the stream.
    async fn assert_no_trace(&self, during: &str) {
        let client = self.world.client().await;
        let loot: i64 = client
            .query_one(
                "SELECT count(*) FROM stash.loot WHERE who = $1",
                &[&self.role.as_str()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            loot, 0,
            "{during}: the attacker's code ran as walnats' role and copied the secret into its table {loot} time(s)"
        );
        let marker = format!("attacker code ran as {} in {}.", self.role, self.world.db);
        assert!(
            !self.world.pg.log_text().contains(&marker),
            "{during}: the attacker's code ran as walnats' role; the server log says {marker:?}"
        );
        let leaked: Vec<String> = self
            .world
            .read_stream()
            .await
            .iter()
            .filter(|m| String::from_utf8_lossy(&m.payload).contains(&self.secret))
            .map(|m| m.subject.clone())
            .collect();
        assert!(
            leaked.is_empty(),
            "{during}: the attacker's code ran as walnats' role and put the secret into the stream: {leaked:?}"
        );
    }
}

fn log_count(world: &World<'_>, needle: &str) -> usize {
    std::fs::read_to_string(&world.log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// Waits (up to 3 minutes) until walnats' log holds `needle` `n` times;
/// fails at once, with the log, if `w` exits.
async fn wait_log(world: &World<'_>, w: &mut WalnatsProc, needle: &str, n: usize) {
    for _ in 0..1800 {
        if log_count(world, needle) >= n {
            return;
        }
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{needle:?} never appeared {n} time(s):\n{}", w.output());
}

/// The `id`s of the reads of `schema.table` in the stream, sorted.
fn read_ids(msgs: &[Msg], table: &str) -> Vec<i64> {
    let subject = format!("{PREFIX}.{table}.read");
    let mut ids: Vec<i64> = msgs
        .iter()
        .filter(|m| m.subject == subject)
        .map(|m| m.json()["after"]["id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

/// On a database where everyone may create in `public` (the default before
/// PostgreSQL 15, granted here to model one), the attacker puts overloads
/// of `array_position` and `unnest` there that match walnats' arguments
/// exactly, so an unqualified call would pick them. The initial snapshot,
/// streaming, `walnats snapshot` and its wait for a transaction in
/// progress at the low watermark never call them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_overloads_in_public_run_no_attacker_code_pg15() {
    let h = Hostile::new(PgVersion::V15).await;
    h.world
        .sql(&format!(
            "GRANT CREATE ON SCHEMA public TO PUBLIC;
             CREATE TABLE public.items (id int PRIMARY KEY, v text);
             INSERT INTO public.items SELECT g, 'item ' || g FROM generate_series(1, 50) g;
             GRANT SELECT ON public.items TO {};
             CREATE PUBLICATION walnats FOR TABLE public.items",
            h.role
        ))
        .await;
    h.as_attacker(
        "CREATE FUNCTION public.array_position(a int2[], e int2) RETURNS int LANGUAGE plpgsql AS $f$
         BEGIN PERFORM stash.steal(); RETURN pg_catalog.array_position(a, e); END $f$;
         CREATE FUNCTION public.unnest(a text[]) RETURNS SETOF text LANGUAGE plpgsql AS $f$
         BEGIN PERFORM stash.steal(); RETURN QUERY SELECT pg_catalog.unnest(a); END $f$;
         CREATE FUNCTION public.unnest(a int8[]) RETURNS SETOF int8 LANGUAGE plpgsql AS $f$
         BEGIN PERFORM stash.steal(); RETURN QUERY SELECT pg_catalog.unnest(a); END $f$",
    )
    .await;
    let cfg = h.config(true);
    let mut w = h.world.spawn_with(&cfg, &[]);
    wait_log(&h.world, &mut w, "snapshot complete", 1).await;
    h.world.wait_streaming(&mut w).await;
    h.world
        .sql("INSERT INTO public.items VALUES (51, 'streamed')")
        .await;
    h.world.wait_changes(51, &w).await;
    h.assert_no_trace("the initial snapshot and streaming")
        .await;

    // A transaction in progress at the low watermark makes the re-read
    // wait for it.
    let holder = h.world.client().await;
    holder
        .batch_execute("BEGIN; INSERT INTO public.items VALUES (52, 'held')")
        .await
        .unwrap();
    let (code, out, err) = crate::cli::run(&["snapshot", "public.items"], &cfg, &[]);
    assert_eq!(code, 0, "{out}{err}");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    wait_log(&h.world, &mut w, "snapshot of table complete", 2).await;
    h.assert_no_trace("walnats snapshot public.items").await;
    let reads = read_ids(&h.world.read_stream().await, "public.items");
    assert_eq!(reads.len(), 50 + 51, "{reads:?}");
    w.sigterm();
}

/// Rows of the attacker's table: more than two snapshot chunks, so that
/// reads resume after a key twice.
const ROWS: i64 = 2500;

/// The attacker's primary key is of a domain whose CHECK calls its
/// function: walnats' key cursor never casts to the domain, and the table
/// is still read whole, in key order, chunk after chunk.
async fn domain_check_on_the_key(version: PgVersion) {
    let h = Hostile::new(version).await;
    h.as_attacker(&format!(
        "CREATE DOMAIN evil.key AS int CHECK (VALUE IS NOT NULL AND stash.steal());
         CREATE TABLE evil.t (id evil.key PRIMARY KEY, v text);
         INSERT INTO evil.t SELECT g, 'row ' || g FROM generate_series(1, {ROWS}) g;
         GRANT SELECT ON evil.t TO PUBLIC"
    ))
    .await;
    h.world
        .sql("CREATE PUBLICATION walnats FOR TABLES IN SCHEMA evil")
        .await;
    let cfg = h.config(true);
    let mut w = h.world.spawn_with(&cfg, &[]);
    wait_log(&h.world, &mut w, "snapshot complete", 1).await;
    h.assert_no_trace("the initial snapshot").await;
    let want: Vec<i64> = (1..=ROWS).collect();
    assert_eq!(
        read_ids(&h.world.read_stream().await, "evil.t"),
        want,
        "the initial snapshot did not read every row once"
    );
    h.world.wait_streaming(&mut w).await;

    let (code, out, err) = crate::cli::run(&["snapshot", "evil.t"], &cfg, &[]);
    assert_eq!(code, 0, "{out}{err}");
    wait_log(&h.world, &mut w, "snapshot of table complete", 2).await;
    h.assert_no_trace("walnats snapshot evil.t").await;
    let twice: Vec<i64> = (1..=ROWS).flat_map(|i| [i, i]).collect();
    assert_eq!(
        read_ids(&h.world.read_stream().await, "evil.t"),
        twice,
        "the re-read did not read every row once more"
    );
    w.sigterm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_check_on_the_key_runs_no_attacker_code_in_snapshots_pg15() {
    domain_check_on_the_key(PgVersion::V15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_check_on_the_key_runs_no_attacker_code_in_snapshots_pg18() {
    domain_check_on_the_key(PgVersion::V18).await;
}

/// The attacker's key is a composite type with the domain inside: a cursor
/// value cast to it would run the CHECK, so walnats does not read the
/// table by key. The initial snapshot reads it whole by heap pages, and
/// `walnats snapshot` refuses it, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_a_type_with_a_domain_inside_is_read_by_pages_and_not_re_read_pg15() {
    let h = Hostile::new(PgVersion::V15).await;
    h.as_attacker(&format!(
        "CREATE DOMAIN evil.key AS int CHECK (VALUE IS NOT NULL AND stash.steal());
         CREATE TYPE evil.pair AS (a int, b evil.key);
         CREATE TABLE evil.t (id evil.pair PRIMARY KEY, v text);
         INSERT INTO evil.t SELECT ROW(g, g)::evil.pair, 'row ' || g FROM generate_series(1, {ROWS}) g;
         GRANT SELECT ON evil.t TO PUBLIC"
    ))
    .await;
    h.world
        .sql("CREATE PUBLICATION walnats FOR TABLES IN SCHEMA evil")
        .await;
    let cfg = h.config(true);
    let mut w = h.world.spawn_with(&cfg, &[]);
    wait_log(&h.world, &mut w, "snapshot complete", 1).await;
    h.assert_no_trace("the initial snapshot").await;
    let subject = format!("{PREFIX}.evil.t.read");
    let mut rows: Vec<String> = h
        .world
        .read_stream()
        .await
        .iter()
        .filter(|m| m.subject == subject)
        .map(|m| m.json()["after"]["v"].as_str().unwrap().to_owned())
        .collect();
    rows.sort_unstable();
    let mut want: Vec<String> = (1..=ROWS).map(|g| format!("row {g}")).collect();
    want.sort_unstable();
    assert_eq!(
        rows, want,
        "the initial snapshot did not read every row once"
    );
    let log = w.output();
    assert!(
        log.contains("by heap pages, not by primary key") && log.contains("evil.pair"),
        "{log}"
    );
    h.world.wait_streaming(&mut w).await;

    let (code, out, err) = crate::cli::run(&["snapshot", "evil.t"], &cfg, &[]);
    assert_ne!(code, 0, "walnats snapshot accepted the table:\n{out}{err}");
    assert!(
        err.contains("cannot be re-read") && err.contains("evil.pair"),
        "{err}"
    );
    h.assert_no_trace("walnats snapshot evil.t").await;
    w.sigterm();
}

/// The attacker's table has row-level security, with a policy that calls
/// its function and applies to walnats' role.
async fn rls_table(h: &Hostile<'_>) {
    h.as_attacker(
        "CREATE TABLE evil.t (id int PRIMARY KEY, v text);
         INSERT INTO evil.t SELECT g, 'row ' || g FROM generate_series(1, 100) g;
         GRANT SELECT ON evil.t TO PUBLIC;
         ALTER TABLE evil.t ENABLE ROW LEVEL SECURITY;
         CREATE POLICY everyone ON evil.t USING (stash.steal())",
    )
    .await;
    h.world
        .sql("CREATE PUBLICATION walnats FOR TABLES IN SCHEMA evil")
        .await;
}

fn assert_names_rls_and_fix(text: &str) {
    assert!(
        text.contains("\"evil\".\"t\"")
            && text.contains("row-level security")
            && text.contains("BYPASSRLS"),
        "the refusal does not name the table, row-level security and the fix:\n{text}"
    );
}

/// A policy is never run: the initial snapshot stops with one line naming
/// the table and the fix; `walnats snapshot` refuses the table, and a
/// request already in the WAL is abandoned with the same reason while
/// streaming goes on.
async fn rls_policy(version: PgVersion) {
    // The initial snapshot.
    let h = Hostile::new(version).await;
    rls_table(&h).await;
    let mut w = h.world.spawn_with(&h.config(true), &[]);
    for _ in 0..600 {
        if !w.is_running() || log_count(&h.world, "snapshot complete") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.assert_no_trace("the initial snapshot").await;
    let status = w.wait_exit(Duration::from_secs(30));
    let out = w.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert_names_rls_and_fix(&out);

    // A request made (by `walnats snapshot`, while walnats was down)
    // before the policy appeared, then `walnats snapshot` after it.
    let h = Hostile::new(version).await;
    h.as_attacker(
        "CREATE TABLE evil.t (id int PRIMARY KEY, v text);
         INSERT INTO evil.t SELECT g, 'row ' || g FROM generate_series(1, 100) g;
         GRANT SELECT ON evil.t TO PUBLIC;",
    )
    .await;
    h.world
        .sql("CREATE PUBLICATION walnats FOR TABLES IN SCHEMA evil")
        .await;
    let cfg = h.config(false);
    let mut w = h.world.spawn_with(&cfg, &[]);
    h.world.wait_streaming(&mut w).await;
    w.sigterm();
    assert!(w.wait_exit(Duration::from_secs(30)).success());
    let (code, out, err) = crate::cli::run(&["snapshot", "evil.t"], &cfg, &[]);
    assert_eq!(code, 0, "{out}{err}");
    h.as_attacker(
        "ALTER TABLE evil.t ENABLE ROW LEVEL SECURITY;
         CREATE POLICY everyone ON evil.t USING (stash.steal())",
    )
    .await;
    let (code, out, err) = crate::cli::run(&["snapshot", "evil.t"], &cfg, &[]);
    let mut w = h.world.spawn_with(&cfg, &[]);
    h.world.wait_streaming(&mut w).await;
    for _ in 0..1800 {
        if log_count(&h.world, "snapshot of table abandoned") > 0
            || log_count(&h.world, "snapshot of table complete") > 0
        {
            break;
        }
        assert!(w.is_running(), "walnats exited:\n{}", w.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.assert_no_trace("walnats snapshot evil.t").await;
    assert_ne!(code, 0, "walnats snapshot accepted the table:\n{out}{err}");
    assert_names_rls_and_fix(&err);
    let log = w.output();
    assert!(log.contains("snapshot of table abandoned"), "{log}");
    assert_names_rls_and_fix(&log);
    assert!(w.is_running(), "walnats stopped streaming:\n{log}");
    w.sigterm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_level_security_policy_runs_no_attacker_code_in_snapshots_pg15() {
    rls_policy(PgVersion::V15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_level_security_policy_runs_no_attacker_code_in_snapshots_pg18() {
    rls_policy(PgVersion::V18).await;
}
