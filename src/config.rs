//! Typed configuration from a TOML file, and the dev profile.
//!
//! Parsing happens in two steps: serde reads the file into `raw` structs (unknown keys are an
//! error, spans kept for the keys that are validated later), then [`Config::from_toml`] checks
//! the meaning and builds the typed [`Config`]. Errors name the key and the line. Nothing here
//! reads the process environment, so every rule is testable with a string.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::distributions::{Alphanumeric, DistString};
use serde::Deserialize;
use toml::Spanned;

use crate::auth::{Credential, PasswordHash, SecretString};
use crate::tls;

/// Longest HTTP User ID and Password the gateway's transport policy accepts.
pub const GATEWAY_CREDENTIAL_MAX_CHARS: usize = 40;

/// Shortest plaintext poller token accepted.
pub const MIN_TOKEN_CHARS: usize = 16;

/// The whole service configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the HTTPS listener binds.
    pub listen: SocketAddr,
    /// Directory of the database.
    pub data_dir: PathBuf,
    /// Largest accepted callback body.
    pub max_body_bytes: u64,
    /// Free space the data directory keeps: writes that would eat into it get `503`.
    pub min_free_disk_bytes: u64,
    /// Deliveries older than this are purged.
    pub retention_days: u32,
    /// Memory for the cache of raw `GET` answers, in bytes (0: off).
    pub read_cache_bytes: u64,
    /// How often the retention purge runs.
    pub purge_interval: Duration,
    /// Certificate and key files.
    pub tls: TlsFiles,
    /// Limits on what clients control.
    pub limits: Limits,
    /// Log line format.
    pub log_format: LogFormat,
    /// Policies and pollers (the part a reload replaces).
    pub access: Access,
    /// The bearer token `/metrics` requires (`metrics_token` or `metrics_token_hash`); `None`
    /// leaves `/metrics` open.
    pub metrics_token: Option<Credential>,
    /// Whether text logs carry timestamps; `None` decides by itself (not under journald).
    pub log_timestamps: Option<bool>,
}

/// Certificate chain and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Limits on what clients control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Time allowed for a client to finish its request headers.
    pub header_timeout: Duration,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a connection may stay open with no request in flight (HTTP/1.1 keep-alive, or an
    /// HTTP/2 connection kept up by pings) before the server closes it.
    pub idle_timeout: Duration,
    /// Longest pause allowed between two pieces of a request body.
    pub body_read_timeout: Duration,
    /// Connections served at once; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Time in-flight requests get to finish at shutdown.
    pub shutdown_grace: Duration,
    /// Longest `wait` a poller may ask for.
    pub max_wait: Duration,
    /// Pollers allowed to wait at once.
    pub max_waiting_pollers: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// Largest request header block (HTTP/1.1 buffer and HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1.1 request.
    pub max_headers: usize,
    /// Failed authentications allowed per minute and client address before `429`; `0` disables.
    pub auth_failure_limit_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(30),
            max_wait: Duration::from_secs(60),
            max_waiting_pollers: 10_000,
            h2_max_concurrent_streams: 100,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            auth_failure_limit_per_minute: 20,
        }
    }
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The policies and pollers.
#[derive(Debug, Clone)]
pub struct Access {
    /// One per asynchronous transport policy.
    pub policies: Vec<Policy>,
    /// One per integrator.
    pub pollers: Vec<Poller>,
}

/// An asynchronous transport policy: who may post to `/callback/{id}`.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The Policy ID, the last segment of the Response URL.
    pub id: String,
    /// The HTTP User ID and Password; `None` for an open policy.
    pub credentials: Option<PolicyCredentials>,
}

/// The Basic credentials of a policy.
#[derive(Debug, Clone)]
pub struct PolicyCredentials {
    /// The HTTP User ID.
    pub user: String,
    /// The HTTP Password, or its hash.
    pub password: Credential,
}

