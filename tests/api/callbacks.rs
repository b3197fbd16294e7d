//! `POST /callback/{policy}`: storage, summaries, bodies that are refused, sizes, methods,
//! content types, `Expect: 100-continue` and idempotency.

use bytes::Bytes;
use callback_receiver::store::Scope;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{
    all_fixtures, basic, fixture, headers, raw_post_head, response_doc, sha256_hex, spawn_app,
    spawn_app_with, TestApp, PASSWORD, POLICY, TOKEN_ALL, USER,
};

/// Fetches `controlid` raw and checks it is `body`, byte for byte, with the contract's headers.
pub async fn assert_served_raw(app: &TestApp, controlid: &str, body: &[u8]) {
    let got = app.get_response(controlid, Some(TOKEN_ALL), false).await;
    assert_eq!(
        got.status,
        StatusCode::OK,
        "GET {controlid:?}: {}",
        got.text()
    );
    assert_eq!(
        got.header("content-type"),
        Some("application/xml"),
        "GET {controlid:?}"
    );
    let etag = format!("\"{}\"", sha256_hex(body));
    assert_eq!(got.header("etag"), Some(etag.as_str()), "GET {controlid:?}");
    assert!(
        got.body.as_ref() == body,
        "GET {controlid:?} is not byte-identical: {} bytes served, {} posted",
        got.body.len(),
        body.len()
    );
}

/// Fetches the JSON summary of `controlid`.
pub async fn summary(app: &TestApp, controlid: &str) -> Value {
    let got = app.get_response(controlid, Some(TOKEN_ALL), true).await;
    assert_eq!(
        got.status,
        StatusCode::OK,
        "GET {controlid:?} json: {}",
        got.text()
    );
    assert!(
        got.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "content-type {:?}",
        got.header("content-type")
    );
    got.json()
}

fn is_delivery_id(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The fields every matched summary has, for a body posted once to `hello-world`.
fn assert_common(v: &Value, controlid: &str, body: &[u8]) {
    assert_eq!(v["controlid"], json!(controlid), "{v}");
    assert_eq!(v["policy"], json!(POLICY), "{v}");
    assert_eq!(v["size"], json!(body.len()), "{v}");
    assert_eq!(v["sha256"], json!(sha256_hex(body)), "{v}");
    assert!(is_delivery_id(&v["delivery_id"]), "delivery_id: {v}");
    assert_eq!(v["deliveries"], json!(1), "{v}");
    assert_eq!(v["well_formed"], json!(true), "{v}");
    assert!(v.get("parse_error").is_none_or(Value::is_null), "{v}");
    let received = v["received_at"].as_str().expect("received_at is a string");
    assert!(
        received.len() == 24 && received.ends_with('Z') && received.as_bytes()[10] == b'T',
        "received_at {received:?} is not RFC 3339 UTC with milliseconds"
    );
}

fn error(errorno: &str, description2: &str, correction: &str) -> Value {
    json!({
        "errorno": errorno,
        "description": "",
        "description2": description2,
        "correction": correction,
    })
}

fn assert_result(r: &Value, function: &str, controlid: &str, status: &str, errors: Value) {
    assert_eq!(r["function"], json!(function), "{r}");
    assert_eq!(r["controlid"], json!(controlid), "{r}");
    assert_eq!(r["status"], json!(status), "{r}");
    assert_eq!(r["errors"], errors, "{r}");
}

/// The control-level controlid of each fixture (`None`: unmatched).
fn fixture_controlid(name: &str) -> Option<&'static str> {
    match name {
        "Create-Attachment.Response.xml" => Some("1605562013"),
        "Get-Object.Default.xml" => None,
        "Save-Object.create.xml" => Some("1601648276"),
        "execFuncError.xml" => Some("1543091025"),
        "execLoginInvalid.xml" => Some("efaa1f0c-58dc-4377-bf26-6aa1d8442fc0"),
        "execProjectSuccess.xml" => Some("1543102188"),
        "execXMLError.xml" => Some("1543089995"),
        "vendorResponse.xml" => Some("LF14b6850ddd6f4cbe"),
        other => panic!("fixture {other} is new: add its controlid to fixture_controlid"),
    }
}

