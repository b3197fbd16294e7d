//! `docs/openapi.yaml` against the real server.
//!
//! A table of scenarios, each one real request over TLS, must produce its expected status, and
//! the spec must document that status for the request's path template and method (with its
//! required headers, its media type, and a body that fits the documented schema). Then every
//! (path, method, status) triple the spec documents must have been produced by some scenario or
//! be listed in [`UNTESTABLE`] with a reason: the spec cannot drift from the server either way.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use callback_receiver::auth::{Credential, SecretString};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use serde_json::Value;

use crate::helpers::{
    basic, response_doc, sha256_hex, spawn_app_with, TestApp, OPEN_POLICY, PASSWORD, POLICY,
    TOKEN_ALL, TOKEN_SCOPED, USER,
};

/// A documented or covered (path template, lower-case method, status).
type Triple = (String, String, u16);

/// Where the spec lives, relative to the crate root.
const SPEC_FILE: &str = "docs/openapi.yaml";

/// The HTTP methods an `OpenAPI` path item may document.
const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Documented triples that no test can provoke, with the reason.
const UNTESTABLE: &[(&str, &str, u16, &str)] = &[
    (
        "/v1/responses/{controlid}",
        "get",
        500,
        "only for a body damaged on disk, which needs the service stopped while its body log is \
         changed: restart::a_body_damaged_on_disk_is_refused_and_the_others_are_served covers it",
    ),
    (
        "/v1/deliveries/{delivery_id}",
        "get",
        500,
        "only for a body damaged on disk (the same answer as GET /v1/responses/{controlid}, from \
         the same code), which needs the service stopped while its body log is changed",
    ),
    (
        "/v1/deliveries/{delivery_id}",
        "get",
        503,
        "only on a failing read of the database (I/O error, corrupt record); reads still work \
         on a closed store, so the test cannot provoke it",
    ),
    (
        "/v1/expected",
        "get",
        503,
        "only on a failing read of the database (I/O error, corrupt record); reads still work \
         on a closed store, so the test cannot provoke it",
    ),
];

/// The test configuration's wrong token.
const WRONG_TOKEN: &str = "not-a-configured-token-0000";

/// The `metrics_token` of the main service under test.
const METRICS_TOKEN: &str = "metrics-token-for-openapi-5e1d";

/// How a scenario's request is sent.
#[derive(Debug, Clone, Copy)]
enum Transport {
    /// Through hyper's HTTP/1.1 client.
    Hyper,
    /// By hand on a raw TLS stream, declaring this `Content-Length` whatever the body is: a
    /// longer declaration than the body stalls the upload, a huge one is refused unread.
    Raw { content_length: u64 },
}

/// One request and the status it must get.
#[derive(Debug, Clone)]
struct Scenario {
    name: String,
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    transport: Transport,
    status: u16,
}

fn scenario(name: &str, method: Method, path: impl Into<String>, status: u16) -> Scenario {
    Scenario {
        name: name.to_string(),
        method,
        path: path.into(),
        headers: Vec::new(),
        body: Bytes::new(),
        transport: Transport::Hyper,
        status,
    }
}

impl Scenario {
    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    fn bearer(self, token: &str) -> Self {
        self.header("authorization", format!("Bearer {token}"))
    }

    fn basic(self) -> Self {
        self.header("authorization", basic(USER, PASSWORD))
    }

    fn json(self) -> Self {
        self.header("accept", "application/json")
    }

    fn xml(self) -> Self {
        self.header("content-type", "application/xml")
    }

    /// Sent by hand, declaring `content_length`.
    fn raw(mut self, content_length: u64) -> Self {
        self.transport = Transport::Raw { content_length };
        self
    }

    /// Sent by hand, declaring the body's own length.
    fn raw_exact(self) -> Self {
        let n = self.body.len() as u64;
        self.raw(n)
    }
}

/// `405` for each of `methods` on `path`.
fn not_allowed(path: &str, methods: &[Method]) -> Vec<Scenario> {
    methods
        .iter()
        .map(|m| scenario(&format!("{m} {path} is not allowed"), m.clone(), path, 405))
        .collect()
}

/// An answer, however it was read.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(app: &TestApp, s: &Scenario) -> Reply {
    match s.transport {
        Transport::Hyper => {
            let mut headers = HeaderMap::new();
            for (name, value) in &s.headers {
                headers.append(
                    HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                    HeaderValue::from_str(value).expect("header value"),
                );
            }
            let answer = app
                .request(s.method.clone(), &s.path, headers, s.body.clone())
                .await;
            Reply {
                status: answer.status.as_u16(),
                headers: answer.headers,
                body: answer.body,
            }
        }
        Transport::Raw { content_length } => {
            let mut head = format!("{} {} HTTP/1.1\r\nHost: localhost\r\n", s.method, s.path);
            for (name, value) in &s.headers {
                let _ = write!(head, "{name}: {value}\r\n");
            }
            let _ = write!(head, "Content-Length: {content_length}\r\n\r\n");
            let mut raw = app.raw().await;
            raw.write(head.as_bytes()).await;
            if !s.body.is_empty() {
                raw.write(&s.body).await;
            }
            let answer = raw.read_response().await;
            let mut headers = HeaderMap::new();
            for (name, value) in &answer.headers {
                headers.append(
                    HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                    HeaderValue::from_str(value).expect("header value"),
                );
            }
            Reply {
                status: answer.status,
                headers,
                body: Bytes::from(answer.body),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The spec.

fn load_spec() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(SPEC_FILE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let spec: Value = serde_norway::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{} is not valid YAML (or has non-string keys): {e}",
            path.display()
        )
    });
    assert_eq!(spec["openapi"], "3.1.0", "{SPEC_FILE}: openapi version");
    assert_eq!(
        spec["info"]["version"], "0.1.0",
        "{SPEC_FILE}: info.version"
    );
    spec
}

