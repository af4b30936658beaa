//! The SQL connection (tokio-postgres) with the same TLS modes and session
//! settings as the replication connection, checked once connected.

use tokio_postgres::config::SslMode as TpSslMode;

use super::pgconfig::{PgConnectConfig, SslMode};
use super::replication::{SEARCH_PATH, SESSION_SETTINGS};
use super::tls;
use crate::error::{Error, Kind, Result};

pub async fn connect_sql(cfg: &PgConnectConfig) -> Result<tokio_postgres::Client> {
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
    let result = match tls::client_config(cfg)? {
        Some(tls_config) => {
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls_config).clone());
            c.connect(connector).await.map(|(client, conn)| {
                spawn_connection(conn);
                client
            })
        }
        None => c
            .connect(tokio_postgres::NoTls)
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
        .map_err(|e| crate::event::relation::pg_query_err("reading the session settings", e))?;
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

fn map_connect_error(e: tokio_postgres::Error, cfg: &PgConnectConfig) -> Error {
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
