//! Signed image endorsements: an endorser vouches for an image by signing
//! its manifest (URL, checksum, format, endorser, issued, expires) with an
//! Ed25519 key; a host whose image policy trusts that key (by its public
//! key, `allow_endorser_keys`) can check, before any byte is fetched, that
//! the image it is asked to run is the one the endorser vouched for and
//! that the endorsement has not expired. This is the StratusLab
//! marketplace's signed metadata, reduced to what a host needs.
//!
//! # Format
//! An endorsement is one printable token, `<manifest>.<signature>`, each
//! part base64url without padding: the manifest is UTF-8 JSON (see
//! [`Manifest`]), the signature Ed25519 over exactly those bytes, so no
//! canonical form is needed. The manifest names its signer's public key;
//! a host looks it up in its trusted keys and refuses a signer it does not
//! know before checking anything else. Public keys are written
//! `ed25519:<base64 of the 32 bytes>`; private keys are PKCS#8 PEM files
//! (`openssl pkey -in KEY -pubout` reads them), made by `stratus-image
//! keygen` with mode 0600.
//!
//! Ed25519 comes from `ring`, which rustls already builds (no second crypto
//! crate); ring verifies strictly (RFC 8032, no malleable signatures).

use std::path::Path;
use std::time::SystemTime;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use stratus_core::error::{Error, Result};

/// Longest token accepted: a manifest is a few hundred bytes.
const MAX_TOKEN_LEN: usize = 16 << 10;
const KEY_PREFIX: &str = "ed25519:";
const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

/// What an endorser signs. Times are RFC 3339 (UTC, seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub url: String,
    pub sha256: String,
    /// "raw", "qcow2" or "auto" (the declared format the image is run with).
    pub format: String,
    /// Who vouches (an e-mail address or a DN), shown to operators.
    pub endorser: String,
    pub issued: String,
    pub expires: String,
    /// The signing key, `ed25519:<base64>`.
    pub signer: String,
}

/// An Ed25519 public key, `ed25519:<base64 of 32 bytes>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn parse(s: &str) -> Result<PublicKey> {
        let bad = || {
            Error::invalid(format!(
                "{s:?} is not an Ed25519 public key ({KEY_PREFIX}<base64 of 32 bytes>)"
            ))
        };
        let b64 = s.trim().strip_prefix(KEY_PREFIX).ok_or_else(bad)?;
        let bytes = STANDARD.decode(b64).map_err(|_| bad())?;
        Ok(PublicKey(bytes.try_into().map_err(|_| bad())?))
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{KEY_PREFIX}{}", STANDARD.encode(self.0))
    }
}

/// An endorser's private key.
pub struct SigningKey(Ed25519KeyPair);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.public())
    }
}

impl SigningKey {
    /// A new key, as PKCS#8 PEM text (to be written 0600) and the key.
    pub fn generate() -> Result<(String, SigningKey)> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| Error::internal("cannot generate an Ed25519 key"))?;
        let key = Ed25519KeyPair::from_pkcs8(doc.as_ref())
            .map_err(|_| Error::internal("the generated key does not parse"))?;
        let b64 = STANDARD.encode(doc.as_ref());
        let mut pem = format!("{PEM_BEGIN}\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str(PEM_END);
        pem.push('\n');
        Ok((pem, SigningKey(key)))
    }

    /// Reads a PKCS#8 PEM file (what [`SigningKey::generate`] writes).
    pub fn load(path: &Path) -> Result<SigningKey> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path.display(), e))?;
        Self::from_pem(&text).map_err(|e| e.context(format!("key file {}", path.display())))
    }

    pub fn from_pem(text: &str) -> Result<SigningKey> {
        let body = text
            .split_once(PEM_BEGIN)
            .and_then(|(_, rest)| rest.split_once(PEM_END))
            .map(|(body, _)| body)
            .ok_or_else(|| Error::invalid("not a PEM PRIVATE KEY"))?;
        let der: String = body.split_whitespace().collect();
        let der = STANDARD
            .decode(der)
            .map_err(|_| Error::invalid("the PEM body is not base64"))?;
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map(SigningKey)
            .map_err(|_| Error::invalid("not an Ed25519 PKCS#8 private key"))
    }

    pub fn public(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(k)
    }

    /// Signs `manifest` (its `signer` is set to this key) into a token.
    pub fn sign(&self, mut manifest: Manifest) -> String {
        manifest.signer = self.public().to_string();
        let bytes = serde_json::to_vec(&manifest).expect("a manifest serializes");
        let sig = self.0.sign(&bytes);
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&bytes),
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        )
    }
}

/// A parsed, not yet verified endorsement token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endorsement {
    token: String,
    bytes: Vec<u8>,
    signature: Vec<u8>,
    manifest: Manifest,
}