/// Follows `$ref`s (local JSON pointers) until a value without one.
fn resolve<'a>(spec: &'a Value, mut value: &'a Value) -> &'a Value {
    for _ in 0..32 {
        let Some(reference) = value.get("$ref").and_then(Value::as_str) else {
            return value;
        };
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local references are supported: {reference}"));
        value = spec
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling reference {reference}"));
    }
    panic!("reference loop");
}

/// The spec's path template that `path` (query ignored) falls under; exactly one must.
fn template_for(spec: &Value, path: &str) -> Result<String, String> {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').collect();
    let matches: Vec<&String> = spec["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .filter(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == segments.len()
                && parts.iter().zip(&segments).all(|(t, s)| {
                    if t.starts_with('{') && t.ends_with('}') {
                        !s.is_empty()
                    } else {
                        t == s
                    }
                })
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(format!("no path template of the spec matches {path}")),
        many => Err(format!("several path templates match {path}: {many:?}")),
    }
}

/// The operation `method` (lower case) of path `template`.
fn operation<'a>(spec: &'a Value, template: &str, method: &str) -> Option<&'a Value> {
    let item = resolve(spec, spec["paths"].get(template)?);
    item.get(method)
}

fn is_planned(op: &Value) -> bool {
    op.get("x-planned")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Every (template, method, status) the spec documents, planned operations left out, and the
/// planned operations.
fn documented(spec: &Value) -> (BTreeSet<Triple>, Vec<(String, String)>) {
    let mut triples = BTreeSet::new();
    let mut planned = Vec::new();
    for (template, item) in spec["paths"].as_object().expect("paths") {
        let item = resolve(spec, item);
        for method in METHODS {
            let Some(op) = item.get(*method) else {
                continue;
            };
            if is_planned(op) {
                planned.push((template.clone(), (*method).to_string()));
                continue;
            }
            let responses = op["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {template}: no responses"));
            for code in responses.keys() {
                let status: u16 = code.parse().unwrap_or_else(|_| {
                    panic!("{method} {template}: response {code:?} is not a plain status code")
                });
                triples.insert((template.clone(), (*method).to_string(), status));
            }
        }
    }
    (triples, planned)
}

// ---------------------------------------------------------------------------------------------
// A small JSON Schema check: $ref, oneOf, type, const, enum, pattern, format date-time, minimum,
// required, properties (strict: a property the schema does not list is an error), items.

fn validate(spec: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    if let Some(alternatives) = schema.get("oneOf").and_then(Value::as_array) {
        let fitting = alternatives
            .iter()
            .filter(|alt| {
                let mut e = Vec::new();
                validate(spec, alt, value, at, &mut e);
                e.is_empty()
            })
            .count();
        if fitting != 1 {
            errors.push(format!(
                "{at}: fits {fitting} of the oneOf alternatives, not exactly one: {value}"
            ));
        }
    }
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
            other => panic!("{at}: unexpected type {other}"),
        };
        let fits = types.iter().any(|t| match *t {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "object" => value.is_object(),
            "array" => value.is_array(),
            other => panic!("{at}: unknown type {other}"),
        });
        if !fits {
            errors.push(format!("{at}: {value} is not of type {types:?}"));
            return;
        }
    }
    if let Some(expected) = schema.get("const") {
        if value != expected {
            errors.push(format!("{at}: {value} is not the constant {expected}"));
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            errors.push(format!("{at}: {value} is not one of {options:?}"));
        }
    }
    if let (Some(min), Some(n)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if n < min {
            errors.push(format!("{at}: {n} is below the minimum {min}"));
        }
    }
    if let Value::String(text) = value {
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            if !pattern_matches(pattern, text) {
                errors.push(format!("{at}: {text:?} does not match {pattern}"));
            }
        }
        if schema.get("format").and_then(Value::as_str) == Some("date-time")
            && time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .is_err()
        {
            errors.push(format!("{at}: {text:?} is not an RFC 3339 date-time"));
        }
    }
    if let Value::Object(object) = value {
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for name in required.iter().filter_map(Value::as_str) {
                if !object.contains_key(name) {
                    errors.push(format!("{at}: required property {name:?} is missing"));
                }
            }
        }
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (name, v) in object {
                match properties.get(name) {
                    Some(sub) => validate(spec, sub, v, &format!("{at}.{name}"), errors),
                    None => errors.push(format!(
                        "{at}: property {name:?} is not in the schema's properties"
                    )),
                }
            }
        }
    }
    if let (Value::Array(list), Some(items)) = (value, schema.get("items")) {
        for (i, v) in list.iter().enumerate() {
            validate(spec, items, v, &format!("{at}[{i}]"), errors);
        }
    }
}

