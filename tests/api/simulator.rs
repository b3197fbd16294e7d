//! The gateway simulator (`simulate-gateway`) end to end over TLS: a request with a policy is
//! acknowledged, its response is posted to a running callback-receiver, and a poller that was
//! already waiting gets it. Also serialization, retries, giving up, the control-level failure
//! shapes, injected faults, duplicate deliveries, and the command itself.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callback_receiver::config::Config;
use callback_receiver::simulator::delivery::{DeliveryStats, StatsSnapshot};
use callback_receiver::simulator::{SimConfig, Simulator, ENDPOINT_PATH};
use callback_receiver::xml::{extract, Extracted};
use http::{HeaderMap, Method, StatusCode};
use tokio::sync::oneshot;

use crate::helpers::{
    self, config_toml, encode_segment, headers, init, logs, make_certs, spawn_app, Answer, Client,
    StoppedApp, TestApp, PASSWORD, POLICY, SECOND_PASSWORD, SECOND_POLICY, SECOND_USER, TOKEN_ALL,
    USER,
};

const SENDER: &str = "test_sender";
const SENDER_PASSWORD: &str = "sender-pass-<&>";
const COMPANY: &str = "TESTCO";
const LOGIN_USER: &str = "xml_gateway";
const LOGIN_PASSWORD: &str = "user-pass-91";

/// A running simulator.
struct TestSim {
    /// A client for it (trusting the receiver's CA, which also signed its certificate).
    client: Client,
    /// Its delivery counters.
    stats: Arc<DeliveryStats>,
    /// Stops it.
    shutdown: Option<oneshot::Sender<()>>,
    /// Its task.
    join: tokio::task::JoinHandle<()>,
}

impl TestSim {
    /// Posts a request document to the gateway endpoint.
    async fn post(&self, body: impl Into<Bytes>) -> Answer {
        self.client
            .request(
                Method::POST,
                ENDPOINT_PATH,
                headers(&[("content-type", "application/xml")]),
                body,
            )
            .await
    }

    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Waits until the counters satisfy `done`, failing the test after `limit`.
    async fn until(&self, what: &str, limit: Duration, done: impl Fn(&StatsSnapshot) -> bool) {
        let start = Instant::now();
        loop {
            let now = self.stats();
            if done(&now) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not reached within {limit:?}; counters {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), self.join)
            .await
            .expect("the simulator did not stop")
            .expect("the simulator task panicked");
    }
}

/// The simulator's configuration: certificates of `dir/certs` (the receiver's dev CA), one
/// sender, one login, and `policies` and `extra` as given (TOML).
fn sim_toml(top: &str, policies: &str) -> String {
    format!(
        r#"listen = "127.0.0.1:0"
ca_file = "certs/ca.pem"
{top}
[tls]
cert = "certs/cert.pem"
key = "certs/key.pem"

[[sender]]
id = "{SENDER}"
password = "{SENDER_PASSWORD}"

[[login]]
company = "{COMPANY}"
user = "{LOGIN_USER}"
password = "{LOGIN_PASSWORD}"

{policies}
"#
    )
}

/// A `[[policy]]` posting to `port`'s `/callback/{id}` with the given credentials.
fn policy_toml(id: &str, port: u16, user: &str, password: &str, serialize: bool) -> String {
    format!(
        "[[policy]]\nid = \"{id}\"\nresponse_url = \"https://localhost:{port}/callback/{id}\"\n\
         user = \"{user}\"\npassword = \"{password}\"\nserialize = {serialize}\n"
    )
}

/// Starts a simulator whose certificates are those of `dir/certs`.
async fn spawn_sim(dir: &Path, text: &str) -> TestSim {
    init();
    let config = SimConfig::from_toml(text, "sim.toml", dir).expect("the simulator configuration");
    let simulator = Simulator::build(config).await.expect("Simulator::build");
    let addr = simulator.local_addr();
    assert!(simulator
        .endpoint_url()
        .ends_with(&format!(":{}{ENDPOINT_PATH}", addr.port())));
    let stats = simulator.stats();
    let (tx, rx) = oneshot::channel::<()>();
    let join = tokio::spawn(simulator.run_until(async move {
        let _ = rx.await;
    }));
    TestSim {
        client: Client::new(addr, &dir.join("certs/ca.pem")),
        stats,
        shutdown: Some(tx),
        join,
    }
}