/// An integrator allowed to read results.
#[derive(Debug, Clone)]
pub struct Poller {
    /// Its name, for logs.
    pub name: String,
    /// Its bearer token, or its hash.
    pub token: Credential,
    /// The policies whose responses it may read; `None` for all.
    pub policies: Option<Vec<String>>,
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file is not valid TOML or does not fit the schema.
    #[error("{origin}:{line}: {message}")]
    Parse {
        /// The file (or `<string>`).
        origin: String,
        /// 1-based line.
        line: usize,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{origin}{}: {key}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        /// The file (or `<string>`).
        origin: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// The key at fault, e.g. `policy[1].password`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The dev profile could not be prepared.
    #[error("dev profile: {0}")]
    Dev(String),
}

mod raw {
    //! The file as written, before validation.

    use serde::Deserialize;
    use toml::Spanned;

    use super::LogFormat;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub listen: Spanned<String>,
        pub data_dir: Spanned<String>,
        pub max_body_bytes: Option<Spanned<i64>>,
        pub min_free_disk_bytes: Option<Spanned<i64>>,
        pub retention_days: Option<Spanned<i64>>,
        pub read_cache_mb: Option<Spanned<i64>>,
        pub purge_interval_seconds: Option<Spanned<i64>>,
        pub header_timeout_seconds: Option<Spanned<i64>>,
        pub handshake_timeout_seconds: Option<Spanned<i64>>,
        pub idle_timeout_seconds: Option<Spanned<i64>>,
        pub body_read_timeout_seconds: Option<Spanned<i64>>,
        pub max_connections: Option<Spanned<i64>>,
        pub shutdown_grace_seconds: Option<Spanned<i64>>,
        pub max_wait_seconds: Option<Spanned<i64>>,
        pub max_waiting_pollers: Option<Spanned<i64>>,
        pub h2_max_concurrent_streams: Option<Spanned<i64>>,
        pub max_header_bytes: Option<Spanned<i64>>,
        pub max_headers: Option<Spanned<i64>>,
        pub auth_failure_limit_per_minute: Option<Spanned<i64>>,
        pub log_format: Option<LogFormat>,
        pub log_timestamps: Option<bool>,
        pub metrics_token: Option<Spanned<String>>,
        pub metrics_token_hash: Option<Spanned<String>>,
        pub tls: Tls,
        #[serde(default)]
        pub policy: Vec<Spanned<Policy>>,
        #[serde(default)]
        pub poller: Vec<Spanned<Poller>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tls {
        pub cert: String,
        pub key: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Policy {
        pub id: Spanned<String>,
        pub user: Option<Spanned<String>>,
        pub password: Option<Spanned<String>>,
        pub password_hash: Option<Spanned<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Poller {
        pub name: Spanned<String>,
        pub token: Option<Spanned<String>>,
        pub token_hash: Option<Spanned<String>>,
        pub policies: Option<Spanned<Vec<String>>>,
    }
}

/// Validation context: the file name and its text, to turn byte spans into line numbers.
struct Ctx<'a> {
    origin: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn invalid(
        &self,
        span: Option<std::ops::Range<usize>>,
        key: &str,
        message: &str,
    ) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            line: span.map(|s| self.line(s.start)),
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    fn at<T>(&self, value: &Spanned<T>, key: &str, message: &str) -> ConfigError {
        self.invalid(Some(value.span()), key, message)
    }

    /// Like [`positive`](Self::positive), but 0 is allowed too.
    fn at_most(
        &self,
        value: &Option<Spanned<i64>>,
        key: &str,
        default: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        self.ranged(value, key, default, 0, max)
    }

    fn positive(
        &self,
        value: &Option<Spanned<i64>>,
        key: &str,
        default: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        self.ranged(value, key, default, 1, max)
    }

    /// `default` when absent, else the value when it is within `min..=max`.
    fn ranged(
        &self,
        value: &Option<Spanned<i64>>,
        key: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => u64::try_from(*v.get_ref())
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| self.at(v, key, &format!("must be between {min} and {max}"))),
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: io_reason(&e),
        })?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // Absolute, so that what `check-config` and the start-up log print is unambiguous.
        let base = std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf());
        Self::from_toml(&text, &path.display().to_string(), &base)
    }

    /// Parses and validates configuration text; relative paths are taken from `base_dir`.
    pub fn from_toml(text: &str, origin: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let ctx = Ctx { origin, text };
        let file: raw::File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            line: e.span().map(|s| ctx.line(s.start)).unwrap_or(1),
            message: one_line(e.message()),
        })?;

        let listen: SocketAddr = file.listen.get_ref().parse().map_err(|_| {
            ctx.at(
                &file.listen,
                "listen",
                "not a socket address such as 0.0.0.0:8443",
            )
        })?;
        if file.data_dir.get_ref().trim().is_empty() {
            return Err(ctx.at(&file.data_dir, "data_dir", "must not be empty"));
        }
        let resolve = |p: &str| {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                base_dir.join(p)
            }
        };
        let defaults = Limits::default();
        let secs = |v: &Option<Spanned<i64>>, key: &str, d: Duration, max: u64| {
            ctx.positive(v, key, d.as_secs(), max)
                .map(Duration::from_secs)
        };
        let limits = Limits {
            header_timeout: secs(
                &file.header_timeout_seconds,
                "header_timeout_seconds",
                defaults.header_timeout,
                3600,
            )?,
            handshake_timeout: secs(
                &file.handshake_timeout_seconds,
                "handshake_timeout_seconds",
                defaults.handshake_timeout,
                3600,
            )?,
            idle_timeout: secs(
                &file.idle_timeout_seconds,
                "idle_timeout_seconds",
                defaults.idle_timeout,
                86_400,
            )?,
            body_read_timeout: secs(
                &file.body_read_timeout_seconds,
                "body_read_timeout_seconds",
                defaults.body_read_timeout,
                3600,
            )?,
            shutdown_grace: secs(
                &file.shutdown_grace_seconds,
                "shutdown_grace_seconds",
                defaults.shutdown_grace,
                3600,
            )?,
            max_wait: secs(
                &file.max_wait_seconds,
                "max_wait_seconds",
                defaults.max_wait,
                3600,
            )?,
            max_connections: ctx.positive(
                &file.max_connections,
                "max_connections",
                defaults.max_connections as u64,
                1_000_000,
            )? as usize,
            max_waiting_pollers: ctx.positive(
                &file.max_waiting_pollers,
                "max_waiting_pollers",
                defaults.max_waiting_pollers as u64,
                1_000_000,
            )? as usize,
            h2_max_concurrent_streams: ctx.positive(
                &file.h2_max_concurrent_streams,
                "h2_max_concurrent_streams",
                u64::from(defaults.h2_max_concurrent_streams),
                10_000,
            )? as u32,
            max_header_bytes: ctx.positive(
                &file.max_header_bytes,
                "max_header_bytes",
                defaults.max_header_bytes as u64,
                16 * 1024 * 1024,
            )? as usize,
            max_headers: ctx.positive(
                &file.max_headers,
                "max_headers",
                defaults.max_headers as u64,
                10_000,
            )? as usize,
            auth_failure_limit_per_minute: match &file.auth_failure_limit_per_minute {
                // 0 turns the limiter off, so this one is not `positive`.
                Some(v) if *v.get_ref() == 0 => 0,
                Some(v) if *v.get_ref() < 0 => {
                    return Err(ctx.at(
                        v,
                        "auth_failure_limit_per_minute",
                        "must be between 0 and 1000000",
                    ))
                }
                other => ctx.positive(
                    other,
                    "auth_failure_limit_per_minute",
                    u64::from(defaults.auth_failure_limit_per_minute),
                    1_000_000,
                )? as u32,
            },
        };
        if limits.max_header_bytes < 8192 {
            return Err(ctx.invalid(
                file.max_header_bytes.as_ref().map(|v| v.span()),
                "max_header_bytes",
                "must be at least 8192",
            ));
        }
        let max_body_bytes = ctx.positive(
            &file.max_body_bytes,
            "max_body_bytes",
            64 * 1024 * 1024,
            4 * 1024 * 1024 * 1024,
        )?;
        let min_free_disk_bytes = ctx.positive(
            &file.min_free_disk_bytes,
            "min_free_disk_bytes",
            crate::store::DEFAULT_RESERVE_BYTES,
            1 << 50,
        )?;
        let retention_days =
            ctx.positive(&file.retention_days, "retention_days", 30, 36_500)? as u32;
        let read_cache_bytes = ctx.at_most(&file.read_cache_mb, "read_cache_mb", 64, 65_536)? << 20;
        let purge_interval = Duration::from_secs(ctx.positive(
            &file.purge_interval_seconds,
            "purge_interval_seconds",
            3600,
            86_400,
        )?);

        let access = validate_access(&ctx, &file.policy, &file.poller)?;
        let metrics_token =
            metrics_credential(&ctx, &file.metrics_token, &file.metrics_token_hash)?;

        Ok(Config {
            listen,
            data_dir: resolve(file.data_dir.get_ref()),
            max_body_bytes,
            min_free_disk_bytes,
            retention_days,
            read_cache_bytes,
            purge_interval,
            tls: TlsFiles {
                cert: resolve(&file.tls.cert),
                key: resolve(&file.tls.key),
            },
            limits,
            log_format: file.log_format.unwrap_or(LogFormat::Text),
            access,
            metrics_token,
            log_timestamps: file.log_timestamps,
        })
    }

    /// A one-line summary for `check-config` and the start-up log.
    pub fn summary(&self) -> String {
        format!(
            "listen {}, data_dir {}, {} polic{}, {} poller{}, max_body_bytes {}",
            self.listen,
            self.data_dir.display(),
            self.access.policies.len(),
            if self.access.policies.len() == 1 {
                "y"
            } else {
                "ies"
            },
            self.access.pollers.len(),
            if self.access.pollers.len() == 1 {
                ""
            } else {
                "s"
            },
            self.max_body_bytes,
        )
    }
}

