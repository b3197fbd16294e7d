//! The body log: append-only segment files that hold every delivery, record and body, outside
//! sled.
//!
//! sled keeps only the small things (records with the body's location, indexes, counters,
//! expectations). A delivery is first appended here, as one self-checking record (header,
//! the encoded record, the body), and the log file is `fdatasync`ed once per group of writes:
//! that is what makes a `200` durable. sled's own log is flushed in the background (and by
//! every group that changes more than deliveries), so a crash can leave sled behind the body
//! log; opening the store then replays the records that sled does not have yet
//! ([`super::replay`]). Bodies never pass through sled, so large callbacks do not bloat its
//! page table, and a full disk refuses a body here, where the writer can truncate it away,
//! rather than inside sled, whose handle an i/o error breaks.
//!
//! # Files
//!
//! `DIR/bodies/NNNNNNNNNNNNNNNN.seg` (the segment number, 16 hex digits). The writer appends to
//! the newest segment and starts a new one once it holds [`SEGMENT_BYTES`]; a body larger than
//! that gets a segment of its own. A segment is `fsync`ed before the writer moves on to the
//! next, so only the newest one can end in a torn record.
//!
//! # Preallocated segments
//!
//! Appending to a file makes every `fdatasync` write the file's new size too, which on this
//! class of disk costs about half as much again as the data (0.16 ms against 0.10 ms for a 4 KB
//! overwrite, `bench/run`'s probe). So while the writer fills one segment, a thread of its own
//! ([`Preparer`]) writes the next one full of zeros (`NNNN.prep`) and `fsync`s it; at rotation the
//! writer renames it to `NNNN.seg` and overwrites the zeros, and the `fdatasync` of a group
//! writes data only. The zeros are written with `O_DIRECT` where the file system allows it, so
//! that they cost neither a copy into the page cache nor page cache memory; the writer then
//! pads each write to a whole page (with the zeros that are there anyway), so that the kernel
//! never reads a page from the disk to complete one. A full segment is cut to its last record when the writer moves on, so only
//! the newest segment ends in zeros. Opening the log treats zeros after the last record as
//! free space, not as a torn tail. When the next segment is not ready in time (or the disk is
//! short of space), the writer creates a plain one, as without preparation. Whole segments are removed once no
//! stored delivery points into them (retention works in arrival order, so old segments empty
//! out); a delivery removed by `DELETE` leaves its bytes until its segment goes.
//!
//! # Record
//!
//! | bytes | what |
//! | --- | --- |
//! | 4 | magic `CRL1` |
//! | 4 | CRC-32 of everything after it (header fields, record and body) |
//! | 8 | delivery id, big-endian |
//! | 4 | length of the encoded record, big-endian |
//! | 8 | length of the body, big-endian |
//! | … | the encoded record (as sled stores it without a location) |
//! | … | the body |
//!
//! The CRC is checked by the scan at open and by every read of a body
//! ([`SegmentReader::body`]): damaged bytes are an error, never a body. A torn record at the
//! end of the newest segment is cut off when the log is opened, its bytes (without the zeros at their end) kept in
//! `NNNNNNNNNNNNNNNN.tail-OFFSET` beside it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;

/// Name of the directory of segments inside the data directory.
pub(super) const BODIES_DIR: &str = "bodies";

/// Size after which the writer starts a new segment.
pub(super) const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// The page size that writes inside a preallocated segment are padded to, and the alignment of
/// the preparer's direct writes (the largest logical block size of common devices).
const PAGE_BYTES: u64 = 4096;

/// Record magic.
const MAGIC: [u8; 4] = *b"CRL1";

/// Bytes of a record header.
pub(super) const HEADER_BYTES: u64 = 28;

/// Pending bytes kept in memory before they are written; bodies at least this large are
/// written straight from the request's buffer.
const BUFFER_BYTES: usize = 256 * 1024;

/// Where a record starts: its segment and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Position {
    /// The segment number.
    pub segment: u64,
    /// The byte offset of the record in it.
    pub offset: u64,
}

impl Position {
    /// As stored in sled: segment ‖ offset, big-endian.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.segment.to_be_bytes());
        out[8..].copy_from_slice(&self.offset.to_be_bytes());
        out
    }

    /// Reads what [`to_bytes`](Self::to_bytes) wrote.
    pub fn from_bytes(bytes: &[u8]) -> Option<Position> {
        let segment = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let offset = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(Position { segment, offset })
    }
}

/// The path of segment `n` in the segment directory `dir`.
fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016x}.seg"))
}

/// Where a [`Preparer`] writes segment `segment` before the writer takes it: a name of its own
/// (a number per preparer), so that a stopping preparer never removes another one's file.
fn prepared_path(dir: &Path, segment: u64) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{segment:016x}.{n}.prep"))
}

