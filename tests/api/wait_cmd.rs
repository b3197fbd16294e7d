//! `callback-receiver wait`: the real binary against a spawned service (success, `--json`,
//! time-out, bad token, untrusted certificate, a server that comes up late) and against a
//! scripted fake server for the answers the service rarely gives (503 with `Retry-After`, 500,
//! 400, 202, and a server that ignores `wait=`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;

use crate::helpers::{
    encode_segment, make_certs, response_doc, sha256_hex, spawn_app, spawn_app_with, POLICY,
    SECRETS, TOKEN_ALL, TOKEN_SCOPED,
};

const BIN: &str = env!("CARGO_BIN_EXE_callback-receiver");

/// The longest any `wait` process of these tests may run before the test fails.
const PROCESS_LIMIT: Duration = Duration::from_secs(60);

/// `callback-receiver wait ARGS` with a predictable environment (no `SSL_CERT_*`).
fn wait_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("wait")
        .args(args)
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn start(cmd: &mut Command) -> (Child, Instant) {
    (cmd.spawn().expect("start the binary"), Instant::now())
}

/// Waits (off the runtime's threads) for the process to end; kills it and fails the test after
/// [`PROCESS_LIMIT`]. Returns its output and how long it ran.
async fn finish(child: Child, started: Instant) -> (Output, Duration) {
    tokio::task::spawn_blocking(move || {
        let mut child = child;
        loop {
            match child.try_wait().expect("try_wait") {
                Some(_) => break,
                None if started.elapsed() > PROCESS_LIMIT => {
                    let _ = child.kill();
                    let out = child.wait_with_output().expect("output");
                    panic!(
                        "wait did not end within {PROCESS_LIMIT:?}; stderr {:?}",
                        text(&out.stderr)
                    );
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let elapsed = started.elapsed();
        (child.wait_with_output().expect("output"), elapsed)
    })
    .await
    .expect("the waiting thread panicked")
}

/// Runs `wait ARGS` to its end.
async fn run(cmd: &mut Command) -> (Output, Duration) {
    let (child, started) = start(cmd);
    finish(child, started).await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts exit `code`, nothing on stdout, exactly one line on stderr without a panic or a
/// secret; returns the line.
fn assert_failed(what: &str, out: &Output, code: i32) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{what}: stderr {stderr:?}");
    assert!(
        out.stdout.is_empty(),
        "{what}: stdout {:?}",
        text(&out.stdout)
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{what}: not one line: {stderr:?}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{what}: {stderr:?}"
    );
    for secret in SECRETS {
        assert!(
            !stderr.contains(secret),
            "{what}: a secret leaked: {stderr:?}"
        );
    }
    stderr.trim_end().to_string()
}

/// Writes `contents` to a token file in `dir`.
fn token_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write the token file");
    path
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------------
// Against the service.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_prints_the_exact_bytes_when_the_callback_arrives() {
    let app = spawn_app().await;
    let controlid = "wait-cmd a/b?c#d%é";
    let body = response_doc(controlid, "marker é\r\n\ttab  end");
    let token = token_file(app.dir.path(), "token", &format!("\n  {TOKEN_ALL} \r\n"));
    let (mut child, started) = start(&mut wait_command(&[
        controlid,
        "--url",
        &app.base_url,
        "--token-file",
        s(&token),
        "--cacert",
        s(&app.ca_pem_path),
        "--timeout",
        "40",
    ]));
    // Let it ask (and find nothing) before the callback comes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "wait ended before the callback was posted"
    );
    let posted = app.post_ok(body.clone()).await;
    assert_eq!(posted.status, StatusCode::OK, "{}", posted.text());
    let (out, _) = finish(child, started).await;
    assert_eq!(out.status.code(), Some(0), "stderr {:?}", text(&out.stderr));
    assert_eq!(out.stdout, body.to_vec(), "stdout is not the exact body");
    assert!(out.stderr.is_empty(), "stderr {:?}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_json_prints_the_summary() {
    let app = spawn_app().await;
    let controlid = "wait-cmd-json";
    let body = response_doc(controlid, "json");
    assert_eq!(app.post_ok(body.clone()).await.status, StatusCode::OK);
    let token = token_file(app.dir.path(), "token", TOKEN_ALL);
    let (out, _) = run(&mut wait_command(&[
        controlid,
        "--url",
        &format!("{}/", app.base_url),
        "--token-file",
        s(&token),
        "--cacert",
        s(&app.ca_pem_path),
        "--json",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr {:?}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", text(&out.stdout)));
    assert_eq!(summary["controlid"], controlid);
    assert_eq!(summary["policy"], POLICY);
    assert_eq!(summary["sha256"], sha256_hex(&body));
    assert_eq!(summary["size"], body.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_times_out_with_exit_1_and_one_line() {
    let app = spawn_app().await;
    let token = token_file(app.dir.path(), "token", TOKEN_ALL);
    let (out, elapsed) = run(&mut wait_command(&[
        "never-posted",
        "--url",
        &app.base_url,
        "--token-file",
        s(&token),
        "--cacert",
        s(&app.ca_pem_path),
        "--timeout",
        "2",
    ]))
    .await;
    let line = assert_failed("time-out", &out, 1);
    assert!(line.contains("timed out"), "{line}");
    assert!(line.contains("never-posted"), "{line}");
    assert!(
        elapsed >= Duration::from_secs(2),
        "ended early: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(10), "ended late: {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_zero_asks_once() {
    let app = spawn_app().await;
    let token = token_file(app.dir.path(), "token", TOKEN_ALL);
    let args = |controlid: &'static str| {
        wait_command(&[
            controlid,
            "--url",
            &app.base_url,
            "--token-file",
            s(&token),
            "--cacert",
            s(&app.ca_pem_path),
            "--timeout",
            "0",
        ])
    };
    let (out, elapsed) = run(&mut args("not-there")).await;
    let line = assert_failed("timeout 0", &out, 1);
    assert!(line.contains("not received"), "{line}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");

    let body = response_doc("there", "x");
    assert_eq!(app.post_ok(body.clone()).await.status, StatusCode::OK);
    let (out, _) = run(&mut args("there")).await;
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out.stderr));
    assert_eq!(out.stdout, body.to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_or_missing_token_exits_2_without_printing_it() {
    let app = spawn_app().await;
    let dir = app.dir.path();
    let wrong = "wrong-token-0123456789abcdef";
    let cases = [
        ("wrong token", token_file(dir, "wrong", wrong)),
        ("empty token file", token_file(dir, "empty", " \n\t\n")),
        ("missing token file", dir.join("no-such-token")),
    ];
    for (what, path) in cases {
        let (out, elapsed) = run(&mut wait_command(&[
            "anything",
            "--url",
            &app.base_url,
            "--token-file",
            s(&path),
            "--cacert",
            s(&app.ca_pem_path),
            "--timeout",
            "30",
        ]))
        .await;
        let line = assert_failed(what, &out, 2);
        assert!(!line.contains(wrong), "{what}: {line}");
        assert!(elapsed < Duration::from_secs(10), "{what}: {elapsed:?}");
    }
    // A valid token outside the policy's scope is a 404 like any other: it waits, then times out.
    let scoped = token_file(dir, "scoped", TOKEN_SCOPED);
    let out = app.post_ok(response_doc("scoped-out", "x")).await;
    assert_eq!(out.status, StatusCode::OK);
    let (out, _) = run(&mut wait_command(&[
        "scoped-out",
        "--url",
        &app.base_url,
        "--token-file",
        s(&scoped),
        "--cacert",
        s(&app.ca_pem_path),
        "--timeout",
        "1",
    ]))
    .await;
    assert_failed("scoped poller", &out, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_exits_2_at_once() {
    let app = spawn_app().await;
    let token = token_file(app.dir.path(), "token", TOKEN_ALL);
    let other = tempfile::tempdir().expect("tempdir");
    let other_ca = make_certs(other.path());

    // A CA file that did not sign the server's certificate.
    let (out, elapsed) = run(&mut wait_command(&[
        "x",
        "--url",
        &app.base_url,
        "--token-file",
        s(&token),
        "--cacert",
        s(&other_ca),
        "--timeout",
        "30",
    ]))
    .await;
    let line = assert_failed("other CA", &out, 2);
    assert!(line.contains("certificate"), "{line}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");

    // The system roots (made predictable with SSL_CERT_FILE), which do not hold the test CA.
    let (out, elapsed) = run(wait_command(&[
        "x",
        "--url",
        &app.base_url,
        "--token-file",
        s(&token),
        "--timeout",
        "30",
    ])
    .env("SSL_CERT_FILE", &other_ca))
    .await;
    let line = assert_failed("system roots", &out, 2);
    assert!(line.contains("certificate"), "{line}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");

    // The machine's real roots, whatever they are: never trusted, never a retry loop.
    let (out, elapsed) = run(&mut wait_command(&[
        "x",
        "--url",
        &app.base_url,
        "--token-file",
        s(&token),
        "--timeout",
        "30",
    ]))
    .await;
    assert_failed("machine roots", &out, 2);
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_retries_until_the_server_comes_up() {
    // A port where nothing listens yet.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    // The certificate is made first, so that the process can be given its CA before the service
    // exists.
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = make_certs(certs.path());
    let token = token_file(certs.path(), "token", TOKEN_ALL);
    let controlid = "late-server";
    let (mut child, started) = start(&mut wait_command(&[
        controlid,
        "--url",
        &format!("https://127.0.0.1:{port}"),
        "--token-file",
        s(&token),
        "--cacert",
        s(&ca),
        "--timeout",
        "40",
    ]));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "wait gave up while the server was down"
    );
    let cert_dir = certs.path().join("certs");
    let app = spawn_app_with(|c| {
        c.listen = format!("127.0.0.1:{port}").parse().expect("address");
        c.tls.cert = cert_dir.join("cert.pem");
        c.tls.key = cert_dir.join("key.pem");
    })
    .await;
    // The service serves the certificate made above, not the one of `app.client`.
    let client = crate::helpers::Client::new(app.addr, &ca);
    let body = response_doc(controlid, "late");
    assert_eq!(client.post_ok(body.clone()).await.status, StatusCode::OK);
    let (out, _) = finish(child, started).await;
    assert_eq!(out.status.code(), Some(0), "stderr {:?}", text(&out.stderr));
    assert_eq!(out.stdout, body.to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_comes_up_is_a_time_out_naming_the_last_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = make_certs(certs.path());
    let token = token_file(certs.path(), "token", TOKEN_ALL);
    let (out, elapsed) = run(&mut wait_command(&[
        "x",
        "--url",
        &format!("https://127.0.0.1:{port}"),
        "--token-file",
        s(&token),
        "--cacert",
        s(&ca),
        "--timeout",
        "2",
    ]))
    .await;
    let line = assert_failed("nothing listening", &out, 1);
    assert!(line.contains("timed out"), "{line}");
    assert!(line.contains("connecting to 127.0.0.1"), "{line}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

#[tokio::test]
async fn usage_errors_are_one_line_with_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = token_file(dir.path(), "token", TOKEN_ALL);
    let t = s(&token);
    let missing_ca = dir.path().join("missing-ca.pem");
    for args in [
        &["x", "--url", "http://localhost:8443", "--token-file", t][..],
        &["x", "--url", "localhost:8443", "--token-file", t],
        &["x", "--url", "https://user:pw@localhost", "--token-file", t],
        &["x", "--url", "https://localhost:99999", "--token-file", t],
        &["", "--url", "https://localhost", "--token-file", t],
        &["x", "--token-file", t],
        &["x", "--url", "https://localhost"],
        &["--url", "https://localhost", "--token-file", t],
        &[
            "x",
            "--url",
            "https://localhost",
            "--token-file",
            t,
            "--timeout",
            "-1",
        ],
        &[
            "x",
            "--url",
            "https://localhost",
            "--token-file",
            t,
            "--timeout",
            "soon",
        ],
        &[
            "x",
            "--url",
            "https://localhost",
            "--token-file",
            t,
            "--bogus",
        ],
        &[
            "x",
            "--url",
            "https://localhost",
            "--token-file",
            t,
            "--cacert",
            s(&missing_ca),
        ],
    ] {
        let (out, _) = run(&mut wait_command(args)).await;
        assert_failed(&format!("{args:?}"), &out, 2);
    }
    let (out, _) = run(&mut wait_command(&[
        "x",
        "--url",
        "http://localhost",
        "--token-file",
        t,
    ]))
    .await;
    assert!(text(&out.stderr).contains("HTTPS-only"));
}

#[test]
fn wait_answers_help() {
    let out = wait_command(&["--help"]).output().expect("run");
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for needle in [
        "CONTROLID",
        "--url",
        "--token-file",
        "--cacert",
        "--timeout",
        "--json",
        "[default: 600]",
        "Exit status",
    ] {
        assert!(help.contains(needle), "{needle} missing from {help}");
    }
    let top = Command::new(BIN).arg("--help").output().expect("run");
    assert!(text(&top.stdout).contains("wait"));
}

// ---------------------------------------------------------------------------------------------
// Against a scripted server.

/// One scripted answer: status, headers, body.
type Scripted = (u16, Vec<(&'static str, &'static str)>, &'static str);

/// What the fake server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    /// When it arrived.
    at: Instant,
    /// Its request target.
    target: String,
    /// Its `Authorization` header.
    authorization: String,
    /// Its `Accept` header.
    accept: String,
}

/// An HTTPS server on localhost that answers from a script, then with its last answer forever.
struct FakeServer {
    /// `https://localhost:PORT/pre`.
    url: String,
    /// Its CA.
    ca: PathBuf,
    /// The requests seen.
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The temporary directory of its certificate.
    dir: tempfile::TempDir,
    /// The accept loop.
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeServer {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

async fn fake_server(script: Vec<Scripted>) -> FakeServer {
    crate::helpers::init();
    assert!(!script.is_empty());
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = make_certs(dir.path());
    let certs = dir.path().join("certs");
    let key =
        callback_receiver::tls::load_certified_key(&certs.join("cert.pem"), &certs.join("key.pem"))
            .expect("certificate");
    let resolver = Arc::new(callback_receiver::tls::ReloadableCert::new(key));
    let config = callback_receiver::tls::server_config(resolver).expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string()
                            };
                            seen.lock().expect("seen").push(Seen {
                                at: Instant::now(),
                                target: req.uri().to_string(),
                                authorization: header("authorization"),
                                accept: header("accept"),
                            });
                            let (status, headers, body) = {
                                let mut script = script.lock().expect("script");
                                if script.len() > 1 {
                                    script.pop_front().expect("answer")
                                } else {
                                    script.front().cloned().expect("answer")
                                }
                            };
                            let mut response = Response::new(Full::new(Bytes::from(body)));
                            *response.status_mut() = StatusCode::from_u16(status).expect("status");
                            for (name, value) in headers {
                                response.headers_mut().insert(
                                    http::header::HeaderName::from_static(name),
                                    http::HeaderValue::from_static(value),
                                );
                            }
                            async move { Ok::<_, Infallible>(response) }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        })
    };
    FakeServer {
        url: format!("https://localhost:{port}/pre/"),
        ca,
        seen,
        dir,
        task,
    }
}

/// Runs `wait CONTROLID` against the fake server with token `fake-token` and `extra` flags.
async fn wait_fake(server: &FakeServer, controlid: &str, extra: &[&str]) -> (Output, Duration) {
    let token = token_file(server.dir.path(), "token", "fake-token\n");
    let mut args = vec![
        controlid,
        "--url",
        &server.url,
        "--token-file",
        s(&token),
        "--cacert",
        s(&server.ca),
    ];
    args.extend_from_slice(extra);
    run(&mut wait_command(&args)).await
}

fn gap(seen: &[Seen], i: usize) -> Duration {
    seen[i].at.duration_since(seen[i - 1].at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_and_failing_servers_are_retried_as_they_ask() {
    let server = fake_server(vec![
        (503, vec![("retry-after", "1")], "{\"error\":\"busy\"}\n"),
        (500, vec![], "oops\n"),
        (404, vec![], "{\"error\":\"not found\"}\n"),
        (200, vec![("content-type", "application/xml")], "<r>ok</r>"),
    ])
    .await;
    let controlid = "a/b c?é";
    let (out, _) = wait_fake(&server, controlid, &["--timeout", "30"]).await;
    assert_eq!(out.status.code(), Some(0), "stderr {:?}", text(&out.stderr));
    assert_eq!(out.stdout, b"<r>ok</r>");
    let seen = server.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    for request in &seen {
        let prefix = format!("/pre/v1/responses/{}?wait=", encode_segment(controlid));
        let wait: u64 = request
            .target
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{} does not start with {prefix}", request.target))
            .parse()
            .expect("wait is a number");
        assert!(wait <= 60, "{request:?}");
        assert_eq!(request.authorization, "Bearer fake-token");
        assert_eq!(request.accept, "application/xml");
    }
    assert!(
        gap(&seen, 1) >= Duration::from_millis(900),
        "Retry-After ignored: {seen:?}"
    );
    assert!(
        gap(&seen, 3) >= Duration::from_millis(900),
        "404 retried at once: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_wait_is_asked_once_a_second() {
    let server = fake_server(vec![(404, vec![], "{\"error\":\"not found\"}\n")]).await;
    let (out, elapsed) = wait_fake(&server, "x", &["--timeout", "3"]).await;
    let line = assert_failed("ignored wait", &out, 1);
    assert!(line.contains("timed out after 3 s"), "{line}");
    let seen = server.seen();
    assert!(
        (2..=5).contains(&seen.len()),
        "{} requests in {elapsed:?}",
        seen.len()
    );
    for i in 1..seen.len() {
        assert!(gap(&seen, i) >= Duration::from_millis(900), "{seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_keeps_waiting_and_json_is_asked_for() {
    let summary = "{\"controlid\":\"p\",\"well_formed\":true}";
    let server = fake_server(vec![
        (202, vec![], "{\"controlid\":\"p\",\"state\":\"pending\"}"),
        (200, vec![("content-type", "application/json")], summary),
    ])
    .await;
    let (out, _) = wait_fake(&server, "p", &["--json", "--timeout", "30"]).await;
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out.stderr));
    assert_eq!(text(&out.stdout), summary);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|r| r.accept == "application/json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_exit_2_with_the_reason_and_time_outs_0_ask_once() {
    let server = fake_server(vec![(
        400,
        vec![],
        "{\"error\":\"wait must be a number\"}\n",
    )])
    .await;
    let (out, _) = wait_fake(&server, "x", &["--timeout", "30"]).await;
    let line = assert_failed("400", &out, 2);
    assert!(line.contains("wait must be a number"), "{line}");
    assert_eq!(server.seen().len(), 1);

    let server = fake_server(vec![(503, vec![("retry-after", "1")], "busy\n")]).await;
    let (out, _) = wait_fake(&server, "x", &["--timeout", "0"]).await;
    let line = assert_failed("timeout 0", &out, 1);
    assert!(line.contains("503"), "{line}");
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].target, "/pre/v1/responses/x",
        "no wait= with --timeout 0"
    );
}