/// A parser message on one line: toml puts hints such as ``expected `"`, `'` `` on lines of
/// their own, and an error is one line on stderr and one log record.
pub(crate) fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// What is wrong with a plain bearer token, if anything: it must be a token68 (RFC 6750) whose
/// part before any trailing `=` padding has at least [`MIN_TOKEN_CHARS`] characters, so that the
/// `Authorization: Bearer` parser can accept it and it is not guessable.
fn token_problem(token: &str) -> Option<&'static str> {
    let body = token.trim_end_matches('=');
    if body.chars().count() < MIN_TOKEN_CHARS {
        Some("shorter than 16 characters (not counting trailing =)")
    } else if !body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
    {
        Some("may hold only A-Z a-z 0-9 - . _ ~ + / and trailing = (a bearer token68)")
    } else {
        None
    }
}

/// The `metrics_token` or `metrics_token_hash`: the rules of a poller's token.
fn metrics_credential(
    ctx: &Ctx<'_>,
    token: &Option<Spanned<String>>,
    hash: &Option<Spanned<String>>,
) -> Result<Option<Credential>, ConfigError> {
    match (token, hash) {
        (Some(t), Some(_)) => Err(ctx.at(
            t,
            "metrics_token",
            "give metrics_token or metrics_token_hash, not both",
        )),
        (Some(t), None) => match token_problem(t.get_ref()) {
            Some(problem) => Err(ctx.at(t, "metrics_token", problem)),
            None => Ok(Some(Credential::Plain(SecretString::from(
                t.get_ref().clone(),
            )))),
        },
        (None, Some(h)) => PasswordHash::parse(h.get_ref())
            .map(|hash| Some(Credential::Hash(hash)))
            .map_err(|e| ctx.at(h, "metrics_token_hash", &e.to_string())),
        (None, None) => Ok(None),
    }
}

