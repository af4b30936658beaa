//! The keys a config file may hold and the type of each, read off the
//! `Raw*` structs that serde fills: the one list that the file's checks
//! (`file`), the `WALNATS_*` overrides (`env`) and the error for a number
//! out of range all use. It never reads a file or the environment.
//!
//! Why read it off the structs: a list written by hand beside them is a
//! key forgotten the day a field is added. Why not
//! `#[serde(deny_unknown_fields)]` alone (it stays, as a backstop): serde's
//! error for an unknown key gives no line, its type errors repeat the value
//! (which may be a secret), and the environment needs each key's type
//! before serde runs (a password of digits must stay a string). So
//! [`Probe`] plays a deserializer that holds nothing: the derived
//! `Deserialize` of `RawConfig` asks it for each struct, naming every field
//! as serde spells it (renames included), then for each field's value as a
//! string, a whole number, a bool or a list, and the probe writes down what
//! was asked and answers with an empty value. A field of a type that no key
//! can have (a float, a map) makes [`known`] fail, and every config test
//! with it. So a field added to a `Raw*` struct is a key at once, with its
//! type and its `WALNATS_*` variable; rustc warns while its section never
//! reads it, and a test fails until config/walnats.example.toml shows it.
//! A `Vec` of a struct in `RawConfig` is a `[[section]]`, an array of
//! tables (`[[outbox]]`): its keys are known the same way, but no
//! `WALNATS_*` variable sets them, since a variable could not say which
//! entry it meant.

use std::sync::LazyLock;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};

use super::{RawConfig, config_err};

/// The type of each key, so that an environment override is read as what
/// the key expects (a password of digits stays a string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyType {
    Str,
    Int,
    Bool,
    StrList,
}

impl KeyType {
    /// What a key of this type must be, for a human.
    pub(super) fn expected(self) -> &'static str {
        match self {
            KeyType::Str => "a string in quotes",
            KeyType::Int => "a whole number",
            KeyType::Bool => "true or false",
            KeyType::StrList => "a list of strings in quotes, like [\"public.orders\"]",
        }
    }
}

/// A `[section]` and its keys, in the struct's order.
pub(super) struct Section {
    pub(super) name: &'static str,
    pub(super) keys: Vec<(&'static str, KeyType)>,
    /// `[[section]]`, an array of tables (a `Vec` of a struct): each entry
    /// holds these keys. No `WALNATS_*` variable sets such a key, since a
    /// variable could not say which entry it meant.
    pub(super) many: bool,
}

impl Section {
    pub(super) fn key(&self, name: &str) -> Option<KeyType> {
        self.keys
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, ty)| *ty)
    }
}

/// Every section, in `RawConfig`'s order.
pub(super) struct Keys {
    sections: Vec<Section>,
}

impl Keys {
    pub(super) fn sections(&self) -> &[Section] {
        &self.sections
    }

    pub(super) fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The type of the key at `section.key` (or `section[N].key` in a
    /// `[[section]]`), a path as serde prints it.
    pub(super) fn at_path(&self, path: &str) -> Option<KeyType> {
        let (section, key) = path.split_once('.')?;
        match section.split_once('[') {
            Some((name, _)) => self.section(name).filter(|s| s.many)?.key(key),
            None => self.section(section).filter(|s| !s.many)?.key(key),
        }
    }

    /// The section, key and type that `WALNATS_<rest>` names, `rest`
    /// lower-cased (`postgres_slot`). Never a key of a `[[section]]`.
    pub(super) fn named_by_env(&self, rest: &str) -> Option<(&'static str, &'static str, KeyType)> {
        self.sections.iter().filter(|s| !s.many).find_map(|s| {
            let key = rest.strip_prefix(s.name)?.strip_prefix('_')?;
            let (k, ty) = s.keys.iter().find(|(k, _)| *k == key)?;
            Some((s.name, *k, *ty))
        })
    }

    /// Whether `rest` (as for [`Keys::named_by_env`]) starts with a section's
    /// name and `_`, whether or not a key follows. A `[[section]]` counts,
    /// so that `WALNATS_OUTBOX_TABLE` is warned about as setting nothing.
    pub(super) fn names_a_section(&self, rest: &str) -> bool {
        self.sections.iter().any(|s| {
            rest.strip_prefix(s.name)
                .is_some_and(|r| r.starts_with('_'))
        })
    }
}

static KNOWN: LazyLock<Result<Keys, String>> = LazyLock::new(probe);

/// The keys, read off `RawConfig` once.
pub(super) fn known() -> crate::error::Result<&'static Keys> {
    KNOWN.as_ref().map_err(|e| {
        config_err(format!(
            "walnats cannot list its own config keys ({e}): a bug in walnats, not in the config"
        ))
    })
}

