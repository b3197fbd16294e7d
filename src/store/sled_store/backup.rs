//! Backup and restore of the whole sled store: every delivery, quarantined body and expectation,
//! with the ids, times and summaries they were stored with.
//!
//! [`SledStore::backup_items`] walks a store that nobody writes to (the `export` command opens
//! it with sled's exclusive lock, so the running service cannot). [`restore_into`] writes items
//! into an empty database that no process has open, keeping their ids, and sets the counters so
//! that the service opened on it afterwards goes on from there. The file format lives in the CLI
//! side (`crate::backup`); this module only knows keys.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{
    decode_delivery, decode_expectation, decode_quarantine, encode, expect_key, expect_time_key,
    id_key, id_suffix, insert_delivery, located_meta, read_body_of, read_bytes, segments,
    sled_error, sync_dir, Counters, DeliveryKeys, PolicyBits, SledOptions, SledStore,
    StoredDeliveryRef, StoredQuarantineRef, BODIES_DIR, COUNTERS_KEY, EXPECT, META, QBODY, QMETA,
    QUARANTINED_KEY,
};
use crate::store::{DeliveryRecord, Expectation, QuarantineRecord, StoreError};

/// Bytes of bodies gathered in one sled batch while restoring.
const RESTORE_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// Items gathered in one sled batch while restoring.
const RESTORE_BATCH_ITEMS: usize = 1024;

/// One stored item with its raw body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupItem {
    /// A delivery, matched or not.
    Delivery {
        /// Its record (id, policy, arrival time, summary).
        record: Box<DeliveryRecord>,
        /// Its raw body.
        body: Bytes,
    },
    /// A body that was refused and kept in quarantine.
    Quarantine {
        /// Its record.
        record: QuarantineRecord,
        /// Its raw body.
        body: Bytes,
    },
    /// An integrator's unanswered expectation.
    Expectation(Expectation),
}

/// How much a store (or a backup) holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackupCounts {
    /// Deliveries.
    pub deliveries: u64,
    /// Quarantined bodies.
    pub quarantined: u64,
    /// Expectations.
    pub expectations: u64,
    /// The next id the store would assign (ids are never reused, even across a restore).
    pub next_id: u64,
}

/// Why a restore could not be done.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Another process (the running service) has the database open.
    #[error("{} is in use by another process (is the service running? stop it first)", .0.display())]
    Locked(PathBuf),
    /// The database already holds data.
    #[error("{} already holds {} deliveries, {} quarantined bodies and {} expectations; import needs an empty data_dir (move the old one aside)", .dir.display(), .counts.deliveries, .counts.quarantined, .counts.expectations)]
    NotEmpty {
        /// The data directory.
        dir: PathBuf,
        /// What it holds.
        counts: BackupCounts,
    },
    /// Two items with the same id (or the same expectation twice).
    #[error("duplicate item {0}")]
    Duplicate(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Opens the database in `dir` without a writer thread; a lock held by another process is
/// [`RestoreError::Locked`].
fn open_raw(dir: &Path) -> Result<sled::Db, RestoreError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreError::Io(format!("creating {}: {e}", dir.display())))?;
    sled::Config::new()
        .path(dir)
        .cache_capacity(SledOptions::default().cache_capacity_bytes)
        .open()
        .map_err(|e| match e {
            // sled 0.34 reports a held `flock` on its `db` file this way.
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                RestoreError::Locked(dir.to_path_buf())
            }
            other => RestoreError::Store(StoreError::Io(format!(
                "opening {}: {other}",
                dir.display()
            ))),
        })
}

/// Whether opening `dir` failed because another process holds the database.
pub fn is_locked_error(error: &StoreError) -> bool {
    matches!(error, StoreError::Io(message) if message.contains("could not acquire lock"))
}

/// Counts the keys under a one-byte prefix.
fn count(db: &sled::Db, prefix: u8) -> Result<u64, StoreError> {
    let mut n = 0;
    for key in db.scan_prefix([prefix]).keys() {
        key.map_err(sled_error)?;
        n += 1;
    }
    Ok(n)
}

/// Exact counts of what `db` holds, and its next id.
fn counts_of(db: &sled::Db) -> Result<BackupCounts, StoreError> {
    Ok(BackupCounts {
        deliveries: count(db, META)?,
        quarantined: count(db, QMETA)?,
        expectations: count(db, EXPECT)?,
        next_id: super::initial_next_id(db)?,
    })
}

impl SledStore {
    /// What the store holds, counted (not from the counters). Blocking.
    pub fn backup_counts(&self) -> Result<BackupCounts, StoreError> {
        counts_of(&self.db()?)
    }

