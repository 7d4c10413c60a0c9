//! `vm create --disk`: `pdisk:[SERVER/]VOLUME`, `file:PATH` or
//! `image:URL,sha256=HEX` and their options.

use std::path::PathBuf;
use std::str::FromStr;

use agent::images::{DeclaredFormat, ImageRef, Sha256};
use agent::spec::ServerName;
use stratus_core::cli::args::Ref;
use stratus_core::types::ByteSize;

use super::host_path;

/// Highest boot index a disk may be given (QEMU's bootindex is small anyway).
pub(super) const MAX_BOOT_INDEX: u32 = 255;

/// Where a disk's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A pdisk volume, by name or UUID; the agent has it exported to this host.
    Pdisk(Ref),
    /// An image file on this host (raw or qcow2).
    File(PathBuf),
    /// An image by URL and checksum, through the agent's image caches.
    Image(ImageDisk),
}

/// The image-only part of an `image:` disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDisk {
    /// URL, checksum, declared format and endorser, checked by the agent's
    /// own type, so client and server accept exactly the same references.
    pub image: ImageRef,
    /// The disk's size, grown from the image's; `None`: the image's size.
    pub size: Option<ByteSize>,
    /// An ephemeral qcow2 overlay on this host's cached copy instead of a
    /// per-guest pdisk clone.
    pub local: bool,
}

/// One `--disk`: `pdisk:[SERVER/]VOLUME`, `file:PATH` or `image:URL,sha256=HEX`, then
/// options (`ro`, `boot=N`; for images also `size=`, `local`, `server=`, `format=`,
/// `endorser=`, `endorsement=TOKEN|@FILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    pub source: DiskSource,
    pub read_only: bool,
    /// Place in the boot order, 1 first; `None`: not bootable unless no disk
    /// has one (then the first disk boots).
    pub boot: Option<u32>,
    /// The agent's pdisk server the volume is on (`pdisk:SERVER/VOLUME`) or
    /// an image clone is made on (`server=`); `None`: the default one.
    pub server: Option<ServerName>,
}

/// The options of an `image:` disk, as `--disk` usage errors list them.
pub(super) const IMAGE_OPTIONS: &str =
    "sha256=HEX, size=SIZE, local, server=NAME, format=raw|qcow2|auto, endorser=NAME, \
     endorsement=TOKEN|@FILE, ro or boot=N";

/// Why a URL cannot be given with a ',' in it, and what to do instead.
pub(super) const URL_COMMA: &str = "an image URL in --disk cannot contain ',': write it as %2C";

/// The options of one `--disk`, each at most once.
#[derive(Default)]
pub(super) struct DiskOptions<'a> {
    read_only: bool,
    boot: Option<u32>,
    sha256: Option<Sha256>,
    size: Option<ByteSize>,
    local: bool,
    format: Option<DeclaredFormat>,
    endorser: Option<&'a str>,
    endorsement: Option<String>,
    server: Option<ServerName>,
}

impl<'a> DiskOptions<'a> {
    /// Parses the options after the source; `image` says whether the
    /// image-only ones are allowed.
    fn parse(options: impl Iterator<Item = &'a str>, image: bool) -> Result<Self, String> {
        let mut o = DiskOptions::default();
        let mut seen: Vec<&str> = Vec::new();
        for option in options {
            let (key, value) = option
                .split_once('=')
                .map_or((option, None), |(k, v)| (k, Some(v)));
            let placeholder = match key {
                "ro" | "local" => None,
                "boot" => Some("N"),
                "sha256" => Some("HEX"),
                "size" => Some("SIZE"),
                "format" => Some("raw|qcow2|auto"),
                "endorser" => Some("NAME"),
                "endorsement" => Some("TOKEN|@FILE"),
                "server" => Some("NAME"),
                _ => return Err(unknown_disk_option(option, image)),
            };
            if !image && !matches!(key, "ro" | "boot") {
                return Err(format!(
                    "disk option {key:?} is only for image disks (image:URL,sha256=HEX,...)"
                ));
            }
            if seen.contains(&key) {
                return Err(format!("disk option {key:?} is given twice"));
            }
            seen.push(key);
            let value = match (placeholder, value) {
                (None, None) => "",
                (None, Some(_)) => return Err(format!("disk option {key:?} takes no value")),
                (Some(p), None | Some("")) => {
                    return Err(format!("disk option {key:?} needs a value: {key}={p}"))
                }
                (Some(_), Some(v)) => v,
            };
            match key {
                "ro" => o.read_only = true,
                "local" => o.local = true,
                "boot" => {
                    o.boot = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|n| (1..=MAX_BOOT_INDEX).contains(n))
                            .ok_or_else(|| {
                                format!(
                                    "boot={value}: the boot index is a number from 1 (boots \
                                     first) to {MAX_BOOT_INDEX}"
                                )
                            })?,
                    );
                }
                "sha256" => o.sha256 = Some(Sha256::parse(value).map_err(|e| e.to_string())?),
                "size" => o.size = Some(image_size(value)?),
                "format" => {
                    o.format = Some(value.parse::<DeclaredFormat>().map_err(|e| e.to_string())?)
                }
                "endorser" => o.endorser = Some(value),
                "endorsement" => o.endorsement = Some(super::image::endorsement_arg(value)?),
                "server" => o.server = Some(server_arg(value)?),
                _ => unreachable!("option {key} is known"),
            }
        }
        Ok(o)
    }
}

