//! Durable storage of deliveries, behind a small trait.
//!
//! [`Store`] is what the HTTP layer sees. [`sled_store::SledStore`] is the embedded default and
//! the only code in the crate that imports sled; a networked backend (PostgreSQL, for several
//! instances behind a load balancer) implements the same trait.
//!
//! Invariants every backend keeps:
//! - `put` and `quarantine` return `Ok` only once the bytes are durable (fsynced);
//! - readers never see a delivery before it is durable: every read is bounded by the
//!   *committed* watermark, which is published on a `watch` channel after each commit;
//! - delivery ids grow with arrival order and are never reused.

pub mod sled_store;

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::xml::Extracted;

pub use sled_store::{BackupCounts, BackupItem, RestoreError};
pub use sled_store::{FlushStats, SledOptions, SledStore, DEFAULT_RESERVE_BYTES};

/// Names one stored delivery; ids grow with arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeliveryId(pub u64);

impl DeliveryId {
    /// Parses the 16-hex-digit form produced by `Display`.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(DeliveryId)
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A delivery to store: what the gateway posted, and what was read from it.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    /// The policy id from the callback URL.
    pub policy: String,
    /// Arrival time, milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// The raw body, byte for byte.
    pub body: Bytes,
    /// SHA-256 of `body`.
    pub sha256: [u8; 32],
    /// What the XML extractor found; `extracted.controlid` keys the delivery.
    pub extracted: Extracted,
}

/// One stored delivery, without its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// Its id.
    pub id: DeliveryId,
    /// The policy id it was posted to.
    pub policy: String,
    /// Arrival time, milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// Body size in bytes.
    pub size: u64,
    /// SHA-256 of the body.
    pub sha256: [u8; 32],
    /// What the XML extractor found (`extracted.controlid` is `None` when unmatched).
    pub extracted: Extracted,
}

/// What `put` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// A new delivery was stored.
    Stored(DeliveryId),
    /// The same bytes were already stored for the same controlid and policy: nothing new was
    /// written.
    Duplicate(DeliveryId),
}

impl PutOutcome {
    /// The id of the delivery that holds the bytes.
    pub fn id(self) -> DeliveryId {
        match self {
            PutOutcome::Stored(id) | PutOutcome::Duplicate(id) => id,
        }
    }
}

/// A body that could not be accepted, kept so that nothing the gateway sent is lost.
#[derive(Debug, Clone)]
pub struct NewQuarantine {
    /// The policy id from the callback URL.
    pub policy: String,
    /// Arrival time, milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// The raw body, byte for byte.
    pub body: Bytes,
    /// The one-line reason it was refused.
    pub reason: String,
}

/// One quarantined body, without the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    /// Its id (same space as delivery ids, so arrival order is shared).
    pub id: DeliveryId,
    /// The policy id it was posted to.
    pub policy: String,
    /// Arrival time, milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// Body size in bytes.
    pub size: u64,
    /// Why it was refused.
    pub reason: String,
}

/// Which policies a reader may see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    /// Every policy.
    All,
    /// Only these policy ids.
    Policies(Vec<String>),
}

impl Scope {
    /// Whether a delivery posted to `policy` is visible.
    pub fn allows(&self, policy: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Policies(list) => list.iter().any(|p| p == policy),
        }
    }
}

/// The newest visible delivery of a controlid with its body: what a raw `GET` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestBody {
    /// Its id.
    pub id: DeliveryId,
    /// SHA-256 of the body (the `ETag`).
    pub sha256: [u8; 32],
    /// The raw body.
    pub body: Bytes,
}

/// The newest visible delivery of a controlid, with how many visible deliveries it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest {
    /// The newest delivery.
    pub record: DeliveryRecord,
    /// How many deliveries the controlid has within the scope.
    pub deliveries: u32,
}

/// The longest expectation timeout (30 days), in milliseconds.
pub const MAX_EXPECTATION_TIMEOUT_MS: i64 = 30 * 86_400_000;

/// How much longer than deliveries expectations are kept by retention: the longest timeout, so
/// that an expectation is listed as overdue for at least the retention period.
pub const EXPECTATION_EXTRA_RETENTION_MS: i64 = MAX_EXPECTATION_TIMEOUT_MS;

