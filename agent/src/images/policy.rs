//! The image policy: which images this host agrees to run, decided before
//! any byte is fetched (the StratusLab marketplace policy, kept in spirit).
//!
//! ```toml
//! allow_sha256 = ["<64 hex>", ...]      # these checksums are allowed
//! deny_sha256 = ["<64 hex>", ...]       # these checksums are refused
//! allow_endorsers = ["ops@example.org"] # images these endorsers vouch for are allowed
//! deny_endorsers = ["bad@example.org"]  # images these endorsers vouch for are refused
//! ```
//!
//! Every key is optional; unknown keys are errors. A deny always wins. When
//! neither allow list is present everything not denied is allowed; when
//! either is present (even empty) an image must be in one of them.
//! Endorsers are compared exactly.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

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
}

/// A loaded image policy. See the module documentation for its rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    allow_sha256: Option<HashSet<Sha256>>,
    deny_sha256: HashSet<Sha256>,
    allow_endorsers: Option<HashSet<String>>,
    deny_endorsers: HashSet<String>,
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
        })
    }

    /// `Ok` when the image may be used; FailedPrecondition with the reason
    /// otherwise.
    pub fn check(&self, image: &ImageRef) -> Result<()> {
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
        if let Some(e) = image.endorser() {
            if self.deny_endorsers.contains(e) {
                return refuse(format!("endorser {e} not allowed (denied)"));
            }
        }
        if self.allow_sha256.is_none() && self.allow_endorsers.is_none() {
            return Ok(());
        }
        if self
            .allow_sha256
            .as_ref()
            .is_some_and(|a| a.contains(image.sha256()))
        {
            return Ok(());
        }
        match (image.endorser(), &self.allow_endorsers) {
            (Some(e), Some(allowed)) if allowed.contains(e) => Ok(()),
            (Some(e), Some(_)) => refuse(format!(
                "endorser {e} not allowed, and the checksum is not in the allow list"
            )),
            _ => refuse("not in the allow list".into()),
        }
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
}
