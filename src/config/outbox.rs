//! `[[outbox]]`: tables (or logical-message prefixes) whose inserts are
//! domain events, published on `<subject_prefix>._outbox.<aggregate_type>`
//! instead of as row changes.
//!
//! Only the settings live here; which columns exist and have which types
//! is checked against the database at start (`source::outbox`), and the
//! event is made in `event::outbox`. What can be known without the
//! database is refused here: a table or prefix named twice, a header
//! walnats writes itself, a prefix of walnats' own.
//!
//! `[[outbox]]` is an array of tables, so no `WALNATS_*` variable sets it
//! (see `keys::Section::many`).

use serde::{Deserialize, Serialize};

use super::config_err;
use super::postgres::qualified_name;
use crate::error::Result;

/// One `[[outbox]]` entry as written; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutbox {
    table: Option<String>,
    message_prefix: Option<String>,
    id: Option<String>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    payload: Option<String>,
    headers: Option<Vec<String>>,
}

/// One `[[outbox]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxConfig {
    /// Where its events come from.
    pub source: OutboxSource,
    /// The column whose value is `Cdc-Event-Id` (the application's id).
    pub id: String,
    /// The column that routes: `<subject_prefix>._outbox.<its value>`.
    pub aggregate_type: String,
    /// The column whose value is `Cdc-Aggregate-Id`.
    pub aggregate_id: String,
    /// The column that is the body.
    pub payload: String,
    /// More columns, each a header named after the column.
    pub headers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxSource {
    /// `table = "schema.table"`: inserts into this table.
    Table { schema: String, table: String },
    /// `message_prefix = "p"`: `pg_logical_emit_message` messages whose
    /// prefix is `p.<aggregate_type>`. The column settings beside it do
    /// not apply (the content is the body); set or not, they are ignored.
    MessagePrefix(String),
}

