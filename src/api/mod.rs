//! Admin HTTP: health, Prometheus `/metrics`, and read-only JSON views of the outcome store.
//!
//! Bound to loopback by default (`[http] listen`); it exposes who mailed whom, so do not put it
//! on a public interface without a proxy that authenticates.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::metrics::Metrics;
use crate::store::{BounceQuery, Store};

#[derive(Clone)]
pub struct ApiState {
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn Store>,
    /// `[http] allowed_hosts`.
    pub allowed_hosts: Arc<Vec<String>>,
}

pub fn router(state: ApiState) -> Router {
    // What shows who mailed whom answers only to this server's own names; health and
    // counters answer a probe or a scrape by any name.
    let mail_log = Router::new()
        .route("/", get(index_page))
        .route("/api/log/{key}", get(log))
        .route("/api/bounces", get(bounces))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            known_host,
        ));
    Router::new()
        .merge(mail_log)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// An error answer: under `/api/` the JSON `{"error": ...}` every API answer has, so a
/// client reads one shape; elsewhere (the page, health, metrics) plain text.
fn error_answer(path: &str, status: StatusCode, message: String) -> Response {
    if path == "/api" || path.starts_with("/api/") {
        json_error(status, message)
    } else {
        (status, format!("{message}\n")).into_response()
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error_answer(
        uri.path(),
        StatusCode::NOT_FOUND,
        "no such page: the API is GET /api/log/<address or receipt> and GET /api/bounces"
            .to_string(),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let mut answer = error_answer(
        uri.path(),
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not served here: only GET (and HEAD)"),
    );
    answer.headers_mut().insert(
        header::ALLOW,
        axum::http::HeaderValue::from_static("GET,HEAD"),
    );
    answer
}

/// Answers only requests for a host this server is: an IP address, `localhost` or one of
/// `[http] allowed_hosts`. A browser that visits a page whose DNS name its owner then points
/// at 127.0.0.1 sends that name, so the page cannot read the mail log through it (DNS
/// rebinding). A request without Host (HTTP/1.0) names nothing and is served.
async fn known_host(
    State(state): State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // Two Host fields name no one host (RFC 9112 3.2: a 400).
    let path = request.uri().path().to_string();
    if request.headers().get_all(header::HOST).iter().count() > 1 {
        return error_answer(
            &path,
            StatusCode::BAD_REQUEST,
            "more than one Host header".to_string(),
        );
    }
    let host = request
        .headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
    match host {
        Some(h) if !host_allowed(&h, &state.allowed_hosts) => error_answer(
            &path,
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "unknown host {:?}: add it to [http] allowed_hosts to serve it",
                h.chars()
                    .filter(|c| !c.is_control())
                    .take(100)
                    .collect::<String>()
            ),
        ),
        _ => next.run(request).await,
    }
}

/// `host` (a Host header: name or address, maybe a port) is an IP address, `localhost` or
/// one of `allowed` (case-insensitive).
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.trim();
    let name = match host.strip_prefix('[') {
        // `[::1]:8025`
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    let name = name.trim_end_matches('.');
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed
            .iter()
            .any(|a| a.trim_end_matches('.').eq_ignore_ascii_case(name))
}

/// What one slow or many clients of the admin port may hold. Without these, 20,000 clients
/// sending a header line every 5 s stayed open until the process ran out of file
/// descriptors, and the SMTP listener's `accept` then failed too.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `[http] max_connections`: connections served at once, over all listen addresses.
    pub max_connections: usize,
    /// `[http] header_read_timeout`: the longest wait for a whole request head.
    pub header_read_timeout: Duration,
    /// `[http] write_timeout`: the longest a response may take to be written.
    pub write_timeout: Duration,
}

impl Limits {
    pub fn from_config(http: &HttpConfig) -> Self {
        Self {
            max_connections: http.max_connections,
            header_read_timeout: http.header_read_timeout,
            write_timeout: http.write_timeout,
        }
    }
}

