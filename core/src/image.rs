//! VM image formats: detection by magic and inspection, shared by pdisk's
//! import and the agent's image cache and overlays.
//!
//! Images are untrusted input. The format is never guessed into anything
//! exotic: qcow2 is recognised by its magic and everything else is raw,
//! except the formats we recognise and refuse. A qcow2 with a backing file or
//! an external data file is refused, since either would make qemu-img open a
//! path named by the image rather than by us.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::runner::{run_checked, Cmd, CommandRunner};

/// The formats images may come in: everything else is refused. Parsed once
/// where a name arrives (records, `qemu-img info`) and held typed after;
/// records store it as its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name qemu-img and the APIs use: "raw" or "qcow2".
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(Error::invalid(format!(
                "image format {other:?}: expected raw or qcow2"
            ))),
        }
    }
}

/// What an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub virtual_size: u64,
}

/// Reads the magic: qcow2, raw, or an error naming a refused format.
pub fn detect_format(path: &Path) -> Result<ImageFormat> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path.display(), e))?;
    let mut magic = [0u8; 8];
    let n = f
        .read(&mut magic)
        .map_err(|e| Error::io(path.display(), e))?;
    let m = &magic[..n];
    if m.starts_with(b"QFI\xfb") {
        return Ok(ImageFormat::Qcow2);
    }
    let refused = [
        (&b"KDMV"[..], "vmdk"),
        (b"vhdxfile", "vhdx"),
        (b"conectix", "vpc"),
        (b"QED\0", "qed"),
        (b"LUKS\xba\xbe", "luks"),
    ];
    for (sig, name) in refused {
        if m.starts_with(sig) {
            return Err(Error::invalid(format!(
                "image {} is {name}: only raw and qcow2 images can be imported",
                path.display()
            )));
        }
    }
    Ok(ImageFormat::Raw)
}

#[derive(Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<serde_json::Value>,
    encrypted: Option<bool>,
}

/// Inspects the image; for qcow2 asks `qemu-img info` and refuses backing
/// files, external data files and encryption.
pub async fn inspect(
    runner: &dyn CommandRunner,
    path: &Path,
    format: ImageFormat,
) -> Result<ImageInfo> {
    match format {
        ImageFormat::Raw => {
            let len = std::fs::metadata(path)
                .map_err(|e| Error::io(path.display(), e))?
                .len();
            if len == 0 {
                return Err(Error::invalid(format!("image {} is empty", path.display())));
            }
            Ok(ImageInfo {
                format,
                virtual_size: len,
            })
        }
        ImageFormat::Qcow2 => {
            let cmd = Cmd::new("qemu-img")
                .args(["info", "--output=json", "-f", "qcow2"])
                .arg(path.to_string_lossy())
                .timeout(Duration::from_secs(60));
            let out = run_checked(runner, &cmd).await.map_err(|e| {
                Error::invalid(format!(
                    "image {} is not a valid qcow2: {e}",
                    path.display()
                ))
            })?;
            let info: QemuImgInfo = serde_json::from_str(&out.stdout).map_err(|e| {
                Error::internal(format!("qemu-img info output not understood: {e}"))
            })?;
            if info.format != "qcow2" {
                return Err(Error::invalid(format!(
                    "image {} is {}, not qcow2",
                    path.display(),
                    info.format
                )));
            }
            if let Some(b) = info.backing_filename {
                return Err(Error::invalid(format!(
                    "image {} has a backing file ({b}): import a flattened image",
                    path.display()
                )));
            }
            let data_file = info
                .format_specific
                .as_ref()
                .and_then(|v| v.pointer("/data/data-file"))
                .is_some();
            if data_file {
                return Err(Error::invalid(format!(
                    "image {} uses an external data file",
                    path.display()
                )));
            }
            if info.encrypted == Some(true) {
                return Err(Error::invalid(format!(
                    "image {} is encrypted",
                    path.display()
                )));
            }
            Ok(ImageInfo {
                format,
                virtual_size: info.virtual_size,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::{FakeRunner, Output};

    /// Records hold the format by name; only raw and qcow2 parse.
    #[test]
    fn formats_are_stored_and_parsed_by_name() {
        for f in [ImageFormat::Raw, ImageFormat::Qcow2] {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.as_str()));
            assert_eq!(serde_json::from_str::<ImageFormat>(&json).unwrap(), f);
            assert_eq!(f.as_str().parse::<ImageFormat>().unwrap(), f);
        }
        assert!(serde_json::from_str::<ImageFormat>("\"vmdk\"").is_err());
        let e = "vmdk".parse::<ImageFormat>().unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidArgument);
    }

    #[test]
    fn detects_formats_by_magic() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03rest").unwrap();
        assert_eq!(detect_format(&q).unwrap(), ImageFormat::Qcow2);
        let r = dir.path().join("r");
        std::fs::write(&r, [0u8; 512]).unwrap();
        assert_eq!(detect_format(&r).unwrap(), ImageFormat::Raw);
        let v = dir.path().join("v");
        std::fs::write(&v, b"KDMV\x01\0\0\0").unwrap();
        assert!(detect_format(&v).unwrap_err().message().contains("vmdk"));
    }

    #[tokio::test]
    async fn refuses_qcow2_with_backing_file() {
        let fake = FakeRunner::with(|_| {
            Ok(Output::ok(
                r#"{"format":"qcow2","virtual-size":1048576,"backing-filename":"/etc/shadow"}"#,
            ))
        });
        let err = inspect(&fake, Path::new("/x.qcow2"), ImageFormat::Qcow2)
            .await
            .unwrap_err();
        assert!(err.message().contains("backing file"), "{err}");
        assert_eq!(
            fake.command_lines(),
            vec!["qemu-img info --output=json -f qcow2 /x.qcow2"]
        );
    }
}