/// An integrator's record that it awaits the response to a controlid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expectation {
    /// The control-level controlid the integrator sent.
    pub controlid: String,
    /// The poller that recorded it.
    pub poller: String,
    /// When it was recorded, milliseconds since the Unix epoch.
    pub since_ms: i64,
    /// After how long without a callback it counts as overdue.
    pub timeout_seconds: u64,
    /// The policies the poller may read: only a delivery to one of them resolves it.
    #[serde(default = "scope_all")]
    pub scope: Scope,
}

fn scope_all() -> Scope {
    Scope::All
}

/// What `expect` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectOutcome {
    /// A new expectation was recorded.
    Created(Expectation),
    /// The poller already awaited this controlid; its timeout was updated, `since_ms` kept.
    Existed(Expectation),
}

/// Figures about the store, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreStats {
    /// Deliveries stored.
    pub deliveries: u64,
    /// Quarantined bodies stored.
    pub quarantined: u64,
    /// Bytes the database uses on disk.
    pub size_on_disk_bytes: u64,
    /// Flush counters and latency histogram, when the backend has them.
    pub flush: Option<FlushStats>,
    /// The raw `GET`'s memory cache, when the backend has one and it is on.
    pub read_cache: Option<ReadCacheStats>,
}

/// What the memory cache of the raw `GET` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadCacheStats {
    /// Raw `GET`s answered from it.
    pub hits: u64,
    /// Raw `GET`s that read the store.
    pub misses: u64,
    /// Bytes held now (bodies, names, bookkeeping).
    pub bytes: u64,
    /// Controlids held now.
    pub entries: u64,
    /// The most it holds (`read_cache_mb`).
    pub capacity_bytes: u64,
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not read or write (disk full, I/O error).
    #[error("storage i/o error: {0}")]
    Io(String),
    /// A stored record could not be decoded.
    #[error("corrupt record {key}: {reason}")]
    Corrupt {
        /// Which record.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store is shutting down or its writer has stopped.
    #[error("store is closed")]
    Closed,
}

/// The message of a write refused because the data directory's free space is below its reserve
/// (`min_free_disk_bytes`): the refusal happens before anything reaches the disk.
pub const NO_SPACE_MESSAGE: &str =
    "storage full: not enough free space in the data directory for this write and its reserve";

impl StoreError {
    /// Whether this is a write refused for want of space *before* it reached the disk (the
    /// free-space reserve): the store itself is healthy, and takes writes again by itself once
    /// space is freed, so restarting the process would cure nothing. A real `ENOSPC` from the
    /// file system is not this: it leaves sled's handle broken, and is an ordinary I/O error.
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, StoreError::Io(message) if message.starts_with(NO_SPACE_MESSAGE))
    }
}

