//! The test harness: `spawn_app()` starts the real service on a random port with a fresh data
//! directory and a private CA, and [`Client`] talks to it over real TLS connections (hyper's
//! HTTP/1.1 and HTTP/2 clients, and a raw TLS stream for what a well-behaved client never sends).
//!
//! Logs of the whole test binary go to an in-memory buffer (see [`logs`]) so that a test can
//! check what was logged; they are echoed to stderr only when `TEST_LOG` is set.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use callback_receiver::app::{AppError, Application};
use callback_receiver::config::Config;
use callback_receiver::state::AppState;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConfig;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The policy with Basic credentials whose password has colons and a non-ASCII character.
pub const POLICY: &str = "hello-world";
/// Its HTTP User ID.
pub const USER: &str = "intacct-cb";
/// Its HTTP Password.
pub const PASSWORD: &str = "s3cret:with:colons-é";
/// A second policy with other credentials.
pub const SECOND_POLICY: &str = "second";
/// Its HTTP User ID.
pub const SECOND_USER: &str = "second-user";
/// Its HTTP Password.
pub const SECOND_PASSWORD: &str = "second-pass-Zq81";
/// A policy without credentials.
pub const OPEN_POLICY: &str = "open";
/// A policy configured with `password_hash`.
pub const HASHED_POLICY: &str = "hashed";
/// Its HTTP User ID.
pub const HASHED_USER: &str = "hashed-user";
/// The password whose argon2id hash is configured.
pub const HASHED_PASSWORD: &str = "hashed-pass-Kx42";
/// The token of poller `all` (every policy).
pub const TOKEN_ALL: &str = "all-poller-token-3f9a0c1d2e";
/// The token of poller `scoped` (policy `second` only).
pub const TOKEN_SCOPED: &str = "scoped-poller-token-77b1e0a9";
/// The token whose argon2id hash is configured for poller `hashed`.
pub const TOKEN_HASHED: &str = "hashed-poller-token-c0ffee42";

/// Every secret of the test configuration, for the log checks.
pub const SECRETS: &[&str] = &[
    PASSWORD,
    SECOND_PASSWORD,
    HASHED_PASSWORD,
    TOKEN_ALL,
    TOKEN_SCOPED,
    TOKEN_HASHED,
];

/// Time any single network step of a test may take before the test fails instead of hanging.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Characters left as they are in a path segment: the RFC 3986 unreserved set.
pub const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes `segment` for use as one path segment.
pub fn encode_segment(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, PATH_SEGMENT).to_string()
}

/// The value of an `Authorization: Basic` header.
pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A header map from name/value pairs.
pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    map
}

/// Escapes text for an XML element.
pub fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A small, well-formed gateway response whose control-level controlid is `controlid`
/// (escaped here), with `marker` in a function result so that bodies can differ.
pub fn response_doc(controlid: &str, marker: &str) -> Bytes {
    Bytes::from(format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response>\n  <control>\n    \
         <status>success</status>\n    <senderid>test_sender</senderid>\n    \
         <controlid>{}</controlid>\n    <uniqueid>false</uniqueid>\n    \
         <dtdversion>3.0</dtdversion>\n  </control>\n  <operation>\n    <authentication>\n      \
         <status>success</status>\n      <userid>u</userid>\n      <companyid>c</companyid>\n    \
         </authentication>\n    <result>\n      <status>success</status>\n      \
         <function>readByQuery</function>\n      <controlid>{}</controlid>\n    </result>\n  \
         </operation>\n</response>\n",
        xml_escape(controlid),
        xml_escape(marker)
    ))
}

