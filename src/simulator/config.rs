//! The simulator's own TOML configuration: where it listens, its certificate, the senders and
//! company users it accepts, the asynchronous transport policies it delivers to, and the faults
//! it injects.
//!
//! Parsing follows [`crate::config`]: serde reads the file into the private `raw` structs
//! (unknown keys are an error, spans kept), then [`SimConfig::from_toml`] checks the meaning.
//! Errors are [`ConfigError`]s naming the key and the line. Nothing here reads the environment.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::auth::SecretString;
use crate::client::BaseUrl;
use crate::config::{ConfigError, LogFormat, TlsFiles, GATEWAY_CREDENTIAL_MAX_CHARS};

/// Where the simulator listens when `listen` is not given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9443";

/// The pause between accepting an asynchronous request and posting its response, by default.
pub const DEFAULT_DELAY_MS: u64 = 200;

/// Delivery attempts per callback before the simulator gives up, by default.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 20;

/// Longest Policy ID the gateway accepts (`string(40)`).
pub const POLICY_ID_MAX_CHARS: usize = 40;

/// Longest Response URL the gateway accepts (`string(256)`).
pub const RESPONSE_URL_MAX_CHARS: usize = 256;

/// The whole simulator configuration.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where the HTTPS listener binds.
    pub listen: SocketAddr,
    /// The pause between an acknowledgement and the delivery of the response.
    pub delay: Duration,
    /// Delivery attempts per callback (the first one included) before giving up.
    pub max_attempts: u32,
    /// A PEM file of CA certificates trusted for Response URLs, in addition to the system's.
    pub ca_file: Option<PathBuf>,
    /// Log line format.
    pub log_format: LogFormat,
    /// The simulator's certificate and key.
    pub tls: TlsFiles,
    /// The Web Services senders accepted in `<control>`.
    pub senders: Vec<Sender>,
    /// The company users accepted in `<login>`.
    pub logins: Vec<Login>,
    /// The asynchronous transport policies.
    pub policies: Vec<SimPolicy>,
    /// The fault-injection rules, in file order.
    pub faults: Vec<FaultRule>,
}

/// A Web Services sender: `<control><senderid>` and `<password>`.
#[derive(Debug, Clone)]
pub struct Sender {
    /// The sender ID.
    pub id: String,
    /// The sender password.
    pub password: SecretString,
}

/// A company user: `<login><companyid>`, `<userid>` and `<password>`.
#[derive(Debug, Clone)]
pub struct Login {
    /// The company ID (compared without regard to case, as the gateway does).
    pub company: String,
    /// The user ID (compared without regard to case).
    pub user: String,
    /// The user's password.
    pub password: SecretString,
}

/// An asynchronous transport policy as the gateway knows it.
#[derive(Debug, Clone)]
pub struct SimPolicy {
    /// The Policy ID named in `<control><policyid>`.
    pub id: String,
    /// Where responses are posted.
    pub response_url: ResponseUrl,
    /// The HTTP User ID and Password sent with each post; `None` sends no `Authorization`.
    pub credentials: Option<(String, SecretString)>,
    /// Whether responses are delivered one at a time, in the order the requests were accepted.
    pub serialize: bool,
}

/// A validated Response URL: `https://host[:port]/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseUrl {
    /// Scheme, host and port.
    pub base: BaseUrl,
    /// The path (at least `/`).
    pub path: String,
}

impl ResponseUrl {
    /// Parses an `https://` URL without user information, query or fragment.
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .get(..8)
            .filter(|scheme| scheme.eq_ignore_ascii_case("https://"))
            .map(|_| &text[8..])
            .ok_or_else(|| {
                "must start with https:// (the gateway posts only over HTTPS)".to_string()
            })?;
        let (authority, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, "/"),
        };
        let base = BaseUrl::parse(&format!("https://{authority}")).map_err(|e| e.to_string())?;
        if rest.contains(['?', '#']) {
            return Err("a query or fragment is not supported".into());
        }
        // Validate the path with the client's own rules, keeping it exactly as written.
        BaseUrl::parse(&format!("https://{authority}{path}")).map_err(|e| e.to_string())?;
        Ok(Self {
            base,
            path: path.to_string(),
        })
    }
}

impl std::fmt::Display for ResponseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.base, self.path)
    }
}

