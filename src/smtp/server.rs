//! The tokio shell around [`Session`]: one accept loop per listener (plain with STARTTLS, or
//! implicit TLS), a task per connection that moves bytes and timers between the socket and the
//! session and answers the session's requests (AUTH, recipient policy, store), connection
//! limits, and graceful shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth::{AuthError, Authenticator};
use super::policy::RecipientPolicy;
use super::reply::Reply;
use super::session::{Action, Peer, Session, SessionConfig};
use super::tls::{self, TlsError};
use crate::config::Config;
use crate::metrics::{Metrics, class_of};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        addr: SocketAddr,
        /// `smtp.listen` or `smtp.tls_listen`.
        key: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// The inbound SMTP server: every listener bound and TLS loaded, ready to [`SmtpServer::run`].
pub struct SmtpServer {
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
}

struct Listener {
    socket: TcpListener,
    /// RFC 8314 implicit TLS: the handshake comes before the banner.
    implicit_tls: bool,
}

/// What every connection task needs.
struct Shared {
    config: Arc<Config>,
    session: SessionConfig,
    tls: TlsAcceptor,
    store: Arc<dyn Store>,
    policy: Arc<dyn RecipientPolicy>,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    limits: ConnectionLimits,
    /// TLS handshakes under way to tell an over-limit client of the implicit-TLS listener
    /// its `421` ([`MAX_REFUSAL_HANDSHAKES`]).
    refusal_handshakes: Arc<Semaphore>,
    /// Told around each durable accept, so the next stage looks now instead of at its next
    /// timer.
    on_accept: Option<Arc<dyn AcceptHook>>,
}

/// Told about every message the listener stores (see [`SmtpServer::with_accept_hook`]).
pub trait AcceptHook: Send + Sync {
    /// Before the store write: `true` asks for a copy of the message after the commit. A claim
    /// is always followed by [`stored`](Self::stored) with the copy or by
    /// [`not_stored`](Self::not_stored).
    fn claim(&self, _msg: &crate::spool::AcceptedMessage) -> bool {
        false
    }
    /// After the commit; `claimed` is the message when `claim` said `true`.
    fn stored(&self, inbound_bounce: bool, claimed: Option<crate::spool::AcceptedMessage>);
    /// The write of a claimed message failed: nothing was stored.
    fn not_stored(&self, _receipt: crate::receipt::ReceiptId) {}
}

impl SmtpServer {
    /// Binds `smtp.listen` and `smtp.tls_listen`, loads or generates the TLS certificate and
    /// checks the AUTH users' hashes, so that `serve` reports every start-up error at once.
    pub async fn bind(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        policy: Arc<dyn RecipientPolicy>,
        metrics: Arc<Metrics>,
    ) -> Result<SmtpServer, ServerError> {
        let tls_config = tls::server_config(&config)?;
        let auth = Arc::new(Authenticator::new(
            &config.smtp.users,
            config.smtp.auth_failure_limit,
            config.smtp.auth_failure_window,
        )?);
        let mut listeners = Vec::new();
        for (addrs, implicit_tls, key) in [
            (&config.smtp.listen, false, "smtp.listen"),
            (&config.smtp.tls_listen, true, "smtp.tls_listen"),
        ] {
            for &addr in addrs {
                let socket = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, key, source })?;
                listeners.push(Listener {
                    socket,
                    implicit_tls,
                });
            }
        }
        let shared = Shared {
            session: SessionConfig::from_config(
                &config,
                true,
                metrics.smtp_content_memory_bytes.clone(),
            ),
            tls: TlsAcceptor::from(tls_config),
            limits: ConnectionLimits::new(
                config.smtp.max_connections,
                config.smtp.max_connections_per_ip,
            ),
            refusal_handshakes: Arc::new(Semaphore::new(MAX_REFUSAL_HANDSHAKES)),
            config,
            store,
            policy,
            auth,
            metrics,
            on_accept: None,
        };
        Ok(SmtpServer {
            listeners,
            shared: Arc::new(shared),
        })
    }

    /// Calls `hook` around every message made durable (wakes delivery or the bounce stage,
    /// hands fresh mail to delivery). Must be set before [`SmtpServer::run`].
    pub fn with_accept_hook(mut self, hook: Arc<dyn AcceptHook>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.on_accept = Some(hook);
        }
        self
    }

    /// The bound addresses: plain listeners first, then implicit-TLS ones (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.socket.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets transactions in flight
    /// finish (at most `smtp.shutdown_grace`), answers idle sessions `421 4.3.2` and returns
    /// once every connection has closed.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        for listener in self.listeners {
            tracker.spawn(accept_loop(
                listener,
                Arc::clone(&self.shared),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        tracker.close();
        tracker.wait().await;
    }
}

