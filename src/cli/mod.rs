//! Command-line subcommands. `main.rs` parses arguments with clap into a [`Request`]; this
//! module loads the config, opens what the command needs and prints the result.

pub mod serve;
pub mod time;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::config::Config;
use crate::store::Store;

/// One parsed command line.
pub enum Request {
    Serve,
    Log {
        key: String,
        json: bool,
        since: Option<String>,
        until: Option<String>,
        limit: usize,
    },
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

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn run_store_command(config: Config, request: Request) -> anyhow::Result<ExitCode> {
    let store: Arc<dyn Store> = crate::store::sqlite::open_existing(&config)?;
    let mut out = std::io::stdout().lock();
    match request {
        Request::Log {
            key,
            json,
            since,
            until,
            limit,
        } => {
            let now = now_ms();
            let parse = |v: Option<String>| -> anyhow::Result<Option<i64>> {
                v.map(|s| time::parse_time(&s, now).map_err(anyhow::Error::msg))
                    .transpose()
            };
            let query = crate::store::LogQuery {
                key: crate::api::log_key(&key),
                since_ms: parse(since)?,
                until_ms: parse(until)?,
                limit,
            };
            let messages = store.log(&query).await?;
            if messages.is_empty() && !json {
                writeln!(out, "no messages for {key}")?;
            }
            for m in &messages {
                if json {
                    writeln!(out, "{}", serde_json::to_string(m)?)?;
                } else {
                    log_text::write_message(&mut out, m)?;
                }
            }
        }
        _ => anyhow::bail!("this command is not available yet"),
    }
    Ok(ExitCode::SUCCESS)
}
