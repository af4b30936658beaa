//! The relation cache: what each table OID means right now.
//!
//! pgoutput sends a Relation message before the first change of a table in
//! a session and again after its definition changes; this cache turns each
//! into a [`RelationInfo`] with resolved value kinds (enums, domains and
//! arrays of custom types looked up in `pg_type` once per type OID),
//! subject tokens escaped once, and a stable hash of the column set that
//! decides when a `_schema` message is due.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::OutboxConfig;
use crate::error::{Error, Kind, Result, pg_query_err};
use crate::pgoutput::{Oid, Relation, ReplicaIdentity};
use crate::subject::push_escaped;
use crate::value::ValueKind;

#[derive(Debug)]
pub struct ColumnInfo {
    pub name: String,
    /// `"name":` already escaped for JSON, written once per row.
    pub json_key: Box<[u8]>,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// As `format_type()` prints it, e.g. `numeric(10,2)`.
    pub type_name: String,
    pub kind: ValueKind,
    /// Part of the replica identity (pgoutput's key flag).
    pub key: bool,
}

#[derive(Debug)]
pub struct RelationInfo {
    pub oid: Oid,
    pub schema: String,
    pub table: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<ColumnInfo>,
    /// `<prefix>.<schema>.<table>.` with escaped tokens; the op follows.
    pub subject_base: String,
    /// `<prefix>._schema.<schema>.<table>`.
    pub schema_subject: String,
    /// FNV-1a over the column set: stable across runs and releases, since
    /// the checkpoint stores it to decide whether a `_schema` message is due.
    pub schema_hash: u64,
    /// Its columns, when it is an `[[outbox]]` table: its inserts are
    /// domain events, and nothing else of it is published.
    pub outbox: Option<Arc<super::outbox::OutboxTable>>,
}

impl RelationInfo {
    pub fn has_key(&self) -> bool {
        self.columns.iter().any(|c| c.key)
    }

    pub fn replica_identity_name(&self) -> &'static str {
        match self.replica_identity {
            ReplicaIdentity::Default => "default",
            ReplicaIdentity::Nothing => "nothing",
            ReplicaIdentity::Full => "full",
            ReplicaIdentity::Index => "index",
        }
    }
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator so that ("ab","c") and ("a","bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// What `pg_type` says about a type OID that is not built in.
#[derive(Debug, Clone)]
pub struct TypeRow {
    pub typtype: u8,
    pub typbasetype: u32,
    pub typelem: u32,
    pub typdelim: u8,
    pub typcategory: u8,
}

/// Looks types up in the catalog over the SQL connection, once per OID.
pub struct TypeResolver {
    client: Arc<tokio_postgres::Client>,
    kinds: HashMap<u32, ValueKind>,
}

impl TypeResolver {
    pub fn new(client: Arc<tokio_postgres::Client>) -> TypeResolver {
        TypeResolver {
            client,
            kinds: HashMap::new(),
        }
    }

    async fn type_row(&self, oid: u32) -> Result<Option<TypeRow>> {
        let rows = self
            .client
            .query(
                "SELECT typtype::text, typbasetype::int8, typelem::int8, typdelim::text, typcategory::text \
                 FROM pg_catalog.pg_type WHERE oid = $1::int8::oid",
                &[&i64::from(oid)],
            )
            .await
            .map_err(|e| pg_query_err("looking up a column type in pg_type", e))?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let first_byte = |i: usize| -> u8 {
            row.get::<_, Option<String>>(i)
                .and_then(|s| s.bytes().next())
                .unwrap_or(b'?')
        };
        let as_oid = |i: usize| -> u32 {
            row.get::<_, Option<i64>>(i)
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0)
        };
        Ok(Some(TypeRow {
            typtype: first_byte(0),
            typbasetype: as_oid(1),
            typelem: as_oid(2),
            typdelim: first_byte(3),
            typcategory: first_byte(4),
        }))
    }

    /// The value kind of a type: built-ins from the static table; domains
    /// as their base type; arrays of custom element types as arrays; enums
    /// and everything else as the string PostgreSQL prints. A type that
    /// has since been dropped is written as a string too.
    pub async fn kind(&mut self, oid: u32) -> Result<ValueKind> {
        if let Some(k) = ValueKind::for_builtin_oid(oid) {
            return Ok(k);
        }
        if let Some(k) = self.kinds.get(&oid) {
            return Ok(k.clone());
        }
        let kind = self.resolve(oid, 0).await?;
        self.kinds.insert(oid, kind.clone());
        Ok(kind)
    }

    async fn resolve(&self, oid: u32, depth: u32) -> Result<ValueKind> {
        if let Some(k) = ValueKind::for_builtin_oid(oid) {
            return Ok(k);
        }
        if depth > 8 {
            return Ok(ValueKind::Text);
        }
        let Some(row) = self.type_row(oid).await? else {
            return Ok(ValueKind::Text);
        };
        Ok(match (row.typtype, row.typcategory) {
            (b'd', _) if row.typbasetype != 0 => {
                Box::pin(self.resolve(row.typbasetype, depth + 1)).await?
            }
            (_, b'A') if row.typelem != 0 => ValueKind::Array {
                elem: Box::new(Box::pin(self.resolve(row.typelem, depth + 1)).await?),
                delim: row.typdelim,
            },
            _ => ValueKind::Text,
        })
    }

    /// `format_type()` for every column, in one round trip.
    async fn type_names(&self, rel: &Relation) -> Result<Vec<String>> {
        let oids: Vec<i64> = rel
            .columns
            .iter()
            .map(|c| i64::from(c.type_oid.0))
            .collect();
        let mods: Vec<i32> = rel.columns.iter().map(|c| c.type_modifier).collect();
        let rows = self
            .client
            .query(
                "SELECT u.ord, pg_catalog.format_type(u.typ::oid, u.typmod) \
                 FROM ROWS FROM (pg_catalog.unnest($1::int8[]), pg_catalog.unnest($2::int4[])) \
                      WITH ORDINALITY AS u(typ, typmod, ord) ORDER BY u.ord",
                &[&oids, &mods],
            )
            .await
            .map_err(|e| pg_query_err("looking up column type names", e))?;
        let mut names: Vec<String> = rel
            .columns
            .iter()
            .map(|c| format!("oid {}", c.type_oid.0))
            .collect();
        for row in rows {
            let ord: i64 = row.get(0);
            let name: Option<String> = row.get(1);
            if let (Some(slot), Some(name)) = (
                usize::try_from(ord - 1).ok().and_then(|i| names.get_mut(i)),
                name,
            ) {
                *slot = name;
            }
        }
        Ok(names)
    }
}

