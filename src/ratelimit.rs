//! Failed-authentication limiting per client address.
//!
//! Every request answered `401` (wrong or missing credentials on a callback, a wrong token on the
//! API, an unknown policy) counts as one failure of the client's address *for what it tried to
//! reach*: one configured policy, any unknown policy, or the integrator API ([`Target`]). Once an
//! address has `limit` failures for a target within one minute, every request from it to that
//! target is answered `429` with `Retry-After` until its minute is over, *before* its credentials
//! are checked: a blocked client learns nothing about the secret it is guessing, and costs no
//! argon2 run. Successful requests never count and are never delayed.
//!
//! Counting per target keeps the damage of one misconfiguration small: a transport policy whose
//! password was mistyped in the gateway cannot get the gateway's address refused on the other
//! policies, and a poller with a stale token cannot block callbacks coming from the same host.
//!
//! IPv6 clients are counted per `/64`, since one host usually owns a whole `/64`. Memory is
//! bounded: at most `max_entries` addresses are tracked; when full, expired windows are dropped
//! first, then the oldest ones.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window over which failures are counted.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Most client addresses tracked at once.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

/// The key failures are counted under: the address, or its `/64` for IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    /// The key of a client address.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => ClientKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(IpAddr::V4(v4)),
                None => {
                    let segments = v6.segments();
                    ClientKey(IpAddr::V6(Ipv6Addr::new(
                        segments[0],
                        segments[1],
                        segments[2],
                        segments[3],
                        0,
                        0,
                        0,
                        0,
                    )))
                }
            },
        }
    }
}

/// What a request tried to reach: failures are counted per address *and* target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `/v1/...`: the integrator API (a token names no poller before it is checked).
    Api,
    /// `/callback/{id}` of a configured policy.
    Policy(String),
    /// `/callback/{id}` of a policy that is not configured: all unknown ids share one count, so
    /// that trying many ids gains nothing.
    UnknownPolicy,
}

/// The key of one count: the client's address (or `/64`) and its target.
type Key = (ClientKey, Target);

/// One address's failures in its current window.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// When the window began (the first failure in it).
    start: Instant,
    /// Failures in the window.
    failures: u32,
}

/// The tracked addresses.
#[derive(Debug, Default)]
struct Table {
    /// Current window per address and target.
    windows: HashMap<Key, Window>,
    /// Addresses in the order their windows began (entries whose window has since restarted are
    /// stale and skipped), for eviction of the oldest.
    order: VecDeque<(Key, Instant)>,
}

/// What a failure did to its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// Failures of this address in the current window, this one included.
    pub failures: u32,
    /// Whether this failure reached the limit (later requests get `429`).
    pub now_blocked: bool,
}

/// Counts failed authentications per client address.
#[derive(Debug)]
pub struct AuthLimiter {
    /// Failures allowed per window; `0` disables the limiter.
    limit: u32,
    /// Most addresses tracked.
    max_entries: usize,
    /// The table.
    table: Mutex<Table>,
}

impl AuthLimiter {
    /// A limiter allowing `limit` failures per minute and address (`0`: no limit), tracking at
    /// most `max_entries` addresses.
    pub fn new(limit: u32, max_entries: usize) -> Self {
        AuthLimiter {
            limit,
            max_entries: max_entries.max(1),
            table: Mutex::new(Table::default()),
        }
    }

    /// Whether the limiter is on.
    pub fn enabled(&self) -> bool {
        self.limit > 0
    }