async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.socket.accept() => accepted,
        };
        let (stream, addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "smtp accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        shared.metrics.smtp_connections.inc();
        let ip = canonical_ip(addr.ip());
        match shared.limits.try_acquire(ip) {
            Ok(permit) => {
                tracker.spawn(handle_connection(
                    stream,
                    ip,
                    listener.implicit_tls,
                    Arc::clone(&shared),
                    shutdown.clone(),
                    permit,
                ));
            }
            Err(LimitExceeded) => {
                tracing::info!(client = %ip, "smtp connection refused: too many connections");
                shared
                    .metrics
                    .smtp_rejections
                    .get_or_create(&class_of(421))
                    .inc();
                let reply = Reply::new(421, "4.7.0", "Too many connections").to_bytes();
                if !listener.implicit_tls {
                    tracker.spawn(async move {
                        let mut stream = stream;
                        let _ = tokio::time::timeout(REFUSAL_TIME, stream.write_all(&reply)).await;
                        let _ = stream.shutdown().await;
                    });
                    continue;
                }
                // On the implicit-TLS listener the client's first bytes are its handshake: a
                // 421 in plain text would reach it as a TLS protocol error. It is told over
                // TLS, as Postfix's wrapper mode does, while few such handshakes are under
                // way; beyond that the connection is closed unanswered, so that a flood of
                // connections cannot make the server do handshakes without bound.
                let Ok(slot) = Arc::clone(&shared.refusal_handshakes).try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                let shared = Arc::clone(&shared);
                tracker.spawn(async move {
                    let _slot = slot;
                    let Some((mut tls, _)) = handshake(&shared.tls, stream, REFUSAL_TIME, ip).await
                    else {
                        return;
                    };
                    let _ = tokio::time::timeout(REFUSAL_TIME, async {
                        tls.write_all(&reply).await?;
                        tls.shutdown().await
                    })
                    .await;
                });
            }
        }
    }
}

/// How long an over-limit client is given to take its `421` (and, on the implicit-TLS
/// listener, to complete the handshake before it).
const REFUSAL_TIME: Duration = Duration::from_secs(5);

/// At most this many TLS handshakes at once only to refuse an over-limit client.
const MAX_REFUSAL_HANDSHAKES: usize = 8;

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Connection limits, total and per client address. A [`ConnectionPermit`] is held for the
/// life of a connection; dropping it frees both slots.
pub struct ConnectionLimits {
    total: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub struct LimitExceeded;

pub struct ConnectionPermit {
    _total: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(max_total)),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            max_per_ip,
        }
    }

    pub fn try_acquire(&self, ip: IpAddr) -> Result<ConnectionPermit, LimitExceeded> {
        let total = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| LimitExceeded)?;
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            return Err(LimitExceeded);
        }
        *count += 1;
        Ok(ConnectionPermit {
            _total: total,
            ip,
            per_ip: Arc::clone(&self.per_ip),
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Keeps the open-connections gauge right however the task ends.
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.smtp_connections_open.inc();
        Self(Arc::clone(metrics))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.smtp_connections_open.dec();
    }
}

async fn handle_connection(
    stream: TcpStream,
    ip: IpAddr,
    implicit_tls: bool,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    _permit: ConnectionPermit,
) {
    let _open = OpenConnection::new(&shared.metrics);
    let _ = stream.set_nodelay(true);
    let peer = Peer {
        ip,
        relay_client: shared.config.smtp.is_relay_client(ip),
    };
    let mut conn = Connection {
        shared: &shared,
        shutdown,
        grace_deadline: None,
        transaction_started: None,
    };
    let handshake_timeout = shared.config.smtp.command_timeout;
    if implicit_tls {
        let Some((tls, version)) = handshake(&shared.tls, stream, handshake_timeout, ip).await
        else {
            return;
        };
        let mut session = Session::new(shared.session.clone(), peer, Some(version));
        let greeting = session.greeting();
        conn.drive(&mut session, tls, greeting).await;
        return;
    }
    let mut session = Session::new(shared.session.clone(), peer, None);
    let greeting = session.greeting();
    let Ended::StartTls(stream) = conn.drive(&mut session, stream, greeting).await else {
        return;
    };
    let Some((tls, version)) = handshake(&shared.tls, stream, handshake_timeout, ip).await else {
        return;
    };
    let actions = session.tls_started(version);
    conn.drive(&mut session, tls, actions).await;
}

