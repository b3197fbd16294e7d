//! The integrator API: long-polls on a controlid and on the feed, the feed's cursors and scope,
//! single deliveries, acknowledgement, expectations (with an injected clock), retention, and the
//! limits on waiting requests.
//!
//! A test that needs a request to be *waiting* before it posts the callback watches
//! `state.waiters.waiting()`, which counts the requests that hold a waiting slot.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callback_receiver::state::{AppState, Clock};
use http::header::{HeaderValue, AUTHORIZATION};
use http::{HeaderMap, Method, StatusCode};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::helpers::{
    basic, encode_segment, fixture, headers, response_doc, sha256_hex, spawn_app, spawn_app_with,
    spawn_app_with_clock, Answer, Client, H2Conn, OPEN_POLICY, PASSWORD, POLICY, SECOND_PASSWORD,
    SECOND_POLICY, SECOND_USER, TOKEN_ALL, TOKEN_SCOPED, USER,
};

/// 2026-12-03T19:00:00.000Z, where the injected clocks start.
const BASE_MS: i64 = 1_796_324_400_000;
/// [`BASE_MS`] as the API writes it.
const BASE_TEXT: &str = "2026-12-03T19:00:00.000Z";
/// One day in milliseconds.
const DAY_MS: i64 = 86_400_000;
/// The fixture without a control-level controlid (`<control/>`).
const UNMATCHED_FIXTURE: &str = "Get-Object.Default.xml";

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A wall clock that stands still until a test moves it.
#[derive(Clone)]
struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    fn new() -> Self {
        Self(Arc::new(AtomicI64::new(BASE_MS)))
    }

    fn clock(&self) -> Clock {
        let now = self.0.clone();
        Arc::new(move || now.load(Ordering::SeqCst))
    }

    fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

/// `Authorization: Bearer` and, with `json`, `Accept: application/json`.
fn auth(token: &str, json: bool) -> HeaderMap {
    let bearer = format!("Bearer {token}");
    if json {
        headers(&[("authorization", &bearer), ("accept", "application/json")])
    } else {
        headers(&[("authorization", &bearer)])
    }
}

async fn get(client: &Client, path: &str, token: &str, json: bool) -> Answer {
    client
        .request(Method::GET, path, auth(token, json), Bytes::new())
        .await
}

async fn delete(client: &Client, path: &str, token: &str) -> Answer {
    client
        .request(Method::DELETE, path, auth(token, false), Bytes::new())
        .await
}

async fn put(client: &Client, path: &str, token: &str, body: &str) -> Answer {
    let mut h = auth(token, false);
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    client
        .request(Method::PUT, path, h, Bytes::from(body.to_string()))
        .await
}

fn response_path(controlid: &str) -> String {
    format!("/v1/responses/{}", encode_segment(controlid))
}

fn expected_path(controlid: &str) -> String {
    format!("/v1/expected/{}", encode_segment(controlid))
}

/// The Basic credentials of the test policies (`open` has none).
fn credentials(policy: &str) -> Option<(&'static str, &'static str)> {
    match policy {
        POLICY => Some((USER, PASSWORD)),
        SECOND_POLICY => Some((SECOND_USER, SECOND_PASSWORD)),
        OPEN_POLICY => None,
        other => panic!("no credentials for policy {other}"),
    }
}

/// The headers of a callback to `policy`.
fn callback_headers(policy: &str) -> HeaderMap {
    let mut h = headers(&[("content-type", "application/xml")]);
    if let Some((user, password)) = credentials(policy) {
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&basic(user, password)).expect("basic header"),
        );
    }
    h
}

fn callback_path(policy: &str) -> String {
    format!("/callback/{}", encode_segment(policy))
}

/// Checks a callback answer and returns its delivery id.
fn stored_id(answer: &Answer) -> String {
    assert_eq!(answer.status, StatusCode::OK, "callback: {}", answer.text());
    answer.json()["delivery_id"]
        .as_str()
        .expect("delivery_id in the callback answer")
        .to_string()
}

/// Posts a callback on a new connection; returns its delivery id.
async fn post(client: &Client, policy: &str, body: &Bytes) -> String {
    let answer = client
        .request(
            Method::POST,
            &callback_path(policy),
            callback_headers(policy),
            body.clone(),
        )
        .await;
    stored_id(&answer)
}

/// Posts `bodies` to `policy` over a few HTTP/2 connections, `concurrency` at a time; returns
/// the delivery ids in the order of `bodies`.
async fn post_many(
    client: &Client,
    policy: &str,
    bodies: &[Bytes],
    concurrency: usize,
) -> Vec<String> {
    let mut conns = Vec::new();
    for _ in 0..concurrency.div_ceil(8) {
        conns.push(client.h2().await);
    }
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    for (i, body) in bodies.iter().enumerate() {
        let mut conn = conns[i % conns.len()].clone();
        let gate = gate.clone();
        let body = body.clone();
        let path = callback_path(policy);
        let h = callback_headers(policy);
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            let answer = conn.request(Method::POST, &path, h, body).await;
            (i, stored_id(&answer))
        });
    }
    let mut ids = vec![String::new(); bodies.len()];
    while let Some(done) = tasks.join_next().await {
        let (i, id) = done.expect("post task");
        ids[i] = id;
    }
    ids
}

/// Waits (bounded) until exactly `n` requests hold a waiting slot.
async fn wait_until_waiting(state: &AppState, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while state.waiters.waiting() != n {
        assert!(
            Instant::now() < deadline,
            "waiting requests stayed at {} instead of reaching {n}",
            state.waiters.waiting()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `GET /v1/responses?{query}`, asserting `200`.
async fn feed(client: &Client, token: &str, query: &str) -> Value {
    let answer = get(client, &format!("/v1/responses?{query}"), token, false).await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "feed ?{query}: {}",
        answer.text()
    );
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let page = answer.json();
    assert!(page["items"].is_array(), "feed ?{query}: {page}");
    assert!(page["next"].is_string(), "feed ?{query}: {page}");
    page
}

/// The delivery ids of a feed page.
fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| {
            item["delivery_id"]
                .as_str()
                .expect("delivery_id")
                .to_string()
        })
        .collect()
}

fn next(page: &Value) -> String {
    page["next"].as_str().expect("next").to_string()
}

/// The p-th percentile (nearest rank) of sorted durations.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// A long-poll running in its own task; gives the answer and how long it took.
fn spawn_get(
    client: &Client,
    path: String,
    token: &'static str,
    json: bool,
) -> tokio::task::JoinHandle<(Answer, Duration)> {
    let client = client.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let answer = get(&client, &path, token, json).await;
        (answer, started.elapsed())
    })
}

// ---------------------------------------------------------------------------------------------
// 1. Long-poll on a controlid.

