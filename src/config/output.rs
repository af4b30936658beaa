//! The `[snapshot]` and `[output]` sections: whether existing rows are
//! published first, the message format, transaction markers, and which
//! `pg_logical_emit_message` prefixes are published.
//!
//! Owns the rule that a message is published only when its prefix is
//! listed (any database user can write one) and never for walnats' own
//! `walnats.` prefixes. It only reads and checks; encoding is `encode`'s
//! job.

use serde::Deserialize;

use super::{config_err, count};
use crate::error::Result;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSnapshot {
    mode: Option<String>,
    parallelism: Option<i64>,
    chunk_rows: Option<i64>,
    chunk_bytes: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutput {
    format: Option<String>,
    tx_markers: Option<bool>,
    message_prefixes: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    Initial,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    Json,
    Debezium,
}

#[derive(Debug, Clone)]
pub struct OutputConfig {
    pub format: OutputFormat,
    pub tx_markers: bool,
    /// `pg_logical_emit_message` prefixes published on `_message`
    /// subjects; `"*"` publishes every one. Empty: none (any database user
    /// can write such messages, so only those asked for are published).
    pub message_prefixes: Vec<String>,
}

/// How the initial snapshot reads: connections at once and the size of a
/// chunk (one atomic batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotReading {
    /// Connections reading one exported snapshot at once.
    pub parallelism: usize,
    /// Rows per chunk, at most the 1000 messages of an atomic batch.
    pub chunk_rows: usize,
    /// Bytes of values per chunk (at least one row).
    pub chunk_bytes: usize,
}

/// Row values in flight at most (about: a chunk's messages are somewhat
/// larger than its values), whatever `snapshot.chunk_bytes` says: so that a
/// large chunk size neither grows nats-server's ingest queue past what it
/// keeps (it drops messages then) nor walnats' memory.
pub const SNAPSHOT_BYTES_IN_FLIGHT: usize = 64 << 20;

impl SnapshotReading {
    /// How many chunks may be in flight at once: `max`, fewer when
    /// `chunk_bytes` is large ([`SNAPSHOT_BYTES_IN_FLIGHT`]), at least one.
    pub fn chunks_in_flight(&self, max: usize) -> usize {
        (SNAPSHOT_BYTES_IN_FLIGHT / self.chunk_bytes.max(1)).clamp(1, max.max(1))
    }
}

/// The most connections `snapshot.parallelism` may ask for.
pub const MAX_SNAPSHOT_PARALLELISM: i64 = 32;

/// The default `snapshot.chunk_bytes`: with the default parallelism and
/// the chunks a reader holds, waiting and in flight, wide rows stay well
/// under walnats' 64 MiB memory target.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

impl SnapshotReading {
    /// What suits the machine: one reader per core, 2 to 4.
    pub fn default_parallelism() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(2, 4)
    }
}

impl SnapshotMode {
    pub(super) fn from_raw(raw: RawSnapshot) -> Result<(SnapshotMode, SnapshotReading)> {
        let mode = match raw.mode.as_deref().unwrap_or("initial") {
            "initial" => SnapshotMode::Initial,
            "never" => SnapshotMode::Never,
            _ => {
                return Err(config_err(
                    "snapshot.mode is unknown: use \"initial\" or \"never\"",
                ));
            }
        };
        let parallelism = match raw.parallelism {
            None => SnapshotReading::default_parallelism(),
            Some(n) => count(n, 1..=MAX_SNAPSHOT_PARALLELISM, "snapshot.parallelism")?,
        };
        let chunk_rows = count(
            raw.chunk_rows.unwrap_or(1000),
            1..=1000,
            "snapshot.chunk_rows",
        )?;
        let chunk_bytes = match raw.chunk_bytes.as_deref() {
            None => DEFAULT_CHUNK_BYTES,
            Some(text) => super::limits::parse_bytes(text)
                .filter(|b| (1024..=(256 << 20)).contains(b))
                .and_then(|b| usize::try_from(b).ok())
                .ok_or_else(|| {
                    config_err(
                        "snapshot.chunk_bytes must be a size from \"1KiB\" to \"256MiB\", like \"1MiB\"",
                    )
                })?,
        };
        Ok((
            mode,
            SnapshotReading {
                parallelism,
                chunk_rows,
                chunk_bytes,
            },
        ))
    }
}

impl OutputConfig {
    pub(super) fn from_raw(raw: RawOutput) -> Result<OutputConfig> {
        let format = match raw.format.as_deref().unwrap_or("json") {
            "json" => OutputFormat::Json,
            "debezium" => OutputFormat::Debezium,
            _ => {
                return Err(config_err(
                    "output.format is unknown: use \"json\" or \"debezium\"",
                ));
            }
        };
        let message_prefixes = raw.message_prefixes.unwrap_or_default();
        if message_prefixes.iter().any(|p| p.is_empty()) {
            return Err(config_err(
                "output.message_prefixes has an empty entry: list the pg_logical_emit_message prefixes to \
                 publish, or \"*\" for every one",
            ));
        }
        if message_prefixes.iter().any(|p| p.starts_with("walnats.")) {
            return Err(config_err(
                "output.message_prefixes lists a prefix starting with \"walnats.\": those are walnats' own \
                 (heartbeats, snapshot requests, watermarks) and are never published; remove it",
            ));
        }
        Ok(OutputConfig {
            format,
            tx_markers: raw.tx_markers.unwrap_or(false),
            message_prefixes,
        })
    }

