//! `GET /v1/responses/{controlid}`: bearer tokens, scopes, raw and JSON answers, and controlids
//! that need percent-encoding.

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde_json::json;

use crate::callbacks::assert_served_raw;
use crate::helpers::{
    encode_segment, headers, response_doc, sha256_hex, spawn_app, PASSWORD, SECOND_PASSWORD,
    SECOND_POLICY, SECOND_USER, TOKEN_ALL, TOKEN_HASHED, TOKEN_SCOPED, USER,
};

#[tokio::test]
async fn missing_or_wrong_token_gets_401_with_a_bearer_challenge() {
    let app = spawn_app().await;
    assert_eq!(
        app.post_ok(response_doc("poll-401", "x")).await.status,
        StatusCode::OK
    );
    let path = "/v1/responses/poll-401";
    let cases: Vec<(&str, HeaderMap)> = vec![
        ("no header", HeaderMap::new()),
        (
            "wrong token",
            headers(&[("authorization", "Bearer all-poller-token-3f9a0c1d2f")]),
        ),
        (
            "a prefix of a token",
            headers(&[("authorization", "Bearer all-poller-token")]),
        ),
        (
            "basic credentials",
            headers(&[("authorization", &crate::helpers::basic(USER, PASSWORD))]),
        ),
        ("empty bearer", headers(&[("authorization", "Bearer ")])),
    ];
    for (what, h) in cases {
        let answer = app.request(Method::GET, path, h, Bytes::new()).await;
        assert_eq!(
            answer.status,
            StatusCode::UNAUTHORIZED,
            "{what}: {}",
            answer.text()
        );
        let challenge = answer.header("www-authenticate").unwrap_or("");
        assert!(
            challenge.starts_with("Bearer"),
            "{what}: WWW-Authenticate {challenge:?}"
        );
        assert!(
            !answer.text().contains("<response>"),
            "{what}: leaked the body"
        );
    }
}

#[tokio::test]
async fn unknown_controlid_is_404() {
    let app = spawn_app().await;
    for token in [TOKEN_ALL, TOKEN_SCOPED, TOKEN_HASHED] {
        for json in [false, true] {
            let answer = app.get_response("never-posted", Some(token), json).await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{token} json={json}");
        }
    }
}

#[tokio::test]
async fn scoped_poller_sees_only_its_policies() {
    let app = spawn_app().await;
    let outside = response_doc("scope-outside", "x");
    assert_eq!(app.post_ok(outside.clone()).await.status, StatusCode::OK);
    let inside = response_doc("scope-inside", "y");
    let answer = app
        .post_callback(
            SECOND_POLICY,
            Some((SECOND_USER, SECOND_PASSWORD)),
            inside.clone(),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());

    // Posted to hello-world: invisible to the poller scoped to `second`, as if never received.
    for json in [false, true] {
        let answer = app
            .get_response("scope-outside", Some(TOKEN_SCOPED), json)
            .await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "json={json}");
        let unknown = app
            .get_response("scope-unknown", Some(TOKEN_SCOPED), json)
            .await;
        assert_eq!(
            unknown.body, answer.body,
            "the 404 bodies differ (existence leaks)"
        );
    }
    // Its own policy's response it reads.
    let answer = app
        .get_response("scope-inside", Some(TOKEN_SCOPED), false)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.body, inside);
    let v = app
        .get_response("scope-inside", Some(TOKEN_SCOPED), true)
        .await
        .json();
    assert_eq!(v["policy"], json!(SECOND_POLICY), "{v}");
    // The unscoped pollers read both.
    assert_served_raw(&app, "scope-outside", &outside).await;
    assert_served_raw(&app, "scope-inside", &inside).await;
}

