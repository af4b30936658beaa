//! The config file's TOML, read into a table before any setting is checked.
//!
//! Owns the mistakes a file can hold: broken syntax, an unknown section or
//! key, a value of the wrong type. Each error names the file, the line and
//! the key, and says what was expected; none repeats the value or the line
//! (a password on a broken line is still a password), whatever its type.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::config_err;
use super::keys::{KeyType, Keys, Section};
use crate::error::{Error, Result};

/// The file's settings, or the first mistake in file order.
pub(super) fn parse(text: &str, origin: &str, keys: &Keys) -> Result<toml::Table> {
    let doc = DeTable::parse(text).map_err(|e| syntax_error(&e, text, origin))?;
    let mut mistakes = Vec::new();
    check_sections(doc.get_ref(), keys, &mut mistakes);
    if let Some((at, what)) = mistakes.into_iter().min_by_key(|(at, _)| *at) {
        return Err(config_err(format!(
            "{origin} line {}: {what}",
            line_of(text, at)
        )));
    }
    toml::from_str(text).map_err(|e| syntax_error(&e, text, origin))
}

fn check_sections(doc: &DeTable<'_>, keys: &Keys, mistakes: &mut Vec<(usize, String)>) {
    for (name, value) in doc {
        let at = name.span().start;
        let Some(section) = keys.section(name.get_ref()) else {
            let known: Vec<&str> = keys.sections().iter().map(|s| s.name).collect();
            mistakes.push((
                at,
                format!(
                    "unknown section [{}]: the sections are {}",
                    name.get_ref(),
                    known.join(", ")
                ),
            ));
            continue;
        };
        if section.many {
            check_entries(section, value, mistakes);
            continue;
        }
        let Some(table) = value.get_ref().as_table() else {
            mistakes.push((
                at,
                format!(
                    "{} must be a section, [{}], not a value",
                    name.get_ref(),
                    name.get_ref()
                ),
            ));
            continue;
        };
        check_keys(section, section.name, table, mistakes);
    }
}

/// A `[[section]]`: each entry's keys, named `section[N].key` as serde and
/// the section's own checks name them.
fn check_entries(
    section: &Section,
    value: &Spanned<DeValue<'_>>,
    mistakes: &mut Vec<(usize, String)>,
) {
    let name = section.name;
    let wrong =
        format!("{name} must be written [[{name}]], once per entry, not [{name}] or a value");
    let Some(entries) = value.get_ref().as_array() else {
        mistakes.push((value.span().start, wrong));
        return;
    };
    for (n, entry) in entries.iter().enumerate() {
        match entry.get_ref().as_table() {
            Some(table) => check_keys(section, &format!("{name}[{n}]"), table, mistakes),
            None => mistakes.push((entry.span().start, wrong.clone())),
        }
    }
}

/// `label` is how a key is named: `section` or `section[N]`.
fn check_keys(
    section: &Section,
    label: &str,
    table: &DeTable<'_>,
    mistakes: &mut Vec<(usize, String)>,
) {
    for (key, value) in table {
        let at = key.span().start;
        let Some(ty) = section.key(key.get_ref()) else {
            mistakes.push((
                at,
                format!(
                    "unknown key {label}.{}: see config/walnats.example.toml for every key",
                    key.get_ref()
                ),
            ));
            continue;
        };
        if !fits(ty, value) {
            mistakes.push((
                at,
                format!(
                    "{label}.{} must be {} (the value is not shown: it may be a secret)",
                    key.get_ref(),
                    ty.expected()
                ),
            ));
        }
    }
}

fn fits(ty: KeyType, value: &Spanned<DeValue<'_>>) -> bool {
    let v = value.get_ref();
    match ty {
        KeyType::Str => v.is_str(),
        KeyType::Int => v.is_integer(),
        KeyType::Bool => v.is_bool(),
        KeyType::StrList => v
            .as_array()
            .is_some_and(|items| items.iter().all(|i| i.get_ref().is_str())),
    }
}

/// 1-based.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()
        .get(..end)
        .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
        + 1
}

/// `section.key` written on line `n` (1-based), when the line is a plain
/// `key = ...` under a `[section]` header.
fn key_on_line(text: &str, n: usize) -> Option<String> {
    let is_key = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    let mut section = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if i + 1 == n {
            let key = line.split_once('=')?.0.trim();
            if !is_key(key) {
                return None;
            }
            return Some(match section {
                Some(s) => format!("{s}.{key}"),
                None => key.to_owned(),
            });
        }
        if let Some(header) = line.strip_prefix('[') {
            let name = header.trim_matches(['[', ']']).trim();
            section = is_key(name).then(|| name.to_owned());
        }
    }
    None
}

