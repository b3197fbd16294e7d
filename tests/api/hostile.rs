//! Hostile clients: slow or silent connections, oversized header blocks, a full connection table,
//! hostile XML over the wire, and password guessing. The service must stay up, answer real
//! clients at once, and let no one in.
//!
//! Timing assertions are generous upper bounds (an answer must arrive, not hang), never tight.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use crate::callbacks::assert_served_raw;
use crate::helpers::{
    basic, client_config, headers, response_doc, spawn_app, spawn_app_with, Answer, TestApp,
    PASSWORD, POLICY, SECOND_PASSWORD, SECOND_POLICY, SECOND_USER, TOKEN_ALL, USER,
};

/// The most any hostile request may take to be answered (or cut) in these tests.
const BOUND: Duration = Duration::from_secs(10);

/// Reads until the peer closes the stream (or errors); `Err` if it is still open after `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Result<Vec<u8>, Vec<u8>> {
    let mut got = Vec::new();
    let reading = async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    match tokio::time::timeout(within, reading).await {
        Ok(()) => Ok(got),
        Err(_) => Err(got),
    }
}

/// Reads one HTTP/1.1 response with a `content-length` body; returns its bytes.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a content-length");
            if got.len() >= end + 4 + length {
                return got;
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => panic!("connection closed mid-response: {got:?}"),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no complete response within 5 s: {got:?}"),
        }
    }
}

/// A TLS connection from `local` (any 127.0.0.0/8 address) to the service, offering `alpn`.
async fn tls_from(
    app: &TestApp,
    local: IpAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(local, 0))
        .expect("bind the client to a loopback address");
    let tcp = tokio::time::timeout(BOUND, socket.connect(app.addr))
        .await
        .expect("tcp connect timed out")
        .expect("tcp connect");
    let config = client_config(&app.ca_pem_path, alpn, None);
    let name = ServerName::try_from("localhost").expect("server name");
    tokio::time::timeout(BOUND, TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("tls handshake timed out")
        .expect("tls handshake")
}