fn validate_access(
    ctx: &Ctx<'_>,
    policies: &[Spanned<raw::Policy>],
    pollers: &[Spanned<raw::Poller>],
) -> Result<Access, ConfigError> {
    let mut ids = HashSet::new();
    let mut out_policies = Vec::with_capacity(policies.len());
    for (i, p) in policies.iter().enumerate() {
        let key = |k: &str| format!("policy[{i}].{k}");
        let p = p.get_ref();
        let id = p.id.get_ref();
        if id.is_empty()
            || id.len() > 128
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
        {
            return Err(ctx.at(
                &p.id,
                &key("id"),
                "must be 1 to 128 characters from A-Z a-z 0-9 - _ . ~ (it is a URL path segment)",
            ));
        }
        if !ids.insert(id.clone()) {
            return Err(ctx.at(&p.id, &key("id"), &format!("duplicate policy id {id:?}")));
        }
        let password = match (&p.password, &p.password_hash) {
            (Some(pw), Some(_)) => {
                return Err(ctx.at(
                    pw,
                    &key("password"),
                    "give password or password_hash, not both",
                ))
            }
            (Some(pw), None) => {
                if pw.get_ref().chars().count() > GATEWAY_CREDENTIAL_MAX_CHARS {
                    return Err(ctx.at(
                        pw,
                        &key("password"),
                        "longer than 40 characters, the gateway's limit for an HTTP Password",
                    ));
                }
                if pw.get_ref().is_empty() {
                    return Err(ctx.at(pw, &key("password"), "must not be empty"));
                }
                Some(Credential::Plain(SecretString::from(pw.get_ref().clone())))
            }
            (None, Some(h)) => Some(Credential::Hash(
                PasswordHash::parse(h.get_ref())
                    .map_err(|e| ctx.at(h, &key("password_hash"), &e.to_string()))?,
            )),
            (None, None) => None,
        };
        let credentials = match (&p.user, password) {
            (Some(user), Some(password)) => {
                let u = user.get_ref();
                if u.is_empty() || u.chars().count() > GATEWAY_CREDENTIAL_MAX_CHARS {
                    return Err(ctx.at(user, &key("user"), "must be 1 to 40 characters"));
                }
                if u.contains(':') || u.chars().any(char::is_control) {
                    return Err(ctx.at(
                        user,
                        &key("user"),
                        "must not contain a colon or control characters",
                    ));
                }
                Some(PolicyCredentials {
                    user: u.clone(),
                    password,
                })
            }
            (Some(user), None) => {
                return Err(ctx.at(user, &key("user"), "has no password or password_hash"))
            }
            (None, Some(_)) => {
                let span = p
                    .password
                    .as_ref()
                    .map(|v| v.span())
                    .or(p.password_hash.as_ref().map(|v| v.span()));
                return Err(ctx.invalid(span, &key("user"), "missing: a password needs a user"));
            }
            (None, None) => None,
        };
        out_policies.push(Policy {
            id: id.clone(),
            credentials,
        });
    }

    let mut names = HashSet::new();
    // Secrets (plain tokens, hash strings) already given, with the poller that has them.
    let mut secrets: HashMap<(&str, &str), &str> = HashMap::new();
    let mut out_pollers = Vec::with_capacity(pollers.len());
    for (i, p) in pollers.iter().enumerate() {
        let key = |k: &str| format!("poller[{i}].{k}");
        let outer = p.span();
        let p = p.get_ref();
        let name = p.name.get_ref();
        if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
            return Err(ctx.at(
                &p.name,
                &key("name"),
                "must be 1 to 128 printable characters",
            ));
        }
        if !names.insert(name.clone()) {
            return Err(ctx.at(
                &p.name,
                &key("name"),
                &format!("duplicate poller name {name:?}"),
            ));
        }
        // Two pollers with one secret: the first would always win and decide the scope.
        for (field, secret) in [("token", &p.token), ("token_hash", &p.token_hash)] {
            let Some(secret) = secret else { continue };
            if let Some(other) = secrets.insert((field, secret.get_ref().as_str()), name.as_str()) {
                return Err(ctx.at(
                    secret,
                    &key(field),
                    &format!(
                        "the same as poller {other:?}'s: each poller needs a secret of its own"
                    ),
                ));
            }
        }
        let token = match (&p.token, &p.token_hash) {
            (Some(t), Some(_)) => {
                return Err(ctx.at(t, &key("token"), "give token or token_hash, not both"))
            }
            (Some(t), None) => {
                if let Some(problem) = token_problem(t.get_ref()) {
                    return Err(ctx.at(t, &key("token"), problem));
                }
                Credential::Plain(SecretString::from(t.get_ref().clone()))
            }
            (None, Some(h)) => Credential::Hash(
                PasswordHash::parse(h.get_ref())
                    .map_err(|e| ctx.at(h, &key("token_hash"), &e.to_string()))?,
            ),
            (None, None) => {
                return Err(ctx.invalid(
                    Some(outer),
                    &key("token"),
                    "missing: give token or token_hash",
                ))
            }
        };
        let policies = match &p.policies {
            None => None,
            Some(list) => {
                for pid in list.get_ref() {
                    if !ids.contains(pid) {
                        return Err(ctx.at(
                            list,
                            &key("policies"),
                            &format!("unknown policy {pid:?}"),
                        ));
                    }
                }
                Some(list.get_ref().clone())
            }
        };
        out_pollers.push(Poller {
            name: name.clone(),
            token,
            policies,
        });
    }
    Ok(Access {
        policies: out_policies,
        pollers: out_pollers,
    })
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string().to_lowercase(),
    }
}

