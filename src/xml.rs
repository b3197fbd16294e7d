//! Streaming extraction of what matters in a gateway `<response>` document.
//!
//! One pass of quick-xml's `Reader` over the raw bytes, no DOM and no serde into big structures:
//! the control block (and its `<controlid>`, which keys the whole delivery), the authentication
//! block, each `<result>` and the `<errormessage>` lists. This module does no I/O.

use quick_xml::errors::{Error as QxError, IllFormedError, SyntaxError};
use quick_xml::escape::resolve_xml_entity;
use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::reader::Reader;
use quick_xml::XmlVersion;
use serde::{Deserialize, Serialize};

/// Longest control-level `<controlid>` accepted, in bytes (the gateway allows 256 characters).
pub const MAX_CONTROLID_BYTES: usize = 1024;

/// Deepest element nesting accepted before the document is treated as broken.
pub const MAX_DEPTH: usize = 256;

/// The `<control>` block of a response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// `<status>`: `success` or `failure`.
    pub status: Option<String>,
    /// `<senderid>`: the Web Services sender.
    pub senderid: Option<String>,
    /// `<uniqueid>`: whether the gateway enforced uniqueness (`true`/`false`).
    pub uniqueid: Option<String>,
    /// `<dtdversion>`: `2.1` or `3.0`.
    pub dtdversion: Option<String>,
}

/// The `<operation><authentication>` block of a response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authentication {
    /// `<status>`: `success` or `failure`.
    pub status: Option<String>,
    /// `<userid>` of the company user.
    pub userid: Option<String>,
    /// `<companyid>` of the company.
    pub companyid: Option<String>,
    /// `<locationid>`, when the session is scoped to an entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locationid: Option<String>,
    /// `<sessiontimestamp>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessiontimestamp: Option<String>,
    /// `<sessiontimeout>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessiontimeout: Option<String>,
}

/// One `<error>` of an `<errormessage>` list; a field absent in the XML is `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEntry {
    /// `<errorno>`, e.g. `BL34000061`.
    pub errorno: Option<String>,
    /// `<description>`.
    pub description: Option<String>,
    /// `<description2>`: usually the useful text.
    pub description2: Option<String>,
    /// `<correction>`: what the user can do about it.
    pub correction: Option<String>,
}

/// The attributes of a result's `<data>` element, when present.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataInfo {
    /// `listtype`, e.g. `project` or `objects`.
    pub listtype: Option<String>,
    /// `count`: records in this page.
    pub count: Option<String>,
    /// `totalcount`: records matching the query.
    pub totalcount: Option<String>,
    /// `numremaining`: records left for `readMore`.
    pub numremaining: Option<String>,
    /// `resultId`: the handle for `readMore`.
    #[serde(rename = "resultId")]
    pub result_id: Option<String>,
}

/// One `<operation><result>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultEntry {
    /// `<function>`: the function name, e.g. `readByQuery`.
    pub function: Option<String>,
    /// `<controlid>` of the function (not the control-level one).
    pub controlid: Option<String>,
    /// `<status>`: `success`, `failure` or `aborted`.
    pub status: Option<String>,
    /// The attributes of `<data>`, when the result has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataInfo>,
    /// `<key>` of legacy functions (e.g. `create_supdoc`), when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The `<errormessage>` entries of this result.
    pub errors: Vec<ErrorEntry>,
}

/// Everything extracted from one response document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extracted {
    /// The control-level `<controlid>`, entities decoded and white space trimmed;
    /// `None` when absent or empty (an *unmatched* delivery).
    pub controlid: Option<String>,
    /// The `<control>` block; `None` when the document has none.
    pub control: Option<Control>,
    /// The authentication block; `None` when the response has no `<operation>`.
    pub authentication: Option<Authentication>,
    /// Each `<operation><result>`, in document order.
    pub results: Vec<ResultEntry>,
    /// `<errormessage>` entries directly under `<response>` and under `<operation>`.
    pub errors: Vec<ErrorEntry>,
    /// `false` when the document broke after the control-level controlid was read.
    pub well_formed: bool,
    /// Why the document is not well formed, when it is not.
    pub parse_error: Option<String>,
}

/// Why a body cannot be accepted as a response document at all.
///
/// Each of these is answered with `400` and the body is kept in quarantine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XmlError {
    /// The body is empty or white space only.
    #[error("body is empty")]
    Empty,
    /// The document carries a `<!DOCTYPE`; nothing in it is ever resolved.
    #[error("document type declarations are not accepted")]
    Doctype,
    /// The declared encoding is not one this service decodes.
    #[error("unsupported encoding {0:?}: send UTF-8")]
    Encoding(String),
    /// The root element is not `<response>`.
    #[error("root element is <{0}>, expected <response>")]
    NotResponse(String),
    /// The control-level controlid is longer than [`MAX_CONTROLID_BYTES`].
    #[error("control-level controlid is longer than {MAX_CONTROLID_BYTES} bytes")]
    ControlIdTooLong,
    /// The body is not XML, or breaks before a control-level `<controlid>` was read.
    #[error("malformed XML before the control-level controlid: {0}")]
    Malformed(String),
}

/// Reads one response document in a single streaming pass.
///
/// Returns `Err` when the body cannot be matched to anything (see [`XmlError`]); returns `Ok`
/// with `well_formed: false` when the document broke after its control-level controlid.
///
/// The rules, in short:
///
/// - a UTF-8 byte order mark is skipped; a document declaring ISO-8859-1 (Latin-1, or one of
///   its aliases) is decoded as such, byte by byte; any other declared encoding than UTF-8 or
///   US-ASCII, a UTF-16 byte order mark, or a Latin-1 declaration after a UTF-8 byte order mark
///   is [`XmlError::Encoding`]; bytes that are not UTF-8 (in a document not declared Latin-1)
///   break the document;
/// - a `<!DOCTYPE` anywhere is [`XmlError::Doctype`]; only the five predefined entities and
///   character references are decoded, any other `&name;` breaks the document;
/// - elements are recognised by their local name along the path from `<response>`; text is
///   collected only for the fields of [`Extracted`], everything else (notably the records inside
///   `<data>`) is checked for well-formedness and skipped without allocating;
/// - a text field is `None` when its element is absent and `Some(trimmed text)` when present,
///   even when empty, except the control-level controlid, which is `None` when empty;
///   when an element repeats, the first occurrence wins;
/// - a document that breaks (syntax error, mismatched tag, early end, nesting deeper than
///   [`MAX_DEPTH`], content after the root) before a non-empty control-level controlid was read
///   is [`XmlError::Malformed`]; after it, whatever was collected is returned with
///   `well_formed: false` and the reason in `parse_error`.
pub fn extract(body: &[u8]) -> Result<Extracted, XmlError> {
    let (bom, rest) = match body.strip_prefix(UTF8_BOM) {
        Some(rest) => (UTF8_BOM.len() as u64, rest),
        None => (0, body),
    };
    if rest.iter().all(|&b| is_xml_space(b)) {
        return Err(XmlError::Empty);
    }
    if rest.starts_with(b"\xFF\xFE") || rest.starts_with(b"\xFE\xFF") {
        return Err(XmlError::Encoding("UTF-16".to_owned()));
    }
    match extract_from(rest, bom, false) {
        Ok(extracted) => Ok(extracted),
        Err(Stop::Latin1) if bom > 0 => Err(XmlError::Encoding(
            "ISO-8859-1 after a UTF-8 byte order mark".to_owned(),
        )),
        Err(Stop::Latin1) => {
            // Every byte is the character of the same number: exact, and it cannot fail.
            let text: String = rest.iter().map(|&b| char::from(b)).collect();
            match extract_from(text.as_bytes(), 0, true) {
                Ok(extracted) => Ok(extracted),
                Err(Stop::Refused(error)) => Err(error),
                Err(Stop::Latin1 | Stop::Broken(_)) => {
                    Err(XmlError::Encoding("ISO-8859-1".to_owned()))
                }
            }
        }
        Err(Stop::Refused(error)) => Err(error),
        Err(Stop::Broken(reason)) => Err(XmlError::Malformed(reason)),
    }
}

/// One pass over `rest`: UTF-8, or Latin-1 already transcoded to UTF-8 when `latin1` (positions
/// in messages then count the transcoded bytes). Returns the outcome of a broken document too;
/// `Err` is a refusal, or [`Stop::Latin1`] when the document turns out to declare Latin-1.
fn extract_from(rest: &[u8], bom: u64, latin1: bool) -> Result<Extracted, Stop> {
    let mut reader = Reader::from_reader(rest);
    let config = reader.config_mut();
    config.check_end_names = true;
    config.expand_empty_elements = false;
    config.allow_unmatched_ends = false;
    config.allow_dangling_amp = false;
    config.trim_text(false);

    let mut extractor = Extractor::new(bom);
    extractor.latin1 = latin1;
    match extractor.run(&mut reader, rest) {
        Ok(()) => {
            let mut out = extractor.out;
            out.well_formed = true;
            out.parse_error = None;
            Ok(out)
        }
        Err(Stop::Broken(reason)) => extractor.broken(reason).map_err(Stop::Refused),
        Err(other) => Err(other),
    }
}

