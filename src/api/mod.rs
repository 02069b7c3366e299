//! Admin HTTP: health, Prometheus `/metrics`, and read-only JSON views of the outcome store.
//!
//! Bound to loopback by default (`[http] listen`); it exposes who mailed whom, so do not put it
//! on a public interface without a proxy that authenticates.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

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
        .with_state(state)
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
    let host = request
        .headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
    match host {
        Some(h) if !host_allowed(&h, &state.allowed_hosts) => (
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "unknown host {:?}: add it to [http] allowed_hosts to serve it\n",
                h.chars()
                    .filter(|c| !c.is_control())
                    .take(100)
                    .collect::<String>()
            ),
        )
            .into_response(),
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

/// Binds every `[http] listen` address (errors surface at start) and serves until `shutdown`.
pub async fn serve(
    listen: &[SocketAddr],
    state: ApiState,
    shutdown: CancellationToken,
) -> std::io::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for addr in listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {addr} (http): {e}"))
        })?;
        let app = router(state.clone());
        let token = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "http server failed");
            }
        }));
    }
    Ok(tasks)
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

#[derive(Deserialize)]
struct LogParams {
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
}

/// Rows per answer: `limit` (default 100) within 1..=10,000. Zero would mean "no limit" to
/// the store.
fn page_size(limit: Option<usize>) -> usize {
    limit.unwrap_or(100).clamp(1, 10_000)
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

fn store_error(e: crate::store::StoreError) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({ "error": e.to_string() })),
    )
        .into_response()
}

async fn log(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    Query(params): Query<LogParams>,
) -> Response {
    let args = crate::cli::log::LogArgs {
        key,
        json: true,
        since: params.since,
        until: params.until,
        limit: page_size(params.limit),
    };
    let query = match crate::cli::log::query(&args, chrono::Utc::now()) {
        Ok(q) => q,
        Err(e) => return bad_request(e.to_string()),
    };
    match state.store.log(&query).await {
        Ok(messages) => axum::Json(messages).into_response(),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
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

async fn bounces(State(state): State<ApiState>, Query(p): Query<BounceParams>) -> Response {
    let query = BounceQuery {
        address: p.address,
        reason: p.reason,
        unhandled_only: p.unhandled,
        first_only: p.first,
        limit: page_size(p.limit),
    };
    match state.store.bounces(&query).await {
        Ok(b) => axum::Json(b).into_response(),
        Err(e) => store_error(e),
    }
}

/// A minimal page for admins: search box over `/api/log/{key}`.
async fn index_page() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

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
