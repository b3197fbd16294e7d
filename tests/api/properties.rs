//! Property tests of the parsers that face the network: the XML extractor keys every delivery by
//! exactly the controlid that was sent, whatever its characters and however they are written;
//! Basic and Bearer credentials survive encoding and parsing unchanged.

use base64::Engine;
use callback_receiver::auth::{parse_basic, parse_bearer};
use callback_receiver::xml::extract;
use proptest::prelude::*;

/// A character allowed in an XML 1.0 document.
fn xml_char() -> impl Strategy<Value = char> {
    prop_oneof![
        8 => prop::char::range(' ', '~'),
        2 => prop::sample::select(vec!['\t', '\n', '\r', ' ', '<', '>', '&', '"', '\'', ']']),
        2 => prop::char::range('\u{A0}', '\u{D7FF}'),
        1 => prop::char::range('\u{E000}', '\u{FFFD}'),
        1 => prop::char::range('\u{10000}', '\u{10FFFF}'),
    ]
}

/// How one character is written in the document.
#[derive(Debug, Clone, Copy)]
enum Form {
    Literal,
    Decimal,
    Hex,
    Cdata,
}

fn form() -> impl Strategy<Value = Form> {
    prop_oneof![
        6 => Just(Form::Literal),
        1 => Just(Form::Decimal),
        1 => Just(Form::Hex),
        2 => Just(Form::Cdata),
    ]
}

/// Writes `c` in `form`; a carriage return is always a reference, since a literal one is
/// normalised to a line feed by every XML parser.
fn write_char(out: &mut String, c: char, form: Form) {
    match (c, form) {
        ('\r', _) | (_, Form::Decimal) => out.push_str(&format!("&#{};", u32::from(c))),
        (_, Form::Hex) => out.push_str(&format!("&#x{:X};", u32::from(c))),
        (_, Form::Cdata) => {
            out.push_str("<![CDATA[");
            out.push(c);
            out.push_str("]]>");
        }
        ('<', Form::Literal) => out.push_str("&lt;"),
        ('&', Form::Literal) => out.push_str("&amp;"),
        ('>', Form::Literal) => out.push_str("&gt;"),
        (_, Form::Literal) => out.push(c),
    }
}

fn is_xml_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_extractor_returns_the_controlid_that_was_sent(
        chars in prop::collection::vec((xml_char(), form()), 1..120),
        lead in "[ \t\n]{0,3}",
        trail in "[ \t\n]{0,3}",
        function_controlid in "[a-z0-9]{1,8}",
    ) {
        let sent: String = chars.iter().map(|(c, _)| *c).collect();
        let mut written = String::new();
        for (c, f) in &chars {
            write_char(&mut written, *c, *f);
        }
        let doc = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response>\n  <control>\n    \
             <status>success</status>\n    <senderid>s</senderid>\n    \
             <controlid>{lead}{written}{trail}</controlid>\n  </control>\n  <operation>\
             <result><status>success</status><function>readByQuery</function>\
             <controlid>{function_controlid}</controlid></result></operation>\n</response>\n"
        );
        let expected = sent.trim_matches(is_xml_space);
        let extracted = extract(doc.as_bytes())
            .map_err(|e| TestCaseError::fail(format!("{e}: {doc:?}")))?;
        prop_assert!(extracted.well_formed, "{:?}", extracted.parse_error);
        if expected.is_empty() {
            prop_assert_eq!(extracted.controlid, None);
        } else {
            prop_assert_eq!(extracted.controlid.as_deref(), Some(expected));
        }
        prop_assert_eq!(
            extracted.results[0].controlid.as_deref(),
            Some(function_controlid.as_str())
        );
    }

    #[test]
    fn latin1_documents_give_the_same_controlid_as_utf8(
        sent in "[\\x20-\\x7E\\u{A0}-\\u{FF}]{1,60}",
    ) {
        let escaped = sent
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        let utf8 = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><response><control>\
             <controlid>{escaped}</controlid></control></response>"
        );
        let mut latin1 = Vec::new();
        for c in utf8.replace("UTF-8", "ISO-8859-1").chars() {
            latin1.push(u8::try_from(u32::from(c)).expect("latin-1"));
        }
        let a = extract(utf8.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let b = extract(&latin1).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&a.controlid, &b.controlid);
        prop_assert_eq!(a.controlid.as_deref(), Some(sent.trim_matches(is_xml_space)).filter(|s| !s.is_empty()));
    }

    #[test]
    fn basic_credentials_roundtrip(
        user in "[^:\\x00]{0,40}",
        password in "\\PC{0,40}",
        spaces in 1usize..4,
        scheme in prop::sample::select(vec!["Basic", "basic", "BASIC"]),
        padded in any::<bool>(),
    ) {
        let raw = format!("{user}:{password}");
        let encoded = if padded {
            base64::engine::general_purpose::STANDARD.encode(raw.as_bytes())
        } else {
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw.as_bytes())
        };
        let header = http::HeaderValue::from_str(&format!("{scheme}{}{encoded}", " ".repeat(spaces)))
            .expect("ascii header");
        let parsed = parse_basic(&header).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed.user, user);
        prop_assert_eq!(parsed.password.expose(), password.as_str());
    }

    #[test]
    fn bearer_tokens_roundtrip(token in "[A-Za-z0-9._~+/-]{1,200}={0,2}") {
        let header = http::HeaderValue::from_str(&format!("Bearer {token}")).expect("header");
        let parsed = parse_bearer(&header).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed.expose(), token.as_str());
    }
}
