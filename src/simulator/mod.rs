//! A local simulator of the Sage Intacct XML gateway, so that the whole asynchronous flow can be
//! tried on one machine: an integrator posts a request to `POST /ia/xml/xmlgw.phtml`, gets the
//! synchronous response or, for a request naming a transport policy, the acknowledgement; the
//! simulator then posts the full response to the policy's Response URL (callback-receiver), from
//! where the integrator fetches it.
//!
//! - [`config`]: the simulator's own TOML file ([`SimConfig`]);
//! - [`gateway`]: request parsing, the gateway's checks and the response documents (no I/O);
//! - [`delivery`]: the queue per policy, serialization, retries with back-off.
//!
//! [`Simulator`] mirrors [`crate::app::Application`]: `build` loads the certificate and binds,
//! `local_addr` gives the real port, `run_until(shutdown)` serves until the future completes.

pub mod config;
pub mod delivery;
pub mod gateway;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

pub use config::SimConfig;
use delivery::{DeliveryError, DeliveryStats, Dispatcher, Job};
use gateway::{Gateway, Outcome};

use crate::tls::{self, ReloadableCert, TlsError};

/// The gateway's endpoint path.
pub const ENDPOINT_PATH: &str = "/ia/xml/xmlgw.phtml";

/// Largest request body read; larger ones get `413` (the gateway's own limit for asynchronous
/// requests, 500K characters, is checked on the document).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;

/// Time allowed for the TLS handshake and for the request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed to read a whole request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Time in-flight requests get at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The delivery client cannot be built.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The listener cannot be bound.
    #[error("listen {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// What every request handler shares.
struct Shared {
    /// The simulated gateway.
    gateway: Gateway,
    /// The delivery queues.
    dispatcher: Dispatcher,
    /// The pause before a delivery.
    delay: Duration,
    /// The listener's address, for the endpoint URL when a request has no `Host`.
    local_addr: SocketAddr,
}

/// A built simulator, bound and ready to run.
pub struct Simulator {
    /// The bound listener.
    listener: TcpListener,
    /// Its address (with the real port when `listen` asked for port 0).
    local_addr: SocketAddr,
    /// The TLS acceptor.
    acceptor: TlsAcceptor,
    /// What handlers share.
    shared: Arc<Shared>,
    /// Set to `true` at the end of `run_until`: the delivery tasks stop.
    stop: watch::Sender<bool>,
}

impl Simulator {
    /// Loads the certificate, builds the delivery client, binds `config.listen` and starts the
    /// delivery workers.
    pub async fn build(config: SimConfig) -> Result<Self, SimError> {
        let key = tls::load_certified_key(&config.tls.cert, &config.tls.key)?;
        let acceptor = TlsAcceptor::from(tls::server_config(Arc::new(ReloadableCert::new(key)))?);
        let client = delivery::client(config.ca_file.as_deref())?;
        let bind_err = |e: std::io::Error| SimError::Bind {
            addr: config.listen,
            reason: e.to_string().to_lowercase(),
        };
        let listener = TcpListener::bind(config.listen).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        for policy in &config.policies {
            if let Some((_, password)) = &policy.credentials {
                if password.expose().contains("PASTE-") {
                    tracing::warn!(
                        policy = %policy.id,
                        "the policy's password is still the placeholder of the example file; \
                         its deliveries will be refused with 401"
                    );
                }
            }
        }
        let (stop, stopped) = watch::channel(false);
        let dispatcher = Dispatcher::start(client, &config.policies, config.max_attempts, stopped);
        let shared = Arc::new(Shared {
            gateway: Gateway::new(&config),
            dispatcher,
            delay: config.delay,
            local_addr,
        });
        Ok(Self {
            listener,
            local_addr,
            acceptor,
            shared,
            stop,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The endpoint URL for clients on this machine: `https://localhost:PORT/ia/xml/xmlgw.phtml`
    /// (the host is the listen address unless it is a loopback or unspecified one).
    pub fn endpoint_url(&self) -> String {
        let ip = self.local_addr.ip();
        let host = if ip.is_loopback() || ip.is_unspecified() {
            "localhost".to_string()
        } else {
            match ip {
                std::net::IpAddr::V4(v4) => v4.to_string(),
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            }
        };
        format!("https://{host}:{}{ENDPOINT_PATH}", self.local_addr.port())
    }

    /// The delivery counters.
    pub fn stats(&self) -> Arc<DeliveryStats> {
        self.shared.dispatcher.stats()
    }

    /// Serves until `shutdown` completes, gives in-flight requests a grace period, then stops
    /// the deliveries (responses still queued are dropped, and the log says how many).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HANDSHAKE_TIMEOUT)
            .keep_alive(true);
        builder.http2().timer(TokioTimer::new());
        let builder = Arc::new(builder);
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(10);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => {
                        backoff = Duration::from_millis(10);
                        conn
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; backing off {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            let acceptor = self.acceptor.clone();
            let shared = self.shared.clone();
            let builder = builder.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let _permit = permit;
                serve_connection(tcp, peer, acceptor, shared, builder, watcher).await;
            });
        }
        drop(self.listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("grace period over; closing remaining connections"),
        }
        let pending = self.shared.dispatcher.stats().snapshot().pending();
        if pending > 0 {
            tracing::warn!(
                pending,
                "stopping with responses not yet delivered; they are dropped"
            );
        }
        let _ = self.stop.send(true);
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "tls handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "tls handshake timed out");
            return;
        }
    };
    let service = service_fn(move |req| handle(shared.clone(), req));
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn xml(body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/xml; charset=UTF-8"),
    );
    response
}

