//! Delivery of asynchronous responses to the policies' Response URLs.
//!
//! Each accepted request becomes a [`Job`] due after the configured delay (plus any injected
//! extra delay). A policy with `serialize = true` has one worker task that takes its jobs in the
//! order they were accepted and delivers them one at a time; any other policy gets a task per
//! job, so a delayed response can be overtaken. A delivery is a `POST` of the document with the
//! policy's Basic credentials and `Content-Type: application/xml`; a refused connection, a TLS
//! or I/O error and any non-2xx answer are retried with exponential back-off (100 ms doubling up
//! to 30 s) until `max_attempts`, then given up with an error log. Queued jobs live in memory
//! only: they are lost when the simulator stops.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::config::{ResponseUrl, SimPolicy};
use crate::client::Client;

/// The first pause after a failed attempt.
pub const BACKOFF_START: Duration = Duration::from_millis(100);

/// The longest pause between two attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why the delivery client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The CA file is unusable.
    #[error("ca_file {path}: {reason}")]
    CaFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// There is no certificate to trust at all.
    #[error("no trusted certificate: the system has none and ca_file is not set")]
    NoRoots,
    /// rustls refused the configuration.
    #[error("tls client configuration: {0}")]
    Config(String),
}

/// Counters of what the deliveries did, for tests and the shutdown log.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Responses accepted for delivery (each counted once, duplicates not included).
    queued: AtomicU64,
    /// Posts answered with a 2xx (duplicates included).
    delivered: AtomicU64,
    /// Attempts that failed (each retry counts).
    failed_attempts: AtomicU64,
    /// Posts given up after `max_attempts`.
    given_up: AtomicU64,
    /// Responses whose posts (duplicates included) all ended, delivered or given up.
    completed: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Responses accepted for delivery.
    pub queued: u64,
    /// Posts answered with a 2xx (duplicates included).
    pub delivered: u64,
    /// Attempts that failed.
    pub failed_attempts: u64,
    /// Posts given up.
    pub given_up: u64,
    /// Responses whose posts all ended.
    pub completed: u64,
}

impl StatsSnapshot {
    /// Responses queued and not yet completed.
    pub fn pending(&self) -> u64 {
        self.queued.saturating_sub(self.completed)
    }
}

impl DeliveryStats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            queued: self.queued.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            failed_attempts: self.failed_attempts.load(Ordering::Relaxed),
            given_up: self.given_up.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
        }
    }
}

/// One response to deliver.
#[derive(Debug)]
pub struct Job {
    /// The control-level controlid, for logs.
    pub controlid: String,
    /// The document.
    pub body: Bytes,
    /// When the first post may go out.
    pub due: Instant,
    /// Extra posts of the same document after the first successful one.
    pub duplicate: u32,
}

