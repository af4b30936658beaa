//! The resume position: what is durable, what to skip on restart, and what
//! is safe to confirm to PostgreSQL.
//!
//! The only module that decides what the slot may confirm. Three facts make
//! exactly-once work across `kill -9`, long outages and any retention:
//!
//! 1. Replaying the slot from a checkpoint emits the same messages in the
//!    same order: the messages are a function of the WAL, of the
//!    checkpointed state (which `_schema` messages were already published)
//!    and of the settings that shape them, which the checkpoint records
//!    ([`Shape`]) so that a change takes effect only at a transaction
//!    boundary.
//! 2. walnats is the stream's only writer and publishes with
//!    `Nats-Expected-Last-Sequence`, so the stream holds a gap-free prefix
//!    of that replay: the stream's `last_seq` minus the checkpoint's
//!    `stream_seq` is exactly how many replayed messages are already in the
//!    stream, even when consumers or limits have deleted them. Every one
//!    that is still there is compared with the replay ([`replay`]); one
//!    walnats did not write is a refusal.
//! 3. The slot is confirmed only up to a checkpoint that is durable in the
//!    KV bucket and written after the replay is proven ([`ledger`]), so a
//!    replay always starts at or before the checkpoint.
//!
//! `Nats-Msg-Id` dedup is a second line of defence, not the mechanism: the
//! duplicate window forgets.

pub mod ledger;
pub mod record;
pub mod replay;
mod resume;
mod store;

pub use record::{
    Checkpoint, ChunkTail, Cursor, PendingChunk, PendingReread, RangeProgress, Reread, RunStart,
    Shape, SnapshotProgress, SnapshotState, Span, TableProgress, TableRate, Target,
};
pub use resume::{
    Resume, StoredReader, batch_id_at, batch_of, chunk_tail_at, quiet_last_seq, resume,
};
pub use store::{Store, Writer};
