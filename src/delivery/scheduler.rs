//! The delivery loop: asks the store for due recipients, routes them, runs SMTP transactions
//! concurrently within the connection limits, and records every result with the DSNs it
//! causes.
//!
//! Duplicate-delivery window: a transaction's results are recorded right after its final
//! DATA/BDAT reply, one commit per transaction. If the process dies (kill -9, power loss)
//! after the remote `250` but before that commit, the recipients are still `queued` and are
//! delivered again after restart. The window is one store commit long per transaction; it
//! cannot be closed without the remote's help (RFC 1047).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bounce::classify::{Classifier, Evidence};
use crate::bounce::reason::{BounceReason, BounceType, bounce_type};
use crate::config::{Config, RouteConfig, TlsPolicy};
use crate::metrics::{Metrics, OutcomeLabel, class_of};
use crate::receipt::ReceiptId;
use crate::store::{AttemptRecord, DsnNotice, QueuedMessage, RecipientStatus, Stage, Store};

use super::client::{
    self, Connection, Envelope, EnvelopeRecipient, RecipientResult, Secret, SessionSettings,
};
use super::dns::{self, Answer, DnsFailure, MxResolver, Target};
use super::dsn::{self, Action, ReportKind, ReportRecipient};
use super::handoff::{Fresh, Handoff};
use super::retry::{self, AttemptResult, RetryPolicy};
use super::route::{self, Batch, Destination, SenderMode};
use super::verp_sender::VerpSender;

/// How long an idle connection is kept for the next message to the same destination.
pub const IDLE_LIMIT: Duration = Duration::from_secs(10);
/// Transactions per connection before it is closed and a new one opened.
pub const REUSE_LIMIT: u32 = 100;
/// How often queue gauges are refreshed and idle connections past their time closed.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);
/// Longest sleep between queue checks when nothing wakes the loop. Another process can make
/// mail due (`mailtrail queue retry` from a shell) without waking this one: it is seen within
/// this time. An idle check is two indexed reads.
const MAX_SLEEP: Duration = Duration::from_secs(1);
/// Longest time between two full scans of the queue while mail keeps arriving.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(1);
/// First and longest pause before the store is asked again after it failed: between tries
/// to record attempts it refused, and (the first) before a message whose body it could not
/// read goes back to the queue.
const STORE_RETRY_FIRST: Duration = Duration::from_secs(1);
const STORE_RETRY_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("route[{route}]: {message}")]
    Route { route: usize, message: String },
    #[error("DNS resolver: {0}")]
    Resolver(String),
    #[error("bounce rules: {0}")]
    Rules(String),
    #[error(transparent)]
    VerpKey(#[from] super::verp_sender::VerpKeyError),
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// At most this many freshly accepted messages wait in memory for their first attempt; beyond
/// that the loop finds them in the store.
const HANDOFF_LIMIT: usize = 4096;

/// Handle to the running delivery loop.
pub struct DeliveryHandle {
    wake: Arc<Notify>,
    handoff: Option<Arc<Handoff>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl DeliveryHandle {
    /// Where the listener hands freshly accepted mail (`None` with delivery off).
    pub fn handoff(&self) -> Option<Arc<Handoff>> {
        self.handoff.clone()
    }

    /// Tells the loop that new mail was accepted, so it looks now instead of at its next
    /// planned time.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A cloneable waker for the SMTP listener.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Waits until the loop has stopped (after the shutdown token fired and running
    /// transactions finished or the grace period ran out).
    pub async fn join(mut self) {
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Entry point.
pub struct Delivery;

impl Delivery {
    /// Starts the delivery loop on the current tokio runtime. With `delivery.enabled = false`
    /// nothing runs and the handle's `wake` does nothing. On `shutdown` no new transaction
    /// starts; running ones get `smtp.shutdown_grace` to finish.
    pub fn start(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<DeliveryHandle, DeliveryError> {
        let wake = Arc::new(Notify::new());
        if !config.delivery.enabled {
            return Ok(DeliveryHandle {
                wake,
                handoff: None,
                task: None,
            });
        }
        let ctx = Arc::new(Context::new(config, store, metrics, shutdown)?);
        let (handoff, fresh) = Handoff::new(HANDOFF_LIMIT);
        let handoff = Arc::new(handoff);
        let task = tokio::spawn(run(ctx, wake.clone(), handoff.clone(), fresh));
        Ok(DeliveryHandle {
            wake,
            handoff: Some(handoff),
            task: Some(task),
        })
    }
}

/// Everything a transaction needs, shared by all tasks.
struct Context {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    resolver: MxResolver,
    policy: RetryPolicy,
    verp: Option<VerpSender>,
    mx_settings: SessionSettings,
    route_settings: Vec<SessionSettings>,
    pool: Pool,
    /// Built-in reply classification plus `[bounce] rules_file`, if set.
    classifier: Option<Classifier>,
    /// Destinations that could not be connected to (refused, timed out, 4xx greeting, AUTH
    /// refused), until when, and why: mail for them meanwhile is deferred with that reason
    /// without a new connection (Postfix: "delivery temporarily suspended"), so a burst of
    /// queued mail costs a smarthost one failed login, not one per message.
    suspended: Mutex<HashMap<Destination, Suspension>>,
    /// Whether new work waits because the store cannot record what delivery does.
    pause: Pause,
    /// The suppression list in memory, for the look before a retry (one store read per
    /// retried recipient otherwise); reloaded when the store's list version moves.
    suppressions: crate::checks::SuppressionCache,
}

/// Delivery takes no new work (no connection, no transaction) while the store cannot
/// record it: a remote `250` that cannot be recorded is delivered again after the next start.
/// Before 2026-12-05 delivery went on leasing mail out of a database file that had been
/// deleted (read through the descriptor SQLite held), each delivery unrecordable; with the
/// disk full it went on starting transactions until the in-flight limit was full of tasks
/// holding results they could not record. Transactions already running finish.
#[derive(Default)]
struct Pause {
    /// The store refuses every write until a restart (its database file deleted or replaced,
    /// a failed fsync): the reason, set once.
    refused: OnceLock<String>,
    /// Attempt records the store refused and that wait to be tried again (a full disk):
    /// while there are any, nothing new starts; once they are in, delivery resumes.
    waiting: AtomicUsize,
}

impl Pause {
    /// Whether new work waits now, asking the store whether it refuses writes (a stat or
    /// two: off the async workers). Logs the refusal once.
    async fn check(&self, store: &Arc<dyn Store>, metrics: &Metrics) -> bool {
        if self.refused.get().is_none() {
            let store = store.clone();
            let refusal = tokio::task::spawn_blocking(move || store.write_refusal())
                .await
                .ok()
                .flatten();
            if let Some(reason) = refusal
                && self.refused.set(reason.clone()).is_ok()
            {
                tracing::error!(
                    %reason,
                    "delivery paused until restart: the store refuses writes, so no delivery could be recorded; no new connection or transaction starts"
                );
            }
        }
        self.publish(metrics)
    }

    fn paused(&self) -> bool {
        self.refused.get().is_some() || self.waiting.load(Ordering::SeqCst) > 0
    }

    /// Sets the `delivery_paused` gauge; returns whether delivery is paused.
    fn publish(&self, metrics: &Metrics) -> bool {
        let paused = self.paused();
        metrics.delivery_paused.set(i64::from(paused));
        paused
    }

    /// A refused attempt record waits to be tried again: delivery pauses until it is in
    /// (the guard's drop).
    fn record_waits<'a>(&'a self, metrics: &'a Metrics, error: &str) -> RecordWaiting<'a> {
        if self.waiting.fetch_add(1, Ordering::SeqCst) == 0 {
            tracing::error!(
                %error,
                "delivery paused: the store refuses to record delivery attempts; no new connection or transaction starts until it takes them"
            );
        }
        self.publish(metrics);
        RecordWaiting(self, metrics)
    }
}

/// One attempt record that the store refused, waiting ([`Pause::record_waits`]).
struct RecordWaiting<'a>(&'a Pause, &'a Metrics);

impl Drop for RecordWaiting<'_> {
    fn drop(&mut self) {
        let RecordWaiting(pause, metrics) = *self;
        if pause.waiting.fetch_sub(1, Ordering::SeqCst) == 1 && pause.refused.get().is_none() {
            tracing::info!("delivery resumed: the store records delivery attempts again");
        }
        pause.publish(metrics);
    }
}

/// A destination that could not be connected to, until when, and why. Each `queue retry`
/// an admin makes tries a suspended destination once, as a probe: the rest of the mail it
/// retried waits for the probe's answer instead of each trying (a wrong smarthost password
/// would cost one failed login per message again), and when the probe fails too, that mail
/// is deferred with the rest.
struct Suspension {
    until: Instant,
    error: client::SessionError,
    /// A probe is connecting now.
    probing: bool,
    /// The `queue retry` (its time) whose probe ran last.
    probed: Option<i64>,
}

/// What [`Context::admit`] says about a transaction to a destination.
enum Admission {
    /// Connect; `probe`: as the one retried transaction trying a suspended destination.
    Go { probe: bool },
    /// Defer with the reason the destination is suspended.
    Suspended(Box<client::SessionError>),
    /// Retried mail while a probe runs: ask again shortly.
    Wait,
}

/// How long a destination that could not be connected to stays suspended: short, so mail
/// an admin retries by hand after a fix (`queue retry`) meets it only within this window.
const SUSPENSION: Duration = Duration::from_secs(30);

impl Context {
    fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Self, DeliveryError> {
        let d = &config.delivery;
        let resolver = MxResolver::new(&config.dns.nameservers, config.dns.timeout)
            .map_err(|e| DeliveryError::Resolver(e.to_string()))?;
        let insecure = client::tls_connector(false, None)
            .map_err(|e| DeliveryError::Resolver(e.to_string()))?;
        let base = |tls, implicit_tls, connector, unverified_fallback, auth| SessionSettings {
            helo_name: config.hostname.clone(),
            tls,
            implicit_tls,
            tls_connector: connector,
            unverified_fallback,
            auth,
            connect_timeout: d.connect_timeout,
            command_timeout: d.command_timeout,
            data_timeout: d.data_timeout,
        };
        let mx_settings = base(
            TlsPolicy::Opportunistic,
            false,
            insecure.clone(),
            None,
            None,
        );
        let route_settings = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let verify = r.verify_certificate.unwrap_or(true);
                let connector =
                    client::tls_connector(verify, r.ca_file.as_deref()).map_err(|e| {
                        DeliveryError::Route {
                            route: i,
                            message: e.to_string(),
                        }
                    })?;
                let auth = route_auth(i, r)?;
                let fallback = (verify && r.tls == TlsPolicy::Opportunistic && !r.implicit_tls)
                    .then(|| insecure.clone());
                Ok(base(r.tls, r.implicit_tls, connector, fallback, auth))
            })
            .collect::<Result<Vec<_>, DeliveryError>>()?;
        let classifier = match &config.bounce.rules_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| DeliveryError::Rules(format!("{}: {e}", path.display())))?;
                Some(
                    Classifier::with_user_rules(&text)
                        .map_err(|e| DeliveryError::Rules(format!("{}: {e}", path.display())))?,
                )
            }
        };
        Ok(Self {
            classifier,
            policy: RetryPolicy::from_config(d),
            verp: VerpSender::from_config(&config)?,
            pool: Pool::new(d.max_connections, d.max_connections_per_destination),
            suspended: Mutex::new(HashMap::new()),
            pause: Pause::default(),
            suppressions: crate::checks::SuppressionCache::new(store.clone()),
            resolver,
            mx_settings,
            route_settings,
            config,
            store,
            metrics,
            shutdown,
        })
    }

    /// Whether a transaction to `dest` may connect now. `retry`: the time of the `queue
    /// retry` that made its mail due, which may probe a suspended destination once.
    fn admit(&self, dest: &Destination, retry: Option<i64>) -> Admission {
        let mut map = self.suspended.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = map.get_mut(dest) else {
            return Admission::Go { probe: false };
        };
        if Instant::now() >= s.until {
            map.remove(dest);
            return Admission::Go { probe: false };
        }
        match retry {
            Some(_) if s.probing => Admission::Wait,
            Some(at) if s.probed != Some(at) => {
                (s.probing, s.probed) = (true, Some(at));
                Admission::Go { probe: true }
            }
            _ => Admission::Suspended(Box::new(s.error.clone())),
        }
    }

    /// `dest` could not be connected to: suspended for [`SUSPENSION`] (at most the first
    /// retry interval). `probe`: the failure was the probe of the `queue retry` at that time.
    fn suspend(&self, dest: &Destination, e: &client::SessionError, probe: Option<i64>) {
        let until = Instant::now() + SUSPENSION.min(self.config.delivery.retry_first);
        let mut map = self.suspended.lock().unwrap_or_else(|p| p.into_inner());
        let probed = probe.or_else(|| map.get(dest).and_then(|s| s.probed));
        map.insert(
            dest.clone(),
            Suspension {
                until,
                error: e.clone(),
                probing: false,
                probed,
            },
        );
    }

    /// `dest` took a connection: mail for it goes out again.
    fn resume(&self, dest: &Destination) {
        let mut map = self.suspended.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(dest);
    }

    fn classifier(&self) -> &Classifier {
        self.classifier
            .as_ref()
            .unwrap_or_else(|| Classifier::builtin())
    }

    fn settings(&self, dest: &Destination) -> &SessionSettings {
        match dest {
            Destination::Route(i) => self.route_settings.get(*i).unwrap_or(&self.mx_settings),
            Destination::Domain(_) => &self.mx_settings,
        }
    }

    /// Ordered connection targets for a destination, never this server itself.
    async fn targets(&self, dest: &Destination) -> Result<Vec<Target>, DnsFailure> {
        let targets = self.resolved_targets(dest).await?;
        let smtp = &self.config.smtp;
        let listeners: Vec<std::net::SocketAddr> = smtp
            .listen
            .iter()
            .chain(&smtp.tls_listen)
            .copied()
            .collect();
        let is_self = |addr| dns::is_own_listener(&listeners, &smtp.proxy_interfaces, addr);
        match dest {
            Destination::Domain(domain) => dns::without_self(domain, targets, is_self),
            // Named by its next hops, as Postfix names a relayhost ("mail for
            // [relay.example]:587 loops back to myself"): a DSN's reader knows no route[n].
            Destination::Route(i) => {
                let hops = self
                    .config
                    .routes
                    .get(*i)
                    .map_or_else(|| dest.to_string(), |r| r.mx.join(", "));
                dns::without_self_hops(&hops, targets, is_self)
            }
        }
    }

    async fn resolved_targets(&self, dest: &Destination) -> Result<Vec<Target>, DnsFailure> {
        match dest {
            Destination::Domain(domain) => {
                self.resolver
                    .resolve(domain, self.config.delivery.mx_port)
                    .await
            }
            Destination::Route(i) => {
                let Some(route) = self.config.routes.get(*i) else {
                    return Err(DnsFailure {
                        permanent: false,
                        enhanced_status: "4.3.5",
                        reason: "systemerror",
                        text: format!("route[{i}] is not configured"),
                    });
                };
                let mut out = Vec::new();
                let mut why = Vec::new();
                for hop in route::fixed_hops(route) {
                    match self.resolver.addresses(&hop.host).await {
                        Answer::Records(ips) => out.extend(ips.into_iter().map(|ip| Target {
                            host: hop.host.clone(),
                            addr: std::net::SocketAddr::new(ip, hop.port),
                            preference: 0,
                        })),
                        other => why.push(format!("{}: {other:?}", hop.host)),
                    }
                }
                if out.is_empty() {
                    // A configured next hop that does not resolve is our problem, not the
                    // recipient's: retry rather than bounce.
                    return Err(DnsFailure {
                        permanent: false,
                        enhanced_status: "4.4.3",
                        reason: "systemerror",
                        text: format!("no address for route[{i}] next hops: {}", why.join("; ")),
                    });
                }
                Ok(out)
            }
        }
    }
}