/// The line and the key, and toml's description of what it expected,
/// unless that description repeats any of the line's value.
fn syntax_error(e: &toml::de::Error, text: &str, origin: &str) -> Error {
    let Some(span) = e.span() else {
        return config_err(format!(
            "{origin}: not valid TOML: check its quotes, brackets and = signs"
        ));
    };
    let n = line_of(text, span.start);
    let line = text.lines().nth(n.saturating_sub(1)).unwrap_or_default();
    let value = line.split_once('=').map_or(line, |(_, v)| v);
    let what: Vec<&str> = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let what = what.join(", ");
    let what = if what.is_empty() || repeats_any_of(&what, value) {
        "check its quotes, brackets and commas".to_owned()
    } else {
        what
    };
    let key = key_on_line(text, n)
        .map(|k| format!(" ({k})"))
        .unwrap_or_default();
    config_err(format!(
        "{origin} line {n}{key}: not valid TOML: {what} (the line is not shown: it may hold a secret)"
    ))
}

/// True when `message` holds any 4 consecutive characters of `value`.
fn repeats_any_of(message: &str, value: &str) -> bool {
    let chars: Vec<char> = value.trim().chars().collect();
    chars.windows(4).any(|w| {
        let piece: String = w.iter().collect();
        message.contains(&piece)
    })
}

#[cfg(test)]
mod tests {
    use super::super::keys::known;
    use super::*;

    fn parse(text: &str, origin: &str) -> Result<toml::Table> {
        super::parse(text, origin, known().unwrap())
    }

    #[test]
    fn lines_and_keys_are_found_where_the_mistake_is() {
        let text = "# c\n[postgres]\nurl = \"x\"\npassword = \"abc\n";
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(line_of(text, text.len()), 5);
        assert_eq!(key_on_line(text, 4).as_deref(), Some("postgres.password"));
        assert_eq!(key_on_line(text, 2), None);
        assert_eq!(key_on_line(text, 99), None);
        assert_eq!(key_on_line("a = 1\n", 1).as_deref(), Some("a"));
        assert_eq!(key_on_line("[x]\n\"a b\" = 1\n", 2), None);
    }

    #[test]
    fn no_mistake_repeats_the_value() {
        let s = "hunter2secret";
        for (text, want, value) in [
            (
                "[postgres]\npassword = \"hunter2secret\n",
                "line 2 (postgres.password)",
                s,
            ),
            (
                "[postgres]\npassword = hunter2secret\n",
                "line 2 (postgres.password)",
                s,
            ),
            (
                "[postgres]\npassword = \"hunter2secret\" x\n",
                "line 2 (postgres.password)",
                s,
            ),
            (
                "[postgres]\npassword = 'hunter2secret\n",
                "line 2 (postgres.password)",
                s,
            ),
            (
                "[postgres]\npassword = \"\"\"hunter2secret\n",
                "test.toml",
                s,
            ),
            (
                "[postgres]\npassword = [\"hunter2secret\"\n",
                "test.toml",
                s,
            ),
            (
                "[postgres]\npassword = 1979-05-27Thunter2\n",
                "test.toml",
                "1979",
            ),
            (
                "[postgres]\npassword = 12345678\n",
                "line 2: postgres.password must be a string",
                "12345678",
            ),
            (
                "[postgres]\npassword = 1234.5678\n",
                "line 2: postgres.password must be a string",
                "1234",
            ),
            (
                "[postgres]\npassword = true\n",
                "line 2: postgres.password must be a string",
                "true",
            ),
            (
                "[postgres]\npassword = 1979-05-27\n",
                "line 2: postgres.password must be a string",
                "1979",
            ),
            (
                "[nats]\nreplicas = \"hunter2secret\"\n",
                "line 2: nats.replicas must be a whole number",
                s,
            ),
            (
                "[postgres]\ntables = \"hunter2secret\"\n",
                "line 2: postgres.tables must be a list",
                s,
            ),
            (
                "[postgres]\nslot = { a = \"hunter2secret\" }\n",
                "line 2: postgres.slot must be a string",
                s,
            ),
            (
                "postgres = \"hunter2secret\"\n",
                "line 1: postgres must be a section",
                s,
            ),
            (
                "[postgres]\npassword = \"a\"\npassword = \"hunter2secret\"\n",
                "line 3 (postgres.password)",
                s,
            ),
            (
                "[postgres]\nhunter2secret = 1\n",
                "line 2: unknown key postgres.hunter2secret",
                "",
            ),
        ] {
            let err = parse(text, "test.toml").unwrap_err().to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
            assert!(
                value.is_empty() || !err.contains(value),
                "{text:?} gave {err:?}"
            );
        }
        assert!(parse("[postgres]\npassword = \"ok\"\n", "t").is_ok());
    }
}