/// The UTF-8 byte order mark.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// How many attributes of a `<data>` element are looked at (RUSTSEC-2026-0194: attribute
/// iteration must stay linear, so duplicate checking is off and the count is bounded).
const MAX_DATA_ATTRIBUTES: usize = 64;

/// Longest piece of document-controlled text (a name, an entity) quoted in a message.
const MAX_QUOTED_BYTES: usize = 64;

/// Why the pass stopped early.
enum Stop {
    /// The body is refused whatever was read before (DOCTYPE, encoding, root, controlid length).
    Refused(XmlError),
    /// The document broke; what this means depends on whether the controlid was read.
    Broken(String),
    /// The document declares Latin-1: read it again, transcoded.
    Latin1,
}

/// Where the pass stands relative to the root element.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Root {
    /// No element seen yet (the prolog).
    Before,
    /// Inside `<response>`.
    Inside,
    /// `</response>` was read; only white space, comments and PIs may follow.
    After,
}

/// Which error list an `<errormessage>` feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    /// `Extracted::errors` (under `<response>` or `<operation>`).
    Top,
    /// The `errors` of the current `<result>`.
    Result,
}

/// A text child of `<control>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ControlField {
    Status,
    SenderId,
    ControlId,
    UniqueId,
    DtdVersion,
}

/// A text child of `<authentication>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuthField {
    Status,
    UserId,
    CompanyId,
    LocationId,
    SessionTimestamp,
    SessionTimeout,
}

/// A text child of `<result>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResultField {
    Status,
    Function,
    ControlId,
    Key,
}

/// A text child of `<error>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrorField {
    ErrorNo,
    Description,
    Description2,
    Correction,
}

/// What an open element means, given the path leading to it.
///
/// The element stack holds these instead of names, so an ignored element costs no allocation;
/// quick-xml itself checks that end tags match their start tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Response,
    Control,
    ControlField(ControlField),
    Operation,
    Authentication,
    AuthField(AuthField),
    Result,
    ResultField(ResultField),
    Data,
    ErrorMessage(Owner),
    Error(Owner),
    ErrorField(Owner, ErrorField),
    /// Anything else: checked for well-formedness, otherwise ignored.
    Other,
}

impl Node {
    /// The meaning of a child element named `local` of an element meaning `self`.
    fn child(self, local: &str) -> Node {
        if self.is_leaf() {
            return Node::Other;
        }
        match (self, local) {
            (Node::Response, "control") => Node::Control,
            (Node::Response, "operation") => Node::Operation,
            (Node::Response, "errormessage") => Node::ErrorMessage(Owner::Top),
            (Node::Control, "status") => Node::ControlField(ControlField::Status),
            (Node::Control, "senderid") => Node::ControlField(ControlField::SenderId),
            (Node::Control, "controlid") => Node::ControlField(ControlField::ControlId),
            (Node::Control, "uniqueid") => Node::ControlField(ControlField::UniqueId),
            (Node::Control, "dtdversion") => Node::ControlField(ControlField::DtdVersion),
            (Node::Operation, "authentication") => Node::Authentication,
            (Node::Operation, "result") => Node::Result,
            (Node::Operation, "errormessage") => Node::ErrorMessage(Owner::Top),
            (Node::Authentication, "status") => Node::AuthField(AuthField::Status),
            (Node::Authentication, "userid") => Node::AuthField(AuthField::UserId),
            (Node::Authentication, "companyid") => Node::AuthField(AuthField::CompanyId),
            (Node::Authentication, "locationid") => Node::AuthField(AuthField::LocationId),
            (Node::Authentication, "sessiontimestamp") => {
                Node::AuthField(AuthField::SessionTimestamp)
            }
            (Node::Authentication, "sessiontimeout") => Node::AuthField(AuthField::SessionTimeout),
            (Node::Result, "status") => Node::ResultField(ResultField::Status),
            (Node::Result, "function") => Node::ResultField(ResultField::Function),
            (Node::Result, "controlid") => Node::ResultField(ResultField::ControlId),
            (Node::Result, "key") => Node::ResultField(ResultField::Key),
            (Node::Result, "data") => Node::Data,
            (Node::Result, "errormessage") => Node::ErrorMessage(Owner::Result),
            (Node::ErrorMessage(owner), "error") => Node::Error(owner),
            (Node::Error(owner), "errorno") => Node::ErrorField(owner, ErrorField::ErrorNo),
            (Node::Error(owner), "description") => Node::ErrorField(owner, ErrorField::Description),
            (Node::Error(owner), "description2") => {
                Node::ErrorField(owner, ErrorField::Description2)
            }
            (Node::Error(owner), "correction") => Node::ErrorField(owner, ErrorField::Correction),
            _ => Node::Other,
        }
    }

    /// Whether every child of this element is ignored (the bulk of a large response: records
    /// inside `<data>`), so the child's name need not be looked at.
    fn is_leaf(self) -> bool {
        matches!(self, Node::Other | Node::Data) || self.collects_text()
    }

    /// Whether the text directly inside this element is collected.
    fn collects_text(self) -> bool {
        matches!(
            self,
            Node::ControlField(_)
                | Node::AuthField(_)
                | Node::ResultField(_)
                | Node::ErrorField(_, _)
        )
    }
}

/// The text of the field being read, with leading white space dropped as it arrives and the
/// end of the last non-white-space character tracked, so trimming never rescans.
struct TextBuf {
    /// The kept text (possibly followed by white space that trimming will drop).
    buf: String,
    /// Bytes of text seen after the leading white space, kept or not.
    seen: usize,
    /// `seen` up to and including the last non-white-space character.
    end: usize,
    /// Most bytes kept in `buf`; what is beyond can only be trailing white space or makes the
    /// value too long anyway.
    cap: usize,
}

impl TextBuf {
    fn new() -> Self {
        TextBuf {
            buf: String::new(),
            seen: 0,
            end: 0,
            cap: usize::MAX,
        }
    }

    /// Starts a new field keeping at most `cap` bytes.
    fn reset(&mut self, cap: usize) {
        self.buf.clear();
        self.seen = 0;
        self.end = 0;
        self.cap = cap;
    }

    /// Appends decoded text.
    fn push(&mut self, text: &str) {
        let text = if self.seen == 0 {
            text.trim_start_matches(is_xml_space_char)
        } else {
            text
        };
        if text.is_empty() {
            return;
        }
        let content = text.trim_end_matches(is_xml_space_char).len();
        if content > 0 {
            self.end = self.seen + content;
        }
        // `buf` stays a prefix of the text: once something was dropped, nothing more is kept.
        if self.buf.len() == self.seen {
            let room = self.cap.saturating_sub(self.buf.len());
            self.buf.push_str(&text[..floor_char_boundary(text, room)]);
        }
        self.seen += text.len();
    }

    /// Length of the trimmed text in bytes (whether or not all of it was kept).
    fn trimmed_len(&self) -> usize {
        self.end
    }

    /// The trimmed text.
    fn value(&self) -> String {
        let end = self.end.min(self.buf.len());
        self.buf.get(..end).unwrap_or_default().to_owned()
    }
}

/// The state of one pass.
struct Extractor {
    /// What was collected so far.
    out: Extracted,
    /// The meaning of each open element, outermost first.
    stack: Vec<Node>,
    /// The text of the field being read.
    text: TextBuf,
    /// Where the pass stands relative to the root element.
    root: Root,
    /// Whether anything but white space was seen (an XML declaration must come first).
    seen_markup: bool,
    /// Whether the end tag of the control-level `<controlid>` was read.
    controlid_read: bool,
    /// Bytes skipped before the reader's input (the BOM), added to reported positions.
    offset: u64,
    /// Whether the input was transcoded from a document declared Latin-1.
    latin1: bool,
}

impl Extractor {
    fn new(offset: u64) -> Self {
        Extractor {
            out: Extracted::default(),
            stack: Vec::with_capacity(MAX_DEPTH),
            text: TextBuf::new(),
            root: Root::Before,
            seen_markup: false,
            controlid_read: false,
            offset,
            latin1: false,
        }
    }

    /// The outcome of a document that broke with `reason`.
    fn broken(self, reason: String) -> Result<Extracted, XmlError> {
        if self.controlid_read && self.out.controlid.is_some() {
            let mut out = self.out;
            out.well_formed = false;
            out.parse_error = Some(reason);
            Ok(out)
        } else {
            Err(XmlError::Malformed(reason))
        }
    }

