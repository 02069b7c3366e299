//! `mailtrail serve`: opens the store, starts delivery, the SMTP listeners and the admin HTTP
//! server, and shuts them down in order on SIGTERM/SIGINT (stop accepting, finish transactions
//! in flight, stop delivery, exit 0).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, LogFormat};
use crate::metrics::Metrics;
use crate::store::Store;

fn init_tracing(config: &Config) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    // `[log] level` was checked with the config; RUST_LOG, when set, is held to the same
    // rules: tracing takes a bare word such as `verbose` for a target, and logged nothing.
    let filter = match std::env::var("RUST_LOG") {
        Ok(level) if !level.trim().is_empty() => {
            crate::config::log_filter(&level).map_err(|e| anyhow::anyhow!("RUST_LOG: {e}"))?
        }
        _ => {
            crate::config::log_filter(&config.log.level).unwrap_or_else(|_| EnvFilter::new("info"))
        }
    };
    // Colours off: every control byte a field brings is escaped on the way out (see
    // `OneLine`), which would show the colours' own escapes as text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| OneLine(std::io::stderr()))
        .with_ansi(false);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
    Ok(())
}

/// Writes each formatted log event with its control characters escaped, the final line
/// break excepted: field values carry text from remote servers and clients (a reply, a
/// bounce's recipient), and a line break in one made a line of its own that could pass for
/// mailtrail's (`... delivery attempt status=delivered`), an escape sequence could rewrite
/// an admin's terminal. Postfix logs such text through `printable()` for the same reason.
struct OneLine<W>(W);

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(&escape_controls(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// `buf` with C0 controls (tab kept), DEL and C1 controls (UTF-8 `C2 80`..`C2 9F`) as
/// `\xNN`; a line break at the very end stays.
fn escape_controls(buf: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let (body, end) = match buf.strip_suffix(b"\n") {
        Some(body) => (body, &b"\n"[..]),
        None => (buf, &b""[..]),
    };
    let is_c1 =
        |i: usize| body[i] == 0xC2 && body.get(i + 1).is_some_and(|b| (0x80..=0x9F).contains(b));
    let needs = |i: usize| {
        let b = body[i];
        (b < 0x20 && b != b'\t') || b == 0x7f || is_c1(i)
    };
    if !(0..body.len()).any(needs) {
        return std::borrow::Cow::Borrowed(buf);
    }
    let mut out = Vec::with_capacity(buf.len() + 16);
    let mut i = 0;
    while i < body.len() {
        if is_c1(i) {
            out.extend_from_slice(format!("\\x{:02x}", body[i + 1]).as_bytes());
            i += 2;
            continue;
        }
        if needs(i) {
            out.extend_from_slice(format!("\\x{:02x}", body[i]).as_bytes());
        } else {
            out.push(body[i]);
        }
        i += 1;
    }
    out.extend_from_slice(end);
    std::borrow::Cow::Owned(out)
}

pub fn serve(config: Config) -> anyhow::Result<ExitCode> {
    init_tracing(&config)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    // Before anything else touches the store, and held until the runtime (and with it every
    // task that could still write or deliver) is gone: declared first, dropped last.
    let _lock = super::lock::acquire(&config.data_dir)?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads(std::env::var_os(WORKER_THREADS_VAR).as_deref())? {
        builder.worker_threads(n);
    }
    let rt = builder
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run(Arc::new(config)))?;
    Ok(ExitCode::SUCCESS)
}

/// The runtime's own variable for its number of worker threads (one per core by default).
const WORKER_THREADS_VAR: &str = "TOKIO_WORKER_THREADS";

/// The worker thread count `value` of [`WORKER_THREADS_VAR`] asks for. Checked here because
/// the runtime panics on a value it cannot parse (an empty one included).
fn worker_threads(value: Option<&std::ffi::OsStr>) -> anyhow::Result<Option<usize>> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value.to_str().map(str::trim).map(str::parse::<usize>) {
        Some(Ok(n)) if n > 0 => Ok(Some(n)),
        _ => anyhow::bail!(
            "{WORKER_THREADS_VAR}={value:?}: expected a positive number of worker threads \
             (unset it for one per core)"
        ),
    }
}

/// What the listener tells after each accept: delivery or the bounce stage is woken, and fresh
/// mail to relay is handed to delivery in memory.
struct NextStages {
    delivery_wake: Arc<tokio::sync::Notify>,
    bounce_wake: Arc<tokio::sync::Notify>,
    handoff: Option<Arc<crate::delivery::Handoff>>,
}

