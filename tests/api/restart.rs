//! Durability and shutdown: concurrent callbacks survive a restart; a request in flight at
//! shutdown completes and is stored; a body damaged on disk is refused (500), not served.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::callbacks::assert_served_raw;
use crate::helpers::{basic, headers, raw_post_head, response_doc, spawn_app, PASSWORD, USER};

const CALLBACKS: usize = 200;
const CONNECTIONS: usize = 16;

fn controlid(i: usize) -> String {
    format!("concurrent-{i:03}")
}

fn body(i: usize) -> Bytes {
    response_doc(&controlid(i), &format!("body number {i}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callbacks_are_all_stored_and_survive_a_restart() {
    let app = spawn_app().await;
    let auth = Arc::new(basic(USER, PASSWORD));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..CONNECTIONS {
        let client = app.client.clone();
        let auth = auth.clone();
        tasks.spawn(async move {
            let mut conn = client.h1().await;
            for i in (worker..CALLBACKS).step_by(CONNECTIONS) {
                let answer = conn
                    .request(
                        Method::POST,
                        "/callback/hello-world",
                        headers(&[("authorization", &auth), ("content-type", "text/xml")]),
                        body(i),
                    )
                    .await;
                assert_eq!(
                    answer.status,
                    StatusCode::OK,
                    "callback {i}: {}",
                    answer.text()
                );
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a posting task failed");
    }
    for i in 0..CALLBACKS {
        assert_served_raw(&app, &controlid(i), &body(i)).await;
    }

    let stopped = app.stop().await;
    let app = stopped.restart().await;
    for i in 0..CALLBACKS {
        assert_served_raw(&app, &controlid(i), &body(i)).await;
    }
    let v = crate::callbacks::summary(&app, &controlid(7)).await;
    assert_eq!(v["deliveries"], serde_json::json!(1), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_at_shutdown_completes_and_is_stored() {
    let mut app = spawn_app().await;
    let body = response_doc("in-flight", &"slow upload ".repeat(200));
    let (first, second) = body.split_at(body.len() / 2);

    let mut raw = app.raw().await;
    let head = raw_post_head(
        "/callback/hello-world",
        &basic(USER, PASSWORD),
        &[
            &format!("Content-Length: {}", body.len()),
            "Expect: 100-continue",
        ],
    );
    raw.write(head.as_bytes()).await;
    // The handler asks for the body: the request is in flight.
    assert_eq!(raw.read_response().await.status, 100);
    raw.write(first).await;

    app.trigger_shutdown();
    // Wait until the service stops accepting (the listener is closed).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpStream::connect(app.addr).await {
            Err(_) => break,
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "still accepting connections 10 s after the shutdown signal"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    assert!(
        app.is_running(),
        "run_until returned while a request was still in flight"
    );
    raw.write(second).await;
    let answer = raw.read_response().await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    let (result, stopped) = app.wait_stopped().await;
    assert!(
        result.is_ok(),
        "run_until: {:?}",
        result.err().map(|e| e.to_string())
    );

    let app = stopped.restart().await;
    assert_served_raw(&app, "in-flight", &body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_damaged_on_disk_is_refused_and_the_others_are_served() {
    let app = spawn_app().await;
    let auth = basic(USER, PASSWORD);
    let names = ["damage-a", "damage-b", "damage-c"];
    let bodies: Vec<Bytes> = names
        .iter()
        .map(|c| response_doc(c, &format!("the body of {c}")))
        .collect();
    let mut conn = app.client.h1().await;
    for body in &bodies {
        let answer = conn
            .request(
                Method::POST,
                "/callback/hello-world",
                headers(&[("authorization", &auth), ("content-type", "text/xml")]),
                body.clone(),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    drop(conn);
    let stopped = app.stop().await;

    // A disk fault: one byte of the middle body changes in the body log.
    let segment = stopped.dir.path().join("data/bodies/0000000000000001.seg");
    let mut bytes = std::fs::read(&segment).expect("the body log");
    let needle = b"the body of damage-b";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the body is in the log");
    bytes[at + 4] ^= 0x20;
    std::fs::write(&segment, &bytes).expect("write");

    let app = stopped.restart().await;
    assert_served_raw(&app, "damage-a", &bodies[0]).await;
    assert_served_raw(&app, "damage-c", &bodies[2]).await;
    let got = app
        .get_response("damage-b", Some(crate::helpers::TOKEN_ALL), false)
        .await;
    assert_eq!(
        got.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        got.text()
    );
    assert_eq!(got.header("retry-after"), None, "retrying does not help");
    assert!(got.text().contains("CRC"), "{}", got.text());
    assert!(
        !got.text().contains("<response"),
        "no part of the damaged body is served: {}",
        got.text()
    );
    // The summary (from the record, not the body) is still there.
    let v = crate::callbacks::summary(&app, "damage-b").await;
    assert_eq!(v["deliveries"], serde_json::json!(1), "{v}");

    // The gateway's retry of the same bytes is stored anew, not taken for a duplicate of the
    // copy that cannot be read, and is what is served from then on.
    let mut conn = app.client.h1().await;
    let answer = conn
        .request(
            Method::POST,
            "/callback/hello-world",
            headers(&[("authorization", &auth), ("content-type", "text/xml")]),
            bodies[1].clone(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let ack: serde_json::Value = serde_json::from_slice(&answer.body).expect("json");
    assert_eq!(ack["duplicate"], serde_json::json!(false), "{ack}");
    assert_served_raw(&app, "damage-b", &bodies[1]).await;
    let v = crate::callbacks::summary(&app, "damage-b").await;
    assert_eq!(v["deliveries"], serde_json::json!(2), "{v}");
    // Once a copy reads back, the next retry is a duplicate of it again.
    let answer = conn
        .request(
            Method::POST,
            "/callback/hello-world",
            headers(&[("authorization", &auth), ("content-type", "text/xml")]),
            bodies[1].clone(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let ack: serde_json::Value = serde_json::from_slice(&answer.body).expect("json");
    assert_eq!(ack["duplicate"], serde_json::json!(true), "{ack}");
    let v = crate::callbacks::summary(&app, "damage-b").await;
    assert_eq!(v["deliveries"], serde_json::json!(2), "{v}");
}
