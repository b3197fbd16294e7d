//! `export` and `import` with the real binary: a backup of a stopped service's data restored
//! into a fresh data_dir serves every delivery byte for byte under the same controlid and
//! delivery id, with the same summary; a running service's data_dir is refused, as is a
//! non-empty one and a damaged file.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde_json::Value;

use crate::helpers::{
    config_toml, headers, make_certs, response_doc, spawn_app, StoppedApp, TestApp, POLICY,
    SECOND_PASSWORD, SECOND_POLICY, SECOND_USER, TOKEN_ALL,
};
use crate::ops_process::command;

fn run(args: &[&str]) -> Output {
    command(args).output().expect("run the binary")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn get(app: &TestApp, path: &str, json: bool) -> crate::helpers::Answer {
    let mut pairs = vec![("authorization".to_string(), format!("Bearer {TOKEN_ALL}"))];
    if json {
        pairs.push(("accept".into(), "application/json".into()));
    }
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    app.request(Method::GET, path, headers(&refs), Bytes::new())
        .await
}

/// Everything a poller can see of one delivery: raw and JSON, by delivery id and by controlid.
async fn views(
    app: &TestApp,
    id: &str,
    controlid: Option<&str>,
) -> Vec<(String, StatusCode, Bytes)> {
    let mut paths = vec![format!("/v1/deliveries/{id}")];
    if let Some(cid) = controlid {
        paths.push(format!("/v1/responses/{cid}"));
    }
    let mut out = Vec::new();
    for path in paths {
        for json in [false, true] {
            let answer = get(app, &path, json).await;
            out.push((format!("{path} json={json}"), answer.status, answer.body));
        }
    }
    out
}

fn write_config(dir: &Path) -> String {
    let path = dir.join("config.toml");
    std::fs::write(&path, config_toml("")).expect("write config");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_restores_every_delivery_byte_for_byte() {
    let app = spawn_app().await;
    // Matched deliveries (one controlid twice), an unmatched one, another policy, a
    // quarantined body and an expectation.
    let mut posted: Vec<(String, Option<String>)> = Vec::new();
    for (controlid, marker) in [
        ("bk-1", "a"),
        ("bk-2", "b"),
        ("bk-1", "newer"),
        ("bk-&<3>", "c"),
    ] {
        let answer = app.post_ok(response_doc(controlid, marker)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let id = answer.json()["delivery_id"]
            .as_str()
            .expect("id")
            .to_string();
        posted.push((id, Some(controlid.to_string())));
    }
    let unmatched =
        Bytes::from_static(b"<response><control><status>failure</status></control></response>");
    let answer = app.post_ok(unmatched).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    posted.push((
        answer.json()["delivery_id"].as_str().expect("id").into(),
        None,
    ));
    let answer = app
        .post_callback(
            SECOND_POLICY,
            Some((SECOND_USER, SECOND_PASSWORD)),
            response_doc("bk-second", "d"),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    posted.push((
        answer.json()["delivery_id"].as_str().expect("id").into(),
        Some("bk-second".into()),
    ));
    assert_eq!(
        app.post_ok(Bytes::from_static(b"\x00 not xml"))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let h = headers(&[("authorization", &format!("Bearer {TOKEN_ALL}"))]);
    let answer = app
        .request(
            Method::PUT,
            "/v1/expected/bk-pending",
            h,
            Bytes::from_static(b"{\"timeout_seconds\": 7200}"),
        )
        .await;
    assert_eq!(answer.status, StatusCode::CREATED);

    let mut before = Vec::new();
    for (id, cid) in &posted {
        let encoded = cid.as_deref().map(crate::helpers::encode_segment);
        before.push(views(&app, id, encoded.as_deref()).await);
    }
    let pending_before = get(&app, "/v1/responses/bk-pending", true).await;
    assert_eq!(pending_before.status, StatusCode::ACCEPTED);

    let stopped = app.stop().await;
    let source = write_config(stopped.dir.path());

    // A running service's data_dir is refused, with a clear message.
    let running = stopped.restart().await;
    let busy = run(&["export", "--config", &source, "--out", "/dev/null"]);
    assert_eq!(busy.status.code(), Some(1), "{}", stderr(&busy));
    assert!(
        stderr(&busy).contains("in use by another process"),
        "{}",
        stderr(&busy)
    );
    let (result, stopped) = running.wait_stopped().await;
    result.expect("stop");

    let backup = stopped.dir.path().join("backup.jsonl");
    let out = run(&[
        "export",
        "--config",
        &source,
        "--out",
        &backup.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("exported 6 deliveries, 1 quarantined bodies and 1 expectations"),
        "{}",
        stderr(&out)
    );
    let text = std::fs::read_to_string(&backup).expect("read the backup");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    assert_eq!(lines[0]["format"], "callback-receiver-backup");
    assert_eq!(lines[0]["version"], 1);
    assert_eq!(lines.len(), 1 + 6 + 1 + 1);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&backup)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "the backup is readable by others: {mode:o}"
    );

    // Into a fresh data_dir.
    let fresh = Arc::new(tempfile::tempdir().expect("tempdir"));
    let ca = make_certs(fresh.path());
    let target = write_config(fresh.path());
    let input = backup.display().to_string();
    let out = run(&["import", "--config", &target, "--in", &input]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("imported 6 deliveries, 1 quarantined bodies and 1 expectations"),
        "{}",
        stderr(&out)
    );
    // Not twice.
    let again = run(&["import", "--config", &target, "--in", &input]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("needs an empty data_dir"),
        "{}",
        stderr(&again)
    );

    let config = callback_receiver::config::Config::from_file(Path::new(&target)).expect("config");
    let app = StoppedApp {
        dir: fresh.clone(),
        config,
        ca_pem_path: ca,
    }
    .restart()
    .await;
    for ((id, cid), expected) in posted.iter().zip(&before) {
        let encoded = cid.as_deref().map(crate::helpers::encode_segment);
        let after = views(&app, id, encoded.as_deref()).await;
        for ((what, status, body), (_, status0, body0)) in after.iter().zip(expected) {
            assert_eq!(status, status0, "{what}");
            assert!(
                body == body0,
                "{what} differs after import:\n{body0:?}\n{body:?}"
            );
        }
    }
    let pending_after = get(&app, "/v1/responses/bk-pending", true).await;
    assert_eq!(pending_after.status, StatusCode::ACCEPTED);
    assert_eq!(pending_after.body, pending_before.body);

    // The importing data_dir is in use now: import refuses it.
    let busy = run(&["import", "--config", &target, "--in", &input]);
    assert_eq!(busy.status.code(), Some(1));
    assert!(
        stderr(&busy).contains("in use by another process"),
        "{}",
        stderr(&busy)
    );

    // New deliveries get ids after the imported ones.
    let answer = app.post_ok(response_doc("bk-after", "e")).await;
    let new_id = answer.json()["delivery_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(
        posted.iter().all(|(id, _)| *id < new_id),
        "{new_id} reuses an id"
    );
    let feed = get(&app, "/v1/responses?limit=1000", true).await.json();
    assert_eq!(feed["items"].as_array().map(Vec::len), Some(7), "{feed}");
    assert_eq!(feed["items"][0]["policy"], POLICY);
    app.stop().await;
}

#[test]
fn import_checks_the_whole_file_before_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let backup = dir.path().join("backup.jsonl");
    let body = response_doc("damaged", "x");
    let header = serde_json::json!({
        "format": "callback-receiver-backup", "version": 1, "app_version": "0.1.0",
        "created_at": "2026-01-01T00:00:00.000Z", "next_id": "0000000000000002",
        "deliveries": 1, "quarantined": 0, "expectations": 0,
    });
    let line = |sha: &str| {
        use base64::Engine as _;
        serde_json::json!({
            "type": "delivery", "id": "0000000000000001", "policy": "hello-world",
            "received_at_ms": 1_767_225_600_000_i64, "size": body.len(), "sha256": sha,
            "extracted": {"controlid": "damaged", "control": null, "authentication": null,
                          "results": [], "errors": [], "well_formed": true, "parse_error": null},
            "body": base64::engine::general_purpose::STANDARD.encode(&body),
        })
    };
    let write = |lines: &[Value]| {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&backup, text).expect("write");
    };
    let input = backup.display().to_string();

    write(&[header.clone(), line(&"0".repeat(64))]);
    let out = run(&["import", "--config", &config, "--in", &input]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("backup.jsonl:2: body does not match its sha256"),
        "{}",
        stderr(&out)
    );

    let good = line(&crate::helpers::sha256_hex(&body));
    write(std::slice::from_ref(&header));
    let out = run(&["import", "--config", &config, "--in", &input]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("ends early"), "{}", stderr(&out));
    assert!(
        !dir.path().join("data").exists(),
        "a refused import wrote something"
    );

    write(&[header, good]);
    let out = run(&["import", "--config", &config, "--in", &input]);
    assert!(out.status.success(), "{}", stderr(&out));
}