    /// Whether `_message`s with this prefix are published.
    pub fn publishes_message(&self, prefix: &[u8]) -> bool {
        publishes_message(&self.message_prefixes, prefix)
    }
}

/// Whether `prefix` is in `list` (`"*"`: every prefix). Exact, byte for
/// byte: a prefix is an identifier, not a pattern.
pub fn publishes_message(list: &[String], prefix: &[u8]) -> bool {
    list.iter().any(|p| p == "*" || p.as_bytes() == prefix)
}

#[cfg(test)]
mod tests {
    use super::super::tests::assert_refused;
    use super::*;

    fn output(raw: RawOutput) -> Result<OutputConfig> {
        OutputConfig::from_raw(raw)
    }

    fn prefixes(list: &[&str]) -> RawOutput {
        RawOutput {
            message_prefixes: Some(list.iter().map(|p| (*p).to_owned()).collect()),
            ..RawOutput::default()
        }
    }

    #[test]
    fn the_sections_take_their_values_and_defaults() {
        let never = Some("never".to_owned());
        let (mode, reading) = SnapshotMode::from_raw(RawSnapshot {
            mode: never,
            ..RawSnapshot::default()
        })
        .unwrap();
        assert_eq!(mode, SnapshotMode::Never);
        assert!((2..=4).contains(&reading.parallelism));
        assert_eq!((reading.chunk_rows, reading.chunk_bytes), (1000, 1 << 20));
        assert_eq!(
            reading.chunks_in_flight(16),
            16,
            "the default size keeps the full window"
        );
        let big = |bytes| SnapshotReading {
            chunk_bytes: bytes,
            ..reading
        };
        assert_eq!(big(16 << 20).chunks_in_flight(16), 4);
        assert_eq!(big(256 << 20).chunks_in_flight(16), 1);
        let (_, reading) = SnapshotMode::from_raw(RawSnapshot {
            parallelism: Some(8),
            chunk_rows: Some(1),
            chunk_bytes: Some("64KiB".to_owned()),
            ..RawSnapshot::default()
        })
        .unwrap();
        assert_eq!(
            reading,
            SnapshotReading {
                parallelism: 8,
                chunk_rows: 1,
                chunk_bytes: 64 << 10
            }
        );
        let format = Some("debezium".to_owned());
        let c = output(RawOutput {
            format,
            ..RawOutput::default()
        })
        .unwrap();
        assert_eq!(c.format, OutputFormat::Debezium);
        assert!(!c.tx_markers && !c.publishes_message(b"app"));
        let c = output(prefixes(&["app"])).unwrap();
        assert!(c.publishes_message(b"app"));
        assert!(!c.publishes_message(b"ap") && !c.publishes_message(b"app2"));
        assert!(
            output(prefixes(&["*"]))
                .unwrap()
                .publishes_message(b"anything")
        );
    }

    #[test]
    fn section_mistakes_name_the_key_and_the_fix() {
        let mode = Some("sometimes".to_owned());
        let r = SnapshotMode::from_raw(RawSnapshot {
            mode,
            ..RawSnapshot::default()
        });
        assert_refused(r, "snapshot.mode", "use \"initial\" or \"never\"");
        for n in [0, 33, -1] {
            let r = SnapshotMode::from_raw(RawSnapshot {
                parallelism: Some(n),
                ..RawSnapshot::default()
            });
            assert_refused(r, "snapshot.parallelism", "between 1 and 32");
        }
        for n in [0, 1001] {
            let r = SnapshotMode::from_raw(RawSnapshot {
                chunk_rows: Some(n),
                ..RawSnapshot::default()
            });
            assert_refused(r, "snapshot.chunk_rows", "between 1 and 1000");
        }
        for b in ["1", "1GiB", "lots"] {
            let r = SnapshotMode::from_raw(RawSnapshot {
                chunk_bytes: Some(b.to_owned()),
                ..RawSnapshot::default()
            });
            assert_refused(r, "snapshot.chunk_bytes", "\"1KiB\" to \"256MiB\"");
        }
        let format = Some("avro".to_owned());
        let r = output(RawOutput {
            format,
            ..RawOutput::default()
        });
        assert_refused(r, "output.format", "use \"json\" or \"debezium\"");
        let r = output(prefixes(&["app", ""]));
        assert_refused(r, "output.message_prefixes", "or \"*\" for every one");
        let r = output(prefixes(&["walnats.mine"]));
        assert_refused(r, "output.message_prefixes", "remove it");
        let Err(err) = output(prefixes(&["walnats.mine"])) else {
            unreachable!()
        };
        assert!(!err.to_string().contains("walnats.mine"), "{err}");
    }
}