/// A fault-injection rule. It applies to the requests whose control-level controlid starts with
/// `controlid_prefix` (every request when it is empty); the effects of all matching rules add up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultRule {
    /// The controlid prefix that selects requests; empty for all.
    pub controlid_prefix: String,
    /// Function names (e.g. `create`) whose results fail; `*` for every function.
    pub fail_functions: Vec<String>,
    /// Extra deliveries of the same callback (asynchronous requests only).
    pub duplicate: u32,
    /// Extra pause before the delivery (asynchronous requests only).
    pub extra_delay: Duration,
    /// Whether the response body is cut off after its control block (a malformed document).
    pub malformed: bool,
}

impl FaultRule {
    /// Whether the rule applies to a request with this control-level controlid.
    pub fn matches(&self, controlid: &str) -> bool {
        controlid.starts_with(&self.controlid_prefix)
    }
}

mod raw {
    //! The file as written, before validation.

    use serde::Deserialize;
    use toml::Spanned;

    use crate::config::LogFormat;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub listen: Option<Spanned<String>>,
        pub delay_ms: Option<Spanned<i64>>,
        pub max_attempts: Option<Spanned<i64>>,
        pub ca_file: Option<Spanned<String>>,
        pub log_format: Option<LogFormat>,
        pub tls: Tls,
        #[serde(default)]
        pub sender: Vec<Spanned<Sender>>,
        #[serde(default)]
        pub login: Vec<Spanned<Login>>,
        #[serde(default)]
        pub policy: Vec<Spanned<Policy>>,
        #[serde(default)]
        pub fault: Vec<Spanned<Fault>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tls {
        pub cert: String,
        pub key: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Sender {
        pub id: Spanned<String>,
        pub password: Spanned<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Login {
        pub company: Spanned<String>,
        pub user: Spanned<String>,
        pub password: Spanned<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Policy {
        pub id: Spanned<String>,
        pub response_url: Spanned<String>,
        pub user: Option<Spanned<String>>,
        pub password: Option<Spanned<String>>,
        #[serde(default)]
        pub serialize: bool,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Fault {
        #[serde(default)]
        pub controlid_prefix: String,
        #[serde(default)]
        pub fail_functions: Vec<Spanned<String>>,
        pub duplicate: Option<Spanned<i64>>,
        pub extra_delay_ms: Option<Spanned<i64>>,
        #[serde(default)]
        pub malformed: bool,
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

    fn at<T>(&self, value: &Spanned<T>, key: &str, message: &str) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            line: Some(self.line(value.span().start)),
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    fn nowhere(&self, key: &str, message: &str) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            line: None,
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    /// An integer in `min..=max`, or `default` when absent.
    fn int(
        &self,
        value: &Option<Spanned<i64>>,
        key: &str,
        default: u64,
        (min, max): (u64, u64),
    ) -> Result<u64, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => match u64::try_from(*v.get_ref()) {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(self.at(v, key, &format!("must be between {min} and {max}"))),
            },
        }
    }

    /// A non-empty string without control characters, at most `max` characters.
    fn text(&self, value: &Spanned<String>, key: &str, max: usize) -> Result<String, ConfigError> {
        let text = value.get_ref();
        if text.is_empty() || text.chars().count() > max || text.chars().any(char::is_control) {
            return Err(self.at(
                value,
                key,
                &format!("must be 1 to {max} characters, without control characters"),
            ));
        }
        Ok(text.clone())
    }
}

impl SimConfig {
    /// Reads and validates a simulator configuration file.
    pub fn from_file(path: &Path) -> Result<SimConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: match e.kind() {
                std::io::ErrorKind::NotFound => "no such file".into(),
                std::io::ErrorKind::PermissionDenied => "permission denied".into(),
                _ => e.to_string().to_lowercase(),
            },
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_toml(&text, &path.display().to_string(), base)
    }

    /// Parses and validates configuration text; relative paths are taken from `base_dir`.
    pub fn from_toml(text: &str, origin: &str, base_dir: &Path) -> Result<SimConfig, ConfigError> {
        let ctx = Ctx { origin, text };
        let file: raw::File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            line: e.span().map(|s| ctx.line(s.start)).unwrap_or(1),
            message: crate::config::one_line(e.message()),
        })?;
        let resolve = |p: &str| {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                base_dir.join(p)
            }
        };

