//! A small HTTPS client for the `wait` command, the integration tests and test tools.
//!
//! Each request opens its own connection: TCP connect, TLS handshake (rustls with this crate's
//! crypto provider, TLS 1.2 and 1.3, ALPN `http/1.1`), one HTTP/1.1 exchange through hyper's
//! connection-level client, and the whole answer read into memory. There is no pooling, no
//! redirect, no proxy and no plain HTTP: the callers are short-lived commands and tests that talk
//! to this service, which is HTTPS-only.
//!
//! Errors say whether trying again can help ([`ClientError::is_retryable`]): a refused or reset
//! connection can heal, a refused certificate or a bad URL cannot.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How long the TCP connect and the TLS handshake may take together, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the exchange (request sent, whole answer read) may take, by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest answer body read, by default (the service's callbacks are at most 64 MiB unless
/// configured otherwise).
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL, the request or the CA file is unusable; retrying will not help.
    #[error("{0}")]
    Usage(String),
    /// The TLS handshake failed on the certificate or the protocol (for example an untrusted
    /// issuer or a name mismatch); retrying will not help.
    #[error("tls: {0}")]
    Tls(String),
    /// No connection could be made (refused, unreachable, name not resolved, timed out).
    #[error("connecting to {authority}: {reason}")]
    Connect {
        /// `host:port`.
        authority: String,
        /// What went wrong.
        reason: String,
    },
    /// The connection broke or stalled during the handshake or the exchange.
    #[error("{0}")]
    Io(String),
    /// The answer is not valid HTTP or is too large.
    #[error("http: {0}")]
    Http(String),
}

impl ClientError {
    /// Whether the same request may succeed later: true for connection and I/O failures.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Connect { .. } | ClientError::Io(_))
    }
}

/// A base URL `https://host[:port][/prefix]`, validated.
///
/// The host is a DNS name, an IPv4 address or a bracketed IPv6 address; the port defaults to
/// 443; the prefix (without its trailing `/`) is put before every request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// The host name (ASCII lower-cased) or IP address, without brackets.
    host: String,
    /// The TCP port.
    port: u16,
    /// The path prefix: empty, or starting with `/` and not ending with one.
    prefix: String,
    /// The host as the name the server's certificate must match.
    server_name: ServerName<'static>,
}

impl BaseUrl {
    /// Parses `https://host[:port][/prefix]`. Plain `http://`, user information, a query and a
    /// fragment are refused with a message that says why.
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::Usage(format!("invalid URL: {why}"));
        if text.is_empty() {
            return Err(bad("it is empty; expected https://host[:port][/prefix]"));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it contains white space or control characters"));
        }
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(bad("no scheme; expected https://host[:port][/prefix]"));
        };
        if scheme.eq_ignore_ascii_case("http") {
            return Err(bad(
                "plain http is not supported, the service is HTTPS-only; use https://",
            ));
        }
        if !scheme.eq_ignore_ascii_case("https") {
            return Err(bad(&format!(
                "unsupported scheme {scheme:?}; expected https://"
            )));
        }
        if rest.contains(['?', '#']) {
            return Err(bad("a query or fragment is not allowed in the base URL"));
        }
        let (authority, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(bad("user information (user:password@) is not supported"));
        }
        let (host, port) = split_host_port(authority).map_err(|why| bad(&why))?;
        let host = host.to_ascii_lowercase();
        let Ok(server_name) = ServerName::try_from(host.clone()) else {
            return Err(bad(&format!("{host:?} is not a valid host name")));
        };
        let prefix = path.trim_end_matches('/');
        if !is_valid_path(prefix) {
            return Err(bad(
                "the path may hold only URL path characters (percent-encode the others)",
            ));
        }
        Ok(Self {
            host,
            port,
            prefix: prefix.to_string(),
            server_name,
        })
    }

    /// The host name or IP address (an IPv6 address without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path prefix: empty, or starting with `/` and not ending with one.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The `Host` header: the host (IPv6 in brackets), with `:port` unless it is 443.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The name the server's certificate must match (also sent as SNI for DNS names).
    pub fn server_name(&self) -> ServerName<'static> {
        self.server_name.clone()
    }

    /// The request target: the prefix followed by `path_and_query` (which starts with `/`).
    pub fn target(&self, path_and_query: &str) -> String {
        format!("{}{}", self.prefix, path_and_query)
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}{}", self.authority(), self.prefix)
    }
}

