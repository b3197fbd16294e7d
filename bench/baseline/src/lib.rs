//! Helpers shared by the benchmark binaries: callback bodies of a chosen size, a TLS client
//! configuration that trusts the bench CA, percentiles, and a tiny `--flag value` parser.
//!
//! The binaries are:
//! - `baseline-server`: the limit of our own stack, a bare hyper + tokio-rustls server;
//! - `longpoll`: long-poll wake-up latency with many waiting pollers;
//! - `populate`: fills a data directory through the `SledStore` API;
//! - `fsync-probe`: the cost of one 4 KB write + `fdatasync` on a file system;
//! - `mkbody`: writes a callback body (or a template with a controlid placeholder).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Where the controlid goes in a template written by `mkbody --template`.
pub const CID_PLACEHOLDER: &str = "@@CID@@";

/// The length of the controlids the bench uses when sizing bodies (`w1-t2-000000000123` style).
pub const NOMINAL_CID_LEN: usize = 20;

/// A gateway `<response>` document of about `size` bytes (exactly `size` when the controlid has
/// [`NOMINAL_CID_LEN`] bytes), shaped like a `readByQuery` answer with as many `<project>`
/// records as fit, then padded with white space.
pub fn body(size: usize, controlid: &str) -> Vec<u8> {
    let template = template(size);
    template.replace(CID_PLACEHOLDER, controlid).into_bytes()
}

/// [`body`] with [`CID_PLACEHOLDER`] in place of the controlid.
pub fn template(size: usize) -> String {
    let head = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response>\n    <control>\n        \
<status>success</status>\n        <senderid>BENCHSENDER</senderid>\n        \
<controlid>{CID_PLACEHOLDER}</controlid>\n        <uniqueid>false</uniqueid>\n        \
<dtdversion>3.0</dtdversion>\n    </control>\n    <operation>\n        <authentication>\n            \
<status>success</status>\n            <userid>BENCHUSER</userid>\n            \
<companyid>BENCHCO</companyid>\n            <locationid></locationid>\n            \
<sessiontimestamp>2026-12-03T15:29:48-08:00</sessiontimestamp>\n        </authentication>\n        \
<result>\n            <status>success</status>\n            <function>readByQuery</function>\n            \
<controlid>bench-function</controlid>\n            <data listtype=\"project\" count=\"0\" totalcount=\"0\" numremaining=\"0\">\n"
    );
    let tail = "            </data>\n        </result>\n    </operation>\n</response>\n";
    // The placeholder stands for a controlid of NOMINAL_CID_LEN bytes.
    let fixed = head.len() - CID_PLACEHOLDER.len() + NOMINAL_CID_LEN + tail.len();
    let mut records = String::new();
    let mut n = 0u64;
    loop {
        let record = format!(
            "                <project><RECORDNO>{n}</RECORDNO><PROJECTID>P-{n:08}</PROJECTID><NAME>Project number {n}</NAME></project>\n"
        );
        if fixed + records.len() + record.len() > size {
            break;
        }
        records.push_str(&record);
        n += 1;
    }
    let pad = size.saturating_sub(fixed + records.len());
    let mut out = String::with_capacity(size + CID_PLACEHOLDER.len());
    out.push_str(&head);
    out.push_str(&records);
    out.push_str(&" ".repeat(pad));
    out.push_str(tail);
    out
}

/// A rustls client configuration trusting only the PEM certificate(s) in `ca`, offering `alpn`.
pub fn client_config(ca: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap_or_else(|e| die(&format!("{ca:?}: {e}"))) {
        let cert = cert.unwrap_or_else(|e| die(&format!("{ca:?}: {e}")));
        roots
            .add(cert)
            .unwrap_or_else(|e| die(&format!("{ca:?}: {e}")));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| die(&e.to_string()))
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// The `q`-quantile (0..=1) of `sorted`, nearest rank; `NaN` when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Prints the message to stderr and exits with status 1.
pub fn die(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

/// `--name value` pairs from the command line (and bare `--flag`s, with the value `"true"`).
pub struct Args(HashMap<String, String>);

impl Args {
    /// Parses `std::env::args()`.
    pub fn parse() -> Args {
        let mut map = HashMap::new();
        let mut it = std::env::args().skip(1).peekable();
        while let Some(arg) = it.next() {
            let Some(name) = arg.strip_prefix("--") else {
                die(&format!("unexpected argument {arg:?}"));
            };
            let value = match it.peek() {
                Some(v) if !v.starts_with("--") => it.next().unwrap_or_default(),
                _ => "true".to_owned(),
            };
            map.insert(name.to_owned(), value);
        }
        Args(map)
    }

    /// The value of `--name`, or exit with a message.
    pub fn req(&self, name: &str) -> String {
        self.0
            .get(name)
            .cloned()
            .unwrap_or_else(|| die(&format!("--{name} is required")))
    }

    /// The value of `--name`, or `default`.
    pub fn get(&self, name: &str, default: &str) -> String {
        self.0
            .get(name)
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    }

    /// The value of `--name` as a number, or `default`.
    pub fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.0.get(name) {
            None => default,
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| die(&format!("--{name}: not a number: {v:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_asked_size_and_parse() {
        for size in [4096, 1 << 20] {
            let b = body(size, "w1-t2-000000000123xx");
            assert_eq!(b.len(), size);
            let x = callback_receiver::xml::extract(&b).expect("parses");
            assert_eq!(x.controlid.as_deref(), Some("w1-t2-000000000123xx"));
            assert!(x.well_formed);
        }
    }
}