/// Matches the anchored patterns the spec uses: literal characters and `[...]` classes, each
/// optionally followed by `{n}` or `{n,m}`, between `^` and `$` (greedy, no backtracking).
fn pattern_matches(pattern: &str, text: &str) -> bool {
    enum Atom {
        Literal(char),
        Class(Vec<(char, char)>),
    }
    let inner = pattern
        .strip_prefix('^')
        .and_then(|p| p.strip_suffix('$'))
        .unwrap_or_else(|| panic!("pattern {pattern} is not anchored"));
    let chars: Vec<char> = inner.chars().collect();
    let mut atoms: Vec<(Atom, usize, usize)> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let atom = match chars[i] {
            '[' => {
                let end = chars[i..]
                    .iter()
                    .position(|c| *c == ']')
                    .map(|p| p + i)
                    .unwrap_or_else(|| panic!("pattern {pattern}: unclosed class"));
                let class = &chars[i + 1..end];
                let mut ranges = Vec::new();
                let mut k = 0;
                while k < class.len() {
                    if k + 2 < class.len() && class[k + 1] == '-' {
                        ranges.push((class[k], class[k + 2]));
                        k += 3;
                    } else {
                        ranges.push((class[k], class[k]));
                        k += 1;
                    }
                }
                i = end + 1;
                Atom::Class(ranges)
            }
            '\\' => {
                i += 2;
                Atom::Literal(chars[i - 1])
            }
            c if "()|*+?.".contains(c) => {
                panic!("pattern {pattern}: {c:?} is not supported by this test's matcher")
            }
            c => {
                i += 1;
                Atom::Literal(c)
            }
        };
        let (min, max) = if chars.get(i) == Some(&'{') {
            let end = chars[i..]
                .iter()
                .position(|c| *c == '}')
                .map(|p| p + i)
                .unwrap_or_else(|| panic!("pattern {pattern}: unclosed quantifier"));
            let q: String = chars[i + 1..end].iter().collect();
            i = end + 1;
            match q.split_once(',') {
                Some((a, b)) => (
                    a.parse().expect("quantifier"),
                    b.parse().expect("quantifier"),
                ),
                None => {
                    let n = q.parse().expect("quantifier");
                    (n, n)
                }
            }
        } else {
            (1, 1)
        };
        atoms.push((atom, min, max));
    }
    let text: Vec<char> = text.chars().collect();
    let mut pos = 0;
    for (atom, min, max) in &atoms {
        let fits = |c: char| match atom {
            Atom::Literal(l) => c == *l,
            Atom::Class(ranges) => ranges.iter().any(|(a, b)| (*a..=*b).contains(&c)),
        };
        let mut n = 0;
        while n < *max && pos < text.len() && fits(text[pos]) {
            n += 1;
            pos += 1;
        }
        if n < *min {
            return false;
        }
    }
    pos == text.len()
}

// ---------------------------------------------------------------------------------------------
// Checking one answer against the spec.

/// Checks that the spec documents `reply` for `method` on `template`: the status, the required
/// headers (and their schemas), the media type, and the body's schema. Returns the problems.
fn check_against_spec(spec: &Value, template: &str, method: &str, reply: &Reply) -> Vec<String> {
    let mut errors = Vec::new();
    let Some(op) = operation(spec, template, method) else {
        return vec![format!("the spec has no {method} operation on {template}")];
    };
    let Some(response) = op["responses"].get(reply.status.to_string()) else {
        return vec![format!(
            "the spec does not document {} for {method} {template}",
            reply.status
        )];
    };
    let response = resolve(spec, response);
    if let Some(headers) = response.get("headers").and_then(Value::as_object) {
        for (name, header) in headers {
            let header = resolve(spec, header);
            let required = header["required"].as_bool().unwrap_or(false);
            match reply.headers.get(name.as_str()).map(|v| v.to_str()) {
                None if required => errors.push(format!("required header {name} is missing")),
                None => {}
                Some(Err(_)) => errors.push(format!("header {name} is not text")),
                Some(Ok(value)) => validate(
                    spec,
                    &header["schema"],
                    &Value::String(value.to_string()),
                    &format!("header {name}"),
                    &mut errors,
                ),
            }
        }
    }
    match response.get("content").and_then(Value::as_object) {
        None => {
            if !reply.body.is_empty() {
                errors.push(format!(
                    "the spec documents no content, the server sent {:?}",
                    reply.text()
                ));
            }
        }
        Some(content) => {
            let media = reply
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .map(|v| v.trim().to_ascii_lowercase())
                .unwrap_or_default();
            let documented = content.get(&media).or_else(|| content.get("*/*"));
            match documented {
                None => errors.push(format!(
                    "Content-Type {media:?} is not among the documented {:?}",
                    content.keys().collect::<Vec<_>>()
                )),
                Some(entry) => {
                    if let Some(schema) = entry.get("schema") {
                        let value = if media == "application/json" {
                            match serde_json::from_slice(&reply.body) {
                                Ok(v) => v,
                                Err(e) => {
                                    errors.push(format!("the body is not JSON: {e}"));
                                    Value::Null
                                }
                            }
                        } else {
                            Value::String(reply.text())
                        };
                        validate(spec, schema, &value, "body", &mut errors);
                    }
                }
            }
        }
    }
    errors
}

