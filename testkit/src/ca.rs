//! Certificates made for one test (rcgen), as PEM files.
use std::{net::SocketAddr, time::Duration};

use tonic::transport::Channel;

/// A certificate authority made for one test (rcgen), writing PEM files into its own temp dir.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: tempfile::TempDir,
}

/// A certificate and key issued by a [`TestCa`], as PEM files.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl IssuedCert {
    pub fn cert_pem(&self) -> String {
        std::fs::read_to_string(&self.cert).unwrap()
    }

    pub fn key_pem(&self) -> String {
        std::fs::read_to_string(&self.key).unwrap()
    }

    /// Copies this certificate and key over `to`'s files (as a certificate rotation would).
    pub fn install_over(&self, to: &IssuedCert) {
        std::fs::copy(&self.key, &to.key).unwrap();
        std::fs::copy(&self.cert, &to.cert).unwrap();
    }
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).unwrap();
        TestCa { issuer, dir }
    }

    /// The CA certificate (PEM file).
    pub fn cert_path(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self, stem: &str) -> IssuedCert {
        self.issue(
            stem,
            vec!["127.0.0.1".into(), "localhost".into()],
            None,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose identity is `pc_id`: as its DNS name, or (with `in_cn_only`)
    /// as its common name with no subject alternative name at all.
    pub fn client(&self, pc_id: &str, in_cn_only: bool) -> IssuedCert {
        let (sans, cn) = if in_cn_only {
            (Vec::new(), Some(pc_id))
        } else {
            (vec![pc_id.to_string()], None)
        };
        self.issue(pc_id, sans, cn, rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        stem: &str,
        sans: Vec<String>,
        cn: Option<&str>,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> IssuedCert {
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let issued = IssuedCert {
            cert: self.dir.path().join(format!("{stem}.pem")),
            key: self.dir.path().join(format!("{stem}.key")),
        };
        std::fs::write(&issued.cert, cert.pem()).unwrap();
        std::fs::write(&issued.key, key.serialize_pem()).unwrap();
        issued
    }
}

/// A TLS channel to `addr` trusting `ca`, presenting `client` when given.
pub async fn tls_channel(
    addr: SocketAddr,
    ca: &TestCa,
    client: Option<&IssuedCert>,
) -> Result<Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.cert_pem()));
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(client.cert_pem(), client.key_pem()));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}