/// The connections of all admin listeners together: those served, and those being told
/// that no more can be.
struct Gate {
    /// One permit per connection served (`[http] max_connections`), returned when it closes.
    slots: Arc<Semaphore>,
    /// One permit per connection past the cap that is being answered `503`: each holds a
    /// file descriptor for up to [`REFUSAL_TIME`], so past these a connection is closed
    /// unanswered.
    refusing: Arc<Semaphore>,
    write_timeout: Duration,
}

impl Gate {
    fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            refusing: Arc::new(Semaphore::new(REFUSING_AT_ONCE)),
            write_timeout: limits.write_timeout,
        })
    }
}

/// Connections past the cap answered `503` at the same time; more are closed at once.
const REFUSING_AT_ONCE: usize = 16;
/// The longest a `503` answer, and the wait for the client to close after it, may take.
const REFUSAL_TIME: Duration = Duration::from_secs(1);
/// The whole answer to a connection past the cap. Not hyper's: it would need a task, a
/// buffer and the request head first, all of which a flood of connections must not get.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Retry-After: 1\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Length: 33\r\n\
Connection: close\r\n\
\r\n\
too many connections, retry soon\n";

/// The admin HTTP server as started: where it listens (a configured port 0 resolved) and
/// the tasks that end once it has stopped.
pub struct Started {
    pub local_addrs: Vec<SocketAddr>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Binds every `[http] listen` address (errors surface at start) and serves until `shutdown`,
/// then closes idle connections, lets requests in flight finish and returns once every
/// connection has closed.
pub async fn serve(
    listen: &[SocketAddr],
    limits: Limits,
    state: ApiState,
    shutdown: CancellationToken,
) -> std::io::Result<Started> {
    // One cap for all listeners: it bounds the process's file descriptors, not a port's.
    let gate = Gate::new(limits);
    let mut tasks = Vec::new();
    let mut local_addrs = Vec::new();
    for addr in listen {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {addr} (http.listen): {e}"),
            )
        })?;
        local_addrs.push(listener.local_addr()?);
        tasks.push(tokio::spawn(accept_loop(
            listener,
            router(state.clone()),
            http1(limits.header_read_timeout),
            Arc::clone(&gate),
            shutdown.clone(),
        )));
    }
    Ok(Started { local_addrs, tasks })
}

/// `ok`, or `503` with the reason while the store refuses writes (a failed fsync, its
/// database file deleted or replaced): the SMTP listener answers every message `451` then,
/// and only a restart helps, which is what a probe is for.
async fn healthz(State(state): State<ApiState>) -> Response {
    let store = state.store.clone();
    // The store looks at its files (a stat or two): not on an async worker, where a hung
    // disk would stall other connections.
    let refusal = tokio::task::spawn_blocking(move || store.write_refusal())
        .await
        .unwrap_or_else(|e| Some(format!("health check failed: {e}")));
    match refusal {
        None => "ok\n".into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unwritable: {reason}\n"),
        )
            .into_response(),
    }
}

/// HTTP/1.1 as axum::serve speaks it, plus a deadline for the request head. hyper starts
/// it whenever it waits for a head, so it also bounds an idle keep-alive connection (from
/// the end of one response to the end of the next request's head).
fn http1(header_read_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    http: hyper::server::conn::http1::Builder,
    gate: Arc<Gate>,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    while let Some((slot, stream)) = next_connection(&listener, &gate, &shutdown).await {
        let io = TokioIo::new(WriteDeadline::new(stream, gate.write_timeout));
        let connection =
            graceful.watch(http.serve_connection(io, TowerToHyperService::new(app.clone())));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // A client that stalled, hung up or sent garbage: nothing to act on.
                tracing::debug!(error = %e, "http connection ended");
            }
            drop(slot);
        });
    }
    graceful.shutdown().await;
}

