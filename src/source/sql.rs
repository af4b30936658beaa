//! The SQL connection (tokio-postgres) with the same TLS modes and session
//! settings as the replication connection.

use tokio_postgres::config::SslMode as TpSslMode;

use super::pgconfig::{PgConnectConfig, SslMode};
use super::replication::SESSION_SETTINGS;
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
    result.map_err(|e| map_connect_error(e, cfg))
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
