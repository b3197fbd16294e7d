//! The embedded sled backend of [`Store`](super::Store), and the only module that imports sled.
//!
//! # Key layout
//!
//! Everything lives in sled's default tree (one tree keeps the disk footprint small), told apart
//! by a one-byte prefix. Ids are big-endian `u64`, so key order is arrival order. Strings inside
//! keys are length-prefixed (`u32` big-endian), so a prefix scan never mixes up `ab` and `a\0b`.
//!
//! | key | value | what for |
//! | --- | --- | --- |
//! | `m` id | version `2` ‖ body [`Position`] (16) ‖ JSON of the record, without the body | `record`, `feed`, `body` |
//! | `b` id | the raw body, only for records of version `1` (written before the body log) | `body` |
//! | `c` len controlid id | sha256 (32) ‖ received_at (8) ‖ policy | `latest`, idempotency, delete |
//! | `u` len policy sha256 | id | idempotency of unmatched deliveries |
//! | `P` len policy block | bitmap (big-endian `u64`): bit `i` set when delivery `block × 64 + i` was posted to the policy | `feed` scoped to a few policies |
//! | `p` len policy id | empty | as `P`, one key per delivery: only in databases written before `P` (still read, and removed with their deliveries) |
//! | `t` received_at id | `d` or `q` | retention, only in databases written before the purge walked ids (none are written now: the ids of `m` and `q` are in arrival order, see [`Writer::purge`]) |
//! | `q` id | version byte + JSON of the quarantine record | `quarantined` |
//! | `Q` id | the raw quarantined body | `quarantined_body` |
//! | `e` len controlid len poller | version byte + JSON of the [`Expectation`] | `expectation`, `expectations`, resolution by `put` |
//! | `E` since_ms len controlid len poller | empty | retention of expectations (`purge_older_than`) |
//! | `s/counters` | next id ‖ delivery count (big-endian `u64`s) ‖ body log end ([`Position`]) | counters, where the replay starts ([`Counters`]) |
//! | `s/quarantined`, `s/probe` | big-endian `u64` | counter, probe |
//! | `s/next_id`, `s/deliveries`, `s/log_end` | as `s/counters` | read only from a database written before `s/counters` |
//!
//! Delivery bodies are not in sled: they are in the body log (`bodies/`, see [`segments`]),
//! an append-only sequence of segment files whose records carry the body, the record JSON, the
//! id and a CRC. Metadata is therefore kept apart from bodies, so scans never read a body, and
//! sled (whose own log would write every large value twice) only holds small values.
//! Quarantined bodies stay in sled (`Q`): they are rare, and take the slower path below.
//!
//! # Group commit
//!
//! One writer thread (a plain `std::thread`, named `sled-writer`) owns every mutation. Requests
//! arrive on a bounded tokio channel; the writer takes the first one, then every request already
//! waiting (up to `max_batch`). Each run of consecutive puts appends its bodies to the body log,
//! then writes its sled keys one by one (records, indexes, resolved expectations, and last
//! `s/counters`; see [`Writes`] for why not as a batch); any other request is one atomic sled
//! batch of its own, `s/counters` included when it changes them. Then the writer makes the whole group durable once, publishes the newest id
//! on the `watch` channel, and only then answers each request. Requests that arrive during a
//! flush queue up and form the next group.
//!
//! Making a group durable costs one `fdatasync` of the body log when the group holds only puts:
//! everything a put stores is in its log record, so sled's copy may lag (sled flushes in the
//! background every 500 ms, and on close). At open, the records of the log from `s/log_end` on
//! whose ids sled does not have yet are replayed into sled as the writer would have applied them
//! ([`open_log`]); and deliveries sled has but whose bodies a power cut took from the log's
//! unsynced tail (none of them was acknowledged) are removed, so that the retry is stored anew.
//! A group with any other request (quarantine, delete, expect, purge, probe) also flushes sled
//! (`Db::flush`, plus an `fdatasync` of sled's log file and an `fsync` of any new blob file, see
//! [`Writer::flush`]).
//!
//! If applying or flushing fails, every request of the group is answered [`StoreError::Io`] and
//! the watermark stays where it was; the writer keeps running. Writes applied before the failure
//! stay in sled and become visible (and durable) with the next successful commit: a retried
//! callback then finds them and gets `Duplicate`.
//!
//! # Visibility
//!
//! sled makes an insert visible before it is flushed. Readers therefore never return anything
//! whose id is above the committed watermark: ids are assigned in order and the watermark only
//! moves after a successful flush, so "id ≤ watermark" means "durable". Removals (delete, purge)
//! are not hidden that way: a removed delivery disappears before the removal is durable, and the
//! removal is acknowledged only once it is.
//!
//! # Expectations
//!
//! An [`Expectation`] has no id, so the watermark cannot hide it: a new one (or a new timeout) is
//! visible a moment before `expect` returns, like a removal. What must never show is a controlid
//! that is neither pending nor received. A `put` of a matched delivery removes every expectation
//! of its controlid (of every poller whose scope allows the delivery's policy) in the same sled batch as the delivery itself, so on disk the two
//! change together; but sled shows the removal at once while the delivery stays hidden until its
//! commit. The writer therefore first copies the expectations it removes into an overlay
//! (`Shared::resolving`) that readers consult when the key is gone, and empties it only after a
//! commit has published the watermark (which then covers the delivery). A failed group keeps the
//! overlay until the next successful commit, as it keeps the delivery hidden. A reader that asks
//! for the expectation *before* asking for the delivery therefore always sees one of the two.
//! `forget_expectation` and the purge are plain removals (not hidden).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    DeliveryId, DeliveryRecord, ExpectOutcome, Expectation, Latest, LatestBody, NewDelivery,
    NewQuarantine, PutOutcome, QuarantineRecord, Scope, Store, StoreError, StoreStats,
    NO_SPACE_MESSAGE,
};
use crate::xml::Extracted;
use read_cache::{Fill, ReadCache};
use segments::{Position, SegmentLog, SegmentReader, BODIES_DIR};

mod backup;
mod read_cache;
mod recovery;
mod segments;

pub use backup::{is_locked_error, restore_into, BackupCounts, BackupItem, RestoreError};
pub use recovery::{recover, RecoverError, RecoverReport, RECOVER_HINT};

/// Prefix of delivery records.
const META: u8 = b'm';
/// Prefix of delivery bodies.
const BODY: u8 = b'b';
/// Prefix of the controlid index.
const CONTROLID: u8 = b'c';
/// Prefix of the idempotency index of unmatched deliveries.
const UNMATCHED: u8 = b'u';
/// Prefix of the per-policy index of older databases: one key per delivery.
const POLICY: u8 = b'p';
/// Prefix of the per-policy index: one bitmap per policy and [`POLICY_BLOCK`] ids.
const POLICY_BITS: u8 = b'P';
/// Ids per key of the [`POLICY_BITS`] index: bits of a `u64`.
const POLICY_BLOCK: u64 = 64;
/// Prefix of the arrival-time index.
const TIME: u8 = b't';
/// Prefix of quarantine records.
const QMETA: u8 = b'q';
/// Prefix of quarantine bodies.
const QBODY: u8 = b'Q';
/// Prefix of expectations.
const EXPECT: u8 = b'e';
/// Prefix of the since-time index of expectations.
const EXPECT_TIME: u8 = b'E';

/// The next id to assign.
const NEXT_ID_KEY: &[u8] = b"s/next_id";
/// How many deliveries are stored.
const DELIVERIES_KEY: &[u8] = b"s/deliveries";
/// How many quarantined bodies are stored.
const QUARANTINED_KEY: &[u8] = b"s/quarantined";
/// Written by `check_writable`.
const PROBE_KEY: &[u8] = b"s/probe";
/// Where the body log ended after the last run of puts, before [`COUNTERS_KEY`] (read for a
/// database written before it).
const LOG_END_KEY: &[u8] = b"s/log_end";
/// The next id, the delivery count and the end of the body log, in one value ([`Counters`]):
/// written last by every change of one of them, so that a run of puts, whose keys are applied
/// one by one (see [`Writes`]), is counted exactly when this key is stored. Replaces
/// `s/next_id`, `s/deliveries` and `s/log_end`, which are read only when it is missing.
const COUNTERS_KEY: &[u8] = b"s/counters";

/// Value of a `t` entry (written by older versions) that points at a delivery.
#[cfg(test)]
const KIND_DELIVERY: u8 = b'd';
/// Value of a `t` entry (written by older versions) that points at a quarantined body.
const KIND_QUARANTINE: u8 = b'q';

/// Leading byte of an encoded record: the encoding version.
const RECORD_VERSION: u8 = 1;
/// Leading byte of a delivery record whose body is in the body log: followed by the record's
/// [`Position`] (16 bytes), then the same JSON as [`RECORD_VERSION`]. A record of version 1
/// has its body under the `b` key (stores written before the body log, and nothing since).
const LOCATED_VERSION: u8 = 2;

/// Upper bounds (seconds) of the flush latency histogram buckets.
pub const FLUSH_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// How the sled store is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SledOptions {
    /// sled's page cache size in bytes.
    pub cache_capacity_bytes: u64,
    /// The memory cache of the raw `GET` (the newest small delivery of recently read
    /// controlids), in bytes; 0 turns it off. See `read_cache.rs`.
    pub read_cache_bytes: usize,
    /// The most write requests made durable by one flush.
    pub max_batch: usize,
    /// Free space the disk must keep after a write: below it, writes that add data are refused
    /// (`503`) before sled sees them, so that sled never meets a full disk (it cannot recover
    /// from that without being reopened).
    pub reserve_bytes: u64,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_capacity_bytes: 128 * 1024 * 1024,
            read_cache_bytes: DEFAULT_READ_CACHE_BYTES,
            max_batch: 256,
            reserve_bytes: DEFAULT_RESERVE_BYTES,
        }
    }
}

/// The default [`SledOptions::read_cache_bytes`]: 64 MiB.
pub const DEFAULT_READ_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// The default [`SledOptions::reserve_bytes`]: 64 MiB.
pub const DEFAULT_RESERVE_BYTES: u64 = 64 * 1024 * 1024;

/// Flush counters of the writer, for `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct FlushStats {
    /// Successful flushes (one per group of writes).
    pub flushes: u64,
    /// Failed flushes (or groups that failed before their flush).
    pub failures: u64,
    /// Write requests answered after a successful flush.
    pub requests: u64,
    /// Total time spent flushing, in seconds.
    pub seconds_sum: f64,
    /// Cumulative histogram: for each bound of [`FLUSH_BUCKETS`], how many flushes took at most
    /// that long (the `+Inf` bucket is `flushes + failures`).
    pub buckets: Vec<(f64, u64)>,
}

/// Counters shared by the writer thread and the store handle.
#[derive(Default)]
struct Shared {
    /// Successful flushes.
    flushes: AtomicU64,
    /// Failed groups.
    failures: AtomicU64,
    /// Requests answered after a successful flush.
    requests: AtomicU64,
    /// Nanoseconds spent flushing.
    flush_nanos: AtomicU64,
    /// Non-cumulative counts per bucket of [`FLUSH_BUCKETS`].
    buckets: [AtomicU64; FLUSH_BUCKETS.len()],
    /// Stored deliveries (applied, possibly not yet committed).
    deliveries: AtomicU64,
    /// Stored quarantined bodies.
    quarantined: AtomicU64,
    /// Expectations removed by a `put` whose delivery is not committed yet, by controlid; still
    /// shown as pending by readers (see the module documentation).
    resolving: Mutex<HashMap<String, Vec<Expectation>>>,
    /// When the writer began the group it is working on, `None` between groups.
    group_started: Mutex<Option<Instant>>,
}

impl Shared {
    /// Locks the overlay of resolved expectations, ignoring poisoning (it holds plain data).
    fn resolving(&self) -> MutexGuard<'_, HashMap<String, Vec<Expectation>>> {
        self.resolving.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the start (`Some(now)`) or the end (`None`) of a group.
    fn set_group_started(&self, at: Option<Instant>) {
        *self
            .group_started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = at;
    }
}

/// How many items in a row that are not old enough the purge looks past, for old ones that
/// arrived after them (see [`Writer::purge`]).
const PURGE_LOOK_AHEAD: usize = 1024;

/// What one purge request did.
#[derive(Debug, Clone, Copy)]
struct PurgeStep {
    /// Entries of the time index looked at.
    scanned: usize,
    /// Deliveries, quarantined bodies and expectations removed.
    removed: usize,
}

/// A reply channel.
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A write request for the writer thread.
enum Request {
    /// Store a delivery.
    Put(Box<NewDelivery>, Reply<PutOutcome>),
    /// Keep a refused body.
    Quarantine(Box<NewQuarantine>, Reply<DeliveryId>),
    /// Remove every delivery of a controlid within a scope.
    Delete {
        /// The controlid.
        controlid: String,
        /// Which policies' deliveries may be removed.
        scope: Scope,
        /// Answered with the number removed.
        reply: Reply<usize>,
    },
    /// Record (or refresh) an expectation.
    Expect(Box<Expectation>, Reply<ExpectOutcome>),
    /// Remove the expectation of a poller for a controlid.
    Forget {
        /// The controlid.
        controlid: String,
        /// The poller.
        poller: String,
        /// Answered with the number removed.
        reply: Reply<usize>,
    },
    /// Remove up to `batch` items received (or expected) before `cutoff_ms`.
    Purge {
        /// Milliseconds since the epoch; older items go.
        cutoff_ms: i64,
        /// At most this many entries of the time indexes per request.
        batch: usize,
        /// Answered with what was done.
        reply: Reply<PurgeStep>,
    },
    /// Write a probe key, to check that the disk accepts writes.
    Probe(Reply<()>),
    /// Commit what is queued before it, then stop.
    Close(Reply<()>),
}

/// The answer to one request of a group, sent once the group's fate is known.
type Answer = Box<dyn FnOnce(Option<&str>) + Send>;

/// Builds the answer of a request: its own result if the group commits, `Io` otherwise.
fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Answer {
    Box::new(move |group_error: Option<&str>| {
        let result = match group_error {
            None => result,
            Some(message) => Err(StoreError::Io(message.to_owned())),
        };
        // The caller may have gone away (its request was cancelled); nothing to do then.
        let _ = reply.send(result);
    })
}

/// The sled-backed store.
///
/// Dropping it stops the writer after it has committed what was queued, and waits for it (a
/// short blocking wait for the final flush); prefer [`Store::close`] in async code.
pub struct SledStore {
    /// The writer thread; declared first so that it is joined before `db` is dropped.
    writer: WriterHandle,
    /// The database, for readers; empty only while the writer reopens it (see [`Writer::recover`]).
    db: Arc<DbSlot>,
    /// The readers of the body log.
    segments: Arc<SegmentReader>,
    /// Its directory.
    dir: PathBuf,
    /// The committed watermark.
    committed: Arc<watch::Sender<DeliveryId>>,
    /// Counters shared with the writer.
    shared: Arc<Shared>,
    /// The raw `GET`'s cache; the writer invalidates it.
    cache: Arc<ReadCache>,
    /// Set by `close`; writes are refused from then on.
    closed: AtomicBool,
    /// Test hooks to hold the writer at chosen points.
    #[cfg(test)]
    hooks: Arc<hooks::Hooks>,
}

/// Owns the request channel and the writer thread; dropping it closes the one and joins the other.
struct WriterHandle {
    /// Where requests go; `None` only while dropping.
    tx: Option<mpsc::Sender<Request>>,
    /// The writer thread.
    thread: Option<JoinHandle<()>>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        // Closing the channel makes the writer commit what is queued, flush and return.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("sled writer thread panicked");
            }
        }
    }
}

impl SledStore {
    /// Opens (or creates) the database in `dir` and starts its writer thread.
    ///
    /// This is a blocking call (sled recovers its log here, which takes a while on a large
    /// database). It does not need a tokio runtime, and may be called from inside one; in async
    /// code prefer `tokio::task::spawn_blocking` for a large database. The [`Store`] methods do
    /// need a tokio runtime (readers use `spawn_blocking`).
    pub fn open(dir: &Path, options: SledOptions) -> Result<SledStore, StoreError> {
        let Opened {
            db,
            db_file,
            next_id,
            deliveries,
            quarantined,
            synced_blobs,
            log,
        } = open_db(dir, &options)?;
        let blobs_dir = dir.join("blobs");
        let segments = Arc::new(SegmentReader::new(&dir.join(BODIES_DIR)));

        let shared = Arc::new(Shared::default());
        let cache = Arc::new(ReadCache::new(options.read_cache_bytes));
        shared.deliveries.store(deliveries, Ordering::Relaxed);
        shared.quarantined.store(quarantined, Ordering::Relaxed);
        let committed = Arc::new(watch::Sender::new(DeliveryId(next_id - 1)));
        let slot: Arc<DbSlot> = Arc::new(RwLock::new(Some(db.clone())));

        let max_batch = options.max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch.saturating_mul(4).clamp(64, 1 << 16));
        #[cfg(test)]
        let hooks = Arc::new(hooks::Hooks::default());
        let writer = Writer {
            db: Some(db),
            slot: Arc::clone(&slot),
            dir: dir.to_path_buf(),
            options: options.clone(),
            broken: None,
            short_of_space: None,
            rx,
            max_batch,
            next_id,
            deliveries,
            quarantined,
            committed: Arc::clone(&committed),
            shared: Arc::clone(&shared),
            cache: Arc::clone(&cache),
            log,
            segments: Arc::clone(&segments),
            sled_dirty: false,
            purged: false,
            log_rolled_back: false,
            db_file,
            blobs_dir,
            synced_blobs,
            #[cfg(test)]
            hooks: Arc::clone(&hooks),
        };
        let thread = std::thread::Builder::new()
            .name("sled-writer".to_owned())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Io(format!("starting the writer thread: {e}")))?;

        Ok(SledStore {
            writer: WriterHandle {
                tx: Some(tx),
                thread: Some(thread),
            },
            db: slot,
            segments,
            dir: dir.to_path_buf(),
            committed,
            shared,
            cache,
            closed: AtomicBool::new(false),
            #[cfg(test)]
            hooks,
        })
    }

    /// Bytes used by the database directory (log, snapshots and blobs). Reads file metadata.
    pub fn size_on_disk(&self) -> u64 {
        dir_size(&self.dir, 2)
    }

    /// How many deliveries are stored (kept as a counter, so this is cheap).
    pub fn delivery_count(&self) -> u64 {
        self.shared.deliveries.load(Ordering::Relaxed)
    }

    /// How many quarantined bodies are stored.
    pub fn quarantine_count(&self) -> u64 {
        self.shared.quarantined.load(Ordering::Relaxed)
    }

    /// How many successful flushes the writer made (one per group of writes).
    pub fn flush_count(&self) -> u64 {
        self.shared.flushes.load(Ordering::Relaxed)
    }

    /// Flush counters and latency histogram.
    pub fn flush_stats(&self) -> FlushStats {
        let mut cumulative = 0;
        let buckets = FLUSH_BUCKETS
            .iter()
            .zip(self.shared.buckets.iter())
            .map(|(bound, count)| {
                cumulative += count.load(Ordering::Relaxed);
                (*bound, cumulative)
            })
            .collect();
        FlushStats {
            flushes: self.shared.flushes.load(Ordering::Relaxed),
            failures: self.shared.failures.load(Ordering::Relaxed),
            requests: self.shared.requests.load(Ordering::Relaxed),
            seconds_sum: self.shared.flush_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }

    /// A handle on the database; an error while the writer reopens it after an i/o error.
    pub(crate) fn db(&self) -> Result<sled::Db, StoreError> {
        slot_db(&self.db)
    }

    /// The committed watermark: nothing above it is visible.
    fn watermark(&self) -> u64 {
        self.committed.borrow().0
    }

    /// Sends a write request to the writer and waits for its answer.
    async fn submit<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let tx = self.writer.tx.as_ref().ok_or(StoreError::Closed)?;
        let (reply, response) = oneshot::channel();
        tx.send(make(reply)).await.map_err(|_| StoreError::Closed)?;
        response.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs a read on the blocking pool with a handle on the database and the watermark (read
    /// before the data, so that everything at or below it is durable).
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&sled::Db, u64) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db()?;
        let watermark = self.watermark();
        tokio::task::spawn_blocking(move || f(&db, watermark))
            .await
            .map_err(|e| StoreError::Io(format!("reader task failed: {e}")))?
    }

    /// Runs a *point* read (a few small keys: an index entry, a record, an expectation) on the
    /// calling task. These take microseconds from sled's cache, far less than a hop to the
    /// blocking pool and back, which dominated a `GET`; scans and bodies, which may be large
    /// or cold, still go through [`read`](Self::read).
    fn read_now<T>(
        &self,
        f: impl FnOnce(&sled::Db, u64) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let db = self.db()?;
        f(&db, self.watermark())
    }
}

#[async_trait]
impl Store for SledStore {
    async fn put(&self, delivery: NewDelivery) -> Result<PutOutcome, StoreError> {
        self.submit(|reply| Request::Put(Box::new(delivery), reply))
            .await
    }

    async fn quarantine(&self, item: NewQuarantine) -> Result<DeliveryId, StoreError> {
        self.submit(|reply| Request::Quarantine(Box::new(item), reply))
            .await
    }

