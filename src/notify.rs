//! systemd integration (`Type=notify`): readiness, reload and stop notifications, and the
//! watchdog.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is not set (not started by systemd). The
//! watchdog does not ping on a timer alone: each `WATCHDOG=1` follows a probe write to the store
//! ([`Store::check_writable`]) answered within the ping interval, so a store that hangs or fails
//! makes systemd restart the service (`WatchdogSec=`), while a process that merely runs does not
//! count as alive. A probe refused for want of disk space still pings: the service is alive,
//! answers `503` (and `/readyz` says so), and resumes by itself once space is freed, whereas a
//! restart every half minute would only turn those `503`s into refused connections.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::store::{Store, StoreError};

/// Sends `states` to systemd; failures are logged, never fatal.
fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// `READY=1`: start-up (or a reload) is complete and the listener accepts connections.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1`: a reload starts (with the monotonic time systemd 253+ asks for); [`ready`]
/// ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading the configuration"),
        ]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`: shutdown has begun (in-flight requests are draining).
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining in-flight requests"),
    ]);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_timeout() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Starts the watchdog task when systemd asked for one: every half `WATCHDOG_USEC` it makes a
/// probe write to `store` and sends `WATCHDOG=1` only if the write became durable, or was
/// refused for want of disk space, within that half interval. Returns the task, to abort at
/// shutdown.
pub fn spawn_watchdog(store: Arc<dyn Store>) -> Option<tokio::task::JoinHandle<()>> {
    let timeout = watchdog_timeout()?;
    let every = timeout / 2;
    tracing::info!(
        timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        "systemd watchdog enabled; pinging after each successful store probe"
    );
    Some(tokio::spawn(watchdog(store, every)))
}

/// The watchdog loop (see [`spawn_watchdog`]).
async fn watchdog(store: Arc<dyn Store>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        match tokio::time::timeout(every, store.check_writable()).await {
            Ok(Ok(())) => {
                if failing {
                    tracing::info!("store probe succeeds again; watchdog pings resume");
                    failing = false;
                }
                send(&[NotifyState::Watchdog]);
            }
            // The store closes at the end of shutdown: nothing left to watch.
            Ok(Err(StoreError::Closed)) => return,
            Ok(Err(e)) if e.is_out_of_space() => {
                if !failing {
                    tracing::error!(error = %e, "store probe refused for want of disk space; the service answers 503 until space is freed (watchdog pings go on: a restart would not help)");
                }
                failing = true;
                send(&[NotifyState::Watchdog]);
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::error!(error = %e, "store probe failed; withholding watchdog pings (systemd restarts the service after WatchdogSec)");
                }
                failing = true;
            }
            Err(_) => {
                if !failing {
                    tracing::error!(
                        "store probe took longer than {every:?}; withholding watchdog pings"
                    );
                }
                failing = true;
            }
        }
    }
}
