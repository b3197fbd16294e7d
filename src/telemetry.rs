//! Logging set-up: `tracing` with `RUST_LOG`-style filters, text or JSON lines on stderr.
//!
//! Text lines carry no timestamp when stderr is the systemd journal (which stamps every line
//! itself), unless `log_timestamps = true`; the journal is recognised the way systemd documents
//! it: `JOURNAL_STREAM` names the device and inode of stderr. JSON lines always carry one.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber; `RUST_LOG` overrides the default `info` filter.
pub fn init(format: LogFormat) {
    init_with(format, None);
}

/// [`init`] with the `log_timestamps` setting: `Some` forces timestamps on or off in text
/// lines, `None` leaves them out under journald only.
pub fn init_with(format: LogFormat, timestamps: Option<bool>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let timestamps = timestamps.unwrap_or_else(|| !stderr_is_journal());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match (format, timestamps) {
        (LogFormat::Text, true) => builder.try_init(),
        (LogFormat::Text, false) => builder.without_time().try_init(),
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
    };
    // A second initialisation (tests) keeps the first subscriber.
    let _ = result;
}

/// Whether stderr is connected to the systemd journal.
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(meta) => journal_stream_matches(value.to_str(), meta.dev(), meta.ino()),
        Err(_) => false,
    }
}

/// Whether a `JOURNAL_STREAM` value (`DEVICE:INODE`, decimal) names the file `dev`/`ino`.
pub fn journal_stream_matches(value: Option<&str>, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.and_then(|v| v.trim().split_once(':')) else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

#[cfg(test)]
mod tests {
    use super::journal_stream_matches;

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(journal_stream_matches(Some("8:12345"), 8, 12345));
        assert!(!journal_stream_matches(Some("8:12345"), 8, 1));
        assert!(!journal_stream_matches(Some("garbage"), 8, 12345));
        assert!(!journal_stream_matches(None, 8, 12345));
    }
}