/// A receiver and a simulator delivering policy `hello-world` (and `second`) to it.
async fn receiver_and_sim(top: &str, serialize: bool) -> (TestApp, TestSim) {
    let app = spawn_app().await;
    let port = app.addr.port();
    let policies = format!(
        "{}\n{}",
        policy_toml(POLICY, port, USER, PASSWORD, serialize),
        policy_toml(SECOND_POLICY, port, SECOND_USER, SECOND_PASSWORD, false)
    );
    let sim = spawn_sim(app.dir.path(), &sim_toml(top, &policies)).await;
    (app, sim)
}

/// A gateway request with `functions` as `(function controlid, function element)`.
fn gateway_request(
    controlid: &str,
    policy: Option<&str>,
    transaction: bool,
    functions: &[(&str, &str)],
) -> String {
    let escape = helpers::xml_escape;
    let policy = policy
        .map(|p| format!("<policyid>{p}</policyid>"))
        .unwrap_or_default();
    let content: String = functions
        .iter()
        .map(|(cid, body)| format!("<function controlid=\"{}\">{body}</function>", escape(cid)))
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<request><control><senderid>{SENDER}</senderid>\
         <password>{}</password><controlid>{}</controlid><uniqueid>false</uniqueid>\
         <dtdversion>3.0</dtdversion>{policy}<includewhitespace>false</includewhitespace></control>\
         <operation transaction=\"{transaction}\"><authentication><login><userid>{LOGIN_USER}</userid>\
         <companyid>{COMPANY}</companyid><password>{LOGIN_PASSWORD}</password></login></authentication>\
         <content>{content}</content></operation></request>",
        escape(SENDER_PASSWORD),
        escape(controlid),
    )
}

const READ_BY_QUERY: &str = "<readByQuery><object>VENDOR</object><fields>*</fields><query></query>\
                             <pagesize>100</pagesize></readByQuery>";
const CREATE_VENDOR: &str =
    "<create><VENDOR><VENDORID>V-1</VENDORID><NAME>Fellow &amp; Co</NAME></VENDOR></create>";

/// A request with one `readByQuery`.
fn simple_request(controlid: &str, policy: Option<&str>) -> String {
    gateway_request(controlid, policy, false, &[("q-1", READ_BY_QUERY)])
}

fn bearer() -> HeaderMap {
    headers(&[("authorization", &format!("Bearer {TOKEN_ALL}"))])
}

/// `GET /v1/responses/{controlid}?wait=S` as poller `all`.
async fn long_poll(client: &Client, controlid: &str, wait: u64) -> Answer {
    let path = format!("/v1/responses/{}?wait={wait}", encode_segment(controlid));
    client
        .request(Method::GET, &path, bearer(), Bytes::new())
        .await
}

/// The JSON summary of `controlid` as poller `all`.
async fn summary(app: &TestApp, controlid: &str) -> serde_json::Value {
    let answer = app.get_response(controlid, Some(TOKEN_ALL), true).await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "{controlid}: {}",
        answer.text()
    );
    answer.json()
}

fn parse(answer: &Answer) -> Extracted {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(
        answer
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/xml")),
        "{:?}",
        answer.headers
    );
    extract(&answer.body).unwrap_or_else(|e| panic!("{e}: {}", answer.text()))
}

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{nanos}-{}", N.fetch_add(1, Ordering::Relaxed))
}

