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
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
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
        let auth = Arc::new(Authenticator::new(&config.smtp.users)?);
        let mut listeners = Vec::new();
        for (addrs, implicit_tls) in [(&config.smtp.listen, false), (&config.smtp.tls_listen, true)]
        {
            for &addr in addrs {
                let socket = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?;
                listeners.push(Listener {
                    socket,
                    implicit_tls,
                });
            }
        }
        let shared = Shared {
            session: SessionConfig::from_config(&config, true),
            tls: TlsAcceptor::from(tls_config),
            limits: ConnectionLimits::new(
                config.smtp.max_connections,
                config.smtp.max_connections_per_ip,
            ),
            config,
            store,
            policy,
            auth,
            metrics,
        };
        Ok(SmtpServer {
            listeners,
            shared: Arc::new(shared),
        })
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
                shared.metrics.smtp_rejections.get_or_create(&class_of(421)).inc();
                tracker.spawn(async move {
                    let mut stream = stream;
                    let reply = Reply::new(421, "4.7.0", "Too many connections");
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        stream.write_all(&reply.to_bytes()),
                    )
                    .await;
                    let _ = stream.shutdown().await;
                });
            }
        }
    }
}

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
    async fn drive<S>(&mut self, session: &mut Session, mut stream: S, first: Vec<Action>) -> Ended<S>
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
                        let user = self
                            .shared
                            .auth
                            .verify(credentials.username, credentials.password)
                            .await;
                        pending.extend(session.auth_verified(user));
                    }
                    Action::CheckRecipient(check) => {
                        let verdict = self.shared.policy.check(&check).await;
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
        match self.shared.store.accept(message).await {
            Ok(()) => {
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