    /// From the read cache when it has the answer; otherwise read (and kept in the cache when
    /// its count is the same for every scope, see `read_cache.rs`).
    async fn latest(&self, controlid: &str, scope: &Scope) -> Result<Option<Latest>, StoreError> {
        if let Some(hit) = self.cache.get_latest(controlid, scope) {
            return Ok(Some(hit));
        }
        let generation = self.cache.generation();
        let Some(found) =
            self.read_now(|db, watermark| read_latest(db, watermark, controlid, scope))?
        else {
            return Ok(None);
        };
        self.cache.count_miss();
        if let Some(cost) = found.cache_cost {
            self.cache
                .fill_latest(generation, controlid, &found.latest, cost);
        }
        Ok(Some(found.latest))
    }

    /// From the read cache when it has the answer. Otherwise it reads the index entry and the
    /// record's position, never decoding the record, then the body in one `pread` when it is
    /// small (on the calling task, like the point reads), and keeps the answer in the cache.
    async fn latest_body(
        &self,
        controlid: &str,
        scope: &Scope,
    ) -> Result<Option<LatestBody>, StoreError> {
        if let Some(hit) = self.cache.get(controlid, scope) {
            return Ok(Some(hit));
        }
        let generation = self.cache.generation();
        let Some(head) =
            self.read_now(|db, watermark| read_latest_head(db, watermark, controlid, scope))?
        else {
            return Ok(None);
        };
        let id = head.id;
        let body = match head.at {
            Some(at) => match self.segments.small_body(at, id, FIRST_READ_BYTES) {
                Ok(Some(body)) => Some(body),
                Ok(None) => {
                    let segments = Arc::clone(&self.segments);
                    self.read(move |_, _| segment_body(segments.body(at, id), id))
                        .await?
                }
                Err(e) => segment_body(Err(e), id)?,
            },
            // Written before the body log: the body is a sled value.
            None => self.body(DeliveryId(id)).await?,
        };
        let Some(body) = body else { return Ok(None) };
        self.cache.count_miss();
        if head.newest {
            self.cache.fill(
                generation,
                Fill {
                    controlid,
                    id,
                    sha256: head.sha256,
                    policy: &head.policy,
                    body: &body,
                },
            );
        }
        Ok(Some(LatestBody {
            id: DeliveryId(id),
            sha256: head.sha256,
            body,
        }))
    }

    async fn record(&self, id: DeliveryId) -> Result<Option<DeliveryRecord>, StoreError> {
        if id.0 > self.watermark() {
            return Ok(None);
        }
        self.read_now(|db, _| read_record(db, id.0))
    }

    async fn body(&self, id: DeliveryId) -> Result<Option<Bytes>, StoreError> {
        if id.0 > self.watermark() {
            return Ok(None);
        }
        let segments = Arc::clone(&self.segments);
        self.read(move |db, _| read_body(db, &segments, id.0)).await
    }

    /// A body of at most [`INLINE_BODY_BYTES`] is read on the calling task, like the point
    /// reads: a `GET` of a typical response then never waits for the blocking pool. Larger ones
    /// may be sled blob files read from disk, and go through [`body`](Store::body).
    async fn body_of(&self, record: &DeliveryRecord) -> Result<Option<Bytes>, StoreError> {
        if record.id.0 > self.watermark() {
            return Ok(None);
        }
        if record.size > INLINE_BODY_BYTES {
            return self.body(record.id).await;
        }
        self.read_now(|db, _| read_body(db, &self.segments, record.id.0))
    }

    async fn feed(
        &self,
        after: Option<DeliveryId>,
        limit: usize,
        scope: &Scope,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let scope = scope.clone();
        self.read(move |db, watermark| read_feed(db, watermark, after, limit, &scope))
            .await
    }

    async fn delete_controlid(&self, controlid: &str, scope: &Scope) -> Result<usize, StoreError> {
        let controlid = controlid.to_owned();
        let scope = scope.clone();
        self.submit(|reply| Request::Delete {
            controlid,
            scope,
            reply,
        })
        .await
    }

    async fn quarantined(
        &self,
        after: Option<DeliveryId>,
        limit: usize,
    ) -> Result<Vec<QuarantineRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(move |db, watermark| read_quarantined(db, watermark, after, limit))
            .await
    }

    async fn quarantined_body(&self, id: DeliveryId) -> Result<Option<Bytes>, StoreError> {
        if id.0 > self.watermark() {
            return Ok(None);
        }
        self.read(move |db, _| read_bytes(db, &id_key(QBODY, id.0)))
            .await
    }

    async fn expect(&self, expectation: Expectation) -> Result<ExpectOutcome, StoreError> {
        self.submit(|reply| Request::Expect(Box::new(expectation), reply))
            .await
    }

    async fn expectation(
        &self,
        controlid: &str,
        poller: &str,
    ) -> Result<Option<Expectation>, StoreError> {
        self.read_now(|db, _| read_expectation(db, &self.shared, controlid, poller))
    }

    async fn expectations(&self, poller: &str) -> Result<Vec<Expectation>, StoreError> {
        let poller = poller.to_owned();
        let shared = Arc::clone(&self.shared);
        self.read(move |db, _| read_expectations(db, &shared, &poller))
            .await
    }

    async fn forget_expectation(&self, controlid: &str, poller: &str) -> Result<usize, StoreError> {
        let controlid = controlid.to_owned();
        let poller = poller.to_owned();
        self.submit(|reply| Request::Forget {
            controlid,
            poller,
            reply,
        })
        .await
    }

    /// Runs purge requests of at most `batch` index entries each (deliveries and quarantined
    /// bodies first, then expectations) until one finds fewer, so that callbacks queued behind a
    /// purge wait for one small commit at most.
    async fn purge_older_than(&self, cutoff_ms: i64, batch: usize) -> Result<usize, StoreError> {
        let batch = batch.max(1);
        let mut removed = 0;
        loop {
            let step = self
                .submit(|reply| Request::Purge {
                    cutoff_ms,
                    batch,
                    reply,
                })
                .await?;
            removed += step.removed;
            if step.scanned < batch {
                return Ok(removed);
            }
        }
    }

    fn committed(&self) -> watch::Receiver<DeliveryId> {
        self.committed.subscribe()
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        self.submit(Request::Probe).await
    }

    fn busy_for(&self) -> Option<Duration> {
        let started = *self
            .shared
            .group_started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        started.map(|at| at.elapsed())
    }

    async fn stats(&self) -> StoreStats {
        let dir = self.dir.clone();
        // Walking the directory reads file metadata: keep it off the async workers.
        let size_on_disk_bytes = tokio::task::spawn_blocking(move || dir_size(&dir, 2))
            .await
            .unwrap_or(0);
        StoreStats {
            deliveries: self.delivery_count(),
            quarantined: self.quarantine_count(),
            size_on_disk_bytes,
            flush: Some(self.flush_stats()),
            read_cache: self.cache.stats(),
        }
    }

    /// Commits what is queued, flushes and stops the writer. A second call returns at once.
    async fn close(&self) -> Result<(), StoreError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let Some(tx) = self.writer.tx.as_ref() else {
            return Ok(());
        };
        let (reply, response) = oneshot::channel();
        if tx.send(Request::Close(reply)).await.is_err() {
            // The writer is already gone; there is nothing left to flush through it.
            return self.db()?.flush().map(|_| ()).map_err(sled_error);
        }
        response.await.map_err(|_| StoreError::Closed)?
    }
}

/// The writer thread's state.
struct Writer {
    /// The database; `None` only while [`Writer::recover`] reopens it.
    db: Option<sled::Db>,
    /// The readers' handle on the database, replaced when the database is reopened.
    slot: Arc<DbSlot>,
    /// The database directory.
    dir: PathBuf,
    /// How the database is opened.
    options: SledOptions,
    /// Set when a group failed with an i/o error: the database must be reopened (sled 0.34
    /// refuses every later write after one) no earlier than this instant.
    broken: Option<Instant>,
    /// Set while writes are refused for want of space: the bytes of the largest group refused
    /// in this episode. Until that much (plus the reserve) is free again every write, the
    /// readiness and watchdog probes included, is refused too, so that `/readyz` and the
    /// callbacks agree and the log does not flap between "full" and "back" with each request.
    short_of_space: Option<u64>,
    /// Where requests arrive.
    rx: mpsc::Receiver<Request>,
    /// The most requests per group.
    max_batch: usize,
    /// The next id to assign; ids are never reused, even after a failed write.
    next_id: u64,
    /// Stored deliveries, as persisted in `s/deliveries`.
    deliveries: u64,
    /// Stored quarantined bodies, as persisted in `s/quarantined`.
    quarantined: u64,
    /// The committed watermark.
    committed: Arc<watch::Sender<DeliveryId>>,
    /// Counters shared with the store handle.
    shared: Arc<Shared>,
    /// The raw `GET`'s cache; the writer invalidates it.
    cache: Arc<ReadCache>,
    /// The body log.
    log: SegmentLog,
    /// The readers of the body log (the writer closes a segment there before removing it).
    segments: Arc<SegmentReader>,
    /// Whether the group changed sled beyond what the body log holds, so that its flush must
    /// flush sled too (deliveries alone only need the log synced: see [`replay`]).
    sled_dirty: bool,
    /// Whether a purge ran since the last commit: emptied segments may go.
    purged: bool,
    /// Whether the failure of the current group was a body log write that was cut back.
    log_rolled_back: bool,
    /// sled's log file, for an extra `fdatasync` after each flush.
    db_file: File,
    /// sled's blob directory (values too large for the log live there, one file each).
    blobs_dir: PathBuf,
    /// Blob files known to be durable.
    synced_blobs: HashSet<OsString>,
    /// Test hooks.
    #[cfg(test)]
    hooks: Arc<hooks::Hooks>,
}

impl Writer {
    /// The database; an error only while [`Writer::recover`] could not reopen it.
    fn db(&self) -> Result<&sled::Db, StoreError> {
        self.db.as_ref().ok_or_else(reopening)
    }

