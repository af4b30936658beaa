//! What a snapshot reads: the published tables, their columns as pgoutput
//! would describe them, their primary keys, and the SQL that reads one
//! chunk of rows.
//!
//! Rows are read with the simple query protocol, so every value arrives as
//! the text its type's output function prints: the same bytes pgoutput's
//! text mode sends for a streamed change, under the same session settings.
//!
//! A table's owner may be anyone; what walnats reads runs as walnats' role,
//! so it must run none of the owner's code. The session has `search_path =
//! pg_catalog, pg_temp` and `row_security = off` (`source::replication`),
//! and here: every function and operator is `pg_catalog`'s, named so; a
//! table whose row-level security applies to walnats' role is refused (it
//! cannot be read without running its policies or hiding rows); the key
//! cursor compares in the key's type under its domains, never casting to a
//! domain (whose CHECK would run); and a key is read in key order only when
//! that type and its btree operator class are built into PostgreSQL (or
//! the type is an enum), so that ordering and comparing call no code that
//! a role other than the bootstrap superuser wrote. Any other table is read
//! by heap pages, as one without a primary key.

use futures::StreamExt;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::checkpoint::{Cursor, Span};
use crate::error::pg_query_err;
use crate::error::{Error, Kind, Result};
use crate::pgoutput::{Column, Oid, Relation, ReplicaIdentity, TupleData, TupleValue};
use crate::source::setup::quote_ident;

/// A published table, as the publication lists it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub oid: u32,
    pub schema: String,
    pub table: String,
    /// `reltuples`: the planner's estimate, for progress reports.
    pub estimate: u64,
}

/// The published tables of `publication`, in name order.
pub async fn published_tables(sql: &Client, publication: &str) -> Result<Vec<Listed>> {
    let rows = sql
        .query(
            "SELECT c.oid::int8, n.nspname::text, c.relname::text, greatest(c.reltuples, 0)::int8 \
             FROM pg_catalog.pg_publication_tables pt \
             JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname \
             JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
             WHERE pt.pubname = $1 ORDER BY 2, 3",
            &[&publication],
        )
        .await
        .map_err(|e| pg_query_err("listing the publication's tables", e))?;
    Ok(rows
        .iter()
        .map(|r| Listed {
            oid: u32::try_from(r.get::<_, i64>(0)).unwrap_or(0),
            schema: r.get(1),
            table: r.get(2),
            estimate: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
        })
        .collect())
}

/// How to read one table in chunks.
#[derive(Debug, Clone)]
pub struct TablePlan {
    /// The columns as pgoutput's Relation message would list them.
    pub relation: Relation,
    /// `"schema"."table"`.
    qualified: String,
    /// Published columns, then the primary key columns again (the cursor).
    select: String,
    /// Primary key columns in index order, when the table is read by key.
    pk: Vec<KeyColumn>,
    /// The same names, unquoted.
    pub pk_names: Vec<String>,
    /// Why a table with a primary key is read by heap pages all the same.
    pub unkeyed: Option<String>,
    /// The publication's row filter (PostgreSQL 15+), if any.
    row_filter: Option<String>,
    /// Heap pages when the snapshot started (tables without a primary key
    /// are read by page ranges).
    pub pages: u64,
    /// Row-level security applies to walnats' role (`current_user`, named
    /// here): the table cannot be read.
    row_security: Option<String>,
}

/// A primary key column the cursor compares.
#[derive(Debug, Clone)]
struct KeyColumn {
    /// The quoted name.
    name: String,
    /// The type a cursor value is cast to: the column's type under its
    /// domains, schema-qualified (`"pg_catalog"."int4"`: a qualified name
    /// also keeps `bit` and `char` from meaning `bit(1)` and `char(1)`).
    cast: String,
}

impl TablePlan {
    /// Whether the table is read in primary key order (the only way a
    /// re-read can work).
    pub fn has_primary_key(&self) -> bool {
        !self.pk.is_empty()
    }

