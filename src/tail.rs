//! `walnats tail`: an ordered, ephemeral consumer that prints events for a
//! human. Read-only: it never acknowledges, deletes or publishes anything.
//!
//! What it prints was written by others (any database user can put bytes
//! into a `_message` body or a text column): no byte of it reaches the
//! terminal as a control. Escape sequences (colours, cursor moves, OSC 52
//! clipboard writes, window titles), bidirectional overrides and bytes
//! that are not UTF-8 are printed escaped, one message per line.

use std::io::Write;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use futures::StreamExt;

use crate::config::Config;
use crate::connect;
use crate::error::{Error, Kind, Result};

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
    let (js, prefix, stream_name) = connect::nats_only(cfg).await?;
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
            Ok(v) if pretty => {
                printable_json(&serde_json::to_string_pretty(&v).unwrap_or_default())
            }
            Ok(v) => printable_json(&v.to_string()),
            Err(_) => printable_bytes(&m.payload),
        };
        let subject = printable_bytes(m.subject.as_bytes());
        if writeln!(out, "{seq} {subject} {body}").is_err() {
            // stdout closed (e.g. piped into head): done.
            return Ok(());
        }
        let _ = out.flush();
    }
    Ok(())
}

/// Characters a terminal acts on or that change how text around them
/// reads: C0 and C1 controls, DEL, zero-width and bidirectional marks.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        )
}

/// JSON as serde_json wrote it, which escapes C0 controls in strings but
/// not DEL, C1 controls or bidirectional marks: those become `\uXXXX`,
/// which reads back as the same JSON. Newlines outside strings (pretty
/// output) stay.
fn printable_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c != '\n' && is_unsafe(c) {
            // Every unsafe character is in the Basic Multilingual Plane.
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// A body that is not JSON (a `_message`, or anything else in the stream),
/// on one line: valid UTF-8 text as it is, `\` doubled, `\n` `\r` `\t`
/// and other controls as `\xNN` or `\u{NNNN}`, bytes that are not UTF-8 as
/// `\xNN`.
fn printable_bytes(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if is_unsafe(c) && u32::from(c) < 0x80 => {
                    let _ = write!(out, "\\x{:02x}", u32::from(c));
                }
                c if is_unsafe(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
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

    /// No character a terminal would act on survives.
    fn inert(s: &str) -> bool {
        !s.chars().any(|c| c != '\n' && is_unsafe(c))
    }

    #[test]
    fn raw_bodies_print_escaped_on_one_line() {
        // Colour, OSC 52 (writes the clipboard), a title, 8-bit CSI.
        let hostile =
            b"a\x1b[31mred\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07\x1b]0;title\x1b\\\xc2\x9b2J\x7f";
        let p = printable_bytes(hostile);
        assert_eq!(
            p,
            "a\\x1b[31mred\\x1b]52;c;Y3VybCBldmlsIHwgc2g=\\x07\\x1b]0;title\\x1b\\\\\\u{9b}2J\\x7f"
        );
        assert!(inert(&p));
        assert_eq!(printable_bytes(b"line\nnext\r\tx"), "line\\nnext\\r\\tx");
        // Not UTF-8: each bad byte escaped, the good text kept.
        assert_eq!(
            printable_bytes(b"caf\xe9 \xff\xfe ok \xc3\xa9"),
            "caf\\xe9 \\xff\\xfe ok \u{e9}"
        );
        // A backslash is doubled, so that `\x1b` typed as text differs
        // from an escaped ESC.
        assert_eq!(printable_bytes(b"\\x1b"), "\\\\x1b");
        // Bidirectional overrides (text that reads other than it is).
        assert_eq!(printable_bytes("a\u{202e}b".as_bytes()), "a\\u{202e}b");
        assert_eq!(printable_bytes(b""), "");
    }

    #[test]
    fn json_bodies_keep_their_json_and_lose_their_controls() {
        let payload = r#"{"s":"\u001b]52;c;eA==\u0007\u007f\u009b\u202ex"}"#;
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        for text in [v.to_string(), serde_json::to_string_pretty(&v).unwrap()] {
            let p = printable_json(&text);
            assert!(inert(&p), "{p:?}");
            // Still JSON, and the same JSON.
            let back: serde_json::Value = serde_json::from_str(&p).unwrap();
            assert_eq!(back, v);
        }
        assert_eq!(
            printable_json(&v.to_string()),
            "{\"s\":\"\\u001b]52;c;eA==\\u0007\\u007f\\u009b\\u202ex\"}"
        );
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