const LATENCY_ITERATIONS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_answers_the_moment_the_callback_is_stored() {
    let app = spawn_app().await;
    for json in [false, true] {
        let kind = if json { "json" } else { "raw" };
        let mut poll_conn = Some(app.h1().await);
        let mut post_conn = app.h1().await;
        let mut latencies = Vec::with_capacity(LATENCY_ITERATIONS);
        let mut before_200 = 0;
        for i in 0..LATENCY_ITERATIONS {
            let controlid = format!("long-poll {kind} #{i}/ü");
            let body = response_doc(&controlid, &format!("marker {kind} {i}"));
            let path = format!("{}?wait=30", response_path(&controlid));
            let mut conn = poll_conn.take().expect("poll connection");
            let poll = tokio::spawn(async move {
                let started = Instant::now();
                let answer = conn
                    .request(Method::GET, &path, auth(TOKEN_ALL, json), Bytes::new())
                    .await;
                let answered = Instant::now();
                (conn, answer, started, answered)
            });
            wait_until_waiting(&app.state, 1).await;

            let posted = post_conn
                .request(
                    Method::POST,
                    &callback_path(POLICY),
                    callback_headers(POLICY),
                    body.clone(),
                )
                .await;
            let stored = Instant::now();
            let delivery_id = stored_id(&posted);

            let (conn, answer, started, answered) = poll.await.expect("poll task");
            poll_conn = Some(conn);
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "{kind} #{i}: {}",
                answer.text()
            );
            assert!(
                answered - started < Duration::from_secs(15),
                "{kind} #{i}: answered after {:?}, not when the callback was stored",
                answered - started
            );
            if json {
                assert_eq!(answer.header("content-type"), Some("application/json"));
                let summary = answer.json();
                assert_eq!(summary["controlid"], Value::from(controlid.as_str()));
                assert_eq!(summary["delivery_id"], Value::from(delivery_id.as_str()));
                assert_eq!(summary["sha256"], Value::from(sha256_hex(&body)));
                assert_eq!(summary["size"], Value::from(body.len()));
                assert_eq!(summary["deliveries"], Value::from(1));
                assert_eq!(summary["matched"], Value::Bool(true));
                assert_eq!(summary["policy"], Value::from(POLICY));
            } else {
                assert_eq!(answer.header("content-type"), Some("application/xml"));
                assert_eq!(answer.body, body, "{kind} #{i}: not the exact bytes");
                let etag = format!("\"{}\"", sha256_hex(&body));
                assert_eq!(answer.header("etag"), Some(etag.as_str()));
            }
            match answered.checked_duration_since(stored) {
                Some(d) => latencies.push(d),
                None => {
                    before_200 += 1;
                    latencies.push(Duration::ZERO);
                }
            }
            assert_eq!(app.state.waiters.waiting(), 0, "the slot is freed");
        }
        latencies.sort();
        println!(
            "long-poll latency ({kind}, HTTP/1.1, {LATENCY_ITERATIONS} sequential iterations, \
             callback's 200 read -> poller's answer read): p50 {:?}, p99 {:?}, max {:?} \
             ({before_200} poller answers were read before the callback's 200, counted as 0)",
            percentile(&latencies, 50),
            percentile(&latencies, 99),
            latencies[latencies.len() - 1],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Time-outs and the `wait` parameter.

#[tokio::test]
async fn wait_times_out_with_the_answer_it_would_have_given() {
    let app = spawn_app().await;
    for json in [false, true] {
        let started = Instant::now();
        let answer = get(&app, "/v1/responses/never-posted?wait=1", TOKEN_ALL, json).await;
        let took = started.elapsed();
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{}", answer.text());
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(10),
            "wait=1 answered after {took:?}"
        );
    }
    // Fractions of a second are allowed.
    let started = Instant::now();
    let answer = get(
        &app,
        "/v1/responses/never-posted?wait=0.3",
        TOKEN_ALL,
        false,
    )
    .await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(10),
        "wait=0.3 answered after {took:?}"
    );
}

