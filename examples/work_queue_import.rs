//! Import one table's changes from the walnats stream into a table of another
//! PostgreSQL database: the consumer pattern to copy.
//!
//! ```sh
//! cargo run --example work_queue_import -- \
//!   --stream CDC_APP --filter 'cdc.app.public.orders.>' --durable orders-import \
//!   --target-url 'postgres://me@127.0.0.1/reporting' --target-table public.orders
//! ```
//!
//! - A durable pull consumer on the stream, created when missing, filtered to
//!   one table's subjects, explicit ack, `max_deliver` attempts.
//! - `max_ack_pending = 1`: the server hands out the next event only once
//!   this one is acked or terminated, so events are applied in stream (commit)
//!   order, redeliveries included. Simple and correct; it costs a round trip
//!   per event (partition by key over several consumers to go faster).
//! - Idempotent: the target database keeps, per target table, the position
//!   (`Cdc-Commit-Lsn`, `Cdc-Seq`) of the last event applied, in table
//!   `walnats_import_position`, updated in the same transaction as the
//!   change. Positions only grow along the stream, so an event at or below
//!   the stored position was applied already (we crashed between COMMIT and
//!   ack, or the ack was lost) and its redelivery is acked as a no-op.
//!   (`read` events will come from `walnats snapshot`, not implemented yet:
//!   check this rule against the positions they carry when it lands.)
//! - insert, update, read → upsert by the event's `key` columns (the target
//!   needs a primary key or unique index on them); delete → delete by key;
//!   truncate → TRUNCATE. Values go through `jsonb_populate_record`, so the
//!   target's column types parse walnats' JSON (numeric strings, RFC 3339
//!   timestamps, arrays, jsonb). Not bytea: walnats sends base64, which this
//!   example does not decode; and a jsonb holding JSON `null` lands as SQL
//!   NULL. Columns absent from `after` (unchanged TOAST values) are left as
//!   they are. The target needs every column the source sends (it may have
//!   more, with defaults).
//! - An event that cannot be applied is retried (nak with a delay); a
//!   malformed one at once, and any one on its `max_deliver`-th attempt, is
//!   published to `<dlq-prefix>.<original subject>` with the reason in the
//!   `Dlq-Reason` header, then terminated. That subject is outside walnats'
//!   stream: to keep dead letters, create a stream for them, e.g.
//!   `nats stream add DLQ --subjects 'dlq.>'`; this program then waits for
//!   JetStream's ack of the dead letter before terminating the event.
//!   Without one they reach only live subscribers (it warns at start).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::pull};
use clap::Parser;
use futures::StreamExt;
use serde_json::{Map, Value};
use tokio_postgres::{Client, NoTls};

#[derive(Parser)]
struct Args {
    #[arg(
        long,
        env = "NATS_URL",
        hide_env_values = true,
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// The walnats stream (`nats.stream`).
    #[arg(long, env = "IMPORT_STREAM", default_value = "CDC_APP")]
    stream: String,
    /// One table's subjects: `<subject_prefix>.<schema>.<table>.>`.
    #[arg(long, env = "IMPORT_FILTER")]
    filter: String,
    /// Durable consumer name: the consumer remembers what was acked.
    #[arg(long, env = "IMPORT_DURABLE")]
    durable: String,
    /// Deliveries of one event before it goes to the dead-letter subject
    /// (for a consumer this creates; an existing one keeps its own).
    #[arg(long, env = "IMPORT_MAX_DELIVER", default_value_t = 5)]
    max_deliver: i64,
    #[arg(long, env = "IMPORT_DLQ_PREFIX", default_value = "dlq")]
    dlq_prefix: String,
    /// The database to write to, e.g. `postgres://user:pw@host/db`; its
    /// value from the environment is never shown in --help.
    #[arg(long, env = "TARGET_DATABASE_URL", hide_env_values = true)]
    target_url: String,
    /// `schema.table` or `table` in the target database.
    #[arg(long, env = "IMPORT_TARGET_TABLE")]
    target_table: String,
}

/// Why an event was not applied: `Malformed` will never apply, `Failed` may
/// on a later attempt.
enum Problem {
    Malformed(String),
    Failed(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for Problem {
    fn from(e: tokio_postgres::Error) -> Self {
        Problem::Failed(e)
    }
}

fn malformed<T>(why: impl Into<String>) -> Result<T, Problem> {
    Err(Problem::Malformed(why.into()))
}

/// `"a"` → `"a"`, with inner quotes doubled: names from messages are data.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Result<&'a str, Problem> {
    match headers.and_then(|h| h.get(name)) {
        Some(v) => Ok(v.as_str()),
        None => malformed(format!("header {name} is missing")),
    }
}

fn object<'a>(body: &'a Value, field: &str) -> Result<&'a Map<String, Value>, Problem> {
    match body.get(field) {
        Some(Value::Object(m)) => Ok(m),
        _ => malformed(format!("`{field}` is not an object")),
    }
}

