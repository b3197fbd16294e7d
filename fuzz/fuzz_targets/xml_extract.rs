//! Feeds arbitrary bytes to the XML extractor and checks what it promises whatever the input:
//! no panic, a control-level controlid that is non-empty, trimmed and within the length limit,
//! and a parse error exactly when the document is not well formed.

#![no_main]

use callback_receiver::xml::{extract, MAX_CONTROLID_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(extracted) = extract(data) {
        if let Some(controlid) = &extracted.controlid {
            assert!(!controlid.is_empty());
            assert!(controlid.len() <= MAX_CONTROLID_BYTES);
            assert_eq!(
                controlid.trim_matches([' ', '\t', '\r', '\n']),
                controlid.as_str()
            );
        }
        assert_eq!(extracted.well_formed, extracted.parse_error.is_none());
        if !extracted.well_formed {
            assert!(extracted.controlid.is_some());
        }
    }
});
