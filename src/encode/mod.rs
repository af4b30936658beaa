//! Event → NATS message: subject, headers and body.
//!
//! Owns the outside format of walnats' messages (docs/messages.md, "Subjects"
//! and "Messages" sections). It never parses pgoutput and never talks to
//! NATS; it writes bodies straight into reusable buffers.

pub mod debezium;
pub mod json;

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use bytes::Bytes;

use crate::config::OutputFormat;
use crate::error::Result;
use crate::event::{Body, Event};
use crate::lsn::Position;
use crate::sink::MSG_ID;
pub use crate::sink::{Claim, OutMsg};
use crate::subject::push_escaped;

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
    msg_id_at(src, &lsn_string(pos.commit_lsn), pos.seq)
}

/// [`msg_id`] with the commit LSN already written (the encoder writes it
/// once for the id and the `Cdc-Commit-Lsn` header).
fn msg_id_at(src: &Source, commit_lsn: &str, seq: u32) -> String {
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
    id.push_str(commit_lsn);
    id.push(':');
    id.push_str(itoa::Buffer::new().format(seq));
    id
}

fn lsn_string(lsn: crate::lsn::Lsn) -> String {
    let mut s = String::with_capacity(17);
    lsn.push_to(&mut s);
    s
}

/// `a` then `b` in one allocation of the right size, without `fmt`
/// (a row's subject is made once per message).
fn concat(a: &str, b: &str) -> String {
    let mut s = String::with_capacity(a.len() + b.len());
    s.push_str(a);
    s.push_str(b);
    s
}

/// Header names as constants: a name from `from_static` costs nothing to
/// clone or drop, where one made from `&str` is a shared buffer whose
/// count changes with every message.
const OP: HeaderName = HeaderName::from_static("Cdc-Op");
const EVENT_ID: HeaderName = HeaderName::from_static("Cdc-Event-Id");
const AGGREGATE_ID: HeaderName = HeaderName::from_static("Cdc-Aggregate-Id");
const LSN: HeaderName = HeaderName::from_static("Cdc-Lsn");
const COMMIT_LSN: HeaderName = HeaderName::from_static("Cdc-Commit-Lsn");
const XID: HeaderName = HeaderName::from_static("Cdc-Xid");
const SEQ: HeaderName = HeaderName::from_static("Cdc-Seq");
const CONTENT_TYPE: HeaderName = HeaderName::from_static("Content-Type");
const TRANSACTIONAL: HeaderName = HeaderName::from_static("Cdc-Transactional");
const CLAIM_CHECK: HeaderName = HeaderName::from_static("Cdc-Claim-Check");
const BODY_SIZE: HeaderName = HeaderName::from_static("Cdc-Body-Size");

pub struct Encoder {
    src: Source,
    /// The body of row changes and truncates; `_message` and `_schema`
    /// bodies are the same in every format.
    format: OutputFormat,
    buf: Vec<u8>,
    /// The repeating parts of the JSON `source` object.
    text: json::SourceText,
}

impl Encoder {
    pub fn new(src: Source, format: OutputFormat) -> Encoder {
        Encoder {
            text: json::SourceText::new(&src),
            src,
            format,
            buf: Vec::with_capacity(INITIAL_BUF),
        }
    }

    fn write_change(&mut self, ev: &Event) -> Result<()> {
        self.buf.reserve(size_hint(ev));
        match self.format {
            OutputFormat::Json => json::write_row(&mut self.buf, &mut self.text, ev),
            OutputFormat::Debezium => {
                debezium::write_row(&mut self.buf, &self.src, ev, unix_now_us())
            }
        }
    }

    pub fn source(&self) -> &Source {
        &self.src
    }

    /// The claim check that goes out instead of `original` once its body
    /// is stored as `claim`: same subject and headers (so the same
    /// `Nats-Msg-Id` and position), plus `Cdc-Claim-Check: <bucket>/<name>`
    /// and `Cdc-Body-Size`, with a small JSON body saying where the real
    /// one is.
    pub fn claim_check(&mut self, ev: &Event, original: OutMsg, claim: &Claim) -> Result<OutMsg> {
        self.buf.clear();
        json::write_claim(&mut self.buf, &mut self.text, ev, claim)?;
        let mut headers = original.headers;
        headers.insert(
            CLAIM_CHECK,
            HeaderValue::from(format!("{}/{}", claim.bucket, claim.name)),
        );
        headers.insert(BODY_SIZE, itoa::Buffer::new().format(claim.size));
        headers.insert(CONTENT_TYPE, "application/json");
        Ok(OutMsg {
            subject: original.subject,
            headers,
            payload: Bytes::copy_from_slice(&self.buf),
        })
    }

