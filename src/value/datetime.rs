//! date, timestamp and timestamptz in PostgreSQL's ISO output → the
//! contract's JSON strings.
//!
//! Input is what `date_out`, `timestamp_out` and `timestamptz_out` print
//! with `DateStyle=ISO`:
//! `YYYY-MM-DD`, `YYYY-MM-DD HH:MM:SS[.f…]`, `YYYY-MM-DD HH:MM:SS[.f…]±HH[:MM[:SS]]`,
//! each optionally followed by ` BC`, or `infinity` / `-infinity`. The year
//! has at least four digits and more past 9999.
//!
//! Output:
//! - date `"2026-11-22"`, timestamp `"2026-11-22T18:31:10.123456"`,
//!   timestamptz `"2026-11-22T18:31:10.123456Z"`: the space becomes `T`,
//!   the fraction is kept exactly as printed (0 to 6 digits; trailing zeros
//!   were already dropped by PostgreSQL), and years past 9999 keep all
//!   their digits (`"12345-01-01"`, not RFC 3339 but the only faithful
//!   spelling).
//! - BC dates use ISO 8601 astronomical year numbering, at least four
//!   digits, with a `-` below year 0: `0044-03-15 BC` → `"-0043-03-15"`,
//!   `0001-01-01 BC` → `"0000-01-01"`. It is reversible (year `-N` is
//!   `N+1 BC`), sorts with AD years on the year, and is what ISO 8601
//!   parsers that accept expanded years expect.
//! - `infinity` / `-infinity` are kept as those strings.
//! - timestamptz is always written in UTC with `Z`. walnats sets
//!   `TimeZone=UTC`, so PostgreSQL prints `+00`; any other offset (a
//!   misconfigured session, or a historical zone's `+00:19:32`) is
//!   converted to UTC here rather than written as an offset, since RFC 3339
//!   cannot spell offsets with seconds and the contract promises UTC.
//!
//! It never guesses: anything else (another DateStyle, a time zone name, an
//! impossible date) is a [`ValueError`] naming the type, never the value.

use super::ValueError;
use super::json_str::write_plain_json_str;

/// Which of the three types a text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DateKind {
    Date,
    Timestamp,
    Timestamptz,
}

impl DateKind {
    fn name(self) -> &'static str {
        match self {
            DateKind::Date => "date",
            DateKind::Timestamp => "timestamp",
            DateKind::Timestamptz => "timestamptz",
        }
    }
}

const SECS_PER_DAY: i64 = 86_400;

/// One parsed value; byte slices point into the input.
struct Parsed<'a> {
    /// The year digits as printed (AD numbering, never 0).
    year_text: &'a [u8],
    year: i64,
    month: u8,
    day: u8,
    /// `HH:MM:SS` as printed, with the parsed fields.
    clock: Option<(&'a [u8], u8, u8, u8)>,
    /// The fraction's digits without the dot; empty when none.
    frac: &'a [u8],
    /// The UTC offset in seconds east of Greenwich.
    offset: i64,
    bc: bool,
}

/// Appends the JSON string for one date, timestamp or timestamptz.
pub(crate) fn write_datetime(
    kind: DateKind,
    text: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    if text == b"infinity" || text == b"-infinity" {
        write_plain_json_str(text, out);
        return Ok(());
    }
    let p = parse(kind, text).map_err(|problem| ValueError::new(kind.name(), problem))?;
    out.push(b'"');
    if !p.bc && p.offset == 0 {
        // The common case: copy PostgreSQL's digits.
        out.extend_from_slice(p.year_text);
        out.push(b'-');
        push_padded(out, u64::from(p.month), 2);
        out.push(b'-');
        push_padded(out, u64::from(p.day), 2);
        if let Some((clock, ..)) = p.clock {
            out.push(b'T');
            out.extend_from_slice(clock);
        }
    } else {
        // 1 BC is year 0, 2 BC is year -1.
        let astro = if p.bc { 1 - p.year } else { p.year };
        match p.clock {
            None => push_date(out, astro, p.month, p.day),
            Some((_, h, m, s)) => {
                let local = days_from_civil(astro, p.month, p.day) * SECS_PER_DAY
                    + i64::from(h) * 3600
                    + i64::from(m) * 60
                    + i64::from(s);
                let utc = local - p.offset;
                let (y, mo, d) = civil_from_days(utc.div_euclid(SECS_PER_DAY));
                let secs = utc.rem_euclid(SECS_PER_DAY);
                push_date(out, y, mo, d);
                out.push(b'T');
                push_clock(out, secs);
            }
        }
    }
    if !p.frac.is_empty() {
        out.push(b'.');
        out.extend_from_slice(p.frac);
    }
    if kind == DateKind::Timestamptz {
        out.push(b'Z');
    }
    out.push(b'"');
    Ok(())
}

