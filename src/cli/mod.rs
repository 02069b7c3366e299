//! Command-line subcommands. `main.rs` parses arguments with clap into a [`Request`]; this
//! module loads the config, opens what the command needs and prints the result.

pub mod bounce_parse;
pub mod bounces;
pub mod lock;
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
use crate::store::{HandledChange, Store};

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
        reason: Option<String>,
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
        Request::BounceParse { files, json } => {
            // A stand-alone tool: no store, but with --config the user's extra rules count.
            let classifier = match config_path {
                Some(_) => serve::load_classifier(&Config::load(config_path)?)?,
                None => crate::bounce::Classifier::with_user_rules("")?,
            };
            let mut out = std::io::stdout().lock();
            bounce_parse::run_bounce_parse_with(files, *json, &classifier, &mut out)?;
            return Ok(ExitCode::SUCCESS);
        }
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

/// An error unless the store holds a message with `receipt`: a queue command that found
/// nothing to do says whether the receipt is wrong or the message has nothing pending.
fn require_message(config: &Config, receipt: ReceiptId) -> anyhow::Result<()> {
    let reader = crate::store::sqlite::open_read_only(config)?;
    let found = reader.log(&crate::store::LogQuery {
        key: crate::store::LogKey::Receipt(receipt),
        since_ms: None,
        until_ms: None,
        limit: 1,
        before: None,
    })?;
    if found.is_empty() {
        anyhow::bail!("no message with receipt {receipt}");
    }
    Ok(())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn run_store_command(config: Config, request: Request) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match request {
        Request::Log(args) => {
            let json = args.json;
            let mut query = log::query(&args, chrono::Utc::now())?;
            query.limit = log::one_more(args.limit);
            let reader = crate::store::sqlite::open_read_only(&config)?;
            let mut messages = reader.log(&query)?;
            let more = log::cut_to(&mut messages, args.limit);
            // A receipt names one message: none is an answer of its own, as `queue retry`
            // gives it (exit 1), where an address may simply have had no mail.
            let unfiltered = args.since.is_none() && args.until.is_none() && args.before.is_none();
            if messages.is_empty()
                && unfiltered
                && matches!(query.key, crate::store::LogKey::Receipt(_))
            {
                eprintln!("mailtrail: {}", log::no_such_receipt(&args.key));
                return Ok(ExitCode::from(1));
            }
            if messages.is_empty() && !json {
                writeln!(out, "no messages for {}", log::sanitize(&args.key))?;
            }
            out.write_all(log::render(&messages, json).as_bytes())?;
            if more && let Some(oldest) = messages.last() {
                let notice = log::more_messages_notice(messages.len(), oldest.receipt);
                more_notice(&mut out, json, &notice)?;
            }
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
            if n == 0
                && let Some(r) = receipt
            {
                require_message(&config, r)?;
            }
            out.write_all(queue::render_retry(n, receipt).as_bytes())?;
        }
        Request::QueueDelete { receipt } => {
            let receipt = parse_receipt(&receipt)?;
            let store = open_store(&config)?;
            let n = store.queue_delete(receipt).await?;
            if n == 0 {
                require_message(&config, receipt)?;
            }
            out.write_all(queue::render_delete(n, receipt).as_bytes())?;
        }
        Request::Bounces {
            address,
            reason,
            unhandled,
            first,
            json,
            limit,
        } => {
            // As pasted from a log (`<a@b>`), and a reason in any case; a reason that is none
            // is named instead of matching nothing.
            let address = address.map(|a| log::unbracketed(&a).to_string());
            let reason = reason
                .map(|r| crate::bounce::reason::reason_named(&r).map(str::to_string))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let reader = crate::store::sqlite::open_read_only(&config)?;
            let mut list = reader.bounces(&crate::store::BounceQuery {
                address,
                reason,
                unhandled_only: unhandled,
                first_only: first,
                limit: log::one_more(limit),
            })?;
            let more = log::cut_to(&mut list, limit);
            out.write_all(bounces::render_bounces(&list, json).as_bytes())?;
            if more {
                more_notice(&mut out, json, &bounces::more_bounces_notice(list.len()))?;
            }
        }
        Request::BounceHandle { id, by } => {
            let by = by
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "admin".to_string());
            if by.trim().is_empty() {
                anyhow::bail!("--by needs a name: who handled the bounce");
            }
            // It is shown to every admin who lists the bounces, in a terminal.
            if by.chars().any(char::is_control) || by.chars().count() > 200 {
                anyhow::bail!(
                    "--by {}: a name of at most 200 characters, without control characters",
                    log::sanitize(&by)
                );
            }
            let store = open_store(&config)?;
            match store.set_handled(id, Some(&by), now_ms()).await? {
                HandledChange::Changed => {
                    writeln!(out, "bounce {id} marked handled by {}", log::sanitize(&by))?
                }
                HandledChange::Already { by: first, at_ms } => writeln!(
                    out,
                    "bounce {id} was handled already, by {} at {} (kept)",
                    log::sanitize(first.as_deref().unwrap_or("?")),
                    at_ms.map(log::format_time).unwrap_or_default()
                )?,
                HandledChange::NoSuchBounce => anyhow::bail!("no bounce with id {id}"),
            }
        }
        Request::BounceUnhandle { id } => {
            let store = open_store(&config)?;
            match store.set_handled(id, None, now_ms()).await? {
                HandledChange::Changed => writeln!(out, "bounce {id} marked unhandled")?,
                HandledChange::Already { .. } => writeln!(out, "bounce {id} is not handled")?,
                HandledChange::NoSuchBounce => anyhow::bail!("no bounce with id {id}"),
            }
        }
        Request::BounceIngest { files } => {
            let config = Arc::new(config);
            let store = open_store(&config)?;
            let ingest = crate::bounce::ingest::BounceIngest::new(
                config.clone(),
                store,
                Arc::new(crate::metrics::Metrics::new()),
                Arc::new(serve::load_classifier(&config)?),
                serve::verp_key(&config)?,
            );
            let (paths, mut skipped) = bounce_parse::collect_files(&files);
            let mut stored_before = 0;
            let mut records = 0usize;
            for path in paths {
                let data = match std::fs::read(&path) {
                    Ok(data) => data,
                    Err(e) => {
                        skipped.push(format!("{}: {e}", path.display()));
                        continue;
                    }
                };
                for src in bounce_parse::split_messages(&path, data) {
                    let name = match src.message {
                        Some(n) => format!("{}#{n}", src.file),
                        None => src.file.clone(),
                    };
                    // The envelope is gone; a VERP address may still show in the header.
                    let to = crate::bounce::ingest::delivered_to(&src.raw);
                    let ingested = ingest.ingest(&src.raw, &to, None).await?;
                    if ingested.is_empty() {
                        writeln!(out, "{name}: no bounce record")?;
                    }
                    for i in &ingested {
                        out.write_all(bounces::render_ingested(&name, i).as_bytes())?;
                    }
                    records += ingested.iter().filter(|i| !i.duplicate).count();
                    stored_before += ingested.iter().filter(|i| i.duplicate).count();
                }
            }
            if stored_before > 0 {
                writeln!(
                    out,
                    "{records} bounce records stored, {stored_before} stored before"
                )?;
            } else {
                writeln!(out, "{records} bounce records stored")?;
            }
            out.flush()?;
            bounce_parse::report_skipped(&skipped)?;
        }
        Request::SuppressList { json } => {
            let reader = crate::store::sqlite::open_read_only(&config)?;
            let list = reader.suppression_list(now_ms())?;
            out.write_all(bounces::render_suppressions(&list, json).as_bytes())?;
        }
        Request::SuppressAdd { address, reason } => {
            let address = address_arg(&address)?;
            // Shown in `suppress list` and in the text of every recipient it suppresses.
            let reason = reason.map(|r| r.trim().to_string());
            if let Some(reason) = &reason
                && (reason.is_empty()
                    || reason.chars().any(char::is_control)
                    || reason.chars().count() > 200)
            {
                anyhow::bail!(
                    "--reason {}: a text of 1 to 200 characters, without control characters",
                    log::sanitize(reason)
                );
            }
            let store = open_store(&config)?;
            let now = now_ms();
            // Added again without a reason, an entry keeps the one it has (it became
            // "manual" and lost what an admin had written).
            let reason = match reason {
                Some(r) => r,
                None => store
                    .suppressed(&address, now)
                    .await?
                    .map_or_else(|| "manual".to_string(), |s| s.reason),
            };
            store
                .suppress(crate::store::Suppression {
                    address: address.clone(),
                    reason,
                    source: "manual".to_string(),
                    first_at_ms: now,
                    last_at_ms: now,
                    count: 1,
                    expires_at_ms: config.suppression.expires_at(now),
                })
                .await?;
            writeln!(out, "{address} suppressed")?;
        }
        Request::SuppressRemove { address } => {
            let address = address_arg(&address)?;
            let store = open_store(&config)?;
            if store.unsuppress(&address).await? {
                writeln!(out, "{address} removed from the suppression list")?;
            } else {
                writeln!(out, "{address} was not suppressed")?;
                return Ok(ExitCode::from(1));
            }
        }
        Request::SuppressCheck { address } => {
            // As `grep -q`: 0 suppressed, 1 not, 2 when it cannot tell (a bad address, no
            // store), so that a script does not take an error for "not suppressed".
            let looked_up = async {
                let address = address_arg(&address)?;
                let store = open_store(&config)?;
                let entry = store.suppressed(&address, now_ms()).await?;
                anyhow::Ok((address, entry))
            };
            match looked_up.await {
                Ok((_, Some(s))) => {
                    out.write_all(bounces::render_suppressions(&[s], false).as_bytes())?
                }
                Ok((address, None)) => {
                    writeln!(out, "{address} is not suppressed")?;
                    return Ok(ExitCode::from(1));
                }
                Err(e) => {
                    eprintln!("mailtrail: {}", error_text(&e));
                    return Ok(ExitCode::from(2));
                }
            }
        }
        Request::Serve | Request::HashPassword | Request::BounceParse { .. } => {
            unreachable!("handled before the store is opened")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Says that a list was cut by its limit: after the text, or on stderr beside JSON lines
/// (where a line that is no record would break a reader).
fn more_notice(out: &mut impl Write, json: bool, notice: &str) -> std::io::Result<()> {
    if json {
        out.flush()?;
        std::io::stderr().write_all(notice.as_bytes())
    } else {
        write!(out, "\n{notice}")
    }
}

/// The error as one line for the terminal: each cause in turn, `: ` between them, except a
/// cause whose text the line already holds. (An error whose message names its own source,
/// "cannot read config file X: No such file or directory", printed with anyhow's `{:#}`
/// said the reason twice.)
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// An address typed on the command line, as the store keeps it: without the angle brackets
/// it may be pasted with, `local@domain` with both parts (a local part with an `@` or a
/// space is written quoted, as SMTP stores it: `"john doe"@example.org`).
fn address_arg(raw: &str) -> anyhow::Result<String> {
    let a = log::unbracketed(raw);
    let quoted = |local: &str| local.len() >= 2 && local.starts_with('"') && local.ends_with('"');
    match a.rsplit_once('@') {
        Some((local, domain))
            if !local.is_empty()
                && !domain.is_empty()
                && !domain.contains(|c: char| c.is_whitespace() || c == '>')
                && !a.chars().any(char::is_control)
                && (quoted(local) || !local.contains(|c: char| c == '@' || c.is_whitespace())) =>
        {
            // As RCPT reads it (`a@ok.test.` is `a@ok.test`; a domain of LDH labels), so
            // that an entry added here is the one a recipient is looked up by.
            let local = if quoted(local) {
                unquoted(local.get(1..local.len() - 1).unwrap_or_default())
            } else {
                local.to_string()
            };
            crate::smtp::session::canonical_mailbox(&format!("{local}@{domain}")).ok_or_else(|| {
                anyhow::anyhow!("not an address mail can be sent to: {raw:?} (its domain)")
            })
        }
        _ => anyhow::bail!("not an address: {raw:?} (want local@domain)"),
    }
}

/// The text of a quoted string's inside, its `\x` escapes read.
fn unquoted(inside: &str) -> String {
    let mut out = String::with_capacity(inside.len());
    let mut chars = inside.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' {
            chars.next().unwrap_or(c)
        } else {
            c
        });
    }
    out
}

