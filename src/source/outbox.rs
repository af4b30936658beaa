//! The outbox tables against the catalog: that each `[[outbox]]` table
//! exists, is published, and has the configured columns with types an
//! outbox event can be made of. `walnats run` refuses to start on a
//! problem; `walnats check` lists the problems and the warnings.
//!
//! It reads the catalog over the SQL connection, never a row of the
//! table, and decides nothing about events (that is `event`'s). The
//! judging is pure ([`judge`]) so that every message is unit-tested.

use std::fmt;

use tokio_postgres::Client;

use super::setup::{self, quote_ident};
use crate::config::{OutboxConfig, OutboxSource, PostgresConfig, TableSelector};
use crate::error::{Result, pg_query_err};

/// One thing wrong (or worth a warning) with an outbox table, and its fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What is wrong, naming the table and the column.
    pub what: String,
    /// What would fix it.
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.fix)
    }
}

/// What stops `walnats run`: per table outbox, a table that is missing,
/// not a permanent table, not published (or would not be by the
/// publication walnats creates), or lacks a configured column, or whose
/// payload or aggregate type column has a type no event can be made of.
/// Message-prefix outboxes need nothing from the catalog.
pub async fn outbox_problems(
    sql: &Client,
    pg: &PostgresConfig,
    outboxes: &[OutboxConfig],
) -> Result<Vec<Finding>> {
    Ok(inspect(sql, pg, outboxes).await?.problems)
}

/// What `walnats check` warns about: a nullable aggregate type column,
/// and a publication row filter on an outbox table. (The replica
/// identity does not matter to events: inserts always carry the row.)
pub async fn outbox_warnings(
    sql: &Client,
    pg: &PostgresConfig,
    outboxes: &[OutboxConfig],
) -> Result<Vec<Finding>> {
    Ok(inspect(sql, pg, outboxes).await?.warnings)
}

#[derive(Debug, Default)]
struct Findings {
    problems: Vec<Finding>,
    warnings: Vec<Finding>,
}

impl Findings {
    fn problem(&mut self, what: String, fix: String) {
        self.problems.push(Finding { what, fix });
    }
    fn warning(&mut self, what: String, fix: String) {
        self.warnings.push(Finding { what, fix });
    }
}

async fn inspect(sql: &Client, pg: &PostgresConfig, outboxes: &[OutboxConfig]) -> Result<Findings> {
    let mut out = Findings::default();
    let tables: Vec<Outbox<'_>> = outboxes
        .iter()
        .enumerate()
        .filter_map(|(index, config)| match &config.source {
            OutboxSource::Table { schema, table } => Some(Outbox {
                index,
                config,
                schema,
                table,
            }),
            OutboxSource::MessagePrefix(_) => None,
        })
        .collect();
    if tables.is_empty() {
        return Ok(out);
    }
    let version = setup::server_version(sql).await?;
    let publication = Publication {
        name: &pg.publication,
        tables: &pg.tables,
        state: read_publication(sql, &pg.publication, version).await?,
    };
    publication.judge_inserts(&mut out);
    for o in &tables {
        let facts = read_table(sql, &publication, o, version).await?;
        judge(o, &publication, &facts, &mut out);
    }
    Ok(out)
}

/// One table outbox, with its place in the config (`outbox[index]`).
struct Outbox<'a> {
    index: usize,
    config: &'a OutboxConfig,
    schema: &'a str,
    table: &'a str,
}

impl Outbox<'_> {
    /// `schema.table`, for messages.
    fn shown(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Quoted, for the SQL of a fix.
    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(self.schema), quote_ident(self.table))
    }

    fn key(&self, name: &str) -> String {
        format!("outbox[{}].{name}", self.index)
    }

    /// (config key, column) for every column the events read.
    fn columns(&self) -> Vec<(&'static str, &str)> {
        let c = self.config;
        let mut cols = vec![
            ("id", c.id.as_str()),
            ("aggregate_type", c.aggregate_type.as_str()),
            ("aggregate_id", c.aggregate_id.as_str()),
            ("payload", c.payload.as_str()),
        ];
        cols.extend(c.headers.iter().map(|h| ("headers", h.as_str())));
        cols
    }
}