impl std::str::FromStr for BaseUrl {
    type Err = ClientError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// Splits `host[:port]` or `[v6][:port]`; the port defaults to 443.
fn split_host_port(authority: &str) -> Result<(&str, u16), String> {
    if authority.is_empty() {
        return Err("no host".into());
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((inside, after)) = bracketed.split_once(']') else {
            return Err("an IPv6 address lacks its closing ]".into());
        };
        if inside.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("[{inside}] is not an IPv6 address"));
        }
        match after {
            "" => (inside, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (inside, Some(port)),
                None => return Err("unexpected characters after the IPv6 address".into()),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return Err("an IPv6 address must be written in brackets, e.g. [::1]".into())
            }
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = match port {
        None => 443,
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port != 0 && text.bytes().all(|b| b.is_ascii_digit()) => port,
            _ => return Err(format!("invalid port {text:?}")),
        },
    };
    Ok((host, port))
}

/// Whether `path` holds only RFC 3986 path characters, with well-formed percent escapes.
fn is_valid_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)) {
            return false;
        }
        i += 1;
    }
    true
}

/// An answer: status, headers and the whole body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub status: StatusCode,
    /// The header fields.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

/// An HTTPS client: a TLS configuration and the limits of each request. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    /// The TLS connector (roots, protocol versions, ALPN `http/1.1`).
    tls: TlsConnector,
    /// The limit on TCP connect plus TLS handshake.
    connect_timeout: Duration,
    /// The limit on sending the request and reading the whole answer.
    request_timeout: Duration,
    /// The largest body read.
    max_body_bytes: usize,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client trusting the certificates of the PEM file `ca`, or the system's root
    /// certificates when `ca` is `None`.
    pub fn new(ca: Option<&Path>) -> Result<Self, ClientError> {
        let roots = match ca {
            Some(path) => roots_from_pem(path)?,
            None => system_roots()?,
        };
        let mut config = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Usage(format!("tls configuration: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self::from_config(Arc::new(config)))
    }

    /// A client with its own TLS configuration (its ALPN list must allow `http/1.1`).
    pub fn from_config(config: Arc<ClientConfig>) -> Self {
        Self {
            tls: TlsConnector::from(config),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// The same client with another limit on TCP connect plus TLS handshake.
    pub fn with_connect_timeout(mut self, limit: Duration) -> Self {
        self.connect_timeout = limit;
        self
    }

    /// The same client with another limit on the exchange (request sent, answer read).
    pub fn with_request_timeout(mut self, limit: Duration) -> Self {
        self.request_timeout = limit;
        self
    }

    /// The same client with another limit on the size of answer bodies.
    pub fn with_max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = limit;
        self
    }

    /// `GET {url}{path_and_query}` with `headers`.
    pub async fn get(
        &self,
        url: &BaseUrl,
        path_and_query: &str,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<Answer, ClientError> {
        self.request(Method::GET, url, path_and_query, headers, Bytes::new())
            .await
    }

    /// `POST {url}{path_and_query}` with `headers` and `body`.
    pub async fn post(
        &self,
        url: &BaseUrl,
        path_and_query: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: impl Into<Bytes>,
    ) -> Result<Answer, ClientError> {
        self.request(Method::POST, url, path_and_query, headers, body.into())
            .await
    }

    /// One request on a new connection; the answer is read whole.
    pub async fn request(
        &self,
        method: Method,
        url: &BaseUrl,
        path_and_query: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<Answer, ClientError> {
        let request = build_request(method, url, path_and_query, headers, body)?;
        let tls = self.connect(url).await?;
        let authority = url.authority();
        let limit = self.request_timeout;
        let exchange = async {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls))
                    .await
                    .map_err(|e| hyper_error(&authority, &e))?;
            let _driver = AbortOnDrop(tokio::spawn(async move {
                let _ = connection.await;
            }));
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| hyper_error(&authority, &e))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, self.max_body_bytes)
                .collect()
                .await
                .map_err(|e| body_error(&authority, self.max_body_bytes, e))?
                .to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(limit, exchange).await.map_err(|_| {
            ClientError::Io(format!(
                "no complete answer from {authority} within {}",
                seconds(limit)
            ))
        })?
    }

    /// Opens a TCP connection and completes the TLS handshake, within the connect timeout.
    async fn connect(
        &self,
        url: &BaseUrl,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
        let authority = url.authority();
        let attempt = async {
            let tcp = TcpStream::connect((url.host(), url.port()))
                .await
                .map_err(|e| ClientError::Connect {
                    authority: authority.clone(),
                    reason: io_reason(&e),
                })?;
            let _ = tcp.set_nodelay(true);
            self.tls
                .connect(url.server_name(), tcp)
                .await
                .map_err(|e| handshake_error(&authority, e))
        };
        tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| ClientError::Connect {
                authority: authority.clone(),
                reason: format!(
                    "no connection and TLS handshake within {}",
                    seconds(self.connect_timeout)
                ),
            })?
    }
}

