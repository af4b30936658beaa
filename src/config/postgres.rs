//! The PostgreSQL connection URL, parsed once into typed settings.
//!
//! `postgres://user:password@host:port/dbname?sslmode=...&sslrootcert=...
//! &application_name=...&connect_timeout=...`. Unknown query parameters are
//! refused (a typo in `sslmode` must not silently mean "no TLS"). The
//! password is a [`Secret`] and never appears in errors or logs.
//!
//! The sslmode is settled here, once: without one, `sslrootcert` means
//! `verify-full` (a CA given is a CA meant to be checked) and no
//! `sslrootcert` means `prefer`; `require` with `sslrootcert` checks the
//! chain as `verify-ca` does (as libpq does); `verify-ca` without
//! `sslrootcert` is refused, since any certificate a public CA issued for
//! any name would pass it; and so are `disable` and `prefer` with
//! `sslrootcert`, which would ignore it.

use std::path::PathBuf;
use std::time::Duration;

use super::{Secret, redact_url};
use crate::error::{Error, Kind, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// As written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// TLS is on and the server's certificate is checked against a CA:
    /// only then may a password (or its MD5 equivalent) be sent, because
    /// only then is the server known to be the one meant.
    pub fn verifies_server(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

#[derive(Debug, Clone)]
pub struct PgConnectConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub application_name: String,
    pub connect_timeout: Duration,
    redacted: String,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(Kind::Config, format!("postgres.url: {}", msg.into()))
}

fn pct_decode(s: &str) -> Result<String> {
    // Userinfo and path are percent-encoded, where '+' is a literal '+'.
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or_else(|| bad("bad percent-encoding"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad("bad percent-encoding"))?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad("percent-encoding is not UTF-8"))
}

impl PgConnectConfig {
    /// `password`, when given (from `postgres.password`, a file or the
    /// environment), wins over a password in the URL.
    pub fn parse(url_text: &str, password: Option<Secret>) -> Result<PgConnectConfig> {
        let u = url::Url::parse(url_text)
            .map_err(|e| bad(format!("not a URL ({e}): use postgres://user@host:5432/db")))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err(bad("must start with postgres:// or postgresql://"));
        }
        let mut host = u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned());
        let mut port = u.port();
        let mut user = (!u.username().is_empty())
            .then(|| pct_decode(u.username()))
            .transpose()?;
        let mut url_password = u.password().map(pct_decode).transpose()?;
        let mut sslmode = None;
        let mut sslrootcert = None;
        let mut application_name = "walnats".to_owned();
        let mut connect_timeout = Duration::from_secs(10);
        let mut dbname = {
            let p = u.path().trim_start_matches('/');
            (!p.is_empty()).then(|| pct_decode(p)).transpose()?
        };
        for (k, v) in u.query_pairs() {
            let v = v.into_owned();
            match k.as_ref() {
                "sslmode" => {
                    sslmode = Some(match v.as_str() {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        _ => {
                            return Err(bad(
                                "sslmode is unknown: use disable, prefer, require, verify-ca or verify-full",
                            ));
                        }
                    })
                }
                "sslrootcert" => sslrootcert = Some(PathBuf::from(v)),
                "application_name" => application_name = v,
                "connect_timeout" => {
                    let secs: u64 = v
                        .parse()
                        .map_err(|_| bad("connect_timeout must be whole seconds"))?;
                    connect_timeout = Duration::from_secs(secs.max(1));
                }
                "host" => host = Some(v),
                "port" => port = Some(v.parse().map_err(|_| bad("port must be a number"))?),
                "user" => user = Some(v),
                "password" => url_password = Some(v),
                "dbname" => dbname = Some(v),
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?}: supported are sslmode, sslrootcert, application_name, connect_timeout, host, port, user, password, dbname"
                    )));
                }
            }
        }
        let host = host
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host: use postgres://user@host:5432/db"))?;
        if host.starts_with('/') {
            return Err(bad(
                "Unix sockets are not supported: use a TCP host such as 127.0.0.1",
            ));
        }
        let user = user.unwrap_or_else(|| "postgres".to_owned());
        let sslmode = match (sslmode, &sslrootcert) {
            (None, Some(_)) => SslMode::VerifyFull,
            (None, None) => SslMode::Prefer,
            (Some(SslMode::Require), Some(_)) => SslMode::VerifyCa,
            (Some(SslMode::VerifyCa), None) => {
                return Err(bad(
                    "sslmode=verify-ca needs sslrootcert (the CA that signed the server's certificate): \
                     checked against the public CAs, any certificate issued for any name would pass; \
                     set sslrootcert, or use sslmode=verify-full",
                ));
            }
            (Some(mode @ (SslMode::Disable | SslMode::Prefer)), Some(_)) => {
                return Err(bad(format!(
                    "sslmode={} never checks the server's certificate, so sslrootcert would be ignored: \
                     use sslmode=verify-full (or leave sslmode out), or drop sslrootcert",
                    mode.as_str()
                )));
            }
            (Some(mode), _) => mode,
        };
        Ok(PgConnectConfig {
            dbname: dbname.unwrap_or_else(|| user.clone()),
            host,
            port: port.unwrap_or(5432),
            password: password.or(url_password.map(Secret::new)),
            user,
            sslmode,
            sslrootcert,
            application_name,
            connect_timeout,
            redacted: redact_url(url_text),
        })
    }

    /// The URL with its password masked, for logs and errors.
    pub fn redacted_url(&self) -> String {
        self.redacted.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_like_libpq() {
        let c = PgConnectConfig::parse(
            "postgresql://b%40b:p%2Fw@db.example:6543/my%20db?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
            None,
        )
        .unwrap();
        assert_eq!(c.host, "db.example");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "b@b");
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("p/w"));
        assert_eq!(c.dbname, "my db");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(c.application_name, "x");
        let d = PgConnectConfig::parse("postgres://h", Some(Secret::new("s"))).unwrap();
        assert_eq!(
            (d.user.as_str(), d.dbname.as_str(), d.port, d.sslmode),
            ("postgres", "postgres", 5432, SslMode::Prefer)
        );
        assert_eq!(d.password.as_ref().map(Secret::expose), Some("s"));
        let ip6 = PgConnectConfig::parse("postgres://u@[::1]:5/d", None).unwrap();
        assert_eq!(ip6.host, "::1");
    }

    #[test]
    fn a_root_certificate_means_verification() {
        let mode = |q: &str| {
            PgConnectConfig::parse(&format!("postgres://u@h/d?{q}"), None).map(|c| c.sslmode)
        };
        assert_eq!(mode("").unwrap(), SslMode::Prefer);
        assert_eq!(mode("sslrootcert=/ca.pem").unwrap(), SslMode::VerifyFull);
        assert_eq!(
            mode("sslmode=require&sslrootcert=/ca.pem").unwrap(),
            SslMode::VerifyCa
        );
        assert_eq!(mode("sslmode=require").unwrap(), SslMode::Require);
        for contradiction in ["sslmode=prefer", "sslmode=disable"] {
            let e = mode(&format!("{contradiction}&sslrootcert=/ca.pem")).unwrap_err();
            assert_eq!(e.kind(), Kind::Config);
        }
        assert_eq!(mode("sslmode=verify-full").unwrap(), SslMode::VerifyFull);
        let e = mode("sslmode=verify-ca").unwrap_err();
        assert_eq!(e.kind(), Kind::Config);
        assert!(e.to_string().contains("sslrootcert"), "{e}");
        assert!(!SslMode::Require.verifies_server());
        assert!(SslMode::VerifyCa.verifies_server());
    }

    #[test]
    fn refuses_what_it_cannot_honour_without_leaking_the_password() {
        for bad_url in [
            "mysql://u@h/d",
            "postgres://u:hunter2@h/d?sslmode=maybe",
            "postgres://u:hunter2@h/d?ssl=true",
            "postgres:///d",
            "postgres://u:hunter2@h/d?port=x",
        ] {
            let e = PgConnectConfig::parse(bad_url, None).unwrap_err();
            assert_eq!(e.kind(), Kind::Config);
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        let c = PgConnectConfig::parse("postgres://u:hunter2@h/d", None).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!c.redacted_url().contains("hunter2"));
    }
}
