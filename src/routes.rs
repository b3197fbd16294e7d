//! Method and path dispatch, the handlers, and the mapping of errors to responses.
//!
//! Every request gets a span with a request id and one log line when it ends (method, path as
//! received, status, bytes, latency). Authorization values are never logged.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::auth;
use crate::state::{AppState, AuthenticatedPoller};
use crate::store::{NewDelivery, NewQuarantine, PutOutcome, StoreError};
use crate::summary::Summary;
use crate::xml;

/// Bodies above this size are parsed on the blocking pool instead of the async workers.
const INLINE_PARSE_BYTES: usize = 256 * 1024;

/// The realm of every `WWW-Authenticate` challenge.
const REALM: &str = "callback-receiver";

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
}

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
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The response: a JSON `{"error": ...}` on the API, a one-line text elsewhere.
    fn into_response(self, json: bool) -> HttpResponse {
        let status = self.status();
        let message = self.to_string();
        let mut builder = Response::builder().status(status);
        match &self {
            ApiError::Unauthorized { scheme, .. } => {
                builder = builder.header(
                    header::WWW_AUTHENTICATE,
                    format!("{scheme} realm=\"{REALM}\""),
                );
            }
            ApiError::MethodNotAllowed { allow } => {
                builder = builder.header(header::ALLOW, *allow);
            }
            ApiError::Unavailable(_) => {
                builder = builder.header(header::RETRY_AFTER, "5");
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

/// The routes, as parsed from a path.
enum Route<'a> {
    Callback(&'a str),
    Response(&'a str),
    Healthz,
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
    if let Some(rest) = path.strip_prefix("/v1/responses/") {
        if !rest.is_empty() {
            return Route::Response(rest);
        }
        return Route::Unknown;
    }
    if path == "/healthz" {
        return Route::Healthz;
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
    let response = dispatch(state, req).instrument(span.clone()).await;
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

async fn dispatch(state: Arc<AppState>, req: Request<Incoming>) -> HttpResponse {
    let path = req.uri().path().to_string();
    match route(&path) {
        Route::Callback(policy) => {
            if req.method() != Method::POST {
                return ApiError::MethodNotAllowed { allow: "POST" }.into_response(false);
            }
            match callback(&state, policy, req).await {
                Ok(response) => response,
                Err(e) => e.into_response(false),
            }
        }
        Route::Response(raw_id) => {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return ApiError::MethodNotAllowed { allow: "GET, HEAD" }.into_response(true);
            }
            match get_response(&state, raw_id, &req).await {
                Ok(response) => response,
                Err(e) => e.into_response(true),
            }
        }
        Route::Healthz => {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return ApiError::MethodNotAllowed { allow: "GET, HEAD" }.into_response(false);
            }
            plain(StatusCode::OK, "ok")
        }
        Route::Unknown => ApiError::NotFound.into_response(path.starts_with("/v1/")),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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
    let policy_id = percent_decode(raw_policy, "policy id")?;
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
    let received_at_ms = now_ms();

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
            tracing::warn!(policy = %policy_id, quarantine_id = %id, size = body.len(), %reason, "callback refused; body kept in quarantine");
            Err(ApiError::BadRequest(reason))
        }
        (Ok(extracted), digest) => {
            let controlid = extracted.controlid.clone();
            let well_formed = extracted.well_formed;
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
            let (id, duplicate) = match outcome {
                PutOutcome::Stored(id) => (id, false),
                PutOutcome::Duplicate(id) => (id, true),
            };
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
        tracing::warn!(policy = %policy_id, "callback for an unknown policy");
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
    let capacity = declared.unwrap_or(0).min(limit).min(64 * 1024 * 1024) as usize;
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
            if (buf.len() + data.len()) as u64 > limit {
                return Err(ApiError::PayloadTooLarge { limit });
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

fn wants_json(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let media = range.split(';').next().unwrap_or("").trim();
            media.eq_ignore_ascii_case("application/json")
        })
}

/// `GET /v1/responses/{controlid}`: the newest delivery, raw or as a JSON summary.
async fn get_response(
    state: &AppState,
    raw_id: &str,
    req: &Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let poller = check_bearer(state, req.headers()).await?;
    let controlid = percent_decode(raw_id, "controlid")?;
    let latest = state
        .store
        .latest(&controlid, &poller.scope)
        .await?
        .ok_or(ApiError::NotFound)?;
    let record = latest.record;
    let etag = format!("\"{}\"", hex::encode(record.sha256));
    let json = wants_json(req.headers());
    if !json {
        let not_modified = req
            .headers()
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
        if not_modified {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            if let Ok(v) = HeaderValue::from_str(&etag) {
                response.headers_mut().insert(header::ETAG, v);
            }
            return Ok(response);
        }
    }
    let mut response = if json {
        json_response(StatusCode::OK, &Summary::new(&record, latest.deliveries))
    } else {
        let body = state
            .store
            .body(record.id)
            .await?
            .ok_or(ApiError::NotFound)?;
        let mut r = Response::new(Full::new(body));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml"),
        );
        r
    };
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&record.id.to_string()) {
        headers.insert("x-delivery-id", v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::VARY, HeaderValue::from_static("accept"));
    Ok(response)
}
