//! Secrets never reach the logs: passwords, tokens and `Authorization` values, right or wrong.

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

use crate::helpers::{
    headers, logs, response_doc, spawn_app, HASHED_PASSWORD, HASHED_POLICY, HASHED_USER, PASSWORD,
    POLICY, SECRETS, TOKEN_ALL, TOKEN_HASHED, TOKEN_SCOPED, USER,
};

const WRONG_PASSWORD: &str = "wrong-pass-LoG7-unique";
const WRONG_TOKEN: &str = "wrong-token-LoG7-unique-0123456789";

#[tokio::test]
async fn logs_never_contain_passwords_tokens_or_authorization_values() {
    let app = spawn_app().await;
    let controlid = "log-check-7c1d";

    // Right and wrong credentials, on plain and hashed policies.
    let answer = app.post_ok(response_doc(controlid, "x")).await;
    assert_eq!(answer.status, StatusCode::OK);
    for (policy, user, password) in [
        (POLICY, USER, WRONG_PASSWORD),
        (HASHED_POLICY, HASHED_USER, HASHED_PASSWORD),
        (HASHED_POLICY, HASHED_USER, WRONG_PASSWORD),
        ("no-such-policy", USER, PASSWORD),
    ] {
        app.post_callback(
            policy,
            Some((user, password)),
            response_doc("log-other", "y"),
            HeaderMap::new(),
        )
        .await;
    }
    // A header that is not Basic at all, with a secret-looking value.
    app.post_callback(
        POLICY,
        None,
        response_doc("log-other", "z"),
        headers(&[("authorization", &format!("Bearer {WRONG_TOKEN}"))]),
    )
    .await;
    // Right and wrong tokens.
    for token in [TOKEN_ALL, TOKEN_SCOPED, TOKEN_HASHED, WRONG_TOKEN] {
        app.get_response(controlid, Some(token), false).await;
    }
    app.request(
        Method::GET,
        "/v1/responses/log-check-7c1d",
        headers(&[("authorization", &format!("Basic {WRONG_PASSWORD}"))]),
        Bytes::new(),
    )
    .await;

    let text = logs();
    assert!(
        text.contains("callback stored") && text.contains(controlid),
        "the stored callback was not logged; logs:\n{text}"
    );
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut forbidden: Vec<String> = SECRETS.iter().map(|s| s.to_string()).collect();
    forbidden.push(WRONG_PASSWORD.into());
    forbidden.push(WRONG_TOKEN.into());
    for (user, password) in [
        (USER, PASSWORD),
        (USER, WRONG_PASSWORD),
        (HASHED_USER, HASHED_PASSWORD),
        (HASHED_USER, WRONG_PASSWORD),
    ] {
        let encoded = b64(&format!("{user}:{password}"));
        // Without the padding too, in case a prefix is logged.
        forbidden.push(encoded.trim_end_matches('=').to_string());
    }
    for secret in &forbidden {
        assert!(
            !text.contains(secret.as_str()),
            "the logs contain the secret {secret:?}"
        );
    }
    assert!(
        !text.to_ascii_lowercase().contains("authorization: "),
        "the logs contain an Authorization header"
    );
}

#[tokio::test]
async fn text_logs_cannot_be_forged_through_the_url_or_the_body() {
    let app = spawn_app().await;
    let forged = "FORGED-LINE-3e8a INFO callback stored";
    // An unknown policy id carrying a newline, percent-encoded in the URL.
    let path = format!("/callback/x%0a{}", forged.replace(' ', "%20"));
    let answer = app
        .request(
            Method::POST,
            &path,
            HeaderMap::new(),
            Bytes::from_static(b"<response/>"),
        )
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    // A refused body whose reason quotes a line break and the same text.
    let body = format!("not xml\n{forged}");
    let answer = app
        .post_callback(
            POLICY,
            Some((USER, PASSWORD)),
            Bytes::from(body),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text());
    let logs = logs();
    assert!(
        logs.contains("FORGED-LINE-3e8a"),
        "the attempt was not logged"
    );
    for line in logs.lines() {
        assert!(
            !line.starts_with("FORGED-LINE-3e8a"),
            "a log line was forged: {line:?}"
        );
    }
}
