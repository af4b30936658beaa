//! The replication connection: startup, auth, TLS, and the CopyBoth stream.
//!
//! tokio-postgres has no replication mode, so walnats speaks the protocol
//! itself: postgres-protocol builds the startup, password and SASL
//! messages and computes MD5/SCRAM; framing of backend messages is ours
//! because CopyBothResponse ('W') is not something its parser accepts.
//! Which requests are answered is `auth`'s policy; SCRAM is bound to the
//! TLS certificate (SCRAM-SHA-256-PLUS) whenever the server offers it, and
//! AuthenticationOk counts only after the server's SCRAM signature.
//! Reads go into one `BytesMut` in 256 KiB chunks and many frames are
//! drained per read; an XLogData payload is a zero-copy slice of it.
//! Every frame length is checked before use: bad bytes are errors.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::auth::{self, PasswordRequest};
use super::tls;
use crate::config::{PgConnectConfig, SslMode};
use crate::error::{Error, Kind, Result};
use crate::lsn::Lsn;

/// The session settings of every connection walnats opens, sent in the
/// startup packet, which wins over database and role defaults. The first
/// make value output independent of those defaults. The last two keep code
/// that other roles wrote from running as walnats' role: no function,
/// operator or type is found through a schema someone else can create in
/// (only `pg_catalog`; `pg_temp` named last so that it is not searched
/// first), and no row-level security policy runs (a table whose policies
/// apply to walnats' role is refused instead, see `snapshot::catalog`).
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("client_encoding", "UTF8"),
    ("search_path", SEARCH_PATH),
    ("row_security", "off"),
];

/// `search_path` in every session (no spaces: the SQL connection passes it
/// in the `options` string, which splits at spaces).
pub const SEARCH_PATH: &str = "pg_catalog,pg_temp";

const READ_CHUNK: usize = 256 * 1024;
const MAX_FRAME: usize = 1 << 30;
/// A frame larger than this is looked at before it is read whole: a
/// logical message that nobody asked for (any database user can write one
/// of up to 1 GB) is skipped without ever being held in memory.
const LOOK_FIRST: usize = 1 << 20;
/// How far into a logical message its prefix is looked for; a longer one
/// is nobody's.
const MAX_PREFIX: usize = 64 * 1024;
/// The internal tag of a frame skipped by the message filter.
const SKIPPED: u8 = 0;

/// Which `pg_logical_emit_message` prefixes the reader keeps whole.
pub type MessageFilter = std::sync::Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;
/// Microseconds from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        send_time: i64,
        data: Bytes,
    },
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
    /// The server ended the COPY stream.
    CopyDone,
    /// A large logical message with a prefix the filter refuses, skipped
    /// unread; `wal_end` as in its XLogData header.
    Skipped { wal_end: Lsn, bytes: usize },
}

