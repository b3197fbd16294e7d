//! `callback-receiver export` and `import`: a backup of the whole store as JSON lines.
//!
//! The file starts with a header line (format, version, counts, the next id), then one line per
//! delivery, per quarantined body and per expectation, with the raw bodies in base64:
//!
//! ```text
//! {"format":"callback-receiver-backup","version":1,"app_version":"0.1.0","created_at":"...","next_id":"000000000000002b","deliveries":2,"quarantined":1,"expectations":1}
//! {"type":"delivery","id":"0000000000000001","policy":"hello-world","received_at_ms":1767466800123,"received_at":"...","size":412,"sha256":"...","extracted":{...},"body":"PD94bWwg..."}
//! {"type":"quarantine","id":"0000000000000002","policy":"hello-world","received_at_ms":...,"received_at":"...","size":7,"reason":"...","body":"..."}
//! {"type":"expectation","controlid":"...","poller":"erp-sync","since_ms":...,"timeout_seconds":3600,"scope":"All"}
//! ```
//!
//! Both commands work on the `data_dir` of a stopped service: sled allows one process per
//! database, so a running service makes them fail with a clear message, and a stopped one
//! makes the dump consistent. `import` checks every line (sizes, SHA-256, counts, duplicate
//! ids) before it writes anything, and writes only into an empty `data_dir`, keeping delivery
//! ids, arrival times, policies and summaries: after an import every delivery is served byte
//! for byte under the same controlid and delivery id.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Config, ConfigError};
use crate::store::sled_store::{is_locked_error, restore_into};
use crate::store::{
    BackupCounts, BackupItem, DeliveryId, DeliveryRecord, Expectation, QuarantineRecord,
    RestoreError, SledOptions, SledStore, StoreError,
};
use crate::xml::Extracted;

/// The `format` of the header line.
pub const FORMAT: &str = "callback-receiver-backup";

/// The version of the format written (and the newest read).
pub const VERSION: u32 = 1;

/// Why an export or import failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The configuration file is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database is held by another process.
    #[error("data_dir {} is in use by another process: stop the service first (systemctl stop callback-receiver)", .0.display())]
    Locked(PathBuf),
    /// The store failed.
    #[error("data_dir {}: {source}", .dir.display())]
    Store {
        /// The data directory.
        dir: PathBuf,
        /// What failed.
        source: StoreError,
    },
    /// The restore was refused or failed.
    #[error(transparent)]
    Restore(RestoreError),
    /// The backup file cannot be read or written.
    #[error("{}: {reason}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A line of the backup file is wrong.
    #[error("{}:{line}: {reason}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

impl From<RestoreError> for BackupError {
    fn from(e: RestoreError) -> Self {
        match e {
            RestoreError::Locked(dir) => BackupError::Locked(dir),
            other => BackupError::Restore(other),
        }
    }
}

impl BackupError {
    /// The exit code: 2 for configuration and usage errors, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            BackupError::Config(_) | BackupError::Invalid { .. } => 2,
            _ => 1,
        }
    }
}

/// The header line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// The format version.
    pub version: u32,
    /// The version of callback-receiver that wrote it.
    pub app_version: String,
    /// When it was written (RFC 3339).
    pub created_at: String,
    /// The next id of the exported store (16 hex digits).
    pub next_id: String,
    /// Deliveries in the file.
    pub deliveries: u64,
    /// Quarantined bodies in the file.
    pub quarantined: u64,
    /// Expectations in the file.
    pub expectations: u64,
}

/// A delivery line.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeliveryLine {
    /// The delivery id (16 hex digits).
    id: String,
    /// The policy it was posted to.
    policy: String,
    /// Arrival time, milliseconds since the epoch.
    received_at_ms: i64,
    /// The same, for people (ignored on import).
    #[serde(default)]
    received_at: String,
    /// Body size.
    size: u64,
    /// SHA-256 of the body, hex.
    sha256: String,
    /// What the extractor found (the summary is built from it).
    extracted: Extracted,
    /// The raw body, base64.
    body: String,
}

