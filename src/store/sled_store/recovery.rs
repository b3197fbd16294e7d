//! Opening sled after an unclean stop, and salvaging a database that sled cannot open.
//!
//! sled 0.34.7 writes a snapshot of its page table only while it opens a database (its
//! `snapshot_after_ops` setting does nothing): it writes `snap.LSN.generating`, fsyncs it and
//! renames it to `snap.LSN`, then removes the older snapshots. But when it looks for the snapshot
//! to start from, it takes every file named `snap.*` and reads the one that sorts last, which can
//! be a `.generating` file left by a process killed while writing it: the CRC does not match and
//! the database never opens again (spacejam/sled#1527). Such a file was never in use (the
//! complete snapshot it was to replace is still there, and sled replays the log from it), so
//! [`remove_unfinished_snapshots`] removes it before sled opens the directory.
//!
//! Anything else that keeps sled from opening (a damaged complete snapshot, a panic inside sled's
//! recovery) is not repaired at start: the service refuses to start with a line that names the
//! `recover` command, and [`recover`] salvages what it can into a fresh database. It works on a
//! copy, so the damaged files are never written to; it first opens the copy as it is, then with
//! its newest snapshot set aside (sled then starts from an older snapshot, or replays the whole
//! log), reads every delivery, quarantined body and expectation it can, writes them into a new
//! database with their ids, and only then swaps the directories. The damaged files are kept in
//! `data_dir/recovery-TIMESTAMP/broken/` and never deleted.
//!
//! The swap is two steps of renames inside `data_dir` (the broken files out, the fresh ones in),
//! recorded in [`MARKER`]; while the marker exists the store refuses to open, and running
//! `recover` again finishes the swap.

use std::fs::{self, File};
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::backup::{restore_into, BackupCounts, RestoreError};
use super::{sync_dir, SledOptions, SledStore};
use crate::store::StoreError;

/// The file that says a swap of `recover` is under way: the recovery directory's name, a newline,
/// and the step (`out` or `in`).
pub const MARKER: &str = "recovery-in-progress";

/// What the service says when the database cannot be opened.
pub const RECOVER_HINT: &str =
    "the database cannot be opened: stop the service and run `callback-receiver recover --config FILE`";

/// At most this many unreadable items are skipped before the salvage gives up (a broken scan can
/// return the same error forever).
const MAX_SKIPPED: u64 = 10_000;

/// Why `recover` could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// There is no database in the directory.
    #[error("{} holds no database (no `db` file)", .0.display())]
    Missing(PathBuf),
    /// Another process (the running service) has the database open.
    #[error("{} is in use by another process (is the service running? stop it first)", .0.display())]
    Locked(PathBuf),
    /// No way of opening a copy of the database worked.
    #[error("{}: sled cannot open the database even without its snapshots ({reason}); nothing was changed, the files are as they were", .dir.display())]
    Unreadable {
        /// The data directory.
        dir: PathBuf,
        /// sled's error on the last attempt.
        reason: String,
    },
    /// A file operation failed.
    #[error("{}: {reason}", .path.display())]
    File {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Writing the fresh database failed.
    #[error("writing the recovered database: {0}")]
    Restore(#[from] RestoreError),
    /// The store failed otherwise.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `recover` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoverReport {
    /// The database opens and every item reads: nothing was changed.
    Healthy {
        /// What it holds.
        counts: BackupCounts,
    },
    /// A fresh database was written from what could be read.
    Recovered {
        /// What the fresh database holds.
        counts: BackupCounts,
        /// Items that could not be read and were left out.
        skipped: u64,
        /// How the copy was opened.
        method: String,
        /// Where the broken files are kept.
        broken: PathBuf,
    },
    /// An interrupted swap was finished.
    Resumed {
        /// Where the broken files are kept.
        broken: PathBuf,
    },
}

impl std::fmt::Display for RecoverReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecoverReport::Healthy { counts } => write!(
                f,
                "the database opens and reads: {} deliveries, {} quarantined bodies, {} expectations; nothing to recover",
                counts.deliveries, counts.quarantined, counts.expectations
            ),
            RecoverReport::Recovered {
                counts,
                skipped,
                method,
                broken,
            } => write!(
                f,
                "recovered {} deliveries, {} quarantined bodies, {} expectations ({method}; {skipped} unreadable items left out); the broken files are kept in {}",
                counts.deliveries,
                counts.quarantined,
                counts.expectations,
                broken.display()
            ),
            RecoverReport::Resumed { broken } => write!(
                f,
                "finished an interrupted recovery; the broken files are kept in {}",
                broken.display()
            ),
        }
    }
}