/// Reads a route's smarthost password from its file or environment variable.
fn route_auth(i: usize, r: &RouteConfig) -> Result<Option<(String, Secret)>, DeliveryError> {
    let Some(user) = &r.auth_user else {
        return Ok(None);
    };
    let err = |message: String| DeliveryError::Route { route: i, message };
    let password = if let Some(path) = &r.auth_password_file {
        std::fs::read_to_string(path)
            .map_err(|e| err(format!("auth_password_file {}: {e}", path.display())))?
            .trim_end_matches(['\r', '\n'])
            .to_string()
    } else if let Some(var) = &r.auth_password_env {
        std::env::var(var).map_err(|_| err(format!("auth_password_env {var} is not set")))?
    } else {
        return Err(err("auth_user needs a password source".to_string()));
    };
    if password.is_empty() {
        let source = match (&r.auth_password_file, &r.auth_password_env) {
            (Some(path), _) => format!("auth_password_file {}", path.display()),
            (None, Some(var)) => format!("auth_password_env {var}"),
            (None, None) => "the password".to_string(),
        };
        return Err(err(format!("{source} is empty")));
    }
    Ok(Some((user.clone(), Secret(password))))
}

// ---------------------------------------------------------------------------------------------
// Connection pool and limits.

/// An open connection with the permits it holds: a live connection, busy or idle, always
/// holds one global and one per-destination permit, so the limits count open connections.
struct Leased {
    conn: Connection,
    /// Given back at once when the connection is being closed (see [`quit_in_background`]).
    permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    gauge: prometheus_client::metrics::gauge::Gauge,
    idle_since: Instant,
}

impl Drop for Leased {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// How long a pooled connection being closed waits for the reply to its QUIT.
const QUIT_WAIT: Duration = Duration::from_secs(2);

/// Closes a pooled connection the pool no longer keeps (too old, or its slot wanted by
/// another destination) with QUIT, in the background: RFC 5321 4.1.1.10 says a client
/// must not close a session before it sends QUIT (it was dropped without a word). Its
/// permits go at once, so the slot it frees is free now; the socket closes when the QUIT is
/// answered, or after [`QUIT_WAIT`].
fn quit_in_background(mut l: Leased) {
    l.permits = None;
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let mut l = l;
            let _ = tokio::time::timeout(QUIT_WAIT, l.conn.quit()).await;
        });
    }
}

struct Pool {
    global: Arc<Semaphore>,
    /// Signalled when a connection goes idle.
    returned: Notify,
    per_destination: usize,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    idle: HashMap<Destination, Vec<Leased>>,
    dest_limits: HashMap<Destination, Arc<Semaphore>>,
}

