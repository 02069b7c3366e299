//! The `mailtrail` binary: `serve` runs the relay; the other subcommands read and manage the
//! store of a running or stopped instance (they take the same `--config`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mailtrail",
    version,
    about = "SMTP relay that records what happened to every recipient"
)]
struct Cli {
    /// Config file (TOML). Without it, the built-in defaults (see config/mailtrail.toml).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay: SMTP listener, delivery, admin HTTP.
    Serve,
    /// Show messages for a recipient/sender address or a receipt id.
    Log(mailtrail::cli::log::LogArgs),
    /// Inspect and manage the delivery queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Parse or ingest bounce messages.
    Bounce {
        #[command(subcommand)]
        command: BounceCommand,
    },
    /// List bounce records, or mark one handled.
    Bounces(BouncesArgs),
    /// Manage the suppression list.
    Suppress {
        #[command(subcommand)]
        command: SuppressCommand,
    },
    /// Read a password (stdin, one line) and print its argon2id hash for `[[smtp.users]]`.
    HashPassword,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Recipients waiting for delivery (queued or deferred).
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Make a message's pending recipients (or all) due now.
    Retry {
        /// The message's receipt id.
        receipt: Option<String>,
        /// Every pending recipient of every message.
        #[arg(long, conflicts_with = "receipt")]
        all: bool,
    },
    /// Stop delivering a message: its pending recipients become failed (recorded as an event).
    Delete {
        /// The message's receipt id.
        receipt: String,
    },
}

#[derive(Subcommand)]
enum BounceCommand {
    /// Print the bounce records in files, directories or mbox files; touches no store.
    Parse {
        /// Message files, directories (read recursively) or mbox files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Parse bounces that reached another mailbox and record them in the store.
    Ingest {
        /// Message files, directories (read recursively) or mbox files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct BouncesArgs {
    #[command(subcommand)]
    command: Option<BouncesCommand>,
    /// Only bounces for this recipient address (any case).
    #[arg(long, value_name = "A")]
    address: Option<String>,
    /// Only bounces with this reason (userunknown, mailboxfull, ...; see docs/bounces.md).
    #[arg(long, value_name = "R")]
    reason: Option<String>,
    /// Only bounces not yet marked handled.
    #[arg(long)]
    unhandled: bool,
    /// Only the first bounce per address.
    #[arg(long)]
    first: bool,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// At most this many records, newest first (0 = all); a line says when more exist.
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: usize,
}

#[derive(Subcommand)]
enum BouncesCommand {
    /// Mark a bounce handled (the address was fixed).
    Handle {
        /// The bounce record's id (from `mailtrail bounces`).
        id: i64,
        /// Who handled it (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// Clear the handled mark.
    Unhandle {
        /// The bounce record's id (from `mailtrail bounces`).
        id: i64,
    },
}

#[derive(Subcommand)]
enum SuppressCommand {
    /// Every suppressed address with its reason, first and last bounce, count and expiry.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Suppress an address by hand (not relayed until removed or until [suppression] expiry).
    Add {
        address: String,
        /// Why, as shown by `list` and in the recipient's log (default: the reason the
        /// address is suppressed for already, else "manual").
        #[arg(long)]
        reason: Option<String>,
    },
    /// Relay to an address again.
    Remove { address: String },
    /// Exit 0 and print the entry when suppressed, 1 when not, 2 when it cannot tell.
    Check { address: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match mailtrail::cli::run(cli.config.as_deref(), into_request(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailtrail: {}", mailtrail::cli::error_text(&e));
            ExitCode::FAILURE
        }
    }
}

fn into_request(command: Command) -> mailtrail::cli::Request {
    use mailtrail::cli::Request as R;
    match command {
        Command::Serve => R::Serve,
        Command::Log(args) => R::Log(args),
        Command::Queue { command } => match command {
            QueueCommand::List { json } => R::QueueList { json },
            QueueCommand::Retry { receipt, all } => R::QueueRetry {
                receipt: if all { None } else { receipt },
                all,
            },
            QueueCommand::Delete { receipt } => R::QueueDelete { receipt },
        },
        Command::Bounce { command } => match command {
            BounceCommand::Parse { files, json } => R::BounceParse { files, json },
            BounceCommand::Ingest { files } => R::BounceIngest { files },
        },
        Command::Bounces(a) => match a.command {
            Some(BouncesCommand::Handle { id, by }) => R::BounceHandle { id, by },
            Some(BouncesCommand::Unhandle { id }) => R::BounceUnhandle { id },
            None => R::Bounces {
                address: a.address,
                reason: a.reason,
                unhandled: a.unhandled,
                first: a.first,
                json: a.json,
                limit: a.limit,
            },
        },
        Command::Suppress { command } => match command {
            SuppressCommand::List { json } => R::SuppressList { json },
            SuppressCommand::Add { address, reason } => R::SuppressAdd { address, reason },
            SuppressCommand::Remove { address } => R::SuppressRemove { address },
            SuppressCommand::Check { address } => R::SuppressCheck { address },
        },
        Command::HashPassword => R::HashPassword,
    }
}
