//! The certificate authority of a Stratus cloud and the certificates it issues.
//!
//! A CA directory holds `ca.pem` (the CA certificate, given to every daemon
//! as `--tls-client-ca` and to every client as `--ca`) and `ca.key` (0600,
//! needed only to issue). Keys are ECDSA P-256; the CA may sign only
//! end-entity certificates (path length 0). An issued certificate carries its
//! identity as SAN URIs (see [`crate::identity`]), EKU clientAuth, and
//! serverAuth plus DNS/IP SANs when it names hosts (a daemon's certificate;
//! agentd uses one certificate both to serve and to call pdiskd).

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::identity::{check_iqn, Identity, Role};

/// Certificates start being valid a little in the past, for clock skew.
const BACKDATE: Duration = Duration::from_secs(300);
pub const CA_DAYS: u32 = 3650;
pub const LEAF_DAYS: u32 = 365;

pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

pub fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}

/// What to put in a certificate.
#[derive(Debug, Clone)]
pub struct Request {
    pub identity: Identity,
    /// DNS names or IP addresses the holder serves on (server certificates).
    pub hosts: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Request {
    /// A certificate valid from now (minus skew) for `days`.
    pub fn new(identity: Identity, hosts: Vec<String>, days: u32) -> Request {
        let now = OffsetDateTime::now_utc();
        Request {
            identity,
            hosts,
            not_before: now - BACKDATE,
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a new CA (certificate and key), valid for `days`.
pub fn new_ca(common_name: &str, days: u32) -> anyhow::Result<Issued> {
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Stratus");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::from_secs(u64::from(days) * 86_400);
    let cert = params.self_signed(&key).context("signing the CA")?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a certificate for `req` signed by the CA.
pub fn issue(ca: &Issued, req: &Request) -> anyhow::Result<Issued> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).context("reading the CA key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).context("reading the CA")?;
    if let Some(iqn) = &req.identity.iqn {
        check_iqn(iqn).map_err(anyhow::Error::msg)?;
        if req.identity.role != Role::Agent {
            bail!("only agent certificates are bound to an IQN");
        }
    }
    crate::identity::check_name(&req.identity.name).map_err(anyhow::Error::msg)?;
    let key = KeyPair::generate().context("generating the key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("{}/{}", req.identity.role, req.identity.name),
    );
    dn.push(DnType::OrganizationName, "Stratus");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if !req.hosts.is_empty() {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    params.use_authority_key_identifier_extension = true;
    for uri in req.identity.san_uris() {
        params
            .subject_alt_names
            .push(SanType::URI(uri.as_str().try_into().context("SAN URI")?));
    }
    for host in &req.hosts {
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.as_str()
                    .try_into()
                    .with_context(|| format!("host name {host:?}"))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    params.not_before = req.not_before;
    params.not_after = req.not_after;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the certificate")?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes `text` to a new file with `mode`; an existing file is an error
/// unless `replace` (then it is replaced by rename, never half-written).
pub fn write_new(path: &Path, text: &str, mode: u32, replace: bool) -> anyhow::Result<()> {
    if !replace && path.exists() {
        bail!("{} exists (remove it first)", path.display());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Makes a CA in `dir` (created 0700 if missing); refuses to replace one.
pub fn init_dir(dir: &Path, common_name: &str, days: u32) -> anyhow::Result<Issued> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if ca_key_path(dir).exists() || ca_cert_path(dir).exists() {
        bail!("{} already holds a CA", dir.display());
    }
    let ca = new_ca(common_name, days)?;
    write_new(&ca_key_path(dir), &ca.key_pem, 0o600, false)?;
    write_new(&ca_cert_path(dir), &ca.cert_pem, 0o644, false)?;
    Ok(ca)
}

/// Reads the CA of `dir`.
pub fn load_ca(dir: &Path) -> anyhow::Result<Issued> {
    let read =
        |p: PathBuf| fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()));
    Ok(Issued {
        cert_pem: read(ca_cert_path(dir))?,
        key_pem: read(ca_key_path(dir))?,
    })
}

/// Facts of a PEM certificate, for `stratus-pki show` and the quickstart.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertFacts {
    pub subject: String,
    pub issuer: String,
    pub identity: Option<Identity>,
    pub identity_error: Option<String>,
    pub hosts: Vec<String>,
    pub not_before: String,
    pub not_after: String,
    pub is_ca: bool,
}

pub fn describe(cert_pem: &str) -> anyhow::Result<CertFacts> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let der = crate::tls::first_cert_der(cert_pem.as_bytes())?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| anyhow::anyhow!("{e}"))?;
    let identity = Identity::from_certificate_der(&der);
    let hosts = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => Some(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                        16 => Some(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CertFacts {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        identity_error: identity.as_ref().err().map(|e| e.to_string()),
        identity: identity.ok(),
        hosts,
        not_before: cert.validity().not_before.to_string(),
        not_after: cert.validity().not_after.to_string(),
        is_ca: cert.is_ca(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_identity_and_iqn() {
        let ca = new_ca("test CA", 10).unwrap();
        let id = Identity {
            role: Role::Agent,
            name: "compute-7".into(),
            iqn: Some("iqn.2026-11.org.example:compute-7".into()),
        };
        let leaf = issue(
            &ca,
            &Request::new(
                id.clone(),
                vec!["127.0.0.1".into(), "compute-7.example.org".into()],
                1,
            ),
        )
        .unwrap();
        let der = crate::tls::first_cert_der(leaf.cert_pem.as_bytes()).unwrap();
        assert_eq!(Identity::from_certificate_der(&der).unwrap(), id);
        let facts = describe(&leaf.cert_pem).unwrap();
        assert_eq!(facts.hosts, ["127.0.0.1", "compute-7.example.org"]);
        assert!(
            facts.subject.contains("agent/compute-7"),
            "{}",
            facts.subject
        );
        assert!(!facts.is_ca);
        assert!(describe(&ca.cert_pem).unwrap().is_ca);
        // The subject QEMU's tls-authz matches a live migration's source by.
        assert_eq!(facts.subject.replace(", ", ","), id.subject_dn());
    }

    #[test]
    fn only_agents_are_bound_to_an_iqn() {
        let ca = new_ca("test CA", 10).unwrap();
        let id = Identity {
            role: Role::Project,
            name: "astro".into(),
            iqn: Some("iqn.2026-11.org.example:x".into()),
        };
        assert!(issue(&ca, &Request::new(id, vec![], 1)).is_err());
        let bad = Identity::new(Role::Admin, "Alice");
        assert!(issue(&ca, &Request::new(bad, vec![], 1)).is_err());
    }

    #[test]
    fn a_ca_directory_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), "c", 1).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(ca_key_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(init_dir(dir.path(), "c", 1).is_err());
        load_ca(dir.path()).unwrap();
    }
}