#[tokio::test]
async fn an_async_request_is_acknowledged_then_delivered_to_a_waiting_poller() {
    let (app, sim) = receiver_and_sim("delay_ms = 300", false).await;
    let controlid = unique("e2e-");
    // The poller starts waiting before the request is even sent.
    let waiting = {
        let client = app.client.clone();
        let controlid = controlid.clone();
        tokio::spawn(async move { long_poll(&client, &controlid, 30).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiting.is_finished(),
        "the long-poll answered before anything was sent"
    );

    let request = gateway_request(
        &controlid,
        Some(POLICY),
        false,
        &[("f-read", READ_BY_QUERY), ("f-create", CREATE_VENDOR)],
    );
    let ack = sim.post(request).await;
    assert_eq!(ack.status, StatusCode::OK);
    assert_eq!(
        ack.text(),
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response><acknowledgement><status>success</status>\
             </acknowledgement><control><status>success</status><senderid>{SENDER}</senderid>\
             <controlid>{controlid}</controlid><uniqueid>false</uniqueid><dtdversion>3.0</dtdversion>\
             </control></response>\n"
        )
    );
    assert!(
        !waiting.is_finished(),
        "delivered before the configured delay"
    );

    let answer = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the long-poll did not answer")
        .expect("the long-poll task panicked");
    let response = extract(&answer.body).expect("the delivered response parses");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(response.controlid.as_deref(), Some(controlid.as_str()));
    let control = response.control.expect("control");
    assert_eq!(control.status.as_deref(), Some("success"));
    assert_eq!(control.senderid.as_deref(), Some(SENDER));
    let auth = response.authentication.expect("authentication");
    assert_eq!(auth.status.as_deref(), Some("success"));
    assert_eq!(auth.companyid.as_deref(), Some(COMPANY));
    let function_ids: Vec<_> = response
        .results
        .iter()
        .map(|r| r.controlid.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(function_ids, ["f-read", "f-create"]);
    assert!(response
        .results
        .iter()
        .all(|r| r.status.as_deref() == Some("success")));
    let data = response.results[0].data.as_ref().expect("readByQuery data");
    assert_eq!(data.listtype.as_deref(), Some("vendor"));
    assert!(data.count.is_some() && data.totalcount.is_some() && data.numremaining.is_some());

    let summary = summary(&app, &controlid).await;
    assert_eq!(summary["policy"], POLICY);
    assert_eq!(summary["deliveries"], 1);
    sim.until("completed", Duration::from_secs(5), |s| s.completed == 1)
        .await;
    assert_eq!(sim.stats().failed_attempts, 0);
    sim.stop().await;
}

#[tokio::test]
async fn a_request_without_policy_gets_the_whole_response_at_once() {
    let (app, sim) = receiver_and_sim("delay_ms = 0", false).await;
    let controlid = unique("sync-");
    let request = gateway_request(
        &controlid,
        None,
        false,
        &[
            ("f-1", READ_BY_QUERY),
            ("f-2", CREATE_VENDOR),
            ("f-3", "<getAPISession/>"),
        ],
    );
    let answer = sim.post(request.clone()).await;
    let response = parse(&answer);
    assert_eq!(response.controlid.as_deref(), Some(controlid.as_str()));
    assert_eq!(response.results.len(), 3);
    let data = response.results[0].data.as_ref().expect("data");
    assert_eq!(
        (
            data.listtype.as_deref(),
            data.count.as_deref(),
            data.totalcount.as_deref(),
            data.numremaining.as_deref()
        ),
        (Some("vendor"), Some("0"), Some("0"), Some("0"))
    );
    assert_eq!(response.results[1].function.as_deref(), Some("create"));
    assert!(answer.text().contains(&format!(
        "<endpoint>https://localhost:{}{ENDPOINT_PATH}</endpoint>",
        sim.client.addr.port()
    )));

    // The same request as an old SDK posts it: a form with the document in `xmlrequest`.
    let form = format!(
        "xmlrequest={}",
        percent_encoding::utf8_percent_encode(&request, percent_encoding::NON_ALPHANUMERIC)
    );
    let answer = sim
        .client
        .request(
            Method::POST,
            ENDPOINT_PATH,
            headers(&[("content-type", "application/x-www-form-urlencoded")]),
            form,
        )
        .await;
    assert_eq!(parse(&answer).results.len(), 3);

    // Other paths and methods.
    let wrong = sim
        .client
        .request(Method::GET, ENDPOINT_PATH, HeaderMap::new(), Bytes::new())
        .await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong.header("allow"), Some("POST"));
    let wrong = sim
        .client
        .request(
            Method::POST,
            "/ia/xml/other",
            HeaderMap::new(),
            Bytes::new(),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::NOT_FOUND);

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sim.stats().queued, 0, "a synchronous request was queued");
    let missing = app.get_response(&controlid, Some(TOKEN_ALL), false).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    sim.stop().await;
}