/// Whether `name` is one of the store's entries in a data directory (sled's log, its
/// configuration, snapshots and blobs, and the body log), as opposed to what else lives there
/// (`dev-secrets.toml`, recoveries).
fn is_sled_entry(name: &str) -> bool {
    matches!(name, "db" | "conf" | "blobs" | super::BODIES_DIR) || name.starts_with("snap.")
}

/// Refuses to open a directory in the middle of a `recover` swap.
pub(super) fn check_no_recovery_in_progress(dir: &Path) -> Result<(), StoreError> {
    if dir.join(MARKER).exists() {
        return Err(StoreError::Io(format!(
            "an interrupted recovery left {}: run `callback-receiver recover --config FILE` again to finish it",
            dir.join(MARKER).display()
        )));
    }
    Ok(())
}

/// Removes the `snap.*.generating` files of `dir`: snapshots that sled began to write and never
/// finished (see the module documentation). Returns how many went. Does nothing while another
/// process holds the database (its own open may be writing one right now).
pub(super) fn remove_unfinished_snapshots(dir: &Path) -> Result<usize, StoreError> {
    let io = |e: std::io::Error| StoreError::Io(format!("reading {}: {e}", dir.display()));
    let unfinished: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("snap.") && n.ends_with(".generating"))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(e)),
    };
    if unfinished.is_empty() {
        return Ok(0);
    }
    // sled holds an exclusive `flock` on `db` while it has the database open; take it too, so
    // that a second process never removes the snapshot the first one is writing.
    let lock = match File::open(dir.join("db")) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(e)),
    };
    if fs2::FileExt::try_lock_exclusive(&lock).is_err() {
        return Ok(0);
    }
    for path in &unfinished {
        fs::remove_file(path)
            .map_err(|e| StoreError::Io(format!("removing {}: {e}", path.display())))?;
        tracing::warn!(file = %path.display(), "removed an unfinished sled snapshot left by an unclean stop");
    }
    sync_dir(dir)?;
    drop(lock);
    Ok(unfinished.len())
}

/// Opens sled in `dir`, turning a panic inside sled (seen in its recovery code, e.g.
/// spacejam/sled#1387) into an error instead of a crash.
///
/// While sled opens, the panic hook is replaced by one that only records the message, so a
/// panic prints no backtrace; a panic of another thread in that moment is recorded the same way.
pub(super) fn open_sled(dir: &Path, cache_capacity_bytes: u64) -> Result<sled::Db, String> {
    let caught: Arc<Mutex<Option<String>>> = Arc::default();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new({
        let caught = Arc::clone(&caught);
        move |info| {
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            let mut slot = caught.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(message);
        }
    }));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity_bytes)
            .open()
    }));
    std::panic::set_hook(previous);
    match result {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(e.to_string().replace('\n', " ")),
        Err(_) => {
            let message = caught
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(format!(
                "sled panicked while opening the database: {}",
                message.replace('\n', " ")
            ))
        }
    }
}

