//! Authentication: parsing `Authorization` headers and checking secrets.
//!
//! The gateway authenticates its callbacks with HTTP Basic (RFC 7617) and integrators present a
//! Bearer token (RFC 6750). This module is the one place that turns those headers into values and
//! compares them with the configured secrets, so the rules live together:
//!
//! - secrets are wrapped in [`SecretString`], which never prints its content;
//! - every comparison runs in constant time over SHA-256 digests, so neither the content nor the
//!   length of a configured secret leaks through timing;
//! - hashed secrets ([`PasswordHash`], argon2id PHC strings) are expensive to check, so the
//!   [`Verifier`] remembers digests of credentials it has already verified and runs argon2 on a
//!   blocking thread only when it has to.
//!
//! This module does no I/O and knows nothing about policies, pollers or HTTP routing.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::SaltString;
use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The largest `Authorization` header value this module parses, in bytes.
pub const MAX_HEADER_BYTES: usize = 1024;

/// Standard base64 that accepts the input with or without its `=` padding.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a header, a hash or a hashing request was refused.
///
/// The messages name the problem, never the secret involved.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The header value is longer than [`MAX_HEADER_BYTES`].
    #[error("authorization header is too long")]
    TooLong,
    /// The header does not use the `Basic` scheme.
    #[error("authorization header is not basic")]
    NotBasic,
    /// The header does not use the `Bearer` scheme.
    #[error("authorization header is not bearer")]
    NotBearer,
    /// The scheme is right but nothing follows it.
    #[error("authorization header has no credentials")]
    NoCredentials,
    /// The Basic credentials are not base64.
    #[error("credentials are not valid base64")]
    InvalidBase64,
    /// The decoded Basic credentials are not UTF-8.
    #[error("credentials are not utf-8")]
    NotUtf8,
    /// The decoded Basic credentials have no colon between user id and password.
    #[error("credentials have no colon")]
    NoColon,
    /// The Bearer token has characters outside the RFC 6750 `b64token` set.
    #[error("bearer token has invalid characters")]
    InvalidToken,
    /// The string is not a PHC password hash that argon2 can verify.
    #[error("password hash is not a valid argon2 phc string ({0})")]
    InvalidHash(argon2::password_hash::Error),
    /// The PHC string uses an algorithm other than argon2id.
    #[error("password hash is not argon2id")]
    NotArgon2id,
    /// argon2 could not hash the secret.
    #[error("hashing the secret failed ({0})")]
    Hashing(argon2::password_hash::Error),
}

/// A secret (password or token) that prints as `[redacted]` and is wiped when dropped.
///
/// Wiping is best effort: copies made before the value was wrapped (by the TOML parser, by hyper)
/// are out of reach, and no `unsafe` is used to defeat the optimiser.
#[derive(Clone, Default)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself; call this only where it is compared or hashed.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretString {
    fn from(secret: String) -> Self {
        Self(secret)
    }
}

impl From<&str> for SecretString {
    fn from(secret: &str) -> Self {
        Self(secret.to_owned())
    }
}

/// The secret's bytes, so that a [`SecretString`] can be handed to [`Verifier::verify_async`].
impl AsRef<[u8]> for SecretString {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Drop for SecretString {
    fn drop(&mut self) {
        wipe(std::mem::take(&mut self.0).into_bytes());
    }
}

impl<'de> serde::Deserialize<'de> for SecretString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self)
    }
}

/// Overwrites a buffer, spare capacity included, with zeros before it is freed.
fn wipe(mut bytes: Vec<u8>) {
    let capacity = bytes.capacity();
    bytes.clear();
    bytes.resize(capacity, 0);
    std::hint::black_box(&bytes);
}

/// A validated argon2id PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
///
/// `Debug` shows the algorithm only: the hash is not the secret, but it allows offline guessing.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(String);

