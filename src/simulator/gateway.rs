//! The gateway's side of one request, without I/O: reading the `<request>` document in one
//! streaming pass, the checks the gateway makes before it accepts a request, and the documents
//! it answers with (control-level failures, the acknowledgement of an asynchronous request, and
//! the full response with one `<result>` per function).
//!
//! Error numbers and texts are the gateway's where the public SDK test suites show them
//! (`XL03000006` for bad sender credentials, an unknown transport policy and a failed sign-in,
//! `XL03000003` for a request that does not parse); the others are the simulator's own, in the
//! same shape.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use quick_xml::errors::Error as QxError;
use quick_xml::escape::{escape, resolve_xml_entity};
use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::reader::Reader;
use quick_xml::XmlVersion;
use rand::distributions::{Alphanumeric, DistString};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use super::config::{FaultRule, Login, Sender, SimConfig};
use crate::auth::SecretString;

/// The largest asynchronous request the gateway accepts, in characters.
pub const MAX_ASYNC_REQUEST_CHARS: usize = 500_000;

/// The longest control-level and function-level controlid, in characters.
pub const MAX_CONTROLID_CHARS: usize = 256;

/// Deepest element nesting read before the request is treated as malformed.
const MAX_DEPTH: usize = 128;

/// Sessions kept at most; beyond that the oldest ones are forgotten.
const MAX_SESSIONS: usize = 10_000;

/// How long a session lasts, as shown in `<sessiontimeout>`.
const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);

/// The control block of a request, as far as it was read.
#[derive(Debug, Clone, Default)]
pub struct RequestControl {
    /// `<senderid>`.
    pub senderid: Option<String>,
    /// `<password>` of the sender.
    pub password: Option<SecretString>,
    /// `<controlid>`.
    pub controlid: Option<String>,
    /// `<uniqueid>`: `true` or `false`.
    pub uniqueid: Option<String>,
    /// `<dtdversion>`: `2.1` or `3.0`.
    pub dtdversion: Option<String>,
    /// `<policyid>`: present (and not empty) for an asynchronous request.
    pub policyid: Option<String>,
    /// `<includewhitespace>`: `true` asks for an indented response.
    pub includewhitespace: Option<String>,
}

impl RequestControl {
    /// Whether the response should be indented.
    fn indent(&self) -> bool {
        self.includewhitespace.as_deref() == Some("true")
    }
}

/// How the operation authenticates.
#[derive(Debug, Clone, Default)]
pub enum RequestAuth {
    /// No `<authentication>` block.
    #[default]
    Missing,
    /// `<login>` with a company user's credentials.
    Login {
        /// `<userid>`.
        userid: String,
        /// `<companyid>`.
        companyid: String,
        /// `<password>`.
        password: SecretString,
        /// `<locationid>`, when given.
        locationid: Option<String>,
    },
    /// `<sessionid>` from an earlier `getAPISession`.
    Session(SecretString),
}

/// One `<function>` of the content block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFunction {
    /// The `controlid` attribute.
    pub controlid: Option<String>,
    /// The name of the first child element: the function, e.g. `readByQuery`.
    pub name: Option<String>,
    /// `<object>` (or an `object` attribute on the function element).
    pub object: Option<String>,
    /// `<keys>`.
    pub keys: Option<String>,
    /// The first child element that is a record (for `create` and `update`), e.g. `VENDOR`.
    pub record: Option<String>,
    /// How many record elements there are.
    pub records: usize,
}

/// The operation block of a request.
#[derive(Debug, Clone, Default)]
pub struct RequestOperation {
    /// `transaction="true"`: one failure rolls the whole operation back.
    pub transaction: bool,
    /// The authentication.
    pub authentication: RequestAuth,
    /// The functions in document order.
    pub functions: Vec<RequestFunction>,
}

/// A request as far as it was read.
#[derive(Debug, Clone, Default)]
pub struct ParsedRequest {
    /// The control block.
    pub control: RequestControl,
    /// The operation block, when there is one.
    pub operation: Option<RequestOperation>,
}

/// A request that cannot be read, with what was read of its control block (for the echo).
#[derive(Debug, Clone)]
pub struct ParseError {
    /// Why, on one line.
    pub reason: String,
    /// What was read of the control block.
    pub control: Box<RequestControl>,
}

/// Turns the request body into text: `xmlrequest=` of a form post or the raw body, UTF-8 or
/// ISO-8859-1 as its declaration says.
pub fn decode_body(body: &[u8], form_encoded: bool) -> Result<String, String> {
    let owned;
    let document: &[u8] = if form_encoded {
        owned = form_field(body, "xmlrequest")
            .ok_or_else(|| "the form has no xmlrequest field".to_string())?;
        &owned
    } else {
        body
    };
    let document = document.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(document);
    match declared_encoding(document).as_deref() {
        None | Some("utf-8" | "utf8" | "us-ascii") => std::str::from_utf8(document)
            .map(str::to_string)
            .map_err(|e| format!("invalid utf-8 at byte {}", e.valid_up_to())),
        Some("iso-8859-1" | "latin1" | "latin-1" | "iso_8859-1") => {
            Ok(document.iter().map(|&b| char::from(b)).collect())
        }
        Some(other) => Err(format!("unsupported encoding {other:?}: send UTF-8")),
    }
}

/// The value of `name` in an `application/x-www-form-urlencoded` body, decoded.
fn form_field(body: &[u8], name: &str) -> Option<Vec<u8>> {
    body.split(|&b| b == b'&').find_map(|pair| {
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &[][..]),
        };
        (form_decode(key) == name.as_bytes()).then(|| form_decode(value))
    })
}

fn form_decode(bytes: &[u8]) -> Vec<u8> {
    let spaced: Vec<u8> = bytes
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_encoding::percent_decode(&spaced).collect()
}

/// The encoding named in the XML declaration, lower-cased.
fn declared_encoding(document: &[u8]) -> Option<String> {
    let rest = document.strip_prefix(b"<?xml")?;
    let end = rest.windows(2).position(|w| w == b"?>")?;
    let decl = std::str::from_utf8(&rest[..end]).ok()?;
    let at = decl.find("encoding")?;
    let value = decl[at + "encoding".len()..]
        .trim_start()
        .strip_prefix('=')?
        .trim_start();
    let quote = value.chars().next().filter(|c| *c == '"' || *c == '\'')?;
    let value = &value[1..];
    let close = value.find(quote)?;
    Some(value[..close].trim().to_ascii_lowercase())
}