/// The next connection to serve, with the slot it holds; `None` once `shutdown` is
/// cancelled. A connection that finds every slot taken is answered `503` and closed
/// ([`refuse`]): left in the kernel's listen backlog, as before, it waited unanswered for
/// as long as the slow clients ahead of it took, and a client's own timeout was all it got.
async fn next_connection(
    listener: &TcpListener,
    gate: &Gate,
    shutdown: &CancellationToken,
) -> Option<(OwnedSemaphorePermit, tokio::net::TcpStream)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match Arc::clone(&gate.slots).try_acquire_owned() {
                    Ok(slot) => return Some((slot, stream)),
                    Err(_) => {
                        tracing::debug!(%peer, "http connection refused: max_connections reached");
                        refuse(stream, &gate.refusing);
                    }
                },
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning (as axum::serve did).
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Answers a connection past the cap with [`BUSY`] and closes it. Its write side is shut
/// first and what the client sent read until it closes (at most [`REFUSAL_TIME`] in all):
/// closing a socket with unread input resets it, and a reset can destroy the answer before
/// the client reads it. Past [`REFUSING_AT_ONCE`] such answers the connection is closed
/// unanswered.
fn refuse(mut stream: tokio::net::TcpStream, refusing: &Arc<Semaphore>) {
    let Ok(permit) = Arc::clone(refusing).try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let answer = async {
            stream.write_all(BUSY).await?;
            stream.shutdown().await?;
            let mut unread = [0; 1024];
            while stream.read(&mut unread).await? > 0 {}
            std::io::Result::Ok(())
        };
        let _ = tokio::time::timeout(REFUSAL_TIME, answer).await;
        drop(permit);
    });
}

/// A connection whose responses must be written within `limit`: the clock starts at the
/// first write after everything before it was flushed and stops when a flush completes
/// (hyper flushes what it buffered of a response before it waits for the next request), so
/// it bounds each response, not an idle connection. Past it a write fails with `TimedOut`
/// and hyper closes the connection. Without it, a client that asked for a large answer and
/// never read it held its connection, its slot and a task for good: hyper has a timeout for
/// reading a request head, none for writing.
struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Set while written bytes wait for a flush.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            deadline: None,
        }
    }

    /// Starts the clock unless it runs already.
    fn start(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(Box::pin(tokio::time::sleep(self.limit)));
        }
    }

    /// An error once the deadline has passed; else registers the task to be woken at it, so
    /// a write that stays pending comes back to fail.
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        let passed = self
            .deadline
            .as_mut()
            .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
        if passed {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("response not written within {:?}", self.limit),
            ));
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.start();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.start();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            this.deadline = None;
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// A parameter the API does not know is a `400` naming the ones it does: a misspelt filter
/// (`adress=`) would otherwise be ignored, and the answer look like its result.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogParams {
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    before: Option<String>,
}

/// Rows per answer: `limit` (default 100), from 1 to 10,000; outside, a `400` (zero would
/// mean "no limit" to the store, and was read as 1 without a word).
fn page_size(limit: Option<usize>) -> Result<usize, String> {
    match limit {
        None => Ok(100),
        Some(n @ 1..=10_000) => Ok(n),
        Some(n) => Err(format!("limit={n}: give a number of rows from 1 to 10000")),
    }
}

/// The API's one error shape: `{"error": "..."}`.
fn json_error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

fn bad_request(message: String) -> Response {
    json_error(StatusCode::BAD_REQUEST, message)
}