impl PasswordHash {
    /// Checks that `phc` is an argon2id PHC string with a salt, a hash and usable parameters.
    pub fn parse(phc: &str) -> Result<Self, AuthError> {
        let parsed = argon2::PasswordHash::new(phc).map_err(AuthError::InvalidHash)?;
        if parsed.algorithm != argon2::ARGON2ID_IDENT {
            return Err(AuthError::NotArgon2id);
        }
        if let Some(version) = parsed.version {
            argon2::Version::try_from(version)
                .map_err(|_| AuthError::InvalidHash(argon2::password_hash::Error::Version))?;
        }
        argon2::Params::try_from(&parsed).map_err(AuthError::InvalidHash)?;
        if parsed.salt.is_none() || parsed.hash.is_none() {
            return Err(AuthError::InvalidHash(
                argon2::password_hash::Error::PhcStringField,
            ));
        }
        Ok(Self(phc.to_owned()))
    }

    /// The PHC string as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hash algorithm's name; always `argon2id`.
    pub fn algorithm(&self) -> &'static str {
        "argon2id"
    }

    /// Runs argon2 on `presented`: the slow path, 10 to 50 ms of CPU.
    fn verify_slow(&self, presented: &[u8]) -> bool {
        match argon2::PasswordHash::new(&self.0) {
            Ok(parsed) => Argon2::default()
                .verify_password(presented, &parsed)
                .is_ok(),
            Err(_) => false,
        }
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordHash")
            .field("algorithm", &self.algorithm())
            .finish_non_exhaustive()
    }
}

impl FromStr for PasswordHash {
    type Err = AuthError;

    fn from_str(phc: &str) -> Result<Self, AuthError> {
        Self::parse(phc)
    }
}

impl TryFrom<String> for PasswordHash {
    type Error = AuthError;

    fn try_from(phc: String) -> Result<Self, AuthError> {
        Self::parse(&phc)
    }
}

impl<'de> serde::Deserialize<'de> for PasswordHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let phc = String::deserialize(deserializer)?;
        Self::parse(&phc).map_err(serde::de::Error::custom)
    }
}

/// What [`Verifier::verify_any_quick`] could tell without argon2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quick {
    /// The candidate at this index matches.
    Match(usize),
    /// No candidate matches, and none is left for argon2.
    NoMatch,
    /// No plain candidate or cached hash matches; argon2 has to check the hashed ones.
    NeedsArgon2,
}

/// A configured secret: either the secret itself or its argon2id hash.
#[derive(Clone, Debug)]
pub enum Credential {
    /// The secret in clear, from `password` / `token`.
    Plain(SecretString),
    /// The secret's argon2id hash, from `password_hash` / `token_hash`.
    Hash(PasswordHash),
}

/// Hashes `secret` into an argon2id PHC string with a random salt and default parameters.
pub fn hash_secret(secret: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(AuthError::Hashing)
}

/// The user id and password of an RFC 7617 Basic `Authorization` header.
#[derive(Clone, Debug)]
pub struct BasicCredentials {
    /// The user id: everything before the first colon (may be empty).
    pub user: String,
    /// The password: everything after the first colon, colons included (may be empty).
    pub password: SecretString,
}

/// Splits `Scheme credentials` into the credentials, checking the scheme case-insensitively.
///
/// One or more spaces (or tabs) may separate the scheme from the credentials.
fn split_scheme<'a>(
    header: &'a http::HeaderValue,
    scheme: &str,
    wrong_scheme: AuthError,
) -> Result<&'a [u8], AuthError> {
    let bytes = header.as_bytes();
    if bytes.len() > MAX_HEADER_BYTES {
        return Err(AuthError::TooLong);
    }
    let bytes = bytes.trim_ascii();
    let (name, rest) = match bytes.iter().position(|b| *b == b' ' || *b == b'\t') {
        Some(at) => (&bytes[..at], bytes[at..].trim_ascii_start()),
        None => (bytes, &b""[..]),
    };
    if !name.eq_ignore_ascii_case(scheme.as_bytes()) {
        return Err(wrong_scheme);
    }
    if rest.is_empty() {
        return Err(AuthError::NoCredentials);
    }
    Ok(rest)
}

