//! The image policy: which images this host agrees to run, decided before
//! any byte is fetched (the StratusLab marketplace policy, kept in spirit).
//!
//! ```toml
//! allow_sha256 = ["<64 hex>", ...]      # these checksums are allowed
//! deny_sha256 = ["<64 hex>", ...]       # these checksums are refused
//! allow_endorsers = ["ops@example.org"] # images these endorsers vouch for are allowed
//! deny_endorsers = ["bad@example.org"]  # images these endorsers vouch for are refused
//! allow_endorser_keys = ["ed25519:<base64>"] # images signed by these keys are allowed
//! require_endorsement = true            # every image needs such a signature
//! ```
//!
//! Every key is optional; unknown keys are errors. A deny always wins. When
//! no allow list is present everything not denied is allowed; when one is
//! present (even empty) an image must be in one of them. Endorsers are
//! compared exactly.
//!
//! An endorser named by a request is a claim; an endorsement (a manifest
//! signed with a key in `allow_endorser_keys`, [`super::endorsement`]) is
//! proof: its manifest must name the image's URL, checksum and declared
//! format, be within its validity, and its endorser then counts for the
//! endorser lists. An endorsement that is present but fails any of these
//! is refused even when none is required (it is evidence of tampering or a
//! mistake, never silently ignored). With `require_endorsement`, an image
//! without a valid endorsement is refused whatever the other lists say.
//! All of it is decided before any byte is fetched.

use std::collections::HashSet;
use std::path::Path;
use std::time::SystemTime;

use serde::Deserialize;

use super::endorsement::{Manifest, PublicKey};
use super::reference::{ImageRef, Sha256};
use stratus_core::error::{Error, Result};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    allow_sha256: Option<Vec<String>>,
    #[serde(default)]
    deny_sha256: Vec<String>,
    allow_endorsers: Option<Vec<String>>,
    #[serde(default)]
    deny_endorsers: Vec<String>,
    allow_endorser_keys: Option<Vec<String>>,
    #[serde(default)]
    require_endorsement: bool,
}

/// A loaded image policy. See the module documentation for its rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    allow_sha256: Option<HashSet<Sha256>>,
    deny_sha256: HashSet<Sha256>,
    allow_endorsers: Option<HashSet<String>>,
    deny_endorsers: HashSet<String>,
    allow_endorser_keys: Option<Vec<PublicKey>>,
    require_endorsement: bool,
}

/// An endorsement the policy verified: who vouched, with which key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endorsed {
    pub endorser: String,
    pub signer: String,
    pub expires: String,
}

impl Policy {
    /// Reads a policy file; a missing or malformed file is InvalidArgument
    /// naming the file.
    pub fn load(path: &Path) -> Result<Policy> {
        let file: PolicyFile = stratus_core::settings::load_toml(Some(path))?;
        Policy::from_file(file).map_err(|e| e.context(format!("image policy {}", path.display())))
    }

    /// Parses a policy from TOML text.
    pub fn from_toml(text: &str) -> Result<Policy> {
        let file: PolicyFile =
            toml::from_str(text).map_err(|e| Error::invalid(format!("image policy: {e}")))?;
        Policy::from_file(file)
    }

    fn from_file(file: PolicyFile) -> Result<Policy> {
        let shas = |list: Vec<String>| -> Result<HashSet<Sha256>> {
            list.iter().map(|s| Sha256::parse(s)).collect()
        };
        Ok(Policy {
            allow_sha256: file.allow_sha256.map(shas).transpose()?,
            deny_sha256: shas(file.deny_sha256)?,
            allow_endorsers: file.allow_endorsers.map(|l| l.into_iter().collect()),
            deny_endorsers: file.deny_endorsers.into_iter().collect(),
            allow_endorser_keys: file
                .allow_endorser_keys
                .map(|l| l.iter().map(|k| PublicKey::parse(k)).collect::<Result<_>>())
                .transpose()?,
            require_endorsement: file.require_endorsement,
        })
    }

    /// `Ok` when the image may be used (with its verified endorsement, if
    /// it has one); FailedPrecondition with the reason otherwise.
    pub fn check(&self, image: &ImageRef) -> Result<Option<Endorsed>> {
        self.check_at(image, SystemTime::now())
    }