    /// Reopens the database after a group failed with an i/o error; `true` once it is usable.
    ///
    /// sled 0.34 keeps the first i/o error of a database (a full disk, say) and refuses every
    /// later write with it until the database is opened again. The writer owns every mutation,
    /// so it can do that safely: it checks that the disk takes a write again, closes the
    /// database (readers get an error for that moment), opens it again (sled recovers its log
    /// up to the last flush), makes whatever the log holds durable, and publishes it. Writes of
    /// the failed groups were answered with an error; those that reached the log before the
    /// failure show up now, and a retried callback finds them as duplicates. Attempts are at
    /// least [`RECOVERY_INTERVAL`] apart.
    fn recover(&mut self) -> bool {
        let Some(not_before) = self.broken else {
            return true;
        };
        let now = Instant::now();
        if now < not_before {
            return false;
        }
        self.broken = Some(now + RECOVERY_INTERVAL);
        // The reopened store may hold less than the cache (orphans removed): start afresh.
        self.cache.clear();
        if let Err(e) = probe_space(&self.dir) {
            tracing::warn!(error = %e, "the data directory still refuses writes; store not reopened");
            return false;
        }
        // Close: every handle must go, or sled's lock on its files stays held.
        let old = self
            .slot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        // sled's drop flushes, and after an i/o error that flush can wait forever: let a
        // thread of its own wait. Until it is done, sled's lock makes the reopen below fail and
        // the store stays unready (`/readyz`, the watchdog); it is tried again later.
        let handles = (old, self.db.take());
        let dropper = std::thread::Builder::new()
            .name("sled-drop".into())
            .spawn(move || drop(handles));
        if let Err(e) = dropper {
            tracing::error!(error = %e, "cannot start a thread to close the broken database");
            return false;
        }
        let mut attempt = 0;
        let opened = loop {
            match open_db(&self.dir, &self.options) {
                Ok(opened) => break opened,
                // A reader may still hold a handle for a moment: its lock goes with it.
                Err(e) if attempt < 40 => {
                    tracing::debug!(error = %e, "reopening the store");
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(25));
                }
                Err(e) => {
                    tracing::error!(error = %e, "reopening the store failed; retrying later");
                    return false;
                }
            }
        };
        let Opened {
            db,
            db_file,
            next_id,
            deliveries,
            quarantined,
            synced_blobs: _,
            log,
        } = opened;
        self.db = Some(db.clone());
        self.db_file = db_file;
        self.log = log;
        self.sled_dirty = true;
        // Blobs written by the failed groups may not be synced: sync every one once.
        self.synced_blobs = HashSet::new();
        // Ids are never reused: keep the larger of what was handed out and what the log holds.
        self.next_id = self.next_id.max(next_id);
        self.deliveries = deliveries;
        self.quarantined = quarantined;
        self.shared.deliveries.store(deliveries, Ordering::Relaxed);
        self.shared
            .quarantined
            .store(quarantined, Ordering::Relaxed);
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "flushing the reopened store failed; retrying later");
            *self
                .slot
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(db);
            return false;
        }
        *self
            .slot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(db);
        // What the log holds is durable now; the expectations a failed put removed are either
        // removed on disk together with their delivery or back in the database.
        let newest = DeliveryId(self.next_id - 1);
        self.committed.send_if_modified(|current| {
            let changed = *current != newest;
            *current = newest;
            changed
        });
        self.shared.resolving().clear();
        self.cache.clear();
        self.broken = None;
        tracing::warn!("store reopened after an i/o error; accepting writes again");
        true
    }

    /// Answers, with a `storage full` error, the requests of `group` that would add data while
    /// the disk's free space is below the reserve (a put whose bytes are stored already is
    /// answered as the duplicate it is); returns the others.
    fn refuse_without_space(&mut self, group: Vec<Request>) -> Vec<Request> {
        let adding: u64 = group.iter().filter_map(added_bytes).sum();
        if adding == 0 {
            return group;
        }
        let available = match fs2::available_space(&self.dir) {
            Ok(available) => available,
            // Unknown: let sled try (and the i/o error path handle a failure).
            Err(_) => return group,
        };
        let needed = adding.max(self.short_of_space.unwrap_or(0));
        if available >= needed.saturating_add(self.options.reserve_bytes) {
            if self.short_of_space.take().is_some() {
                tracing::warn!(
                    available_bytes = available,
                    "free space is back; accepting writes"
                );
            }
            return group;
        }
        let mut refused = Vec::new();
        let mut kept = Vec::new();
        for request in group {
            match request {
                // A retry of bytes already stored and readable adds nothing: it gets its
                // `200` (a duplicate) even now, so the gateway stops sending it.
                Request::Put(delivery, reply) => match self.find_duplicate(&delivery) {
                    Ok(Some(id)) => {
                        answer(reply, Ok(PutOutcome::Duplicate(DeliveryId(id))))(None);
                    }
                    _ => refused.push(Request::Put(delivery, reply)),
                },
                other if added_bytes(&other).is_some() => refused.push(other),
                other => kept.push(other),
            }
        }
        if refused.is_empty() {
            return kept;
        }
        self.shared.failures.fetch_add(1, Ordering::Relaxed);
        if self.short_of_space.replace(needed).is_none() {
            tracing::error!(
                available_bytes = available,
                needed_bytes = needed,
                reserve_bytes = self.options.reserve_bytes,
                "not enough free space in the data directory for this write plus its reserve (min_free_disk_bytes); writes get 503 until space is freed"
            );
        }
        refuse_group(refused, NO_SPACE_MESSAGE);
        kept
    }

    /// Serves groups of requests until the channel closes or a `Close` request arrives.
    fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            #[cfg(test)]
            self.hooks.wait_before_collect();
            let mut group = Vec::with_capacity(self.max_batch.min(64));
            let mut close = None;
            match first {
                Request::Close(reply) => close = Some(reply),
                request => group.push(request),
            }
            while close.is_none() && group.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(Request::Close(reply)) => close = Some(reply),
                    Ok(request) => group.push(request),
                    Err(_) => break,
                }
            }
            if !group.is_empty() {
                let group = self.refuse_without_space(group);
                if group.is_empty() {
                } else if self.broken.is_some() && !self.recover() {
                    refuse_group(group, BROKEN_MESSAGE);
                } else {
                    self.commit_group(group);
                }
            }
            if let Some(reply) = close {
                let result = if self.broken.is_some() && !self.recover() {
                    Err(StoreError::Io(
                        "closing while the database is unwritable after an i/o error".to_owned(),
                    ))
                } else {
                    // Flush sled as well, so that the next open has nothing to replay.
                    self.sled_dirty = true;
                    self.flush()
                };
                if let Err(e) = &result {
                    tracing::error!(error = %e, "flush on close failed");
                }
                let _ = reply.send(result);
                // Requests still queued are dropped with the receiver: their callers get `Closed`.
                return;
            }
        }
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "final flush of the store failed");
        }
    }

    /// Applies a group of requests, makes it durable with one flush, publishes the watermark,
    /// then answers every request.
    fn commit_group(&mut self, group: Vec<Request>) {
        self.shared.set_group_started(Some(Instant::now()));
        self.commit_group_inner(group);
        self.shared.set_group_started(None);
    }

    fn commit_group_inner(&mut self, group: Vec<Request>) {
        let count = group.len() as u64;
        let mut answers: Vec<Answer> = Vec::with_capacity(group.len());
        let mut group_error: Option<String> = None;
        let mut run: Vec<(NewDelivery, Reply<PutOutcome>)> = Vec::new();
        // What the read cache must forget once the group is applied and again once it is
        // visible (see `read_cache.rs`).
        let mut touched: Vec<String> = Vec::new();
        let mut clear_cache = false;
        for request in group {
            // Consecutive puts go to the body log and into sled as one batch.
            if !matches!(request, Request::Put(..)) {
                if !run.is_empty() {
                    self.put_run(std::mem::take(&mut run), &mut answers, &mut group_error);
                }
                // Anything but a delivery lives in sled alone: the group must flush sled.
                self.sled_dirty = true;
            }
            let answer = match request {
                Request::Put(delivery, reply) => {
                    touched.extend(delivery.extracted.controlid.iter().cloned());
                    run.push((*delivery, reply));
                    continue;
                }
                Request::Quarantine(item, reply) => {
                    let result = self.apply(|w| w.quarantine(&item), &mut group_error);
                    answer(reply, result)
                }
                Request::Delete {
                    controlid,
                    scope,
                    reply,
                } => {
                    let result = self.apply(|w| w.delete(&controlid, &scope), &mut group_error);
                    touched.push(controlid);
                    answer(reply, result)
                }
                Request::Expect(expectation, reply) => {
                    let result = self.apply(|w| w.expect(&expectation), &mut group_error);
                    answer(reply, result)
                }
                Request::Forget {
                    controlid,
                    poller,
                    reply,
                } => {
                    let result = self.apply(|w| w.forget(&controlid, &poller), &mut group_error);
                    answer(reply, result)
                }
                Request::Purge {
                    cutoff_ms,
                    batch,
                    reply,
                } => {
                    self.purged = true;
                    let result = self.apply(|w| w.purge(cutoff_ms, batch), &mut group_error);
                    // A purge that removed nothing (the usual case) leaves the cache alone.
                    clear_cache |= !result.as_ref().is_ok_and(|step| step.removed == 0);
                    answer(reply, result)
                }
                Request::Probe(reply) => {
                    let result = self.apply(|w| w.probe(), &mut group_error);
                    answer(reply, result)
                }
                // `run` never puts a `Close` in a group.
                Request::Close(reply) => answer(reply, Ok(())),
            };
            answers.push(answer);
        }
        if !run.is_empty() {
            self.put_run(run, &mut answers, &mut group_error);
        }
        let forget = |cache: &ReadCache| match clear_cache {
            true => cache.clear(),
            false if touched.is_empty() => {}
            false => cache.invalidate(touched.iter().map(String::as_str)),
        };
        forget(&self.cache);

        #[cfg(test)]
        self.hooks.wait_before_flush();

        if group_error.is_none() {
            if let Err(e) = self.flush() {
                group_error = Some(e.to_string());
            }
        }
        match &group_error {
            None => {
                let newest = DeliveryId(self.next_id - 1);
                self.committed.send_if_modified(|current| {
                    let changed = *current != newest;
                    *current = newest;
                    changed
                });
                // The deliveries that resolved these expectations are visible now.
                let mut resolving = self.shared.resolving();
                if !resolving.is_empty() {
                    resolving.clear();
                }
                drop(resolving);
                self.shared.requests.fetch_add(count, Ordering::Relaxed);
                if std::mem::take(&mut self.purged) {
                    self.remove_dead_segments();
                }
            }
            Some(message) => {
                self.shared.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %message, requests = count, "store commit failed");
                // A body log write that was cut back left sled untouched; anything else may
                // have broken sled's handle: reopen before the next write (at once: the next
                // request may find space).
                if !std::mem::take(&mut self.log_rolled_back) {
                    self.broken = Some(Instant::now());
                }
            }
        }
        forget(&self.cache);
        for answer in answers {
            answer(group_error.as_deref());
        }
    }

    /// Runs one request's work unless the group already failed; an I/O error fails the group.
    fn apply<T>(
        &mut self,
        work: impl FnOnce(&mut Self) -> Result<T, StoreError>,
        group_error: &mut Option<String>,
    ) -> Result<T, StoreError> {
        if let Some(message) = group_error {
            return Err(StoreError::Io(message.clone()));
        }
        let result = work(self);
        if let Err(StoreError::Io(message)) = &result {
            *group_error = Some(message.clone());
        }
        result
    }

    /// The [`COUNTERS_KEY`] value for the writer's next id and log end and `deliveries`.
    fn counters(&self, deliveries: u64) -> [u8; 32] {
        Counters {
            next_id: self.next_id,
            deliveries,
            log_end: self.log.position(),
        }
        .to_bytes()
    }

    /// Takes the next id; it is spent even if the write then fails, so ids are never reused.
    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Stores a run of deliveries: each is checked for a duplicate (in sled and earlier in the
    /// run), appended to the body log, and the sled keys of the whole run (records, indexes,
    /// resolved expectations, counters, the log's end) are applied as one batch once the log
    /// holds every body. Answers are pushed to `answers`, to be sent after the group's flush.
    ///
    /// If a body cannot be written (a full disk), the log is cut back to where the run began
    /// and sled is not touched: the group fails, but the store stays usable.
    fn put_run(
        &mut self,
        run: Vec<(NewDelivery, Reply<PutOutcome>)>,
        answers: &mut Vec<Answer>,
        group_error: &mut Option<String>,
    ) {
        let failed_before = group_error.is_some();
        let start = self.log.position();
        let mut pending = RunBatch::default();
        for (delivery, reply) in run {
            let result = self.apply(|w| w.put_one(delivery, &mut pending), group_error);
            answers.push(answer(reply, result));
        }
        if failed_before {
            return;
        }
        if group_error.is_none() {
            match self.log.write_pending() {
                Ok(()) => {
                    if let Err(e) = self.apply_run(pending) {
                        // sled has failed; the log holds the run, and reopening replays it.
                        *group_error = Some(e.to_string());
                    }
                    return;
                }
                Err(e) => *group_error = Some(format!("writing the body log: {e}")),
            }
        }
        match self.log.rollback(start) {
            Ok(()) => self.log_rolled_back = true,
            Err(e) => tracing::error!(error = %e, "cutting back the body log failed"),
        }
    }

    /// One delivery of [`put_run`](Self::put_run).
    ///
    /// A matched delivery also removes every expectation of its controlid, in the run's batch
    /// (a duplicate too): the two become durable together. The body is let go as soon as the
    /// log has it: for a large callback that keeps one copy fewer in memory.
    fn put_one(
        &mut self,
        mut delivery: NewDelivery,
        pending: &mut RunBatch,
    ) -> Result<PutOutcome, StoreError> {
        let mut resolved = match &delivery.extracted.controlid {
            Some(controlid) => {
                resolve_expectations(self.db()?, controlid, &delivery.policy, &mut pending.batch)?
            }
            None => Vec::new(),
        };
        let key = duplicate_key(&delivery);
        let existing = match pending.stored.get(&key) {
            Some(id) => Some(*id),
            None => self.find_duplicate(&delivery)?,
        };
        if let Some(existing) = existing {
            if !resolved.is_empty() {
                // Not in the body log: only sled's flush makes the removal durable.
                self.sled_dirty = true;
            }
            pending.resolved.append(&mut resolved);
            return Ok(PutOutcome::Duplicate(DeliveryId(existing)));
        }
        let record = encode_delivery(&delivery)?;
        let id = self.take_id();
        let at = self
            .log
            .append(id, &record, &delivery.body)
            .map_err(|e| StoreError::Io(format!("writing the body log: {e}")))?;
        drop(std::mem::take(&mut delivery.body));
        insert_delivery(
            &mut pending.batch,
            &mut pending.bits,
            DeliveryKeys {
                id,
                controlid: delivery.extracted.controlid.as_deref(),
                sha256: &delivery.sha256,
                received_at_ms: delivery.received_at_ms,
                policy: &delivery.policy,
            },
            &located_meta(at, &record),
        );
        pending.stored.insert(key, id);
        pending.resolved.append(&mut resolved);
        Ok(PutOutcome::Stored(DeliveryId(id)))
    }

    /// Applies the sled batch of a run whose bodies are in the log.
    fn apply_run(&mut self, pending: RunBatch) -> Result<(), StoreError> {
        let RunBatch {
            mut batch,
            bits,
            resolved,
            stored,
        } = pending;
        let added = stored.len() as u64;
        if added == 0 && resolved.is_empty() {
            return Ok(());
        }
        bits.write(self.db()?, &mut batch)?;
        if added > 0 {
            // After the run's keys: once this is stored, so are they (see [`Writes`]).
            batch.put(COUNTERS_KEY, &self.counters(self.deliveries + added));
        }
        self.apply_resolving(batch, resolved)?;
        self.deliveries += added;
        self.shared
            .deliveries
            .store(self.deliveries, Ordering::Relaxed);
        Ok(())
    }

    /// After a purge is durable: removes the body log segments that no stored delivery points
    /// into any more (everything before the segment of the oldest delivery).
    fn remove_dead_segments(&mut self) {
        let oldest = (|| -> Result<u64, StoreError> {
            for entry in self.db()?.scan_prefix([META]) {
                let (_, raw) = entry.map_err(sled_error)?;
                if let Some(at) = location(&raw) {
                    return Ok(at.segment);
                }
            }
            Ok(self.log.current_segment())
        })();
        let result = oldest.and_then(|keep_from| {
            self.log
                .remove_below(keep_from, &self.segments)
                .map_err(|e| StoreError::Io(format!("removing old body log segments: {e}")))
        });
        match result {
            Ok(0) => {}
            Ok(removed) => tracing::info!(segments = removed, "removed emptied body log segments"),
            // Nothing is lost: they are tried again after the next purge.
            Err(e) => tracing::warn!(error = %e, "could not remove old body log segments"),
        }
    }

    /// The id of a stored delivery with the same bytes for the same controlid (or, unmatched,
    /// the same policy) whose body reads back. Sees writes of the current group, which are
    /// applied but not yet flushed.
    fn find_duplicate(&self, delivery: &NewDelivery) -> Result<Option<u64>, StoreError> {
        let candidates: Vec<u64> = match &delivery.extracted.controlid {
            Some(controlid) => {
                let mut found = Vec::new();
                for entry in self.db()?.scan_prefix(controlid_prefix(controlid)) {
                    let (key, value) = entry.map_err(sled_error)?;
                    let Some(id) = id_suffix(&key) else { continue };
                    if let Some(index) = ControlidEntry::parse(&value) {
                        // The same bytes posted to another policy are a delivery of their own:
                        // a poller scoped to that policy must see them.
                        if index.sha256 == delivery.sha256 && index.policy == delivery.policy {
                            found.push(id);
                        }
                    }
                }
                found
            }
            // The entry points at the newest copy (a new one replaces it).
            None => self
                .db()?
                .get(unmatched_key(&delivery.policy, &delivery.sha256))
                .map_err(sled_error)?
                .and_then(|value| be_u64(&value))
                .into_iter()
                .collect(),
        };
        // An index entry whose record is gone must not swallow a new delivery, nor one whose
        // body cannot be read back: a record sled stored whose log bytes a crash cut short or
        // damaged was never acknowledged, and its retry must be stored. A later copy that reads
        // back (such a retry) is the duplicate.
        for id in candidates {
            let Some(raw) = self.db()?.get(id_key(META, id)).map_err(sled_error)? else {
                continue;
            };
            match read_body_of(self.db()?, &self.segments, id, &raw) {
                Ok(Some(_)) => return Ok(Some(id)),
                Ok(None) => {}
                Err(StoreError::Corrupt { key, reason }) => tracing::warn!(
                    key = %key,
                    reason = %reason,
                    "a stored copy of a callback sent again cannot be read"
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Applies a batch that removes `resolved`, keeping them visible to readers until the next
    /// successful commit (see the module documentation).
    fn apply_resolving(&self, batch: Writes, resolved: Vec<Expectation>) -> Result<(), StoreError> {
        if resolved.is_empty() {
            return batch.apply(self.db()?);
        }
        // Into the overlay first: there must be no moment where the key is gone and the overlay
        // does not have it yet.
        {
            let mut resolving = self.shared.resolving();
            for expectation in &resolved {
                let pending = resolving.entry(expectation.controlid.clone()).or_default();
                pending.retain(|e| e.poller != expectation.poller);
                pending.push(expectation.clone());
            }
        }
        // On an error some removals may have been applied: the overlay keeps showing them (the
        // group fails, so their deliveries stay hidden) until the next commit or the reopen.
        batch.apply(self.db()?)
    }

    /// Records an expectation, or refreshes the timeout of an existing one (keeping its
    /// `since_ms`, hence its place in the time index).
    fn expect(&mut self, expectation: &Expectation) -> Result<ExpectOutcome, StoreError> {
        let key = expect_key(&expectation.controlid, &expectation.poller);
        let existing = match self.db()?.get(&key).map_err(sled_error)? {
            Some(raw) => match decode_expectation(&key, &raw) {
                Ok(existing) => Some(existing),
                Err(e) => {
                    tracing::warn!(error = %e, "replacing an undecodable expectation");
                    None
                }
            },
            None => None,
        };
        let (stored, outcome): (Expectation, fn(Expectation) -> ExpectOutcome) = match existing {
            Some(existing) => (
                Expectation {
                    since_ms: existing.since_ms,
                    ..expectation.clone()
                },
                ExpectOutcome::Existed,
            ),
            None => (expectation.clone(), ExpectOutcome::Created),
        };
        let mut batch = sled::Batch::default();
        batch.insert(key, encode(&stored, "new expectation")?);
        // Rewritten when it exists too: harmless, and it heals a missing entry.
        batch.insert(
            expect_time_key(stored.since_ms, &stored.controlid, &stored.poller),
            &[][..],
        );
        self.db()?.apply_batch(batch).map_err(sled_error)?;
        Ok(outcome(stored))
    }

    /// Removes the expectation of `poller` for `controlid`; returns how many were removed (0 or 1).
    fn forget(&mut self, controlid: &str, poller: &str) -> Result<usize, StoreError> {
        let key = expect_key(controlid, poller);
        let mut removed = 0;
        if let Some(raw) = self.db()?.get(&key).map_err(sled_error)? {
            let mut batch = sled::Batch::default();
            batch.remove(key.clone());
            if let Ok(expectation) = decode_expectation(&key, &raw) {
                batch.remove(expect_time_key(expectation.since_ms, controlid, poller));
            }
            self.db()?.apply_batch(batch).map_err(sled_error)?;
            removed = 1;
        }
        // One already resolved by a `put` that is not committed yet was still shown as pending.
        let mut resolving = self.shared.resolving();
        if let Some(pending) = resolving.get_mut(controlid) {
            let before = pending.len();
            pending.retain(|e| e.poller != poller);
            if pending.len() < before && removed == 0 {
                removed = 1;
            }
            if pending.is_empty() {
                resolving.remove(controlid);
            }
        }
        Ok(removed)
    }

    /// Keeps a refused body.
    fn quarantine(&mut self, item: &NewQuarantine) -> Result<DeliveryId, StoreError> {
        let record = encode_quarantine(item)?;
        let id = self.take_id();
        let mut batch = sled::Batch::default();
        batch.insert(&id_key(QMETA, id)[..], record);
        batch.insert(&id_key(QBODY, id)[..], &item.body[..]);
        batch.insert(COUNTERS_KEY, &self.counters(self.deliveries)[..]);
        batch.insert(QUARANTINED_KEY, &(self.quarantined + 1).to_be_bytes()[..]);
        self.db()?.apply_batch(batch).map_err(sled_error)?;
        self.quarantined += 1;
        self.shared
            .quarantined
            .store(self.quarantined, Ordering::Relaxed);
        Ok(DeliveryId(id))
    }

    /// Removes every delivery of `controlid` within `scope`, in one atomic batch.
    fn delete(&mut self, controlid: &str, scope: &Scope) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut bits = PolicyBits::default();
        let mut removed = 0_u64;
        for entry in self.db()?.scan_prefix(controlid_prefix(controlid)) {
            let (key, value) = entry.map_err(sled_error)?;
            let Some(id) = id_suffix(&key) else { continue };
            match ControlidEntry::parse(&value) {
                Some(index) => {
                    if !scope.allows(index.policy) {
                        continue;
                    }
                    batch.remove(policy_key(index.policy, id));
                    bits.clear(index.policy, id);
                    batch.remove(&time_key(index.received_at_ms, id)[..]);
                }
                // An unreadable index entry names no policy: only an unscoped delete takes it.
                None if *scope == Scope::All => {}
                None => continue,
            }
            batch.remove(key);
            batch.remove(&id_key(META, id)[..]);
            batch.remove(&id_key(BODY, id)[..]);
            removed += 1;
        }
        if removed > 0 {
            bits.write(self.db()?, &mut batch)?;
            let deliveries = self.deliveries.saturating_sub(removed);
            batch.insert(COUNTERS_KEY, &self.counters(deliveries)[..]);
            self.db()?.apply_batch(batch).map_err(sled_error)?;
            self.deliveries = deliveries;
            self.shared.deliveries.store(deliveries, Ordering::Relaxed);
        }
        Ok(usize::try_from(removed).unwrap_or(usize::MAX))
    }

    /// Removes up to `limit` items received (or, for expectations, recorded) before `cutoff_ms`,
    /// in one atomic batch: deliveries and quarantined bodies first, then expectations with what
    /// is left of `limit`.
    ///
    /// Deliveries and quarantined bodies have no time index: their ids are in arrival order, so
    /// each kind is walked from its oldest id, and the walk stops after [`PURGE_LOOK_AHEAD`]
    /// items in a row that were received at or after `cutoff_ms`. In order of arrival the first
    /// such item is followed by younger ones only, unless the clock was once set back: then
    /// the look-ahead finds the old items behind the few stamped ahead of time, and only more
    /// than that many in a row hold them back (until they are old enough themselves). Nothing
    /// goes early either way. Databases written before that still have `t` entries; those are
    /// taken first, as before.
    fn purge(&mut self, cutoff_ms: i64, limit: usize) -> Result<PurgeStep, StoreError> {
        let mut batch = sled::Batch::default();
        let mut bits = PolicyBits::default();
        let mut scanned = 0;
        let mut deliveries = 0_u64;
        let mut quarantined = 0_u64;
        // Ids removed by the `t` entries of an older database, so the walks below skip them.
        let mut taken = HashSet::new();
        let start = [TIME];
        let end = time_prefix(cutoff_ms);
        for entry in self.db()?.range(&start[..]..&end[..]).take(limit) {
            let (key, kind) = entry.map_err(sled_error)?;
            scanned += 1;
            batch.remove(key.clone());
            let Some(id) = id_suffix(&key) else { continue };
            taken.insert(id);
            if kind.first() == Some(&KIND_QUARANTINE) {
                if self
                    .db()?
                    .contains_key(id_key(QMETA, id))
                    .map_err(sled_error)?
                {
                    quarantined += 1;
                }
                batch.remove(&id_key(QMETA, id)[..]);
                batch.remove(&id_key(QBODY, id)[..]);
                continue;
            }
            let Some(raw) = self.db()?.get(id_key(META, id)).map_err(sled_error)? else {
                continue;
            };
            deliveries += 1;
            remove_delivery(self.db()?, &mut batch, &mut bits, id, &raw, false)?;
        }
        for prefix in [META, QMETA] {
            // Records that cannot be decoded have no time: they go with the next old one after
            // them (their smaller id makes them older than it), and stay otherwise.
            let mut undated = Vec::new();
            let mut young = 0;
            for entry in self.db()?.scan_prefix([prefix]) {
                if scanned >= limit {
                    break;
                }
                let (key, raw) = entry.map_err(sled_error)?;
                let Some(id) = id_suffix(&key) else { continue };
                if taken.contains(&id) {
                    continue;
                }
                let received_at_ms = if prefix == META {
                    decode_delivery(id, &raw).map(|r| r.received_at_ms)
                } else {
                    decode_quarantine(id, &raw).map(|r| r.received_at_ms)
                };
                let Ok(received_at_ms) = received_at_ms else {
                    undated.push((id, raw, None));
                    continue;
                };
                if received_at_ms >= cutoff_ms {
                    young += 1;
                    if young >= PURGE_LOOK_AHEAD {
                        break;
                    }
                    continue;
                }
                young = 0;
                undated.push((id, raw, Some(received_at_ms)));
                for (id, raw, received_at_ms) in undated.drain(..) {
                    scanned += 1;
                    if prefix == META {
                        deliveries += 1;
                        remove_delivery(self.db()?, &mut batch, &mut bits, id, &raw, true)?;
                    } else {
                        quarantined += 1;
                        batch.remove(&id_key(QMETA, id)[..]);
                        batch.remove(&id_key(QBODY, id)[..]);
                        if let Some(ms) = received_at_ms {
                            // The entry of an older database, if there is one.
                            batch.remove(&time_key(ms, id)[..]);
                        }
                    }
                }
            }
        }
        let mut expectations = 0_u64;
        let start = [EXPECT_TIME];
        // Expectations outlive deliveries by the longest timeout, so that each one is listed as
        // overdue for at least the retention period before it goes.
        let end =
            expect_time_prefix(cutoff_ms.saturating_sub(super::EXPECTATION_EXTRA_RETENTION_MS));
        for entry in self
            .db()?
            .range(&start[..]..&end[..])
            .keys()
            .take(limit.saturating_sub(scanned))
        {
            let key = entry.map_err(sled_error)?;
            scanned += 1;
            batch.remove(key.clone());
            let Some((since_ms, controlid, poller)) = parse_expect_time_key(&key) else {
                continue;
            };
            let expect_key = expect_key(controlid, poller);
            let Some(raw) = self.db()?.get(&expect_key).map_err(sled_error)? else {
                continue;
            };
            // An entry left behind by an expectation since re-created (at another time) must not
            // take the new one; an undecodable one goes with its only time entry.
            let current = decode_expectation(&expect_key, &raw).map(|e| e.since_ms);
            if current.map_or(true, |since| since == since_ms) {
                batch.remove(expect_key);
                expectations += 1;
            }
        }
        if scanned > 0 {
            bits.write(self.db()?, &mut batch)?;
            let new_deliveries = self.deliveries.saturating_sub(deliveries);
            let new_quarantined = self.quarantined.saturating_sub(quarantined);
            batch.insert(COUNTERS_KEY, &self.counters(new_deliveries)[..]);
            batch.insert(QUARANTINED_KEY, &new_quarantined.to_be_bytes()[..]);
            self.db()?.apply_batch(batch).map_err(sled_error)?;
            self.deliveries = new_deliveries;
            self.quarantined = new_quarantined;
            self.shared
                .deliveries
                .store(new_deliveries, Ordering::Relaxed);
            self.shared
                .quarantined
                .store(new_quarantined, Ordering::Relaxed);
        }
        let removed =
            usize::try_from(deliveries + quarantined + expectations).unwrap_or(usize::MAX);
        Ok(PurgeStep { scanned, removed })
    }

    /// Writes the probe key (made durable by the group's flush).
    fn probe(&mut self) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.db()?
            .insert(PROBE_KEY, &now.to_be_bytes()[..])
            .map_err(sled_error)?;
        Ok(())
    }

    /// Makes everything applied so far durable and records the flush in the counters.
    ///
    /// First the body log is synced (`fdatasync`): for a group of deliveries that is all, as
    /// the log holds them whole and opening the store replays what sled lost. A group that
    /// changed anything else (see `sled_dirty`) flushes sled too, in three steps: new blob
    /// files are fsynced (sled writes a value too large for its log to a file of its own and
    /// never fsyncs it), then `Db::flush` writes and syncs sled's log, then an `fdatasync` of
    /// that file flushes what `sync_file_range` leaves out (the drive's write cache and the
    /// file size). Blobs are synced once more afterwards, for any that sled wrote in the
    /// background in between.
    fn flush(&mut self) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.flush_steps();
        let elapsed = started.elapsed();
        if result.is_ok() {
            self.shared.flushes.fetch_add(1, Ordering::Relaxed);
            self.record_latency(elapsed);
        }
        result
    }

    /// The work of [`Writer::flush`].
    fn flush_steps(&mut self) -> Result<(), StoreError> {
        #[cfg(test)]
        if self.hooks.take_failure() {
            return Err(StoreError::Io("injected flush failure".to_owned()));
        }
        self.log
            .sync()
            .map_err(|e| StoreError::Io(format!("syncing the body log: {e}")))?;
        if !self.sled_dirty {
            return Ok(());
        }
        self.sync_blobs()?;
        self.db()?.flush().map_err(sled_error)?;
        self.db_file
            .sync_data()
            .map_err(|e| StoreError::Io(format!("syncing the log file: {e}")))?;
        self.sync_blobs()?;
        self.sled_dirty = false;
        Ok(())
    }

    /// Fsyncs blob files not synced yet, then their directory.
    fn sync_blobs(&mut self) -> Result<(), StoreError> {
        let Ok(names) = list_dir(&self.blobs_dir) else {
            // No blob directory (yet): nothing to sync.
            return Ok(());
        };
        let mut new = false;
        for name in &names {
            if self.synced_blobs.contains(name) {
                continue;
            }
            match File::open(self.blobs_dir.join(name)) {
                Ok(file) => file
                    .sync_all()
                    .map_err(|e| StoreError::Io(format!("syncing a blob file: {e}")))?,
                // sled removes blobs it no longer needs, possibly right now.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::Io(format!("opening a blob file: {e}"))),
            }
            new = true;
        }
        if new {
            sync_dir(&self.blobs_dir)?;
        }
        self.synced_blobs = names;
        Ok(())
    }

    /// Counts one flush in the latency histogram.
    fn record_latency(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.shared.flush_nanos.fetch_add(nanos, Ordering::Relaxed);
        let seconds = elapsed.as_secs_f64();
        if let Some(index) = FLUSH_BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.shared.buckets[index].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Adds to `batch` the removal of every expectation of `controlid` whose scope allows `policy` and returns
/// the removed expectations that could be decoded.
fn resolve_expectations(
    db: &sled::Db,
    controlid: &str,
    policy: &str,
    batch: &mut impl KeyWrites,
) -> Result<Vec<Expectation>, StoreError> {
    let mut resolved = Vec::new();
    for entry in db.scan_prefix(expect_prefix(controlid)) {
        let (key, raw) = entry.map_err(sled_error)?;
        match decode_expectation(&key, &raw) {
            // A poller that may not read this policy still awaits its own answer.
            Ok(expectation) if !expectation.scope.allows(policy) => {}
            Ok(expectation) => {
                batch.del(&key);
                batch.del(&expect_time_key(
                    expectation.since_ms,
                    &expectation.controlid,
                    &expectation.poller,
                ));
                resolved.push(expectation);
            }
            // Its `E` entry (time unknown) is left to the purge, which checks before removing.
            Err(e) => {
                batch.del(&key);
                tracing::warn!(error = %e, "removing an undecodable expectation");
            }
        }
    }
    Ok(resolved)
}

/// The database handle shared by readers and the writer; empty only while the writer reopens it.
type DbSlot = std::sync::RwLock<Option<sled::Db>>;

/// The shortest time between two attempts to reopen a broken database.
const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes written (and removed) to check that the data directory takes writes again: two of
/// sled's log segments.
const PROBE_FILE_BYTES: usize = 1024 * 1024;

/// A handle from the slot, or the error readers get while the database is being reopened.
fn slot_db(slot: &DbSlot) -> Result<sled::Db, StoreError> {
    slot.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
        .ok_or_else(reopening)
}

/// The error of an operation while the database is closed for reopening.
fn reopening() -> StoreError {
    StoreError::Io("the database is being reopened after an i/o error".to_owned())
}

/// Answers every request of a group with an i/o error, without touching the database.
/// Why a group is refused while the database is being reopened.
const BROKEN_MESSAGE: &str = "storage unavailable after an i/o error (disk full?); retry later";

/// The bytes a request adds to the disk (an estimate: its body plus its records), or `None`
/// for a request that adds (almost) nothing and must go through even on a full disk.
fn added_bytes(request: &Request) -> Option<u64> {
    const RECORD_BYTES: u64 = 4096;
    match request {
        Request::Put(delivery, _) => Some(delivery.body.len() as u64 + RECORD_BYTES),
        Request::Quarantine(quarantine, _) => Some(quarantine.body.len() as u64 + RECORD_BYTES),
        Request::Expect(..) | Request::Probe(_) => Some(RECORD_BYTES),
        Request::Delete { .. } | Request::Forget { .. } | Request::Purge { .. } => None,
        Request::Close(_) => None,
    }
}

fn refuse_group(group: Vec<Request>, message: &str) {
    for request in group {
        let answer = match request {
            Request::Put(_, reply) => answer(reply, Err(StoreError::Io(String::new()))),
            Request::Quarantine(_, reply) => answer(reply, Err(StoreError::Io(String::new()))),
            Request::Delete { reply, .. } | Request::Forget { reply, .. } => {
                answer(reply, Err(StoreError::Io(String::new())))
            }
            Request::Expect(_, reply) => answer(reply, Err(StoreError::Io(String::new()))),
            Request::Purge { reply, .. } => answer(reply, Err(StoreError::Io(String::new()))),
            Request::Probe(reply) | Request::Close(reply) => {
                answer(reply, Err(StoreError::Io(String::new())))
            }
        };
        answer(Some(message));
    }
}

/// Writes, syncs and removes a small file in `dir`: whether the disk takes writes.
fn probe_space(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join("space-probe.tmp");
    let result = (|| {
        let mut file = File::create(&path)?;
        file.write_all(&vec![0u8; PROBE_FILE_BYTES])?;
        file.sync_all()
    })();
    let _ = fs::remove_file(&path);
    result
}

/// A database just opened, with what the writer needs from it.
struct Opened {
    /// The database.
    db: sled::Db,
    /// Its log file, for the extra `fdatasync`.
    db_file: File,
    /// The next id to assign.
    next_id: u64,
    /// Stored deliveries.
    deliveries: u64,
    /// Stored quarantined bodies.
    quarantined: u64,
    /// Blob files present at open.
    synced_blobs: HashSet<OsString>,
    /// The body log, open for appending after its last valid record.
    log: SegmentLog,
}

/// Opens (or creates) the database in `dir` and reads its counters.
fn open_db(dir: &Path, options: &SledOptions) -> Result<Opened, StoreError> {
    fs::create_dir_all(dir)
        .map_err(|e| StoreError::Io(format!("creating {}: {e}", dir.display())))?;
    recovery::check_no_recovery_in_progress(dir)?;
    recovery::remove_unfinished_snapshots(dir)?;
    let db = recovery::open_sled(dir, options.cache_capacity_bytes).map_err(|e| {
        // A lock held by another process keeps its own message (see `is_locked_error`);
        // anything else means sled cannot recover the directory by itself.
        if e.contains("could not acquire lock") {
            StoreError::Io(format!("opening {}: {e}", dir.display()))
        } else {
            StoreError::Io(format!("opening {}: {e}; {RECOVER_HINT}", dir.display()))
        }
    })?;

    let counters = read_counters(&db)?;
    let quarantined = match read_counter(&db, QUARANTINED_KEY)? {
        Some(n) => n,
        None => count_prefix(&db, QMETA)?,
    };

    // sled syncs its log with `sync_file_range` on Linux, which neither flushes the drive's
    // write cache nor the file size; an extra `fdatasync` on the same file does both.
    let db_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("db"))
        .map_err(|e| StoreError::Io(format!("opening {}: {e}", dir.join("db").display())))?;
    let synced_blobs = list_dir(&dir.join("blobs")).unwrap_or_default();
    let (next_id, deliveries, log) = open_log(dir, &db, counters, options.reserve_bytes)?;
    sync_dir(dir)?;
    Ok(Opened {
        db,
        db_file,
        next_id,
        deliveries,
        quarantined,
        synced_blobs,
        log,
    })
}

/// Opens the body log of `dir` after bringing sled up to date with it; returns the next id,
/// the delivery count and the log.
///
/// `counters` are what sled stored last ([`read_counters`]). The log is scanned from the
/// segment of their log end, checking every record's CRC; a torn record at the end of the
/// newest segment (a write that was never acknowledged) is cut off. Then:
///
/// - deliveries that sled has but whose bodies start at or after the log's end are removed
///   ([`remove_orphans`]: a power cut took the log's unsynced tail);
/// - the log's records from the counters' next id on are replayed into sled ([`replay`]):
///   sled's background flush had not stored their runs, or only part of one.
fn open_log(
    dir: &Path,
    db: &sled::Db,
    counters: Option<Counters>,
    reserve_bytes: u64,
) -> Result<(u64, u64, SegmentLog), StoreError> {
    let bodies = dir.join(BODIES_DIR);
    let io = |e: std::io::Error| StoreError::Io(format!("reading {}: {e}", bodies.display()));
    let counted = counters.unwrap_or(Counters {
        next_id: 1,
        deliveries: 0,
        log_end: Position {
            segment: 0,
            offset: 0,
        },
    });
    let counted_next = counted.next_id.max(1);
    let scan =
        segments::scan(&bodies, counted.log_end.segment, |id| id >= counted_next).map_err(io)?;
    if scan.skipped_bytes > 0 {
        tracing::warn!(
            bytes = scan.skipped_bytes,
            kept_as = format!("{BODIES_DIR}/{:016x}.tail-{:x}", scan.end.segment, scan.end.offset),
            "the body log ended in an incomplete record (normally a write cut short by a crash, never acknowledged; a disk fault otherwise); it is cut off and its bytes kept"
        );
    }
    if let Some(first) = scan.damaged.first() {
        tracing::error!(
            records = scan.damaged.len(),
            segment = format!("{:016x}", first.segment),
            offset = first.offset,
            "records of the body log are damaged on disk (CRC mismatch): their deliveries cannot be read; the file is left as it is"
        );
    }
    let deliveries = remove_orphans(db, scan.end, counted_next, counted.deliveries)?;
    // Ids are never reused: also past every record and quarantined body sled has.
    let next_id = initial_next_id(db)?.max(counted_next);
    let (next_id, deliveries) = replay(db, &scan.records, next_id, deliveries, scan.end)?;
    let log = SegmentLog::open(&bodies, scan.end, Some(reserve_bytes)).map_err(io)?;
    Ok((next_id, deliveries, log))
}

/// Removes from sled the newest deliveries whose bodies start at or after `end`, where the
/// body log now ends: sled's background flush stored (part of) their runs before a power cut
/// took the log's unsynced tail, so none of them was acknowledged (the gateway retries them).
/// Returns the delivery count, less those of them that `counted_next` shows were counted.
fn remove_orphans(
    db: &sled::Db,
    end: Position,
    counted_next: u64,
    deliveries: u64,
) -> Result<u64, StoreError> {
    let mut batch = sled::Batch::default();
    let mut bits = PolicyBits::default();
    let mut removed = 0_u64;
    let mut counted = 0_u64;
    for entry in db.scan_prefix([META]).rev() {
        let (key, raw) = entry.map_err(sled_error)?;
        let Some(id) = id_suffix(&key) else { continue };
        match location(&raw) {
            Some(at) if at >= end => remove_delivery(db, &mut batch, &mut bits, id, &raw, true)?,
            _ => break,
        }
        removed += 1;
        if id < counted_next {
            counted += 1;
        }
    }
    if removed == 0 {
        return Ok(deliveries);
    }
    bits.write(db, &mut batch)?;
    let deliveries = deliveries.saturating_sub(counted);
    let counters = Counters {
        next_id: counted_next,
        deliveries,
        log_end: end,
    };
    batch.insert(COUNTERS_KEY, &counters.to_bytes()[..]);
    db.apply_batch(batch).map_err(sled_error)?;
    db.flush().map_err(sled_error)?;
    tracing::warn!(
        deliveries = removed,
        "removed deliveries whose bodies are no longer in the body log (normally lost in a crash before they were acknowledged, and sent again by the gateway)"
    );
    Ok(deliveries)
}

/// Writes into sled the deliveries of `records` (from the body log, ids ascending, none of
/// them counted yet) as the writer would have: record, indexes, resolved expectations,
/// counters; then flushes sled. Keys a partly stored run already has are written again, to
/// the same values. Returns the new next id and delivery count.
fn replay(
    db: &sled::Db,
    records: &[segments::Scanned],
    mut next_id: u64,
    mut deliveries: u64,
    end: Position,
) -> Result<(u64, u64), StoreError> {
    if records.is_empty() {
        return Ok((next_id, deliveries));
    }
    for chunk in records.chunks(1024) {
        let mut batch = sled::Batch::default();
        let mut bits = PolicyBits::default();
        for scanned in chunk {
            let record = match decode_delivery(scanned.id, &scanned.meta) {
                Ok(record) => record,
                // The CRC matched, so this is a record an older or newer version wrote.
                Err(e) => {
                    tracing::error!(error = %e, "skipping an unreadable record of the body log");
                    continue;
                }
            };
            if let Some(controlid) = &record.extracted.controlid {
                resolve_expectations(db, controlid, &record.policy, &mut batch)?;
            }
            insert_delivery(
                &mut batch,
                &mut bits,
                DeliveryKeys {
                    id: scanned.id,
                    controlid: record.extracted.controlid.as_deref(),
                    sha256: &record.sha256,
                    received_at_ms: record.received_at_ms,
                    policy: &record.policy,
                },
                &located_meta(scanned.at, &scanned.meta),
            );
            next_id = next_id.max(scanned.id.saturating_add(1));
            deliveries += 1;
        }
        bits.write(db, &mut batch)?;
        let counters = Counters {
            next_id,
            deliveries,
            log_end: end,
        };
        batch.insert(COUNTERS_KEY, &counters.to_bytes()[..]);
        db.apply_batch(batch).map_err(sled_error)?;
    }
    db.flush().map_err(sled_error)?;
    tracing::info!(
        deliveries = records.len(),
        "replayed deliveries from the body log that sled had not stored before the last stop"
    );
    Ok((next_id, deliveries))
}

/// Reads the newest delivery of a controlid within scope, and how many there are.
fn read_latest(
    db: &sled::Db,
    watermark: u64,
    controlid: &str,
    scope: &Scope,
) -> Result<Option<FoundLatest>, StoreError> {
    let mut ids = Vec::new();
    // The policy of every visible delivery, while they all have the same one.
    let mut one_policy: Option<Option<Vec<u8>>> = None;
    for entry in db.scan_prefix(controlid_prefix(controlid)).rev() {
        let (key, value) = entry.map_err(sled_error)?;
        let Some(id) = id_suffix(&key) else { continue };
        if id > watermark {
            continue;
        }
        let index = ControlidEntry::parse(&value);
        let policy = index.as_ref().map(|i| i.policy.as_bytes());
        match &one_policy {
            None => one_policy = Some(policy.map(<[u8]>::to_vec)),
            Some(Some(first)) if policy == Some(&first[..]) => {}
            Some(_) => one_policy = Some(None),
        }
        match index {
            Some(index) if scope.allows(index.policy) => ids.push(id),
            _ => {}
        }
    }
    let deliveries = u32::try_from(ids.len()).unwrap_or(u32::MAX);
    let same_for_every_scope = matches!(one_policy, Some(Some(_)));
    for (i, id) in ids.into_iter().enumerate() {
        if let Some(raw) = db.get(id_key(META, id)).map_err(sled_error)? {
            let record = decode_delivery(id, &raw)?;
            // Decoded, a record takes about twice its encoded size.
            let cache_cost = (i == 0 && same_for_every_scope).then_some(2 * raw.len());
            return Ok(Some(FoundLatest {
                latest: Latest { record, deliveries },
                cache_cost,
            }));
        }
    }
    Ok(None)
}

/// What [`read_latest`] finds.
struct FoundLatest {
    latest: Latest,
    /// Its size for the read cache, when it may be kept there: it is the newest visible
    /// delivery of the controlid, and every visible one has its policy.
    cache_cost: Option<usize>,
}

/// What [`read_latest_head`] finds: the newest visible delivery's id, SHA-256 and position.
struct LatestHead {
    id: u64,
    sha256: [u8; 32],
    /// `None` for a record written before the body log (its body is a sled value).
    at: Option<Position>,
    policy: String,
    /// Whether it is the newest visible delivery of every policy, not only of the scope's.
    newest: bool,
}

/// The newest delivery of `controlid` within `scope`, from its index entry and the position at
/// the head of its record: no JSON decoded, no count of the others.
fn read_latest_head(
    db: &sled::Db,
    watermark: u64,
    controlid: &str,
    scope: &Scope,
) -> Result<Option<LatestHead>, StoreError> {
    let mut newest = true;
    for entry in db.scan_prefix(controlid_prefix(controlid)).rev() {
        let (key, value) = entry.map_err(sled_error)?;
        let Some(id) = id_suffix(&key) else { continue };
        if id > watermark {
            continue;
        }
        let Some(index) = ControlidEntry::parse(&value).filter(|i| scope.allows(i.policy)) else {
            newest = false;
            continue;
        };
        // A record deleted since the scan is skipped, as in `read_latest`.
        if let Some(raw) = db.get(id_key(META, id)).map_err(sled_error)? {
            return Ok(Some(LatestHead {
                id,
                sha256: index.sha256,
                at: location(&raw),
                policy: index.policy.to_owned(),
                newest,
            }));
        }
        newest = false;
    }
    Ok(None)
}

/// Reads and decodes one delivery record.
fn read_record(db: &sled::Db, id: u64) -> Result<Option<DeliveryRecord>, StoreError> {
    match db.get(id_key(META, id)).map_err(sled_error)? {
        Some(raw) => decode_delivery(id, &raw).map(Some),
        None => Ok(None),
    }
}

/// Reads a body without copying it.
fn read_bytes(db: &sled::Db, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
    Ok(db.get(key).map_err(sled_error)?.map(Bytes::from_owner))
}

/// Reads up to `limit` committed deliveries after `after`, within scope.
///
/// With [`Scope::All`] it walks the record prefix. With a list of policies it walks each policy's
/// index (at most `limit` ids each), merges them and reads only the records it returns, so the
/// work is bounded by `limit` times the number of policies whatever else is stored.
fn read_feed(
    db: &sled::Db,
    watermark: u64,
    after: Option<DeliveryId>,
    limit: usize,
    scope: &Scope,
) -> Result<Vec<DeliveryRecord>, StoreError> {
    let Some(first) = after.map_or(Some(1), |a| a.0.checked_add(1)) else {
        return Ok(Vec::new());
    };
    if first > watermark {
        return Ok(Vec::new());
    }
    match scope {
        Scope::All => {
            let mut records = Vec::with_capacity(limit.min(1024));
            let range = id_key(META, first)..=id_key(META, watermark);
            for entry in db.range(range) {
                let (key, raw) = entry.map_err(sled_error)?;
                let Some(id) = id_suffix(&key) else { continue };
                records.push(decode_delivery(id, &raw)?);
                if records.len() == limit {
                    break;
                }
            }
            Ok(records)
        }
        Scope::Policies(policies) => {
            let mut policies: Vec<&str> = policies.iter().map(String::as_str).collect();
            policies.sort_unstable();
            policies.dedup();
            let mut records = Vec::with_capacity(limit.min(1024));
            let mut from = first;
            // Each round takes up to `limit` ids of every policy from `from` on; the merged
            // list is complete up to the smallest last id of a policy whose list was cut.
            // An index entry may outlive its record (an undecodable record removed by a purge
            // or a delete keeps its bit, since its policy cannot be read): such ids are
            // skipped and the next round goes on after them, so they never end a page early
            // nor hold a cursor in place.
            while records.len() < limit && from <= watermark {
                let mut ids = Vec::new();
                let mut complete_to = watermark;
                for policy in &policies {
                    let (mut some, cut) = policy_ids(db, policy, from, watermark, limit)?;
                    if let (true, Some(last)) = (cut, some.last()) {
                        complete_to = complete_to.min(*last);
                    }
                    ids.append(&mut some);
                }
                ids.sort_unstable();
                ids.dedup();
                for id in ids.into_iter().take_while(|id| *id <= complete_to) {
                    if records.len() == limit {
                        break;
                    }
                    if let Some(record) = read_record(db, id)? {
                        records.push(record);
                    }
                }
                let Some(next) = complete_to.checked_add(1) else {
                    break;
                };
                from = next;
            }
            Ok(records)
        }
    }
}

/// Reads up to `limit` committed quarantine records after `after`.
fn read_quarantined(
    db: &sled::Db,
    watermark: u64,
    after: Option<DeliveryId>,
    limit: usize,
) -> Result<Vec<QuarantineRecord>, StoreError> {
    let Some(first) = after.map_or(Some(1), |a| a.0.checked_add(1)) else {
        return Ok(Vec::new());
    };
    if first > watermark {
        return Ok(Vec::new());
    }
    let mut records = Vec::with_capacity(limit.min(1024));
    for entry in db.range(id_key(QMETA, first)..=id_key(QMETA, watermark)) {
        let (key, raw) = entry.map_err(sled_error)?;
        let Some(id) = id_suffix(&key) else { continue };
        records.push(decode_quarantine(id, &raw)?);
        if records.len() == limit {
            break;
        }
    }
    Ok(records)
}

/// Reads the expectation of `poller` for `controlid`, or the one a not yet committed delivery
/// resolved. The key is read before the overlay, which the writer fills before removing keys and
/// empties only after the watermark covers the delivery.
fn read_expectation(
    db: &sled::Db,
    shared: &Shared,
    controlid: &str,
    poller: &str,
) -> Result<Option<Expectation>, StoreError> {
    let key = expect_key(controlid, poller);
    if let Some(raw) = db.get(&key).map_err(sled_error)? {
        return decode_expectation(&key, &raw).map(Some);
    }
    Ok(shared
        .resolving()
        .get(controlid)
        .and_then(|pending| pending.iter().find(|e| e.poller == poller).cloned()))
}

/// Reads every expectation of `poller` (with those of not yet committed deliveries), ordered by
/// `since_ms`, then controlid. Walks the whole `e` prefix but decodes only the poller's values.
fn read_expectations(
    db: &sled::Db,
    shared: &Shared,
    poller: &str,
) -> Result<Vec<Expectation>, StoreError> {
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    for entry in db.scan_prefix([EXPECT]) {
        let (key, raw) = entry.map_err(sled_error)?;
        match parse_expect_key(&key) {
            Some((controlid, owner)) if owner == poller => {
                seen.insert(controlid.to_owned());
            }
            _ => continue,
        }
        found.push(decode_expectation(&key, &raw)?);
    }
    for pending in shared.resolving().values() {
        for expectation in pending {
            if expectation.poller == poller && !seen.contains(&expectation.controlid) {
                found.push(expectation.clone());
            }
        }
    }
    found.sort_by(|a, b| {
        a.since_ms
            .cmp(&b.since_ms)
            .then_with(|| a.controlid.cmp(&b.controlid))
    });
    Ok(found)
}

/// The next id to assign: the persisted counter, or past the newest key if that is higher.
fn initial_next_id(db: &sled::Db) -> Result<u64, StoreError> {
    let mut next = read_counter(db, NEXT_ID_KEY)?.unwrap_or(1).max(1);
    for prefix in [META, QMETA] {
        if let Some(entry) = db.scan_prefix([prefix]).next_back() {
            let (key, _) = entry.map_err(sled_error)?;
            if let Some(id) = id_suffix(&key) {
                next = next.max(id.saturating_add(1));
            }
        }
    }
    Ok(next)
}

/// Reads a big-endian `u64` counter.
fn read_counter(db: &sled::Db, key: &[u8]) -> Result<Option<u64>, StoreError> {
    match db.get(key).map_err(sled_error)? {
        None => Ok(None),
        Some(raw) => be_u64(&raw).map(Some).ok_or_else(|| StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: "counter is not 8 bytes".to_owned(),
        }),
    }
}

/// Counts the keys under a one-byte prefix (once, when a counter is missing).
fn count_prefix(db: &sled::Db, prefix: u8) -> Result<u64, StoreError> {
    let mut count = 0;
    for key in db.scan_prefix([prefix]).keys() {
        key.map_err(sled_error)?;
        count += 1;
    }
    Ok(count)
}

/// The largest body [`SledStore::body_of`] reads on the calling task.
const INLINE_BODY_BYTES: u64 = 64 * 1024;

/// How much of a record [`SledStore::latest_body`] reads at once: header, encoded record and
/// body of a typical response (a few KB) in one system call; a longer one takes a second read.
const FIRST_READ_BYTES: usize = 8 * 1024;

/// Maps a sled error.
fn sled_error(e: sled::Error) -> StoreError {
    StoreError::Io(format!("sled: {e}"))
}

/// What the keys of one stored delivery are made of.
struct DeliveryKeys<'a> {
    /// Its id.
    id: u64,
    /// Its control-level controlid, `None` when unmatched.
    controlid: Option<&'a str>,
    /// The SHA-256 of its body.
    sha256: &'a [u8; 32],
    /// When it arrived, in Unix milliseconds.
    received_at_ms: i64,
    /// The policy it was posted to.
    policy: &'a str,
}