/// Removes segments a preparer left half-written (a crash, or a stop while it worked).
fn remove_prepared(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(".prep"))
        {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// The offset just after the last non-zero byte of `file` in `from..len` (`from` when they are
/// all zeros), read backwards in chunks.
fn end_of_data(file: &File, from: u64, len: u64) -> io::Result<u64> {
    let mut buf = vec![0_u8; 1 << 20];
    let mut end = len;
    while end > from {
        let start = end.saturating_sub(buf.len() as u64).max(from);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(last) = chunk.iter().rposition(|b| *b != 0) {
            return Ok(start + last as u64 + 1);
        }
        end = start;
    }
    Ok(from)
}

/// Writes the next segment full of zeros on a thread of its own (see the module documentation).
struct Preparer {
    /// The segment it prepares.
    segment: u64,
    /// The file it writes.
    path: PathBuf,
    /// Set to make it stop and remove its file.
    cancel: Arc<AtomicBool>,
    /// `None` once joined.
    thread: Option<std::thread::JoinHandle<io::Result<Option<File>>>>,
}

impl Drop for Preparer {
    /// Stops the thread and removes what it wrote: a segment not taken is not left behind.
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.cancel.store(true, Ordering::Relaxed);
            if let Ok(Ok(Some(file))) = thread.join() {
                drop(file);
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// The size of the zero writes of a [`Preparer`].
const ZERO_CHUNK_BYTES: usize = 1 << 20;

impl Preparer {
    /// Starts preparing `segment` in `dir`, unless fewer than `reserve` bytes plus two segments
    /// are free.
    fn start(dir: &Path, segment: u64, reserve: u64) -> Option<Preparer> {
        let cancel = Arc::new(AtomicBool::new(false));
        let path = prepared_path(dir, segment);
        let thread_path = path.clone();
        let dir = dir.to_path_buf();
        let stop = Arc::clone(&cancel);
        let thread = std::thread::Builder::new()
            .name("body-log-prep".to_owned())
            .spawn(move || {
                let free = fs2::available_space(&dir)?;
                if free < reserve.saturating_add(2 * SEGMENT_BYTES) {
                    return Ok(None);
                }
                let result = zero_file(&thread_path, &stop);
                if !matches!(result, Ok(Some(_))) {
                    let _ = fs::remove_file(&thread_path);
                }
                result
            });
        match thread {
            Ok(thread) => Some(Preparer {
                segment,
                path,
                cancel,
                thread: Some(thread),
            }),
            Err(e) => {
                tracing::debug!(error = %e, "cannot start the body log's preparer thread");
                None
            }
        }
    }

    /// The prepared file and its path, if it is ready now; otherwise the preparer is stopped
    /// (it has at most one chunk to finish) and `None`.
    fn take(mut self) -> Option<(File, PathBuf)> {
        let thread = self.thread.take()?;
        if !thread.is_finished() {
            self.cancel.store(true, Ordering::Relaxed);
        }
        match thread.join() {
            Ok(Ok(file)) => file.map(|f| (f, self.path.clone())),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "preparing the next body log segment failed; writing a plain one");
                None
            }
            Err(_) => None,
        }
    }
}

/// Creates `path` with [`SEGMENT_BYTES`] of zeros, `fsync`ed; `None` when cancelled.
///
/// The zeros go through a second handle opened with `O_DIRECT` where the file system takes it:
/// from the buffer to the device, without being copied into the page cache first (that copy
/// was a tenth of the process's CPU under load). Without the pages in the cache, a write that
/// ends inside a page would make the kernel read that page from the disk first, so the writer
/// pads its writes to whole pages ([`SegmentLog::write_pending`]). Where `O_DIRECT` is refused,
/// at the open or at any write, the zeros are written through the page cache.
fn zero_file(path: &Path, cancel: &AtomicBool) -> io::Result<Option<File>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let direct = open_direct(path);
    Ok(write_zeros(&file, direct, cancel)?.then_some(file))
}

/// Fills `file` with [`SEGMENT_BYTES`] of zeros through `direct` (the same file, opened with
/// `O_DIRECT`) while it takes them, then through `file`; syncs it. `false` when cancelled.
fn write_zeros(file: &File, mut direct: Option<File>, cancel: &AtomicBool) -> io::Result<bool> {
    // A buffer aligned to a page, as `O_DIRECT` wants, without `unsafe`: a page more than
    // needed, and the slice that starts on a page boundary.
    let buffer = vec![0_u8; ZERO_CHUNK_BYTES + PAGE_BYTES as usize];
    let start = buffer.as_ptr().align_offset(PAGE_BYTES as usize);
    let zeros = match buffer.get(start..start + ZERO_CHUNK_BYTES) {
        Some(zeros) => zeros,
        None => {
            direct = None;
            &buffer[..ZERO_CHUNK_BYTES]
        }
    };
    let mut offset = 0;
    while offset < SEGMENT_BYTES {
        if cancel.load(Ordering::Relaxed) {
            return Ok(false);
        }
        if let Some(handle) = &direct {
            if let Err(e) = handle.write_all_at(zeros, offset) {
                // Opened, but refused (or failed) all the same: the page cache it is, from
                // this chunk on, which is written again whole.
                tracing::debug!(error = %e, "direct writes of zeros refused; writing them through the page cache");
                direct = None;
            }
        }
        if direct.is_none() {
            file.write_all_at(zeros, offset)?;
        }
        // A chunk at a time, so that the device never has 16 MiB to write at once in front of
        // the writer's next `fdatasync`.
        direct.as_ref().unwrap_or(file).sync_data()?;
        offset += ZERO_CHUNK_BYTES as u64;
    }
    file.sync_all()?;
    Ok(true)
}