fn store_error(e: crate::store::StoreError) -> Response {
    json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

async fn log(
    State(state): State<ApiState>,
    key: Result<Path<String>, PathRejection>,
    params: Result<Query<LogParams>, QueryRejection>,
) -> Response {
    // A key that is no UTF-8 (`%ff`): JSON like every other error here.
    let key = match key {
        Ok(Path(k)) => k,
        Err(e) => return bad_request(e.body_text()),
    };
    let params = match params {
        Ok(Query(p)) => p,
        Err(e) => return bad_request(e.body_text()),
    };
    let limit = match page_size(params.limit) {
        Ok(n) => n,
        Err(e) => return bad_request(e),
    };
    let args = crate::cli::log::LogArgs {
        key,
        json: true,
        since: params.since,
        until: params.until,
        limit,
        before: params.before,
    };
    let query = match crate::cli::log::query(&args, chrono::Utc::now()) {
        Ok(q) => q,
        Err(e) => return bad_request(e.to_string()),
    };
    let unfiltered = args.since.is_none() && args.until.is_none() && args.before.is_none();
    match state.store.log(&query).await {
        // A receipt names one message: none is a 404, as for any resource that is not there.
        Ok(messages)
            if messages.is_empty()
                && unfiltered
                && matches!(query.key, crate::store::LogKey::Receipt(_)) =>
        {
            json_error(
                StatusCode::NOT_FOUND,
                crate::cli::log::no_such_receipt(&args.key),
            )
        }
        // The objects `mailtrail log --json` prints a line each, RFC 3339 times included.
        Ok(messages) => axum::Json(
            messages
                .iter()
                .map(crate::cli::log::to_json)
                .collect::<Vec<_>>(),
        )
        .into_response(),
        // `before=` a receipt the store does not hold.
        Err(crate::store::StoreError::NotFound(what)) => bad_request(what),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BounceParams {
    address: Option<String>,
    reason: Option<String>,
    #[serde(default, deserialize_with = "flag")]
    unhandled: bool,
    #[serde(default, deserialize_with = "flag")]
    first: bool,
    limit: Option<usize>,
}

/// A query-string switch as scripts write it: `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`
/// (any case).
fn flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let value = String::deserialize(d)?;
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(serde::de::Error::custom(format!(
            "{value:?} is not a switch (true/false, 1/0, yes/no, on/off)"
        ))),
    }
}

async fn bounces(
    State(state): State<ApiState>,
    params: Result<Query<BounceParams>, QueryRejection>,
) -> Response {
    // A bad parameter is JSON like every other error of the API (axum's own rejection is
    // plain text).
    let p = match params {
        Ok(Query(p)) => p,
        Err(e) => return bad_request(e.body_text()),
    };
    let limit = match page_size(p.limit) {
        Ok(n) => n,
        Err(e) => return bad_request(e),
    };
    // As the CLI takes them: an address as pasted from a log (`<a@b>`), a reason in any
    // case, and a reason that is none named instead of matching nothing.
    let reason = match p.reason.as_deref().map(crate::bounce::reason::reason_named) {
        None => None,
        Some(Ok(r)) => Some(r.to_string()),
        Some(Err(e)) => return bad_request(e),
    };
    let query = BounceQuery {
        address: p
            .address
            .map(|a| crate::cli::log::unbracketed(&a).to_string()),
        reason,
        unhandled_only: p.unhandled,
        first_only: p.first,
        limit,
    };
    match state.store.bounces(&query).await {
        // The objects `mailtrail bounces --json` prints a line each.
        Ok(b) => axum::Json(
            b.iter()
                .map(crate::cli::bounces::bounce_json)
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => store_error(e),
    }
}

/// The search page.
const INDEX: &str = include_str!("index.html");

/// The page's Content-Security-Policy: its own inline script and style only (by their
/// SHA-256, so a script or handler that text from the network smuggled in would not run),
/// requests to this server only, no frames, forms or plug-ins.
static INDEX_CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let hash = |tag: &str| {
        use base64::Engine;
        use sha2::Digest;
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        let inner = INDEX
            .split_once(&open)
            .and_then(|(_, rest)| rest.split_once(&close))
            .map_or("", |(inner, _)| inner);
        let digest = sha2::Sha256::digest(inner.as_bytes());
        format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash("script"),
        hash("style")
    )
});