    pub fn encode(&mut self, ev: &Event) -> Result<OutMsg> {
        self.buf.clear();
        let mut raw = None;
        let commit_lsn = lsn_string(ev.pos.commit_lsn);
        let (subject, content_type, msg_id) = match &ev.body {
            Body::Row { op, rel, .. } => {
                self.write_change(ev)?;
                (
                    concat(&rel.subject_base, op.as_str()),
                    "application/json",
                    msg_id_at(&self.src, &commit_lsn, ev.pos.seq),
                )
            }
            Body::Truncate { rel, .. } => {
                self.write_change(ev)?;
                (
                    concat(&rel.subject_base, "truncate"),
                    "application/json",
                    msg_id_at(&self.src, &commit_lsn, ev.pos.seq),
                )
            }
            Body::Message {
                prefix, content, ..
            } => {
                // The body is the content itself: shared, not copied.
                raw = Some(content.clone());
                let mut subject = format!("{}._message.", self.src.prefix);
                push_escaped(&mut subject, prefix);
                (
                    subject,
                    "application/octet-stream",
                    msg_id_at(&self.src, &commit_lsn, ev.pos.seq),
                )
            }
            Body::Outbox(o) => {
                // The body is the payload itself, whatever output.format.
                raw = Some(o.payload.clone());
                let mut subject = format!("{}._outbox.", self.src.prefix);
                push_escaped(&mut subject, &o.aggregate_type);
                (
                    subject,
                    o.content_type,
                    msg_id_at(&self.src, &commit_lsn, ev.pos.seq),
                )
            }
            Body::Schema { rel } => {
                json::write_schema(&mut self.buf, &mut self.text, ev, rel)?;
                (
                    rel.schema_subject.clone(),
                    "application/json",
                    format!("{}:schema", msg_id_at(&self.src, &commit_lsn, ev.pos.seq)),
                )
            }
            Body::TxBegin | Body::TxEnd { .. } => {
                json::write_tx_marker(&mut self.buf, &self.src, ev)?;
                let kind = if matches!(ev.body, Body::TxBegin) {
                    "begin"
                } else {
                    "end"
                };
                (
                    format!("{}._tx", self.src.prefix),
                    "application/json",
                    format!("{}:{kind}", msg_id_at(&self.src, &commit_lsn, 0)),
                )
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(MSG_ID, HeaderValue::from(msg_id));
        headers.insert(OP, ev.op_name());
        headers.insert(LSN, HeaderValue::from(lsn_string(ev.lsn)));
        headers.insert(COMMIT_LSN, HeaderValue::from(commit_lsn));
        if let Some(tx) = &ev.tx {
            headers.insert(XID, itoa::Buffer::new().format(tx.xid.0));
        }
        if ev.is_change() || matches!(ev.body, Body::Schema { .. }) {
            headers.insert(SEQ, itoa::Buffer::new().format(ev.pos.seq));
        }
        headers.insert(CONTENT_TYPE, content_type);
        if let Body::Message { transactional, .. } = &ev.body {
            headers.insert(TRANSACTIONAL, if *transactional { "true" } else { "false" });
        }
        if let Body::Outbox(o) = &ev.body {
            outbox_headers(&mut headers, o)?;
        }
        let payload = match raw {
            Some(b) => b,
            None => self.take_body(),
        };
        Ok(OutMsg {
            subject,
            headers,
            payload,
        })
    }

    /// The body written into `buf`. A large one is handed over rather than
    /// copied, and `buf` starts small again, so that one huge row neither
    /// needs a second copy nor stays allocated after it is published.
    fn take_body(&mut self) -> Bytes {
        if self.buf.len() > LARGE_BODY {
            Bytes::from(std::mem::replace(
                &mut self.buf,
                Vec::with_capacity(INITIAL_BUF),
            ))
        } else {
            Bytes::copy_from_slice(&self.buf)
        }
    }
}

/// `Cdc-Event-Id`, `Cdc-Aggregate-Id` and the listed columns (named by
/// config, which checked the names). A header value cannot hold CR or LF:
/// those are written `%0D` / `%0A`, as in message ids.
fn outbox_headers(headers: &mut HeaderMap, o: &crate::event::outbox::OutboxEvent) -> Result<()> {
    let value = |v: &str| HeaderValue::from(v.replace('\r', "%0D").replace('\n', "%0A"));
    if let Some(id) = &o.event_id {
        headers.insert(EVENT_ID, value(id));
    }
    if let Some(id) = &o.aggregate_id {
        headers.insert(AGGREGATE_ID, value(id));
    }
    for (name, v) in &o.headers {
        let name = name.parse::<HeaderName>().map_err(|_| {
            crate::error::Error::new(
                crate::error::Kind::Config,
                format!("outbox header {name:?} is not a NATS header name: rename it in [[outbox]] headers"),
            )
        })?;
        headers.insert(name, value(v));
    }
    Ok(())
}

const INITIAL_BUF: usize = 4096;
/// Bodies above this are moved out of the encoder's buffer, not copied.
const LARGE_BODY: usize = 64 * 1024;

/// The bytes of a change's values, which its body holds at least: reserved
/// up front so a huge row is not grown by doubling (which would hold the
/// old and the new buffer at once).
fn size_hint(ev: &Event) -> usize {
    use crate::pgoutput::{OldTuple, TupleData, TupleValue};
    fn tuple(t: &TupleData) -> usize {
        t.iter()
            .map(|v| match v {
                TupleValue::Text(b) | TupleValue::Binary(b) => b.len(),
                TupleValue::Null | TupleValue::Unchanged => 0,
            })
            .fold(0usize, usize::saturating_add)
    }
    match &ev.body {
        Body::Row { old, new, .. } => {
            let old = match old {
                Some(OldTuple::Key(t) | OldTuple::Full(t)) => tuple(t),
                None => 0,
            };
            old.saturating_add(new.as_ref().map_or(0, tuple))
                .saturating_add(512)
        }
        _ => 0,
    }
}

/// Microseconds since the Unix epoch by the system clock (0 if the clock is
/// before 1970): Debezium's envelope `ts_ms`/`ts_us`/`ts_ns`, when the
/// event was encoded.
fn unix_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