/// Where and how one policy's responses are posted.
#[derive(Debug)]
struct Target {
    /// The Policy ID.
    policy: String,
    /// The Response URL.
    url: ResponseUrl,
    /// The request headers: `Authorization` (when the policy has credentials),
    /// `Content-Type` and `User-Agent`.
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// How jobs of one policy are run.
#[derive(Debug)]
enum Lane {
    /// One worker, in order.
    Serial(mpsc::UnboundedSender<Job>),
    /// A task per job.
    Parallel,
}

/// The delivery side of the simulator: one [`Lane`] per policy.
#[derive(Debug)]
pub struct Dispatcher {
    /// The HTTPS client.
    client: Client,
    /// Attempts per post.
    max_attempts: u32,
    /// Targets and lanes by policy id.
    policies: HashMap<String, (Arc<Target>, Lane)>,
    /// The counters.
    stats: Arc<DeliveryStats>,
    /// Becomes `true` when the simulator stops; every delivery task then ends.
    stop: watch::Receiver<bool>,
}

impl Dispatcher {
    /// Starts a worker per serialized policy. Tasks end when `stop` becomes `true`.
    pub fn start(
        client: Client,
        policies: &[SimPolicy],
        max_attempts: u32,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let stats = Arc::new(DeliveryStats::default());
        let mut lanes = HashMap::new();
        for policy in policies {
            let target = Arc::new(target(policy));
            let lane = if policy.serialize {
                let (tx, rx) = mpsc::unbounded_channel();
                let worker = Worker {
                    client: client.clone(),
                    target: target.clone(),
                    max_attempts,
                    stats: stats.clone(),
                };
                tokio::spawn(until_stopped(stop.clone(), worker.serial(rx)));
                Lane::Serial(tx)
            } else {
                Lane::Parallel
            };
            lanes.insert(policy.id.clone(), (target, lane));
        }
        Self {
            client,
            max_attempts,
            policies: lanes,
            stats,
            stop,
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<DeliveryStats> {
        self.stats.clone()
    }

    /// Queues `job` for `policy`; `false` when the policy is unknown or its worker has stopped.
    pub fn dispatch(&self, policy: &str, job: Job) -> bool {
        let Some((target, lane)) = self.policies.get(policy) else {
            return false;
        };
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match lane {
            Lane::Serial(tx) => tx.send(job).is_ok(),
            Lane::Parallel => {
                let worker = Worker {
                    client: self.client.clone(),
                    target: target.clone(),
                    max_attempts: self.max_attempts,
                    stats: self.stats.clone(),
                };
                tokio::spawn(until_stopped(self.stop.clone(), async move {
                    tokio::time::sleep_until(job.due).await;
                    worker.deliver(job).await;
                }));
                true
            }
        }
    }
}

/// Runs `work` until it ends or `stop` becomes `true`.
async fn until_stopped(
    mut stop: watch::Receiver<bool>,
    work: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        () = work => {}
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
}

fn target(policy: &SimPolicy) -> Target {
    let mut headers = vec![
        (CONTENT_TYPE, HeaderValue::from_static("application/xml")),
        (
            USER_AGENT,
            HeaderValue::from_static(concat!(
                "callback-receiver-gateway-simulator/",
                env!("CARGO_PKG_VERSION")
            )),
        ),
    ];
    if let Some((user, password)) = &policy.credentials {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{user}:{}", password.expose()));
        if let Ok(mut value) = HeaderValue::from_str(&format!("Basic {token}")) {
            value.set_sensitive(true);
            headers.push((AUTHORIZATION, value));
        }
    }
    Target {
        policy: policy.id.clone(),
        url: policy.response_url.clone(),
        headers,
    }
}

/// Delivers the jobs of one policy.
struct Worker {
    client: Client,
    target: Arc<Target>,
    max_attempts: u32,
    stats: Arc<DeliveryStats>,
}

impl Worker {
    /// The serialized lane: one job at a time, in the order they were queued.
    async fn serial(self, mut rx: mpsc::UnboundedReceiver<Job>) {
        while let Some(job) = rx.recv().await {
            tokio::time::sleep_until(job.due).await;
            self.deliver(job).await;
        }
    }

    /// Posts the job's document, then its duplicates.
    async fn deliver(&self, job: Job) {
        for copy in 0..=job.duplicate {
            self.post_with_retries(&job, copy).await;
        }
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
    }

    /// One post, retried with back-off until it is answered 2xx or `max_attempts` is reached.
    async fn post_with_retries(&self, job: &Job, copy: u32) {
        let target = &self.target;
        let mut pause = BACKOFF_START;
        for attempt in 1..=self.max_attempts {
            let outcome = self
                .client
                .post(
                    &target.url.base,
                    &target.url.path,
                    &target.headers,
                    job.body.clone(),
                )
                .await;
            let failure = match outcome {
                Ok(answer) if answer.status.is_success() => {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        policy = %target.policy,
                        controlid = %job.controlid,
                        url = %target.url,
                        status = answer.status.as_u16(),
                        attempt,
                        duplicate = copy > 0,
                        "response delivered"
                    );
                    return;
                }
                Ok(answer) if answer.status == http::StatusCode::UNAUTHORIZED => {
                    "answered 401: the Response URL refused the policy's user and password".into()
                }
                Ok(answer) => format!("answered {}", answer.status.as_u16()),
                Err(e) => e.to_string(),
            };
            self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
            if attempt == self.max_attempts {
                break;
            }
            tracing::warn!(
                policy = %target.policy,
                controlid = %job.controlid,
                url = %target.url,
                attempt,
                retry_in_ms = pause.as_millis() as u64,
                "delivery failed: {failure}"
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(BACKOFF_MAX);
        }
        self.stats.given_up.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            policy = %target.policy,
            controlid = %job.controlid,
            url = %target.url,
            attempts = self.max_attempts,
            "delivery failed; giving up on this response"
        );
    }
}

/// The delivery client: the system's root certificates plus those of `ca_file`.
pub fn client(ca_file: Option<&Path>) -> Result<Client, DeliveryError> {
    let mut roots = RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    if let Some(path) = ca_file {
        let bad = |reason: String| DeliveryError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(pem_reason(&e)))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(pem_reason(&e)))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate found".into()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| bad(format!("unusable certificate: {e}")))?;
        }
    }
    if roots.is_empty() {
        return Err(DeliveryError::NoRoots);
    }
    let mut config = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| DeliveryError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Client::from_config(Arc::new(config)))
}

fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound => "no such file".into(),
        Error::Io(io) => io.to_string().to_lowercase(),
        Error::NoItemsFound => "no PEM certificate found".into(),
        other => format!("invalid PEM: {other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_ca_file_is_named() {
        let err = client(Some(Path::new("/nonexistent/ca.pem"))).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        assert!(err.to_string().contains("no such file"), "{err}");
    }

    #[test]
    fn policy_credentials_become_a_sensitive_basic_header() {
        let policy = SimPolicy {
            id: "p".into(),
            response_url: ResponseUrl::parse("https://localhost:1/cb").expect("url"),
            credentials: Some(("dev".into(), "pw".into())),
            serialize: false,
        };
        let t = target(&policy);
        let auth = t
            .headers
            .iter()
            .find(|(n, _)| n == AUTHORIZATION)
            .map(|(_, v)| v)
            .expect("authorization");
        assert_eq!(auth.to_str().expect("ascii"), "Basic ZGV2OnB3");
        assert!(auth.is_sensitive());
        let open = SimPolicy {
            credentials: None,
            ..policy
        };
        assert!(!target(&open)
            .headers
            .iter()
            .any(|(n, _)| n == AUTHORIZATION));
    }
}
