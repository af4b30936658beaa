//! The `[http]` section: where `/metrics`, `/healthz`, `/readyz` and
//! `/status` listen, and the token that guards all but the probes.
//!
//! It only reads and checks; serving is `crate::http`'s job. The token's
//! value never appears in an error.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::secret::one_secret;
use super::{Secret, config_err};
use crate::error::Result;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    listen: Option<String>,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
}

/// The section's settings; `Config` keeps them as fields of its own.
pub(super) struct Http {
    /// `None` when `listen = ""`.
    pub(super) listen: Option<SocketAddr>,
    pub(super) token: Option<Secret>,
}

impl Http {
    pub(super) fn from_raw(raw: RawHttp) -> Result<Http> {
        let RawHttp {
            listen,
            token,
            token_file,
        } = raw;
        let listen = match listen.as_deref().unwrap_or("127.0.0.1:9750") {
            "" => None,
            s => Some(s.parse::<SocketAddr>().map_err(|_| {
                config_err(
                    "http.listen is not an address:port like 127.0.0.1:9750 (\"\" turns HTTP off)",
                )
            })?),
        };
        let token = one_secret(token, token_file, "http.token")?;
        if let Some(t) = &token
            && (t.expose().is_empty() || !t.expose().bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(config_err(
                "http.token must be printable ASCII without spaces (it travels in an \
                 Authorization header), and not empty: e.g. 32 random characters from \
                 `openssl rand -hex 32`; remove it to leave HTTP open",
            ));
        }
        Ok(Http { listen, token })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::assert_refused;
    use super::*;

    fn listen(text: &str) -> Result<Http> {
        let listen = Some(text.to_owned());
        Http::from_raw(RawHttp {
            listen,
            ..RawHttp::default()
        })
    }

    fn token(text: &str) -> Result<Http> {
        let token = Some(Secret::new(text));
        Http::from_raw(RawHttp {
            token,
            ..RawHttp::default()
        })
    }

    #[test]
    fn the_section_takes_its_values_and_defaults() {
        let h = Http::from_raw(RawHttp::default()).unwrap();
        assert_eq!(h.listen, Some(SocketAddr::from(([127, 0, 0, 1], 9750))));
        assert_eq!(h.token, None);
        assert_eq!(listen("").unwrap().listen, None, "\"\" turns HTTP off");
        assert_eq!(
            listen("[::1]:80").unwrap().listen,
            Some(SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 80)))
        );
        assert_eq!(token("abc!").unwrap().token, Some(Secret::new("abc!")));
    }

    #[test]
    fn section_mistakes_name_the_key_and_the_fix() {
        for bad in ["localhost", "127.0.0.1", ":9750"] {
            assert_refused(listen(bad), "http.listen", "like 127.0.0.1:9750");
        }
        for bad in ["", "has space", "tab\there", "é"] {
            assert_refused(token(bad), "http.token", "openssl rand -hex 32");
        }
    }
}