impl Pool {
    fn new(max: usize, per_destination: usize) -> Self {
        Self {
            global: Arc::new(Semaphore::new(max.max(1))),
            returned: Notify::new(),
            per_destination: per_destination.max(1),
            state: Mutex::new(PoolState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic while holding this lock leaves only plain maps behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection to `dest`, if one is fresh enough.
    fn take_idle(&self, dest: &Destination) -> Option<Leased> {
        let mut st = self.lock();
        let list = st.idle.get_mut(dest)?;
        while let Some(l) = list.pop() {
            if l.idle_since.elapsed() < IDLE_LIMIT && l.conn.transactions < REUSE_LIMIT {
                return Some(l);
            }
            quit_in_background(l);
        }
        None
    }

    fn put_idle(&self, dest: Destination, mut l: Leased) {
        l.idle_since = Instant::now();
        self.lock().idle.entry(dest).or_default().push(l);
        self.returned.notify_waiters();
    }

    /// Closes idle connections past their time.
    fn expire(&self) {
        let mut st = self.lock();
        for list in st.idle.values_mut() {
            let (keep, old): (Vec<_>, Vec<_>) = std::mem::take(list)
                .into_iter()
                .partition(|l| l.idle_since.elapsed() < IDLE_LIMIT);
            *list = keep;
            old.into_iter().for_each(quit_in_background);
        }
        st.idle.retain(|_, v| !v.is_empty());
    }

    /// Drops one idle connection of another destination to free a global slot.
    fn evict_one(&self) -> bool {
        let mut st = self.lock();
        for list in st.idle.values_mut() {
            if let Some(l) = list.pop() {
                quit_in_background(l);
                return true;
            }
        }
        false
    }

    /// A connection slot for `dest`: an idle connection when one is (or becomes) free, else
    /// permits for a new one (per destination first, then global; idle connections to other
    /// destinations are closed to make room). Waiters wake when a connection goes idle, since
    /// an idle connection holds its permits.
    async fn acquire(&self, dest: &Destination) -> Option<Slot> {
        let dest_sem = {
            let mut st = self.lock();
            st.dest_limits
                .entry(dest.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_destination)))
                .clone()
        };
        let dest_permit = loop {
            let notified = self.returned.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(l) = self.take_idle(dest) {
                return Some(Slot::Idle(Box::new(l)));
            }
            if let Ok(p) = dest_sem.clone().try_acquire_owned() {
                break p;
            }
            tokio::select! {
                p = dest_sem.clone().acquire_owned() => break p.ok()?,
                _ = &mut notified => continue,
            }
        };
        let global = loop {
            let notified = self.returned.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Ok(p) = self.global.clone().try_acquire_owned() {
                break p;
            }
            if self.evict_one() {
                continue;
            }
            tokio::select! {
                p = self.global.clone().acquire_owned() => break p.ok()?,
                _ = &mut notified => continue,
            }
        };
        Some(Slot::New(global, dest_permit))
    }
}

/// What [`Pool::acquire`] hands out.
enum Slot {
    Idle(Box<Leased>),
    New(OwnedSemaphorePermit, OwnedSemaphorePermit),
}

// ---------------------------------------------------------------------------------------------
// The loop.

async fn run(
    ctx: Arc<Context>,
    wake: Arc<Notify>,
    handoff: Arc<Handoff>,
    mut fresh: tokio::sync::mpsc::UnboundedReceiver<Fresh>,
) {
    let max_in_flight = ctx
        .config
        .delivery
        .max_connections
        .saturating_mul(4)
        .max(16);
    // Each task returns whether it left work for later (a deferral, a DSN, an error): then
    // the next turn rescans the queue and recomputes the next wake-up.
    let mut tasks: JoinSet<bool> = JoinSet::new();
    let mut in_flight = InFlight::default();
    // Housekeeping on its own clock, so that gauges and idle connections do not wait for the
    // loop's next wake-up (up to MAX_SLEEP on a quiet queue).
    let housekeeping = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
            loop {
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                ctx.pool.expire();
                // Noticed here too while no mail is due, for the log and the gauge.
                ctx.pause.check(&ctx.store, &ctx.metrics).await;
                update_queue_gauges(&ctx).await;
            }
        })
    };
    // Whether to ask the store for due mail on this turn. Reading the queue after every
    // finished message would cost O(queue) per message; refill on wake-ups, timers, and when
    // half the in-flight budget is free while the last scan left due mail behind (it filled
    // its limit). Fresh mail mostly arrives through the handoff and needs no scan at all.
    let mut refill = true;
    let mut more_due = false;
    // Fresh mail is picked up in receipt order past a high-water mark (a cheap range scan per
    // wake-up, O(new mail) instead of O(queue)); a full scan of everything due runs at start,
    // on the timer (deferred recipients whose time came, anything the mark skipped) and at
    // least every FULL_SCAN_EVERY.
    let mut high_water: Option<ReceiptId> = None;
    let mut full_scan = true;
    let mut last_full_scan = std::time::Instant::now();
    let mut next: Option<i64> = None;
    loop {
        if ctx.shutdown.is_cancelled() {
            break;
        }

        let now = now_ms();
        // The store cannot record what delivery would do: no new work, not even a queue
        // read, until it can (transactions running finish).
        let paused = ctx.pause.paused();
        let room = if paused {
            0
        } else {
            max_in_flight.saturating_sub(tasks.len())
        };
        if last_full_scan.elapsed() >= FULL_SCAN_EVERY {
            full_scan = true;
        }
        if (refill || full_scan) && room > 0 {
            // `due` lists in-flight recipients too; ask for enough to find `room` new
            // messages past them.
            // Incremental scans start right after the newest receipt taken: what they find is
            // new, so `room` is enough. A message whose receipt is older but whose commit
            // landed later (another batch) is left to the next full scan, at most
            // FULL_SCAN_EVERY away.
            let (after, limit) = if full_scan {
                (None, room.saturating_add(tasks.len()))
            } else {
                (high_water, room)
            };
            match ctx.store.due(now, limit, after).await {
                Ok(messages) => {
                    more_due = messages.len() >= limit;
                    for mut msg in messages {
                        high_water = high_water.max(Some(msg.receipt));
                        // Its copy is on the way from the listener.
                        if handoff.is_pending(&msg.receipt) {
                            continue;
                        }
                        msg.recipients
                            .retain(|r| !in_flight.contains(msg.receipt, r.index));
                        if msg.recipients.is_empty() {
                            continue;
                        }
                        if tasks.len() >= max_in_flight {
                            break;
                        }
                        in_flight.start(&mut tasks, &ctx, msg, None);
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot read the queue"),
            }
            if full_scan || tasks.is_empty() {
                next = match ctx.store.next_due_at().await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the queue");
                        Some(now + 1000)
                    }
                };
            }
            if full_scan {
                full_scan = false;
                last_full_scan = std::time::Instant::now();
            }
            refill = false;
        }
        // In-flight recipients keep `next` in the past; then wait for a task to finish.
        let wait_ms = match next {
            Some(t) if t > now => (t - now) as u64,
            Some(_) => 1000,
            None => MAX_SLEEP.as_millis() as u64,
        };
        let wait = Duration::from_millis(wait_ms).min(MAX_SLEEP);
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = wake.notified() => refill = true,
            Some(Fresh { message, body }) = fresh.recv(), if tasks.len() < max_in_flight && !ctx.pause.paused() => {
                // Marked in flight in the same turn as it leaves `pending`, so every scan
                // finds it in one of the two and leaves it alone.
                handoff.received(&message.receipt);
                in_flight.start(&mut tasks, &ctx, message, Some(body));
            }
            _ = tokio::time::sleep(wait) => full_scan = true,
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let mut rescan = in_flight.finished(done);
                while let Some(done) = tasks.try_join_next_with_id() {
                    rescan |= in_flight.finished(done);
                }
                full_scan |= rescan;
                refill = more_due && tasks.len() <= max_in_flight / 2;
            }
        }
    }
    housekeeping.abort();
    // Shutdown: running transactions finish (bounded); no new ones start.
    let grace = ctx.config.smtp.shutdown_grace;
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            running = tasks.len(),
            "delivery transactions still running after the shutdown grace period; abandoning them"
        );
        tasks.shutdown().await;
    }
    // Close idle connections.
    let idle: Vec<Leased> = {
        let mut st = ctx.pool.lock();
        st.idle.drain().flat_map(|(_, v)| v).collect()
    };
    for mut l in idle {
        l.conn.quit().await;
    }
}

/// Recipients being delivered, by the task delivering them: they stay due in the store until
/// recorded and must not be picked up twice. Keyed by task id so that even a task that
/// panicked gives its recipients back.
#[derive(Default)]
struct InFlight {
    by_task: HashMap<tokio::task::Id, Vec<(ReceiptId, u32)>>,
    recipients: HashSet<(ReceiptId, u32)>,
}

impl InFlight {
    fn contains(&self, receipt: ReceiptId, index: u32) -> bool {
        self.recipients.contains(&(receipt, index))
    }

    /// Marks `msg`'s recipients in flight and starts delivering them on `tasks`.
    fn start(
        &mut self,
        tasks: &mut JoinSet<bool>,
        ctx: &Arc<Context>,
        msg: QueuedMessage,
        body: Option<Arc<Vec<u8>>>,
    ) {
        let keys: Vec<(ReceiptId, u32)> = msg
            .recipients
            .iter()
            .map(|r| (msg.receipt, r.index))
            .collect();
        self.recipients.extend(keys.iter().copied());
        let handle = tasks.spawn(deliver_message(ctx.clone(), msg, body));
        self.by_task.insert(handle.id(), keys);
    }