struct Target {
    client: Client,
    /// Quoted `"schema"."table"`.
    table: String,
    /// As given: the key of its row in walnats_import_position.
    name: String,
}

impl Target {
    async fn connect(url: &str, name: &str) -> Result<Target, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("target database connection lost: {e}");
            }
        });
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS walnats_import_position (
                   target text PRIMARY KEY, commit_lsn pg_lsn NOT NULL, seq bigint NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
        let table = name.split('.').map(ident).collect::<Vec<_>>().join(".");
        Ok(Target {
            client,
            table,
            name: name.to_owned(),
        })
    }

    /// Applies one event in one transaction with its position; `Ok(false)`
    /// when the position says it was applied before.
    async fn apply(
        &mut self,
        headers: Option<&HeaderMap>,
        payload: &[u8],
    ) -> Result<bool, Problem> {
        let commit_lsn = header(headers, "Cdc-Commit-Lsn")?;
        let Ok(seq) = header(headers, "Cdc-Seq")?.parse::<i64>() else {
            return malformed("header Cdc-Seq is not a number");
        };
        let Ok(body) = serde_json::from_slice::<Value>(payload) else {
            return malformed("the body is not JSON");
        };
        let op = body.get("op").and_then(Value::as_str).unwrap_or_default();
        let t = &self.table;
        let tx = self.client.transaction().await?;
        // Moves the position forward, or returns no row if it is not forward.
        let advanced = tx
            .query_opt(
                "INSERT INTO walnats_import_position AS p (target, commit_lsn, seq)
                 VALUES ($1, $2::text::pg_lsn, $3)
                 ON CONFLICT (target) DO UPDATE
                   SET commit_lsn = EXCLUDED.commit_lsn, seq = EXCLUDED.seq, applied_at = now()
                   WHERE (p.commit_lsn, p.seq) < (EXCLUDED.commit_lsn, EXCLUDED.seq)
                 RETURNING 1",
                &[&self.name, &commit_lsn, &seq],
            )
            .await;
        let advanced = match advanced {
            Ok(row) => row.is_some(),
            // 22P02: invalid_text_representation, here a Cdc-Commit-Lsn that is no LSN.
            Err(e) if e.code().is_some_and(|c| c.code() == "22P02") => {
                return malformed("header Cdc-Commit-Lsn is not an LSN");
            }
            Err(e) => return Err(e.into()),
        };
        if !advanced {
            return Ok(false);
        }
        match op {
            "insert" | "update" | "read" => {
                let key = object(&body, "key")?;
                let after = object(&body, "after")?;
                // An update that changed the key: the old row goes first.
                if let Some(Value::Object(before)) = body.get("before") {
                    let old: Map<String, Value> = key
                        .keys()
                        .filter_map(|k| Some((k.clone(), before.get(k)?.clone())))
                        .collect();
                    if old.len() == key.len() && &old != key {
                        delete_by_key(&tx, t, &old).await?;
                    }
                }
                let cols: Vec<String> = after.keys().map(|c| ident(c)).collect();
                let keys: Vec<String> = key.keys().map(|c| ident(c)).collect();
                let set: Vec<String> = after
                    .keys()
                    .filter(|c| !key.contains_key(*c))
                    .map(|c| format!("{0} = EXCLUDED.{0}", ident(c)))
                    .collect();
                let on_conflict = if set.is_empty() {
                    "DO NOTHING".to_owned()
                } else {
                    format!("DO UPDATE SET {}", set.join(", "))
                };
                let sql = format!(
                    "INSERT INTO {t} ({c}) SELECT {c} FROM jsonb_populate_record(NULL::{t}, $1::text::jsonb)
                     ON CONFLICT ({k}) {on_conflict}",
                    c = cols.join(", "),
                    k = keys.join(", "),
                );
                tx.execute(&sql, &[&Value::Object(after.clone()).to_string()])
                    .await?;
            }
            "delete" => delete_by_key(&tx, t, object(&body, "key")?).await?,
            "truncate" => tx.batch_execute(&format!("TRUNCATE {t}")).await?,
            other => return malformed(format!("unknown op {other:?}")),
        }
        tx.commit().await?;
        Ok(true)
    }
}