/// One HTTP/1.1 request on a new connection from `local`.
async fn request_from(
    app: &TestApp,
    local: IpAddr,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: impl Into<Bytes>,
) -> Answer {
    let tls = tls_from(app, local, &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http/1.1 handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(body.into()))
        .expect("request");
    req.headers_mut().extend(headers);
    let exchange = async {
        let response = sender.send_request(req).await.expect("send request");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("read body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(BOUND, exchange)
        .await
        .expect("request timed out")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("ip")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_clients_do_not_stop_a_real_callback_and_are_cut_after_the_header_timeout()
{
    let app = spawn_app_with(|c| c.limits.header_timeout = Duration::from_secs(1)).await;

    // 100 clients that start a request and never finish its headers.
    let mut slow = Vec::new();
    for i in 0..100 {
        let mut tls = app.tls_connect(app.tls_h1.clone()).await;
        let partial =
            format!("POST /callback/{POLICY} HTTP/1.1\r\nHost: localhost\r\nX-Slow-{i}: yes\r\n");
        tls.write_all(partial.as_bytes()).await.expect("write");
        tls.flush().await.expect("flush");
        slow.push(tls);
    }
    // Clients that finish the handshake and send nothing, or only part of the HTTP/2 preface.
    let mut silent = vec![
        app.tls_connect(app.tls_h1.clone()).await,
        app.tls_connect(client_config(&app.ca_pem_path, &[], None))
            .await,
        app.tls_connect(app.tls_h2.clone()).await,
    ];
    let mut preface = app.tls_connect(app.tls_h2.clone()).await;
    preface
        .write_all(b"PRI * HTTP/2.0\r\n")
        .await
        .expect("write");
    preface.flush().await.expect("flush");
    silent.push(preface);
    let mut sniffed = app
        .tls_connect(client_config(&app.ca_pem_path, &[], None))
        .await;
    sniffed.write_all(b"PRI * HT").await.expect("write");
    sniffed.flush().await.expect("flush");
    silent.push(sniffed);

    // A real callback is served at once.
    let started = Instant::now();
    let body = response_doc("among-slow-clients", "x");
    let answer = app.post_ok(body.clone()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(
        started.elapsed() < BOUND,
        "the callback took {:?}",
        started.elapsed()
    );
    assert_served_raw(&app, "among-slow-clients", &body).await;

    // Every slow or silent client is cut soon after the 1 s header timeout.
    let cut_started = Instant::now();
    for (i, stream) in slow.iter_mut().enumerate() {
        if let Err(got) = closed_within(stream, BOUND).await {
            panic!(
                "slow client {i} still open after {:?}: {:?}",
                cut_started.elapsed(),
                String::from_utf8_lossy(&got)
            );
        }
    }
    for (i, stream) in silent.iter_mut().enumerate() {
        if let Err(got) = closed_within(stream, BOUND).await {
            panic!(
                "silent client {i} still open: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
    }
    // Still serving.
    let answer = app.post_ok(response_doc("after-slow-clients", "y")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_tls_are_cut_after_the_handshake_timeout() {
    let app = spawn_app_with(|c| c.limits.handshake_timeout = Duration::from_secs(1)).await;
    let mut idle = TcpStream::connect(app.addr).await.expect("connect");
    // Half a TLS record header, then nothing.
    let mut partial = TcpStream::connect(app.addr).await.expect("connect");
    partial.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
    let started = Instant::now();
    for stream in [&mut idle, &mut partial] {
        let got = closed_within(stream, BOUND)
            .await
            .expect("the connection is cut after the handshake timeout");
        assert!(got.is_empty(), "{got:?}");
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    let answer = app.post_ok(response_doc("after-tls-stall", "x")).await;
    assert_eq!(answer.status, StatusCode::OK);
}

/// Sends `head` on a raw HTTP/1.1 connection and returns the status, or `None` when the server
/// closed the connection without an answer. Fails when neither happens within [`BOUND`].
async fn status_or_close(app: &TestApp, head: &[u8]) -> Option<u16> {
    let mut tls = app.tls_connect(app.tls_h1.clone()).await;
    // The server may stop reading (and close) before all of it is written.
    let _ = tls.write_all(head).await;
    let _ = tls.flush().await;
    let got = match closed_within(&mut tls, BOUND).await {
        Ok(got) => got,
        Err(got) => {
            // An answer followed by a kept-alive connection is fine too.
            assert!(
                got.starts_with(b"HTTP/1.1 "),
                "no answer and no close: {got:?}"
            );
            got
        }
    };
    let text = String::from_utf8_lossy(&got);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_or_overlong_header_blocks_get_431_or_a_closed_connection() {
    let app = spawn_app_with(|c| {
        c.limits.max_header_bytes = 8192;
        c.limits.max_headers = 20;
    })
    .await;
    let auth = basic(USER, PASSWORD);

    // One huge header field.
    let head = format!(
        "POST /callback/{POLICY} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let status = status_or_close(&app, head.as_bytes()).await;
    assert!(matches!(status, None | Some(431)), "{status:?}");

    // Many small fields, together over the size limit.
    let mut head = "GET /healthz HTTP/1.1\r\nHost: localhost\r\n".to_string();
    for i in 0..2000 {
        head.push_str(&format!("X-Field-{i}: v\r\n"));
    }
    head.push_str("\r\n");
    let status = status_or_close(&app, head.as_bytes()).await;
    assert!(matches!(status, None | Some(431)), "{status:?}");

    // More fields than max_headers, well under the size limit.
    let mut head = "GET /healthz HTTP/1.1\r\nHost: localhost\r\n".to_string();
    for i in 0..30 {
        head.push_str(&format!("X-F{i}: v\r\n"));
    }
    head.push_str("\r\n");
    let status = status_or_close(&app, head.as_bytes()).await;
    assert!(matches!(status, None | Some(431)), "{status:?}");

    // Within both limits: served.
    let mut head = "GET /healthz HTTP/1.1\r\nHost: localhost\r\n".to_string();
    for i in 0..10 {
        head.push_str(&format!("X-F{i}: v\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    assert_eq!(status_or_close(&app, head.as_bytes()).await, Some(200));

    // HTTP/2: a header list over the limit is refused, never served, and never hangs.
    let tls = app.tls_connect(app.tls_h2.clone()).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(format!("https://localhost:{}/healthz", app.addr.port()))
        .header("x-big", "b".repeat(32 * 1024))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let outcome = tokio::time::timeout(BOUND, sender.send_request(req))
        .await
        .expect("the h2 request neither failed nor got an answer");
    if let Ok(response) = outcome {
        assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }
    let answer = app.post_ok(response_doc("after-big-headers", "x")).await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_wait_until_one_closes() {
    let app = spawn_app_with(|c| c.limits.max_connections = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(app.tls_connect(app.tls_h1.clone()).await);
    }
    // The fourth is accepted by the kernel but not served: its handshake does not complete.
    let tcp = TcpStream::connect(app.addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let mut handshake = Box::pin(TlsConnector::from(app.tls_h1.clone()).connect(name, tcp));
    assert!(
        tokio::time::timeout(Duration::from_millis(700), &mut handshake)
            .await
            .is_err(),
        "a fourth connection was served beyond max_connections = 3"
    );
    // One closes: the waiting one is served.
    drop(held.pop());
    let mut tls = tokio::time::timeout(BOUND, handshake)
        .await
        .expect("the queued connection was not served after a slot freed")
        .expect("tls handshake");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let got = closed_within(&mut tls, BOUND).await.expect("answered");
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
}

/// A response with `controlid` and an 80,000-attribute `<data>` element in its result.
fn many_attributes(controlid: &str) -> Vec<u8> {
    let mut body = format!(
        "<response><control><status>success</status><controlid>{controlid}</controlid></control>\
         <operation><result><status>success</status><function>readByQuery</function><data count=\"1\""
    )
    .into_bytes();
    for i in 0..80_000 {
        body.extend_from_slice(format!(" a{i}=\"v\"").as_bytes());
    }
    body.extend_from_slice(b" listtype=\"late\"/></result></operation></response>");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_xml_is_answered_quickly_and_the_service_stays_up() {
    let app = spawn_app().await;
    let billion_laughs = {
        let mut doc =
            String::from("<?xml version=\"1.0\"?>\n<!DOCTYPE lolz [\n<!ENTITY lol \"lol\">\n");
        for i in 1..10 {
            let prev = if i == 1 {
                "lol".to_owned()
            } else {
                format!("lol{}", i - 1)
            };
            doc.push_str(&format!(
                "<!ENTITY lol{i} \"{}\">\n",
                format!("&{prev};").repeat(10)
            ));
        }
        doc.push_str("]>\n<response><control><controlid>&lol9;</controlid></control></response>");
        doc.into_bytes()
    };
    let deep_before = {
        let mut doc = b"<response>".to_vec();
        doc.extend(b"<a>".repeat(200_000));
        doc
    };
    let deep_after = {
        let mut doc = b"<response><control><controlid>deep-after</controlid></control>".to_vec();
        doc.extend(b"<a>".repeat(200_000));
        doc.extend(b"</a>".repeat(200_000));
        doc.extend(b"</response>");
        doc
    };
    let attributes_on_response = {
        let mut doc = b"<response".to_vec();
        for i in 0..80_000 {
            doc.extend_from_slice(format!(" a{i}=\"v\"").as_bytes());
        }
        doc.extend_from_slice(
            b"><control><controlid>attrs-on-root</controlid></control></response>",
        );
        doc
    };
    let duplicate_attributes = {
        let mut doc = b"<response><control><controlid>dup-attrs</controlid></control><operation><result><data".to_vec();
        doc.extend(b" a=\"1\"".repeat(80_000));
        doc.extend(b"/></result></operation></response>");
        doc
    };
    let invalid_utf8 =
        b"<response><control><controlid>bad-\xFF\xFE</controlid></control></response>".to_vec();
    let bom = b"\xEF\xBB\xBF<?xml version=\"1.0\" encoding=\"UTF-8\"?><response><control><controlid>with-bom</controlid></control></response>".to_vec();
    let latin1 = b"<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><response><control><controlid>latin-caf\xE9</controlid></control></response>".to_vec();
    let utf16 = b"\xFF\xFE<\x00r\x00".to_vec();

    // (what, body, status, controlid under which it is served when stored)
    let cases: Vec<(&str, Vec<u8>, u16, Option<&str>)> = vec![
        ("billion laughs", billion_laughs, 400, None),
        (
            "200,000 nested elements before the controlid",
            deep_before,
            400,
            None,
        ),
        (
            "200,000 nested elements after the controlid",
            deep_after,
            200,
            Some("deep-after"),
        ),
        (
            "80,000 attributes on <data>",
            many_attributes("many-attrs"),
            200,
            Some("many-attrs"),
        ),
        (
            "80,000 attributes on the root",
            attributes_on_response,
            200,
            Some("attrs-on-root"),
        ),
        (
            "80,000 duplicate attributes on <data>",
            duplicate_attributes,
            200,
            Some("dup-attrs"),
        ),
        ("invalid utf-8 in the controlid", invalid_utf8, 400, None),
        ("a utf-8 byte order mark", bom, 200, Some("with-bom")),
        ("declared iso-8859-1", latin1, 200, Some("latin-café")),
        ("utf-16", utf16, 400, None),
    ];
    let mut refused = 0;
    for (what, body, status, served_as) in cases {
        let started = Instant::now();
        let answer = app.post_ok(body.clone()).await;
        let took = started.elapsed();
        assert_eq!(answer.status.as_u16(), status, "{what}: {}", answer.text());
        assert!(took < BOUND, "{what} took {took:?}");
        if status == 400 {
            refused += 1;
        }
        if let Some(controlid) = served_as {
            assert_served_raw(&app, controlid, &body).await;
        }
        // Alive after each one.
        let health = app
            .request(Method::GET, "/healthz", HeaderMap::new(), Bytes::new())
            .await;
        assert_eq!(health.status, StatusCode::OK, "after {what}");
    }
    // Every refused body is kept in quarantine.
    let quarantined = app
        .state
        .store
        .quarantined(None, 100)
        .await
        .expect("quarantine");
    assert_eq!(quarantined.len(), refused, "{quarantined:?}");
    let summary = crate::callbacks::summary(&app, "deep-after").await;
    assert_eq!(
        summary["well_formed"],
        serde_json::json!(false),
        "{summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_gets_429_per_address_and_others_are_not_limited() {
    let app = spawn_app_with(|c| c.limits.auth_failure_limit_per_minute = 5).await;
    let attacker = ip("127.0.0.1");
    let wrong = headers(&[
        ("authorization", &basic(USER, "guess")),
        ("content-type", "text/xml"),
    ]);
    let body = response_doc("guessed", "x");
    let path = format!("/callback/{POLICY}");

    // A correct client never counts, however many requests it makes.
    for i in 0..8 {
        let ok = headers(&[("authorization", &basic(USER, PASSWORD))]);
        let answer = request_from(
            &app,
            ip("127.0.0.4"),
            Method::POST,
            &path,
            ok,
            response_doc(&format!("legit-{i}"), "x"),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }

    for attempt in 1..=5 {
        let answer = request_from(
            &app,
            attacker,
            Method::POST,
            &path,
            wrong.clone(),
            body.clone(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "attempt {attempt}");
    }
    for _ in 0..3 {
        let answer = request_from(
            &app,
            attacker,
            Method::POST,
            &path,
            wrong.clone(),
            body.clone(),
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{}",
            answer.text()
        );
        let retry: u64 = answer
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .expect("seconds");
        assert!((1..=60).contains(&retry), "{retry}");
    }
    // The blocked address is refused before its credentials are looked at: even right ones.
    let right = headers(&[("authorization", &basic(USER, PASSWORD))]);
    let answer = request_from(
        &app,
        attacker,
        Method::POST,
        &path,
        right.clone(),
        body.clone(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    // Another address with the right credentials is served.
    let answer = request_from(
        &app,
        ip("127.0.0.2"),
        Method::POST,
        &path,
        right,
        body.clone(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    // Failures count per target: the same address is still served on another policy and on
    // the API (a mistyped transport policy must not get the gateway refused everywhere), and
    // the health check answers it.
    let second = headers(&[("authorization", &basic(SECOND_USER, SECOND_PASSWORD))]);
    let answer = request_from(
        &app,
        attacker,
        Method::POST,
        &format!("/callback/{SECOND_POLICY}"),
        second,
        response_doc("other-policy", "x"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let bearer = headers(&[("authorization", &format!("Bearer {TOKEN_ALL}"))]);
    let answer = request_from(
        &app,
        attacker,
        Method::GET,
        "/v1/responses/other-policy",
        bearer.clone(),
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    // Unknown policy ids share one count, so trying many of them gains nothing.
    for attempt in 1..=5 {
        let answer = request_from(
            &app,
            attacker,
            Method::POST,
            &format!("/callback/no-such-policy-{attempt}"),
            wrong.clone(),
            body.clone(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "attempt {attempt}");
    }
    let answer = request_from(
        &app,
        attacker,
        Method::POST,
        "/callback/yet-another-policy",
        wrong.clone(),
        body.clone(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(answer.text().contains("too many"), "{}", answer.text());
    let answer = request_from(
        &app,
        attacker,
        Method::GET,
        "/healthz",
        HeaderMap::new(),
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);

    // The poll side: wrong tokens from 127.0.0.3 are limited the same way.
    let poller = ip("127.0.0.3");
    let bad = headers(&[("authorization", "Bearer not-the-token-at-all")]);
    for attempt in 1..=5 {
        let answer = request_from(
            &app,
            poller,
            Method::GET,
            "/v1/responses/guessed",
            bad.clone(),
            Bytes::new(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "attempt {attempt}");
    }
    let answer = request_from(
        &app,
        poller,
        Method::GET,
        "/v1/responses/guessed",
        bad,
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(answer.header("retry-after").is_some());
    assert_eq!(
        answer.json()["error"]
            .as_str()
            .map(|s| s.contains("too many")),
        Some(true)
    );
    // A poller with the right token from elsewhere reads the callback.
    let answer = request_from(
        &app,
        ip("127.0.0.5"),
        Method::GET,
        "/v1/responses/guessed",
        bearer,
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.body, body);

    // The failures are logged with the address and the reason, never the secret.
    let logs = crate::helpers::logs();
    assert!(logs.contains("authentication failed"), "no failure line");
    assert!(logs.contains("127.0.0.3"), "no address in the log");
    assert!(
        !logs.contains("not-the-token-at-all"),
        "a presented token was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limiter_can_be_turned_off() {
    let app = spawn_app_with(|c| c.limits.auth_failure_limit_per_minute = 0).await;
    let wrong = headers(&[("authorization", &basic(USER, "guess"))]);
    let path = format!("/callback/{POLICY}");
    for _ in 0..30 {
        let answer = request_from(
            &app,
            ip("127.0.0.6"),
            Method::POST,
            &path,
            wrong.clone(),
            Bytes::new(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(app.state.auth_limiter.tracked(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_busy_ones_are_not() {
    let app = spawn_app_with(|c| c.limits.idle_timeout = Duration::from_secs(1)).await;

    // HTTP/1.1 keep-alive: one answer, then the idle connection is closed, well before the
    // 10-second header timeout could have done it.
    let mut h1 = app.tls_connect(app.tls_h1.clone()).await;
    h1.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let got = closed_within(&mut h1, Duration::from_secs(8))
        .await
        .expect("an idle HTTP/1.1 connection was left open");
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the idle timeout"
    );

    // Idleness counts from the end of the last request: a connection used every 0.6 s stays
    // open well past the timeout, then closes about a second after its last answer.
    let mut steady = app.tls_connect(app.tls_h1.clone()).await;
    let started = Instant::now();
    let mut answered = Instant::now();
    for round in 0..6 {
        steady
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("request {round} on a busy connection: {e}"));
        let head = read_response(&mut steady).await;
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "request {round}: {head:?}"
        );
        answered = Instant::now();
        if round < 5 {
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
    assert!(started.elapsed() >= Duration::from_secs(3));
    closed_within(&mut steady, Duration::from_secs(8))
        .await
        .expect("the connection stayed open after its last request");
    assert!(
        answered.elapsed() >= Duration::from_millis(900),
        "closed before the idle timeout after the last answer"
    );

    // HTTP/2: pings keep the connection up, but with no stream open it gets GOAWAY and ends.
    let tls = app.tls_connect(app.tls_h2.clone()).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("http/2 handshake");
    let driver = tokio::spawn(conn);
    let req = http::Request::get(format!("https://localhost:{}/healthz", app.addr.port()))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let answer = sender.send_request(req).await.expect("h2 answer");
    assert_eq!(answer.status(), StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(8), driver)
        .await
        .expect("an idle HTTP/2 connection was left open")
        .expect("driver task")
        .ok();

    // A request in flight is not idleness: a long-poll outlives the idle timeout on its
    // connection and gets its answer; the connection closes once it is idle again.
    let mut busy = app.tls_connect(app.tls_h1.clone()).await;
    let poll = format!(
        "GET /v1/responses/never-sent?wait=3 HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: Bearer {TOKEN_ALL}\r\n\r\n"
    );
    busy.write_all(poll.as_bytes()).await.expect("write");
    let got = closed_within(&mut busy, Duration::from_secs(10))
        .await
        .expect("the connection stayed open after its long-poll");
    assert!(
        got.starts_with(b"HTTP/1.1 404"),
        "the long-poll was cut: {:?}",
        String::from_utf8_lossy(&got)
    );
}