/// The simple check of a summary's keys against the `Summary` schema: every required property
/// is there and none outside `properties`. Returns the keys seen.
fn assert_summary_keys(spec: &Value, summary: &Value, what: &str) -> BTreeSet<String> {
    let schema = &spec["components"]["schemas"]["Summary"];
    let properties = schema["properties"]
        .as_object()
        .expect("Summary.properties");
    let required = schema["required"].as_array().expect("Summary.required");
    let object = summary
        .as_object()
        .unwrap_or_else(|| panic!("{what}: the summary is not an object: {summary}"));
    for name in required.iter().filter_map(Value::as_str) {
        assert!(
            object.contains_key(name),
            "{what}: required {name:?} missing from {summary}"
        );
    }
    for name in object.keys() {
        assert!(
            properties.contains_key(name),
            "{what}: {name:?} is not a property of Summary: {summary}"
        );
    }
    let mut errors = Vec::new();
    validate(
        spec,
        &serde_json::json!({"$ref": "#/components/schemas/Summary"}),
        summary,
        what,
        &mut errors,
    );
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    object.keys().cloned().collect()
}

// ---------------------------------------------------------------------------------------------
// The test.

/// What the setup stored, for the scenarios to refer to.
struct Fixture {
    /// A matched delivery of controlid `oa-raw` on `hello-world`.
    raw_etag: String,
    /// An unmatched delivery.
    unmatched_id: String,
    /// Its `ETag`.
    unmatched_etag: String,
}

async fn post(app: &TestApp, body: Bytes) -> Value {
    let answer = app.post_ok(body).await;
    assert_eq!(answer.status.as_u16(), 200, "setup post: {}", answer.text());
    answer.json()
}

async fn setup(app: &TestApp) -> Fixture {
    let raw = response_doc("oa-raw", "first");
    post(app, raw.clone()).await;
    let unmatched = Bytes::from_static(
        b"<?xml version=\"1.0\"?>\n<response><control><status>success</status></control>\
          <errormessage><error><errorno>XL03000006</errorno></error></errormessage></response>\n",
    );
    let unmatched_receipt = post(app, unmatched.clone()).await;
    assert_eq!(unmatched_receipt["matched"], false, "{unmatched_receipt}");
    // Breaks after its controlid: stored, with a parse error.
    let broken = Bytes::from_static(
        b"<response><control><status>success</status><controlid>oa-broken</controlid>\
          </control><operation><result></operation></response>",
    );
    let receipt = post(app, broken).await;
    assert_eq!(receipt["well_formed"], false, "{receipt}");
    for (name, bytes) in crate::helpers::all_fixtures() {
        let answer = app.post_ok(bytes).await;
        assert_eq!(answer.status.as_u16(), 200, "{name}: {}", answer.text());
    }
    Fixture {
        raw_etag: format!("\"{}\"", sha256_hex(&raw)),
        unmatched_id: receipt_id(&unmatched_receipt),
        unmatched_etag: format!("\"{}\"", sha256_hex(&unmatched)),
    }
}

fn receipt_id(receipt: &Value) -> String {
    receipt["delivery_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no delivery_id in {receipt}"))
        .to_string()
}