async fn delete_by_key(
    tx: &tokio_postgres::Transaction<'_>,
    t: &str,
    key: &Map<String, Value>,
) -> Result<(), Problem> {
    if key.is_empty() {
        return malformed("`key` is empty: the source table has no replica identity");
    }
    let cond: Vec<String> = key
        .keys()
        .map(|c| format!("d.{0} = k.{0}", ident(c)))
        .collect();
    let sql = format!(
        "DELETE FROM {t} AS d USING jsonb_populate_record(NULL::{t}, $1::text::jsonb) AS k WHERE {}",
        cond.join(" AND ")
    );
    tx.execute(&sql, &[&Value::Object(key.clone()).to_string()])
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = Args::parse();
    let nats = async_nats::connect(&args.nats_url).await?;
    let js = jetstream::new(nats.clone());
    let stream = js.get_stream(&args.stream).await?;
    let consumer = stream
        .get_or_create_consumer(
            &args.durable,
            pull::Config {
                durable_name: Some(args.durable.clone()),
                filter_subject: args.filter.clone(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_deliver: args.max_deliver,
                max_ack_pending: 1,
                ..Default::default()
            },
        )
        .await?;
    // An existing consumer keeps its own setting; 0 or -1: unlimited.
    let max_deliver = consumer.cached_info().config.max_deliver;
    let dlq_probe = format!(
        "{}.{}",
        args.dlq_prefix,
        args.filter.replace(['*', '>'], "x")
    );
    // With a stream on the dead-letter subjects, a dead letter is acked by
    // JetStream before the event is terminated; without one it is only sent.
    let dlq_kept = js.stream_by_subject(dlq_probe.as_str()).await.is_ok();
    if !dlq_kept {
        eprintln!("warning: no stream stores {dlq_probe}: dead letters will not be kept");
    }
    let mut target = Target::connect(&args.target_url, &args.target_table).await?;
    let mut messages = consumer.messages().await?;
    eprintln!("importing {} into {}", args.filter, args.target_table);
    loop {
        let message = tokio::select! {
            m = messages.next() => m,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(message) = message else {
            return Ok(());
        };
        let message = message?;
        let (seq, delivered) = {
            let info = message.info()?;
            (info.stream_sequence, info.delivered)
        };
        // A lost target connection is not the event's fault: reconnect and
        // apply it again within this delivery, so an outage of the target
        // database never uses up its attempts.
        let problem = loop {
            match target
                .apply(message.headers.as_ref(), &message.payload)
                .await
            {
                Ok(_) => break None,
                Err(Problem::Failed(_)) if target.client.is_closed() => {
                    target = reconnect(&args, &message).await;
                }
                Err(p) => break Some(p),
            }
        };
        let reason = match problem {
            None => {
                message.double_ack().await?;
                continue;
            }
            Some(Problem::Malformed(why)) => why,
            Some(Problem::Failed(e)) if max_deliver <= 0 || delivered < max_deliver => {
                eprintln!(
                    "stream seq {seq}: attempt {delivered} failed, will retry: {}",
                    describe(&e)
                );
                let backoff = Duration::from_secs(u64::try_from(delivered).unwrap_or(1));
                message.ack_with(AckKind::Nak(Some(backoff))).await?;
                continue;
            }
            Some(Problem::Failed(e)) => {
                format!(
                    "attempt {delivered} of {max_deliver} failed: {}",
                    describe(&e)
                )
            }
        };
        // Dead letter: the original headers that identify the event, its
        // body as it was, and why.
        let subject = format!("{}.{}", args.dlq_prefix, message.subject);
        let mut headers = HeaderMap::new();
        for (name, values) in message.headers.iter().flat_map(|h| h.iter()) {
            let name: &str = name.as_ref();
            if name == "Nats-Msg-Id" || name.starts_with("Cdc-") || name == "Content-Type" {
                for v in values {
                    headers.append(name, v.as_str());
                }
            }
        }
        headers.insert("Dlq-Reason", reason.replace(['\r', '\n'], " "));
        headers.insert("Dlq-Stream", args.stream.as_str());
        headers.insert("Dlq-Stream-Seq", seq.to_string());
        let payload = message.payload.clone();
        if dlq_kept {
            js.publish_with_headers(subject.clone(), headers, payload)
                .await?
                .await?;
        } else {
            nats.publish_with_headers(subject.clone(), headers, payload)
                .await?;
            nats.flush().await?;
        }
        eprintln!("stream seq {seq}: sent to {subject}: {reason}");
        message.double_ack_with(AckKind::Term).await?;
    }
}

/// Waits for the target database, doubling the pause up to 30 s, and keeps
/// `message` from being redelivered meanwhile (ack_wait starts over).
async fn reconnect(args: &Args, message: &jetstream::Message) -> Target {
    let mut pause = Duration::from_millis(200);
    loop {
        match Target::connect(&args.target_url, &args.target_table).await {
            Ok(t) => return t,
            Err(e) => eprintln!(
                "target database unreachable, retrying in {pause:?}: {}",
                describe(&e)
            ),
        }
        let _ = message.ack_with(AckKind::Progress).await;
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// The SQLSTATE and message of a database error, not its DETAIL, which may
/// quote row values (`Key (id)=(42) already exists`): logs and dead-letter
/// headers carry no data.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}
