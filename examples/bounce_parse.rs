//! Stand-in for `mailtrail bounce parse` until main.rs wires it:
//! `cargo run --example bounce_parse -- [--json] [--rules FILE] FILE...`

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut json = false;
    let mut rules = None;
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--rules" => rules = args.next(),
            _ => paths.push(PathBuf::from(a)),
        }
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match rules {
        Some(path) => {
            let text = std::fs::read_to_string(&path)?;
            let classifier = mailtrail::bounce::Classifier::with_user_rules(&text)?;
            mailtrail::cli::bounce_parse::run_bounce_parse_with(&paths, json, &classifier, &mut out)
        }
        None => mailtrail::cli::bounce_parse::run_bounce_parse(&paths, json, &mut out),
    }
}
