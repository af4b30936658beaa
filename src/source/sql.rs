//! The SQL connection (tokio-postgres) with the same TLS modes, session
//! settings (checked once connected) and authentication policy as the
//! replication connection.
//!
//! tokio-postgres answers whatever the server asks for, so walnats hands
//! it a socket (and, with TLS, a TLS stream) that reads the server's
//! authentication requests first, through `auth::AuthWatch`: a request the
//! policy refuses ends the connection before tokio-postgres could answer
//! it. TLS is rustls, as on the replication connection, with the same
//! `tls-server-end-point` channel binding, which tokio-postgres uses for
//! SCRAM-SHA-256-PLUS; tokio-postgres itself requires the server's SCRAM
//! final message and checks its signature.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::config::SslMode as TpSslMode;
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

use super::auth::{self, AuthWatch, Refusal};
use super::replication::{SEARCH_PATH, SESSION_SETTINGS, connect_tcp};
use super::tls;
use crate::config::{PgConnectConfig, ServerState, SslMode, TargetSessionAttrs, choose_server};
use crate::error::{Error, Kind, Result, Retry};

/// A SQL connection to the server `cfg`'s `target_session_attrs` picks
/// (see [`connect_session`]).
pub async fn connect_sql(cfg: &PgConnectConfig) -> Result<tokio_postgres::Client> {
    connect_session(cfg).await.map(|(client, _)| client)
}

/// A SQL connection to the first server of `cfg`, in the URL's order,
/// that accepts it and that `target_session_attrs` accepts (libpq's
/// rules, [`choose_server`]), and `cfg` pinned to that server: every
/// other connection of the session must go there too, never to another
/// host of the list.
pub async fn connect_session(
    cfg: &PgConnectConfig,
) -> Result<(tokio_postgres::Client, PgConnectConfig)> {
    let attrs = cfg.target_session_attrs;
    if let [only] = cfg.hosts.as_slice()
        && attrs == TargetSessionAttrs::Any
    {
        let pinned = cfg.pinned(only);
        return Ok((connect_one(&pinned).await?, pinned));
    }
    let mut observed = Vec::with_capacity(cfg.hosts.len());
    let mut kept = Vec::with_capacity(cfg.hosts.len());
    let mut failures = Vec::new();
    for host in &cfg.hosts {
        let pinned = cfg.pinned(host);
        let attempt = match connect_one(&pinned).await {
            Ok(client) => server_state(&client).await.map(|state| (client, state)),
            Err(e) => Err(e),
        };
        match attempt {
            Ok((client, state)) if attrs.accepts(state) => return Ok((client, pinned)),
            Ok((client, state)) => {
                failures.push(format!("{host} is {}", describe(state)));
                observed.push(Some(state));
                kept.push(Some((client, pinned)));
            }
            Err(e) => {
                tracing::debug!(%host, error = %e, "PostgreSQL server not usable");
                failures.push(format!("{host}: {e}"));
                observed.push(None);
                kept.push(None);
                // A refusal retrying cannot fix (a password, pg_hba.conf, a
                // database that does not exist) is the answer.
                if e.retry() == Retry::Definite {
                    return Err(e);
                }
            }
        }
    }
    if let Some(chosen) = choose_server(attrs, &observed)
        .and_then(|i| kept.get_mut(i))
        .and_then(Option::take)
    {
        return Ok(chosen);
    }
    Err(Error::new(
        Kind::PgConnect,
        format!(
            "no server of postgres.url ({}) is usable with target_session_attrs={}: {}",
            cfg.redacted_url(),
            attrs.as_str(),
            failures.join("; ")
        ),
    ))
}

fn describe(state: ServerState) -> &'static str {
    match (state.in_recovery, state.read_only) {
        (true, _) => "a standby (in recovery)",
        (false, true) => "read-only (transaction_read_only = on)",
        (false, false) => "a read-write primary",
    }
}

/// Whether the server is in recovery and whether a session is read-only
/// there (`default_transaction_read_only`, or a standby), as libpq checks.
pub async fn server_state(client: &tokio_postgres::Client) -> Result<ServerState> {
    let row = client
        .query_one(
            "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('transaction_read_only') = 'on'",
            &[],
        )
        .await
        .map_err(|e| crate::error::pg_query_err("reading whether the server is a standby", e))?;
    Ok(ServerState {
        in_recovery: row.get(0),
        read_only: row.get(1),
    })
}