fn parse(kind: DateKind, text: &[u8]) -> Result<Parsed<'_>, &'static str> {
    let (body, bc) = match text.strip_suffix(b" BC") {
        Some(body) => (body, true),
        None => (text, false),
    };
    let mut c = Cursor { s: body, i: 0 };
    let year_text = c
        .digits(4, 9)
        .ok_or("expected a year of 4 to 9 digits (DateStyle must be ISO)")?;
    let year = parse_u64(year_text)
        .and_then(|y| i64::try_from(y).ok())
        .ok_or("bad year")?;
    if year == 0 {
        return Err("year 0 does not exist");
    }
    c.expect(b'-').ok_or("expected '-' after the year")?;
    let month = c.two_digits().ok_or("expected a two-digit month")?;
    c.expect(b'-').ok_or("expected '-' after the month")?;
    let day = c.two_digits().ok_or("expected a two-digit day")?;
    let astro = if bc { 1 - year } else { year };
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(astro, month) {
        return Err("no such calendar day");
    }
    let mut parsed = Parsed {
        year_text,
        year,
        month,
        day,
        clock: None,
        frac: b"",
        offset: 0,
        bc,
    };
    if kind != DateKind::Date {
        c.expect(b' ').ok_or("expected a time after the date")?;
        let start = c.i;
        let h = c.two_digits().ok_or("expected a two-digit hour")?;
        c.expect(b':').ok_or("expected ':' after the hour")?;
        let m = c.two_digits().ok_or("expected two-digit minutes")?;
        c.expect(b':').ok_or("expected ':' after the minutes")?;
        let s = c.two_digits().ok_or("expected two-digit seconds")?;
        if h > 23 || m > 59 || s > 59 {
            return Err("time of day out of range");
        }
        parsed.clock = Some((body.get(start..c.i).unwrap_or_default(), h, m, s));
        if c.peek() == Some(b'.') {
            c.i += 1;
            parsed.frac = c.digits(1, usize::MAX).ok_or("expected digits after '.'")?;
        }
        if kind == DateKind::Timestamptz {
            parsed.offset = parse_offset(&mut c)?;
        }
    }
    if c.i != body.len() {
        return Err("unexpected characters after the value");
    }
    Ok(parsed)
}

/// `±HH[:MM[:SS]]` → seconds east of UTC.
fn parse_offset(c: &mut Cursor<'_>) -> Result<i64, &'static str> {
    let sign = match c.peek() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Err("expected a numeric UTC offset (DateStyle must be ISO)"),
    };
    c.i += 1;
    let h = c.two_digits().ok_or("expected two-digit offset hours")?;
    let mut secs = i64::from(h) * 3600;
    for unit in [60, 1] {
        if c.peek() != Some(b':') {
            break;
        }
        c.i += 1;
        let v = c
            .two_digits()
            .ok_or("expected two-digit offset minutes or seconds")?;
        if v > 59 {
            return Err("offset out of range");
        }
        secs += i64::from(v) * unit;
    }
    Ok(sign * secs)
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        (self.peek() == Some(b)).then(|| self.i += 1)
    }

    /// Between `min` and `max` ASCII digits.
    fn digits(&mut self, min: usize, max: usize) -> Option<&'a [u8]> {
        let rest = self.s.get(self.i..)?;
        let n = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if n < min || n > max {
            return None;
        }
        self.i += n;
        rest.get(..n)
    }

    fn two_digits(&mut self) -> Option<u8> {
        let d = self.s.get(self.i..self.i + 2)?;
        let (hi, lo) = (*d.first()?, *d.get(1)?);
        if !hi.is_ascii_digit() || !lo.is_ascii_digit() {
            return None;
        }
        self.i += 2;
        Some((hi - b'0') * 10 + (lo - b'0'))
    }
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &b| {
        acc.checked_mul(10)?
            .checked_add(u64::from(b.checked_sub(b'0')?))
    })
}

/// Proleptic Gregorian, astronomical year (PostgreSQL's calendar too).
fn days_in_month(year: i64, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        _ => 28,
    }
}