    /// The configured failures per minute.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// How many addresses are tracked.
    pub fn tracked(&self) -> usize {
        self.lock().windows.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // The table holds plain counters: a panic while it was held cannot break it.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Some(retry_after)` when `ip` has used up its failures for `target` and must wait.
    pub fn blocked(&self, ip: IpAddr, target: &Target) -> Option<Duration> {
        self.blocked_at(ip, target, Instant::now())
    }

    /// [`blocked`](Self::blocked) at a given instant.
    pub fn blocked_at(&self, ip: IpAddr, target: &Target, now: Instant) -> Option<Duration> {
        if !self.enabled() {
            return None;
        }
        let table = self.lock();
        if table.windows.is_empty() {
            return None;
        }
        let window = table.windows.get(&(ClientKey::of(ip), target.clone()))?;
        let elapsed = now.saturating_duration_since(window.start);
        if window.failures >= self.limit && elapsed < WINDOW {
            Some(WINDOW - elapsed)
        } else {
            None
        }
    }

    /// Counts one failed authentication of `ip` for `target`.
    pub fn record_failure(&self, ip: IpAddr, target: Target) -> Failure {
        self.record_failure_at(ip, target, Instant::now())
    }

    /// [`record_failure`](Self::record_failure) at a given instant.
    pub fn record_failure_at(&self, ip: IpAddr, target: Target, now: Instant) -> Failure {
        if !self.enabled() {
            return Failure {
                failures: 0,
                now_blocked: false,
            };
        }
        let key = (ClientKey::of(ip), target);
        let mut table = self.lock();
        let current = table
            .windows
            .get(&key)
            .copied()
            .filter(|w| now.saturating_duration_since(w.start) < WINDOW);
        let window = match current {
            Some(w) => Window {
                start: w.start,
                failures: w.failures.saturating_add(1),
            },
            None => {
                if !table.windows.contains_key(&key) {
                    self.make_room(&mut table, now);
                }
                table.order.push_back((key.clone(), now));
                Window {
                    start: now,
                    failures: 1,
                }
            }
        };
        table.windows.insert(key, window);
        // Stale entries pile up when windows restart; rebuild the order now and then.
        if table.order.len() > self.max_entries.saturating_mul(2).max(64) {
            let mut order: Vec<(Key, Instant)> = table
                .windows
                .iter()
                .map(|(k, w)| (k.clone(), w.start))
                .collect();
            order.sort_by_key(|(_, start)| *start);
            table.order = order.into();
        }
        Failure {
            failures: window.failures,
            now_blocked: window.failures == self.limit,
        }
    }

    /// Frees one slot when the table is full: expired or oldest windows go first.
    fn make_room(&self, table: &mut Table, now: Instant) {
        while table.windows.len() >= self.max_entries {
            let Some((key, start)) = table.order.pop_front() else {
                // The order lost track (cannot happen); start over rather than grow.
                table.windows.clear();
                return;
            };
            let live = table.windows.get(&key).is_some_and(|w| w.start == start);
            if live {
                table.windows.remove(&key);
            }
            // Also drop whatever else has expired at the front, cheaply.
            while let Some(start) = table.order.front().map(|(_, start)| *start) {
                if now.saturating_duration_since(start) < WINDOW {
                    break;
                }
                let Some((key, _)) = table.order.pop_front() else {
                    break;
                };
                if table.windows.get(&key).is_some_and(|w| w.start == start) {
                    table.windows.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let limiter = AuthLimiter::new(3, 100);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for n in 1..=2 {
            let f = limiter.record_failure_at(a, Target::Api, t0);
            assert_eq!(f.failures, n);
            assert!(!f.now_blocked);
            assert_eq!(limiter.blocked_at(a, &Target::Api, t0), None);
        }
        assert!(limiter.record_failure_at(a, Target::Api, t0).now_blocked);
        let later = t0 + Duration::from_secs(20);
        assert_eq!(
            limiter.blocked_at(a, &Target::Api, later),
            Some(Duration::from_secs(40))
        );
        // Another address is not affected.
        assert_eq!(
            limiter.blocked_at(ip("192.0.2.2"), &Target::Api, later),
            None
        );
        // The window ends; a new one starts with the next failure.
        let after = t0 + WINDOW;
        assert_eq!(limiter.blocked_at(a, &Target::Api, after), None);
        assert_eq!(limiter.record_failure_at(a, Target::Api, after).failures, 1);
        assert_eq!(limiter.blocked_at(a, &Target::Api, after), None);
    }

    #[test]
    fn targets_are_counted_apart() {
        let limiter = AuthLimiter::new(2, 100);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        let mistyped = Target::Policy("mistyped".to_owned());
        limiter.record_failure_at(a, mistyped.clone(), t0);
        assert!(
            limiter
                .record_failure_at(a, mistyped.clone(), t0)
                .now_blocked
        );
        assert!(limiter.blocked_at(a, &mistyped, t0).is_some());
        // The same address is not refused on another policy, nor on the API.
        assert!(limiter
            .blocked_at(a, &Target::Policy("other".to_owned()), t0)
            .is_none());
        assert!(limiter.blocked_at(a, &Target::Api, t0).is_none());
        // Unknown policy ids share one count.
        limiter.record_failure_at(a, Target::UnknownPolicy, t0);
        limiter.record_failure_at(a, Target::UnknownPolicy, t0);
        assert!(limiter.blocked_at(a, &Target::UnknownPolicy, t0).is_some());
    }

    #[test]
    fn zero_disables() {
        let limiter = AuthLimiter::new(0, 100);
        let a = ip("192.0.2.1");
        for _ in 0..1000 {
            limiter.record_failure(a, Target::Api);
        }
        assert_eq!(limiter.blocked(a, &Target::Api), None);
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let limiter = AuthLimiter::new(2, 100);
        let t0 = Instant::now();
        limiter.record_failure_at(ip("2001:db8:1:2::1"), Target::Api, t0);
        limiter.record_failure_at(ip("2001:db8:1:2:ffff::9"), Target::Api, t0);
        assert!(limiter
            .blocked_at(ip("2001:db8:1:2::77"), &Target::Api, t0)
            .is_some());
        assert!(limiter
            .blocked_at(ip("2001:db8:1:3::1"), &Target::Api, t0)
            .is_none());
        limiter.record_failure_at(ip("::ffff:192.0.2.7"), Target::Api, t0);
        limiter.record_failure_at(ip("192.0.2.7"), Target::Api, t0);
        assert!(limiter
            .blocked_at(ip("192.0.2.7"), &Target::Api, t0)
            .is_some());
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_go_first() {
        let limiter = AuthLimiter::new(1, 1000);
        let t0 = Instant::now();
        for i in 0..5000u32 {
            let at = t0 + Duration::from_millis(u64::from(i));
            limiter.record_failure_at(IpAddr::from(i.to_be_bytes()), Target::Api, at);
            assert!(limiter.tracked() <= 1000);
        }
        let now = t0 + Duration::from_millis(5000);
        // The newest are still blocked, the oldest were evicted.
        assert!(limiter
            .blocked_at(IpAddr::from(4999u32.to_be_bytes()), &Target::Api, now)
            .is_some());
        assert!(limiter
            .blocked_at(IpAddr::from(0u32.to_be_bytes()), &Target::Api, now)
            .is_none());
        // Restarting windows does not grow the order without bound.
        let limiter = AuthLimiter::new(1, 10);
        for round in 0..1000u64 {
            let at = t0 + WINDOW * u32::try_from(round).unwrap();
            limiter.record_failure_at(ip("192.0.2.1"), Target::Api, at);
        }
        assert!(limiter.lock().order.len() <= 64);
    }
}
