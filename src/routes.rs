//! Method and path dispatch, the handlers, and the mapping of errors to responses.
//!
//! Every request gets a span with a request id and one log line when it ends (method, path as
//! received, status, bytes, latency). Authorization values are never logged.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::auth;
use crate::metrics::Outcome;
use crate::ratelimit::Target;
use crate::state::{AppState, AuthenticatedPoller};
use crate::store::{
    DeliveryId, ExpectOutcome, Expectation, NewDelivery, NewQuarantine, PutOutcome, StoreError,
};
use crate::summary::Summary;
use crate::xml;

/// Bodies above this size are parsed on the blocking pool instead of the async workers.
const INLINE_PARSE_BYTES: usize = 256 * 1024;

/// The realm of every `WWW-Authenticate` challenge.
const REALM: &str = "callback-receiver";

/// Feed items per page unless `limit` says otherwise.
const DEFAULT_FEED_LIMIT: usize = 100;

/// Most feed items per page.
const MAX_FEED_LIMIT: usize = 1000;

/// Expectation timeout unless the `PUT` body says otherwise.
const DEFAULT_EXPECT_TIMEOUT_SECONDS: u64 = 3600;

/// Longest expectation timeout (30 days; retention keeps expectations that much longer).
const MAX_EXPECT_TIMEOUT_SECONDS: u64 = (crate::store::MAX_EXPECTATION_TIMEOUT_MS / 1000) as u64;

static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// What a handler answers with.
pub type HttpResponse = Response<Full<Bytes>>;

/// A request that cannot be served, and the status code it gets.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Credentials missing or wrong (Basic on callbacks, Bearer on the API).
    #[error("{reason}")]
    Unauthorized {
        /// `Basic` or `Bearer`.
        scheme: &'static str,
        /// One-line reason (never the secret).
        reason: String,
    },
    /// The body is larger than `max_body_bytes`.
    #[error("body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// Nothing visible at this path.
    #[error("not found")]
    NotFound,
    /// The path exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed {
        /// The methods the path accepts.
        allow: &'static str,
    },
    /// The client paused too long while sending its body.
    #[error("request body not received in time")]
    Timeout,
    /// Storage failed; nothing was acknowledged.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Too many requests are waiting already.
    #[error("too many requests are waiting; retry shortly")]
    Busy,
    /// A stored body no longer reads back as it was written (damaged on disk): retrying does
    /// not help.
    #[error("stored body damaged: {0}")]
    Damaged(String),
    /// The client address failed to authenticate too often (see [`crate::ratelimit`]).
    #[error("too many failed authentications from this address; retry in {retry_after} s")]
    TooManyRequests {
        /// Seconds until the address may try again.
        retry_after: u64,
    },
}

/// Why a request got `401`, kept in the response's extensions (never sent) for the log line of
/// the failed-authentication limiter.
#[derive(Debug, Clone)]
struct AuthFailureReason(String);

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Timeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable(_) | ApiError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Damaged(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The response: a JSON `{"error": ...}` on the API, a one-line text elsewhere.
    fn into_response(self, json: bool) -> HttpResponse {
        let status = self.status();
        let message = self.to_string();
        let mut builder = Response::builder().status(status);
        match &self {
            ApiError::Unauthorized { scheme, reason } => {
                builder = builder
                    .header(
                        header::WWW_AUTHENTICATE,
                        format!("{scheme} realm=\"{REALM}\""),
                    )
                    .extension(AuthFailureReason(reason.clone()));
            }
            ApiError::TooManyRequests { retry_after } => {
                builder = builder.header(header::RETRY_AFTER, retry_after.to_string());
            }
            ApiError::MethodNotAllowed { allow } => {
                builder = builder.header(header::ALLOW, *allow);
            }
            ApiError::Unavailable(_) => {
                builder = builder.header(header::RETRY_AFTER, "5");
            }
            ApiError::Busy => {
                builder = builder.header(header::RETRY_AFTER, "1");
            }
            _ => {}
        }
        let (content_type, body) = if json {
            (
                "application/json",
                format!("{}\n", serde_json::json!({ "error": message })),
            )
        } else {
            ("text/plain; charset=utf-8", format!("{message}\n"))
        };
        builder
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
    }
}