/// One request to the simulated gateway.
async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != ENDPOINT_PATH {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "not found: the gateway endpoint is POST /ia/xml/xmlgw.phtml",
        ));
    }
    if req.method() != Method::POST {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use POST",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return Ok(response);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Ok(too_large());
    }
    let form_encoded = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_else(|| shared.local_addr.to_string());
    let endpoint = format!("https://{host}{ENDPOINT_PATH}");
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Ok(too_large()),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "request body broke off");
            return Ok(text(StatusCode::BAD_REQUEST, "the request body broke off"));
        }
        Err(_) => {
            return Ok(text(
                StatusCode::REQUEST_TIMEOUT,
                "the request body was not received in time",
            ))
        }
    };
    let now = time::OffsetDateTime::now_utc();
    match shared.gateway.handle(&body, form_encoded, &endpoint, now) {
        Outcome::Answer {
            body,
            kind,
            controlid,
        } => {
            tracing::info!(%controlid, outcome = kind, "request answered synchronously");
            Ok(xml(body))
        }
        Outcome::Queued { ack, response } => {
            let due = tokio::time::Instant::now() + shared.delay + response.extra_delay;
            let job = Job {
                controlid: response.controlid.clone(),
                body: Bytes::from(response.body),
                due,
                duplicate: response.duplicate,
            };
            if shared.dispatcher.dispatch(&response.policy, job) {
                tracing::info!(
                    controlid = %response.controlid,
                    policy = %response.policy,
                    delay_ms = (shared.delay + response.extra_delay).as_millis() as u64,
                    "request acknowledged; response queued"
                );
            } else {
                tracing::error!(
                    controlid = %response.controlid,
                    policy = %response.policy,
                    "request acknowledged but its policy's delivery worker has stopped"
                );
            }
            Ok(xml(ack))
        }
    }
}

fn too_large() -> Response<Full<Bytes>> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request body larger than {MAX_BODY_BYTES} bytes"),
    )
}