/// Where [`insert_delivery`], [`remove_delivery`] and [`resolve_expectations`] put their
/// key changes: a `sled::Batch` (applied atomically) or [`Writes`] (applied one by one).
trait KeyWrites {
    /// Sets `key` to `value`.
    fn put(&mut self, key: &[u8], value: &[u8]);
    /// Removes `key`.
    fn del(&mut self, key: &[u8]);
}

impl KeyWrites for sled::Batch {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.insert(key, value);
    }
    fn del(&mut self, key: &[u8]) {
        self.remove(key);
    }
}

/// Key changes applied one by one, in order, by [`Writes::apply`].
///
/// The writer uses them for a run of puts instead of a `sled::Batch`: sled 0.34 writes its log
/// buffer out twice for every `apply_batch` (`PageCache::pin_log` rolls the buffer before and
/// after the batch's reservation), on its IO threads with `sync_file_range`, which competed with
/// the body log's `fdatasync` for the disk and cost about a fifth of the server's CPU under
/// load. A run needs no batch: everything it writes is also in the body log, its keys come
/// before the counters that follow them (`s/next_id` last), and sled recovers a prefix of its
/// own log, so a crash leaves either the whole run or a part that the replay completes
/// ([`open_log`]). Readers do not see a run before its commit (the watermark, and the overlay
/// for removed expectations).
#[derive(Default)]
struct Writes(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl KeyWrites for Writes {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.0.push((key.to_vec(), Some(value.to_vec())));
    }
    fn del(&mut self, key: &[u8]) {
        self.0.push((key.to_vec(), None));
    }
}