#[tokio::test]
async fn a_serialized_policy_delivers_in_acceptance_order_even_behind_a_slow_one() {
    let top = "delay_ms = 10\n[[fault]]\ncontrolid_prefix = \"slow-\"\nextra_delay_ms = 400\n";
    let (app, sim) = receiver_and_sim(top, true).await;
    let run = unique("");
    // The first of 20 requests is delayed by a fault; the 19 behind it must wait their turn.
    let controlids: Vec<String> = (0..20)
        .map(|i| {
            if i == 0 {
                format!("slow-{run}-{i:02}")
            } else {
                format!("serial-{run}-{i:02}")
            }
        })
        .collect();
    for controlid in &controlids {
        let ack = sim.post(simple_request(controlid, Some(POLICY))).await;
        assert!(ack.text().contains("<acknowledgement>"), "{}", ack.text());
    }
    // For contrast, the same through the policy that is not serialized: the slow one is overtaken.
    let slow = format!("slow-{run}-parallel");
    let fast = format!("fast-{run}-parallel");
    for controlid in [&slow, &fast] {
        let ack = sim
            .post(simple_request(controlid, Some(SECOND_POLICY)))
            .await;
        assert!(ack.text().contains("<acknowledgement>"), "{}", ack.text());
    }
    sim.until("all 22 delivered", Duration::from_secs(20), |s| {
        s.completed == 22
    })
    .await;

    let mut previous = String::new();
    for controlid in &controlids {
        let id = summary(&app, controlid).await["delivery_id"]
            .as_str()
            .expect("delivery_id")
            .to_string();
        assert!(
            id > previous,
            "{controlid} arrived out of order ({id} after {previous})"
        );
        previous = id;
    }
    let slow_id = summary(&app, &slow).await["delivery_id"].clone();
    let fast_id = summary(&app, &fast).await["delivery_id"].clone();
    assert!(
        fast_id.as_str() < slow_id.as_str(),
        "without serialize the delayed response should be overtaken"
    );
    assert_eq!(sim.stats().failed_attempts, 0);
    sim.stop().await;
}

#[tokio::test]
async fn deliveries_are_retried_until_the_receiver_comes_up() {
    init();
    // A port with nothing listening on it yet.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let ca = make_certs(dir.path());
    let policies = policy_toml(POLICY, addr.port(), USER, PASSWORD, false);
    let sim = spawn_sim(dir.path(), &sim_toml("delay_ms = 0", &policies)).await;
    let controlid = unique("retry-");
    let ack = sim.post(simple_request(&controlid, Some(POLICY))).await;
    assert!(ack.text().contains("<acknowledgement>"), "{}", ack.text());
    sim.until("two failed attempts", Duration::from_secs(10), |s| {
        s.failed_attempts >= 2
    })
    .await;
    assert_eq!(sim.stats().delivered, 0);

    // Now the receiver comes up on that port, with the CA the simulator trusts.
    let mut config = Config::from_toml(&config_toml(""), "test.toml", dir.path())
        .expect("the test configuration");
    config.listen = addr;
    let app = StoppedApp {
        dir,
        config,
        ca_pem_path: ca,
    }
    .restart()
    .await;
    let answer = long_poll(&app.client, &controlid, 15).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        extract(&answer.body).expect("parses").controlid.as_deref(),
        Some(controlid.as_str())
    );
    sim.until("delivered", Duration::from_secs(5), |s| s.delivered == 1)
        .await;
    let log = logs();
    assert!(
        log.lines()
            .any(|l| l.contains("delivery failed") && l.contains(&controlid)),
        "the failed attempts were not logged"
    );
    assert!(!log.contains(PASSWORD), "the policy password was logged");
    sim.stop().await;
}

#[tokio::test]
async fn a_delivery_is_given_up_after_max_attempts_with_an_error_log() {
    init();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let policies = policy_toml(POLICY, addr.port(), USER, PASSWORD, true);
    let sim = spawn_sim(
        dir.path(),
        &sim_toml("delay_ms = 0\nmax_attempts = 2", &policies),
    )
    .await;
    let controlid = unique("give-up-");
    sim.post(simple_request(&controlid, Some(POLICY))).await;
    sim.until("given up", Duration::from_secs(10), |s| s.given_up == 1)
        .await;
    assert_eq!(sim.stats().failed_attempts, 2);
    assert!(
        logs()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("giving up") && l.contains(&controlid)),
        "no error log for the given-up delivery"
    );
    sim.stop().await;
}