/// The publication, as configured and as the catalog has it.
struct Publication<'a> {
    name: &'a str,
    /// `postgres.tables`: what the publication holds when walnats creates it.
    tables: &'a [TableSelector],
    state: PubState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PubState {
    /// `walnats run` creates it (setup::ensure_publication).
    Missing,
    Exists {
        /// The operations in its `publish` option.
        publishes: Vec<&'static str>,
        /// `publish_via_partition_root` (PostgreSQL 13+).
        via_root: bool,
    },
}

impl Publication<'_> {
    fn judge_inserts(&self, out: &mut Findings) {
        let PubState::Exists { publishes, .. } = &self.state else {
            return;
        };
        if publishes.contains(&"insert") {
            return;
        }
        let mut with_insert = vec!["insert"];
        with_insert.extend(publishes.iter().copied());
        out.problem(
            format!(
                "publication {:?} does not publish inserts, so no outbox row would reach walnats",
                self.name
            ),
            format!(
                "ALTER PUBLICATION {} SET (publish = '{}')",
                quote_ident(self.name),
                with_insert.join(", ")
            ),
        );
    }
}

/// Whether the publication walnats creates from `postgres.tables` (see
/// `setup::create_publication_sql`) holds the table: all tables when the
/// list is empty, else a `schema.table` or `schema.*` entry naming it
/// exactly (the names are quoted when created, so case counts).
fn would_publish(tables: &[TableSelector], schema: &str, table: &str) -> bool {
    tables.is_empty()
        || tables
            .iter()
            .any(|t| t.schema == schema && t.table.as_deref().is_none_or(|n| n == table))
}

