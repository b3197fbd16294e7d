//! A bounded memory cache of the newest delivery of recently read controlids, for `GET`.
//!
//! A raw `GET` from the store costs a sled range scan (which clones a leaf), a sled read and a
//! `pread` of the body log; a JSON one the scan, a sled read and the decoding of the record.
//! An integrator typically reads a response more than once (a poll, then a retry, a second
//! system), so the answer of the last read is kept: id, SHA-256, policy, and what the reads
//! asked for: a copy of the body (at most [`MAX_ENTRY_BODY_BYTES`]) and the decoded record with
//! the controlid's delivery count ([`Latest`]). At most the configured total is kept.
//!
//! The count depends on the poller's scope when the controlid has deliveries of more than one
//! policy, so a [`Latest`] is kept only when every delivery of the controlid has the policy of
//! the newest one: then every scope that allows that policy counts them all.
//!
//! # Staying correct
//!
//! Only readers fill the cache, with what they read from the store, and only the newest visible
//! delivery of a controlid of *any* policy: a hit serves a poller whose scope allows that policy;
//! any other poller reads the store. The writer invalidates after every group: each controlid
//! a put or a delete touched, and everything after a purge or a reopen. Invalidation happens
//! before the group becomes visible (so a hit cannot outlive it) and again after (for a reader
//! that filled the entry in between), and it bumps a generation. A reader notes the generation
//! before it reads the store and fills only if it is unchanged, so what it read cannot be
//! older than a change the writer already invalidated.
//! An entry is never replaced by an older delivery.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::store::{DeliveryId, Latest, LatestBody, ReadCacheStats, Scope};

/// The largest body kept: larger ones are read from the log every time.
pub(super) const MAX_ENTRY_BODY_BYTES: usize = 64 * 1024;

/// Bookkeeping counted against the capacity for each entry, besides its body and names.
const ENTRY_OVERHEAD_BYTES: usize = 128;

/// See the module documentation.
pub(super) struct ReadCache {
    capacity: usize,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Arc<str>, Entry>,
    /// Insertion order, for eviction: (controlid, id). Stale pairs (replaced or removed
    /// entries) are skipped when they come up.
    order: VecDeque<(Arc<str>, u64)>,
    bytes: usize,
    generation: u64,
}

struct Entry {
    id: u64,
    sha256: [u8; 32],
    policy: Box<str>,
    /// The raw body, once a raw read kept it.
    body: Option<Bytes>,
    /// The decoded record and count, once a JSON read kept it, with its estimated size.
    latest: Option<(Box<Latest>, usize)>,
}

impl Entry {
    fn cost(&self, controlid: &str) -> usize {
        self.body.as_ref().map_or(0, Bytes::len)
            + self.latest.as_ref().map_or(0, |(_, cost)| *cost)
            + controlid.len()
            + self.policy.len()
            + ENTRY_OVERHEAD_BYTES
    }
}

/// What a fill adds to an entry.
enum Part {
    Body(Bytes),
    Latest(Box<Latest>, usize),
}

impl Part {
    fn cost(&self) -> usize {
        match self {
            Part::Body(body) => body.len(),
            Part::Latest(_, cost) => *cost,
        }
    }

    fn set(self, entry: &mut Entry) {
        match self {
            Part::Body(body) => entry.body = Some(body),
            Part::Latest(latest, cost) => entry.latest = Some((latest, cost)),
        }
    }
}

/// What a reader found in the store, to fill the cache with.
pub(super) struct Fill<'a> {
    pub controlid: &'a str,
    pub id: u64,
    pub sha256: [u8; 32],
    pub policy: &'a str,
    pub body: &'a Bytes,
}

