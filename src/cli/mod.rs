//! Command-line subcommands. `main.rs` parses arguments with clap into a [`Request`]; this
//! module loads the config, opens what the command needs and prints the result.

pub mod bounce_parse;
pub mod log;
pub mod queue;
pub mod serve;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::config::Config;
use crate::receipt::ReceiptId;
use crate::store::Store;

/// One parsed command line.
pub enum Request {
    Serve,
    Log(log::LogArgs),
    QueueList {
        json: bool,
    },
    QueueRetry {
        receipt: Option<String>,
        all: bool,
    },
    QueueDelete {
        receipt: String,
    },
    BounceParse {
        files: Vec<PathBuf>,
        json: bool,
    },
    BounceIngest {
        files: Vec<PathBuf>,
    },
    Bounces {
        address: Option<String>,
        reason: Option<String>,
        unhandled: bool,
        first: bool,
        json: bool,
        limit: usize,
    },
    BounceHandle {
        id: i64,
        by: Option<String>,
    },
    BounceUnhandle {
        id: i64,
    },
    SuppressList {
        json: bool,
    },
    SuppressAdd {
        address: String,
        reason: String,
    },
    SuppressRemove {
        address: String,
    },
    SuppressCheck {
        address: String,
    },
    HashPassword,
}

pub fn run(config_path: Option<&Path>, request: Request) -> anyhow::Result<ExitCode> {
    // Commands that need no config.
    match &request {
        Request::HashPassword => return hash_password(),
        Request::BounceParse { .. } => {}
        _ => {}
    }
    let config = Config::load(config_path)?;
    if let Request::Serve = request {
        return serve::serve(config);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run_store_command(config, request))
}

fn hash_password() -> anyhow::Result<ExitCode> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        anyhow::bail!("empty password on stdin");
    }
    println!("{}", crate::smtp::auth::hash_password(password)?);
    Ok(ExitCode::SUCCESS)
}

fn parse_receipt(text: &str) -> anyhow::Result<ReceiptId> {
    text.trim()
        .parse::<ReceiptId>()
        .map_err(anyhow::Error::from)
}

/// The writable store, for commands that change something. Refuses to create a database
/// where none exists (a wrong --config would otherwise start an empty one).
fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    if !config.db_path().exists() {
        anyhow::bail!(
            "no database at {} (has `mailtrail serve` run with this data_dir?)",
            config.db_path().display()
        );
    }
    Ok(crate::store::sqlite::open(config)?)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn run_store_command(config: Config, request: Request) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match request {
        Request::Log(args) => {
            let json = args.json;
            let query = log::query(&args, chrono::Utc::now())?;
            let reader = crate::store::sqlite::open_read_only(&config)?;
            let messages = reader.log(&query)?;
            if messages.is_empty() && !json {
                writeln!(out, "no messages for {}", args.key)?;
            }
            out.write_all(log::render(&messages, json).as_bytes())?;
        }
        Request::QueueList { json } => {
            let reader = crate::store::sqlite::open_read_only(&config)?;
            let entries = reader.queue_list()?;
            let text = if json {
                queue::render_list_json(&entries)
            } else {
                queue::render_list(&entries, now_ms())
            };
            out.write_all(text.as_bytes())?;
        }
        Request::QueueRetry { receipt, all } => {
            let receipt = match (receipt, all) {
                (_, true) => None,
                (Some(r), false) => Some(parse_receipt(&r)?),
                (None, false) => anyhow::bail!("give a receipt id or --all"),
            };
            let store = open_store(&config)?;
            let n = store.queue_retry(receipt).await?;
            out.write_all(queue::render_retry(n, receipt).as_bytes())?;
        }
        Request::QueueDelete { receipt } => {
            let receipt = parse_receipt(&receipt)?;
            let store = open_store(&config)?;
            let n = store.queue_delete(receipt).await?;
            out.write_all(queue::render_delete(n, receipt).as_bytes())?;
        }
        _ => anyhow::bail!("this command is not available yet"),
    }
    Ok(ExitCode::SUCCESS)
}