    /// Gives a finished task's recipients back; returns whether the loop should rescan (the
    /// task left work for later, or failed).
    fn finished(&mut self, res: Result<(tokio::task::Id, bool), tokio::task::JoinError>) -> bool {
        let (id, rescan) = match res {
            Ok((id, rescan)) => (id, rescan),
            Err(e) => {
                tracing::error!(error = %e, "delivery task failed");
                (e.id(), true)
            }
        };
        for k in self.by_task.remove(&id).unwrap_or_default() {
            self.recipients.remove(&k);
        }
        rescan
    }
}

async fn update_queue_gauges(ctx: &Context) {
    if let Ok((pending, oldest)) = ctx.store.queue_stats().await {
        ctx.metrics.queue_size.set(pending as i64);
        let age = oldest.map(|t| ((now_ms() - t) / 1000).max(0)).unwrap_or(0);
        ctx.metrics.queue_oldest_age_seconds.set(age);
    }
}

/// Delivers the due recipients of one message: one transaction per batch, concurrently.
/// Returns whether it left work for later (see [`record`]).
async fn deliver_message(
    ctx: Arc<Context>,
    msg: QueuedMessage,
    body: Option<Arc<Vec<u8>>>,
) -> bool {
    let stored = match body {
        Some(b) => Ok(b),
        None => ctx.store.body(msg.receipt).await.map(Arc::new),
    };
    let body = match stored {
        Ok(b) => b,
        Err(crate::store::StoreError::NotFound(what)) => {
            // Nothing can ever be delivered; say so instead of retrying every second.
            tracing::error!(receipt = %msg.receipt, %what, "message body missing");
            let now = now_ms();
            let attempts = msg
                .recipients
                .iter()
                .map(|r| {
                    let mut a = local_outcome(msg.receipt, r.index, now, RecipientStatus::Failed);
                    a.enhanced_status = Some("5.3.0".to_string());
                    a.reply_text = format!("message body missing from the store: {what}");
                    a.reason = Some(BounceReason::SystemError.as_str().to_string());
                    a
                })
                .collect();
            return !record_attempts(&ctx, msg.receipt, attempts, Vec::new()).await;
        }
        Err(e) => {
            tracing::error!(receipt = %msg.receipt, error = %e, "cannot load message body");
            // The next scan finds the message due again: a pause first, so that a store that
            // cannot be read (a damaged page) is not asked again thousands of times a second.
            tokio::select! {
                _ = ctx.shutdown.cancelled() => {}
                _ = tokio::time::sleep(STORE_RETRY_FIRST) => {}
            }
            return true;
        }
    };
    let Some(msg) = withhold_suppressed(&ctx, msg, &body).await else {
        return true;
    };
    if msg.recipients.is_empty() {
        // All withheld; their DSN (queued mail itself) is picked up by the next pass.
        return true;
    }
    let msg = Arc::new(msg);
    let batches = route::plan(&ctx.config.routes, &msg, ctx.verp.is_some());
    let gather = Arc::new(Gather::new(batches.len()));
    let mut set = JoinSet::new();
    for batch in batches {
        let (ctx, msg, body, gather) = (ctx.clone(), msg.clone(), body.clone(), gather.clone());
        set.spawn(async move { run_batch(&ctx, &msg, &body, batch, &gather).await });
    }
    let mut rescan = false;
    while let Some(done) = set.join_next().await {
        rescan |= done.unwrap_or(true);
    }
    rescan
}

/// An outcome decided here, without a delivery attempt (stage `local`; not counted as an
/// attempt): the caller sets its status code, text and reason.
fn local_outcome(
    receipt: ReceiptId,
    rcpt_index: u32,
    at_ms: i64,
    status: RecipientStatus,
) -> AttemptRecord {
    AttemptRecord {
        receipt,
        rcpt_index,
        at_ms,
        status,
        next_attempt_at_ms: None,
        stage: Stage::Local,
        remote_host: None,
        remote_ip: None,
        remote_port: None,
        tls_version: None,
        tls_cipher: None,
        reply_code: None,
        enhanced_status: None,
        reply_text: String::new(),
        rcpt_reply: None,
        duration_ms: 0,
        reason: None,
        bounce_type: None,
        delay_dsn: false,
        tried_first: Vec::new(),
        suppress: None,
    }
}

/// `msg` without the recipients put on the suppression list since their last attempt (a
/// complaint, another message's hard bounce, `suppress add`): each is recorded `suppressed`
/// with a failure DSN, as at accept, instead of being tried again. A first attempt was
/// checked at RCPT and is not looked up again; a retry is looked up in memory (the list at
/// most [`crate::checks::suppressions::RECHECK`] old). `None` when the store could not be read or
/// written: the message stays due.
async fn withhold_suppressed(
    ctx: &Context,
    mut msg: QueuedMessage,
    body: &[u8],
) -> Option<QueuedMessage> {
    if !ctx.config.suppression.enabled || msg.recipients.iter().all(|r| r.attempts == 0) {
        return Some(msg);
    }
    let now = now_ms();
    let mut withheld = Vec::new();
    for r in msg.recipients.iter().filter(|r| r.attempts > 0) {
        match ctx.suppressions.lookup(&r.address, now).await {
            Ok(Some(entry)) => withheld.push((r.index, entry)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(receipt = %msg.receipt, error = %e, "cannot read the suppression list");
                // As for a body that cannot be read: a pause before the message is due again.
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => {}
                    _ = tokio::time::sleep(STORE_RETRY_FIRST) => {}
                }
                return None;
            }
        }
    }
    if withheld.is_empty() {
        return Some(msg);
    }
    let mut attempts = Vec::new();
    let mut reports: HashMap<ReportKind, Vec<ReportRecipient>> = HashMap::new();
    for (index, entry) in &withheld {
        let Some(rcpt) = msg.recipients.iter().find(|r| r.index == *index) else {
            continue;
        };
        let text = format!(
            "Recipient address suppressed since {} after {} ({}): not tried again",
            crate::cli::log::format_time(entry.first_at_ms),
            entry.source,
            entry.reason
        );
        tracing::info!(receipt = %msg.receipt, to = %rcpt.address, "suppressed while queued; not tried again");
        ctx.metrics.suppressed_recipients.inc();
        if ctx.config.delivery.dsn
            && !msg.envelope_sender.is_empty()
            && dsn::wanted(rcpt.notify, Action::Failed)
        {
            reports
                .entry(ReportKind::of(Action::Failed))
                .or_default()
                .push(ReportRecipient {
                    index: rcpt.index,
                    address: rcpt.address.clone(),
                    orcpt: rcpt.orcpt.clone(),
                    action: Action::Failed,
                    status: "5.7.1".to_string(),
                    remote_mta: None,
                    diagnostic: Some(text.clone()),
                    diagnostic_is_smtp: false,
                    last_attempt_ms: now,
                    will_retry_until_ms: None,
                    expired: false,
                });
        }
        let mut a = local_outcome(msg.receipt, rcpt.index, now, RecipientStatus::Suppressed);
        a.enhanced_status = Some("5.7.1".to_string());
        a.reply_text = text;
        a.reason = Some(BounceReason::Suppressed.as_str().to_string());
        a.bounce_type = Some(
            bounce_type(BounceReason::Suppressed, Some("5.7.1"), None)
                .as_str()
                .to_string(),
        );
        attempts.push(a);
    }
    let dsns = dsn_notices(ctx, &msg, body, reports, now);
    // Not recorded only when shutdown came first: the message stays due for the next start.
    if !record_attempts(ctx, msg.receipt, attempts, dsns).await {
        return None;
    }
    msg.recipients
        .retain(|r| !withheld.iter().any(|(index, _)| *index == r.index));
    Some(msg)
}

/// What one transaction attempt produced before it is recorded.
struct Outcome {
    results: Vec<RecipientResult>,
    remote_host: Option<String>,
    remote_ip: Option<String>,
    remote_port: Option<u16>,
    tls: Option<client::TlsInfo>,
    /// The deciding verdict input per recipient.
    kinds: Vec<AttemptResult>,
    /// Local reason and RFC 3463 status for failures decided without a remote reply (DNS).
    local_reason: Option<&'static str>,
    local_status: Option<&'static str>,
    /// The peer offered DSN (it will report success itself).
    remote_dsn: bool,
    /// Next hops tried and left before the one whose result this is.
    tried_first: Vec<crate::store::HopFailure>,
}