fn plain(status: StatusCode, text: &str) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> HttpResponse {
    let body = match serde_json::to_vec(value) {
        Ok(mut v) => {
            v.push(b'\n');
            v
        }
        Err(_) => return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The routes, as parsed from a path (segments still percent-encoded).
enum Route<'a> {
    Callback(&'a str),
    Feed,
    Response(&'a str),
    Delivery(&'a str),
    Expected,
    Expectation(&'a str),
    Healthz,
    Readyz,
    Metrics,
    Unknown,
}

fn route(path: &str) -> Route<'_> {
    if let Some(rest) = path.strip_prefix("/callback/") {
        let id = rest.strip_suffix('/').unwrap_or(rest);
        if !id.is_empty() && !id.contains('/') {
            return Route::Callback(id);
        }
        return Route::Unknown;
    }
    let tail = |prefix: &str| path.strip_prefix(prefix).filter(|rest| !rest.is_empty());
    match path {
        "/healthz" => return Route::Healthz,
        "/readyz" => return Route::Readyz,
        "/metrics" => return Route::Metrics,
        "/v1/responses" | "/v1/responses/" => return Route::Feed,
        "/v1/expected" | "/v1/expected/" => return Route::Expected,
        _ => {}
    }
    if let Some(rest) = tail("/v1/responses/") {
        return Route::Response(rest);
    }
    if let Some(rest) = tail("/v1/deliveries/") {
        return Route::Delivery(rest);
    }
    if let Some(rest) = tail("/v1/expected/") {
        return Route::Expectation(rest);
    }
    Route::Unknown
}

/// Serves one request; never fails (errors become responses).
pub async fn handle(
    state: Arc<AppState>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<HttpResponse, Infallible> {
    let id = REQUEST_IDS.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("request", id = %format_args!("{id:x}"), %peer);
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = limited_dispatch(state.clone(), peer, &path, req)
        .instrument(span.clone())
        .await;
    crate::ops::count_request(&state, &method, &path, response.status().as_u16());
    let bytes = http_body::Body::size_hint(response.body())
        .exact()
        .unwrap_or(0);
    span.in_scope(|| {
        tracing::info!(
            %method,
            path = %path,
            status = response.status().as_u16(),
            bytes,
            latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "request"
        );
    });
    Ok(response)
}

/// [`dispatch`] behind the failed-authentication limiter: an address with too many recent `401`s
/// gets `429` on every authenticated route before its credentials are looked at; each `401` is
/// counted and logged (address, path, reason; never the secret).
async fn limited_dispatch(
    state: Arc<AppState>,
    peer: SocketAddr,
    path: &str,
    req: Request<Incoming>,
) -> HttpResponse {
    let guarded = path.starts_with("/callback/") || path.starts_with("/v1/");
    if !guarded || !state.auth_limiter.enabled() {
        return dispatch(state, path, req).await;
    }
    let ip = peer.ip();
    let target = limit_target(&state, path);
    if let Some(wait) = state.auth_limiter.blocked(ip, &target) {
        tracing::warn!(%ip, path = %path, "request refused: too many failed authentications");
        let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return ApiError::TooManyRequests {
            retry_after: retry_after.max(1),
        }
        .into_response(path.starts_with("/v1/"));
    }
    let response = dispatch(state.clone(), path, req).await;
    if response.status() == StatusCode::UNAUTHORIZED {
        let failure = state.auth_limiter.record_failure(ip, target);
        let reason = response
            .extensions()
            .get::<AuthFailureReason>()
            .map_or("unauthorized", |r| r.0.as_str());
        tracing::warn!(
            %ip,
            path = %path,
            reason,
            failures = failure.failures,
            limit = state.auth_limiter.limit(),
            "authentication failed"
        );
        if failure.now_blocked {
            tracing::warn!(%ip, "too many failed authentications; refusing this address for up to a minute");
        }
    }
    response
}

/// What the limiter counts a request's failures against: its configured policy, any unknown
/// policy, or the integrator API.
fn limit_target(state: &AppState, path: &str) -> Target {
    match route(path) {
        Route::Callback(id) if state.access().policies.contains_key(id) => {
            Target::Policy(id.to_owned())
        }
        _ if path.starts_with("/callback/") => Target::UnknownPolicy,
        _ => Target::Api,
    }
}

/// Routes one request; `path` is its URI's path.
async fn dispatch(state: Arc<AppState>, path: &str, req: Request<Incoming>) -> HttpResponse {
    let method = req.method().clone();
    let is_get = method == Method::GET || method == Method::HEAD;
    let api = path.starts_with("/v1/");
    let result = match route(path) {
        Route::Callback(policy) if method == Method::POST => callback(&state, policy, req).await,
        Route::Callback(_) => Err(ApiError::MethodNotAllowed { allow: "POST" }),
        Route::Feed if is_get => feed(&state, &req).await,
        Route::Feed => Err(ApiError::MethodNotAllowed { allow: "GET, HEAD" }),
        Route::Response(raw) if is_get => get_response(&state, raw, &req).await,
        Route::Response(raw) if method == Method::DELETE => {
            delete_response(&state, raw, &req).await
        }
        Route::Response(_) => Err(ApiError::MethodNotAllowed {
            allow: "GET, HEAD, DELETE",
        }),
        Route::Delivery(raw) if is_get => get_delivery(&state, raw, &req).await,
        Route::Delivery(_) => Err(ApiError::MethodNotAllowed { allow: "GET, HEAD" }),
        Route::Expected if is_get => list_expected(&state, &req).await,
        Route::Expected => Err(ApiError::MethodNotAllowed { allow: "GET, HEAD" }),
        Route::Expectation(raw) if method == Method::PUT => put_expected(&state, raw, req).await,
        Route::Expectation(raw) if method == Method::DELETE => {
            delete_expected(&state, raw, &req).await
        }
        Route::Expectation(_) => Err(ApiError::MethodNotAllowed {
            allow: "PUT, DELETE",
        }),
        Route::Healthz if is_get => Ok(plain(StatusCode::OK, "ok")),
        Route::Healthz => Err(ApiError::MethodNotAllowed { allow: "GET, HEAD" }),
        Route::Readyz if is_get => Ok(crate::ops::readyz(&state).await),
        Route::Metrics if is_get => crate::ops::metrics(&state, req.headers()).await,
        Route::Readyz | Route::Metrics => Err(ApiError::MethodNotAllowed { allow: "GET, HEAD" }),
        Route::Unknown => Err(ApiError::NotFound),
    };
    let mut response = result.unwrap_or_else(|e| e.into_response(api));
    if method == Method::HEAD {
        // HTTP/2 does not drop a HEAD body by itself: keep the length, send no bytes.
        let length = http_body::Body::size_hint(response.body())
            .exact()
            .unwrap_or(0);
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        *response.body_mut() = Full::new(Bytes::new());
    }
    response
}

fn percent_decode(raw: &str, what: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::BadRequest(format!("{what} is not utf-8 after percent-decoding")))
}

/// `POST /callback/{policy}`: authenticate, read, parse, store, acknowledge.
async fn callback(
    state: &AppState,
    raw_policy: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    // A policy id that does not decode cannot name a policy: same answer as an unknown one.
    let policy_id =
        percent_decode(raw_policy, "policy id").map_err(|_| ApiError::Unauthorized {
            scheme: "Basic",
            reason: "unknown policy or wrong credentials".into(),
        })?;
    check_basic(state, &policy_id, req.headers()).await?;

    let limit = state.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let body = read_body(
        req.into_body(),
        limit,
        declared,
        state.limits.body_read_timeout,
    )
    .await?;
    let received_at_ms = state.now_ms();

    let parsed = if body.len() > INLINE_PARSE_BYTES {
        let b = body.clone();
        tokio::task::spawn_blocking(move || (xml::extract(&b), sha256(&b)))
            .await
            .map_err(|e| ApiError::Unavailable(format!("parser task failed: {e}")))?
    } else {
        (xml::extract(&body), sha256(&body))
    };
    match parsed {
        (Err(reason), _) => {
            let reason = reason.to_string();
            let id = state
                .store
                .quarantine(NewQuarantine {
                    policy: policy_id.clone(),
                    received_at_ms,
                    body: body.clone(),
                    reason: reason.clone(),
                })
                .await?;
            tracing::warn!(policy = %policy_id, quarantine_id = %id, size = body.len(), reason = %reason.to_string().escape_debug(), "callback refused; body kept in quarantine");
            let size = body.len() as u64;
            state
                .metrics
                .callback(&policy_id, Outcome::Quarantined, size);
            Err(ApiError::BadRequest(reason))
        }
        (Ok(extracted), digest) => {
            let controlid = extracted.controlid.clone();
            let well_formed = extracted.well_formed;
            let size = body.len() as u64;
            let outcome = state
                .store
                .put(NewDelivery {
                    policy: policy_id.clone(),
                    received_at_ms,
                    body,
                    sha256: digest,
                    extracted,
                })
                .await?;
            if let Some(cid) = &controlid {
                state.waiters.notify(cid);
            }
            let (id, duplicate) = match outcome {
                PutOutcome::Stored(id) => (id, false),
                PutOutcome::Duplicate(id) => (id, true),
            };
            let counted = if duplicate {
                Outcome::Duplicate
            } else {
                Outcome::Stored
            };
            state.metrics.callback(&policy_id, counted, size);
            tracing::info!(
                policy = %policy_id,
                controlid = controlid.as_deref().unwrap_or("-"),
                delivery_id = %id,
                duplicate,
                well_formed,
                "callback stored"
            );
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "status": "stored",
                    "delivery_id": id.to_string(),
                    "controlid": controlid,
                    "matched": controlid.is_some(),
                    "duplicate": duplicate,
                    "well_formed": well_formed,
                }),
            ))
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Checks the Basic credentials of `policy_id` before any of the body is read.
async fn check_basic(
    state: &AppState,
    policy_id: &str,
    headers: &http::HeaderMap,
) -> Result<(), ApiError> {
    let unauthorized = |reason: &str| ApiError::Unauthorized {
        scheme: "Basic",
        reason: reason.to_string(),
    };
    let access = state.access();
    let Some(policy) = access.policies.get(policy_id) else {
        // The id comes from the URL, unchecked: escaped, so that it cannot forge log lines.
        tracing::warn!(policy = %policy_id.escape_debug(), "callback for an unknown policy");
        return Err(unauthorized("unknown policy or wrong credentials"));
    };
    let Some(expected) = &policy.credentials else {
        return Ok(());
    };
    let Some(header) = headers.get(header::AUTHORIZATION) else {
        tracing::warn!(policy = %policy_id, "callback without credentials");
        return Err(unauthorized("credentials required"));
    };
    let presented = match auth::parse_basic(header) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(policy = %policy_id, reason = %e, "callback with unusable credentials");
            return Err(unauthorized(&e.to_string()));
        }
    };
    let ok = state
        .verifier
        .verify_user_and_password_async(
            presented.user.clone(),
            presented.password.expose().as_bytes().to_vec(),
            expected.user.clone(),
            expected.password.clone(),
        )
        .await;
    if ok {
        Ok(())
    } else {
        tracing::warn!(policy = %policy_id, "callback with wrong credentials");
        Err(unauthorized("unknown policy or wrong credentials"))
    }
}

/// Reads the whole body, refusing it once it passes `limit` and when it stalls.
async fn read_body(
    mut body: Incoming,
    limit: u64,
    declared: Option<u64>,
    stall: std::time::Duration,
) -> Result<Bytes, ApiError> {
    // A declared length is a promise, not bytes: allocate a little up front and grow with what
    // arrives (at most doubling), so that a client cannot make the service reserve
    // `max_body_bytes` per request or stream by sending headers alone.
    const FIRST_ALLOCATION: u64 = 256 * 1024;
    let capacity = declared.unwrap_or(0).min(limit).min(FIRST_ALLOCATION) as usize;
    let mut buf = BytesMut::with_capacity(capacity);
    loop {
        let frame = match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => return Err(ApiError::Timeout),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::BadRequest(format!(
                    "reading the body failed: {e}"
                )))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            let len = (buf.len() + data.len()) as u64;
            if len > limit {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            // Past the first allocation the client has sent real bytes: make room for the
            // whole declared length at once instead of doubling, since a doubling that the
            // allocator cannot do in place copies the body and holds two copies at its peak.
            // The pages are only resident once bytes arrive in them.
            if let Some(declared) = declared.filter(|d| len > buf.capacity() as u64 && *d >= len) {
                buf.reserve(declared.min(limit) as usize - buf.len());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Authenticates the bearer token of an API request.
async fn check_bearer(
    state: &AppState,
    headers: &http::HeaderMap,
) -> Result<AuthenticatedPoller, ApiError> {
    let unauthorized = |reason: &str| ApiError::Unauthorized {
        scheme: "Bearer",
        reason: reason.to_string(),
    };
    let header = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("bearer token required"))?;
    let token = auth::parse_bearer(header).map_err(|e| unauthorized(&e.to_string()))?;
    match state.authenticate_poller(&token).await {
        Some(poller) => Ok(poller),
        None => {
            tracing::warn!("api request with a wrong token");
            Err(unauthorized("invalid token"))
        }
    }
}

/// Whether `Accept` asks for the JSON summary: `application/json` is named with a non-zero
/// quality, and no XML type (`application/xml`, `text/xml`) is named with a higher one. The raw
/// XML stays the default for every other `Accept`, `*/*` included.
fn wants_json(headers: &http::HeaderMap) -> bool {
    let mut json: Option<f32> = None;
    let mut xml: Option<f32> = None;
    for range in headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim();
        let quality = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        let slot = if media.eq_ignore_ascii_case("application/json") {
            &mut json
        } else if media.eq_ignore_ascii_case("application/xml")
            || media.eq_ignore_ascii_case("text/xml")
        {
            &mut xml
        } else {
            continue;
        };
        *slot = Some(slot.map_or(quality, |q: f32| q.max(quality)));
    }
    match json {
        Some(q) if q > 0.0 => xml.is_none_or(|x| q >= x),
        _ => false,
    }
}

/// The query parameters of a request, percent-decoded; later duplicates win.
fn query_params(req: &Request<Incoming>) -> Result<Vec<(String, String)>, ApiError> {
    let Some(query) = req.uri().query() else {
        return Ok(Vec::new());
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = v.replace('+', " ");
            Ok((percent_decode(k, "query")?, percent_decode(&v, "query")?))
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `wait=S` (seconds, fractions allowed), capped by `max_wait_seconds`; `None` for no wait.
fn wait_param(state: &AppState, params: &[(String, String)]) -> Result<Option<Duration>, ApiError> {
    let Some(raw) = param(params, "wait") else {
        return Ok(None);
    };
    let secs: f64 = raw
        .trim()
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s >= 0.0)
        .ok_or_else(|| {
            ApiError::BadRequest(format!("wait must be a number of seconds, not {raw:?}"))
        })?;
    if secs == 0.0 {
        return Ok(None);
    }
    // Capped before the conversion: a huge number must not overflow the Duration.
    let secs = secs.min(state.limits.max_wait.as_secs_f64());
    Ok(Some(Duration::from_secs_f64(secs)))
}

/// Why a wait ended without what was waited for.
enum WaitEnd {
    /// Something changed: look again.
    Woken,
    /// The wait time is over (or the server is stopping): answer with what there is.
    Over,
}

/// Waits for `woken`, the deadline, or shutdown, whichever comes first.
async fn wait_for(
    state: &AppState,
    woken: impl std::future::Future<Output = ()>,
    deadline: tokio::time::Instant,
) -> WaitEnd {
    tokio::select! {
        () = woken => WaitEnd::Woken,
        () = tokio::time::sleep_until(deadline) => WaitEnd::Over,
        () = state.stopping() => WaitEnd::Over,
    }
}

fn busy() -> ApiError {
    ApiError::Busy
}

/// The controlid of an API path: percent-decoded and trimmed of XML white space, as the
/// callback side stores it.
fn controlid_param(raw: &str) -> Result<String, ApiError> {
    let decoded = percent_decode(raw, "controlid")?;
    let trimmed = decoded.trim_matches([' ', '\t', '\r', '\n']);
    if trimmed.is_empty() {
        return Err(ApiError::BadRequest("controlid is empty".into()));
    }
    Ok(trimmed.to_string())
}

/// `GET /v1/responses/{controlid}[?wait=S]`: the newest delivery, raw or as a JSON summary;
/// `202` while an expectation is pending, `404` when nothing is known.
async fn get_response(
    state: &AppState,
    raw_id: &str,
    req: &Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let poller = check_bearer(state, req.headers()).await?;
    let controlid = controlid_param(raw_id)?;
    let wait = wait_param(state, &query_params(req)?)?;
    // What is already there is answered at once, without taking a waiting slot or reading the
    // expectation (which only matters for what is not there yet: see the loop).
    if let Some(response) = answer_latest(state, &controlid, &poller.scope, req).await? {
        return Ok(response);
    }
    let _slot = match wait {
        Some(_) => Some(state.waiters.slot().ok_or_else(busy)?),
        None => None,
    };
    let interest = wait.map(|_| state.waiters.interest(&controlid));
    let deadline = tokio::time::Instant::now() + wait.unwrap_or_default();
    let mut over = wait.is_none();
    loop {
        // Listen before looking, so a commit between the look and the wait is not missed.
        let notified = interest.as_ref().map(|i| i.notify().notified());
        let mut notified = std::pin::pin!(notified);
        if let Some(n) = notified.as_mut().as_pin_mut() {
            n.enable();
        }
        // On the last look, read the expectation first: a callback committing in between then
        // shows as received (200) or still pending (202), never as unknown (404).
        let pending = if over {
            state.store.expectation(&controlid, &poller.name).await?
        } else {
            None
        };
        if let Some(response) = answer_latest(state, &controlid, &poller.scope, req).await? {
            return Ok(response);
        }
        if over {
            return match pending {
                Some(expectation) => Ok(json_response(
                    StatusCode::ACCEPTED,
                    &pending_json(state, &expectation),
                )),
                None => Err(ApiError::NotFound),
            };
        }
        let woken = async {
            if let Some(n) = notified.as_mut().as_pin_mut() {
                n.await;
            }
        };
        if let WaitEnd::Over = wait_for(state, woken, deadline).await {
            over = true;
        }
    }
}

/// The `202` body of an expectation still waiting for its callback.
fn pending_json(state: &AppState, e: &crate::store::Expectation) -> serde_json::Value {
    let timeout_ms = i64::try_from(e.timeout_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
    let deadline = e.since_ms.saturating_add(timeout_ms);
    serde_json::json!({
        "controlid": e.controlid,
        "state": "pending",
        "expected_since": crate::summary::rfc3339_millis(e.since_ms),
        "timeout_seconds": e.timeout_seconds,
        "deadline": crate::summary::rfc3339_millis(deadline),
        "overdue": state.now_ms() > deadline,
    })
}

/// The answer for the newest delivery of `controlid`, if there is one: the JSON summary, or the
/// raw bytes read without decoding the record (the common `GET`, kept cheap).
async fn answer_latest(
    state: &AppState,
    controlid: &str,
    scope: &crate::store::Scope,
    req: &Request<Incoming>,
) -> Result<Option<HttpResponse>, ApiError> {
    if wants_json(req.headers()) {
        return match state.store.latest(controlid, scope).await? {
            Some(latest) => delivery_response(state, &latest.record, latest.deliveries, req)
                .await
                .map(Some),
            None => Ok(None),
        };
    }
    match state.store.latest_body(controlid, scope).await {
        Ok(Some(latest)) => Ok(Some(raw_response(
            latest.id,
            &latest.sha256,
            latest.body,
            req,
        ))),
        Ok(None) => Ok(None),
        Err(StoreError::Corrupt { reason, .. }) => Err(ApiError::Damaged(reason)),
        Err(e) => Err(e.into()),
    }
}

/// Answers with one delivery: raw bytes (with `ETag`, `If-None-Match` honoured) or, on
/// `Accept: application/json`, its summary.
async fn delivery_response(
    state: &AppState,
    record: &crate::store::DeliveryRecord,
    deliveries: u32,
    req: &Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    if wants_json(req.headers()) {
        let mut response = json_response(StatusCode::OK, &Summary::new(record, deliveries));
        delivery_headers(response.headers_mut(), record.id);
        return Ok(response);
    }
    let etag = etag_of(&record.sha256);
    if let Some(response) = not_modified(req, &etag) {
        return Ok(response);
    }
    let body = match state.store.body_of(record).await {
        Ok(body) => body.ok_or(ApiError::NotFound)?,
        Err(StoreError::Corrupt { reason, .. }) => return Err(ApiError::Damaged(reason)),
        Err(e) => return Err(e.into()),
    };
    Ok(raw_response(record.id, &record.sha256, body, req))
}

/// The raw answer with its `ETag`, or a `304` when the request names that `ETag`.
fn raw_response(
    id: crate::store::DeliveryId,
    sha256: &[u8; 32],
    body: Bytes,
    req: &Request<Incoming>,
) -> HttpResponse {
    let etag = etag_of(sha256);
    if let Some(response) = not_modified(req, &etag) {
        return response;
    }
    let mut response = Response::new(Full::new(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml"),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    delivery_headers(headers, id);
    response
}

/// The strong `ETag` of a body: its SHA-256 in hex, quoted.
fn etag_of(sha256: &[u8; 32]) -> String {
    let mut etag = [b'"'; 66];
    // Cannot fail: the slice holds exactly twice the bytes of the hash.
    let _ = hex::encode_to_slice(sha256, &mut etag[1..65]);
    String::from_utf8_lossy(&etag).into_owned()
}

/// A `304` when the request's `If-None-Match` names `etag` (or `*`).
fn not_modified(req: &Request<Incoming>, etag: &str) -> Option<HttpResponse> {
    let matches = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            // Weak comparison (RFC 9110, 13.1.2): `W/"x"` matches `"x"`.
            v.split(',').any(|t| {
                let t = t.trim();
                t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag
            })
        });
    if !matches {
        return None;
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    if let Ok(v) = HeaderValue::from_str(etag) {
        response.headers_mut().insert(header::ETAG, v);
    }
    Some(response)
}

/// The header naming the delivery an answer carries.
const X_DELIVERY_ID: header::HeaderName = header::HeaderName::from_static("x-delivery-id");

/// The headers of every answer that carries a delivery.
fn delivery_headers(headers: &mut http::HeaderMap, id: crate::store::DeliveryId) {
    let mut hex = [0; 16];
    // Cannot fail: 8 bytes make 16 hex digits, the id's `Display` form.
    let _ = hex::encode_to_slice(id.0.to_be_bytes(), &mut hex);
    if let Ok(v) = HeaderValue::from_bytes(&hex) {
        headers.insert(X_DELIVERY_ID, v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::VARY, HeaderValue::from_static("accept"));
}

/// How many deliveries the controlid of `record` has within `scope` (1 when unmatched).
async fn deliveries_of(
    state: &AppState,
    record: &crate::store::DeliveryRecord,
    scope: &crate::store::Scope,
) -> Result<u32, ApiError> {
    match &record.extracted.controlid {
        None => Ok(1),
        Some(cid) => Ok(state
            .store
            .latest(cid, scope)
            .await?
            .map_or(1, |l| l.deliveries)),
    }
}

/// `GET /v1/responses?after=CURSOR&limit=N&wait=S`: deliveries in arrival order.
async fn feed(state: &AppState, req: &Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let poller = check_bearer(state, req.headers()).await?;
    let params = query_params(req)?;
    let after = match param(&params, "after").filter(|a| !a.is_empty()) {
        None => None,
        Some(raw) => Some(
            DeliveryId::parse(raw)
                .ok_or_else(|| ApiError::BadRequest(format!("after is not a cursor: {raw:?}")))?,
        ),
    };
    let limit = match param(&params, "limit") {
        None => DEFAULT_FEED_LIMIT,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                ApiError::BadRequest(format!("limit must be 1 to {MAX_FEED_LIMIT}, not {raw:?}"))
            })?
            .min(MAX_FEED_LIMIT),
    };
    let wait = wait_param(state, &params)?;
    let mut committed = state.store.committed();
    committed.borrow_and_update();
    let first = state.store.feed(after, limit, &poller.scope).await?;
    // What is already there is answered without taking a waiting slot.
    let _slot = match wait {
        Some(_) if first.is_empty() => Some(state.waiters.slot().ok_or_else(busy)?),
        _ => None,
    };
    let deadline = tokio::time::Instant::now() + wait.unwrap_or_default();
    let mut over = wait.is_none() || !first.is_empty();
    let mut prefetched = Some(first);
    let records = loop {
        let records = match prefetched.take() {
            Some(records) => records,
            None => {
                committed.borrow_and_update();
                state.store.feed(after, limit, &poller.scope).await?
            }
        };
        if !records.is_empty() || over {
            break records;
        }
        let woken = async {
            if committed.changed().await.is_err() {
                // The store is closing: nothing more will come.
                std::future::pending::<()>().await;
            }
        };
        if let WaitEnd::Over = wait_for(state, woken, deadline).await {
            over = true;
        }
    };
    let mut items = Vec::with_capacity(records.len());
    for record in &records {
        let deliveries = deliveries_of(state, record, &poller.scope).await?;
        items.push(
            serde_json::to_value(Summary::new(record, deliveries))
                .map_err(|e| ApiError::Unavailable(e.to_string()))?,
        );
    }
    let next = records
        .last()
        .map(|r| r.id)
        .or(after)
        .unwrap_or(DeliveryId(0));
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "items": items, "next": next.to_string() }),
    ))
}