#[tokio::test]
async fn unknown_policies_and_bad_sender_credentials_get_control_level_failures() {
    let (_app, sim) = receiver_and_sim("delay_ms = 0", false).await;
    let controlid = unique("fail-shape-");
    let cases = [
        (
            simple_request(&controlid, Some("no-such-policy")),
            "XL03000006",
            "no-such-policy is not a valid transport policy.".to_string(),
        ),
        (
            simple_request(&controlid, Some(POLICY))
                .replace(&helpers::xml_escape(SENDER_PASSWORD), "wrong-password"),
            "XL03000006",
            "Incorrect Intacct XML Partner ID or password.".to_string(),
        ),
        (
            simple_request(&controlid, None).replace(SENDER, "unknown_sender"),
            "XL03000006",
            "Incorrect Intacct XML Partner ID or password.".to_string(),
        ),
        (
            simple_request(&controlid, Some(POLICY)).replace("</content>", "</contents>"),
            "XL03000003",
            "XML Parse schema error: ".to_string(),
        ),
        (
            format!(
                "<!DOCTYPE request [<!ENTITY boom \"x\">]>{}",
                simple_request(&controlid, Some(POLICY))
            ),
            "XL03000003",
            "document type declarations are not accepted".to_string(),
        ),
    ];
    for (request, errorno, message) in cases {
        let answer = sim.post(request).await;
        let response = parse(&answer);
        let control = response.control.expect("control");
        assert_eq!(
            control.status.as_deref(),
            Some("failure"),
            "{}",
            answer.text()
        );
        assert!(response.authentication.is_none(), "{}", answer.text());
        assert!(response.results.is_empty());
        let error = &response.errors[0];
        assert_eq!(error.errorno.as_deref(), Some(errorno), "{}", answer.text());
        assert!(
            error
                .description2
                .as_deref()
                .unwrap_or("")
                .contains(&message),
            "{message:?} not in {}",
            answer.text()
        );
    }
    // A well-formed request keeps its controlid in the echo.
    let answer = sim.post(simple_request(&controlid, Some("nope"))).await;
    assert_eq!(
        parse(&answer).controlid.as_deref(),
        Some(controlid.as_str())
    );
    assert_eq!(sim.stats().queued, 0, "a refused request was queued");
    sim.stop().await;
}

#[tokio::test]
async fn asynchronous_requests_over_500k_characters_are_refused() {
    let (_app, sim) = receiver_and_sim("delay_ms = 0", false).await;
    let controlid = unique("big-");
    let big_name = "x".repeat(500_001);
    let create = format!("<create><VENDOR><NAME>{big_name}</NAME></VENDOR></create>");
    let answer = sim
        .post(gateway_request(
            &controlid,
            Some(POLICY),
            false,
            &[("c", &create)],
        ))
        .await;
    let response = parse(&answer);
    assert_eq!(
        response.control.and_then(|c| c.status).as_deref(),
        Some("failure")
    );
    assert!(answer.text().contains("500000"), "{}", answer.text());
    assert_eq!(sim.stats().queued, 0);
    sim.stop().await;
}