/// Returns whether it left work for later (see [`record`]).
async fn run_batch(
    ctx: &Context,
    msg: &QueuedMessage,
    body: &[u8],
    batch: Batch,
    gather: &Gather,
) -> bool {
    if ctx.shutdown.is_cancelled() {
        gather.leave();
        return false;
    }
    let started_ms = now_ms();
    let started = Instant::now();
    let recipients: Vec<&crate::store::QueuedRecipient> = batch
        .recipients
        .iter()
        .filter_map(|i| msg.recipients.iter().find(|r| r.index == *i))
        .collect();
    let sender = match batch.sender {
        SenderMode::Original => msg.envelope_sender.clone(),
        SenderMode::Verp => match (&ctx.verp, recipients.first()) {
            (Some(v), Some(r)) => v.sender(msg.receipt, r.index),
            _ => msg.envelope_sender.clone(),
        },
    };
    let envelope = Envelope {
        sender,
        recipients: recipients
            .iter()
            .map(|r| EnvelopeRecipient {
                address: r.address.clone(),
                notify: r.notify,
                orcpt: r.orcpt.clone(),
            })
            .collect(),
        ret: msg.ret,
        envid: msg.envid.clone(),
        eight_bit: msg.eight_bit,
        smtputf8: msg.smtputf8,
    };

    // `queue retry` after a fix: one probe of a suspended destination per retry.
    let retry_requested = recipients.iter().find_map(|r| r.retry_requested_at);
    let outcome = transact(ctx, &batch.destination, &envelope, body, retry_requested).await;
    let Some(outcome) = outcome else {
        gather.leave();
        return false;
    };
    let duration = started.elapsed();
    ctx.metrics
        .delivery_attempt_seconds
        .observe(duration.as_secs_f64());
    let (attempts, reports) = judge(ctx, msg, &recipients, outcome, started_ms, duration);
    gather.hand_in(ctx, msg, body, attempts, reports).await
}

/// One batch's attempt records and the DSN reports they call for, by kind.
type Judged = (
    Vec<AttemptRecord>,
    HashMap<ReportKind, Vec<ReportRecipient>>,
);

/// The batches of one message in one delivery pass. Those that end close together commit
/// together, so the sender gets one DSN per kind listing every recipient it is about (as
/// Postfix sends one bounce per message and pass), not one per recipient: under VERP every
/// recipient is a transaction of its own, and 30 failed recipients sent 30 DSNs. The first
/// batch to end waits up to [`GATHER_LINGER`] for the others, then commits all that have
/// ended; a batch ending later starts the next group. Each commit holds its attempts and
/// their DSN together, so a crash never loses a DSN; what the wait costs is at most
/// [`GATHER_LINGER`] more in the window where a delivered recipient is not yet recorded.
struct Gather {
    state: Mutex<GatherState>,
    ended: tokio::sync::Notify,
}

#[derive(Default)]
struct GatherState {
    /// Batches not ended yet.
    running: usize,
    /// Results of ended batches, not yet committed.
    parts: Vec<Judged>,
    /// A batch waits to commit them.
    led: bool,
}

/// How long the first batch of a message to end waits for the others (they usually end
/// within milliseconds: the same pass, the same replies).
const GATHER_LINGER: Duration = Duration::from_secs(2);

impl Gather {
    fn new(batches: usize) -> Self {
        Self {
            state: Mutex::new(GatherState {
                running: batches,
                ..Default::default()
            }),
            ended: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GatherState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A batch ended with nothing to record (shutdown came first).
    fn leave(&self) {
        self.lock().running -= 1;
        self.ended.notify_one();
    }

    /// Hands in one batch's results; the batch that leads the group commits it. Returns
    /// whether it left work for later (a recipient pending, a DSN queued, a write refused).
    async fn hand_in(
        &self,
        ctx: &Context,
        msg: &QueuedMessage,
        body: &[u8],
        attempts: Vec<AttemptRecord>,
        reports: HashMap<ReportKind, Vec<ReportRecipient>>,
    ) -> bool {
        let own = attempts.iter().any(|a| a.status.is_pending()) || !reports.is_empty();
        let lead = {
            let mut st = self.lock();
            st.parts.push((attempts, reports));
            st.running -= 1;
            !std::mem::replace(&mut st.led, true)
        };
        self.ended.notify_one();
        if !lead {
            return own;
        }
        let deadline = tokio::time::Instant::now() + GATHER_LINGER;
        while self.lock().running > 0 {
            tokio::select! {
                _ = self.ended.notified() => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = ctx.shutdown.cancelled() => break,
            }
        }
        let parts = {
            let mut st = self.lock();
            st.led = false;
            std::mem::take(&mut st.parts)
        };
        commit(ctx, msg, body, parts).await || own
    }
}

/// The retry jitter ([`retry::JITTER`]) of a message's recipients after their `attempt`-th
/// try: the same for all of them (so those deferred together come back together, in one
/// pass whose delay DSN lists them all, as Postfix retries a queue file), and spread
/// between messages. Drawn per recipient, three recipients of one message deferred
/// together came back up to 10 % of the interval apart, each pass on its own, and got two
/// or three delay DSNs.
fn jitter_unit(receipt: ReceiptId, attempt: u32) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    receipt.hash(&mut h);
    attempt.hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Deferred attempts of one group whose next tries lie within this of the latest take the
/// latest: batches judged apart (each VERP recipient is its own) differ by the time
/// between them, at most [`GATHER_LINGER`].
const RETRY_ALIGN: Duration = Duration::from_secs(4);

/// Gives the deferred `attempts` of one group due within [`RETRY_ALIGN`] of the latest of
/// them that latest time, so that they are retried in one pass.
fn align_retries(attempts: &mut [AttemptRecord]) {
    let Some(latest) = attempts.iter().filter_map(|a| a.next_attempt_at_ms).max() else {
        return;
    };
    let window = RETRY_ALIGN.as_millis() as i64;
    for a in attempts.iter_mut() {
        if let Some(next) = a.next_attempt_at_ms.as_mut()
            && latest - *next <= window
        {
            *next = latest;
        }
    }
}

/// One DSN per kind of report, each listing its recipients in address order.
fn dsn_notices(
    ctx: &Context,
    msg: &QueuedMessage,
    body: &[u8],
    reports: HashMap<ReportKind, Vec<ReportRecipient>>,
    now: i64,
) -> Vec<DsnNotice> {
    let mut dsns = Vec::new();
    for (_, mut list) in reports {
        list.sort_by(|a, b| a.address.cmp(&b.address));
        if let Some(m) = dsn::build(&ctx.config.hostname, msg, body, &list, now) {
            dsns.push(dsn::notice(msg.receipt, m, &list));
        }
    }
    dsns
}

/// Records the attempts of `parts` with one DSN per kind for all their reports, in one commit.
async fn commit(ctx: &Context, msg: &QueuedMessage, body: &[u8], parts: Vec<Judged>) -> bool {
    let mut attempts = Vec::new();
    let mut reports: HashMap<ReportKind, Vec<ReportRecipient>> = HashMap::new();
    for (a, r) in parts {
        attempts.extend(a);
        for (kind, list) in r {
            reports.entry(kind).or_default().extend(list);
        }
    }
    align_retries(&mut attempts);
    let now = now_ms();
    let dsns = dsn_notices(ctx, msg, body, reports, now);
    let had_dsns = !dsns.is_empty();
    let pending = attempts.iter().any(|a| a.status.is_pending());
    if !record_attempts(ctx, msg.receipt, attempts, dsns).await {
        return true;
    }
    if had_dsns {
        // The DSNs are queued mail themselves; the loop picks them up on its next pass.
        tracing::debug!(receipt = %msg.receipt, "DSN queued");
    }
    had_dsns || pending
}

/// A connection for one transaction to `dest`: a pooled one (true) or a new one (false).
/// `Err(None)` when shutdown came first; `Err(Some(outcome))` when no connection could be
/// had (DNS, connect, greeting), as the outcome for all `n` recipients.
async fn lease(
    ctx: &Context,
    dest: &Destination,
    settings: &SessionSettings,
    n: usize,
    retry_requested: Option<i64>,
) -> Result<(Leased, bool), Option<Outcome>> {
    let mut probe = None;
    loop {
        let is_probe = match probe {
            Some(p) => p,
            None => match ctx.admit(dest, retry_requested) {
                Admission::Go { probe: p } => *probe.insert(p),
                Admission::Suspended(e) => return Err(Some(connect_failure(&e, n, true))),
                Admission::Wait => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = ctx.shutdown.cancelled() => return Err(None),
                    }
                }
            },
        };
        let slot = tokio::select! {
            s = ctx.pool.acquire(dest) => s.ok_or(None)?,
            _ = ctx.shutdown.cancelled() => return Err(None),
        };
        let (global, dest_permit) = match slot {
            Slot::Idle(mut l) => {
                if l.conn.ready().await {
                    return Ok((*l, true));
                }
                // A connection that fails RSET is dropped, freeing its permits.
                continue;
            }
            Slot::New(g, d) => (g, d),
        };
        if ctx.shutdown.is_cancelled() {
            return Err(None);
        }
        let targets = match ctx.targets(dest).await {
            Ok(t) => t,
            Err(f) => {
                let kind = if f.permanent {
                    AttemptResult::Permanent
                } else {
                    AttemptResult::Temporary
                };
                return Err(Some(Outcome {
                    results: vec![
                        RecipientResult {
                            stage: Stage::Dns,
                            reply: None,
                            text: f.text.clone(),
                            local_permanent: None,
                            rcpt_reply: None,
                        };
                        n
                    ],
                    remote_host: None,
                    remote_ip: None,
                    remote_port: None,
                    tls: None,
                    kinds: vec![kind; n],
                    local_reason: Some(f.reason),
                    local_status: Some(f.enhanced_status),
                    remote_dsn: false,
                    tried_first: Vec::new(),
                }));
            }
        };
        // Counted from the connect on: a connection waiting for a slow greeting is open too.
        ctx.metrics.outbound_connections_open.inc();
        let connected = client::connect(&targets, settings).await;
        if connected.is_err() {
            ctx.metrics.outbound_connections_open.dec();
        }
        match connected {
            Ok(conn) => {
                ctx.resume(dest);
                let leased = Leased {
                    conn,
                    permits: Some((global, dest_permit)),
                    gauge: ctx.metrics.outbound_connections_open.clone(),
                    idle_since: Instant::now(),
                };
                return Ok((leased, false));
            }
            Err(e) => {
                if !e.permanent || is_probe {
                    ctx.suspend(dest, &e, retry_requested.filter(|_| is_probe));
                }
                return Err(Some(connect_failure(&e, n, false)));
            }
        }
    }
}