impl Writes {
    /// Applies every change, in order; stops at the first error.
    fn apply(self, db: &sled::Db) -> Result<(), StoreError> {
        for (key, value) in self.0 {
            match value {
                Some(value) => db.insert(key, value).map(drop),
                None => db.remove(key).map(drop),
            }
            .map_err(sled_error)?;
        }
        Ok(())
    }
}

/// Adds one delivery's record (`meta`, from [`located_meta`]) and its index entries (by
/// controlid or as unmatched) to `batch`, and its bit of the per-policy index to `bits` (which
/// the caller writes to `batch` once it has gathered them all): the one place that knows which
/// keys a delivery has, for the writer, the replay and a restore alike. The body is in the
/// body log; the counters are the caller's.
fn insert_delivery(
    batch: &mut impl KeyWrites,
    bits: &mut PolicyBits,
    keys: DeliveryKeys<'_>,
    meta: &[u8],
) {
    let DeliveryKeys {
        id,
        controlid,
        sha256,
        received_at_ms,
        policy,
    } = keys;
    batch.put(&id_key(META, id), meta);
    match controlid {
        Some(controlid) => batch.put(
            &controlid_key(controlid, id),
            &controlid_value(sha256, received_at_ms, policy),
        ),
        None => batch.put(&unmatched_key(policy, sha256), &id.to_be_bytes()),
    }
    bits.set(policy, id);
}

/// Adds to `batch` the removal of delivery `id` (sled record `raw`) and its index entries, and
/// to `bits` the clearing of its bit of the per-policy index; with `with_time`, the time entry
/// that databases written before the purge walked ids have (a purge through those entries
/// removes it itself). A record that cannot be decoded still goes; its index entries may stay
/// behind, and readers skip index entries whose record is gone.
fn remove_delivery(
    db: &sled::Db,
    batch: &mut sled::Batch,
    bits: &mut PolicyBits,
    id: u64,
    raw: &[u8],
    with_time: bool,
) -> Result<(), StoreError> {
    if let Ok(record) = decode_delivery(id, raw) {
        // The entry of an older database, if there is one.
        batch.remove(policy_key(&record.policy, id));
        bits.clear(&record.policy, id);
        if with_time {
            batch.remove(&time_key(record.received_at_ms, id)[..]);
        }
        match &record.extracted.controlid {
            Some(controlid) => batch.remove(controlid_key(controlid, id)),
            None => {
                let key = unmatched_key(&record.policy, &record.sha256);
                let points_here =
                    db.get(&key).map_err(sled_error)?.and_then(|v| be_u64(&v)) == Some(id);
                if points_here {
                    batch.remove(key);
                }
            }
        }
    }
    batch.remove(&id_key(META, id)[..]);
    batch.remove(&id_key(BODY, id)[..]);
    Ok(())
}

/// The sled value of a delivery record whose body is in the log at `at`: `record` (from
/// [`encode_delivery`]) with its version byte replaced by [`LOCATED_VERSION`] and the position.
fn located_meta(at: Position, record: &[u8]) -> Vec<u8> {
    let json = record.get(1..).unwrap_or_default();
    let mut out = Vec::with_capacity(17 + json.len());
    out.push(LOCATED_VERSION);
    out.extend_from_slice(&at.to_bytes());
    out.extend_from_slice(json);
    out
}

/// Where the body of a delivery record is in the log; `None` for a record of version 1.
fn location(raw: &[u8]) -> Option<Position> {
    match raw.split_first() {
        Some((&LOCATED_VERSION, rest)) => Position::from_bytes(rest),
        _ => None,
    }
}

/// What identifies a delivery for idempotency: its controlid (or none), policy and SHA-256.
fn duplicate_key(delivery: &NewDelivery) -> Vec<u8> {
    match &delivery.extracted.controlid {
        Some(controlid) => {
            let mut key = controlid_prefix(controlid);
            push_string(&mut key, &delivery.policy);
            key.extend_from_slice(&delivery.sha256);
            key
        }
        None => unmatched_key(&delivery.policy, &delivery.sha256),
    }
}

/// The value of [`COUNTERS_KEY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    /// The next id to assign.
    next_id: u64,
    /// How many deliveries are stored.
    deliveries: u64,
    /// Where the next body log record goes.
    log_end: Position,
}

impl Counters {
    /// `next_id` ‖ `deliveries` ‖ `log_end`, big-endian.
    fn to_bytes(self) -> [u8; 32] {
        let mut out = [0; 32];
        out[..8].copy_from_slice(&self.next_id.to_be_bytes());
        out[8..16].copy_from_slice(&self.deliveries.to_be_bytes());
        out[16..].copy_from_slice(&self.log_end.to_bytes());
        out
    }

    /// The inverse of [`to_bytes`](Self::to_bytes); `None` for a value of another length.
    fn from_bytes(raw: &[u8]) -> Option<Counters> {
        if raw.len() != 32 {
            return None;
        }
        Some(Counters {
            next_id: be_u64(&raw[..8])?,
            deliveries: be_u64(&raw[8..16])?,
            log_end: Position::from_bytes(&raw[16..])?,
        })
    }
}

/// The counters of `db`: from [`COUNTERS_KEY`], or from the keys it replaces (a database
/// written before it; `None` where none was ever written).
fn read_counters(db: &sled::Db) -> Result<Option<Counters>, StoreError> {
    if let Some(raw) = db.get(COUNTERS_KEY).map_err(sled_error)? {
        return Counters::from_bytes(&raw)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt {
                key: "s/counters".to_owned(),
                reason: format!("{} bytes, not 32", raw.len()),
            });
    }
    let Some(next_id) = read_counter(db, NEXT_ID_KEY)? else {
        return Ok(None);
    };
    let deliveries = match read_counter(db, DELIVERIES_KEY)? {
        Some(n) => n,
        None => count_prefix(db, META)?,
    };
    let log_end = db
        .get(LOG_END_KEY)
        .map_err(sled_error)?
        .and_then(|raw| Position::from_bytes(&raw))
        .unwrap_or(Position {
            segment: 0,
            offset: 0,
        });
    Ok(Some(Counters {
        next_id,
        deliveries,
        log_end,
    }))
}

/// The sled side of a run of deliveries, gathered by [`Writer::put_one`].
#[derive(Default)]
struct RunBatch {
    /// Records, indexes and expectation removals.
    batch: Writes,
    /// The run's bits of the per-policy index, written to `batch` at its end.
    bits: PolicyBits,
    /// The expectations the run resolves (for the readers' overlay).
    resolved: Vec<Expectation>,
    /// The deliveries stored by the run, by [`duplicate_key`].
    stored: HashMap<Vec<u8>, u64>,
}

/// Reads the body of delivery `id` whose sled record is `raw`: from the body log, or from the
/// `b` key for a record of version 1. `None` when it is gone (removed meanwhile).
fn read_body_of(
    db: &sled::Db,
    segments: &SegmentReader,
    id: u64,
    raw: &[u8],
) -> Result<Option<Bytes>, StoreError> {
    let Some(at) = location(raw) else {
        return read_bytes(db, &id_key(BODY, id));
    };
    segment_body(segments.body(at, id), id)
}

/// What reading the body of delivery `id` from the log means for the store.
fn segment_body(
    read: Result<Bytes, segments::ReadError>,
    id: u64,
) -> Result<Option<Bytes>, StoreError> {
    match read {
        Ok(body) => Ok(Some(body)),
        // A purge removed the delivery and its segment after the record was read.
        Err(segments::ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(segments::ReadError::Io(e)) => Err(StoreError::Io(format!("reading a body: {e}"))),
        Err(segments::ReadError::Mismatch(reason)) => Err(StoreError::Corrupt {
            key: format!("m/{}", DeliveryId(id)),
            reason,
        }),
    }
}

/// Reads the body of delivery `id`.
fn read_body(
    db: &sled::Db,
    segments: &SegmentReader,
    id: u64,
) -> Result<Option<Bytes>, StoreError> {
    match db.get(id_key(META, id)).map_err(sled_error)? {
        Some(raw) => read_body_of(db, segments, id, &raw),
        None => Ok(None),
    }
}

/// `prefix` followed by the big-endian id.
fn id_key(prefix: u8, id: u64) -> [u8; 9] {
    let mut key = [0; 9];
    key[0] = prefix;
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

/// The id in the last 8 bytes of a key.
fn id_suffix(key: &[u8]) -> Option<u64> {
    let start = key.len().checked_sub(8)?;
    be_u64(&key[start..])
}

/// Decodes exactly 8 big-endian bytes.
fn be_u64(bytes: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(bytes).ok().map(u64::from_be_bytes)
}

/// `prefix` followed by a length-prefixed string.
fn string_prefix(prefix: u8, s: &str, extra: usize) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + 4 + s.len() + extra);
    key.push(prefix);
    key.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    key.extend_from_slice(s.as_bytes());
    key
}

/// The prefix of every index entry of a controlid.
fn controlid_prefix(controlid: &str) -> Vec<u8> {
    string_prefix(CONTROLID, controlid, 8)
}

/// The index entry of one delivery of a controlid.
fn controlid_key(controlid: &str, id: u64) -> Vec<u8> {
    let mut key = controlid_prefix(controlid);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The value of a controlid index entry.
fn controlid_value(sha256: &[u8; 32], received_at_ms: i64, policy: &str) -> Vec<u8> {
    let mut value = Vec::with_capacity(40 + policy.len());
    value.extend_from_slice(sha256);
    value.extend_from_slice(&received_at_ms.to_be_bytes());
    value.extend_from_slice(policy.as_bytes());
    value
}

/// A decoded controlid index value.
struct ControlidEntry<'a> {
    /// SHA-256 of the body.
    sha256: [u8; 32],
    /// Arrival time.
    received_at_ms: i64,
    /// The policy it was posted to.
    policy: &'a str,
}

impl<'a> ControlidEntry<'a> {
    /// Decodes a value written by [`controlid_value`].
    fn parse(value: &'a [u8]) -> Option<Self> {
        let sha256 = <[u8; 32]>::try_from(value.get(..32)?).ok()?;
        let received_at_ms = i64::from_be_bytes(<[u8; 8]>::try_from(value.get(32..40)?).ok()?);
        let policy = std::str::from_utf8(value.get(40..)?).ok()?;
        Some(ControlidEntry {
            sha256,
            received_at_ms,
            policy,
        })
    }
}

/// The idempotency key of an unmatched delivery.
fn unmatched_key(policy: &str, sha256: &[u8; 32]) -> Vec<u8> {
    let mut key = string_prefix(UNMATCHED, policy, 32);
    key.extend_from_slice(sha256);
    key
}

/// The per-policy index entry of one delivery, in a database written before [`POLICY_BITS`].
fn policy_key(policy: &str, id: u64) -> Vec<u8> {
    let mut key = string_prefix(POLICY, policy, 8);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The per-policy bitmap that holds the bit of delivery `id`.
fn policy_bits_key(policy: &str, id: u64) -> Vec<u8> {
    let mut key = string_prefix(POLICY_BITS, policy, 8);
    key.extend_from_slice(&(id / POLICY_BLOCK).to_be_bytes());
    key
}

/// The bit of delivery `id` in its per-policy bitmap.
fn policy_bit(id: u64) -> u64 {
    1 << (id % POLICY_BLOCK)
}

/// Changes to the per-policy index gathered for one batch, by bitmap: one key per policy and
/// 64 ids keeps sled's page table (one entry per leaf of about 8 to 16 keys, resident for the
/// life of the process) small, where one key per delivery made a third of it.
///
/// Each bitmap is read from sled and written once, by [`write`](Self::write), when the batch is
/// complete. That is a read-modify-write: correct because the writer thread is the only one that
/// changes sled while the store is open (and the replay and a restore run before it exists).
#[derive(Default)]
struct PolicyBits(HashMap<Vec<u8>, BitChange>);

/// The bits to set and to clear in one bitmap.
#[derive(Default, Clone, Copy)]
struct BitChange {
    set: u64,
    clear: u64,
}

impl PolicyBits {
    /// Marks delivery `id` as one of `policy`'s.
    fn set(&mut self, policy: &str, id: u64) {
        let change = self.0.entry(policy_bits_key(policy, id)).or_default();
        change.set |= policy_bit(id);
        change.clear &= !policy_bit(id);
    }

    /// Takes delivery `id` out of `policy`'s index.
    fn clear(&mut self, policy: &str, id: u64) {
        let change = self.0.entry(policy_bits_key(policy, id)).or_default();
        change.clear |= policy_bit(id);
        change.set &= !policy_bit(id);
    }

    /// Adds the changed bitmaps to `batch` (a bitmap left empty is removed).
    fn write(self, db: &sled::Db, batch: &mut impl KeyWrites) -> Result<(), StoreError> {
        for (key, change) in self.0 {
            let current = db
                .get(&key)
                .map_err(sled_error)?
                .and_then(|raw| be_u64(&raw))
                .unwrap_or(0);
            match (current & !change.clear) | change.set {
                0 if current == 0 => {}
                0 => batch.del(&key),
                bits if bits == current => {}
                bits => batch.put(&key, &bits.to_be_bytes()),
            }
        }
        Ok(())
    }
}

/// The ids of up to `limit` deliveries of `policy` from `first` to `last`, ascending, from its
/// bitmaps (and the per-delivery entries of an older database, if any), and whether the list
/// was cut at `limit` (there may be more after its last id).
fn policy_ids(
    db: &sled::Db,
    policy: &str,
    first: u64,
    last: u64,
    limit: usize,
) -> Result<(Vec<u64>, bool), StoreError> {
    let mut ids = Vec::new();
    let range = policy_bits_key(policy, first)..=policy_bits_key(policy, last);
    'blocks: for entry in db.range(range) {
        let (key, raw) = entry.map_err(sled_error)?;
        let (Some(block), Some(mut bits)) = (id_suffix(&key), be_u64(&raw)) else {
            continue;
        };
        while bits != 0 {
            let id = block * POLICY_BLOCK + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            if id < first {
                continue;
            }
            if id > last || ids.len() == limit {
                break 'blocks;
            }
            ids.push(id);
        }
    }
    let old = policy_key(policy, first)..=policy_key(policy, last);
    for entry in db.range(old).keys().take(limit) {
        if let Some(id) = id_suffix(&entry.map_err(sled_error)?) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    let cut = ids.len() >= limit;
    ids.truncate(limit);
    Ok((ids, cut))
}

/// A timestamp as bytes that sort like the signed number.
fn time_bytes(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

/// The first key of the time index at `ms`.
fn time_prefix(ms: i64) -> [u8; 9] {
    let mut key = [0; 9];
    key[0] = TIME;
    key[1..].copy_from_slice(&time_bytes(ms));
    key
}

/// The time index entry of one item.
fn time_key(ms: i64, id: u64) -> [u8; 17] {
    let mut key = [0; 17];
    key[..9].copy_from_slice(&time_prefix(ms));
    key[9..].copy_from_slice(&id.to_be_bytes());
    key
}

/// The prefix of every expectation of a controlid (one per poller).
fn expect_prefix(controlid: &str) -> Vec<u8> {
    string_prefix(EXPECT, controlid, 0)
}

/// Appends a length-prefixed string.
fn push_string(key: &mut Vec<u8>, s: &str) {
    key.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    key.extend_from_slice(s.as_bytes());
}

/// The key of the expectation of `poller` for `controlid`.
fn expect_key(controlid: &str, poller: &str) -> Vec<u8> {
    let mut key = string_prefix(EXPECT, controlid, 4 + poller.len());
    push_string(&mut key, poller);
    key
}

/// The first key of the expectation time index at `ms`.
fn expect_time_prefix(ms: i64) -> [u8; 9] {
    let mut key = [0; 9];
    key[0] = EXPECT_TIME;
    key[1..].copy_from_slice(&time_bytes(ms));
    key
}

/// The time index entry of one expectation.
fn expect_time_key(since_ms: i64, controlid: &str, poller: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + 8 + controlid.len() + poller.len());
    key.extend_from_slice(&expect_time_prefix(since_ms));
    push_string(&mut key, controlid);
    push_string(&mut key, poller);
    key
}

/// Splits a length-prefixed string off the front of `bytes`.
fn take_string(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let len = u32::from_be_bytes(<[u8; 4]>::try_from(bytes.get(..4)?).ok()?);
    let end = 4_usize.checked_add(usize::try_from(len).ok()?)?;
    let s = std::str::from_utf8(bytes.get(4..end)?).ok()?;
    Some((s, &bytes[end..]))
}

/// Decodes exactly two length-prefixed strings (controlid, poller).
fn parse_pair(bytes: &[u8]) -> Option<(&str, &str)> {
    let (controlid, rest) = take_string(bytes)?;
    let (poller, rest) = take_string(rest)?;
    rest.is_empty().then_some((controlid, poller))
}

/// The (controlid, poller) of an expectation key.
fn parse_expect_key(key: &[u8]) -> Option<(&str, &str)> {
    match key.split_first()? {
        (&EXPECT, rest) => parse_pair(rest),
        _ => None,
    }
}

/// The (since_ms, controlid, poller) of an expectation time index key.
fn parse_expect_time_key(key: &[u8]) -> Option<(i64, &str, &str)> {
    if key.first() != Some(&EXPECT_TIME) {
        return None;
    }
    let time = u64::from_be_bytes(<[u8; 8]>::try_from(key.get(1..9)?).ok()?);
    let since_ms = (time ^ (1 << 63)) as i64;
    let (controlid, poller) = parse_pair(&key[9..])?;
    Some((since_ms, controlid, poller))
}

/// A delivery record as stored (the id is in the key).
#[derive(Serialize)]
struct StoredDeliveryRef<'a> {
    /// The policy id.
    policy: &'a str,
    /// Arrival time.
    received_at_ms: i64,
    /// Body size.
    size: u64,
    /// SHA-256 of the body, hex.
    sha256: String,
    /// What the extractor found.
    extracted: &'a Extracted,
}

/// A delivery record as read back.
#[derive(Deserialize)]
struct StoredDelivery {
    /// The policy id.
    policy: String,
    /// Arrival time.
    received_at_ms: i64,
    /// Body size.
    size: u64,
    /// SHA-256 of the body, hex.
    sha256: String,
    /// What the extractor found.
    extracted: Extracted,
}

/// A quarantine record as stored (the id is in the key).
#[derive(Serialize)]
struct StoredQuarantineRef<'a> {
    /// The policy id.
    policy: &'a str,
    /// Arrival time.
    received_at_ms: i64,
    /// Body size.
    size: u64,
    /// Why it was refused.
    reason: &'a str,
}

