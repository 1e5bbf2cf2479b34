//! TLS plumbing both programs share: the one crypto provider (ring), installed as the process
//! default, and PEM files read with errors that name the file.

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// Installs ring as the process-wide rustls crypto provider. Call once at start, before any TLS
/// configuration is built; calling it again is harmless.
pub fn install_crypto_provider() {
    // Err means a provider is already installed: ring, by an earlier call.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The process-wide crypto provider (installing ring first when nothing is installed yet).
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    install_crypto_provider();
    rustls::crypto::CryptoProvider::get_default()
        .expect("a crypto provider was just installed")
        .clone()
}

/// A PEM file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {reason}")]
pub struct PemError {
    what: &'static str,
    path: String,
    reason: String,
}

impl PemError {
    fn new(what: &'static str, path: &Path, reason: impl ToString) -> PemError {
        PemError {
            what,
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// A PEM file, read once. `what` names its role in messages (e.g. "--tls-cert"); `Debug` shows
/// the path only, never the contents, which may be a private key.
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    path: PathBuf,
    what: &'static str,
    contents: Vec<u8>,
}

impl std::fmt::Debug for PemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PemFile({self})")
    }
}

/// The file's role and path, e.g. `--tls-cert /etc/kanade/tls/tls.crt`.
impl std::fmt::Display for PemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.what, self.path.display())
    }
}

impl PemFile {
    pub fn read(path: &Path, what: &'static str) -> Result<PemFile, PemError> {
        let contents = std::fs::read(path).map_err(|e| PemError::new(what, path, e))?;
        Ok(PemFile {
            path: path.to_path_buf(),
            what,
            contents,
        })
    }

    pub fn contents(&self) -> &[u8] {
        &self.contents
    }

    fn error(&self, reason: impl ToString) -> PemError {
        PemError::new(self.what, &self.path, reason)
    }

    /// Every certificate in the file (a chain, or a bundle of CA certificates).
    pub fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, PemError> {
        let certs = CertificateDer::pem_slice_iter(&self.contents)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(format!("not a PEM certificate file: {e}")))?;
        if certs.is_empty() {
            return Err(self.error("holds no `-----BEGIN CERTIFICATE-----` block"));
        }
        Ok(certs)
    }

    /// The file's private key (PKCS#8, PKCS#1 or SEC1). The key never reaches a message.
    pub fn private_key(&self) -> Result<PrivateKeyDer<'static>, PemError> {
        PrivateKeyDer::from_pem_slice(&self.contents)
            .map_err(|e| self.error(format!("holds no usable PEM private key ({e})")))
    }
}
