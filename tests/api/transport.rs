//! TLS and HTTP versions: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, HTTP/2 streams, `/healthz`.

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use hyper_util::rt::TokioIo;

use crate::callbacks::assert_served_raw;
use crate::helpers::{
    basic, client_config, headers, response_doc, spawn_app, PASSWORD, TOKEN_ALL, USER,
};

#[tokio::test]
async fn tls_1_2_and_1_3_both_handshake_and_serve() {
    let app = spawn_app().await;
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let config = client_config(&app.ca_pem_path, &[b"http/1.1"], Some(&[version]));
        let tls = app.tls_connect(config).await;
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("http/1.1 handshake");
        tokio::spawn(conn);
        let req = http::Request::builder()
            .uri("/healthz")
            .header("host", "localhost")
            .body(http_body_util::Full::new(Bytes::new()))
            .expect("request");
        let answer = sender.send_request(req).await.expect("healthz");
        assert_eq!(answer.status(), StatusCode::OK, "{expected:?}");
    }
}

#[tokio::test]
async fn alpn_selects_http_1_1_or_none() {
    let app = spawn_app().await;
    let tls = app.tls_connect(app.tls_h1.clone()).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // A client offering no ALPN at all still gets HTTP/1.1.
    let config = client_config(&app.ca_pem_path, &[], None);
    let tls = app.tls_connect(config).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let mut raw = app.raw().await;
    raw.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    assert_eq!(raw.read_response().await.status, 200);
}

#[tokio::test]
async fn http2_callbacks_and_reads_on_concurrent_streams() {
    let app = spawn_app().await;
    let conn = app.h2().await;
    let auth = basic(USER, PASSWORD);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut conn = conn.clone();
        let auth = auth.clone();
        tasks.spawn(async move {
            let controlid = format!("h2-{i}");
            let body = response_doc(&controlid, "over h2");
            let answer = conn
                .request(
                    Method::POST,
                    "/callback/hello-world",
                    headers(&[("authorization", &auth)]),
                    body.clone(),
                )
                .await;
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "{controlid}: {}",
                answer.text()
            );
            let answer = conn
                .request(
                    Method::GET,
                    &format!("/v1/responses/{controlid}"),
                    headers(&[("authorization", &format!("Bearer {TOKEN_ALL}"))]),
                    Bytes::new(),
                )
                .await;
            assert_eq!(answer.status, StatusCode::OK, "{controlid}");
            assert_eq!(answer.body, body, "{controlid}");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("an h2 task failed");
    }
    // HTTP/2 refusals carry the same headers.
    let mut conn = conn.clone();
    let answer = conn
        .request(Method::POST, "/callback/hello-world", HeaderMap::new(), "x")
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer.header("www-authenticate"),
        Some("Basic realm=\"callback-receiver\"")
    );
    let answer = conn
        .request(
            Method::GET,
            "/callback/hello-world",
            HeaderMap::new(),
            Bytes::new(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.header("allow"), Some("POST"));
    assert_served_raw(&app, "h2-7", &response_doc("h2-7", "over h2")).await;
}

#[tokio::test]
async fn healthz_answers_without_authentication() {
    let app = spawn_app().await;
    let answer = app
        .request(Method::GET, "/healthz", HeaderMap::new(), Bytes::new())
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let mut h2 = app.h2().await;
    let answer = h2
        .request(Method::GET, "/healthz", HeaderMap::new(), Bytes::new())
        .await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_posts_and_fetches_over_its_preferred_protocol() {
    let app = spawn_app().await;
    let curl = |args: Vec<String>| {
        tokio::task::block_in_place(|| {
            std::process::Command::new("curl")
                .args(&args)
                .env("NO_PROXY", "*")
                .env("no_proxy", "*")
                .output()
        })
    };
    let Ok(version) = curl(vec!["--version".into()]) else {
        eprintln!("SKIPPED curl_posts_and_fetches_over_its_preferred_protocol: no curl");
        return;
    };
    let http2 = String::from_utf8_lossy(&version.stdout).contains("HTTP2");
    let body = crate::helpers::fixture("vendorResponse.xml");
    let file = app.dir.path().join("vendorResponse.xml");
    std::fs::write(&file, &body).expect("write the body");
    let ca = app.ca_pem_path.display().to_string();
    let out = curl(vec![
        "-sS".into(),
        "--cacert".into(),
        ca.clone(),
        "-u".into(),
        format!("{USER}:{PASSWORD}"),
        "--data-binary".into(),
        format!("@{}", file.display()),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code} %{http_version}".into(),
        format!("{}/callback/hello-world", app.base_url),
    ])
    .expect("run curl");
    let written = String::from_utf8_lossy(&out.stdout).into_owned();
    let expected_version = if http2 { "2" } else { "1.1" };
    assert_eq!(
        written,
        format!("200 {expected_version}"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = curl(vec![
        "-sS".into(),
        "--cacert".into(),
        ca,
        "-H".into(),
        format!("Authorization: Bearer {TOKEN_ALL}"),
        format!("{}/v1/responses/LF14b6850ddd6f4cbe", app.base_url),
    ])
    .expect("run curl");
    assert!(out.stdout == body, "curl got other bytes back");
}