/// Salvages the database in `dir` into a fresh one; see the module documentation. Blocking.
pub fn recover(dir: &Path) -> Result<RecoverReport, RecoverError> {
    let marker = dir.join(MARKER);
    if marker.exists() {
        return resume(dir, &marker);
    }
    if !dir.join("db").is_file() {
        return Err(RecoverError::Missing(dir.to_path_buf()));
    }
    ensure_unlocked(dir)?;

    let (name, work) = new_recovery_dir(dir)?;
    let salvage = work.join("salvage");
    let fresh = work.join("fresh");
    let broken = work.join("broken");
    copy_sled_entries(dir, &salvage)?;

    // Open the copy as it is, then with its newest snapshots set aside one by one.
    let mut set_aside = 0;
    let (store, method) = loop {
        remove_unfinished_snapshots(&salvage)?;
        let method = match set_aside {
            0 => "opened as it was".to_owned(),
            n => format!("opened with its {n} newest snapshot file(s) set aside"),
        };
        match SledStore::open(&salvage, SledOptions::default()) {
            Ok(store) => break (store, method),
            Err(e) => {
                tracing::warn!(error = %e, attempt = %method, "the copy does not open");
                match newest_snapshot(&salvage)? {
                    Some(snapshot) => {
                        let aside = work.join(format!("set-aside-{set_aside}"));
                        create_dir(&aside)?;
                        let to = aside.join(snapshot.file_name().unwrap_or_default());
                        rename(&snapshot, &to)?;
                        set_aside += 1;
                    }
                    None => {
                        let _ = fs::remove_dir_all(&work);
                        return Err(RecoverError::Unreadable {
                            dir: dir.to_path_buf(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
        }
    };

    // Write everything readable into the fresh database, streaming (bodies are never all in
    // memory). Ids never go back: `restore_into` also goes past the highest id it writes.
    let next_id = store.backup_counts().map(|c| c.next_id).unwrap_or(1);
    let skipped = std::cell::Cell::new(0u64);
    let items = store
        .backup_items()
        .take_while(|_| skipped.get() < MAX_SKIPPED)
        .filter_map(|item| match item {
            Ok(item) => Some(Ok::<_, RestoreError>(item)),
            Err(e) => {
                skipped.set(skipped.get() + 1);
                tracing::warn!(error = %e, "an unreadable item is left out");
                None
            }
        });
    let restored = restore_into::<RestoreError>(&fresh, next_id, items);
    drop(store);
    let counts = match restored {
        Ok(counts) => counts,
        Err(e) => {
            let _ = fs::remove_dir_all(&work);
            return Err(e.into());
        }
    };
    let skipped = skipped.get();
    // A database that opens as it is and reads in full is left alone.
    if set_aside == 0 && skipped == 0 {
        let _ = fs::remove_dir_all(&work);
        return Ok(RecoverReport::Healthy { counts });
    }

    // The swap: the broken files out, then the fresh ones in (see `resume`).
    write_marker(dir, &name, "out")?;
    finish_swap(dir, &work, &name)?;
    let _ = fs::remove_dir_all(&salvage);
    Ok(RecoverReport::Recovered {
        counts,
        skipped,
        method,
        broken,
    })
}

/// Finishes a swap that an earlier `recover` began.
fn resume(dir: &Path, marker: &Path) -> Result<RecoverReport, RecoverError> {
    let text = fs::read_to_string(marker).map_err(|e| file_error(marker, e))?;
    let name = text.lines().next().unwrap_or_default().trim().to_owned();
    if name.is_empty() || name.contains('/') || !dir.join(&name).join("fresh").is_dir() {
        return Err(RecoverError::File {
            path: marker.to_path_buf(),
            reason: "names no recovery directory with a fresh database; look at it by hand"
                .to_owned(),
        });
    }
    let work = dir.join(&name);
    finish_swap(dir, &work, &name)?;
    let _ = fs::remove_dir_all(work.join("salvage"));
    Ok(RecoverReport::Resumed {
        broken: work.join("broken"),
    })
}

/// Moves sled's entries of `dir` into `work/broken`, then those of `work/fresh` into `dir`, then
/// removes the marker. Each step only moves what is left, so it can be run again after a crash.
fn finish_swap(dir: &Path, work: &Path, name: &str) -> Result<(), RecoverError> {
    let marker = dir.join(MARKER);
    let step = fs::read_to_string(&marker)
        .map_err(|e| file_error(&marker, e))?
        .lines()
        .nth(1)
        .unwrap_or("out")
        .trim()
        .to_owned();
    let broken = work.join("broken");
    let fresh = work.join("fresh");
    if step != "in" {
        create_dir(&broken)?;
        for entry in sled_entries(dir)? {
            rename(&dir.join(&entry), &broken.join(&entry))?;
        }
        sync(&broken)?;
        write_marker(dir, name, "in")?;
    }
    for entry in sled_entries(&fresh)? {
        rename(&fresh.join(&entry), &dir.join(&entry))?;
    }
    sync(dir)?;
    fs::remove_file(&marker).map_err(|e| file_error(&marker, e))?;
    sync(dir)?;
    Ok(())
}

/// Fails with [`RecoverError::Locked`] while another process holds the database.
fn ensure_unlocked(dir: &Path) -> Result<(), RecoverError> {
    let path = dir.join("db");
    let file = File::open(&path).map_err(|e| file_error(&path, e))?;
    if fs2::FileExt::try_lock_exclusive(&file).is_err() {
        return Err(RecoverError::Locked(dir.to_path_buf()));
    }
    Ok(())
}

/// The newest complete or unfinished snapshot file of `dir` (the one sled would read).
fn newest_snapshot(dir: &Path) -> Result<Option<PathBuf>, RecoverError> {
    let mut snapshots: Vec<String> = sled_entries(dir)?
        .into_iter()
        .filter(|n| n.starts_with("snap."))
        .collect();
    snapshots.sort();
    Ok(snapshots.pop().map(|n| dir.join(n)))
}

/// The names of sled's entries in `dir`.
fn sled_entries(dir: &Path) -> Result<Vec<String>, RecoverError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(file_error(dir, e)),
    };
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_sled_entry(n))
        .collect())
}

/// Copies sled's entries of `from` (files, and the `blobs` directory) into the new `to`.
fn copy_sled_entries(from: &Path, to: &Path) -> Result<(), RecoverError> {
    create_dir(to)?;
    for name in sled_entries(from)? {
        let source = from.join(&name);
        if source.is_dir() {
            create_dir(&to.join(&name))?;
            let entries = fs::read_dir(&source).map_err(|e| file_error(&source, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| file_error(&source, e))?;
                if entry.path().is_file() {
                    copy(&entry.path(), &to.join(&name).join(entry.file_name()))?;
                }
            }
        } else {
            copy(&source, &to.join(&name))?;
        }
    }
    Ok(())
}

/// Writes the marker durably: the recovery directory's name and the step.
fn write_marker(dir: &Path, name: &str, step: &str) -> Result<(), RecoverError> {
    let marker = dir.join(MARKER);
    let partial = dir.join(format!("{MARKER}.partial"));
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&partial)?;
        file.write_all(format!("{name}\n{step}\n").as_bytes())?;
        file.sync_all()
    };
    write().map_err(|e| file_error(&partial, e))?;
    rename(&partial, &marker)?;
    sync(dir)
}