/// An option this `--disk` does not know. For an image disk, a piece with
/// '/', '.', '?' or '&' in it is most likely the rest of a URL cut at a ','.
pub(super) fn unknown_disk_option(option: &str, image: bool) -> String {
    if !image {
        return format!(
            "unknown disk option {option:?}: expected ro or boot=N (paths cannot contain ',')"
        );
    }
    let key = option.split_once('=').map_or(option, |(k, _)| k);
    if key.contains(['/', '.', '?', '&', '%']) {
        return format!("{option:?} looks like the rest of the image URL: {URL_COMMA}");
    }
    format!("unknown disk option {option:?}: expected {IMAGE_OPTIONS} ({URL_COMMA})")
}

/// `size=` of an image disk: a size, rounded up to a whole MiB as pdisk
/// volumes are; more than zero (leave it out for the image's own size).
pub(super) fn image_size(s: &str) -> Result<ByteSize, String> {
    let size = s
        .parse::<ByteSize>()
        .map_err(|e| format!("size={s}: {e}"))?;
    ByteSize::volume_size(size.0)
        .map_err(|e| format!("size={s}: {e} (leave size= out for the image's own size)"))
}

/// A pdisk server's name, as agentd checks it.
pub(super) fn server_arg(s: &str) -> Result<ServerName, String> {
    s.parse::<ServerName>().map_err(|e| e.message().to_owned())
}

impl FromStr for DiskArg {
    type Err = String;
    fn from_str(s: &str) -> Result<DiskArg, String> {
        let mut parts = s.split(',');
        let first = parts.next().unwrap_or_default();
        let Some((kind, what)) = first.split_once(':') else {
            return Err(format!(
                "{s:?} has no source: use pdisk:[SERVER/]VOLUME, file:PATH or image:URL,sha256=HEX, \
                 optionally followed by ,ro and ,boot=N"
            ));
        };
        let image = kind == "image";
        let mut server = None;
        let source = match kind {
            "pdisk" => {
                let volume = match what.split_once('/') {
                    Some((name, volume)) => {
                        server = Some(server_arg(name)?);
                        volume
                    }
                    None => what,
                };
                Some(DiskSource::Pdisk(
                    volume
                        .parse()
                        .map_err(|e| format!("pdisk volume {volume:?}: {e}"))?,
                ))
            }
            "file" => Some(DiskSource::File(host_path(what)?)),
            // Built once its options are known.
            "image" if what.is_empty() => {
                return Err("the image disk has no URL: use image:URL,sha256=HEX".into())
            }
            "image" => None,
            other => {
                return Err(format!(
                    "unknown disk source {other:?}: use pdisk:[SERVER/]VOLUME, file:PATH or \
                     image:URL,sha256=HEX"
                ))
            }
        };
        let o = DiskOptions::parse(parts, image)?;
        if let Some(s) = &o.server {
            if o.local {
                return Err(format!(
                    "server={s}: a local image disk lives on this host; server= is for \
                     clone disks"
                ));
            }
            server = Some(s.clone());
        }
        let source = match source {
            Some(source) => source,
            None => {
                let sha256 = o.sha256.ok_or_else(|| {
                    format!(
                        "image disk {what}: sha256=HEX is required (the SHA-256 the image \
                         must hash to, 64 hex digits)"
                    )
                })?;
                let image = ImageRef::new(
                    what,
                    sha256.as_str(),
                    o.format.unwrap_or_default(),
                    o.endorser.map(str::to_owned),
                )
                .and_then(|i| i.with_endorsement(o.endorsement.as_deref()))
                .map_err(|e| e.to_string())?;
                DiskSource::Image(ImageDisk {
                    image,
                    size: o.size,
                    local: o.local,
                })
            }
        };
        Ok(DiskArg {
            source,
            read_only: o.read_only,
            boot: o.boot,
            server,
        })
    }
}
