//! VERP envelope senders: `<local>+<receipt>-<rcpt index>-<mac>@<bounce domain>`, so a
//! bounce names the exact message and recipient it is about. `<mac>` is HMAC-SHA256 over
//! the receipt and index under a secret key, truncated to 40 bits and written as 8 lowercase
//! Crockford base32 characters: a forged bounce cannot mark someone else's mail bounced.
//! Decoding is case-insensitive (some MTAs fold the local part) and compares in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::receipt::ReceiptId;

type HmacSha256 = Hmac<Sha256>;

/// MAC length in bytes (40 bits) and in base32 characters.
const MAC_BYTES: usize = 5;
const MAC_CHARS: usize = 8;
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerpError {
    #[error("not an address at the bounce domain")]
    WrongDomain,
    #[error("local part does not start with the VERP prefix")]
    NotVerp,
    #[error("malformed VERP address: {0}")]
    Malformed(&'static str),
    #[error("VERP MAC does not verify (forged or altered address)")]
    BadMac,
}

/// What a verified VERP address identifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerpTag {
    pub receipt: ReceiptId,
    pub rcpt_index: u32,
}

fn mac_for(key: &[u8], receipt: ReceiptId, rcpt_index: u32) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts every key length"),
    };
    mac.update(receipt.to_string().as_bytes());
    mac.update(b"-");
    mac.update(rcpt_index.to_string().as_bytes());
    mac
}

fn base32(bytes: &[u8; MAC_BYTES]) -> String {
    let v = bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    (0..MAC_CHARS)
        .map(|i| {
            let shift = 5 * (MAC_CHARS - 1 - i);
            let idx = ((v >> shift) & 0x1f) as usize;
            char::from(ALPHABET.get(idx).copied().unwrap_or(b'0'))
        })
        .collect()
}

fn unbase32(s: &str) -> Option<[u8; MAC_BYTES]> {
    if s.len() != MAC_CHARS {
        return None;
    }
    let mut v = 0u64;
    for c in s.bytes() {
        let c = c.to_ascii_lowercase();
        let d = ALPHABET.iter().position(|&a| a == c)?;
        v = (v << 5) | d as u64;
    }
    let mut out = [0u8; MAC_BYTES];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = (v >> (8 * (MAC_BYTES - 1 - i))) as u8;
    }
    Some(out)
}

/// The VERP envelope sender for recipient `rcpt_index` of message `receipt`.
pub fn encode(
    key: &[u8],
    local: &str,
    domain: &str,
    receipt: ReceiptId,
    rcpt_index: u32,
) -> String {
    let tag = mac_for(key, receipt, rcpt_index).finalize().into_bytes();
    let mut truncated = [0u8; MAC_BYTES];
    for (slot, b) in truncated.iter_mut().zip(tag.iter()) {
        *slot = *b;
    }
    format!(
        "{local}+{}-{rcpt_index}-{}@{domain}",
        receipt.to_string().to_ascii_lowercase(),
        base32(&truncated)
    )
}

