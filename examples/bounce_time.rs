//! Measures the parse rate of `mailtrail::bounce::parse` over the files given: reads them
//! once, parses them all `--rounds N` times (default 5), prints one line with the files,
//! records and the best and first round's seconds. Used by `bench/bounce-eval`. With
//! `BOUNCE_TIME_PER_FILE=1` it also lists the slowest files (15, or `BOUNCE_TIME_TOP`).
//! Under callgrind, `--zero-before=bounce_time::warmed_up` counts only the rounds after the
//! first (no start-up, no lazily built regexes).
//!
//! `--mail-parser` times `mail_parser::MessageParser::default().parse` instead (every header
//! field parsed, every part decoded, nothing classified; "records" counts the parts): the cost
//! of reading the same files with the MIME library alone, the reference the bounce parser's
//! rate is bounded by while its MIME is `mail-parser`'s.
use std::time::Instant;

/// Called once, after the first round: a profiler can start counting here
/// (`valgrind --tool=callgrind --zero-before=bounce_time::warmed_up`), past the start-up and
/// the first round's lazily built regexes.
#[inline(never)]
fn warmed_up() {
    std::hint::black_box(());
}

fn main() {
    let mut rounds = 5usize;
    let mut mime_only = false;
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--mail-parser" {
            mime_only = true;
        } else if a == "--rounds" {
            rounds = args.next().and_then(|n| n.parse().ok()).unwrap_or(5).max(1);
        } else {
            paths.push(a);
        }
    }
    let files: Vec<Vec<u8>> = paths.iter().filter_map(|p| std::fs::read(p).ok()).collect();
    let classifier = mailtrail::bounce::Classifier::builtin();
    let mail_parser = mail_parser::MessageParser::default();
    let mut best = f64::MAX;
    let mut first = 0.0;
    let mut records = 0;
    for round in 0..rounds {
        let t = Instant::now();
        records = files
            .iter()
            .map(|f| {
                if mime_only {
                    mail_parser.parse(f).map_or(0, |m| m.parts.len())
                } else {
                    mailtrail::bounce::parse_with(f, classifier).len()
                }
            })
            .sum();
        let secs = t.elapsed().as_secs_f64();
        if round == 0 {
            first = secs;
            warmed_up();
        }
        best = best.min(secs);
    }
    println!(
        "files {} records {} best {:.6} first {:.6}",
        files.len(),
        records,
        best,
        first
    );
    if std::env::var_os("BOUNCE_TIME_PER_FILE").is_some() {
        let mut per: Vec<(f64, &String)> = files
            .iter()
            .zip(&paths)
            .map(|(f, p)| {
                let t = Instant::now();
                for _ in 0..20 {
                    let _ = mailtrail::bounce::parse_with(f, classifier);
                }
                (t.elapsed().as_secs_f64() / 20.0, p)
            })
            .collect();
        per.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (secs, p) in per.iter().take(
            std::env::var("BOUNCE_TIME_TOP")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(15),
        ) {
            println!("{:>9.1} us  {p}", secs * 1e6);
        }
    }
}
