//! Times the pure parse of every file given (read once up front), for profiling.
use std::time::Instant;
fn main() {
    let t = Instant::now();
    let c = mailtrail::bounce::Classifier::builtin();
    eprintln!("compile {:?}", t.elapsed());
    let files: Vec<Vec<u8>> = std::env::args().skip(1).filter_map(|p| std::fs::read(p).ok()).collect();
    for round in 0..20 {
        let t = Instant::now();
        let mut n = 0;
        for f in &files { n += mailtrail::bounce::parse_with(f, c).len(); }
        eprintln!("round {round}: {} files {} records {:?}", files.len(), n, t.elapsed());
    }
}
