//! The sink's own ceiling, for `scripts/bench`: a bare async-nats publisher
//! sending COUNT copies of one message that walnats stored (same subject
//! length, same headers, same body) into another stream on file storage on
//! the same server, pipelined as walnats pipelines: each publish names the
//! sequence it must follow (`Nats-Expected-Last-Sequence`), carries its own
//! `Nats-Msg-Id`, and at most MAX_IN_FLIGHT acknowledgements are awaited at
//! once, on a context built with the same settings as walnats'.
//!
//!   cargo run --release --example bench_ceiling -- NATS_URL FROM_STREAM SEQ COUNT [MAX_IN_FLIGHT]
//!
//! Prints `ceiling: <count> msgs <seconds>s <rate> msgs/s <bytes> bytes/msg`.
//! With `BENCH_CEILING_BARE=1` it sends neither `Nats-Msg-Id` nor
//! `Nats-Expected-Last-Sequence`: what those two cost the server.
//! Not walnats code: no decoding, no encoding, no checkpoint.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue, IntoHeaderName};
use async_nats::jetstream::{self, message::PublishMessage, stream};
use futures::stream::{FuturesOrdered, StreamExt};

// The walnats binary runs on mimalloc; so does its reference.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// walnats runs on a current-thread runtime (measured: 40% less CPU than
// the multi-thread one on 2 cores); so does its reference.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, from, seq, count, rest @ ..] = args.as_slice() else {
        return Err("usage: bench_ceiling NATS_URL FROM_STREAM SEQ COUNT [MAX_IN_FLIGHT]".into());
    };
    let seq: u64 = seq.parse()?;
    let count: u64 = count.parse()?;
    let max_in_flight: usize = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(4096);

    let client = async_nats::connect(url.as_str()).await?;
    // As walnats' sink::context builds it.
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(max_in_flight.saturating_add(16))
        .backpressure_on_inflight(true)
        .build(client);

    let sample = js.get_stream(from).await?.get_raw_message(seq).await?;
    let fast = std::env::var("BENCH_CEILING_FAST").ok();
    let prefix = if fast.is_some() {
        "ceilfast"
    } else {
        "ceiling"
    };
    let ceiling = js
        .create_stream(stream::Config {
            name: prefix.to_uppercase(),
            subjects: vec![format!("{prefix}.>")],
            allow_batch_publish: fast.is_some(),
            storage: stream::StorageType::File,
            allow_direct: true,
            ..Default::default()
        })
        .await?;
    let mut last = ceiling.cached_info().state.last_sequence;

    // The sample's subject with its first token swapped, and its headers
    // as (name, value) pairs; the message id is remade for each publish,
    // with the sample's length.
    let subject = match sample.subject.split_once('.') {
        Some((_, rest)) => format!("{prefix}.{rest}"),
        None => format!("{prefix}.x"),
    };
    let msg_id_name: HeaderName = "Nats-Msg-Id".into_header_name();
    let mut id_base = String::new();
    let mut fixed: Vec<(HeaderName, HeaderValue)> = Vec::new();
    for (name, values) in sample.headers.iter() {
        let n: &str = name.as_ref();
        if n.starts_with("Nats-Expected") {
            continue;
        }
        for v in values {
            if n == "Nats-Msg-Id" {
                id_base = v
                    .as_str()
                    .rsplit_once(':')
                    .map_or("", |(b, _)| b)
                    .to_owned();
            } else {
                fixed.push((n.into_header_name(), v.clone()));
            }
        }
    }
    let payload = sample.payload.clone();
    let header_bytes: usize = fixed
        .iter()
        .map(|(n, v)| {
            let n: &str = n.as_ref();
            n.len() + v.as_str().len() + 4
        })
        .sum::<usize>()
        + id_base.len()
        + 20;
    eprintln!(
        "ceiling: {} headers (+ Nats-Msg-Id, Nats-Expected-Last-Sequence), {} body bytes, subject {subject}",
        fixed.len(),
        payload.len()
    );

    if let Some(flow) = fast {
        let flow: u64 = flow.parse().unwrap_or(500);
        let client = js.client();
        let inbox = client.new_inbox();
        let mut sub = client.subscribe(format!("{inbox}.>")).await?;
        let mut acked = 0u64;
        let t0 = Instant::now();
        for i in 1..=count + 1 {
            let mut headers = HeaderMap::new();
            let op = if i == 1 {
                0
            } else if i == count + 1 {
                3
            } else {
                1
            };
            if op != 3 {
                headers.insert(msg_id_name.clone(), format!("{id_base}:{i}"));
                for (n, v) in &fixed {
                    headers.insert(n.clone(), v.clone());
                }
                if i == 1 {
                    headers.insert("Nats-Expected-Last-Sequence", last.to_string());
                }
            }
            let reply = format!("{inbox}.{flow}.fail.{i}.{op}.$FI");
            let body = if op == 3 {
                bytes::Bytes::new()
            } else {
                payload.clone()
            };
            client
                .publish_with_reply_and_headers(subject.clone(), reply, headers, body)
                .await?;
            while i == 1 || acked + flow * 3 <= i + 1 || op == 3 {
                let m = sub.next().await.ok_or("inbox closed")?;
                let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
                if v.get("type").and_then(|t| t.as_str()) == Some("ack") {
                    acked = acked.max(v["seq"].as_u64().unwrap_or(0));
                    if i == 1 {
                        break;
                    }
                } else if op == 3 && v.get("batch").is_some() {
                    eprintln!("final: {v}");
                    break;
                } else {
                    return Err(format!("reply: {v}").into());
                }
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "ceiling: {count} msgs {secs:.2}s {:.0} msgs/s {} bytes/msg (fast ingest, flow {flow})",
            count as f64 / secs,
            payload.len() + header_bytes + subject.len()
        );
        return Ok(());
    }
    let bare = std::env::var_os("BENCH_CEILING_BARE").is_some();
    let mut inflight = FuturesOrdered::new();
    let t0 = Instant::now();
    for i in 0..count {
        let mut headers = HeaderMap::new();
        if !bare {
            headers.insert(msg_id_name.clone(), format!("{id_base}:{i}"));
        }
        for (n, v) in &fixed {
            headers.insert(n.clone(), v.clone());
        }
        let mut msg = PublishMessage::build()
            .headers(headers)
            .payload(payload.clone());
        if !bare {
            msg = msg.expected_last_sequence(last);
        }
        let ack = js.send_publish(subject.clone(), msg).await?;
        last += 1;
        inflight.push_back(ack.into_future());
        while inflight.len() >= max_in_flight {
            if let Some(acked) = inflight.next().await {
                acked?;
            }
        }
    }
    while let Some(acked) = inflight.next().await {
        acked?;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "ceiling: {count} msgs {secs:.2}s {:.0} msgs/s {} bytes/msg",
        count as f64 / secs,
        payload.len() + header_bytes + subject.len()
    );
    Ok(())
}