/// A sample request for the banner and the README: `readByQuery` of vendors, sent through
/// `policy` when given (asynchronous) or answered at once.
pub fn sample_request(
    sender: (&str, &str),
    login: (&str, &str, &str),
    policy: Option<&str>,
    controlid: &str,
) -> String {
    use quick_xml::escape::escape;
    let policy = policy
        .map(|p| format!("\n    <policyid>{}</policyid>", escape(p)))
        .unwrap_or_default();
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<request>
  <control>
    <senderid>{}</senderid>
    <password>{}</password>
    <controlid>{}</controlid>
    <uniqueid>false</uniqueid>
    <dtdversion>3.0</dtdversion>{policy}
    <includewhitespace>true</includewhitespace>
  </control>
  <operation>
    <authentication>
      <login>
        <userid>{}</userid>
        <companyid>{}</companyid>
        <password>{}</password>
      </login>
    </authentication>
    <content>
      <function controlid="read-vendors">
        <readByQuery>
          <object>VENDOR</object>
          <fields>*</fields>
          <query></query>
          <pagesize>100</pagesize>
        </readByQuery>
      </function>
    </content>
  </operation>
</request>"#,
        escape(sender.0),
        escape(sender.1),
        escape(controlid),
        escape(login.1),
        escape(login.0),
        escape(login.2),
    )
}

/// The start-up banner of `simulate-gateway`: the endpoint, what the configuration accepts, and
/// a ready-to-paste `curl` command. It shows the simulator's sender and user passwords (test
/// credentials of this file), never a policy's HTTP Password.
pub fn banner(config: &SimConfig, endpoint: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nSage Intacct XML gateway simulator (for local tests only)\n"
    );
    let _ = writeln!(out, "  Endpoint URL   {endpoint}");
    let _ = writeln!(
        out,
        "  Senders        {}",
        config
            .senders
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for login in &config.logins {
        let _ = writeln!(
            out,
            "  Login          company {}, user {}",
            login.company, login.user
        );
    }
    for policy in &config.policies {
        let _ = writeln!(
            out,
            "  Policy         {} -> {}{}",
            policy.id,
            policy.response_url,
            if policy.serialize {
                " (serialized)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        out,
        "  Delivery       after {} ms, up to {} attempts",
        config.delay.as_millis(),
        config.max_attempts
    );
    if !config.faults.is_empty() {
        let _ = writeln!(out, "  Fault rules    {}", config.faults.len());
    }
    if let (Some(sender), Some(login)) = (config.senders.first(), config.logins.first()) {
        let policy = config.policies.first().map(|p| p.id.as_str());
        let request = sample_request(
            (&sender.id, sender.password.expose()),
            (&login.company, &login.user, login.password.expose()),
            policy,
            "hello-sim-1",
        );
        let cacert = config
            .ca_file
            .as_ref()
            .map(|ca| format!("--cacert {} ", ca.display()))
            .unwrap_or_default();
        let what = if policy.is_some() {
            "an asynchronous request (answered with an acknowledgement; the response is posted to the policy's Response URL)"
        } else {
            "a request"
        };
        let _ = writeln!(
            out,
            "\nSend {what}:\n\n  curl {cacert}-H 'Content-Type: application/xml' --data-binary @- {endpoint} <<'EOF'\n{request}\nEOF"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_banner_has_a_request_that_the_gateway_accepts() {
        let config = SimConfig::from_toml(
            "ca_file = \"ca.pem\"\n[tls]\ncert = \"c\"\nkey = \"k\"\n[[sender]]\nid = \"s<1>\"\npassword = \"sp\"\n\
             [[login]]\ncompany = \"C\"\nuser = \"u\"\npassword = \"up\"\n\
             [[policy]]\nid = \"dev\"\nresponse_url = \"https://localhost:8443/callback/dev\"\nuser = \"dev\"\npassword = \"policy-secret\"\n",
            "t",
            std::path::Path::new("/x"),
        )
        .expect("config");
        let text = banner(&config, "https://localhost:9443/ia/xml/xmlgw.phtml");
        assert!(text.contains("--cacert /x/ca.pem"), "{text}");
        assert!(
            text.contains("dev -> https://localhost:8443/callback/dev"),
            "{text}"
        );
        assert!(!text.contains("policy-secret"), "{text}");
        let start = text.find("<?xml").expect("request");
        let end = text.find("</request>").expect("end") + "</request>".len();
        let gateway = Gateway::new(&config);
        let outcome = gateway.handle(
            &text.as_bytes()[start..end],
            false,
            "e",
            time::OffsetDateTime::UNIX_EPOCH,
        );
        assert!(matches!(outcome, Outcome::Queued { .. }), "{outcome:?}");
    }
}