/// The directory of the gateway fixtures.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// One fixture's bytes.
pub fn fixture(name: &str) -> Bytes {
    let path = fixtures_dir().join(name);
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// Every `*.xml` fixture, by file name, sorted.
pub fn all_fixtures() -> Vec<(String, Bytes)> {
    let mut out: Vec<(String, Bytes)> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            let bytes = Bytes::from(std::fs::read(&p).expect("fixture"));
            (name, bytes)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 8,
        "expected the gateway fixtures, found {}",
        out.len()
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Logs.

/// A `MakeWriter` that appends to the shared buffer (and echoes to stderr with `TEST_LOG`).
#[derive(Clone)]
struct CaptureWriter {
    buf: Arc<Mutex<Vec<u8>>>,
    echo: bool,
}

impl std::io::Write for CaptureWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self.buf.lock() {
            Ok(mut b) => b.extend_from_slice(data),
            Err(poisoned) => poisoned.into_inner().extend_from_slice(data),
        }
        if self.echo {
            let _ = std::io::stderr().write_all(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CaptureWriter {
    type Writer = CaptureWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

/// Installs, once for the whole binary, the subscriber that captures every log line, and the
/// rustls crypto provider.
pub fn init() {
    LOGS.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = CaptureWriter {
            buf: buf.clone(),
            echo: std::env::var_os("TEST_LOG").is_some(),
        };
        let filter = tracing_subscriber::EnvFilter::new(
            "debug,hyper=info,h2=info,rustls=info,sled=info,tokio=info,tokio_util=info",
        );
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .with_ansi(false)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    });
}

/// Everything logged so far by every test of this binary.
pub fn logs() -> String {
    init();
    let buf = LOGS.get().expect("initialised");
    let bytes = match buf.lock() {
        Ok(b) => b.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    String::from_utf8_lossy(&bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The application under test.

/// Argon2id hashes of [`HASHED_PASSWORD`] and [`TOKEN_HASHED`], computed once.
fn hashes() -> &'static (String, String) {
    static HASHES: OnceLock<(String, String)> = OnceLock::new();
    HASHES.get_or_init(|| {
        (
            callback_receiver::auth::hash_secret(HASHED_PASSWORD).expect("hash password"),
            callback_receiver::auth::hash_secret(TOKEN_HASHED).expect("hash token"),
        )
    })
}

/// The test configuration file; `top` is inserted among the top-level keys. Paths are relative
/// to the directory the file is read from: `data/` and `certs/{cert,key}.pem`.
pub fn config_toml(top: &str) -> String {
    let (password_hash, token_hash) = hashes();
    format!(
        r#"listen = "127.0.0.1:0"
data_dir = "data"
shutdown_grace_seconds = 15
{top}
[tls]
cert = "certs/cert.pem"
key = "certs/key.pem"

[[policy]]
id = "{POLICY}"
user = "{USER}"
password = "{PASSWORD}"

[[policy]]
id = "{OPEN_POLICY}"

[[policy]]
id = "{SECOND_POLICY}"
user = "{SECOND_USER}"
password = "{SECOND_PASSWORD}"

[[policy]]
id = "{HASHED_POLICY}"
user = "{HASHED_USER}"
password_hash = "{password_hash}"

[[poller]]
name = "all"
token = "{TOKEN_ALL}"

[[poller]]
name = "scoped"
token = "{TOKEN_SCOPED}"
policies = ["{SECOND_POLICY}"]

[[poller]]
name = "hashed"
token_hash = "{token_hash}"
"#
    )
}

/// Creates the dev CA and server certificate under `dir/certs`; returns the CA file.
pub fn make_certs(dir: &Path) -> PathBuf {
    let (paths, created) =
        callback_receiver::tls::ensure_dev_cert(&dir.join("certs")).expect("dev certificate");
    assert!(created || paths.ca.exists());
    paths.ca
}

/// A running service and a client that trusts its CA.
pub struct TestApp {
    /// The listener's address.
    pub addr: SocketAddr,
    /// `https://localhost:PORT`.
    pub base_url: String,
    /// The CA certificate that signed the server's certificate.
    pub ca_pem_path: PathBuf,
    /// The temporary directory holding `certs/` and `data/`.
    pub dir: Arc<tempfile::TempDir>,
    /// The configuration the service was built with.
    pub config: Config,
    /// The service's shared state (store, verifier), for white-box checks.
    pub state: Arc<AppState>,
    /// A client for this service.
    pub client: Client,
    /// Completes `run_until`'s shutdown future.
    shutdown: Option<oneshot::Sender<()>>,
    /// The task running `run_until`.
    join: Option<JoinHandle<Result<(), AppError>>>,
}

/// A service that was shut down; its directory (and data) is kept for a restart.
pub struct StoppedApp {
    /// The directory holding `certs/` and `data/`.
    pub dir: Arc<tempfile::TempDir>,
    /// The configuration to restart with.
    pub config: Config,
    /// The CA file.
    pub ca_pem_path: PathBuf,
}

impl std::ops::Deref for TestApp {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// Starts the service with the test configuration.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the service with the test configuration changed by `tweak`.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    init();
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let ca = make_certs(dir.path());
    let text = config_toml("");
    let mut config =
        Config::from_toml(&text, "test.toml", dir.path()).expect("the test configuration is valid");
    tweak(&mut config);
    start(dir, config, ca).await
}

/// Starts the service with the test configuration changed by `tweak`, reading the wall clock
/// (`received_at`, expectation times, the retention cutoff) from `clock` instead of the system.
pub async fn spawn_app_with_clock(
    tweak: impl FnOnce(&mut Config),
    clock: callback_receiver::state::Clock,
) -> TestApp {
    init();
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let ca = make_certs(dir.path());
    let text = config_toml("");
    let mut config =
        Config::from_toml(&text, "test.toml", dir.path()).expect("the test configuration is valid");
    tweak(&mut config);
    start_with_clock(dir, config, ca, clock).await
}

async fn start(dir: Arc<tempfile::TempDir>, config: Config, ca: PathBuf) -> TestApp {
    start_with_clock(dir, config, ca, callback_receiver::state::system_clock()).await
}

async fn start_with_clock(
    dir: Arc<tempfile::TempDir>,
    config: Config,
    ca: PathBuf,
    clock: callback_receiver::state::Clock,
) -> TestApp {
    // After an i/o error the store closes its broken database on a thread of its own; until
    // that thread is done, sled's lock keeps a restart in the same process out for a moment.
    let mut attempts = 0;
    let app = loop {
        match Application::build_with_clock(config.clone(), clock.clone()).await {
            Ok(app) => break app,
            Err(e) if attempts < 50 && format!("{e:#}").contains("acquire lock") => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("Application::build: {e:#}"),
        }
    };
    let addr = app.local_addr();
    let state = app.state();
    let (tx, rx) = oneshot::channel::<()>();
    let join = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    let client = Client::new(addr, &ca);
    TestApp {
        addr,
        base_url: format!("https://localhost:{}", addr.port()),
        ca_pem_path: ca,
        dir,
        config,
        state,
        client,
        shutdown: Some(tx),
        join: Some(join),
    }
}

impl TestApp {
    /// Completes the shutdown future given to `run_until` (the equivalent of SIGTERM).
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Whether `run_until` is still running.
    pub fn is_running(&self) -> bool {
        self.join.as_ref().is_some_and(|j| !j.is_finished())
    }

    /// Waits for `run_until` to return, after [`TestApp::trigger_shutdown`]; gives the result
    /// and what is needed to restart on the same data.
    pub async fn wait_stopped(mut self) -> (Result<(), AppError>, StoppedApp) {
        self.trigger_shutdown();
        let join = self.join.take().expect("running");
        let TestApp {
            dir,
            config,
            state,
            ca_pem_path,
            ..
        } = self;
        // Release this handle on the store, so that the restarted service can open it.
        drop(state);
        let result = tokio::time::timeout(Duration::from_secs(60), join)
            .await
            .expect("run_until did not return within 60 s of the shutdown signal")
            .expect("the server task panicked");
        (
            result,
            StoppedApp {
                dir,
                config,
                ca_pem_path,
            },
        )
    }

    /// Shuts down gracefully and asserts that `run_until` returned `Ok`.
    pub async fn stop(self) -> StoppedApp {
        let (result, stopped) = self.wait_stopped().await;
        if let Err(e) = result {
            panic!("run_until returned an error: {e}");
        }
        stopped
    }
}

impl StoppedApp {
    /// Starts a new `Application` on the same directory and configuration.
    pub async fn restart(self) -> TestApp {
        start(self.dir, self.config, self.ca_pem_path).await
    }
}

// ---------------------------------------------------------------------------------------------
// The client.

/// A client configuration trusting `ca`, offering `alpn`, limited to `versions` when given.
pub fn client_config(
    ca: &Path,
    alpn: &[&[u8]],
    versions: Option<&[&'static rustls::SupportedProtocolVersion]>,
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read the CA file") {
        roots.add(cert.expect("CA PEM")).expect("add the CA");
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()));
    let builder = match versions {
        Some(v) => builder.with_protocol_versions(v),
        None => builder.with_safe_default_protocol_versions(),
    }
    .expect("protocol versions");
    let mut config = builder.with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// An answer read through hyper.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON; fails the test with the body when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An HTTPS client for one service.
#[derive(Clone)]
pub struct Client {
    /// The service's address.
    pub addr: SocketAddr,
    /// TLS with ALPN `http/1.1`.
    pub tls_h1: Arc<ClientConfig>,
    /// TLS with ALPN `h2`.
    pub tls_h2: Arc<ClientConfig>,
}

impl Client {
    /// A client for the service at `addr` whose certificate `ca` signed.
    pub fn new(addr: SocketAddr, ca: &Path) -> Self {
        Self {
            addr,
            tls_h1: client_config(ca, &[b"http/1.1"], None),
            tls_h2: client_config(ca, &[b"h2"], None),
        }
    }

    /// Opens a TCP connection and completes a TLS handshake for `localhost` with `config`.
    pub async fn tls_connect(&self, config: Arc<ClientConfig>) -> TlsStream<TcpStream> {
        let connect = async {
            let tcp = TcpStream::connect(self.addr).await.expect("tcp connect");
            tcp.set_nodelay(true).expect("nodelay");
            let name = ServerName::try_from("localhost").expect("server name");
            TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .expect("tls handshake")
        };
        tokio::time::timeout(STEP_TIMEOUT, connect)
            .await
            .expect("tls connect timed out")
    }

    /// A new HTTP/1.1 connection.
    pub async fn h1(&self) -> H1Conn {
        let tls = self.tls_connect(self.tls_h1.clone()).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("http/1.1 handshake");
        tokio::spawn(conn);
        H1Conn {
            sender,
            host: format!("localhost:{}", self.addr.port()),
        }
    }

    /// A new HTTP/2 connection; panics unless ALPN negotiated `h2`.
    pub async fn h2(&self) -> H2Conn {
        let tls = self.tls_connect(self.tls_h2.clone()).await;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN did not select h2");
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("http/2 handshake");
        tokio::spawn(conn);
        H2Conn {
            sender,
            authority: format!("localhost:{}", self.addr.port()),
        }
    }

    /// A raw TLS stream (ALPN `http/1.1`) to write HTTP/1.1 bytes by hand.
    pub async fn raw(&self) -> RawConn {
        RawConn {
            stream: self.tls_connect(self.tls_h1.clone()).await,
            buf: Vec::new(),
        }
    }

    /// One request on a new HTTP/1.1 connection.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: impl Into<Bytes>,
    ) -> Answer {
        self.h1().await.request(method, path, headers, body).await
    }

    /// `POST /callback/{policy}` with optional Basic credentials and extra headers.
    pub async fn post_callback(
        &self,
        policy: &str,
        basic_auth: Option<(&str, &str)>,
        body: impl Into<Bytes>,
        mut headers: HeaderMap,
    ) -> Answer {
        if let Some((user, password)) = basic_auth {
            headers.insert(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(&basic(user, password)).expect("basic header"),
            );
        }
        let path = format!("/callback/{}", encode_segment(policy));
        self.request(Method::POST, &path, headers, body).await
    }

    /// `POST /callback/hello-world` with the right credentials and `application/xml`.
    pub async fn post_ok(&self, body: impl Into<Bytes>) -> Answer {
        self.post_callback(
            POLICY,
            Some((USER, PASSWORD)),
            body,
            headers(&[("content-type", "application/xml")]),
        )
        .await
    }

    /// `GET /v1/responses/{controlid}` (percent-encoded) with an optional bearer token.
    pub async fn get_response(
        &self,
        controlid: &str,
        token: Option<&str>,
        accept_json: bool,
    ) -> Answer {
        let mut h = HeaderMap::new();
        if let Some(token) = token {
            h.insert(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}")).expect("bearer header"),
            );
        }
        if accept_json {
            h.insert(
                http::header::ACCEPT,
                HeaderValue::from_static("application/json"),
            );
        }
        let path = format!("/v1/responses/{}", encode_segment(controlid));
        self.request(Method::GET, &path, h, Bytes::new()).await
    }
}

fn build_request(
    method: Method,
    uri: &str,
    host: Option<&str>,
    headers: HeaderMap,
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(body))
        .expect("request");
    if let Some(host) = host {
        req.headers_mut().insert(
            http::header::HOST,
            HeaderValue::from_str(host).expect("host"),
        );
    }
    for (name, value) in &headers {
        req.headers_mut().append(name.clone(), value.clone());
    }
    req
}

async fn collect(response: Result<http::Response<hyper::body::Incoming>, hyper::Error>) -> Answer {
    let response = response.expect("send request");
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .expect("read the response body")
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// An HTTP/1.1 connection (requests are sent one after the other).
pub struct H1Conn {
    /// hyper's sender.
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// The `Host` header.
    host: String,
}

impl H1Conn {
    /// Sends one request on this connection and reads the whole answer.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: impl Into<Bytes>,
    ) -> Answer {
        let req = build_request(method, path, Some(&self.host), headers, body.into());
        let exchange = async {
            self.sender.ready().await.expect("connection ready");
            collect(self.sender.send_request(req).await).await
        };
        tokio::time::timeout(STEP_TIMEOUT, exchange)
            .await
            .expect("request timed out")
    }
}

/// An HTTP/2 connection; clones share it and send concurrent streams.
#[derive(Clone)]
pub struct H2Conn {
    /// hyper's sender.
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    /// `localhost:PORT`.
    authority: String,
}

impl H2Conn {
    /// Sends one request as a new stream and reads the whole answer.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: impl Into<Bytes>,
    ) -> Answer {
        let uri = format!("https://{}{}", self.authority, path);
        let req = build_request(method, &uri, None, headers, body.into());
        let exchange = async {
            self.sender.ready().await.expect("connection ready");
            collect(self.sender.send_request(req).await).await
        };
        tokio::time::timeout(STEP_TIMEOUT, exchange)
            .await
            .expect("request timed out")
    }
}

/// An answer read from a raw stream.
#[derive(Debug)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// The header fields, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body (empty for `1xx`).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A TLS stream on which a test writes HTTP/1.1 bytes by hand and reads answers.
pub struct RawConn {
    /// The stream.
    stream: TlsStream<TcpStream>,
    /// Bytes read but not consumed yet.
    buf: Vec<u8>,
}

impl RawConn {
    /// Writes and flushes `bytes`.
    pub async fn write(&mut self, bytes: &[u8]) {
        let io = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(STEP_TIMEOUT, io)
            .await
            .expect("write timed out")
            .expect("write to the server");
    }

    /// Reads more bytes into the buffer; `false` at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let read = tokio::time::timeout(STEP_TIMEOUT, self.stream.read(&mut chunk))
            .await
            .expect("timed out waiting for the server");
        match read {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            // A peer closing without close_notify: treat as the end of the stream.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
            Err(e) => panic!("reading from the server failed: {e}"),
        }
    }

    /// Reads one answer (a `1xx` interim answer counts as one, without a body).
    pub async fn read_response(&mut self) -> RawResponse {
        let head_end = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            assert!(
                self.fill().await,
                "connection closed before a complete response head; got {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if (100..200).contains(&status) {
            return response;
        }
        if let Some(len) = response.header("content-length") {
            let len: usize = len.parse().expect("content-length");
            while self.buf.len() < len {
                assert!(self.fill().await, "connection closed inside the body");
            }
            response.body = self.buf.drain(..len).collect();
        } else if response
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            response.body = self.read_chunked().await;
        } else {
            while self.fill().await {}
            response.body = std::mem::take(&mut self.buf);
        }
        response
    }

    async fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                assert!(self.fill().await, "connection closed inside a chunk size");
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .expect("chunk size");
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                assert!(self.fill().await, "connection closed inside a chunk");
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
            if size == 0 {
                return body;
            }
        }
    }
}

/// The head of a raw `POST path` with `authorization`, `application/xml` and `extra` header lines.
pub fn raw_post_head(path: &str, authorization: &str, extra: &[&str]) -> String {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {authorization}\r\n\
         Content-Type: application/xml\r\n"
    );
    for line in extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head
}