/// The outcome for all `n` recipients of a transaction that had no connection.
/// `suspended`: `e` is the failure the destination is suspended for, not this transaction's
/// own; the text says so, whole (this transaction had no reply of its own to show).
fn connect_failure(e: &client::SessionError, n: usize, suspended: bool) -> Outcome {
    let kind = match (&e.reply, e.permanent) {
        (Some(r), true) => AttemptResult::Reply(r.code),
        (_, true) => AttemptResult::Permanent,
        _ => AttemptResult::Temporary,
    };
    let text = match &e.reply {
        _ if suspended => format!("delivery temporarily suspended: {}", e.text),
        Some(r) => r.text.clone(),
        None => e.text.clone(),
    };
    Outcome {
        results: vec![
            RecipientResult {
                stage: Stage::Connect,
                reply: e.reply.clone(),
                text,
                local_permanent: None,
                rcpt_reply: None,
            };
            n
        ],
        remote_host: e.remote_host.clone(),
        remote_ip: e.remote_ip.map(|ip| ip.to_string()),
        remote_port: e.remote_port,
        tls: e.tls.clone(),
        kinds: vec![kind; n],
        local_reason: e.security.then_some("securityerror"),
        local_status: None,
        remote_dsn: false,
        // A suspension's error is another transaction's: this one tried no hop.
        tried_first: if suspended {
            Vec::new()
        } else {
            e.tried_first.clone()
        },
    }
}

/// Connects (or reuses a connection) and runs the transaction. `None` when shutdown came
/// before anything was sent, or delivery is paused ([`Pause`]).
async fn transact(
    ctx: &Context,
    dest: &Destination,
    envelope: &Envelope,
    body: &[u8],
    retry_requested: Option<i64>,
) -> Option<Outcome> {
    let n = envelope.recipients.len();
    let settings = ctx.settings(dest);
    loop {
        // Nothing new starts while the store cannot record it: the recipients stay queued,
        // untried (the loop takes no more work either).
        if ctx.pause.check(&ctx.store, &ctx.metrics).await {
            return None;
        }
        let (mut leased, reused) = match lease(ctx, dest, settings, n, retry_requested).await {
            Ok(l) => l,
            Err(outcome) => return outcome,
        };
        if ctx.pause.check(&ctx.store, &ctx.metrics).await {
            // It went bad while this waited for a connection.
            ctx.pool.put_idle(dest.clone(), leased);
            return None;
        }
        let replies = leased
            .conn
            .transaction(envelope, body, settings.data_timeout)
            .await;
        if reused && replies.nothing_received() {
            // The server closed the idle connection (its timeout, a restart): nothing of this
            // transaction reached it. Drop the connection and run it on another one, as if this
            // try had not happened.
            tracing::debug!(host = %leased.conn.host, error = ?replies.error, "reused connection was closed; reconnecting");
            continue;
        }
        let results = client::per_recipient(&replies);
        let kinds = results
            .iter()
            .map(|r| match (&r.reply, r.local_permanent) {
                (Some(reply), _) => AttemptResult::Reply(reply.code),
                (None, Some(_)) => AttemptResult::Permanent,
                (None, None) => AttemptResult::Temporary,
            })
            .collect();
        let outcome = Outcome {
            results,
            remote_host: Some(leased.conn.host.clone()),
            remote_ip: Some(leased.conn.ip.to_string()),
            remote_port: Some(leased.conn.port),
            tls: leased.conn.tls.clone(),
            kinds,
            local_reason: None,
            local_status: None,
            remote_dsn: leased.conn.offers_dsn(),
            // Only the connection's first transaction tried its way to it.
            tried_first: std::mem::take(&mut leased.conn.tried_first),
        };
        if replies.error.is_none() && !ctx.shutdown.is_cancelled() {
            ctx.pool.put_idle(dest.clone(), leased);
        } else if replies.error.is_none() {
            leased.conn.quit().await;
        }
        return Some(outcome);
    }
}

/// Turns an outcome into attempt records and the DSN reports they call for (counted in the
/// metrics and logged here; committed by the batch's [`Gather`]).
/// The suppression-list entry for a recipient a receiving server refused for good with a
/// hard reason (`550 5.1.1` at RCPT: userunknown; a null MX's notaccept): a synchronous hard
/// bounce suppresses as a DSN's does (as Amazon SES's list takes both). Only a remote reply
/// that speaks of this recipient counts ([`speaks_of_the_recipient`]); a locally decided
/// failure (expiry, a missing body) says nothing of the address. `hard_reason`: the reason,
/// when the classifier found it hard.
fn hard_failure_suppression(
    ctx: &Context,
    address: &str,
    status: RecipientStatus,
    result: &client::RecipientResult,
    transaction_recipients: usize,
    hard_reason: Option<&str>,
    now: i64,
) -> Option<crate::store::Suppression> {
    let s = &ctx.config.suppression;
    let reason = hard_reason?;
    if !s.enabled || status != RecipientStatus::Failed {
        return None;
    }
    let about_recipient = result.reply.as_ref().is_some_and(|r| {
        speaks_of_the_recipient(
            result.stage,
            transaction_recipients,
            r.enhanced_status.as_deref(),
            &r.text,
        )
    });
    if !about_recipient {
        return None;
    }
    Some(crate::store::Suppression {
        address: address.to_string(),
        reason: reason.to_string(),
        source: "bounce".to_string(),
        first_at_ms: now,
        last_at_ms: now,
        count: 1,
        expires_at_ms: s.expires_at(now),
    })
}

/// Whether a permanent refusal speaks of the recipient's own mailbox, so that it may
/// suppress that address: not a DATA reply to a transaction of several recipients (one
/// reply for all, RFC 5321 4.2.5: it cannot say which mailbox is unknown), and not a reply
/// about the sender, which Postfix gives at RCPT (`550 5.1.0 <app@...>: Sender address
/// rejected: User unknown in local recipient table`; RFC 3463 X.1.7 and X.1.8 are the bad
/// sender's codes): one bad sender address put every recipient on the list.
fn speaks_of_the_recipient(
    stage: Stage,
    transaction_recipients: usize,
    enhanced_status: Option<&str>,
    text: &str,
) -> bool {
    if stage == Stage::Data && transaction_recipients > 1 {
        return false;
    }
    if enhanced_status.is_some_and(|e| {
        e.get(1..)
            .is_some_and(|rest| rest == ".1.7" || rest == ".1.8")
    }) {
        return false;
    }
    let text = text.to_ascii_lowercase();
    ![
        "sender address",
        "sender rejected",
        "sender domain",
        "sender verif",
        "bad sender",
    ]
    .iter()
    .any(|w| text.contains(w))
}