/// A text field of the request being collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Control(ControlField),
    SessionId,
    Login(LoginField),
    Object,
    Keys,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ControlField {
    SenderId,
    Password,
    ControlId,
    UniqueId,
    DtdVersion,
    PolicyId,
    IncludeWhitespace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LoginField {
    UserId,
    CompanyId,
    Password,
    LocationId,
}

/// Which field the element at the end of `path` is, if its text is collected.
fn field_at(path: &[String]) -> Option<Field> {
    let names: Vec<&str> = path.iter().map(String::as_str).collect();
    match names.as_slice() {
        ["request", "control", name] => Some(Field::Control(match *name {
            "senderid" => ControlField::SenderId,
            "password" => ControlField::Password,
            "controlid" => ControlField::ControlId,
            "uniqueid" => ControlField::UniqueId,
            "dtdversion" => ControlField::DtdVersion,
            "policyid" => ControlField::PolicyId,
            "includewhitespace" => ControlField::IncludeWhitespace,
            _ => return None,
        })),
        ["request", "operation", "authentication", "sessionid"] => Some(Field::SessionId),
        ["request", "operation", "authentication", "login", name] => {
            Some(Field::Login(match *name {
                "userid" => LoginField::UserId,
                "companyid" => LoginField::CompanyId,
                "password" => LoginField::Password,
                "locationid" => LoginField::LocationId,
                _ => return None,
            }))
        }
        ["request", "operation", "content", "function", _, "object"] => Some(Field::Object),
        ["request", "operation", "content", "function", _, "keys"] => Some(Field::Keys),
        _ => None,
    }
}

/// The state of one pass over a request.
#[derive(Default)]
struct RequestReader {
    out: ParsedRequest,
    path: Vec<String>,
    text: String,
    root_closed: bool,
}

/// Reads a `<request>` document in one streaming pass. A `<!DOCTYPE` is refused; only the
/// predefined entities and character references are decoded.
pub fn parse_request(text: &str) -> Result<ParsedRequest, ParseError> {
    let mut reader = Reader::from_str(text);
    let config = reader.config_mut();
    config.check_end_names = true;
    config.expand_empty_elements = false;
    config.allow_unmatched_ends = false;
    config.allow_dangling_amp = false;
    config.trim_text(false);
    let mut state = RequestReader::default();
    match state.run(&mut reader) {
        Ok(()) => Ok(state.out),
        Err(reason) => Err(ParseError {
            reason,
            control: Box::new(state.out.control),
        }),
    }
}

impl RequestReader {
    fn run(&mut self, reader: &mut Reader<&[u8]>) -> Result<(), String> {
        loop {
            let event = reader.read_event().map_err(|e| describe(&e, reader))?;
            match event {
                Event::DocType(_) => {
                    return Err("document type declarations are not accepted".into())
                }
                Event::Start(start) => self.open(&start)?,
                Event::Empty(start) => {
                    self.open(&start)?;
                    self.close();
                }
                Event::End(_) => self.close(),
                Event::Text(text) => {
                    let content = text.xml10_content();
                    if self.path.is_empty() {
                        if !content.trim_matches(is_xml_space).is_empty() {
                            return Err("text outside the root element".into());
                        }
                    } else {
                        self.text.push_str(&content);
                    }
                }
                Event::CData(cdata) => {
                    if self.path.is_empty() {
                        return Err("CDATA outside the root element".into());
                    }
                    self.text.push_str(&cdata.xml10_content());
                }
                Event::GeneralRef(reference) => {
                    if self.path.is_empty() {
                        return Err("reference outside the root element".into());
                    }
                    resolve_reference(&reference, &mut self.text)?;
                }
                Event::Decl(_) | Event::Comment(_) | Event::PI(_) => {}
                Event::Eof => {
                    return if self.root_closed {
                        Ok(())
                    } else if self.path.is_empty() {
                        Err("no <request> element".into())
                    } else {
                        Err(format!(
                            "unexpected end of the document inside <{}>",
                            self.path.last().map(String::as_str).unwrap_or("request")
                        ))
                    };
                }
            }
        }
    }

    fn open(&mut self, start: &BytesStart<'_>) -> Result<(), String> {
        let local = start.local_name().into_inner().to_string();
        if self.path.is_empty() {
            if self.root_closed {
                return Err("a second root element".into());
            }
            if local != "request" {
                return Err(format!(
                    "root element is <{}>, expected <request>",
                    shorten(&local)
                ));
            }
        }
        if self.path.len() >= MAX_DEPTH {
            return Err(format!("elements nested deeper than {MAX_DEPTH} levels"));
        }
        self.path.push(local);
        self.text.clear();
        let names: Vec<&str> = self.path.iter().map(String::as_str).collect();
        match names.as_slice() {
            ["request", "operation"] => {
                let transaction = attribute(start, "transaction")?;
                self.out.operation = Some(RequestOperation {
                    transaction: transaction.as_deref() == Some("true"),
                    ..RequestOperation::default()
                });
            }
            ["request", "operation", "authentication", "login"] => {
                if let Some(op) = self.out.operation.as_mut() {
                    op.authentication = RequestAuth::Login {
                        userid: String::new(),
                        companyid: String::new(),
                        password: SecretString::default(),
                        locationid: None,
                    };
                }
            }
            ["request", "operation", "content", "function"] => {
                let controlid = attribute(start, "controlid")?;
                if let Some(op) = self.out.operation.as_mut() {
                    op.functions.push(RequestFunction {
                        controlid,
                        ..RequestFunction::default()
                    });
                }
            }
            ["request", "operation", "content", "function", name] => {
                let name = name.to_string();
                let object = attribute(start, "object")?;
                if let Some(function) = self.current_function() {
                    if function.name.is_none() {
                        function.name = Some(name);
                        function.object = object;
                    }
                }
            }
            ["request", "operation", "content", "function", _, child]
                if !matches!(*child, "object" | "keys" | "fields" | "query" | "pagesize") =>
            {
                let child = child.to_string();
                if let Some(function) = self.current_function() {
                    function.records += 1;
                    function.record.get_or_insert(child);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn current_function(&mut self) -> Option<&mut RequestFunction> {
        self.out
            .operation
            .as_mut()
            .and_then(|op| op.functions.last_mut())
    }

    fn close(&mut self) {
        if let Some(field) = field_at(&self.path) {
            let raw = std::mem::take(&mut self.text);
            let trimmed = raw.trim_matches(is_xml_space).to_string();
            let control = &mut self.out.control;
            match field {
                Field::Control(f) => match f {
                    ControlField::SenderId => control.senderid = Some(trimmed),
                    ControlField::Password => control.password = Some(raw.into()),
                    ControlField::ControlId => control.controlid = Some(trimmed),
                    ControlField::UniqueId => control.uniqueid = Some(trimmed),
                    ControlField::DtdVersion => control.dtdversion = Some(trimmed),
                    ControlField::PolicyId => {
                        control.policyid = (!trimmed.is_empty()).then_some(trimmed)
                    }
                    ControlField::IncludeWhitespace => control.includewhitespace = Some(trimmed),
                },
                Field::SessionId => {
                    if let Some(op) = self.out.operation.as_mut() {
                        op.authentication = RequestAuth::Session(trimmed.into());
                    }
                }
                Field::Login(f) => {
                    if let Some(RequestAuth::Login {
                        userid,
                        companyid,
                        password,
                        locationid,
                    }) = self.out.operation.as_mut().map(|op| &mut op.authentication)
                    {
                        match f {
                            LoginField::UserId => *userid = trimmed,
                            LoginField::CompanyId => *companyid = trimmed,
                            LoginField::Password => *password = raw.into(),
                            LoginField::LocationId => *locationid = Some(trimmed),
                        }
                    }
                }
                Field::Object => {
                    if let Some(function) = self.current_function() {
                        function.object = Some(trimmed);
                    }
                }
                Field::Keys => {
                    if let Some(function) = self.current_function() {
                        function.keys = Some(trimmed);
                    }
                }
            }
        }
        self.text.clear();
        self.path.pop();
        if self.path.is_empty() {
            self.root_closed = true;
        }
    }
}

/// The value of attribute `name`, entities decoded.
fn attribute(start: &BytesStart<'_>, name: &str) -> Result<Option<String>, String> {
    for attribute in start.attributes().take(64) {
        let attribute = attribute.map_err(|e| format!("invalid attribute: {e}"))?;
        if attribute.key.local_name().into_inner() == name {
            let value = attribute
                .normalized_value(XmlVersion::Implicit1_0)
                .map_err(|e| format!("invalid attribute value: {e}"))?;
            return Ok(Some(value.trim_matches(is_xml_space).to_string()));
        }
    }
    Ok(None)
}

/// Appends the replacement of `&name;` or `&#n;`; only the predefined entities are known.
fn resolve_reference(reference: &BytesRef<'_>, out: &mut String) -> Result<(), String> {
    if reference.is_char_ref() {
        match reference.resolve_char_ref() {
            Ok(Some(c)) => {
                out.push(c);
                Ok(())
            }
            _ => Err(format!(
                "invalid character reference &{};",
                shorten(reference)
            )),
        }
    } else {
        let text = resolve_xml_entity(reference)
            .ok_or_else(|| format!("unknown entity &{};", shorten(reference)))?;
        out.push_str(text);
        Ok(())
    }
}

fn describe(error: &QxError, reader: &Reader<&[u8]>) -> String {
    let what = error.to_string().to_lowercase();
    let line: String = what
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("{line} at byte {}", reader.error_position())
}

fn is_xml_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Request-controlled text quoted in a message: at most 64 characters, on one line.
fn shorten(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(64)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > 64 {
        out.push_str("...");
    }
    out
}

/// Whether `name` can be used as an element name in a response.
fn is_xml_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

// ---------------------------------------------------------------------------------------------
// Responses.

/// An `<error>` of an `<errormessage>` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    /// `<errorno>`.
    pub errorno: String,
    /// `<description>`.
    pub description: String,
    /// `<description2>`.
    pub description2: String,
    /// `<correction>`.
    pub correction: String,
}

impl GatewayError {
    fn new(errorno: &str, description: &str, description2: &str, correction: &str) -> Self {
        Self {
            errorno: errorno.into(),
            description: description.into(),
            description2: description2.into(),
            correction: correction.into(),
        }
    }

    /// A request that does not parse or does not follow the DTD.
    fn schema(why: &str) -> Self {
        Self::new(
            "XL03000003",
            "",
            &format!("XML Parse schema error: {why}"),
            "",
        )
    }
}

/// A small XML writer: escaped text and attributes, indented when the request asked for white
/// space (`<includewhitespace>true`), compact otherwise.
struct XmlOut {
    buf: String,
    indent: bool,
    depth: usize,
    /// Whether the root element was started (white space goes only between elements).
    started: bool,
}

impl XmlOut {
    fn new(indent: bool) -> Self {
        Self {
            buf: String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"),
            indent,
            depth: 0,
            started: false,
        }
    }

    fn newline(&mut self) {
        if !self.started {
            self.started = true;
        } else if self.indent {
            self.buf.push('\n');
            for _ in 0..self.depth {
                self.buf.push_str("    ");
            }
        }
    }

    fn tag(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.buf.push('<');
        self.buf.push_str(name);
        for (key, value) in attrs {
            self.buf.push(' ');
            self.buf.push_str(key);
            self.buf.push_str("=\"");
            self.buf.push_str(&escape(*value));
            self.buf.push('"');
        }
    }

    /// Opens an element that will hold other elements.
    fn open(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.newline();
        self.tag(name, attrs);
        self.buf.push('>');
        self.depth += 1;
    }

    fn close(&mut self, name: &str) {
        self.depth = self.depth.saturating_sub(1);
        self.newline();
        self.buf.push_str("</");
        self.buf.push_str(name);
        self.buf.push('>');
    }

    /// `<name>text</name>`, also when the text is empty (as the gateway writes it).
    fn leaf(&mut self, name: &str, text: &str) {
        self.newline();
        self.tag(name, &[]);
        self.buf.push('>');
        self.buf.push_str(&escape(text));
        self.buf.push_str("</");
        self.buf.push_str(name);
        self.buf.push('>');
    }

    /// `<name attrs/>`.
    fn empty(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.newline();
        self.tag(name, attrs);
        self.buf.push_str("/>");
    }

    fn finish(mut self) -> String {
        self.buf.push('\n');
        self.buf
    }
}

/// The `<control>` echo of a request.
fn write_control(x: &mut XmlOut, status: &str, control: &RequestControl) {
    x.open("control", &[]);
    x.leaf("status", status);
    x.leaf("senderid", control.senderid.as_deref().unwrap_or(""));
    x.leaf("controlid", control.controlid.as_deref().unwrap_or(""));
    x.leaf("uniqueid", control.uniqueid.as_deref().unwrap_or("false"));
    x.leaf("dtdversion", control.dtdversion.as_deref().unwrap_or("3.0"));
    x.close("control");
}

fn write_errors(x: &mut XmlOut, errors: &[GatewayError]) {
    x.open("errormessage", &[]);
    for e in errors {
        x.open("error", &[]);
        x.leaf("errorno", &e.errorno);
        x.leaf("description", &e.description);
        x.leaf("description2", &e.description2);
        x.leaf("correction", &e.correction);
        x.close("error");
    }
    x.close("errormessage");
}

/// A control-level failure: `<control>` with status `failure` and the errors directly under
/// `<response>`, no operation block.
pub fn control_failure(control: &RequestControl, errors: &[GatewayError]) -> String {
    let mut x = XmlOut::new(control.indent());
    x.open("response", &[]);
    write_control(&mut x, "failure", control);
    write_errors(&mut x, errors);
    x.close("response");
    x.finish()
}

/// The acknowledgement of an accepted asynchronous request, as the gateway documents it.
pub fn acknowledgement(control: &RequestControl) -> String {
    let mut x = XmlOut::new(control.indent());
    x.open("response", &[]);
    x.open("acknowledgement", &[]);
    x.leaf("status", "success");
    x.close("acknowledgement");
    write_control(&mut x, "success", control);
    x.close("response");
    x.finish()
}

/// A signed-in company user.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    userid: String,
    companyid: String,
    locationid: String,
}

/// A failed sign-in: what the authentication block echoes, and the error.
#[derive(Debug)]
struct SignInFailure {
    userid: String,
    companyid: String,
    error: GatewayError,
}

/// The faults that apply to one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedFaults {
    /// Function names (or `*`) whose results fail.
    pub fail_functions: Vec<String>,
    /// Extra deliveries.
    pub duplicate: u32,
    /// Extra pause before the delivery.
    pub extra_delay: Duration,
    /// Whether the body is cut off.
    pub malformed: bool,
}

impl AppliedFaults {
    /// Adds up the rules that match `controlid`.
    pub fn for_controlid(rules: &[FaultRule], controlid: &str) -> Self {
        let mut applied = Self::default();
        for rule in rules.iter().filter(|r| r.matches(controlid)) {
            applied
                .fail_functions
                .extend(rule.fail_functions.iter().cloned());
            applied.duplicate = applied.duplicate.saturating_add(rule.duplicate);
            applied.extra_delay += rule.extra_delay;
            applied.malformed |= rule.malformed;
        }
        applied
    }

    fn fails(&self, function: &str) -> bool {
        self.fail_functions
            .iter()
            .any(|f| f == "*" || f == function)
    }
}

/// A response to post to a policy's Response URL.
#[derive(Debug, Clone)]
pub struct QueuedResponse {
    /// The policy.
    pub policy: String,
    /// The control-level controlid (for logs).
    pub controlid: String,
    /// The full response document.
    pub body: String,
    /// Extra deliveries of the same body.
    pub duplicate: u32,
    /// Extra pause before the delivery.
    pub extra_delay: Duration,
}

/// What to do with a request.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Answer with this document; nothing is delivered later.
    Answer {
        /// The response document.
        body: String,
        /// A word for the log line: `response` or `failure`.
        kind: &'static str,
        /// The controlid, for the log line.
        controlid: String,
    },
    /// Answer with the acknowledgement and deliver the response later.
    Queued {
        /// The acknowledgement document.
        ack: String,
        /// What to deliver.
        response: QueuedResponse,
    },
}

/// The simulated gateway: senders, company users, policies, fault rules and open sessions.
#[derive(Debug)]
pub struct Gateway {
    senders: Vec<Sender>,
    logins: Vec<Login>,
    policies: Vec<String>,
    faults: Vec<FaultRule>,
    sessions: Mutex<HashMap<String, Session>>,
    next_record: AtomicU64,
}

impl Gateway {
    /// The gateway of a configuration.
    pub fn new(config: &SimConfig) -> Self {
        Self {
            senders: config.senders.clone(),
            logins: config.logins.clone(),
            policies: config.policies.iter().map(|p| p.id.clone()).collect(),
            faults: config.faults.clone(),
            sessions: Mutex::new(HashMap::new()),
            next_record: AtomicU64::new(1000),
        }
    }

    /// Handles one request body. `endpoint` is the URL the request was sent to (it is what
    /// `getAPISession` returns); `now` stamps the session times.
    pub fn handle(
        &self,
        body: &[u8],
        form_encoded: bool,
        endpoint: &str,
        now: OffsetDateTime,
    ) -> Outcome {
        let failure = |control: &RequestControl, error: GatewayError| Outcome::Answer {
            body: control_failure(control, &[error]),
            kind: "failure",
            controlid: control.controlid.clone().unwrap_or_default(),
        };
        let text = match decode_body(body, form_encoded) {
            Ok(text) => text,
            Err(why) => return failure(&RequestControl::default(), GatewayError::schema(&why)),
        };
        let request = match parse_request(&text) {
            Ok(request) => request,
            Err(e) => return failure(&e.control, GatewayError::schema(&e.reason)),
        };
        let control = &request.control;
        if let Err(why) = check_schema(&request) {
            return failure(control, GatewayError::schema(&why));
        }
        if !self.sender_ok(control) {
            return failure(
                control,
                GatewayError::new(
                    "XL03000006",
                    "",
                    "Incorrect Intacct XML Partner ID or password.",
                    "",
                ),
            );
        }
        let controlid = control.controlid.clone().unwrap_or_default();
        let faults = AppliedFaults::for_controlid(&self.faults, &controlid);
        let Some(policy) = control.policyid.clone() else {
            let body = self.full_response(&request, &faults, endpoint, now);
            return Outcome::Answer {
                body,
                kind: "response",
                controlid,
            };
        };
        if !self.policies.contains(&policy) {
            return failure(
                control,
                GatewayError::new(
                    "XL03000006",
                    "",
                    &format!("{policy} is not a valid transport policy."),
                    "",
                ),
            );
        }
        let chars = text.chars().count();
        if chars > MAX_ASYNC_REQUEST_CHARS {
            return failure(
                control,
                GatewayError::new(
                    "XL03000003",
                    "Request too large",
                    &format!(
                        "The asynchronous request has {chars} characters; the limit is {MAX_ASYNC_REQUEST_CHARS}."
                    ),
                    "Split the request into smaller ones.",
                ),
            );
        }
        Outcome::Queued {
            ack: acknowledgement(control),
            response: QueuedResponse {
                policy,
                body: self.full_response(&request, &faults, endpoint, now),
                controlid,
                duplicate: faults.duplicate,
                extra_delay: faults.extra_delay,
            },
        }
    }

    fn sender_ok(&self, control: &RequestControl) -> bool {
        let (Some(id), Some(password)) = (&control.senderid, &control.password) else {
            return false;
        };
        self.senders.iter().any(|s| {
            s.id == *id
                && bool::from(
                    s.password
                        .expose()
                        .as_bytes()
                        .ct_eq(password.expose().as_bytes()),
                )
        })
    }

    /// Signs in: the session of a valid login or known session id, or the failure.
    fn sign_in(&self, auth: &RequestAuth) -> Result<Session, Box<SignInFailure>> {
        let bad_sign_in =
            || GatewayError::new("XL03000006", "", "Sign-in information is incorrect", "");
        match auth {
            RequestAuth::Login {
                userid,
                companyid,
                password,
                locationid,
            } => {
                let found = self.logins.iter().find(|l| {
                    l.company.eq_ignore_ascii_case(companyid)
                        && l.user.eq_ignore_ascii_case(userid)
                        && bool::from(
                            l.password
                                .expose()
                                .as_bytes()
                                .ct_eq(password.expose().as_bytes()),
                        )
                });
                match found {
                    Some(login) => Ok(Session {
                        userid: login.user.clone(),
                        companyid: login.company.clone(),
                        locationid: locationid.clone().unwrap_or_default(),
                    }),
                    None => Err(Box::new(SignInFailure {
                        userid: userid.clone(),
                        companyid: companyid.clone(),
                        error: bad_sign_in(),
                    })),
                }
            }
            RequestAuth::Session(id) => {
                let sessions = match self.sessions.lock() {
                    Ok(guard) => guard,
                    Err(poisoned) => poisoned.into_inner(),
                };
                sessions.get(id.expose()).cloned().ok_or_else(|| {
                    Box::new(SignInFailure {
                        userid: String::new(),
                        companyid: String::new(),
                        error: GatewayError::new(
                            "XL03000006",
                            "",
                            "Invalid session: sign in again (the simulator forgets sessions when it restarts)",
                            "",
                        ),
                    })
                })
            }
            RequestAuth::Missing => Err(Box::new(SignInFailure {
                userid: String::new(),
                companyid: String::new(),
                error: bad_sign_in(),
            })),
        }
    }

    fn new_session(&self, session: &Session) -> String {
        let id = format!(
            "{}..",
            Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
        );
        let mut sessions = match self.sessions.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if sessions.len() >= MAX_SESSIONS {
            sessions.clear();
        }
        sessions.insert(id.clone(), session.clone());
        id
    }

    fn record_number(&self) -> String {
        self.next_record.fetch_add(1, Ordering::Relaxed).to_string()
    }

    /// The full response: the control echo, the authentication block, and one `<result>` per
    /// function (or the sign-in failure).
    fn full_response(
        &self,
        request: &ParsedRequest,
        faults: &AppliedFaults,
        endpoint: &str,
        now: OffsetDateTime,
    ) -> String {
        let control = &request.control;
        let default_operation = RequestOperation::default();
        let operation = request.operation.as_ref().unwrap_or(&default_operation);
        let mut x = XmlOut::new(control.indent());
        x.open("response", &[]);
        write_control(&mut x, "success", control);
        x.open("operation", &[]);
        match self.sign_in(&operation.authentication) {
            Err(failure) => {
                let SignInFailure {
                    userid,
                    companyid,
                    error,
                } = *failure;
                x.open("authentication", &[]);
                x.leaf("status", "failure");
                x.leaf("userid", &userid);
                x.leaf("companyid", &companyid);
                x.close("authentication");
                write_errors(&mut x, &[error]);
            }
            Ok(session) => {
                x.open("authentication", &[]);
                x.leaf("status", "success");
                x.leaf("userid", &session.userid);
                x.leaf("companyid", &session.companyid);
                x.leaf("locationid", &session.locationid);
                x.leaf("sessiontimestamp", &timestamp(now));
                x.leaf("sessiontimeout", &timestamp(now + SESSION_LIFETIME));
                x.close("authentication");
                let failing: Vec<bool> = operation
                    .functions
                    .iter()
                    .map(|f| faults.fails(f.name.as_deref().unwrap_or("")))
                    .collect();
                let rolled_back = operation.transaction && failing.iter().any(|&f| f);
                for (function, &fails) in operation.functions.iter().zip(&failing) {
                    let status = if fails {
                        Status::Failure
                    } else if rolled_back {
                        Status::Aborted
                    } else {
                        Status::Success
                    };
                    self.write_result(&mut x, function, status, &session, endpoint);
                }
            }
        }
        x.close("operation");
        x.close("response");
        let body = x.finish();
        if faults.malformed {
            cut_off(&body)
        } else {
            body
        }
    }

    fn write_result(
        &self,
        x: &mut XmlOut,
        function: &RequestFunction,
        status: Status,
        session: &Session,
        endpoint: &str,
    ) {
        let name = function.name.as_deref().unwrap_or("");
        x.open("result", &[]);
        x.leaf("status", status.as_str());
        x.leaf("function", name);
        x.leaf("controlid", function.controlid.as_deref().unwrap_or(""));
        match status {
            Status::Success => self.write_data(x, function, session, endpoint),
            Status::Failure => write_errors(x, &function_errors(function)),
            Status::Aborted => write_errors(
                x,
                &[GatewayError::new(
                    "XL03000009",
                    "",
                    "The entire transaction in this operation has been rolled back due to an error.",
                    "",
                )],
            ),
        }
        x.close("result");
    }

    /// A small `<data>` (or `<key>`) appropriate to the function.
    fn write_data(
        &self,
        x: &mut XmlOut,
        function: &RequestFunction,
        session: &Session,
        endpoint: &str,
    ) {
        let name = function.name.as_deref().unwrap_or("");
        let object = function.object.as_deref().unwrap_or("");
        let element = |object: &str| {
            if is_xml_name(object) {
                object.to_string()
            } else {
                "record".to_string()
            }
        };
        match name {
            "readByQuery" | "readMore" | "readView" | "get_list" => {
                let listtype = object.to_lowercase();
                x.empty(
                    "data",
                    &[
                        ("listtype", listtype.as_str()),
                        ("count", "0"),
                        ("totalcount", "0"),
                        ("numremaining", "0"),
                        ("resultId", ""),
                    ],
                );
            }
            "read" | "readByName" => {
                let keys: Vec<&str> = function
                    .keys
                    .as_deref()
                    .unwrap_or("")
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .collect();
                let count = keys.len().to_string();
                let field = if name == "read" { "RECORDNO" } else { "NAME" };
                let tag = element(object);
                x.open("data", &[("listtype", object), ("count", &count)]);
                for key in keys {
                    x.open(&tag, &[]);
                    x.leaf(field, key);
                    x.close(&tag);
                }
                x.close("data");
            }
            "create" | "update" => {
                let count = function.records.to_string();
                let tag = element(&function.record.as_deref().unwrap_or("").to_lowercase());
                x.open("data", &[("listtype", "objects"), ("count", &count)]);
                for _ in 0..function.records {
                    x.open(&tag, &[]);
                    x.leaf("RECORDNO", &self.record_number());
                    x.close(&tag);
                }
                x.close("data");
            }
            "getAPISession" => {
                let sessionid = self.new_session(session);
                x.open("data", &[]);
                x.open("api", &[]);
                x.leaf("sessionid", &sessionid);
                x.leaf("endpoint", endpoint);
                x.leaf("locationid", &session.locationid);
                x.close("api");
                x.close("data");
            }
            "inspect" | "lookup" => {
                x.empty("data", &[("listtype", "All"), ("count", "0")]);
            }
            legacy if legacy.starts_with("create_") || legacy.starts_with("update_") => {
                x.leaf("key", &self.record_number());
            }
            _ => {}
        }
    }
}

/// The status of one result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Success,
    Failure,
    Aborted,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Failure => "failure",
            Status::Aborted => "aborted",
        }
    }
}