#[tokio::test]
async fn a_wait_that_is_not_a_number_of_seconds_is_400() {
    let app = spawn_app().await;
    for bad in ["abc", "-1", "NaN", "inf", "1s"] {
        for path in [
            format!("/v1/responses/never-posted?wait={bad}"),
            format!("/v1/responses?wait={bad}"),
        ] {
            let started = Instant::now();
            let answer = get(&app, &path, TOKEN_ALL, false).await;
            assert_eq!(
                answer.status,
                StatusCode::BAD_REQUEST,
                "{path}: {}",
                answer.text()
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{path}: did not answer at once"
            );
            assert!(
                answer.json()["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("wait")),
                "{path}: {}",
                answer.text()
            );
        }
    }
}

#[tokio::test]
async fn wait_is_capped_by_max_wait_seconds() {
    let app = spawn_app_with(|c| c.limits.max_wait = Duration::from_secs(1)).await;
    let started = Instant::now();
    let answer = get(
        &app,
        "/v1/responses/never-posted?wait=100000",
        TOKEN_ALL,
        false,
    )
    .await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{}", answer.text());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "wait=100000 with max_wait_seconds = 1 answered after {took:?}"
    );

    let started = Instant::now();
    let page = feed(&app, TOKEN_ALL, "wait=100000").await;
    let took = started.elapsed();
    assert!(ids(&page).is_empty(), "{page}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "feed wait=100000 with max_wait_seconds = 1 answered after {took:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. The feed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_pages_in_arrival_order_with_unmatched_items_and_scope() {
    let app = spawn_app().await;
    let empty = feed(&app, TOKEN_ALL, "").await;
    assert!(ids(&empty).is_empty(), "{empty}");
    // The cursor of an empty feed is usable.
    let again = feed(&app, TOKEN_ALL, &format!("after={}", next(&empty))).await;
    assert!(ids(&again).is_empty(), "{again}");

    let posted: Vec<(&str, Option<&str>, Bytes)> = vec![
        (POLICY, Some("feed-a"), response_doc("feed-a", "a")),
        (SECOND_POLICY, Some("feed-b"), response_doc("feed-b", "b1")),
        (POLICY, None, fixture(UNMATCHED_FIXTURE)),
        (OPEN_POLICY, Some("feed-c"), response_doc("feed-c", "c")),
        (SECOND_POLICY, Some("feed-d"), response_doc("feed-d", "d")),
        (SECOND_POLICY, Some("feed-b"), response_doc("feed-b", "b2")),
    ];
    let mut all = Vec::new();
    for (policy, _, body) in &posted {
        all.push(post(&app, policy, body).await);
    }

    // Everything, in arrival order, for the poller of every policy.
    let page = feed(&app, TOKEN_ALL, "").await;
    assert_eq!(ids(&page), all, "{page}");
    assert_eq!(next(&page), all[all.len() - 1]);
    for (item, (policy, controlid, body)) in
        page["items"].as_array().expect("items").iter().zip(&posted)
    {
        assert_eq!(item["policy"], Value::from(*policy), "{item}");
        assert_eq!(item["sha256"], Value::from(sha256_hex(body)), "{item}");
        assert_eq!(item["size"], Value::from(body.len()), "{item}");
        match controlid {
            Some(cid) => {
                assert_eq!(item["controlid"], Value::from(*cid), "{item}");
                assert_eq!(item["matched"], Value::Bool(true), "{item}");
                let deliveries = if *cid == "feed-b" { 2 } else { 1 };
                assert_eq!(item["deliveries"], Value::from(deliveries), "{item}");
            }
            None => {
                assert_eq!(item["controlid"], Value::Null, "{item}");
                assert_eq!(item["matched"], Value::Bool(false), "{item}");
                assert_eq!(item["deliveries"], Value::from(1), "{item}");
            }
        }
    }

    // Pages of two, following `next` until a page is empty; the empty page keeps the cursor.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut sizes = Vec::new();
    loop {
        let query = match &cursor {
            None => "limit=2".to_string(),
            Some(c) => format!("limit=2&after={c}"),
        };
        let page = feed(&app, TOKEN_ALL, &query).await;
        let page_ids = ids(&page);
        sizes.push(page_ids.len());
        if page_ids.is_empty() {
            assert_eq!(Some(next(&page)), cursor, "an empty page keeps the cursor");
            break;
        }
        assert_eq!(next(&page), page_ids[page_ids.len() - 1]);
        seen.extend(page_ids);
        cursor = Some(next(&page));
        assert!(sizes.len() < 10, "paging does not end: {sizes:?}");
    }
    assert_eq!(sizes, vec![2, 2, 2, 0]);
    assert_eq!(seen, all);

    // A limit above the maximum is clamped, not refused; a limit that is no count is refused.
    let page = feed(&app, TOKEN_ALL, "limit=5000").await;
    assert_eq!(ids(&page), all);
    for bad in ["0", "-1", "abc", "1.5"] {
        let answer = get(
            &app,
            &format!("/v1/responses?limit={bad}"),
            TOKEN_ALL,
            false,
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "limit={bad}: {}",
            answer.text()
        );
    }
    // A cursor that is not one is refused.
    for bad in ["xyz", "123", "zzzzzzzzzzzzzzzz", "0x000000000000001", "%00"] {
        let answer = get(
            &app,
            &format!("/v1/responses?after={bad}"),
            TOKEN_ALL,
            false,
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "after={bad}: {}",
            answer.text()
        );
        assert!(answer.json()["error"].is_string(), "after={bad}");
    }

    // The scoped poller sees only its policy's deliveries, in the same order.
    let scoped = feed(&app, TOKEN_SCOPED, "").await;
    assert_eq!(
        ids(&scoped),
        vec![all[1].clone(), all[4].clone(), all[5].clone()]
    );
    for item in scoped["items"].as_array().expect("items") {
        assert_eq!(item["policy"], Value::from(SECOND_POLICY), "{item}");
    }
    let scoped = feed(&app, TOKEN_SCOPED, &format!("after={}&limit=1", all[1])).await;
    assert_eq!(ids(&scoped), vec![all[4].clone()]);
    let scoped = feed(&app, TOKEN_SCOPED, &format!("after={}", all[5])).await;
    assert!(ids(&scoped).is_empty(), "{scoped}");

    // A feed long-poll after the last item is woken by the next callback and gets just it.
    let last = all[all.len() - 1].clone();
    let poll = spawn_get(
        &app,
        format!("/v1/responses?after={last}&wait=30"),
        TOKEN_ALL,
        false,
    );
    wait_until_waiting(&app.state, 1).await;
    let body_e = response_doc("feed-e", "e");
    let id_e = post(&app, OPEN_POLICY, &body_e).await;
    let (answer, took) = poll.await.expect("feed poll");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(
        took < Duration::from_secs(15),
        "feed long-poll took {took:?}"
    );
    let page = answer.json();
    assert_eq!(ids(&page), vec![id_e.clone()], "{page}");
    assert_eq!(next(&page), id_e);
    assert_eq!(page["items"][0]["controlid"], Value::from("feed-e"));

    // A scoped feed long-poll is not answered by a callback outside its scope.
    let poll = spawn_get(
        &app,
        format!("/v1/responses?after={last}&wait=30"),
        TOKEN_SCOPED,
        false,
    );
    wait_until_waiting(&app.state, 1).await;
    post(&app, POLICY, &response_doc("feed-f", "f")).await;
    let unmatched_second = Bytes::from(
        "<?xml version=\"1.0\"?><response><control><status>success</status></control></response>",
    );
    let id_g = post(&app, SECOND_POLICY, &unmatched_second).await;
    let (answer, took) = poll.await.expect("scoped feed poll");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(
        took < Duration::from_secs(15),
        "scoped feed long-poll took {took:?}"
    );
    let page = answer.json();
    assert_eq!(ids(&page), vec![id_g], "{page}");
    assert_eq!(page["items"][0]["controlid"], Value::Null);
    assert_eq!(page["items"][0]["matched"], Value::Bool(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_limit_is_clamped_to_1000() {
    let app = spawn_app().await;
    let bodies: Vec<Bytes> = (0..1001)
        .map(|i| response_doc(&format!("clamp-{i}"), "x"))
        .collect();
    let mut posted = post_many(&app, OPEN_POLICY, &bodies, 16).await;
    posted.sort();

    let page = feed(&app, TOKEN_ALL, "").await;
    assert_eq!(ids(&page).len(), 100, "the default limit is 100");
    for limit in ["1000", "1001", "5000", "18446744073709551615"] {
        let page = feed(&app, TOKEN_ALL, &format!("limit={limit}")).await;
        let page_ids = ids(&page);
        assert_eq!(page_ids.len(), 1000, "limit={limit}");
        assert_eq!(page_ids, posted[..1000], "limit={limit}: arrival order");
        let rest = feed(
            &app,
            TOKEN_ALL,
            &format!("limit={limit}&after={}", next(&page)),
        )
        .await;
        assert_eq!(ids(&rest), posted[1000..], "limit={limit}: the rest");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Single deliveries.

#[tokio::test]
async fn deliveries_are_served_raw_and_as_json_within_scope() {
    let app = spawn_app().await;
    let first = response_doc("two-deliveries", "first");
    let second = response_doc("two-deliveries", "second");
    let unmatched = fixture(UNMATCHED_FIXTURE);
    let id1 = post(&app, POLICY, &first).await;
    let id2 = post(&app, POLICY, &second).await;
    let idu = post(&app, POLICY, &unmatched).await;
    let scoped_body = response_doc("scoped-delivery", "s");
    let ids_scoped = post(&app, SECOND_POLICY, &scoped_body).await;
    assert_ne!(id1, id2);

    // The response is the newest delivery ...
    let newest = get(&app, &response_path("two-deliveries"), TOKEN_ALL, false).await;
    assert_eq!(newest.status, StatusCode::OK);
    assert_eq!(newest.body, second);

    // ... and the older one stays reachable by its id, byte for byte.
    for (id, body, controlid, deliveries) in [
        (&id1, &first, Value::from("two-deliveries"), 2),
        (&id2, &second, Value::from("two-deliveries"), 2),
        (&idu, &unmatched, Value::Null, 1),
    ] {
        let path = format!("/v1/deliveries/{id}");
        let raw = get(&app, &path, TOKEN_ALL, false).await;
        assert_eq!(raw.status, StatusCode::OK, "{path}: {}", raw.text());
        assert_eq!(&raw.body, body, "{path}: not byte-identical");
        assert_eq!(raw.header("content-type"), Some("application/xml"));
        let etag = format!("\"{}\"", sha256_hex(body));
        assert_eq!(raw.header("etag"), Some(etag.as_str()), "{path}");

        let json = get(&app, &path, TOKEN_ALL, true).await;
        assert_eq!(json.status, StatusCode::OK, "{path}: {}", json.text());
        assert_eq!(json.header("content-type"), Some("application/json"));
        let summary = json.json();
        assert_eq!(
            summary["delivery_id"],
            Value::from(id.as_str()),
            "{summary}"
        );
        assert_eq!(summary["controlid"], controlid, "{summary}");
        assert_eq!(
            summary["matched"],
            Value::Bool(!controlid.is_null()),
            "{summary}"
        );
        assert_eq!(
            summary["sha256"],
            Value::from(sha256_hex(body)),
            "{summary}"
        );
        assert_eq!(summary["size"], Value::from(body.len()), "{summary}");
        assert_eq!(summary["policy"], Value::from(POLICY), "{summary}");
        assert_eq!(summary["deliveries"], Value::from(deliveries), "{summary}");
    }

    // Unknown and malformed ids, and ids outside the poller's scope, are all 404.
    let unknown = "7fffffffffffffff".to_string();
    let malformed = [
        "nope".to_string(),
        "123".to_string(),
        "zzzzzzzzzzzzzzzz".to_string(),
        format!("{id1}0"),
        "%2e%2e".to_string(),
    ];
    for id in std::iter::once(&unknown).chain(&malformed) {
        for json in [false, true] {
            let answer = get(&app, &format!("/v1/deliveries/{id}"), TOKEN_ALL, json).await;
            assert_eq!(
                answer.status,
                StatusCode::NOT_FOUND,
                "{id} json={json}: {}",
                answer.text()
            );
        }
    }
    for id in [&id1, &id2, &idu] {
        for json in [false, true] {
            let answer = get(&app, &format!("/v1/deliveries/{id}"), TOKEN_SCOPED, json).await;
            assert_eq!(
                answer.status,
                StatusCode::NOT_FOUND,
                "scoped {id} json={json}"
            );
            assert!(
                !answer.text().contains("<response"),
                "scoped {id}: leaked the body"
            );
        }
    }
    let inside = get(
        &app,
        &format!("/v1/deliveries/{ids_scoped}"),
        TOKEN_SCOPED,
        false,
    )
    .await;
    assert_eq!(inside.status, StatusCode::OK);
    assert_eq!(inside.body, scoped_body);

    let no_token = app
        .request(
            Method::GET,
            &format!("/v1/deliveries/{id1}"),
            HeaderMap::new(),
            Bytes::new(),
        )
        .await;
    assert_eq!(no_token.status, StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------------------------------------
// 5. Acknowledgement.

#[tokio::test]
async fn delete_acknowledges_within_scope() {
    let app = spawn_app().await;
    let id1 = post(&app, POLICY, &response_doc("ack-1", "first")).await;
    let id2 = post(&app, POLICY, &response_doc("ack-1", "second")).await;
    let path = response_path("ack-1");

    let answer = delete(&app, &path, TOKEN_ALL).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
    assert!(answer.body.is_empty());
    for json in [false, true] {
        let answer = get(&app, &path, TOKEN_ALL, json).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "json={json}");
    }
    for id in [&id1, &id2] {
        let answer = get(&app, &format!("/v1/deliveries/{id}"), TOKEN_ALL, false).await;
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "delivery {id} is gone"
        );
    }
    let page = feed(&app, TOKEN_ALL, "").await;
    assert!(ids(&page).is_empty(), "the feed still lists them: {page}");
    let answer = delete(&app, &path, TOKEN_ALL).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "second DELETE");

    // Outside the poller's scope: 404, and the other poller still has it.
    let body = response_doc("ack-2", "x");
    let id = post(&app, POLICY, &body).await;
    let answer = delete(&app, &response_path("ack-2"), TOKEN_SCOPED).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{}", answer.text());
    let still = get(&app, &response_path("ack-2"), TOKEN_ALL, false).await;
    assert_eq!(still.status, StatusCode::OK);
    assert_eq!(still.body, body);
    let still = get(&app, &format!("/v1/deliveries/{id}"), TOKEN_ALL, false).await;
    assert_eq!(still.status, StatusCode::OK);

    // One controlid posted to two policies: the scoped poller removes only its own delivery.
    let mine = response_doc("ack-3", "second policy");
    let theirs = response_doc("ack-3", "first policy");
    post(&app, POLICY, &theirs).await;
    post(&app, SECOND_POLICY, &mine).await;
    let answer = delete(&app, &response_path("ack-3"), TOKEN_SCOPED).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    let gone = get(&app, &response_path("ack-3"), TOKEN_SCOPED, false).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    let kept = get(&app, &response_path("ack-3"), TOKEN_ALL, true).await;
    assert_eq!(kept.status, StatusCode::OK);
    let summary = kept.json();
    assert_eq!(
        summary["sha256"],
        Value::from(sha256_hex(&theirs)),
        "{summary}"
    );
    assert_eq!(summary["deliveries"], Value::from(1), "{summary}");
}

/// The raw `GET`'s count of cache lookups with `result` (hit or miss), from `/metrics`.
async fn cache_lookups(app: &Client, result: &str) -> Option<u64> {
    let answer = app
        .request(Method::GET, "/metrics", HeaderMap::new(), Bytes::new())
        .await;
    let series = format!("callback_receiver_read_cache_lookups_total{{result=\"{result}\"}} ");
    answer
        .text()
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()).map(str::to_owned))
        .map(|n| n.parse().expect("a count"))
}

/// The raw `GET` answers from a memory cache after its first read; the answer must follow new
/// deliveries, deletes (all, and a scoped poller's) and scope exactly as the store does, and the
/// same with the cache off (`read_cache_mb = 0`).
#[tokio::test]
async fn the_raw_get_cache_follows_deliveries_deletes_and_scope() {
    for cache_on in [true, false] {
        let app = spawn_app_with(|c| {
            if !cache_on {
                c.read_cache_bytes = 0;
            }
        })
        .await;
        let path = response_path("cached-1");
        let raw = |token: &'static str| {
            let app = &app;
            let path = path.clone();
            async move { get(app, &path, token, false).await }
        };
        let first = response_doc("cached-1", "first");
        let id1 = post(&app, POLICY, &first).await;
        for _ in 0..3 {
            let answer = raw(TOKEN_ALL).await;
            assert_eq!(answer.status, StatusCode::OK, "cache {cache_on}");
            assert_eq!(answer.body, first);
            assert_eq!(answer.header("x-delivery-id"), Some(id1.as_str()));
            let etag = format!("\"{}\"", sha256_hex(&first));
            assert_eq!(answer.header("etag"), Some(etag.as_str()));
        }
        if cache_on {
            // Normally one miss then two hits; a purge that removes something clears the cache.
            let hits = cache_lookups(&app, "hit").await.expect("hits");
            let misses = cache_lookups(&app, "miss").await.expect("misses");
            assert!(
                hits >= 1 && hits + misses == 3,
                "{hits} hits, {misses} misses"
            );
        } else {
            assert_eq!(cache_lookups(&app, "hit").await, None, "no family when off");
        }
        // A 304 from the cached answer.
        let mut conditional = auth(TOKEN_ALL, false);
        let etag = format!("\"{}\"", sha256_hex(&first));
        conditional.insert("if-none-match", HeaderValue::from_str(&etag).expect("etag"));
        let answer = app
            .request(Method::GET, &path, conditional, Bytes::new())
            .await;
        assert_eq!(answer.status, StatusCode::NOT_MODIFIED);

        // A newer delivery replaces the cached one at once.
        let second = response_doc("cached-1", "second");
        post(&app, POLICY, &second).await;
        assert_eq!(raw(TOKEN_ALL).await.body, second, "cache {cache_on}");
        // The scoped poller does not see the first policy's deliveries, cached or not.
        assert_eq!(raw(TOKEN_SCOPED).await.status, StatusCode::NOT_FOUND);

        // A delivery to the second policy is the newest for both pollers ...
        let theirs = response_doc("cached-1", "second policy");
        post(&app, SECOND_POLICY, &theirs).await;
        assert_eq!(raw(TOKEN_ALL).await.body, theirs);
        assert_eq!(raw(TOKEN_SCOPED).await.body, theirs);
        // ... until the scoped poller deletes it: the other poller gets the older one back.
        assert_eq!(
            delete(&app, &path, TOKEN_SCOPED).await.status,
            StatusCode::NO_CONTENT
        );
        assert_eq!(raw(TOKEN_SCOPED).await.status, StatusCode::NOT_FOUND);
        let answer = raw(TOKEN_ALL).await;
        assert_eq!(
            answer.body, second,
            "cache {cache_on}: a deleted body was served"
        );
        assert_eq!(raw(TOKEN_ALL).await.body, second);

        // Deleting everything: gone for good, and a new callback shows up again.
        assert_eq!(
            delete(&app, &path, TOKEN_ALL).await.status,
            StatusCode::NO_CONTENT
        );
        for _ in 0..2 {
            assert_eq!(raw(TOKEN_ALL).await.status, StatusCode::NOT_FOUND);
        }
        let third = response_doc("cached-1", "third");
        post(&app, POLICY, &third).await;
        assert_eq!(raw(TOKEN_ALL).await.body, third);
    }
}

/// The JSON `GET` answers from the same cache: its summary, and above all its delivery count,
/// must follow new deliveries, deletes and the poller's scope exactly as the store does.
#[tokio::test]
async fn the_json_get_cache_follows_deliveries_deletes_and_scope() {
    for cache_on in [true, false] {
        let app = spawn_app_with(|c| {
            if !cache_on {
                c.read_cache_bytes = 0;
            }
        })
        .await;
        let path = response_path("cached-json");
        // (sha256, deliveries, delivery id) of the JSON answer, read twice: the second read
        // may come from the cache and must say the same.
        let summary = |token: &'static str| {
            let app = &app;
            let path = path.clone();
            async move {
                let mut seen = Vec::new();
                for _ in 0..2 {
                    let answer = get(app, &path, token, true).await;
                    if answer.status != StatusCode::OK {
                        seen.push(None);
                        continue;
                    }
                    let json = answer.json();
                    seen.push(Some((
                        json["sha256"].as_str().expect("sha256").to_owned(),
                        json["deliveries"].as_u64().expect("deliveries"),
                        json["delivery_id"].as_str().expect("id").to_owned(),
                    )));
                }
                assert_eq!(seen[0], seen[1], "cache {cache_on}: a second read differs");
                seen[0].clone()
            }
        };
        let first = response_doc("cached-json", "first");
        let id1 = post(&app, POLICY, &first).await;
        assert_eq!(
            summary(TOKEN_ALL).await,
            Some((sha256_hex(&first), 1, id1.clone()))
        );
        if cache_on {
            let hits = cache_lookups(&app, "hit").await.expect("hits");
            assert!(hits >= 1, "{hits} hits");
        }
        let second = response_doc("cached-json", "second");
        let id2 = post(&app, POLICY, &second).await;
        assert_eq!(
            summary(TOKEN_ALL).await,
            Some((sha256_hex(&second), 2, id2.clone()))
        );
        assert_eq!(summary(TOKEN_SCOPED).await, None);
        // Deliveries of two policies: each poller counts what its scope allows.
        let theirs = response_doc("cached-json", "second policy");
        let id3 = post(&app, SECOND_POLICY, &theirs).await;
        assert_eq!(
            summary(TOKEN_SCOPED).await,
            Some((sha256_hex(&theirs), 1, id3.clone()))
        );
        assert_eq!(
            summary(TOKEN_ALL).await,
            Some((sha256_hex(&theirs), 3, id3.clone()))
        );
        assert_eq!(
            summary(TOKEN_SCOPED).await,
            Some((sha256_hex(&theirs), 1, id3))
        );
        // The scoped poller deletes its delivery: the other one gets the older one back.
        assert_eq!(
            delete(&app, &path, TOKEN_SCOPED).await.status,
            StatusCode::NO_CONTENT
        );
        assert_eq!(summary(TOKEN_SCOPED).await, None);
        assert_eq!(
            summary(TOKEN_ALL).await,
            Some((sha256_hex(&second), 2, id2))
        );
        assert_eq!(
            delete(&app, &path, TOKEN_ALL).await.status,
            StatusCode::NO_CONTENT
        );
        assert_eq!(summary(TOKEN_ALL).await, None);
        let third = response_doc("cached-json", "third");
        let id4 = post(&app, POLICY, &third).await;
        assert_eq!(summary(TOKEN_ALL).await, Some((sha256_hex(&third), 1, id4)));
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Expectations.

/// `GET /v1/expected[?query]` as the controlids listed.
async fn expected_list(client: &Client, token: &str, query: &str) -> Vec<String> {
    let answer = get(client, &format!("/v1/expected{query}"), token, false).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    answer.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["controlid"].as_str().expect("controlid").to_string())
        .collect()
}

#[tokio::test]
async fn expectations_are_pending_then_overdue_then_resolved() {
    let clock = ManualClock::new();
    let app = spawn_app_with_clock(|_| {}, clock.clock()).await;

    let answer = put(
        &app,
        &expected_path("exp-1"),
        TOKEN_ALL,
        r#"{"timeout_seconds": 60}"#,
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text());
    let pending = answer.json();
    assert_eq!(pending["controlid"], Value::from("exp-1"));
    assert_eq!(pending["state"], Value::from("pending"));
    assert_eq!(
        pending["expected_since"],
        Value::from(BASE_TEXT),
        "the injected clock"
    );
    assert_eq!(pending["overdue"], Value::Bool(false));

    clock.advance(1_000);
    let answer = put(
        &app,
        &expected_path("exp-1"),
        TOKEN_ALL,
        r#"{"timeout_seconds": 60}"#,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        answer.json()["expected_since"],
        Value::from(BASE_TEXT),
        "a repeated PUT keeps the time it was first expected"
    );
    // A second expectation, with the default timeout.
    let answer = put(&app, &expected_path("exp-2"), TOKEN_ALL, "").await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text());

    for json in [false, true] {
        let answer = get(&app, &response_path("exp-1"), TOKEN_ALL, json).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
        let body = answer.json();
        assert_eq!(body["controlid"], Value::from("exp-1"));
        assert_eq!(body["state"], Value::from("pending"));
        assert_eq!(body["expected_since"], Value::from(BASE_TEXT));
        assert_eq!(body["overdue"], Value::Bool(false));
    }
    // Expectations belong to the poller that made them.
    let other = get(&app, &response_path("exp-1"), TOKEN_SCOPED, false).await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    assert!(expected_list(&app, TOKEN_SCOPED, "").await.is_empty());

    // Exactly at the timeout it is not overdue yet; a millisecond later it is.
    clock.advance(59_000);
    let answer = get(&app, &response_path("exp-1"), TOKEN_ALL, false).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(answer.json()["overdue"], Value::Bool(false));
    assert!(expected_list(&app, TOKEN_ALL, "?overdue=true")
        .await
        .is_empty());
    clock.advance(1);
    let answer = get(&app, &response_path("exp-1"), TOKEN_ALL, false).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    let body = answer.json();
    assert_eq!(body["state"], Value::from("pending"));
    assert_eq!(body["overdue"], Value::Bool(true), "{body}");

    assert_eq!(
        expected_list(&app, TOKEN_ALL, "?overdue=true").await,
        vec!["exp-1"]
    );
    let mut listed = expected_list(&app, TOKEN_ALL, "").await;
    listed.sort();
    assert_eq!(listed, vec!["exp-1", "exp-2"]);
    let mut listed = expected_list(&app, TOKEN_ALL, "?overdue=false").await;
    listed.sort();
    assert_eq!(listed, vec!["exp-1", "exp-2"]);
    let answer = get(&app, "/v1/expected?overdue=maybe", TOKEN_ALL, false).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);

    // A long-poll on a pending expectation ends with the pending answer.
    let started = Instant::now();
    let answer = get(
        &app,
        &format!("{}?wait=1", response_path("exp-2")),
        TOKEN_ALL,
        false,
    )
    .await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
    assert_eq!(answer.json()["state"], Value::from("pending"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );

    // The callback resolves it.
    let body = response_doc("exp-1", "result");
    let id = post(&app, POLICY, &body).await;
    let answer = get(&app, &response_path("exp-1"), TOKEN_ALL, false).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, body);
    assert_eq!(expected_list(&app, TOKEN_ALL, "").await, vec!["exp-2"]);
    assert!(expected_list(&app, TOKEN_ALL, "?overdue=true")
        .await
        .is_empty());

    // Expecting what was already received says so.
    let answer = put(
        &app,
        &expected_path("exp-1"),
        TOKEN_ALL,
        r#"{"timeout_seconds": 60}"#,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let received = answer.json();
    assert_eq!(received["state"], Value::from("received"), "{received}");
    assert_eq!(
        received["delivery_id"],
        Value::from(id.as_str()),
        "{received}"
    );
    assert_eq!(expected_list(&app, TOKEN_ALL, "").await, vec!["exp-2"]);

    // Bodies that are not {"timeout_seconds": N} with 1 <= N <= 30 days.
    for bad in [
        "{",
        "[]",
        r#"{"timeout_seconds": "60"}"#,
        r#"{"timeout_seconds": -1}"#,
        r#"{"timeout_seconds": 0}"#,
        r#"{"timeout_seconds": 2592001}"#,
        r#"{"timeout_seconds": 1.5}"#,
        r#"{"timeout": 60}"#,
    ] {
        let answer = put(&app, &expected_path("exp-bad"), TOKEN_ALL, bad).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            answer.text()
        );
        assert!(answer.json()["error"].is_string(), "{bad}");
    }
    assert_eq!(expected_list(&app, TOKEN_ALL, "").await, vec!["exp-2"]);

    // Forgetting an expectation.
    let answer = delete(&app, &expected_path("exp-2"), TOKEN_ALL).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
    let answer = delete(&app, &expected_path("exp-2"), TOKEN_ALL).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let answer = get(&app, &response_path("exp-2"), TOKEN_ALL, false).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert!(expected_list(&app, TOKEN_ALL, "").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_on_an_expected_controlid_gets_the_callback() {
    let app = spawn_app().await;
    let answer = put(&app, &expected_path("exp-wait"), TOKEN_ALL, "").await;
    assert_eq!(answer.status, StatusCode::CREATED);
    let poll = spawn_get(
        &app,
        format!("{}?wait=30", response_path("exp-wait")),
        TOKEN_ALL,
        false,
    );
    wait_until_waiting(&app.state, 1).await;
    let body = response_doc("exp-wait", "arrived");
    post(&app, POLICY, &body).await;
    let (answer, took) = poll.await.expect("poll");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.body, body);
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(expected_list(&app, TOKEN_ALL, "").await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// 7. Retention.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_what_is_older_than_retention_days() {
    let clock = ManualClock::new();
    let app = spawn_app_with_clock(
        |c| {
            c.retention_days = 1;
            c.purge_interval = Duration::from_secs(1);
        },
        clock.clock(),
    )
    .await;
    let old = response_doc("old-1", "x");
    let old_id = post(&app, POLICY, &old).await;
    let old_unmatched = post(&app, SECOND_POLICY, &fixture(UNMATCHED_FIXTURE)).await;
    let answer = put(&app, &expected_path("old-pending"), TOKEN_ALL, "").await;
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(
        ids(&feed(&app, TOKEN_ALL, "").await),
        vec![old_id.clone(), old_unmatched.clone()]
    );
    let summary = get(&app, &response_path("old-1"), TOKEN_ALL, true)
        .await
        .json();
    assert_eq!(
        summary["received_at"],
        Value::from(BASE_TEXT),
        "the injected clock"
    );

    clock.advance(2 * DAY_MS);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = get(&app, &response_path("old-1"), TOKEN_ALL, false).await;
        let page = feed(&app, TOKEN_ALL, "").await;
        let pending = expected_list(&app, TOKEN_ALL, "").await;
        if response.status == StatusCode::NOT_FOUND && ids(&page).is_empty() {
            // Expectations outlive deliveries by the longest expectation timeout, so that an
            // overdue one stays listed.
            assert_eq!(pending, vec!["old-pending"]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not purged within 10 s: GET {}, feed {page}, expected {pending:?}",
            response.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    clock.advance(31 * DAY_MS);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !expected_list(&app, TOKEN_ALL, "").await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the expectation was not purged within 10 s of being 33 days old"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in [&old_id, &old_unmatched] {
        let answer = get(&app, &format!("/v1/deliveries/{id}"), TOKEN_ALL, false).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{id}");
    }

    // What arrives after the clock moved is kept, also through a further purge.
    let fresh = response_doc("fresh-1", "y");
    let fresh_id = post(&app, POLICY, &fresh).await;
    let removed = callback_receiver::retention::purge_once(&app.state, 1).await;
    assert_eq!(removed, 0, "a purge removed a fresh delivery");
    let answer = get(&app, &response_path("fresh-1"), TOKEN_ALL, false).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, fresh);
    let page = feed(&app, TOKEN_ALL, "").await;
    assert_eq!(ids(&page), vec![fresh_id]);
    assert_eq!(
        page["items"][0]["received_at"],
        Value::from("2027-01-05T19:00:00.000Z")
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Shutdown.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_long_polls_promptly() {
    let app = spawn_app().await;
    let response_poll = spawn_get(
        &app,
        "/v1/responses/never-comes?wait=30".to_string(),
        TOKEN_ALL,
        false,
    );
    let feed_poll = spawn_get(&app, "/v1/responses?wait=30".to_string(), TOKEN_ALL, false);
    wait_until_waiting(&app.state, 2).await;

    let started = Instant::now();
    app.stop().await;
    let stopped_after = started.elapsed();

    let (answer, took) = response_poll.await.expect("response poll");
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{}", answer.text());
    assert!(
        took < Duration::from_secs(10),
        "response long-poll ended after {took:?}"
    );
    let (answer, took) = feed_poll.await.expect("feed poll");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(ids(&answer.json()).is_empty());
    assert!(
        took < Duration::from_secs(10),
        "feed long-poll ended after {took:?}"
    );
    assert!(
        stopped_after < Duration::from_secs(10),
        "the app took {stopped_after:?} to stop with long-polls in progress"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. The cap on waiting requests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_are_capped_by_max_waiting_pollers() {
    let app = spawn_app_with(|c| c.limits.max_waiting_pollers = 2).await;
    let existing = response_doc("cap-existing", "x");
    let existing_id = post(&app, POLICY, &existing).await;

    let first = spawn_get(
        &app,
        format!("{}?wait=30", response_path("cap-a")),
        TOKEN_ALL,
        false,
    );
    let second = spawn_get(
        &app,
        format!("/v1/responses?after={existing_id}&wait=30"),
        TOKEN_ALL,
        false,
    );
    wait_until_waiting(&app.state, 2).await;

    for path in [
        format!("{}?wait=5", response_path("cap-c")),
        // A feed wait with nothing after its cursor must wait, so it needs a slot.
        format!("/v1/responses?after={existing_id}&wait=5"),
    ] {
        let started = Instant::now();
        let answer = get(&app, &path, TOKEN_ALL, false).await;
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{path}: {}",
            answer.text()
        );
        let retry = answer.header("retry-after").expect("Retry-After");
        assert!(retry.parse::<u64>().is_ok(), "Retry-After {retry:?}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{path}: not refused at once"
        );
    }
    // Requests without a wait are served as usual.
    let answer = get(&app, &response_path("cap-c"), TOKEN_ALL, false).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let answer = get(
        &app,
        &format!("{}?wait=0", response_path("cap-existing")),
        TOKEN_ALL,
        false,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, existing);
    let page = feed(&app, TOKEN_ALL, "").await;
    assert_eq!(ids(&page), vec![existing_id]);
    assert_eq!(app.state.waiters.waiting(), 2);

    // The callback answers both waiting requests and frees their slots.
    let body = response_doc("cap-a", "a");
    let id_a = post(&app, POLICY, &body).await;
    let (answer, _) = first.await.expect("first");
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, body);
    let (answer, _) = second.await.expect("second");
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(ids(&answer.json()), vec![id_a]);
    assert_eq!(app.state.waiters.waiting(), 0);
    let answer = get(
        &app,
        &format!("{}?wait=0.2", response_path("cap-c")),
        TOKEN_ALL,
        false,
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "a slot is free again");
}

// ---------------------------------------------------------------------------------------------
// 10. Many pollers at once.

const SCALE_POLLERS: usize = 500;
const SCALE_CONNECTIONS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_long_polls_each_get_their_own_body() {
    let app = spawn_app().await;
    let mut conns: Vec<H2Conn> = Vec::new();
    for _ in 0..SCALE_CONNECTIONS {
        conns.push(app.h2().await);
    }
    let controlids: Vec<String> = (0..SCALE_POLLERS)
        .map(|i| format!("scale-{i:03}"))
        .collect();
    let bodies: Vec<Bytes> = controlids
        .iter()
        .enumerate()
        .map(|(i, cid)| response_doc(cid, &format!("body of poller {i}")))
        .collect();

    let started = Instant::now();
    let mut polls = JoinSet::new();
    for (i, cid) in controlids.iter().enumerate() {
        let mut conn = conns[i % SCALE_CONNECTIONS].clone();
        let path = format!("{}?wait=60", response_path(cid));
        polls.spawn(async move {
            let answer = conn
                .request(Method::GET, &path, auth(TOKEN_ALL, false), Bytes::new())
                .await;
            (i, answer)
        });
    }
    wait_until_waiting(&app.state, SCALE_POLLERS).await;
    let all_waiting = started.elapsed();

    let posting = Instant::now();
    post_many(&app, POLICY, &bodies, 16).await;
    let posted = posting.elapsed();
    let mut answered = 0;
    while let Some(done) = polls.join_next().await {
        let (i, answer) = done.expect("poll task");
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "poller {i}: {}",
            answer.text()
        );
        assert_eq!(answer.body, bodies[i], "poller {i} got another body");
        answered += 1;
    }
    let all_answered = posting.elapsed();
    assert_eq!(answered, SCALE_POLLERS);
    assert_eq!(app.state.waiters.waiting(), 0);
    println!(
        "{SCALE_POLLERS} long-polls over {SCALE_CONNECTIONS} HTTP/2 connections: all waiting after \
         {all_waiting:?}; {SCALE_POLLERS} callbacks (16 at a time) posted in {posted:?}; every \
         poller answered {all_answered:?} after the first callback was sent; total {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Further edges.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_long_poll_is_not_answered_by_a_callback_outside_its_scope() {
    let app = spawn_app().await;
    let poll = spawn_get(
        &app,
        format!("{}?wait=1", response_path("scope-wait")),
        TOKEN_SCOPED,
        false,
    );
    wait_until_waiting(&app.state, 1).await;
    post(&app, POLICY, &response_doc("scope-wait", "outside")).await;
    let (answer, took) = poll.await.expect("poll");
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{}", answer.text());
    assert!(
        took >= Duration::from_millis(900),
        "answered after {took:?}"
    );
}

#[tokio::test]
async fn a_callback_outside_the_scope_does_not_resolve_a_scoped_expectation() {
    let app = spawn_app().await;
    let answer = put(&app, &expected_path("scope-exp"), TOKEN_SCOPED, "").await;
    assert_eq!(answer.status, StatusCode::CREATED);
    // The same controlid arrives on a policy the scoped poller may not read.
    post(&app, POLICY, &response_doc("scope-exp", "outside")).await;
    let answer = get(&app, &response_path("scope-exp"), TOKEN_SCOPED, false).await;
    assert_eq!(
        answer.status,
        StatusCode::ACCEPTED,
        "the scoped poller still awaits scope-exp (nothing it may read arrived), got: {}",
        answer.text()
    );
    assert_eq!(
        expected_list(&app, TOKEN_SCOPED, "").await,
        vec!["scope-exp"]
    );
}

#[tokio::test]
async fn retention_keeps_the_newer_delivery_of_a_controlid() {
    let clock = ManualClock::new();
    let app = spawn_app_with_clock(
        |c| {
            c.retention_days = 1;
            c.purge_interval = Duration::from_secs(3600);
        },
        clock.clock(),
    )
    .await;
    let old = response_doc("mixed", "old");
    let old_id = post(&app, POLICY, &old).await;
    let answer = put(&app, &expected_path("old-exp"), TOKEN_ALL, "").await;
    assert_eq!(answer.status, StatusCode::CREATED);
    clock.advance(2 * DAY_MS);
    let new = response_doc("mixed", "new");
    let new_id = post(&app, POLICY, &new).await;
    let answer = put(&app, &expected_path("new-exp"), TOKEN_ALL, "").await;
    assert_eq!(answer.status, StatusCode::CREATED);

    let removed = callback_receiver::retention::purge_once(&app.state, 1).await;
    assert_eq!(
        removed, 1,
        "only the old delivery goes (expectations are kept longer)"
    );
    let answer = get(&app, &response_path("mixed"), TOKEN_ALL, false).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, new);
    let summary = get(&app, &response_path("mixed"), TOKEN_ALL, true)
        .await
        .json();
    assert_eq!(summary["deliveries"], Value::from(1), "{summary}");
    assert_eq!(summary["delivery_id"], Value::from(new_id.as_str()));
    let answer = get(&app, &format!("/v1/deliveries/{old_id}"), TOKEN_ALL, false).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(ids(&feed(&app, TOKEN_ALL, "").await), vec![new_id]);
    assert_eq!(
        expected_list(&app, TOKEN_ALL, "").await,
        vec!["old-exp", "new-exp"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_long_poll_frees_its_slot() {
    let app = spawn_app().await;
    // HTTP/2: the client resets the stream.
    let mut conn = app.h2().await;
    let path = format!("{}?wait=30", response_path("abandoned-h2"));
    let poll = tokio::spawn(async move {
        conn.request(Method::GET, &path, auth(TOKEN_ALL, false), Bytes::new())
            .await
    });
    wait_until_waiting(&app.state, 1).await;
    poll.abort();
    let _ = poll.await;
    wait_until_waiting(&app.state, 0).await;

    // HTTP/1.1: the client closes the connection.
    let mut conn = app.h1().await;
    let path = format!("{}?wait=30", response_path("abandoned-h1"));
    let poll = tokio::spawn(async move {
        conn.request(Method::GET, &path, auth(TOKEN_ALL, false), Bytes::new())
            .await
    });
    wait_until_waiting(&app.state, 1).await;
    poll.abort();
    let _ = poll.await;
    wait_until_waiting(&app.state, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_long_poll_on_one_controlid_is_answered() {
    let app = spawn_app().await;
    let path = format!("{}?wait=30", response_path("shared-cid"));
    let polls = vec![
        spawn_get(&app, path.clone(), TOKEN_ALL, false),
        spawn_get(&app, path.clone(), TOKEN_ALL, true),
        spawn_get(&app, path.clone(), TOKEN_ALL, false),
    ];
    wait_until_waiting(&app.state, 3).await;
    let body = response_doc("shared-cid", "one for all");
    let id = post(&app, POLICY, &body).await;
    for (i, poll) in polls.into_iter().enumerate() {
        let (answer, took) = poll.await.expect("poll");
        assert_eq!(answer.status, StatusCode::OK, "poll {i}: {}", answer.text());
        assert!(took < Duration::from_secs(15), "poll {i}: {took:?}");
        if i == 1 {
            assert_eq!(answer.json()["delivery_id"], Value::from(id.as_str()));
        } else {
            assert_eq!(answer.body, body, "poll {i}");
        }
    }
}
