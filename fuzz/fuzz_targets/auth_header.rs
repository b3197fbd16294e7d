//! Feeds arbitrary header values to the Basic and Bearer parsers: no panic, and what they accept
//! is consistent with the input.

#![no_main]

use callback_receiver::auth::{parse_basic, parse_bearer, MAX_HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    if let Ok(credentials) = parse_basic(&value) {
        assert!(data.len() <= MAX_HEADER_BYTES);
        assert!(!credentials.user.contains(':'));
    }
    if let Ok(token) = parse_bearer(&value) {
        assert!(data.len() <= MAX_HEADER_BYTES);
        let token = token.expose();
        assert!(!token.is_empty());
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b)));
    }
});