async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    limit: Duration,
    ip: IpAddr,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, String)> {
    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let version = tls::version_name(tls.get_ref().1.protocol_version());
            Some((tls, version))
        }
        Ok(Err(e)) => {
            tracing::info!(client = %ip, error = %e, "smtp TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(client = %ip, "smtp TLS handshake timed out");
            None
        }
    }
}

enum Ended<S> {
    Closed,
    /// The session asked for TLS: the caller upgrades this stream.
    StartTls(S),
}

/// One connection's I/O state around its [`Session`].
struct Connection<'a> {
    shared: &'a Shared,
    shutdown: CancellationToken,
    /// Set when shutdown began: past it, transactions in flight are cut off.
    grace_deadline: Option<Instant>,
    transaction_started: Option<Instant>,
}

impl Connection<'_> {
    async fn drive<S>(
        &mut self,
        session: &mut Session,
        mut stream: S,
        first: Vec<Action>,
    ) -> Ended<S>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let smtp = &self.shared.config.smtp;
        let mut pending: std::collections::VecDeque<Action> = first.into();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while let Some(action) = pending.pop_front() {
                match action {
                    Action::Send(reply) => {
                        if reply.is_error() {
                            self.shared
                                .metrics
                                .smtp_rejections
                                .get_or_create(&class_of(reply.code))
                                .inc();
                        }
                        out.extend_from_slice(&reply.to_bytes());
                    }
                    Action::StartTls => {
                        if !self.flush(&mut stream, &mut out).await {
                            return Ended::Closed;
                        }
                        return Ended::StartTls(stream);
                    }
                    Action::Close => {
                        self.flush(&mut stream, &mut out).await;
                        let _ = stream.shutdown().await;
                        return Ended::Closed;
                    }
                    Action::Authenticate(credentials) => {
                        // For the log: the name as given, bounded (never the password).
                        let user: String = credentials.username.chars().take(100).collect();
                        let outcome = self
                            .shared
                            .auth
                            .verify_as(
                                session.peer_ip(),
                                credentials.username,
                                credentials.password,
                                credentials.unusable,
                            )
                            .await;
                        // A line per refusal, as Postfix's "SASL authentication failed",
                        // for fail2ban and whoever asks who tried; a throttled one is
                        // logged where the throttle decides.
                        match &outcome {
                            crate::smtp::auth::AuthOutcome::Accepted(_) => {
                                tracing::info!(client = %session.peer_ip(), %user, "AUTH accepted")
                            }
                            crate::smtp::auth::AuthOutcome::Refused => {
                                tracing::info!(client = %session.peer_ip(), %user, "AUTH refused")
                            }
                            crate::smtp::auth::AuthOutcome::Throttled => {}
                        }
                        pending.extend(session.auth_verified(outcome));
                    }
                    Action::CheckRecipient(check) => {
                        let verdict = self.shared.policy.check(&check).await;
                        // As Postfix's "NOQUEUE: reject: RCPT ...": relay refusals and the
                        // like leave no record in the store, only here.
                        if let super::session::RecipientVerdict::Reject(reply) = &verdict {
                            tracing::info!(
                                client = %check.client_ip,
                                from = %check.envelope_sender,
                                to = %check.address,
                                reply = %reply.one_line(),
                                "recipient refused"
                            );
                        }
                        pending.extend(session.recipient_checked(verdict));
                    }
                    Action::Store(message) => {
                        let ok = self.store(*message).await;
                        pending.extend(session.stored(ok));
                    }
                }
            }
            if !session.in_transaction() {
                self.transaction_started = None;
            }
            if !self.flush(&mut stream, &mut out).await {
                return Ended::Closed;
            }

            let limit = if session.expects_content() {
                smtp.data_timeout
            } else {
                smtp.command_timeout
            };
            let grace = self.grace_deadline;
            tokio::select! {
                _ = self.shutdown.cancelled(), if grace.is_none() => {
                    self.grace_deadline = Some(Instant::now() + smtp.shutdown_grace);
                    pending.extend(session.begin_shutdown());
                }
                _ = sleep_until_opt(grace) => {
                    pending.extend(session.shutdown_now());
                }
                read = tokio::time::timeout(limit, stream.read(&mut buf)) => match read {
                    Err(_) => pending.extend(session.timed_out()),
                    // The client vanished: whatever was in flight is dropped, nothing stored.
                    Ok(Ok(0)) | Ok(Err(_)) => return Ended::Closed,
                    Ok(Ok(n)) => {
                        pending.extend(session.feed(buf.get(..n).unwrap_or(&[])));
                        if session.in_transaction() && self.transaction_started.is_none() {
                            self.transaction_started = Some(Instant::now());
                        }
                    }
                }
            }
        }
    }

    /// Hands a complete message to the store; `true` once it is durable.
    async fn store(&mut self, message: crate::spool::AcceptedMessage) -> bool {
        let receipt = message.receipt;
        let size = message.body.len() as u64;
        let recipients = message.recipients.len() as u64;
        let client = message.client_ip;
        let inbound_bounce = message.inbound_bounce;
        let hook = self.shared.on_accept.as_ref();
        // A claimed message is copied (its body is a few KiB) before the store takes it.
        let claimed = hook.filter(|h| h.claim(&message)).map(|_| message.clone());
        // Recipients decided as they were accepted (suppressed, a domain that takes no mail)
        // are failures after a 250: their DSN is stored with the message.
        let notice = self
            .shared
            .config
            .delivery
            .dsn
            .then(|| {
                crate::delivery::dsn::for_decided_at_accept(&self.shared.config.hostname, &message)
            })
            .flatten();
        let with_notices = notice.is_some();
        let stored = match notice {
            Some(n) => {
                self.shared
                    .store
                    .accept_with_notices(message, vec![n])
                    .await
            }
            None => self.shared.store.accept(message).await,
        };
        match stored {
            Ok(()) => {
                if let Some(hook) = hook {
                    hook.stored(inbound_bounce, claimed);
                    if with_notices {
                        // The DSN is stored mail nobody handed over: the loop's scan finds it.
                        hook.stored(false, None);
                    }
                }
                let m = &self.shared.metrics;
                m.messages_accepted.inc();
                m.recipients_accepted.inc_by(recipients);
                m.bytes_received.inc_by(size);
                if let Some(started) = self.transaction_started.take() {
                    m.smtp_transaction_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                tracing::info!(%receipt, %client, size, recipients, "message accepted");
                true
            }
            Err(e) => {
                if let (Some(hook), Some(_)) = (hook, claimed) {
                    hook.not_stored(receipt);
                }
                tracing::warn!(%receipt, %client, error = %e, "message not stored");
                false
            }
        }
    }

    /// Writes the queued replies; `false` when the client is gone or stopped reading.
    async fn flush<S: AsyncWrite + Unpin>(&self, stream: &mut S, out: &mut Vec<u8>) -> bool {
        if out.is_empty() {
            return true;
        }
        let limit = self.shared.config.smtp.command_timeout;
        let written = tokio::time::timeout(limit, async {
            stream.write_all(out).await?;
            stream.flush().await
        })
        .await;
        out.clear();
        matches!(written, Ok(Ok(())))
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receipt::ReceiptId;
    use crate::spool::AcceptedMessage;
    use crate::store::*;
    use rustls::pki_types::ServerName;
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

    /// A store that only accepts messages (or fails to); the rest of the trait is not needed
    /// by the SMTP stage and answers an error.
    #[derive(Default)]
    struct AcceptOnly {
        messages: Mutex<Vec<AcceptedMessage>>,
        fail: bool,
    }

    fn unused<T>() -> Result<T, StoreError> {
        Err(StoreError::Storage(
            "not part of the SMTP test double".into(),
        ))
    }

    #[async_trait::async_trait]
    impl Store for AcceptOnly {
        async fn accept(&self, msg: AcceptedMessage) -> Result<(), StoreError> {
            if self.fail {
                return Err(StoreError::Storage("disk full".into()));
            }
            self.messages.lock().unwrap().push(msg);
            Ok(())
        }
        async fn accept_with_notices(
            &self,
            msg: AcceptedMessage,
            notices: Vec<crate::store::DsnNotice>,
        ) -> Result<(), StoreError> {
            self.accept(msg).await?;
            for n in notices {
                self.accept(n.dsn).await?;
            }
            Ok(())
        }
        async fn purge_bodies(&self, _: i64) -> Result<usize, StoreError> {
            unused()
        }
        async fn purge_log(&self, _: i64) -> Result<(usize, usize), StoreError> {
            unused()
        }
        async fn due(
            &self,
            _: i64,
            _: usize,
            _: Option<ReceiptId>,
        ) -> Result<Vec<QueuedMessage>, StoreError> {
            unused()
        }
        async fn next_due_at(&self) -> Result<Option<i64>, StoreError> {
            unused()
        }
        async fn body(&self, _: ReceiptId) -> Result<Vec<u8>, StoreError> {
            unused()
        }
        async fn record_attempts(
            &self,
            _: Vec<AttemptRecord>,
            _: Vec<crate::store::DsnNotice>,
        ) -> Result<(), StoreError> {
            unused()
        }
        async fn queue_list(&self) -> Result<Vec<QueueEntry>, StoreError> {
            unused()
        }
        async fn queue_retry(&self, _: Option<ReceiptId>) -> Result<usize, StoreError> {
            unused()
        }
        async fn queue_delete(&self, _: ReceiptId) -> Result<usize, StoreError> {
            unused()
        }
        async fn queue_stats(&self) -> Result<(u64, Option<i64>), StoreError> {
            unused()
        }
        async fn pending_inbound_bounces(&self) -> Result<Vec<ReceiptId>, StoreError> {
            unused()
        }
        async fn mark_inbound_processed(&self, _: ReceiptId) -> Result<(), StoreError> {
            unused()
        }
        async fn log(&self, _: &LogQuery) -> Result<Vec<MessageLog>, StoreError> {
            unused()
        }
        async fn find_recipient(
            &self,
            _: ReceiptId,
            _: &str,
        ) -> Result<Option<crate::store::RecipientRef>, StoreError> {
            unused()
        }
        async fn recipient(
            &self,
            _: ReceiptId,
            _: u32,
        ) -> Result<Option<crate::store::RecipientRef>, StoreError> {
            unused()
        }
        async fn find_by_message_id(
            &self,
            _: &str,
            _: &str,
            _: i64,
        ) -> Result<Option<ReceiptId>, StoreError> {
            unused()
        }
        async fn find_by_envid(
            &self,
            _: &str,
            _: &str,
            _: i64,
        ) -> Result<Option<ReceiptId>, StoreError> {
            unused()
        }
        async fn record_bounces(
            &self,
            _: Vec<NewBounce>,
            _: Option<ReceiptId>,
        ) -> Result<Vec<crate::store::RecordedBounce>, StoreError> {
            unused()
        }
        async fn bounces(&self, _: &BounceQuery) -> Result<Vec<StoredBounce>, StoreError> {
            unused()
        }
        async fn set_handled(
            &self,
            _: i64,
            _: Option<&str>,
            _: i64,
        ) -> Result<crate::store::HandledChange, StoreError> {
            unused()
        }
        async fn recent_bounce_types(
            &self,
            _: &str,
            _: i64,
        ) -> Result<Vec<(String, i64)>, StoreError> {
            unused()
        }
        async fn suppress(&self, _: Suppression) -> Result<(), StoreError> {
            unused()
        }
        async fn unsuppress(&self, _: &str) -> Result<bool, StoreError> {
            unused()
        }
        async fn suppressed(&self, _: &str, _: i64) -> Result<Option<Suppression>, StoreError> {
            unused()
        }
        async fn suppression_list(&self, _: i64) -> Result<Vec<Suppression>, StoreError> {
            unused()
        }
        async fn suppression_version(&self) -> Result<i64, StoreError> {
            unused()
        }
    }

    struct Running {
        addrs: Vec<SocketAddr>,
        store: Arc<AcceptOnly>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        done: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
        data_dir: std::path::PathBuf,
    }

    async fn start(adjust: impl FnOnce(&mut Config), store: AcceptOnly) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            hostname: "localhost".into(),
            ..Config::default()
        };
        config.smtp.listen = vec!["127.0.0.1:0".parse().unwrap()];
        config.smtp.tls_listen = vec!["127.0.0.1:0".parse().unwrap()];
        adjust(&mut config);
        let store = Arc::new(store);
        let metrics = Arc::new(Metrics::new());
        let server = SmtpServer::bind(
            Arc::new(config),
            store.clone(),
            Arc::new(super::super::RelayPolicy),
            metrics.clone(),
        )
        .await
        .unwrap();
        let addrs = server.local_addrs();
        let shutdown = CancellationToken::new();
        let done = tokio::spawn(server.run(shutdown.clone()));
        Running {
            addrs,
            store,
            metrics,
            shutdown,
            done,
            data_dir: dir.path().to_path_buf(),
            _dir: dir,
        }
    }

    /// Reads one (possibly multi-line) reply.
    async fn reply<R: AsyncBufRead + Unpin>(r: &mut R) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
                .await
                .expect("reply timed out")
                .unwrap();
            all.push_str(&line);
            if n == 0 || line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn say<S: AsyncBufRead + AsyncWrite + Unpin>(s: &mut S, line: &str) -> String {
        s.write_all(line.as_bytes()).await.unwrap();
        reply(s).await
    }

    async fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
        BufReader::new(TcpStream::connect(addr).await.unwrap())
    }

    fn tls_connector(data_dir: &std::path::Path) -> tokio_rustls::TlsConnector {
        let (cert, _) = tls::generated_paths(data_dir);
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    #[tokio::test]
    async fn accepts_message_over_tcp() {
        let srv = start(|_| {}, AcceptOnly::default()).await;
        let mut c = connect(srv.addrs[0]).await;
        assert_eq!(reply(&mut c).await, "220 localhost ESMTP mailtrail\r\n");
        let ehlo = say(&mut c, "EHLO client.test\r\n").await;
        assert!(ehlo.contains("250 STARTTLS\r\n"), "{ehlo}");
        // The whole transaction in one write (PIPELINING).
        c.write_all(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n")
            .await
            .unwrap();
        assert_eq!(reply(&mut c).await, "250 2.1.0 Ok\r\n");
        assert_eq!(reply(&mut c).await, "250 2.1.5 Ok\r\n");
        assert!(reply(&mut c).await.starts_with("354 "));
        let done = say(&mut c, "Subject: t\r\n\r\nhello\r\n.\r\n").await;
        let receipt = {
            let messages = srv.store.messages.lock().unwrap();
            assert_eq!(messages.len(), 1);
            assert_eq!(messages[0].client_ip.to_string(), "127.0.0.1");
            messages[0].receipt
        };
        assert_eq!(done, format!("250 2.0.0 Ok: queued as {receipt}\r\n"));
        assert_eq!(say(&mut c, "QUIT\r\n").await, "221 2.0.0 Bye\r\n");
        let text = srv.metrics.encode();
        assert!(
            text.contains("mailtrail_messages_accepted_total 1"),
            "{text}"
        );
        assert!(
            text.contains("mailtrail_smtp_connections_total 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn answers_451_when_store_fails() {
        let store = AcceptOnly {
            fail: true,
            ..AcceptOnly::default()
        };
        let srv = start(|_| {}, store).await;
        let mut c = connect(srv.addrs[0]).await;
        reply(&mut c).await;
        c.write_all(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\n")
            .await
            .unwrap();
        for _ in 0..4 {
            reply(&mut c).await;
        }
        assert_eq!(
            say(&mut c, "hi\r\n.\r\n").await,
            "451 4.3.0 Temporary storage failure, try again later\r\n"
        );
        let text = srv.metrics.encode();
        assert!(
            text.contains("mailtrail_messages_accepted_total 0"),
            "{text}"
        );
        assert!(
            text.contains("mailtrail_smtp_rejections_total{class=\"4xx\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn starttls_upgrades_and_ignores_injected_commands() {
        let srv = start(|_| {}, AcceptOnly::default()).await;
        let mut c = connect(srv.addrs[0]).await;
        reply(&mut c).await;
        say(&mut c, "EHLO x\r\n").await;
        // NOOP is pipelined in clear text behind STARTTLS: it must never be answered.
        assert_eq!(
            say(&mut c, "STARTTLS\r\nNOOP\r\n").await,
            "220 2.0.0 Ready to start TLS\r\n"
        );
        let tcp = c.into_inner();
        let tls = tls_connector(&srv.data_dir)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut t = BufReader::new(tls);
        let ehlo = say(&mut t, "EHLO x\r\n").await;
        assert!(ehlo.starts_with("250-localhost\r\n"), "{ehlo}");
        assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
        assert!(
            ehlo.contains("AUTH PLAIN LOGIN") || ehlo.ends_with("250 DSN\r\n"),
            "{ehlo}"
        );
        t.write_all(b"MAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\n")
            .await
            .unwrap();
        for _ in 0..3 {
            reply(&mut t).await;
        }
        let done = say(&mut t, "hi\r\n.\r\n").await;
        assert!(done.starts_with("250 2.0.0 Ok: queued as"), "{done}");
        let messages = srv.store.messages.lock().unwrap();
        assert_eq!(messages[0].tls_version.as_deref(), Some("TLSv1_3"));
        assert!(String::from_utf8_lossy(&messages[0].body).contains("with ESMTPS id"));
    }

    #[tokio::test]
    async fn implicit_tls_listener_greets_after_handshake() {
        let srv = start(|_| {}, AcceptOnly::default()).await;
        let tcp = TcpStream::connect(srv.addrs[1]).await.unwrap();
        let tls = tls_connector(&srv.data_dir)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut t = BufReader::new(tls);
        assert_eq!(reply(&mut t).await, "220 localhost ESMTP mailtrail\r\n");
        let ehlo = say(&mut t, "EHLO x\r\n").await;
        assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    }

    #[tokio::test]
    async fn refuses_connections_over_per_ip_limit() {
        let srv = start(|c| c.smtp.max_connections_per_ip = 1, AcceptOnly::default()).await;
        let mut first = connect(srv.addrs[0]).await;
        reply(&mut first).await;
        let mut second = connect(srv.addrs[0]).await;
        assert_eq!(
            reply(&mut second).await,
            "421 4.7.0 Too many connections\r\n"
        );
        drop(first);
        // The slot is freed when the first connection ends.
        for _ in 0..50 {
            let mut third = connect(srv.addrs[0]).await;
            if reply(&mut third).await.starts_with("220 ") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("connection slot never freed");
    }

    #[tokio::test]
    async fn implicit_tls_listener_refuses_over_limit_over_tls() {
        let srv = start(|c| c.smtp.max_connections = 1, AcceptOnly::default()).await;
        let mut first = connect(srv.addrs[0]).await;
        reply(&mut first).await;
        let tcp = TcpStream::connect(srv.addrs[1]).await.unwrap();
        let tls = tls_connector(&srv.data_dir)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("the refusal comes after a TLS handshake, not as plain text");
        let mut t = BufReader::new(tls);
        assert_eq!(reply(&mut t).await, "421 4.7.0 Too many connections\r\n");
    }

    #[tokio::test]
    async fn refuses_connections_over_total_limit() {
        let srv = start(|c| c.smtp.max_connections = 1, AcceptOnly::default()).await;
        let mut first = connect(srv.addrs[0]).await;
        reply(&mut first).await;
        let mut second = connect(srv.addrs[0]).await;
        assert_eq!(
            reply(&mut second).await,
            "421 4.7.0 Too many connections\r\n"
        );
    }

    #[tokio::test]
    async fn times_out_silent_client() {
        let srv = start(
            |c| c.smtp.command_timeout = Duration::from_millis(200),
            AcceptOnly::default(),
        )
        .await;
        let mut c = connect(srv.addrs[0]).await;
        reply(&mut c).await;
        assert_eq!(
            reply(&mut c).await,
            "421 4.4.2 localhost Error: timeout exceeded\r\n"
        );
    }

    #[tokio::test]
    async fn client_vanishing_mid_data_stores_nothing() {
        let srv = start(|_| {}, AcceptOnly::default()).await;
        let mut c = connect(srv.addrs[0]).await;
        reply(&mut c).await;
        c.write_all(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\n")
            .await
            .unwrap();
        for _ in 0..4 {
            reply(&mut c).await;
        }
        c.write_all(b"Subject: half\r\n\r\npartial").await.unwrap();
        drop(c);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(srv.store.messages.lock().unwrap().is_empty());
        // The server is still serving.
        let mut again = connect(srv.addrs[0]).await;
        assert!(reply(&mut again).await.starts_with("220 "));
    }

    #[tokio::test]
    async fn shutdown_closes_idle_sessions_and_returns() {
        let srv = start(|_| {}, AcceptOnly::default()).await;
        let mut c = connect(srv.addrs[0]).await;
        reply(&mut c).await;
        say(&mut c, "EHLO x\r\n").await;
        srv.shutdown.cancel();
        assert_eq!(reply(&mut c).await, "421 4.3.2 Service shutting down\r\n");
        tokio::time::timeout(Duration::from_secs(5), srv.done)
            .await
            .expect("run did not return")
            .unwrap();
        assert!(TcpStream::connect(srv.addrs[0]).await.is_err());
    }

    #[tokio::test]
    async fn shutdown_lets_transaction_in_flight_finish() {
        let srv = start(|_| {}, AcceptOnly::default()).await;
        let mut c = connect(srv.addrs[0]).await;
        reply(&mut c).await;
        c.write_all(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\n")
            .await
            .unwrap();
        for _ in 0..4 {
            reply(&mut c).await;
        }
        c.write_all(b"Subject: in flight\r\n").await.unwrap();
        srv.shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.write_all(b"\r\nbody\r\n.\r\n").await.unwrap();
        assert!(reply(&mut c).await.starts_with("250 2.0.0 Ok: queued as"));
        assert_eq!(reply(&mut c).await, "421 4.3.2 Service shutting down\r\n");
        tokio::time::timeout(Duration::from_secs(5), srv.done)
            .await
            .expect("run did not return")
            .unwrap();
        assert_eq!(srv.store.messages.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn shutdown_grace_cuts_off_slow_transaction() {
        let srv = start(
            |c| c.smtp.shutdown_grace = Duration::from_millis(200),
            AcceptOnly::default(),
        )
        .await;
        let mut c = connect(srv.addrs[0]).await;
        reply(&mut c).await;
        c.write_all(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\n")
            .await
            .unwrap();
        reply(&mut c).await;
        reply(&mut c).await;
        srv.shutdown.cancel();
        assert_eq!(reply(&mut c).await, "421 4.3.2 Service shutting down\r\n");
        tokio::time::timeout(Duration::from_secs(5), srv.done)
            .await
            .expect("run did not return")
            .unwrap();
    }

    #[tokio::test]
    async fn survives_tls_client_hello_on_plain_port() {
        let srv = start(|_| {}, AcceptOnly::default()).await;
        let tcp = TcpStream::connect(srv.addrs[0]).await.unwrap();
        // A TLS client on the plain port fails its handshake; the server must stay up.
        let result = tls_connector(&srv.data_dir)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await;
        assert!(result.is_err());
        let mut c = connect(srv.addrs[0]).await;
        assert!(reply(&mut c).await.starts_with("220 "));
    }

    /// A real client: swaks with STARTTLS, AUTH PLAIN and PIPELINING. Skipped when swaks is
    /// not installed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn swaks_submits_with_starttls_auth_and_pipelining() {
        if std::process::Command::new("swaks")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("swaks not installed; skipped");
            return;
        }
        let hash = super::super::auth::hash_password("secret").unwrap();
        let srv = start(
            move |c| {
                c.smtp.relay_networks = Vec::new();
                c.smtp.users = vec![crate::config::UserConfig {
                    name: "app".into(),
                    password_hash: hash,
                }];
            },
            AcceptOnly::default(),
        )
        .await;
        let port = srv.addrs[0].port().to_string();
        let output = tokio::process::Command::new("swaks")
            .args(["--server", "127.0.0.1", "--port", &port])
            .args(["--from", "app@example.com", "--to", "a@example.net"])
            .args(["--tls", "--pipeline"])
            .args([
                "--auth",
                "PLAIN",
                "--auth-user",
                "app",
                "--auth-password",
                "secret",
            ])
            .args(["--header", "X-Mailtrail-Context: order=42"])
            .args(["--header", "Subject: swaks test"])
            .args(["--body", "hello from swaks"])
            .output()
            .await
            .unwrap();
        let transcript = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{transcript}");
        assert!(transcript.contains("queued as"), "{transcript}");
        let messages = srv.store.messages.lock().unwrap();
        let msg = &messages[0];
        assert_eq!(msg.auth_user.as_deref(), Some("app"));
        assert_eq!(msg.context.as_deref(), Some("order=42"));
        assert_eq!(msg.subject.as_deref(), Some("swaks test"));
        let body = String::from_utf8_lossy(&msg.body);
        assert!(body.contains("with ESMTPSA id"), "{body}");
        assert!(!body.contains("X-Mailtrail-Context"), "{body}");
    }

    /// A second real client: Python's smtplib, plain then STARTTLS, with BDAT-less DATA.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn smtplib_sends_plain_and_after_starttls() {
        let srv = start(|_| {}, AcceptOnly::default()).await;
        let script = format!(
            r#"
import smtplib, ssl
s = smtplib.SMTP("127.0.0.1", {port}, timeout=10)
code, text = s.ehlo("client.test")
assert code == 250, (code, text)
r = s.sendmail("a@example.com", ["b@example.org", "c@example.org"], b"Subject: plain\r\n\r\n.leading dot\r\n")
assert r == {{}}, r
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s.starttls(context=ctx)
code, text = s.ehlo("client.test")
assert b"STARTTLS" not in text.upper(), text
s.mail("tls@example.com")
s.rcpt("d@example.org")
code, resp = s.data(b"Subject: over tls\r\n\r\nsecret\r\n")
assert code == 250 and b"queued as" in resp, (code, resp)
s.quit()
"#,
            port = srv.addrs[0].port()
        );
        let Ok(output) = tokio::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .await
        else {
            eprintln!("python3 not installed; skipped");
            return;
        };
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let messages = srv.store.messages.lock().unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].recipients.len(), 2);
        assert!(messages[0].body.ends_with(b"\r\n\r\n.leading dot\r\n"));
        assert_eq!(messages[1].tls_version.as_deref(), Some("TLSv1_3"));
    }

    #[test]
    fn connection_permits_count_per_ip_and_free_on_drop() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = limits.try_acquire(a).unwrap();
        let _p2 = limits.try_acquire(a).unwrap();
        assert_eq!(limits.try_acquire(a).err(), Some(LimitExceeded));
        let _p3 = limits.try_acquire(b).unwrap();
        assert_eq!(
            limits.try_acquire(b).err(),
            Some(LimitExceeded),
            "total limit"
        );
        drop(p1);
        assert!(limits.try_acquire(a).is_ok());
    }
}