/// Parses an RFC 7617 `Authorization: Basic base64(user:password)` header.
pub fn parse_basic(header: &http::HeaderValue) -> Result<BasicCredentials, AuthError> {
    let encoded = split_scheme(header, "basic", AuthError::NotBasic)?;
    let decoded = BASE64
        .decode(encoded)
        .map_err(|_| AuthError::InvalidBase64)?;
    let decoded = String::from_utf8(decoded).map_err(|e| {
        wipe(e.into_bytes());
        AuthError::NotUtf8
    })?;
    let Some(colon) = decoded.find(':') else {
        wipe(decoded.into_bytes());
        return Err(AuthError::NoColon);
    };
    let credentials = BasicCredentials {
        user: decoded[..colon].to_owned(),
        password: SecretString::from(&decoded[colon + 1..]),
    };
    wipe(decoded.into_bytes());
    Ok(credentials)
}

/// Parses an RFC 6750 `Authorization: Bearer TOKEN` header; the token must be a `b64token`.
pub fn parse_bearer(header: &http::HeaderValue) -> Result<SecretString, AuthError> {
    let token = split_scheme(header, "bearer", AuthError::NotBearer)?;
    let body_len = token.len() - token.iter().rev().take_while(|b| **b == b'=').count();
    let (body, _padding) = token.split_at(body_len);
    let valid = !body.is_empty()
        && body
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(b));
    if !valid {
        return Err(AuthError::InvalidToken);
    }
    // Every byte is ASCII, so this cannot fail; the error arm only avoids an `expect`.
    std::str::from_utf8(token)
        .map(SecretString::from)
        .map_err(|_| AuthError::InvalidToken)
}

/// SHA-256 of `bytes`.
fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Compares two byte strings in constant time, whatever their lengths.
fn ct_digest_eq(a: &[u8], b: &[u8]) -> bool {
    digest(a).ct_eq(&digest(b)).into()
}

/// The cache key of a verified hashed credential: SHA-256(PHC string || 0x00 || presented).
///
/// A PHC string never contains a NUL byte, so the encoding is unambiguous.
fn cache_key(hash: &PasswordHash, presented: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(hash.as_str().as_bytes());
    hasher.update([0u8]);
    hasher.update(presented);
    hasher.finalize().into()
}

/// The digests of verified credentials, oldest first.
#[derive(Default)]
struct Cache {
    /// The digests, for lookup.
    set: HashSet<[u8; 32]>,
    /// The same digests in insertion order, for eviction.
    order: VecDeque<[u8; 32]>,
}

/// Checks presented secrets against configured [`Credential`]s in constant time.
///
/// Argon2 costs 10 to 50 ms of CPU, too much to pay on every callback, so successful checks of
/// hashed credentials are remembered: the cache holds SHA-256(PHC string || 0x00 || presented)
/// digests only, never a secret. It is bounded by `max_cache_entries`; when full, the oldest digest
/// is evicted. Failures are never cached, and a changed hash in the configuration changes the key,
/// so a stale entry can never admit a secret the configuration no longer accepts.
///
/// A cache hit answers in microseconds and a miss takes argon2's time, so timing tells whether a
/// presented secret was verified before; that is only observable by someone who already holds it.
pub struct Verifier {
    /// The most digests the cache keeps; 0 disables the cache.
    max_cache_entries: usize,
    /// The verified-credential cache.
    cache: Mutex<Cache>,
    /// How many checks the cache answered, for tests and metrics.
    cache_hits: AtomicU64,
    /// A hash of a random secret, to spend argon2's time on requests for unknown users.
    dummy: OnceLock<Option<PasswordHash>>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("max_cache_entries", &self.max_cache_entries)
            .field("cache_len", &self.cache_len())
            .field("cache_hits", &self.cache_hits())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier whose cache holds at most `max_cache_entries` verified credentials.
    pub fn new(max_cache_entries: usize) -> Self {
        Self {
            max_cache_entries,
            cache: Mutex::new(Cache::default()),
            cache_hits: AtomicU64::new(0),
            dummy: OnceLock::new(),
        }
    }

    /// Checks `presented` against `expected`; runs argon2 inline on a cache miss.
    ///
    /// In async code use [`Verifier::verify_async`], which moves argon2 off the runtime.
    pub fn verify(&self, presented: &[u8], expected: &Credential) -> bool {
        match self.verify_fast(presented, expected) {
            Some(answer) => answer,
            None => match expected {
                Credential::Hash(hash) => self.verify_and_remember(hash, presented),
                Credential::Plain(_) => false,
            },
        }
    }