/// The main table: run in order against a service with a stored `oa-raw`.
fn main_table(fx: &Fixture) -> Vec<Scenario> {
    use Method as M;
    let cb = format!("/callback/{POLICY}");
    let cb_slash = format!("/callback/{POLICY}/");
    let too_big = 1u64 << 30;
    let mut t = vec![
        // POST /callback/{policy_id} and its trailing-slash twin.
        scenario("callback stored", M::POST, &cb, 200)
            .basic()
            .xml()
            .body(response_doc("oa-cb", "1")),
        scenario("callback stored, trailing slash", M::POST, &cb_slash, 200)
            .basic()
            .header("content-type", "text/xml; charset=utf-8")
            .body(response_doc("oa-cb-slash", "1")),
        scenario(
            "open policy, no credentials, no Content-Type",
            M::POST,
            format!("/callback/{OPEN_POLICY}"),
            200,
        )
        .body(response_doc("oa-open", "1")),
        scenario("callback body is not XML", M::POST, &cb, 400)
            .basic()
            .xml()
            .body("this is not xml"),
        scenario(
            "callback with a DOCTYPE, trailing slash",
            M::POST,
            &cb_slash,
            400,
        )
        .basic()
        .xml()
        .body("<!DOCTYPE response [<!ENTITY x \"y\">]><response/>"),
        scenario("callback without credentials", M::POST, &cb, 401)
            .xml()
            .body(response_doc("oa-401", "1")),
        scenario("callback with wrong password", M::POST, &cb, 401)
            .header("authorization", basic(USER, "wrong"))
            .body(response_doc("oa-401", "1")),
        scenario(
            "callback for an unknown policy, trailing slash",
            M::POST,
            "/callback/nope/",
            401,
        )
        .basic()
        .body(response_doc("oa-401", "1")),
        scenario("callback body stalls", M::POST, &cb, 408)
            .basic()
            .xml()
            .body("<response>")
            .raw(4096),
        scenario(
            "callback body stalls, trailing slash",
            M::POST,
            &cb_slash,
            408,
        )
        .basic()
        .body("<response>")
        .raw(4096),
        scenario(
            "callback Content-Length over max_body_bytes",
            M::POST,
            &cb,
            413,
        )
        .basic()
        .raw(too_big),
        scenario(
            "callback too large, trailing slash",
            M::POST,
            &cb_slash,
            413,
        )
        .basic()
        .raw(too_big),
        // GET /v1/responses/{controlid}.
        scenario("raw XML", M::GET, "/v1/responses/oa-raw", 200).bearer(TOKEN_ALL),
        scenario("JSON summary", M::GET, "/v1/responses/oa-raw", 200)
            .bearer(TOKEN_ALL)
            .json(),
        scenario(
            "received, with wait",
            M::GET,
            "/v1/responses/oa-raw?wait=5",
            200,
        )
        .bearer(TOKEN_ALL),
        scenario(
            "If-None-Match with the ETag",
            M::GET,
            "/v1/responses/oa-raw",
            304,
        )
        .bearer(TOKEN_ALL)
        .header("if-none-match", &fx.raw_etag),
        scenario(
            "wait is not a number",
            M::GET,
            "/v1/responses/oa-raw?wait=soon",
            400,
        )
        .bearer(TOKEN_ALL),
        scenario("controlid not UTF-8", M::GET, "/v1/responses/%FF", 400).bearer(TOKEN_ALL),
        scenario("no token", M::GET, "/v1/responses/oa-raw", 401),
        scenario("wrong token", M::GET, "/v1/responses/oa-raw", 401).bearer(WRONG_TOKEN),
        scenario("never received", M::GET, "/v1/responses/oa-never", 404).bearer(TOKEN_ALL),
        scenario(
            "never received, wait times out",
            M::GET,
            "/v1/responses/oa-never?wait=0.2",
            404,
        )
        .bearer(TOKEN_ALL),
        scenario(
            "outside the poller's policies",
            M::GET,
            "/v1/responses/oa-raw",
            404,
        )
        .bearer(TOKEN_SCOPED),
        // PUT /v1/expected/{controlid}, then the 202 it gives.
        scenario("expect, no body", M::PUT, "/v1/expected/oa-pending", 201).bearer(TOKEN_ALL),
        scenario("pending", M::GET, "/v1/responses/oa-pending", 202).bearer(TOKEN_ALL),
        scenario(
            "pending, wait times out",
            M::GET,
            "/v1/responses/oa-pending?wait=0.2",
            202,
        )
        .bearer(TOKEN_ALL)
        .json(),
        scenario("expect again", M::PUT, "/v1/expected/oa-pending", 200)
            .bearer(TOKEN_ALL)
            .header("content-type", "application/json")
            .body(r#"{"timeout_seconds": 1}"#),
        scenario(
            "expect what was received",
            M::PUT,
            "/v1/expected/oa-raw",
            200,
        )
        .bearer(TOKEN_ALL),
        scenario(
            "expect with an unknown field",
            M::PUT,
            "/v1/expected/oa-x",
            400,
        )
        .bearer(TOKEN_ALL)
        .body(r#"{"timeout": 5}"#),
        scenario("expect with timeout 0", M::PUT, "/v1/expected/oa-x", 400)
            .bearer(TOKEN_ALL)
            .body(r#"{"timeout_seconds": 0}"#),
        scenario("expect without token", M::PUT, "/v1/expected/oa-x", 401),
        scenario("expect body stalls", M::PUT, "/v1/expected/oa-x", 408)
            .bearer(TOKEN_ALL)
            .body("{")
            .raw(100),
        scenario(
            "expect body over 4096 bytes",
            M::PUT,
            "/v1/expected/oa-x",
            413,
        )
        .bearer(TOKEN_ALL)
        .body(format!(r#"{{"timeout_seconds": 60{}}}"#, " ".repeat(5000)))
        .raw_exact(),
        // GET /v1/expected.
        scenario("expectations", M::GET, "/v1/expected", 200).bearer(TOKEN_ALL),
        scenario(
            "overdue expectations",
            M::GET,
            "/v1/expected?overdue=true",
            200,
        )
        .bearer(TOKEN_ALL),
        scenario(
            "overdue is not a boolean",
            M::GET,
            "/v1/expected?overdue=maybe",
            400,
        )
        .bearer(TOKEN_ALL),
        scenario("expectations without token", M::GET, "/v1/expected", 401),
        // DELETE /v1/expected/{controlid}.
        scenario("forget", M::DELETE, "/v1/expected/oa-pending", 204).bearer(TOKEN_ALL),
        scenario("forget again", M::DELETE, "/v1/expected/oa-pending", 404).bearer(TOKEN_ALL),
        scenario(
            "forget, controlid not UTF-8",
            M::DELETE,
            "/v1/expected/%C3%28",
            400,
        )
        .bearer(TOKEN_ALL),
        scenario(
            "forget without token",
            M::DELETE,
            "/v1/expected/oa-pending",
            401,
        ),
        // DELETE /v1/responses/{controlid}.
        scenario("acknowledge", M::DELETE, "/v1/responses/oa-cb", 204).bearer(TOKEN_ALL),
        scenario("acknowledge again", M::DELETE, "/v1/responses/oa-cb", 404).bearer(TOKEN_ALL),
        scenario(
            "acknowledge, controlid not UTF-8",
            M::DELETE,
            "/v1/responses/%FF",
            400,
        )
        .bearer(TOKEN_ALL),
        scenario(
            "acknowledge without token",
            M::DELETE,
            "/v1/responses/oa-raw",
            401,
        ),
        // GET /v1/responses (the feed).
        scenario("feed", M::GET, "/v1/responses", 200).bearer(TOKEN_ALL),
        scenario("feed page", M::GET, "/v1/responses?limit=2", 200).bearer(TOKEN_ALL),
        scenario(
            "feed after the unmatched delivery",
            M::GET,
            format!("/v1/responses?after={}&limit=1000", fx.unmatched_id),
            200,
        )
        .bearer(TOKEN_ALL),
        scenario("feed of a scoped poller", M::GET, "/v1/responses", 200).bearer(TOKEN_SCOPED),
        scenario(
            "feed long-poll times out empty",
            M::GET,
            "/v1/responses?after=7fffffffffffffff&wait=0.2",
            200,
        )
        .bearer(TOKEN_ALL),
        scenario("feed limit 0", M::GET, "/v1/responses?limit=0", 400).bearer(TOKEN_ALL),
        scenario(
            "feed cursor is not a cursor",
            M::GET,
            "/v1/responses?after=xyz",
            400,
        )
        .bearer(TOKEN_ALL),
        scenario("feed without token", M::GET, "/v1/responses", 401),
        // GET /v1/deliveries/{delivery_id}.
        scenario(
            "unmatched delivery raw",
            M::GET,
            format!("/v1/deliveries/{}", fx.unmatched_id),
            200,
        )
        .bearer(TOKEN_ALL),
        scenario(
            "unmatched delivery summary",
            M::GET,
            format!("/v1/deliveries/{}", fx.unmatched_id),
            200,
        )
        .bearer(TOKEN_ALL)
        .json(),
        scenario(
            "delivery If-None-Match",
            M::GET,
            format!("/v1/deliveries/{}", fx.unmatched_id),
            304,
        )
        .bearer(TOKEN_ALL)
        .header("if-none-match", &fx.unmatched_etag),
        scenario(
            "delivery without token",
            M::GET,
            format!("/v1/deliveries/{}", fx.unmatched_id),
            401,
        ),
        scenario(
            "unknown delivery",
            M::GET,
            "/v1/deliveries/7fffffffffffffff",
            404,
        )
        .bearer(TOKEN_ALL),
        scenario("not a delivery id", M::GET, "/v1/deliveries/xyz", 404).bearer(TOKEN_ALL),
        scenario(
            "delivery outside the poller's policies",
            M::GET,
            format!("/v1/deliveries/{}", fx.unmatched_id),
            404,
        )
        .bearer(TOKEN_SCOPED),
        // Service endpoints.
        scenario("liveness", M::GET, "/healthz", 200),
        scenario("readiness", M::GET, "/readyz", 200),
        scenario("metrics", M::GET, "/metrics", 200).bearer(METRICS_TOKEN),
        scenario("metrics without the metrics token", M::GET, "/metrics", 401),
        scenario("metrics with a poller's token", M::GET, "/metrics", 401).bearer(TOKEN_ALL),
    ];
    // 405 on every path, for the methods each does not implement.
    let not_get = [M::GET, M::PUT, M::DELETE, M::PATCH];
    let get_only = [M::POST, M::PUT, M::DELETE, M::PATCH];
    t.extend(not_allowed(&cb, &not_get));
    t.extend(not_allowed(&cb_slash, &not_get));
    t.extend(not_allowed(
        "/v1/responses/oa-raw",
        &[M::POST, M::PUT, M::PATCH],
    ));
    t.extend(not_allowed("/v1/responses", &get_only));
    t.extend(not_allowed(
        &format!("/v1/deliveries/{}", fx.unmatched_id),
        &get_only,
    ));
    t.extend(not_allowed(
        "/v1/expected/oa-raw",
        &[M::GET, M::POST, M::PATCH],
    ));
    t.extend(not_allowed("/v1/expected", &get_only));
    t.extend(not_allowed("/healthz", &get_only));
    t.extend(not_allowed("/readyz", &get_only));
    t.extend(not_allowed("/metrics", &get_only));
    t
}

/// Run while another request holds the only waiting slot (`max_waiting_pollers = 1`): a wait
/// that would have to wait is refused, one that can be answered at once is not.
fn busy_table() -> Vec<Scenario> {
    vec![
        scenario(
            "wait while the slot is taken",
            Method::GET,
            "/v1/responses/oa-never?wait=5",
            503,
        )
        .bearer(TOKEN_ALL),
        scenario(
            "feed wait while the slot is taken",
            Method::GET,
            "/v1/responses?after=7fffffffffffffff&wait=5",
            503,
        )
        .bearer(TOKEN_ALL),
        scenario(
            "wait for what is stored, while the slot is taken",
            Method::GET,
            "/v1/responses/oa-raw?wait=5",
            200,
        )
        .bearer(TOKEN_ALL),
        scenario(
            "feed wait with items there, while the slot is taken",
            Method::GET,
            "/v1/responses?wait=5",
            200,
        )
        .bearer(TOKEN_ALL),
    ]
}

/// Run against a service that allows one failed authentication per minute and target: the
/// first two scenarios fail to authenticate on the API and on the policy, and from then on the
/// address is refused on both, right credentials or not.
fn blocked_table() -> Vec<Scenario> {
    use Method as M;
    let cb = format!("/callback/{POLICY}");
    vec![
        scenario(
            "the one failure allowed on the API",
            M::GET,
            "/v1/responses/oa-x",
            401,
        )
        .bearer(WRONG_TOKEN),
        scenario("the one failure allowed on the policy", M::POST, &cb, 401)
            .header("authorization", basic(USER, "not-the-password"))
            .body(response_doc("oa-blocked", "1")),
        scenario("callback, address blocked", M::POST, &cb, 429)
            .basic()
            .xml()
            .body(response_doc("oa-blocked", "1")),
        scenario(
            "callback, address blocked, trailing slash",
            M::POST,
            format!("{cb}/"),
            429,
        )
        .basic()
        .body(response_doc("oa-blocked", "1")),
        scenario("get, address blocked", M::GET, "/v1/responses/oa-x", 429).bearer(TOKEN_ALL),
        scenario("ack, address blocked", M::DELETE, "/v1/responses/oa-x", 429).bearer(TOKEN_ALL),
        scenario("feed, address blocked", M::GET, "/v1/responses", 429).bearer(TOKEN_ALL),
        scenario(
            "delivery, address blocked",
            M::GET,
            "/v1/deliveries/0000000000000001",
            429,
        )
        .bearer(TOKEN_ALL),
        scenario("expect, address blocked", M::PUT, "/v1/expected/oa-x", 429).bearer(TOKEN_ALL),
        scenario(
            "forget, address blocked",
            M::DELETE,
            "/v1/expected/oa-x",
            429,
        )
        .bearer(TOKEN_ALL),
        scenario("expectations, address blocked", M::GET, "/v1/expected", 429).bearer(TOKEN_ALL),
        scenario("liveness is never blocked", M::GET, "/healthz", 200),
    ]
}

/// Run after the store's writer was stopped: every write fails.
fn closed_store_table() -> Vec<Scenario> {
    let cb = format!("/callback/{POLICY}");
    vec![
        scenario("callback, store closed", Method::POST, &cb, 503)
            .basic()
            .xml()
            .body(response_doc("oa-closed", "1")),
        scenario(
            "callback, store closed, trailing slash",
            Method::POST,
            format!("{cb}/"),
            503,
        )
        .basic()
        .body(response_doc("oa-closed", "2")),
        scenario(
            "expect, store closed",
            Method::PUT,
            "/v1/expected/oa-closed",
            503,
        )
        .bearer(TOKEN_ALL),
        scenario(
            "forget, store closed",
            Method::DELETE,
            "/v1/expected/oa-closed",
            503,
        )
        .bearer(TOKEN_ALL),
        scenario(
            "acknowledge, store closed",
            Method::DELETE,
            "/v1/responses/oa-raw",
            503,
        )
        .bearer(TOKEN_ALL),
        scenario("not ready, store closed", Method::GET, "/readyz", 503),
    ]
}

/// Runs `table`, recording the triples covered and the problems found.
async fn run_table(
    app: &TestApp,
    spec: &Value,
    table: &[Scenario],
    covered: &mut BTreeSet<Triple>,
    failures: &mut Vec<String>,
) {
    for s in table {
        let reply = send(app, s).await;
        let label = format!("[{}] {} {}", s.name, s.method, s.path);
        if reply.status != s.status {
            failures.push(format!(
                "{label}: expected {}, got {}: {:?}",
                s.status,
                reply.status,
                reply.text()
            ));
        }
        let template = match template_for(spec, &s.path) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("{label}: {e}"));
                continue;
            }
        };
        let method = s.method.as_str().to_ascii_lowercase();
        for problem in check_against_spec(spec, &template, &method, &reply) {
            failures.push(format!("{label} -> {}: {problem}", reply.status));
        }
        covered.insert((template, method, reply.status));
    }
}

#[tokio::test]
async fn the_openapi_document_matches_the_server() {
    let spec = load_spec();
    let app = spawn_app_with(|c| {
        c.limits.max_waiting_pollers = 1;
        c.limits.body_read_timeout = Duration::from_secs(1);
        // The 401 scenarios must not get this address blocked: the limiter has its own app.
        c.limits.auth_failure_limit_per_minute = 0;
        c.metrics_token = Some(Credential::Plain(SecretString::new(METRICS_TOKEN)));
    })
    .await;
    let fx = setup(&app).await;
    let mut covered = BTreeSet::new();
    let mut failures = Vec::new();

    run_table(&app, &spec, &main_table(&fx), &mut covered, &mut failures).await;

    // The summaries: every feed item's keys against the Summary schema, and every property the
    // schema lists seen at least once (no phantom fields).
    let feed = app
        .request(
            Method::GET,
            "/v1/responses?limit=1000",
            crate::helpers::headers(&[("authorization", &format!("Bearer {TOKEN_ALL}"))]),
            Bytes::new(),
        )
        .await
        .json();
    let items = feed["items"].as_array().expect("items");
    assert!(items.len() >= 10, "{feed}");
    let mut seen = BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        seen.extend(assert_summary_keys(&spec, item, &format!("feed item {i}")));
    }
    let listed: BTreeSet<String> = spec["components"]["schemas"]["Summary"]["properties"]
        .as_object()
        .expect("properties")
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        seen, listed,
        "Summary properties never served, or served and not listed"
    );
    let summary = app
        .get_response("oa-raw", Some(TOKEN_ALL), true)
        .await
        .json();
    assert_summary_keys(&spec, &summary, "GET /v1/responses/oa-raw");
    assert_eq!(summary["controlid"], "oa-raw");
    assert_eq!(summary["matched"], true);

    // 503 for too many waiters: hold the only slot with a long-poll, then release it with the
    // callback it waits for.
    let holder = {
        let client = app.client.clone();
        tokio::spawn(async move {
            client
                .request(
                    Method::GET,
                    "/v1/responses/oa-held?wait=15",
                    crate::helpers::headers(&[("authorization", &format!("Bearer {TOKEN_ALL}"))]),
                    Bytes::new(),
                )
                .await
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.state.waiters.waiting() < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the long-poll never started waiting"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    run_table(&app, &spec, &busy_table(), &mut covered, &mut failures).await;
    post(&app, response_doc("oa-held", "1")).await;
    let held = holder.await.expect("the held long-poll");
    assert_eq!(
        held.status.as_u16(),
        200,
        "the held long-poll: {}",
        held.text()
    );

    // The planned operations are not served yet: the day they are, this fails, so that their
    // `x-planned` goes and scenarios cover them.
    let (documented, planned) = documented(&spec);
    for (template, method) in &planned {
        assert_eq!(method, "get", "planned {method} {template}");
        let answer = app
            .request(Method::GET, template, HeaderMap::new(), Bytes::new())
            .await;
        assert_eq!(
            answer.status.as_u16(),
            404,
            "{template} is marked x-planned but the server answers {}: document it for real",
            answer.status
        );
    }

    // 429 once an address has failed to authenticate too often.
    let limited = spawn_app_with(|c| c.limits.auth_failure_limit_per_minute = 1).await;
    run_table(
        &limited,
        &spec,
        &blocked_table(),
        &mut covered,
        &mut failures,
    )
    .await;

    // 503 when storage cannot write: stop the store's writer, as a failed disk would.
    app.state.store.close().await.expect("close the store");
    run_table(
        &app,
        &spec,
        &closed_store_table(),
        &mut covered,
        &mut failures,
    )
    .await;

    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Coverage, both ways.
    let untestable: BTreeMap<Triple, &str> = UNTESTABLE
        .iter()
        .map(|(p, m, s, why)| (((*p).to_string(), (*m).to_string(), *s), *why))
        .collect();
    for triple in untestable.keys() {
        assert!(
            documented.contains(triple),
            "UNTESTABLE lists {triple:?}, which the spec does not document"
        );
        assert!(
            !covered.contains(triple),
            "UNTESTABLE lists {triple:?}, but a scenario covers it: drop it from UNTESTABLE"
        );
    }
    let missing: Vec<&Triple> = documented
        .iter()
        .filter(|t| !covered.contains(*t) && !untestable.contains_key(*t))
        .collect();
    assert!(
        missing.is_empty(),
        "documented but neither covered by a scenario nor UNTESTABLE: {missing:#?}"
    );
    // Every covered triple is documented (already checked per scenario; this is the summary).
    let undocumented: Vec<&Triple> = covered.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "served but not documented: {undocumented:#?}"
    );
}