/// A quarantine line.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct QuarantineLine {
    /// Its id (16 hex digits).
    id: String,
    /// The policy it was posted to.
    policy: String,
    /// Arrival time, milliseconds since the epoch.
    received_at_ms: i64,
    /// The same, for people (ignored on import).
    #[serde(default)]
    received_at: String,
    /// Body size.
    size: u64,
    /// Why it was refused.
    reason: String,
    /// The raw body, base64.
    body: String,
}

/// One line after the header.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    /// A delivery.
    Delivery(Box<DeliveryLine>),
    /// A quarantined body.
    Quarantine(QuarantineLine),
    /// An expectation.
    Expectation(Expectation),
}

fn b64() -> base64::engine::general_purpose::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl Line {
    fn from_item(item: &BackupItem) -> Line {
        match item {
            BackupItem::Delivery { record, body } => Line::Delivery(Box::new(DeliveryLine {
                id: record.id.to_string(),
                policy: record.policy.clone(),
                received_at_ms: record.received_at_ms,
                received_at: crate::summary::rfc3339_millis(record.received_at_ms),
                size: record.size,
                sha256: hex::encode(record.sha256),
                extracted: record.extracted.clone(),
                body: b64().encode(body),
            })),
            BackupItem::Quarantine { record, body } => Line::Quarantine(QuarantineLine {
                id: record.id.to_string(),
                policy: record.policy.clone(),
                received_at_ms: record.received_at_ms,
                received_at: crate::summary::rfc3339_millis(record.received_at_ms),
                size: record.size,
                reason: record.reason.clone(),
                body: b64().encode(body),
            }),
            BackupItem::Expectation(e) => Line::Expectation(e.clone()),
        }
    }

    /// The item, with its body checked against its size and SHA-256.
    fn into_item(self) -> Result<BackupItem, String> {
        let id = |raw: &str| DeliveryId::parse(raw).ok_or_else(|| format!("bad id {raw:?}"));
        let body = |raw: &str, size: u64| -> Result<Bytes, String> {
            let bytes = b64()
                .decode(raw)
                .map_err(|e| format!("body is not base64: {e}"))?;
            if bytes.len() as u64 != size {
                return Err(format!(
                    "body has {} bytes, the record says {size}",
                    bytes.len()
                ));
            }
            Ok(Bytes::from(bytes))
        };
        match self {
            Line::Delivery(d) => {
                let body = body(&d.body, d.size)?;
                let mut sha256 = [0u8; 32];
                hex::decode_to_slice(&d.sha256, &mut sha256)
                    .map_err(|e| format!("bad sha256: {e}"))?;
                if <[u8; 32]>::from(Sha256::digest(&body)) != sha256 {
                    return Err("body does not match its sha256".into());
                }
                Ok(BackupItem::Delivery {
                    record: Box::new(DeliveryRecord {
                        id: id(&d.id)?,
                        policy: d.policy,
                        received_at_ms: d.received_at_ms,
                        size: d.size,
                        sha256,
                        extracted: d.extracted,
                    }),
                    body,
                })
            }
            Line::Quarantine(q) => Ok(BackupItem::Quarantine {
                body: body(&q.body, q.size)?,
                record: QuarantineRecord {
                    id: id(&q.id)?,
                    policy: q.policy,
                    received_at_ms: q.received_at_ms,
                    size: q.size,
                    reason: q.reason,
                },
            }),
            Line::Expectation(e) => Ok(BackupItem::Expectation(e)),
        }
    }
}

/// Opens the store of `config` for export; a running service is [`BackupError::Locked`].
fn open_store(config: &Config) -> Result<SledStore, BackupError> {
    let dir = &config.data_dir;
    if !dir.join("db").exists() {
        return Err(BackupError::Store {
            dir: dir.clone(),
            source: StoreError::Io("no database here (nothing was stored yet?)".into()),
        });
    }
    SledStore::open(dir, SledOptions::default()).map_err(|source| {
        if is_locked_error(&source) {
            BackupError::Locked(dir.clone())
        } else {
            BackupError::Store {
                dir: dir.clone(),
                source,
            }
        }
    })
}