/// What the probe was asked for one value.
enum Shape {
    Unread,
    Str,
    Int,
    Bool,
    List(Box<Shape>),
    Struct(Vec<(&'static str, Shape)>),
}

fn probe() -> Result<Keys, String> {
    let mut shape = Shape::Unread;
    RawConfig::deserialize(Probe { shape: &mut shape }).map_err(|e| e.to_string())?;
    let Shape::Struct(fields) = shape else {
        return Err("RawConfig is not a struct".to_owned());
    };
    let sections = fields
        .into_iter()
        .map(|(name, shape)| section(name, shape))
        .collect::<Result<_, _>>()?;
    Ok(Keys { sections })
}

fn section(name: &'static str, shape: Shape) -> Result<Section, String> {
    let (fields, many) = match shape {
        Shape::Struct(fields) => (fields, false),
        Shape::List(item) => match *item {
            Shape::Struct(fields) => (fields, true),
            _ => return Err(format!("[[{name}]] is not a list of structs")),
        },
        _ => return Err(format!("[{name}] is not a struct")),
    };
    let keys = fields
        .into_iter()
        .map(|(key, shape)| match shape {
            Shape::Str => Ok((key, KeyType::Str)),
            Shape::Int => Ok((key, KeyType::Int)),
            Shape::Bool => Ok((key, KeyType::Bool)),
            Shape::List(item) if matches!(*item, Shape::Str) => Ok((key, KeyType::StrList)),
            _ => Err(format!(
                "{name}.{key} is not a string, a whole number, a bool or a list of strings"
            )),
        })
        .collect::<Result<_, _>>()?;
    Ok(Section { name, keys, many })
}

/// A deserializer with nothing in it, that writes down what it is asked.
struct Probe<'a> {
    shape: &'a mut Shape,
}

type ProbeResult<T> = Result<T, de::value::Error>;

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> ProbeResult<V::Value> {
        Err(de::Error::custom("a type that no config key can have"))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> ProbeResult<V::Value> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> ProbeResult<V::Value> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> ProbeResult<V::Value> {
        *self.shape = Shape::Str;
        visitor.visit_str("")
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> ProbeResult<V::Value> {
        self.deserialize_str(visitor)
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> ProbeResult<V::Value> {
        *self.shape = Shape::Int;
        visitor.visit_i64(0)
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> ProbeResult<V::Value> {
        *self.shape = Shape::Int;
        visitor.visit_u64(0)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> ProbeResult<V::Value> {
        *self.shape = Shape::Bool;
        visitor.visit_bool(false)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> ProbeResult<V::Value> {
        let mut item = Shape::Unread;
        let value = visitor.visit_seq(OneItem(Some(&mut item)))?;
        *self.shape = Shape::List(Box::new(item));
        Ok(value)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> ProbeResult<V::Value> {
        let mut found: Vec<(&'static str, Shape)> =
            fields.iter().map(|f| (*f, Shape::Unread)).collect();
        let value = visitor.visit_map(Fields {
            fields: found.iter_mut(),
            value: None,
        })?;
        *self.shape = Shape::Struct(found);
        Ok(value)
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i128 u8 u16 u32 u128 f32 f64 char bytes byte_buf unit
        unit_struct tuple tuple_struct map enum identifier ignored_any
    }
}

/// A struct's fields, each key once, each value probed.
struct Fields<'a> {
    fields: std::slice::IterMut<'a, (&'static str, Shape)>,
    /// The field whose value is asked for next.
    value: Option<(&'static str, &'a mut Shape)>,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = de::value::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> ProbeResult<Option<K::Value>> {
        let Some((name, shape)) = self.fields.next() else {
            return Ok(None);
        };
        self.value = Some((*name, shape));
        seed.deserialize(IntoDeserializer::<Self::Error>::into_deserializer(*name))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> ProbeResult<V::Value> {
        let (name, shape) = self
            .value
            .take()
            .ok_or_else(|| de::Error::custom("a value asked for before its key"))?;
        seed.deserialize(Probe { shape })
            .map_err(|e| de::Error::custom(format_args!("{name}: {e}")))
    }
}

/// A list of one item, probed.
struct OneItem<'a>(Option<&'a mut Shape>);

impl<'de> SeqAccess<'de> for OneItem<'_> {
    type Error = de::value::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> ProbeResult<Option<T::Value>> {
        self.0
            .take()
            .map(|shape| seed.deserialize(Probe { shape }))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_raw_field_is_a_key_of_the_type_serde_reads() {
        let keys = known().unwrap();
        let names: Vec<&str> = keys.sections().iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "postgres", "nats", "snapshot", "output", "limits", "http", "outbox"
            ]
        );
        let many: Vec<&str> = keys
            .sections()
            .iter()
            .filter(|s| s.many)
            .map(|s| s.name)
            .collect();
        assert_eq!(many, ["outbox"]);
        // One key of each type, and the wrappers serde sees through:
        // `Secret` (transparent) and `PathBuf` are strings.
        for (path, ty) in [
            ("postgres.url", KeyType::Str),
            ("postgres.password_file", KeyType::Str),
            ("postgres.tables", KeyType::StrList),
            ("postgres.status_interval_ms", KeyType::Int),
            ("nats.replicas", KeyType::Int),
            ("nats.tls_required", KeyType::Bool),
            ("output.message_prefixes", KeyType::StrList),
            ("http.token", KeyType::Str),
            ("outbox[0].table", KeyType::Str),
            ("outbox[3].headers", KeyType::StrList),
        ] {
            assert_eq!(keys.at_path(path), Some(ty), "{path}");
        }
        assert_eq!(keys.at_path("postgres.slott"), None);
        assert_eq!(keys.at_path("postgres"), None);
        assert_eq!(keys.at_path("outbox.table"), None);
        assert_eq!(keys.at_path("postgres[0].slot"), None);
    }

    #[test]
    fn a_field_no_key_can_have_is_named() {
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Odd {
            ratio: Option<f64>,
        }
        let mut shape = Shape::Unread;
        let err = Odd::deserialize(Probe { shape: &mut shape }).err().unwrap();
        assert!(err.to_string().contains("ratio"), "{err}");
    }

    #[test]
    fn env_names_map_to_the_same_keys() {
        let keys = known().unwrap();
        for s in keys.sections().iter().filter(|s| !s.many) {
            for (key, ty) in &s.keys {
                let rest = format!("{}_{key}", s.name);
                assert_eq!(
                    keys.named_by_env(&rest),
                    Some((s.name, *key, *ty)),
                    "{rest}"
                );
                assert!(keys.names_a_section(&rest));
            }
        }
        assert_eq!(keys.named_by_env("postgres_slott"), None);
        assert!(keys.names_a_section("postgres_slott"));
        assert!(!keys.names_a_section("postgresslot"));
        assert!(!keys.names_a_section("log"));
        // An [[outbox]] key has no variable, but one that looks like it is
        // warned about.
        assert_eq!(keys.named_by_env("outbox_table"), None);
        assert!(keys.names_a_section("outbox_table"));
    }
}
