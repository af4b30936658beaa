//! Event → NATS message: subject, headers and body.
//!
//! Owns the outside format of walnats' messages (the contract's "Subjects"
//! and "Messages" sections). It never parses pgoutput and never talks to
//! NATS; it writes bodies straight into reusable buffers.

pub mod array;
pub mod datetime;
pub mod debezium;
pub mod json;
pub mod json_str;
pub mod value;

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::config::OutputFormat;
use crate::error::Result;
use crate::event::{Body, Event};
use crate::lsn::Position;
use crate::sink::subject::push_escaped;

/// One message ready to publish.
#[derive(Debug)]
pub struct OutMsg {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
    /// The value of `Nats-Msg-Id`, kept for resume checks.
    pub msg_id: String,
}

/// What every message of this walnats says about where it comes from.
#[derive(Debug, Clone)]
pub struct Source {
    pub db: String,
    pub slot: String,
    pub prefix: String,
}

/// `<database>:<slot>:<commit_lsn>:<seq>`: the one place a message id is
/// made, always from a `Position`.
pub fn msg_id(src: &Source, pos: Position) -> String {
    format!("{}:{}:{}:{}", src.db, src.slot, pos.commit_lsn, pos.seq)
}

pub struct Encoder {
    src: Source,
    /// The body of row changes and truncates; `_message` and `_schema`
    /// bodies are the same in every format.
    format: OutputFormat,
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new(src: Source, format: OutputFormat) -> Encoder {
        Encoder {
            src,
            format,
            buf: Vec::with_capacity(4096),
        }
    }

    fn write_change(&mut self, ev: &Event) -> Result<()> {
        match self.format {
            OutputFormat::Json => json::write_row(&mut self.buf, &self.src, ev),
            OutputFormat::Debezium => {
                debezium::write_row(&mut self.buf, &self.src, ev, unix_now_ms())
            }
        }
    }

    pub fn source(&self) -> &Source {
        &self.src
    }

    pub fn encode(&mut self, ev: &Event) -> Result<OutMsg> {
        self.buf.clear();
        let (subject, content_type, msg_id) = match &ev.body {
            Body::Row { op, rel, .. } => {
                self.write_change(ev)?;
                (
                    format!("{}{}", rel.subject_base, op.as_str()),
                    "application/json",
                    msg_id(&self.src, ev.pos),
                )
            }
            Body::Truncate { rel, .. } => {
                self.write_change(ev)?;
                (
                    format!("{}truncate", rel.subject_base),
                    "application/json",
                    msg_id(&self.src, ev.pos),
                )
            }
            Body::Message {
                prefix, content, ..
            } => {
                self.buf.extend_from_slice(content);
                let mut subject = format!("{}._message.", self.src.prefix);
                push_escaped(&mut subject, prefix);
                (
                    subject,
                    "application/octet-stream",
                    msg_id(&self.src, ev.pos),
                )
            }
            Body::Schema { rel } => {
                json::write_schema(&mut self.buf, &self.src, ev, rel)?;
                (
                    rel.schema_subject.clone(),
                    "application/json",
                    format!("{}:schema", msg_id(&self.src, ev.pos)),
                )
            }
            Body::TxBegin | Body::TxEnd { .. } => {
                json::write_tx_marker(&mut self.buf, &self.src, ev)?;
                let kind = if matches!(ev.body, Body::TxBegin) {
                    "begin"
                } else {
                    "end"
                };
                let first = Position::new(ev.pos.commit_lsn, 0);
                (
                    format!("{}._tx", self.src.prefix),
                    "application/json",
                    format!("{}:{kind}", msg_id(&self.src, first)),
                )
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        headers.insert("Cdc-Op", ev.op_name());
        headers.insert("Cdc-Lsn", ev.lsn.to_string().as_str());
        headers.insert("Cdc-Commit-Lsn", ev.pos.commit_lsn.to_string().as_str());
        if let Some(tx) = &ev.tx {
            headers.insert("Cdc-Xid", tx.xid.0.to_string().as_str());
        }
        if ev.is_change() || matches!(ev.body, Body::Schema { .. }) {
            headers.insert("Cdc-Seq", ev.pos.seq.to_string().as_str());
        }
        headers.insert("Content-Type", content_type);
        if let Body::Message { transactional, .. } = &ev.body {
            headers.insert(
                "Cdc-Transactional",
                if *transactional { "true" } else { "false" },
            );
        }
        Ok(OutMsg {
            subject,
            headers,
            payload: Bytes::copy_from_slice(&self.buf),
            msg_id,
        })
    }
}

/// Milliseconds since the Unix epoch by the system clock (0 if the clock is
/// before 1970): Debezium's envelope `ts_ms`, when the event was encoded.
fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
