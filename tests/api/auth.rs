//! Basic authentication of callbacks: every refusal of the contract's table, and the edge cases
//! that must be accepted.

use base64::Engine as _;
use callback_receiver::store::Scope;
use http::{HeaderMap, StatusCode};
use serde_json::json;

use crate::callbacks::assert_served_raw;
use crate::helpers::{
    headers, response_doc, spawn_app, HASHED_PASSWORD, HASHED_POLICY, HASHED_USER, OPEN_POLICY,
    PASSWORD, POLICY, SECOND_PASSWORD, SECOND_POLICY, SECOND_USER, TOKEN_ALL, USER,
};

const CHALLENGE: &str = "Basic realm=\"callback-receiver\"";

/// A refused case: what it shows, the policy posted to, and the credentials presented.
type Case<'a> = (&'a str, &'a str, Option<(&'a str, &'a str)>);

#[tokio::test]
async fn wrong_or_missing_credentials_get_401_with_a_basic_challenge_and_nothing_is_stored() {
    let app = spawn_app().await;
    let cases: Vec<Case<'_>> = vec![
        ("missing header", POLICY, None),
        (
            "wrong password",
            POLICY,
            Some((USER, "s3cret:with:colons-e")),
        ),
        ("wrong user", POLICY, Some(("intacct-cb2", PASSWORD))),
        ("empty password", POLICY, Some((USER, ""))),
        ("unknown policy", "no-such-policy", Some((USER, PASSWORD))),
        (
            "another policy's credentials",
            POLICY,
            Some((SECOND_USER, SECOND_PASSWORD)),
        ),
        (
            "its credentials on another policy",
            SECOND_POLICY,
            Some((USER, PASSWORD)),
        ),
        (
            "hashed policy, wrong password",
            HASHED_POLICY,
            Some((HASHED_USER, "nope")),
        ),
        ("unknown policy without credentials", "nowhere", None),
    ];
    for (i, (what, policy, credentials)) in cases.into_iter().enumerate() {
        let controlid = format!("unauthorized-{i}");
        let answer = app
            .post_callback(
                policy,
                credentials,
                response_doc(&controlid, what),
                HeaderMap::new(),
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::UNAUTHORIZED,
            "{what}: {}",
            answer.text()
        );
        assert_eq!(answer.header("www-authenticate"), Some(CHALLENGE), "{what}");
        let got = app.get_response(&controlid, Some(TOKEN_ALL), false).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{what}: stored anyway");
    }
    // Headers that are not usable Basic credentials at all.
    for (i, value) in [
        "Bearer abcdefghijklmnop",
        "Basic",
        "Basic !!!not-base64!!!",
        "Basic aW50YWNjdC1jYg==", // "intacct-cb" without a colon
    ]
    .into_iter()
    .enumerate()
    {
        let controlid = format!("unusable-{i}");
        let answer = app
            .post_callback(
                POLICY,
                None,
                response_doc(&controlid, "x"),
                headers(&[("authorization", value)]),
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::UNAUTHORIZED,
            "{value:?}: {}",
            answer.text()
        );
        assert_eq!(
            answer.header("www-authenticate"),
            Some(CHALLENGE),
            "{value:?}"
        );
    }
    let feed = app
        .state
        .store
        .feed(None, 100, &Scope::All)
        .await
        .expect("feed");
    assert!(feed.is_empty(), "refused callbacks were stored: {feed:?}");
    let quarantined = app.state.store.quarantined(None, 100).await.expect("q");
    assert!(
        quarantined.is_empty(),
        "refused callbacks were quarantined: {quarantined:?}"
    );
}

#[tokio::test]
async fn lowercase_scheme_colons_and_non_ascii_password_and_open_policy_are_accepted() {
    let app = spawn_app().await;

    // The password has colons and an é (UTF-8), as RFC 7617 allows.
    let body = response_doc("auth-colons", "x");
    let answer = app
        .post_callback(
            POLICY,
            Some((USER, PASSWORD)),
            body.clone(),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_served_raw(&app, "auth-colons", &body).await;

    // The scheme name is case-insensitive.
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    for (i, scheme) in ["basic", "BASIC"].into_iter().enumerate() {
        let controlid = format!("auth-scheme-{i}");
        let body = response_doc(&controlid, "x");
        let answer = app
            .post_callback(
                POLICY,
                None,
                body.clone(),
                headers(&[("authorization", &format!("{scheme} {encoded}"))]),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{scheme}: {}", answer.text());
        assert_served_raw(&app, &controlid, &body).await;
    }

    // The second policy with its own credentials.
    let body = response_doc("auth-second", "x");
    let answer = app
        .post_callback(
            SECOND_POLICY,
            Some((SECOND_USER, SECOND_PASSWORD)),
            body.clone(),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_served_raw(&app, "auth-second", &body).await;

    // An open policy needs no credentials.
    let body = response_doc("auth-open", "x");
    let answer = app
        .post_callback(OPEN_POLICY, None, body.clone(), HeaderMap::new())
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_served_raw(&app, "auth-open", &body).await;
    let v = app
        .get_response("auth-open", Some(TOKEN_ALL), true)
        .await
        .json();
    assert_eq!(v["policy"], json!(OPEN_POLICY), "{v}");
}

#[tokio::test]
async fn hashed_password_policy_works_and_the_second_check_is_cached() {
    let app = spawn_app().await;
    let hits_before = app.state.verifier.cache_hits();
    for i in 0..2 {
        let controlid = format!("hashed-{i}");
        let body = response_doc(&controlid, "x");
        let answer = app
            .post_callback(
                HASHED_POLICY,
                Some((HASHED_USER, HASHED_PASSWORD)),
                body.clone(),
                HeaderMap::new(),
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "attempt {i}: {}",
            answer.text()
        );
        assert_served_raw(&app, &controlid, &body).await;
    }
    assert!(
        app.state.verifier.cache_hits() > hits_before,
        "the second check of the same hashed credentials did not hit the cache"
    );
    // A wrong password is still refused after the right one was cached.
    let answer = app
        .post_callback(
            HASHED_POLICY,
            Some((HASHED_USER, "hashed-pass-Kx43")),
            response_doc("hashed-wrong", "x"),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
}