    /// Reads events until the end of input or the first problem.
    fn run(&mut self, reader: &mut Reader<&[u8]>, input: &[u8]) -> Result<(), Stop> {
        loop {
            let before = reader.buffer_position();
            let pos = self.offset + before;
            let event = match reader.read_event() {
                Ok(event) => event,
                Err(error) => return Err(self.reader_error(&error, reader, input, before)),
            };
            match event {
                Event::Decl(decl) => {
                    if self.seen_markup {
                        return Err(Stop::Broken(format!(
                            "xml declaration not at the start of the document at byte {pos}"
                        )));
                    }
                    self.seen_markup = true;
                    match decl.encoding() {
                        Some(Ok(encoding)) if is_latin1(&encoding) => {
                            if !self.latin1 {
                                return Err(Stop::Latin1);
                            }
                        }
                        Some(Ok(_)) if self.latin1 => {
                            // Transcoding changed nothing in the declaration: cannot happen.
                            return Err(Stop::Latin1);
                        }
                        Some(Ok(encoding)) if !is_supported_encoding(&encoding) => {
                            return Err(Stop::Refused(XmlError::Encoding(quote(&encoding))));
                        }
                        Some(Err(error)) => {
                            return Err(Stop::Broken(one_line(&format!(
                                "invalid xml declaration ({error}) at byte {pos}"
                            ))));
                        }
                        Some(Ok(_)) | None => {}
                    }
                }
                Event::DocType(_) => return Err(Stop::Refused(XmlError::Doctype)),
                Event::Start(start) => self.open(&start, false, pos)?,
                Event::Empty(start) => self.open(&start, true, pos)?,
                Event::End(_) => {
                    let node = self.stack.pop().ok_or_else(|| {
                        Stop::Broken(format!("end tag without start tag at byte {pos}"))
                    })?;
                    self.close(node)?;
                    if self.stack.is_empty() {
                        self.root = Root::After;
                    }
                }
                Event::Text(text) => {
                    if self.stack.is_empty() {
                        if !text.bytes().all(is_xml_space) {
                            return Err(self.outside_root(pos));
                        }
                    } else if self.collecting() {
                        self.text.push(&text.xml10_content());
                        self.check_controlid_len()?;
                    }
                }
                Event::CData(cdata) => {
                    if self.stack.is_empty() {
                        return Err(self.outside_root(pos));
                    }
                    if self.collecting() {
                        self.text.push(&cdata.xml10_content());
                        self.check_controlid_len()?;
                    }
                }
                Event::GeneralRef(reference) => {
                    let replacement = resolve_reference(&reference)
                        .map_err(|what| Stop::Broken(format!("{what} at byte {pos}")))?;
                    if self.stack.is_empty() {
                        return Err(self.outside_root(pos));
                    }
                    if self.collecting() {
                        match replacement {
                            Replacement::Entity(text) => self.text.push(text),
                            Replacement::Char(c) => self.text.push(c.encode_utf8(&mut [0; 4])),
                        }
                        self.check_controlid_len()?;
                    }
                }
                Event::Comment(_) | Event::PI(_) => self.seen_markup = true,
                Event::Eof => {
                    return match self.root {
                        Root::Before => Err(Stop::Broken(format!(
                            "no root element before the end of input at byte {pos}"
                        ))),
                        Root::Inside => Err(Stop::Broken(format!(
                            "unexpected end of input at byte {pos} with {} element(s) still open",
                            self.stack.len()
                        ))),
                        Root::After => Ok(()),
                    };
                }
            }
        }
    }

    /// Whether the innermost open element's text is being collected.
    fn collecting(&self) -> bool {
        self.stack.last().is_some_and(|node| node.collects_text())
    }

    /// The problem of non-white-space content outside the root element.
    fn outside_root(&self, pos: u64) -> Stop {
        match self.root {
            Root::After => Stop::Broken(format!("content after the root element at byte {pos}")),
            _ => Stop::Broken(format!("text before the root element at byte {pos}")),
        }
    }

    /// Refuses a control-level controlid as soon as it is known to be too long.
    fn check_controlid_len(&self) -> Result<(), Stop> {
        let reading_controlid = !self.controlid_read
            && self.stack.last() == Some(&Node::ControlField(ControlField::ControlId));
        if reading_controlid && self.text.trimmed_len() > MAX_CONTROLID_BYTES {
            return Err(Stop::Refused(XmlError::ControlIdTooLong));
        }
        Ok(())
    }

    /// Handles a start tag (`empty` for `<tag/>`, which is closed at once).
    fn open(&mut self, start: &BytesStart<'_>, empty: bool, pos: u64) -> Result<(), Stop> {
        self.seen_markup = true;
        if self.stack.len() >= MAX_DEPTH {
            return Err(Stop::Broken(format!(
                "elements nested deeper than {MAX_DEPTH} levels at byte {pos}"
            )));
        }
        let name = start.name();
        if !is_xml_name(name.into_inner()) {
            return Err(Stop::Broken(format!(
                "invalid element name <{}> at byte {pos}",
                quote(name.into_inner())
            )));
        }
        let local = name.local_name().into_inner();
        let node = match self.stack.last() {
            Some(parent) => parent.child(local),
            None => match self.root {
                Root::Before if local == "response" => {
                    self.root = Root::Inside;
                    Node::Response
                }
                Root::Before => {
                    return Err(Stop::Refused(XmlError::NotResponse(quote(
                        name.into_inner(),
                    ))))
                }
                _ => return Err(self.outside_root(pos)),
            },
        };

        match node {
            Node::Control => {
                self.out.control.get_or_insert_with(Control::default);
            }
            Node::Operation => {
                self.out
                    .authentication
                    .get_or_insert_with(Authentication::default);
            }
            Node::Result => self.out.results.push(ResultEntry::default()),
            Node::Error(Owner::Top) => self.out.errors.push(ErrorEntry::default()),
            Node::Error(Owner::Result) => {
                if let Some(result) = self.out.results.last_mut() {
                    result.errors.push(ErrorEntry::default());
                }
            }
            Node::Data => {
                let info = data_info(start).map_err(|what| {
                    Stop::Broken(one_line(&format!("{what} in <data> at byte {pos}")))
                })?;
                if let Some(result) = self.out.results.last_mut() {
                    result.data.get_or_insert(info);
                }
            }
            Node::ControlField(ControlField::ControlId) if !self.controlid_read => {
                self.text.reset(MAX_CONTROLID_BYTES);
            }
            field if field.collects_text() => self.text.reset(usize::MAX),
            _ => {}
        }

        if empty {
            self.close(node)?;
            if self.stack.is_empty() {
                self.root = Root::After;
            }
        } else {
            self.stack.push(node);
        }
        Ok(())
    }

