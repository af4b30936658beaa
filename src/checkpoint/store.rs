//! Where checkpoints live: one key per (stream, database, slot) in a KV
//! bucket on the same NATS, beside walnats' lock secret and the requests of
//! `walnats snapshot`; and the [`Writer`] that writes checkpoints one at a
//! time, off the session's path.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

use super::Checkpoint;
use crate::error::{Error, Kind, Result};

/// Where checkpoints live: one key per (stream, database, slot) in a KV
/// bucket on the same NATS.
pub struct Store {
    kv: kv::Store,
    key: String,
}

/// KV keys allow `[-/_=.a-zA-Z0-9]`; other bytes become `=XX`.
fn key_token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("=00");
    }
    out
}

fn kv_err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::with_source(Kind::NatsConnect, format!("checkpoint bucket: {what}"), e)
}

impl Store {
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
        stream: &str,
        db: &str,
        slot: &str,
    ) -> Result<Store> {
        let kv = match js.get_key_value(bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: bucket.to_owned(),
                    description: "walnats resume positions".to_owned(),
                    history: 5,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| kv_err(&format!("cannot create KV bucket {bucket:?}"), e))?,
        };
        Ok(Store {
            kv,
            key: format!(
                "{}.{}.{}",
                key_token(stream),
                key_token(db),
                key_token(slot)
            ),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub async fn load(&self) -> Result<Option<Checkpoint>> {
        let Some(bytes) = self
            .kv
            .get(self.key.clone())
            .await
            .map_err(|e| kv_err("cannot read the checkpoint", e))?
        else {
            return Ok(None);
        };
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::with_source(
                Kind::Checkpoint,
                format!(
                    "the checkpoint {:?} is not readable: it was written by something else; \
                     drop the slot and checkpoint with `walnats slot drop --yes` to start over",
                    self.key
                ),
                e,
            )
        })
    }

    pub async fn save(&self, c: &Checkpoint) -> Result<()> {
        let body = serde_json::to_vec(c)
            .map_err(|e| Error::with_source(Kind::Checkpoint, "cannot encode checkpoint", e))?;
        self.kv
            .put(self.key.clone(), Bytes::from(body))
            .await
            .map_err(|e| kv_err("cannot write the checkpoint", e))?;
        Ok(())
    }

    /// Where `walnats snapshot` leaves a request for the WAL message that
    /// names `nonce`: only a holder of NATS credentials can write it, so a
    /// database user who writes a `walnats.snapshot` message cannot steer
    /// walnats.
    fn request_key(&self, nonce: &str) -> String {
        format!("{}.request.{nonce}", self.key)
    }

    pub async fn save_request(&self, nonce: &str, body: Bytes) -> Result<()> {
        self.kv
            .put(self.request_key(nonce), body)
            .await
            .map_err(|e| kv_err("cannot write the snapshot request", e))?;
        Ok(())
    }

    /// The request `walnats snapshot` stored under `nonce`, if any.
    pub async fn load_request(&self, nonce: &str) -> Result<Option<Bytes>> {
        self.kv
            .get(self.request_key(nonce))
            .await
            .map_err(|e| kv_err("cannot read a snapshot request", e))
    }

    /// The secret part of walnats' single-writer lock key, and its
    /// revision: made on first use. Advisory lock keys show in `pg_locks`
    /// to every database user, so one who saw the key could take it while
    /// walnats is down; then walnats makes a new secret (see
    /// [`Store::rotate_lock_secret`]) that only holders of its NATS
    /// credentials can read.
    pub async fn lock_secret(&self) -> Result<(String, u64)> {
        let key = format!("{}.lock", self.key);
        loop {
            let entry = self
                .kv
                .entry(key.clone())
                .await
                .map_err(|e| kv_err("cannot read the lock secret", e))?;
            if let Some(e) = entry.filter(|e| e.operation == kv::Operation::Put) {
                return Ok((String::from_utf8_lossy(&e.value).into_owned(), e.revision));
            }
            let secret = crate::nonce::new()?;
            // Two walnats starting at once: one creates it, both read it.
            if let Ok(revision) = self.kv.create(key.clone(), secret.clone().into()).await {
                return Ok((secret, revision));
            }
        }
    }

    /// Replaces the lock secret at `revision` (if nobody else did already).
    pub async fn rotate_lock_secret(&self, revision: u64) -> Result<()> {
        let secret = crate::nonce::new()?;
        let key = format!("{}.lock", self.key);
        // Lost races are fine: someone else rotated it.
        let _ = self.kv.update(key, secret.into(), revision).await;
        Ok(())
    }

    pub async fn delete(&self) -> Result<()> {
        self.kv
            .purge(self.key.clone())
            .await
            .map_err(|e| kv_err("cannot delete the checkpoint", e))
    }
}

/// Writes checkpoints to the store one at a time, off the session's path:
/// the session starts a write when the ledger says one is due and hears
/// back when it is durable.
pub struct Writer {
    store: Arc<Store>,
    writing: Option<Pin<Box<dyn Future<Output = Result<Checkpoint>> + Send>>>,
}

impl Writer {
    pub fn new(store: Arc<Store>) -> Writer {
        Writer {
            store,
            writing: None,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A write is under way.
    pub fn busy(&self) -> bool {
        self.writing.is_some()
    }

    /// Starts writing `c` (the caller checks that none is under way).
    pub fn start(&mut self, c: Checkpoint) {
        let store = Arc::clone(&self.store);
        self.writing = Some(Box::pin(async move {
            store.save(&c).await?;
            Ok(c)
        }));
    }

    /// The write under way, once durable; waits forever when none is.
    pub async fn done(&mut self) -> Result<Checkpoint> {
        let Some(f) = self.writing.as_mut() else {
            return std::future::pending().await;
        };
        let written = f.await;
        self.writing = None;
        written
    }

    /// Waits for the write under way, if any.
    pub async fn finish(&mut self) -> Result<Option<Checkpoint>> {
        if self.writing.is_none() {
            return Ok(None);
        }
        self.done().await.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_tokens_are_kv_safe_and_distinct() {
        assert_eq!(key_token("CDC_APP"), "CDC_APP");
        assert_eq!(key_token("my.db"), "my=2Edb");
        assert_ne!(key_token("a.b"), key_token("a_b"));
        assert_eq!(key_token(""), "=00");
    }
}
