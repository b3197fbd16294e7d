//! SIGHUP on the real binary: a new certificate for new connections while an open keep-alive
//! connection goes on, a policy added to the file works at once, a broken certificate or file
//! keeps the old settings and the log says why, and `listen` changes are logged as needing a
//! restart. The process logs JSON here, and every stderr line must parse.

use std::path::Path;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::helpers::{config_toml, make_certs, response_doc, Client, SECRETS};
use crate::ops_process::{NotifySocket, Process};

/// The DER of the first certificate in a PEM file.
fn leaf_der(pem: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(pem)
        .expect("read PEM")
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

/// The leaf certificate a new connection is served.
async fn served_leaf(client: &Client) -> Vec<u8> {
    // A resumed session would report the certificate of the session it resumes.
    let mut config = (*client.tls_h1).clone();
    config.resumption = rustls::client::Resumption::disabled();
    let tls = client.tls_connect(std::sync::Arc::new(config)).await;
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a peer certificate")
        .to_vec()
}

/// The JSON log lines after the first `skip` whose message is `message`.
fn json_lines(service: &Process, skip: usize, message: &str) -> Vec<serde_json::Value> {
    service
        .stderr_lines()
        .iter()
        .skip(skip)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

fn has_message(line: &str, message: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v["message"] == message)
}

/// Sends SIGHUP and waits for the reload's end (`READY=1` number `ready_count`) and its log
/// line; returns that line.
async fn reload(
    service: &mut Process,
    notify: &NotifySocket,
    ready_count: usize,
    message: &str,
) -> serde_json::Value {
    let skip = service.stderr_lines().len();
    let reloading = notify.times_of("RELOADING=1").len();
    service.signal("HUP");
    let ready = notify.wait_for("READY=1", ready_count);
    let started = notify.wait_for("RELOADING=1", reloading + 1);
    assert!(started <= ready, "RELOADING=1 must come before READY=1");
    let line = service.wait_for_log_after(skip, |l| has_message(l, message));
    serde_json::from_str(&line).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificate_and_policies_and_keeps_old_settings_when_broken() {
    crate::helpers::init();
    let dir = tempfile::tempdir().expect("tempdir");
    let old_ca = make_certs(dir.path());
    let certs = dir.path().join("certs");
    let config = dir.path().join("config.toml");
    let base = config_toml("log_format = \"json\"");
    std::fs::write(&config, &base).expect("write config");
    let notify = NotifySocket::bind(dir.path());
    let socket = notify.path.display().to_string();
    let mut service = Process::serve(&config, &[("NOTIFY_SOCKET", &socket)]);
    notify.wait_for("READY=1", 1);

    // A second CA and certificate, and a client trusting both CAs.
    let new_dir = dir.path().join("new");
    let new_ca = make_certs(&new_dir);
    let both = dir.path().join("both-cas.pem");
    let mut pems = std::fs::read(&old_ca).expect("old ca");
    pems.extend(std::fs::read(&new_ca).expect("new ca"));
    std::fs::write(&both, pems).expect("write both CAs");
    let client = Client::new(service.addr, &both);
    let old_leaf = leaf_der(&certs.join("cert.pem"));
    let new_leaf = leaf_der(&new_dir.join("certs/cert.pem"));
    assert_ne!(old_leaf, new_leaf);
    assert_eq!(served_leaf(&client).await, old_leaf);

    // A keep-alive connection opened before the reload.
    let mut kept = client.h1().await;
    let answer = kept
        .request(Method::GET, "/healthz", HeaderMap::new(), Bytes::new())
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let answer = client
        .post_callback(
            "added-later",
            None,
            response_doc("late-1", "x"),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(
        answer.status,
        StatusCode::UNAUTHORIZED,
        "not configured yet"
    );

    // New certificate and a new open policy.
    std::fs::copy(new_dir.join("certs/cert.pem"), certs.join("cert.pem")).expect("copy cert");
    std::fs::copy(new_dir.join("certs/key.pem"), certs.join("key.pem")).expect("copy key");
    let with_policy = format!("{base}\n[[policy]]\nid = \"added-later\"\n");
    std::fs::write(&config, &with_policy).expect("write config");
    let done = reload(&mut service, &notify, 2, "configuration reloaded").await;
    assert_eq!(done["certificate_changed"], true, "{done}");
    assert_eq!(done["policies_added"], "added-later", "{done}");

    assert_eq!(
        served_leaf(&client).await,
        new_leaf,
        "new connections get the new certificate"
    );
    let answer = kept
        .request(Method::GET, "/healthz", HeaderMap::new(), Bytes::new())
        .await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "the open connection keeps working"
    );
    let answer = client
        .post_callback(
            "added-later",
            None,
            response_doc("late-1", "x"),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());

    // A broken certificate file: the new certificate stays, the log says what is wrong.
    std::fs::write(certs.join("cert.pem"), "this is not PEM\n").expect("break the cert");
    let failed = reload(
        &mut service,
        &notify,
        3,
        "reload failed; keeping the previous settings",
    )
    .await;
    let error = failed["error"].as_str().expect("error field");
    assert!(
        error.contains("tls.cert") && error.contains("cert.pem"),
        "{failed}"
    );
    assert_eq!(
        served_leaf(&client).await,
        new_leaf,
        "the previous certificate stays"
    );
    let answer = client
        .post_callback(
            "added-later",
            None,
            response_doc("late-2", "x"),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "the previous policies stay");

    // A file with a typo: nothing changes, the log names the key and the line.
    std::fs::copy(new_dir.join("certs/cert.pem"), certs.join("cert.pem")).expect("copy cert");
    let typo = config_toml("log_format = \"json\"\npolcy_typo = 1");
    std::fs::write(&config, &typo).expect("write config");
    let failed = reload(
        &mut service,
        &notify,
        4,
        "reload failed; keeping the previous settings",
    )
    .await;
    let error = failed["error"].as_str().expect("error field");
    assert!(
        error.contains("config.toml:5") && error.contains("polcy_typo"),
        "{failed}"
    );
    let answer = client
        .post_callback(
            "added-later",
            None,
            response_doc("late-3", "x"),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "the previous policies stay");

    // A new listen address: the rest applies, the log says it needs a restart. The policy
    // removed from the file stops working.
    let moved = base.replacen("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"", 1);
    assert_ne!(moved, base);
    std::fs::write(&config, &moved).expect("write config");
    let skip = service.stderr_lines().len();
    let done = reload(&mut service, &notify, 5, "configuration reloaded").await;
    assert_eq!(done["policies_removed"], "added-later", "{done}");
    let line = service.wait_for_log_after(skip, |l| l.contains("needs a restart"));
    let warn: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert!(
        warn["settings"]
            .as_str()
            .is_some_and(|s| s.contains("listen")),
        "{warn}"
    );
    let answer = client
        .post_callback(
            "added-later",
            None,
            response_doc("late-4", "x"),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);

    service.signal("TERM");
    let status = tokio::task::spawn_blocking(move || (service.wait_exit(), service))
        .await
        .expect("join");
    let (status, service) = status;
    assert_eq!(status.code(), Some(0));

    // Every stderr line is one JSON object; requests have their line with the usual fields.
    let lines = service.stderr_lines();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line:?}"));
        assert!(v.is_object(), "{line}");
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        for secret in SECRETS {
            assert!(!line.contains(secret), "a secret in the logs: {line}");
        }
    }
    let requests = json_lines(&service, 0, "request");
    assert!(requests.len() >= 5, "{requests:?}");
    for r in &requests {
        for field in ["method", "path", "status", "bytes", "latency_us"] {
            assert!(!r[field].is_null(), "no {field} in {r}");
        }
        assert!(r["span"]["id"].is_string(), "no request id in {r}");
    }
    assert_eq!(json_lines(&service, 0, "configuration reloaded").len(), 2);
}