    /// Handles the end of an element: stores the text of a field.
    fn close(&mut self, node: Node) -> Result<(), Stop> {
        match node {
            Node::ControlField(ControlField::ControlId) if !self.controlid_read => {
                if self.text.trimmed_len() > MAX_CONTROLID_BYTES {
                    return Err(Stop::Refused(XmlError::ControlIdTooLong));
                }
                let value = self.text.value();
                self.out.controlid = (!value.is_empty()).then_some(value);
                self.controlid_read = true;
            }
            Node::ControlField(field) => {
                if let Some(control) = self.out.control.as_mut() {
                    let slot = match field {
                        ControlField::Status => &mut control.status,
                        ControlField::SenderId => &mut control.senderid,
                        ControlField::UniqueId => &mut control.uniqueid,
                        ControlField::DtdVersion => &mut control.dtdversion,
                        ControlField::ControlId => return Ok(()),
                    };
                    fill(slot, &self.text);
                }
            }
            Node::AuthField(field) => {
                if let Some(auth) = self.out.authentication.as_mut() {
                    let slot = match field {
                        AuthField::Status => &mut auth.status,
                        AuthField::UserId => &mut auth.userid,
                        AuthField::CompanyId => &mut auth.companyid,
                        AuthField::LocationId => &mut auth.locationid,
                        AuthField::SessionTimestamp => &mut auth.sessiontimestamp,
                        AuthField::SessionTimeout => &mut auth.sessiontimeout,
                    };
                    fill(slot, &self.text);
                }
            }
            Node::ResultField(field) => {
                if let Some(result) = self.out.results.last_mut() {
                    let slot = match field {
                        ResultField::Status => &mut result.status,
                        ResultField::Function => &mut result.function,
                        ResultField::ControlId => &mut result.controlid,
                        ResultField::Key => &mut result.key,
                    };
                    fill(slot, &self.text);
                }
            }
            Node::ErrorField(owner, field) => {
                let entry = match owner {
                    Owner::Top => self.out.errors.last_mut(),
                    Owner::Result => self
                        .out
                        .results
                        .last_mut()
                        .and_then(|result| result.errors.last_mut()),
                };
                if let Some(entry) = entry {
                    let slot = match field {
                        ErrorField::ErrorNo => &mut entry.errorno,
                        ErrorField::Description => &mut entry.description,
                        ErrorField::Description2 => &mut entry.description2,
                        ErrorField::Correction => &mut entry.correction,
                    };
                    fill(slot, &self.text);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Turns a quick-xml error into a one-line reason (or a refusal, for a broken DOCTYPE).
    fn reader_error(
        &self,
        error: &QxError,
        reader: &Reader<&[u8]>,
        input: &[u8],
        before: u64,
    ) -> Stop {
        let at = self.offset + reader.error_position();
        let reason = match error {
            QxError::IllFormed(IllFormedError::MissingDoctypeName)
            | QxError::Syntax(SyntaxError::UnclosedDoctype) => {
                return Stop::Refused(XmlError::Doctype)
            }
            QxError::IllFormed(IllFormedError::MismatchedEndTag { expected, found }) => format!(
                "mismatched end tag </{}> at byte {at}, expected </{}>",
                quote(found),
                quote(expected)
            ),
            QxError::IllFormed(IllFormedError::UnmatchedEndTag(found)) => {
                format!("end tag </{}> without start tag at byte {at}", quote(found))
            }
            QxError::IllFormed(IllFormedError::UnclosedReference) => {
                format!("entity reference without closing ';' at byte {at}")
            }
            QxError::IllFormed(other) => {
                format!("{} at byte {at}", other.to_string().to_lowercase())
            }
            QxError::Syntax(syntax) => {
                format!("{} at byte {at}", syntax.to_string().to_lowercase())
            }
            QxError::Encoding(_) => {
                // Everything before `before` was valid UTF-8, so the first invalid byte
                // after it is the one the reader stumbled on.
                let start = usize::try_from(before)
                    .unwrap_or(input.len())
                    .min(input.len());
                let bad = match std::str::from_utf8(&input[start..]) {
                    Ok(_) => 0,
                    Err(utf8) => utf8.valid_up_to(),
                };
                format!(
                    "invalid utf-8 at byte {}",
                    self.offset + before + bad as u64
                )
            }
            other => format!(
                "{} at byte {}",
                other.to_string().to_lowercase(),
                self.offset + before
            ),
        };
        Stop::Broken(one_line(&reason))
    }
}

/// Stores a field's trimmed text unless an earlier occurrence already did.
fn fill(slot: &mut Option<String>, text: &TextBuf) {
    if slot.is_none() {
        *slot = Some(text.value());
    }
}

/// Reads the attributes of `<data>` that [`DataInfo`] holds.
fn data_info(start: &BytesStart<'_>) -> Result<DataInfo, String> {
    let mut info = DataInfo::default();
    let mut attributes = start.attributes();
    attributes.with_checks(false);
    for attribute in attributes.take(MAX_DATA_ATTRIBUTES) {
        let attribute = attribute.map_err(|error| format!("invalid attribute: {error}"))?;
        let slot = match attribute.key.into_inner() {
            "listtype" => &mut info.listtype,
            "count" => &mut info.count,
            "totalcount" => &mut info.totalcount,
            "numremaining" => &mut info.numremaining,
            "resultId" => &mut info.result_id,
            _ => continue,
        };
        if slot.is_none() {
            let value = attribute
                .normalized_value(XmlVersion::Implicit1_0)
                .map_err(|error| format!("invalid attribute value: {error}"))?;
            *slot = Some(value.into_owned());
        }
    }
    Ok(info)
}

/// The replacement text of a reference.
enum Replacement {
    /// A predefined entity (`&amp;` and the like).
    Entity(&'static str),
    /// A character reference (`&#233;`, `&#xE9;`).
    Char(char),
}

/// Resolves `&name;` or `&#n;`: only the five predefined entities and references to characters
/// allowed in XML 1.0 are known; anything else is an error, as no DTD is ever read.
fn resolve_reference(reference: &BytesRef<'_>) -> Result<Replacement, String> {
    if reference.is_char_ref() {
        match reference.resolve_char_ref() {
            Ok(Some(c)) if is_xml_char(c) => Ok(Replacement::Char(c)),
            _ => Err(format!(
                "invalid character reference &{};",
                quote(reference)
            )),
        }
    } else {
        resolve_xml_entity(reference)
            .map(Replacement::Entity)
            .ok_or_else(|| format!("unknown entity &{};", quote(reference)))
    }
}

/// Whether a character may appear in an XML 1.0 document.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Whether `name` is an XML name, checking the ASCII rules exactly and accepting any
/// non-ASCII character (quick-xml does not check names at all).
fn is_xml_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':' || !b.is_ascii());
    first_ok
        && bytes.all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':') || !b.is_ascii()
        })
}

/// Whether the declared encoding is one this module reads (UTF-8 and its subset US-ASCII, by
/// its IANA name and the usual aliases).
fn is_supported_encoding(encoding: &str) -> bool {
    [
        "utf-8",
        "utf8",
        "us-ascii",
        "ascii",
        "us",
        "iso646-us",
        "ansi_x3.4-1968",
    ]
    .iter()
    .any(|name| encoding.eq_ignore_ascii_case(name))
}

/// Whether the declared encoding names ISO-8859-1 (its IANA name and aliases).
fn is_latin1(encoding: &str) -> bool {
    [
        "iso-8859-1",
        "iso8859-1",
        "iso_8859-1",
        "iso_8859-1:1987",
        "latin1",
        "latin-1",
        "l1",
        "ibm819",
        "cp819",
        "iso-ir-100",
        "csisolatin1",
    ]
    .iter()
    .any(|name| encoding.eq_ignore_ascii_case(name))
}