/// A quarantine record as read back.
#[derive(Deserialize)]
struct StoredQuarantine {
    /// The policy id.
    policy: String,
    /// Arrival time.
    received_at_ms: i64,
    /// Body size.
    size: u64,
    /// Why it was refused.
    reason: String,
}

/// Encodes a value with the leading version byte.
fn encode<T: Serialize>(value: &T, what: &str) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![RECORD_VERSION];
    serde_json::to_writer(&mut out, value).map_err(|e| StoreError::Corrupt {
        key: what.to_owned(),
        reason: format!("cannot encode: {e}"),
    })?;
    Ok(out)
}

/// Decodes a value written by [`encode`] under an id key.
fn decode<T: for<'de> Deserialize<'de>>(prefix: u8, id: u64, raw: &[u8]) -> Result<T, StoreError> {
    decode_named(raw, || format!("{}/{}", char::from(prefix), DeliveryId(id)))
}

/// Decodes a value written by [`encode`]; `key` names it in errors.
fn decode_named<T: for<'de> Deserialize<'de>>(
    raw: &[u8],
    key: impl Fn() -> String,
) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { key: key(), reason };
    match raw.split_first() {
        Some((&RECORD_VERSION, json)) => {
            serde_json::from_slice(json).map_err(|e| corrupt(format!("bad json: {e}")))
        }
        Some((&LOCATED_VERSION, rest)) => match rest.get(16..) {
            Some(json) => {
                serde_json::from_slice(json).map_err(|e| corrupt(format!("bad json: {e}")))
            }
            None => Err(corrupt("truncated location".to_owned())),
        },
        Some((version, _)) => Err(corrupt(format!("unknown version {version}"))),
        None => Err(corrupt("empty".to_owned())),
    }
}

/// Encodes the record of a new delivery.
fn encode_delivery(delivery: &NewDelivery) -> Result<Vec<u8>, StoreError> {
    encode(
        &StoredDeliveryRef {
            policy: &delivery.policy,
            received_at_ms: delivery.received_at_ms,
            size: delivery.body.len() as u64,
            sha256: hex::encode(delivery.sha256),
            extracted: &delivery.extracted,
        },
        "new delivery",
    )
}

/// Decodes a delivery record.
fn decode_delivery(id: u64, raw: &[u8]) -> Result<DeliveryRecord, StoreError> {
    let stored: StoredDelivery = decode(META, id, raw)?;
    let mut sha256 = [0; 32];
    hex::decode_to_slice(&stored.sha256, &mut sha256).map_err(|e| StoreError::Corrupt {
        key: format!("m/{}", DeliveryId(id)),
        reason: format!("bad sha256: {e}"),
    })?;
    Ok(DeliveryRecord {
        id: DeliveryId(id),
        policy: stored.policy,
        received_at_ms: stored.received_at_ms,
        size: stored.size,
        sha256,
        extracted: stored.extracted,
    })
}

/// Decodes an expectation stored under `key`.
fn decode_expectation(key: &[u8], raw: &[u8]) -> Result<Expectation, StoreError> {
    decode_named(raw, || match parse_expect_key(key) {
        Some((controlid, poller)) => format!("e/{controlid}/{poller}"),
        None => format!(
            "e/{}",
            String::from_utf8_lossy(key.get(1..).unwrap_or_default())
        ),
    })
}

/// Encodes the record of a quarantined body.
fn encode_quarantine(item: &NewQuarantine) -> Result<Vec<u8>, StoreError> {
    encode(
        &StoredQuarantineRef {
            policy: &item.policy,
            received_at_ms: item.received_at_ms,
            size: item.body.len() as u64,
            reason: &item.reason,
        },
        "new quarantine item",
    )
}

/// Decodes a quarantine record.
fn decode_quarantine(id: u64, raw: &[u8]) -> Result<QuarantineRecord, StoreError> {
    let stored: StoredQuarantine = decode(QMETA, id, raw)?;
    Ok(QuarantineRecord {
        id: DeliveryId(id),
        policy: stored.policy,
        received_at_ms: stored.received_at_ms,
        size: stored.size,
        reason: stored.reason,
    })
}

/// The names in a directory.
fn list_dir(dir: &Path) -> std::io::Result<HashSet<OsString>> {
    fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect()
}

