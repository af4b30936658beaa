//! walnats: PostgreSQL logical replication (pgoutput) to NATS JetStream,
//! exactly once. The data path, one module per step:
//! `source` (replication connection) → `pgoutput` (decoder) → `event`
//! (relations, changes) → `encode` (subject, headers, body) → `sink`
//! (JetStream publish and acks) → `checkpoint` (what is durable, what the
//! slot may confirm), wired by `pipeline`; `snapshot` reads the rows that
//! existed before the slot.

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
pub mod outbox;
pub mod pgoutput;
pub mod pipeline;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod subject;
pub mod tail;
pub mod value;