    /// [`Policy::check`] at time `now` (endorsements expire).
    pub fn check_at(&self, image: &ImageRef, now: SystemTime) -> Result<Option<Endorsed>> {
        let refuse = |why: String| {
            Err(Error::precondition(format!(
                "image {} (sha256 {}) refused by the image policy: {why}",
                image.url(),
                image.sha256()
            )))
        };
        if self.deny_sha256.contains(image.sha256()) {
            return refuse("denied checksum".into());
        }
        let endorsed = match self.endorsement(image, now) {
            Ok(e) => e,
            Err(why) => return refuse(why),
        };
        if self.require_endorsement && endorsed.is_none() {
            return refuse(
                "it has no endorsement, and this host requires one signed by a trusted key".into(),
            );
        }
        // The endorser that counts: the signed one, else the claimed one.
        let endorser = endorsed
            .as_ref()
            .map(|e| e.endorser.as_str())
            .or(image.endorser());
        if let Some(e) = endorser {
            if self.deny_endorsers.contains(e) {
                return refuse(format!("endorser {e} not allowed (denied)"));
            }
        }
        if endorsed.is_some() {
            return Ok(endorsed);
        }
        if self.allow_sha256.is_none()
            && self.allow_endorsers.is_none()
            && self.allow_endorser_keys.is_none()
        {
            return Ok(None);
        }
        if self
            .allow_sha256
            .as_ref()
            .is_some_and(|a| a.contains(image.sha256()))
        {
            return Ok(None);
        }
        match (endorser, &self.allow_endorsers) {
            (Some(e), Some(allowed)) if allowed.contains(e) => Ok(None),
            (Some(e), Some(_)) => refuse(format!(
                "endorser {e} not allowed, and the checksum is not in the allow list"
            )),
            _ => refuse("not in the allow list".into()),
        }
    }

