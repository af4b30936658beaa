//! The metric names, their descriptions, and the readiness flag
//! ([`Health`]): what every part records into and `http` serves.
//!
//! Names live here, not with the HTTP server, so that recording a metric
//! never depends on serving one. No I/O but the recorder's upkeep task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::error::{Error, Kind, Result};

pub const EVENTS_PUBLISHED: &str = "walnats_events_published_total";
pub const TRANSACTIONS: &str = "walnats_transactions_total";
pub const REPLICATION_LAG: &str = "walnats_replication_lag_bytes";
pub const CONFIRMED_FLUSH_LSN: &str = "walnats_confirmed_flush_lsn";
pub const PUBLISH_LATENCY: &str = "walnats_publish_latency_seconds";
pub const SNAPSHOT_ROWS: &str = "walnats_snapshot_rows_total";
pub const ERRORS: &str = "walnats_errors_total";
pub const OVERSIZE_SKIPPED: &str = "walnats_oversize_skipped_total";
pub const READY: &str = "walnats_ready";
pub const OVERSIZE_STORED: &str = "walnats_oversize_stored_total";
pub const SLOT_WAL_RETAINED: &str = "walnats_slot_wal_retained_bytes";
pub const MESSAGES_IGNORED: &str = "walnats_messages_ignored_total";

/// Whether a session is streaming right now.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    /// Also the `walnats_ready` gauge, so that "nothing streams" is an
    /// alert on `/metrics` alone.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        metrics::gauge!(READY).set(if ready { 1.0 } else { 0.0 });
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Installs the Prometheus recorder (once per process), describes every
/// metric, so that each appears in `/metrics` from the start, and drains
/// histogram samples every 5 s. Must run inside the Tokio runtime.
pub fn install_metrics() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ])
        .map_err(|e| Error::with_source(Kind::Config, "bad histogram buckets", e))?
        .install_recorder()
        .map_err(|e| Error::with_source(Kind::Io, "cannot install the metrics recorder", e))?;
    metrics::describe_counter!(
        EVENTS_PUBLISHED,
        "change events acknowledged by JetStream, by table and op"
    );
    metrics::describe_counter!(
        MESSAGES_IGNORED,
        "pg_logical_emit_message messages not published: their prefix is not in output.message_prefixes, \
         or a walnats control message that was malformed or not authorized"
    );
    metrics::describe_counter!(
        TRANSACTIONS,
        "transactions whose every event JetStream acknowledged"
    );
    metrics::describe_gauge!(
        REPLICATION_LAG,
        "bytes of WAL between the server's position and the slot's confirmed position"
    );
    metrics::describe_gauge!(
        CONFIRMED_FLUSH_LSN,
        "the LSN walnats last confirmed to the slot, as a number"
    );
    metrics::describe_histogram!(
        PUBLISH_LATENCY,
        metrics::Unit::Seconds,
        "commit in PostgreSQL to acknowledgement by JetStream"
    );
    metrics::describe_counter!(SNAPSHOT_ROWS, "rows published by snapshots");
    metrics::describe_counter!(
        ERRORS,
        "errors that ended a session or the process, by kind"
    );
    metrics::describe_gauge!(
        READY,
        "1 while a session streams with PostgreSQL and NATS connected (as /readyz), else 0"
    );
    metrics::gauge!(READY).set(0.0);
    metrics::describe_gauge!(
        SLOT_WAL_RETAINED,
        "bytes of WAL the slot keeps on the server (its WAL position minus the slot's restart_lsn)"
    );
    metrics::describe_counter!(
        OVERSIZE_SKIPPED,
        "messages over max_payload not published (limits.on_oversize = skip), by subject"
    );
    metrics::describe_counter!(
        OVERSIZE_STORED,
        "messages over max_payload stored in the Object Store, a claim check published instead, by subject"
    );
    metrics::counter!(SNAPSHOT_ROWS).absolute(0);
    metrics::counter!(TRANSACTIONS).absolute(0);
    // Histogram samples pile up until drained into their buckets: drain
    // them whether or not anything scrapes (with HTTP off they grew by ~8
    // bytes per published change, without bound).
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// `walnats_events_published_total{table,op}` handles, made once per
/// (relation, op) so the hot path does no label formatting.
#[derive(Default)]
pub struct EventCounters {
    by_key: std::collections::HashMap<(u32, &'static str), metrics::Counter>,
    /// The handle given last: rows come in runs of one table and op, and
    /// the map's SipHash of the key cost ~400 instructions a row.
    last: Option<((u32, &'static str), metrics::Counter)>,
}

impl EventCounters {
    /// The handle for relation `oid` (0: messages) and `op`; `table` names
    /// the label the first time.
    pub fn get(
        &mut self,
        oid: u32,
        op: &'static str,
        table: impl FnOnce() -> String,
    ) -> metrics::Counter {
        let key = (oid, op);
        if let Some((last, counter)) = &self.last
            && *last == key
        {
            return counter.clone();
        }
        let counter = self
            .by_key
            .entry(key)
            .or_insert_with(|| metrics::counter!(EVENTS_PUBLISHED, "table" => table(), "op" => op))
            .clone();
        self.last = Some((key, counter.clone()));
        counter
    }
}