#[tokio::test]
async fn every_fixture_is_stored_and_served_byte_identical() {
    let app = spawn_app().await;
    for (name, body) in all_fixtures() {
        let controlid = fixture_controlid(&name);
        let answer = app.post_ok(body.clone()).await;
        assert_eq!(answer.status, StatusCode::OK, "{name}: {}", answer.text());
        let answer = answer.json();
        assert!(is_delivery_id(&answer["delivery_id"]), "{name}: {answer}");
        match controlid {
            Some(controlid) => {
                assert_eq!(answer["matched"], json!(true), "{name}: {answer}");
                assert_served_raw(&app, controlid, &body).await;
            }
            None => assert_eq!(answer["matched"], json!(false), "{name}: {answer}"),
        }
    }
}

#[tokio::test]
async fn success_summary_has_control_authentication_and_results() {
    let app = spawn_app().await;
    let body = fixture("execProjectSuccess.xml");
    assert_eq!(app.post_ok(body.clone()).await.status, StatusCode::OK);
    let v = summary(&app, "1543102188").await;
    assert_common(&v, "1543102188", &body);
    assert_eq!(v["matched"], json!(true), "{v}");
    assert_eq!(
        v["control"],
        json!({"status": "success", "senderid": "AAAAAAAA", "uniqueid": "false", "dtdversion": "3.0"}),
    );
    assert_eq!(v["authentication"]["status"], json!("success"), "{v}");
    assert_eq!(v["authentication"]["userid"], json!("UUUU"), "{v}");
    assert_eq!(v["authentication"]["companyid"], json!("ZZZZZZZ"), "{v}");
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{v}");
    assert_result(
        &results[0],
        "readByQuery",
        "e2a84020-e094-4dd8-97ed-6447592ecd47",
        "success",
        json!([]),
    );
    assert_result(
        &results[1],
        "read",
        "19c628be-6bb3-4798-b535-c373b1186584",
        "success",
        json!([]),
    );
    assert_eq!(v["errors"], json!([]), "{v}");
}

#[tokio::test]
async fn function_failure_summary_lists_the_result_errors() {
    let app = spawn_app().await;
    let body = fixture("execFuncError.xml");
    assert_eq!(app.post_ok(body.clone()).await.status, StatusCode::OK);
    let v = summary(&app, "1543091025").await;
    assert_common(&v, "1543091025", &body);
    assert_eq!(
        v["control"],
        json!({"status": "success", "senderid": "ZZZZZZZZZZ", "uniqueid": "false", "dtdversion": "3.0"}),
    );
    assert_eq!(v["authentication"]["status"], json!("success"), "{v}");
    assert_eq!(v["authentication"]["userid"], json!("UUUUU"), "{v}");
    assert_eq!(
        v["authentication"]["companyid"],
        json!("XXXXXXXXXXX"),
        "{v}"
    );
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 1, "{v}");
    assert_result(
        &results[0],
        "create",
        "testFunctionId",
        "failure",
        json!([
            error(
                "BL34000061",
                "Another Project with the given value(s) Fellow PD1  already exists",
                "Use a unique value instead."
            ),
            error("BL01001973", "Could not create project record!", ""),
            error("BL01001973", "Error while saving the Project info", ""),
        ]),
    );
    assert_eq!(v["errors"], json!([]), "{v}");
}

#[tokio::test]
async fn authentication_failure_summary_has_top_level_errors() {
    let app = spawn_app().await;
    let body = fixture("execLoginInvalid.xml");
    let controlid = "efaa1f0c-58dc-4377-bf26-6aa1d8442fc0";
    assert_eq!(app.post_ok(body.clone()).await.status, StatusCode::OK);
    let v = summary(&app, controlid).await;
    assert_common(&v, controlid, &body);
    assert_eq!(
        v["control"],
        json!({"status": "success", "senderid": "xxxxxx", "uniqueid": "false", "dtdversion": "3.0"}),
    );
    assert_eq!(v["authentication"]["status"], json!("failure"), "{v}");
    assert_eq!(v["authentication"]["userid"], json!("xml_gateway"), "{v}");
    assert_eq!(v["authentication"]["companyid"], json!("XXXXX"), "{v}");
    assert_eq!(v["results"], json!([]), "{v}");
    assert_eq!(
        v["errors"],
        json!([error("XL03000006", "Sign-in information is incorrect", "")]),
    );
}

