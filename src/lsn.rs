//! Log sequence numbers and stream positions.
//!
//! Owns the `Lsn` newtype (printed `X/XXXXXXXX` as PostgreSQL does) and
//! `Position`, the unit of progress: (commit LSN, index of the change in its
//! transaction). A bare LSN is never a position: several changes share a
//! commit LSN. `Nats-Msg-Id` is derived from `Position` and nowhere else.

use std::fmt;
use std::str::FromStr;

/// A PostgreSQL WAL location. The `u64` stays private so that nobody mixes
/// it with counts or sequence numbers.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    pub const fn from_u64(v: u64) -> Lsn {
        Lsn(v)
    }

    pub const fn as_u64(self) -> u64 {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Appends `X/XXXXXXXX` (as `Display` prints it) without allocating:
    /// this runs several times per published message.
    pub fn write_to(self, out: &mut Vec<u8>) {
        self.each_ascii(|b| out.push(b));
    }

    /// As [`Lsn::write_to`], into a `String` (no UTF-8 check afterwards).
    pub fn push_to(self, out: &mut String) {
        self.each_ascii(|b| out.push(char::from(b)));
    }

    /// The bytes of `X/XXXXXXXX`, in order: ASCII hex digits and `/`.
    fn each_ascii(self, mut emit: impl FnMut(u8)) {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        fn hex32(v: u32, emit: &mut impl FnMut(u8)) {
            let mut started = false;
            for shift in (0..8).rev() {
                let d = ((v >> (shift * 4)) & 0xF) as usize;
                if d != 0 || started || shift == 0 {
                    started = true;
                    emit(HEX[d]);
                }
            }
        }
        hex32((self.0 >> 32) as u32, &mut emit);
        emit(b'/');
        hex32(self.0 as u32, &mut emit);
    }

    /// Bytes from `older` to `self`, zero when `older` is ahead.
    pub fn bytes_since(self, older: Lsn) -> u64 {
        self.0.saturating_sub(older.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected X/X in hexadecimal, e.g. 0/16B3748")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Lsn, ParseLsnError> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a published message stands in the change stream: the commit LSN of
/// its transaction and its 0-based index among the transaction's changes.
/// Ordered first by commit LSN (transactions arrive in commit order), then
/// by index.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Debug,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Position {
    pub commit_lsn: Lsn,
    pub seq: u32,
}

impl Position {
    pub const fn new(commit_lsn: Lsn, seq: u32) -> Position {
        Position { commit_lsn, seq }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prints_like_postgres() {
        assert_eq!(Lsn::from_u64(0x16B3748).to_string(), "0/16B3748");
        assert_eq!(Lsn::from_u64(0x1_0000_0000).to_string(), "1/0");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "g/0",
            "0/123456789",
            "0/-1",
            "0/1/2",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn positions_order_by_commit_then_seq() {
        let a = Position::new(Lsn::from_u64(10), 5);
        let b = Position::new(Lsn::from_u64(11), 0);
        let c = Position::new(Lsn::from_u64(11), 1);
        assert!(a < b && b < c);
    }

    proptest! {
        #[test]
        fn push_to_matches_display(v: u64) {
            let mut out = String::new();
            Lsn::from_u64(v).push_to(&mut out);
            prop_assert_eq!(out, Lsn::from_u64(v).to_string());
        }

        #[test]
        fn write_to_matches_display(v: u64) {
            let mut out = Vec::new();
            Lsn::from_u64(v).write_to(&mut out);
            prop_assert_eq!(String::from_utf8(out).unwrap(), Lsn::from_u64(v).to_string());
        }

        #[test]
        fn text_round_trips(v: u64) {
            let l = Lsn::from_u64(v);
            prop_assert_eq!(l.to_string().parse::<Lsn>(), Ok(l));
        }
    }
}
