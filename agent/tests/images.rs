//! Overlays on cached images with the real `qemu-img` (integration tier:
//! needs qemu-img, no root). Each test makes its images in its own temp
//! dirs, brings them into a cache through file:// URLs, builds overlays and
//! checks them with `qemu-img info`.

use std::path::Path;
use std::process::Command;

use agent::images::{overlay, CacheOptions, DeclaredFormat, ImageRef, LocalCache, Sha256};
use sha2::Digest;
use stratus_core::error::ErrorKind;
use stratus_core::image::ImageFormat;
use stratus_core::runner::HostRunner;

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn info(path: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        &path.to_string_lossy(),
    ]))
    .unwrap()
}

fn file_ref(path: &Path, format: DeclaredFormat) -> ImageRef {
    let digest = sha2::Sha256::digest(std::fs::read(path).unwrap());
    let sha = Sha256::from_digest(digest.into());
    ImageRef::new(
        &format!("file://{}", path.display()),
        sha.as_str(),
        format,
        None,
    )
    .unwrap()
}

/// A raw image of `size` bytes with data at the start (not all holes).
fn make_raw(path: &Path, size: u64) {
    let mut data = vec![0u8; size as usize];
    for (i, b) in data.iter_mut().enumerate().take(MIB as usize) {
        *b = (i % 251) as u8 + 1;
    }
    std::fs::write(path, data).unwrap();
}

#[tokio::test]
#[ignore = "needs qemu-img: run by scripts/test"]
async fn overlays_on_cached_qcow2_and_raw_bases() {
    let src = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let cache = LocalCache::open(state.path().join("images"), CacheOptions::default()).unwrap();

    let raw = src.path().join("base.raw");
    make_raw(&raw, 16 * MIB);
    let qcow2 = src.path().join("base.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &raw.to_string_lossy(),
        &qcow2.to_string_lossy(),
    ]);

    for (image, declared, want) in [
        (&qcow2, DeclaredFormat::Auto, ImageFormat::Qcow2),
        (&raw, DeclaredFormat::Raw, ImageFormat::Raw),
    ] {
        let pulled = cache
            .get_or_fetch(&file_ref(image, declared), |_, _| {})
            .await
            .unwrap();
        assert_eq!(pulled.image.format, want);
        let base = &pulled.image.path;
        let name = if want == ImageFormat::Raw {
            "raw"
        } else {
            "qcow2"
        };

        // Default size: the base's virtual size.
        let dest = state.path().join(format!("guest-{name}.qcow2"));
        let size = overlay(&HostRunner, base, want, &dest, None).await.unwrap();
        assert_eq!(size, 16 * MIB);
        let i = info(&dest);
        assert_eq!(i["format"], "qcow2");
        assert_eq!(i["virtual-size"], 16 * MIB);
        assert_eq!(i["backing-filename"], base.to_string_lossy().as_ref());
        assert_eq!(i["backing-filename-format"], name);
        // Copy-on-write: the overlay holds metadata only, not the base's data.
        let len = std::fs::metadata(&dest).unwrap().len();
        assert!(len < MIB, "overlay is {len} bytes");
        // The guest sees the base's bytes through it.
        qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &dest.to_string_lossy(),
            &raw.to_string_lossy(),
        ]);

        // Grown to a larger disk.
        let grown = state.path().join(format!("grown-{name}.qcow2"));
        overlay(&HostRunner, base, want, &grown, Some(64 * MIB))
            .await
            .unwrap();
        assert_eq!(info(&grown)["virtual-size"], 64 * MIB);

        let err = overlay(&HostRunner, base, want, &grown, None)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        let err = overlay(
            &HostRunner,
            base,
            want,
            &state.path().join("small"),
            Some(MIB),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }
}

#[tokio::test]
#[ignore = "needs qemu-img: run by scripts/test"]
async fn a_qcow2_base_with_a_backing_file_is_refused() {
    let src = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let cache = LocalCache::open(state.path().join("images"), CacheOptions::default()).unwrap();
    let raw = src.path().join("under.raw");
    make_raw(&raw, 4 * MIB);
    let layered = src.path().join("layered.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        &raw.to_string_lossy(),
        &layered.to_string_lossy(),
    ]);
    let pulled = cache
        .get_or_fetch(&file_ref(&layered, DeclaredFormat::Qcow2), |_, _| {})
        .await
        .unwrap();
    let dest = state.path().join("guest.qcow2");
    let err = overlay(
        &HostRunner,
        &pulled.image.path,
        ImageFormat::Qcow2,
        &dest,
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.message().contains("backing file"), "{err}");
    assert!(!dest.exists());
}
