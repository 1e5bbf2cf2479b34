//! TLS plumbing both programs share: the one crypto provider (ring), installed as the process
//! default, and PEM files read with errors that name the file.

use std::path::Path;

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

/// Reads every certificate of a PEM file (a chain, or a bundle of CA certificates).
/// `what` names the file's role in messages, e.g. "--tls-cert".
pub fn read_certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let pem = std::fs::read(path).map_err(|e| PemError::new(what, path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::new(what, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(PemError::new(
            what,
            path,
            "holds no `-----BEGIN CERTIFICATE-----` block",
        ));
    }
    Ok(certs)
}

/// Reads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1). The key never reaches a message.
pub fn read_private_key(
    path: &Path,
    what: &'static str,
) -> Result<PrivateKeyDer<'static>, PemError> {
    let pem = std::fs::read(path).map_err(|e| PemError::new(what, path, e))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| PemError::new(what, path, format!("holds no usable PEM private key ({e})")))
}