#[tokio::test]
async fn control_failure_summary_has_no_authentication() {
    let app = spawn_app().await;
    let body = fixture("execXMLError.xml");
    assert_eq!(app.post_ok(body.clone()).await.status, StatusCode::OK);
    let v = summary(&app, "1543089995").await;
    assert_common(&v, "1543089995", &body);
    assert_eq!(
        v["control"],
        json!({"status": "failure", "senderid": "senderid", "uniqueid": "false", "dtdversion": "3.0"}),
    );
    assert!(v["authentication"].is_null(), "authentication: {v}");
    assert_eq!(v["results"], json!([]), "{v}");
    assert_eq!(
        v["errors"],
        json!([
            error(
                "XL03000003",
                "XML Parse schema error: Fatal Error 76: Opening and ending tag mismatch: PROJECTID line 18 and PROJECT. Line: 18, column: 62.",
                ""
            ),
            error(
                "XL03000003",
                "XML Parse schema error: Fatal Error 76: Opening and ending tag mismatch: PROJECT line 17 and CUSTOMER. Line: 21, column: 32.",
                ""
            ),
        ]),
    );
}

#[tokio::test]
async fn response_without_controlid_is_stored_unmatched() {
    let app = spawn_app().await;
    let body = fixture("Get-Object.Default.xml");
    let answer = app.post_ok(body.clone()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let v = answer.json();
    assert_eq!(v["matched"], json!(false), "{v}");
    assert!(v["controlid"].is_null(), "{v}");
    assert!(is_delivery_id(&v["delivery_id"]), "{v}");
    // It is stored durably, with its bytes, under that delivery id.
    let feed = app
        .state
        .store
        .feed(None, 10, &Scope::All)
        .await
        .expect("feed");
    assert_eq!(feed.len(), 1, "{feed:?}");
    assert_eq!(
        feed[0].id.to_string(),
        v["delivery_id"].as_str().unwrap_or("")
    );
    assert!(feed[0].extracted.controlid.is_none());
    let stored = app.state.store.body(feed[0].id).await.expect("body");
    assert_eq!(stored.as_deref(), Some(body.as_ref()));
}

/// Checks that `body` was refused with a one-line reason and kept in quarantine.
async fn assert_refused_and_quarantined(app: &TestApp, what: &str, body: &'static [u8]) {
    let before = app
        .state
        .store
        .quarantined(None, 1000)
        .await
        .expect("quarantined")
        .len();
    let answer = app.post_ok(Bytes::from_static(body)).await;
    assert_eq!(
        answer.status,
        StatusCode::BAD_REQUEST,
        "{what}: {}",
        answer.text()
    );
    let reason = answer.text();
    assert!(
        !reason.trim().is_empty() && !reason.trim_end().contains('\n'),
        "{what}: the reason is not one line: {reason:?}"
    );
    let kept = app
        .state
        .store
        .quarantined(None, 1000)
        .await
        .expect("quarantined");
    assert_eq!(kept.len(), before + 1, "{what}: not quarantined: {kept:?}");
    let item = kept.last().expect("one item");
    assert_eq!(item.policy, POLICY, "{what}");
    assert_eq!(item.size, body.len() as u64, "{what}");
    let stored = app
        .state
        .store
        .quarantined_body(item.id)
        .await
        .expect("quarantined body");
    assert_eq!(
        stored.as_deref(),
        Some(body),
        "{what}: quarantined bytes differ"
    );
}

#[tokio::test]
async fn refused_bodies_get_400_and_are_kept_in_quarantine() {
    let app = spawn_app().await;
    assert_refused_and_quarantined(&app, "not xml", b"this is not XML at all {\"a\": 1}\n").await;
    assert_refused_and_quarantined(
        &app,
        "doctype",
        b"<?xml version=\"1.0\"?>\n<!DOCTYPE response [<!ENTITY id \"boom\">]>\n\
          <response><control><status>success</status><controlid>&id;</controlid></control></response>\n",
    )
    .await;
    assert_refused_and_quarantined(
        &app,
        "broken before the controlid",
        b"<?xml version=\"1.0\"?>\n<response><control><status>success</stat></control>\
          <controlid>late</controlid></response>\n",
    )
    .await;
    // Nothing of it became a delivery.
    let feed = app
        .state
        .store
        .feed(None, 10, &Scope::All)
        .await
        .expect("feed");
    assert!(feed.is_empty(), "{feed:?}");
    let got = app.get_response("late", Some(TOKEN_ALL), false).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn xml_broken_after_the_controlid_is_stored_as_not_well_formed() {
    let app = spawn_app().await;
    let body = Bytes::from_static(
        b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response>\n<control>\
          <status>success</status><controlid>broken-after</controlid></control>\n\
          <operation><result><status>success</status></operation>\n",
    );
    let answer = app.post_ok(body.clone()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["well_formed"], json!(false));
    assert_served_raw(&app, "broken-after", &body).await;
    let v = summary(&app, "broken-after").await;
    assert_eq!(v["well_formed"], json!(false), "{v}");
    assert_eq!(v["controlid"], json!("broken-after"), "{v}");
    assert!(
        v["parse_error"].as_str().is_some_and(|s| !s.is_empty()),
        "parse_error: {v}"
    );
    assert_eq!(v["size"], json!(body.len()), "{v}");
}

#[tokio::test]
async fn trailing_slash_is_the_same_url() {
    let app = spawn_app().await;
    let body = response_doc("trailing-slash", "x");
    let mut h = headers(&[("content-type", "application/xml")]);
    h.insert(
        http::header::AUTHORIZATION,
        basic(USER, PASSWORD).parse().expect("header"),
    );
    let answer = app
        .request(
            Method::POST,
            &format!("/callback/{POLICY}/"),
            h,
            body.clone(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(answer.header("location").is_none());
    assert_served_raw(&app, "trailing-slash", &body).await;
}

#[tokio::test]
async fn other_methods_get_405_with_allow_post() {
    let app = spawn_app().await;
    let auth = basic(USER, PASSWORD);
    for method in [Method::GET, Method::PUT, Method::DELETE, Method::PATCH] {
        for path in ["/callback/hello-world", "/callback/hello-world/"] {
            let answer = app
                .request(
                    method.clone(),
                    path,
                    headers(&[("authorization", &auth)]),
                    Bytes::new(),
                )
                .await;
            assert_eq!(
                answer.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(answer.header("allow"), Some("POST"), "{method} {path}");
        }
    }
}

#[tokio::test]
async fn any_content_type_or_none_is_accepted() {
    let app = spawn_app().await;
    let types = [
        None,
        Some("text/xml"),
        Some("application/xml; charset=utf-8"),
        Some("application/octet-stream"),
    ];
    for (i, content_type) in types.into_iter().enumerate() {
        let controlid = format!("content-type-{i}");
        let body = response_doc(&controlid, "x");
        let h = match content_type {
            Some(t) => headers(&[("content-type", t)]),
            None => HeaderMap::new(),
        };
        let answer = app
            .post_callback(POLICY, Some((USER, PASSWORD)), body.clone(), h)
            .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{content_type:?}: {}",
            answer.text()
        );
        assert_served_raw(&app, &controlid, &body).await;
    }
}

#[tokio::test]
async fn same_bytes_twice_is_idempotent_and_a_new_body_is_a_further_delivery() {
    let app = spawn_app().await;
    let first = response_doc("idem-1", "first");
    let a = app.post_ok(first.clone()).await;
    let b = app.post_ok(first.clone()).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(b.status, StatusCode::OK);
    let (a, b) = (a.json(), b.json());
    assert!(is_delivery_id(&a["delivery_id"]), "{a}");
    assert_eq!(a["delivery_id"], b["delivery_id"], "{a} / {b}");
    let v = summary(&app, "idem-1").await;
    assert_eq!(v["deliveries"], json!(1), "{v}");
    assert_eq!(v["delivery_id"], a["delivery_id"], "{v}");

    let second = response_doc("idem-1", "second");
    let c = app.post_ok(second.clone()).await;
    assert_eq!(c.status, StatusCode::OK);
    let c = c.json();
    assert_ne!(c["delivery_id"], a["delivery_id"], "{c}");
    let v = summary(&app, "idem-1").await;
    assert_eq!(v["deliveries"], json!(2), "{v}");
    assert_eq!(v["delivery_id"], c["delivery_id"], "{v}");
    assert_eq!(v["sha256"], json!(sha256_hex(&second)), "{v}");
    assert_served_raw(&app, "idem-1", &second).await;

    // The first bytes again: still two deliveries.
    assert_eq!(app.post_ok(first.clone()).await.status, StatusCode::OK);
    assert_eq!(summary(&app, "idem-1").await["deliveries"], json!(2));
}

#[tokio::test]
async fn oversize_content_length_gets_413_before_the_body_is_sent() {
    let app = spawn_app().await;
    let auth = basic(USER, PASSWORD);
    // Far above the 64 MiB default; the body is never sent.
    let mut raw = app.raw().await;
    let head = raw_post_head(
        "/callback/hello-world",
        &auth,
        &["Content-Length: 1073741824"],
    );
    raw.write(head.as_bytes()).await;
    let answer = raw.read_response().await;
    assert_eq!(answer.status, 413, "{}", answer.text());

    // The same with Expect: 100-continue: refused without asking for the body.
    let mut raw = app.raw().await;
    let head = raw_post_head(
        "/callback/hello-world",
        &auth,
        &["Content-Length: 1073741824", "Expect: 100-continue"],
    );
    raw.write(head.as_bytes()).await;
    let answer = raw.read_response().await;
    assert_eq!(answer.status, 413, "expected 413 and no 100 Continue first");

    let feed = app
        .state
        .store
        .feed(None, 10, &Scope::All)
        .await
        .expect("feed");
    assert!(feed.is_empty(), "{feed:?}");
    let quarantined = app.state.store.quarantined(None, 10).await.expect("q");
    assert!(quarantined.is_empty(), "{quarantined:?}");
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

#[tokio::test]
async fn chunked_body_over_max_body_bytes_gets_413() {
    let app = spawn_app_with(|c| c.max_body_bytes = 4096).await;
    let auth = basic(USER, PASSWORD);

    // A chunked body under the limit is accepted, byte for byte.
    let body = response_doc("chunked-ok", "small");
    assert!(body.len() < 4096);
    let mut raw = app.raw().await;
    let mut bytes = raw_post_head(
        "/callback/hello-world",
        &auth,
        &["Transfer-Encoding: chunked"],
    )
    .into_bytes();
    for piece in body.chunks(100) {
        bytes.extend(chunk(piece));
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    raw.write(&bytes).await;
    let answer = raw.read_response().await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_served_raw(&app, "chunked-ok", &body).await;

    // Five chunks of 1000 bytes pass the 4096-byte limit; the terminating chunk never comes.
    let mut raw = app.raw().await;
    let mut bytes = raw_post_head(
        "/callback/hello-world",
        &auth,
        &["Transfer-Encoding: chunked"],
    )
    .into_bytes();
    bytes.extend(chunk(
        b"<response><control><controlid>too-big</controlid></control>",
    ));
    for _ in 0..5 {
        bytes.extend(chunk(&[b' '; 1000]));
    }
    raw.write(&bytes).await;
    let answer = raw.read_response().await;
    assert_eq!(answer.status, 413, "{}", answer.text());

    let got = app.get_response("too-big", Some(TOKEN_ALL), false).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    let feed = app
        .state
        .store
        .feed(None, 10, &Scope::All)
        .await
        .expect("feed");
    assert_eq!(feed.len(), 1, "only the small body is stored: {feed:?}");
    let quarantined = app.state.store.quarantined(None, 10).await.expect("q");
    assert!(quarantined.is_empty(), "{quarantined:?}");
}

#[tokio::test]
async fn expect_continue_is_answered_before_the_body() {
    let app = spawn_app().await;
    let body = response_doc("expect-continue", "x");

    // Wrong credentials: 401 at once, no 100 Continue, the body never sent.
    let mut raw = app.raw().await;
    let head = raw_post_head(
        "/callback/hello-world",
        &basic(USER, "wrong-password"),
        &[
            &format!("Content-Length: {}", body.len()),
            "Expect: 100-continue",
        ],
    );
    raw.write(head.as_bytes()).await;
    let answer = raw.read_response().await;
    assert_eq!(answer.status, 401, "expected 401 and no 100 Continue first");
    assert_eq!(
        answer.header("www-authenticate"),
        Some("Basic realm=\"callback-receiver\"")
    );

    // Right credentials: 100 Continue, then the body, then 200.
    let mut raw = app.raw().await;
    let head = raw_post_head(
        "/callback/hello-world",
        &basic(USER, PASSWORD),
        &[
            &format!("Content-Length: {}", body.len()),
            "Expect: 100-continue",
        ],
    );
    raw.write(head.as_bytes()).await;
    let interim = raw.read_response().await;
    assert_eq!(interim.status, 100, "expected 100 Continue");
    raw.write(&body).await;
    let answer = raw.read_response().await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_served_raw(&app, "expect-continue", &body).await;
}
