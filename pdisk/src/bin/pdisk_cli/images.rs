//! Image base volumes, as Stratus agents leave them in pdisk: an image is
//! imported once per checksum into a volume labelled `stratus.io/image-sha256`
//! (its base), and each guest disk made from it is a clone of that volume
//! (labelled `stratus.io/vm` with the guest's UUID, so not a base itself).
//!
//! pdiskd knows nothing of images: `pdisk image` derives them from the volume
//! list, and counts as a base's clones the volumes whose `clone_of_volume`
//! is the base's UUID.

use std::fmt;
use std::str::FromStr;

use stratus_core::cli::args::Ref;
use stratus_proto::pdisk::v1::Volume;
use tonic::Status;

#[cfg(test)]
pub use stratus_core::types::LABEL_IMAGE_SHA256 as LABEL_SHA256;
#[cfg(test)]
pub use stratus_core::types::LABEL_VM;
/// The shortest sha256 prefix `image rm` takes.
pub const MIN_PREFIX: usize = 8;
/// Digits of the sha256 shown in tables and messages.
pub const SHORT: usize = 16;

/// An image: its base volume and the volumes cloned from it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEntry<'a> {
    pub sha256: &'a str,
    pub base: &'a Volume,
    pub clones: Vec<&'a Volume>,
}

impl ImageEntry<'_> {
    pub fn short_sha(&self) -> String {
        short(self.sha256)
    }

    pub fn clone_names(&self) -> Vec<String> {
        self.clones.iter().map(|v| v.name.clone()).collect()
    }
}

/// The first [`SHORT`] characters of a checksum.
pub fn short(sha256: &str) -> String {
    sha256.chars().take(SHORT).collect()
}

/// The images among `volumes` (every volume, so clones can be counted),
/// sorted by checksum then volume name; each image's clones sorted by name.
pub fn images(volumes: &[Volume]) -> Vec<ImageEntry<'_>> {
    let mut out: Vec<ImageEntry<'_>> = volumes
        .iter()
        .filter(|v| !v.image_sha256.is_empty())
        .map(|base| {
            let sha256 = &base.image_sha256;
            let mut clones: Vec<&Volume> = volumes
                .iter()
                .filter(|v| v.clone_of_volume == base.uuid)
                .collect();
            clones.sort_by(|a, b| a.name.cmp(&b.name));
            ImageEntry {
                sha256,
                base,
                clones,
            }
        })
        .collect();
    out.sort_by(|a, b| (a.sha256, &a.base.name).cmp(&(b.sha256, &b.base.name)));
    out
}

/// How `image rm` names an image: its sha256 or a prefix of at least
/// [`MIN_PREFIX`] hex digits, or its base volume's name or UUID. A string
/// that can be both (`deadbeef01`) is tried as both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSel {
    text: String,
    /// Lowercase hex, when the text is a possible checksum prefix.
    prefix: Option<String>,
    /// When the text is a possible volume name or UUID.
    volume: Option<Ref>,
}

impl FromStr for ImageSel {
    type Err = String;
    fn from_str(s: &str) -> Result<ImageSel, String> {
        let lower = s.to_ascii_lowercase();
        let hex = (MIN_PREFIX..=64).contains(&lower.len())
            && lower.bytes().all(|c| c.is_ascii_hexdigit());
        let volume = s.parse::<Ref>().ok();
        if !hex && volume.is_none() {
            return Err(format!(
                "{s:?} is neither a sha256 (or a prefix of at least {MIN_PREFIX} hex digits) \
                 nor a volume name or UUID"
            ));
        }
        Ok(ImageSel {
            text: s.to_owned(),
            prefix: hex.then_some(lower),
            volume,
        })
    }
}

impl fmt::Display for ImageSel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl ImageSel {
    /// Names `i` exactly: its whole checksum, its base's name or UUID.
    fn is_exact(&self, i: &ImageEntry<'_>) -> bool {
        self.prefix.as_deref() == Some(i.sha256)
            || self
                .volume
                .as_ref()
                .is_some_and(|r| r.as_str() == i.base.name || r.as_str() == i.base.uuid)
    }

    fn is_prefix(&self, i: &ImageEntry<'_>) -> bool {
        self.prefix
            .as_deref()
            .is_some_and(|p| i.sha256.starts_with(p))
    }
}