/// Durable storage of deliveries. See the module documentation for the invariants.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a delivery and returns once it is durable.
    ///
    /// Identical bytes for the same controlid and policy (or, when unmatched, the same policy)
    /// are [`PutOutcome::Duplicate`]; a different body for a known controlid is a further delivery.
    async fn put(&self, delivery: NewDelivery) -> Result<PutOutcome, StoreError>;

    /// Keeps a refused body and returns once it is durable.
    async fn quarantine(&self, item: NewQuarantine) -> Result<DeliveryId, StoreError>;

    /// The newest committed delivery of `controlid` within `scope`.
    async fn latest(&self, controlid: &str, scope: &Scope) -> Result<Option<Latest>, StoreError>;

    /// The newest committed delivery of `controlid` within `scope` with its body, for a raw
    /// `GET`. A backend may answer it without decoding the whole record; the default reads
    /// [`latest`](Self::latest), then [`body_of`](Self::body_of). `None` also when the body
    /// went (a purge) between the two.
    async fn latest_body(
        &self,
        controlid: &str,
        scope: &Scope,
    ) -> Result<Option<LatestBody>, StoreError> {
        let Some(latest) = self.latest(controlid, scope).await? else {
            return Ok(None);
        };
        Ok(self.body_of(&latest.record).await?.map(|body| LatestBody {
            id: latest.record.id,
            sha256: latest.record.sha256,
            body,
        }))
    }

    /// One committed delivery's record.
    async fn record(&self, id: DeliveryId) -> Result<Option<DeliveryRecord>, StoreError>;

    /// One committed delivery's raw body.
    async fn body(&self, id: DeliveryId) -> Result<Option<Bytes>, StoreError>;

    /// The body of a delivery whose record the caller already holds: a backend may read a small
    /// body more cheaply when it knows its size. The default is [`body`](Self::body).
    async fn body_of(&self, record: &DeliveryRecord) -> Result<Option<Bytes>, StoreError> {
        self.body(record.id).await
    }

    /// Up to `limit` committed deliveries with ids above `after`, in arrival order, within `scope`.
    async fn feed(
        &self,
        after: Option<DeliveryId>,
        limit: usize,
        scope: &Scope,
    ) -> Result<Vec<DeliveryRecord>, StoreError>;

    /// Removes every delivery of `controlid` within `scope`; returns how many were removed.
    async fn delete_controlid(&self, controlid: &str, scope: &Scope) -> Result<usize, StoreError>;

    /// Quarantined bodies with ids above `after`, oldest first.
    async fn quarantined(
        &self,
        after: Option<DeliveryId>,
        limit: usize,
    ) -> Result<Vec<QuarantineRecord>, StoreError>;

    /// The raw body of one quarantined item.
    async fn quarantined_body(&self, id: DeliveryId) -> Result<Option<Bytes>, StoreError>;

    /// Records (durably) that `expectation.poller` awaits `expectation.controlid`.
    ///
    /// A put of a matched delivery removes, in the same commit, every expectation of its
    /// controlid whose scope allows the delivery's policy: an expectation lives until a callback
    /// its poller may read arrives (or retention removes it).
    async fn expect(&self, expectation: Expectation) -> Result<ExpectOutcome, StoreError>;

    /// The expectation of `poller` for `controlid`, if still unanswered.
    async fn expectation(
        &self,
        controlid: &str,
        poller: &str,
    ) -> Result<Option<Expectation>, StoreError>;

    /// Every unanswered expectation of `poller`, oldest first.
    async fn expectations(&self, poller: &str) -> Result<Vec<Expectation>, StoreError>;

    /// Removes (durably) the expectations of `controlid` recorded by `poller`; returns how many.
    async fn forget_expectation(&self, controlid: &str, poller: &str) -> Result<usize, StoreError>;

    /// Removes deliveries and quarantined bodies older than `cutoff_ms`, and expectations older
    /// than `cutoff_ms - EXPECTATION_EXTRA_RETENTION_MS`, at most
    /// `batch` per commit so that callbacks are not held up; returns how many were removed.
    async fn purge_older_than(&self, cutoff_ms: i64, batch: usize) -> Result<usize, StoreError>;

    /// The newest committed id, updated after every durable commit.
    fn committed(&self) -> watch::Receiver<DeliveryId>;

    /// Whether a write can currently be made durable (used by `/readyz`).
    async fn check_writable(&self) -> Result<(), StoreError>;

    /// How long the writer has been working on its current group of writes, `None` when it is
    /// idle. A figure that keeps growing means the backend hangs (see `app::STORE_STALL_LIMIT`).
    fn busy_for(&self) -> Option<std::time::Duration> {
        None
    }

    /// Counters and sizes for `/metrics`; a backend without them reports zeros.
    async fn stats(&self) -> StoreStats {
        StoreStats::default()
    }

    /// Flushes everything and stops the writer; later writes fail with [`StoreError::Closed`].
    async fn close(&self) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::StoreError;

    #[test]
    fn out_of_space_is_told_apart_from_other_failures() {
        assert!(StoreError::Io(super::NO_SPACE_MESSAGE.to_owned()).is_out_of_space());
        // A real ENOSPC breaks sled's handle: an i/o error like any other.
        let enospc = std::io::Error::from_raw_os_error(28);
        assert!(!StoreError::Io(format!("sled: {enospc}")).is_out_of_space());
        let eio = std::io::Error::from_raw_os_error(5);
        assert!(!StoreError::Io(eio.to_string()).is_out_of_space());
        assert!(!StoreError::Closed.is_out_of_space());
    }
}
