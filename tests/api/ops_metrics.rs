//! `/readyz` and `/metrics`: readiness follows the store, the exposition parses as Prometheus
//! text (a strict line checker) and counts what the test did, and the optional metrics token.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use callback_receiver::auth::{Credential, SecretString};
use callback_receiver::config::Config;
use http::{HeaderMap, Method, StatusCode};

use crate::helpers::{
    config_toml, headers, response_doc, spawn_app, spawn_app_with, TestApp, PASSWORD, POLICY,
    TOKEN_ALL, USER,
};

/// The samples of an exposition, by series (`name{labels}` as written), checked line by line:
/// `# HELP` and `# TYPE` lines, then `name{label="value",...} value` lines with valid names,
/// quoted and escaped label values, float values; every sample belongs to the family of the
/// last `# TYPE`, no family or series appears twice, histograms have `le` buckets, `_sum` and
/// `_count`.
pub fn parse_exposition(text: &str) -> Result<BTreeMap<String, f64>, String> {
    fn valid_name(name: &str, colon: bool) -> bool {
        let mut chars = name.chars();
        let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
        let ok_rest = |c: char| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':');
        chars.next().is_some_and(ok_first) && chars.all(ok_rest)
    }
    fn value(raw: &str) -> Option<f64> {
        match raw {
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            _ => raw.parse::<f64>().ok().filter(|_| {
                raw.bytes()
                    .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
            }),
        }
    }
    if !text.ends_with('\n') {
        return Err("the exposition does not end with a line feed".into());
    }
    let mut samples = BTreeMap::new();
    let mut families: HashSet<String> = HashSet::new();
    let mut helped: HashSet<String> = HashSet::new();
    let mut current: Option<(String, String)> = None;
    for (n, line) in text.lines().enumerate() {
        let at = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            return Err(at("empty line"));
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _help) = rest
                .split_once(' ')
                .ok_or_else(|| at("HELP without text"))?;
            if !valid_name(name, true) || !helped.insert(name.to_string()) {
                return Err(at("bad or repeated HELP"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| at("TYPE without a type"))?;
            if !valid_name(name, true) {
                return Err(at("bad metric name"));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at("unknown type"));
            }
            if !families.insert(name.to_string()) {
                return Err(at("family declared twice"));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(at("counter names end with _total"));
            }
            current = Some((name.to_string(), kind.to_string()));
            continue;
        }
        if line.starts_with('#') {
            return Err(at("a comment that is neither HELP nor TYPE"));
        }
        // name{labels} value
        let (series, raw_value) = match line.rfind('}') {
            Some(close) => {
                let rest = &line[close + 1..];
                let v = rest
                    .strip_prefix(' ')
                    .ok_or_else(|| at("no space before the value"))?;
                (&line[..=close], v)
            }
            None => line.split_once(' ').ok_or_else(|| at("no value"))?,
        };
        let v = value(raw_value).ok_or_else(|| at("value is not a float"))?;
        let (name, labels) = match series.find('{') {
            Some(open) => (&series[..open], Some(&series[open + 1..series.len() - 1])),
            None => (series, None),
        };
        if !valid_name(name, true) {
            return Err(at("bad metric name"));
        }
        let mut names = HashSet::new();
        let mut le = None;
        if let Some(mut rest) = labels {
            while !rest.is_empty() {
                let eq = rest.find("=\"").ok_or_else(|| at("label without =\""))?;
                let label = &rest[..eq];
                if !valid_name(label, false) || label.starts_with("__") || !names.insert(label) {
                    return Err(at("bad or repeated label name"));
                }
                let mut chars = rest[eq + 2..].char_indices();
                let mut text = String::new();
                let end = loop {
                    match chars.next() {
                        None => return Err(at("unterminated label value")),
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => text.push('\\'),
                            Some((_, '"')) => text.push('"'),
                            Some((_, 'n')) => text.push('\n'),
                            _ => return Err(at("bad escape in a label value")),
                        },
                        Some((i, '"')) => break eq + 2 + i + 1,
                        Some((_, c)) => text.push(c),
                    }
                };
                if label == "le" {
                    le = Some(text);
                }
                rest = &rest[end..];
                rest = match rest.strip_prefix(',') {
                    Some(r) => r,
                    None if rest.is_empty() => rest,
                    None => return Err(at("labels not separated by a comma")),
                };
            }
        }
        let (family, kind) = current
            .clone()
            .ok_or_else(|| at("sample before any TYPE"))?;
        let belongs = match kind.as_str() {
            "histogram" => {
                let ok = name == format!("{family}_sum")
                    || name == format!("{family}_count")
                    || (name == format!("{family}_bucket")
                        && le.as_deref().and_then(value).is_some());
                ok
            }
            _ => name == family,
        };
        if !belongs {
            return Err(at(&format!("sample outside its family {family} ({kind})")));
        }
        if samples.insert(series.to_string(), v).is_some() {
            return Err(at("series repeated"));
        }
    }
    // Histograms: cumulative buckets ending with +Inf equal to _count.
    for family in &families {
        let prefix = format!("{family}_bucket{{");
        let buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| {
                let le = k.split("le=\"").nth(1).and_then(|r| r.split('"').next());
                (le.and_then(value).unwrap_or(f64::NAN), *v)
            })
            .collect();
        if buckets.is_empty() {
            continue;
        }
        let mut sorted = buckets.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        if sorted.windows(2).any(|w| w[1].1 < w[0].1) {
            return Err(format!("{family}: buckets are not cumulative"));
        }
        let inf = sorted.last().filter(|b| b.0.is_infinite());
        let count = samples.get(&format!("{family}_count"));
        if inf.map(|b| b.1) != count.copied() || !samples.contains_key(&format!("{family}_sum")) {
            return Err(format!(
                "{family}: no +Inf bucket equal to _count, or no _sum"
            ));
        }
    }
    Ok(samples)
}