    /// The refusal when row-level security applies to walnats' role.
    pub fn row_security_refusal(&self) -> Option<Error> {
        let role = self.row_security.as_ref()?;
        Some(Error::new(
            Kind::PgSetup,
            format!(
                "table {} has row-level security that applies to walnats' role {role:?}: walnats reads with \
                 row_security = off, so that no policy (code of the table's owner) runs as walnats and no row is \
                 hidden from the stream; ALTER ROLE {} BYPASSRLS, or make the role the table's owner (without \
                 FORCE ROW LEVEL SECURITY), or take the table out of the publication",
                self.qualified,
                quote_ident(role)
            ),
        ))
    }
}

/// The first OID `initdb` does not hand out: objects below it are built into
/// PostgreSQL (owned by the bootstrap superuser).
const FIRST_NORMAL_OID: i64 = 16_384;

/// The plan for one table, or `None` when it is gone or no longer published.
pub async fn plan(
    sql: &Client,
    publication: &str,
    oid: u32,
    server_version_num: u32,
) -> Result<Option<TablePlan>> {
    let pg15 = server_version_num >= 150_000;
    let (attnames, rowfilter) = if pg15 {
        ("pt.attnames::text[]", "pt.rowfilter::text")
    } else {
        ("NULL::text[]", "NULL::text")
    };
    let q = format!(
        "SELECT n.nspname::text, c.relname::text, c.relreplident::text, {attnames}, {rowfilter}, \
                (pg_catalog.pg_relation_size(c.oid) / pg_catalog.current_setting('block_size')::int8), \
                CASE WHEN pg_catalog.row_security_active(c.oid) THEN current_user::text END \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_catalog.pg_publication_tables pt ON pt.schemaname = n.nspname AND pt.tablename = c.relname \
         WHERE c.oid = $1::int8::oid AND pt.pubname = $2"
    );
    let rows = sql
        .query(&q, &[&i64::from(oid), &publication])
        .await
        .map_err(|e| pg_query_err("reading a published table's definition", e))?;
    let Some(t) = rows.first() else {
        return Ok(None);
    };
    let schema: String = t.get(0);
    let table: String = t.get(1);
    let ident: String = t.get(2);
    let published: Option<Vec<String>> = t.get(3);
    let row_filter: Option<String> = t.get(4);
    let pages = u64::try_from(t.get::<_, i64>(5)).unwrap_or(0);
    let row_security: Option<String> = t.get(6);
    let replica_identity = ident
        .bytes()
        .next()
        .and_then(ReplicaIdentity::from_byte)
        .unwrap_or(ReplicaIdentity::Default);

    // Columns as pgoutput sends them: not dropped, not generated, in the
    // publication's column list if it has one; the key flag from the
    // replica identity.
    let cols = sql
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod, \
                    COALESCE(CASE c.relreplident \
                        WHEN 'f' THEN true \
                        WHEN 'd' THEN a.attnum = ANY(pk.indkey::int2[]) \
                        WHEN 'i' THEN a.attnum = ANY(ri.indkey::int2[]) \
                        ELSE false END, false) \
             FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             LEFT JOIN pg_catalog.pg_index pk ON pk.indrelid = c.oid AND pk.indisprimary \
             LEFT JOIN pg_catalog.pg_index ri ON ri.indrelid = c.oid AND ri.indisreplident \
             WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&i64::from(oid)],
        )
        .await
        .map_err(|e| pg_query_err("reading a published table's columns", e))?;
    let mut columns = Vec::new();
    let mut select = Vec::new();
    for c in &cols {
        let name: String = c.get(0);
        let type_oid = u32::try_from(c.get::<_, i64>(1)).unwrap_or(0);
        if published.as_ref().is_some_and(|p| !p.contains(&name)) {
            continue;
        }
        let key: bool = c.get(3);
        select.push(quote_ident(&name));
        columns.push(Column {
            key,
            flags: u8::from(key),
            name,
            type_oid: Oid(type_oid),
            type_modifier: c.get(2),
        });
    }
    let (pk, unkeyed) = match primary_key(sql, oid, server_version_num).await? {
        Keys::Usable(pk) => (pk, None),
        Keys::Unusable(why) => (Vec::new(), Some(why)),
    };
    let pk_names: Vec<String> = pk.iter().map(|(n, _)| n.clone()).collect();
    let pk: Vec<KeyColumn> = pk
        .into_iter()
        .map(|(n, cast)| KeyColumn {
            name: quote_ident(&n),
            cast,
        })
        .collect();
    select.extend(pk.iter().map(|k| k.name.clone()));
    let select = if select.is_empty() {
        // A table with no published column still has rows.
        "NULL".to_owned()
    } else {
        select.join(", ")
    };
    Ok(Some(TablePlan {
        qualified: format!("{}.{}", quote_ident(&schema), quote_ident(&table)),
        relation: Relation {
            xid: None,
            oid: Oid(oid),
            namespace: schema,
            name: table,
            replica_identity,
            columns,
        },
        select,
        pk,
        pk_names,
        unkeyed,
        row_filter,
        pages,
        row_security,
    }))
}