#[tokio::test]
async fn hashed_token_poller_reads_responses() {
    let app = spawn_app().await;
    let body = response_doc("hashed-token", "x");
    assert_eq!(app.post_ok(body.clone()).await.status, StatusCode::OK);
    for _ in 0..2 {
        let answer = app
            .get_response("hashed-token", Some(TOKEN_HASHED), false)
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.body, body);
    }
    let answer = app
        .get_response("hashed-token", Some("hashed-poller-token-c0ffee43"), false)
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn accept_json_gives_the_summary_and_otherwise_the_raw_bytes() {
    let app = spawn_app().await;
    let body = response_doc("accept", "x");
    assert_eq!(app.post_ok(body.clone()).await.status, StatusCode::OK);

    let raw = app.get_response("accept", Some(TOKEN_ALL), false).await;
    assert_eq!(raw.status, StatusCode::OK);
    assert_eq!(raw.header("content-type"), Some("application/xml"));
    assert_eq!(raw.body, body);
    let etag = format!("\"{}\"", sha256_hex(&body));
    assert_eq!(raw.header("etag"), Some(etag.as_str()));

    let json = app.get_response("accept", Some(TOKEN_ALL), true).await;
    assert_eq!(json.status, StatusCode::OK);
    let v = json.json();
    assert_eq!(v["controlid"], json!("accept"), "{v}");
    assert_eq!(v["sha256"], json!(sha256_hex(&body)), "{v}");
    assert_eq!(v["size"], json!(body.len()), "{v}");

    // Accept lists: JSON among others, XML only, XML preferred, JSON refused, only wildcards,
    // JSON preferred. Qualities count.
    let get = |name: &'static str, value: String| {
        let app = &app;
        async move {
            app.request(
                Method::GET,
                "/v1/responses/accept",
                headers(&[
                    ("authorization", &format!("Bearer {TOKEN_ALL}")),
                    (name, &value),
                ]),
                Bytes::new(),
            )
            .await
        }
    };
    for (accept, wants_json) in [
        ("text/html, application/json;q=0.9", true),
        ("application/xml", false),
        ("application/json;q=0.9, application/xml", false),
        ("application/json; q=0", false),
        ("*/*", false),
        ("text/xml;q=0.5, application/json", true),
    ] {
        let answer = get("accept", accept.to_owned()).await;
        assert_eq!(answer.status, StatusCode::OK, "{accept}");
        if wants_json {
            assert_eq!(answer.json()["controlid"], json!("accept"), "{accept}");
        } else {
            assert_eq!(answer.body, body, "{accept}");
        }
    }
    // A weak validator matches too (If-None-Match uses the weak comparison).
    for tag in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"other\", {etag}"),
    ] {
        let answer = get("if-none-match", tag.clone()).await;
        assert_eq!(answer.status, StatusCode::NOT_MODIFIED, "{tag}");
    }
}

#[tokio::test]
async fn controlids_needing_percent_encoding_round_trip() {
    let app = spawn_app().await;
    let ids = [
        "a/b",
        "with space",
        "x&y",
        "café",
        "what?",
        "hash#tag",
        "100%",
        "<angle>",
    ];
    for id in ids {
        let body = response_doc(id, id);
        if id.contains('&') {
            assert!(
                String::from_utf8_lossy(&body).contains("x&amp;y"),
                "the document escapes the ampersand"
            );
        }
        let answer = app.post_ok(body.clone()).await;
        assert_eq!(answer.status, StatusCode::OK, "{id:?}: {}", answer.text());
        assert_eq!(answer.json()["controlid"], json!(id), "{id:?}");
    }
    for id in ids {
        let body = response_doc(id, id);
        let path = format!("/v1/responses/{}", encode_segment(id));
        assert!(path.is_ascii(), "{path}");
        assert_served_raw(&app, id, &body).await;
        let v = app.get_response(id, Some(TOKEN_ALL), true).await.json();
        assert_eq!(v["controlid"], json!(id), "{id:?} via {path}");
    }
    // The same id spelled with and without encoding of a plain character is the same resource.
    let answer = app
        .request(
            Method::GET,
            "/v1/responses/caf%c3%a9",
            headers(&[("authorization", &format!("Bearer {TOKEN_ALL}"))]),
            Bytes::new(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "lower-case percent escapes");
    assert_eq!(answer.body, response_doc("café", "café"));
    // Sanity check on the helper: unrelated ids are not found.
    let answer = app.get_response("a", Some(TOKEN_ALL), false).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
}