/// A SQL connection to the one server `cfg.host`, `cfg.port`.
async fn connect_one(cfg: &PgConnectConfig) -> Result<tokio_postgres::Client> {
    let mut c = tokio_postgres::Config::new();
    c.host(&cfg.host)
        .port(cfg.port)
        .user(&cfg.user)
        .dbname(&cfg.dbname)
        .application_name(&cfg.application_name)
        .connect_timeout(cfg.connect_timeout);
    if let Some(p) = &cfg.password {
        c.password(p.expose());
    }
    let options: Vec<String> = SESSION_SETTINGS
        .iter()
        .map(|(k, v)| format!("-c {k}={v}"))
        .collect();
    c.options(options.join(" "));
    c.ssl_mode(match cfg.sslmode {
        SslMode::Disable => TpSslMode::Disable,
        SslMode::Prefer => TpSslMode::Prefer,
        _ => TpSslMode::Require,
    });
    let tls_config = tls::client_config(cfg)?;
    let tcp = connect_tcp(cfg).await?;
    // As tokio-postgres did when it opened the socket itself.
    let _ = socket2::SockRef::from(&tcp).set_keepalive(true);
    // Every mode but disable sends SSLRequest first.
    let socket = Watched {
        inner: tcp,
        watch: AuthWatch::new(cfg, tls_config.is_some(), false),
    };
    let result = match tls_config {
        Some(config) => {
            let tls = Tls {
                connector: tokio_rustls::TlsConnector::from(config),
                name: tls::server_name(&cfg.host)?,
                watch: AuthWatch::new(cfg, false, true),
            };
            c.connect_raw(socket, tls).await.map(|(client, conn)| {
                spawn_connection(conn);
                client
            })
        }
        None => c
            .connect_raw(socket, tokio_postgres::NoTls)
            .await
            .map(|(client, conn)| {
                spawn_connection(conn);
                client
            }),
    };
    let client = result.map_err(|e| map_connect_error(e, cfg))?;
    verify_session(&client).await?;
    Ok(client)
}

/// The settings that keep other roles' code from running as walnats'
/// role must be in force: something between walnats and PostgreSQL (a
/// pooler) may drop or reset the startup packet's options.
async fn verify_session(client: &tokio_postgres::Client) -> Result<()> {
    let rows = client
        .simple_query(
            "SELECT pg_catalog.current_setting('search_path'), pg_catalog.current_setting('row_security')",
        )
        .await
        .map_err(|e| crate::error::pg_query_err("reading the session settings", e))?;
    let row = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    });
    let get = |i: usize| row.and_then(|r| r.get(i)).unwrap_or("");
    let (search_path, row_security) = (get(0), get(1));
    if search_path.replace(' ', "") == SEARCH_PATH && row_security == "off" {
        return Ok(());
    }
    Err(Error::new(
        Kind::PgSetup,
        format!(
            "PostgreSQL reports search_path = {search_path:?} and row_security = {row_security:?} although walnats \
             asked for {SEARCH_PATH:?} and \"off\" in the startup packet: something between walnats and PostgreSQL \
             (a pooler?) changes session settings; connect directly"
        ),
    ))
}

/// A stream whose incoming bytes pass `watch` before the reader sees them.
struct Watched<S> {
    inner: S,
    watch: AuthWatch,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let fresh = buf.filled().get(before..).unwrap_or_default();
        if let Err(refusal) = this.watch.feed(fresh) {
            // The request never reaches tokio-postgres.
            buf.set_filled(before);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                refusal,
            )));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type TlsOverTcp = tokio_rustls::client::TlsStream<Watched<TcpStream>>;

impl TlsStream for Watched<TlsOverTcp> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| tls::tls_server_end_point(cert))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

/// The TLS handshake tokio-postgres asks for after the server's 'S'; what
/// comes out of TLS is watched in turn.
struct Tls {
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
    watch: AuthWatch,
}

impl TlsConnect<Watched<TcpStream>> for Tls {
    type Stream = Watched<TlsOverTcp>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Stream>> + Send>>;

    fn connect(self, stream: Watched<TcpStream>) -> Self::Future {
        Box::pin(async move {
            let inner = self.connector.connect(self.name, stream).await?;
            Ok(Watched {
                inner,
                watch: self.watch,
            })
        })
    }
}

fn spawn_connection<F>(conn: F)
where
    F: std::future::Future<Output = std::result::Result<(), tokio_postgres::Error>>
        + Send
        + 'static,
{
    let task = async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "SQL connection ended");
        }
    };
    // The connection task ends when its client is dropped. (Named tasks
    // need tokio_unstable; the span names it in logs instead.)
    tokio::spawn(tracing::Instrument::instrument(
        task,
        tracing::debug_span!("pg_sql_connection"),
    ));
}

/// The policy's refusal, if that is what ended the connection.
fn refusal(e: &tokio_postgres::Error) -> Option<Refusal> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let inner = s
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<Refusal>());
        if let Some(r) = inner.or_else(|| s.downcast_ref::<Refusal>()) {
            return Some(*r);
        }
        source = s.source();
    }
    None
}

fn map_connect_error(e: tokio_postgres::Error, cfg: &PgConnectConfig) -> Error {
    if let Some(r) = refusal(&e) {
        return r.error(cfg);
    }
    if let Some(db) = e.as_db_error() {
        let se = super::replication::ServerError {
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
            detail: db.detail().map(str::to_owned),
            hint: db.hint().map(str::to_owned),
        };
        return super::replication::server_error(se, cfg);
    }
    let text = e.to_string();
    // tokio-postgres checks the server's SCRAM messages; one that fails
    // says the server does not know the password. (Its Display leaves the
    // cause out.)
    if text.starts_with("authentication error")
        && let Some(why) = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .filter(|why| why.contains("SCRAM"))
    {
        return auth::scram_failed(cfg, &why);
    }
    let kind = if text.contains("password") {
        Kind::PgAuth
    } else {
        Kind::PgConnect
    };
    Error::with_source(
        kind,
        format!(
            "cannot connect to PostgreSQL at {}:{} ({})",
            cfg.host,
            cfg.port,
            cfg.redacted_url()
        ),
        e,
    )
}