fn judge(
    ctx: &Context,
    msg: &QueuedMessage,
    recipients: &[&crate::store::QueuedRecipient],
    outcome: Outcome,
    started_ms: i64,
    duration: Duration,
) -> Judged {
    let now = now_ms();
    let mut attempts = Vec::with_capacity(recipients.len());
    let mut reports: HashMap<ReportKind, Vec<ReportRecipient>> = HashMap::new();
    for ((rcpt, result), kind) in recipients
        .iter()
        .zip(outcome.results.iter())
        .zip(outcome.kinds.iter())
    {
        let unit = jitter_unit(msg.receipt, rcpt.attempts.saturating_add(1));
        let v = retry::verdict(
            &ctx.policy,
            *kind,
            msg.received_at_ms,
            now,
            rcpt.attempts.saturating_add(1),
            unit,
        );
        let text = result.text.clone();
        let enhanced = result
            .reply
            .as_ref()
            .and_then(|r| r.enhanced_status.clone())
            .or(result.local_permanent.map(str::to_string))
            .or(outcome.local_status.map(str::to_string));
        let (reason, bounce_type) = match classify(
            ctx.classifier(),
            v.status,
            result,
            enhanced.as_deref(),
            outcome.local_reason,
        ) {
            Some((r, t)) => (Some(r.as_str().to_string()), Some(t.as_str().to_string())),
            None => (None, None),
        };
        if let Some(r) = &result.reply {
            ctx.metrics
                .delivery_replies
                .get_or_create(&class_of(r.code))
                .inc();
        }
        ctx.metrics
            .delivery_recipients
            .get_or_create(&OutcomeLabel {
                outcome: v.status.as_str().to_string(),
            })
            .inc();
        if matches!(
            v.status,
            RecipientStatus::Delivered | RecipientStatus::Failed | RecipientStatus::Expired
        ) {
            ctx.metrics
                .time_to_final_seconds
                .observe(((now - msg.received_at_ms).max(0) as f64) / 1000.0);
        }

        // DSN decision: what happened, if the sender asked to hear of it.
        let action = match v.status {
            RecipientStatus::Failed | RecipientStatus::Expired => Some(Action::Failed),
            RecipientStatus::Deferred => {
                let since = rcpt.first_deferred_at_ms.unwrap_or(now);
                let long_enough = now.saturating_sub(since)
                    >= ctx.config.delivery.delay_dsn_after.as_millis() as i64;
                (long_enough && !rcpt.delay_dsn_sent).then_some(Action::Delayed)
            }
            RecipientStatus::Delivered if !outcome.remote_dsn => Some(Action::Relayed),
            // A DSN-capable peer got NOTIFY passed on and reports success itself.
            _ => None,
        }
        .filter(|&a| {
            ctx.config.delivery.dsn
                && !msg.envelope_sender.is_empty()
                && dsn::wanted(rcpt.notify, a)
        });
        if let Some(action) = action {
            let code = result.reply.as_ref().map(|r| r.code);
            let diagnostic = match &result.reply {
                Some(r) => Some(r.display()),
                None => Some(result.text.clone()),
            };
            let expired = v.status == RecipientStatus::Expired;
            reports
                .entry(ReportKind::of(action))
                .or_default()
                .push(ReportRecipient {
                    index: rcpt.index,
                    address: rcpt.address.clone(),
                    orcpt: rcpt.orcpt.clone(),
                    action,
                    // RFC 3463 X.4.7, which a reader (Sisimai) reads as expired; the last
                    // reply stays in Diagnostic-Code.
                    status: if expired {
                        "4.4.7".to_string()
                    } else {
                        dsn::status_for(code, enhanced.as_deref(), action)
                    },
                    remote_mta: outcome.remote_host.clone(),
                    diagnostic,
                    diagnostic_is_smtp: result.reply.is_some(),
                    last_attempt_ms: started_ms,
                    will_retry_until_ms: (action == Action::Delayed)
                        .then(|| ctx.policy.expires_at_ms(msg.received_at_ms)),
                    expired,
                });
        }

        let suppress = hard_failure_suppression(
            ctx,
            &rcpt.address,
            v.status,
            result,
            recipients.len(),
            reason
                .as_deref()
                .filter(|_| bounce_type.as_deref() == Some(BounceType::Hard.as_str())),
            now,
        );
        attempts.push(AttemptRecord {
            receipt: msg.receipt,
            rcpt_index: rcpt.index,
            at_ms: started_ms,
            status: v.status,
            next_attempt_at_ms: v.next_attempt_at_ms,
            stage: result.stage,
            remote_host: outcome.remote_host.clone(),
            remote_ip: outcome.remote_ip.clone(),
            remote_port: outcome.remote_port,
            tls_version: outcome.tls.as_ref().map(|t| t.recorded_version()),
            tls_cipher: outcome.tls.as_ref().map(|t| t.cipher.clone()),
            reply_code: result.reply.as_ref().map(|r| r.code),
            enhanced_status: enhanced,
            reply_text: text,
            rcpt_reply: result.rcpt_reply.as_ref().map(|r| crate::store::RcptReply {
                code: r.code,
                enhanced_status: r.enhanced_status.clone(),
                text: r.text.clone(),
            }),
            duration_ms: duration.as_millis() as u64,
            reason,
            bounce_type,
            delay_dsn: action == Some(Action::Delayed),
            tried_first: outcome.tried_first.clone(),
            suppress,
        });
    }
    for a in &attempts {
        let remote = match (&a.remote_host, &a.remote_ip, a.remote_port) {
            (Some(host), Some(ip), Some(port)) => match ip.parse() {
                Ok(ip) => client::server_name(host, ip, port),
                Err(_) => host.clone(),
            },
            (Some(host), _, _) => host.clone(),
            _ => "-".to_string(),
        };
        tracing::info!(
            receipt = %a.receipt,
            rcpt = a.rcpt_index,
            status = %a.status,
            stage = ?a.stage,
            %remote,
            code = a.reply_code.unwrap_or(0),
            text = %a.reply_text,
            tried_first = %a
                .tried_first
                .iter()
                .map(|h| format!("{}: {}", h.hop, h.text))
                .collect::<Vec<_>>()
                .join("; "),
            "delivery attempt"
        );
    }
    (attempts, reports)
}

/// Records `attempts` and the DSNs they caused; while the store refuses the write (a full
/// disk, a failed fsync) tries again after a pause that doubles up to [`STORE_RETRY_MAX`].
/// The recipients stay in flight meanwhile, so one that a remote server already accepted is
/// not delivered again each time the queue is read: what is not recorded yet is held here,
/// not redone. False only when shutdown came first: then they are delivered again after the
/// restart, the duplicate window of a remote `250` not yet recorded (docs/architecture.md).
async fn record_attempts(
    ctx: &Context,
    receipt: ReceiptId,
    attempts: Vec<AttemptRecord>,
    dsns: Vec<DsnNotice>,
) -> bool {
    let mut pause = STORE_RETRY_FIRST;
    // Held from the first refusal until the record is in (or given up at shutdown).
    let mut waiting = None;
    loop {
        // A clone per try: the store takes them, and a refused write gives nothing back.
        let Err(e) = ctx
            .store
            .record_attempts(attempts.clone(), dsns.clone())
            .await
        else {
            return true;
        };
        if waiting.is_none() {
            waiting = Some(ctx.pause.record_waits(&ctx.metrics, &e.to_string()));
        }
        tracing::error!(
            %receipt,
            error = %e,
            retry_in = ?pause,
            "cannot record delivery attempts; trying again (their recipients are not delivered again meanwhile)"
        );
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                tracing::error!(%receipt, "shutdown with delivery attempts not recorded: their recipients are delivered again after the restart");
                return false;
            }
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(STORE_RETRY_MAX);
    }
}

/// Reason and bounce type (Sisimai vocabulary) of a recipient that was not delivered: the
/// expiry itself, the local DNS verdict, or the bounce classifier's reading of the reply —
/// the same labels an asynchronous bounce with that content would get.
fn classify(
    classifier: &Classifier,
    status: RecipientStatus,
    result: &RecipientResult,
    enhanced: Option<&str>,
    local_reason: Option<&str>,
) -> Option<(BounceReason, BounceType)> {
    let code = result.reply.as_ref().map(|r| r.code);
    let reason = match status {
        RecipientStatus::Expired => BounceReason::Expired,
        RecipientStatus::Failed | RecipientStatus::Deferred => {
            if let Some(r) = local_reason.and_then(|r| r.parse::<BounceReason>().ok()) {
                r
            } else if let Some(reply) = &result.reply
                && result.stage == Stage::Connect
                && matches!(reply.code, 454 | 534 | 535 | 538)
            {
                // What only AUTH and STARTTLS answer (RFC 4954 6: credentials refused, a
                // mechanism too weak, encryption required; 454 a temporary failure of
                // either): our own credentials or TLS, not a block of this client, which
                // is what a refusal at connection time reads as otherwise.
                BounceReason::SecurityError
            } else if let Some(reply) = &result.reply {
                let command = match result.stage {
                    Stage::Mail => Some("MAIL"),
                    Stage::Rcpt => Some("RCPT"),
                    Stage::Data => Some("DATA"),
                    Stage::Connect => Some("CONN"),
                    Stage::Dns | Stage::Local | Stage::Bounce => None,
                };
                return Some(classifier.classify_reply(reply.code, enhanced, &reply.text, command));
            } else if let Some(r) = lost_session_reason(result) {
                r
            } else {
                // No action for a deferral: "delayed" is what a delay DSN says, and reads as
                // `expired` (Sisimai's reason for it), which a recipient still being retried
                // is not; the text (a timeout, a refused connection) decides.
                let failed = status == RecipientStatus::Failed;
                classifier.reason(&Evidence {
                    status: enhanced,
                    reply_code: None,
                    diagnostic: &result.text,
                    action: failed.then_some("failed"),
                    command: None,
                })
            }
        }
        _ => return None,
    };
    Some((reason, bounce_type(reason, enhanced, code)))
}