/// The one image `sel` names: an exact match (checksum, volume name or UUID)
/// first, else the one image whose checksum starts with it. Errors are
/// statuses as pdiskd would give them: NotFound, or InvalidArgument when the
/// selector names several images.
pub fn resolve<'e, 'a>(
    images: &'e [ImageEntry<'a>],
    sel: &ImageSel,
) -> Result<&'e ImageEntry<'a>, Status> {
    let pick = |matches: Vec<&'e ImageEntry<'a>>| -> Option<Result<&'e ImageEntry<'a>, Status>> {
        match matches.as_slice() {
            [] => None,
            [one] => Some(Ok(one)),
            many => Some(Err(Status::invalid_argument(format!(
                "{sel} names {} images ({}); give more digits or the volume name",
                many.len(),
                many.iter()
                    .map(|i| format!("{} in volume {}", i.short_sha(), i.base.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))),
        }
    };
    if let Some(r) = pick(images.iter().filter(|i| sel.is_exact(i)).collect()) {
        return r;
    }
    if let Some(r) = pick(images.iter().filter(|i| sel.is_prefix(i)).collect()) {
        return r;
    }
    let hint = if sel.prefix.is_none() && sel.text.bytes().all(|c| c.is_ascii_hexdigit()) {
        format!(" (a sha256 prefix needs at least {MIN_PREFIX} hex digits)")
    } else {
        String::new()
    };
    Err(Status::not_found(format!("no image matches {sel}{hint}")))
}

/// Why `image` cannot be removed now, if it cannot: a base is never deleted
/// while volumes cloned from it exist.
pub fn removal_refusal(image: &ImageEntry<'_>) -> Option<Status> {
    if image.clones.is_empty() {
        return None;
    }
    Some(Status::failed_precondition(format!(
        "image {} (volume {}) has {} clone(s): {}; delete them first",
        image.short_sha(),
        image.base.name,
        image.clones.len(),
        image.clone_names().join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    const SHA_A: &str = "3f5a9c1e00112233445566778899aabbccddeeff00112233445566778899aabb";
    const SHA_B: &str = "3f5a9c1effffffff445566778899aabbccddeeff00112233445566778899aabb";

    fn vol(name: &str, uuid: &str, labels: &[(&str, &str)], source: &str) -> Volume {
        Volume {
            uuid: uuid.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            // As pdiskd answers: an image base is labelled and not a guest's.
            image_sha256: match labels.iter().find(|(k, _)| *k == LABEL_SHA256) {
                Some((_, sha)) if !labels.iter().any(|(k, _)| *k == LABEL_VM) => sha.to_string(),
                _ => String::new(),
            },
            clone_of_volume: source.strip_prefix("volume:").unwrap_or("").into(),
            clone_of_snapshot: source.strip_prefix("snapshot:").unwrap_or("").into(),
            source: source.into(),
            ..Default::default()
        }
    }

    /// Two bases (one with two clones, one a guest clone carrying the image
    /// label too), and an unrelated volume.
    fn fixture() -> Vec<Volume> {
        vec![
            vol("data", "u-data", &[], ""),
            vol("image-b", "u-b", &[(LABEL_SHA256, SHA_B)], "image:upload"),
            vol(
                "vm-2-vda",
                "u-c2",
                &[(LABEL_VM, "vm2"), (LABEL_SHA256, SHA_A)],
                "volume:u-a",
            ),
            vol("image-a", "u-a", &[(LABEL_SHA256, SHA_A)], "image:upload"),
            vol("vm-1-vda", "u-c1", &[(LABEL_VM, "vm1")], "volume:u-a"),
            vol("copy-of-b", "u-c3", &[], "snapshot:u-b"),
        ]
    }

    #[test]
    fn images_are_labelled_bases_with_their_clones() {
        let vs = fixture();
        let is = images(&vs);
        assert_eq!(is.len(), 2);
        assert_eq!(is[0].sha256, SHA_A);
        assert_eq!(is[0].base.name, "image-a");
        assert_eq!(is[0].clone_names(), ["vm-1-vda", "vm-2-vda"]);
        assert_eq!(is[0].short_sha(), "3f5a9c1e00112233");
        assert_eq!(is[1].base.name, "image-b");
        assert!(is[1].clones.is_empty(), "a snapshot's copy is no clone");
    }

    #[test]
    fn selectors_parse_as_checksums_names_or_both() {
        let s: ImageSel = "3F5A9C1E".parse().unwrap();
        assert_eq!(s.prefix.as_deref(), Some("3f5a9c1e"));
        assert!(s.volume.is_none(), "uppercase is no volume name");
        let s: ImageSel = "deadbeef01".parse().unwrap();
        assert!(s.prefix.is_some() && s.volume.is_some());
        let s: ImageSel = "image-a".parse().unwrap();
        assert!(s.prefix.is_none() && s.volume.is_some());
        assert!(SHA_A.parse::<ImageSel>().unwrap().volume.is_none());
        for bad in ["", "../x", "Image-A", &format!("{SHA_A}0")] {
            assert!(bad.parse::<ImageSel>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolve_prefers_exact_matches_and_refuses_ambiguity() {
        let vs = fixture();
        let is = images(&vs);
        let get = |s: &str| resolve(&is, &s.parse().unwrap()).map(|i| i.base.name.clone());
        assert_eq!(get(SHA_A).unwrap(), "image-a");
        assert_eq!(get("3f5a9c1e0011").unwrap(), "image-a");
        assert_eq!(get("3F5A9C1EFF").unwrap(), "image-b");
        assert_eq!(get("image-b").unwrap(), "image-b");
        assert_eq!(get("u-a").unwrap(), "image-a");
        let e = get("3f5a9c1e").unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("names 2 images"), "{}", e.message());
        let e = get("data").unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "not an image");
        let e = get("3f5a9c").unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(
            e.message().contains("at least 8 hex digits"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn a_base_with_clones_is_never_removed() {
        let vs = fixture();
        let is = images(&vs);
        let e = removal_refusal(&is[0]).unwrap();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert_eq!(
            e.message(),
            "image 3f5a9c1e00112233 (volume image-a) has 2 clone(s): vm-1-vda, vm-2-vda; \
             delete them first"
        );
        assert!(removal_refusal(&is[1]).is_none());
    }
}