/// XML white space: space, tab, carriage return and line feed.
fn is_xml_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// [`is_xml_space`] for characters.
fn is_xml_space_char(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// The largest index `<= max` that is a character boundary of `s`.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    if max >= s.len() {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

/// Document-controlled text to quote in a message: at most [`MAX_QUOTED_BYTES`], on one line.
fn quote(text: &str) -> String {
    let end = floor_char_boundary(text, MAX_QUOTED_BYTES);
    let mut quoted: String = text[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if end < text.len() {
        quoted.push_str("...");
    }
    quoted
}

/// Makes a reason one line without a trailing period.
fn one_line(reason: &str) -> String {
    let line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    line.trim_end_matches(['.', ' ']).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    const PROJECT_SUCCESS: &[u8] = include_bytes!("../tests/fixtures/execProjectSuccess.xml");
    const FUNC_ERROR: &[u8] = include_bytes!("../tests/fixtures/execFuncError.xml");
    const LOGIN_INVALID: &[u8] = include_bytes!("../tests/fixtures/execLoginInvalid.xml");
    const XML_ERROR: &[u8] = include_bytes!("../tests/fixtures/execXMLError.xml");
    const GET_OBJECT: &[u8] = include_bytes!("../tests/fixtures/Get-Object.Default.xml");
    const CREATE_ATTACHMENT: &[u8] =
        include_bytes!("../tests/fixtures/Create-Attachment.Response.xml");
    const SAVE_OBJECT: &[u8] = include_bytes!("../tests/fixtures/Save-Object.create.xml");
    const VENDOR: &[u8] = include_bytes!("../tests/fixtures/vendorResponse.xml");

    /// Every fixture, for the properties that hold for all of them.
    const FIXTURES: [&[u8]; 8] = [
        PROJECT_SUCCESS,
        FUNC_ERROR,
        LOGIN_INVALID,
        XML_ERROR,
        GET_OBJECT,
        CREATE_ATTACHMENT,
        SAVE_OBJECT,
        VENDOR,
    ];

    fn s(text: &str) -> Option<String> {
        Some(text.to_owned())
    }

    fn ok(body: &[u8]) -> Extracted {
        match extract(body) {
            Ok(extracted) => extracted,
            Err(error) => panic!("expected Ok, got {error:?}"),
        }
    }

    fn malformed(body: &[u8]) -> String {
        match extract(body) {
            Err(XmlError::Malformed(reason)) => {
                assert_reason_shape(&reason);
                reason
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    /// A document that broke after its controlid: returns the reason.
    fn partial(body: &[u8], controlid: &str) -> (Extracted, String) {
        let extracted = ok(body);
        assert_eq!(extracted.controlid.as_deref(), Some(controlid));
        assert!(!extracted.well_formed, "expected well_formed false");
        let reason = extracted
            .parse_error
            .clone()
            .unwrap_or_else(|| panic!("expected a parse_error"));
        assert_reason_shape(&reason);
        (extracted, reason)
    }

    fn assert_reason_shape(reason: &str) {
        assert!(!reason.is_empty());
        assert!(
            !reason.contains('\n') && !reason.contains('\r'),
            "{reason:?}"
        );
        assert!(!reason.ends_with('.'), "{reason:?}");
        assert!(reason.contains("byte "), "no position in {reason:?}");
        let first = reason.chars().next().unwrap_or('x');
        assert!(!first.is_uppercase(), "{reason:?}");
    }

    /// A minimal response with `controlid` and `rest` after the control block.
    fn doc(controlid: &str, rest: &str) -> Vec<u8> {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response><control><status>success</status>\
             <controlid>{controlid}</controlid></control>{rest}</response>"
        )
        .into_bytes()
    }

    fn error(errorno: &str, description2: &str) -> ErrorEntry {
        ErrorEntry {
            errorno: s(errorno),
            description: s(""),
            description2: s(description2),
            correction: s(""),
        }
    }

    // ---- fixtures ---------------------------------------------------------------------------

    #[test]
    fn exec_project_success() {
        let x = ok(PROJECT_SUCCESS);
        assert_eq!(x.controlid, s("1543102188"));
        assert!(x.well_formed);
        assert_eq!(x.parse_error, None);
        assert_eq!(
            x.control,
            Some(Control {
                status: s("success"),
                senderid: s("AAAAAAAA"),
                uniqueid: s("false"),
                dtdversion: s("3.0"),
            })
        );
        assert_eq!(
            x.authentication,
            Some(Authentication {
                status: s("success"),
                userid: s("UUUU"),
                companyid: s("ZZZZZZZ"),
                locationid: s(""),
                sessiontimestamp: s("2018-11-24T15:29:48-08:00"),
                sessiontimeout: None,
            })
        );
        assert_eq!(
            x.results,
            vec![
                ResultEntry {
                    function: s("readByQuery"),
                    controlid: s("e2a84020-e094-4dd8-97ed-6447592ecd47"),
                    status: s("success"),
                    data: Some(DataInfo {
                        listtype: s("project"),
                        count: s("5"),
                        totalcount: s("35"),
                        numremaining: s("30"),
                        result_id: s("7765623336W-ne68CoA4gAAEEhD7EAAAAP4"),
                    }),
                    key: None,
                    errors: vec![],
                },
                ResultEntry {
                    function: s("read"),
                    controlid: s("19c628be-6bb3-4798-b535-c373b1186584"),
                    status: s("success"),
                    data: Some(DataInfo {
                        listtype: s("PROJECT"),
                        count: s("1"),
                        ..DataInfo::default()
                    }),
                    key: None,
                    errors: vec![],
                },
            ]
        );
        assert!(x.errors.is_empty());
    }

    #[test]
    fn exec_func_error() {
        let x = ok(FUNC_ERROR);
        assert_eq!(x.controlid, s("1543091025"));
        assert!(x.well_formed);
        let auth = x.authentication.clone().unwrap_or_default();
        assert_eq!(auth.userid, s("UUUUU"));
        assert_eq!(auth.companyid, s("XXXXXXXXXXX"));
        assert!(x.errors.is_empty());
        assert_eq!(x.results.len(), 1);
        let result = &x.results[0];
        assert_eq!(result.status, s("failure"));
        assert_eq!(result.function, s("create"));
        assert_eq!(result.controlid, s("testFunctionId"));
        assert_eq!(
            result.data,
            Some(DataInfo {
                listtype: s("objects"),
                count: s("1"),
                ..DataInfo::default()
            })
        );
        assert_eq!(
            result.errors,
            vec![
                ErrorEntry {
                    errorno: s("BL34000061"),
                    description: s(""),
                    description2: s(
                        "Another Project with the given value(s) Fellow PD1  already exists"
                    ),
                    correction: s("Use a unique value instead."),
                },
                error("BL01001973", "Could not create project record!"),
                error("BL01001973", "Error while saving the Project info"),
            ]
        );
    }

    #[test]
    fn exec_login_invalid() {
        let x = ok(LOGIN_INVALID);
        assert_eq!(x.controlid, s("efaa1f0c-58dc-4377-bf26-6aa1d8442fc0"));
        assert!(x.well_formed);
        assert_eq!(
            x.control,
            Some(Control {
                status: s("success"),
                senderid: s("xxxxxx"),
                uniqueid: s("false"),
                dtdversion: s("3.0"),
            })
        );
        assert_eq!(
            x.authentication,
            Some(Authentication {
                status: s("failure"),
                userid: s("xml_gateway"),
                companyid: s("XXXXX"),
                ..Authentication::default()
            })
        );
        assert!(x.results.is_empty());
        assert_eq!(
            x.errors,
            vec![error("XL03000006", "Sign-in information is incorrect")]
        );
    }

    #[test]
    fn exec_xml_error() {
        let x = ok(XML_ERROR);
        assert_eq!(x.controlid, s("1543089995"));
        assert!(x.well_formed);
        assert_eq!(
            x.control,
            Some(Control {
                status: s("failure"),
                senderid: s("senderid"),
                uniqueid: s("false"),
                dtdversion: s("3.0"),
            })
        );
        assert_eq!(x.authentication, None);
        assert!(x.results.is_empty());
        assert_eq!(
            x.errors,
            vec![
                error(
                    "XL03000003",
                    "XML Parse schema error: Fatal Error 76: Opening and ending tag mismatch: \
                     PROJECTID line 18 and PROJECT. Line: 18, column: 62."
                ),
                error(
                    "XL03000003",
                    "XML Parse schema error: Fatal Error 76: Opening and ending tag mismatch: \
                     PROJECT line 17 and CUSTOMER. Line: 21, column: 32."
                ),
            ]
        );
    }

    #[test]
    fn get_object_default_is_unmatched() {
        let x = ok(GET_OBJECT);
        assert_eq!(x.controlid, None);
        assert_eq!(x.control, Some(Control::default()));
        assert_eq!(x.authentication, Some(Authentication::default()));
        assert!(x.well_formed);
        assert_eq!(x.parse_error, None);
        assert_eq!(
            x.results,
            vec![ResultEntry {
                function: s("inspect"),
                controlid: s("57d2cc1e-241b-48f0-9f2f-5243087b4628"),
                status: s("success"),
                data: Some(DataInfo {
                    listtype: s("All"),
                    count: s("1"),
                    ..DataInfo::default()
                }),
                key: None,
                errors: vec![],
            }]
        );
    }

    #[test]
    fn create_attachment_has_key() {
        let x = ok(CREATE_ATTACHMENT);
        assert_eq!(x.controlid, s("1605562013"));
        assert!(x.well_formed);
        assert_eq!(
            x.authentication,
            Some(Authentication {
                status: s("success"),
                userid: s("userid"),
                companyid: None,
                locationid: s(""),
                sessiontimestamp: s("2020-11-16T21:26:54+00:00"),
                sessiontimeout: s("2020-11-17T09:26:54+00:00"),
            })
        );
        assert_eq!(
            x.results,
            vec![ResultEntry {
                function: s("create_supdoc"),
                controlid: s("22606e32-192c-4638-ba57-9e82502cffd7"),
                status: s("success"),
                data: None,
                key: s("35"),
                errors: vec![],
            }]
        );
    }

    #[test]
    fn save_object_create() {
        let x = ok(SAVE_OBJECT);
        assert_eq!(x.controlid, s("1601648276"));
        assert!(x.well_formed);
        assert_eq!(x.control.and_then(|c| c.senderid), s("company"));
        assert_eq!(
            x.results,
            vec![ResultEntry {
                function: s("create"),
                controlid: s("c969275a-6906-477c-a0b6-fd098c093235"),
                status: s("success"),
                data: Some(DataInfo {
                    listtype: s("objects"),
                    count: s("1"),
                    ..DataInfo::default()
                }),
                key: None,
                errors: vec![],
            }]
        );
    }

    #[test]
    fn vendor_response() {
        let x = ok(VENDOR);
        assert_eq!(x.controlid, s("LF14b6850ddd6f4cbe"));
        assert!(x.well_formed);
        assert_eq!(x.results.len(), 2);
        assert_eq!(x.results[0].function, s("read"));
        assert_eq!(x.results[0].controlid, s("LF14b6850ddd6f4cbe"));
        assert_eq!(
            x.results[1].data,
            Some(DataInfo {
                listtype: s("VENDOR"),
                count: s("1"),
                totalcount: s("1"),
                numremaining: s("5"),
                result_id: s("aaaaa"),
            })
        );
    }

    #[test]
    fn every_fixture_survives_truncation_at_every_byte() {
        // No panic anywhere, and every prefix is either refused or consistent.
        for fixture in FIXTURES {
            let full = ok(fixture);
            for cut in 0..fixture.len() {
                match extract(&fixture[..cut]) {
                    Ok(x) if x.well_formed => {
                        let rest = &fixture[cut..];
                        assert!(
                            rest.iter().all(|&b| is_xml_space(b)),
                            "prefix of {cut} bytes reported well formed: {x:?}"
                        );
                        assert_eq!(x, full);
                    }
                    Ok(x) => {
                        // Only what was read before the break, and nothing else.
                        assert_eq!(x.controlid, full.controlid);
                        let (part, whole) = (
                            x.control.unwrap_or_default(),
                            full.control.clone().unwrap_or_default(),
                        );
                        for (got, want) in [
                            (part.status, whole.status),
                            (part.senderid, whole.senderid),
                            (part.uniqueid, whole.uniqueid),
                            (part.dtdversion, whole.dtdversion),
                        ] {
                            assert!(got.is_none() || got == want, "{got:?} vs {want:?}");
                        }
                        assert!(x.results.len() <= full.results.len());
                    }
                    Err(XmlError::Malformed(reason)) => assert_reason_shape(&reason),
                    Err(XmlError::Empty) => assert!(fixture[..cut].is_empty()),
                    Err(other) => panic!("prefix of {cut} bytes: unexpected {other:?}"),
                }
            }
        }
    }

    // ---- encodings --------------------------------------------------------------------------

    #[test]
    fn bom_is_skipped() {
        for fixture in FIXTURES {
            let mut body = UTF8_BOM.to_vec();
            body.extend_from_slice(fixture);
            assert_eq!(ok(&body), ok(fixture));
        }
    }

    #[test]
    fn positions_count_the_bom() {
        let body = b"<response><control><status>x</wrong>";
        let plain = malformed(body);
        let mut with_bom = UTF8_BOM.to_vec();
        with_bom.extend_from_slice(body);
        let bommed = malformed(&with_bom);
        assert!(plain.contains("at byte 28"), "{plain}");
        assert!(bommed.contains("at byte 31"), "{bommed}");
    }

    #[test]
    fn empty_bodies() {
        assert_eq!(extract(b""), Err(XmlError::Empty));
        assert_eq!(extract(b" \r\n\t "), Err(XmlError::Empty));
        assert_eq!(extract(UTF8_BOM), Err(XmlError::Empty));
        assert_eq!(extract(b"\xEF\xBB\xBF\n\n"), Err(XmlError::Empty));
    }

    #[test]
    fn other_encodings_are_refused() {
        let utf16 = b"<?xml version='1.0' encoding='UTF-16'?><response/>";
        assert_eq!(extract(utf16), Err(XmlError::Encoding("UTF-16".to_owned())));
        let cp1252 = b"<?xml version='1.0' encoding='windows-1252'?><response/>";
        assert_eq!(
            extract(cp1252),
            Err(XmlError::Encoding("windows-1252".to_owned()))
        );
        for bom in [&b"\xFF\xFE"[..], b"\xFE\xFF"] {
            let mut body = bom.to_vec();
            body.extend_from_slice(b"<\0r\0");
            assert_eq!(extract(&body), Err(XmlError::Encoding("UTF-16".to_owned())));
        }
        let bom_and_latin1 = b"\xEF\xBB\xBF<?xml version='1.0' encoding='ISO-8859-1'?><response/>";
        assert!(matches!(
            extract(bom_and_latin1),
            Err(XmlError::Encoding(_))
        ));
    }

    #[test]
    fn latin1_is_decoded_exactly() {
        for label in ["ISO-8859-1", "iso-8859-1", "latin1", "ISO_8859-1", "l1"] {
            let mut body = format!(
                "<?xml version=\"1.0\" encoding=\"{label}\"?><response><control>\
                 <senderid>S</senderid><controlid> "
            )
            .into_bytes();
            // "café-ñ-¤" in Latin-1, then a character reference.
            body.extend_from_slice(b"caf\xE9-\xF1-\xA4&#x20AC;");
            body.extend_from_slice(b" </controlid></control><operation><result><status>\xC9</status></result></operation></response>");
            let extracted = ok(&body);
            assert_eq!(extracted.controlid, s("café-ñ-¤€"), "{label}");
            assert_eq!(extracted.results[0].status, s("É"));
            assert!(extracted.well_formed);
        }
        // Bytes that are not UTF-8 are fine in Latin-1; a document that breaks still breaks.
        let body = b"<?xml version='1.0' encoding='ISO-8859-1'?><response><control><controlid>\xFF\xFE</controlid></control><oops></response>";
        let (extracted, _) = partial(body, "\u{FF}\u{FE}");
        assert_eq!(extracted.controlid, s("ÿþ"));
        let body = b"<?xml version='1.0' encoding='ISO-8859-1'?><response><control><controlid>\xE9";
        malformed(body);
        // Without the declaration the same bytes are not UTF-8: refused, never guessed.
        malformed(b"<response><control><controlid>caf\xE9</controlid></control></response>");
    }

    #[test]
    fn utf8_and_ascii_declarations_are_accepted() {
        for encoding in [
            "UTF-8", "utf-8", "Utf8", "UTF8", "US-ASCII", "us-ascii", "ASCII",
        ] {
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"{encoding}\"?><response><control>\
                 <controlid>1</controlid></control></response>"
            );
            assert_eq!(ok(body.as_bytes()).controlid, s("1"), "{encoding}");
        }
        let no_encoding = b"<?xml version=\"1.0\"?><response/>";
        assert!(ok(no_encoding).well_formed);
    }

    #[test]
    fn invalid_utf8_before_controlid_is_malformed() {
        let body = b"<response><control><senderid>a\xFFb</senderid><controlid>1</controlid>";
        let reason = malformed(body);
        assert!(reason.contains("invalid utf-8 at byte 30"), "{reason}");
        // In a tag name as well.
        let reason = malformed(b"<response><con\xC3trol>");
        assert!(reason.contains("utf-8"), "{reason}");
    }

    #[test]
    fn invalid_utf8_after_controlid_is_partial() {
        let template = doc(
            "abc",
            "<operation><result><data><x>@(</x></data></result></operation>",
        );
        let body: Vec<u8> = template
            .iter()
            .map(|&b| if b == b'@' { 0xC3 } else { b })
            .collect();
        let (x, reason) = partial(&body, "abc");
        assert!(reason.contains("invalid utf-8"), "{reason}");
        let bad = body.iter().position(|&b| b == 0xC3).unwrap_or(0);
        assert!(
            reason.contains(&format!("at byte {bad}")),
            "{reason} vs {bad}"
        );
        assert_eq!(x.results.len(), 1);
    }

    // ---- the controlid ----------------------------------------------------------------------

    #[test]
    fn controlid_entities_cdata_and_trimming() {
        let body = doc(
            "\n\t  a&amp;b&#233;&#xE9;&lt;&gt;&quot;&apos;<![CDATA[ <&x> ]]>z \r\n",
            "",
        );
        assert_eq!(ok(&body).controlid, s("a&b\u{e9}\u{e9}<>\"' <&x> z"));
    }

    #[test]
    fn controlid_with_comment_inside_and_leading_reference() {
        let body = doc("&#32; 12<!-- note -->34 &#x20;", "");
        assert_eq!(ok(&body).controlid, s("1234"));
    }

    #[test]
    fn controlid_keeps_inner_white_space_and_non_ascii() {
        let body = doc("  ab  cd \u{e9}t\u{e9} ", "");
        assert_eq!(ok(&body).controlid, s("ab  cd \u{e9}t\u{e9}"));
    }

    #[test]
    fn empty_controlid_is_unmatched_but_well_formed() {
        for inner in ["", "   \n  ", "<![CDATA[]]>"] {
            let x = ok(&doc(inner, ""));
            assert_eq!(x.controlid, None, "{inner:?}");
            assert!(x.well_formed);
            assert_eq!(x.control.and_then(|c| c.status), s("success"));
        }
        let x = ok(b"<response><control><controlid/></control></response>");
        assert_eq!(x.controlid, None);
        assert_eq!(x.control, Some(Control::default()));
    }

    #[test]
    fn no_control_block() {
        let x = ok(b"<response><operation><authentication/></operation></response>");
        assert_eq!(x.control, None);
        assert_eq!(x.controlid, None);
        assert_eq!(x.authentication, Some(Authentication::default()));
        assert!(x.well_formed);
        let x = ok(b"<response/>");
        assert_eq!(
            x,
            Extracted {
                well_formed: true,
                ..Extracted::default()
            }
        );
    }

    #[test]
    fn controlid_length_limit() {
        let longest = "x".repeat(MAX_CONTROLID_BYTES);
        assert_eq!(ok(&doc(&longest, "")).controlid, Some(longest.clone()));
        let padded = format!("   {longest}\n\n");
        assert_eq!(ok(&doc(&padded, "")).controlid, Some(longest.clone()));
        let too_long = "x".repeat(MAX_CONTROLID_BYTES + 1);
        assert_eq!(
            extract(&doc(&too_long, "")),
            Err(XmlError::ControlIdTooLong)
        );
        // Multi-byte characters count in bytes: 513 × 2 bytes = 1026.
        let wide = "\u{e9}".repeat(513);
        assert_eq!(extract(&doc(&wide, "")), Err(XmlError::ControlIdTooLong));
        // Refused as soon as known, even when the document then breaks.
        let body = format!("<response><control><controlid>{too_long}");
        assert_eq!(extract(body.as_bytes()), Err(XmlError::ControlIdTooLong));
        // Built from references too.
        let refs = "&#120;".repeat(MAX_CONTROLID_BYTES + 1);
        assert_eq!(extract(&doc(&refs, "")), Err(XmlError::ControlIdTooLong));
    }

    #[test]
    fn controlid_with_huge_trailing_white_space() {
        let value = format!("abc{}", " ".repeat(5_000_000));
        assert_eq!(ok(&doc(&value, "")).controlid, s("abc"));
        let inner = format!("a{}b", " ".repeat(2_000));
        assert_eq!(extract(&doc(&inner, "")), Err(XmlError::ControlIdTooLong));
    }

    #[test]
    fn only_the_control_level_controlid_counts() {
        let body = b"<response><operation><result><controlid>fn</controlid></result></operation>\
                     <control><controlid>top</controlid><controlid>second</controlid></control>\
                     </response>";
        let x = ok(body);
        assert_eq!(x.controlid, s("top"));
        assert_eq!(x.results[0].controlid, s("fn"));
        // A controlid elsewhere is not the control-level one.
        let x = ok(
            b"<response><controlid>1</controlid><x><control><controlid>2</controlid>\
                     </control></x></response>",
        );
        assert_eq!(x.controlid, None);
        assert_eq!(x.control, None);
    }

    // ---- refused documents ------------------------------------------------------------------

    #[test]
    fn doctype_is_refused() {
        let plain = b"<?xml version=\"1.0\"?><!DOCTYPE response><response/>";
        assert_eq!(extract(plain), Err(XmlError::Doctype));
        let lower = b"<!doctype response><response/>";
        assert_eq!(extract(lower), Err(XmlError::Doctype));
        let nameless = b"<!DOCTYPE><response/>";
        assert_eq!(extract(nameless), Err(XmlError::Doctype));
        let unclosed = b"<!DOCTYPE response [ <!ENTITY a \"b\">";
        assert_eq!(extract(unclosed), Err(XmlError::Doctype));
        let external =
            b"<!DOCTYPE response SYSTEM \"file:///etc/passwd\"><response>&xxe;</response>";
        assert_eq!(extract(external), Err(XmlError::Doctype));
    }

    #[test]
    fn billion_laughs_is_refused() {
        let body = br#"<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol9 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
]>
<response><control><controlid>&lol9;</controlid></control></response>"#;
        assert_eq!(extract(body), Err(XmlError::Doctype));
    }

    #[test]
    fn doctype_after_the_controlid_is_still_refused() {
        let body = doc("1", "<!DOCTYPE x>");
        assert_eq!(extract(&body), Err(XmlError::Doctype));
        let mut trailing = doc("1", "");
        trailing.extend_from_slice(b"<!DOCTYPE x>");
        assert_eq!(extract(&trailing), Err(XmlError::Doctype));
    }

    #[test]
    fn root_must_be_response() {
        assert_eq!(
            extract(b"<foo><control><controlid>1</controlid></control></foo>"),
            Err(XmlError::NotResponse("foo".to_owned()))
        );
        assert_eq!(
            extract(b"<?xml version=\"1.0\"?>\n<!-- hi -->\n<request/>"),
            Err(XmlError::NotResponse("request".to_owned()))
        );
        let long = format!("<{}/>", "a".repeat(10_000));
        match extract(long.as_bytes()) {
            Err(XmlError::NotResponse(name)) => assert!(name.len() < 100, "{name}"),
            other => panic!("{other:?}"),
        }
    }

    // ---- broken documents -------------------------------------------------------------------

    #[test]
    fn not_xml() {
        malformed(b"hello world");
        malformed(b"{\"controlid\": \"1\"}");
        malformed(b"\x00\x01\x02\x03\xFF\xFE");
        malformed(b"<");
        malformed(b"<<<<>>>>");
        malformed(b"< response/>");
        malformed(b"<1response/>");
        let reason = malformed(b"<response><control><a&b/>");
        assert!(reason.contains("invalid element name"), "{reason}");
        malformed(b"<!-- only a comment -->");
        let reason = malformed(b"  text <response/>");
        assert!(reason.contains("before the root element"), "{reason}");
    }

    #[test]
    fn truncated_before_controlid_is_malformed() {
        let cut = PROJECT_SUCCESS
            .windows(b"<controlid>".len())
            .position(|w| w == b"<controlid>")
            .unwrap_or(0);
        for end in [10, cut, cut + 5, cut + "<controlid>1543".len()] {
            malformed(&PROJECT_SUCCESS[..end]);
        }
    }

    #[test]
    fn truncated_after_controlid_is_partial() {
        let marker = b"<NAME>CONF Program";
        let cut = PROJECT_SUCCESS
            .windows(marker.len())
            .position(|w| w == marker)
            .unwrap_or(0)
            + marker.len();
        let (x, reason) = partial(&PROJECT_SUCCESS[..cut], "1543102188");
        assert!(reason.contains("unexpected end of input"), "{reason}");
        assert!(reason.contains(&format!("at byte {cut}")), "{reason}");
        assert_eq!(x.control.and_then(|c| c.dtdversion), s("3.0"));
        assert_eq!(x.authentication.and_then(|a| a.userid), s("UUUU"));
        assert_eq!(x.results.len(), 1);
        assert_eq!(x.results[0].function, s("readByQuery"));
        assert_eq!(
            x.results[0].data.as_ref().and_then(|d| d.count.clone()),
            s("5")
        );

        // Cut inside a tag, and right after the controlid end tag.
        partial(&PROJECT_SUCCESS[..cut - 8], "1543102188");
        let end = PROJECT_SUCCESS
            .windows(b"</controlid>".len())
            .position(|w| w == b"</controlid>")
            .unwrap_or(0)
            + b"</controlid>".len();
        partial(&PROJECT_SUCCESS[..end], "1543102188");
    }

    #[test]
    fn mismatched_tags() {
        let reason = malformed(b"<response><control><status>ok</foo></control></response>");
        assert!(reason.contains("mismatched end tag </foo>"), "{reason}");
        assert!(reason.contains("at byte 29"), "{reason}");
        let (_, reason) = partial(&doc("42", "<operation><result></operation>"), "42");
        assert!(
            reason.contains("mismatched end tag </operation>"),
            "{reason}"
        );
        let reason = malformed(b"<response></control>");
        assert!(reason.contains("</control>"), "{reason}");
    }

    #[test]
    fn unknown_entities_break_the_document() {
        let reason = malformed(&doc("a&foo;b", ""));
        assert!(reason.contains("unknown entity &foo;"), "{reason}");
        let (_, reason) = partial(&doc("1", "<operation><x>&nbsp;</x></operation>"), "1");
        assert!(reason.contains("unknown entity &nbsp;"), "{reason}");
        let reason = malformed(b"<response><control><controlid>a & b</controlid>");
        assert!(reason.contains("';'"), "{reason}");
    }

    #[test]
    fn invalid_character_references_break_the_document() {
        for bad in [
            "&#0;",
            "&#1;",
            "&#xD800;",
            "&#x110000;",
            "&#xFFFE;",
            "&#abc;",
            "&#;",
        ] {
            let reason = malformed(&doc(bad, ""));
            assert!(
                reason.contains("invalid character reference"),
                "{bad}: {reason}"
            );
        }
        assert_eq!(ok(&doc("&#x1F600;&#9;x", "")).controlid, s("\u{1F600}\tx"));
    }

    #[test]
    fn trailing_content_after_the_root() {
        let mut body = doc("7", "");
        body.extend_from_slice(b"\n  <!-- fine -->\n<?pi fine?>\n");
        assert!(ok(&body).well_formed);

        let mut element = doc("7", "");
        element.extend_from_slice(b"<response/>");
        let (_, reason) = partial(&element, "7");
        assert!(reason.contains("after the root element"), "{reason}");

        let mut text = doc("7", "");
        text.extend_from_slice(b"\ngarbage");
        partial(&text, "7");

        let mut reference = doc("7", "");
        reference.extend_from_slice(b"&amp;");
        partial(&reference, "7");

        let mut cdata = doc("7", "");
        cdata.extend_from_slice(b"<![CDATA[x]]>");
        partial(&cdata, "7");

        let mut end = doc("7", "");
        end.extend_from_slice(b"</response>");
        partial(&end, "7");
    }

    #[test]
    fn xml_declaration_must_come_first() {
        malformed(b"<!-- c --><?xml version=\"1.0\"?><response/>");
        let (_, reason) = partial(&doc("1", "<?xml version=\"1.0\"?>"), "1");
        assert!(reason.contains("xml declaration"), "{reason}");
        // Leading white space before it is tolerated.
        assert!(ok(b"\n<?xml version=\"1.0\"?><response/>").well_formed);
    }

    #[test]
    fn broken_with_empty_controlid_is_malformed() {
        malformed(&doc("  ", "<operation>")[..60]);
        malformed(b"<response><control><controlid></controlid></control><x></y></response>");
    }

    #[test]
    fn nesting_depth_is_bounded() {
        let mut at_limit = String::from("<response><control><controlid>d</controlid></control>");
        at_limit.push_str(&"<a>".repeat(MAX_DEPTH - 1));
        at_limit.push_str(&"</a>".repeat(MAX_DEPTH - 1));
        at_limit.push_str("</response>");
        assert!(ok(at_limit.as_bytes()).well_formed);

        let mut over = String::from("<response>");
        over.push_str(&"<a>".repeat(MAX_DEPTH - 1));
        over.push_str("<b/>");
        let reason = malformed(over.as_bytes());
        assert!(reason.contains("nested deeper"), "{reason}");
    }

    #[test]
    fn deep_nesting_fails_fast() {
        let n = 200_000;
        let mut body = String::with_capacity(n * 8);
        body.push_str("<response>");
        body.push_str(&"<a>".repeat(n));
        body.push_str(&"</a>".repeat(n));
        body.push_str("</response>");
        let started = Instant::now();
        let reason = malformed(body.as_bytes());
        assert!(reason.contains("nested deeper"), "{reason}");
        assert!(started.elapsed() < Duration::from_secs(2));

        let deep = doc("deep", &format!("{}{}", "<a>".repeat(n), "</a>".repeat(n)));
        let started = Instant::now();
        let (_, reason) = partial(&deep, "deep");
        assert!(reason.contains("nested deeper"), "{reason}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    // ---- data and attributes ----------------------------------------------------------------

    #[test]
    fn many_attributes_inside_data_are_fast() {
        let mut attributes = String::with_capacity(80_000 * 16);
        for i in 0..80_000 {
            attributes.push_str(&format!(" a{i}=\"v\""));
        }
        let body = doc(
            "attrs",
            &format!(
                "<operation><result><status>success</status><data count=\"3\">\
                 <rec{attributes}/><rec{attributes}>x</rec></data></result></operation>"
            ),
        );
        let started = Instant::now();
        let x = ok(&body);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(x.well_formed);
        assert_eq!(
            x.results[0].data.as_ref().and_then(|d| d.count.clone()),
            s("3")
        );
    }

    #[test]
    fn many_duplicate_attributes_on_data_are_fast() {
        let duplicates = " count=\"9\"".repeat(80_000);
        let body = doc(
            "dup",
            &format!(
                "<operation><result><data listtype=\"x\"{duplicates} totalcount=\"2\"/>\
                 </result></operation>"
            ),
        );
        let started = Instant::now();
        let x = ok(&body);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            x.results[0].data,
            Some(DataInfo {
                listtype: s("x"),
                count: s("9"),
                // Beyond the first 64 attributes: not read.
                totalcount: None,
                ..DataInfo::default()
            })
        );
    }

    #[test]
    fn data_attributes_are_unescaped() {
        let body = doc(
            "d",
            "<operation><result><data listtype='a&amp;b' resultId=\"r&#233;&quot;\" \
             count=\"1\" other=\"&bogus;\"/></result></operation>",
        );
        let x = ok(&body);
        assert_eq!(
            x.results[0].data,
            Some(DataInfo {
                listtype: s("a&b"),
                count: s("1"),
                result_id: s("r\u{e9}\""),
                ..DataInfo::default()
            })
        );
        let bad = doc(
            "d",
            "<operation><result><data count=\"&bogus;\"/></result></operation>",
        );
        let (_, reason) = partial(&bad, "d");
        assert!(reason.contains("<data>"), "{reason}");
        let broken = doc(
            "d",
            "<operation><result><data count=1/></result></operation>",
        );
        partial(&broken, "d");
    }

    #[test]
    fn data_children_are_ignored() {
        let body = doc(
            "c",
            "<operation><result><status>success</status><data count=\"1\"><status>no</status>\
             <controlid>no</controlid><errormessage><error><errorno>no</errorno></error>\
             </errormessage></data></result></operation>",
        );
        let x = ok(&body);
        assert_eq!(x.controlid, s("c"));
        assert_eq!(x.results[0].status, s("success"));
        assert_eq!(x.results[0].controlid, None);
        assert!(x.results[0].errors.is_empty());
        assert!(x.errors.is_empty());
    }

    #[test]
    fn large_body_is_linear() {
        let record = "<project><RECORDNO>989</RECORDNO><NAME>Advisory &amp; Council</NAME>\
                      <NOTE><![CDATA[some <cdata>]]></NOTE><EMPTY/></project>\n";
        let records = record.repeat(32 * 1024 * 1024 / record.len());
        let body = doc(
            "big",
            &format!(
                "<operation><result><status>success</status><data count=\"1\">{records}</data>\
                 </result></operation>"
            ),
        );
        let started = Instant::now();
        let x = ok(&body);
        assert!(x.well_formed);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    // ---- structure --------------------------------------------------------------------------

    #[test]
    fn errors_are_collected_in_document_order() {
        let body = b"<response><errormessage><error><errorno>1</errorno></error></errormessage>\
            <control><controlid>o</controlid></control>\
            <operation><errormessage><error><errorno>2</errorno><correction> fix </correction>\
            </error><error/></errormessage>\
            <result><errormessage><error><description2>r</description2></error></errormessage>\
            </result></operation>\
            <errormessage><error><errorno>3</errorno></error></errormessage></response>";
        let x = ok(body);
        assert_eq!(
            x.errors,
            vec![
                ErrorEntry {
                    errorno: s("1"),
                    ..ErrorEntry::default()
                },
                ErrorEntry {
                    errorno: s("2"),
                    correction: s("fix"),
                    ..ErrorEntry::default()
                },
                ErrorEntry::default(),
                ErrorEntry {
                    errorno: s("3"),
                    ..ErrorEntry::default()
                },
            ]
        );
        assert_eq!(
            x.results[0].errors,
            vec![ErrorEntry {
                description2: s("r"),
                ..ErrorEntry::default()
            }]
        );
    }

    #[test]
    fn present_but_empty_fields_are_some_empty() {
        let body = b"<response><control><status/><senderid>  </senderid><controlid>x</controlid>\
            </control><operation><authentication><userid></userid></authentication>\
            <result><function/><key> </key></result></operation></response>";
        let x = ok(body);
        let control = x.control.unwrap_or_default();
        assert_eq!(control.status, s(""));
        assert_eq!(control.senderid, s(""));
        assert_eq!(control.uniqueid, None);
        let auth = x.authentication.unwrap_or_default();
        assert_eq!(auth.userid, s(""));
        assert_eq!(auth.status, None);
        assert_eq!(x.results[0].function, s(""));
        assert_eq!(x.results[0].key, s(""));
        assert_eq!(x.results[0].status, None);
    }

    #[test]
    fn operation_without_authentication() {
        let x = ok(&doc("1", "<operation/>"));
        assert_eq!(x.authentication, Some(Authentication::default()));
        assert!(x.results.is_empty());
        let x = ok(&doc("1", ""));
        assert_eq!(x.authentication, None);
    }

    #[test]
    fn first_occurrence_wins_and_nested_text_is_ignored() {
        let body = b"<response><control><status>one</status><status>two</status>\
            <senderid>a<b>ignored</b>c</senderid><controlid>k</controlid></control>\
            <control><dtdversion>3.0</dtdversion></control></response>";
        let x = ok(body);
        assert_eq!(
            x.control,
            Some(Control {
                status: s("one"),
                senderid: s("ac"),
                uniqueid: None,
                dtdversion: s("3.0"),
            })
        );
    }

    #[test]
    fn namespace_prefixes_and_crlf() {
        let body =
            b"<r:response xmlns:r=\"urn:x\">\r\n<r:control><r:controlid>a\r\nb</r:controlid>\
            </r:control></r:response>";
        let x = ok(body);
        assert_eq!(x.controlid, s("a\nb"));
    }

    #[test]
    fn comments_and_pis_in_prolog_and_inside() {
        let body = b"<?xml version='1.0'?><!-- a --><?pi x?>\n<response><!-- b --><control>\
            <controlid><!-- c -->9<?pi y?></controlid></control></response><!-- d -->";
        assert_eq!(ok(body).controlid, s("9"));
    }

    #[test]
    fn text_buffer_trims_and_caps() {
        let mut text = TextBuf::new();
        text.reset(4);
        for piece in [" \n", " ab", "c", "  ", "\t"] {
            text.push(piece);
        }
        assert_eq!((text.value(), text.trimmed_len()), ("abc".to_owned(), 3));
        // A character cut by the cap makes the value too long, and nothing after it is kept.
        text.reset(4);
        for piece in ["abc", "\u{e9}", " "] {
            text.push(piece);
        }
        assert_eq!(text.buf, "abc");
        assert_eq!(text.trimmed_len(), 5);
        // Trailing white space beyond the cap is dropped without being kept.
        text.reset(4);
        for piece in ["ab", "      ", "  "] {
            text.push(piece);
        }
        assert_eq!(
            (text.value(), text.trimmed_len(), text.buf.len()),
            ("ab".to_owned(), 2, 4)
        );
    }

    #[test]
    fn extracted_round_trips_through_json() {
        let x = ok(PROJECT_SUCCESS);
        let json = serde_json::to_string(&x).unwrap_or_default();
        assert!(json.contains("\"resultId\":\"7765623336W-ne68CoA4gAAEEhD7EAAAAP4\""));
        let back: Extracted = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, x);
    }
}
