//! `ReceiptId`: the id a client gets in `250 2.0.0 Ok: queued as <id>`, proof that a message
//! is durably stored. Time-ordered (UUIDv7 bits), printed as 26 Crockford base32 characters
//! (the ULID alphabet) so it sorts by time as text and survives case-folding in VERP addresses.

use std::fmt;
use std::str::FromStr;

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A time-ordered, printable, parseable message id. Ordering follows creation time
/// (millisecond precision, random within the same millisecond).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReceiptId(u128);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a receipt id: {0:?} (expected 26 characters of Crockford base32)")]
pub struct ParseReceiptError(pub String);

impl ReceiptId {
    /// A new id for the current time.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7().as_u128())
    }

    pub fn from_u128(v: u128) -> Self {
        Self(v)
    }

    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Milliseconds since the Unix epoch at which the id was made.
    pub fn unix_millis(self) -> u64 {
        (self.0 >> 80) as u64
    }
}

impl Default for ReceiptId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ReceiptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; 26];
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 125 - 5 * i as i32;
            let bits = if shift >= 0 {
                (self.0 >> shift) & 0x1f
            } else {
                (self.0 << (-shift)) & 0x1f
            };
            *slot = ALPHABET[bits as usize];
        }
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for ReceiptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReceiptId({self})")
    }
}

impl FromStr for ReceiptId {
    type Err = ParseReceiptError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseReceiptError(s.to_string());
        if s.len() != 26 {
            return Err(err());
        }
        let mut v: u128 = 0;
        for (i, c) in s.bytes().enumerate() {
            let d = decode_char(c).ok_or_else(err)? as u128;
            // The first character carries only 3 significant bits (26 * 5 = 130 > 128).
            if i == 0 && d > 7 {
                return Err(err());
            }
            v = (v << 5) | d;
        }
        Ok(Self(v))
    }
}

fn decode_char(c: u8) -> Option<u8> {
    let c = c.to_ascii_uppercase();
    let c = match c {
        b'O' => b'0',
        b'I' | b'L' => b'1',
        other => other,
    };
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

impl serde::Serialize for ReceiptId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        for _ in 0..1000 {
            let id = ReceiptId::new();
            let text = id.to_string();
            assert_eq!(text.len(), 26);
            assert_eq!(text.parse::<ReceiptId>().unwrap(), id);
            assert_eq!(text.to_lowercase().parse::<ReceiptId>().unwrap(), id);
        }
        let max = ReceiptId::from_u128(u128::MAX);
        assert_eq!(max.to_string().parse::<ReceiptId>().unwrap(), max);
        let zero = ReceiptId::from_u128(0);
        assert_eq!(zero.to_string(), "00000000000000000000000000");
    }

    #[test]
    fn text_order_follows_time() {
        let a = ReceiptId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = ReceiptId::new();
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now - b.unix_millis() < 5_000);
    }

    #[test]
    fn rejects_garbage() {
        assert!("".parse::<ReceiptId>().is_err());
        assert!("0123".parse::<ReceiptId>().is_err());
        assert!("U0000000000000000000000000".parse::<ReceiptId>().is_err());
        assert!("80000000000000000000000000".parse::<ReceiptId>().is_err());
        assert!("0000000000000000000000000!".parse::<ReceiptId>().is_err());
    }
}