    /// Every committed item: deliveries in id order, then quarantined bodies in id order, then
    /// expectations. Blocking; meant for a store nobody writes to (see the module documentation).
    pub fn backup_items(&self) -> impl Iterator<Item = Result<BackupItem, StoreError>> + '_ {
        let watermark = self.watermark();
        // The store reopens its database after an i/o error; a walk keeps the handle it began
        // with (an error when there is none at that moment).
        let db = match self.db() {
            Ok(db) => db,
            Err(e) => {
                return Box::new(std::iter::once(Err(e)))
                    as Box<dyn Iterator<Item = Result<BackupItem, StoreError>> + '_>
            }
        };
        let (body_db, qbody_db) = (db.clone(), db.clone());
        let segments = std::sync::Arc::clone(&self.segments);
        let deliveries =
            db.scan_prefix([META])
                .map(move |entry| -> Result<Option<BackupItem>, StoreError> {
                    let (key, raw) = entry.map_err(sled_error)?;
                    let Some(id) = id_suffix(&key).filter(|id| *id <= watermark) else {
                        return Ok(None);
                    };
                    let record = decode_delivery(id, &raw)?;
                    let body = read_body_of(&body_db, &segments, id, &raw)?
                        .ok_or_else(|| missing_body(id))?;
                    Ok(Some(BackupItem::Delivery {
                        record: Box::new(record),
                        body,
                    }))
                });
        let quarantined =
            db.scan_prefix([QMETA])
                .map(move |entry| -> Result<Option<BackupItem>, StoreError> {
                    let (key, raw) = entry.map_err(sled_error)?;
                    let Some(id) = id_suffix(&key).filter(|id| *id <= watermark) else {
                        return Ok(None);
                    };
                    let record = decode_quarantine(id, &raw)?;
                    let body = read_bytes(&qbody_db, &id_key(QBODY, id))?
                        .ok_or_else(|| missing_body(id))?;
                    Ok(Some(BackupItem::Quarantine { record, body }))
                });
        let expectations =
            db.scan_prefix([EXPECT])
                .map(|entry| -> Result<Option<BackupItem>, StoreError> {
                    let (key, raw) = entry.map_err(sled_error)?;
                    Ok(Some(BackupItem::Expectation(decode_expectation(
                        &key, &raw,
                    )?)))
                });
        Box::new(
            deliveries
                .chain(quarantined)
                .chain(expectations)
                .filter_map(Result::transpose),
        )
    }
}

fn missing_body(id: u64) -> StoreError {
    StoreError::Corrupt {
        key: format!("b/{}", crate::store::DeliveryId(id)),
        reason: "record without a body".to_owned(),
    }
}

/// Writes `items` into the empty database in `dir` (created if missing), keeping their ids,
/// then makes everything durable. `next_id` is the exporting store's next id; the restored
/// store goes on from it (or past the highest restored id, if that is higher).
///
/// Refuses a database another process has open ([`RestoreError::Locked`]) or one that holds
/// anything ([`RestoreError::NotEmpty`]). Items are trusted as they are: the caller checks
/// sizes and checksums first. Blocking.
pub fn restore_into<E>(
    dir: &Path,
    next_id: u64,
    items: impl Iterator<Item = Result<BackupItem, E>>,
) -> Result<BackupCounts, E>
where
    E: From<RestoreError>,
{
    let db = open_raw(dir)?;
    let mut existing = counts_of(&db).map_err(RestoreError::from)?;
    let bodies = dir.join(BODIES_DIR);
    let io = |e: std::io::Error| {
        RestoreError::from(StoreError::Io(format!("{}: {e}", bodies.display())))
    };
    // Records in the body log would be replayed into sled by the next open.
    let logged = segments::scan(&bodies, 0, |_| true).map_err(io)?;
    existing.deliveries += logged.records.len() as u64;
    if existing.deliveries + existing.quarantined + existing.expectations > 0 {
        return Err(RestoreError::NotEmpty {
            dir: dir.to_path_buf(),
            counts: existing,
        }
        .into());
    }
    let mut restorer = Restorer {
        counts: BackupCounts {
            next_id: next_id.max(existing.next_id).max(1),
            ..BackupCounts::default()
        },
        ids: HashSet::new(),
        expectations: HashSet::new(),
        batch: sled::Batch::default(),
        bits: PolicyBits::default(),
        batch_items: 0,
        batch_bytes: 0,
        log: segments::SegmentLog::open(&bodies, logged.end, None).map_err(io)?,
    };
    for item in items {
        restorer.add(&item?)?;
        if restorer.batch_items >= RESTORE_BATCH_ITEMS
            || restorer.batch_bytes >= RESTORE_BATCH_BYTES
        {
            restorer.apply(&db)?;
        }
    }
    let counts = restorer.counts;
    restorer
        .batch
        .insert(QUARANTINED_KEY, &counts.quarantined.to_be_bytes()[..]);
    restorer.log.sync().map_err(io)?;
    let counters = Counters {
        next_id: counts.next_id,
        deliveries: counts.deliveries,
        log_end: restorer.log.position(),
    };
    restorer
        .batch
        .insert(COUNTERS_KEY, &counters.to_bytes()[..]);
    restorer.apply(&db)?;
    db.flush().map_err(|e| RestoreError::from(sled_error(e)))?;
    drop(db);
    sync_tree(dir, 2).map_err(RestoreError::from)?;
    Ok(counts)
}