/// `export --config FILE --out FILE`: writes the backup (`-` for stdout); returns a one-line
/// summary.
pub fn export(config_path: &Path, out: &Path) -> Result<String, BackupError> {
    let config = Config::from_file(config_path)?;
    let store = open_store(&config)?;
    let store_err = |source| BackupError::Store {
        dir: config.data_dir.clone(),
        source,
    };
    let counts = store.backup_counts().map_err(store_err)?;
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        app_version: env!("CARGO_PKG_VERSION").into(),
        created_at: crate::summary::rfc3339_millis(now_ms()),
        next_id: DeliveryId(counts.next_id).to_string(),
        deliveries: counts.deliveries,
        quarantined: counts.quarantined,
        expectations: counts.expectations,
    };
    let to_stdout = out.as_os_str() == "-";
    let file_err = |path: &Path, e: std::io::Error| BackupError::File {
        path: path.to_path_buf(),
        reason: e.to_string().to_lowercase(),
    };
    let partial = partial_path(out);
    let sink: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(create_private(&partial).map_err(|e| file_err(&partial, e))?)
    };
    let mut writer = BufWriter::with_capacity(1 << 20, sink);
    let written = write_all(&store, &header, &mut writer).map_err(|e| match e {
        WriteFailure::Store(source) => store_err(source),
        WriteFailure::Io(e) => file_err(if to_stdout { out } else { &partial }, e),
    });
    let written = match written {
        Ok(written) => written,
        Err(e) => {
            if !to_stdout {
                let _ = std::fs::remove_file(&partial);
            }
            return Err(e);
        }
    };
    if written != counts {
        if !to_stdout {
            let _ = std::fs::remove_file(&partial);
        }
        return Err(store_err(StoreError::Io(format!(
            "the store changed during the export ({} items counted, {} written)",
            counts.deliveries + counts.quarantined + counts.expectations,
            written.deliveries + written.quarantined + written.expectations
        ))));
    }
    let inner = writer
        .into_inner()
        .map_err(|e| file_err(&partial, e.into_error()))?;
    drop(inner);
    if !to_stdout {
        File::open(&partial)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&partial, out))
            .map_err(|e| file_err(out, e))?;
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = File::open(parent).and_then(|d| d.sync_all());
        }
    }
    drop(store);
    Ok(format!(
        "exported {} deliveries, {} quarantined bodies and {} expectations from {} to {}",
        counts.deliveries,
        counts.quarantined,
        counts.expectations,
        config.data_dir.display(),
        if to_stdout {
            "stdout".into()
        } else {
            out.display().to_string()
        }
    ))
}

/// Why writing the lines failed.
enum WriteFailure {
    /// Reading the store.
    Store(StoreError),
    /// Writing the file.
    Io(std::io::Error),
}

/// Writes the header and every item; returns what was written.
fn write_all(
    store: &SledStore,
    header: &Header,
    out: &mut impl Write,
) -> Result<BackupCounts, WriteFailure> {
    let io = WriteFailure::Io;
    serde_json::to_writer(&mut *out, header).map_err(|e| io(e.into()))?;
    out.write_all(b"\n").map_err(io)?;
    let mut written = BackupCounts {
        next_id: DeliveryId::parse(&header.next_id).map_or(0, |id| id.0),
        ..BackupCounts::default()
    };
    for item in store.backup_items() {
        let item = item.map_err(WriteFailure::Store)?;
        match &item {
            BackupItem::Delivery { .. } => written.deliveries += 1,
            BackupItem::Quarantine { .. } => written.quarantined += 1,
            BackupItem::Expectation(_) => written.expectations += 1,
        }
        serde_json::to_writer(&mut *out, &Line::from_item(&item)).map_err(|e| io(e.into()))?;
        out.write_all(b"\n").map_err(io)?;
    }
    out.flush().map_err(io)?;
    Ok(written)
}

/// `FILE.partial` beside `FILE`, where the export is written before it is renamed.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// Creates a file only its owner can read: a backup holds every body.
fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The lines of a backup file after the header, each parsed and checked, with line numbers.
struct Items {
    /// The file, for errors.
    path: PathBuf,
    /// Its lines.
    lines: std::io::Lines<BufReader<File>>,
    /// The number of the last line read.
    line: usize,
}

