//! The operator's endpoints: `GET /readyz` and `GET /metrics`.
//!
//! `/healthz` answers while the process runs; `/readyz` answers `200` only when the store
//! accepts a durable write within [`READY_TIMEOUT`] (and `503` while the service drains at
//! shutdown), so a load balancer or monitor sees a full disk before the gateway does.
//! `/metrics` renders [`crate::metrics`] with the store's figures; with `metrics_token` (or
//! `metrics_token_hash`) configured it needs `Authorization: Bearer`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::metrics::{self, Snapshot};
use crate::routes::{ApiError, HttpResponse};
use crate::state::AppState;

/// How long `/readyz` waits for the store's probe write.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

fn text(status: StatusCode, content_type: &'static str, body: String) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Why the service is not ready, or `None` when it is: the store must accept a durable write
/// within `timeout`.
pub async fn not_ready(state: &AppState, timeout: Duration) -> Option<String> {
    if *state.shutdown_signal().borrow() {
        return Some("shutting down".into());
    }
    match tokio::time::timeout(timeout, state.store.check_writable()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!(
            "the store did not complete a write within {timeout:?}"
        )),
    }
}

/// `GET /readyz`: `200 ready`, or `503` with the reason on one line.
pub async fn readyz(state: &AppState) -> HttpResponse {
    match not_ready(state, READY_TIMEOUT).await {
        None => text(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "ready\n".into(),
        ),
        Some(reason) => {
            tracing::warn!(%reason, "readiness check failed");
            let mut response = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("not ready: {reason}\n"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            response
        }
    }
}

/// `GET /metrics`: the text exposition, behind the metrics token when one is configured.
pub async fn metrics(
    state: &AppState,
    headers: &http::HeaderMap,
) -> Result<HttpResponse, ApiError> {
    if let Some(expected) = state.metrics.token() {
        let unauthorized = |reason: &str| ApiError::Unauthorized {
            scheme: "Bearer",
            reason: reason.to_string(),
        };
        let header = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("bearer token required"))?;
        let token = crate::auth::parse_bearer(header).map_err(|e| unauthorized(&e.to_string()))?;
        if !state.verifier.verify_async(token, expected).await {
            tracing::warn!("metrics request with a wrong token");
            return Err(unauthorized("invalid token"));
        }
    }
    let mut policies: Vec<String> = state.access().policies.keys().cloned().collect();
    policies.sort();
    let snapshot = Snapshot {
        policies,
        waiting_pollers: state.waiters.waiting(),
        store: state.store.stats().await,
    };
    Ok(text(
        StatusCode::OK,
        metrics::CONTENT_TYPE,
        state.metrics.render(&snapshot),
    ))
}

/// Counts one answered request in the metrics (see [`crate::metrics::Metrics::request`]);
/// the policy label of a callback is its configured id, or none for an unknown one.
pub fn count_request(state: &AppState, method: &http::Method, path: &str, status: u16) {
    let policy = path
        .strip_prefix("/callback/")
        .map(|rest| rest.strip_suffix('/').unwrap_or(rest))
        .and_then(|raw| percent_encoding::percent_decode_str(raw).decode_utf8().ok())
        .filter(|id| state.access().policies.contains_key(id.as_ref()));
    state
        .metrics
        .request(method, path, status, policy.as_deref());
}