/// What the catalog says about one outbox table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TableFacts {
    /// `None`: no relation of that name.
    relation: Option<Relation>,
    /// The publication's entry for the table: `None` when it has none or
    /// does not exist yet.
    listed: Option<Listed>,
    /// The configured columns that exist (not dropped).
    columns: Vec<ColumnFacts>,
    /// `server_version_num`.
    version: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Relation {
    /// `pg_class.relkind`.
    kind: u8,
    /// `pg_class.relpersistence`: `p`ermanent, `u`nlogged, `t`emporary.
    persistence: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    /// The columns it publishes (`attnames`, PostgreSQL 15+); `None`
    /// before 15, where every column but generated ones is.
    columns: Option<Vec<String>>,
    row_filter: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ColumnFacts {
    name: String,
    /// Its declared type as PostgreSQL prints it (`character varying(20)`,
    /// a domain's name).
    declared: String,
    /// The type under any domains.
    base: BaseType,
    /// Whether the declared type is a domain.
    domain: bool,
    /// NOT NULL on the column or on any domain over it.
    not_null: bool,
    generated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct BaseType {
    /// Its schema: `pg_catalog` for a built-in type.
    schema: String,
    /// `pg_type.typname` (`int4`, `varchar`, `bpchar`).
    name: String,
    /// As PostgreSQL prints it (`integer`).
    shown: String,
}

impl ColumnFacts {
    fn shown_type(&self) -> String {
        if self.domain {
            format!("{} (a domain over {})", self.declared, self.base.shown)
        } else {
            self.declared.clone()
        }
    }
}

/// The payload types outbox bodies are made of (under any domains):
/// json and jsonb as JSON, text and varchar as text, bytea as bytes.
fn payload_type_fits(t: &BaseType) -> bool {
    t.schema == "pg_catalog"
        && matches!(
            t.name.as_str(),
            "json" | "jsonb" | "text" | "varchar" | "bytea"
        )
}

/// Text-like types an aggregate type (a subject token) is read from.
/// citext is an extension's type, installed in any schema. Not char(n):
/// PostgreSQL pads it with spaces, which would become part of the subject.
fn aggregate_type_fits(t: &BaseType) -> bool {
    t.schema == "pg_catalog" && matches!(t.name.as_str(), "text" | "varchar" | "name")
        || t.name == "citext"
}

const PAYLOAD_TYPES: &str = "json, jsonb, text, varchar or bytea";
const AGGREGATE_TYPES: &str =
    "text, varchar, name or citext (not char(n): its padding would be part of the subject)";

fn relkind_name(kind: u8) -> &'static str {
    match kind {
        b'v' => "a view",
        b'm' => "a materialized view",
        b'f' => "a foreign table",
        b'S' => "a sequence",
        b'i' | b'I' => "an index",
        b'c' => "a composite type",
        b't' => "a TOAST table",
        _ => "not a table",
    }
}

/// Everything wrong with one outbox table, from what the catalog said.
fn judge(o: &Outbox<'_>, publication: &Publication<'_>, facts: &TableFacts, out: &mut Findings) {
    let shown = o.shown();
    let Some(rel) = facts.relation else {
        out.problem(
            format!("outbox table {shown} does not exist"),
            format!("create it, or fix {}", o.key("table")),
        );
        return;
    };
    if !matches!(rel.kind, b'r' | b'p') {
        out.problem(
            format!(
                "outbox table {shown} is {}, not a table",
                relkind_name(rel.kind)
            ),
            format!("set {} to a table", o.key("table")),
        );
        return;
    }
    match rel.persistence {
        b'u' => out.problem(
            format!(
                "outbox table {shown} is unlogged: its rows never reach the WAL, so no event would"
            ),
            format!("ALTER TABLE {} SET LOGGED", o.qualified()),
        ),
        b't' => out.problem(
            format!("outbox table {shown} is a temporary table: its rows are never published"),
            format!("set {} to a permanent table", o.key("table")),
        ),
        _ => judge_membership(o, publication, facts, rel, out),
    }
    judge_columns(o, publication, facts, out);
}

/// Whether the publication holds the table under its own name.
fn judge_membership(
    o: &Outbox<'_>,
    publication: &Publication<'_>,
    facts: &TableFacts,
    rel: Relation,
    out: &mut Findings,
) {
    let shown = o.shown();
    let name = publication.name;
    let partitioned = rel.kind == b'p';
    // A partitioned table's rows are published under each partition's
    // name unless publish_via_partition_root is on, and events are
    // recognised by the outbox table's name.
    match (&publication.state, &facts.listed) {
        (PubState::Missing, _) if !would_publish(publication.tables, o.schema, o.table) => out
            .problem(
                format!(
                    "outbox table {shown} is not in postgres.tables, so publication {name:?} as walnats creates it \
                     would not publish it"
                ),
                format!(
                    "add \"{shown}\" to postgres.tables, or create publication {name:?} yourself with the table in it"
                ),
            ),
        (PubState::Missing, _) if partitioned => out.problem(
            format!(
                "outbox table {shown} is partitioned, and publication {name:?} as walnats creates it would \
                 publish its rows under each partition's name"
            ),
            format!(
                "create publication {name:?} yourself, with the table in it and WITH (publish_via_partition_root = true)"
            ),
        ),
        (PubState::Missing, _) => {}
        (PubState::Exists { via_root: false, .. }, None) if partitioned => out.problem(
            format!(
                "outbox table {shown} is partitioned, and publication {name:?} publishes its rows under each \
                 partition's name"
            ),
            format!(
                "ALTER PUBLICATION {} SET (publish_via_partition_root = true) (other partitioned tables in it \
                 are then published under their root's name too), and ADD TABLE {} if it is not in it",
                quote_ident(name),
                o.qualified()
            ),
        ),
        (PubState::Exists { .. }, None) => out.problem(
            format!("outbox table {shown} is not in publication {name:?}"),
            format!(
                "ALTER PUBLICATION {} ADD TABLE {}",
                quote_ident(name),
                o.qualified()
            ),
        ),
        (PubState::Exists { .. }, Some(listed)) => {
            if listed.row_filter {
                out.warning(
                    format!(
                        "publication {name:?} has a row filter on outbox table {shown}: the rows it leaves out \
                         are never published as events"
                    ),
                    "drop the filter, unless leaving those events out is meant".to_owned(),
                );
            }
        }
    }
}

fn judge_columns(
    o: &Outbox<'_>,
    publication: &Publication<'_>,
    facts: &TableFacts,
    out: &mut Findings,
) {
    let shown = o.shown();
    for (key, name) in o.columns() {
        let key = o.key(key);
        let Some(col) = facts.columns.iter().find(|c| c.name == name) else {
            out.problem(
                format!("outbox table {shown} has no column {name} ({key})"),
                format!("add the column to {shown}, or {}", instead(&key)),
            );
            continue;
        };
        judge_sent(o, publication, facts, col, &key, out);
        if key.ends_with(".payload") && !payload_type_fits(&col.base) {
            out.problem(
                format!(
                    "column {name} of outbox table {shown} is {}: a payload must be {PAYLOAD_TYPES}",
                    col.shown_type()
                ),
                format!(
                    "ALTER TABLE {} ALTER COLUMN {} TYPE jsonb (with a USING clause if needed), \
                     or set {key} to a column of one of those types",
                    o.qualified(),
                    quote_ident(name)
                ),
            );
        }
        if key.ends_with(".aggregate_type") {
            if !aggregate_type_fits(&col.base) {
                out.problem(
                    format!(
                        "column {name} of outbox table {shown} is {}: an aggregate type must be {AGGREGATE_TYPES}",
                        col.shown_type()
                    ),
                    format!(
                        "ALTER TABLE {} ALTER COLUMN {} TYPE text, or set {key} to a column of one of those types",
                        o.qualified(),
                        quote_ident(name)
                    ),
                );
            }
            if !col.not_null {
                out.warning(
                    format!(
                        "column {name} of outbox table {shown} is nullable: a row with a NULL (or empty) \
                         aggregate type stops walnats at that row"
                    ),
                    format!(
                        "ALTER TABLE {table} ALTER COLUMN {col} SET NOT NULL, and ADD CHECK ({col} <> '')",
                        table = o.qualified(),
                        col = quote_ident(name)
                    ),
                );
            }
        }
    }
}

/// The other way out of a column that does not fit: another column, or
/// none for a header.
fn instead(key: &str) -> String {
    if key.ends_with(".headers") {
        format!("take it out of {key}")
    } else {
        format!("set {key} to another column")
    }
}

/// Whether pgoutput sends the column: generated columns only on
/// PostgreSQL 18+ and when the publication publishes them; others when
/// the publication has no column list or lists them.
fn judge_sent(
    o: &Outbox<'_>,
    publication: &Publication<'_>,
    facts: &TableFacts,
    col: &ColumnFacts,
    key: &str,
    out: &mut Findings,
) {
    let listed = facts.listed.as_ref().and_then(|l| l.columns.as_ref());
    let generated_sent = facts.version >= 180_000 && listed.is_some();
    let in_list = listed.is_none_or(|names| names.contains(&col.name));
    let shown = o.shown();
    let name = &col.name;
    if col.generated && !(generated_sent && in_list) {
        out.problem(
            format!(
                "column {name} of outbox table {shown} is generated, and pgoutput does not send it"
            ),
            format!(
                "make it a plain column{}, or {}",
                if facts.version >= 180_000 {
                    format!(
                        ", or ALTER PUBLICATION {} SET (publish_generated_columns = stored)",
                        quote_ident(publication.name)
                    )
                } else {
                    String::new()
                },
                instead(key)
            ),
        );
    } else if !in_list {
        out.problem(
            format!(
                "publication {:?} publishes a column list of outbox table {shown} without column {name}",
                publication.name
            ),
            format!("add {name} to the publication's column list for {shown}, or publish the table without one"),
        );
    }
}

async fn read_publication(sql: &Client, name: &str, version: u32) -> Result<PubState> {
    let truncate = if version >= 110_000 {
        "p.pubtruncate"
    } else {
        "false"
    };
    let via_root = if version >= 130_000 {
        "p.pubviaroot"
    } else {
        "false"
    };
    let q = format!(
        "SELECT p.pubinsert, p.pubupdate, p.pubdelete, {truncate}, {via_root} \
         FROM pg_catalog.pg_publication p WHERE p.pubname = $1"
    );
    let rows = sql
        .query(&q, &[&name])
        .await
        .map_err(|e| pg_query_err("reading the publication", e))?;
    let Some(r) = rows.first() else {
        return Ok(PubState::Missing);
    };
    let publishes = ["insert", "update", "delete", "truncate"]
        .into_iter()
        .enumerate()
        .filter(|&(i, _)| r.get::<_, bool>(i))
        .map(|(_, op)| op)
        .collect();
    Ok(PubState::Exists {
        publishes,
        via_root: r.get(4),
    })
}

async fn read_table(
    sql: &Client,
    publication: &Publication<'_>,
    o: &Outbox<'_>,
    version: u32,
) -> Result<TableFacts> {
    let mut facts = TableFacts {
        relation: None,
        listed: None,
        columns: Vec::new(),
        version,
    };
    let rows = sql
        .query(
            "SELECT c.oid::int8, c.relkind::text, c.relpersistence::text \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&o.schema, &o.table],
        )
        .await
        .map_err(|e| pg_query_err("looking up an outbox table", e))?;
    let Some(r) = rows.first() else {
        return Ok(facts);
    };
    let oid: i64 = r.get(0);
    let first = |i: usize| r.get::<_, String>(i).bytes().next().unwrap_or(b'?');
    facts.relation = Some(Relation {
        kind: first(1),
        persistence: first(2),
    });
    if publication.state != PubState::Missing {
        facts.listed = read_listed(sql, publication.name, o, version).await?;
    }
    facts.columns = read_columns(sql, oid, o, version).await?;
    Ok(facts)
}

/// The publication's entry for the table (pg_publication_tables lists
/// what it publishes whatever the way: FOR TABLE, TABLES IN SCHEMA, FOR
/// ALL TABLES, and a partitioned table's partitions or root).
async fn read_listed(
    sql: &Client,
    publication: &str,
    o: &Outbox<'_>,
    version: u32,
) -> Result<Option<Listed>> {
    let (attnames, rowfilter) = if version >= 150_000 {
        ("pt.attnames::text[]", "pt.rowfilter IS NOT NULL")
    } else {
        ("NULL::text[]", "false")
    };
    let q = format!(
        "SELECT {attnames}, {rowfilter} FROM pg_catalog.pg_publication_tables pt \
         WHERE pt.pubname = $1 AND pt.schemaname = $2 AND pt.tablename = $3"
    );
    let rows = sql
        .query(&q, &[&publication, &o.schema, &o.table])
        .await
        .map_err(|e| pg_query_err("reading the publication's tables", e))?;
    Ok(rows.first().map(|r| Listed {
        columns: r.get(0),
        row_filter: r.get(1),
    }))
}

/// The configured columns that exist, each with its type under any
/// domains (walked in SQL: a domain may be over a domain) and whether it
/// or a domain over it is NOT NULL.
async fn read_columns(
    sql: &Client,
    oid: i64,
    o: &Outbox<'_>,
    version: u32,
) -> Result<Vec<ColumnFacts>> {
    let generated = if version >= 120_000 {
        "a.attgenerated <> ''"
    } else {
        "false"
    };
    let names: Vec<&str> = o.columns().into_iter().map(|(_, name)| name).collect();
    let q = format!(
        "WITH RECURSIVE col AS ( \
             SELECT a.attnum, a.attname, a.atttypid, a.atttypmod, a.attnotnull AS not_null, \
                    {generated} AS generated, a.atttypid AS typ, 0 AS depth \
             FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped \
               AND a.attname::text = ANY($2::text[]) \
           UNION ALL \
             SELECT col.attnum, col.attname, col.atttypid, col.atttypmod, col.not_null OR t.typnotnull, \
                    col.generated, t.typbasetype, col.depth + 1 \
             FROM col JOIN pg_catalog.pg_type t ON t.oid = col.typ \
             WHERE t.typtype = 'd' \
         ) \
         SELECT DISTINCT ON (col.attnum) col.attname::text, \
                pg_catalog.format_type(col.atttypid, col.atttypmod), col.depth > 0, \
                n.nspname::text, t.typname::text, pg_catalog.format_type(col.typ, NULL), \
                col.not_null, col.generated \
         FROM col JOIN pg_catalog.pg_type t ON t.oid = col.typ \
         JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace \
         ORDER BY col.attnum, col.depth DESC"
    );
    let rows = sql
        .query(&q, &[&oid, &names])
        .await
        .map_err(|e| pg_query_err("reading an outbox table's columns", e))?;
    Ok(rows
        .iter()
        .map(|r| ColumnFacts {
            name: r.get(0),
            declared: r.get(1),
            domain: r.get(2),
            base: BaseType {
                schema: r.get(3),
                name: r.get(4),
                shown: r.get(5),
            },
            not_null: r.get(6),
            generated: r.get(7),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(schema: &str, name: &str) -> BaseType {
        BaseType {
            schema: schema.into(),
            name: name.into(),
            shown: name.into(),
        }
    }

    #[test]
    fn payload_types_are_json_text_or_bytes_under_any_domain() {
        for t in ["json", "jsonb", "text", "varchar", "bytea"] {
            assert!(payload_type_fits(&base("pg_catalog", t)), "{t}");
        }
        for t in ["int4", "bpchar", "name", "xml", "_text", "_jsonb", "uuid"] {
            assert!(!payload_type_fits(&base("pg_catalog", t)), "{t}");
        }
        // A type someone created under a built-in's name is not it.
        assert!(!payload_type_fits(&base("public", "jsonb")));
        assert!(!payload_type_fits(&base("public", "citext")));
    }

    #[test]
    fn aggregate_types_are_text_like() {
        for t in ["text", "varchar", "name"] {
            assert!(aggregate_type_fits(&base("pg_catalog", t)), "{t}");
        }
        // citext lives wherever its extension was installed.
        assert!(aggregate_type_fits(&base("public", "citext")));
        assert!(aggregate_type_fits(&base("ext", "citext")));
        // char(n) pads: 'order' in a char(10) would route to "order     ".
        for t in ["int4", "uuid", "jsonb", "bytea", "char", "bpchar", "_text"] {
            assert!(!aggregate_type_fits(&base("pg_catalog", t)), "{t}");
        }
        assert!(!aggregate_type_fits(&base("public", "text")));
    }

    fn sel(schema: &str, table: Option<&str>) -> TableSelector {
        TableSelector {
            schema: schema.into(),
            table: table.map(Into::into),
        }
    }

    #[test]
    fn the_created_publication_holds_what_postgres_tables_selects() {
        assert!(would_publish(&[], "public", "outbox"));
        let tables = [sel("public", Some("orders")), sel("events", None)];
        assert!(!would_publish(&tables, "public", "outbox"));
        assert!(would_publish(&tables, "events", "outbox"));
        assert!(would_publish(&tables, "public", "orders"));
        // Names are quoted when the publication is created: case counts.
        assert!(!would_publish(&tables, "public", "Orders"));
        assert!(!would_publish(&tables, "Events", "outbox"));
    }

    fn config() -> OutboxConfig {
        OutboxConfig {
            source: OutboxSource::Table {
                schema: "public".into(),
                table: "outbox".into(),
            },
            id: "id".into(),
            aggregate_type: "aggregatetype".into(),
            aggregate_id: "aggregateid".into(),
            payload: "payload".into(),
            headers: vec!["trace".into()],
        }
    }

    fn col(name: &str, typ: &str) -> ColumnFacts {
        ColumnFacts {
            name: name.into(),
            declared: typ.into(),
            base: base("pg_catalog", typ),
            domain: false,
            not_null: true,
            generated: false,
        }
    }

    fn good_table() -> TableFacts {
        TableFacts {
            relation: Some(Relation {
                kind: b'r',
                persistence: b'p',
            }),
            listed: Some(Listed {
                columns: None,
                row_filter: false,
            }),
            columns: vec![
                col("id", "uuid"),
                col("aggregatetype", "text"),
                col("aggregateid", "text"),
                col("payload", "jsonb"),
                col("trace", "text"),
            ],
            version: 150_000,
        }
    }

    /// A fitting table of another kind or persistence, not in the
    /// publication.
    fn unlisted(kind: u8, persistence: u8) -> TableFacts {
        TableFacts {
            relation: Some(Relation { kind, persistence }),
            listed: None,
            ..good_table()
        }
    }

    fn existing() -> PubState {
        PubState::Exists {
            publishes: vec!["insert", "update", "delete", "truncate"],
            via_root: false,
        }
    }

    /// The findings for outbox[1] = `config` against `facts`.
    fn findings(
        config: &OutboxConfig,
        state: PubState,
        tables: &[TableSelector],
        facts: &TableFacts,
    ) -> Findings {
        let OutboxSource::Table { schema, table } = &config.source else {
            unreachable!("a table outbox")
        };
        let o = Outbox {
            index: 1,
            config,
            schema,
            table,
        };
        let publication = Publication {
            name: "walnats",
            tables,
            state,
        };
        let mut out = Findings::default();
        publication.judge_inserts(&mut out);
        judge(&o, &publication, facts, &mut out);
        out
    }

    fn one(list: &[Finding]) -> &Finding {
        assert_eq!(list.len(), 1, "{list:#?}");
        &list[0]
    }

    /// The one problem with `facts` in an existing publication.
    fn the_problem(facts: &TableFacts) -> Finding {
        let out = findings(&config(), existing(), &[], facts);
        one(&out.problems).clone()
    }

    #[test]
    fn a_fitting_table_has_no_problem_and_no_warning() {
        let out = findings(&config(), existing(), &[], &good_table());
        assert!(out.problems.is_empty(), "{:#?}", out.problems);
        assert!(out.warnings.is_empty(), "{:#?}", out.warnings);
        // Nor when walnats is about to create the publication for all tables.
        let mut facts = good_table();
        facts.listed = None;
        let out = findings(&config(), PubState::Missing, &[], &facts);
        assert!(out.problems.is_empty(), "{:#?}", out.problems);
    }

    #[test]
    fn a_missing_column_names_the_column_and_the_key() {
        let mut facts = good_table();
        facts
            .columns
            .retain(|c| c.name != "payload" && c.name != "trace");
        let out = findings(&config(), existing(), &[], &facts);
        assert_eq!(out.problems.len(), 2, "{:#?}", out.problems);
        let p = &out.problems[0];
        assert_eq!(
            p.what,
            "outbox table public.outbox has no column payload (outbox[1].payload)"
        );
        assert_eq!(
            p.fix,
            "add the column to public.outbox, or set outbox[1].payload to another column"
        );
        let h = &out.problems[1];
        assert!(
            h.what.contains("no column trace (outbox[1].headers)"),
            "{h}"
        );
        assert!(h.fix.contains("take it out of outbox[1].headers"), "{h}");
    }

    #[test]
    fn a_payload_of_another_type_is_refused_with_its_type() {
        let mut facts = good_table();
        facts.columns[3] = col("payload", "integer");
        facts.columns[3].base = base("pg_catalog", "int4");
        let p = the_problem(&facts);
        assert_eq!(
            p.what,
            "column payload of outbox table public.outbox is integer: a payload must be json, jsonb, text, \
             varchar or bytea"
        );
        assert!(
            p.fix.starts_with(
                "ALTER TABLE \"public\".\"outbox\" ALTER COLUMN \"payload\" TYPE jsonb"
            ) && p
                .fix
                .ends_with("or set outbox[1].payload to a column of one of those types"),
            "{p}"
        );
    }

    #[test]
    fn a_domain_counts_as_its_base_type() {
        let mut facts = good_table();
        facts.columns[3].declared = "body".into();
        facts.columns[3].domain = true;
        let out = findings(&config(), existing(), &[], &facts);
        assert!(out.problems.is_empty(), "{:#?}", out.problems);
        facts.columns[3].base = base("pg_catalog", "xml");
        let out = findings(&config(), existing(), &[], &facts);
        assert!(
            one(&out.problems)
                .what
                .contains("is body (a domain over xml)"),
            "{:#?}",
            out.problems
        );
    }

    #[test]
    fn an_aggregate_type_must_be_text_like_and_is_warned_about_when_nullable() {
        let mut facts = good_table();
        facts.columns[1] = col("aggregatetype", "int4");
        facts.columns[1].not_null = false;
        let out = findings(&config(), existing(), &[], &facts);
        let p = one(&out.problems);
        assert!(
            p.what
                .contains("column aggregatetype of outbox table public.outbox is int4"),
            "{p}"
        );
        assert!(
            p.what
                .contains("text, varchar, name or citext (not char(n)"),
            "{p}"
        );
        let w = one(&out.warnings);
        assert!(
            w.what.contains("aggregatetype") && w.what.contains("nullable"),
            "{w}"
        );
        assert_eq!(
            w.fix,
            "ALTER TABLE \"public\".\"outbox\" ALTER COLUMN \"aggregatetype\" SET NOT NULL, \
             and ADD CHECK (\"aggregatetype\" <> '')"
        );
    }

    #[test]
    fn a_table_that_is_missing_or_not_a_table_stops_there() {
        let facts = TableFacts {
            relation: None,
            listed: None,
            columns: Vec::new(),
            version: 150_000,
        };
        let p = the_problem(&facts);
        assert_eq!(
            p.to_string(),
            "outbox table public.outbox does not exist: create it, or fix outbox[1].table"
        );
        let facts = unlisted(b'v', b'p');
        assert_eq!(
            the_problem(&facts).what,
            "outbox table public.outbox is a view, not a table"
        );
    }

    #[test]
    fn an_unlogged_table_is_refused() {
        let facts = unlisted(b'r', b'u');
        assert_eq!(
            the_problem(&facts).fix,
            "ALTER TABLE \"public\".\"outbox\" SET LOGGED"
        );
    }

    #[test]
    fn a_table_outside_the_publication_is_refused_with_the_fix() {
        let mut facts = good_table();
        facts.listed = None;
        assert_eq!(
            the_problem(&facts).to_string(),
            "outbox table public.outbox is not in publication \"walnats\": \
             ALTER PUBLICATION \"walnats\" ADD TABLE \"public\".\"outbox\""
        );
        // Missing, and postgres.tables would not put it in.
        let tables = [sel("public", Some("orders"))];
        let out = findings(&config(), PubState::Missing, &tables, &facts);
        let p = one(&out.problems);
        assert!(p.what.contains("not in postgres.tables"), "{p}");
        assert!(
            p.fix
                .starts_with("add \"public.outbox\" to postgres.tables"),
            "{p}"
        );
        // Missing, and postgres.tables selects its schema.
        let out = findings(&config(), PubState::Missing, &[sel("public", None)], &facts);
        assert!(out.problems.is_empty(), "{:#?}", out.problems);
    }

    #[test]
    fn a_publication_without_inserts_is_refused_keeping_its_other_operations() {
        let state = PubState::Exists {
            publishes: vec!["update", "delete"],
            via_root: false,
        };
        let out = findings(&config(), state, &[], &good_table());
        assert_eq!(
            one(&out.problems).fix,
            "ALTER PUBLICATION \"walnats\" SET (publish = 'insert, update, delete')"
        );
    }

    #[test]
    fn a_partitioned_table_needs_publish_via_partition_root() {
        let mut facts = unlisted(b'p', b'p');
        let out = findings(&config(), existing(), &[], &facts);
        assert!(
            one(&out.problems)
                .fix
                .contains("publish_via_partition_root = true"),
            "{:#?}",
            out.problems
        );
        let out = findings(&config(), PubState::Missing, &[], &facts);
        assert!(
            one(&out.problems)
                .fix
                .contains("publish_via_partition_root = true"),
            "{:#?}",
            out.problems
        );
        // Published through its root: fine.
        let via_root = PubState::Exists {
            publishes: vec!["insert"],
            via_root: true,
        };
        facts.listed = good_table().listed;
        let out = findings(&config(), via_root, &[], &facts);
        assert!(out.problems.is_empty(), "{:#?}", out.problems);
    }

    #[test]
    fn a_column_pgoutput_does_not_send_is_refused() {
        // Left out of the publication's column list.
        let mut facts = good_table();
        facts.listed = Some(Listed {
            columns: Some(vec![
                "id".into(),
                "aggregatetype".into(),
                "aggregateid".into(),
                "trace".into(),
            ]),
            row_filter: true,
        });
        let out = findings(&config(), existing(), &[], &facts);
        let p = one(&out.problems);
        assert!(
            p.what.contains("column list") && p.what.contains("without column payload"),
            "{p}"
        );
        assert!(
            one(&out.warnings).what.contains("row filter"),
            "{:#?}",
            out.warnings
        );
        // Generated: not sent before PostgreSQL 18, though attnames lists it.
        let mut facts = good_table();
        facts.columns[4].generated = true;
        facts.listed = Some(Listed {
            columns: Some(facts.columns.iter().map(|c| c.name.clone()).collect()),
            row_filter: false,
        });
        let p = the_problem(&facts);
        assert!(
            p.what
                .contains("column trace of outbox table public.outbox is generated"),
            "{p}"
        );
        assert!(!p.fix.contains("publish_generated_columns"), "{p}");
        assert!(
            p.fix.ends_with("or take it out of outbox[1].headers"),
            "{p}"
        );
        // PostgreSQL 18: sent when the publication lists it.
        facts.version = 180_000;
        let out = findings(&config(), existing(), &[], &facts);
        assert!(out.problems.is_empty(), "{:#?}", out.problems);
        facts.listed = Some(Listed {
            columns: Some(vec![
                "id".into(),
                "aggregatetype".into(),
                "aggregateid".into(),
                "payload".into(),
            ]),
            row_filter: false,
        });
        let out = findings(&config(), existing(), &[], &facts);
        assert!(
            one(&out.problems)
                .fix
                .contains("publish_generated_columns = stored"),
            "{:#?}",
            out.problems
        );
    }
}