/// Creates a recovery directory of a name no earlier recovery has (two in one second get a
/// suffix): its contents may be removed when the attempt ends, so it must be this run's own.
fn new_recovery_dir(dir: &Path) -> Result<(String, PathBuf), RecoverError> {
    let stamp = timestamp();
    for n in 0..1000 {
        let name = match n {
            0 => format!("recovery-{stamp}"),
            n => format!("recovery-{stamp}-{n}"),
        };
        let path = dir.join(&name);
        match fs::create_dir(&path) {
            Ok(()) => return Ok((name, path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(file_error(&path, e)),
        }
    }
    Err(RecoverError::File {
        path: dir.to_path_buf(),
        reason: "too many recovery directories for one second".to_owned(),
    })
}

/// The current UTC time as `YYYYMMDDTHHMMSSZ`, for directory names.
fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

fn file_error(path: &Path, e: std::io::Error) -> RecoverError {
    RecoverError::File {
        path: path.to_path_buf(),
        reason: e.to_string().to_lowercase(),
    }
}

fn create_dir(path: &Path) -> Result<(), RecoverError> {
    fs::create_dir_all(path).map_err(|e| file_error(path, e))
}

fn rename(from: &Path, to: &Path) -> Result<(), RecoverError> {
    fs::rename(from, to).map_err(|e| file_error(from, e))
}

fn copy(from: &Path, to: &Path) -> Result<(), RecoverError> {
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| file_error(from, e))
}

fn sync(dir: &Path) -> Result<(), RecoverError> {
    sync_dir(dir).map_err(RecoverError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sleds_entries_are_moved() {
        for name in [
            "db",
            "conf",
            "blobs",
            "bodies",
            "snap.00000000000001A0",
            "snap.1.generating",
        ] {
            assert!(is_sled_entry(name), "{name}");
        }
        for name in [
            "dev-secrets.toml",
            "recovery-20260101T000000Z",
            MARKER,
            "space-probe.tmp",
        ] {
            assert!(!is_sled_entry(name), "{name}");
        }
    }

    #[test]
    fn a_leftover_generating_file_is_removed_and_others_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("db"), b"").expect("db");
        fs::write(dir.path().join("snap.0000000000000010"), b"ok").expect("snap");
        fs::write(dir.path().join("snap.0000000000000020.generating"), b"x").expect("gen");
        assert_eq!(remove_unfinished_snapshots(dir.path()).expect("remove"), 1);
        assert!(dir.path().join("snap.0000000000000010").exists());
        assert!(!dir.path().join("snap.0000000000000020.generating").exists());
        assert_eq!(remove_unfinished_snapshots(dir.path()).expect("remove"), 0);
    }
}
