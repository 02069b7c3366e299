//! The outbound side's reply reader (`delivery::reply::ReplyParser`) on arbitrary bytes fed
//! in arbitrary pieces, and the 8BITMIME downgrade (`delivery::downgrade::to_7bit`) on the
//! same bytes as a message: a receiving server and a submitted message are both hostile.
//! Neither may panic; the reader keeps its memory bounds and its verdict does not depend on
//! how the bytes were split. The same holds for an EHLO reply and the extensions read from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailtrail::delivery::downgrade::{max_size, to_7bit};
use mailtrail::delivery::reply::{MAX_LINE, ReplyParser};

/// Feeds `data` in pieces of `step` bytes to parsers `new` makes; every reply parsed (with
/// the EHLO extensions read from it), then how it ended.
fn replies(data: &[u8], step: usize, new: fn() -> ReplyParser) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    let mut parser = new();
    let mut pending: Vec<u8> = Vec::new();
    for piece in data.chunks(step.max(1)) {
        pending.extend_from_slice(piece);
        loop {
            match parser.feed(&pending) {
                Ok((used, Some(r))) => {
                    let caps = parser.capabilities();
                    out.push(format!(
                        "{} {:?} {} {:x} {:x} {}",
                        r.code,
                        r.enhanced_status,
                        r.text,
                        caps.capabilities,
                        caps.auth_mechanisms,
                        caps.size
                    ));
                    pending.drain(..used);
                    parser = new();
                }
                Ok((used, None)) => {
                    pending.drain(..used);
                    break;
                }
                Err(_) => return (out, true),
            }
        }
        assert!(pending.len() <= MAX_LINE + step);
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let step = usize::from(data.first().copied().unwrap_or(1)) + 1;
    for new in [
        ReplyParser::default as fn() -> ReplyParser,
        ReplyParser::ehlo,
    ] {
        let whole = replies(data, data.len().max(1), new);
        let split = replies(data, step, new);
        assert_eq!(whole, split, "the split changed the replies");
    }
    // The conversion stays within its bound however many parts the input has.
    assert!(to_7bit(data).len() <= max_size(data.len()));
});
