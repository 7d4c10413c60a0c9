//! Who is calling: the identity scheme of Stratus certificates and local sockets.
//!
//! A certificate names its holder with subject alternative names (SAN) of the
//! form `stratus://KIND/VALUE`:
//!
//! - exactly one **role URI** `stratus://ROLE/NAME`, ROLE one of `admin`,
//!   `frontend`, `agent`, `project` (callers) or `server` (a daemon's serving
//!   identity, which grants nothing as a caller); NAME is a lower-case name
//!   (`^[a-z0-9][a-z0-9._-]{0,62}$`). For `project`, NAME is the project.
//! - at most one **IQN URI** `stratus://iqn/IQN`: the iSCSI initiator name an
//!   `agent` certificate is bound to (pdiskd exports to no other IQN for it).
//!
//! The subject CN repeats `ROLE/NAME` for humans; only the SAN URIs count.
//! On a daemon's local Unix socket the identity is the peer's uid instead
//! (root or a member of group `stratus` is an admin named `local:USER`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The scheme of every Stratus SAN URI.
pub const SCHEME: &str = "stratus://";
/// The KIND of the SAN URI that binds an agent to its initiator IQN.
pub const IQN_KIND: &str = "iqn";

/// What a caller may do is decided by its role (and, for `project`, its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, on both daemons.
    Admin,
    /// A cloud front-end acting for the project named in each request.
    Frontend,
    /// A compute host's agentd, calling pdiskd for its own guests.
    Agent,
    /// A tenant: its own objects only.
    Project,
    /// A daemon's serving certificate; no rights as a caller.
    Server,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Frontend,
        Role::Agent,
        Role::Project,
        Role::Server,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Frontend => "frontend",
            Role::Agent => "agent",
            Role::Project => "project",
            Role::Server => "server",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a certificate names no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("the certificate has no stratus://ROLE/NAME SAN URI")]
    NoRole,
    #[error("the certificate has more than one stratus://ROLE/NAME SAN URI")]
    SeveralRoles,
    #[error("the certificate has more than one stratus://iqn/ SAN URI")]
    SeveralIqns,
    #[error("SAN URI {0:?}: {1}")]
    BadUri(String, String),
}

/// Checks a role's NAME (also a project's name).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name {name:?} must match ^[a-z0-9][a-z0-9._-]{{0,62}}$"
        ))
    }
}

/// Checks an initiator IQN's form (`iqn.YYYY-MM.reversed.domain[:anything]`,
/// printable ASCII without spaces, at most 223 bytes as RFC 3720 says).
pub fn check_iqn(iqn: &str) -> Result<(), String> {
    let ok = iqn.starts_with("iqn.")
        && iqn.len() <= 223
        && iqn.len() > 12
        && iqn
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{iqn:?} is not an initiator IQN (iqn.YYYY-MM.domain:name)"
        ))
    }
}

/// The identity a certificate (or a local socket) gives its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub role: Role,
    pub name: String,
    /// The initiator IQN an agent certificate is bound to.
    pub iqn: Option<String>,
}

impl Identity {
    pub fn new(role: Role, name: &str) -> Identity {
        Identity {
            role,
            name: name.to_owned(),
            iqn: None,
        }
    }

    /// The SAN URIs that name this identity in a certificate.
    pub fn san_uris(&self) -> Vec<String> {
        let mut uris = vec![format!("{SCHEME}{}/{}", self.role, self.name)];
        if let Some(iqn) = &self.iqn {
            uris.push(format!("{SCHEME}{IQN_KIND}/{iqn}"));
        }
        uris
    }