    /// Like [`Verifier::verify`], but runs argon2 on `spawn_blocking` when the cache misses.
    ///
    /// `presented` is moved to the blocking thread: pass a [`SecretString`] (wiped when dropped)
    /// rather than a `Vec<u8>` (which is not). Must be called inside a Tokio runtime. A panicked or cancelled blocking task counts as a
    /// failed check.
    pub async fn verify_async(
        self: &Arc<Self>,
        presented: impl AsRef<[u8]> + Send + 'static,
        expected: Credential,
    ) -> bool {
        if let Some(answer) = self.verify_fast(presented.as_ref(), &expected) {
            return answer;
        }
        let Credential::Hash(hash) = expected else {
            return false;
        };
        let verifier = Arc::clone(self);
        tokio::task::spawn_blocking(move || verifier.verify_and_remember(&hash, presented.as_ref()))
            .await
            .unwrap_or(false)
    }

    /// Checks both the user id and the password, always evaluating both in constant time.
    ///
    /// A wrong user id costs the same as a wrong password, so timing does not tell which was
    /// wrong.
    pub fn verify_user_and_password(
        &self,
        presented_user: &str,
        presented_password: &[u8],
        expected_user: &str,
        expected: &Credential,
    ) -> bool {
        let user_ok = ct_digest_eq(presented_user.as_bytes(), expected_user.as_bytes());
        let password_ok = self.verify(presented_password, expected);
        user_ok & password_ok
    }

    /// [`verify_user_and_password`](Self::verify_user_and_password) with the argon2 run, when the
    /// cache misses, on the blocking pool.
    pub async fn verify_user_and_password_async(
        self: &Arc<Self>,
        presented_user: String,
        presented_password: Vec<u8>,
        expected_user: String,
        expected: Credential,
    ) -> bool {
        let user_ok = ct_digest_eq(presented_user.as_bytes(), expected_user.as_bytes());
        let password_ok = self.verify_async(presented_password, expected).await;
        user_ok & password_ok
    }

