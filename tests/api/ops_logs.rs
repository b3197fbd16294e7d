//! Logs under systemd: text lines leave the timestamp to journald (`JOURNAL_STREAM` names
//! stderr) unless `log_timestamps = true`; and the reload without a file (the dev profile)
//! re-reads the certificate files.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use callback_receiver::reload::Reloader;
use callback_receiver::tls::{load_certified_key, ReloadableCert};

use crate::helpers::{config_toml, make_certs, spawn_app};
use crate::ops_process::command;

/// Runs `serve` with stderr in a file, optionally announced as the journal; returns its lines
/// once the service listened and stopped.
fn serve_to_file(dir: &Path, top: &str, as_journal: bool) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let config = dir.join("config.toml");
    std::fs::write(&config, config_toml(top)).expect("write config");
    let log = dir.join("stderr.log");
    let file = std::fs::File::create(&log).expect("create log");
    let meta = file.metadata().expect("meta");
    let mut cmd: Command = command(&["serve", "--config", &config.display().to_string()]);
    if as_journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .spawn()
        .expect("start serve");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("listening")
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "no listening line: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    std::fs::read_to_string(&log)
        .expect("read log")
        .lines()
        .map(str::to_string)
        .collect()
}

fn starts_with_timestamp(line: &str) -> bool {
    // e.g. 2026-12-03T19:00:00.123456Z
    let b = line.as_bytes();
    b.len() > 20 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[10] == b'T'
}

#[test]
fn text_logs_leave_timestamps_to_journald() {
    crate::helpers::init();
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());

    let journal = serve_to_file(dir.path(), "", true);
    assert!(journal.len() >= 3, "{journal:?}");
    for line in &journal {
        assert!(
            !starts_with_timestamp(line),
            "a timestamp under journald: {line:?}"
        );
        assert!(
            line.trim_start().starts_with("INFO") || line.trim_start().starts_with("WARN"),
            "{line:?}"
        );
    }

    let forced = serve_to_file(dir.path(), "log_timestamps = true", true);
    assert!(
        forced.iter().all(|l| starts_with_timestamp(l)),
        "{forced:?}"
    );

    let terminal = serve_to_file(dir.path(), "", false);
    assert!(
        terminal.iter().all(|l| starts_with_timestamp(l)),
        "{terminal:?}"
    );
}

#[tokio::test]
async fn a_reload_without_a_file_rereads_the_certificate_files() {
    let app = spawn_app().await;
    let cert_files = app.config.tls.clone();
    let old = load_certified_key(&cert_files.cert, &cert_files.key).expect("old key");
    let cert = Arc::new(ReloadableCert::new(old.clone()));
    let reloader = Reloader::new(None, app.config.clone(), cert.clone(), app.state.clone());

    let unchanged = reloader.reload().expect("reload");
    assert!(!unchanged.certificate_changed && unchanged.needs_restart.is_empty());

    let other = tempfile::tempdir().expect("tempdir");
    make_certs(other.path());
    std::fs::copy(other.path().join("certs/cert.pem"), &cert_files.cert).expect("copy cert");
    std::fs::copy(other.path().join("certs/key.pem"), &cert_files.key).expect("copy key");
    let changed = reloader.reload().expect("reload");
    assert!(changed.certificate_changed);
    assert_ne!(cert.current().cert[0], old.cert[0]);

    std::fs::write(&cert_files.key, "broken").expect("break the key");
    let err = reloader.reload().expect_err("a broken key is refused");
    assert!(err.to_string().starts_with("tls.key "), "{err}");
    assert_ne!(
        cert.current().cert[0],
        old.cert[0],
        "the last good certificate stays"
    );
    app.stop().await;
}
