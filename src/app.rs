//! Wiring: opens the store, loads TLS, binds the listener, and runs the server until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::server;
use crate::state::{self, AppState, Clock};
use crate::store::{SledOptions, SledStore, Store};
use crate::tls::{self, ReloadableCert, TlsError};

/// Why the service could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The store cannot be opened or closed.
    #[error("data_dir {path}: {error}")]
    Store {
        /// The data directory.
        path: String,
        /// The store's error.
        error: crate::store::StoreError,
    },
    /// The listener cannot be bound.
    #[error("listen {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The store's writer has hung inside the database for longer than [`STORE_STALL_LIMIT`].
    #[error(
        "the store has not finished a write for {seconds} s (a hang inside sled, see sled#1412); \
         stopping so that the service can be restarted: nothing unacknowledged was answered 200"
    )]
    StoreStalled {
        /// How long the current group had been running.
        seconds: u64,
    },
}

/// How long one group of writes may take before the service gives up on the store and stops
/// with an error (exit 1), so that systemd (`Restart=on-failure`) or another supervisor starts
/// it again. sled 0.34.7 can deadlock under sustained writes (sled#1412): its threads then wait
/// for each other forever, and only a new process gets the database back. A healthy group takes
/// milliseconds; even a 64 MiB callback on a slow disk takes seconds.
pub const STORE_STALL_LIMIT: Duration = Duration::from_secs(120);

/// A built service, bound and ready to run.
pub struct Application {
    /// The bound listener.
    listener: TcpListener,
    /// Its local address (with the real port when `listen` asked for port 0).
    local_addr: SocketAddr,
    /// The TLS acceptor.
    acceptor: TlsAcceptor,
    /// The certificate resolver, for reloads.
    cert: Arc<ReloadableCert>,
    /// The sled store, closed at the end of `run_until`.
    store: Arc<SledStore>,
    /// The shared request state.
    state: Arc<AppState>,
    /// Retention in days.
    retention_days: u32,
    /// How often retention runs.
    purge_interval: std::time::Duration,
}

impl Application {
    /// Opens the store, loads the certificate and binds `config.listen`.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        Self::build_with_clock(config, state::system_clock()).await
    }

    /// [`build`](Self::build) with another wall clock (tests move time forward with it).
    pub async fn build_with_clock(config: Config, clock: Clock) -> Result<Self, AppError> {
        let key = tls::load_certified_key(&config.tls.cert, &config.tls.key)?;
        let cert = Arc::new(ReloadableCert::new(key));
        let acceptor = TlsAcceptor::from(tls::server_config(cert.clone())?);

        let data_dir = config.data_dir.clone();
        let options = SledOptions {
            reserve_bytes: config.min_free_disk_bytes,
            read_cache_bytes: usize::try_from(config.read_cache_bytes).unwrap_or(usize::MAX),
            ..SledOptions::default()
        };
        let store = tokio::task::spawn_blocking(move || SledStore::open(&data_dir, options))
            .await
            .map_err(|e| AppError::Store {
                path: config.data_dir.display().to_string(),
                error: crate::store::StoreError::Io(e.to_string()),
            })?
            .map_err(|error| AppError::Store {
                path: config.data_dir.display().to_string(),
                error,
            })?;
        let store = Arc::new(store);

        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| AppError::Bind {
                addr: config.listen,
                reason: e.to_string().to_lowercase(),
            })?;
        let local_addr = listener.local_addr().map_err(|e| AppError::Bind {
            addr: config.listen,
            reason: e.to_string().to_lowercase(),
        })?;
        let dyn_store: Arc<dyn Store> = store.clone();
        let state = Arc::new(AppState::new(
            dyn_store,
            &config.access,
            config.max_body_bytes,
            config.limits.clone(),
            clock,
        ));
        state.metrics.set_token(config.metrics_token.clone());
        if let Some(leaf) = cert.current().cert.first() {
            state.metrics.set_certificate(leaf);
        }
        Ok(Self {
            listener,
            local_addr,
            acceptor,
            cert,
            store,
            state,
            retention_days: config.retention_days,
            purge_interval: config.purge_interval,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The shared state (for reloads and tests).
    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// The certificate resolver (for reloads).
    pub fn cert(&self) -> Arc<ReloadableCert> {
        self.cert.clone()
    }

    /// Serves until `shutdown` completes, drains in-flight requests, then flushes and closes
    /// the store.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
        let retention = tokio::spawn(crate::retention::run(
            self.state.clone(),
            self.retention_days,
            self.purge_interval,
        ));
        let served = server::run(self.listener, self.acceptor, self.state.clone(), shutdown);
        tokio::select! {
            () = served => {}
            seconds = stalled(self.store.clone() as Arc<dyn Store>, STORE_STALL_LIMIT) => {
                retention.abort();
                tracing::error!(seconds, "the store hangs; stopping without the graceful drain (acknowledged data is on disk)");
                return Err(AppError::StoreStalled { seconds });
            }
        }
        retention.abort();
        self.store.close().await.map_err(|error| AppError::Store {
            path: "store".into(),
            error,
        })?;
        tracing::info!("store flushed and closed");
        Ok(())
    }
}

/// Completes, with the seconds it has been busy, once the store's writer has worked on one group
/// for longer than `limit`.
pub(crate) async fn stalled(store: Arc<dyn Store>, limit: Duration) -> u64 {
    let mut ticks = tokio::time::interval(Duration::from_secs(5).min(limit));
    loop {
        ticks.tick().await;
        if let Some(busy) = store.busy_for().filter(|busy| *busy > limit) {
            return busy.as_secs();
        }
    }
}
