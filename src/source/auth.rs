//! What walnats answers when a server asks it to authenticate, on both
//! PostgreSQL connections: one policy, one set of refusals.
//!
//! A password in clear text, or its MD5 hash (which stands for the
//! password: a fake server that chose the salt can replay or crack it), is
//! sent only over TLS whose certificate walnats has verified (`verify-ca`,
//! `verify-full`); elsewhere whoever answers at the address would get it.
//! SCRAM is answered everywhere: it never gives the password away, and the
//! server must prove that it knows it (its final message, the server
//! signature) before walnats accepts AuthenticationOk.
//!
//! [`AuthWatch`] applies the policy to the server's bytes as they arrive
//! (sans I/O), for the SQL connection, whose authentication tokio-postgres
//! runs. It must never let a request it refuses reach the client that
//! would answer it.

use std::fmt;

use crate::config::PgConnectConfig;
use crate::error::{Error, Kind};

/// An authentication request that would give the password away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordRequest {
    /// AuthenticationCleartextPassword (code 3).
    Cleartext,
    /// AuthenticationMD5Password (code 5).
    Md5,
}

/// Why walnats stopped authenticating, before the connection's settings
/// are at hand (the SQL connection's watch); [`Refusal::error`] says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server asked for the password, or its MD5, over `tls: false`
    /// (no TLS) or unverified TLS.
    Password { request: PasswordRequest, tls: bool },
    /// AuthenticationOk came after SCRAM began but before the server's
    /// final message.
    ScramUnproven,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Password {
                request: PasswordRequest::Cleartext,
                ..
            } => f.write_str("the server asked for the password in clear text"),
            Refusal::Password {
                request: PasswordRequest::Md5,
                ..
            } => f.write_str("the server asked for an MD5 password hash"),
            Refusal::ScramUnproven => {
                f.write_str("the server accepted SCRAM without its final message")
            }
        }
    }
}

impl std::error::Error for Refusal {}

impl Refusal {
    /// The one line the user reads: the cause and the fix.
    pub fn error(self, cfg: &PgConnectConfig) -> Error {
        match self {
            Refusal::Password { request, tls } => password_refused(cfg, request, tls),
            Refusal::ScramUnproven => Error::new(
                Kind::PgAuth,
                format!(
                    "PostgreSQL at {}:{} accepted walnats without its SCRAM final message, so it never proved \
                     that it knows the password: is this the right server? walnats refuses it; \
                     check postgres.url and what stands between walnats and PostgreSQL",
                    cfg.host, cfg.port
                ),
            ),
        }
    }
}

/// Whether the password may be answered to `request` on this connection.
pub fn may_send(cfg: &PgConnectConfig, request: PasswordRequest, tls: bool) -> Result<(), Refusal> {
    if cfg.sslmode.verifies_server() {
        Ok(())
    } else {
        Err(Refusal::Password { request, tls })
    }
}

fn password_refused(cfg: &PgConnectConfig, request: PasswordRequest, tls: bool) -> Error {
    let what = match request {
        PasswordRequest::Cleartext => "the password in clear text",
        PasswordRequest::Md5 => "an MD5 hash of the password (which stands for the password)",
    };
    let over = if tls {
        format!(
            "over TLS whose certificate walnats does not verify (sslmode={})",
            cfg.sslmode.as_str()
        )
    } else {
        format!("without TLS (sslmode={})", cfg.sslmode.as_str())
    };
    Error::new(
        Kind::PgAuth,
        format!(
            "PostgreSQL at {}:{} asks for {what} {over}, and walnats sends it only to a server it has verified, \
             so it sent nothing: use SCRAM on the server (password_encryption = scram-sha-256, set the password \
             again, and scram-sha-256 in pg_hba.conf), or verify the server with sslmode=verify-full and sslrootcert",
            cfg.host, cfg.port
        ),
    )
}

/// The server's SCRAM final message did not verify (a wrong signature, or
/// a SCRAM error): it does not know the password.
pub fn scram_failed(cfg: &PgConnectConfig, why: &str) -> Error {
    Error::new(
        Kind::PgAuth,
        format!(
            "PostgreSQL at {}:{} failed its side of SCRAM ({why}), so it does not know the password: \
             is this the right server? check postgres.url and what stands between walnats and PostgreSQL",
            cfg.host, cfg.port
        ),
    )
}