/// The secrets of the dev profile, printed at start.
#[derive(Debug, Clone)]
pub struct DevSecrets {
    /// The Basic password of policy `dev` (user `dev`).
    pub password: SecretString,
    /// The bearer token of poller `dev`.
    pub token: SecretString,
    /// The CA certificate clients should trust.
    pub ca_file: PathBuf,
}

/// The dev profile: loopback only, `./data`, a dev certificate under `./certs/dev/`, policy `dev`
/// and poller `dev` with random secrets kept in `./data/dev-secrets.toml` across restarts.
pub fn dev_profile(root: &Path) -> Result<(Config, DevSecrets), ConfigError> {
    let data_dir = root.join("data");
    let (cert_paths, _) = tls::ensure_dev_cert(&root.join("certs").join("dev"))
        .map_err(|e| ConfigError::Dev(e.to_string()))?;
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| ConfigError::Dev(format!("{}: {}", data_dir.display(), io_reason(&e))))?;
    let secrets_path = data_dir.join("dev-secrets.toml");
    let (password, token) = load_or_create_dev_secrets(&secrets_path)?;
    let access = Access {
        policies: vec![Policy {
            id: "dev".into(),
            credentials: Some(PolicyCredentials {
                user: "dev".into(),
                password: Credential::Plain(password.clone()),
            }),
        }],
        pollers: vec![Poller {
            name: "dev".into(),
            token: Credential::Plain(token.clone()),
            policies: None,
        }],
    };
    let config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
        data_dir,
        max_body_bytes: 64 * 1024 * 1024,
        min_free_disk_bytes: crate::store::DEFAULT_RESERVE_BYTES,
        retention_days: 30,
        read_cache_bytes: 64 << 20,
        purge_interval: Duration::from_secs(3600),
        tls: TlsFiles {
            cert: cert_paths.cert.clone(),
            key: cert_paths.key.clone(),
        },
        limits: Limits::default(),
        log_format: LogFormat::Text,
        access,
        metrics_token: None,
        log_timestamps: None,
    };
    Ok((
        config,
        DevSecrets {
            password,
            token,
            ca_file: cert_paths.ca,
        },
    ))
}