/// A minimal page for admins: search box over `/api/log/{key}`, with the headers that keep
/// it from being framed or read as anything but HTML.
async fn index_page() -> Response {
    (
        [
            (header::CONTENT_SECURITY_POLICY, INDEX_CSP.as_str()),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(INDEX),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// The admin server on a free loopback port, with `limits`; stops when the test ends.
    struct Running {
        addr: SocketAddr,
        shutdown: CancellationToken,
        server: Option<tokio::task::JoinHandle<()>>,
        _dir: tempfile::TempDir,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    async fn start(limits: Limits) -> Running {
        start_serving(limits, Router::new()).await
    }

    /// [`start`], with `extra` routes beside the admin ones.
    async fn start_serving(limits: Limits, extra: Router) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open_path(&dir.path().join("t.db"));
        let state = ApiState {
            metrics: Arc::new(Metrics::new()),
            store: Arc::new(store.unwrap()),
            allowed_hosts: Arc::new(Vec::new()),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(accept_loop(
            listener,
            router(state).merge(extra),
            http1(limits.header_read_timeout),
            Gate::new(limits),
            shutdown.clone(),
        ));
        Running {
            addr,
            shutdown,
            server: Some(server),
            _dir: dir,
        }
    }

    /// A request head cut short: the request line and Host, no empty line.
    const PARTIAL_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";
    const WHOLE_REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    /// Everything the server sends until it closes, or `None` if it is still open after
    /// `wait`.
    async fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> Option<String> {
        let mut received = Vec::new();
        let read = tokio::time::timeout(wait, async {
            let mut buf = [0; 1024];
            // A reset counts as closed, as an end of stream does.
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                received.extend_from_slice(&buf[..n]);
            }
        });
        read.await
            .ok()
            .map(|()| String::from_utf8_lossy(&received).into_owned())
    }

    #[tokio::test]
    async fn a_request_head_sent_a_line_at_a_time_is_cut_off_at_the_timeout() {
        let timeout = Duration::from_millis(300);
        let srv = start(Limits {
            max_connections: 64,
            header_read_timeout: timeout,
            write_timeout: Duration::from_secs(60),
        })
        .await;
        let mut slow = TcpStream::connect(srv.addr).await.unwrap();
        let started = Instant::now();
        slow.write_all(PARTIAL_HEAD).await.unwrap();
        // One more header line every 50 ms: each read is quick, the head never ends. A
        // per-read timeout would never fire; the deadline is for the whole head.
        let (mut reader, mut writer) = slow.split();
        let trickle = async {
            for i in 0.. {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let line = format!("X-Slow-{i}: y\r\n");
                if writer.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
        };
        let closed = async {
            let mut buf = [0; 1024];
            while let Ok(n @ 1..) = reader.read(&mut buf).await {
                assert!(
                    !String::from_utf8_lossy(&buf[..n]).contains(" 200 "),
                    "an unfinished request was served"
                );
            }
        };
        tokio::select! {
            () = trickle => {}
            () = closed => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {
                panic!("a client trickling its request head was not closed")
            }
        }
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_at_the_timeout() {
        let timeout = Duration::from_millis(300);
        let srv = start(Limits {
            max_connections: 64,
            header_read_timeout: timeout,
            write_timeout: Duration::from_secs(60),
        })
        .await;
        let mut client = TcpStream::connect(srv.addr).await.unwrap();
        // HTTP/1.1 without `Connection: close`: the connection stays open for the next one.
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0; 1024];
        let n = client.read(&mut buf).await.unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
        let answered = Instant::now();
        let rest = read_until_closed(&mut client, Duration::from_secs(5)).await;
        assert_eq!(
            rest.as_deref(),
            Some(""),
            "idle keep-alive connection left open"
        );
        assert!(answered.elapsed() >= timeout, "{:?}", answered.elapsed());
    }

    #[tokio::test]
    async fn past_the_cap_a_connection_is_answered_503_and_closed() {
        let srv = start(Limits {
            max_connections: 2,
            // Longer than the test: only closing a connection frees its slot here.
            header_read_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
        })
        .await;
        let mut slow = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            s.write_all(PARTIAL_HEAD).await.unwrap();
            slow.push(s);
        }
        // Let the server take both before the third arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..3 {
            let mut refused = TcpStream::connect(srv.addr).await.unwrap();
            refused.write_all(WHOLE_REQUEST).await.unwrap();
            // Before, it waited unanswered in the listen backlog for as long as the slow
            // clients stayed.
            let answer = read_until_closed(&mut refused, Duration::from_secs(2)).await;
            let answer = answer.expect("a connection past the cap was left waiting");
            let (head, body) = answer.split_once("\r\n\r\n").expect("{answer}");
            assert!(
                head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
                "{answer}"
            );
            assert!(head.contains("\r\nRetry-After: 1"), "{answer}");
            assert!(head.contains("\r\nConnection: close"), "{answer}");
            let length = format!("\r\nContent-Length: {}", body.len());
            assert!(head.contains(&length), "{answer}");
        }

        // A slow client goes: its slot serves the next connection.
        drop(slow.pop());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut fresh = TcpStream::connect(srv.addr).await.unwrap();
        fresh.write_all(WHOLE_REQUEST).await.unwrap();
        let answer = read_until_closed(&mut fresh, Duration::from_secs(5)).await;
        let answer = answer.expect("a connection after a slow one closed was not served");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_its_response_is_closed_at_the_write_timeout() {
        const BIG: usize = 32 << 20;
        let timeout = Duration::from_millis(300);
        let limits = Limits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(60),
            write_timeout: timeout,
        };
        // An answer larger than the kernel buffers of both ends can hold.
        let big = Router::new().route("/big", get(|| async { vec![b'x'; BIG] }));
        let srv = start_serving(limits, big).await;

        // Idle time between two responses is no write time.
        let mut client = TcpStream::connect(srv.addr).await.unwrap();
        for _ in 0..2 {
            client
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0; 1024];
            let n = client.read(&mut buf).await.unwrap();
            let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
            tokio::time::sleep(timeout * 2).await;
        }
        drop(client);
        tokio::time::sleep(Duration::from_millis(100)).await;

        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stalled = socket.connect(srv.addr).await.unwrap();
        stalled
            .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        // It reads nothing. Past the timeout its connection is closed and its slot free.
        tokio::time::sleep(timeout * 3).await;
        let mut next = TcpStream::connect(srv.addr).await.unwrap();
        next.write_all(WHOLE_REQUEST).await.unwrap();
        let answer = read_until_closed(&mut next, Duration::from_secs(5)).await;
        let answer = answer.expect("the next connection was not answered");
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "the stalled client still holds the only slot: {answer}"
        );
        let mut received = 0;
        let mut buf = vec![0; 1 << 16];
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(n @ 1..) = stalled.read(&mut buf).await {
                received += n;
            }
        });
        drained.await.expect("the stalled connection is still open");
        assert!(received < BIG, "the whole answer was written: {received}");
    }

    #[test]
    fn the_busy_answer_is_whole() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_returns() {
        let mut srv = start(Limits {
            max_connections: 64,
            // Longer than the test: the shutdown, not the timeout, must close them.
            header_read_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
        })
        .await;
        let mut idle = TcpStream::connect(srv.addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0; 1024];
        assert!(idle.read(&mut buf).await.unwrap() > 0);
        srv.shutdown.cancel();
        let server = srv.server.take().unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server still waits for an idle connection")
            .unwrap();
        assert_eq!(
            read_until_closed(&mut idle, Duration::from_secs(1)).await,
            Some(String::new())
        );
        assert!(
            TcpStream::connect(srv.addr).await.is_err(),
            "still listening"
        );
    }

    #[test]
    fn hosts_are_addresses_localhost_or_allowed_names() {
        let allowed = vec!["mail-admin.example.org".to_string()];
        for ok in [
            "127.0.0.1:8025",
            "127.0.0.1",
            "[::1]:8025",
            "localhost:8025",
            "LOCALHOST",
            "Mail-Admin.example.org",
            "mail-admin.example.org.:443",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for bad in [
            "attacker.example:8025",
            "attacker.example",
            "localhost.attacker.example",
            "",
        ] {
            assert!(!host_allowed(bad, &allowed), "{bad}");
        }
    }
}
