//! The service's life cycle around `Application::run_until`: SIGHUP reloads, and the systemd
//! notifications (`READY=1`, `RELOADING=1`, `STOPPING=1`, the watchdog).
//!
//! A reload re-reads the file given to `serve --config` (the dev profile re-reads its certificate
//! files) and applies it whole or not at all: the new certificate and key go to new handshakes
//! (`ReloadableCert::replace`; open connections keep theirs), the policies and pollers to new
//! requests (`AppState::replace_access`), and the metrics token to the next scrape. A file
//! that does not parse, or a certificate that does not load, changes nothing; the log says why
//! (the file, line and key, or the certificate file and reason). Settings that only take effect
//! at start (`listen`, `data_dir`, limits, ...) are logged as needing a restart.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::app::Application;
use crate::config::Config;
use crate::notify;
use crate::state::AppState;
use crate::tls::{self, ReloadableCert};

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Whether the certificate served to new connections changed.
    pub certificate_changed: bool,
    /// Policies added and removed.
    pub policies_added: Vec<String>,
    /// Policies removed.
    pub policies_removed: Vec<String>,
    /// Pollers in force after the reload.
    pub pollers: usize,
    /// Settings that changed in the file but take effect only after a restart.
    pub needs_restart: Vec<&'static str>,
}

/// Why a reload was refused (the previous settings stay).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not read, parse or validate.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The certificate or key does not load.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Re-reads and applies the configuration.
pub struct Reloader {
    /// The file given to `serve --config`; `None` for the dev profile.
    path: Option<PathBuf>,
    /// The configuration the service started with: what needs a restart is compared with it.
    running: Config,
    /// The certificate resolver of the listener.
    cert: Arc<ReloadableCert>,
    /// The shared request state.
    state: Arc<AppState>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// A reloader for the service started with `running` (read from `path`, or the dev profile).
    pub fn new(
        path: Option<PathBuf>,
        running: Config,
        cert: Arc<ReloadableCert>,
        state: Arc<AppState>,
    ) -> Self {
        Self {
            path,
            running,
            cert,
            state,
        }
    }

    /// Reloads now (blocking: reads files); applies everything or nothing.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let new = match &self.path {
            Some(path) => Config::from_file(path)?,
            // The dev profile has no file: its certificate files are what can change.
            None => self.running.clone(),
        };
        let key = tls::load_certified_key(&new.tls.cert, &new.tls.key)?;

        let old_leaf = self.cert.current().cert.first().map(|c| c.to_vec());
        let new_leaf = key.cert.first().map(|c| c.to_vec());
        let old_policies: BTreeSet<String> = self.state.access().policies.keys().cloned().collect();
        let new_policies: BTreeSet<String> =
            new.access.policies.iter().map(|p| p.id.clone()).collect();

        if let Some(leaf) = &new_leaf {
            self.state.metrics.set_certificate(leaf);
        }
        self.cert.replace(key);
        self.state.replace_access(&new.access);
        self.state.metrics.set_token(new.metrics_token.clone());
        // Entries of removed credentials would only take room.
        self.state.verifier.clear_cache();

        Ok(Reloaded {
            certificate_changed: old_leaf != new_leaf,
            policies_added: new_policies.difference(&old_policies).cloned().collect(),
            policies_removed: old_policies.difference(&new_policies).cloned().collect(),
            pollers: new.access.pollers.len(),
            needs_restart: needs_restart(&self.running, &new),
        })
    }

    /// Reloads and logs the result; records it in the metrics.
    pub fn reload_and_log(&self) -> bool {
        let source = match &self.path {
            Some(path) => path.display().to_string(),
            None => "dev profile certificate files".to_owned(),
        };
        match self.reload() {
            Ok(done) => {
                self.state.metrics.reload(true);
                tracing::info!(
                    from = %source,
                    certificate_changed = done.certificate_changed,
                    policies = self.state.access().policies.len(),
                    policies_added = %done.policies_added.join(","),
                    policies_removed = %done.policies_removed.join(","),
                    pollers = done.pollers,
                    "configuration reloaded"
                );
                if !done.needs_restart.is_empty() {
                    tracing::warn!(
                        settings = %done.needs_restart.join(", "),
                        "changed in the file but not applied: needs a restart (systemctl restart callback-receiver)"
                    );
                }
                true
            }
            Err(e) => {
                self.state.metrics.reload(false);
                tracing::error!(
                    from = %source,
                    error = %e,
                    "reload failed; keeping the previous settings"
                );
                false
            }
        }
    }
}

