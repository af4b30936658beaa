//! Secrets in the config: passwords, tokens, nkey seeds, given inline or in
//! a file.
//!
//! Owns [`Secret`], which no `Debug` or `Display` can print, and the rule
//! that a secret comes from its key or its `_file` key, never both. It
//! never puts a secret's value in an error.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::config_err;
use crate::error::Result;

/// A string that must never be printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

fn read_secret_file(path: &Path, key: &str) -> Result<Secret> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        config_err(format!(
            "{key}: cannot read {}: {e}; fix the path or the file's permissions",
            path.display()
        ))
    })?;
    Ok(Secret::new(text.trim_end_matches(['\r', '\n'])))
}

/// `key` from its inline value or from `key_file`; refused when both are
/// set.
pub(super) fn one_secret(
    inline: Option<Secret>,
    file: Option<PathBuf>,
    key: &str,
) -> Result<Option<Secret>> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(config_err(format!(
            "both {key} and {key}_file are set: keep one"
        ))),
        (Some(s), None) => Ok(Some(s)),
        (None, Some(p)) => read_secret_file(&p, &format!("{key}_file")).map(Some),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_comes_from_its_key_or_its_file_never_both() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\r\n").unwrap();
        let inline = || Some(Secret::new("inline"));
        assert_eq!(one_secret(inline(), None, "nats.token").unwrap(), inline());
        assert_eq!(
            one_secret(None, Some(file.clone()), "nats.token").unwrap(),
            Some(Secret::new("from-file"))
        );
        assert_eq!(one_secret(None, None, "nats.token").unwrap(), None);
        let err = one_secret(inline(), Some(file), "nats.token")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("both nats.token and nats.token_file are set: keep one"),
            "{err}"
        );
        assert!(
            !err.contains("inline") && !err.contains("from-file"),
            "{err}"
        );
        let missing = dir.path().join("missing");
        let err = one_secret(None, Some(missing), "postgres.password")
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgres.password_file: cannot read"), "{err}");
        assert!(
            err.contains("fix the path or the file's permissions"),
            "{err}"
        );
    }

    #[test]
    fn a_secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
    }
}