/// The errors of an injected function failure, in the gateway's words where they are known.
fn function_errors(function: &RequestFunction) -> Vec<GatewayError> {
    let name = function.name.as_deref().unwrap_or("function");
    let object = function
        .record
        .as_deref()
        .or(function.object.as_deref())
        .unwrap_or("record")
        .to_string();
    let pretty = {
        let lower = object.to_lowercase();
        let mut chars = lower.chars();
        match chars.next() {
            Some(first) => first.to_uppercase().chain(chars).collect::<String>(),
            None => lower,
        }
    };
    match name {
        "create" => vec![
            GatewayError::new(
                "BL34000061",
                "",
                &format!("Another {pretty} with the given value(s)  already exists"),
                "Use a unique value instead.",
            ),
            GatewayError::new(
                "BL01001973",
                "",
                &format!("Could not create {} record!", object.to_lowercase()),
                "",
            ),
        ],
        "update" | "delete" => vec![GatewayError::new(
            "BL01001973",
            "",
            &format!("Could not {name} {} record!", object.to_lowercase()),
            "",
        )],
        _ => vec![GatewayError::new(
            "DL02000001",
            "",
            &format!("There was an error processing the {name} request (fault injected by the simulator)."),
            "",
        )],
    }
}

/// `2018-11-24T15:29:48+00:00`, the gateway's session time format.
fn timestamp(t: OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second][offset_hour sign:mandatory]:[offset_minute]"
    );
    t.format(&format).unwrap_or_default()
}