#[derive(Deserialize)]
struct DevSecretsFile {
    password: String,
    token: String,
}

fn load_or_create_dev_secrets(path: &Path) -> Result<(SecretString, SecretString), ConfigError> {
    if let Ok(text) = std::fs::read_to_string(path) {
        if let Ok(f) = toml::from_str::<DevSecretsFile>(&text) {
            if !f.password.is_empty() && f.token.len() >= MIN_TOKEN_CHARS {
                return Ok((f.password.into(), f.token.into()));
            }
        }
    }
    let mut rng = rand::rngs::OsRng;
    let password = Alphanumeric.sample_string(&mut rng, 24);
    let token = Alphanumeric.sample_string(&mut rng, 40);
    let text = format!(
        "# Secrets of the dev profile, generated once; delete this file for new ones.\npassword = \"{password}\"\ntoken = \"{token}\"\n"
    );
    write_private(path, text.as_bytes())
        .map_err(|e| ConfigError::Dev(format!("{}: {}", path.display(), io_reason(&e))))?;
    Ok((password.into(), token.into()))
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
listen = "127.0.0.1:8443"
data_dir = "data"
[tls]
cert = "cert.pem"
key = "key.pem"
"#;

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{BASE}{extra}"), "test.toml", Path::new("/etc/cr"))
    }

    #[test]
    fn minimal_file_gets_defaults_and_resolves_paths() {
        let c = parse("").expect("valid");
        assert_eq!(c.max_body_bytes, 64 * 1024 * 1024);
        assert_eq!(c.retention_days, 30);
        assert_eq!(c.data_dir, PathBuf::from("/etc/cr/data"));
        assert_eq!(c.tls.cert, PathBuf::from("/etc/cr/cert.pem"));
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn unknown_key_is_an_error_with_line() {
        let err = parse("\n[[policy]]\nid = \"a\"\nusr = \"x\"\n").expect_err("typo");
        let text = err.to_string();
        assert!(text.contains("test.toml:10"), "{text}");
        assert!(text.contains("usr"), "{text}");
    }

    #[test]
    fn syntax_errors_are_one_line() {
        let err = Config::from_toml("listen = \n", "t.toml", Path::new("/")).expect_err("bad");
        let text = err.to_string();
        assert!(text.starts_with("t.toml:1: "), "{text}");
        assert!(!text.contains('\n'), "{text:?}");
    }

    #[test]
    fn policy_rules() {
        let ok = parse("[[policy]]\nid = \"hello-world\"\nuser = \"cb\"\npassword = \"s3cret\"\n")
            .expect("valid");
        assert_eq!(ok.access.policies[0].id, "hello-world");
        let open = parse("[[policy]]\nid = \"open\"\n").expect("valid");
        assert!(open.access.policies[0].credentials.is_none());
        for (bad, key) in [
            ("[[policy]]\nid = \"a/b\"\n", "policy[0].id"),
            ("[[policy]]\nid = \"a\"\nuser = \"u\"\n", "policy[0].user"),
            ("[[policy]]\nid = \"a\"\npassword = \"p\"\n", "policy[0].user"),
            ("[[policy]]\nid = \"a\"\nuser = \"u\"\npassword = \"p\"\npassword_hash = \"x\"\n", "policy[0].password"),
            ("[[policy]]\nid = \"a\"\nuser = \"u\"\npassword_hash = \"nope\"\n", "policy[0].password_hash"),
            ("[[policy]]\nid = \"a\"\nuser = \"u:v\"\npassword = \"p\"\n", "policy[0].user"),
            ("[[policy]]\nid = \"a\"\nuser = \"u\"\npassword = \"12345678901234567890123456789012345678901\"\n", "policy[0].password"),
            ("[[policy]]\nid = \"a\"\n[[policy]]\nid = \"a\"\n", "policy[1].id"),
        ] {
            let err = parse(bad).expect_err(bad).to_string();
            assert!(err.contains(key), "{bad:?} gave {err}");
            assert!(err.contains("test.toml:"), "{err}");
        }
    }

    #[test]
    fn poller_rules() {
        let ok = parse("[[policy]]\nid = \"p\"\n[[poller]]\nname = \"erp\"\ntoken = \"0123456789abcdef0123\"\npolicies = [\"p\"]\n").expect("valid");
        assert_eq!(ok.access.pollers[0].policies, Some(vec!["p".to_string()]));
        for (bad, key) in [
            ("[[poller]]\nname = \"erp\"\n", "poller[0].token"),
            ("[[poller]]\nname = \"erp\"\ntoken = \"short\"\n", "poller[0].token"),
            ("[[poller]]\nname = \"erp\"\ntoken = \"abc=================\"\n", "poller[0].token"),
            ("[[poller]]\nname = \"erp\"\ntoken = \"0123456789abcdef0123\"\npolicies = [\"nope\"]\n", "poller[0].policies"),
        ] {
            let err = parse(bad).expect_err(bad).to_string();
            assert!(err.contains(key), "{bad:?} gave {err}");
        }
    }

    #[test]
    fn two_pollers_cannot_share_a_secret() {
        let hash = crate::auth::hash_secret("0123456789abcdef0123").expect("hash");
        for (first, second, key) in [
            (
                "token = \"0123456789abcdef0123\"",
                "token = \"0123456789abcdef0123\"",
                "poller[1].token",
            ),
            (
                &*format!("token_hash = \"{hash}\""),
                &*format!("token_hash = \"{hash}\""),
                "poller[1].token_hash",
            ),
        ] {
            let text =
                format!("[[poller]]\nname = \"a\"\n{first}\n[[poller]]\nname = \"b\"\n{second}\n");
            let err = parse(&text).expect_err("shared secret").to_string();
            assert!(err.contains(key), "{err}");
            assert!(err.contains("\"a\""), "{err}");
            assert!(
                !err.contains("0123456789abcdef0123"),
                "the secret is shown: {err}"
            );
        }
        // A secret of its own each: fine, also when one is plain and the other hashed.
        let text = format!("[[poller]]\nname = \"a\"\ntoken = \"0123456789abcdef0123\"\n[[poller]]\nname = \"b\"\ntoken_hash = \"{hash}\"\n[[poller]]\nname = \"c\"\ntoken = \"fedcba9876543210fedc\"\n");
        assert_eq!(parse(&text).expect("valid").access.pollers.len(), 3);
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let c = parse("[[policy]]\nid = \"a\"\nuser = \"u\"\npassword = \"hunter2-secret\"\n[[poller]]\nname = \"n\"\ntoken = \"tok-tok-tok-tok-tok-tok\"\n").expect("valid");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2-secret"), "{dbg}");
        assert!(!dbg.contains("tok-tok-tok"), "{dbg}");
    }

    #[test]
    fn numeric_limits_are_checked() {
        let top =
            |extra: &str| Config::from_toml(&format!("{extra}{BASE}"), "test.toml", Path::new("/"));
        let err = top("max_body_bytes = 0\n").expect_err("zero").to_string();
        assert!(err.contains("max_body_bytes"), "{err}");
        assert!(err.contains("test.toml:1"), "{err}");
        let text = BASE.replace("127.0.0.1:8443", "nowhere");
        let err = Config::from_toml(&text, "t.toml", Path::new("/"))
            .expect_err("bad")
            .to_string();
        assert!(err.contains("t.toml:2: listen"), "{err}");
    }

    #[test]
    fn read_cache_mb_may_be_zero_and_has_a_range() {
        let top =
            |extra: &str| Config::from_toml(&format!("{extra}{BASE}"), "test.toml", Path::new("/"));
        assert_eq!(top("").expect("default").read_cache_bytes, 64 << 20);
        assert_eq!(top("read_cache_mb = 0\n").expect("off").read_cache_bytes, 0);
        assert_eq!(
            top("read_cache_mb = 8\n").expect("8").read_cache_bytes,
            8 << 20
        );
        for bad in ["-1", "65537"] {
            let err = top(&format!("read_cache_mb = {bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(err.contains("test.toml:1: read_cache_mb"), "{err}");
            assert!(err.contains("between 0 and 65536"), "{err}");
        }
    }
}
