//! TLS settings of both daemons and their clients: TLS 1.3 only, ring as the
//! crypto provider (no OpenSSL, no aws-lc C build), client certificates
//! required and verified against one CA.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The first certificate of a PEM text, as DER.
pub fn first_cert_der(pem: &[u8]) -> anyhow::Result<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .context("no certificate in the PEM text")?
        .context("unreadable PEM certificate")
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, "certificate")?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading the certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

fn key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = read(path, "key")?;
    PrivateKeyDer::from_pem_slice(&pem)
        .with_context(|| format!("no private key in {}", path.display()))
}

fn roots(path: &Path) -> anyhow::Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store
            .add(c)
            .with_context(|| format!("CA certificate in {}", path.display()))?;
    }
    Ok(Arc::new(store))
}

/// Where a holder's certificate, key and CA are: a daemon's
/// `--tls-cert/--tls-key/--tls-client-ca`, a client's `--cert/--key/--ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// All three or none: anything else is a configuration error naming the
    /// missing flags.
    pub fn from_parts(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
        names: [&str; 3],
    ) -> Result<Option<TlsFiles>, String> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            (c, k, a) => {
                let missing: Vec<&str> = [c.is_none(), k.is_none(), a.is_none()]
                    .iter()
                    .zip(names)
                    .filter(|(m, _)| **m)
                    .map(|(_, n)| n)
                    .collect();
                Err(format!(
                    "{} must be given with {}",
                    missing.join(" and "),
                    names.join(", ")
                ))
            }
        }
    }

    /// A daemon's server settings: TLS 1.3, a client certificate signed by
    /// the CA required.
    pub fn server_config(&self) -> anyhow::Result<ServerConfig> {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&self.ca)?, provider())
            .build()
            .context("client certificate verifier")?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.cert)?, key(&self.key)?)
            .with_context(|| {
                format!(
                    "{} and {} do not make a usable certificate and key",
                    self.cert.display(),
                    self.key.display()
                )
            })?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }

    /// A client's settings: TLS 1.3, the server verified against the CA,
    /// this holder's certificate presented.
    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            .with_root_certificates(roots(&self.ca)?)
            .with_client_auth_cert(certs(&self.cert)?, key(&self.key)?)
            .with_context(|| {
                format!(
                    "{} and {} do not make a usable certificate and key",
                    self.cert.display(),
                    self.key.display()
                )
            })?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }
}

/// A daemon's TLS settings that SIGHUP replaces: handshakes after a reload
/// use the new certificate, key and CA; connections already up keep theirs.
#[derive(Debug)]
pub struct ReloadableServerConfig {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl ReloadableServerConfig {
    pub fn load(files: TlsFiles) -> anyhow::Result<ReloadableServerConfig> {
        let cfg = files.server_config()?;
        Ok(ReloadableServerConfig {
            files,
            current: RwLock::new(Arc::new(cfg)),
        })
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().expect("TLS config lock").clone()
    }

    /// Reads the files again; on error the old settings stay.
    pub fn reload(&self) -> anyhow::Result<()> {
        let cfg = self.files.server_config()?;
        *self.current.write().expect("TLS config lock") = Arc::new(cfg);
        Ok(())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}