#[tokio::test]
async fn a_duplicate_delivery_is_idempotent_at_the_receiver() {
    let top = "delay_ms = 0\n[[fault]]\ncontrolid_prefix = \"dup-\"\nduplicate = 2\n";
    let (app, sim) = receiver_and_sim(top, false).await;
    let controlid = unique("dup-");
    sim.post(simple_request(&controlid, Some(POLICY))).await;
    sim.until("three posts", Duration::from_secs(10), |s| s.completed == 1)
        .await;
    assert_eq!(sim.stats().delivered, 3, "the response and two duplicates");
    let summary = summary(&app, &controlid).await;
    assert_eq!(summary["deliveries"], 1, "{summary}");
    let feed = app
        .request(
            Method::GET,
            "/v1/responses?limit=1000",
            bearer(),
            Bytes::new(),
        )
        .await
        .json();
    let copies = feed["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|item| item["controlid"] == controlid.as_str())
        .count();
    assert_eq!(copies, 1, "the duplicates were stored: {feed}");
    sim.stop().await;
}

#[tokio::test]
async fn injected_function_failures_and_malformed_bodies_reach_the_receiver() {
    let top = "delay_ms = 0\n\
               [[fault]]\ncontrolid_prefix = \"fail-\"\nfail_functions = [\"create\"]\n\
               [[fault]]\ncontrolid_prefix = \"broken-\"\nmalformed = true\n";
    let (app, sim) = receiver_and_sim(top, false).await;
    let failing = unique("fail-");
    let broken = unique("broken-");
    let functions = [("f-read", READ_BY_QUERY), ("f-create", CREATE_VENDOR)];
    sim.post(gateway_request(&failing, Some(POLICY), true, &functions))
        .await;
    sim.post(gateway_request(&broken, Some(POLICY), false, &functions))
        .await;

    let answer = long_poll(&app.client, &failing, 15).await;
    let response = extract(&answer.body).expect("parses");
    let statuses: Vec<_> = response
        .results
        .iter()
        .map(|r| r.status.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(statuses, ["aborted", "failure"], "transaction rolled back");
    let errors = &response.results[1].errors;
    assert_eq!(errors[0].errorno.as_deref(), Some("BL34000061"));
    assert!(errors[0]
        .description2
        .as_deref()
        .unwrap_or("")
        .contains("already exists"));

    let answer = long_poll(&app.client, &broken, 15).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let summary = summary(&app, &broken).await;
    assert_eq!(summary["well_formed"], false, "{summary}");
    assert!(summary["parse_error"].is_string(), "{summary}");
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The command.

const BIN: &str = env!("CARGO_BIN_EXE_callback-receiver");

#[tokio::test]
async fn the_simulate_gateway_command_serves_and_stops_on_sigterm() {
    init();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = make_certs(dir.path());
    let config_path = dir.path().join("simulator.toml");
    std::fs::write(&config_path, sim_toml("delay_ms = 0", "")).expect("write config");
    let mut child = Command::new(BIN)
        .args(["simulate-gateway", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    let stdout = child.stdout.take().expect("stdout");
    let endpoint = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let found = lines.by_ref().map_while(Result::ok).find_map(|line| {
            line.trim()
                .strip_prefix("Endpoint URL")
                .map(|rest| rest.trim().to_string())
        });
        // Keep reading so the process never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        found
    });
    let endpoint = tokio::time::timeout(Duration::from_secs(20), endpoint)
        .await
        .expect("no banner within 20 s")
        .expect("reader thread")
        .unwrap_or_else(|| panic!("no Endpoint URL line"));
    let port: u16 = endpoint
        .strip_prefix("https://localhost:")
        .and_then(|rest| rest.strip_suffix(ENDPOINT_PATH))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected endpoint {endpoint:?}"));
    let client = Client::new(([127, 0, 0, 1], port).into(), &ca);
    let controlid = unique("cli-");
    let answer = client
        .request(
            Method::POST,
            ENDPOINT_PATH,
            headers(&[("content-type", "application/xml")]),
            simple_request(&controlid, None),
        )
        .await;
    assert_eq!(
        parse(&answer).controlid.as_deref(),
        Some(controlid.as_str())
    );

    let pid = child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {:?}: {stderr}",
        output.status
    );
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    assert!(
        !stderr.contains(LOGIN_PASSWORD),
        "a password was logged: {stderr}"
    );
}

#[test]
fn the_simulate_gateway_command_refuses_a_bad_config_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("simulator.toml");
    std::fs::write(&path, format!("{}\ndelay = 5\n", sim_toml("", ""))).expect("write");
    let output = Command::new(BIN)
        .args(["simulate-gateway", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("simulator.toml:") && stderr.contains("delay"),
        "{stderr}"
    );

    let missing = Command::new(BIN)
        .args([
            "simulate-gateway",
            "--config",
            "/nonexistent/simulator.toml",
        ])
        .output()
        .expect("run");
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such file"));

    let help = Command::new(BIN)
        .args(["simulate-gateway", "--help"])
        .output()
        .expect("run");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--config"));
}