/// A primary key the cursor can use: (name, cast) per column in index
/// order, empty without a primary key; or why it cannot be used.
enum Keys {
    Usable(Vec<(String, String)>),
    Unusable(String),
}

/// The primary key's columns, each with its type under any domains and its
/// btree operator class (a primary key's is always its type's default
/// one). `indkey` and `indclass` are vectors whose subscripts start at 0;
/// INCLUDE columns (PostgreSQL 11+) follow the key columns.
async fn primary_key(sql: &Client, oid: u32, server_version_num: u32) -> Result<Keys> {
    let nkeys = if server_version_num >= 110_000 {
        "i.indnkeyatts"
    } else {
        "i.indnatts"
    };
    let q = format!(
        "WITH RECURSIVE k AS ( \
             SELECT s.n, a.attname, a.atttypid, i.indclass[s.n] AS opclass \
             FROM pg_catalog.pg_index i \
             CROSS JOIN LATERAL pg_catalog.generate_series(0, {nkeys} - 1) AS s(n) \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[s.n] \
             WHERE i.indrelid = $1::int8::oid AND i.indisprimary \
         ), base AS ( \
             SELECT k.n, k.atttypid AS typ, 0 AS depth FROM k \
             UNION ALL \
             SELECT base.n, t.typbasetype, base.depth + 1 \
             FROM base JOIN pg_catalog.pg_type t ON t.oid = base.typ \
             WHERE t.typtype = 'd' AND base.depth < 64 \
         ) \
         SELECT k.attname::text, t.oid::int8, t.typtype::text, tn.nspname::text, t.typname::text, \
                k.opclass::int8, pg_catalog.format_type(k.atttypid, NULL) \
         FROM k JOIN base ON base.n = k.n \
         JOIN pg_catalog.pg_type t ON t.oid = base.typ AND t.typtype <> 'd' \
         JOIN pg_catalog.pg_namespace tn ON tn.oid = t.typnamespace \
         ORDER BY k.n"
    );
    let rows = sql
        .query(&q, &[&i64::from(oid)])
        .await
        .map_err(|e| pg_query_err("reading a published table's primary key", e))?;
    let mut keys = Vec::with_capacity(rows.len());
    for r in &rows {
        let name: String = r.get(0);
        let shown: String = r.get(6);
        let key = KeyType {
            type_oid: r.get(1),
            enum_type: r.get::<_, String>(2) == "e",
            opclass: r.get(5),
        };
        if let Some(why) = key.unusable() {
            return Ok(Keys::Unusable(format!(
                "its primary key column {name:?} is of type {shown}, {why}"
            )));
        }
        let (schema, typname): (String, String) = (r.get(3), r.get(4));
        keys.push((
            name,
            format!("{}.{}", quote_ident(&schema), quote_ident(&typname)),
        ));
    }
    Ok(Keys::Usable(keys))
}