    /// The identity named by a certificate's SAN URIs (URIs of other schemes
    /// are ignored, so a certificate may serve other systems too).
    pub fn from_san_uris<'a>(
        uris: impl IntoIterator<Item = &'a str>,
    ) -> Result<Identity, IdentityError> {
        let mut role: Option<(Role, String)> = None;
        let mut iqn: Option<String> = None;
        for uri in uris {
            let Some(rest) = uri.strip_prefix(SCHEME) else {
                continue;
            };
            let bad = |why: String| IdentityError::BadUri(uri.to_owned(), why);
            let (kind, value) = rest
                .split_once('/')
                .ok_or_else(|| bad("expected stratus://KIND/VALUE".into()))?;
            if kind == IQN_KIND {
                check_iqn(value).map_err(bad)?;
                if iqn.replace(value.to_owned()).is_some() {
                    return Err(IdentityError::SeveralIqns);
                }
                continue;
            }
            let r = Role::parse(kind).ok_or_else(|| bad(format!("unknown role {kind:?}")))?;
            check_name(value).map_err(bad)?;
            if role.replace((r, value.to_owned())).is_some() {
                return Err(IdentityError::SeveralRoles);
            }
        }
        let (role, name) = role.ok_or(IdentityError::NoRole)?;
        Ok(Identity { role, name, iqn })
    }

    /// The subject distinguished name of this identity's certificates
    /// (`CN=ROLE/NAME,O=Stratus`, see [`crate::issue`]) as RFC 4514 and
    /// GnuTLS print it: what QEMU's `tls-authz` matches a TLS peer by
    /// (names need no escaping: [`check_name`] allows none of `,+="\\<>;#`).
    pub fn subject_dn(&self) -> String {
        format!("CN={}/{},O=Stratus", self.role, self.name)
    }

    /// The identity in a DER certificate (the peer's end-entity certificate;
    /// the TLS layer has already verified it against the CA).
    pub fn from_certificate_der(der: &[u8]) -> Result<Identity, IdentityError> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        let uris: Vec<&str> = san
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some(*u),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Identity::from_san_uris(uris)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)?;
        if let Some(iqn) = &self.iqn {
            write!(f, " (iqn {iqn})")?;
        }
        Ok(())
    }
}

/// How a caller reached the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// TLS 1.3 with a client certificate signed by the daemon's client CA.
    Mtls,
    /// The daemon's local Unix socket (SO_PEERCRED).
    Local,
    /// `--insecure-listen`: plain TCP on loopback, no identity; callers are
    /// the host's admins (anyone on the host who can reach loopback).
    InsecureTcp,
}

/// The caller of one request, put into every request's extensions by the
/// transport. `identity` is `Err` when the certificate or uid names no
/// usable identity: such callers get `Unauthenticated` from every RPC.
#[derive(Debug, Clone)]
pub struct Caller {
    pub transport: Transport,
    pub identity: Result<Identity, String>,
}

impl Caller {
    pub fn admin(transport: Transport, name: &str) -> Caller {
        Caller {
            transport,
            identity: Ok(Identity {
                role: Role::Admin,
                name: name.to_owned(),
                iqn: None,
            }),
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.identity {
            Ok(i) => write!(f, "{i}"),
            Err(why) => write!(f, "unauthenticated ({why})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_and_iqn_uris_round_trip() {
        let id = Identity {
            role: Role::Agent,
            name: "compute-7".into(),
            iqn: Some("iqn.2026-11.org.example:compute-7".into()),
        };
        let uris = id.san_uris();
        assert_eq!(
            uris,
            [
                "stratus://agent/compute-7",
                "stratus://iqn/iqn.2026-11.org.example:compute-7"
            ]
        );
        let back = Identity::from_san_uris(uris.iter().map(String::as_str)).unwrap();
        assert_eq!(back, id);
    }

    #[test]
    fn foreign_uris_are_ignored_and_bad_ones_refused() {
        let id =
            Identity::from_san_uris(["spiffe://example.org/x", "stratus://project/astro"]).unwrap();
        assert_eq!(id, Identity::new(Role::Project, "astro"));
        for (uris, want) in [
            (vec![], IdentityError::NoRole),
            (vec!["https://x/y"], IdentityError::NoRole),
            (
                vec!["stratus://admin/a", "stratus://project/b"],
                IdentityError::SeveralRoles,
            ),
            (
                vec![
                    "stratus://agent/a",
                    "stratus://iqn/iqn.2026-11.org.x:a",
                    "stratus://iqn/iqn.2026-11.org.x:b",
                ],
                IdentityError::SeveralIqns,
            ),
        ] {
            assert_eq!(Identity::from_san_uris(uris).unwrap_err(), want);
        }
        for bad in [
            "stratus://root/a",
            "stratus://admin/",
            "stratus://admin/Alice",
            "stratus://admin/a/b",
            "stratus://admin",
            "stratus://iqn/not-an-iqn",
        ] {
            let err = Identity::from_san_uris([bad]).unwrap_err();
            assert!(matches!(err, IdentityError::BadUri(..)), "{bad}: {err:?}");
        }
    }
}