#[cfg(test)]
mod address_arg_tests {
    use super::address_arg;

    #[test]
    fn addresses_lose_their_brackets_and_must_have_both_parts() {
        assert_eq!(address_arg(" <Br@Ex.test> ").unwrap(), "Br@Ex.test");
        assert_eq!(
            address_arg("\"Rowe, Br\" <Br@Ex.test>").unwrap(),
            "Br@Ex.test"
        );
        assert_eq!(
            address_arg("\"john doe\"@ex.test").unwrap(),
            "\"john doe\"@ex.test"
        );
        // As RCPT reads them: a trailing dot dropped, a dot-atom's needless quotes too.
        assert_eq!(
            address_arg("Name <carol@ok.test.>").unwrap(),
            "carol@ok.test"
        );
        assert_eq!(address_arg("\"carol\"@ok.test").unwrap(), "carol@ok.test");
        for bad in [
            "x@-ok.test",
            "x@ok..test",
            "x@ok.test\\",
            "@",
            "a@",
            "@b",
            "a@b@c",
            "john doe@ex.test",
            "a@b c",
            "nobody",
            "a\u{1b}@b",
        ] {
            assert!(address_arg(bad).is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod error_text_tests {
    use super::error_text;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read config file x.toml: {source}")]
    struct NamesItsSource {
        source: std::io::Error,
    }

    #[test]
    fn a_source_the_message_already_names_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::new(NamesItsSource { source: io });
        assert_eq!(format!("{e:#}").matches("No such file").count(), 2);
        assert_eq!(
            error_text(&e),
            "cannot read config file x.toml: No such file or directory"
        );
    }

    #[test]
    fn context_and_its_cause_are_both_said() {
        let io = std::io::Error::other("disk full");
        let e = anyhow::Error::new(io).context("storing the message");
        assert_eq!(error_text(&e), "storing the message: disk full");
    }
}
