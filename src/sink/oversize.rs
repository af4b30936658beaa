//! Oversized bodies in a NATS Object Store bucket (`limits.on_oversize =
//! "object_store"`): the claim check's storage side.
//!
//! Owns the bucket, the object names and the put. A put is idempotent: an
//! object's name is derived from the message's `Nats-Msg-Id` (and the
//! stream), and a replay encodes the same body, so putting it again leaves
//! the same bytes under the same name. It never decides what is oversized
//! and never builds the claim message (that is `encode`'s job).

use async_nats::jetstream::{self, object_store};
use bytes::Bytes;

use super::Claim;
use crate::error::{Error, Kind, Result};

/// async-nats' default chunk size; smaller when the server's max_payload is.
const MAX_CHUNK: usize = 128 * 1024;

pub struct OversizeStore {
    store: object_store::ObjectStore,
    bucket: String,
    chunk_size: usize,
}

/// `<stream>/<Nats-Msg-Id>`, each part kept to `A-Z a-z 0-9 - _ .` (what
/// every NATS client accepts in an object name); other bytes, `=` and `/`
/// included, are written `=XX`, so the mapping can be reversed.
pub fn object_name(stream: &str, msg_id: &str) -> String {
    fn push(out: &mut String, s: &str) {
        for &b in s.as_bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("={b:02X}"));
            }
        }
    }
    let mut out = String::with_capacity(stream.len() + msg_id.len() + 16);
    push(&mut out, stream);
    out.push('/');
    push(&mut out, msg_id);
    // A name may not end with '.' (nor start with one: the stream name
    // comes first and holds none).
    if out.ends_with('.') {
        out.pop();
        out.push_str("=2E");
    }
    out
}

impl OversizeStore {
    /// Gets the bucket, or creates it on file storage with `replicas`.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
        max_payload: usize,
    ) -> Result<OversizeStore> {
        let store = match js.get_object_store(bucket).await {
            Ok(s) => s,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: bucket.to_owned(),
                    description: Some("walnats: bodies of messages over max_payload".to_owned()),
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    Error::with_source(
                        Kind::NatsConnect,
                        format!(
                            "cannot create the Object Store bucket {bucket:?} (limits.object_store_bucket)"
                        ),
                        e,
                    )
                })?,
        };
        // Chunks travel as plain messages: each must fit max_payload.
        let chunk_size = max_payload.saturating_sub(1024).clamp(1024, MAX_CHUNK);
        Ok(OversizeStore {
            store,
            bucket: bucket.to_owned(),
            chunk_size,
        })
    }

    /// Stores the body of `msg` (published on `stream`) under the name its
    /// message id gives, with its content type.
    pub async fn put_message(&self, stream: &str, msg: &super::OutMsg) -> Result<Claim> {
        let name = object_name(stream, msg.msg_id());
        let content_type = msg
            .headers
            .get("Content-Type")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        self.put(&name, &msg.payload, &content_type).await
    }

    /// Stores `body` under `name` and returns where it is. Returns once
    /// the object's metadata is acknowledged: only then may a message
    /// point to it.
    pub async fn put(&self, name: &str, body: &Bytes, content_type: &str) -> Result<Claim> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", content_type);
        let meta = object_store::ObjectMetadata {
            name: name.to_owned(),
            chunk_size: Some(self.chunk_size),
            headers: Some(headers),
            ..Default::default()
        };
        let mut reader: &[u8] = body;
        let info = self.store.put(meta, &mut reader).await.map_err(|e| {
            Error::with_source(
                Kind::Publish,
                format!(
                    "cannot store an oversized body in Object Store bucket {:?}",
                    self.bucket
                ),
                e,
            )
        })?;
        Ok(Claim {
            bucket: self.bucket.clone(),
            name: info.name,
            size: info.size as u64,
            digest: info.digest.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_keep_safe_bytes_and_escape_the_rest() {
        assert_eq!(
            object_name("CDC_APP", "app:walnats:0/16B3800:3"),
            "CDC_APP/app=3Awalnats=3A0=2F16B3800=3A3"
        );
        assert_eq!(object_name("S", "a=b"), "S/a=3Db");
        assert_eq!(object_name("S", "é"), "S/=C3=A9");
        assert_eq!(object_name("S", "x."), "S/x=2E");
        assert_ne!(object_name("S", "a:b"), object_name("S", "a_b"));
    }
}
