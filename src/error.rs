//! The one error type of walnats and its retry verdict.
//!
//! Every failure carries a `Kind` (what failed, for metrics and tests), a
//! user-facing message that says what happened, to what, and what to do,
//! and optionally the underlying cause. Whether retrying can help is decided
//! in one place, [`Kind::retry`]; the run loop retries only `Retry::Transient`.
//! Messages never contain secrets or row values.

use std::fmt;

/// What failed. Tests and metrics match on this, never on message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A setting is wrong, missing or contradictory.
    Config,
    /// PostgreSQL cannot be reached or the connection broke.
    PgConnect,
    /// PostgreSQL refused our credentials.
    PgAuth,
    /// PostgreSQL said no to something that retrying will not change
    /// (privilege, wal_level, unknown database, slot of another plugin...).
    PgSetup,
    /// A SQL or replication command failed for a reason that may pass.
    PgQuery,
    /// The replication slot is busy with another walsender (standby case).
    SlotInUse,
    /// The server sent bytes that break the protocol.
    Protocol,
    /// pgoutput bytes or a value that cannot be decoded: tied to data at an
    /// LSN, so retrying cannot help.
    Decode,
    /// NATS cannot be reached or the connection broke.
    NatsConnect,
    /// NATS refused our credentials.
    NatsAuth,
    /// JetStream is missing or a stream/bucket is incompatible.
    NatsSetup,
    /// A publish was not acknowledged (timeout, leader change, ...).
    Publish,
    /// A message is larger than the server's max_payload.
    Oversize,
    /// The stored resume position disagrees with the stream or the slot.
    Checkpoint,
    /// Local I/O (files, sockets we listen on).
    Io,
}

/// What the run loop does with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Restart the session from the last checkpoint after a backoff.
    Transient,
    /// Stop: retrying cannot help; the operator must act.
    Definite,
}

impl Kind {
    /// The one place that decides whether retrying can help.
    pub fn retry(self) -> Retry {
        match self {
            Kind::PgConnect
            | Kind::PgQuery
            | Kind::SlotInUse
            | Kind::NatsConnect
            | Kind::Publish
            | Kind::Io => Retry::Transient,
            Kind::Config
            | Kind::PgAuth
            | Kind::PgSetup
            | Kind::Protocol
            | Kind::Decode
            | Kind::NatsAuth
            | Kind::NatsSetup
            | Kind::Oversize
            | Kind::Checkpoint => Retry::Definite,
        }
    }

    /// A short stable name, used as the `kind` label of
    /// `walnats_errors_total`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Config => "config",
            Kind::PgConnect => "pg_connect",
            Kind::PgAuth => "pg_auth",
            Kind::PgSetup => "pg_setup",
            Kind::PgQuery => "pg_query",
            Kind::SlotInUse => "slot_in_use",
            Kind::Protocol => "protocol",
            Kind::Decode => "decode",
            Kind::NatsConnect => "nats_connect",
            Kind::NatsAuth => "nats_auth",
            Kind::NatsSetup => "nats_setup",
            Kind::Publish => "publish",
            Kind::Oversize => "oversize",
            Kind::Checkpoint => "checkpoint",
            Kind::Io => "io",
        }
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

pub struct Error {
    kind: Kind,
    message: String,
    source: Option<Source>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// `message` is one sentence for a human: what happened, to what, and
    /// the fix. It must never contain a secret or a row value.
    pub fn new(kind: Kind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(kind: Kind, message: impl Into<String>, source: impl Into<Source>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn retry(&self) -> Retry {
        self.kind.retry()
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

pub fn pg_query_err(what: &str, e: tokio_postgres::Error) -> Error {
    let kind = if e.is_closed() || e.as_db_error().is_none() {
        Kind::PgConnect
    } else {
        Kind::PgQuery
    };
    Error::new(
        kind,
        format!("PostgreSQL error while {what}: {}", pg_error_text(&e)),
    )
}

/// The server's own words for a SQL error (tokio-postgres only says "db
/// error"), or the connection failure.
pub fn pg_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}