/// Aborts a spawned task when dropped, so that no connection outlives its request.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn build_request(
    method: Method,
    url: &BaseUrl,
    path_and_query: &str,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Result<Request<Full<Bytes>>, ClientError> {
    if !path_and_query.starts_with('/') {
        return Err(ClientError::Usage(format!(
            "request path {path_and_query:?} does not start with /"
        )));
    }
    let target = url.target(path_and_query);
    let uri = http::uri::PathAndQuery::try_from(target.as_str())
        .map_err(|e| ClientError::Usage(format!("request path {target:?}: {e}")))?;
    let mut request = Request::builder()
        .method(method)
        .uri(http::Uri::from(uri))
        .body(Full::new(body))
        .map_err(|e| ClientError::Usage(format!("request: {e}")))?;
    let fields = request.headers_mut();
    for (name, value) in headers {
        fields.append(name.clone(), value.clone());
    }
    if !fields.contains_key(HOST) {
        let host = HeaderValue::from_str(&url.authority())
            .map_err(|e| ClientError::Usage(format!("host header: {e}")))?;
        fields.insert(HOST, host);
    }
    Ok(request)
}

/// The certificates of a PEM file, as the only trusted roots.
fn roots_from_pem(path: &Path) -> Result<RootCertStore, ClientError> {
    let bad = |why: String| ClientError::Usage(format!("CA file {}: {why}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(pem_reason(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(pem_reason(&e)))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate found".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| bad(format!("unusable certificate: {e}")))?;
    }
    Ok(roots)
}

/// The platform's root certificates (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set).
fn system_roots() -> Result<RootCertStore, ClientError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_string(), ToString::to_string);
        return Err(ClientError::Usage(format!(
            "no system root certificate could be loaded ({why}); name a CA file instead"
        )));
    }
    Ok(roots)
}

fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => io_reason(io),
        Error::NoItemsFound => "no PEM certificate found".into(),
        other => format!("invalid PEM: {other:?}").to_lowercase(),
    }
}

/// An I/O error as a lower-case phrase.
fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => format!("{:?}", e.kind()).to_lowercase(),
    }
}

/// A TLS handshake failure: rustls errors (certificate, protocol) cannot heal, I/O ones can.
fn handshake_error(authority: &str, e: std::io::Error) -> ClientError {
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(why)) => {
            ClientError::Tls(format!("the certificate of {authority} was refused: {why}"))
        }
        Some(other) => ClientError::Tls(format!("handshake with {authority} failed: {other}")),
        None => ClientError::Io(format!("tls handshake with {authority}: {}", io_reason(&e))),
    }
}

/// A hyper failure: a broken or closed connection may heal, a malformed answer not.
fn hyper_error(authority: &str, e: &hyper::Error) -> ClientError {
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    if io || e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        let detail =
            std::error::Error::source(e).map_or_else(|| e.to_string(), |s| format!("{e}: {s}"));
        ClientError::Io(format!("exchange with {authority}: {detail}"))
    } else {
        ClientError::Http(format!("invalid answer from {authority}: {e}"))
    }
}

fn body_error(
    authority: &str,
    limit: usize,
    e: Box<dyn std::error::Error + Send + Sync>,
) -> ClientError {
    if e.is::<http_body_util::LengthLimitError>() {
        return ClientError::Http(format!(
            "the answer from {authority} is larger than {limit} bytes"
        ));
    }
    match e.downcast::<hyper::Error>() {
        Ok(hyper) => hyper_error(authority, &hyper),
        Err(other) => ClientError::Io(format!("reading the answer from {authority}: {other}")),
    }
}

fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> BaseUrl {
        BaseUrl::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn refuse(text: &str, needle: &str) {
        match BaseUrl::parse(text) {
            Ok(url) => panic!("{text:?} was accepted as {url:?}"),
            Err(ClientError::Usage(message)) => {
                assert!(message.contains(needle), "{text:?}: {message:?}")
            }
            Err(other) => panic!("{text:?}: not a usage error: {other:?}"),
        }
    }

    #[test]
    fn host_only_defaults_to_port_443_and_no_prefix() {
        let url = parse("https://receiver.example.com");
        assert_eq!(url.host(), "receiver.example.com");
        assert_eq!(url.port(), 443);
        assert_eq!(url.prefix(), "");
        assert_eq!(url.authority(), "receiver.example.com");
        assert_eq!(url.to_string(), "https://receiver.example.com");
        assert_eq!(url.target("/v1/x?wait=5"), "/v1/x?wait=5");
    }

    #[test]
    fn port_and_prefix_are_kept_and_trailing_slashes_dropped() {
        let url = parse("HTTPS://Receiver.Example.com:8443/cb/prod//");
        assert_eq!(url.host(), "receiver.example.com");
        assert_eq!(url.port(), 8443);
        assert_eq!(url.prefix(), "/cb/prod");
        assert_eq!(url.authority(), "receiver.example.com:8443");
        assert_eq!(url.target("/v1/responses/a"), "/cb/prod/v1/responses/a");
        assert_eq!(url.to_string(), "https://receiver.example.com:8443/cb/prod");
        assert_eq!(parse("https://h/").prefix(), "");
        assert_eq!(parse("https://h:443/").authority(), "h");
        assert_eq!(parse("https://h/a%2Fb").prefix(), "/a%2Fb");
    }

    #[test]
    fn ip_addresses_work_as_hosts_and_server_names() {
        let v4 = parse("https://127.0.0.1:8443");
        assert_eq!(v4.host(), "127.0.0.1");
        assert!(matches!(v4.server_name(), ServerName::IpAddress(_)));
        let v6 = parse("https://[::1]:8443/p");
        assert_eq!(v6.host(), "::1");
        assert_eq!(v6.authority(), "[::1]:8443");
        assert_eq!(v6.prefix(), "/p");
        assert!(matches!(v6.server_name(), ServerName::IpAddress(_)));
        assert_eq!(parse("https://[::1]").authority(), "[::1]");
        let dns = parse("https://localhost:1");
        assert!(matches!(dns.server_name(), ServerName::DnsName(_)));
    }

    #[test]
    fn plain_http_is_refused_with_a_clear_reason() {
        refuse("http://localhost:8443", "HTTPS-only");
        refuse("HTTP://localhost", "HTTPS-only");
    }

    #[test]
    fn malformed_urls_are_refused_with_a_reason() {
        refuse("", "empty");
        refuse("localhost:8443", "no scheme");
        refuse("ftp://host", "unsupported scheme");
        refuse("https://", "no host");
        refuse("https:///path", "no host");
        refuse("https://:8443", "no host");
        refuse("https://host:", "invalid port");
        refuse("https://host:0", "invalid port");
        refuse("https://host:65536", "invalid port");
        refuse("https://host:+80", "invalid port");
        refuse("https://host:80x", "invalid port");
        refuse("https://::1:8443", "brackets");
        refuse("https://[::1", "closing ]");
        refuse("https://[nope]:1", "not an IPv6 address");
        refuse("https://[::1]x", "after the IPv6 address");
        refuse("https://user:pw@host", "user information");
        refuse("https://host/p?x=1", "query or fragment");
        refuse("https://host#frag", "query or fragment");
        refuse("https://ho st", "white space");
        refuse("https://host/a b", "white space");
        refuse("https://bad_host!", "not a valid host name");
        refuse("https://host/a%zz", "path");
        refuse("https://host/a\"b", "path");
        refuse("https://host/é", "path");
    }

    #[test]
    fn errors_say_whether_a_retry_can_help() {
        let connect = ClientError::Connect {
            authority: "h:1".into(),
            reason: "connection refused".into(),
        };
        assert!(connect.is_retryable());
        assert!(ClientError::Io("reset".into()).is_retryable());
        assert!(!ClientError::Tls("unknown issuer".into()).is_retryable());
        assert!(!ClientError::Usage("bad url".into()).is_retryable());
        assert!(!ClientError::Http("bad answer".into()).is_retryable());
        assert_eq!(connect.to_string(), "connecting to h:1: connection refused");
    }

    #[test]
    fn request_paths_must_be_absolute_and_valid() {
        let url = parse("https://h/pre");
        let request = build_request(Method::GET, &url, "/v1/x?wait=1", &[], Bytes::new())
            .expect("valid request");
        assert_eq!(request.uri().to_string(), "/pre/v1/x?wait=1");
        assert_eq!(request.headers()[HOST], "h");
        assert!(matches!(
            build_request(Method::GET, &url, "v1/x", &[], Bytes::new()),
            Err(ClientError::Usage(_))
        ));
        assert!(matches!(
            build_request(Method::GET, &url, "/a b", &[], Bytes::new()),
            Err(ClientError::Usage(_))
        ));
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_a_usage_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            Client::new(Some(&missing)),
            Err(ClientError::Usage(m)) if m.contains("missing.pem")
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem\n").expect("write");
        assert!(matches!(
            Client::new(Some(&empty)),
            Err(ClientError::Usage(m)) if m.contains("no PEM certificate")
        ));
    }
}
