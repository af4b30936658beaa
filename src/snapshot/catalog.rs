//! What a snapshot reads: the published tables, their columns as pgoutput
//! would describe them, their primary keys, and the SQL that reads one
//! chunk of rows.
//!
//! Rows are read with the simple query protocol, so every value arrives as
//! the text its type's output function prints: the same bytes pgoutput's
//! text mode sends for a streamed change, under the same session settings.

use futures::StreamExt;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::error::{Error, Kind, Result};
use crate::event::relation::pg_query_err;
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
    /// Primary key columns in index order: (quoted name, type as SQL).
    pk: Vec<(String, String)>,
    /// The same, unquoted.
    pub pk_names: Vec<String>,
    /// The publication's row filter (PostgreSQL 15+), if any.
    row_filter: Option<String>,
    /// Heap pages when the snapshot started (tables without a primary key
    /// are read by page ranges).
    pub pages: u64,
}

impl TablePlan {
    pub fn has_primary_key(&self) -> bool {
        !self.pk.is_empty()
    }
}

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
                (pg_catalog.pg_relation_size(c.oid) / pg_catalog.current_setting('block_size')::int8) \
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
    let replica_identity = ident
        .bytes()
        .next()
        .and_then(ReplicaIdentity::from_byte)
        .unwrap_or(ReplicaIdentity::Default);

    // Columns as pgoutput sends them: not dropped, not generated, in the
    // publication's column list if it has one; the key flag from the
    // replica identity.
    // `indkey` is an int2vector, whose subscripts start at 0.
    let cols = sql
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod, \
                    COALESCE(CASE c.relreplident \
                        WHEN 'f' THEN true \
                        WHEN 'd' THEN a.attnum = ANY(pk.indkey::int2[]) \
                        WHEN 'i' THEN a.attnum = ANY(ri.indkey::int2[]) \
                        ELSE false END, false), \
                    COALESCE(pg_catalog.array_position(pk.indkey::int2[], a.attnum) - pg_catalog.array_lower(pk.indkey::int2[], 1) + 1, 0)::int4, \
                    pg_catalog.format_type(a.atttypid, a.atttypmod) \
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
    let mut pk: Vec<(i32, String, String)> = Vec::new();
    for c in &cols {
        let name: String = c.get(0);
        let type_oid = u32::try_from(c.get::<_, i64>(1)).unwrap_or(0);
        let pk_pos: i32 = c.get(4);
        let type_sql: String = c.get(5);
        if pk_pos > 0 {
            pk.push((pk_pos, name.clone(), type_sql));
        }
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
    pk.sort_by_key(|(pos, _, _)| *pos);
    let pk_names: Vec<String> = pk.iter().map(|(_, n, _)| n.clone()).collect();
    let pk: Vec<(String, String)> = pk
        .into_iter()
        .map(|(_, n, t)| (quote_ident(&n), t))
        .collect();
    select.extend(pk.iter().map(|(n, _)| n.clone()));
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
        row_filter,
        pages,
    }))
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Cursor {
    Start,
    Key { values: Vec<String> },
    Page { page: u64 },
}

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

/// Reads the rows after `after`: at most `limit` in primary key order (and
/// no more than `max_bytes` of values), or the next page range.
pub async fn read_chunk(
    sql: &Client,
    plan: &TablePlan,
    after: &Cursor,
    limit: usize,
    max_bytes: usize,
) -> Result<Chunk> {
    let ncols = plan.relation.columns.len();
    let filter = plan
        .row_filter
        .as_ref()
        .map(|f| format!("({f})"))
        .unwrap_or_else(|| "true".to_owned());
    let (query, page_end) = if plan.has_primary_key() {
        let names: Vec<&str> = plan.pk.iter().map(|(n, _)| n.as_str()).collect();
        let order = names.join(", ");
        let from = match after {
            Cursor::Key { values } if values.len() == plan.pk.len() => {
                let lits: Vec<String> = values
                    .iter()
                    .zip(&plan.pk)
                    .map(|(v, (_, ty))| format!("{}::{ty}", literal(v)))
                    .collect();
                format!(
                    " AND ({order}) OPERATOR(pg_catalog.>) ({})",
                    lits.join(", ")
                )
            }
            Cursor::Start => String::new(),
            other => {
                return Err(Error::new(
                    Kind::Checkpoint,
                    format!(
                        "the snapshot of {} resumes from {other:?}, which does not match its primary key: \
                         the table's key changed during the snapshot; run `walnats snapshot {}` once streaming",
                        plan.qualified, plan.qualified
                    ),
                ));
            }
        };
        (
            format!(
                "SELECT {} FROM {} WHERE {filter}{from} ORDER BY {order} LIMIT {limit}",
                plan.select, plan.qualified
            ),
            None,
        )
    } else {
        let start = match after {
            Cursor::Page { page } => *page,
            _ => 0,
        };
        let end = start + PAGES_PER_CHUNK;
        (
            format!(
                "SELECT {} FROM {} WHERE {filter} \
                 AND ctid OPERATOR(pg_catalog.>=) '({start},0)'::pg_catalog.tid \
                 AND ctid OPERATOR(pg_catalog.<) '({end},0)'::pg_catalog.tid",
                plan.select, plan.qualified
            ),
            Some(end),
        )
    };
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
        Some(end) => (Cursor::Page { page: end }, end >= plan.pages),
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
}