/// Howard Hinnant's days_from_civil: days since 1970-01-01.
fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Howard Hinnant's civil_from_days: the inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    // Both are small and positive by construction (1..=31, 1..=12).
    let d = u8::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u8::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `YYYY-MM-DD` with an astronomical year: at least four digits, `-`
/// below zero.
fn push_date(out: &mut Vec<u8>, year: i64, month: u8, day: u8) {
    if year < 0 {
        out.push(b'-');
    }
    push_padded(out, year.unsigned_abs(), 4);
    out.push(b'-');
    push_padded(out, u64::from(month), 2);
    out.push(b'-');
    push_padded(out, u64::from(day), 2);
}

/// `HH:MM:SS` from seconds into the day.
fn push_clock(out: &mut Vec<u8>, secs: i64) {
    let secs = secs.unsigned_abs();
    push_padded(out, secs / 3600, 2);
    out.push(b':');
    push_padded(out, secs / 60 % 60, 2);
    out.push(b':');
    push_padded(out, secs % 60, 2);
}

/// Decimal digits of `n`, zero-padded to at least `width` (at most 20).
fn push_padded(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut written = 0;
    for slot in buf.iter_mut().rev() {
        if n == 0 && written >= width {
            break;
        }
        *slot = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
        written += 1;
    }
    out.extend_from_slice(buf.get(buf.len() - written..).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(kind: DateKind, text: &str) -> Result<String, ValueError> {
        let mut out = Vec::new();
        write_datetime(kind, text.as_bytes(), &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn offsets_other_than_utc_are_converted_to_utc() {
        use DateKind::Timestamptz as Tz;
        assert_eq!(
            w(Tz, "2026-11-22 18:31:10.5+05:30").unwrap(),
            "\"2026-11-22T13:01:10.5Z\""
        );
        assert_eq!(
            w(Tz, "2026-01-01 00:30:00+01").unwrap(),
            "\"2025-12-31T23:30:00Z\""
        );
        assert_eq!(
            w(Tz, "2026-12-31 23:30:00-01").unwrap(),
            "\"2027-01-01T00:30:00Z\""
        );
        // Amsterdam's local mean time before 1937, as PG15 prints it there.
        assert_eq!(
            w(Tz, "1900-01-01 00:00:00+00:19:32").unwrap(),
            "\"1899-12-31T23:40:28Z\""
        );
        // Across year 0 and into larger years.
        assert_eq!(
            w(Tz, "0001-01-01 00:30:00+01").unwrap(),
            "\"0000-12-31T23:30:00Z\""
        );
        assert_eq!(
            w(Tz, "0001-01-01 00:30:00+01 BC").unwrap(),
            "\"-0001-12-31T23:30:00Z\""
        );
        assert_eq!(
            w(Tz, "9999-12-31 23:30:00-01").unwrap(),
            "\"10000-01-01T00:30:00Z\""
        );
        assert_eq!(
            w(Tz, "2024-02-29 12:00:00-00:00:01").unwrap(),
            "\"2024-02-29T12:00:01Z\""
        );
        assert_eq!(
            w(Tz, "2024-02-29 12:00:00+00:00").unwrap(),
            "\"2024-02-29T12:00:00Z\""
        );
    }

    #[test]
    fn leap_days_follow_the_proleptic_gregorian_calendar() {
        use DateKind::Date;
        assert!(w(Date, "2000-02-29").is_ok());
        assert!(w(Date, "1900-02-29").is_err());
        assert!(w(Date, "2023-02-29").is_err());
        assert!(w(Date, "2024-04-31").is_err());
        // 1 BC and 5 BC are leap years (astronomical 0 and -4).
        assert_eq!(w(Date, "0001-02-29 BC").unwrap(), "\"0000-02-29\"");
        assert_eq!(w(Date, "0005-02-29 BC").unwrap(), "\"-0004-02-29\"");
        assert!(w(Date, "0002-02-29 BC").is_err());
    }

    #[test]
    fn other_spellings_are_refused() {
        use DateKind::*;
        for (k, t) in [
            (Date, ""),
            (Date, "22/11/2026"),
            (Date, "11-22-2026"),
            (Date, "Sun Nov 22 2026"),
            (Date, "26-11-22"),
            (Date, "2026-11-22 "),
            (Date, "2026-11-22 AD"),
            (Date, "0000-01-01"),
            (Date, "2026-13-01"),
            (Date, "2026-00-01"),
            (Date, "2026-1-01"),
            (Date, "Infinity"),
            (Date, "2026-11-22 BC BC"),
            (Timestamp, "2026-11-22"),
            (Timestamp, "2026-11-22T18:31:10"),
            (Timestamp, "2026-11-22 18:31"),
            (Timestamp, "2026-11-22 24:00:00"),
            (Timestamp, "2026-11-22 18:60:00"),
            (Timestamp, "2026-11-22 18:31:60"),
            (Timestamp, "2026-11-22 18:31:10."),
            (Timestamp, "2026-11-22 18:31:10+00"),
            (Timestamptz, "2026-11-22 18:31:10"),
            (Timestamptz, "2026-11-22 18:31:10 UTC"),
            (Timestamptz, "2026-11-22 13:31:10.5 EST"),
            (Timestamptz, "2026-11-22 18:31:10+0"),
            (Timestamptz, "2026-11-22 18:31:10+00:60"),
            (Timestamptz, "2026-11-22 18:31:10+00:00:00:00"),
        ] {
            let e = w(k, t).expect_err(t);
            assert_eq!(e.type_name(), k.name());
        }
    }

    #[test]
    fn civil_days_round_trip() {
        for z in (-2_500_000_000i64..2_500_000_000).step_by(9_999_991) {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(-719_528), (0, 1, 1));
    }

    #[test]
    fn padding() {
        let mut out = Vec::new();
        push_padded(&mut out, 0, 4);
        push_padded(&mut out, 7, 2);
        push_padded(&mut out, 12345, 4);
        push_padded(&mut out, u64::MAX, 2);
        assert_eq!(out, b"0000071234518446744073709551615");
    }

    proptest! {
        /// Any instant PostgreSQL can hold, printed as PostgreSQL prints it
        /// (with an arbitrary offset), comes out as the same instant in UTC.
        #[test]
        fn any_timestamptz_is_the_same_instant_in_utc(
            // 4714-11-24 BC (astronomical -4713) up to 294277-01-01.
            secs in days_from_civil(-4713, 11, 24) * SECS_PER_DAY..days_from_civil(294_277, 1, 1) * SECS_PER_DAY,
            off in -15i64 * 3600..=15 * 3600,
            frac in "[0-9]{0,6}",
        ) {
            let local = secs + off;
            let (y, m, d) = civil_from_days(local.div_euclid(SECS_PER_DAY));
            let (pg_year, bc) = if y <= 0 { (1 - y, " BC") } else { (y, "") };
            let tod = local.rem_euclid(SECS_PER_DAY);
            let sign = if off < 0 { '-' } else { '+' };
            let a = off.abs();
            let mut offset = format!("{sign}{:02}", a / 3600);
            if a % 3600 != 0 { offset += &format!(":{:02}", a / 60 % 60); }
            if a % 60 != 0 { offset += &format!(":{:02}", a % 60); }
            let dot = if frac.is_empty() { "" } else { "." };
            let text = format!(
                "{pg_year:04}-{m:02}-{d:02} {:02}:{:02}:{:02}{dot}{frac}{offset}{bc}",
                tod / 3600, tod / 60 % 60, tod % 60
            );
            let got = w(DateKind::Timestamptz, &text).unwrap();
            let (uy, um, ud) = civil_from_days(secs.div_euclid(SECS_PER_DAY));
            let us = secs.rem_euclid(SECS_PER_DAY);
            let year = if uy < 0 { format!("-{:04}", -uy) } else { format!("{uy:04}") };
            let want = format!(
                "\"{year}-{um:02}-{ud:02}T{:02}:{:02}:{:02}{dot}{frac}Z\"",
                us / 3600, us / 60 % 60, us % 60
            );
            prop_assert_eq!(got, want, "{}", text);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            for k in [DateKind::Date, DateKind::Timestamp, DateKind::Timestamptz] {
                let mut out = Vec::new();
                if write_datetime(k, &b, &mut out).is_ok() {
                    prop_assert!(serde_json::from_slice::<String>(&out).is_ok());
                }
            }
        }

        #[test]
        fn near_misses_never_panic(s in "[0-9]{1,10}-[0-9]{1,3}-[0-9]{1,3}( [0-9]{1,3}:[0-9]{1,3}:[0-9]{1,3}(\\.[0-9]{0,8})?([+-][0-9]{1,2}(:[0-9]{1,2}){0,3})?)?( BC)?") {
            for k in [DateKind::Date, DateKind::Timestamp, DateKind::Timestamptz] {
                let mut out = Vec::new();
                if write_datetime(k, s.as_bytes(), &mut out).is_ok() {
                    prop_assert!(serde_json::from_slice::<String>(&out).is_ok());
                }
            }
        }
    }
}