/// The reason of a recipient whose session ended without its reply (a refused connection,
/// a reset, a timeout): the text is mailtrail's own, not a server's, so the rules for
/// server texts do not read it ("connection reset by peer" in a bounce means the server
/// blocked its client; here it means the network lost a connection). A TLS failure comes
/// as the connection's `securityerror` before this. `None` for a recipient with a reply
/// or decided here with a status of its own.
fn lost_session_reason(result: &RecipientResult) -> Option<BounceReason> {
    if result.reply.is_some() || result.local_permanent.is_some() {
        return None;
    }
    match result.stage {
        Stage::Connect | Stage::Mail | Stage::Rcpt | Stage::Data => {
            Some(BounceReason::NetworkError)
        }
        Stage::Dns | Stage::Local | Stage::Bounce => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::delivery::client::Reply;

    #[test]
    fn an_empty_smarthost_password_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "\n").unwrap();
        let route: RouteConfig = toml::from_str(&format!(
            "domains = [\"x.test\"]\nmx = [\"h.test:587\"]\nauth_user = \"apikey\"\n\
             auth_password_file = {:?}\n",
            path.display().to_string()
        ))
        .unwrap();
        let e = route_auth(0, &route).unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");
        std::fs::write(&path, "s3cret\n").unwrap();
        let (user, secret) = route_auth(0, &route).unwrap().unwrap();
        assert_eq!((user.as_str(), secret.0.as_str()), ("apikey", "s3cret"));
    }

    fn replied(code: u16, esc: &str, text: &str) -> RecipientResult {
        RecipientResult {
            stage: Stage::Rcpt,
            reply: Some(Reply {
                code,
                enhanced_status: Some(esc.to_string()),
                text: text.to_string(),
            }),
            text: text.to_string(),
            local_permanent: None,
            rcpt_reply: None,
        }
    }

    fn local(text: &str) -> RecipientResult {
        RecipientResult {
            stage: Stage::Dns,
            reply: None,
            text: text.to_string(),
            local_permanent: None,
            rcpt_reply: None,
        }
    }

    #[test]
    fn a_refused_login_at_the_next_hop_is_a_security_error_not_a_block() {
        let c = Classifier::builtin();
        let mut auth = replied(535, "5.7.8", "Authentication credentials invalid");
        auth.stage = Stage::Connect;
        assert_eq!(
            classify(c, RecipientStatus::Deferred, &auth, Some("5.7.8"), None).map(|r| r.0),
            Some(BounceReason::SecurityError)
        );
        // A refusal of the connection itself still reads as a block.
        let mut greeting = replied(554, "5.7.1", "Your IP is on our block list");
        greeting.stage = Stage::Connect;
        assert_eq!(
            classify(c, RecipientStatus::Failed, &greeting, Some("5.7.1"), None).map(|r| r.0),
            Some(BounceReason::Blocked)
        );
    }

    #[test]
    fn replies_get_the_bounce_classifiers_labels() {
        let c = Classifier::builtin();
        let r = replied(550, "5.1.1", "user unknown");
        assert_eq!(
            classify(c, RecipientStatus::Failed, &r, Some("5.1.1"), None),
            Some((BounceReason::UserUnknown, BounceType::Hard))
        );
        let r = replied(452, "4.2.2", "mailbox full");
        let (reason, kind) =
            classify(c, RecipientStatus::Deferred, &r, Some("4.2.2"), None).unwrap();
        assert_eq!(reason, BounceReason::MailboxFull);
        assert_eq!(kind, BounceType::Soft);
        // A first deferral is no expiry, whatever status it carries, but X.4.7.
        let r = replied(451, "4.3.0", "try later");
        let (reason, _) = classify(c, RecipientStatus::Deferred, &r, Some("4.3.0"), None).unwrap();
        assert_eq!(reason, BounceReason::OnHold);
        let r = replied(451, "4.4.7", "message too old");
        let (reason, _) = classify(c, RecipientStatus::Deferred, &r, Some("4.4.7"), None).unwrap();
        assert_eq!(reason, BounceReason::Expired);
        assert_eq!(
            classify(
                c,
                RecipientStatus::Delivered,
                &replied(250, "2.0.0", "ok"),
                None,
                None
            ),
            None
        );
    }

    #[test]
    fn local_verdicts_and_expiry_keep_their_own_reason() {
        let c = Classifier::builtin();
        assert_eq!(
            classify(
                c,
                RecipientStatus::Failed,
                &local("null MX"),
                Some("5.1.10"),
                Some("notaccept")
            ),
            Some((BounceReason::NotAccept, BounceType::Hard))
        );
        assert_eq!(
            classify(
                c,
                RecipientStatus::Failed,
                &local("NXDOMAIN"),
                Some("5.1.2"),
                Some("hostunknown")
            ),
            Some((BounceReason::HostUnknown, BounceType::Hard))
        );
        let expired = classify(
            c,
            RecipientStatus::Expired,
            &replied(451, "4.3.0", "try later"),
            Some("4.3.0"),
            None,
        )
        .unwrap();
        assert_eq!(expired.0, BounceReason::Expired);
        assert_ne!(expired.1, BounceType::Hard);
    }

    #[test]
    fn a_deferral_without_a_reply_is_not_called_expired() {
        let c = Classifier::builtin();
        for text in [
            "timeout waiting for the server",
            "connection closed by server",
            "mx.test [127.0.0.1]: connect: Connection refused (os error 111)",
            "unparseable reply: \"hello\"",
        ] {
            let (reason, kind) =
                classify(c, RecipientStatus::Deferred, &local(text), None, None).unwrap();
            assert_ne!(reason, BounceReason::Expired, "{text}");
            assert_ne!(kind, BounceType::Hard, "{text}");
        }
    }

    #[test]
    fn a_messages_recipients_share_their_jitter_and_messages_do_not() {
        let r = ReceiptId::new();
        let u = jitter_unit(r, 2);
        assert!((0.0..1.0).contains(&u), "{u}");
        assert_eq!(jitter_unit(r, 2), u);
        let others: Vec<f64> = (0..20).map(|_| jitter_unit(ReceiptId::new(), 2)).collect();
        assert!(others.iter().any(|o| (o - u).abs() > 0.01), "{others:?}");
    }

    #[test]
    fn only_a_refusal_of_the_recipient_itself_may_suppress_it() {
        let unknown = "5.1.1 <bob@dest.test>: Recipient address rejected: User unknown";
        assert!(speaks_of_the_recipient(
            Stage::Rcpt,
            3,
            Some("5.1.1"),
            unknown
        ));
        assert!(speaks_of_the_recipient(
            Stage::Rcpt,
            1,
            None,
            "user unknown"
        ));
        // One DATA reply for three recipients names none of them; for one, it does.
        assert!(!speaks_of_the_recipient(
            Stage::Data,
            3,
            Some("5.1.1"),
            "user unknown"
        ));
        assert!(speaks_of_the_recipient(
            Stage::Data,
            1,
            Some("5.1.1"),
            "user unknown"
        ));
        // Postfix's sender restrictions, reported at RCPT.
        let sender =
            "<app@snd.test>: Sender address rejected: User unknown in local recipient table";
        assert!(!speaks_of_the_recipient(
            Stage::Rcpt,
            1,
            Some("5.1.0"),
            sender
        ));
        assert!(!speaks_of_the_recipient(
            Stage::Rcpt,
            1,
            Some("5.1.7"),
            "<app@snd.test>: undeliverable address: 550 5.1.1 user unknown"
        ));
        assert!(!speaks_of_the_recipient(
            Stage::Rcpt,
            1,
            Some("5.1.8"),
            "Access denied"
        ));
    }

    #[test]
    fn retries_of_one_group_close_together_are_aligned_to_the_latest() {
        let at = |next: Option<i64>| {
            let status = if next.is_some() {
                RecipientStatus::Deferred
            } else {
                RecipientStatus::Delivered
            };
            let mut a = local_outcome(ReceiptId::new(), 0, 90_000, status);
            a.next_attempt_at_ms = next;
            a.stage = Stage::Rcpt;
            a.reply_code = Some(451);
            a
        };
        let mut group = [
            at(Some(100_000)),
            at(Some(103_000)),
            at(None),
            at(Some(98_000)),
        ];
        align_retries(&mut group);
        let next: Vec<Option<i64>> = group.iter().map(|a| a.next_attempt_at_ms).collect();
        // 98,000 is 5 s before the latest: another step of the schedule, left alone.
        assert_eq!(next, [Some(103_000), Some(103_000), None, Some(98_000)]);
    }

    fn session_error(text: &str) -> client::SessionError {
        client::SessionError {
            remote_host: Some("mx.test".into()),
            ..client::SessionError::at_connect(text.to_string())
        }
    }

    #[test]
    fn a_session_lost_without_its_reply_is_a_network_error_not_a_block() {
        let c = Classifier::builtin();
        let lost = |stage, text: &str| RecipientResult {
            stage,
            reply: None,
            text: text.to_string(),
            local_permanent: None,
            rcpt_reply: None,
        };
        // A server's "connection reset by peer" reads as blocked; our own reset does not.
        for (stage, text) in [
            (
                Stage::Data,
                "sending the message: Connection reset by peer (os error 104)",
            ),
            (
                Stage::Data,
                "after end of data: connection closed by server",
            ),
            (
                Stage::Connect,
                "mx.test [127.0.0.1]: connect: Connection refused (os error 111)",
            ),
            (Stage::Rcpt, "timeout waiting for the server"),
        ] {
            assert_eq!(
                classify(c, RecipientStatus::Deferred, &lost(stage, text), None, None),
                Some((BounceReason::NetworkError, BounceType::Soft)),
                "{text}"
            );
        }
        // A failure for want of TLS, as connect_failure gives it, whatever its words.
        let e = client::SessionError {
            security: true,
            ..session_error("mx.test [127.0.0.1]: TLS handshake: invalid peer certificate")
        };
        let tls = connect_failure(&e, 1, false);
        assert_eq!(
            classify(
                c,
                RecipientStatus::Deferred,
                &tls.results[0],
                None,
                tls.local_reason
            ),
            Some((BounceReason::SecurityError, BounceType::Soft))
        );
        let plain = connect_failure(
            &session_error("mx.test [127.0.0.1]: connect: refused"),
            1,
            true,
        );
        assert_eq!(plain.local_reason, None);
        assert_eq!(
            classify(c, RecipientStatus::Deferred, &plain.results[0], None, None),
            Some((BounceReason::NetworkError, BounceType::Soft))
        );
        // A recipient refused here keeps the reading of its own status.
        let mut utf8 = lost(Stage::Mail, "SMTPUTF8 is required but not offered");
        utf8.local_permanent = Some("5.6.7");
        let (reason, _) = classify(c, RecipientStatus::Failed, &utf8, Some("5.6.7"), None).unwrap();
        assert_ne!(reason, BounceReason::NetworkError);
    }
}
