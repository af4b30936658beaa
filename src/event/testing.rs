//! Relations for unit tests: the columns and subjects a `RelationCache`
//! would make, without a database.

use std::sync::Arc;

use super::{ColumnInfo, RelationInfo};
use crate::pgoutput::{Oid, ReplicaIdentity};
use crate::value::ValueKind;

/// A column as the relation cache resolves it (its JSON key escaped).
pub fn column(name: &str, kind: ValueKind, key: bool) -> ColumnInfo {
    let mut json_key = Vec::new();
    crate::value::json_str::write_json_str(name, &mut json_key);
    json_key.push(b':');
    ColumnInfo {
        name: name.to_owned(),
        json_key: json_key.into_boxed_slice(),
        type_oid: 0,
        type_modifier: -1,
        type_name: kind.name().to_owned(),
        kind,
        key,
    }
}

/// `schema.table` with `columns`, under the subject prefix `cdc.app`.
pub fn relation(
    oid: u32,
    schema: &str,
    table: &str,
    replica_identity: ReplicaIdentity,
    columns: Vec<ColumnInfo>,
) -> Arc<RelationInfo> {
    Arc::new(RelationInfo {
        oid: Oid(oid),
        schema: schema.to_owned(),
        table: table.to_owned(),
        replica_identity,
        columns,
        subject_base: format!("cdc.app.{schema}.{table}."),
        schema_subject: format!("cdc.app._schema.{schema}.{table}"),
        schema_hash: 0,
        outbox: None,
    })
}

/// `schema.table (id int primary key, name text)`, OID 16384.
pub fn test_relation(schema: &str, table: &str) -> Arc<RelationInfo> {
    relation(
        16_384,
        schema,
        table,
        ReplicaIdentity::Default,
        vec![
            column("id", ValueKind::Int, true),
            column("name", ValueKind::Text, false),
        ],
    )
}