/// `GET /metrics`, checked and parsed.
async fn scrape(app: &TestApp) -> BTreeMap<String, f64> {
    let answer = app
        .request(Method::GET, "/metrics", HeaderMap::new(), Bytes::new())
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    parse_exposition(&answer.text())
        .unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{}", answer.text()))
}

fn get(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no series {series}; have {:#?}", samples.keys()))
}

#[test]
fn the_checker_refuses_what_prometheus_refuses() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\\\"\"} 3\n";
    assert!(parse_exposition(good).is_ok());
    for bad in [
        "# TYPE a_total counter\na_total 1", // no final line feed
        "a_total 1\n",                       // no TYPE
        "# TYPE a_total counter\na_total{x=\"1} 1\n", // unterminated value
        "# TYPE a_total counter\na_total{1x=\"1\"} 1\n", // bad label name
        "# TYPE a_total counter\na_total one\n", // not a float
        "# TYPE a_total counter\nb_total 1\n", // other family
        "# TYPE a counter\na 1\n",           // counter without _total
        "# TYPE a_total counter\na_total 1\na_total 2\n", // repeated series
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

#[tokio::test]
async fn readyz_follows_the_store() {
    let app = spawn_app().await;
    let answer = app
        .request(Method::GET, "/readyz", HeaderMap::new(), Bytes::new())
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.text(), "ready\n");
    let answer = app
        .request(Method::POST, "/readyz", HeaderMap::new(), Bytes::new())
        .await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);

    // A store that no longer accepts writes: not ready, with the reason.
    app.state.store.close().await.expect("close");
    let answer = app
        .request(Method::GET, "/readyz", HeaderMap::new(), Bytes::new())
        .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        answer.text().starts_with("not ready: "),
        "{}",
        answer.text()
    );
    assert_eq!(answer.header("retry-after"), Some("5"));
    // /healthz still answers: the process runs.
    let answer = app
        .request(Method::GET, "/healthz", HeaderMap::new(), Bytes::new())
        .await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_what_happened() {
    let app = spawn_app().await;
    let before = scrape(&app).await;
    assert_eq!(get(&before, "callback_receiver_stored_deliveries"), 0.0);
    assert_eq!(
        get(
            &before,
            &format!("callback_receiver_callbacks_total{{policy=\"{POLICY}\",outcome=\"stored\"}}")
        ),
        0.0,
        "configured policies start at zero"
    );
    assert_eq!(
        get(
            &before,
            &format!(
                "callback_receiver_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert!(get(&before, "process_start_time_seconds") > 1.0e9);
    assert!(
        get(
            &before,
            "callback_receiver_tls_certificate_expiry_timestamp_seconds"
        ) > 1.0e9
    );

    let mut sent = 0usize;
    for i in 0..3 {
        let body = response_doc(&format!("metrics-{i}"), "m");
        sent += body.len();
        assert_eq!(app.post_ok(body).await.status, StatusCode::OK);
    }
    let duplicate = response_doc("metrics-0", "m");
    sent += duplicate.len();
    assert_eq!(app.post_ok(duplicate).await.status, StatusCode::OK);
    let junk = Bytes::from_static(b"not xml at all");
    sent += junk.len();
    assert_eq!(app.post_ok(junk).await.status, StatusCode::BAD_REQUEST);
    let wrong = app
        .post_callback(
            POLICY,
            Some((USER, "wrong-password")),
            response_doc("x", "y"),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let unknown = app
        .post_callback(
            "no-such-policy",
            Some((USER, PASSWORD)),
            response_doc("x", "y"),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    let bad_token = app
        .get_response("metrics-0", Some("wrong-token-0123456789abc"), false)
        .await;
    assert_eq!(bad_token.status, StatusCode::UNAUTHORIZED);

    // A poller waiting shows as one waiting poller.
    let waiting = {
        let client = app.client.clone();
        tokio::spawn(async move {
            let h = headers(&[("authorization", &format!("Bearer {TOKEN_ALL}"))]);
            client
                .request(
                    Method::GET,
                    "/v1/responses/metrics-late?wait=10",
                    h,
                    Bytes::new(),
                )
                .await
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let during = loop {
        let samples = scrape(&app).await;
        if get(&samples, "callback_receiver_waiting_pollers") == 1.0 {
            break samples;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the waiting poller never showed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let late = response_doc("metrics-late", "m");
    sent += late.len();
    assert_eq!(app.post_ok(late).await.status, StatusCode::OK);
    assert_eq!(waiting.await.expect("join").status, StatusCode::OK);
    assert_eq!(get(&during, "callback_receiver_stored_deliveries"), 3.0);

    let after = scrape(&app).await;
    let cb = |outcome: &str| {
        format!("callback_receiver_callbacks_total{{policy=\"{POLICY}\",outcome=\"{outcome}\"}}")
    };
    assert_eq!(get(&after, &cb("stored")), 4.0);
    assert_eq!(get(&after, &cb("duplicate")), 1.0);
    assert_eq!(get(&after, &cb("quarantined")), 1.0);
    assert_eq!(get(&after, &cb("unauthorized")), 1.0);
    assert_eq!(
        get(
            &after,
            "callback_receiver_callbacks_total{policy=\"(unknown)\",outcome=\"unauthorized\"}"
        ),
        1.0
    );
    assert_eq!(
        get(
            &after,
            &format!("callback_receiver_callback_bytes_total{{policy=\"{POLICY}\"}}")
        ),
        sent as f64
    );
    assert_eq!(
        get(
            &after,
            "callback_receiver_auth_failures_total{side=\"callback\"}"
        ),
        2.0
    );
    assert_eq!(
        get(
            &after,
            "callback_receiver_auth_failures_total{side=\"api\"}"
        ),
        1.0
    );
    assert_eq!(
        get(
            &after,
            "callback_receiver_auth_failures_total{side=\"metrics\"}"
        ),
        0.0
    );
    assert_eq!(
        get(&after, "callback_receiver_http_requests_total{route=\"callback\",method=\"POST\",status=\"200\"}"),
        5.0
    );
    assert_eq!(
        get(&after, "callback_receiver_http_requests_total{route=\"callback\",method=\"POST\",status=\"401\"}"),
        2.0
    );
    assert_eq!(
        get(&after, "callback_receiver_http_requests_total{route=\"response\",method=\"GET\",status=\"200\"}"),
        1.0
    );
    assert_eq!(get(&after, "callback_receiver_stored_deliveries"), 4.0);
    assert_eq!(get(&after, "callback_receiver_quarantined_bodies"), 1.0);
    assert_eq!(get(&after, "callback_receiver_waiting_pollers"), 0.0);
    assert!(get(&after, "callback_receiver_store_size_bytes") > 0.0);
    let flushes = get(
        &after,
        "callback_receiver_store_flush_duration_seconds_count",
    );
    assert!(flushes >= 5.0, "{flushes} flushes");
    assert!(get(&after, "callback_receiver_store_flush_duration_seconds_sum") > 0.0);
    assert_eq!(
        get(&after, "callback_receiver_store_flush_failures_total"),
        0.0
    );
    assert_eq!(
        get(
            &after,
            "callback_receiver_config_reloads_total{result=\"applied\"}"
        ),
        0.0
    );
    assert_eq!(
        get(&after, "callback_receiver_config_last_reload_successful"),
        1.0
    );
}

#[tokio::test]
async fn a_metrics_token_guards_metrics_only() {
    const METRICS_TOKEN: &str = "metrics-token-4b1d9e0c7a";
    let app = spawn_app_with(|c| {
        c.metrics_token = Some(Credential::Plain(SecretString::from(
            METRICS_TOKEN.to_string(),
        )));
    })
    .await;
    let answer = app
        .request(Method::GET, "/metrics", HeaderMap::new(), Bytes::new())
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer.header("www-authenticate"),
        Some("Bearer realm=\"callback-receiver\"")
    );
    let wrong = headers(&[("authorization", "Bearer not-the-metrics-token-123")]);
    let answer = app
        .request(Method::GET, "/metrics", wrong, Bytes::new())
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    // A poller's token is not the metrics token.
    let poller = headers(&[("authorization", &format!("Bearer {TOKEN_ALL}"))]);
    let answer = app
        .request(Method::GET, "/metrics", poller, Bytes::new())
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let right = headers(&[("authorization", &format!("Bearer {METRICS_TOKEN}"))]);
    let answer = app
        .request(Method::GET, "/metrics", right, Bytes::new())
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let samples = parse_exposition(&answer.text()).expect("Prometheus text");
    assert_eq!(
        get(
            &samples,
            "callback_receiver_auth_failures_total{side=\"metrics\"}"
        ),
        3.0
    );
    // Readiness needs no token.
    let answer = app
        .request(Method::GET, "/readyz", HeaderMap::new(), Bytes::new())
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(!crate::helpers::logs().contains(METRICS_TOKEN));
}

#[test]
fn metrics_token_configuration() {
    let dir = std::path::Path::new("/etc/cr");
    let c = Config::from_toml(
        &config_toml("metrics_token = \"0123456789abcdef-metrics\""),
        "t.toml",
        dir,
    )
    .expect("valid");
    assert!(c.metrics_token.is_some());
    assert!(!format!("{c:?}").contains("0123456789abcdef-metrics"));
    let c = Config::from_toml(&config_toml(""), "t.toml", dir).expect("valid");
    assert!(c.metrics_token.is_none() && c.log_timestamps.is_none());
    let c = Config::from_toml(&config_toml("log_timestamps = true"), "t.toml", dir).expect("valid");
    assert_eq!(c.log_timestamps, Some(true));
    for (bad, key) in [
        ("metrics_token = \"short\"", "t.toml:4: metrics_token"),
        (
            "metrics_token_hash = \"nope\"",
            "t.toml:4: metrics_token_hash",
        ),
        (
            "metrics_token = \"0123456789abcdef-metrics\"\nmetrics_token_hash = \"x\"",
            "metrics_token",
        ),
    ] {
        let err = Config::from_toml(&config_toml(bad), "t.toml", dir)
            .expect_err(bad)
            .to_string();
        assert!(err.contains(key), "{bad:?} gave {err}");
    }
}
