//! The replication connection: startup, auth, TLS, and the CopyBoth stream.
//!
//! tokio-postgres has no replication mode, so walnats speaks the protocol
//! itself: postgres-protocol builds the startup, password and SASL
//! messages and computes MD5/SCRAM; framing and parsing of backend
//! messages is ours (in `protocol`, without I/O) because CopyBothResponse
//! ('W') is not something its parser accepts. This file owns the socket:
//! what is sent when, and which message may come next.
//! Which requests are answered is `auth`'s policy; SCRAM is bound to the
//! TLS certificate (SCRAM-SHA-256-PLUS) whenever the server offers it, and
//! AuthenticationOk counts only after the server's SCRAM signature.
//! Reads go into one `BytesMut` in 256 KiB chunks and many frames are
//! drained per read; an XLogData payload is a zero-copy slice of it.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::auth::{self, PasswordRequest};
use super::protocol::{
    self, AuthRequest, CopyData, FrameBuffer, PrimaryKeepalive, SKIPPED, StandbyStatusUpdate,
    XLogData, proto, unexpected,
};
pub use super::protocol::{MessageFilter, ServerError};
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

impl From<CopyData> for ReplicationMessage {
    fn from(m: CopyData) -> ReplicationMessage {
        match m {
            CopyData::XLogData(XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            }) => ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            },
            CopyData::Keepalive(PrimaryKeepalive {
                wal_end,
                send_time,
                reply_requested,
            }) => ReplicationMessage::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            },
        }
    }
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

/// The CREATE_REPLICATION_SLOT command. Without failover, the old
/// keyword form every supported server knows; with it, the option list
/// (PostgreSQL 15+; FAILOVER needs 17+).
pub fn create_slot_sql(slot: &str, export_snapshot: bool, failover: bool) -> String {
    let name = super::setup::quote_ident(slot);
    match (failover, export_snapshot) {
        (false, true) => format!("CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput EXPORT_SNAPSHOT"),
        (false, false) => {
            format!("CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput NOEXPORT_SNAPSHOT")
        }
        (true, true) => format!(
            "CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)"
        ),
        (true, false) => format!(
            "CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput (SNAPSHOT 'nothing', FAILOVER true)"
        ),
    }
}

