//! Random identifiers nobody can guess: the nonce of a `walnats snapshot`
//! request, the secret in walnats' slot-lock key, a session's watermark
//! id. 128 bits from the operating system, as 32 lower-case hex digits.

use crate::error::{Error, Kind, Result};

/// A nonce: 32 lower-case hex digits (128 random bits).
pub fn new() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| {
        Error::new(
            Kind::Io,
            format!("no randomness from the OS for a nonce: {e}"),
        )
    })?;
    let mut s = String::with_capacity(32);
    for x in b {
        s.push(char::from(b"0123456789abcdef"[usize::from(x >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(x & 15)]));
    }
    Ok(s)
}
