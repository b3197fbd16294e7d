//! A full disk: the data directory on a small tmpfs. Once it is full, callbacks get `503` (never
//! `200`), the store reports itself not writable, the service stays up, nothing acknowledged is
//! lost, and it accepts callbacks again by itself once space is freed.
//!
//! Mounting needs root (CI runs as root); where it is impossible the test says why and passes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

use crate::callbacks::assert_served_raw;
use crate::helpers::{response_doc, spawn_app_with};

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Writes `bytes` of filler into `path` (stops early when the disk is full).
fn fill(path: &Path, bytes: usize) {
    let mut file = std::fs::File::create(path).expect("create the filler");
    let chunk = vec![0x5Au8; 64 * 1024];
    let mut written = 0;
    while written < bytes {
        if file.write_all(&chunk).is_err() {
            break;
        }
        written += chunk.len();
    }
    let _ = file.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gets_503_loses_nothing_and_recovers_when_space_returns() {
    let outer = tempfile::tempdir().expect("tempdir");
    let disk = outer.path().join("disk");
    let mount = match Tmpfs::mount(&disk, "48m") {
        Ok(m) => m,
        Err(reason) => {
            println!("skipped: cannot mount a tmpfs here ({reason})");
            return;
        }
    };
    // Leave about 12 MiB, 4 of them the reserve the store keeps free.
    let filler = disk.join("filler");
    fill(&filler, 36 * 1024 * 1024);

    let data_dir = disk.join("data");
    let app = spawn_app_with(|c| {
        c.data_dir = data_dir.clone();
        c.min_free_disk_bytes = 4 * 1024 * 1024;
    })
    .await;
    let mut acked: Vec<(String, Bytes)> = Vec::new();
    let mut refused = 0;
    for i in 0..200 {
        let controlid = format!("disk-{i}");
        let body = response_doc(&controlid, &format!("{i:06}").repeat(12_000));
        let answer = app.post_ok(body.clone()).await;
        match answer.status {
            StatusCode::OK => acked.push((controlid, body)),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(answer.header("retry-after"), Some("5"));
                assert!(answer.text().contains("storage full"), "{}", answer.text());
                refused += 1;
                if refused >= 3 {
                    break;
                }
            }
            other => panic!("{controlid}: unexpected {other}: {}", answer.text()),
        }
    }
    assert!(
        refused >= 3,
        "the disk never filled up ({} stored)",
        acked.len()
    );
    assert!(
        !acked.is_empty(),
        "nothing was stored before the disk filled up"
    );
    println!("{} callbacks stored before the disk filled up", acked.len());

    // The gateway's retry of a callback it already got a `200` for is answered as the duplicate
    // it is, full disk or not: it adds nothing, and a `503` would only make it retry again.
    let (_, first_body) = &acked[0];
    let retry = app.post_ok(first_body.clone()).await;
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.text());
    assert!(
        retry.text().contains("\"duplicate\":true"),
        "{}",
        retry.text()
    );
    // New bytes are still refused.
    let fresh = app
        .post_ok(response_doc("disk-new", &"x".repeat(72_000)))
        .await;
    assert_eq!(
        fresh.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        fresh.text()
    );

    // Not ready, still alive, and what was acknowledged is still served.
    assert!(app.state.store.check_writable().await.is_err());
    let health = app
        .request(Method::GET, "/healthz", HeaderMap::new(), Bytes::new())
        .await;
    assert_eq!(health.status, StatusCode::OK);
    let ready = app
        .request(Method::GET, "/readyz", HeaderMap::new(), Bytes::new())
        .await;
    assert!(
        matches!(
            ready.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::NOT_FOUND
        ),
        "/readyz said {} on a full disk",
        ready.status
    );

    // Space returns: callbacks are accepted again without a restart.
    std::fs::remove_file(&filler).expect("remove the filler");
    let body = response_doc("disk-after", "space is back");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = app.post_ok(body.clone()).await;
        if answer.status == StatusCode::OK {
            break;
        }
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            answer.text()
        );
        assert!(
            Instant::now() < deadline,
            "still refusing callbacks 20 s after space returned: {}",
            answer.text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    acked.push(("disk-after".to_owned(), body));
    assert!(app.state.store.check_writable().await.is_ok());
    for (controlid, body) in &acked {
        assert_served_raw(&app, controlid, body).await;
    }

    // And all of it is still there after a restart.
    let app = app.stop().await.restart().await;
    for (controlid, body) in &acked {
        assert_served_raw(&app, controlid, body).await;
    }
    drop(app);
    drop(mount);
}