impl OutboxConfig {
    /// Every entry, in file order; the first mistake is the one reported.
    pub(super) fn from_raw(raw: Vec<RawOutbox>) -> Result<Vec<OutboxConfig>> {
        let mut entries: Vec<OutboxConfig> = Vec::with_capacity(raw.len());
        for (n, raw) in raw.into_iter().enumerate() {
            let entry = one_entry(n, raw)?;
            if let Some(m) = entries
                .iter()
                .position(|e| e.source.overlaps(&entry.source))
            {
                return Err(config_err(entry.source.overlap_error(n, m)));
            }
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// Entry `n` on its own.
fn one_entry(n: usize, raw: RawOutbox) -> Result<OutboxConfig> {
    let source = match (raw.table, raw.message_prefix) {
        (Some(table), None) => table_source(n, &table)?,
        (None, Some(prefix)) => prefix_source(n, prefix)?,
        (Some(_), Some(_)) => {
            return Err(config_err(format!(
                "outbox[{n}] has both table and message_prefix: keep one, and make another \
                 [[outbox]] entry for the other"
            )));
        }
        (None, None) => {
            return Err(config_err(format!(
                "outbox[{n}] has neither table nor message_prefix: set table = \"public.outbox\" \
                 (the outbox table) or message_prefix = \"outbox\" (pg_logical_emit_message)"
            )));
        }
    };
    let column = |key: &str, value: Option<String>, default: &str| {
        let value = value.unwrap_or_else(|| default.to_owned());
        if value.is_empty() {
            return Err(config_err(format!(
                "outbox[{n}].{key} is empty: name the column, or leave it out for \"{default}\""
            )));
        }
        Ok(value)
    };
    let id = column("id", raw.id, "id")?;
    let aggregate_type = column("aggregate_type", raw.aggregate_type, "aggregatetype")?;
    let aggregate_id = column("aggregate_id", raw.aggregate_id, "aggregateid")?;
    let payload = column("payload", raw.payload, "payload")?;
    let headers = raw.headers.unwrap_or_default();
    check_headers(n, &headers)?;
    Ok(OutboxConfig {
        source,
        id,
        aggregate_type,
        aggregate_id,
        payload,
        headers,
    })
}

/// `schema.table`, or a bare name in `public`.
fn table_source(n: usize, text: &str) -> Result<OutboxSource> {
    let err = || {
        config_err(format!(
            "outbox[{n}].table is not \"schema.table\" or \"table\" (in public): \
             double-quote a part that holds dots, e.g. '\"my.schema\".outbox'"
        ))
    };
    let (schema, table) = qualified_name(text).ok_or_else(err)?;
    // An outbox is one table: `schema.*` is a `postgres.tables` pattern.
    if table.is_star() || schema.as_ref().is_some_and(|s| s.is_star()) {
        return Err(err());
    }
    Ok(OutboxSource::Table {
        schema: schema.map_or_else(|| "public".to_owned(), |s| s.name),
        table: table.name,
    })
}

fn prefix_source(n: usize, prefix: String) -> Result<OutboxSource> {
    if prefix.is_empty() {
        return Err(config_err(format!(
            "outbox[{n}].message_prefix is empty: name the prefix your messages start with, \
             e.g. \"outbox\" for pg_logical_emit_message(true, 'outbox.order', ...)"
        )));
    }
    // `walnats` itself too: its messages would be `walnats.heartbeat` and
    // the like, walnats' own.
    if prefix == "walnats" || prefix.starts_with("walnats.") {
        return Err(config_err(format!(
            "outbox[{n}].message_prefix is walnats' own (\"walnats\" and \"walnats.*\" are its \
             heartbeats, snapshot requests and watermarks): choose another prefix"
        )));
    }
    Ok(OutboxSource::MessagePrefix(prefix))
}

/// Valid NATS header names, none that walnats writes itself, none twice.
/// Compared without case: a header's case does not survive every client.
fn check_headers(n: usize, headers: &[String]) -> Result<()> {
    for (i, header) in headers.iter().enumerate() {
        let valid = !header.is_empty() && header.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !valid {
            return Err(config_err(format!(
                "outbox[{n}].headers[{i}] cannot be a NATS header name (printable ASCII \
                 without spaces or ':', not empty): rename the column, or leave it out"
            )));
        }
        let lower = header.to_ascii_lowercase();
        if lower.starts_with("nats-") || lower.starts_with("cdc-") || lower == "content-type" {
            return Err(config_err(format!(
                "outbox[{n}].headers[{i}] is a header walnats writes itself (Nats-*, Cdc-*, \
                 Content-Type): rename the column, or leave it out"
            )));
        }
        if let Some(j) = headers
            .get(..i)
            .and_then(|before| before.iter().position(|h| h.eq_ignore_ascii_case(header)))
        {
            return Err(config_err(format!(
                "outbox[{n}].headers[{i}] repeats headers[{j}] (header names are compared \
                 without case): list each column once"
            )));
        }
    }
    Ok(())
}

impl OutboxSource {
    /// Whether an event could belong to both: the same table, the same
    /// prefix, or prefixes where one is the other and a dot (`outbox` and
    /// `outbox.order` both read `outbox.order.created`).
    fn overlaps(&self, other: &OutboxSource) -> bool {
        match (self, other) {
            (OutboxSource::Table { .. }, OutboxSource::Table { .. }) => self == other,
            (OutboxSource::MessagePrefix(a), OutboxSource::MessagePrefix(b)) => {
                let inside = |long: &str, short: &str| {
                    long.strip_prefix(short).is_some_and(|r| r.starts_with('.'))
                };
                a == b || inside(a, b) || inside(b, a)
            }
            _ => false,
        }
    }

    /// Entry `n`, this source, overlaps entry `m`'s.
    fn overlap_error(&self, n: usize, m: usize) -> String {
        match self {
            OutboxSource::Table { .. } => format!(
                "outbox[{n}].table is outbox[{m}].table again (a bare name is in public): \
                 keep one entry per table"
            ),
            OutboxSource::MessagePrefix(_) => format!(
                "outbox[{n}].message_prefix is outbox[{m}].message_prefix, or one of them \
                 followed by \".\" (a message would be both's): keep one entry per prefix, \
                 neither inside the other"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::assert_refused;
    use super::*;

    fn table(t: &str) -> RawOutbox {
        RawOutbox {
            table: Some(t.to_owned()),
            ..RawOutbox::default()
        }
    }

    fn prefix(p: &str) -> RawOutbox {
        RawOutbox {
            message_prefix: Some(p.to_owned()),
            ..RawOutbox::default()
        }
    }

    fn headers(list: &[&str]) -> RawOutbox {
        RawOutbox {
            headers: Some(list.iter().map(|h| (*h).to_owned()).collect()),
            ..table("public.outbox")
        }
    }

    fn source(raw: RawOutbox) -> OutboxSource {
        let mut entries = OutboxConfig::from_raw(vec![raw]).unwrap();
        entries.pop().unwrap().source
    }

    fn in_table(schema: &str, table: &str) -> OutboxSource {
        OutboxSource::Table {
            schema: schema.to_owned(),
            table: table.to_owned(),
        }
    }

    #[test]
    fn an_entry_takes_the_contract_defaults() {
        let c = OutboxConfig::from_raw(vec![table("public.outbox")]).unwrap();
        assert_eq!(
            c,
            [OutboxConfig {
                source: in_table("public", "outbox"),
                id: "id".into(),
                aggregate_type: "aggregatetype".into(),
                aggregate_id: "aggregateid".into(),
                payload: "payload".into(),
                headers: Vec::new(),
            }]
        );
        assert!(OutboxConfig::from_raw(Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn table_names_are_exact_bare_in_public_and_quoted_to_hold_dots() {
        for (written, schema, name) in [
            ("outbox", "public", "outbox"),
            ("app.Outbox", "app", "Outbox"),
            ("\"my.schema\".\"my.table\"", "my.schema", "my.table"),
            ("\"my.table\"", "public", "my.table"),
            ("app.\"a\"\"b\"", "app", "a\"b"),
            ("app.\"*\"", "app", "*"),
        ] {
            assert_eq!(source(table(written)), in_table(schema, name), "{written}");
        }
    }

    #[test]
    fn a_prefix_entry_keeps_its_prefix() {
        assert_eq!(
            source(prefix("outbox")),
            OutboxSource::MessagePrefix("outbox".into())
        );
        // Not walnats' own: only `walnats` and `walnats.*` are.
        assert_eq!(
            source(prefix("walnatsx")),
            OutboxSource::MessagePrefix("walnatsx".into())
        );
        // Prefixes apart (not one inside the other) go together.
        let two = OutboxConfig::from_raw(vec![prefix("outbox"), prefix("outbox2")]);
        assert_eq!(two.unwrap().len(), 2);
    }

    #[test]
    fn headers_are_kept_in_order() {
        let c = OutboxConfig::from_raw(vec![headers(&["type", "trace_id", "X-Tenant"])]).unwrap();
        assert_eq!(c[0].headers, ["type", "trace_id", "X-Tenant"]);
    }

    #[test]
    fn each_mistake_names_its_entry_key_and_fix() {
        let both = RawOutbox {
            message_prefix: Some("outbox".into()),
            ..table("public.outbox")
        };
        let empty_id = RawOutbox {
            id: Some(String::new()),
            ..table("public.outbox")
        };
        let table_fix = "double-quote a part that holds dots";
        let own_header = "a header walnats writes itself";
        #[rustfmt::skip]
        let cases: Vec<(Vec<RawOutbox>, &str, &str)> = vec![
            (vec![both], "outbox[0] has both table and message_prefix", "keep one"),
            (vec![table("a"), RawOutbox::default()], "outbox[1] has neither table nor message_prefix", "set table = "),
            (vec![table("outbox"), table("public.outbox")], "outbox[1].table is outbox[0].table", "keep one entry per table"),
            (vec![table("\"a.b\".t"), table("x.y"), table("\"a.b\".\"t\"")], "outbox[2].table is outbox[0].table", "keep one entry per table"),
            (vec![prefix("outbox"), prefix("outbox")], "outbox[1].message_prefix is outbox[0].message_prefix", "keep one entry per prefix"),
            (vec![prefix("outbox.order"), prefix("outbox")], "outbox[1].message_prefix is outbox[0].message_prefix", "neither inside the other"),
            (vec![prefix("outbox"), prefix("outbox.order")], "outbox[1].message_prefix", "neither inside the other"),
            (vec![prefix("walnats.events")], "outbox[0].message_prefix is walnats' own", "choose another prefix"),
            (vec![prefix("walnats")], "outbox[0].message_prefix is walnats' own", "choose another prefix"),
            (vec![prefix("")], "outbox[0].message_prefix is empty", "name the prefix"),
            (vec![table("a.b.c")], "outbox[0].table", table_fix),
            (vec![table("app.*")], "outbox[0].table", table_fix),
            (vec![table("*")], "outbox[0].table", table_fix),
            (vec![table("")], "outbox[0].table", table_fix),
            (vec![table(".outbox")], "outbox[0].table", table_fix),
            (vec![table("app.")], "outbox[0].table", table_fix),
            (vec![table("\"my.schema.outbox")], "outbox[0].table", table_fix),
            (vec![table("\"\".outbox")], "outbox[0].table", table_fix),
            (vec![table("a\"b")], "outbox[0].table", table_fix),
            (vec![table("\"a\"b.outbox")], "outbox[0].table", table_fix),
            (vec![empty_id], "outbox[0].id is empty", "leave it out for \"id\""),
            (vec![headers(&["type", "tenant id"])], "outbox[0].headers[1] cannot be a NATS header name", "rename the column"),
            (vec![headers(&["a:b"])], "outbox[0].headers[0] cannot be a NATS header name", "rename the column"),
            (vec![headers(&[""])], "outbox[0].headers[0] cannot be a NATS header name", "rename the column"),
            (vec![headers(&["größe"])], "outbox[0].headers[0] cannot be a NATS header name", "rename the column"),
            (vec![headers(&["Cdc-Op"])], "outbox[0].headers[0]", own_header),
            (vec![headers(&["cdc-tenant"])], "outbox[0].headers[0]", own_header),
            (vec![headers(&["Nats-Msg-Id"])], "outbox[0].headers[0]", own_header),
            (vec![headers(&["content-type"])], "outbox[0].headers[0]", own_header),
            (vec![headers(&["type", "trace", "Type"])], "outbox[0].headers[2] repeats headers[0]", "list each column once"),
        ];
        for (raw, key, fix) in cases {
            assert_refused(OutboxConfig::from_raw(raw), key, fix);
        }
    }
}