#[derive(Debug, Clone)]
pub struct SystemId {
    pub systemid: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    pub dbname: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CreatedSlot {
    pub consistent_point: Lsn,
    pub snapshot_name: Option<String>,
}

/// A server ErrorResponse, with the fields walnats uses.
#[derive(Debug, Clone, Default)]
pub struct ServerError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

/// The detail is never printed: PostgreSQL may put row values there.
impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

fn proto(msg: impl Into<String>) -> Error {
    Error::new(
        Kind::Protocol,
        format!("PostgreSQL replication protocol: {}", msg.into()),
    )
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::with_source(Kind::PgConnect, format!("PostgreSQL connection: {what}"), e)
}

/// Maps a server error to a kind and a message with the fix.
pub fn server_error(e: ServerError, cfg: &PgConnectConfig) -> Error {
    let (kind, what) = match e.code.as_str() {
        "28P01" | "28000" => (
            Kind::PgAuth,
            format!(
                "PostgreSQL refused user {:?} at {}:{}: check the password and pg_hba.conf (it must allow `replication` connections for this user)",
                cfg.user, cfg.host, cfg.port
            ),
        ),
        "3D000" => (
            Kind::PgSetup,
            format!("database {:?} does not exist: fix the database name in postgres.url", cfg.dbname),
        ),
        "42501" => (
            Kind::PgSetup,
            format!(
                "role {:?} may not start replication: ALTER ROLE {} REPLICATION",
                cfg.user,
                super::setup::quote_ident(&cfg.user)
            ),
        ),
        "55006" => (Kind::SlotInUse, "the replication slot is active for another process".to_owned()),
        // Another process created the slot between our look-up and create.
        "42710" => (Kind::SlotInUse, "the replication slot was just created by another process".to_owned()),
        "42704" => (Kind::PgSetup, "the replication slot or publication does not exist".to_owned()),
        "53300" => (Kind::PgConnect, "PostgreSQL has no free connection or walsender slot (max_connections / max_wal_senders)".to_owned()),
        "57P01" | "57P02" | "57P03" => (Kind::PgConnect, "PostgreSQL is shutting down or starting up".to_owned()),
        "08P01" if e.message.contains("channel binding") => return auth::channel_binding_refused(cfg),
        c if c.starts_with("08") => (Kind::PgConnect, "PostgreSQL connection failure".to_owned()),
        "55000" if e.message.contains("wal_level") => (
            Kind::PgSetup,
            "logical decoding needs wal_level = logical: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL".to_owned(),
        ),
        _ => (Kind::PgQuery, "PostgreSQL refused a replication command".to_owned()),
    };
    Error::with_source(kind, what, e)
}

/// What TLS gave the connection.
struct Transport {
    io: Box<dyn Io>,
    tls: bool,
    /// The `tls-server-end-point` channel binding, when TLS is on and the
    /// certificate's signature names a hash.
    end_point: Option<Vec<u8>>,
}

/// Where SCRAM stands: AuthenticationOk counts only once the server's
/// signature has been verified.
enum Scram {
    NotStarted,
    Started(Box<ScramSha256>),
    Verified,
}

pub struct ReplicationConn {
    io: Box<dyn Io>,
    tls: bool,
    end_point: Option<Vec<u8>>,
    buf: BytesMut,
    out: BytesMut,
    server_version_num: u32,
    cfg: PgConnectConfig,
    params: Vec<(String, String)>,
    /// Large logical messages whose prefix this refuses are skipped.
    keep_message: Option<MessageFilter>,
    /// Bytes of a skipped frame still to be read and dropped.
    discard: usize,
}

/// For the first bytes of a CopyData body (its kind byte on): whether it is
/// an XLogData carrying a logical message whose prefix `keep` refuses;
/// `None` until enough bytes are there to tell.
fn unwanted_message(body: &[u8], keep: &dyn Fn(&[u8]) -> bool) -> Option<bool> {
    // 'w', wal_start, wal_end, send_time; then pgoutput's 'M', flags, lsn.
    const PREFIX_AT: usize = 1 + 24 + 1 + 1 + 8;
    let head = body.get(..PREFIX_AT)?;
    if head.first() != Some(&b'w') || head.get(25) != Some(&b'M') {
        return Some(false);
    }
    let rest = body.get(PREFIX_AT..).unwrap_or_default();
    match rest.iter().take(MAX_PREFIX).position(|&b| b == 0) {
        Some(n) => Some(!keep(rest.get(..n).unwrap_or_default())),
        None if rest.len() >= MAX_PREFIX => Some(true),
        None => None,
    }
}

/// One backend message: its tag and body (without the length).
struct Frame {
    tag: u8,
    body: Bytes,
}

fn cstr(b: &mut Bytes) -> Result<String> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| proto("unterminated string"))?;
    let s = b.split_to(end);
    b.advance(1);
    String::from_utf8(s.to_vec()).map_err(|_| proto("string is not UTF-8"))
}

fn parse_error(mut body: Bytes) -> ServerError {
    let mut e = ServerError::default();
    while let Some(&field) = body.first() {
        body.advance(1);
        if field == 0 {
            break;
        }
        let Ok(v) = cstr(&mut body) else { break };
        match field {
            b'C' => e.code = v,
            b'M' => e.message = v,
            b'D' => e.detail = Some(v),
            b'H' => e.hint = Some(v),
            _ => {}
        }
    }
    e
}

fn get_u64(b: &mut Bytes) -> Result<u64> {
    if b.len() < 8 {
        return Err(proto("message too short"));
    }
    Ok(b.get_u64())
}

fn get_i64(b: &mut Bytes) -> Result<i64> {
    if b.len() < 8 {
        return Err(proto("message too short"));
    }
    Ok(b.get_i64())
}