impl Endorsement {
    /// Splits and decodes a token; a malformed one is InvalidArgument. Says
    /// nothing about whether it is genuine: see [`Endorsement::verify`].
    pub fn parse(token: &str) -> Result<Endorsement> {
        let bad = |why: &str| Error::invalid(format!("endorsement: {why}"));
        if token.len() > MAX_TOKEN_LEN {
            return Err(bad(&format!("longer than {MAX_TOKEN_LEN} bytes")));
        }
        let (m, s) = token
            .trim()
            .split_once('.')
            .ok_or_else(|| bad("not <manifest>.<signature>"))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(m)
            .map_err(|_| bad("the manifest is not base64url"))?;
        let signature = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| bad("the signature is not base64url"))?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| bad(&format!("the manifest is not one: {e}")))?;
        Ok(Endorsement {
            token: token.trim().to_owned(),
            bytes,
            signature,
            manifest,
        })
    }

    /// The token as given (stored with the spec and the cached image).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// What the token claims; trust it only after [`Endorsement::verify`].
    pub fn claimed(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest, if it is signed by one of `trusted`, its signature
    /// verifies over the bytes as sent, and `now` is within its validity.
    /// The error says which of these failed (for the policy's refusal).
    pub fn verify(
        &self,
        trusted: &[PublicKey],
        now: SystemTime,
    ) -> std::result::Result<&Manifest, String> {
        let m = &self.manifest;
        let signer = PublicKey::parse(&m.signer)
            .map_err(|_| format!("signer {:?} is not a key", m.signer))?;
        if !trusted.contains(&signer) {
            return Err(format!(
                "signed by {signer}, which is not a trusted endorser key"
            ));
        }
        UnparsedPublicKey::new(&ED25519, signer.0)
            .verify(&self.bytes, &self.signature)
            .map_err(|_| format!("the signature by {signer} does not verify (the manifest was changed or the signature is not its)"))?;
        let time = |what: &str, t: &str| {
            humantime::parse_rfc3339_weak(t)
                .map_err(|_| format!("its {what} time {t:?} is not RFC 3339"))
        };
        let (issued, expires) = (time("issued", &m.issued)?, time("expiry", &m.expires)?);
        if now < issued {
            return Err(format!("it is issued for {} (in the future)", m.issued));
        }
        if now >= expires {
            return Err(format!("it expired at {}", m.expires));
        }
        Ok(m)
    }
}

/// RFC 3339 in UTC, to the second, as manifests carry times.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn manifest(now: SystemTime) -> Manifest {
        Manifest {
            url: "https://images.example/a.qcow2".into(),
            sha256: "ab".repeat(32),
            format: "qcow2".into(),
            endorser: "ops@example.org".into(),
            issued: rfc3339(now - Duration::from_secs(60)),
            expires: rfc3339(now + Duration::from_secs(3600)),
            signer: String::new(),
        }
    }

    #[test]
    fn a_signed_manifest_verifies_only_as_signed_by_a_trusted_key_in_time() {
        let now = SystemTime::now();
        let (pem, key) = SigningKey::generate().unwrap();
        let key2 = SigningKey::from_pem(&pem).unwrap();
        assert_eq!(key.public(), key2.public(), "the PEM round-trips");
        let public = key.public();
        assert_eq!(PublicKey::parse(&public.to_string()).unwrap(), public);

        let token = key.sign(manifest(now));
        let e = Endorsement::parse(&token).unwrap();
        let trusted = std::slice::from_ref(&public);
        let m = e.verify(trusted, now).unwrap();
        assert_eq!(m.endorser, "ops@example.org");
        assert_eq!(m.signer, public.to_string());

        // Not trusted: refused before the signature is even looked at.
        let (_, other) = SigningKey::generate().unwrap();
        let why = e.verify(&[other.public()], now).unwrap_err();
        assert!(why.contains("not a trusted endorser key"), "{why}");

        // Expired, or not yet valid.
        let why = e
            .verify(trusted, now + Duration::from_secs(7200))
            .unwrap_err();
        assert!(why.contains("expired"), "{why}");
        let why = e
            .verify(trusted, now - Duration::from_secs(600))
            .unwrap_err();
        assert!(why.contains("future"), "{why}");

        // A manifest changed after signing (another checksum), signature kept.
        let (_, sig) = token.split_once('.').unwrap();
        let mut changed = e.claimed().clone();
        changed.sha256 = "cd".repeat(32);
        let forged = format!(
            "{}.{sig}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&changed).unwrap())
        );
        let why = Endorsement::parse(&forged)
            .unwrap()
            .verify(trusted, now)
            .unwrap_err();
        assert!(why.contains("does not verify"), "{why}");

        // Signed by an untrusted key that claims to be the trusted one.
        let mut claim = manifest(now);
        claim.signer = public.to_string();
        let bytes = serde_json::to_vec(&claim).unwrap();
        let sig = other.0.sign(&bytes);
        let impostor = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&bytes),
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        );
        let why = Endorsement::parse(&impostor)
            .unwrap()
            .verify(&[public], now)
            .unwrap_err();
        assert!(why.contains("does not verify"), "{why}");
    }

    #[test]
    fn malformed_tokens_and_keys_are_invalid_arguments() {
        for t in [
            "",
            "abc",
            "!!.!!",
            "e30.AAAA",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            let err = Endorsement::parse(t).unwrap_err();
            assert_eq!(
                err.kind(),
                stratus_core::error::ErrorKind::InvalidArgument,
                "{t}"
            );
        }
        for k in [
            "",
            "ed25519:",
            "ed25519:AAAA",
            "rsa:AAAA",
            "ed25519:not base64!",
        ] {
            assert!(PublicKey::parse(k).is_err(), "{k}");
        }
        assert!(SigningKey::from_pem(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
        .is_err());
    }
}
