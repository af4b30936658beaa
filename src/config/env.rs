//! `WALNATS_<SECTION>_<KEY>=value` overrides `[section] key`, laid over the
//! file's table before serde reads it.
//!
//! Owns how an environment value becomes its key's type: a password of
//! digits stays a string, `true`/`1`/`yes` is a bool, a list is split on
//! commas. Variables that name no key (`WALNATS_LOG`, or a tool's own
//! `WALNATS_NATS_SERVER`) are returned so the caller can warn about them:
//! refusing them would break environments that share the prefix, and a
//! typo still shows in the log. It never puts a value in an error.

use super::config_err;
use super::keys::{KeyType, Keys};
use crate::error::Result;

/// Applies every override in `env` to `table`; returns the `WALNATS_`
/// variables that start with a section's name but name none of its keys.
pub(super) fn apply(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    keys: &Keys,
) -> Result<Vec<String>> {
    let mut ignored = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("WALNATS_") else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let Some((section, key, ty)) = keys.named_by_env(&rest) else {
            if keys.names_a_section(&rest) {
                ignored.push(name);
            }
            continue;
        };
        let parsed = typed(&name, ty, value)?;
        let entry = table
            .entry(section.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => {
                t.insert(key.to_owned(), parsed);
            }
            _ => return Err(config_err(format!("[{section}] must be a table"))),
        }
    }
    Ok(ignored)
}

/// The value of variable `name` as a key of type `ty` wants it.
fn typed(name: &str, ty: KeyType, value: String) -> Result<toml::Value> {
    Ok(match ty {
        KeyType::Str => toml::Value::String(value),
        KeyType::Int => value
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| config_err(format!("{name} must be a whole number")))?,
        KeyType::Bool => match value.trim() {
            "true" | "1" | "yes" => toml::Value::Boolean(true),
            "false" | "0" | "no" => toml::Value::Boolean(false),
            _ => return Err(config_err(format!("{name} must be true or false"))),
        },
        KeyType::StrList => {
            let items = value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect();
            toml::Value::Array(items)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::keys::known;
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_key_has_its_variable_and_lands_in_its_section() {
        let keys = known().unwrap();
        for s in keys.sections().iter().filter(|s| !s.many) {
            for (key, ty) in &s.keys {
                let name = format!("WALNATS_{}_{}", s.name, key).to_ascii_uppercase();
                let value = match ty {
                    KeyType::Str | KeyType::StrList => "x",
                    KeyType::Int => "7",
                    KeyType::Bool => "yes",
                };
                let mut table = toml::Table::new();
                let ignored = apply(&mut table, vars(&[(&name, value)]), keys).unwrap();
                assert!(ignored.is_empty(), "{name}");
                let got = table.get(s.name).and_then(|t| t.get(key));
                assert!(got.is_some(), "{name} did not set {}.{key}", s.name);
            }
        }
    }

    #[test]
    fn outbox_keys_have_no_variable_and_are_warned_about() {
        let keys = known().unwrap();
        let mut table = toml::Table::new();
        let env = vars(&[
            ("WALNATS_OUTBOX_TABLE", "public.outbox"),
            ("WALNATS_OUTBOX_HEADERS", "type"),
        ]);
        let ignored = apply(&mut table, env, keys).unwrap();
        assert_eq!(ignored, ["WALNATS_OUTBOX_TABLE", "WALNATS_OUTBOX_HEADERS"]);
        assert!(table.is_empty(), "{table:?}");
    }

    #[test]
    fn values_take_the_type_of_their_key() {
        let keys = known().unwrap();
        let mut table = toml::Table::new();
        let env = vars(&[
            ("WALNATS_NATS_PASSWORD", "1234"),
            ("WALNATS_NATS_REPLICAS", " 3 "),
            ("WALNATS_NATS_TLS_REQUIRED", "0"),
            ("WALNATS_POSTGRES_TABLES", " a.b, ,c.* "),
            ("WALNATS_OUTPUT_TX_MARKERS", "no"),
            ("OTHER", "x"),
        ]);
        assert!(apply(&mut table, env, keys).unwrap().is_empty());
        let nats = &table["nats"];
        assert_eq!(nats["password"], toml::Value::String("1234".into()));
        assert_eq!(nats["replicas"], toml::Value::Integer(3));
        assert_eq!(nats["tls_required"], toml::Value::Boolean(false));
        assert_eq!(
            table["postgres"]["tables"],
            toml::Value::Array(vec!["a.b".into(), "c.*".into()])
        );
        assert_eq!(table["output"]["tx_markers"], toml::Value::Boolean(false));
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_variable_not_the_value() {
        let keys = known().unwrap();
        for (name, want) in [
            ("WALNATS_NATS_TLS_REQUIRED", "must be true or false"),
            ("WALNATS_NATS_MAX_IN_FLIGHT", "must be a whole number"),
        ] {
            let err = apply(&mut toml::Table::new(), vars(&[(name, "s3cr3t")]), keys)
                .unwrap_err()
                .to_string();
            assert!(err.contains(name) && err.contains(want), "{err}");
            assert!(!err.contains("s3cr3t"), "{err}");
        }
    }
}
