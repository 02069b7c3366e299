//! The DATA / BDAT content scanner on arbitrary bytes, split at arbitrary read boundaries:
//! must not panic, and the result must not depend on where the reads were split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailtrail::smtp::content::{ContentMemory, ContentScanner, Framing};

/// `memory`: the content memory's size (below the size limit: `NoMemory` is reached first,
/// wherever the reads split the content).
fn scan(
    framing: Framing,
    memory: usize,
    data: &[u8],
    cuts: &[u8],
) -> (usize, bool, Result<Vec<u8>, String>) {
    let mut s = ContentScanner::new(framing, 4096, 200, ContentMemory::new(memory));
    let mut used_total = 0;
    let mut done = false;
    let mut rest = data;
    let mut cut = cuts.iter().cycle();
    while !rest.is_empty() && !done {
        let n = if cuts.is_empty() {
            rest.len()
        } else {
            (*cut.next().unwrap() as usize % 32 + 1).min(rest.len())
        };
        let (used, end) = s.ingest(&rest[..n]);
        assert!(used <= n);
        if !end {
            assert_eq!(used, n);
        }
        used_total += used;
        done = end;
        rest = &rest[used..];
    }
    (used_total, done, s.finish().map_err(|e| format!("{e:?}")))
}

fuzz_target!(|input: &[u8]| {
    let Some((&split, rest)) = input.split_first() else {
        return;
    };
    let (cuts, data) = rest.split_at((split as usize % 16).min(rest.len()));
    // The high bit of the split byte: content memory for 1,000 bytes only.
    let memory = if split & 0x80 != 0 { 1000 } else { usize::MAX };
    for framing in [Framing::DotTerminated, Framing::Chunked] {
        let whole = scan(framing, memory, data, &[]);
        let pieces = scan(framing, memory, data, cuts);
        assert_eq!(whole, pieces, "{framing:?}");
        if let (_, _, Ok(body)) = &whole {
            assert!(body.len() <= 4096 + 2);
        }
    }
});
