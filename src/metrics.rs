//! The counters behind `GET /metrics`, and their rendering in the Prometheus text exposition
//! format (version 0.0.4).
//!
//! A [`Metrics`] registry lives in `AppState`; handlers count with one call each
//! ([`Metrics::callback`], [`Metrics::request`], ...). Figures that other parts already keep
//! (store sizes, flush latency, waiting pollers) are read at scrape time into a [`Snapshot`]
//! and rendered beside the counters. The format is written by hand: a dozen families do not
//! need a client library, and the rendering is tested line by line.
//!
//! Label values are bounded: policies are the configured ones (an unknown policy id from a URL
//! is counted as `(unknown)`), routes and methods come from fixed lists, and statuses are the
//! few codes the service answers with.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};

use crate::auth::Credential;
use crate::store::StoreStats;

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The policy label of callbacks to a policy that is not configured.
pub const UNKNOWN_POLICY: &str = "(unknown)";

/// What became of one callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Stored durably (`200`).
    Stored,
    /// The same bytes were already stored (`200`).
    Duplicate,
    /// Refused as not XML and kept in quarantine (`400`).
    Quarantined,
    /// Credentials missing or wrong, or the policy unknown (`401`).
    Unauthorized,
    /// Larger than `max_body_bytes` (`413`).
    TooLarge,
    /// The body stalled (`408`).
    Timeout,
    /// Refused after too many failed attempts (`429`).
    RateLimited,
    /// Storage could not write (`503`).
    Unavailable,
    /// Anything else (a broken upload, an unexpected status).
    Error,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 9] = [
        Outcome::Stored,
        Outcome::Duplicate,
        Outcome::Quarantined,
        Outcome::Unauthorized,
        Outcome::TooLarge,
        Outcome::Timeout,
        Outcome::RateLimited,
        Outcome::Unavailable,
        Outcome::Error,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Stored => "stored",
            Outcome::Duplicate => "duplicate",
            Outcome::Quarantined => "quarantined",
            Outcome::Unauthorized => "unauthorized",
            Outcome::TooLarge => "too_large",
            Outcome::Timeout => "timeout",
            Outcome::RateLimited => "rate_limited",
            Outcome::Unavailable => "unavailable",
            Outcome::Error => "error",
        }
    }

    /// The outcome of a callback refused with `status` (`None` for the statuses counted where
    /// they are decided: `200` and the quarantine's `400`).
    pub fn of_refusal(status: u16) -> Option<Outcome> {
        match status {
            200..=299 | 400 => None,
            401 | 403 => Some(Outcome::Unauthorized),
            408 => Some(Outcome::Timeout),
            413 => Some(Outcome::TooLarge),
            429 => Some(Outcome::RateLimited),
            503 => Some(Outcome::Unavailable),
            _ => Some(Outcome::Error),
        }
    }
}

/// Which side presented wrong credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The gateway's Basic credentials on `POST /callback/{policy}`.
    Callback,
    /// An integrator's bearer token on `/v1/`.
    Api,
    /// The `metrics_token` on `/metrics`.
    Metrics,
}

impl Side {
    const ALL: [Side; 3] = [Side::Callback, Side::Api, Side::Metrics];

    fn label(self) -> &'static str {
        match self {
            Side::Callback => "callback",
            Side::Api => "api",
            Side::Metrics => "metrics",
        }
    }
}

/// The route label of a request path.
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        "/v1/responses" | "/v1/responses/" => "feed",
        "/v1/expected" | "/v1/expected/" => "expected",
        _ if path.starts_with("/callback/") => "callback",
        _ if path.starts_with("/v1/responses/") => "response",
        _ if path.starts_with("/v1/deliveries/") => "delivery",
        _ if path.starts_with("/v1/expected/") => "expectation",
        _ => "other",
    }
}

/// The method label: the standard methods, `other` for the rest.
fn method_label(method: &http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

/// When this process started, seconds since the Unix epoch (fixed at the first call; `serve`
/// calls [`mark_process_start`] first thing).
pub fn process_start_time() -> f64 {
    static START: OnceLock<f64> = OnceLock::new();
    *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    })
}

/// Fixes the process start time now.
pub fn mark_process_start() {
    let _ = process_start_time();
}