/// `GET /v1/deliveries/{delivery_id}`: one delivery, raw or as its summary.
async fn get_delivery(
    state: &AppState,
    raw_id: &str,
    req: &Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let poller = check_bearer(state, req.headers()).await?;
    let id = DeliveryId::parse(raw_id).ok_or(ApiError::NotFound)?;
    let record = state
        .store
        .record(id)
        .await?
        .filter(|r| poller.scope.allows(&r.policy))
        .ok_or(ApiError::NotFound)?;
    let deliveries = deliveries_of(state, &record, &poller.scope).await?;
    delivery_response(state, &record, deliveries, req).await
}

/// `DELETE /v1/responses/{controlid}`: the integrator's acknowledgement.
async fn delete_response(
    state: &AppState,
    raw_id: &str,
    req: &Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let poller = check_bearer(state, req.headers()).await?;
    let controlid = controlid_param(raw_id)?;
    let removed = state
        .store
        .delete_controlid(&controlid, &poller.scope)
        .await?;
    let forgotten = state
        .store
        .forget_expectation(&controlid, &poller.name)
        .await?;
    if removed == 0 && forgotten == 0 {
        return Err(ApiError::NotFound);
    }
    tracing::info!(poller = %poller.name, controlid = %controlid.escape_debug(), removed, "response acknowledged and deleted");
    Ok(no_content())
}

