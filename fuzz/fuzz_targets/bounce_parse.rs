//! `bounce::parse` on arbitrary bytes: must not panic. Slow inputs show up as libFuzzer
//! timeouts (`-timeout=`) and in `-report_slow_units`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mailtrail::bounce::parse(data);
});