impl ReadCache {
    /// A cache of at most `capacity` bytes; 0 keeps nothing.
    pub fn new(capacity: usize) -> ReadCache {
        ReadCache {
            capacity,
            inner: Mutex::new(Inner::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached newest delivery of `controlid`, when `scope` allows its policy.
    pub fn get(&self, controlid: &str, scope: &Scope) -> Option<LatestBody> {
        if self.capacity == 0 {
            return None;
        }
        let hit = {
            let inner = self.lock();
            inner
                .entries
                .get(controlid)
                .filter(|entry| scope.allows(&entry.policy))
                .and_then(|entry| {
                    Some(LatestBody {
                        id: DeliveryId(entry.id),
                        sha256: entry.sha256,
                        body: entry.body.clone()?,
                    })
                })
        };
        if hit.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// The cached newest delivery of `controlid` with its count, when `scope` allows its
    /// policy.
    pub fn get_latest(&self, controlid: &str, scope: &Scope) -> Option<Latest> {
        if self.capacity == 0 {
            return None;
        }
        let hit = {
            let inner = self.lock();
            inner
                .entries
                .get(controlid)
                .filter(|entry| scope.allows(&entry.policy))
                .and_then(|entry| {
                    entry
                        .latest
                        .as_ref()
                        .map(|(latest, _)| Latest::clone(latest))
                })
        };
        if hit.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Counts a delivery the caller had to read from the store after [`get`](Self::get)
    /// missed (a lookup that finds nothing at all is not counted: a `GET` that ends `404` or
    /// `202` looks twice).
    pub fn count_miss(&self) {
        if self.capacity > 0 {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counters and size, for `/metrics`; `None` when the cache is off.
    pub fn stats(&self) -> Option<ReadCacheStats> {
        if self.capacity == 0 {
            return None;
        }
        let inner = self.lock();
        Some(ReadCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: inner.bytes as u64,
            entries: inner.entries.len() as u64,
            capacity_bytes: self.capacity as u64,
        })
    }

    /// The generation to pass to [`fill`](Self::fill), taken before reading the store.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Keeps what a reader read at `generation`, unless the writer changed anything since,
    /// the body is too large, or a newer delivery is kept already.
    pub fn fill(&self, generation: u64, fill: Fill<'_>) {
        let Fill {
            controlid,
            id,
            sha256,
            policy,
            body,
        } = fill;
        if body.len() > MAX_ENTRY_BODY_BYTES {
            return;
        }
        // An exact copy: the read buffer may be larger than the body.
        let part = Part::Body(Bytes::copy_from_slice(body));
        self.keep(generation, controlid, id, sha256, policy, part);
    }

    /// Keeps the newest delivery of `controlid` with its count, read at `generation`, whose
    /// decoded form takes about `cost` bytes. The caller makes sure that every delivery of the
    /// controlid has the record's policy (see the module documentation).
    pub fn fill_latest(&self, generation: u64, controlid: &str, latest: &Latest, cost: usize) {
        let record = &latest.record;
        let part = Part::Latest(Box::new(latest.clone()), cost);
        let (id, sha256) = (record.id.0, record.sha256);
        self.keep(generation, controlid, id, sha256, &record.policy, part);
    }

    /// Adds `part` to the entry of `controlid` when it is for the same delivery, or replaces
    /// the entry when `id` is newer; then evicts the oldest fills beyond the capacity.
    fn keep(
        &self,
        generation: u64,
        controlid: &str,
        id: u64,
        sha256: [u8; 32],
        policy: &str,
        part: Part,
    ) {
        if part.cost() + controlid.len() + policy.len() + ENTRY_OVERHEAD_BYTES > self.capacity {
            return;
        }
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        let Inner {
            entries,
            order,
            bytes,
            ..
        } = &mut *inner;
        match entries.get_mut(controlid) {
            Some(old) if old.id > id => return,
            Some(old) if old.id == id => {
                *bytes -= old.cost(controlid);
                part.set(old);
                *bytes += old.cost(controlid);
            }
            old => {
                if let Some(old) = old {
                    *bytes -= old.cost(controlid);
                }
                let mut entry = Entry {
                    id,
                    sha256,
                    policy: policy.into(),
                    body: None,
                    latest: None,
                };
                part.set(&mut entry);
                *bytes += entry.cost(controlid);
                let key: Arc<str> = controlid.into();
                order.push_back((Arc::clone(&key), id));
                entries.insert(key, entry);
            }
        }
        while *bytes > self.capacity {
            let Some((key, id)) = order.pop_front() else {
                break;
            };
            if entries.get(&key).is_some_and(|e| e.id == id) {
                if let Some(gone) = entries.remove(&key) {
                    *bytes -= gone.cost(&key);
                }
            }
        }
        // Stale pairs pile up when entries are replaced: drop them once they dominate.
        if order.len() > 2 * entries.len() + 64 {
            order.retain(|(key, id)| entries.get(key).is_some_and(|e| e.id == *id));
        }
    }

    /// Forgets the given controlids and bumps the generation.
    pub fn invalidate<'a>(&self, controlids: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.lock();
        inner.generation += 1;
        for controlid in controlids {
            if let Some(gone) = inner.entries.remove(controlid) {
                inner.bytes -= gone.cost(controlid);
            }
        }
    }

    /// Forgets everything and bumps the generation.
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.clear();
        inner.order.clear();
        inner.bytes = 0;
    }

    /// Bytes held (bodies, names and bookkeeping), for tests.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(cache: &ReadCache, generation: u64, controlid: &str, id: u64, body: &'static [u8]) {
        cache.fill(
            generation,
            Fill {
                controlid,
                id,
                sha256: [id as u8; 32],
                policy: "p",
                body: &Bytes::from_static(body),
            },
        );
    }

    fn cached_id(cache: &ReadCache, controlid: &str) -> Option<u64> {
        cache.get(controlid, &Scope::All).map(|hit| hit.id.0)
    }

    #[test]
    fn a_fill_after_a_change_is_refused() {
        let cache = ReadCache::new(1 << 20);
        let before = cache.generation();
        cache.invalidate(["other"]);
        fill(&cache, before, "a", 1, b"old");
        assert_eq!(cached_id(&cache, "a"), None);
        fill(&cache, cache.generation(), "a", 1, b"old");
        assert_eq!(cached_id(&cache, "a"), Some(1));
        assert_eq!(
            cache.get("a", &Scope::All).map(|h| h.body),
            Some(Bytes::from_static(b"old"))
        );
    }

    #[test]
    fn an_entry_is_never_replaced_by_an_older_delivery() {
        let cache = ReadCache::new(1 << 20);
        let g = cache.generation();
        fill(&cache, g, "a", 5, b"five");
        fill(&cache, g, "a", 4, b"four");
        assert_eq!(cached_id(&cache, "a"), Some(5));
        fill(&cache, g, "a", 6, b"six");
        assert_eq!(cached_id(&cache, "a"), Some(6));
    }

    #[test]
    fn scope_invalidation_and_clear() {
        let cache = ReadCache::new(1 << 20);
        let g = cache.generation();
        fill(&cache, g, "a", 1, b"x");
        fill(&cache, g, "b", 2, b"y");
        let other = Scope::Policies(vec!["q".to_owned()]);
        assert!(
            cache.get("a", &other).is_none(),
            "another policy's poller reads the store"
        );
        cache.invalidate(["a"]);
        assert_eq!(cached_id(&cache, "a"), None);
        assert_eq!(cached_id(&cache, "b"), Some(2));
        cache.clear();
        assert_eq!(cached_id(&cache, "b"), None);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn the_oldest_fills_go_first_and_the_total_stays_bounded() {
        let body: &'static [u8] = &[b'x'; 1000];
        let cost = body.len() + 2 + 1 + ENTRY_OVERHEAD_BYTES;
        let cache = ReadCache::new(3 * cost);
        let g = cache.generation();
        for (i, name) in ["c1", "c2", "c3", "c4"].into_iter().enumerate() {
            fill(&cache, g, name, i as u64 + 1, body);
            assert!(cache.bytes() <= 3 * cost);
        }
        assert_eq!(cached_id(&cache, "c1"), None);
        assert_eq!(cached_id(&cache, "c4"), Some(4));
        // Replacing an entry many times leaves no pile of stale order pairs behind.
        for id in 5..500 {
            fill(&cache, g, "c4", id, body);
        }
        assert!(cache.lock().order.len() <= 2 * 3 + 64);
        assert!(cache.bytes() <= 3 * cost);
    }

    fn latest(id: u64, policy: &str, deliveries: u32) -> Latest {
        Latest {
            record: crate::store::DeliveryRecord {
                id: DeliveryId(id),
                policy: policy.to_owned(),
                received_at_ms: 7,
                size: 3,
                sha256: [id as u8; 32],
                extracted: crate::xml::Extracted::default(),
            },
            deliveries,
        }
    }

    #[test]
    fn a_record_and_a_body_of_one_delivery_share_an_entry() {
        let cache = ReadCache::new(1 << 20);
        let g = cache.generation();
        cache.fill_latest(g, "a", &latest(3, "p", 2), 500);
        assert!(cache.get("a", &Scope::All).is_none(), "no body yet");
        let hit = cache.get_latest("a", &Scope::All).expect("hit");
        assert_eq!((hit.record.id.0, hit.deliveries), (3, 2));
        let other = Scope::Policies(vec!["q".to_owned()]);
        assert!(cache.get_latest("a", &other).is_none());
        // The body of the same delivery joins the entry, and both count.
        fill(&cache, g, "a", 3, b"abc");
        assert_eq!(cached_id(&cache, "a"), Some(3));
        assert!(cache.get_latest("a", &Scope::All).is_some());
        assert_eq!(cache.bytes(), 500 + 3 + 1 + 1 + ENTRY_OVERHEAD_BYTES);
        // A newer delivery replaces both; an older record does not come back.
        fill(&cache, g, "a", 4, b"four");
        assert!(cache.get_latest("a", &Scope::All).is_none());
        cache.fill_latest(g, "a", &latest(3, "p", 2), 500);
        assert!(cache.get_latest("a", &Scope::All).is_none());
        assert_eq!(cached_id(&cache, "a"), Some(4));
        // Refused after a change, like a body.
        cache.invalidate(["a"]);
        cache.fill_latest(g, "a", &latest(5, "p", 3), 500);
        assert!(cache.get_latest("a", &Scope::All).is_none());
        assert_eq!(cache.bytes(), 0);
        // Too large for the whole cache: not kept.
        let small = ReadCache::new(1000);
        small.fill_latest(small.generation(), "a", &latest(1, "p", 1), 2000);
        assert!(small.get_latest("a", &Scope::All).is_none());
    }

    #[test]
    fn large_bodies_and_a_zero_capacity_keep_nothing() {
        let cache = ReadCache::new(0);
        fill(&cache, cache.generation(), "a", 1, b"x");
        assert_eq!(cached_id(&cache, "a"), None);
        let cache = ReadCache::new(1 << 30);
        let big = Bytes::from(vec![0; MAX_ENTRY_BODY_BYTES + 1]);
        cache.fill(
            cache.generation(),
            Fill {
                controlid: "a",
                id: 1,
                sha256: [0; 32],
                policy: "p",
                body: &big,
            },
        );
        assert_eq!(cached_id(&cache, "a"), None);
    }
}