/// The server refused the SCRAM channel binding: the certificate walnats
/// saw is not the server's.
pub fn channel_binding_refused(cfg: &PgConnectConfig) -> Error {
    Error::new(
        Kind::PgAuth,
        format!(
            "PostgreSQL at {}:{} refused walnats' SCRAM channel binding: the TLS certificate walnats saw is not \
             the server's, so something in between ends TLS (a proxy, or an attacker): connect to PostgreSQL \
             directly, and verify it with sslmode=verify-full and sslrootcert",
            cfg.host, cfg.port
        ),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The one-byte answer to SSLRequest: 'S' hands over to TLS (whose own
    /// watch reads the protocol), anything else goes on in plain text, as
    /// tokio-postgres does.
    SslAnswer,
    Header,
    Body,
    /// Authenticated (or in TLS): nothing more to watch.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sasl {
    None,
    Started,
    Finished,
}

/// Reads the server's side of startup, frame by frame, and refuses what
/// the policy refuses, before the client sees it.
#[derive(Debug, Clone)]
pub struct AuthWatch {
    phase: Phase,
    header: [u8; 5],
    header_len: usize,
    /// The body bytes still to come in the current frame.
    remaining: usize,
    /// The first four bytes of an Authentication ('R') body: its code.
    code: [u8; 4],
    code_len: usize,
    sasl: Sasl,
    passwords_allowed: bool,
    tls: bool,
}

impl AuthWatch {
    /// `after_ssl_request`: the client asked for TLS and the first byte is
    /// the answer. `tls`: these bytes come out of TLS.
    pub fn new(cfg: &PgConnectConfig, after_ssl_request: bool, tls: bool) -> AuthWatch {
        AuthWatch {
            phase: if after_ssl_request {
                Phase::SslAnswer
            } else {
                Phase::Header
            },
            header: [0; 5],
            header_len: 0,
            remaining: 0,
            code: [0; 4],
            code_len: 0,
            sasl: Sasl::None,
            passwords_allowed: may_send(cfg, PasswordRequest::Cleartext, tls).is_ok(),
            tls,
        }
    }

    /// Bytes from the server, in order.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Refusal> {
        while let Some((&first, rest)) = bytes.split_first() {
            match self.phase {
                Phase::Done => return Ok(()),
                Phase::SslAnswer => {
                    self.phase = if first == b'S' {
                        Phase::Done
                    } else {
                        Phase::Header
                    };
                    bytes = rest;
                }
                Phase::Header => {
                    let n = (self.header.len() - self.header_len).min(bytes.len());
                    let (take, rest) = bytes.split_at(n);
                    self.header[self.header_len..self.header_len + n].copy_from_slice(take);
                    self.header_len += n;
                    bytes = rest;
                    if self.header_len == self.header.len() {
                        let [_, a, b, c, d] = self.header;
                        let Some(remaining) = usize::try_from(u32::from_be_bytes([a, b, c, d]))
                            .ok()
                            .and_then(|len| len.checked_sub(4))
                        else {
                            // Not a frame: tokio-postgres refuses it.
                            self.phase = Phase::Done;
                            return Ok(());
                        };
                        self.remaining = remaining;
                        self.code_len = 0;
                        self.phase = Phase::Body;
                        if remaining == 0 {
                            self.end_frame()?;
                        }
                    }
                }
                Phase::Body => {
                    let n = self.remaining.min(bytes.len());
                    let (take, rest) = bytes.split_at(n);
                    if self.header[0] == b'R' {
                        let k = (self.code.len() - self.code_len).min(take.len());
                        self.code[self.code_len..self.code_len + k].copy_from_slice(&take[..k]);
                        self.code_len += k;
                    }
                    self.remaining -= n;
                    bytes = rest;
                    if self.remaining == 0 {
                        self.end_frame()?;
                    }
                }
            }
        }
        Ok(())
    }

    fn end_frame(&mut self) -> Result<(), Refusal> {
        self.header_len = 0;
        self.phase = Phase::Header;
        if self.header[0] != b'R' || self.code_len < self.code.len() {
            return Ok(());
        }
        let refuse = |request| Refusal::Password {
            request,
            tls: self.tls,
        };
        match i32::from_be_bytes(self.code) {
            0 if self.sasl == Sasl::Started => return Err(Refusal::ScramUnproven),
            0 => self.phase = Phase::Done,
            3 if !self.passwords_allowed => return Err(refuse(PasswordRequest::Cleartext)),
            5 if !self.passwords_allowed => return Err(refuse(PasswordRequest::Md5)),
            10 => self.sasl = Sasl::Started,
            // tokio-postgres checks the signature in it.
            12 => self.sasl = Sasl::Finished,
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(query: &str) -> PgConnectConfig {
        PgConnectConfig::parse(&format!("postgres://u:pw@h/d?{query}"), None).unwrap()
    }

    fn auth(code: i32, data: &[u8]) -> Vec<u8> {
        let mut f = vec![b'R'];
        f.extend_from_slice(&(8 + data.len() as u32).to_be_bytes());
        f.extend_from_slice(&code.to_be_bytes());
        f.extend_from_slice(data);
        f
    }

    /// Feeds `bytes` in pieces of `step` bytes, as reads may cut them.
    fn feed_in_steps(w: &mut AuthWatch, bytes: &[u8], step: usize) -> Result<(), Refusal> {
        bytes.chunks(step).try_for_each(|c| w.feed(c))
    }

    #[test]
    fn password_requests_are_refused_unless_the_server_is_verified() {
        for step in [1, 2, 3, 7, 1000] {
            for (code, request) in [(3, PasswordRequest::Cleartext), (5, PasswordRequest::Md5)] {
                let data: &[u8] = if code == 5 { &[1, 2, 3, 4] } else { &[] };
                // A notice first: frames are followed across reads.
                let mut bytes = vec![b'N', 0, 0, 0, 6, b'x', 0];
                bytes.extend(auth(code, data));
                for query in ["sslmode=disable", "", "sslmode=require"] {
                    let mut w = AuthWatch::new(&cfg(query), false, query.contains("require"));
                    assert_eq!(
                        feed_in_steps(&mut w, &bytes, step),
                        Err(Refusal::Password {
                            request,
                            tls: query.contains("require")
                        }),
                        "{query} step {step}"
                    );
                }
                let mut w = AuthWatch::new(&cfg("sslmode=verify-full"), false, true);
                assert_eq!(feed_in_steps(&mut w, &bytes, step), Ok(()));
            }
        }
    }

    #[test]
    fn the_ssl_answer_is_one_byte_and_tls_is_watched_inside() {
        let c = cfg("");
        // 'N' then plain text: watched.
        let mut bytes = vec![b'N'];
        bytes.extend(auth(3, &[]));
        assert!(AuthWatch::new(&c, true, false).feed(&bytes).is_err());
        // 'S' then TLS records: the socket's watch stops.
        let mut bytes = vec![b'S'];
        bytes.extend(auth(3, &[]));
        assert_eq!(AuthWatch::new(&c, true, false).feed(&bytes), Ok(()));
    }

    #[test]
    fn authentication_ok_needs_the_scram_final_message_once_scram_began() {
        let c = cfg("sslmode=verify-full");
        let mut start = auth(10, b"SCRAM-SHA-256\0\0");
        start.extend(auth(11, b"r=abc,s=c2FsdA==,i=4096"));
        let mut skipped = start.clone();
        skipped.extend(auth(0, &[]));
        let mut w = AuthWatch::new(&c, false, true);
        assert_eq!(w.feed(&skipped), Err(Refusal::ScramUnproven));
        let mut full = start;
        full.extend(auth(12, b"v=c2lnbmF0dXJl"));
        full.extend(auth(0, &[]));
        // After AuthenticationOk nothing is watched (a row may look like anything).
        full.extend(auth(3, &[]));
        let mut w = AuthWatch::new(&cfg("sslmode=disable"), false, false);
        assert_eq!(feed_in_steps(&mut w, &full, 5), Ok(()));
        // trust: AuthenticationOk at once.
        let mut w = AuthWatch::new(&cfg("sslmode=disable"), false, false);
        assert_eq!(w.feed(&auth(0, &[])), Ok(()));
    }

    #[test]
    fn refusals_name_the_cause_and_the_fix_in_one_line() {
        let c = cfg("");
        for r in [
            Refusal::Password {
                request: PasswordRequest::Cleartext,
                tls: false,
            },
            Refusal::Password {
                request: PasswordRequest::Md5,
                tls: true,
            },
            Refusal::ScramUnproven,
        ] {
            let e = r.error(&c);
            assert_eq!(e.kind(), Kind::PgAuth);
            let text = e.to_string();
            assert!(!text.contains('\n') && !text.contains("pw"), "{text}");
        }
        let text = Refusal::Password {
            request: PasswordRequest::Md5,
            tls: false,
        }
        .error(&c)
        .to_string();
        assert!(
            text.contains("MD5")
                && text.contains("password_encryption = scram-sha-256")
                && text.contains("sslmode=verify-full and sslrootcert"),
            "{text}"
        );
    }
}