/// The service's counters; one per `AppState`.
#[derive(Debug)]
pub struct Metrics {
    /// Callbacks by (policy, outcome).
    callbacks: Mutex<BTreeMap<(String, Outcome), u64>>,
    /// Body bytes read from callbacks, by policy.
    callback_bytes: Mutex<BTreeMap<String, u64>>,
    /// Wrong or missing credentials, by [`Side`].
    auth_failures: [AtomicU64; 3],
    /// Requests by (route, method, status).
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
    /// Reloads that were applied.
    reloads_ok: AtomicU64,
    /// Reloads refused because the new file was broken.
    reloads_failed: AtomicU64,
    /// 1 when the last reload was applied (or none was tried), 0 when it failed.
    last_reload_ok: AtomicU64,
    /// When the configuration in force was loaded, seconds since the epoch.
    config_loaded_at: AtomicI64,
    /// The certificate's expiry, seconds since the epoch (0 when unknown).
    cert_not_after: AtomicI64,
    /// The bearer token `/metrics` requires, if any.
    token: RwLock<Option<Credential>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Locks a mutex, ignoring poisoning (the maps hold plain counters).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            callbacks: Mutex::new(BTreeMap::new()),
            callback_bytes: Mutex::new(BTreeMap::new()),
            auth_failures: Default::default(),
            requests: Mutex::new(BTreeMap::new()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_reload_ok: AtomicU64::new(1),
            config_loaded_at: AtomicI64::new(now_secs()),
            cert_not_after: AtomicI64::new(0),
            token: RwLock::new(None),
        }
    }

    /// Counts one callback to a configured policy, with the body bytes that were read.
    pub fn callback(&self, policy: &str, outcome: Outcome, bytes: u64) {
        *lock(&self.callbacks)
            .entry((policy.to_owned(), outcome))
            .or_default() += 1;
        if bytes > 0 {
            *lock(&self.callback_bytes)
                .entry(policy.to_owned())
                .or_default() += bytes;
        }
    }

    /// Counts wrong or missing credentials.
    pub fn auth_failure(&self, side: Side) {
        let index = Side::ALL.iter().position(|s| *s == side).unwrap_or(0);
        self.auth_failures[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one answered request. A `401` also counts as an auth failure of its side, and a
    /// refused `POST /callback/{policy}` as a callback outcome (`policy` is the configured
    /// policy id, or `None` when the URL names none).
    pub fn request(&self, method: &http::Method, path: &str, status: u16, policy: Option<&str>) {
        let route = route_label(path);
        *lock(&self.requests)
            .entry((route, method_label(method), status))
            .or_default() += 1;
        if status == 401 {
            self.auth_failure(match route {
                "callback" => Side::Callback,
                "metrics" => Side::Metrics,
                _ => Side::Api,
            });
        }
        if route == "callback" && *method == http::Method::POST {
            if let Some(outcome) = Outcome::of_refusal(status) {
                self.callback(policy.unwrap_or(UNKNOWN_POLICY), outcome, 0);
            }
        }
    }

    /// Records the outcome of a reload.
    pub fn reload(&self, applied: bool) {
        if applied {
            self.reloads_ok.fetch_add(1, Ordering::Relaxed);
            self.config_loaded_at.store(now_secs(), Ordering::Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.last_reload_ok
            .store(u64::from(applied), Ordering::Relaxed);
    }

    /// Records the expiry of the certificate in force (from its DER).
    pub fn set_certificate(&self, leaf_der: &[u8]) {
        let not_after = cert_not_after(leaf_der).unwrap_or(0);
        self.cert_not_after.store(not_after, Ordering::Relaxed);
    }

    /// Sets (or clears) the bearer token `/metrics` requires.
    pub fn set_token(&self, token: Option<Credential>) {
        match self.token.write() {
            Ok(mut guard) => *guard = token,
            Err(poisoned) => *poisoned.into_inner() = token,
        }
    }

    /// The bearer token `/metrics` requires, if any.
    pub fn token(&self) -> Option<Credential> {
        match self.token.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The whole exposition: these counters and the `snapshot`.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut out = Exposition::default();

        out.family(
            "callback_receiver_build_info",
            "gauge",
            "Build information; the value is always 1.",
        );
        out.sample(
            "callback_receiver_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
        out.family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
        );
        out.sample("process_start_time_seconds", &[], process_start_time());

        let callbacks = lock(&self.callbacks).clone();
        let mut series: BTreeMap<(String, Outcome), u64> = BTreeMap::new();
        // Every configured policy shows every outcome, zeros included, so rates start at once.
        for policy in &snapshot.policies {
            for outcome in Outcome::ALL {
                series.insert((policy.clone(), outcome), 0);
            }
        }
        series.extend(callbacks);
        out.family(
            "callback_receiver_callbacks_total",
            "counter",
            "Callbacks received, by policy and outcome.",
        );
        for ((policy, outcome), n) in &series {
            out.sample(
                "callback_receiver_callbacks_total",
                &[("policy", policy), ("outcome", outcome.label())],
                *n as f64,
            );
        }
        let mut bytes: BTreeMap<String, u64> =
            snapshot.policies.iter().map(|p| (p.clone(), 0)).collect();
        bytes.extend(lock(&self.callback_bytes).clone());
        out.family(
            "callback_receiver_callback_bytes_total",
            "counter",
            "Body bytes read from callbacks (stored, duplicate or quarantined), by policy.",
        );
        for (policy, n) in &bytes {
            out.sample(
                "callback_receiver_callback_bytes_total",
                &[("policy", policy)],
                *n as f64,
            );
        }

        out.family(
            "callback_receiver_auth_failures_total",
            "counter",
            "Requests refused for missing or wrong credentials, by side (callback: the gateway's Basic credentials; api: poller tokens; metrics: the metrics token).",
        );
        for (side, n) in Side::ALL.iter().zip(&self.auth_failures) {
            out.sample(
                "callback_receiver_auth_failures_total",
                &[("side", side.label())],
                n.load(Ordering::Relaxed) as f64,
            );
        }

        out.family(
            "callback_receiver_http_requests_total",
            "counter",
            "HTTP requests answered, by route, method and status.",
        );
        for ((route, method, status), n) in lock(&self.requests).iter() {
            out.sample(
                "callback_receiver_http_requests_total",
                &[
                    ("route", route),
                    ("method", method),
                    ("status", &status.to_string()),
                ],
                *n as f64,
            );
        }

        out.family(
            "callback_receiver_waiting_pollers",
            "gauge",
            "Pollers currently waiting (long-poll) for a response.",
        );
        out.sample(
            "callback_receiver_waiting_pollers",
            &[],
            snapshot.waiting_pollers as f64,
        );
        let store = &snapshot.store;
        out.family(
            "callback_receiver_stored_deliveries",
            "gauge",
            "Deliveries kept in the store.",
        );
        out.sample(
            "callback_receiver_stored_deliveries",
            &[],
            store.deliveries as f64,
        );
        out.family(
            "callback_receiver_quarantined_bodies",
            "gauge",
            "Refused bodies kept in quarantine.",
        );
        out.sample(
            "callback_receiver_quarantined_bodies",
            &[],
            store.quarantined as f64,
        );
        out.family(
            "callback_receiver_store_size_bytes",
            "gauge",
            "Bytes the database uses on disk (data_dir).",
        );
        out.sample(
            "callback_receiver_store_size_bytes",
            &[],
            store.size_on_disk_bytes as f64,
        );
        if let Some(flush) = &store.flush {
            let name = "callback_receiver_store_flush_duration_seconds";
            out.family(
                name,
                "histogram",
                "Time to make one group of writes durable (flush and fsync).",
            );
            for (bound, count) in &flush.buckets {
                out.sample(
                    &format!("{name}_bucket"),
                    &[("le", &format_float(*bound))],
                    *count as f64,
                );
            }
            out.sample(
                &format!("{name}_bucket"),
                &[("le", "+Inf")],
                flush.flushes as f64,
            );
            out.sample(&format!("{name}_sum"), &[], flush.seconds_sum);
            out.sample(&format!("{name}_count"), &[], flush.flushes as f64);
            out.family(
                "callback_receiver_store_flush_failures_total",
                "counter",
                "Groups of writes that could not be made durable (answered 503).",
            );
            out.sample(
                "callback_receiver_store_flush_failures_total",
                &[],
                flush.failures as f64,
            );
            out.family(
                "callback_receiver_store_writes_total",
                "counter",
                "Write requests made durable.",
            );
            out.sample(
                "callback_receiver_store_writes_total",
                &[],
                flush.requests as f64,
            );
        }
        if let Some(cache) = &store.read_cache {
            let name = "callback_receiver_read_cache_lookups_total";
            out.family(
                name,
                "counter",
                "Raw GET or HEAD answers with a delivery (200 or 304), by where it came from: hit (the memory cache) or miss (the store).",
            );
            out.sample(name, &[("result", "hit")], cache.hits as f64);
            out.sample(name, &[("result", "miss")], cache.misses as f64);
            let name = "callback_receiver_read_cache_bytes";
            out.family(
                name,
                "gauge",
                "Memory the raw GET cache holds (bodies, names, bookkeeping); at most read_cache_mb.",
            );
            out.sample(name, &[], cache.bytes as f64);
            let name = "callback_receiver_read_cache_entries";
            out.family(name, "gauge", "Controlids the raw GET cache holds.");
            out.sample(name, &[], cache.entries as f64);
        }

        out.family(
            "callback_receiver_config_reloads_total",
            "counter",
            "Configuration reloads (SIGHUP), by result: applied, or failed (the old settings stay).",
        );
        out.sample(
            "callback_receiver_config_reloads_total",
            &[("result", "applied")],
            self.reloads_ok.load(Ordering::Relaxed) as f64,
        );
        out.sample(
            "callback_receiver_config_reloads_total",
            &[("result", "failed")],
            self.reloads_failed.load(Ordering::Relaxed) as f64,
        );
        out.family(
            "callback_receiver_config_last_reload_successful",
            "gauge",
            "1 when the last reload was applied (or none was tried), 0 when it failed.",
        );
        out.sample(
            "callback_receiver_config_last_reload_successful",
            &[],
            self.last_reload_ok.load(Ordering::Relaxed) as f64,
        );
        out.family(
            "callback_receiver_config_loaded_timestamp_seconds",
            "gauge",
            "When the configuration in force was loaded, since the Unix epoch.",
        );
        out.sample(
            "callback_receiver_config_loaded_timestamp_seconds",
            &[],
            self.config_loaded_at.load(Ordering::Relaxed) as f64,
        );
        let not_after = self.cert_not_after.load(Ordering::Relaxed);
        if not_after != 0 {
            out.family(
                "callback_receiver_tls_certificate_expiry_timestamp_seconds",
                "gauge",
                "notAfter of the certificate served to new connections, since the Unix epoch.",
            );
            out.sample(
                "callback_receiver_tls_certificate_expiry_timestamp_seconds",
                &[],
                not_after as f64,
            );
        }
        out.text
    }
}

/// What `/metrics` reads from other parts at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The configured policy ids (for zero-valued series).
    pub policies: Vec<String>,
    /// Pollers waiting now.
    pub waiting_pollers: usize,
    /// The store's figures.
    pub store: StoreStats,
}

/// A text exposition being written.
#[derive(Default)]
struct Exposition {
    /// The text so far.
    text: String,
}

impl Exposition {
    /// Writes the `# HELP` and `# TYPE` lines of a family.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// Writes one sample line.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{key}=\"{}\"", escape_label(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_float(value));
    }
}

/// Escapes a label value: backslash, double quote and line feed.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value as Prometheus writes it: integers without a fraction, `+Inf`, `NaN`.
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

// ---------------------------------------------------------------------------------------------
// Certificate expiry: just enough DER to find `tbsCertificate.validity.notAfter`.

/// Reads one DER element at the start of `input`: (tag, content, rest).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The `notAfter` of an X.509 certificate, seconds since the Unix epoch.
pub fn cert_not_after(der: &[u8]) -> Option<i64> {
    const SEQUENCE: u8 = 0x30;
    let (tag, certificate, _) = der_element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = der_element(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    // [0] version (optional), serialNumber, signature, issuer, then validity.
    let (tag, _, after) = der_element(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..3 {
        rest = der_element(rest)?.2;
    }
    let (tag, validity, _) = der_element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _, after_not_before) = der_element(validity)?;
    let (tag, not_after, _) = der_element(after_not_before)?;
    let text = std::str::from_utf8(not_after).ok()?;
    parse_der_time(tag, text)
}

/// `UTCTime` (`YYMMDDHHMMSSZ`) or `GeneralizedTime` (`YYYYMMDDHHMMSSZ`) as epoch seconds.
fn parse_der_time(tag: u8, text: &str) -> Option<i64> {
    let digits = text.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if digits.len() == 12 => {
            let yy: i32 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        0x18 if digits.len() == 14 => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let field = |i: usize| -> Option<u8> { rest.get(i..i + 2)?.parse().ok() };
    let month = time::Month::try_from(field(0)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, field(2)?).ok()?;
    let time = time::Time::from_hms(field(4)?, field(6)?, field(8)?).ok()?;
    Some(
        time::PrimitiveDateTime::new(date, time)
            .assume_utc()
            .unix_timestamp(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_of_refusals() {
        assert_eq!(Outcome::of_refusal(200), None);
        assert_eq!(Outcome::of_refusal(400), None);
        assert_eq!(Outcome::of_refusal(401), Some(Outcome::Unauthorized));
        assert_eq!(Outcome::of_refusal(413), Some(Outcome::TooLarge));
        assert_eq!(Outcome::of_refusal(503), Some(Outcome::Unavailable));
        assert_eq!(Outcome::of_refusal(500), Some(Outcome::Error));
    }

    #[test]
    fn routes_are_a_fixed_set() {
        assert_eq!(route_label("/callback/x"), "callback");
        assert_eq!(route_label("/v1/responses"), "feed");
        assert_eq!(route_label("/v1/responses/abc"), "response");
        assert_eq!(route_label("/v1/deliveries/01"), "delivery");
        assert_eq!(route_label("/anything/else"), "other");
        assert_eq!(
            method_label(&http::Method::from_bytes(b"BREW").expect("method")),
            "other"
        );
    }

    #[test]
    fn render_counts_and_escapes() {
        let m = Metrics::new();
        m.callback("p", Outcome::Stored, 10);
        m.callback("p", Outcome::Stored, 5);
        m.request(&http::Method::POST, "/callback/zz", 401, None);
        m.request(&http::Method::GET, "/v1/responses/x", 401, None);
        let text = m.render(&Snapshot {
            policies: vec!["p".into(), "q\"x".into()],
            ..Snapshot::default()
        });
        assert!(
            text.contains("callback_receiver_callbacks_total{policy=\"p\",outcome=\"stored\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "callback_receiver_callbacks_total{policy=\"q\\\"x\",outcome=\"stored\"} 0\n"
            ),
            "{text}"
        );
        assert!(text.contains("callback_receiver_callbacks_total{policy=\"(unknown)\",outcome=\"unauthorized\"} 1\n"), "{text}");
        assert!(
            text.contains("callback_receiver_callback_bytes_total{policy=\"p\"} 15\n"),
            "{text}"
        );
        assert!(
            text.contains("callback_receiver_auth_failures_total{side=\"callback\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("callback_receiver_auth_failures_total{side=\"api\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("callback_receiver_build_info{version=\""),
            "{text}"
        );
    }

    #[test]
    fn floats_are_written_as_prometheus_does() {
        assert_eq!(format_float(3.0), "3");
        assert_eq!(format_float(0.0005), "0.0005");
        assert_eq!(format_float(f64::INFINITY), "+Inf");
    }

    #[test]
    fn certificate_expiry_of_a_generated_certificate() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2031, 7, 9);
        let cert = params.self_signed(&key).expect("cert");
        let expected = time::macros::datetime!(2031-07-09 0:00 UTC).unix_timestamp();
        assert_eq!(cert_not_after(cert.der()), Some(expected));
        params.not_after = rcgen::date_time_ymd(2051, 1, 2);
        let cert = params.self_signed(&key).expect("cert");
        let expected = time::macros::datetime!(2051-01-02 0:00 UTC).unix_timestamp();
        assert_eq!(cert_not_after(cert.der()), Some(expected));
        assert_eq!(cert_not_after(b"garbage"), None);
    }
}