/// Fsyncs a directory so that the files created in it survive a crash (a no-op off Unix).
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::Io(format!("syncing {}: {e}", dir.display())))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Bytes used by the files under `dir`, `depth` levels deep; unreadable entries count as 0.
fn dir_size(dir: &Path, depth: u32) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() && depth > 0 => dir_size(&entry.path(), depth - 1),
            Ok(meta) if meta.is_file() => meta.len(),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod hooks {
    //! Points where a test can hold the writer, to make batching and visibility deterministic.

    use std::sync::{Condvar, Mutex, MutexGuard};

    /// What the test asked for, and where the writer is.
    #[derive(Default)]
    pub(super) struct State {
        /// Hold the writer after it received a group's first request, before it takes the rest.
        pub(super) hold_collect: bool,
        /// Hold the writer after it applied a group, before its flush.
        pub(super) hold_flush: bool,
        /// The writer is being held before a flush.
        pub(super) at_flush: bool,
        /// The writer is being held before collecting a group.
        pub(super) at_collect: bool,
        /// How many of the next flushes fail.
        pub(super) fail_flushes: u32,
    }

    /// The hooks shared by a test and the writer.
    #[derive(Default)]
    pub(super) struct Hooks {
        /// The state.
        state: Mutex<State>,
        /// Signalled on every change.
        changed: Condvar,
    }

    impl Hooks {
        /// Locks the state, ignoring poisoning.
        fn lock(&self) -> MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// Changes the state and wakes the writer.
        pub(super) fn set(&self, change: impl FnOnce(&mut State)) {
            change(&mut self.lock());
            self.changed.notify_all();
        }

        /// Whether the writer is held before a flush.
        pub(super) fn at_flush(&self) -> bool {
            self.lock().at_flush
        }

        /// Called by the writer at each flush: whether this one is to fail.
        pub(super) fn take_failure(&self) -> bool {
            let mut state = self.lock();
            if state.fail_flushes == 0 {
                return false;
            }
            state.fail_flushes -= 1;
            true
        }

        /// Whether the writer is held before collecting a group.
        pub(super) fn at_collect(&self) -> bool {
            self.lock().at_collect
        }

        /// Called by the writer before it collects a group.
        pub(super) fn wait_before_collect(&self) {
            let mut state = self.lock();
            if !state.hold_collect {
                return;
            }
            state.at_collect = true;
            self.changed.notify_all();
            while state.hold_collect {
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.at_collect = false;
        }

        /// Called by the writer before it flushes a group.
        pub(super) fn wait_before_flush(&self) {
            let mut state = self.lock();
            if !state.hold_flush {
                return;
            }
            state.at_flush = true;
            self.changed.notify_all();
            while state.hold_flush {
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.at_flush = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn options() -> SledOptions {
        SledOptions {
            cache_capacity_bytes: 16 * 1024 * 1024,
            read_cache_bytes: DEFAULT_READ_CACHE_BYTES,
            max_batch: 256,
            reserve_bytes: 1024 * 1024,
        }
    }

    fn delivery(policy: &str, controlid: Option<&str>, body: &[u8], at: i64) -> NewDelivery {
        NewDelivery {
            policy: policy.to_owned(),
            received_at_ms: at,
            body: Bytes::copy_from_slice(body),
            sha256: Sha256::digest(body).into(),
            extracted: Extracted {
                controlid: controlid.map(str::to_owned),
                well_formed: true,
                ..Extracted::default()
            },
        }
    }

    fn quarantine_item(policy: &str, body: &[u8], at: i64) -> NewQuarantine {
        NewQuarantine {
            policy: policy.to_owned(),
            received_at_ms: at,
            body: Bytes::copy_from_slice(body),
            reason: "malformed xml".to_owned(),
        }
    }

    fn scope(policies: &[&str]) -> Scope {
        Scope::Policies(policies.iter().map(|p| (*p).to_owned()).collect())
    }

    /// Opens a store, retrying briefly in case the previous handle is still releasing its lock.
    async fn reopen(dir: &Path) -> SledStore {
        let mut last = None;
        for _ in 0..50 {
            match SledStore::open(dir, options()) {
                Ok(store) => return store,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("reopen failed: {last:?}");
    }

    /// Waits until `cond` holds, for at most ten seconds.
    async fn wait_until(mut cond: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }

    fn queued(store: &SledStore) -> usize {
        let tx = store.writer.tx.as_ref().expect("sender");
        tx.max_capacity() - tx.capacity()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn put_then_read_back_byte_exact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let body: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let mut d = delivery("pol", Some("ctl-1"), &body, 1_000);
        d.extracted.control = Some(crate::xml::Control {
            status: Some("success".to_owned()),
            ..Default::default()
        });
        let outcome = store.put(d.clone()).await.expect("put");
        let PutOutcome::Stored(id) = outcome else {
            panic!("expected Stored, got {outcome:?}")
        };
        assert!(*store.committed().borrow() >= id);

        let latest = store
            .latest("ctl-1", &Scope::All)
            .await
            .expect("latest")
            .expect("some");
        assert_eq!(latest.deliveries, 1);
        assert_eq!(latest.record.id, id);
        assert_eq!(latest.record.policy, "pol");
        assert_eq!(latest.record.received_at_ms, 1_000);
        assert_eq!(latest.record.size, body.len() as u64);
        assert_eq!(latest.record.sha256, d.sha256);
        assert_eq!(latest.record.extracted, d.extracted);

        let record = store.record(id).await.expect("record").expect("some");
        assert_eq!(record, latest.record);
        let stored = store.body(id).await.expect("body").expect("some");
        assert_eq!(&stored[..], &body[..]);

        assert!(store
            .latest("other", &Scope::All)
            .await
            .expect("latest")
            .is_none());
        assert!(store
            .record(DeliveryId(id.0 + 1))
            .await
            .expect("record")
            .is_none());
        assert!(store
            .body(DeliveryId(id.0 + 1))
            .await
            .expect("body")
            .is_none());
        assert_eq!(store.delivery_count(), 1);
        store.check_writable().await.expect("writable");
        assert!(store.size_on_disk() > 0);
        store.close().await.expect("close");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn large_body_roundtrip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let body: Vec<u8> = (0..3 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
        let id = store
            .put(delivery("pol", Some("big"), &body, 1))
            .await
            .expect("put")
            .id();
        // The body is in the body log, not in sled (which would keep it in a blob file).
        assert!(list_dir(&dir.path().join("blobs")).map_or(true, |blobs| blobs.is_empty()));
        assert!(dir_size(&dir.path().join(BODIES_DIR), 0) > body.len() as u64);
        drop(store);
        let store = reopen(dir.path()).await;
        let stored = store.body(id).await.expect("body").expect("some");
        assert_eq!(stored.len(), body.len());
        assert!(stored[..] == body[..]);
        // `body_of` gives the same bytes, for a blob (through the blocking pool) and for a
        // small body (read inline).
        let record = store.record(id).await.expect("record").expect("some");
        let of = store
            .body_of(&record)
            .await
            .expect("body_of")
            .expect("some");
        assert!(of[..] == body[..]);
        let small_id = store
            .put(delivery("pol", Some("small"), b"<response>s</response>", 2))
            .await
            .expect("put")
            .id();
        let small = store.record(small_id).await.expect("record").expect("some");
        assert_eq!(
            store.body_of(&small).await.expect("body_of").as_deref(),
            Some(&b"<response>s</response>"[..])
        );
    }

    /// The scan of the whole body log of the store in `dir`.
    fn scan_log(dir: &Path) -> segments::Scan {
        segments::scan(&dir.join(BODIES_DIR), 0, |_| true).expect("scan")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn deliveries_only_in_the_body_log_are_replayed_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let first = store
            .put(delivery("pol", Some("ctl-1"), b"<response>1</response>", 1))
            .await
            .expect("put")
            .id();
        store
            .expect(expectation("ctl-2", "alice", 5, 60))
            .await
            .expect("expect");
        store.close().await.expect("close");
        drop(store);

        // What a group acknowledged after the log's fdatasync but before sled's background
        // flush leaves behind: the delivery in the log only.
        let scan = scan_log(dir.path());
        assert_eq!(scan.records.len(), 1);
        let mut log = SegmentLog::open(&dir.path().join(BODIES_DIR), scan.end, None).expect("log");
        let lost = delivery("pol", Some("ctl-2"), b"<response>2</response>", 7);
        let lost_id = first.0 + 1;
        log.append(
            lost_id,
            &encode_delivery(&lost).expect("encode"),
            &lost.body,
        )
        .expect("append");
        log.sync().expect("sync");
        drop(log);

        let store = reopen(dir.path()).await;
        let latest = store
            .latest("ctl-2", &Scope::All)
            .await
            .expect("latest")
            .expect("replayed");
        assert_eq!(latest.record.id, DeliveryId(lost_id));
        assert_eq!(latest.record.received_at_ms, 7);
        assert_eq!(
            store
                .body(DeliveryId(lost_id))
                .await
                .expect("body")
                .as_deref(),
            Some(&b"<response>2</response>"[..])
        );
        assert_eq!(store.delivery_count(), 2);
        // The replay resolved the expectation as the put would have, and ids go on after it.
        assert!(store
            .expectation("ctl-2", "alice")
            .await
            .expect("expectation")
            .is_none());
        let next = store
            .put(delivery("pol", Some("ctl-3"), b"<response>3</response>", 9))
            .await
            .expect("put")
            .id();
        assert!(next.0 > lost_id);
        // The same bytes again are a duplicate of the replayed delivery.
        let again = store.put(lost.clone()).await.expect("put");
        assert!(matches!(again, PutOutcome::Duplicate(id) if id.0 == lost_id));
        store.close().await.expect("close");
        drop(store);
        // A second open replays nothing more.
        let store = reopen(dir.path()).await;
        assert_eq!(store.delivery_count(), 3);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_run_that_sled_stored_only_in_part_is_completed_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let first = store
            .put(delivery("pol", Some("a"), b"<response>a</response>", 1))
            .await
            .expect("put")
            .id();
        let second = store
            .put(delivery("pol", Some("b"), b"<response>b</response>", 2))
            .await
            .expect("put")
            .id();
        store.close().await.expect("close");
        drop(store);

        // A prefix of the second run's keys, as sled may recover it after a crash: its record
        // but not its index entries nor the counters after them.
        let db = recovery::open_sled(dir.path(), 1 << 20).expect("sled");
        db.remove(controlid_key("b", second.0)).expect("remove");
        db.insert(
            policy_bits_key("pol", second.0),
            &policy_bit(first.0).to_be_bytes()[..],
        )
        .expect("insert");
        let mut counters = read_counters(&db).expect("read").expect("counters");
        assert_eq!(counters.deliveries, 2);
        counters.next_id = second.0;
        counters.deliveries = 1;
        db.insert(COUNTERS_KEY, &counters.to_bytes()[..])
            .expect("insert");
        db.flush().expect("flush");
        drop(db);

        let store = reopen(dir.path()).await;
        let latest = store
            .latest("b", &scope(&["pol"]))
            .await
            .expect("latest")
            .expect("completed by the replay");
        assert_eq!(latest.record.id, second);
        assert_eq!(latest.deliveries, 1);
        assert!(store
            .latest("a", &Scope::All)
            .await
            .expect("latest")
            .is_some());
        assert_eq!(store.delivery_count(), 2);
        let feed = store.feed(None, 10, &scope(&["pol"])).await.expect("feed");
        assert_eq!(
            feed.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![first, second]
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn deliveries_whose_bodies_the_log_lost_are_removed_and_the_torn_tail_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let kept = delivery("pol", Some("a"), b"<response>a</response>", 1);
        let lost = delivery("pol", None, b"<response>b</response>", 2);
        let kept_id = store.put(kept).await.expect("put").id();
        let lost_id = store.put(lost.clone()).await.expect("put").id();
        store.close().await.expect("close");
        drop(store);

        // A power cut that took the log's unsynced tail after sled had stored the group:
        // the second record is cut in the middle.
        let scan = scan_log(dir.path());
        let torn = scan.records[1].at;
        let path = dir
            .path()
            .join(BODIES_DIR)
            .join(format!("{:016x}.seg", torn.segment));
        let file = OpenOptions::new().write(true).open(&path).expect("segment");
        file.set_len(torn.offset + 10).expect("truncate");
        drop(file);

        let store = reopen(dir.path()).await;
        assert!(store.record(lost_id).await.expect("record").is_none());
        assert!(store.body(kept_id).await.expect("body").is_some());
        assert_eq!(store.delivery_count(), 1);
        // The retry is stored anew, not taken for a duplicate of the lost one.
        let retry = store.put(lost).await.expect("put");
        let PutOutcome::Stored(retry_id) = retry else {
            panic!("expected Stored, got {retry:?}")
        };
        assert_eq!(
            store.body(retry_id).await.expect("body").as_deref(),
            Some(&b"<response>b</response>"[..])
        );
        let tail = dir
            .path()
            .join(BODIES_DIR)
            .join(format!("{:016x}.tail-{:x}", torn.segment, torn.offset));
        // The 10 bytes left of the record end with two zero bytes (of its id), and zeros at
        // the end are not kept (they may be a preallocated segment's free space).
        assert_eq!(fs::read(&tail).expect("tail kept").len(), 8);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn purge_removes_body_log_segments_nothing_points_into() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let big = (segments::SEGMENT_BYTES / 3) as usize;
        let mut ids = Vec::new();
        for i in 0..5_u8 {
            let body = vec![b'a' + i; big];
            let id = store
                .put(delivery("pol", Some(&format!("c{i}")), &body, i64::from(i)))
                .await
                .expect("put")
                .id();
            ids.push(id);
        }
        let bodies = dir.path().join(BODIES_DIR);
        let before = segments::list_segments(&bodies).expect("list");
        assert!(before.len() >= 2, "{before:?}");
        let last_segment = scan_log(dir.path()).records[4].at.segment;
        assert_eq!(store.purge_older_than(4, 100).await.expect("purge"), 4);
        let after = segments::list_segments(&bodies).expect("list");
        assert_eq!(
            after.first(),
            Some(&last_segment),
            "{before:?} -> {after:?}"
        );
        assert!(after.len() < before.len());
        let body = store.body(ids[4]).await.expect("body").expect("some");
        assert!(body.iter().all(|b| *b == b'e') && body.len() == big);
        store.close().await.expect("close");
        drop(store);
        let store = reopen(dir.path()).await;
        assert_eq!(store.delivery_count(), 1);
        assert!(store.body(ids[4]).await.expect("body").is_some());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn identical_is_duplicate_and_different_is_a_new_delivery() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let first = store
            .put(delivery("pol", Some("c1"), b"<response>1</response>", 1))
            .await
            .expect("put");
        let again = store
            .put(delivery("pol", Some("c1"), b"<response>1</response>", 2))
            .await
            .expect("put");
        assert!(matches!(first, PutOutcome::Stored(_)));
        assert_eq!(again, PutOutcome::Duplicate(first.id()));

        let second = store
            .put(delivery("pol", Some("c1"), b"<response>2</response>", 3))
            .await
            .expect("put");
        let PutOutcome::Stored(second_id) = second else {
            panic!("expected Stored, got {second:?}")
        };
        assert!(second_id > first.id());
        let latest = store
            .latest("c1", &Scope::All)
            .await
            .expect("latest")
            .expect("some");
        assert_eq!(latest.record.id, second_id);
        assert_eq!(latest.deliveries, 2);
        // Re-sending the first body again is still a duplicate of the first delivery.
        let third = store
            .put(delivery("pol", Some("c1"), b"<response>1</response>", 4))
            .await
            .expect("put");
        assert_eq!(third, PutOutcome::Duplicate(first.id()));
        assert_eq!(store.delivery_count(), 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn duplicates_within_one_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SledStore::open(dir.path(), options()).expect("open"));
        store.hooks.set(|s| s.hold_collect = true);
        let a = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.put(delivery("pol", Some("same"), b"x", 1)).await }
        });
        wait_until(|| store.hooks.at_collect()).await;
        let mut rest = Vec::new();
        for (controlid, body) in [(Some("same"), b"x"), (None, b"u"), (None, b"u")] {
            let handle = Arc::clone(&store);
            rest.push(tokio::spawn(async move {
                handle.put(delivery("pol", controlid, body, 2)).await
            }));
            let expected = rest.len();
            wait_until(|| queued(&store) == expected).await;
        }
        let flushes = store.flush_count();
        store.hooks.set(|s| s.hold_collect = false);
        let a = a.await.expect("join").expect("put");
        let mut outcomes = Vec::new();
        for task in rest {
            outcomes.push(task.await.expect("join").expect("put"));
        }
        assert!(matches!(a, PutOutcome::Stored(_)));
        assert_eq!(outcomes[0], PutOutcome::Duplicate(a.id()));
        assert!(matches!(outcomes[1], PutOutcome::Stored(_)));
        assert_eq!(outcomes[2], PutOutcome::Duplicate(outcomes[1].id()));
        assert_eq!(store.flush_count(), flushes + 1, "one group, one flush");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn unmatched_idempotency_is_per_policy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let body = b"<response><control/></response>";
        let a = store.put(delivery("a", None, body, 1)).await.expect("put");
        let a2 = store.put(delivery("a", None, body, 2)).await.expect("put");
        let b = store.put(delivery("b", None, body, 3)).await.expect("put");
        assert!(matches!(a, PutOutcome::Stored(_)));
        assert_eq!(a2, PutOutcome::Duplicate(a.id()));
        assert!(matches!(b, PutOutcome::Stored(_)));
        assert_ne!(a.id(), b.id());
        // A matched delivery with the same bytes is keyed by its controlid, not by policy.
        let c = store
            .put(delivery("a", Some("k"), body, 4))
            .await
            .expect("put");
        assert!(matches!(c, PutOutcome::Stored(_)));
        let record = store.record(a.id()).await.expect("record").expect("some");
        assert_eq!(record.extracted.controlid, None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn scope_filters_latest_feed_and_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let in_a = store
            .put(delivery("a", Some("c"), b"1", 1))
            .await
            .expect("put")
            .id();
        let in_b = store
            .put(delivery("b", Some("c"), b"2", 2))
            .await
            .expect("put")
            .id();

        let only_a = scope(&["a"]);
        let latest = store
            .latest("c", &only_a)
            .await
            .expect("latest")
            .expect("some");
        assert_eq!(latest.record.id, in_a);
        assert_eq!(latest.deliveries, 1);
        let latest = store
            .latest("c", &Scope::All)
            .await
            .expect("latest")
            .expect("some");
        assert_eq!(latest.record.id, in_b);
        assert_eq!(latest.deliveries, 2);
        assert!(store
            .latest("c", &scope(&["z"]))
            .await
            .expect("latest")
            .is_none());
        assert!(store
            .latest("c", &scope(&[]))
            .await
            .expect("latest")
            .is_none());

        let feed = store.feed(None, 10, &only_a).await.expect("feed");
        assert_eq!(feed.iter().map(|r| r.id).collect::<Vec<_>>(), vec![in_a]);
        let feed = store
            .feed(None, 10, &scope(&["b", "a", "b"]))
            .await
            .expect("feed");
        assert_eq!(
            feed.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![in_a, in_b]
        );

        assert_eq!(
            store
                .delete_controlid("c", &scope(&["b"]))
                .await
                .expect("delete"),
            1
        );
        let latest = store
            .latest("c", &Scope::All)
            .await
            .expect("latest")
            .expect("some");
        assert_eq!(latest.record.id, in_a);
        assert_eq!(latest.deliveries, 1);
        assert!(store.record(in_b).await.expect("record").is_none());
        assert!(store.body(in_b).await.expect("body").is_none());
        assert_eq!(store.delivery_count(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn feed_order_after_and_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let mut ids = Vec::new();
        for i in 0..10 {
            let policy = if i % 2 == 0 { "even" } else { "odd" };
            let controlid = format!("c{i}");
            let controlid = if i == 5 {
                None
            } else {
                Some(controlid.as_str())
            };
            let body = format!("body {i}");
            ids.push(
                store
                    .put(delivery(policy, controlid, body.as_bytes(), i))
                    .await
                    .expect("put")
                    .id(),
            );
        }
        // A quarantined body takes an id but never shows in the feed.
        store
            .quarantine(quarantine_item("even", b"junk", 99))
            .await
            .expect("quarantine");

        let all = store.feed(None, 100, &Scope::All).await.expect("feed");
        assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
        let page = store.feed(None, 3, &Scope::All).await.expect("feed");
        assert_eq!(page.iter().map(|r| r.id).collect::<Vec<_>>(), ids[..3]);
        let page = store
            .feed(Some(ids[2]), 3, &Scope::All)
            .await
            .expect("feed");
        assert_eq!(page.iter().map(|r| r.id).collect::<Vec<_>>(), ids[3..6]);
        let page = store
            .feed(Some(ids[9]), 3, &Scope::All)
            .await
            .expect("feed");
        assert!(page.is_empty());
        assert!(store
            .feed(None, 0, &Scope::All)
            .await
            .expect("feed")
            .is_empty());
        assert!(store
            .feed(Some(DeliveryId(u64::MAX)), 5, &Scope::All)
            .await
            .expect("feed")
            .is_empty());

        let odd = store
            .feed(Some(ids[1]), 2, &scope(&["odd"]))
            .await
            .expect("feed");
        assert_eq!(
            odd.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![ids[3], ids[5]]
        );
        let both = store
            .feed(Some(ids[6]), 10, &scope(&["odd", "even"]))
            .await
            .expect("feed");
        assert_eq!(both.iter().map(|r| r.id).collect::<Vec<_>>(), ids[7..]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn delete_removes_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let one = store
            .put(delivery("p", Some("gone"), b"1", 7))
            .await
            .expect("put")
            .id();
        let two = store
            .put(delivery("p", Some("gone"), b"2", 7))
            .await
            .expect("put")
            .id();
        let kept = store
            .put(delivery("p", Some("kept"), b"3", 3))
            .await
            .expect("put")
            .id();
        assert_eq!(
            store
                .delete_controlid("gone", &Scope::All)
                .await
                .expect("delete"),
            2
        );
        assert!(store
            .latest("gone", &Scope::All)
            .await
            .expect("latest")
            .is_none());
        for id in [one, two] {
            assert!(store.record(id).await.expect("record").is_none());
            assert!(store.body(id).await.expect("body").is_none());
        }
        let feed = store.feed(None, 10, &scope(&["p"])).await.expect("feed");
        assert_eq!(feed.iter().map(|r| r.id).collect::<Vec<_>>(), vec![kept]);
        assert_eq!(
            store
                .delete_controlid("gone", &Scope::All)
                .await
                .expect("delete"),
            0
        );
        // The same bytes again are a new delivery: the old one was acknowledged and removed.
        let again = store
            .put(delivery("p", Some("gone"), b"1", 4))
            .await
            .expect("put");
        assert!(matches!(again, PutOutcome::Stored(id) if id > kept));
        // Nothing of the deleted deliveries is left in the tree.
        let db = store.db().expect("db");
        for prefix in [META, BODY, POLICY, TIME] {
            for id in [one, two] {
                let key = match prefix {
                    POLICY => policy_key("p", id.0),
                    TIME => time_key(7, id.0).to_vec(),
                    _ => id_key(prefix, id.0).to_vec(),
                };
                assert!(!db.contains_key(key).expect("get"));
            }
        }
        let bits = |id: DeliveryId| {
            let raw = db.get(policy_bits_key("p", id.0)).expect("get");
            raw.and_then(|raw| be_u64(&raw)).unwrap_or(0) & policy_bit(id.0)
        };
        assert_eq!((bits(one), bits(two)), (0, 0));
        assert_ne!(bits(kept), 0);
    }

    /// Checks the scoped feed against the unscoped one filtered by policy, for several
    /// scopes, cursors and limits.
    async fn check_scoped_feed(store: &SledStore, label: &str) {
        let all = store.feed(None, 1000, &Scope::All).await.expect("feed");
        for wanted in [&["a"][..], &["b"], &["a", "c"], &["a", "b", "c"], &["zzz"]] {
            let expected: Vec<DeliveryId> = all
                .iter()
                .filter(|r| wanted.contains(&r.policy.as_str()))
                .map(|r| r.id)
                .collect();
            let cursors = [None, Some(1), Some(63), Some(64), Some(130)];
            for after in cursors.map(|c| c.map(DeliveryId)) {
                for limit in [1, 7, 64, 1000] {
                    let got: Vec<DeliveryId> = store
                        .feed(after, limit, &scope(wanted))
                        .await
                        .expect("feed")
                        .iter()
                        .map(|r| r.id)
                        .collect();
                    let want: Vec<DeliveryId> = expected
                        .iter()
                        .copied()
                        .filter(|id| after.is_none_or(|a| *id > a))
                        .take(limit)
                        .collect();
                    assert_eq!(
                        got, want,
                        "{label}: {wanted:?} after {after:?} limit {limit}"
                    );
                }
            }
        }
    }

    /// The feed of a scope read through the per-policy bitmaps, across several bitmaps, after
    /// cursors and with limits, then after deletes and a purge: the same as filtering the
    /// unscoped feed. A bitmap whose deliveries are all gone is removed.
    #[tokio::test(flavor = "multi_thread")]
    async fn scoped_feed_through_the_policy_bitmaps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let policies = ["a", "b", "c"];
        // 200 deliveries: more than three bitmaps of 64 ids, and ids of one policy spread
        // unevenly (a run of "a" across a bitmap boundary, then every third).
        let mut puts = Vec::new();
        for i in 0..200_i64 {
            let policy = if (50..80).contains(&i) {
                "a"
            } else {
                policies[(i % 3) as usize]
            };
            let controlid = format!("c{i}");
            puts.push(store.put(delivery(policy, Some(&controlid), b"<r/>", i)));
            if puts.len() == 16 || i == 199 {
                for put in futures_util::future::join_all(puts.drain(..)).await {
                    put.expect("put");
                }
            }
        }
        check_scoped_feed(&store, "stored").await;
        assert!(
            raw_keys(&store, POLICY).is_empty(),
            "no per-delivery entries"
        );
        assert_eq!(
            raw_keys(&store, POLICY_BITS).len(),
            4 * 3,
            "a bitmap per policy and 64 ids"
        );

        for i in (0..200).step_by(5) {
            store
                .delete_controlid(&format!("c{i}"), &Scope::All)
                .await
                .expect("delete");
        }
        check_scoped_feed(&store, "after deletes").await;
        // Deliveries 1 to 100 were received at 0 to 99: the purge takes the first 64 and more.
        store.purge_older_than(100, 50).await.expect("purge");
        check_scoped_feed(&store, "after the purge").await;
        let first_bitmaps: Vec<Vec<u8>> = policies.iter().map(|p| policy_bits_key(p, 1)).collect();
        for key in first_bitmaps {
            assert!(
                !store.db().expect("db").contains_key(key).expect("get"),
                "an empty bitmap is removed"
            );
        }
        drop(puts);
        drop(store);
        let store = reopen(dir.path()).await;
        let page = store.feed(None, 1000, &scope(&["b"])).await.expect("feed");
        assert!(page
            .iter()
            .all(|r| r.policy == "b" && r.received_at_ms >= 100));
        assert!(!page.is_empty());
    }

    /// Bits left behind by records that are gone (a purge or delete of an undecodable record
    /// cannot clear them) are skipped without ending a page early: a scoped feed with a small
    /// limit still moves past a run of them.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_scoped_feed_moves_past_index_bits_whose_records_are_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let mut ids = Vec::new();
        for i in 0..10 {
            let controlid = format!("k{i}");
            ids.push(
                store
                    .put(delivery("pol", Some(&controlid), b"<r/>", i))
                    .await
                    .expect("put")
                    .id(),
            );
        }
        // Records 2 to 7 gone as a purge of undecodable records leaves them: the bits stay.
        let db = store.db().expect("db");
        for id in &ids[2..8] {
            db.remove(id_key(META, id.0)).expect("remove");
        }
        for limit in [1, 2, 3, 100] {
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let page = store
                    .feed(after, limit, &scope(&["pol"]))
                    .await
                    .expect("feed");
                let Some(last) = page.last() else { break };
                after = Some(last.id);
                seen.extend(page.iter().map(|r| r.id));
            }
            let expected: Vec<DeliveryId> = ids[..2].iter().chain(&ids[8..]).copied().collect();
            assert_eq!(seen, expected, "limit {limit}");
        }
        let first = store
            .feed(Some(ids[1]), 1, &scope(&["pol", "other"]))
            .await
            .expect("feed");
        assert_eq!(first.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ids[8]]);
    }

    /// A database written before the bitmaps has one `p` key per delivery: the scoped feed
    /// still lists those deliveries, and a delete removes their keys.
    #[tokio::test(flavor = "multi_thread")]
    async fn per_delivery_policy_entries_of_an_older_database_are_read_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let mut ids = Vec::new();
        for i in 0..3 {
            let controlid = format!("old{i}");
            ids.push(
                store
                    .put(delivery("pol", Some(&controlid), b"<r/>", i))
                    .await
                    .expect("put")
                    .id(),
            );
        }
        store.close().await.expect("close");
        drop(store);
        // As an older version wrote them: no bitmap, a key per delivery.
        let db = recovery::open_sled(dir.path(), 1 << 20).expect("sled");
        db.remove(policy_bits_key("pol", ids[0].0)).expect("remove");
        for id in &ids {
            db.insert(policy_key("pol", id.0), &[][..]).expect("insert");
        }
        db.flush().expect("flush");
        drop(db);

        let store = reopen(dir.path()).await;
        let newer = store
            .put(delivery("pol", Some("new"), b"<r/>", 9))
            .await
            .expect("put")
            .id();
        let feed = store.feed(None, 10, &scope(&["pol"])).await.expect("feed");
        let mut expected = ids.clone();
        expected.push(newer);
        assert_eq!(feed.iter().map(|r| r.id).collect::<Vec<_>>(), expected);
        store
            .delete_controlid("old1", &Scope::All)
            .await
            .expect("delete");
        assert!(!store
            .db()
            .expect("db")
            .contains_key(policy_key("pol", ids[1].0))
            .expect("get"));
        let feed = store
            .feed(Some(ids[0]), 10, &scope(&["pol"]))
            .await
            .expect("feed");
        assert_eq!(
            feed.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![ids[2], newer]
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reopen_keeps_everything_and_ids_keep_growing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let a = store
            .put(delivery("p", Some("a"), b"aaa", 1))
            .await
            .expect("put")
            .id();
        let q = store
            .quarantine(quarantine_item("p", b"<<<", 2))
            .await
            .expect("quarantine");
        store.close().await.expect("close");
        assert!(matches!(
            store.put(delivery("p", Some("b"), b"b", 3)).await,
            Err(StoreError::Closed)
        ));
        assert!(matches!(
            store.check_writable().await,
            Err(StoreError::Closed)
        ));
        store.close().await.expect("second close");
        drop(store);

        let store = reopen(dir.path()).await;
        assert_eq!(*store.committed().borrow(), q);
        let latest = store
            .latest("a", &Scope::All)
            .await
            .expect("latest")
            .expect("some");
        assert_eq!(latest.record.id, a);
        assert_eq!(
            &store.body(a).await.expect("body").expect("some")[..],
            b"aaa"
        );
        assert_eq!(
            &store
                .quarantined_body(q)
                .await
                .expect("body")
                .expect("some")[..],
            b"<<<"
        );
        let b = store
            .put(delivery("p", Some("b"), b"b", 3))
            .await
            .expect("put");
        assert!(matches!(b, PutOutcome::Stored(id) if id > q));
        let dup = store
            .put(delivery("p", Some("a"), b"aaa", 4))
            .await
            .expect("put");
        assert_eq!(dup, PutOutcome::Duplicate(a));
        assert_eq!(store.delivery_count(), 2);
        assert_eq!(store.quarantine_count(), 1);

        // Dropped without close: the drop commits and releases the database.
        drop(store);
        let store = reopen(dir.path()).await;
        assert_eq!(
            store.feed(None, 10, &Scope::All).await.expect("feed").len(),
            2
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_puts_are_group_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SledStore::open(dir.path(), options()).expect("open"));
        let before = store.flush_count();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let body = format!("<response>{i}</response>");
                    store
                        .put(delivery("p", Some(&format!("c{i}")), body.as_bytes(), i))
                        .await
                })
            })
            .collect();
        let mut ids = HashSet::new();
        for task in tasks {
            let outcome = task.await.expect("join").expect("put");
            assert!(matches!(outcome, PutOutcome::Stored(_)));
            assert!(ids.insert(outcome.id()), "ids are distinct");
        }
        let flushes = store.flush_count() - before;
        println!("200 concurrent puts: {flushes} flushes");
        assert!(flushes <= 200, "at most one flush per put");
        assert_eq!(
            store
                .feed(None, 1000, &Scope::All)
                .await
                .expect("feed")
                .len(),
            200
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn queued_puts_share_one_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SledStore::open(dir.path(), options()).expect("open"));
        store.hooks.set(|s| s.hold_collect = true);
        let spawn_put = |i: usize| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let body = format!("<response>{i}</response>");
                store
                    .put(delivery("p", Some(&format!("c{i}")), body.as_bytes(), 0))
                    .await
            })
        };
        // The first request reaches the writer, which is then held; the rest queue up.
        let mut tasks = vec![spawn_put(0)];
        wait_until(|| store.hooks.at_collect()).await;
        tasks.extend((1..200).map(spawn_put));
        wait_until(|| queued(&store) == 199).await;
        let before = store.flush_count();
        store.hooks.set(|s| s.hold_collect = false);
        let mut ids = HashSet::new();
        for task in tasks {
            assert!(ids.insert(task.await.expect("join").expect("put").id()));
        }
        assert_eq!(ids.len(), 200);
        assert_eq!(
            store.flush_count() - before,
            1,
            "one group of 200, one flush"
        );
        let stats = store.flush_stats();
        assert_eq!(stats.requests, 200);
        assert_eq!(stats.failures, 0);
        assert!(stats.buckets.last().map_or(0, |b| b.1) <= stats.flushes);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_writer_held_inside_a_group_is_reported_busy_and_stalled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SledStore::open(dir.path(), options()).expect("open"));
        assert!(store.busy_for().is_none(), "idle at start");
        store.hooks.set(|s| s.hold_flush = true);
        let task = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.put(delivery("p", Some("hang"), b"h", 1)).await }
        });
        wait_until(|| store.hooks.at_flush()).await;
        // The writer sits inside its group, as it would inside a hung sled.
        let detected = tokio::time::timeout(
            Duration::from_secs(10),
            crate::app::stalled(store.clone() as Arc<dyn Store>, Duration::from_millis(300)),
        )
        .await
        .expect("the stall was not reported");
        assert!(detected < 10, "{detected} s");
        assert!(store
            .busy_for()
            .is_some_and(|d| d >= Duration::from_millis(300)));
        store.hooks.set(|s| s.hold_flush = false);
        task.await.expect("join").expect("put");
        // The answers go out just before the writer marks the group done.
        wait_until(|| store.busy_for().is_none()).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn readers_do_not_see_a_put_before_its_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SledStore::open(dir.path(), options()).expect("open"));
        // One committed delivery first, so that the feeds below are not empty merely because
        // nothing is committed; the second shares its per-policy bitmap.
        let visible = store
            .put(delivery("p", Some("v"), b"v", 0))
            .await
            .expect("put")
            .id();
        let mut committed = store.committed();
        let start = *committed.borrow_and_update();
        store.hooks.set(|s| s.hold_flush = true);
        let task = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.put(delivery("p", Some("w"), b"wm", 1)).await }
        });
        wait_until(|| store.hooks.at_flush()).await;
        // Applied to sled, not yet flushed: the raw tree has it, the store does not show it.
        let id = DeliveryId(start.0 + 1);
        assert!(store
            .db()
            .expect("db")
            .contains_key(id_key(META, id.0))
            .expect("get"));
        assert!(store
            .latest("w", &Scope::All)
            .await
            .expect("latest")
            .is_none());
        assert!(store.record(id).await.expect("record").is_none());
        assert!(store.body(id).await.expect("body").is_none());
        for scope in [Scope::All, scope(&["p"])] {
            let feed = store.feed(None, 10, &scope).await.expect("feed");
            assert_eq!(feed.iter().map(|r| r.id).collect::<Vec<_>>(), vec![visible]);
        }
        assert!(!committed.has_changed().expect("watch"));
        assert!(!task.is_finished());

        store.hooks.set(|s| s.hold_flush = false);
        assert_eq!(
            task.await.expect("join").expect("put"),
            PutOutcome::Stored(id)
        );
        assert!(committed.has_changed().expect("watch"));
        assert_eq!(*committed.borrow_and_update(), id);
        assert!(store.record(id).await.expect("record").is_some());
        assert_eq!(
            store
                .latest("w", &Scope::All)
                .await
                .expect("latest")
                .map(|l| l.record.id),
            Some(id)
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failed_flush_fails_the_whole_group_and_the_writer_recovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SledStore::open(dir.path(), options()).expect("open"));
        let committed = store.committed();
        let before = *committed.borrow();
        store.hooks.set(|s| {
            s.hold_collect = true;
            s.fail_flushes = 1;
        });
        let spawn_put = |i: usize| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let body = format!("<response>{i}</response>");
                store
                    .put(delivery("p", Some(&format!("f{i}")), body.as_bytes(), 0))
                    .await
            })
        };
        let mut tasks = vec![spawn_put(0)];
        wait_until(|| store.hooks.at_collect()).await;
        tasks.extend((1..3).map(spawn_put));
        let probe = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.check_writable().await }
        });
        wait_until(|| queued(&store) == 3).await;
        store.hooks.set(|s| s.hold_collect = false);
        for task in tasks {
            assert!(matches!(task.await.expect("join"), Err(StoreError::Io(_))));
        }
        assert!(matches!(probe.await.expect("join"), Err(StoreError::Io(_))));
        assert_eq!(*committed.borrow(), before, "watermark not advanced");
        assert!(store
            .latest("f0", &Scope::All)
            .await
            .expect("latest")
            .is_none());
        assert_eq!(store.flush_stats().failures, 1);

        // The writer goes on; a retry finds the bytes applied before the failure.
        store.check_writable().await.expect("writable again");
        let retry = store
            .put(delivery("p", Some("f1"), b"<response>1</response>", 0))
            .await
            .expect("put");
        assert!(matches!(retry, PutOutcome::Duplicate(_)));
        assert!(store
            .latest("f1", &Scope::All)
            .await
            .expect("latest")
            .is_some());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn quarantine_roundtrip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let body = b"\x00\xffnot xml at all";
        let q1 = store
            .quarantine(quarantine_item("p", body, 10))
            .await
            .expect("quarantine");
        let d = store
            .put(delivery("p", Some("c"), b"ok", 11))
            .await
            .expect("put")
            .id();
        let q2 = store
            .quarantine(quarantine_item("r", b"", 12))
            .await
            .expect("quarantine");
        assert!(q1 < d && d < q2);
        let items = store.quarantined(None, 10).await.expect("quarantined");
        assert_eq!(items.len(), 2);
        assert_eq!(
            items[0],
            QuarantineRecord {
                id: q1,
                policy: "p".to_owned(),
                received_at_ms: 10,
                size: body.len() as u64,
                reason: "malformed xml".to_owned(),
            }
        );
        assert_eq!(items[1].id, q2);
        assert_eq!(items[1].size, 0);
        let after = store.quarantined(Some(q1), 10).await.expect("quarantined");
        assert_eq!(after.iter().map(|r| r.id).collect::<Vec<_>>(), vec![q2]);
        assert_eq!(
            store.quarantined(None, 1).await.expect("quarantined").len(),
            1
        );
        assert_eq!(
            &store
                .quarantined_body(q1)
                .await
                .expect("body")
                .expect("some")[..],
            body
        );
        assert!(store.quarantined_body(d).await.expect("body").is_none());
        assert!(store.record(q1).await.expect("record").is_none());
        assert_eq!(store.quarantine_count(), 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn purge_removes_old_items_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let mut old = Vec::new();
        for i in 0..7 {
            let controlid = format!("old{i}");
            let controlid = if i == 3 {
                None
            } else {
                Some(controlid.as_str())
            };
            old.push(
                store
                    .put(delivery("p", controlid, format!("o{i}").as_bytes(), -5 + i))
                    .await
                    .expect("put")
                    .id(),
            );
        }
        let old_q = store
            .quarantine(quarantine_item("p", b"q", 50))
            .await
            .expect("q");
        let new = store
            .put(delivery("p", Some("new"), b"n", 100))
            .await
            .expect("put")
            .id();
        let new_q = store
            .quarantine(quarantine_item("p", b"q", 100))
            .await
            .expect("q");

        assert_eq!(store.purge_older_than(100, 3).await.expect("purge"), 8);
        for id in &old {
            assert!(store.record(*id).await.expect("record").is_none());
            assert!(store.body(*id).await.expect("body").is_none());
        }
        assert!(store
            .latest("old0", &Scope::All)
            .await
            .expect("latest")
            .is_none());
        assert!(store.quarantined_body(old_q).await.expect("body").is_none());
        let feed = store.feed(None, 10, &scope(&["p"])).await.expect("feed");
        assert_eq!(feed.iter().map(|r| r.id).collect::<Vec<_>>(), vec![new]);
        let q = store.quarantined(None, 10).await.expect("quarantined");
        assert_eq!(q.iter().map(|r| r.id).collect::<Vec<_>>(), vec![new_q]);
        assert_eq!(store.delivery_count(), 1);
        assert_eq!(store.quarantine_count(), 1);
        // The purged unmatched body can be stored again as a new delivery.
        let again = store
            .put(delivery("p", None, b"o3", 200))
            .await
            .expect("put");
        assert!(matches!(again, PutOutcome::Stored(id) if id > new_q));
        assert_eq!(store.purge_older_than(100, 3).await.expect("purge"), 0);
        // No time index is written any more: the purge walks ids.
        let time_entries = store.db().expect("db").scan_prefix([TIME]).count();
        assert_eq!(time_entries, 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn purge_walks_ids_and_stops_at_the_first_younger_item() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let put = |controlid: &'static str, at: i64| {
            let store = &store;
            async move {
                store
                    .put(delivery("p", Some(controlid), controlid.as_bytes(), at))
                    .await
                    .expect("put")
                    .id()
            }
        };
        let a = put("a", 10).await;
        let broken = put("broken", 15).await;
        let b = put("b", 20).await;
        // The clock was ahead for this one, then set back.
        let ahead = put("ahead", 500).await;
        let behind = put("behind", 30).await;
        let broken_late = put("broken-late", 31).await;
        let q_old = store
            .quarantine(quarantine_item("p", b"<", 5))
            .await
            .expect("q");
        let q_new = store
            .quarantine(quarantine_item("p", b"<", 600))
            .await
            .expect("q");
        let db = store.db().expect("db");
        for id in [broken, broken_late] {
            db.insert(id_key(META, id.0), &b"\x02not a record"[..])
                .expect("insert");
        }

        // The undecodable record between two old ones goes with them; the walk looks past
        // `ahead` and finds the old one behind it; the undecodable last one has no old one
        // after it and stays.
        assert_eq!(store.purge_older_than(100, 2).await.expect("purge"), 5);
        for id in [a, broken, b, behind] {
            assert!(!db.contains_key(id_key(META, id.0)).expect("get"), "{id}");
        }
        for id in [ahead, broken_late] {
            assert!(db.contains_key(id_key(META, id.0)).expect("get"), "{id}");
        }
        assert!(store.quarantined_body(q_old).await.expect("body").is_none());
        assert!(store.quarantined_body(q_new).await.expect("body").is_some());
        assert_eq!(store.delivery_count(), 2);
        assert_eq!(store.quarantine_count(), 1);
        // Once `ahead` is old enough it goes; the undecodable one waits for a dated one.
        assert_eq!(store.purge_older_than(550, 2).await.expect("purge"), 1);
        assert!(store
            .latest("ahead", &Scope::All)
            .await
            .expect("latest")
            .is_none());
        assert_eq!(store.delivery_count(), 1);
        put("later", 540).await;
        assert_eq!(store.purge_older_than(550, 2).await.expect("purge"), 2);
        assert!(!db.contains_key(id_key(META, broken_late.0)).expect("get"));
        assert_eq!(store.delivery_count(), 0);
        assert!(store.quarantined_body(q_new).await.expect("body").is_some());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn purge_looks_past_a_bounded_run_of_young_items() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let put = |controlid: String, at: i64| {
            let store = &store;
            async move {
                store
                    .put(delivery("p", Some(&controlid), controlid.as_bytes(), at))
                    .await
                    .expect("put")
                    .id()
            }
        };
        // Stamped ahead of the clock, then one stamped right: found behind them.
        for i in 0..PURGE_LOOK_AHEAD - 1 {
            put(format!("young{i}"), 500).await;
        }
        let old = put("old".to_owned(), 10).await;
        assert_eq!(store.purge_older_than(100, 500).await.expect("purge"), 1);
        assert!(store.record(old).await.expect("record").is_none());
        // One more in the run: now the old one behind them waits.
        put("young-last".to_owned(), 500).await;
        let held = put("held".to_owned(), 10).await;
        assert_eq!(store.purge_older_than(100, 500).await.expect("purge"), 0);
        assert!(store.record(held).await.expect("record").is_some());
        let total = PURGE_LOOK_AHEAD as u64 + 1;
        assert_eq!(store.delivery_count(), total);
        assert_eq!(
            store.purge_older_than(600, 500).await.expect("purge"),
            total as usize
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn purge_takes_the_time_entries_of_an_older_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let young = store
            .put(delivery("p", Some("young"), b"y", 200))
            .await
            .expect("put")
            .id();
        let old = store
            .put(delivery("p", Some("old"), b"o", 10))
            .await
            .expect("put")
            .id();
        let q = store
            .quarantine(quarantine_item("p", b"<", 20))
            .await
            .expect("q");
        // As an older version wrote them: a time entry per item.
        let db = store.db().expect("db");
        for (at, id, kind) in [
            (200, young, KIND_DELIVERY),
            (10, old, KIND_DELIVERY),
            (20, q, KIND_QUARANTINE),
        ] {
            db.insert(&time_key(at, id.0)[..], &[kind][..])
                .expect("insert");
        }
        // The entries find the old items behind the young one, which the id walk would not.
        assert_eq!(store.purge_older_than(100, 10).await.expect("purge"), 2);
        assert!(store
            .latest("old", &Scope::All)
            .await
            .expect("latest")
            .is_none());
        assert!(store.quarantined_body(q).await.expect("body").is_none());
        assert!(store
            .latest("young", &Scope::All)
            .await
            .expect("latest")
            .is_some());
        assert_eq!(db.scan_prefix([TIME]).count(), 1);
        assert_eq!(store.delivery_count(), 1);
        assert_eq!(store.quarantine_count(), 0);
        // The young one's entry goes with it.
        assert_eq!(store.purge_older_than(300, 10).await.expect("purge"), 1);
        assert_eq!(db.scan_prefix([TIME]).count(), 0);
        assert_eq!(store.delivery_count(), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn thousand_concurrent_4k_puts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SledStore::open(dir.path(), options()).expect("open"));
        let before = store.flush_count();
        let started = Instant::now();
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let mut body = format!("<response>{i}</response>").into_bytes();
                    body.resize(4096, b' ');
                    store
                        .put(delivery("p", Some(&format!("c{i}")), &body, 0))
                        .await
                })
            })
            .collect();
        for task in tasks {
            assert!(matches!(
                task.await.expect("join").expect("put"),
                PutOutcome::Stored(_)
            ));
        }
        let elapsed = started.elapsed();
        let flushes = store.flush_count() - before;
        println!("1000 concurrent 4 KiB puts: {elapsed:?}, {flushes} flushes");
        assert!(flushes <= 1000);
        assert_eq!(store.delivery_count(), 1000);
    }

    fn expectation(controlid: &str, poller: &str, since_ms: i64, timeout: u64) -> Expectation {
        Expectation {
            controlid: controlid.to_owned(),
            poller: poller.to_owned(),
            since_ms,
            timeout_seconds: timeout,
            scope: Scope::All,
        }
    }

    /// The keys under a one-byte prefix, raw.
    fn raw_keys(store: &SledStore, prefix: u8) -> Vec<Vec<u8>> {
        store
            .db()
            .expect("db")
            .scan_prefix([prefix])
            .keys()
            .map(|k| k.expect("key").to_vec())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn expect_creates_then_refreshes_keeping_since() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let first = expectation("c1", "erp", 1_000, 60);
        assert_eq!(
            store.expect(first.clone()).await.expect("expect"),
            ExpectOutcome::Created(first.clone())
        );
        assert_eq!(
            store.expectation("c1", "erp").await.expect("get"),
            Some(first.clone())
        );
        let again = store
            .expect(expectation("c1", "erp", 5_000, 3_600))
            .await
            .expect("expect");
        let refreshed = expectation("c1", "erp", 1_000, 3_600);
        assert_eq!(again, ExpectOutcome::Existed(refreshed.clone()));
        assert_eq!(
            store.expectation("c1", "erp").await.expect("get"),
            Some(refreshed)
        );
        // Another poller awaiting the same controlid has an expectation of its own.
        let other = expectation("c1", "bi", 2_000, 10);
        assert_eq!(
            store.expect(other.clone()).await.expect("expect"),
            ExpectOutcome::Created(other)
        );
        assert!(store.expectation("c1", "x").await.expect("get").is_none());
        assert!(store.expectation("c", "1erp").await.expect("get").is_none());
        // One record and one time entry per (controlid, poller); since unchanged, so no stray one.
        assert_eq!(raw_keys(&store, EXPECT).len(), 2);
        assert_eq!(raw_keys(&store, EXPECT_TIME).len(), 2);
        // Expectations take no delivery id.
        assert_eq!(*store.committed().borrow(), DeliveryId(0));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn put_resolves_every_poller_of_its_controlid_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        for e in [
            expectation("c", "erp", 1, 60),
            expectation("c", "bi", 2, 60),
            expectation("other", "erp", 3, 60),
            expectation("cc", "erp", 4, 60),
        ] {
            store.expect(e).await.expect("expect");
        }
        // An unmatched delivery resolves nothing.
        store
            .put(delivery("p", None, b"<response><control/></response>", 5))
            .await
            .expect("put");
        assert_eq!(raw_keys(&store, EXPECT).len(), 4);

        let outcome = store
            .put(delivery("p", Some("c"), b"<response>c</response>", 6))
            .await
            .expect("put");
        assert!(matches!(outcome, PutOutcome::Stored(_)));
        assert!(store.expectation("c", "erp").await.expect("get").is_none());
        assert!(store.expectation("c", "bi").await.expect("get").is_none());
        assert!(store.expectations("bi").await.expect("list").is_empty());
        let left = store.expectations("erp").await.expect("list");
        assert_eq!(
            left.iter()
                .map(|e| e.controlid.as_str())
                .collect::<Vec<_>>(),
            vec!["other", "cc"]
        );
        assert_eq!(raw_keys(&store, EXPECT).len(), 2);
        assert_eq!(raw_keys(&store, EXPECT_TIME).len(), 2);

        // A duplicate of the stored bytes resolves an expectation recorded since.
        store
            .expect(expectation("c", "erp", 7, 60))
            .await
            .expect("expect");
        let dup = store
            .put(delivery("p", Some("c"), b"<response>c</response>", 8))
            .await
            .expect("put");
        assert_eq!(dup, PutOutcome::Duplicate(outcome.id()));
        assert!(store.expectation("c", "erp").await.expect("get").is_none());
        assert_eq!(raw_keys(&store, EXPECT_TIME).len(), 2);
        // Nothing is held in the overlay once committed.
        assert!(store.shared.resolving().is_empty());
        // Deleting the response leaves the other expectations alone.
        store
            .delete_controlid("other", &Scope::All)
            .await
            .expect("delete");
        assert!(store
            .expectation("other", "erp")
            .await
            .expect("get")
            .is_some());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_resolved_expectation_shows_until_its_delivery_is_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SledStore::open(dir.path(), options()).expect("open"));
        let pending = expectation("w", "erp", 10, 60);
        store.expect(pending.clone()).await.expect("expect");
        store.hooks.set(|s| s.hold_flush = true);
        let task = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.put(delivery("p", Some("w"), b"wm", 11)).await }
        });
        wait_until(|| store.hooks.at_flush()).await;
        // The delivery and the removal are applied together; neither is visible as such yet.
        assert!(raw_keys(&store, EXPECT).is_empty());
        assert_eq!(raw_keys(&store, META).len(), 1);
        assert!(store
            .latest("w", &Scope::All)
            .await
            .expect("latest")
            .is_none());
        assert_eq!(
            store.expectation("w", "erp").await.expect("get"),
            Some(pending.clone())
        );
        assert_eq!(
            store.expectations("erp").await.expect("list"),
            vec![pending.clone()]
        );
        store.hooks.set(|s| s.hold_flush = false);
        assert!(matches!(
            task.await.expect("join").expect("put"),
            PutOutcome::Stored(_)
        ));
        assert!(store.expectation("w", "erp").await.expect("get").is_none());
        assert!(store.expectations("erp").await.expect("list").is_empty());
        assert!(store
            .latest("w", &Scope::All)
            .await
            .expect("latest")
            .is_some());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failed_commit_keeps_the_expectation_until_the_delivery_shows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let pending = expectation("f", "erp", 10, 60);
        store.expect(pending.clone()).await.expect("expect");
        store.hooks.set(|s| s.fail_flushes = 1);
        assert!(matches!(
            store.put(delivery("p", Some("f"), b"f", 11)).await,
            Err(StoreError::Io(_))
        ));
        assert!(store
            .latest("f", &Scope::All)
            .await
            .expect("latest")
            .is_none());
        assert_eq!(
            store.expectation("f", "erp").await.expect("get"),
            Some(pending)
        );
        // The next commit makes both durable and visible together.
        store.check_writable().await.expect("writable");
        assert!(store
            .latest("f", &Scope::All)
            .await
            .expect("latest")
            .is_some());
        assert!(store.expectation("f", "erp").await.expect("get").is_none());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn expectations_are_per_poller_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        for e in [
            expectation("b", "erp", 20, 60),
            expectation("a", "erp", 20, 60),
            expectation("zz", "erp", 5, 60),
            expectation("c", "erp", -3, 60),
            expectation("a", "bi", 1, 60),
            expectation("erp", "e", 0, 60),
        ] {
            store.expect(e).await.expect("expect");
        }
        let erp = store.expectations("erp").await.expect("list");
        assert_eq!(
            erp.iter()
                .map(|e| (e.controlid.as_str(), e.since_ms))
                .collect::<Vec<_>>(),
            vec![("c", -3), ("zz", 5), ("a", 20), ("b", 20)]
        );
        assert!(erp.iter().all(|e| e.poller == "erp"));
        let bi = store.expectations("bi").await.expect("list");
        assert_eq!(bi, vec![expectation("a", "bi", 1, 60)]);
        assert!(store.expectations("nobody").await.expect("list").is_empty());
        assert_eq!(store.expectations("e").await.expect("list").len(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn forget_removes_one_poller_durably() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        store
            .expect(expectation("c", "erp", 1, 60))
            .await
            .expect("expect");
        store
            .expect(expectation("c", "bi", 1, 60))
            .await
            .expect("expect");
        assert_eq!(
            store.forget_expectation("c", "erp").await.expect("forget"),
            1
        );
        assert_eq!(
            store.forget_expectation("c", "erp").await.expect("forget"),
            0
        );
        assert_eq!(
            store.forget_expectation("x", "bi").await.expect("forget"),
            0
        );
        assert!(store.expectation("c", "erp").await.expect("get").is_none());
        assert!(store.expectation("c", "bi").await.expect("get").is_some());
        assert_eq!(raw_keys(&store, EXPECT_TIME).len(), 1);
        drop(store);
        let store = reopen(dir.path()).await;
        assert!(store.expectation("c", "erp").await.expect("get").is_none());
        assert!(store.expectation("c", "bi").await.expect("get").is_some());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn purge_removes_old_expectations_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        for i in 0..5 {
            store
                .expect(expectation(&format!("old{i}"), "erp", -10 + i, 60))
                .await
                .expect("expect");
        }
        store
            .expect(expectation("edge", "erp", 100, 60))
            .await
            .expect("expect");
        store
            .expect(expectation("new", "bi", 500, 60))
            .await
            .expect("expect");
        let old_delivery = store
            .put(delivery("p", Some("d"), b"d", 50))
            .await
            .expect("put")
            .id();
        // Refreshing an old expectation does not make it young.
        store
            .expect(expectation("old0", "erp", 1_000, 7))
            .await
            .expect("expect");

        // Expectations are kept `EXPECTATION_EXTRA_RETENTION_MS` longer than deliveries: a cutoff
        // of 100 only removes the delivery.
        assert_eq!(store.purge_older_than(100, 2).await.expect("purge"), 1);
        assert!(store.record(old_delivery).await.expect("record").is_none());
        assert!(store
            .expectation("old0", "erp")
            .await
            .expect("get")
            .is_some());
        // Batches of 2 over 5 expectations: several commits.
        let cutoff = 100 + super::super::EXPECTATION_EXTRA_RETENTION_MS;
        assert_eq!(store.purge_older_than(cutoff, 2).await.expect("purge"), 5);
        assert!(store.record(old_delivery).await.expect("record").is_none());
        for i in 0..5 {
            assert!(store
                .expectation(&format!("old{i}"), "erp")
                .await
                .expect("get")
                .is_none());
        }
        assert_eq!(
            store.expectations("erp").await.expect("list"),
            vec![expectation("edge", "erp", 100, 60)]
        );
        assert_eq!(
            store.expectations("bi").await.expect("list"),
            vec![expectation("new", "bi", 500, 60)]
        );
        assert_eq!(raw_keys(&store, EXPECT_TIME).len(), 2);
        assert_eq!(store.purge_older_than(100, 2).await.expect("purge"), 0);

        // A time entry left behind (its record re-created later) goes without taking the record.
        store
            .db()
            .expect("db")
            .insert(expect_time_key(-50, "new", "bi"), &[][..])
            .expect("insert");
        assert_eq!(store.purge_older_than(cutoff, 2).await.expect("purge"), 0);
        assert!(store.expectation("new", "bi").await.expect("get").is_some());
        assert_eq!(raw_keys(&store, EXPECT_TIME).len(), 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reopen_keeps_expectations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), options()).expect("open");
        let kept = expectation("k", "erp", 42, 3_600);
        store.expect(kept.clone()).await.expect("expect");
        store
            .expect(expectation("r", "erp", 43, 60))
            .await
            .expect("expect");
        store
            .put(delivery("p", Some("r"), b"r", 44))
            .await
            .expect("put");
        store.close().await.expect("close");
        assert!(matches!(
            store.expect(kept.clone()).await,
            Err(StoreError::Closed)
        ));
        drop(store);
        let store = reopen(dir.path()).await;
        assert_eq!(
            store.expectations("erp").await.expect("list"),
            vec![kept.clone()]
        );
        assert!(store.expectation("r", "erp").await.expect("get").is_none());
        assert_eq!(
            store
                .expect(expectation("k", "erp", 99, 5))
                .await
                .expect("expect"),
            ExpectOutcome::Existed(expectation("k", "erp", 42, 5))
        );
    }

    #[test]
    fn expectation_keys_roundtrip_and_do_not_collide() {
        assert_eq!(parse_expect_key(&expect_key("a", "bc")), Some(("a", "bc")));
        assert_ne!(expect_key("a", "bc"), expect_key("ab", "c"));
        assert!(!expect_key("ab", "c").starts_with(&expect_prefix("a")));
        assert!(expect_key("a", "").starts_with(&expect_prefix("a")));
        assert_eq!(
            parse_expect_time_key(&expect_time_key(-7, "c\0", "p")),
            Some((-7, "c\0", "p"))
        );
        assert!(expect_time_key(-1, "z", "z") < expect_time_key(0, "a", "a"));
        assert!(parse_expect_key(&[EXPECT, 0, 0, 0, 9]).is_none());
    }
}
