//! TLS: PEM loading, the rustls `ServerConfig`, certificate reload, and the dev certificate.
//!
//! This is the only module that builds rustls configuration. The certificate is served through a
//! [`ReloadableCert`] resolver, so a reload swaps the key for new handshakes while open
//! connections keep the one they negotiated with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or holds no PEM certificate.
    #[error("tls.cert {path}: {reason}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key file could not be read, holds no key, or the key type is unsupported.
    #[error("tls.key {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key does not belong to the certificate.
    #[error("tls.key {path} does not match the first certificate in tls.cert")]
    Mismatch {
        /// The key file.
        path: PathBuf,
    },
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Config(String),
    /// The dev certificate could not be generated or written.
    #[error("dev certificate: {0}")]
    DevCert(String),
}

/// The crypto provider this crate uses everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a PEM certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: cert.to_path_buf(),
        reason,
    };
    let key_err = |reason: String| TlsError::Key {
        path: key.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(pem_reason(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(pem_reason(&e)))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM certificate found".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| key_err(pem_reason(&e)))?;
    let provider = provider();
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| key_err(format!("unsupported key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::Mismatch {
            path: key.to_path_buf(),
        }),
        // Key types whose public key cannot be compared are accepted as they are.
        Err(_) => Ok(Arc::new(certified)),
    }
}

fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => io.to_string().to_lowercase(),
        Error::NoItemsFound => "no PEM item of the expected kind found".into(),
        other => format!("invalid PEM: {other:?}").to_lowercase(),
    }
}

/// A certificate resolver whose key can be swapped at run time.
#[derive(Debug)]
pub struct ReloadableCert {
    /// The key served to new handshakes.
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    /// A resolver serving `key`.
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        Self {
            current: RwLock::new(key),
        }
    }

    /// Serves `key` to every handshake from now on.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        match self.current.write() {
            Ok(mut guard) => *guard = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }

    /// The key currently served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The server configuration: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, no client auth.
pub fn server_config(resolver: Arc<ReloadableCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The files of the dev certificate authority and server certificate.
#[derive(Debug, Clone)]
pub struct DevCertPaths {
    /// The CA certificate clients trust (`ca.pem`).
    pub ca: PathBuf,
    /// The server certificate chain (`cert.pem`).
    pub cert: PathBuf,
    /// The server private key (`key.pem`).
    pub key: PathBuf,
}

impl DevCertPaths {
    /// The paths under `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }
}

/// Creates a private CA and a server certificate for `localhost`, `127.0.0.1` and `::1` under
/// `dir`, unless all three files already exist. Returns whether it created them.
pub fn ensure_dev_cert(dir: &Path) -> Result<(DevCertPaths, bool), TlsError> {
    let paths = DevCertPaths::in_dir(dir);
    if paths.ca.exists() && paths.cert.exists() && paths.key.exists() {
        return Ok((paths, false));
    }
    let err = |e: &dyn std::fmt::Display| TlsError::DevCert(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| err(&format!("{}: {e}", dir.display())))?;

    let ca_key = rcgen::KeyPair::generate().map_err(|e| err(&e))?;
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "callback-receiver dev CA");
    let ca_cert = ca_params.self_signed(&ca_key).map_err(|e| err(&e))?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let leaf_key = rcgen::KeyPair::generate().map_err(|e| err(&e))?;
    let mut leaf_params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(|e| err(&e))?;
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf_params
        .signed_by(&leaf_key, &issuer)
        .map_err(|e| err(&e))?;

    write_file(&paths.ca, ca_cert.pem().as_bytes(), 0o644)?;
    write_file(
        &paths.cert,
        format!("{}{}", leaf_cert.pem(), ca_cert.pem()).as_bytes(),
        0o644,
    )?;
    write_file(&paths.key, leaf_key.serialize_pem().as_bytes(), 0o600)?;
    Ok((paths, true))
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| TlsError::DevCert(format!("{}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}