/// The settings that differ between `running` and `new` and apply only at start.
pub fn needs_restart(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let limits = (&running.limits, &new.limits);
    for (name, differs) in [
        ("listen", running.listen != new.listen),
        ("data_dir", running.data_dir != new.data_dir),
        (
            "max_body_bytes",
            running.max_body_bytes != new.max_body_bytes,
        ),
        (
            "min_free_disk_bytes",
            running.min_free_disk_bytes != new.min_free_disk_bytes,
        ),
        (
            "retention_days",
            running.retention_days != new.retention_days,
        ),
        (
            "read_cache_mb",
            running.read_cache_bytes != new.read_cache_bytes,
        ),
        (
            "purge_interval_seconds",
            running.purge_interval != new.purge_interval,
        ),
        ("log_format", running.log_format != new.log_format),
        (
            "log_timestamps",
            running.log_timestamps != new.log_timestamps,
        ),
        (
            "limits (timeouts, connection and header caps)",
            limits.0 != limits.1,
        ),
    ] {
        if differs {
            changed.push(name);
        }
    }
    changed
}

/// The running service's life-cycle tasks: the SIGHUP handler and the watchdog.
#[derive(Debug)]
pub struct Lifecycle {
    /// The SIGHUP handler.
    reload: JoinHandle<()>,
    /// The watchdog, when systemd asked for one.
    watchdog: Option<JoinHandle<()>>,
}

impl Lifecycle {
    /// Installs the SIGHUP handler, starts the watchdog (with `WATCHDOG_USEC`), then tells
    /// systemd the service is ready: `app` is bound, so connections are accepted from now on.
    ///
    /// `path` is the file given to `serve --config` (`None` for the dev profile) and `running`
    /// the configuration `app` was built from.
    pub fn start(
        path: Option<PathBuf>,
        running: Config,
        app: &Application,
    ) -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let state = app.state();
        let reloader = Arc::new(Reloader::new(path, running, app.cert(), state.clone()));
        // Installed before READY=1: from then on a SIGHUP reloads instead of killing.
        let mut hup = signal(SignalKind::hangup())?;
        let reload = tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP received; reloading the configuration");
                notify::reloading();
                let reloader = reloader.clone();
                let applied = tokio::task::spawn_blocking(move || reloader.reload_and_log())
                    .await
                    .unwrap_or(false);
                notify::ready(if applied {
                    "serving; configuration reloaded"
                } else {
                    "serving; the last reload failed, previous settings in force"
                });
            }
        });
        let watchdog = notify::spawn_watchdog(state.store.clone());
        notify::ready("serving");
        Ok(Self { reload, watchdog })
    }

    /// Completes when `shutdown` does, after telling systemd the service is stopping and
    /// stopping the SIGHUP handler and the watchdog (a SIGHUP while draining is ignored).
    pub async fn until(self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        notify::stopping();
        self.reload.abort();
        if let Some(watchdog) = &self.watchdog {
            watchdog.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "listen = \"127.0.0.1:8443\"\ndata_dir = \"data\"\n{extra}\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n"
        );
        Config::from_toml(&text, "t.toml", std::path::Path::new("/etc/cr")).expect("valid")
    }

    #[test]
    fn restart_only_settings_are_named() {
        let running = config("");
        assert!(needs_restart(&running, &config("")).is_empty());
        let mut moved = config("");
        moved.listen = "127.0.0.1:9443".parse().expect("addr");
        moved.data_dir = "/elsewhere".into();
        assert_eq!(needs_restart(&running, &moved), vec!["listen", "data_dir"]);
        let reserve = config("min_free_disk_bytes = 1048576");
        assert_eq!(
            needs_restart(&running, &reserve),
            vec!["min_free_disk_bytes"]
        );
        let cache = config("read_cache_mb = 1");
        assert_eq!(needs_restart(&running, &cache), vec!["read_cache_mb"]);
        let policies = config("[[policy]]\nid = \"p\"\n");
        assert!(needs_restart(&running, &policies).is_empty());
    }
}
