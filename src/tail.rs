//! `walnats tail`: an ordered, ephemeral consumer that prints events for a
//! human. Read-only: it never acknowledges, deletes or publishes anything.

use std::io::Write;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use futures::StreamExt;

use crate::config::Config;
use crate::error::{Error, Kind, Result};
use crate::pipeline::connect_nats_only;

/// `FILTER` is relative to the subject prefix: `public.orders.>`,
/// `*.*.delete`; a shorter filter without a wildcard at the end gets `.>`
/// (so `public.orders` follows that table). Empty: everything.
pub fn filter_subject(prefix: &str, filter: Option<&str>) -> String {
    match filter {
        None | Some("") => format!("{prefix}.>"),
        Some(f) => {
            let f = f.trim_start_matches(&format!("{prefix}.")).to_owned();
            if f.ends_with('>') || f.split('.').count() >= 3 {
                format!("{prefix}.{f}")
            } else {
                format!("{prefix}.{f}.>")
            }
        }
    }
}

pub async fn tail(
    cfg: &Config,
    filter: Option<&str>,
    from_start: bool,
    pretty: bool,
) -> Result<()> {
    let (js, prefix, stream_name) = connect_nats_only(cfg).await?;
    let stream = js.get_stream(&stream_name).await.map_err(|e| {
        Error::with_source(
            Kind::NatsSetup,
            format!("stream {stream_name:?} not found: has `walnats run` started yet?"),
            e,
        )
    })?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: filter_subject(&prefix, filter),
            deliver_policy: if from_start {
                DeliverPolicy::All
            } else {
                DeliverPolicy::New
            },
            ..Default::default()
        })
        .await
        .map_err(|e| Error::with_source(Kind::NatsSetup, "cannot create an ordered consumer", e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Error::with_source(Kind::NatsConnect, "cannot consume the stream", e))?;
    let mut out = std::io::stdout().lock();
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| Error::with_source(Kind::NatsConnect, "lost the stream", e))?;
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        let body = match serde_json::from_slice::<serde_json::Value>(&m.payload) {
            Ok(v) if pretty => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Ok(v) => v.to_string(),
            Err(_) => String::from_utf8_lossy(&m.payload).into_owned(),
        };
        if writeln!(out, "{seq} {} {body}", m.subject).is_err() {
            // stdout closed (e.g. piped into head): done.
            return Ok(());
        }
        let _ = out.flush();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_relative_to_the_prefix() {
        assert_eq!(filter_subject("cdc.app", None), "cdc.app.>");
        assert_eq!(
            filter_subject("cdc.app", Some("public.orders")),
            "cdc.app.public.orders.>"
        );
        assert_eq!(
            filter_subject("cdc.app", Some("*.*.delete")),
            "cdc.app.*.*.delete"
        );
        assert_eq!(
            filter_subject("cdc.app", Some("public.>")),
            "cdc.app.public.>"
        );
        assert_eq!(
            filter_subject("cdc.app", Some("cdc.app.public.t.insert")),
            "cdc.app.public.t.insert"
        );
    }
}