/// Decodes and verifies a VERP address (angle brackets allowed). Only addresses at
/// `domain` whose local part starts with `local+` are considered.
pub fn decode(key: &[u8], local: &str, domain: &str, address: &str) -> Result<VerpTag, VerpError> {
    let address = address.trim().trim_start_matches('<').trim_end_matches('>');
    let (lp, dom) = address.rsplit_once('@').ok_or(VerpError::WrongDomain)?;
    // `bounce.example.` (the root's dot) is the same domain, as the RCPT check takes it.
    if !dom.trim_end_matches('.').eq_ignore_ascii_case(domain) {
        return Err(VerpError::WrongDomain);
    }
    let (prefix, rest) = lp.split_once('+').ok_or(VerpError::NotVerp)?;
    if !prefix.eq_ignore_ascii_case(local) {
        return Err(VerpError::NotVerp);
    }
    let mut fields = rest.split('-');
    let (Some(r), Some(i), Some(m), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(VerpError::Malformed("expected <receipt>-<index>-<mac>"));
    };
    let receipt = r
        .parse::<ReceiptId>()
        .map_err(|_| VerpError::Malformed("receipt id"))?;
    if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) || (i.len() > 1 && i.starts_with('0'))
    {
        return Err(VerpError::Malformed("recipient index"));
    }
    let rcpt_index = i
        .parse::<u32>()
        .map_err(|_| VerpError::Malformed("recipient index"))?;
    let tag = unbase32(m).ok_or(VerpError::Malformed("mac"))?;
    mac_for(key, receipt, rcpt_index)
        .verify_truncated_left(&tag)
        .map_err(|_| VerpError::BadMac)?;
    Ok(VerpTag {
        receipt,
        rcpt_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"test key, 32 bytes long.........";

    fn sample() -> (ReceiptId, String) {
        let id = ReceiptId::from_u128(0x0192_3456_789a_bcde_f012_3456_789a_bcde);
        (id, encode(KEY, "bounces", "bounce.example.org", id, 3))
    }

    #[test]
    fn encodes_the_documented_shape() {
        let (id, addr) = sample();
        let (local, domain) = addr.rsplit_once('@').unwrap_or_default();
        assert_eq!(domain, "bounce.example.org");
        let parts: Vec<&str> = local.split(['+', '-']).collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], "bounces");
        assert_eq!(parts[1], id.to_string().to_ascii_lowercase());
        assert_eq!(parts[2], "3");
        assert_eq!(parts[3].len(), MAC_CHARS);
        assert!(parts[3].bytes().all(|b| ALPHABET.contains(&b)));
        assert!(local.len() <= 64);
    }

    #[test]
    fn round_trips_and_ignores_case_and_brackets() {
        let (id, addr) = sample();
        let want = Ok(VerpTag {
            receipt: id,
            rcpt_index: 3,
        });
        assert_eq!(decode(KEY, "bounces", "bounce.example.org", &addr), want);
        assert_eq!(
            decode(
                KEY,
                "bounces",
                "bounce.example.org",
                &addr.to_ascii_uppercase()
            ),
            want
        );
        assert_eq!(
            decode(KEY, "Bounces", "BOUNCE.example.org", &format!("<{addr}>")),
            want
        );
        assert_eq!(
            decode(KEY, "bounces", "bounce.example.org", &format!("{addr}.")),
            want,
            "the root's dot"
        );
    }

    #[test]
    fn rejects_forged_macs_and_other_keys() {
        let (id, addr) = sample();
        // Same receipt, another recipient index, MAC copied from index 3.
        let forged = addr.replacen("-3-", "-4-", 1);
        assert_eq!(
            decode(KEY, "bounces", "bounce.example.org", &forged),
            Err(VerpError::BadMac)
        );
        let other = encode(b"another key", "bounces", "bounce.example.org", id, 3);
        assert_eq!(
            decode(KEY, "bounces", "bounce.example.org", &other),
            Err(VerpError::BadMac)
        );
        // One MAC character changed.
        let mut bytes = addr.into_bytes();
        let at = bytes.iter().position(|&b| b == b'@').unwrap_or(0);
        if let Some(c) = bytes.get_mut(at - 1) {
            *c = if *c == b'a' { b'b' } else { b'a' };
        }
        let garbled = String::from_utf8(bytes).unwrap_or_default();
        assert_eq!(
            decode(KEY, "bounces", "bounce.example.org", &garbled),
            Err(VerpError::BadMac)
        );
    }

    #[test]
    fn rejects_truncated_and_garbled_addresses() {
        let (_, addr) = sample();
        let d = |a: &str| decode(KEY, "bounces", "bounce.example.org", a);
        let (local, _) = addr.rsplit_once('@').unwrap_or_default();
        let short_mac = format!("{}@bounce.example.org", &local[..local.len() - 1]);
        assert_eq!(d(&short_mac), Err(VerpError::Malformed("mac")));
        let no_mac = format!(
            "{}@bounce.example.org",
            &local[..local.rfind('-').unwrap_or(0)]
        );
        assert!(matches!(d(&no_mac), Err(VerpError::Malformed(_))));
        assert!(matches!(
            d("bounces+xyz-1-abcdefgh@bounce.example.org"),
            Err(VerpError::Malformed("receipt id"))
        ));
        assert_eq!(d("bounces@bounce.example.org"), Err(VerpError::NotVerp));
        assert_eq!(
            d("someone+x-1-y@bounce.example.org"),
            Err(VerpError::NotVerp)
        );
        assert_eq!(
            d(&addr.replace("bounce.example.org", "example.net")),
            Err(VerpError::WrongDomain)
        );
        assert_eq!(d("no-at-sign"), Err(VerpError::WrongDomain));
        assert_eq!(d(""), Err(VerpError::WrongDomain));
        let bad_index = addr.replacen("-3-", "-x-", 1);
        assert_eq!(d(&bad_index), Err(VerpError::Malformed("recipient index")));
        let leading_zero = addr.replacen("-3-", "-03-", 1);
        assert_eq!(
            d(&leading_zero),
            Err(VerpError::Malformed("recipient index"))
        );
        let extra = addr.replacen('@', "-zz@", 1);
        assert!(matches!(d(&extra), Err(VerpError::Malformed(_))));
    }

    #[test]
    fn base32_round_trips() {
        for bytes in [[0u8; 5], [255; 5], [1, 2, 3, 4, 5]] {
            assert_eq!(unbase32(&base32(&bytes)), Some(bytes));
        }
        assert_eq!(unbase32("ABCDEFGH"), unbase32("abcdefgh"));
        assert_eq!(unbase32("abcdefgu"), None);
    }
}