/// TCP to the server, within `connect_timeout`; both connections start so.
pub(super) async fn connect_tcp(cfg: &PgConnectConfig) -> Result<TcpStream> {
    let tcp = tokio::time::timeout(
        cfg.connect_timeout,
        TcpStream::connect((cfg.host.as_str(), cfg.port)),
    )
    .await
    .map_err(|_| {
        Error::new(
            Kind::PgConnect,
            format!(
                "PostgreSQL at {}:{} did not answer within {:?}",
                cfg.host, cfg.port, cfg.connect_timeout
            ),
        )
    })?
    .map_err(|e| {
        Error::with_source(
            Kind::PgConnect,
            format!(
                "cannot connect to PostgreSQL at {}:{}: is it running and listening there?",
                cfg.host, cfg.port
            ),
            e,
        )
    })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

impl ReplicationConn {
    pub async fn connect(cfg: &PgConnectConfig) -> Result<ReplicationConn> {
        let tcp = connect_tcp(cfg).await?;
        let Transport { io, tls, end_point } = Self::maybe_tls(tcp, cfg).await?;
        let mut conn = ReplicationConn {
            io,
            tls,
            end_point,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: BytesMut::with_capacity(1024),
            server_version_num: 0,
            cfg: cfg.clone(),
            params: Vec::new(),
            keep_message: None,
            discard: 0,
        };
        conn.startup().await?;
        conn.verify_session()?;
        Ok(conn)
    }

    async fn maybe_tls(mut tcp: TcpStream, cfg: &PgConnectConfig) -> Result<Transport> {
        let plain = |tcp: TcpStream| Transport {
            io: Box::new(tcp),
            tls: false,
            end_point: None,
        };
        let Some(config) = tls::client_config(cfg)? else {
            return Ok(plain(tcp));
        };
        // SSLRequest: length 8, code 80877103.
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .map_err(|e| io_err("sending SSLRequest", e))?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| io_err("reading the SSLRequest answer", e))?;
        match answer[0] {
            b'S' => {
                let connector = tokio_rustls::TlsConnector::from(config);
                let stream = connector.connect(tls::server_name(&cfg.host)?, tcp).await.map_err(|e| {
                    Error::with_source(
                        Kind::PgSetup,
                        format!(
                            "TLS with PostgreSQL at {} failed (sslmode={}): check sslrootcert and that the certificate names the host",
                            cfg.host, cfg.sslmode.as_str()
                        ),
                        e,
                    )
                })?;
                let end_point = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|cert| tls::tls_server_end_point(cert));
                Ok(Transport {
                    io: Box::new(stream),
                    tls: true,
                    end_point,
                })
            }
            b'N' if cfg.sslmode == SslMode::Prefer => Ok(plain(tcp)),
            b'N' => Err(Error::new(
                Kind::PgSetup,
                format!(
                    "PostgreSQL at {} does not offer TLS, and sslmode requires it: enable ssl on the server or lower sslmode",
                    cfg.host
                ),
            )),
            _ => Err(proto("unexpected answer to SSLRequest")),
        }
    }

    async fn startup(&mut self) -> Result<()> {
        let mut params: Vec<(&str, &str)> = vec![
            ("user", self.cfg.user.as_str()),
            ("database", self.cfg.dbname.as_str()),
            ("replication", "database"),
            ("application_name", self.cfg.application_name.as_str()),
        ];
        params.extend_from_slice(SESSION_SETTINGS);
        self.out.clear();
        frontend::startup_message(params.iter().copied(), &mut self.out)
            .map_err(|e| io_err("encoding startup", e))?;
        self.flush_out().await?;
        let mut scram = Scram::NotStarted;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'R' => {
                    let mut b = f.body;
                    if b.len() < 4 {
                        return Err(proto("short authentication message"));
                    }
                    match b.get_i32() {
                        0 => {
                            if matches!(scram, Scram::Started(_)) {
                                return Err(auth::Refusal::ScramUnproven.error(&self.cfg));
                            }
                        }
                        3 => {
                            auth::may_send(&self.cfg, PasswordRequest::Cleartext, self.tls)
                                .map_err(|r| r.error(&self.cfg))?;
                            let pw = self.password()?;
                            self.out.clear();
                            frontend::password_message(pw.as_bytes(), &mut self.out)
                                .map_err(|e| io_err("encoding password", e))?;
                            self.flush_out().await?;
                        }
                        5 => {
                            auth::may_send(&self.cfg, PasswordRequest::Md5, self.tls)
                                .map_err(|r| r.error(&self.cfg))?;
                            if b.len() < 4 {
                                return Err(proto("short MD5 salt"));
                            }
                            let mut salt = [0u8; 4];
                            b.copy_to_slice(&mut salt);
                            let hash = md5_hash(
                                self.cfg.user.as_bytes(),
                                self.password()?.as_bytes(),
                                salt,
                            );
                            self.out.clear();
                            frontend::password_message(hash.as_bytes(), &mut self.out)
                                .map_err(|e| io_err("encoding password", e))?;
                            self.flush_out().await?;
                        }
                        10 => {
                            let mut mechs = Vec::new();
                            while b.first().is_some_and(|&c| c != 0) {
                                mechs.push(cstr(&mut b)?);
                            }
                            let (mechanism, binding) = self.choose_sasl(&mechs)?;
                            let s = ScramSha256::new(self.password()?.as_bytes(), binding);
                            self.out.clear();
                            frontend::sasl_initial_response(mechanism, s.message(), &mut self.out)
                                .map_err(|e| io_err("encoding SASL", e))?;
                            self.flush_out().await?;
                            scram = Scram::Started(Box::new(s));
                        }
                        11 => {
                            let Scram::Started(s) = &mut scram else {
                                return Err(proto("SASL continue without SASL start"));
                            };
                            s.update(&b)
                                .map_err(|e| auth::scram_failed(&self.cfg, &e.to_string()))?;
                            self.out.clear();
                            frontend::sasl_response(s.message(), &mut self.out)
                                .map_err(|e| io_err("encoding SASL", e))?;
                            self.flush_out().await?;
                        }
                        12 => {
                            let Scram::Started(mut s) =
                                std::mem::replace(&mut scram, Scram::NotStarted)
                            else {
                                return Err(proto("SASL final without SASL start"));
                            };
                            s.finish(&b)
                                .map_err(|e| auth::scram_failed(&self.cfg, &e.to_string()))?;
                            scram = Scram::Verified;
                        }
                        other => {
                            return Err(Error::new(
                                Kind::PgAuth,
                                format!(
                                    "PostgreSQL asks for authentication method {other}, which walnats does not support (use scram-sha-256, md5, password or trust)"
                                ),
                            ));
                        }
                    }
                }
                b'S' => {
                    let mut b = f.body;
                    let name = cstr(&mut b)?;
                    let value = cstr(&mut b)?;
                    if name == "server_version" {
                        self.server_version_num = parse_server_version(&value);
                    }
                    self.params.push((name, value));
                }
                b'K' | b'N' => {}
                b'Z' => return Ok(()),
                b'E' => return Err(server_error(parse_error(f.body), &self.cfg)),
                other => {
                    return Err(proto(format!(
                        "unexpected message {:?} during startup",
                        char::from(other)
                    )));
                }
            }
        }
    }

    /// SCRAM-SHA-256-PLUS, bound to the certificate, when the server offers
    /// it over TLS; else SCRAM-SHA-256, telling the server (over TLS) that
    /// walnats could bind, so that a server that can bind too sees a
    /// downgrade.
    fn choose_sasl(&self, mechs: &[String]) -> Result<(&'static str, ChannelBinding)> {
        let offers = |m: &str| mechs.iter().any(|x| x == m);
        match &self.end_point {
            Some(hash) if offers("SCRAM-SHA-256-PLUS") => Ok((
                "SCRAM-SHA-256-PLUS",
                ChannelBinding::tls_server_end_point(hash.clone()),
            )),
            Some(_) if offers("SCRAM-SHA-256") => {
                Ok(("SCRAM-SHA-256", ChannelBinding::unrequested()))
            }
            None if offers("SCRAM-SHA-256") => Ok(("SCRAM-SHA-256", ChannelBinding::unsupported())),
            _ => Err(Error::new(
                Kind::PgAuth,
                format!(
                    "PostgreSQL offers SASL mechanisms {mechs:?}; walnats supports SCRAM-SHA-256, and SCRAM-SHA-256-PLUS over TLS"
                ),
            )),
        }
    }

    /// The server reports the settings that shape value output; if one is
    /// not what walnats asked for (a pooler or an extension interfering),
    /// values would be misread, so refuse to stream.
    fn verify_session(&self) -> Result<()> {
        let get = |name: &str| {
            self.params
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        type Check = (&'static str, fn(&str) -> bool);
        // search_path is reported by PostgreSQL 18 and later only.
        let checks: [Check; 5] = [
            ("DateStyle", |v| v.starts_with("ISO")),
            ("IntervalStyle", |v| v == "postgres"),
            ("TimeZone", |v| v == "UTC" || v == "Etc/UTC"),
            ("client_encoding", |v| v == "UTF8"),
            ("search_path", |v| v.replace(' ', "") == SEARCH_PATH),
        ];
        for (name, ok) in checks {
            if let Some(v) = get(name)
                && !ok(v)
            {
                return Err(Error::new(
                    Kind::PgSetup,
                    format!(
                        "PostgreSQL reports {name} = {v} although walnats asked for its own value in the startup packet: \
                         something between walnats and PostgreSQL (a pooler?) changes session settings; connect directly"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn password(&self) -> Result<String> {
        self.cfg.password.as_ref().map(|p| p.expose().to_owned()).ok_or_else(|| {
            Error::new(
                Kind::PgAuth,
                format!(
                    "PostgreSQL asks for a password for user {:?}: put it in postgres.url, postgres.password(_file) or WALNATS_POSTGRES_PASSWORD",
                    self.cfg.user
                ),
            )
        })
    }

    /// From now on a logical message larger than 1 MiB whose prefix `keep`
    /// refuses is skipped as it arrives, never held whole.
    pub fn skip_unwanted_messages(&mut self, keep: MessageFilter) {
        self.keep_message = Some(keep);
    }

    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    async fn flush_out(&mut self) -> Result<()> {
        self.io
            .write_all(&self.out)
            .await
            .map_err(|e| io_err("writing", e))?;
        self.io.flush().await.map_err(|e| io_err("writing", e))
    }

    /// A whole frame from the buffer, if one is there.
    fn take_frame(&mut self) -> Result<Option<Frame>> {
        let Some(header) = self.buf.get(..5) else {
            return Ok(None);
        };
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if !(4..=MAX_FRAME).contains(&len) {
            return Err(proto(format!("frame length {len} out of range")));
        }
        if self.buf.len() < 1 + len {
            if tag == b'd'
                && len > LOOK_FIRST
                && let Some(keep) = &self.keep_message
            {
                match unwanted_message(self.buf.get(5..).unwrap_or_default(), keep.as_ref()) {
                    // Wait for the prefix before making room for the frame.
                    None => return Ok(None),
                    Some(true) => {
                        // Its wal_end and size, for the session.
                        let mut body = BytesMut::with_capacity(16);
                        body.put_slice(self.buf.get(14..22).unwrap_or_default());
                        body.put_u64(len as u64);
                        self.discard = 1 + len - self.buf.len();
                        self.buf.clear();
                        return Ok(Some(Frame {
                            tag: SKIPPED,
                            body: body.freeze(),
                        }));
                    }
                    Some(false) => {}
                }
            }
            self.buf.reserve(1 + len - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(1 + len).freeze();
        frame.advance(5);
        Ok(Some(Frame { tag, body: frame }))
    }

    /// Cancel-safe: bytes read are kept in `buf` across cancellations.
    async fn read_frame(&mut self) -> Result<Frame> {
        loop {
            if self.discard > 0 {
                let n = self.discard.min(self.buf.len());
                self.buf.advance(n);
                self.discard -= n;
            }
            if self.discard == 0
                && let Some(f) = self.take_frame()?
            {
                return Ok(f);
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| io_err("reading", e))?;
            if n == 0 {
                return Err(Error::new(
                    Kind::PgConnect,
                    "PostgreSQL closed the connection",
                ));
            }
        }
    }

    /// Runs a simple-protocol command; rows as text columns.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        self.out.clear();
        frontend::query(sql, &mut self.out).map_err(|e| io_err("encoding query", e))?;
        self.flush_out().await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'T' | b'C' | b'I' | b'N' | b'S' => {}
                b'D' => {
                    let mut b = f.body;
                    if b.len() < 2 {
                        return Err(proto("short DataRow"));
                    }
                    let n = b.get_i16();
                    let mut row = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(64));
                    for _ in 0..n {
                        if b.len() < 4 {
                            return Err(proto("short DataRow"));
                        }
                        let len = b.get_i32();
                        if len < 0 {
                            row.push(None);
                            continue;
                        }
                        let len = len as usize;
                        if b.len() < len {
                            return Err(proto("short DataRow"));
                        }
                        let v = b.split_to(len);
                        row.push(Some(
                            String::from_utf8(v.to_vec())
                                .map_err(|_| proto("column is not UTF-8"))?,
                        ));
                    }
                    rows.push(row);
                }
                b'E' => failed = Some(parse_error(f.body)),
                b'Z' => break,
                other => {
                    return Err(proto(format!(
                        "unexpected message {:?} after a query",
                        char::from(other)
                    )));
                }
            }
        }
        match failed {
            Some(e) => Err(server_error(e, &self.cfg)),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemId> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let r = rows
            .first()
            .ok_or_else(|| proto("IDENTIFY_SYSTEM returned no row"))?;
        let col = |i: usize| r.get(i).cloned().flatten();
        Ok(SystemId {
            systemid: col(0).unwrap_or_default(),
            timeline: col(1).and_then(|s| s.parse().ok()).unwrap_or(0),
            xlogpos: col(2)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| proto("IDENTIFY_SYSTEM: bad xlogpos"))?,
            dbname: col(3),
        })
    }

    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        export_snapshot: bool,
    ) -> Result<CreatedSlot> {
        let snap = if export_snapshot {
            "EXPORT_SNAPSHOT"
        } else {
            "NOEXPORT_SNAPSHOT"
        };
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {snap}",
            super::setup::quote_ident(slot)
        );
        let rows = self.simple_query(&sql).await?;
        let r = rows
            .first()
            .ok_or_else(|| proto("CREATE_REPLICATION_SLOT returned no row"))?;
        Ok(CreatedSlot {
            consistent_point: r
                .get(1)
                .cloned()
                .flatten()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| proto("CREATE_REPLICATION_SLOT: bad consistent_point"))?,
            snapshot_name: r.get(2).cloned().flatten(),
        })
    }

    /// START_REPLICATION; returns once the server is in CopyBoth mode.
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<()> {
        let opts: Vec<String> = options
            .iter()
            .map(|(k, v)| {
                format!(
                    "{} '{}'",
                    super::setup::quote_ident(k),
                    v.replace('\'', "''")
                )
            })
            .collect();
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({})",
            super::setup::quote_ident(slot),
            opts.join(", ")
        );
        self.out.clear();
        frontend::query(&sql, &mut self.out).map_err(|e| io_err("encoding query", e))?;
        self.flush_out().await?;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'W' => return Ok(()),
                b'N' | b'S' => {}
                b'E' => {
                    let e = parse_error(f.body);
                    // Drain to ReadyForQuery is not needed: the session ends.
                    return Err(server_error(e, &self.cfg));
                }
                other => {
                    return Err(proto(format!(
                        "unexpected message {:?} after START_REPLICATION",
                        char::from(other)
                    )));
                }
            }
        }
    }

    /// The next replication message. Cancel-safe.
    pub async fn recv(&mut self) -> Result<ReplicationMessage> {
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'd' => {
                    let mut b = f.body;
                    let Some(&kind) = b.first() else {
                        return Err(proto("empty CopyData"));
                    };
                    b.advance(1);
                    return match kind {
                        b'w' => {
                            let wal_start = Lsn::from_u64(get_u64(&mut b)?);
                            let wal_end = Lsn::from_u64(get_u64(&mut b)?);
                            let send_time = get_i64(&mut b)?;
                            Ok(ReplicationMessage::XLogData {
                                wal_start,
                                wal_end,
                                send_time,
                                data: b,
                            })
                        }
                        b'k' => {
                            let wal_end = Lsn::from_u64(get_u64(&mut b)?);
                            let send_time = get_i64(&mut b)?;
                            let reply = *b.first().ok_or_else(|| proto("short keepalive"))?;
                            Ok(ReplicationMessage::Keepalive {
                                wal_end,
                                send_time,
                                reply_requested: reply == 1,
                            })
                        }
                        other => Err(proto(format!(
                            "unknown CopyData kind {:?}",
                            char::from(other)
                        ))),
                    };
                }
                // A logical walsender that shuts down ends the COPY with
                // CopyDone, or straight away with CommandComplete.
                b'c' | b'C' | b'Z' => return Ok(ReplicationMessage::CopyDone),
                SKIPPED => {
                    let mut b = f.body;
                    let wal_end = Lsn::from_u64(get_u64(&mut b)?);
                    let bytes = usize::try_from(get_u64(&mut b)?).unwrap_or(usize::MAX);
                    return Ok(ReplicationMessage::Skipped { wal_end, bytes });
                }
                b'N' | b'S' => {}
                b'E' => return Err(server_error(parse_error(f.body), &self.cfg)),
                other => {
                    return Err(proto(format!(
                        "unexpected message {:?} while streaming",
                        char::from(other)
                    )));
                }
            }
        }
    }

    /// Standby status update: what walnats has received, and what
    /// PostgreSQL may consider flushed (the slot's confirmed_flush_lsn).
    pub async fn send_standby_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply: bool,
    ) -> Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0)
            - PG_EPOCH_OFFSET_US;
        self.out.clear();
        self.out.put_u8(b'd');
        self.out.put_i32(4 + 1 + 8 * 4 + 1);
        self.out.put_u8(b'r');
        self.out.put_u64(write.as_u64());
        self.out.put_u64(flush.as_u64());
        self.out.put_u64(apply.as_u64());
        self.out.put_i64(now);
        self.out.put_u8(u8::from(reply));
        self.flush_out().await
    }

    /// CopyDone and Terminate, best effort.
    pub async fn close(mut self) -> Result<()> {
        self.out.clear();
        self.out.put_u8(b'c');
        self.out.put_i32(4);
        frontend::terminate(&mut self.out);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.flush_out()).await;
        Ok(())
    }
}