/// What decides whether a key column can be compared without running code
/// that another role wrote.
struct KeyType {
    /// The type under any domains.
    type_oid: i64,
    enum_type: bool,
    /// Its btree operator class.
    opclass: i64,
}

impl KeyType {
    /// Why the cursor cannot compare this column, if it cannot. A type built
    /// into PostgreSQL has built-in input and comparison functions, and so
    /// has an enum (its labels' order is data); anything else (an
    /// extension's type, a composite, a range, an array of a domain) may
    /// call its creator's code when a cursor value is cast to it or
    /// compared (a domain's CHECK inside it, an extension's operator class).
    fn unusable(&self) -> Option<&'static str> {
        if self.type_oid >= FIRST_NORMAL_OID && !self.enum_type {
            return Some(
                "which (under its domains) is neither built into PostgreSQL nor an enum: casting and comparing \
                 it could run code that its creator wrote",
            );
        }
        if self.opclass >= FIRST_NORMAL_OID {
            return Some(
                "whose btree operator class is not built into PostgreSQL: ordering by it would run code that \
                 its creator wrote",
            );
        }
        None
    }
}

/// A SQL string literal that means the same whatever
/// `standard_conforming_strings` says.
fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for ch in s.chars() {
        match ch {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Where a table's read stands: the primary key of the last row read, or
/// the first heap page not read yet.
/// One chunk of rows and where the next one starts.
pub struct Chunk {
    pub rows: Vec<TupleData>,
    /// The primary key of each row, as text (empty without a key).
    pub keys: Vec<Vec<String>>,
    pub end: Cursor,
    /// Nothing follows in this table.
    pub last: bool,
}

/// Heap pages per chunk for tables without a primary key: at most 291
/// tuples fit on an 8 KiB page, so three pages stay under a batch.
const PAGES_PER_CHUNK: u64 = 3;

/// Tuples an 8 KiB heap page holds at most.
const TUPLES_PER_PAGE: u64 = 291;

/// Heap pages per chunk for `limit` rows: 1 to 3.
fn pages_per_chunk(limit: usize) -> u64 {
    (limit as u64 / TUPLES_PER_PAGE).clamp(1, PAGES_PER_CHUNK)
}

/// A table smaller than this many heap pages (4 MiB) is one work unit.
pub const MIN_RANGE_PAGES: u64 = 512;

/// Heap pages a key sample reads, about.
const SAMPLE_PAGES: u64 = 64;

/// Where to split a big table into about `n` ranges of its own: by the
/// leading primary key column, at values sampled from the table
/// (`TABLESAMPLE SYSTEM` of some 64 pages, sorted with pg_catalog's
/// operator), or by heap pages for a table read by pages. Empty: read the
/// table as one unit.
pub async fn split(sql: &Client, plan: &TablePlan, n: usize) -> Result<Vec<Span>> {
    if n < 2 || plan.pages < 2 * MIN_RANGE_PAGES {
        return Ok(Vec::new());
    }
    let Some(lead) = plan.pk.first() else {
        return Ok(page_spans(plan.pages, n));
    };
    let pct = (100.0 * SAMPLE_PAGES as f64 / plan.pages as f64).min(100.0);
    let q = format!(
        "SELECT {k} FROM {t} TABLESAMPLE SYSTEM ({pct:.6}) ORDER BY {k} USING OPERATOR(pg_catalog.<)",
        k = lead.name,
        t = plan.qualified
    );
    let msgs = sql.simple_query(&q).await.map_err(|e| read_err(plan, e))?;
    let sample: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    Ok(key_spans(&sample, n))
}

/// `n` ranges of heap pages; the last runs to the table's end (pages
/// added since are read too, as a table read whole would).
fn page_spans(pages: u64, n: usize) -> Vec<Span> {
    let n = n as u64;
    (0..n)
        .map(|i| Span::Page {
            from: i * pages / n,
            to: (i + 1 < n).then(|| (i + 1) * pages / n),
        })
        .collect()
}

/// `n` ranges at the quantiles of a sorted `sample` of the leading key
/// column (fewer when values repeat); empty when it cannot split.
fn key_spans(sample: &[String], n: usize) -> Vec<Span> {
    let mut points: Vec<&String> = (1..n)
        .filter_map(|i| sample.get(i * sample.len() / n))
        .collect();
    points.dedup();
    if points.is_empty() {
        return Vec::new();
    }
    let mut spans = Vec::with_capacity(points.len() + 1);
    let mut above = None;
    for p in points {
        spans.push(Span::Key {
            above: above.clone(),
            upto: Some(p.clone()),
        });
        above = Some(p.clone());
    }
    spans.push(Span::Key { above, upto: None });
    spans
}

/// The page a chunk read by heap pages ends before, and the page its range
/// ends at (none: the table's end).
type PageEnd = (u64, Option<u64>);

/// The SELECT of one chunk, and, when the table is read by heap pages, the
/// page it ends before and the page where its range ends (none: the
/// table's end).
fn chunk_query(
    plan: &TablePlan,
    span: Option<&Span>,
    after: &Cursor,
    limit: usize,
) -> Result<(String, Option<PageEnd>)> {
    let filter = plan
        .row_filter
        .as_ref()
        .map(|f| format!("({f})"))
        .unwrap_or_else(|| "true".to_owned());
    let (query, page_end) = if plan.has_primary_key() {
        // Sorting and the cursor use the same operators, pg_catalog's for
        // the key's type under its domains: the cursor value is cast to
        // that type, never to a domain (whose CHECK would run).
        let names: Vec<&str> = plan.pk.iter().map(|k| k.name.as_str()).collect();
        let order: Vec<String> = names
            .iter()
            .map(|n| format!("{n} USING OPERATOR(pg_catalog.<)"))
            .collect();
        let order = order.join(", ");
        let from = match after {
            Cursor::Key { values } if values.len() == plan.pk.len() => {
                let lits: Vec<String> = values
                    .iter()
                    .zip(&plan.pk)
                    .map(|(v, k)| format!("{}::{}", literal(v), k.cast))
                    .collect();
                format!(
                    " AND ({}) OPERATOR(pg_catalog.>) ({})",
                    names.join(", "),
                    lits.join(", ")
                )
            }
            Cursor::Start => String::new(),
            other => {
                return Err(not_by_key(plan, &format!("{other:?}")));
            }
        };
        let lead = plan.pk.first().map(|k| (k.name.as_str(), k.cast.as_str()));
        let range = match (span, lead) {
            (None, _) => String::new(),
            (Some(Span::Key { above, upto }), Some((name, cast))) => {
                let mut r = String::new();
                if let Some(a) = above {
                    r.push_str(&format!(
                        " AND {name} OPERATOR(pg_catalog.>) {}::{cast}",
                        literal(a)
                    ));
                }
                if let Some(u) = upto {
                    r.push_str(&format!(
                        " AND {name} OPERATOR(pg_catalog.<=) {}::{cast}",
                        literal(u)
                    ));
                }
                r
            }
            (Some(other), _) => {
                return Err(not_by_key(plan, &format!("the range {other:?}")));
            }
        };
        let from = format!("{from}{range}");
        (
            format!(
                "SELECT {} FROM {} WHERE {filter}{from} ORDER BY {order} LIMIT {limit}",
                plan.select, plan.qualified
            ),
            None,
        )
    } else {
        let (from, to) = match span {
            None => (0, None),
            Some(Span::Page { from, to }) => (*from, *to),
            Some(Span::Key { .. }) => {
                return Err(Error::new(
                    Kind::Checkpoint,
                    format!(
                        "the snapshot of {} resumes in a range of primary key values, but the table can no \
                         longer be read by key ({}): run `walnats slot drop --yes` and take a new snapshot",
                        plan.qualified,
                        plan.unkeyed
                            .as_deref()
                            .unwrap_or("it has no primary key now")
                    ),
                ));
            }
        };
        let start = match after {
            Cursor::Page { page } => *page,
            Cursor::Start => from,
            Cursor::Key { .. } => {
                // Read by key before: starting over by page would publish
                // the rows already read again.
                return Err(Error::new(
                    Kind::Checkpoint,
                    format!(
                        "the snapshot of {} resumes after a primary key, but the table can no longer be read \
                         by key ({}): run `walnats slot drop --yes` and take a new snapshot",
                        plan.qualified,
                        plan.unkeyed
                            .as_deref()
                            .unwrap_or("it has no primary key now")
                    ),
                ));
            }
        };
        let mut end = start + pages_per_chunk(limit);
        if let Some(to) = to {
            end = end.min(to);
        }
        (
            format!(
                "SELECT {} FROM {} WHERE {filter} \
                 AND ctid OPERATOR(pg_catalog.>=) '({start},0)'::pg_catalog.tid \
                 AND ctid OPERATOR(pg_catalog.<) '({end},0)'::pg_catalog.tid",
                plan.select, plan.qualified
            ),
            Some((end, to)),
        )
    };
    Ok((query, page_end))
}

fn not_by_key(plan: &TablePlan, what: &str) -> Error {
    Error::new(
        Kind::Checkpoint,
        format!(
            "the snapshot of {} resumes from {what}, which does not match its primary key: \
             the table's key changed during the snapshot; run `walnats snapshot {}` once streaming",
            plan.qualified, plan.qualified
        ),
    )
}

/// Reads the rows after `after`: at most `limit` in primary key order (and
/// no more than `max_bytes` of values), or the next page range.
pub async fn read_chunk(
    sql: &Client,
    plan: &TablePlan,
    span: Option<&Span>,
    after: &Cursor,
    limit: usize,
    max_bytes: usize,
) -> Result<Chunk> {
    let ncols = plan.relation.columns.len();
    let (query, page_end) = chunk_query(plan, span, after, limit)?;
    let stream = sql
        .simple_query_raw(&query)
        .await
        .map_err(|e| read_err(plan, e))?;
    futures::pin_mut!(stream);
    let mut rows = Vec::new();
    let mut keys = Vec::new();
    let mut bytes = 0usize;
    let mut cut = false;
    while let Some(m) = stream.next().await {
        let m = m.map_err(|e| read_err(plan, e))?;
        let SimpleQueryMessage::Row(r) = m else {
            continue;
        };
        if cut {
            // Drain the rest so the connection is ready for the next query.
            continue;
        }
        let mut values = Vec::with_capacity(ncols);
        for i in 0..ncols {
            let v = r.try_get(i).map_err(|e| read_err(plan, e))?;
            values.push(match v {
                Some(s) => {
                    bytes += s.len();
                    TupleValue::Text(s.as_bytes())
                }
                None => TupleValue::Null,
            });
        }
        let t = TupleData::from_values(values);
        let mut key = Vec::with_capacity(plan.pk.len());
        for i in ncols..ncols + plan.pk.len() {
            key.push(
                r.try_get(i)
                    .map_err(|e| read_err(plan, e))?
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        rows.push(t);
        keys.push(key);
        if page_end.is_none() && bytes >= max_bytes {
            cut = true;
        }
    }
    let (end, last) = match page_end {
        Some((end, to)) => (Cursor::Page { page: end }, end >= to.unwrap_or(plan.pages)),
        None => match keys.last() {
            Some(k) => (
                Cursor::Key { values: k.clone() },
                !cut && rows.len() < limit,
            ),
            None => (after.clone(), true),
        },
    };
    Ok(Chunk {
        rows,
        keys,
        end,
        last,
    })
}

fn read_err(plan: &TablePlan, e: tokio_postgres::Error) -> Error {
    if e.code().map(|c| c.code()) == Some("42501") {
        // No SELECT, or row-level security that appeared after the plan.
        return Error::new(
            Kind::PgSetup,
            format!(
                "PostgreSQL refused to read {} for the snapshot ({}): walnats' role needs SELECT on every \
                 published table, and reads with row_security = off, so a table whose row-level security applies \
                 to it needs the role to have BYPASSRLS or to own it",
                plan.qualified,
                crate::error::pg_error_text(&e)
            ),
        );
    }
    pg_query_err(&format!("reading {} for the snapshot", plan.qualified), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_survive_quotes_and_backslashes() {
        assert_eq!(literal("a'b\\c"), "E'a''b\\\\c'");
        assert_eq!(literal(""), "E''");
    }

    /// A table keyed by (a domain over int4, text), as `plan` makes it.
    fn keyed(unkeyed: Option<&str>) -> TablePlan {
        let pk = if unkeyed.is_some() {
            Vec::new()
        } else {
            vec![
                KeyColumn {
                    name: "\"id\"".into(),
                    cast: "\"pg_catalog\".\"int4\"".into(),
                },
                KeyColumn {
                    name: "\"k\"".into(),
                    cast: "\"pg_catalog\".\"text\"".into(),
                },
            ]
        };
        TablePlan {
            relation: Relation {
                xid: None,
                oid: Oid(1),
                namespace: "evil".into(),
                name: "t".into(),
                replica_identity: ReplicaIdentity::Default,
                columns: Vec::new(),
            },
            qualified: "\"evil\".\"t\"".into(),
            select: "\"v\"".into(),
            pk,
            pk_names: vec!["id".into(), "k".into()],
            unkeyed: unkeyed.map(str::to_owned),
            row_filter: None,
            pages: 10,
            row_security: None,
        }
    }

    #[test]
    fn the_key_cursor_compares_in_the_type_under_the_domain_with_pg_catalog_operators() {
        let after = Cursor::Key {
            values: vec!["999".into(), "it's".into()],
        };
        let (q, end) = chunk_query(&keyed(None), None, &after, 999).unwrap();
        assert_eq!(
            q,
            "SELECT \"v\" FROM \"evil\".\"t\" WHERE true \
             AND (\"id\", \"k\") OPERATOR(pg_catalog.>) (E'999'::\"pg_catalog\".\"int4\", E'it''s'::\"pg_catalog\".\"text\") \
             ORDER BY \"id\" USING OPERATOR(pg_catalog.<), \"k\" USING OPERATOR(pg_catalog.<) LIMIT 999"
        );
        assert_eq!(end, None);
    }

    #[test]
    fn a_table_read_by_key_cannot_go_on_by_pages() {
        let plan = keyed(Some("its key is of type evil.comp"));
        let (q, end) = chunk_query(&plan, None, &Cursor::Page { page: 3 }, 999).unwrap();
        assert!(
            q.contains("ctid OPERATOR(pg_catalog.>=) '(3,0)'::pg_catalog.tid"),
            "{q}"
        );
        assert_eq!(end, Some((6, None)));
        let after = Cursor::Key {
            values: vec!["1".into()],
        };
        let e = chunk_query(&plan, None, &after, 999).unwrap_err();
        assert_eq!(e.kind(), Kind::Checkpoint);
        assert!(e.to_string().contains("evil.comp"), "{e}");
    }

    #[test]
    fn a_key_range_bounds_the_leading_column_in_its_type() {
        let span = Span::Key {
            above: Some("100".into()),
            upto: Some("200".into()),
        };
        let after = Cursor::Key {
            values: vec!["150".into(), "x".into()],
        };
        let (q, _) = chunk_query(&keyed(None), Some(&span), &after, 10).unwrap();
        assert!(
            q.contains(
                "AND \"id\" OPERATOR(pg_catalog.>) E'100'::\"pg_catalog\".\"int4\" \
                 AND \"id\" OPERATOR(pg_catalog.<=) E'200'::\"pg_catalog\".\"int4\" ORDER BY"
            ),
            "{q}"
        );
        assert!(q.contains("OPERATOR(pg_catalog.>) (E'150'"), "{q}");
        let open = Span::Key {
            above: None,
            upto: None,
        };
        let (q, _) = chunk_query(&keyed(None), Some(&open), &Cursor::Start, 10).unwrap();
        assert!(!q.contains("\"id\" OPERATOR"), "{q}");
        // A page range of a table read by key (its key became usable) or
        // a key range of one read by pages is refused, never guessed.
        let pages = Span::Page { from: 0, to: None };
        assert!(chunk_query(&keyed(None), Some(&pages), &Cursor::Start, 10).is_err());
        let e = chunk_query(&keyed(Some("no key")), Some(&span), &Cursor::Start, 10).unwrap_err();
        assert_eq!(e.kind(), Kind::Checkpoint);
    }

    #[test]
    fn a_page_range_starts_at_its_first_page_and_stops_at_its_last() {
        let plan = keyed(Some("no key"));
        let span = Span::Page {
            from: 4,
            to: Some(6),
        };
        let (q, end) = chunk_query(&plan, Some(&span), &Cursor::Start, 1000).unwrap();
        assert!(q.contains("'(4,0)'") && q.contains("'(6,0)'"), "{q}");
        assert_eq!(end, Some((6, Some(6))));
        let (_, end) = chunk_query(&plan, Some(&span), &Cursor::Page { page: 5 }, 1000).unwrap();
        assert_eq!(end, Some((6, Some(6))));
        // Fewer rows per chunk, fewer pages.
        let (_, end) = chunk_query(&plan, None, &Cursor::Start, 100).unwrap();
        assert_eq!(end, Some((1, None)));
    }

    #[test]
    fn a_big_table_splits_at_sampled_keys_into_ranges_that_cover_it_once() {
        let sample: Vec<String> = (0..100).map(|i| format!("{i:03}")).collect();
        let spans = key_spans(&sample, 4);
        let bound = |s: &Span| match s {
            Span::Key { above, upto } => (above.clone(), upto.clone()),
            Span::Page { .. } => panic!("a key table split by pages"),
        };
        let b: Vec<_> = spans.iter().map(bound).collect();
        assert_eq!(
            b,
            vec![
                (None, Some("025".into())),
                (Some("025".into()), Some("050".into())),
                (Some("050".into()), Some("075".into())),
                (Some("075".into()), None),
            ]
        );
        // Repeated values: no empty range between equal bounds.
        let same: Vec<String> = vec!["7".into(); 50];
        assert_eq!(key_spans(&same, 4).len(), 2);
        assert!(key_spans(&[], 4).is_empty());
    }

    #[test]
    fn page_ranges_cover_the_table_once() {
        let spans = page_spans(1000, 3);
        assert_eq!(
            spans,
            vec![
                Span::Page {
                    from: 0,
                    to: Some(333)
                },
                Span::Page {
                    from: 333,
                    to: Some(666)
                },
                Span::Page {
                    from: 666,
                    to: None
                },
            ]
        );
    }

    #[test]
    fn only_built_in_key_types_and_operator_classes_are_compared() {
        let key = |type_oid, enum_type, opclass| KeyType {
            type_oid,
            enum_type,
            opclass,
        };
        // int4 with int4_ops; an enum with enum_ops.
        assert!(key(23, false, 1978).unusable().is_none());
        assert!(key(16_500, true, 3522).unusable().is_none());
        // A composite or an extension's type (citext), however compared.
        assert!(key(16_500, false, 2994).unusable().is_some());
        assert!(key(16_500, false, 16_600).unusable().is_some());
        // A built-in type ordered by an operator class someone added.
        assert!(key(114, false, 16_700).unusable().is_some());
    }
}