/// The ALTER_REPLICATION_SLOT command that makes `slot` a failover slot.
pub fn alter_slot_failover_sql(slot: &str) -> String {
    format!(
        "ALTER_REPLICATION_SLOT {} ( FAILOVER true )",
        super::setup::quote_ident(slot)
    )
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
    frames: FrameBuffer,
    out: BytesMut,
    server_version_num: u32,
    cfg: PgConnectConfig,
    params: Vec<(String, String)>,
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
            frames: FrameBuffer::new(),
            out: BytesMut::with_capacity(1024),
            server_version_num: 0,
            cfg: cfg.clone(),
            params: Vec::new(),
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
        tcp.write_all(&protocol::SSL_REQUEST)
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
                    let request = protocol::parse_auth(f.body)?;
                    self.authenticate(request, &mut scram).await?;
                }
                b'S' => {
                    let (name, value) = protocol::parse_parameter_status(f.body)?;
                    if name == "server_version" {
                        self.server_version_num = protocol::parse_server_version(&value);
                    }
                    self.params.push((name, value));
                }
                b'K' | b'N' => {}
                b'Z' => return Ok(()),
                b'E' => return Err(server_error(protocol::parse_error(f.body), &self.cfg)),
                other => return Err(unexpected(other, "during startup")),
            }
        }
    }

    /// Answers one authentication request, as far as `auth`'s policy lets
    /// it; `scram` is where SCRAM stands.
    async fn authenticate(&mut self, request: AuthRequest, scram: &mut Scram) -> Result<()> {
        match request {
            AuthRequest::Ok => {
                if matches!(scram, Scram::Started(_)) {
                    return Err(auth::Refusal::ScramUnproven.error(&self.cfg));
                }
                Ok(())
            }
            AuthRequest::Cleartext => {
                auth::may_send(&self.cfg, PasswordRequest::Cleartext, self.tls)
                    .map_err(|r| r.error(&self.cfg))?;
                let pw = self.password()?;
                self.send("encoding password", |out| {
                    frontend::password_message(pw.as_bytes(), out)
                })
                .await
            }
            AuthRequest::Md5 { salt } => {
                auth::may_send(&self.cfg, PasswordRequest::Md5, self.tls)
                    .map_err(|r| r.error(&self.cfg))?;
                let salt = salt.ok_or_else(|| proto("short MD5 salt"))?;
                let hash = md5_hash(self.cfg.user.as_bytes(), self.password()?.as_bytes(), salt);
                self.send("encoding password", |out| {
                    frontend::password_message(hash.as_bytes(), out)
                })
                .await
            }
            AuthRequest::Sasl { mechanisms } => {
                let (mechanism, binding) = self.choose_sasl(&mechanisms)?;
                let s = ScramSha256::new(self.password()?.as_bytes(), binding);
                self.send("encoding SASL", |out| {
                    frontend::sasl_initial_response(mechanism, s.message(), out)
                })
                .await?;
                *scram = Scram::Started(Box::new(s));
                Ok(())
            }
            AuthRequest::SaslContinue(data) => {
                let Scram::Started(s) = scram else {
                    return Err(proto("SASL continue without SASL start"));
                };
                s.update(&data)
                    .map_err(|e| auth::scram_failed(&self.cfg, &e.to_string()))?;
                self.send("encoding SASL", |out| {
                    frontend::sasl_response(s.message(), out)
                })
                .await
            }
            AuthRequest::SaslFinal(data) => {
                let Scram::Started(mut s) = std::mem::replace(scram, Scram::NotStarted) else {
                    return Err(proto("SASL final without SASL start"));
                };
                s.finish(&data)
                    .map_err(|e| auth::scram_failed(&self.cfg, &e.to_string()))?;
                *scram = Scram::Verified;
                Ok(())
            }
            AuthRequest::Other(code) => Err(Error::new(
                Kind::PgAuth,
                format!(
                    "PostgreSQL asks for authentication method {code}, which walnats does not support (use scram-sha-256, md5, password or trust)"
                ),
            )),
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
        self.frames.skip_unwanted_messages(keep);
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

    /// Sends the one message `encode` writes; `what` names it in an error.
    async fn send(
        &mut self,
        what: &str,
        encode: impl FnOnce(&mut BytesMut) -> std::io::Result<()>,
    ) -> Result<()> {
        self.out.clear();
        encode(&mut self.out).map_err(|e| io_err(what, e))?;
        self.flush_out().await
    }

    /// Cancel-safe: bytes read are kept in the frame buffer across
    /// cancellations.
    async fn read_frame(&mut self) -> Result<protocol::Frame> {
        loop {
            if let Some(f) = self.frames.next_frame()? {
                return Ok(f);
            }
            let n = self
                .io
                .read_buf(self.frames.spare())
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
        self.send("encoding query", |out| frontend::query(sql, out))
            .await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'T' | b'C' | b'I' | b'N' | b'S' => {}
                b'D' => rows.push(protocol::parse_data_row(f.body)?),
                b'E' => failed = Some(protocol::parse_error(f.body)),
                b'Z' => break,
                other => return Err(unexpected(other, "after a query")),
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

    /// CREATE_REPLICATION_SLOT, exporting the snapshot when asked; with
    /// `failover` (PostgreSQL 17+) the slot is made a failover slot in the
    /// same command, since any other command on this connection would
    /// end the exported snapshot.
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        export_snapshot: bool,
        failover: bool,
    ) -> Result<CreatedSlot> {
        let sql = create_slot_sql(slot, export_snapshot, failover);
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

    /// ALTER_REPLICATION_SLOT ... ( FAILOVER true ) (PostgreSQL 17+): the
    /// slot must not be in use, so walnats does it while it holds its slot
    /// lock and before START_REPLICATION.
    pub async fn enable_slot_failover(&mut self, slot: &str) -> Result<()> {
        self.simple_query(&alter_slot_failover_sql(slot))
            .await
            .map(drop)
    }

    /// Whether this connection reaches the same server as the SQL session
    /// whose backend is `pid`, started at `backend_start` (as
    /// `pg_stat_activity` prints it): a replication connection with
    /// `replication=database` runs simple SQL. A host name that resolves
    /// elsewhere by now (DNS after a failover) fails this.
    pub async fn sees_backend(&mut self, pid: i32, backend_start: &str) -> Result<bool> {
        let rows = self
            .simple_query(&format!(
                "SELECT 1 FROM pg_catalog.pg_stat_activity WHERE pid = {pid} \
                 AND backend_start::text = '{}'",
                backend_start.replace('\'', "''")
            ))
            .await?;
        Ok(!rows.is_empty())
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
        self.send("encoding query", |out| frontend::query(&sql, out))
            .await?;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'W' => return Ok(()),
                b'N' | b'S' => {}
                b'E' => {
                    let e = protocol::parse_error(f.body);
                    // Drain to ReadyForQuery is not needed: the session ends.
                    return Err(server_error(e, &self.cfg));
                }
                other => return Err(unexpected(other, "after START_REPLICATION")),
            }
        }
    }

    /// The next replication message. Cancel-safe.
    pub async fn recv(&mut self) -> Result<ReplicationMessage> {
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'd' => return protocol::parse_copy_data(f.body).map(ReplicationMessage::from),
                // A logical walsender that shuts down ends the COPY with
                // CopyDone, or straight away with CommandComplete.
                b'c' | b'C' | b'Z' => return Ok(ReplicationMessage::CopyDone),
                SKIPPED => {
                    let (wal_end, bytes) = protocol::parse_skipped(f.body)?;
                    return Ok(ReplicationMessage::Skipped { wal_end, bytes });
                }
                b'N' | b'S' => {}
                b'E' => return Err(server_error(protocol::parse_error(f.body), &self.cfg)),
                other => return Err(unexpected(other, "while streaming")),
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
        let update = StandbyStatusUpdate {
            write,
            flush,
            apply,
            clock: protocol::pg_clock(SystemTime::now()),
            reply_requested: reply,
        };
        self.out.clear();
        update.encode(&mut self.out);
        self.flush_out().await
    }

    /// CopyDone and Terminate, best effort.
    pub async fn close(mut self) -> Result<()> {
        self.out.clear();
        protocol::copy_done(&mut self.out);
        frontend::terminate(&mut self.out);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.flush_out()).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_commands_ask_for_failover_in_the_command_that_makes_the_slot() {
        assert_eq!(
            create_slot_sql("walnats", true, false),
            "CREATE_REPLICATION_SLOT \"walnats\" LOGICAL pgoutput EXPORT_SNAPSHOT"
        );
        assert_eq!(
            create_slot_sql("walnats", false, false),
            "CREATE_REPLICATION_SLOT \"walnats\" LOGICAL pgoutput NOEXPORT_SNAPSHOT"
        );
        assert_eq!(
            create_slot_sql("walnats", true, true),
            "CREATE_REPLICATION_SLOT \"walnats\" LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)"
        );
        assert_eq!(
            create_slot_sql("w\"x", false, true),
            "CREATE_REPLICATION_SLOT \"w\"\"x\" LOGICAL pgoutput (SNAPSHOT 'nothing', FAILOVER true)"
        );
        assert_eq!(
            alter_slot_failover_sql("walnats"),
            "ALTER_REPLICATION_SLOT \"walnats\" ( FAILOVER true )"
        );
    }
}
