//! `/status` from a short-lived cache.
//!
//! Gathering the status opens a PostgreSQL and a NATS connection. Requests
//! must never multiply them: one refresh runs at a time (the others wait
//! for it and share its answer), and an answer, good or bad, is reused for
//! [`FRESH_FOR`]. An error answers with its kind only; what failed, where,
//! goes to the log, never to the client (it names the host, the user and
//! the database).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Mutex;

use crate::config::Config;
use crate::error::{Error, Kind};

/// How long an answer is reused.
pub const FRESH_FOR: Duration = Duration::from_secs(2);

/// A refresh that takes longer is given up (a server that accepts and then
/// never answers must not hold every `/status` request).
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);

/// What `/status` answers.
#[derive(Clone)]
pub enum Answer {
    /// The JSON of `walnats status --json`.
    Ok(Bytes),
    /// Gathering failed, with this kind; the details are in the log.
    Unavailable(Kind),
}

pub struct StatusCache {
    cfg: Arc<Config>,
    /// Held across a refresh: that is the single flight.
    last: Mutex<Option<(Instant, Answer)>>,
}

impl StatusCache {
    pub fn new(cfg: Arc<Config>) -> StatusCache {
        StatusCache {
            cfg,
            last: Mutex::new(None),
        }
    }

    /// The last answer if it is fresh, else a new one (waiting for a
    /// refresh under way rather than starting another).
    pub async fn get(&self) -> Answer {
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = &*last
            && at.elapsed() < FRESH_FOR
        {
            return answer.clone();
        }
        let answer = match tokio::time::timeout(REFRESH_TIMEOUT, self.gather()).await {
            Ok(Ok(json)) => Answer::Ok(json),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, kind = e.kind().name(), "/status: cannot gather the status");
                Answer::Unavailable(e.kind())
            }
            Err(_) => {
                tracing::warn!(
                    timeout = ?REFRESH_TIMEOUT,
                    "/status: PostgreSQL or NATS did not answer in time"
                );
                Answer::Unavailable(Kind::Io)
            }
        };
        *last = Some((Instant::now(), answer.clone()));
        answer
    }

    async fn gather(&self) -> crate::error::Result<Bytes> {
        let status = crate::admin::gather_status(&self.cfg).await?;
        serde_json::to_vec(&status)
            .map(Bytes::from)
            .map_err(|e| Error::with_source(Kind::Io, "cannot encode the status", e))
    }
}
