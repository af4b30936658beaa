//! The stream and what the server can do: JetStream present, the stream
//! found or created over `<prefix>.>`, and the server version and stream
//! settings that atomic and fast-ingest batches need.
//!
//! It reads and edits stream configuration only; it publishes nothing and
//! never reads the messages the stream holds.

use async_nats::jetstream;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType, Stream};

use crate::config::FastIngest;
use crate::error::{Error, Kind, Result};
use crate::subject;

/// Fails with a fix when the server has no JetStream.
pub async fn require_jetstream(js: &jetstream::Context) -> Result<()> {
    use jetstream::context::AccountErrorKind as K;
    js.query_account()
        .await
        .map(|_| ())
        .map_err(|e| match e.kind() {
            // No responders, or the server's own "not enabled": a setup fix.
            K::JetStreamUnavailable | K::JetStream(_) => Error::with_source(
                Kind::NatsSetup,
                "JetStream is not enabled for this NATS account: start nats-server with -js \
             (or a jetstream {} block in its config)",
                e,
            ),
            // A cluster still electing its meta leader answers late: retry.
            K::TimedOut | K::Other => {
                Error::with_source(Kind::NatsConnect, "JetStream did not answer yet", e)
            }
        })
}

/// What walnats found or made.
pub struct StreamSetup {
    pub stream: Stream,
    pub created: bool,
}

/// Gets the stream, or creates it with subjects `<prefix>.>` on file
/// storage. An existing stream whose subjects do not cover the prefix is
/// refused: walnats would publish into the void.
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    prefix: &str,
    replicas: usize,
) -> Result<StreamSetup> {
    match js.get_stream(name).await {
        Ok(stream) => {
            let subjects = &stream.cached_info().config.subjects;
            if !subjects.iter().any(|s| subject::covers_prefix(s, prefix)) {
                return Err(Error::new(
                    Kind::NatsSetup,
                    format!(
                        "stream {name:?} has subjects {subjects:?}, which do not cover \"{prefix}.>\": \
                         add it (nats stream edit {name} --subjects \"{prefix}.>\"), or set nats.stream / nats.subject_prefix"
                    ),
                ));
            }
            Ok(StreamSetup {
                stream,
                created: false,
            })
        }
        Err(e) => {
            let not_found = matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            );
            if !not_found {
                return Err(Error::with_source(
                    Kind::NatsConnect,
                    format!("cannot look up JetStream stream {name:?}"),
                    e,
                ));
            }
            let stream = create_stream(js, name, prefix, replicas).await?;
            Ok(StreamSetup {
                stream,
                created: true,
            })
        }
    }
}

/// Creates the stream: subjects `<prefix>.>`, file storage, direct gets,
/// and atomic batches where the server has them.
async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    prefix: &str,
    replicas: usize,
) -> Result<Stream> {
    js.create_stream(StreamConfig {
            name: name.to_owned(),
            subjects: vec![format!("{prefix}.>")],
            storage: StorageType::File,
            num_replicas: replicas,
            allow_direct: true,
            // Snapshots publish each chunk as one atomic batch.
            allow_atomic_publish: supports_atomic_batches(&js.client()),
            description: Some("PostgreSQL changes published by walnats".to_owned()),
            ..Default::default()
        })
        .await
        .map_err(|e| {
            use jetstream::context::CreateStreamErrorKind as K;
            let overlap = matches!(
                e.kind(),
                K::JetStream(ref j) if j.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP
            );
            if overlap {
                Error::with_source(
                    Kind::NatsSetup,
                    format!(
                        "cannot create JetStream stream {name:?}: another stream already holds subjects \
                         under \"{prefix}.>\"; set nats.stream to that stream"
                    ),
                    e,
                )
            } else {
                // A cluster still electing its leader, a timeout:
                // worth another try.
                Error::with_source(
                    Kind::NatsConnect,
                    format!("cannot create JetStream stream {name:?} yet"),
                    e,
                )
            }
        })
}

/// Whether the server stores atomic batches (nats-server 2.12.1+, which
/// also deduplicates `Nats-Msg-Id` inside a batch).
pub fn supports_atomic_batches(client: &async_nats::Client) -> bool {
    server_version(client) >= (2, 12, 1)
}

/// Makes sure the stream takes atomic batches: snapshots need them so that
/// a chunk of rows is either wholly in the stream or not at all. Turning
/// the setting on changes nothing for other publishers.
pub async fn allow_atomic_batches(js: &jetstream::Context, stream: &mut Stream) -> Result<()> {
    let cfg = stream.cached_info().config.clone();
    if cfg.allow_atomic_publish {
        return Ok(());
    }
    let name = cfg.name.clone();
    if !supports_atomic_batches(&js.client()) {
        return Err(Error::new(
            Kind::NatsSetup,
            format!(
                "a snapshot publishes each chunk of rows as one atomic batch, which needs nats-server 2.12.1 or newer \
                 (this one is {}): upgrade nats-server, or set snapshot.mode = \"never\"",
                js.client().server_info().version
            ),
        ));
    }
    js.update_stream(StreamConfig {
        allow_atomic_publish: true,
        ..cfg
    })
    .await
    .map_err(|e| {
        Error::with_source(
            Kind::NatsSetup,
            format!(
                "cannot turn on atomic batches (allow_atomic) on stream {name:?}, which snapshots need: \
                 run `nats stream edit {name} --allow-batch`, or set snapshot.mode = \"never\""
            ),
            e,
        )
    })?;
    *stream = js.get_stream(&name).await.map_err(|e| {
        Error::with_source(Kind::NatsConnect, format!("cannot read stream {name:?}"), e)
    })?;
    Ok(())
}