impl crate::smtp::AcceptHook for NextStages {
    fn claim(&self, msg: &crate::spool::AcceptedMessage) -> bool {
        self.handoff.as_ref().is_some_and(|h| h.claim(msg))
    }

    fn stored(&self, inbound_bounce: bool, claimed: Option<crate::spool::AcceptedMessage>) {
        match (claimed, &self.handoff) {
            (Some(msg), Some(h)) => h.send(msg),
            _ if inbound_bounce => self.bounce_wake.notify_one(),
            _ => self.delivery_wake.notify_one(),
        }
    }

    fn not_stored(&self, receipt: crate::receipt::ReceiptId) {
        if let Some(h) = &self.handoff {
            h.release(receipt);
        }
    }
}

async fn run(config: Arc<Config>) -> anyhow::Result<()> {
    let store: Arc<dyn Store> = crate::store::sqlite::open(&config)?;
    let mut metrics = Metrics::new();
    if let Some(counters) = store.commit_counters() {
        metrics.register_store(counters);
    }
    let metrics = Arc::new(metrics);
    let shutdown = CancellationToken::new();

    let delivery = crate::delivery::Delivery::start(
        config.clone(),
        store.clone(),
        metrics.clone(),
        shutdown.clone(),
    )?;
    let delivery_wake = delivery.waker();
    let bounce_wake = Arc::new(tokio::sync::Notify::new());
    let suppressions = Arc::new(crate::checks::SuppressionCache::new(store.clone()));
    let ingest = Arc::new(
        crate::bounce::ingest::BounceIngest::new(
            config.clone(),
            store.clone(),
            metrics.clone(),
            Arc::new(load_classifier(&config)?),
            verp_key(&config)?,
        )
        .on_suppress(suppressions.clone()),
    );
    let bounces = ingest.spawn(bounce_wake.clone(), shutdown.clone());
    let smtp = crate::smtp::SmtpServer::bind(
        config.clone(),
        store.clone(),
        Arc::new(submission_policy(&config, suppressions, &metrics)?),
        metrics.clone(),
    )
    .await?
    .with_accept_hook(Arc::new(NextStages {
        delivery_wake,
        bounce_wake,
        handoff: delivery.handoff(),
    }));
    let http = crate::api::serve(
        &config.http.listen,
        crate::api::Limits::from_config(&config.http),
        crate::api::ApiState {
            metrics: metrics.clone(),
            store: store.clone(),
            allowed_hosts: Arc::new(config.http.allowed_hosts.clone()),
        },
        shutdown.clone(),
    )
    .await?;
    tracing::info!(
        smtp = ?smtp.local_addrs(),
        http = ?http.local_addrs,
        data_dir = %std::fs::canonicalize(&config.data_dir)
            .unwrap_or_else(|_| config.data_dir.clone())
            .display(),
        "mailtrail started"
    );

    tokio::spawn(purge(
        store.clone(),
        config.delivery.body_retention,
        config.delivery.log_retention,
        shutdown.clone(),
    ));
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let Some(mut incoming) = Signals::install() else {
            return; // without handlers the default actions stay: TERM and INT end the process
        };
        while incoming.next().await == Signal::Hangup {
            tracing::info!("SIGHUP ignored: the config is read at start; restart to apply changes");
        }
        tracing::info!("shutting down: no new connections, finishing transactions in flight");
        signals.cancel();
        // A second TERM or INT: stop now. Acknowledged mail is already durable; what is cut
        // short is transactions in flight, as with kill -9.
        while incoming.next().await == Signal::Hangup {}
        tracing::warn!("second signal: exiting now, transactions in flight cut short");
        std::process::exit(1);
    });

    smtp.run(shutdown.clone()).await;
    delivery.join().await;
    let _ = bounces.await;
    for task in http.tasks {
        let _ = task.await;
    }
    // Every write is done: the database file alone now holds everything (a backup of it
    // taken while mailtrail is stopped is whole).
    match tokio::task::spawn_blocking(move || store.checkpoint()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the store's log was not folded into the database at stop")
        }
        Err(e) => tracing::warn!(error = %e, "the store's checkpoint at stop failed"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// How often bodies past `[delivery] body_retention` and, when set, the log past
/// `[delivery] log_retention` are looked for.
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Deletes the bodies of finished mail older than `body_retention` and, unless
/// `log_retention` is zero (keep forever), the log and bounce records older than that; a
/// minute after start and then hourly, until shutdown.
async fn purge(
    store: Arc<dyn Store>,
    body_retention: std::time::Duration,
    log_retention: std::time::Duration,
    shutdown: CancellationToken,
) {
    let start = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut tick = tokio::time::interval_at(start, PURGE_EVERY);
    let cut_off = |retention: std::time::Duration| {
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        chrono::Utc::now()
            .timestamp_millis()
            .saturating_sub(retention_ms)
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.purge_bodies(cut_off(body_retention)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(bodies = n, "message bodies past body_retention deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot delete old message bodies"),
        }
        if log_retention.is_zero() {
            continue;
        }
        match store.purge_log(cut_off(log_retention)).await {
            Ok((0, 0)) => {}
            Ok((messages, bounces)) => tracing::info!(
                messages,
                bounces,
                "mail log and bounce records past log_retention deleted"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot delete the old mail log"),
        }
    }
}

/// The VERP MAC key, when a bounce domain is configured (created at first start).
pub fn verp_key(config: &Config) -> anyhow::Result<Option<Vec<u8>>> {
    crate::delivery::verp_sender::key_for(config).with_context(|| {
        match config.delivery.verp_key_file {
            Some(_) => "config key `delivery.verp_key_file`".to_string(),
            None => "the VERP key".to_string(),
        }
    })
}

/// Built-in bounce rules, with `[bounce] rules_file` tried first when set.
pub fn load_classifier(config: &Config) -> anyhow::Result<crate::bounce::Classifier> {
    let user = match &config.bounce.rules_file {
        Some(path) => std::fs::read_to_string(path).with_context(|| {
            format!("config key `bounce.rules_file`: reading {}", path.display())
        })?,
        None => String::new(),
    };
    crate::bounce::Classifier::with_user_rules(&user).with_context(|| {
        format!(
            "config key `bounce.rules_file`: {}",
            config
                .bounce
                .rules_file
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )
    })
}

/// The RCPT-time checks: bounce domain (VERP key), relay, suppression, domain check.
fn submission_policy(
    config: &Arc<Config>,
    suppressions: Arc<crate::checks::SuppressionCache>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<crate::checks::SubmissionPolicy> {
    let verp_key = verp_key(config)?;
    let domains = if config.checks.domain_check {
        let resolver =
            crate::delivery::dns::MxResolver::new(&config.dns.nameservers, config.dns.timeout)
                .context("setting up the DNS resolver for the domain check")?;
        Some(crate::checks::DomainCheck::new(
            resolver,
            config.checks.domain_check_timeout,
            config.checks.domain_cache_ttl,
        ))
    } else {
        None
    };
    Ok(crate::checks::SubmissionPolicy::new(
        config.clone(),
        suppressions,
        metrics.clone(),
        verp_key,
        domains,
    ))
}

#[derive(Debug, PartialEq, Eq)]
enum Signal {
    /// TERM or INT.
    Stop,
    /// HUP: logrotate's postrotate, a closed terminal. Its default action would kill the
    /// server mid-transaction; Postfix reloads on it, mailtrail has nothing to reload.
    Hangup,
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Option<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Some(Self {
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
            hup: signal(SignalKind::hangup()).ok()?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Hangup,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn log_lines_carry_no_control_characters_but_their_own_end() {
        let line =
            "INFO delivery attempt text=550-x\n2026 INFO forged \x1b]0;t\x07\r\u{9b}31m\tok é\n";
        let out = escape_controls(line.as_bytes());
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "INFO delivery attempt text=550-x\\x0a2026 INFO forged \\x1b]0;t\\x07\\x0d\\x9b31m\tok é\n"
        );
        let clean = "INFO message accepted receipt=01M é\n";
        assert!(matches!(
            escape_controls(clean.as_bytes()),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn worker_threads_from_the_environment() {
        assert_eq!(worker_threads(None).unwrap(), None);
        assert_eq!(worker_threads(Some(OsStr::new("3"))).unwrap(), Some(3));
        assert_eq!(worker_threads(Some(OsStr::new(" 2 "))).unwrap(), Some(2));
        for bad in ["", "0", "-1", "two"] {
            let err = worker_threads(Some(OsStr::new(bad)))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("TOKIO_WORKER_THREADS") && err.contains("positive number"),
                "{bad:?}: {err}"
            );
        }
    }
}
