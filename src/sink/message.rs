//! The message the sink publishes: subject, headers and body, as the
//! encoder made them, and where an oversized body went. The sink reads
//! only `Nats-Msg-Id` of it; the rest is the encoder's business.

use async_nats::HeaderMap;
use async_nats::header::HeaderName;
use bytes::Bytes;

/// The header JetStream deduplicates on; walnats' message id.
pub const MSG_ID: HeaderName = HeaderName::from_static("Nats-Msg-Id");

/// One message ready to publish.
#[derive(Debug)]
pub struct OutMsg {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl OutMsg {
    /// The value of `Nats-Msg-Id` (for resume checks and object names;
    /// read back from the headers rather than kept twice).
    pub fn msg_id(&self) -> &str {
        self.headers.get(MSG_ID).map_or("", |v| v.as_str())
    }
}

/// Where an oversized body went (`limits.on_oversize = "object_store"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub bucket: String,
    pub name: String,
    /// The body's length in bytes.
    pub size: u64,
    /// As the Object Store reports it: `SHA-256=<base64url>`.
    pub digest: String,
}