/// `15.18 (Debian 15.18-0+deb12u1)` → 150018; `18.6` → 180006.
fn parse_server_version(v: &str) -> u32 {
    let num: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = num.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    if major >= 10 {
        major * 10_000 + minor
    } else {
        major * 10_000 + minor * 100 + parts.next().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.18 (Debian 15.18-0+deb12u1)"),
            150018
        );
        assert_eq!(parse_server_version("18.6"), 180006);
        assert_eq!(parse_server_version("9.6.24"), 90624);
        assert_eq!(parse_server_version("17devel"), 170000);
    }

    #[test]
    fn error_fields_parse_and_unknown_fields_are_skipped() {
        let body = Bytes::from_static(b"SERROR\0C42501\0Mmust be superuser\0Xwhat\0\0");
        let e = parse_error(body);
        assert_eq!(e.code, "42501");
        assert_eq!(e.message, "must be superuser");
        let truncated = parse_error(Bytes::from_static(b"C4250"));
        assert_eq!(truncated.code, "");
    }

    fn message_frame(prefix: &[u8], content: usize) -> Vec<u8> {
        let mut b = vec![b'w'];
        b.extend_from_slice(&[0; 24]);
        b.push(b'M');
        b.push(0);
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(prefix);
        b.push(0);
        b.extend_from_slice(&(content as u32).to_be_bytes());
        b
    }

    #[test]
    fn a_message_nobody_asked_for_is_told_from_its_first_bytes() {
        let keep = |p: &[u8]| p == b"wanted";
        let wanted = message_frame(b"wanted", 10);
        assert_eq!(unwanted_message(&wanted, &keep), Some(false));
        let other = message_frame(b"other", 10);
        assert_eq!(unwanted_message(&other, &keep), Some(true));
        // Not enough bytes yet to see the prefix's end.
        assert_eq!(unwanted_message(&other[..30], &keep), None);
        assert_eq!(unwanted_message(&other[..38], &keep), None);
        // A row change is never skipped.
        let mut insert = other.clone();
        insert[25] = b'I';
        assert_eq!(unwanted_message(&insert, &keep), Some(false));
        // A prefix without an end within 64 KiB is nobody's.
        let mut long = message_frame(b"", 0);
        long.truncate(35);
        long.extend(std::iter::repeat_n(b'x', MAX_PREFIX));
        assert_eq!(unwanted_message(&long, &keep), Some(true));
    }
}