/// A malformed copy of a response: cut off halfway between the end of its control block and
/// its end, so that the control-level controlid can still be read.
pub fn cut_off(body: &str) -> String {
    let after_control = body
        .find("</control>")
        .map_or(body.len() / 2, |at| at + "</control>".len());
    let mut cut = after_control + (body.len().saturating_sub(after_control)) / 2;
    while cut > 0 && !body.is_char_boundary(cut) {
        cut -= 1;
    }
    body[..cut.min(body.len())].to_string()
}

/// The checks the gateway makes against its DTD before anything else.
fn check_schema(request: &ParsedRequest) -> Result<(), String> {
    let control = &request.control;
    let controlid = control.controlid.as_deref().unwrap_or("");
    let chars = controlid.chars().count();
    if !(1..=MAX_CONTROLID_CHARS).contains(&chars) {
        return Err(format!(
            "<control><controlid> must be 1 to {MAX_CONTROLID_CHARS} characters, not {chars}"
        ));
    }
    match control.dtdversion.as_deref() {
        Some("2.1" | "3.0") => {}
        Some(other) => {
            return Err(format!(
                "<dtdversion> must be 2.1 or 3.0, not {:?}",
                shorten(other)
            ))
        }
        None => return Err("<control> has no <dtdversion>".into()),
    }
    if let Some(other) = control
        .uniqueid
        .as_deref()
        .filter(|v| !matches!(*v, "true" | "false"))
    {
        return Err(format!(
            "<uniqueid> must be true or false, not {:?}",
            shorten(other)
        ));
    }
    if let Some(other) = control
        .includewhitespace
        .as_deref()
        .filter(|v| !matches!(*v, "true" | "false"))
    {
        return Err(format!(
            "<includewhitespace> must be true or false, not {:?}",
            shorten(other)
        ));
    }
    let Some(operation) = &request.operation else {
        return Err("<request> has no <operation>".into());
    };
    if matches!(operation.authentication, RequestAuth::Missing) {
        return Err("<operation> has no <authentication> with <login> or <sessionid>".into());
    }
    if operation.functions.is_empty() {
        return Err("<content> has no <function>".into());
    }
    for function in &operation.functions {
        if function.name.is_none() {
            return Err("a <function> is empty".into());
        }
        let chars = function.controlid.as_deref().unwrap_or("").chars().count();
        if !(1..=MAX_CONTROLID_CHARS).contains(&chars) {
            return Err(format!(
                "<function controlid=\"...\"> must be 1 to {MAX_CONTROLID_CHARS} characters, not {chars}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::extract;
    use std::path::Path;

    const CONFIG: &str = r#"
[tls]
cert = "c"
key = "k"
[[sender]]
id = "test_sender"
password = "sender-pass"
[[login]]
company = "ACME"
user = "xml_gateway"
password = "user-pass"
[[policy]]
id = "dev"
response_url = "https://localhost:8443/callback/dev"
[[fault]]
controlid_prefix = "fail-"
fail_functions = ["create"]
[[fault]]
controlid_prefix = "broken-"
malformed = true
duplicate = 1
extra_delay_ms = 5
[[fault]]
controlid_prefix = "broken-"
duplicate = 2
"#;

    fn gateway() -> Gateway {
        let config = SimConfig::from_toml(CONFIG, "t", Path::new("/")).expect("config");
        Gateway::new(&config)
    }

    fn request(control_extra: &str, functions: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<request><control><senderid>test_sender</senderid>\
             <password>sender-pass</password><controlid>req-1</controlid><uniqueid>false</uniqueid>\
             <dtdversion>3.0</dtdversion>{control_extra}</control><operation transaction=\"false\">\
             <authentication><login><userid>xml_gateway</userid><companyid>acme</companyid>\
             <password>user-pass</password></login></authentication><content>{functions}</content>\
             </operation></request>"
        )
    }

    const READ_BY_QUERY: &str = "<function controlid=\"f-1\"><readByQuery><object>VENDOR</object>\
        <fields>*</fields><query/><pagesize>100</pagesize></readByQuery></function>";

    fn answer(outcome: Outcome) -> String {
        match outcome {
            Outcome::Answer { body, .. } => body,
            Outcome::Queued { .. } => panic!("queued"),
        }
    }

    fn handle(gw: &Gateway, body: &str) -> Outcome {
        gw.handle(
            body.as_bytes(),
            false,
            "https://localhost:9443/ia/xml/xmlgw.phtml",
            OffsetDateTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn requests_are_read_field_by_field() {
        let text = request(
            "<policyid>dev</policyid><includewhitespace>true</includewhitespace>",
            "<function controlid=\"a&amp;b\"><create><VENDOR><VENDORID>V1</VENDORID></VENDOR>\
             <VENDOR><VENDORID>V2</VENDORID></VENDOR></create></function>\
             <function controlid=\"r\"><read><object>VENDOR</object><keys>1, 2</keys></read></function>",
        );
        let parsed = parse_request(&text).expect("parses");
        let c = &parsed.control;
        assert_eq!(c.senderid.as_deref(), Some("test_sender"));
        assert_eq!(c.password.as_ref().map(|p| p.expose()), Some("sender-pass"));
        assert_eq!(c.policyid.as_deref(), Some("dev"));
        assert!(c.indent());
        let op = parsed.operation.expect("operation");
        assert!(!op.transaction);
        assert!(
            matches!(op.authentication, RequestAuth::Login { ref companyid, .. } if companyid == "acme")
        );
        assert_eq!(op.functions.len(), 2);
        assert_eq!(op.functions[0].controlid.as_deref(), Some("a&b"));
        assert_eq!(op.functions[0].name.as_deref(), Some("create"));
        assert_eq!(op.functions[0].record.as_deref(), Some("VENDOR"));
        assert_eq!(op.functions[0].records, 2);
        assert_eq!(op.functions[1].keys.as_deref(), Some("1, 2"));
        assert_eq!(op.functions[1].object.as_deref(), Some("VENDOR"));
    }

    #[test]
    fn a_synchronous_request_gets_a_result_per_function() {
        let gw = gateway();
        let body = answer(handle(
            &gw,
            &request(
                "",
                &format!(
                    "{READ_BY_QUERY}<function controlid=\"f-2\"><create><VENDOR><VENDORID>V</VENDORID>\
                     </VENDOR></create></function><function controlid=\"f-3\"><getAPISession/></function>"
                ),
            ),
        ));
        let x = extract(body.as_bytes()).expect("well-formed response");
        assert!(x.well_formed);
        assert_eq!(x.controlid.as_deref(), Some("req-1"));
        let auth = x.authentication.expect("authentication");
        assert_eq!(auth.status.as_deref(), Some("success"));
        assert_eq!(auth.companyid.as_deref(), Some("ACME"));
        assert_eq!(
            auth.sessiontimestamp.as_deref(),
            Some("1970-01-01T00:00:00+00:00")
        );
        assert_eq!(x.results.len(), 3);
        let data = x.results[0].data.as_ref().expect("data");
        assert_eq!(data.listtype.as_deref(), Some("vendor"));
        assert_eq!(data.count.as_deref(), Some("0"));
        assert_eq!(data.totalcount.as_deref(), Some("0"));
        assert_eq!(data.numremaining.as_deref(), Some("0"));
        assert_eq!(
            x.results[1]
                .data
                .as_ref()
                .and_then(|d| d.listtype.as_deref()),
            Some("objects")
        );
        assert!(body.contains("<vendor><RECORDNO>"), "{body}");
        assert!(body.contains("<endpoint>https://localhost:9443/ia/xml/xmlgw.phtml</endpoint>"));
        for (result, cid) in x.results.iter().zip(["f-1", "f-2", "f-3"]) {
            assert_eq!(result.controlid.as_deref(), Some(cid));
            assert_eq!(result.status.as_deref(), Some("success"));
        }
        assert!(
            !body.contains("\n  "),
            "compact unless includewhitespace: {body}"
        );
    }

    #[test]
    fn sessions_from_get_api_session_sign_in() {
        let gw = gateway();
        let body = answer(handle(
            &gw,
            &request("", "<function controlid=\"s\"><getAPISession/></function>"),
        ));
        let start = body.find("<sessionid>").expect("sessionid") + "<sessionid>".len();
        let end = body.find("</sessionid>").expect("end");
        let session = &body[start..end];
        let with_session = request("", READ_BY_QUERY).replace(
            "<login><userid>xml_gateway</userid><companyid>acme</companyid><password>user-pass</password></login>",
            &format!("<sessionid>{session}</sessionid>"),
        );
        let x = extract(answer(handle(&gw, &with_session)).as_bytes()).expect("response");
        let auth = x.authentication.expect("authentication");
        assert_eq!(auth.status.as_deref(), Some("success"));
        assert_eq!(auth.userid.as_deref(), Some("xml_gateway"));
        let unknown = with_session.replace(session, "nope..");
        let x = extract(answer(handle(&gw, &unknown)).as_bytes()).expect("response");
        assert_eq!(
            x.authentication.and_then(|a| a.status).as_deref(),
            Some("failure")
        );
        assert!(x.results.is_empty());
    }

    #[test]
    fn a_wrong_login_is_an_authentication_failure() {
        let gw = gateway();
        let text = request("", READ_BY_QUERY).replace("user-pass", "wrong");
        let x = extract(answer(handle(&gw, &text)).as_bytes()).expect("response");
        assert_eq!(x.control.and_then(|c| c.status).as_deref(), Some("success"));
        let auth = x.authentication.expect("authentication");
        assert_eq!(auth.status.as_deref(), Some("failure"));
        assert_eq!(auth.userid.as_deref(), Some("xml_gateway"));
        assert!(x.results.is_empty());
        assert_eq!(x.errors[0].errorno.as_deref(), Some("XL03000006"));
        assert_eq!(
            x.errors[0].description2.as_deref(),
            Some("Sign-in information is incorrect")
        );
    }

    #[test]
    fn control_level_failures_have_the_gateway_shape() {
        let gw = gateway();
        let cases = [
            (
                request("", READ_BY_QUERY).replace("sender-pass", "bad"),
                "Incorrect Intacct XML Partner ID or password.",
            ),
            (
                request("<policyid>nope</policyid>", READ_BY_QUERY),
                "nope is not a valid transport policy.",
            ),
            (
                request("", READ_BY_QUERY).replace("3.0", "4.0"),
                "XML Parse schema error: <dtdversion>",
            ),
            (
                request("", READ_BY_QUERY).replace("req-1", ""),
                "XML Parse schema error: <control><controlid>",
            ),
            (
                request("", READ_BY_QUERY).replace("req-1", &"x".repeat(257)),
                "not 257",
            ),
            (
                request("", READ_BY_QUERY).replace("</content>", ""),
                "XML Parse schema error: ",
            ),
            (
                "<!DOCTYPE r [<!ENTITY x \"y\">]><request/>".to_string(),
                "document type declarations",
            ),
            ("<response/>".to_string(), "expected <request>"),
            ("not xml".to_string(), "XML Parse schema error"),
            (
                request("", "<function><readByQuery/></function>"),
                "<function controlid",
            ),
            (
                request("", READ_BY_QUERY).replace("VENDOR", "&bogus;"),
                "unknown entity",
            ),
        ];
        for (text, needle) in cases {
            let body = answer(handle(&gw, &text));
            let x = match extract(body.as_bytes()) {
                Ok(x) => x,
                Err(crate::xml::XmlError::Malformed(_)) if !body.contains("<controlid>") => {
                    panic!("{body}")
                }
                Err(e) => panic!("{e}: {body}"),
            };
            assert_eq!(
                x.control.and_then(|c| c.status).as_deref(),
                Some("failure"),
                "{body}"
            );
            assert!(x.authentication.is_none(), "{body}");
            let d2 = x.errors[0].description2.clone().unwrap_or_default();
            assert!(d2.contains(needle), "{needle:?} not in {body}");
        }
    }

    #[test]
    fn the_control_echo_survives_a_parse_error_and_is_escaped() {
        let gw = gateway();
        let text = request("", READ_BY_QUERY)
            .replace("req-1", "a&lt;b&amp;\"c\"")
            .replace("</content>", "</contnt>");
        let body = answer(handle(&gw, &text));
        assert!(
            body.contains("<controlid>a&lt;b&amp;&quot;c&quot;</controlid>"),
            "{body}"
        );
        let x = extract(body.as_bytes()).expect("response");
        assert_eq!(x.controlid.as_deref(), Some("a<b&\"c\""));
        assert!(
            x.errors[0]
                .description2
                .as_deref()
                .unwrap_or("")
                .contains("</contnt>"),
            "{body}"
        );
    }

    #[test]
    fn an_asynchronous_request_is_acknowledged_and_queued() {
        let gw = gateway();
        let outcome = handle(&gw, &request("<policyid>dev</policyid>", READ_BY_QUERY));
        let Outcome::Queued { ack, response } = outcome else {
            panic!("not queued")
        };
        assert_eq!(
            ack,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response><acknowledgement><status>success</status>\
             </acknowledgement><control><status>success</status><senderid>test_sender</senderid>\
             <controlid>req-1</controlid><uniqueid>false</uniqueid><dtdversion>3.0</dtdversion>\
             </control></response>\n"
        );
        assert_eq!(response.policy, "dev");
        assert_eq!(response.duplicate, 0);
        let x = extract(response.body.as_bytes()).expect("response");
        assert_eq!(x.results[0].controlid.as_deref(), Some("f-1"));
    }

    #[test]
    fn the_acknowledgement_is_indented_on_request() {
        let ack = acknowledgement(&RequestControl {
            controlid: Some("c".into()),
            includewhitespace: Some("true".into()),
            ..RequestControl::default()
        });
        assert!(ack.contains(
            "<response>\n    <acknowledgement>\n        <status>success</status>\n    </acknowledgement>\n    <control>"
        ), "{ack}");
        assert!(ack.ends_with("</control>\n</response>\n"), "{ack}");
    }

    #[test]
    fn asynchronous_requests_over_500k_characters_are_refused() {
        let gw = gateway();
        let base = request(
            "<policyid>dev</policyid>",
            "<function controlid=\"c\"><create><VENDOR><NAME>X</NAME></VENDOR></create></function>",
        );
        let room = MAX_ASYNC_REQUEST_CHARS - base.chars().count();
        // Multi-byte characters count once: the limit is in characters, not bytes.
        let fits = base.replace(">X<", &format!(">{}<", "é".repeat(room + 1)));
        assert!(matches!(handle(&gw, &fits), Outcome::Queued { .. }));
        let over = base.replace(">X<", &format!(">{}<", "é".repeat(room + 2)));
        let body = answer(handle(&gw, &over));
        assert!(
            body.contains("<status>failure</status>") && body.contains("500000"),
            "{body}"
        );
        // A synchronous request of the same size is answered.
        let sync = over.replace("<policyid>dev</policyid>", "");
        assert!(answer(handle(&gw, &sync)).contains("<function>create</function>"));
    }

    #[test]
    fn injected_function_failures_and_rolled_back_transactions() {
        let gw = gateway();
        let functions = format!(
            "{READ_BY_QUERY}<function controlid=\"f-2\"><create><VENDOR><VENDORID>V</VENDORID></VENDOR></create></function>"
        );
        let text = request("", &functions).replace("req-1", "fail-1");
        let x = extract(answer(handle(&gw, &text)).as_bytes()).expect("response");
        assert_eq!(x.results[0].status.as_deref(), Some("success"));
        assert_eq!(x.results[1].status.as_deref(), Some("failure"));
        assert_eq!(
            x.results[1].errors[0].errorno.as_deref(),
            Some("BL34000061")
        );
        assert_eq!(x.results[1].errors.len(), 2);
        let text = text.replace("transaction=\"false\"", "transaction=\"true\"");
        let x = extract(answer(handle(&gw, &text)).as_bytes()).expect("response");
        assert_eq!(x.results[0].status.as_deref(), Some("aborted"));
        assert_eq!(
            x.results[0].errors[0].errorno.as_deref(),
            Some("XL03000009")
        );
        assert_eq!(x.results[1].status.as_deref(), Some("failure"));
    }

    #[test]
    fn malformed_duplicate_and_delay_faults_add_up() {
        let gw = gateway();
        let text = request("<policyid>dev</policyid>", READ_BY_QUERY).replace("req-1", "broken-1");
        let Outcome::Queued { response, .. } = handle(&gw, &text) else {
            panic!("not queued")
        };
        assert_eq!(response.duplicate, 3);
        assert_eq!(response.extra_delay, Duration::from_millis(5));
        let x = extract(response.body.as_bytes()).expect("matched despite the break");
        assert!(!x.well_formed);
        assert_eq!(x.controlid.as_deref(), Some("broken-1"));
    }

    #[test]
    fn form_posts_and_latin1_requests_are_read() {
        let gw = gateway();
        let xml = request("", READ_BY_QUERY).replace("UTF-8", "iso-8859-1");
        let mut latin1: Vec<u8> = xml.bytes().collect();
        // "VENDOR" becomes "VENDÖR" in ISO-8859-1 (one byte 0xD6).
        let at = xml.find("VENDOR").expect("object") + 4;
        latin1[at] = 0xD6;
        let form: String = format!(
            "other=1&xmlrequest={}",
            percent_encoding::percent_encode(&latin1, percent_encoding::NON_ALPHANUMERIC)
        );
        let body = answer(gw.handle(form.as_bytes(), true, "e", OffsetDateTime::UNIX_EPOCH));
        assert!(body.contains("listtype=\"vendör\""), "{body}");
        let body = answer(gw.handle(b"nothing=here", true, "e", OffsetDateTime::UNIX_EPOCH));
        assert!(body.contains("xmlrequest"), "{body}");
        assert_eq!(
            decode_body(b"<?xml version='1.0' encoding='UTF-16'?><r/>", false).expect_err("utf-16"),
            "unsupported encoding \"utf-16\": send UTF-8"
        );
    }

    #[test]
    fn cut_off_keeps_the_control_block() {
        let body = "<response><control><controlid>x</controlid></control><operation>0123456789</operation></response>";
        let cut = cut_off(body);
        assert!(cut.starts_with("<response><control><controlid>x</controlid></control>"));
        assert!(cut.len() < body.len());
    }
}
