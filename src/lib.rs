//! walnats: PostgreSQL logical replication (pgoutput) to NATS JetStream,
//! exactly once.
//!
//! The data path, downhill (a module imports only modules above it in this
//! list; `tests/house.rs` checks that no import circle forms):
//! - leaves: `error`, `lsn`, `subject` (NATS subject tokens), `value`
//!   (PostgreSQL values → JSON), `nonce`, `metrics` (names, readiness);
//! - `pgoutput` (the decoder), `config` (settings, no connections);
//! - `event` (relations, changes, transaction assembly);
//! - `sink` (JetStream: connect, streams, publish and acks; knows no
//!   encoder), `encode` (event → subject, headers, body), `publish` (encode →
//!   `_schema` first → oversize policy → sink: the one way out);
//! - `source` (the replication and SQL connections, standby feedback);
//! - `checkpoint` (what is durable, what a restart replays, what the slot
//!   may confirm), `connect` (both sides, for every command);
//! - `snapshot` (the initial snapshot and re-read windows);
//! - `pipeline` (wires the parts into a session), `admin`, `tail`, `http`.

pub mod admin;
pub mod checkpoint;
pub mod config;
pub mod connect;
pub mod encode;
pub mod error;
pub mod event;
pub mod http;
pub mod lsn;
pub mod metrics;
pub mod nonce;
pub mod pgoutput;
pub mod pipeline;
pub mod publish;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod subject;
pub mod tail;
pub mod value;
