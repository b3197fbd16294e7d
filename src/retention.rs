//! The retention task: removes deliveries, quarantined bodies and expectations older than
//! `retention_days`, in small batches so callbacks are never held up.

use std::sync::Arc;
use std::time::Duration;

use crate::state::AppState;

/// Items removed per store commit.
pub const PURGE_BATCH: usize = 500;

/// Runs one purge now; returns how many items were removed.
pub async fn purge_once(state: &AppState, retention_days: u32) -> usize {
    let cutoff = state.now_ms() - i64::from(retention_days) * 86_400_000;
    match state.store.purge_older_than(cutoff, PURGE_BATCH).await {
        Ok(0) => 0,
        Ok(n) => {
            tracing::info!(removed = n, retention_days, "retention purge");
            n
        }
        Err(e) => {
            tracing::warn!(error = %e, "retention purge failed; retrying at the next interval");
            0
        }
    }
}

/// Purges at start and then every `interval` until shutdown.
pub async fn run(state: Arc<AppState>, retention_days: u32, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                purge_once(&state, retention_days).await;
            }
            () = state.stopping() => return,
        }
    }
}
