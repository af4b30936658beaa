//! The `[limits]` section: what happens to a message larger than the
//! server takes, where oversized bodies go, and how much retained WAL is
//! worth a warning.
//!
//! Owns the size syntax (`"1GiB"`, `"10GB"`, `"0"`). It only reads and
//! checks; the oversize policy is carried out by the publish path.

use serde::Deserialize;

use super::config_err;
use super::nats::bucket_name;
use crate::error::Result;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    on_oversize: Option<String>,
    object_store_bucket: Option<String>,
    wal_retained_warn: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OversizePolicy {
    Fail,
    Skip,
    ObjectStore,
}

/// The section's settings; `Config` keeps them as fields of its own.
pub(super) struct Limits {
    pub(super) on_oversize: OversizePolicy,
    pub(super) object_store_bucket: String,
    /// `None`: never warn.
    pub(super) wal_retained_warn: Option<u64>,
}

impl Limits {
    pub(super) fn from_raw(raw: RawLimits) -> Result<Limits> {
        let on_oversize = match raw.on_oversize.as_deref().unwrap_or("fail") {
            "fail" => OversizePolicy::Fail,
            "skip" => OversizePolicy::Skip,
            "object_store" => OversizePolicy::ObjectStore,
            _ => {
                return Err(config_err(
                    "limits.on_oversize is unknown: use \"fail\", \"skip\" or \"object_store\"",
                ));
            }
        };
        let object_store_bucket = bucket_name(
            raw.object_store_bucket,
            "walnats_oversize",
            "limits.object_store_bucket",
        )?;
        let wal_retained_warn = parse_bytes(raw.wal_retained_warn.as_deref().unwrap_or("1GiB"))
            .ok_or_else(|| {
                config_err(
                    "limits.wal_retained_warn must be a size like \"1GiB\", \"512MiB\", \"10GB\", or \"0\" (never warn)",
                )
            })?;
        Ok(Limits {
            on_oversize,
            object_store_bucket,
            wal_retained_warn: (wal_retained_warn > 0).then_some(wal_retained_warn),
        })
    }
}

/// `"1GiB"`, `"512MiB"`, `"64KiB"` (powers of 1024), `"10GB"`, `"500MB"`,
/// `"1kB"` (powers of 1000), `"1048576"` or `"1048576B"` (bytes).
pub(super) fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::super::tests::assert_refused;
    use super::*;

    fn limits(raw: RawLimits) -> Result<Limits> {
        Limits::from_raw(raw)
    }

    #[test]
    fn the_section_takes_its_values_and_defaults() {
        let l = limits(RawLimits::default()).unwrap();
        assert_eq!(l.on_oversize, OversizePolicy::Fail);
        assert_eq!(l.object_store_bucket, "walnats_oversize");
        assert_eq!(l.wal_retained_warn, Some(1 << 30));
        for (text, policy) in [
            ("skip", OversizePolicy::Skip),
            ("object_store", OversizePolicy::ObjectStore),
        ] {
            let on_oversize = Some(text.to_owned());
            let l = limits(RawLimits {
                on_oversize,
                ..RawLimits::default()
            })
            .unwrap();
            assert_eq!(l.on_oversize, policy);
        }
        let wal_retained_warn = Some("0".to_owned());
        let l = limits(RawLimits {
            wal_retained_warn,
            ..RawLimits::default()
        })
        .unwrap();
        assert_eq!(l.wal_retained_warn, None, "0: never warn");
    }

    #[test]
    fn section_mistakes_name_the_key_and_the_fix() {
        let raw = RawLimits::default;
        let text = |t: &str| Some(t.to_owned());
        #[rustfmt::skip]
        let cases = [
            (RawLimits { on_oversize: text("drop"), ..raw() }, "limits.on_oversize", "use \"fail\", \"skip\" or \"object_store\""),
            (RawLimits { object_store_bucket: text("a.b"), ..raw() }, "limits.object_store_bucket", "letters, digits, _ and -"),
            (RawLimits { wal_retained_warn: text("1 gig"), ..raw() }, "limits.wal_retained_warn", "a size like \"1GiB\""),
        ];
        for (raw, key, fix) in cases {
            assert_refused(limits(raw), key, fix);
        }
    }

    #[test]
    fn sizes_parse_with_their_units() {
        assert_eq!(parse_bytes("0"), Some(0));
        assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
        assert_eq!(parse_bytes("1gib"), Some(1 << 30));
        assert_eq!(parse_bytes("10GB"), Some(10_000_000_000));
        assert_eq!(parse_bytes("64KiB"), Some(65_536));
        assert_eq!(parse_bytes("1kB"), Some(1_000));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("4096B"), Some(4096));
        assert_eq!(parse_bytes("1 PiB"), None);
        assert_eq!(parse_bytes("GiB"), None);
        assert_eq!(parse_bytes("99999999999TiB"), None);
    }
}
