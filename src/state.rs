//! The state shared by every request: the store, the policies and pollers, limits, and the
//! shutdown signal.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::auth::{Credential, Quick, SecretString, Verifier};
use crate::config::{Access, Limits, Policy};
use crate::store::{Scope, Store};
use crate::waiters::Waiters;

/// The wall clock, in milliseconds since the Unix epoch (injectable for tests).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    })
}

/// Entries kept in the verified-credential cache.
const VERIFIED_CACHE_ENTRIES: usize = 4096;

/// Policies and pollers, indexed for lookups; replaced whole on reload.
#[derive(Debug)]
pub struct AccessIndex {
    /// Policies by id.
    pub policies: HashMap<String, Policy>,
    /// Pollers in file order: `(name, token, scope)`.
    pub pollers: Vec<(String, Credential, Scope)>,
}

impl AccessIndex {
    /// Indexes a validated [`Access`].
    pub fn new(access: &Access) -> Self {
        Self {
            policies: access
                .policies
                .iter()
                .map(|p| (p.id.clone(), p.clone()))
                .collect(),
            pollers: access
                .pollers
                .iter()
                .map(|p| {
                    let scope = match &p.policies {
                        None => Scope::All,
                        Some(list) => Scope::Policies(list.clone()),
                    };
                    (p.name.clone(), p.token.clone(), scope)
                })
                .collect(),
        }
    }
}

/// A poller that presented a valid token.
#[derive(Debug, Clone)]
pub struct AuthenticatedPoller {
    /// Its configured name.
    pub name: String,
    /// What it may read.
    pub scope: Scope,
}

/// Everything a request handler needs.
#[allow(missing_debug_implementations)]
pub struct AppState {
    /// Durable storage.
    pub store: Arc<dyn Store>,
    /// Current policies and pollers.
    access: RwLock<Arc<AccessIndex>>,
    /// Constant-time checks with a cache of verified hashed credentials.
    pub verifier: Arc<Verifier>,
    /// Largest accepted callback body.
    pub max_body_bytes: u64,
    /// Limits on what clients control.
    pub limits: Limits,
    /// Flips to `true` when the server starts shutting down.
    shutdown: watch::Sender<bool>,
    /// Pollers waiting for a controlid.
    pub waiters: Waiters,
    /// The wall clock.
    clock: Clock,
    /// The counters behind `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Failed authentications per client address (`429` beyond the limit).
    pub auth_limiter: crate::ratelimit::AuthLimiter,
}

impl AppState {
    /// New state over `store` with the given settings.
    pub fn new(
        store: Arc<dyn Store>,
        access: &Access,
        max_body_bytes: u64,
        limits: Limits,
        clock: Clock,
    ) -> Self {
        let (shutdown, _) = watch::channel(false);
        Self {
            waiters: Waiters::new(limits.max_waiting_pollers),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            clock,
            store,
            access: RwLock::new(Arc::new(AccessIndex::new(access))),
            verifier: Arc::new(Verifier::new(VERIFIED_CACHE_ENTRIES)),
            max_body_bytes,
            auth_limiter: crate::ratelimit::AuthLimiter::new(
                limits.auth_failure_limit_per_minute,
                crate::ratelimit::DEFAULT_MAX_ENTRIES,
            ),
            limits,
            shutdown,
        }
    }

    /// The policies and pollers in force.
    pub fn access(&self) -> Arc<AccessIndex> {
        match self.access.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the policies and pollers (reload).
    pub fn replace_access(&self, access: &Access) {
        let index = Arc::new(AccessIndex::new(access));
        match self.access.write() {
            Ok(mut guard) => *guard = index,
            Err(poisoned) => *poisoned.into_inner() = index,
        }
    }

    /// Now, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        (self.clock)()
    }

    /// Tells long-running handlers to finish.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Completes once the server starts shutting down.
    pub async fn stopping(&self) {
        let mut rx = self.shutdown.subscribe();
        // Map the guard away at once: it must not be held across an await.
        let _ = rx.wait_for(|stop| *stop).await.map(|_| ());
    }

    /// A receiver that turns `true` at shutdown.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Finds the poller whose token is `token`; plain tokens are all checked in constant time
    /// before any argon2 run.
    pub async fn authenticate_poller(&self, token: &SecretString) -> Option<AuthenticatedPoller> {
        let access = self.access();
        let presented = token.expose().as_bytes();
        let quick = self
            .verifier
            .verify_any_quick(presented, access.pollers.iter().map(|(_, c, _)| c));
        let index = match quick {
            Quick::Match(index) => index,
            Quick::NoMatch => return None,
            Quick::NeedsArgon2 => {
                let candidates: Vec<Credential> =
                    access.pollers.iter().map(|(_, c, _)| c.clone()).collect();
                self.verifier
                    .verify_any_async(presented.to_vec(), candidates)
                    .await?
            }
        };
        let (name, _, scope) = access.pollers.get(index)?;
        Some(AuthenticatedPoller {
            name: name.clone(),
            scope: scope.clone(),
        })
    }
}