        let listen = match &file.listen {
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|_| ctx.nowhere("listen", "invalid default"))?,
            Some(v) => v
                .get_ref()
                .parse()
                .map_err(|_| ctx.at(v, "listen", "not a socket address such as 127.0.0.1:9443"))?,
        };
        let delay = Duration::from_millis(ctx.int(
            &file.delay_ms,
            "delay_ms",
            DEFAULT_DELAY_MS,
            (0, 86_400_000),
        )?);
        let max_attempts = ctx.int(
            &file.max_attempts,
            "max_attempts",
            u64::from(DEFAULT_MAX_ATTEMPTS),
            (1, 1000),
        )? as u32;
        let ca_file = match &file.ca_file {
            None => None,
            Some(v) if v.get_ref().trim().is_empty() => {
                return Err(ctx.at(v, "ca_file", "must not be empty"))
            }
            Some(v) => Some(resolve(v.get_ref())),
        };

        let mut senders = Vec::with_capacity(file.sender.len());
        let mut sender_ids = HashSet::new();
        for (i, s) in file.sender.iter().enumerate() {
            let s = s.get_ref();
            let id = ctx.text(&s.id, &format!("sender[{i}].id"), 256)?;
            if !sender_ids.insert(id.clone()) {
                return Err(ctx.at(
                    &s.id,
                    &format!("sender[{i}].id"),
                    &format!("duplicate sender id {id:?}"),
                ));
            }
            let password = ctx.text(&s.password, &format!("sender[{i}].password"), 256)?;
            senders.push(Sender {
                id,
                password: password.into(),
            });
        }
        if senders.is_empty() {
            return Err(ctx.nowhere(
                "sender",
                "at least one [[sender]] (id, password) is needed: every request names one",
            ));
        }

        let mut logins = Vec::with_capacity(file.login.len());
        let mut login_keys = HashSet::new();
        for (i, l) in file.login.iter().enumerate() {
            let l = l.get_ref();
            let key = |k: &str| format!("login[{i}].{k}");
            let company = ctx.text(&l.company, &key("company"), 256)?;
            let user = ctx.text(&l.user, &key("user"), 256)?;
            let password = ctx.text(&l.password, &key("password"), 256)?;
            if !login_keys.insert((company.to_lowercase(), user.to_lowercase())) {
                return Err(ctx.at(
                    &l.user,
                    &key("user"),
                    &format!("duplicate login {user:?} for company {company:?}"),
                ));
            }
            logins.push(Login {
                company,
                user,
                password: password.into(),
            });
        }

        let mut policies = Vec::with_capacity(file.policy.len());
        let mut policy_ids = HashSet::new();
        for (i, p) in file.policy.iter().enumerate() {
            let p = p.get_ref();
            let key = |k: &str| format!("policy[{i}].{k}");
            let id = ctx.text(&p.id, &key("id"), POLICY_ID_MAX_CHARS)?;
            if !policy_ids.insert(id.clone()) {
                return Err(ctx.at(&p.id, &key("id"), &format!("duplicate policy id {id:?}")));
            }
            let url_text = p.response_url.get_ref();
            if url_text.chars().count() > RESPONSE_URL_MAX_CHARS {
                return Err(ctx.at(
                    &p.response_url,
                    &key("response_url"),
                    "longer than 256 characters, the gateway's limit for a Response URL",
                ));
            }
            let response_url = ResponseUrl::parse(url_text)
                .map_err(|why| ctx.at(&p.response_url, &key("response_url"), &why))?;
            let credentials = match (&p.user, &p.password) {
                (Some(user), Some(password)) => {
                    let u = ctx.text(user, &key("user"), GATEWAY_CREDENTIAL_MAX_CHARS)?;
                    if u.contains(':') {
                        return Err(ctx.at(user, &key("user"), "must not contain a colon"));
                    }
                    let pw = ctx.text(password, &key("password"), GATEWAY_CREDENTIAL_MAX_CHARS)?;
                    Some((u, SecretString::from(pw)))
                }
                (Some(user), None) => {
                    return Err(ctx.at(user, &key("user"), "has no password"));
                }
                (None, Some(password)) => {
                    return Err(ctx.at(password, &key("user"), "missing: a password needs a user"));
                }
                (None, None) => None,
            };
            policies.push(SimPolicy {
                id,
                response_url,
                credentials,
                serialize: p.serialize,
            });
        }

        let mut faults = Vec::with_capacity(file.fault.len());
        for (i, f) in file.fault.iter().enumerate() {
            let f = f.get_ref();
            let key = |k: &str| format!("fault[{i}].{k}");
            let mut fail_functions = Vec::with_capacity(f.fail_functions.len());
            for name in &f.fail_functions {
                fail_functions.push(ctx.text(name, &key("fail_functions"), 128)?);
            }
            faults.push(FaultRule {
                controlid_prefix: f.controlid_prefix.clone(),
                fail_functions,
                duplicate: ctx.int(&f.duplicate, &key("duplicate"), 0, (0, 10))? as u32,
                extra_delay: Duration::from_millis(ctx.int(
                    &f.extra_delay_ms,
                    &key("extra_delay_ms"),
                    0,
                    (0, 3_600_000),
                )?),
                malformed: f.malformed,
            });
        }

        Ok(SimConfig {
            listen,
            delay,
            max_attempts,
            ca_file,
            log_format: file.log_format.unwrap_or(LogFormat::Text),
            tls: TlsFiles {
                cert: resolve(&file.tls.cert),
                key: resolve(&file.tls.key),
            },
            senders,
            logins,
            policies,
            faults,
        })
    }

    /// A one-line summary for the start-up log.
    pub fn summary(&self) -> String {
        format!(
            "listen {}, delay {} ms, {} sender(s), {} login(s), {} polic{}, {} fault rule(s)",
            self.listen,
            self.delay.as_millis(),
            self.senders.len(),
            self.logins.len(),
            self.policies.len(),
            if self.policies.len() == 1 { "y" } else { "ies" },
            self.faults.len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[tls]
cert = "cert.pem"
key = "key.pem"

[[sender]]
id = "test_sender"
password = "sender-pass"
"#;

    fn parse(extra: &str) -> Result<SimConfig, ConfigError> {
        SimConfig::from_toml(&format!("{BASE}{extra}"), "sim.toml", Path::new("/etc/sim"))
    }

    fn error(extra: &str) -> String {
        parse(extra).expect_err(extra).to_string()
    }

    #[test]
    fn a_minimal_file_gets_the_defaults() {
        let c = parse("").expect("valid");
        assert_eq!(c.listen, "127.0.0.1:9443".parse().expect("addr"));
        assert_eq!(c.delay, Duration::from_millis(200));
        assert_eq!(c.max_attempts, 20);
        assert_eq!(c.ca_file, None);
        assert_eq!(c.tls.cert, PathBuf::from("/etc/sim/cert.pem"));
        assert!(c.policies.is_empty() && c.faults.is_empty() && c.logins.is_empty());
    }

    #[test]
    fn every_documented_key_is_read() {
        let top = "listen = \"0.0.0.0:1\"\ndelay_ms = 0\nmax_attempts = 3\nca_file = \"ca.pem\"\nlog_format = \"json\"\n";
        let extra = r#"
[[login]]
company = "ACME"
user = "xml_gateway"
password = "user-pass"

[[policy]]
id = "dev"
response_url = "https://localhost:8443/callback/dev"
user = "dev"
password = "p"
serialize = true

[[policy]]
id = "open"
response_url = "https://example.com"

[[fault]]
controlid_prefix = "fail-"
fail_functions = ["create", "*"]
duplicate = 2
extra_delay_ms = 1500
malformed = true
"#;
        let c = SimConfig::from_toml(&format!("{top}{BASE}{extra}"), "s", Path::new("/d"))
            .expect("valid");
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.delay, Duration::ZERO);
        assert_eq!(c.max_attempts, 3);
        assert_eq!(c.ca_file, Some(PathBuf::from("/d/ca.pem")));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.logins[0].company, "ACME");
        let dev = &c.policies[0];
        assert!(dev.serialize);
        assert_eq!(dev.response_url.path, "/callback/dev");
        assert_eq!(dev.response_url.base.port(), 8443);
        assert_eq!(
            dev.response_url.to_string(),
            "https://localhost:8443/callback/dev"
        );
        assert_eq!(dev.credentials.as_ref().map(|c| c.0.as_str()), Some("dev"));
        assert!(!c.policies[1].serialize);
        assert!(c.policies[1].credentials.is_none());
        assert_eq!(c.policies[1].response_url.path, "/");
        let fault = &c.faults[0];
        assert_eq!(fault.fail_functions, vec!["create", "*"]);
        assert_eq!(fault.duplicate, 2);
        assert_eq!(fault.extra_delay, Duration::from_millis(1500));
        assert!(fault.malformed);
        assert!(fault.matches("fail-1") && !fault.matches("ok-1"));
        assert!(FaultRule::default().matches("anything"));
    }

    #[test]
    fn unknown_keys_are_errors_with_their_line() {
        let err =
            error("\n[[policy]]\nid = \"a\"\nresponse_url = \"https://h/\"\nserialise = true\n");
        assert!(err.contains("sim.toml:13"), "{err}");
        assert!(err.contains("serialise"), "{err}");
        let err = error("[[fault]]\nduplicates = 1\n");
        assert!(err.contains("duplicates"), "{err}");
    }

    #[test]
    fn values_are_checked_and_the_key_is_named() {
        for (bad, key) in [
            ("[[policy]]\nid = \"a\"\nresponse_url = \"http://h/cb\"\n", "policy[0].response_url"),
            ("[[policy]]\nid = \"a\"\nresponse_url = \"https://h/cb?x=1\"\n", "policy[0].response_url"),
            ("[[policy]]\nid = \"a\"\nresponse_url = \"https://u:p@h/cb\"\n", "policy[0].response_url"),
            ("[[policy]]\nid = \"a\"\nresponse_url = \"https://h/a b\"\n", "policy[0].response_url"),
            ("[[policy]]\nid = \"a\"\nresponse_url = \"https://h/\"\nuser = \"u\"\n", "policy[0].user"),
            ("[[policy]]\nid = \"a\"\nresponse_url = \"https://h/\"\npassword = \"p\"\n", "policy[0].user"),
            ("[[policy]]\nid = \"a\"\nresponse_url = \"https://h/\"\nuser = \"u:v\"\npassword = \"p\"\n", "policy[0].user"),
            ("[[policy]]\nid = \"12345678901234567890123456789012345678901\"\nresponse_url = \"https://h/\"\n", "policy[0].id"),
            ("[[policy]]\nid = \"a\"\nresponse_url = \"https://h/\"\n[[policy]]\nid = \"a\"\nresponse_url = \"https://h/\"\n", "policy[1].id"),
            ("[[sender]]\nid = \"test_sender\"\npassword = \"x\"\n", "sender[1].id"),
            ("[[login]]\ncompany = \"\"\nuser = \"u\"\npassword = \"p\"\n", "login[0].company"),
            ("[[fault]]\nduplicate = 11\n", "fault[0].duplicate"),
            ("[[fault]]\nextra_delay_ms = -1\n", "fault[0].extra_delay_ms"),
            ("[[fault]]\nfail_functions = [\"\"]\n", "fault[0].fail_functions"),
        ] {
            let err = error(bad);
            assert!(err.contains(key), "{bad:?} gave {err}");
            assert!(err.contains("sim.toml:"), "{err}");
        }
        let top = |t: &str| {
            SimConfig::from_toml(&format!("{t}{BASE}"), "sim.toml", Path::new("/"))
                .expect_err(t)
                .to_string()
        };
        assert!(top("listen = \"nowhere\"\n").contains("sim.toml:1: listen"));
        assert!(top("delay_ms = -5\n").contains("delay_ms"));
        assert!(top("max_attempts = 0\n").contains("max_attempts"));
    }

    #[test]
    fn a_sender_is_required() {
        let err = SimConfig::from_toml("[tls]\ncert = \"c\"\nkey = \"k\"\n", "s", Path::new("/"))
            .expect_err("no sender")
            .to_string();
        assert!(err.contains("sender"), "{err}");
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let c = parse(
            "[[login]]\ncompany = \"c\"\nuser = \"u\"\npassword = \"user-secret-42\"\n\
             [[policy]]\nid = \"p\"\nresponse_url = \"https://h/\"\nuser = \"u\"\npassword = \"policy-secret-42\"\n",
        )
        .expect("valid");
        let dbg = format!("{c:?}");
        for secret in ["sender-pass", "user-secret-42", "policy-secret-42"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
    }
}