impl Items {
    /// Opens `path` and reads its header.
    fn open(path: &Path) -> Result<(Header, Items), BackupError> {
        let file = File::open(path).map_err(|e| BackupError::File {
            path: path.to_path_buf(),
            reason: e.to_string().to_lowercase(),
        })?;
        let mut items = Items {
            path: path.to_path_buf(),
            lines: BufReader::with_capacity(1 << 20, file).lines(),
            line: 0,
        };
        let first = items
            .next_line()?
            .ok_or_else(|| items.invalid("empty file: no header line"))?;
        let header: Header = serde_json::from_str(&first)
            .map_err(|e| items.invalid(&format!("not a backup header: {e}")))?;
        if header.format != FORMAT {
            return Err(items.invalid(&format!("format is {:?}, not {FORMAT:?}", header.format)));
        }
        if header.version == 0 || header.version > VERSION {
            return Err(items.invalid(&format!(
                "format version {} is not supported (this build reads up to {VERSION})",
                header.version
            )));
        }
        if DeliveryId::parse(&header.next_id).is_none() {
            return Err(items.invalid(&format!("bad next_id {:?}", header.next_id)));
        }
        Ok((header, items))
    }

    fn invalid(&self, reason: &str) -> BackupError {
        BackupError::Invalid {
            path: self.path.clone(),
            line: self.line,
            reason: reason.to_string(),
        }
    }

    fn next_line(&mut self) -> Result<Option<String>, BackupError> {
        match self.lines.next() {
            None => Ok(None),
            Some(Ok(line)) => {
                self.line += 1;
                Ok(Some(line))
            }
            Some(Err(e)) => {
                self.line += 1;
                Err(self.invalid(&format!("cannot read: {}", e.to_string().to_lowercase())))
            }
        }
    }

    /// The next item, checked; `None` at the end of the file.
    fn next_item(&mut self) -> Result<Option<BackupItem>, BackupError> {
        loop {
            let Some(text) = self.next_line()? else {
                return Ok(None);
            };
            if text.trim().is_empty() {
                continue;
            }
            let line: Line = serde_json::from_str(&text)
                .map_err(|e| self.invalid(&format!("not a backup line: {e}")))?;
            return line
                .into_item()
                .map(Some)
                .map_err(|reason| self.invalid(&reason));
        }
    }
}

impl Iterator for Items {
    type Item = Result<BackupItem, BackupError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_item().transpose()
    }
}

/// Reads the whole file once and checks it: every line, no duplicate ids, the header's counts.
fn verify(path: &Path) -> Result<Header, BackupError> {
    let (header, mut items) = Items::open(path)?;
    let mut ids = HashSet::new();
    let mut expectations = HashSet::new();
    let mut counts = BackupCounts::default();
    while let Some(item) = items.next_item()? {
        let fresh = match &item {
            BackupItem::Delivery { record, .. } => {
                counts.deliveries += 1;
                ids.insert(record.id)
            }
            BackupItem::Quarantine { record, .. } => {
                counts.quarantined += 1;
                ids.insert(record.id)
            }
            BackupItem::Expectation(e) => {
                counts.expectations += 1;
                expectations.insert((e.controlid.clone(), e.poller.clone()))
            }
        };
        if !fresh {
            return Err(items.invalid("duplicate id or expectation"));
        }
    }
    let found = (counts.deliveries, counts.quarantined, counts.expectations);
    let announced = (header.deliveries, header.quarantined, header.expectations);
    if found != announced {
        return Err(items.invalid(&format!(
            "the file ends early or was changed: the header announces {} deliveries, {} quarantined bodies and {} expectations, the file holds {}, {} and {}",
            announced.0, announced.1, announced.2, found.0, found.1, found.2
        )));
    }
    Ok(header)
}

/// `import --config FILE --in FILE`: checks the whole backup, then restores it into the empty
/// `data_dir` of a stopped service; returns a one-line summary.
pub fn import(config_path: &Path, input: &Path) -> Result<String, BackupError> {
    let config = Config::from_file(config_path)?;
    let header = verify(input)?;
    let next_id = DeliveryId::parse(&header.next_id).map_or(1, |id| id.0);
    let (_, items) = Items::open(input)?;
    let counts = restore_into(&config.data_dir, next_id, items)?;
    Ok(format!(
        "imported {} deliveries, {} quarantined bodies and {} expectations into {} (backup of {})",
        counts.deliveries,
        counts.quarantined,
        counts.expectations,
        config.data_dir.display(),
        header.created_at
    ))
}