    /// Returns the index of the first of `candidates` that `presented` matches.
    ///
    /// Plain candidates and cache hits are all checked before any argon2 run, and the cheap checks
    /// never stop early; argon2 then runs for the hashed candidates in order until one matches.
    pub fn verify_any<'a>(
        &self,
        presented: &[u8],
        candidates: impl IntoIterator<Item = &'a Credential>,
    ) -> Option<usize> {
        let candidates: Vec<&Credential> = candidates.into_iter().collect();
        match self.verify_any_quick(presented, candidates.iter().copied()) {
            Quick::Match(index) => return Some(index),
            Quick::NoMatch => return None,
            Quick::NeedsArgon2 => {}
        }
        candidates
            .iter()
            .enumerate()
            .find_map(|(index, candidate)| match candidate {
                Credential::Hash(hash) if self.verify_and_remember(hash, presented) => Some(index),
                _ => None,
            })
    }

    /// The checks of [`Verifier::verify_any`] that need no argon2: every plain candidate and
    /// every cache lookup, without stopping early, and without copying anything.
    pub fn verify_any_quick<'a>(
        &self,
        presented: &[u8],
        candidates: impl IntoIterator<Item = &'a Credential>,
    ) -> Quick {
        let mut found = None;
        let mut needs_argon2 = false;
        for (index, candidate) in candidates.into_iter().enumerate() {
            let verdict = self.verify_fast(presented, candidate);
            needs_argon2 |= verdict.is_none();
            if verdict == Some(true) && found.is_none() {
                found = Some(index);
            }
        }
        match found {
            Some(index) => Quick::Match(index),
            None if needs_argon2 => Quick::NeedsArgon2,
            None => Quick::NoMatch,
        }
    }

    /// Like [`Verifier::verify_any`], with the argon2 runs on `spawn_blocking`.
    pub async fn verify_any_async(
        self: &Arc<Self>,
        presented: impl AsRef<[u8]> + Send + 'static,
        candidates: Vec<Credential>,
    ) -> Option<usize> {
        let verifier = Arc::clone(self);
        // Cheap checks inline: no thread hop when a plain secret or the cache answers.
        match self.verify_any_quick(presented.as_ref(), &candidates) {
            Quick::Match(index) => return Some(index),
            Quick::NoMatch => return None,
            Quick::NeedsArgon2 => {}
        }
        tokio::task::spawn_blocking(move || verifier.verify_any(presented.as_ref(), &candidates))
            .await
            .unwrap_or(None)
    }

    /// Spends the time of a failed argon2 check, for a request naming an unknown user or policy.
    ///
    /// Always returns `false`. Worth calling where the known users have hashed credentials, so
    /// that "no such user" is not answered faster than "wrong password".
    pub fn verify_unknown(&self, presented: &[u8]) -> bool {
        if let Some(dummy) = self.dummy_hash() {
            let _ = dummy.verify_slow(presented);
        }
        false
    }

    /// Like [`Verifier::verify_unknown`], on `spawn_blocking`.
    pub async fn verify_unknown_async(
        self: &Arc<Self>,
        presented: impl AsRef<[u8]> + Send + 'static,
    ) -> bool {
        let verifier = Arc::clone(self);
        let _ =
            tokio::task::spawn_blocking(move || verifier.verify_unknown(presented.as_ref())).await;
        false
    }

    /// How many checks the cache has answered since this verifier was made.
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.load(Ordering::Relaxed)
    }

    /// How many verified credentials the cache holds.
    pub fn cache_len(&self) -> usize {
        self.lock_cache().set.len()
    }

    /// Forgets every verified credential.
    pub fn clear_cache(&self) {
        let mut cache = self.lock_cache();
        cache.set.clear();
        cache.order.clear();
    }

    /// The cache; a panic while it was held cannot leave it inconsistent, so poison is ignored.
    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Answers without argon2 when it can: `None` means a hashed credential missed the cache.
    fn verify_fast(&self, presented: &[u8], expected: &Credential) -> Option<bool> {
        match expected {
            Credential::Plain(secret) => Some(ct_digest_eq(presented, secret.expose().as_bytes())),
            Credential::Hash(hash) => {
                let key = cache_key(hash, presented);
                if self.lock_cache().set.contains(&key) {
                    self.cache_hits.fetch_add(1, Ordering::Relaxed);
                    Some(true)
                } else {
                    None
                }
            }
        }
    }

    /// Runs argon2 and remembers a success.
    fn verify_and_remember(&self, hash: &PasswordHash, presented: &[u8]) -> bool {
        let ok = hash.verify_slow(presented);
        if ok {
            self.remember(cache_key(hash, presented));
        }
        ok
    }

    /// Adds a verified digest, evicting the oldest when the cache is full.
    fn remember(&self, key: [u8; 32]) {
        if self.max_cache_entries == 0 {
            return;
        }
        let mut cache = self.lock_cache();
        if !cache.set.insert(key) {
            return;
        }
        cache.order.push_back(key);
        while cache.order.len() > self.max_cache_entries {
            if let Some(oldest) = cache.order.pop_front() {
                cache.set.remove(&oldest);
            }
        }
    }

    /// The dummy hash, made on first use.
    fn dummy_hash(&self) -> Option<&PasswordHash> {
        self.dummy
            .get_or_init(|| {
                let mut random = [0u8; 32];
                argon2::password_hash::rand_core::RngCore::fill_bytes(&mut OsRng, &mut random);
                let secret = SecretString::new(hex::encode(random));
                hash_secret(secret.expose())
                    .ok()
                    .and_then(|phc| PasswordHash::parse(&phc).ok())
            })
            .as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn header(value: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(value).unwrap()
    }

    fn basic(user_pass: &[u8]) -> http::HeaderValue {
        let encoded = base64::engine::general_purpose::STANDARD.encode(user_pass);
        header(&format!("Basic {encoded}"))
    }

    #[test]
    fn basic_scheme_is_case_insensitive() {
        for scheme in ["Basic", "basic", "BASIC", "bAsIc"] {
            let h = header(&format!("{scheme} dXNlcjpwYXNz"));
            let c = parse_basic(&h).unwrap();
            assert_eq!(c.user, "user");
            assert_eq!(c.password.expose(), "pass");
        }
    }

    #[test]
    fn basic_accepts_several_spaces_and_missing_padding() {
        let c = parse_basic(&header("Basic    dXNlcjpwYXNz")).unwrap();
        assert_eq!((c.user.as_str(), c.password.expose()), ("user", "pass"));
        // "user:pa" encodes to "dXNlcjpwYQ==".
        let padded = parse_basic(&header("Basic dXNlcjpwYQ==")).unwrap();
        let unpadded = parse_basic(&header("Basic dXNlcjpwYQ")).unwrap();
        assert_eq!(padded.password.expose(), "pa");
        assert_eq!(unpadded.password.expose(), "pa");
    }

    #[test]
    fn basic_password_keeps_colons_and_non_ascii() {
        let password = "a:b::c é 🦀:";
        let c = parse_basic(&basic(format!("intacct-cb:{password}").as_bytes())).unwrap();
        assert_eq!(c.user, "intacct-cb");
        assert_eq!(c.password.expose(), password);
    }

    #[test]
    fn basic_allows_empty_user_and_password() {
        let c = parse_basic(&basic(b":")).unwrap();
        assert_eq!(c.user, "");
        assert_eq!(c.password.expose(), "");
    }

    #[test]
    fn basic_errors() {
        assert!(matches!(
            parse_basic(&basic(b"nocolon")),
            Err(AuthError::NoColon)
        ));
        assert!(matches!(
            parse_basic(&header("Basic !!!notbase64")),
            Err(AuthError::InvalidBase64)
        ));
        assert!(matches!(
            parse_basic(&basic(b"user:\xff\xfe")),
            Err(AuthError::NotUtf8)
        ));
        assert!(matches!(
            parse_basic(&header("Bearer abc")),
            Err(AuthError::NotBasic)
        ));
        assert!(matches!(
            parse_basic(&header("Basicx dXNlcjpwYXNz")),
            Err(AuthError::NotBasic)
        ));
        assert!(matches!(
            parse_basic(&header("Basic")),
            Err(AuthError::NoCredentials)
        ));
        assert!(matches!(
            parse_basic(&header("Basic   ")),
            Err(AuthError::NoCredentials)
        ));
        let long = format!("Basic {}", "A".repeat(MAX_HEADER_BYTES));
        assert!(matches!(
            parse_basic(&header(&long)),
            Err(AuthError::TooLong)
        ));
    }

    #[test]
    fn error_messages_do_not_contain_the_secret() {
        let err = parse_basic(&basic(b"topsecretnocolon")).unwrap_err();
        assert_eq!(err.to_string(), "credentials have no colon");
        let err = parse_basic(&basic(b"user:topsecret\xff")).unwrap_err();
        assert_eq!(err.to_string(), "credentials are not utf-8");
        assert!(!format!("{err:?}").contains("topsecret"));
    }

    #[test]
    fn bearer_parsing() {
        for value in [
            "Bearer abc-DEF_123.~+/==",
            "bearer abc-DEF_123.~+/==",
            "BEARER   abc-DEF_123.~+/==",
        ] {
            assert_eq!(
                parse_bearer(&header(value)).unwrap().expose(),
                "abc-DEF_123.~+/=="
            );
        }
        assert!(matches!(
            parse_bearer(&header("Basic abc")),
            Err(AuthError::NotBearer)
        ));
        assert!(matches!(
            parse_bearer(&header("Bearer")),
            Err(AuthError::NoCredentials)
        ));
        assert!(matches!(
            parse_bearer(&header("Bearer a b")),
            Err(AuthError::InvalidToken)
        ));
        assert!(matches!(
            parse_bearer(&header("Bearer a=b")),
            Err(AuthError::InvalidToken)
        ));
        assert!(matches!(
            parse_bearer(&header("Bearer ==")),
            Err(AuthError::InvalidToken)
        ));
        assert!(matches!(
            parse_bearer(&header("Bearer a\"b")),
            Err(AuthError::InvalidToken)
        ));
        let long = format!("Bearer {}", "a".repeat(MAX_HEADER_BYTES));
        assert!(matches!(
            parse_bearer(&header(&long)),
            Err(AuthError::TooLong)
        ));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let secret = SecretString::from("hunter2-secret".to_owned());
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{secret}"), "[redacted]");
        let plain = Credential::Plain(secret.clone());
        assert!(!format!("{plain:?}").contains("hunter2"));
        let phc = hash_secret("hunter2-secret").unwrap();
        let hashed = Credential::Hash(PasswordHash::parse(&phc).unwrap());
        let shown = format!("{hashed:?}");
        assert!(shown.contains("argon2id"));
        assert!(!shown.contains(&phc));
        assert!(!shown.contains('$'));
        let c = parse_basic(&basic(b"user:hunter2-secret")).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn hash_verify_and_cache() {
        let phc = hash_secret("right horse battery").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        let expected = Credential::Hash(PasswordHash::parse(&phc).unwrap());
        let verifier = Verifier::new(16);

        assert!(!verifier.verify(b"wrong", &expected));
        assert_eq!(verifier.cache_len(), 0, "failures are not cached");

        let start = Instant::now();
        assert!(verifier.verify(b"right horse battery", &expected));
        let first = start.elapsed();
        assert_eq!(verifier.cache_len(), 1);
        assert_eq!(verifier.cache_hits(), 0);

        let start = Instant::now();
        assert!(verifier.verify(b"right horse battery", &expected));
        let second = start.elapsed();
        assert_eq!(verifier.cache_hits(), 1);
        assert!(second < first, "cache hit {second:?} vs argon2 {first:?}");

        assert!(!verifier.verify(b"right horse batter", &expected));
        assert_eq!(verifier.cache_hits(), 1);
    }

    #[test]
    fn cache_is_bounded_and_evicts_oldest() {
        let phc = hash_secret("s").unwrap();
        let hash = PasswordHash::parse(&phc).unwrap();
        let verifier = Verifier::new(2);
        for key in 0u8..5 {
            verifier.remember([key; 32]);
        }
        assert_eq!(verifier.cache_len(), 2);
        assert!(verifier.verify(b"s", &Credential::Hash(hash.clone())));
        assert_eq!(verifier.cache_len(), 2);
        assert!(verifier.verify(b"s", &Credential::Hash(hash)));
        assert_eq!(verifier.cache_hits(), 1);

        let off = Verifier::new(0);
        off.remember([1; 32]);
        assert_eq!(off.cache_len(), 0);
    }

    #[test]
    fn plain_verify() {
        let verifier = Verifier::new(4);
        let expected = Credential::Plain(SecretString::from("s3cret"));
        assert!(verifier.verify(b"s3cret", &expected));
        assert!(!verifier.verify(b"s3cre", &expected));
        assert!(!verifier.verify(b"s3cret!", &expected));
        assert!(!verifier.verify(b"", &expected));
        assert_eq!(verifier.cache_len(), 0);
    }

    #[test]
    fn user_and_password() {
        let verifier = Verifier::new(4);
        let expected = Credential::Plain(SecretString::from("pw"));
        assert!(verifier.verify_user_and_password("u", b"pw", "u", &expected));
        assert!(!verifier.verify_user_and_password("v", b"pw", "u", &expected));
        assert!(!verifier.verify_user_and_password("u", b"px", "u", &expected));
        assert!(!verifier.verify_user_and_password("", b"", "u", &expected));
    }

    #[test]
    fn verify_any_finds_the_match() {
        let verifier = Verifier::new(4);
        let phc = hash_secret("token-b").unwrap();
        let candidates = vec![
            Credential::Plain(SecretString::from("token-a")),
            Credential::Hash(PasswordHash::parse(&phc).unwrap()),
            Credential::Plain(SecretString::from("token-c")),
        ];
        assert_eq!(verifier.verify_any(b"token-a", &candidates), Some(0));
        assert_eq!(verifier.verify_any(b"token-b", &candidates), Some(1));
        assert_eq!(verifier.verify_any(b"token-b", &candidates), Some(1));
        assert_eq!(verifier.cache_hits(), 1);
        assert_eq!(verifier.verify_any(b"token-c", &candidates), Some(2));
        assert_eq!(verifier.verify_any(b"token-d", &candidates), None);
    }

    #[tokio::test]
    async fn async_verification() {
        let verifier = Arc::new(Verifier::new(4));
        let phc = hash_secret("async-secret").unwrap();
        let expected = Credential::Hash(PasswordHash::parse(&phc).unwrap());
        assert!(
            !verifier
                .verify_async(SecretString::from("nope"), expected.clone())
                .await
        );
        assert!(
            verifier
                .verify_async(SecretString::from("async-secret"), expected.clone())
                .await
        );
        assert!(
            verifier
                .verify_async(SecretString::from("async-secret"), expected.clone())
                .await
        );
        assert_eq!(verifier.cache_hits(), 1);
        assert!(
            verifier
                .verify_async(b"async-secret".to_vec(), expected.clone())
                .await
        );
        assert!(
            !verifier
                .verify_async(b"nope".to_vec(), expected.clone())
                .await
        );
        assert_eq!(verifier.cache_hits(), 2);
        let plain = Credential::Plain("p".into());
        assert!(
            verifier
                .verify_async(SecretString::from("p"), plain.clone())
                .await
        );
        assert!(
            !verifier
                .verify_async(SecretString::from("q"), plain.clone())
                .await
        );
        let candidates = vec![plain, expected];
        assert_eq!(
            verifier
                .verify_any_async(SecretString::from("async-secret"), candidates.clone())
                .await,
            Some(1)
        );
        assert_eq!(
            verifier
                .verify_any_async(SecretString::from("p"), candidates.clone())
                .await,
            Some(0)
        );
        assert_eq!(
            verifier
                .verify_any_async(SecretString::from("x"), candidates)
                .await,
            None
        );
        assert!(
            !verifier
                .verify_unknown_async(SecretString::from("async-secret"))
                .await
        );
    }

    #[test]
    fn verify_unknown_is_always_false() {
        let verifier = Verifier::new(4);
        assert!(!verifier.verify_unknown(b"anything"));
        assert!(!verifier.verify_unknown(b""));
    }

    #[test]
    fn password_hash_parse_rejects_other_algorithms_and_garbage() {
        // A valid argon2i PHC string (RFC 9106-style parameters).
        let argon2i = "$argon2i$v=19$m=16,t=2,p=1$c29tZXNhbHQ$FcBwpGXkX9Rx9nXSpW8s4A";
        assert!(matches!(
            PasswordHash::parse(argon2i),
            Err(AuthError::NotArgon2id)
        ));
        let argon2d = "$argon2d$v=19$m=16,t=2,p=1$c29tZXNhbHQ$FcBwpGXkX9Rx9nXSpW8s4A";
        assert!(matches!(
            PasswordHash::parse(argon2d),
            Err(AuthError::NotArgon2id)
        ));
        for garbage in [
            "",
            "not a hash",
            "$argon2id$",
            "$argon2id$v=19$m=16,t=2,p=1$c29tZXNhbHQ",
            "$2b$12$abcdefghijklmnopqrstuv",
        ] {
            assert!(PasswordHash::parse(garbage).is_err(), "{garbage:?}");
        }
        let bad_params = "$argon2id$v=19$m=1,t=0,p=1$c29tZXNhbHQ$FcBwpGXkX9Rx9nXSpW8s4A";
        assert!(matches!(
            PasswordHash::parse(bad_params),
            Err(AuthError::InvalidHash(_))
        ));
        let good = hash_secret("x").unwrap();
        assert_eq!(PasswordHash::parse(&good).unwrap().as_str(), good);
        assert!(good.parse::<PasswordHash>().is_ok());
    }

    #[test]
    fn secret_string_wipe_keeps_values_usable() {
        let a = SecretString::new("abc");
        let b = a.clone();
        drop(a);
        assert_eq!(b.expose(), "abc");
    }
}
