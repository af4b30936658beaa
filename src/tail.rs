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

/// `--since`: a duration back from now (`90s`, `10m`, `2h`, `1d`) or an
/// RFC 3339 time (`2026-11-22T18:31:10Z`).
pub fn parse_since(s: &str, now: time::OffsetDateTime) -> Result<time::OffsetDateTime> {
    let bad = || {
        Error::new(
            Kind::Config,
            format!("--since {s:?}: use a duration like 90s, 10m, 2h, 1d, or an RFC 3339 time"),
        )
    };
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(t);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60).ok_or_else(bad)?,
        "h" => n.checked_mul(3600).ok_or_else(bad)?,
        "d" => n.checked_mul(86_400).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    now.checked_sub(time::Duration::seconds(secs))
        .ok_or_else(bad)
}

pub async fn tail(
    cfg: &Config,
    filter: Option<&str>,
    from_start: bool,
    since: Option<&str>,
    pretty: bool,
) -> Result<()> {
    let since = since
        .map(|s| parse_since(s, time::OffsetDateTime::now_utc()))
        .transpose()?;
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
            deliver_policy: match (since, from_start) {
                (Some(start_time), _) => DeliverPolicy::ByStartTime { start_time },
                (None, true) => DeliverPolicy::All,
                (None, false) => DeliverPolicy::New,
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
    fn since_takes_durations_and_rfc3339() {
        let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        assert_eq!(
            parse_since("90s", now).unwrap().unix_timestamp(),
            1_800_000_000 - 90
        );
        assert_eq!(
            parse_since("2h", now).unwrap().unix_timestamp(),
            1_800_000_000 - 7200
        );
        assert_eq!(
            parse_since("2026-11-22T18:31:10Z", now)
                .unwrap()
                .unix_timestamp(),
            1_795_372_270
        );
        for bad in ["", "10", "m", "10y", "yesterday", "99999999999999999999d"] {
            assert!(parse_since(bad, now).is_err(), "{bad:?}");
        }
    }

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