    /// The image's endorsement, verified: `Ok(None)` when it has none (or
    /// the host trusts no key, so it cannot be checked and counts for
    /// nothing), `Err(why)` when it is present and fails.
    fn endorsement(
        &self,
        image: &ImageRef,
        now: SystemTime,
    ) -> std::result::Result<Option<Endorsed>, String> {
        let Some(e) = image.endorsement() else {
            return Ok(None);
        };
        let Some(trusted) = &self.allow_endorser_keys else {
            return if self.require_endorsement {
                Err("it requires endorsements but trusts no key (allow_endorser_keys)".into())
            } else {
                Ok(None)
            };
        };
        let m: &Manifest = e
            .verify(trusted, now)
            .map_err(|why| format!("endorsement refused: {why}"))?;
        let differs = |what: &str, signed: &str, asked: &str| {
            format!("endorsement refused: it vouches for {what} {signed:?}, not {asked:?}")
        };
        if m.url != image.url() {
            return Err(differs("URL", &m.url, image.url()));
        }
        if !m.sha256.eq_ignore_ascii_case(image.sha256().as_str()) {
            return Err(differs("sha256", &m.sha256, image.sha256().as_str()));
        }
        if m.format != image.format().to_string() {
            return Err(differs("format", &m.format, &image.format().to_string()));
        }
        if let Some(claimed) = image.endorser() {
            if claimed != m.endorser {
                return Err(differs("endorser", &m.endorser, claimed));
            }
        }
        Ok(Some(Endorsed {
            endorser: m.endorser.clone(),
            signer: m.signer.clone(),
            expires: m.expires.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::DeclaredFormat;
    use stratus_core::error::ErrorKind;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn image(sha: &str, endorser: Option<&str>) -> ImageRef {
        ImageRef::new(
            "http://h/i.img",
            sha,
            DeclaredFormat::Auto,
            endorser.map(String::from),
        )
        .unwrap()
    }

    fn refusal(p: &Policy, i: &ImageRef) -> String {
        let err = p.check(i).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        err.message().to_owned()
    }

    #[test]
    fn empty_policy_allows_everything() {
        let p = Policy::from_toml("").unwrap();
        p.check(&image(A, None)).unwrap();
        p.check(&image(B, Some("x"))).unwrap();
    }

    #[test]
    fn deny_lists_win() {
        let p = Policy::from_toml(&format!(
            "deny_sha256 = [\"{A}\"]\nallow_sha256 = [\"{A}\"]\ndeny_endorsers = [\"evil\"]\n\
             allow_endorsers = [\"evil\"]"
        ))
        .unwrap();
        assert!(refusal(&p, &image(A, None)).contains("denied checksum"));
        assert!(refusal(&p, &image(B, Some("evil"))).contains("endorser evil not allowed"));
    }

    #[test]
    fn allow_lists_admit_by_checksum_or_endorser() {
        let p = Policy::from_toml(&format!(
            "allow_sha256 = [\"{}\"]\nallow_endorsers = [\"ops@example.org\"]",
            A.to_ascii_uppercase()
        ))
        .unwrap();
        p.check(&image(A, None)).unwrap();
        p.check(&image(A, Some("someone"))).unwrap();
        p.check(&image(B, Some("ops@example.org"))).unwrap();
        let m = refusal(&p, &image(B, Some("someone")));
        assert!(m.contains("endorser someone not allowed"), "{m}");
        assert!(m.contains(B), "{m}");
        assert!(refusal(&p, &image(B, None)).contains("not in the allow list"));
        // An empty allow list allows nothing.
        let p = Policy::from_toml("allow_sha256 = []").unwrap();
        assert!(refusal(&p, &image(A, None)).contains("not in the allow list"));
    }

    #[test]
    fn unknown_keys_and_bad_checksums_are_errors() {
        let err = Policy::from_toml("allow_sha = []").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.message().contains("allow_sha"), "{err}");
        assert!(Policy::from_toml("deny_sha256 = [\"abc\"]").is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "deny_endorsers = [1]").unwrap();
        let err = Policy::load(&path).unwrap_err();
        assert!(err.message().contains("policy.toml"), "{err}");
        std::fs::write(&path, format!("deny_sha256 = [\"{A}\"]")).unwrap();
        let p = Policy::load(&path).unwrap();
        assert!(refusal(&p, &image(A, None)).contains("denied checksum"));
        assert!(Policy::load(&dir.path().join("missing.toml")).is_err());
    }

    /// An image signed by `key` for `url`/`sha`, valid from `from` for `for_secs`.
    fn signed(
        key: &super::super::SigningKey,
        sha: &str,
        endorser: &str,
        from: SystemTime,
        for_secs: u64,
    ) -> ImageRef {
        use super::super::endorsement::{rfc3339, Manifest};
        let token = key.sign(Manifest {
            url: "http://h/i.img".into(),
            sha256: sha.into(),
            format: "auto".into(),
            endorser: endorser.into(),
            issued: rfc3339(from),
            expires: rfc3339(from + std::time::Duration::from_secs(for_secs)),
            signer: String::new(),
        });
        image(sha, None).with_endorsement(Some(&token)).unwrap()
    }

    #[test]
    fn endorsements_signed_by_trusted_keys_admit_and_any_bad_one_is_refused() {
        use super::super::SigningKey;
        let (_, trusted) = SigningKey::generate().unwrap();
        let (_, stranger) = SigningKey::generate().unwrap();
        let now = SystemTime::now();
        let p = Policy::from_toml(&format!(
            "allow_endorser_keys = [\"{}\"]\nrequire_endorsement = true\ndeny_endorsers = [\"evil\"]",
            trusted.public()
        ))
        .unwrap();
        let good = signed(&trusted, A, "ops@example.org", now, 3600);
        let e = p.check_at(&good, now).unwrap().expect("verified");
        assert_eq!(e.endorser, "ops@example.org");
        assert_eq!(e.signer, trusted.public().to_string());

        let refused = |i: &ImageRef, at: SystemTime| {
            let err = p.check_at(i, at).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
            err.message().to_owned()
        };
        // Required: none, or a claimed endorser, is not enough.
        assert!(refused(&image(A, None), now).contains("no endorsement"));
        assert!(refused(&image(A, Some("ops@example.org")), now).contains("no endorsement"));
        // Untrusted key, expired, a denied endorser even when signed.
        let m = refused(&signed(&stranger, A, "ops@example.org", now, 3600), now);
        assert!(m.contains("not a trusted endorser key"), "{m}");
        let m = refused(&good, now + std::time::Duration::from_secs(3601));
        assert!(m.contains("expired"), "{m}");
        let m = refused(&signed(&trusted, A, "evil", now, 3600), now);
        assert!(m.contains("endorser evil not allowed"), "{m}");
        // Signed for another checksum, URL or format than the one asked for.
        let token = good.endorsement().unwrap().token().to_owned();
        let other_sha = image(B, None).with_endorsement(Some(&token)).unwrap();
        assert!(refused(&other_sha, now).contains("vouches for sha256"));
        let other_url = ImageRef::new("http://h/other.img", A, DeclaredFormat::Auto, None)
            .unwrap()
            .with_endorsement(Some(&token))
            .unwrap();
        assert!(refused(&other_url, now).contains("vouches for URL"));
        let as_raw = ImageRef::new("http://h/i.img", A, DeclaredFormat::Raw, None)
            .unwrap()
            .with_endorsement(Some(&token))
            .unwrap();
        assert!(refused(&as_raw, now).contains("vouches for format"));
        let claims_other =
            ImageRef::new("http://h/i.img", A, DeclaredFormat::Auto, Some("x".into()))
                .unwrap()
                .with_endorsement(Some(&token))
                .unwrap();
        assert!(refused(&claims_other, now).contains("vouches for endorser"));

        // Not required: unendorsed images follow the other lists, but a bad
        // endorsement is still refused, never ignored.
        let p = Policy::from_toml(&format!(
            "allow_endorser_keys = [\"{}\"]\nallow_sha256 = [\"{B}\"]",
            trusted.public()
        ))
        .unwrap();
        assert_eq!(p.check_at(&image(B, None), now).unwrap(), None);
        assert!(p
            .check_at(&image(A, None), now)
            .unwrap_err()
            .message()
            .contains("not in the allow list"));
        assert!(p.check_at(&good, now).unwrap().is_some());
        let m = p
            .check_at(&signed(&stranger, B, "x", now, 60), now)
            .unwrap_err()
            .message()
            .to_owned();
        assert!(m.contains("not a trusted endorser key"), "{m}");
        assert!(Policy::from_toml("allow_endorser_keys = [\"ed25519:AAAA\"]").is_err());
    }
}
