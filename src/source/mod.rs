//! The PostgreSQL side: the replication connection (startup, auth, TLS,
//! CopyBoth framing, keepalives, standby status), the SQL connection, the
//! authentication policy both follow, publication/slot state, the outbox
//! tables' start-up checks, heartbeats and the slot's retained WAL. It
//! never decodes pgoutput and never decides what may be confirmed.

pub mod auth;
pub mod feedback;
pub mod outbox;
mod protocol;
pub mod replication;
pub mod setup;
pub mod sql;
pub mod tls;
pub mod upkeep;

pub use replication::{CreatedSlot, ReplicationConn, ReplicationMessage, SystemId};
pub use sql::{connect_session, connect_sql};
