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
use async_nats::header::{HeaderName, HeaderValue, IntoHeaderName};
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
/// made, always from a `Position`. A header value cannot hold CR or LF, so
/// those (possible in a quoted database name) are written `%0D` / `%0A`.
pub fn msg_id(src: &Source, pos: Position) -> String {
    let mut id = String::with_capacity(src.db.len() + src.slot.len() + 32);
    for ch in src.db.chars() {
        match ch {
            '\r' => id.push_str("%0D"),
            '\n' => id.push_str("%0A"),
            c => id.push(c),
        }
    }
    id.push(':');
    id.push_str(&src.slot);
    id.push(':');
    id.push_str(&lsn_string(pos.commit_lsn));
    id.push(':');
    id.push_str(itoa::Buffer::new().format(pos.seq));
    id
}

fn lsn_string(lsn: crate::lsn::Lsn) -> String {
    let mut v = Vec::with_capacity(17);
    lsn.write_to(&mut v);
    // Only ASCII hex digits and '/' were written.
    String::from_utf8(v).unwrap_or_default()
}

/// `a` then `b` in one allocation of the right size, without `fmt`
/// (a row's subject is made once per message).
fn concat(a: &str, b: &str) -> String {
    let mut s = String::with_capacity(a.len() + b.len());
    s.push_str(a);
    s.push_str(b);
    s
}

/// Header names, made once: a name made from `&str` allocates each time.
struct Names {
    msg_id: HeaderName,
    op: HeaderName,
    lsn: HeaderName,
    commit_lsn: HeaderName,
    xid: HeaderName,
    seq: HeaderName,
    content_type: HeaderName,
    transactional: HeaderName,
}

impl Names {
    fn new() -> Names {
        Names {
            msg_id: "Nats-Msg-Id".into_header_name(),
            op: "Cdc-Op".into_header_name(),
            lsn: "Cdc-Lsn".into_header_name(),
            commit_lsn: "Cdc-Commit-Lsn".into_header_name(),
            xid: "Cdc-Xid".into_header_name(),
            seq: "Cdc-Seq".into_header_name(),
            content_type: "Content-Type".into_header_name(),
            transactional: "Cdc-Transactional".into_header_name(),
        }
    }
}

pub struct Encoder {
    src: Source,
    names: Names,
    /// The body of row changes and truncates; `_message` and `_schema`
    /// bodies are the same in every format.
    format: OutputFormat,
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new(src: Source, format: OutputFormat) -> Encoder {
        Encoder {
            src,
            names: Names::new(),
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
                    concat(&rel.subject_base, op.as_str()),
                    "application/json",
                    msg_id(&self.src, ev.pos),
                )
            }
            Body::Truncate { rel, .. } => {
                self.write_change(ev)?;
                (
                    concat(&rel.subject_base, "truncate"),
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
        let n = &self.names;
        let mut headers = HeaderMap::new();
        headers.insert(n.msg_id.clone(), HeaderValue::from(msg_id.clone()));
        headers.insert(n.op.clone(), ev.op_name());
        headers.insert(n.lsn.clone(), HeaderValue::from(lsn_string(ev.lsn)));
        headers.insert(
            n.commit_lsn.clone(),
            HeaderValue::from(lsn_string(ev.pos.commit_lsn)),
        );
        if let Some(tx) = &ev.tx {
            headers.insert(n.xid.clone(), itoa::Buffer::new().format(tx.xid.0));
        }
        if ev.is_change() || matches!(ev.body, Body::Schema { .. }) {
            headers.insert(n.seq.clone(), itoa::Buffer::new().format(ev.pos.seq));
        }
        headers.insert(n.content_type.clone(), content_type);
        if let Body::Message { transactional, .. } = &ev.body {
            headers.insert(
                n.transactional.clone(),
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
