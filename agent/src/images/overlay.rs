//! Copy-on-write guest disks on a cached image: a qcow2 overlay whose
//! backing file is the cached base, so starting a guest copies nothing.
//!
//! The base is inspected first (`stratus_core::image::inspect`): a qcow2 base with a
//! backing file, an external data file or encryption is refused, since
//! QEMU would then open a path the image names rather than one we chose.
//! The overlay is made under a temporary name beside `dest` and linked into
//! place (never replacing an existing file), so `dest` is either absent or
//! a complete overlay (a crash leaves at most the temporary file, which
//! reconciliation removes: [`is_partial`]). The overlay records the base by absolute path: the
//! base must stay pinned in the cache for as long as the overlay exists.

use std::path::{Path, PathBuf};
use std::time::Duration;

use stratus_core::error::{Error, Result};
use stratus_core::image::inspect;
use stratus_core::image::ImageFormat;
use stratus_core::runner::{run_checked, Cmd, CommandRunner};

use super::staging::sync_dir;

/// Creates `dest`, a qcow2 overlay on `base` (read as `base_format`) of
/// `size` bytes (default: the base's virtual size; never smaller). Returns
/// the overlay's virtual size. Both paths must be absolute.
pub async fn overlay(
    runner: &dyn CommandRunner,
    base: &Path,
    base_format: ImageFormat,
    dest: &Path,
    size: Option<u64>,
) -> Result<u64> {
    for (what, p) in [("base image", base), ("overlay", dest)] {
        if !p.is_absolute() {
            return Err(Error::invalid(format!(
                "{what} {}: the path must be absolute",
                p.display()
            )));
        }
    }
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Err(Error::invalid(format!(
            "overlay {}: not a file path",
            dest.display()
        )));
    };
    if dest.symlink_metadata().is_ok() {
        return Err(Error::exists(format!(
            "overlay {} already exists",
            dest.display()
        )));
    }
    let info = inspect(runner, base, base_format).await?;
    let size = size.unwrap_or(info.virtual_size);
    if size < info.virtual_size {
        return Err(Error::invalid(format!(
            "overlay {}: size {size} is smaller than the image's virtual size {}",
            dest.display(),
            info.virtual_size
        )));
    }
    let tmp = Temp(dir.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        uuid::Uuid::new_v4().simple()
    )));
    let cmd = Cmd::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            base_format.as_str(),
            "-b",
        ])
        .arg(base.to_string_lossy())
        .arg(tmp.0.to_string_lossy())
        .arg(size.to_string())
        .timeout(Duration::from_secs(60));
    run_checked(runner, &cmd)
        .await
        .map_err(|e| e.context(format!("overlay {} on {}", dest.display(), base.display())))?;
    std::fs::File::open(&tmp.0)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(tmp.0.display(), e))?;
    crate::failpoints::crash_point("overlay.created");
    // A hard link never replaces: a concurrent creator of `dest` wins cleanly.
    std::fs::hard_link(&tmp.0, dest).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::exists(format!("overlay {} already exists", dest.display()))
        } else {
            Error::io(dest.display(), e)
        }
    })?;
    drop(tmp);
    sync_dir(dir)?;
    crate::failpoints::crash_point("overlay.linked");
    Ok(size)
}

/// Whether `name` is an overlay under construction, which only a crash
/// leaves behind (reconciliation removes those).
pub fn is_partial(name: &str) -> bool {
    name.starts_with('.') && name.contains(".partial-")
}

/// The overlay under construction; removed on drop.
struct Temp(PathBuf);

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_core::error::ErrorKind;
    use stratus_core::runner::{FakeRunner, Output};

    /// A runner that answers `qemu-img info` for a 1 GiB qcow2 and
    /// "creates" the overlay by writing its last argument.
    fn fake() -> FakeRunner {
        FakeRunner::with(|argv| match argv[1].as_str() {
            "info" => Ok(Output::ok(
                r#"{"format":"qcow2","virtual-size":1073741824}"#,
            )),
            "create" => {
                let path = &argv[argv.len() - 2];
                std::fs::write(path, b"QFI\xfb overlay").unwrap();
                Ok(Output::ok(""))
            }
            _ => Ok(Output::failed(1, "unexpected")),
        })
    }

    #[tokio::test]
    async fn builds_the_exact_command_and_links_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("disk0.qcow2");
        let runner = fake();
        let size = overlay(
            &runner,
            Path::new("/cache/ab.img"),
            ImageFormat::Qcow2,
            &dest,
            Some(2 << 30),
        )
        .await
        .unwrap();
        assert_eq!(size, 2 << 30);
        let lines = runner.command_lines();
        assert_eq!(
            lines[0],
            "qemu-img info --output=json -f qcow2 /cache/ab.img"
        );
        let tmp = &runner.calls()[1][9];
        assert_eq!(
            lines[1],
            format!("qemu-img create -q -f qcow2 -F qcow2 -b /cache/ab.img {tmp} 2147483648")
        );
        assert!(tmp.contains(".disk0.qcow2.partial-"), "{tmp}");
        // Only the overlay is left: the temporary is gone.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["disk0.qcow2"]);
    }

    #[tokio::test]
    async fn defaults_to_the_base_size_and_refuses_smaller() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![1u8; 4096]).unwrap();
        let runner = fake();
        let dest = dir.path().join("d.qcow2");
        let size = overlay(&runner, &base, ImageFormat::Raw, &dest, None)
            .await
            .unwrap();
        assert_eq!(size, 4096);
        assert!(runner.command_lines()[0].contains(" -F raw -b "));

        let err = overlay(
            &runner,
            &base,
            ImageFormat::Raw,
            &dir.path().join("e"),
            Some(512),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(
            err.message()
                .contains("smaller than the image's virtual size 4096"),
            "{err}"
        );

        let err = overlay(&runner, &base, ImageFormat::Raw, &dest, None)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);

        let err = overlay(
            &runner,
            Path::new("base.img"),
            ImageFormat::Raw,
            &dest,
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.message().contains("absolute"), "{err}");
    }

    #[tokio::test]
    async fn a_failed_create_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let runner = FakeRunner::with(|argv| match argv[1].as_str() {
            "info" => Ok(Output::ok(r#"{"format":"qcow2","virtual-size":1048576}"#)),
            _ => {
                std::fs::write(&argv[argv.len() - 2], b"half").unwrap();
                Ok(Output::failed(1, "qemu-img: disk full"))
            }
        });
        let err = overlay(
            &runner,
            Path::new("/cache/b.img"),
            ImageFormat::Qcow2,
            &dir.path().join("d.qcow2"),
            None,
        )
        .await
        .unwrap_err();
        assert!(err.message().contains("disk full"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