/// The state of one restore.
struct Restorer {
    /// What was added so far.
    counts: BackupCounts,
    /// Delivery and quarantine ids added so far (they share one id space).
    ids: HashSet<u64>,
    /// Expectation keys added so far.
    expectations: HashSet<Vec<u8>>,
    /// The batch being gathered.
    batch: sled::Batch,
    /// Its bits of the per-policy index, added to it when it is applied.
    bits: PolicyBits,
    /// Items in it.
    batch_items: usize,
    /// Body bytes in it.
    batch_bytes: usize,
    /// The body log the bodies go to.
    log: segments::SegmentLog,
}

impl Restorer {
    /// Applies the gathered batch.
    fn apply(&mut self, db: &sled::Db) -> Result<(), RestoreError> {
        std::mem::take(&mut self.bits).write(db, &mut self.batch)?;
        db.apply_batch(std::mem::take(&mut self.batch))
            .map_err(sled_error)?;
        self.batch_items = 0;
        self.batch_bytes = 0;
        Ok(())
    }

    /// Claims an id; a second item with it is an error.
    fn claim(&mut self, id: crate::store::DeliveryId) -> Result<u64, RestoreError> {
        if id.0 == 0 || !self.ids.insert(id.0) {
            return Err(RestoreError::Duplicate(format!("id {id}")));
        }
        self.counts.next_id = self.counts.next_id.max(id.0.saturating_add(1));
        Ok(id.0)
    }

    /// Adds the keys of one item to the batch, as the writer would have written them.
    fn add(&mut self, item: &BackupItem) -> Result<(), RestoreError> {
        match item {
            BackupItem::Delivery { record, body } => {
                let id = self.claim(record.id)?;
                let stored = StoredDeliveryRef {
                    policy: &record.policy,
                    received_at_ms: record.received_at_ms,
                    size: record.size,
                    sha256: hex::encode(record.sha256),
                    extracted: &record.extracted,
                };
                let meta = encode(&stored, "restored delivery")?;
                let at = self.log.append(id, &meta, body).map_err(|e| {
                    RestoreError::from(StoreError::Io(format!("writing the body log: {e}")))
                })?;
                insert_delivery(
                    &mut self.batch,
                    &mut self.bits,
                    DeliveryKeys {
                        id,
                        controlid: record.extracted.controlid.as_deref(),
                        sha256: &record.sha256,
                        received_at_ms: record.received_at_ms,
                        policy: &record.policy,
                    },
                    &located_meta(at, &meta),
                );
                self.counts.deliveries += 1;
                self.batch_bytes += body.len();
            }
            BackupItem::Quarantine { record, body } => {
                let id = self.claim(record.id)?;
                let stored = StoredQuarantineRef {
                    policy: &record.policy,
                    received_at_ms: record.received_at_ms,
                    size: record.size,
                    reason: &record.reason,
                };
                let batch = &mut self.batch;
                batch.insert(
                    &id_key(QMETA, id)[..],
                    encode(&stored, "restored quarantine item")?,
                );
                batch.insert(&id_key(QBODY, id)[..], &body[..]);
                self.counts.quarantined += 1;
                self.batch_bytes += body.len();
            }
            BackupItem::Expectation(expectation) => {
                let key = expect_key(&expectation.controlid, &expectation.poller);
                if !self.expectations.insert(key.clone()) {
                    return Err(RestoreError::Duplicate(format!(
                        "expectation of {:?} for {:?}",
                        expectation.poller, expectation.controlid
                    )));
                }
                self.batch
                    .insert(key, encode(expectation, "restored expectation")?);
                self.batch.insert(
                    expect_time_key(
                        expectation.since_ms,
                        &expectation.controlid,
                        &expectation.poller,
                    ),
                    &[][..],
                );
                self.counts.expectations += 1;
            }
        }
        self.batch_items += 1;
        Ok(())
    }
}

