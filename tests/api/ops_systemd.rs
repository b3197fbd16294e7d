//! systemd integration of the real binary: `READY=1` once the port accepts, `WATCHDOG=1` at half
//! `WATCHDOG_USEC`, `STOPPING=1` and exit 0 on SIGTERM, and a callback still uploading at SIGTERM
//! completes and is stored.

use std::time::{Duration, Instant};

use callback_receiver::store::{Scope, SledOptions, SledStore, Store};

use crate::helpers::{basic, config_toml, make_certs, raw_post_head, Client, PASSWORD, USER};
use crate::ops_process::{NotifySocket, Process};

#[test]
fn notifies_ready_watchdog_and_stopping() {
    crate::helpers::init();
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_toml("")).expect("write config");
    let notify = NotifySocket::bind(dir.path());
    let socket = notify.path.display().to_string();
    let mut service = Process::serve(
        &config,
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "400000")],
    );

    let ready = notify.wait_for("READY=1", 1);
    // Ready means accepting: a connection right after READY=1 succeeds.
    std::net::TcpStream::connect(service.addr).expect("the port accepts after READY=1");

    // 400 ms watchdog: a ping every ~200 ms, each after a store probe.
    std::thread::sleep(Duration::from_millis(1100));
    let pings: Vec<Instant> = notify
        .times_of("WATCHDOG=1")
        .into_iter()
        .filter(|t| *t >= ready && *t <= ready + Duration::from_millis(1000))
        .collect();
    assert!(
        pings.len() >= 2,
        "expected at least 2 WATCHDOG=1 in the second after READY=1, got {}",
        pings.len()
    );
    assert!(
        notify.times_of("STOPPING=1").is_empty(),
        "STOPPING=1 before any SIGTERM"
    );

    service.signal("TERM");
    let stopping = notify.wait_for("STOPPING=1", 1);
    assert!(stopping > ready);
    let status = service.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        service.stderr_lines().join("\n")
    );
    let logs = service.stderr_lines().join("\n");
    assert!(logs.contains("systemd watchdog enabled"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_a_large_callback_uploads_completes_it_and_exits_0() {
    crate::helpers::init();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = make_certs(dir.path());
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_toml("")).expect("write config");
    let notify = NotifySocket::bind(dir.path());
    let socket = notify.path.display().to_string();
    let mut service = Process::serve(&config, &[("NOTIFY_SOCKET", &socket)]);
    notify.wait_for("READY=1", 1);

    // 4 MiB, sent in two halves around the SIGTERM.
    let filler = "<x>large upload</x>".repeat(4 * 1024 * 1024 / 19);
    let body = crate::helpers::response_doc("large-at-sigterm", &filler);
    let (first, second) = body.split_at(body.len() / 2);
    let client = Client::new(service.addr, &ca);
    let mut raw = client.raw().await;
    let head = raw_post_head(
        "/callback/hello-world",
        &basic(USER, PASSWORD),
        &[
            &format!("Content-Length: {}", body.len()),
            "Expect: 100-continue",
        ],
    );
    raw.write(head.as_bytes()).await;
    assert_eq!(raw.read_response().await.status, 100);
    raw.write(first).await;

    service.signal("TERM");
    notify.wait_for("STOPPING=1", 1);
    // The listener is closed: new connections are refused while the upload goes on.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(service.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    raw.write(second).await;
    let answer = raw.read_response().await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    let status = tokio::task::spawn_blocking(move || {
        let status = service.wait_exit();
        (status, service.stderr_lines().join("\n"))
    })
    .await
    .expect("join");
    assert_eq!(status.0.code(), Some(0), "{}", status.1);

    let store = SledStore::open(&dir.path().join("data"), SledOptions::default()).expect("open");
    let latest = store
        .latest("large-at-sigterm", &Scope::All)
        .await
        .expect("read")
        .expect("the callback is stored");
    let stored = store
        .body(latest.record.id)
        .await
        .expect("read")
        .expect("body");
    assert_eq!(stored, body, "stored bytes differ");
    store.close().await.expect("close");
}
