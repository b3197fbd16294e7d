//! Long-poll bookkeeping: who waits for which controlid, and how many may wait at once.
//!
//! A poller that asks `?wait=S` registers interest in its controlid *before* it looks in the
//! store, so a callback committed between the look and the wait still wakes it. The callback
//! handler calls [`Waiters::notify`] after the store has made a delivery durable; only the
//! pollers of that controlid wake up. Feed long-polls wait on the store's committed watermark
//! instead, since any new delivery may concern them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The registry of waiting pollers.
#[derive(Debug)]
pub struct Waiters {
    /// One `Notify` per controlid that somebody waits for.
    by_controlid: Mutex<HashMap<String, Arc<Notify>>>,
    /// Caps the number of requests waiting at once.
    permits: Arc<Semaphore>,
    /// The cap, to report how many wait.
    max: usize,
}

/// A slot among the waiting pollers; frees itself on drop.
#[derive(Debug)]
pub struct WaitSlot {
    /// Held while the request waits.
    _permit: OwnedSemaphorePermit,
}

/// Interest in one controlid; unregisters itself on drop.
#[derive(Debug)]
pub struct Interest<'a> {
    /// The registry.
    waiters: &'a Waiters,
    /// The controlid.
    controlid: String,
    /// Woken when a delivery of the controlid is committed.
    notify: Arc<Notify>,
}

impl Waiters {
    /// A registry that lets at most `max` requests wait at once.
    pub fn new(max: usize) -> Self {
        Self {
            by_controlid: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Takes a waiting slot, or `None` when `max` requests already wait.
    pub fn slot(&self) -> Option<WaitSlot> {
        self.permits
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|permit| WaitSlot { _permit: permit })
    }

    /// How many requests wait right now.
    pub fn waiting(&self) -> usize {
        self.max.saturating_sub(self.permits.available_permits())
    }

    /// Registers interest in `controlid`.
    pub fn interest(&self, controlid: &str) -> Interest<'_> {
        let notify = {
            let mut map = lock(&self.by_controlid);
            map.entry(controlid.to_string())
                .or_insert_with(|| Arc::new(Notify::new()))
                .clone()
        };
        Interest {
            waiters: self,
            controlid: controlid.to_string(),
            notify,
        }
    }

    /// Wakes every poller waiting for `controlid`.
    pub fn notify(&self, controlid: &str) {
        let notify = lock(&self.by_controlid).get(controlid).cloned();
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }
}

impl Interest<'_> {
    /// The `Notify` to wait on; create the `notified()` future and `enable()` it before looking
    /// in the store.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Interest<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.waiters.by_controlid);
        // The map holds one reference and this interest another: nobody else waits.
        if Arc::strong_count(&self.notify) <= 2 {
            if let Some(existing) = map.get(&self.controlid) {
                if Arc::ptr_eq(existing, &self.notify) {
                    map.remove(&self.controlid);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notify_wakes_only_that_controlid_and_cleans_up() {
        let waiters = Waiters::new(10);
        {
            let a = waiters.interest("a");
            let b = waiters.interest("b");
            woken_separately(&waiters, &a, &b).await;
        }
        assert!(lock(&waiters.by_controlid).is_empty());
    }

    async fn woken_separately(waiters: &Waiters, a: &Interest<'_>, b: &Interest<'_>) {
        let fa = a.notify().notified();
        let fb = b.notify().notified();
        tokio::pin!(fa);
        tokio::pin!(fb);
        fa.as_mut().enable();
        fb.as_mut().enable();
        waiters.notify("a");
        tokio::time::timeout(std::time::Duration::from_secs(1), fa)
            .await
            .expect("a woken");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), fb)
                .await
                .is_err(),
            "b must not be woken"
        );
    }

    #[test]
    fn slots_are_capped() {
        let waiters = Waiters::new(2);
        let s1 = waiters.slot().expect("first");
        let _s2 = waiters.slot().expect("second");
        assert!(waiters.slot().is_none());
        assert_eq!(waiters.waiting(), 2);
        drop(s1);
        assert!(waiters.slot().is_some());
    }
}