fn no_content() -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// The optional body of `PUT /v1/expected/{controlid}`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectBody {
    /// After how long without a callback the expectation counts as overdue.
    timeout_seconds: Option<u64>,
}

/// `PUT /v1/expected/{controlid}`: records that the integrator awaits this controlid.
async fn put_expected(
    state: &AppState,
    raw_id: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let poller = check_bearer(state, req.headers()).await?;
    let controlid = controlid_param(raw_id)?;
    if controlid.len() > xml::MAX_CONTROLID_BYTES {
        return Err(ApiError::BadRequest(format!(
            "controlid is longer than {} bytes",
            xml::MAX_CONTROLID_BYTES
        )));
    }
    let body = read_body(req.into_body(), 4096, None, state.limits.body_read_timeout).await?;
    let parsed: ExpectBody = if body.iter().all(u8::is_ascii_whitespace) {
        ExpectBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::BadRequest(format!("body is not {{\"timeout_seconds\": N}}: {e}"))
        })?
    };
    let timeout_seconds = parsed
        .timeout_seconds
        .unwrap_or(DEFAULT_EXPECT_TIMEOUT_SECONDS);
    if !(1..=MAX_EXPECT_TIMEOUT_SECONDS).contains(&timeout_seconds) {
        return Err(ApiError::BadRequest(format!(
            "timeout_seconds must be 1 to {MAX_EXPECT_TIMEOUT_SECONDS}"
        )));
    }
    if let Some(latest) = state.store.latest(&controlid, &poller.scope).await? {
        return Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({
                "controlid": controlid,
                "state": "received",
                "delivery_id": latest.record.id.to_string(),
            }),
        ));
    }
    let outcome = state
        .store
        .expect(Expectation {
            controlid,
            poller: poller.name.clone(),
            since_ms: state.now_ms(),
            timeout_seconds,
            scope: poller.scope.clone(),
        })
        .await?;
    let (status, expectation) = match outcome {
        ExpectOutcome::Created(e) => (StatusCode::CREATED, e),
        ExpectOutcome::Existed(e) => (StatusCode::OK, e),
    };
    Ok(json_response(status, &pending_json(state, &expectation)))
}

/// `DELETE /v1/expected/{controlid}`: stops awaiting a controlid.
async fn delete_expected(
    state: &AppState,
    raw_id: &str,
    req: &Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let poller = check_bearer(state, req.headers()).await?;
    let controlid = controlid_param(raw_id)?;
    match state
        .store
        .forget_expectation(&controlid, &poller.name)
        .await?
    {
        0 => Err(ApiError::NotFound),
        _ => Ok(no_content()),
    }
}

/// `GET /v1/expected[?overdue=true]`: the poller's unanswered expectations.
async fn list_expected(
    state: &AppState,
    req: &Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let poller = check_bearer(state, req.headers()).await?;
    let params = query_params(req)?;
    let overdue_only = match param(&params, "overdue") {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "overdue must be true or false, not {other:?}"
            )))
        }
    };
    let items: Vec<serde_json::Value> = state
        .store
        .expectations(&poller.name)
        .await?
        .iter()
        .map(|e| pending_json(state, e))
        .filter(|v| !overdue_only || v["overdue"] == serde_json::Value::Bool(true))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "items": items }),
    ))
}