fn server_version(client: &async_nats::Client) -> (u32, u32, u32) {
    version_triple(&client.server_info().version)
}

/// Major, minor and patch of a server version such as `2.12.1` or
/// `2.14.0-RC.2`; a part that is missing or not a number counts as 0.
fn version_triple(version: &str) -> (u32, u32, u32) {
    let mut parts = version
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// Whether the server takes fast-ingest batches (ADR-50, nats-server 2.14+).
pub fn supports_fast_ingest(client: &async_nats::Client) -> bool {
    server_version(client) >= (2, 14, 0)
}

/// Turns on fast-ingest batches (`allow_batched`) on the stream, which
/// changes nothing for other publishers. `Ok(false)`: the server is too
/// old, or the stream cannot be changed, and `nats.fast_ingest` is
/// "auto": walnats publishes one by one and says why.
pub async fn allow_fast_ingest(
    js: &jetstream::Context,
    stream: &mut Stream,
    mode: FastIngest,
) -> Result<bool> {
    if mode == FastIngest::Off {
        return Ok(false);
    }
    let cfg = stream.cached_info().config.clone();
    if cfg.allow_batch_publish {
        return Ok(true);
    }
    let name = cfg.name.clone();
    let version = js.client().server_info().version;
    if !supports_fast_ingest(&js.client()) {
        if mode == FastIngest::On {
            return Err(Error::new(
                Kind::NatsSetup,
                format!(
                    "nats.fast_ingest = \"on\" needs nats-server 2.14 or newer (this one is {version}): \
                     upgrade nats-server, or set nats.fast_ingest = \"auto\" or \"off\""
                ),
            ));
        }
        tracing::info!(
            %version,
            "nats-server has no fast-ingest batches (2.14+): one acknowledgement per message"
        );
        return Ok(false);
    }
    let updated = js
        .update_stream(StreamConfig {
            allow_batch_publish: true,
            ..cfg
        })
        .await;
    if let Err(e) = updated {
        if mode == FastIngest::On {
            return Err(Error::with_source(
                Kind::NatsSetup,
                format!(
                    "cannot turn on fast-ingest batches (allow_batched) on stream {name:?}: \
                     run `nats stream edit {name} --allow-batch-publish` as an admin, or set nats.fast_ingest = \"off\""
                ),
                e,
            ));
        }
        tracing::warn!(
            stream = %name,
            error = %e,
            "cannot turn on fast-ingest batches (allow_batched) on the stream: one acknowledgement per message, \
             which is slower; let walnats edit the stream, or set nats.fast_ingest = \"off\" to silence this"
        );
        return Ok(false);
    }
    *stream = js.get_stream(&name).await.map_err(|e| {
        Error::with_source(Kind::NatsConnect, format!("cannot read stream {name:?}"), e)
    })?;
    if stream.cached_info().config.allow_batch_publish {
        return Ok(true);
    }
    // Accepted but not kept (a cluster with an older server in it?).
    if mode == FastIngest::On {
        return Err(Error::new(
            Kind::NatsSetup,
            format!(
                "stream {name:?} did not keep allow_batched (fast-ingest batches): is every server of the cluster \
                 2.14 or newer? Upgrade them, or set nats.fast_ingest = \"auto\" or \"off\""
            ),
        ));
    }
    tracing::warn!(
        stream = %name,
        "stream did not keep allow_batched (fast-ingest batches): one acknowledgement per message"
    );
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The version decides whether walnats uses atomic (2.12.1+) and
    /// fast-ingest (2.14+) batches: a release candidate counts as its
    /// release, and a version walnats cannot read counts as too old.
    #[test]
    fn server_versions_are_read_as_major_minor_patch() {
        assert_eq!(version_triple("2.12.1"), (2, 12, 1));
        assert_eq!(version_triple("2.14.0-RC.2"), (2, 14, 0));
        assert_eq!(version_triple("2.12.1-RC.1"), (2, 12, 1));
        assert_eq!(version_triple("2.10"), (2, 10, 0));
        assert_eq!(version_triple("v2.11.3"), (0, 11, 3));
        assert_eq!(version_triple(""), (0, 0, 0));
        assert!(version_triple("2.12.1") >= (2, 12, 1));
        assert!(version_triple("2.12.0") < (2, 12, 1));
        assert!(version_triple("2.9.25") < (2, 12, 1));
    }
}