/// Fsyncs every file and directory under `dir`, `depth` levels deep (sled's log, snapshots
/// and blobs): sled's own flush leaves blob files and the drive's cache out.
fn sync_tree(dir: &Path, depth: u32) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| StoreError::Io(format!("reading {}: {e}", dir.display())))?;
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() && depth > 0 => sync_tree(&path, depth - 1)?,
            Ok(t) if t.is_file() => match std::fs::File::open(&path).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                // sled removes blob files it no longer needs, possibly right now.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StoreError::Io(format!("syncing {}: {e}", path.display())));
                }
            },
            _ => {}
        }
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::store::sled_store::read_counters;
    use crate::store::{
        DeliveryId, NewDelivery, NewQuarantine, PutOutcome, Scope, Store, StoreError,
    };
    use crate::xml::Extracted;

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

    #[tokio::test]
    async fn backup_then_restore_keeps_ids_bodies_and_counters() {
        let from = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(from.path(), SledOptions::default()).expect("open");
        let a = store
            .put(delivery("p", Some("cid-1"), b"<a/>", 1_000))
            .await
            .expect("put");
        let b = store
            .put(delivery("p", None, b"<b/>", 2_000))
            .await
            .expect("put");
        let q = store
            .quarantine(NewQuarantine {
                policy: "p".into(),
                received_at_ms: 3_000,
                body: Bytes::from_static(b"not xml"),
                reason: "not xml".into(),
            })
            .await
            .expect("quarantine");
        store
            .expect(Expectation {
                controlid: "cid-2".into(),
                poller: "erp".into(),
                since_ms: 4_000,
                timeout_seconds: 60,
                scope: Scope::All,
            })
            .await
            .expect("expect");
        let counts = store.backup_counts().expect("counts");
        assert_eq!(
            (counts.deliveries, counts.quarantined, counts.expectations),
            (2, 1, 1)
        );
        let items: Vec<BackupItem> = store
            .backup_items()
            .collect::<Result<_, StoreError>>()
            .expect("items");
        assert_eq!(items.len(), 4);
        store.close().await.expect("close");
        drop(store);

        let to = tempfile::tempdir().expect("tempdir");
        let restored = restore_into::<RestoreError>(
            to.path(),
            counts.next_id,
            items.clone().into_iter().map(Ok),
        )
        .expect("restore");
        assert_eq!(restored, counts);
        // A second restore into the same place is refused.
        let again = restore_into::<RestoreError>(to.path(), 1, items.clone().into_iter().map(Ok));
        assert!(matches!(again, Err(RestoreError::NotEmpty { .. })));

        let store = SledStore::open(to.path(), SledOptions::default()).expect("reopen");
        assert_eq!(store.delivery_count(), 2);
        assert_eq!(store.quarantine_count(), 1);
        let latest = store
            .latest("cid-1", &Scope::All)
            .await
            .expect("latest")
            .expect("found");
        assert_eq!(latest.record.id, a.id());
        assert_eq!(
            store.body(b.id()).await.expect("body").as_deref(),
            Some(&b"<b/>"[..])
        );
        assert_eq!(
            store.quarantined_body(q).await.expect("qbody").as_deref(),
            Some(&b"not xml"[..])
        );
        assert!(store
            .expectation("cid-2", "erp")
            .await
            .expect("expectation")
            .is_some());
        // Ids go on after the restored ones; the same bytes again are a duplicate.
        let next = store
            .put(delivery("p", Some("cid-3"), b"<c/>", 5_000))
            .await
            .expect("put");
        assert!(next.id() > DeliveryId(counts.next_id - 1));
        let dup = store
            .put(delivery("p", Some("cid-1"), b"<a/>", 6_000))
            .await
            .expect("put");
        assert_eq!(dup, PutOutcome::Duplicate(a.id()));
        assert_eq!(
            read_counters(&store.db().expect("db"))
                .expect("counters")
                .map(|c| c.deliveries),
            Some(3)
        );
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn restore_refuses_a_database_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), SledOptions::default()).expect("open");
        let result = restore_into::<RestoreError>(dir.path(), 1, std::iter::empty());
        assert!(
            matches!(result, Err(RestoreError::Locked(_))),
            "{:?}",
            result.err()
        );
        let err = SledStore::open(dir.path(), SledOptions::default())
            .err()
            .expect("second open fails");
        assert!(is_locked_error(&err), "{err}");
        store.close().await.expect("close");
    }
}
