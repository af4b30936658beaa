//! The transactional outbox with walnats: a service that writes an order
//! and its `OrderCreated` event in one transaction, and a consumer that
//! handles each event once.
//!
//! walnats.toml, beside the usual sections:
//!
//! ```toml
//! [[outbox]]
//! table = "public.outbox"
//! headers = ["type"]
//! ```
//!
//! ```sh
//! cargo run --example outbox -- service --database-url 'postgres://me@127.0.0.1/app' --orders 3
//! cargo run --example outbox -- consume --stream CDC_APP \
//!   --subject cdc.app._outbox.order --durable order-events
//! ```
//!
//! - The service never talks to NATS. The event is a row of `outbox`
//!   written in the transaction that writes the order, so both commit or
//!   neither does: no event for an order that was rolled back, no order
//!   whose event was lost between the database and the broker. walnats
//!   publishes each inserted row as one message on
//!   `<subject_prefix>._outbox.<aggregatetype>`: the body is `payload`, the
//!   headers `Cdc-Event-Id` (`id`), `Cdc-Aggregate-Id` (`aggregateid`) and
//!   `type`. It publishes nothing for a delete, so the service may delete
//!   old rows whenever it likes (walnats reads them from the WAL, not from
//!   the table).
//! - `service` creates the two tables when they are missing; walnats checks
//!   the outbox table at start, so run it once (`--orders 0`) first.
//! - The consumer: a durable pull consumer on one subject, explicit acks,
//!   `max_deliver` attempts. Delivery is at least once: a message handled
//!   whose ack was lost comes back, and so does every message when the
//!   consumer is recreated. So it skips an event id it has handled already,
//!   remembering the last `--remember` ids (bounded memory). The set lives
//!   in this process: after a restart a redelivery is handled again. When a
//!   handler must never run twice, keep the handled ids in the database
//!   the handler writes, in the same transaction.
//! - A message without `Cdc-Event-Id`, or whose body is not JSON, will
//!   never be handled: it is terminated with a line on stderr.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::pull};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use serde_json::Value;
use tokio_postgres::NoTls;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Places orders: each one a row of `orders` and its `OrderCreated`
    /// row of `outbox`, in one transaction.
    Service {
        /// e.g. `postgres://user:pw@host/app`; its value from the
        /// environment is never shown in --help.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[arg(long, default_value_t = 1)]
        orders: u32,
        #[arg(long, default_value = "ada")]
        customer: String,
    },
    /// Handles the events of one outbox subject, each event id once.
    Consume {
        #[arg(
            long,
            env = "NATS_URL",
            hide_env_values = true,
            default_value = "nats://127.0.0.1:4222"
        )]
        nats_url: String,
        /// The walnats stream (`nats.stream`).
        #[arg(long, default_value = "CDC_APP")]
        stream: String,
        /// `<subject_prefix>._outbox.<aggregate type>`.
        #[arg(long, default_value = "cdc.app._outbox.order")]
        subject: String,
        /// Durable consumer name: the consumer remembers what was acked.
        #[arg(long, default_value = "order-events")]
        durable: String,
        /// How many handled event ids to remember for de-duplication.
        #[arg(long, default_value_t = 10_000)]
        remember: usize,
    },
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS orders (
      id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
      customer text NOT NULL,
      total numeric(10,2) NOT NULL,
      created_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE IF NOT EXISTS outbox (
      id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
      aggregatetype text NOT NULL CHECK (aggregatetype <> ''),
      aggregateid text NOT NULL,
      type text NOT NULL,
      payload jsonb NOT NULL,
      created_at timestamptz NOT NULL DEFAULT now())";

async fn service(
    url: &str,
    orders: u32,
    customer: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (mut client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("database connection lost: {e}");
        }
    });
    client.batch_execute(SCHEMA).await?;
    for i in 1..=orders {
        let total = format!("{}.90", 10 + i);
        let tx = client.transaction().await?;
        let order: i64 = tx
            .query_one(
                "INSERT INTO orders (customer, total) VALUES ($1, $2::text::numeric) RETURNING id",
                &[&customer, &total],
            )
            .await?
            .get(0);
        let event: String = tx
            .query_one(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
                 VALUES ('order', $1::int8::text, 'OrderCreated',
                         jsonb_build_object('orderId', $1::int8, 'customer', $2::text, 'total', $3::text))
                 RETURNING id::text",
                &[&order, &customer, &total],
            )
            .await?
            .get(0);
        tx.commit().await?;
        println!("placed order {order}: event {event}");
    }
    Ok(())
}

/// The last `cap` event ids handled, oldest first out.
struct Handled {
    ids: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl Handled {
    fn new(cap: usize) -> Handled {
        Handled {
            ids: HashSet::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: &str) {
        if !self.ids.insert(id.to_owned()) {
            return;
        }
        self.order.push_back(id.to_owned());
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers.and_then(|h| h.get(name)).map(|v| v.as_str())
}

/// The business: here, one line per event.
fn handle(event_id: &str, headers: Option<&HeaderMap>, body: &Value) -> String {
    let kind = header(headers, "type").unwrap_or("(no type)");
    let order = header(headers, "Cdc-Aggregate-Id").unwrap_or("?");
    match kind {
        "OrderCreated" => format!(
            "handled OrderCreated {event_id}: order {order} for {} totalling {}",
            body["customer"].as_str().unwrap_or("?"),
            body["total"].as_str().unwrap_or("?")
        ),
        other => format!("handled {other} {event_id}: order {order}: {body}"),
    }
}

async fn consume(
    nats_url: &str,
    stream: &str,
    subject: &str,
    durable: &str,
    remember: usize,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let js = jetstream::new(async_nats::connect(nats_url).await?);
    let consumer = js
        .get_stream(stream)
        .await?
        .get_or_create_consumer(
            durable,
            pull::Config {
                durable_name: Some(durable.to_owned()),
                filter_subject: subject.to_owned(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_deliver: 5,
                ..Default::default()
            },
        )
        .await?;
    let mut handled = Handled::new(remember);
    let mut messages = consumer.messages().await?;
    eprintln!("consuming {subject}");
    loop {
        let message = tokio::select! {
            m = messages.next() => m,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(message) = message else {
            return Ok(());
        };
        let message = message?;
        let seq = message.info()?.stream_sequence;
        let headers = message.headers.as_ref();
        let Some(event_id) = header(headers, "Cdc-Event-Id").map(str::to_owned) else {
            eprintln!("stream seq {seq}: no Cdc-Event-Id, not an outbox event: terminated");
            message.double_ack_with(AckKind::Term).await?;
            continue;
        };
        if handled.contains(&event_id) {
            println!("skipped duplicate {event_id} (stream seq {seq})");
            message.double_ack().await?;
            continue;
        }
        let Ok(body) = serde_json::from_slice::<Value>(&message.payload) else {
            eprintln!("stream seq {seq}: event {event_id} is not JSON: terminated");
            message.double_ack_with(AckKind::Term).await?;
            continue;
        };
        println!("{}", handle(&event_id, headers, &body));
        // Remembered before the ack: if the ack is lost, the redelivery
        // is skipped.
        handled.insert(&event_id);
        message.double_ack().await?;
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match Args::parse().role {
        Role::Service {
            database_url,
            orders,
            customer,
        } => service(&database_url, orders, &customer).await,
        Role::Consume {
            nats_url,
            stream,
            subject,
            durable,
            remember,
        } => consume(&nats_url, &stream, &subject, &durable, remember).await,
    }
}
