//! TLS on the gRPC port (SPEC §7): rustls with the shared crypto provider, certificates reloaded
//! when their files change (rotation without restart), and optional mTLS against `--client-ca`,
//! where the client certificate's identity (DNS SAN, else CN) becomes the only `pc_id` the
//! connection may write.
//!
//! The handshake is the proof a TLS listener asks of a connection ([`crate::listen`]): it must
//! finish within `--hello-timeout`, so a client that connects and sends nothing holds a socket
//! for that long and no more.

use std::{
    io,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use anyhow::Context as _;
use kanade_shared::tls::{PemError, PemFile, crypto_provider};
use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::Connected;

use crate::listen::Proof;

/// The files TLS is built from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate issued by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads every file once; a check fingerprints and builds from the same bytes.
    fn read(&self) -> Result<TlsContents, PemError> {
        Ok(TlsContents {
            cert: PemFile::read(&self.cert, "--tls-cert")?,
            key: PemFile::read(&self.key, "--tls-key")?,
            client_ca: self
                .client_ca
                .as_deref()
                .map(|path| PemFile::read(path, "--client-ca"))
                .transpose()?,
        })
    }
}

/// What the TLS files held at one check.
struct TlsContents {
    cert: PemFile,
    key: PemFile,
    client_ca: Option<PemFile>,
}

impl TlsContents {
    /// The contents, hashed: a change of any file changes this.
    fn fingerprint(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        for file in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
        {
            hash.update(file.contents());
            hash.update([0]);
        }
        hash.finalize().into()
    }

    /// Builds the server configurations; errors name the flag and the file at fault.
    fn server_configs(&self) -> anyhow::Result<Configs> {
        let provider = crypto_provider();
        let builder = || {
            ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .context("the TLS provider supports no safe protocol version")
        };
        let grpc = match &self.client_ca {
            Some(file) => {
                let mut roots = RootCertStore::empty();
                for cert in file.certificates()? {
                    roots
                        .add(cert)
                        .with_context(|| format!("{file}: not a usable CA certificate"))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .with_context(|| file.to_string())?;
                builder()?.with_client_cert_verifier(verifier)
            }
            None => builder()?.with_no_client_auth(),
        };
        let with_cert =
            |b: rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>| {
                let (certs, key) = (self.cert.certificates()?, self.key.private_key()?);
                b.with_single_cert(certs, key).with_context(|| {
                    format!(
                        "{} and {} do not form a usable certificate and key",
                        self.cert, self.key
                    )
                })
            };
        let mut grpc = with_cert(grpc)?;
        grpc.alpn_protocols = vec![b"h2".to_vec()];
        // Browsers have no client certificates: the console signs people in with tokens.
        let mut console = with_cert(builder()?.with_no_client_auth())?;
        console.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Configs {
            grpc: Arc::new(grpc),
            console: Arc::new(console),
        })
    }
}

/// One configuration per kind of listener, from the same files.
#[derive(Clone)]
struct Configs {
    /// HTTP/2 (ALPN h2), client certificates required under --client-ca.
    grpc: Arc<ServerConfig>,
    /// HTTP/1.1, no client certificates.
    console: Arc<ServerConfig>,
}

/// Which listener a handshake is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Grpc,
    Console,
}

/// The server's TLS configuration, swapped whole when the files change.
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<Configs>,
    /// Fingerprint of the files last loaded (or last found unusable, so a bad file is reported
    /// once, not at every check).
    seen: RwLock<[u8; 32]>,
}

impl ServerTls {
    /// Loads the files; fails with a message naming the flag and file when they are unusable.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<ServerTls>> {
        let contents = files.read()?;
        let config = contents.server_configs()?;
        let seen = contents.fingerprint();
        Ok(Arc::new(ServerTls {
            files,
            current: RwLock::new(config),
            seen: RwLock::new(seen),
        }))
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }

    fn acceptor(&self, served: Served) -> TlsAcceptor {
        let configs = self.current.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(match served {
            Served::Grpc => configs.grpc.clone(),
            Served::Console => configs.console.clone(),
        })
    }

    /// Reloads the configuration if the files changed. A change that does not load keeps the
    /// previous configuration serving and is logged once.
    pub fn reload_if_changed(&self) {
        let Ok(contents) = self.files.read() else {
            // Mid-rotation (a file briefly missing): look again at the next check.
            return;
        };
        let fingerprint = contents.fingerprint();
        if *self.seen.read().unwrap_or_else(|e| e.into_inner()) == fingerprint {
            return;
        }
        *self.seen.write().unwrap_or_else(|e| e.into_inner()) = fingerprint;
        match contents.server_configs() {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate files changed; reloaded");
            }
            Err(err) => tracing::error!(
                error = %format!("{err:#}"),
                "TLS certificate files changed but cannot be used; still serving the previous ones"
            ),
        }
    }
}

/// What ingest knows about the peer of a TLS connection; handed to every request on it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The verified client certificate's identity (DNS SAN, else CN), under mTLS.
    pub certificate_identity: Option<Arc<str>>,
}

/// One accepted TLS connection.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: Peer,
}

impl Connected for TlsConnection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The identity a client certificate proves: its first DNS subject alternative name, else its
/// subject's common name.
pub fn certificate_identity(der: &[u8]) -> Result<String, String> {
    use x509_parser::{extensions::GeneralName, prelude::*};
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("the client certificate does not parse: {e}"))?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                return Ok(dns.to_string());
            }
        }
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .ok_or_else(|| "the client certificate has neither a DNS name nor a common name".into())
}

/// The proof a TLS listener asks of a connection: a completed handshake (under mTLS with a
/// verified client certificate, whose identity the connection carries from then on).
#[derive(Clone)]
pub struct TlsHandshake {
    pub tls: Arc<ServerTls>,
    pub served: Served,
}

impl Proof for TlsHandshake {
    type Connection = TlsConnection;
    const AWAITED: &'static str = "TLS handshake";

    async fn prove(&self, tcp: TcpStream) -> Result<TlsConnection, String> {
        let stream = self
            .tls
            .acceptor(self.served)
            .accept(tcp)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let certificate_identity =
            if self.served == Served::Grpc && self.tls.requires_client_certificates() {
                let leaf = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .ok_or("TLS handshake failed: no client certificate")?;
                Some(Arc::from(certificate_identity(leaf)?))
            } else {
                None
            };
        Ok(TlsConnection {
            stream,
            peer: Peer {
                certificate_identity,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::certificate_identity;

    fn certificate(sans: Vec<String>, cn: Option<&str>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_is_the_dns_name_else_the_common_name() {
        assert_eq!(
            certificate_identity(&certificate(vec!["pc-7".into()], Some("other"))).unwrap(),
            "pc-7"
        );
        assert_eq!(
            certificate_identity(&certificate(vec![], Some("pc-8"))).unwrap(),
            "pc-8"
        );
        assert!(
            certificate_identity(&certificate(vec![], None))
                .unwrap_err()
                .contains("neither")
        );
    }
}
