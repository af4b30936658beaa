//! JetStream: connection, stream setup, and ordered, pipelined publishing.
//!
//! Owns everything walnats says to NATS about the change stream. Publishes
//! go out in order with `Nats-Expected-Last-Sequence`, so that when one
//! publish fails no later one can land after a gap: the server rejects it,
//! the session restarts and resumes from what the stream holds. It never
//! parses pgoutput and never decides what is safe to confirm to PostgreSQL.
//!
//! The parts, in the order a session uses them: `connect` (the NATS
//! connection, auth, TLS), `stream` (JetStream present, the stream found
//! or created, what the server and stream allow), `publisher` (the
//! `Publisher`: one ack per message, or `fast` batches with one ack per
//! batch, and `atomic` batches for snapshots), `oversize` (bodies over
//! max_payload) and `subject` (escaped subject tokens).

mod atomic;
mod connect;
mod fast;
mod message;
pub mod oversize;
mod publisher;
mod stream;

pub use atomic::{MAX_BATCH, MAX_IN_FLIGHT as MAX_BATCHES_IN_FLIGHT, unique_batch_id};
pub use connect::{connect, context};
pub use fast::FAST_BATCH;
pub use message::{Claim, MSG_ID, OutMsg};
pub use publisher::Publisher;
pub use stream::{
    StreamSetup, allow_atomic_batches, allow_fast_ingest, ensure_stream, require_jetstream,
    supports_atomic_batches, supports_fast_ingest,
};