/// Relations by OID, replaced whenever a Relation message arrives.
pub struct RelationCache {
    prefix: String,
    resolver: TypeResolver,
    rels: HashMap<Oid, Arc<RelationInfo>>,
    outboxes: Vec<OutboxConfig>,
}

impl RelationCache {
    pub fn new(prefix: String, resolver: TypeResolver) -> RelationCache {
        RelationCache {
            prefix,
            resolver,
            rels: HashMap::new(),
            outboxes: Vec::new(),
        }
    }

    /// Relations of these `[[outbox]]` tables carry their outbox columns.
    pub fn with_outboxes(mut self, outboxes: Vec<OutboxConfig>) -> RelationCache {
        self.outboxes = outboxes;
        self
    }

    pub fn get(&self, oid: Oid) -> Result<&Arc<RelationInfo>> {
        self.rels.get(&oid).ok_or_else(|| {
            Error::new(
                Kind::Protocol,
                format!(
                    "pgoutput sent a change for relation {} before its Relation message",
                    oid.0
                ),
            )
        })
    }

    pub async fn update(&mut self, rel: &Relation) -> Result<Arc<RelationInfo>> {
        let info = self.describe(rel).await?;
        if let Some(old) = self.rels.get(&rel.oid)
            && old.outbox.is_some()
            && info.outbox.is_none()
        {
            // Its inserts would go out as row changes, unannounced.
            return Err(Error::new(
                Kind::Config,
                format!(
                    "outbox table {}.{} was renamed to {}.{} while walnats ran: rename it back, or name the new \
                     name in [[outbox]] table",
                    old.schema, old.table, info.schema, info.table
                ),
            ));
        }
        self.rels.insert(rel.oid, Arc::clone(&info));
        Ok(info)
    }

    /// What `update` would cache for `rel`, without caching it: snapshots
    /// describe tables from the catalog, which must not replace what the
    /// stream's own Relation messages said.
    pub async fn describe(&mut self, rel: &Relation) -> Result<Arc<RelationInfo>> {
        let names = self.resolver.type_names(rel).await?;
        let mut columns = Vec::with_capacity(rel.columns.len());
        let mut h = Fnv::new();
        h.bytes(rel.namespace.as_bytes());
        h.bytes(rel.name.as_bytes());
        h.bytes(&[rel.replica_identity.as_byte()]);
        for (col, type_name) in rel.columns.iter().zip(names) {
            let kind = self.resolver.kind(col.type_oid.0).await?;
            h.bytes(col.name.as_bytes());
            h.bytes(&col.type_oid.0.to_le_bytes());
            h.bytes(&col.type_modifier.to_le_bytes());
            h.bytes(&[u8::from(col.key)]);
            let mut json_key = Vec::with_capacity(col.name.len() + 3);
            crate::value::json_str::write_json_string(col.name.as_bytes(), &mut json_key)
                .map_err(Error::from)?;
            json_key.push(b':');
            columns.push(ColumnInfo {
                name: col.name.clone(),
                json_key: json_key.into_boxed_slice(),
                type_oid: col.type_oid.0,
                type_modifier: col.type_modifier,
                type_name,
                kind,
                key: col.key,
            });
        }
        let mut subject_base = String::with_capacity(self.prefix.len() + 32);
        subject_base.push_str(&self.prefix);
        subject_base.push('.');
        push_escaped(&mut subject_base, &rel.namespace);
        subject_base.push('.');
        push_escaped(&mut subject_base, &rel.name);
        let mut schema_subject = format!("{}._schema.", self.prefix);
        push_escaped(&mut schema_subject, &rel.namespace);
        schema_subject.push('.');
        push_escaped(&mut schema_subject, &rel.name);
        subject_base.push('.');
        let outbox =
            super::outbox::table_entry(&self.outboxes, &rel.namespace, &rel.name).map(|cfg| {
                Arc::new(super::outbox::OutboxTable::resolve(
                    cfg,
                    &rel.namespace,
                    &rel.name,
                    &columns,
                ))
            });
        let info = Arc::new(RelationInfo {
            oid: rel.oid,
            schema: rel.namespace.clone(),
            table: rel.name.clone(),
            replica_identity: rel.replica_identity,
            columns,
            subject_base,
            schema_subject,
            schema_hash: h.0,
            outbox,
        });
        Ok(info)
    }
}