/// `path` opened for direct writes (`O_DIRECT`), or `None` where that is refused.
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// The segment numbers in `dir`, ascending; none when the directory does not exist.
pub(super) fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut segments = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(hex) = name.strip_suffix(".seg") else {
            continue;
        };
        if hex.len() == 16 {
            if let Ok(n) = u64::from_str_radix(hex, 16) {
                segments.push(n);
            }
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

/// Fsyncs a directory, so that files created or removed in it stay so after a crash.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The header of a record, without its magic and CRC.
fn header_fields(id: u64, meta_len: u32, body_len: u64) -> [u8; 20] {
    let mut out = [0; 20];
    out[..8].copy_from_slice(&id.to_be_bytes());
    out[8..12].copy_from_slice(&meta_len.to_be_bytes());
    out[12..].copy_from_slice(&body_len.to_be_bytes());
    out
}

/// The appending side, owned by the writer thread.
pub(super) struct SegmentLog {
    /// The segment directory.
    dir: PathBuf,
    /// The segment being appended to.
    segment: u64,
    /// Its file.
    file: File,
    /// Bytes of it written to the file (not counting `pending`).
    written: u64,
    /// Bytes appended but not written yet.
    pending: Vec<u8>,
    /// Whether anything was written since the last [`sync`](Self::sync).
    unsynced: bool,
    /// Segments created since the last [`sync`](Self::sync), for a rollback.
    created: Vec<u64>,
    /// The file's length: beyond `written` when the segment was preallocated.
    allocated: u64,
    /// Free space to leave on the disk when preparing segments; `None`: never prepare.
    reserve: Option<u64>,
    /// The thread preparing the next segment.
    preparer: Option<Preparer>,
}

impl SegmentLog {
    /// Opens the log for appending at `end` (the end of the valid records), creating the
    /// directory and the first segment when there is none. With `reserve`, later segments are
    /// prepared ahead while that much disk space stays free (see the module documentation).
    pub fn open(dir: &Path, end: Position, reserve: Option<u64>) -> io::Result<SegmentLog> {
        fs::create_dir_all(dir)?;
        remove_prepared(dir)?;
        let path = segment_path(dir, end.segment);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let len = file.metadata()?.len();
        let mut allocated = end.offset;
        if len > end.offset && end_of_data(&file, end.offset, len)? == end.offset {
            // Zeros after the last record: the free part of a preallocated segment.
            allocated = len;
        } else if len != end.offset {
            // A torn record at the end of the newest segment (a write cut short, never
            // acknowledged): cut it off, keeping the bytes aside in case they matter.
            if len > end.offset {
                keep_tail(dir, &file, end)?;
            }
            file.set_len(end.offset)?;
            file.sync_all()?;
        }
        if !existed {
            file.sync_all()?;
            sync_dir(dir)?;
        }
        Ok(SegmentLog {
            dir: dir.to_path_buf(),
            segment: end.segment,
            file,
            written: end.offset,
            pending: Vec::with_capacity(BUFFER_BYTES),
            unsynced: false,
            created: Vec::new(),
            allocated,
            reserve,
            preparer: reserve.and_then(|r| Preparer::start(dir, end.segment + 1, r)),
        })
    }

    /// Where the next record will start.
    pub fn position(&self) -> Position {
        Position {
            segment: self.segment,
            offset: self.written + self.pending.len() as u64,
        }
    }

    /// The segment being appended to.
    pub fn current_segment(&self) -> u64 {
        self.segment
    }

    /// Appends one record; returns where it starts. Small records are buffered until
    /// [`write_pending`](Self::write_pending); a large body is written at once.
    pub fn append(&mut self, id: u64, meta: &[u8], body: &[u8]) -> io::Result<Position> {
        let meta_len = u32::try_from(meta.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record too large"))?;
        let length = HEADER_BYTES + meta.len() as u64 + body.len() as u64;
        let at = self.position();
        if at.offset > 0 && at.offset + length > SEGMENT_BYTES {
            self.rotate()?;
        }
        let at = self.position();
        let fields = header_fields(id, meta_len, body.len() as u64);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&fields);
        crc.update(meta);
        crc.update(body);
        self.pending.extend_from_slice(&MAGIC);
        self.pending
            .extend_from_slice(&crc.finalize().to_be_bytes());
        self.pending.extend_from_slice(&fields);
        self.pending.extend_from_slice(meta);
        if body.len() >= BUFFER_BYTES {
            self.write_pending()?;
            // Up to the last page boundary now; the rest waits in `pending`, whose write is
            // padded to a whole page (see `write_pending`).
            let tail = ((self.written + body.len() as u64) % PAGE_BYTES) as usize;
            let (head, tail) = body.split_at(body.len() - tail);
            self.write_all(head)?;
            self.pending.extend_from_slice(tail);
        } else {
            self.pending.extend_from_slice(body);
            if self.pending.len() >= BUFFER_BYTES {
                self.write_pending()?;
            }
        }
        Ok(at)
    }

    /// Writes the buffered bytes to the file (not synced).
    ///
    /// Inside a preallocated segment the write is padded to the next page boundary with the
    /// zeros that are there anyway: the preparer wrote them past the page cache (see
    /// [`zero_file`]), and a write that ended inside a page would make the kernel read the rest
    /// of that page from the disk first. The next record still starts right after this one.
    pub fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.pending);
        let len = pending.len() as u64;
        let end = self.written + len;
        if end < self.allocated {
            let padded = end.next_multiple_of(PAGE_BYTES).min(self.allocated);
            pending.resize((len + padded - end) as usize, 0);
        }
        let result = self.write_at_end(&pending, len);
        self.pending = pending;
        self.pending.clear();
        result
    }

    /// Writes `bytes` at the end of the current segment.
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_at_end(bytes, bytes.len() as u64)
    }

    /// Writes `bytes` at the end of the current segment and moves the end by `advance` of them
    /// (what follows is padding).
    fn write_at_end(&mut self, bytes: &[u8], advance: u64) -> io::Result<()> {
        self.unsynced = true;
        self.file.write_all_at(bytes, self.written)?;
        self.written += advance;
        self.allocated = self.allocated.max(self.written);
        Ok(())
    }

    /// Makes everything appended durable: writes what is buffered, then `fdatasync`.
    pub fn sync(&mut self) -> io::Result<()> {
        self.write_pending()?;
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        self.created.clear();
        Ok(())
    }

    /// Cuts the current segment to its last record, syncs it and starts the next one: the
    /// prepared one when it is ready, else a plain file.
    fn rotate(&mut self) -> io::Result<()> {
        self.write_pending()?;
        if self.allocated > self.written {
            self.file.set_len(self.written)?;
            self.allocated = self.written;
            self.unsynced = true;
        }
        self.sync_keeping_created()?;
        let next = self.segment + 1;
        let prepared = self
            .preparer
            .take()
            .filter(|p| p.segment == next)
            .and_then(Preparer::take);
        let path = segment_path(&self.dir, next);
        let (file, allocated) = match prepared {
            Some((file, prepared)) => match fs::rename(&prepared, &path) {
                Ok(()) => (file, SEGMENT_BYTES),
                Err(e) => {
                    tracing::warn!(error = %e, "taking the prepared body log segment failed; writing a plain one");
                    let _ = fs::remove_file(&prepared);
                    (create_segment(&path)?, 0)
                }
            },
            None => (create_segment(&path)?, 0),
        };
        sync_dir(&self.dir)?;
        self.created.push(next);
        self.segment = next;
        self.file = file;
        self.written = 0;
        self.allocated = allocated;
        self.preparer = self
            .reserve
            .and_then(|r| Preparer::start(&self.dir, next + 1, r));
        Ok(())
    }

    /// [`sync`](Self::sync) that keeps the list of segments a rollback must remove.
    fn sync_keeping_created(&mut self) -> io::Result<()> {
        let created = std::mem::take(&mut self.created);
        let result = self.sync();
        self.created = created;
        result
    }

    /// Forgets everything appended after `to` (which must be at or after the last sync): the
    /// segments started since are removed and the segment of `to` is cut back to it.
    pub fn rollback(&mut self, to: Position) -> io::Result<()> {
        self.pending.clear();
        for segment in std::mem::take(&mut self.created) {
            if segment > to.segment {
                match fs::remove_file(segment_path(&self.dir, segment)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if self.segment != to.segment {
            self.file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(segment_path(&self.dir, to.segment))?;
            self.segment = to.segment;
        }
        self.file.set_len(to.offset)?;
        self.written = to.offset;
        self.allocated = to.offset;
        self.unsynced = true;
        Ok(())
    }

    /// Removes the segments numbered below `keep_from` (never the current one), newest
    /// last; returns how many went.
    pub fn remove_below(&mut self, keep_from: u64, readers: &SegmentReader) -> io::Result<usize> {
        let keep_from = keep_from.min(self.segment);
        let mut removed = 0;
        for segment in list_segments(&self.dir)? {
            if segment >= keep_from {
                break;
            }
            readers.forget(segment);
            match fs::remove_file(segment_path(&self.dir, segment)) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

/// Creates an empty segment file.
fn create_segment(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

/// Why a body could not be read.
#[derive(Debug)]
pub(super) enum ReadError {
    /// The file could not be read.
    Io(io::Error),
    /// The bytes at the position are not the record of this delivery.
    Mismatch(String),
}

/// The reading side, shared by every reader: open segment files by number.
#[derive(Debug)]
pub(super) struct SegmentReader {
    /// The segment directory.
    dir: PathBuf,
    /// Files opened so far.
    files: RwLock<HashMap<u64, Arc<File>>>,
}

impl SegmentReader {
    /// A reader of the segments in `dir`.
    pub fn new(dir: &Path) -> SegmentReader {
        SegmentReader {
            dir: dir.to_path_buf(),
            files: RwLock::new(HashMap::new()),
        }
    }

    /// The open file of a segment.
    fn file(&self, segment: u64) -> io::Result<Arc<File>> {
        if let Some(file) = self
            .files
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&segment)
        {
            return Ok(Arc::clone(file));
        }
        let file = Arc::new(File::open(segment_path(&self.dir, segment))?);
        self.files
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(segment, Arc::clone(&file));
        Ok(file)
    }

    /// Closes the file of a segment about to be removed.
    fn forget(&self, segment: u64) {
        self.files
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&segment);
    }

    /// Reads the body of the record of delivery `id` at `at`. The header must name `id` and
    /// the record's CRC must match: damaged bytes are an error, never a body.
    pub fn body(&self, at: Position, id: u64) -> Result<Bytes, ReadError> {
        let file = self.file(at.segment).map_err(ReadError::Io)?;
        let mut header = [0; HEADER_BYTES as usize];
        file.read_exact_at(&mut header, at.offset)
            .map_err(ReadError::Io)?;
        let (fields, len) = checked_header(&header, at, id)?;
        let mut record = vec![0; len];
        file.read_exact_at(&mut record, at.offset + HEADER_BYTES)
            .map_err(ReadError::Io)?;
        checked_body(&header, &fields, Bytes::from(record), at, id)
    }

    /// Like [`body`](Self::body), in one read of at most [`HEADER_BYTES`] + `limit` bytes:
    /// `None` when the record is longer, for the caller to read it with `body` (off the
    /// calling task if it may be large). A typical `GET` then costs a single system call.
    pub fn small_body(
        &self,
        at: Position,
        id: u64,
        limit: usize,
    ) -> Result<Option<Bytes>, ReadError> {
        let file = self.file(at.segment).map_err(ReadError::Io)?;
        let mut buf = vec![0; HEADER_BYTES as usize + limit];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], at.offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        let header: [u8; HEADER_BYTES as usize] = buf
            .get(..HEADER_BYTES as usize)
            .filter(|_| got >= HEADER_BYTES as usize)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| not_there(at, id))?;
        let (fields, len) = checked_header(&header, at, id)?;
        if len > got - HEADER_BYTES as usize {
            return Ok(None);
        }
        let record = Bytes::from(buf).slice(HEADER_BYTES as usize..HEADER_BYTES as usize + len);
        checked_body(&header, &fields, record, at, id).map(Some)
    }
}

/// The error for a position that does not hold the record of `id`.
fn not_there(at: Position, id: u64) -> ReadError {
    ReadError::Mismatch(format!(
        "segment {:016x} at {} does not hold delivery {id}",
        at.segment, at.offset
    ))
}

/// Decodes the header read at `at`, which must name `id`; with the length of meta and body.
fn checked_header(
    header: &[u8; HEADER_BYTES as usize],
    at: Position,
    id: u64,
) -> Result<(Header, usize), ReadError> {
    let fields = parse_header(header)
        .filter(|h| h.id == id)
        .ok_or_else(|| not_there(at, id))?;
    let len = usize::try_from(fields.body_len)
        .ok()
        .and_then(|body| body.checked_add(fields.meta_len as usize))
        .ok_or_else(|| ReadError::Mismatch(format!("body of {} bytes", fields.body_len)))?;
    Ok((fields, len))
}

/// The body out of `record` (meta ‖ body) when the CRC matches.
fn checked_body(
    header: &[u8; HEADER_BYTES as usize],
    fields: &Header,
    record: Bytes,
    at: Position,
    id: u64,
) -> Result<Bytes, ReadError> {
    if record_crc(header, &record) != fields.crc {
        return Err(ReadError::Mismatch(format!(
            "the record of delivery {id} in segment {:016x} at {} is damaged (CRC mismatch)",
            at.segment, at.offset
        )));
    }
    Ok(record.slice(fields.meta_len as usize..))
}

/// The CRC of a record: over its header after the CRC field, then its meta and body.
fn record_crc(header: &[u8; HEADER_BYTES as usize], rest: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[8..]);
    crc.update(rest);
    crc.finalize()
}

/// A decoded record header.
struct Header {
    /// The CRC it carries.
    crc: u32,
    /// The delivery id.
    id: u64,
    /// Length of the encoded record.
    meta_len: u32,
    /// Length of the body.
    body_len: u64,
}

/// Decodes a header; `None` without the magic.
fn parse_header(bytes: &[u8; HEADER_BYTES as usize]) -> Option<Header> {
    if bytes[..4] != MAGIC {
        return None;
    }
    Some(Header {
        crc: u32::from_be_bytes(bytes[4..8].try_into().ok()?),
        id: u64::from_be_bytes(bytes[8..16].try_into().ok()?),
        meta_len: u32::from_be_bytes(bytes[16..20].try_into().ok()?),
        body_len: u64::from_be_bytes(bytes[20..28].try_into().ok()?),
    })
}

/// One valid record found by a scan (the body itself is not kept).
pub(super) struct Scanned {
    /// Where it starts.
    pub at: Position,
    /// The delivery id.
    pub id: u64,
    /// The encoded record.
    pub meta: Vec<u8>,
}

/// What a scan of the log found.
pub(super) struct Scan {
    /// The valid records, in log order.
    pub records: Vec<Scanned>,
    /// Where the next record goes: the end of the last valid record of the newest segment.
    pub end: Position,
    /// Bytes after the last valid record of a segment (a torn tail of the newest segment is cut
    /// off, and kept aside, when the log is opened).
    pub skipped_bytes: u64,
    /// Complete records whose CRC does not match (damaged on disk), stepped over.
    pub damaged: Vec<Position>,
}

/// Reads every valid record of the segments numbered `from` and later (checking each CRC),
/// calling `keep` on each record's id to decide whether its encoded record is kept.
///
/// A complete record (its header intact and its length within the file) whose CRC does not
/// match, followed by a valid record, is damaged on disk: it is reported in [`Scan::damaged`]
/// and stepped over, so the records after it still count. Anything else that is not a record
/// (a torn or damaged record at the end) ends the segment: only the newest can end so, in a
/// write cut short, since the writer syncs a segment before it starts the next. A header is trusted for its lengths only: the scan never searches the bytes
/// for a record, so a body that holds the bytes of a record is never taken for one.
pub(super) fn scan(dir: &Path, from: u64, keep: impl Fn(u64) -> bool) -> io::Result<Scan> {
    let segments = list_segments(dir)?;
    let mut records = Vec::new();
    let mut skipped_bytes = 0;
    let mut damaged = Vec::new();
    let mut end = Position {
        segment: from.max(segments.first().copied().unwrap_or(1)),
        offset: 0,
    };
    for &segment in segments.iter().filter(|s| **s >= from) {
        let bytes = fs::read(segment_path(dir, segment))?;
        let len = bytes.len() as u64;
        let mut offset = 0_u64;
        let mut valid_end = 0_u64;
        let damaged_before = damaged.len();
        while let Some(header) = bytes
            .get(offset as usize..)
            .and_then(|rest| rest.get(..HEADER_BYTES as usize))
            .and_then(|h| <&[u8; HEADER_BYTES as usize]>::try_from(h).ok())
        {
            let Some(fields) = parse_header(header) else {
                break;
            };
            let total = HEADER_BYTES
                .saturating_add(u64::from(fields.meta_len))
                .saturating_add(fields.body_len);
            if offset.saturating_add(total) > len {
                break;
            }
            let start = (offset + HEADER_BYTES) as usize;
            let rest = &bytes[start..(offset + total) as usize];
            let at = Position { segment, offset };
            offset += total;
            if record_crc(header, rest) != fields.crc {
                damaged.push(at);
                continue;
            }
            valid_end = offset;
            if keep(fields.id) {
                records.push(Scanned {
                    at,
                    id: fields.id,
                    meta: rest[..fields.meta_len as usize].to_vec(),
                });
            }
        }
        // Damaged records with no valid one after them are a write cut short (its length
        // reached the disk, not all its bytes): a torn tail, not damage.
        while damaged.len() > damaged_before
            && damaged.last().is_some_and(|d| d.offset >= valid_end)
        {
            damaged.pop();
        }
        // Zeros at the end are the free part of a preallocated segment, not a torn tail.
        let data_end = bytes
            .iter()
            .rposition(|b| *b != 0)
            .map_or(0, |last| last as u64 + 1);
        skipped_bytes += data_end.max(valid_end) - valid_end;
        end = Position {
            segment,
            offset: valid_end,
        };
    }
    Ok(Scan {
        records,
        end,
        skipped_bytes,
        damaged,
    })
}

/// Copies what follows `end` in its segment, up to its last non-zero byte, to `{segment}.tail-{offset}` (both hex) next to it,
/// synced, before the segment is cut there.
fn keep_tail(dir: &Path, file: &File, end: Position) -> io::Result<()> {
    let name = format!("{:016x}.tail-{:x}", end.segment, end.offset);
    // An earlier tail kept at the same place (a second crash there) is not overwritten.
    let mut path = dir.join(&name);
    let mut n = 1;
    while path.exists() {
        path = dir.join(format!("{name}.{n}"));
        n += 1;
    }
    let mut tail = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    let len = file.metadata()?.len();
    let data_end = end_of_data(file, end.offset, len)?;
    let mut from = file.try_clone()?;
    io::Seek::seek(&mut from, io::SeekFrom::Start(end.offset))?;
    io::copy(&mut io::Read::take(from, data_end - end.offset), &mut tail)?;
    tail.sync_all()?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(_: u64) -> bool {
        true
    }

    #[test]
    fn appended_records_read_back_and_scan_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = new_log(dir.path());
        let a = log.append(1, b"meta-a", b"body a").unwrap();
        let big = vec![7u8; BUFFER_BYTES + 3];
        let b = log.append(2, b"meta-b", &big).unwrap();
        log.sync().unwrap();
        let reader = SegmentReader::new(dir.path());
        assert_eq!(&reader.body(a, 1).unwrap()[..], b"body a");
        assert_eq!(reader.body(b, 2).unwrap().len(), big.len());
        assert!(matches!(reader.body(a, 2), Err(ReadError::Mismatch(_))));
        let scan = scan(dir.path(), 1, all).unwrap();
        let ids: Vec<u64> = scan.records.iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 2]);
        assert_eq!(scan.records[1].meta, b"meta-b");
        assert_eq!(scan.end, log.position());
        assert_eq!(scan.skipped_bytes, 0);
    }

    /// The ids of every valid record of the log in `dir`, in log order.
    fn scanned_ids(dir: &Path) -> Vec<u64> {
        scan(dir, 1, all)
            .unwrap()
            .records
            .iter()
            .map(|r| r.id)
            .collect()
    }

    /// A log in `dir` starting at segment 1.
    fn new_log(dir: &Path) -> SegmentLog {
        SegmentLog::open(
            dir,
            Position {
                segment: 1,
                offset: 0,
            },
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_damaged_record_is_stepped_over_by_the_scan_and_refused_by_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = new_log(dir.path());
        let a = log.append(1, b"meta-a", b"body a").unwrap();
        let b = log.append(2, b"meta-b", b"body b, to be damaged").unwrap();
        let c = log.append(3, b"meta-c", b"body c").unwrap();
        log.sync().unwrap();
        let end = log.position();
        drop(log);
        // One flipped bit in the middle record's body.
        let path = segment_path(dir.path(), 1);
        let mut bytes = fs::read(&path).unwrap();
        let at = (b.offset + HEADER_BYTES + 6 + 3) as usize;
        bytes[at] ^= 0x10;
        fs::write(&path, &bytes).unwrap();

        let scan = scan(dir.path(), 1, all).unwrap();
        let ids: Vec<u64> = scan.records.iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 3], "the records after the damaged one still count");
        assert_eq!(scan.damaged, [b]);
        assert_eq!(scan.end, end);
        assert_eq!(scan.skipped_bytes, 0);
        let reader = SegmentReader::new(dir.path());
        assert_eq!(&reader.body(a, 1).unwrap()[..], b"body a");
        assert_eq!(&reader.body(c, 3).unwrap()[..], b"body c");
        match reader.body(b, 2) {
            Err(ReadError::Mismatch(reason)) => assert!(reason.contains("CRC"), "{reason}"),
            other => panic!("expected a CRC mismatch, got {other:?}"),
        }
        // Opening the log keeps the file whole: the damage is in the middle, not a torn tail.
        drop(SegmentLog::open(dir.path(), scan.end, None).unwrap());
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn a_second_torn_tail_at_the_same_place_does_not_replace_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let at = Position {
            segment: 1,
            offset: 0,
        };
        for junk in [&b"first junk"[..], b"second"] {
            fs::write(segment_path(dir.path(), 1), junk).unwrap();
            let scan = scan(dir.path(), 1, all).unwrap();
            assert_eq!(scan.end, at);
            drop(SegmentLog::open(dir.path(), scan.end, None).unwrap());
        }
        let tail = |name: &str| fs::read(dir.path().join(name)).unwrap();
        assert_eq!(tail("0000000000000001.tail-0"), b"first junk");
        assert_eq!(tail("0000000000000001.tail-0.1"), b"second");
    }

    #[test]
    fn a_torn_tail_ends_the_scan_and_is_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = new_log(dir.path());
        log.append(1, b"m", b"first").unwrap();
        let second = log.append(2, b"m", b"second").unwrap();
        log.sync().unwrap();
        drop(log);
        let path = segment_path(dir.path(), 1);
        let full = fs::metadata(&path).unwrap().len();
        // Tear the second record, then damage its CRC instead: both end the scan there.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(full - 2).unwrap();
        let scan1 = scan(dir.path(), 1, all).unwrap();
        assert_eq!(scan1.records.len(), 1);
        assert_eq!(scan1.end, second);
        file.set_len(full).unwrap();
        file.write_all_at(b"X", full - 1).unwrap();
        let scan2 = scan(dir.path(), 1, all).unwrap();
        assert_eq!(scan2.records.len(), 1);
        assert_eq!(scan2.skipped_bytes, full - second.offset);
        let mut log = SegmentLog::open(dir.path(), scan2.end, None).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), second.offset);
        log.append(3, b"m", b"third").unwrap();
        log.sync().unwrap();
        let ids = scanned_ids(dir.path());
        assert_eq!(ids, [1, 3]);
    }

    #[test]
    fn segments_rotate_roll_back_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = new_log(dir.path());
        let body = vec![1u8; (SEGMENT_BYTES / 2) as usize];
        log.append(1, b"m", &body).unwrap();
        log.sync().unwrap();
        let start = log.position();
        // Two more halves: the first fits nowhere but a new segment, and so on.
        log.append(2, b"m", &body).unwrap();
        log.append(3, b"m", &body).unwrap();
        assert_eq!(log.current_segment(), 3);
        log.rollback(start).unwrap();
        assert_eq!(list_segments(dir.path()).unwrap(), [1]);
        assert_eq!(log.position(), start);
        log.append(4, b"m", &body).unwrap();
        log.sync().unwrap();
        assert_eq!(list_segments(dir.path()).unwrap(), [1, 2]);
        let ids = scanned_ids(dir.path());
        assert_eq!(ids, [1, 4]);
        let reader = SegmentReader::new(dir.path());
        assert_eq!(log.remove_below(2, &reader).unwrap(), 1);
        assert_eq!(list_segments(dir.path()).unwrap(), [2]);
        // The current segment is never removed.
        assert_eq!(log.remove_below(10, &reader).unwrap(), 0);
    }

    /// Waits until the log's preparer has finished its segment.
    fn wait_prepared(log: &SegmentLog) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !log
            .preparer
            .as_ref()
            .and_then(|p| p.thread.as_ref())
            .is_some_and(|t| t.is_finished())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the preparer never finished"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn prepared_segments_are_taken_at_rotation_and_their_zeros_are_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let start = Position {
            segment: 1,
            offset: 0,
        };
        // A half-written segment of an earlier run is removed at open.
        fs::create_dir_all(dir.path()).unwrap();
        fs::write(dir.path().join("0000000000000002.7.prep"), b"junk").unwrap();
        let mut log = SegmentLog::open(dir.path(), start, Some(0)).unwrap();
        wait_prepared(&log);
        let body = vec![7u8; (SEGMENT_BYTES / 3) as usize];
        for id in 1..=3 {
            log.append(id, b"m", &body).unwrap();
            log.sync().unwrap();
        }
        // The third body did not fit: segment 2 is the prepared one, full length, and segment
        // 1 was cut to its last record.
        assert_eq!(log.current_segment(), 2);
        let len = |segment| {
            fs::metadata(segment_path(dir.path(), segment))
                .unwrap()
                .len()
        };
        assert_eq!(len(2), SEGMENT_BYTES);
        let record = HEADER_BYTES + 1 + body.len() as u64;
        assert_eq!(len(1), 2 * record);
        let small = log.append(4, b"m", b"small").unwrap();
        log.sync().unwrap();
        let end = log.position();
        drop(log);
        // Dropping the log stops the next preparer and leaves no file of it behind.
        assert!(
            !file_names(dir.path()).iter().any(|n| n.ends_with(".prep")),
            "{:?}",
            file_names(dir.path())
        );

        // The zeros after the last record are neither records nor a torn tail.
        let found = scan(dir.path(), 1, all).unwrap();
        assert_eq!(
            found.records.iter().map(|r| r.id).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(found.end, end);
        assert_eq!(found.skipped_bytes, 0);
        assert!(found.damaged.is_empty());
        let mut log = SegmentLog::open(dir.path(), found.end, Some(0)).unwrap();
        assert_eq!(len(2), SEGMENT_BYTES, "the preallocation is kept");
        assert!(!file_names(dir.path()).iter().any(|n| n.contains(".tail-")));
        assert_eq!(log.position(), end);
        log.append(5, b"m", b"after reopen").unwrap();
        log.sync().unwrap();
        let reader = SegmentReader::new(dir.path());
        assert_eq!(&reader.body(small, 4).unwrap()[..], b"small");
        assert_eq!(
            &reader.body(end, 5).unwrap()[..],
            b"after reopen",
            "appended over the zeros"
        );
        let torn_at = log.position();
        drop(log);

        // A torn record inside the zeros: cut off, and only its bytes (not the zeros after
        // them) are kept.
        let file = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), 2))
            .unwrap();
        file.write_all_at(b"CRL1torn", torn_at.offset).unwrap();
        let found = scan(dir.path(), 1, all).unwrap();
        assert_eq!(found.end, torn_at);
        assert_eq!(found.skipped_bytes, 8);
        drop(SegmentLog::open(dir.path(), found.end, Some(0)).unwrap());
        assert_eq!(len(2), torn_at.offset);
        let kept = format!("0000000000000002.tail-{:x}", torn_at.offset);
        assert_eq!(fs::read(dir.path().join(kept)).unwrap(), b"CRL1torn");
        assert_eq!(scanned_ids(dir.path()), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn writes_into_a_prepared_segment_are_padded_with_zeros_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let start = Position {
            segment: 1,
            offset: 0,
        };
        let mut log = SegmentLog::open(dir.path(), start, Some(0)).unwrap();
        wait_prepared(&log);
        // Fill segment 1 so that the next record rotates into the prepared segment 2.
        log.append(1, b"m", &vec![1u8; SEGMENT_BYTES as usize - 64])
            .unwrap();
        log.sync().unwrap();
        // Odd sizes, small ones through `pending` and large ones split at a page boundary,
        // some in one group and some each synced on their own.
        let sizes = [
            5,
            4093,
            4096,
            300_001,
            17,
            BUFFER_BYTES,
            1,
            9_999,
            BUFFER_BYTES + 4095,
        ];
        let reads_before = thread_read_bytes();
        let mut written = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let id = i as u64 + 2;
            let body: Vec<u8> = (0..*size).map(|b| (b % 251) as u8 + 1).collect();
            let at = log.append(id, b"meta", &body).unwrap();
            if i % 3 != 1 {
                log.sync().unwrap();
            }
            written.push((at, id, body));
        }
        log.sync().unwrap();
        // Not one page was read from the disk to complete a write (the zeros were written
        // past the page cache, so a write ending inside a page would have needed one).
        if let (Some(before), Some(after)) = (reads_before, thread_read_bytes()) {
            assert_eq!(after - before, 0, "bytes read from the disk while writing");
        }
        assert_eq!(log.current_segment(), 2);
        let end = log.position();
        let reader = SegmentReader::new(dir.path());
        for (at, id, body) in &written {
            assert_eq!(
                &reader.body(*at, *id).unwrap()[..],
                &body[..],
                "record {id}"
            );
        }
        // The segment keeps its preallocated length, and everything after the last record
        // (the padding of the last write included) is zeros.
        let bytes = fs::read(segment_path(dir.path(), 2)).unwrap();
        assert_eq!(bytes.len() as u64, SEGMENT_BYTES);
        assert!(bytes[end.offset as usize..].iter().all(|b| *b == 0));
        drop(log);
        let found = scan(dir.path(), 1, all).unwrap();
        assert_eq!(found.end, end);
        assert_eq!(found.records.len(), sizes.len() + 1);
        assert!(found.damaged.is_empty());
    }

    /// Bytes this thread has had read from storage (`read_bytes` of `/proc/thread-self/io`),
    /// where the kernel counts them.
    fn thread_read_bytes() -> Option<u64> {
        let io = fs::read_to_string("/proc/thread-self/io").ok()?;
        io.lines()
            .find_map(|l| l.strip_prefix("read_bytes: "))?
            .trim()
            .parse()
            .ok()
    }

    #[test]
    fn zeros_are_written_where_direct_writes_are_refused() {
        // Where direct writes work (usually on the test directory's file system) and where
        // they fail: a handle that cannot write stands in for a refusing file system, from
        // the first chunk on. The zeros are complete either way.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("y.prep");
        zero_file(&path, &AtomicBool::new(false))
            .unwrap()
            .expect("not cancelled");
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, SEGMENT_BYTES);
        assert!(bytes.iter().all(|b| *b == 0));

        let path = dir.path().join("x.prep");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let refusing = File::open(&path).unwrap();
        assert!(write_zeros(&file, Some(refusing), &AtomicBool::new(false)).unwrap());
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, SEGMENT_BYTES);
        assert!(bytes.iter().all(|b| *b == 0));
        // Cancelled: stops at once.
        assert!(!write_zeros(&file, None, &AtomicBool::new(true)).unwrap());
    }

    #[test]
    fn a_rotation_before_the_preparer_is_done_writes_a_plain_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = new_log(dir.path());
        // A preparer for the wrong segment is not used (and is stopped).
        log.reserve = Some(0);
        log.preparer = Preparer::start(dir.path(), 5, 0);
        let body = vec![1u8; (SEGMENT_BYTES / 2) as usize];
        log.append(1, b"m", &body).unwrap();
        log.append(2, b"m", &body).unwrap();
        log.sync().unwrap();
        assert_eq!(log.current_segment(), 2);
        let len = fs::metadata(segment_path(dir.path(), 2)).unwrap().len();
        assert_eq!(len, HEADER_BYTES + 1 + body.len() as u64, "a plain segment");
        drop(log);
        assert!(!file_names(dir.path()).iter().any(|n| n.ends_with(".prep")));
        assert_eq!(scanned_ids(dir.path()), [1, 2]);
    }
}
