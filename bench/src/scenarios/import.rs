//! Scenario 5: image import. Ours (pdiskd's `CreateVolume` from an image in
//! its import directory, done server-side: a sparse copy for raw, `qemu-img
//! convert` for qcow2, then fsync and publish) against the tools an operator
//! would use on the same images: `qemu-img convert -O raw` and `dd
//! conv=sparse`.
//!
//! Four images: raw and qcow2, each dense (pseudo-random bytes, 256 MiB; 16
//! MiB in quick mode) and sparse (4 GiB with 64 MiB of data in 1 MiB pieces;
//! 256 MiB with 4 MiB in quick mode). Images and every output live on the
//! same XFS pool, so all three read and write the same filesystem.
//!
//! Each run is timed with `Instant` around the whole operation (the gRPC
//! call, or the process from spawn to exit). The page cache is dropped
//! before every measured run, so each reads its image from disk. Rates are
//! MB/s (10^6 bytes) of the image's virtual size; the figure is the median
//! run. `dd` gets `conv=fsync` besides `conv=sparse`: our import fsyncs before
//! it publishes and `qemu-img` flushes on close, so all three end with the
//! data on disk. `dd` only runs on raw images: on a qcow2 it would copy the
//! container, not convert it.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use stratus_proto::pdisk::v1 as pb;
use testkit::{Client, Pdiskd, Tgtd, XfsPool};

use super::Ctx;
use crate::report::{percentile, Figure};

const SCENARIO: &str = "image import";
const MIB: u64 = 1 << 20;

/// Fills `buf` with xorshift64 bytes from `seed` (never an all-zero block,
/// and incompressible enough for qcow2, which does not compress anyway).
pub(crate) fn fill_pseudo_random(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
}

/// One test image.
struct Image {
    /// "raw dense 256 MiB", ...
    label: String,
    path: PathBuf,
    format: pb::ImageFormat,
    virtual_size: u64,
}

impl Image {
    fn qemu_format(&self) -> &'static str {
        match self.format {
            pb::ImageFormat::Qcow2 => "qcow2",
            _ => "raw",
        }
    }
}

fn size_label(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes & ((1 << 30) - 1) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// A raw file of `size` bytes with `data` bytes of pseudo-random content in
/// 1 MiB pieces spread evenly across it (`data == size`: fully dense).
fn write_raw(path: &Path, size: u64, data: u64) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let pieces = data / MIB;
    let stride = size / pieces / MIB * MIB;
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..pieces {
        fill_pseudo_random(&mut buf, i + 1);
        f.write_all_at(&buf, i * stride)?;
    }
    f.sync_all()
}

async fn run_tool(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("cannot run {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Makes the four images in `dir` (the pool's import directory).
async fn make_images(dir: &Path, quick: bool) -> anyhow::Result<Vec<Image>> {
    let (dense, sparse, sparse_data) = if quick {
        (16 * MIB, 256 * MIB, 4 * MIB)
    } else {
        (256 * MIB, 4 << 30, 64 * MIB)
    };
    let mut out = Vec::new();
    for (kind, size, data) in [("dense", dense, dense), ("sparse", sparse, sparse_data)] {
        let raw = dir.join(format!("{kind}.raw"));
        let qcow2 = dir.join(format!("{kind}.qcow2"));
        tokio::task::block_in_place(|| write_raw(&raw, size, data))
            .with_context(|| format!("writing {}", raw.display()))?;
        run_tool(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                path_str(&raw)?,
                path_str(&qcow2)?,
            ],
        )
        .await?;
        for (path, format, f) in [
            (raw, pb::ImageFormat::Raw, "raw"),
            (qcow2, pb::ImageFormat::Qcow2, "qcow2"),
        ] {
            out.push(Image {
                label: format!("{f} {kind} {}", size_label(size)),
                path,
                format,
                virtual_size: size,
            });
        }
    }
    Ok(out)
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// Writes back dirty pages and drops the page cache (needs root), so the
/// next run reads its image from disk rather than memory. Done before every
/// measured run, of ours and of the peers alike. Returns false when the
/// kernel refused (not root, or /proc/sys read-only).
fn drop_caches() -> bool {
    let synced = std::process::Command::new("sync")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// The import tools compared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    Ours,
    QemuImg,
    Dd,
}

/// One timed run of `tool` on `img`, in seconds; its output is removed
/// (untimed) afterwards.
async fn time_one(
    c: &mut Client,
    tool: Tool,
    img: &Image,
    out_dir: &Path,
    run: usize,
) -> anyhow::Result<f64> {
    let out = out_dir.join("out.raw");
    let name = format!("import-{run}");
    let t = Instant::now();
    let got_size = match tool {
        Tool::Ours => {
            let v = c
                .create_volume(pb::CreateVolumeRequest {
                    name: name.clone(),
                    source: Some(pb::create_volume_request::Source::FromImage(
                        pb::ImageSource {
                            path: path_str(&img.path)?.into(),
                            format: img.format as i32,
                        },
                    )),
                    ..Default::default()
                })
                .await?
                .into_inner();
            v.size_bytes
        }
        Tool::QemuImg => {
            let args = [
                "convert",
                "-f",
                img.qemu_format(),
                "-O",
                "raw",
                path_str(&img.path)?,
                path_str(&out)?,
            ];
            run_tool("qemu-img", &args).await?;
            std::fs::metadata(&out)?.len()
        }
        Tool::Dd => {
            let input = format!("if={}", path_str(&img.path)?);
            let output = format!("of={}", path_str(&out)?);
            let args = [&input, &output, "bs=1M", "conv=sparse,fsync", "status=none"];
            run_tool("dd", &args).await?;
            std::fs::metadata(&out)?.len()
        }
    };
    let secs = t.elapsed().as_secs_f64();
    match tool {
        Tool::Ours => {
            c.delete_volume(pb::DeleteVolumeRequest {
                now: false,
                project: String::new(),
                volume: name,
                request_id: String::new(),
            })
            .await?;
        }
        _ => std::fs::remove_file(&out)?,
    }
    // Volumes round up to whole MiB; every image here is MiB-aligned.
    anyhow::ensure!(
        got_size == img.virtual_size,
        "{}: output is {got_size} bytes, expected {}",
        img.label,
        img.virtual_size
    );
    Ok(secs)
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let runs = if ctx.quick { 1 } else { 5 };
    let (pool, _tgtd, pdiskd) = tokio::task::block_in_place(|| {
        let pool = XfsPool::new(8192);
        let tgtd = Tgtd::start(pool.dir.path());
        let pdiskd = Pdiskd::start(&pool, &tgtd);
        (pool, tgtd, pdiskd)
    });
    let mut c = pdiskd.client().await;
    let images = make_images(&pdiskd.import_dir, ctx.quick).await?;
    let out_dir = pool.mnt.join("peer-out");
    std::fs::create_dir_all(&out_dir)?;

    let mut warned = false;
    let mut figs = Vec::new();
    for img in &images {
        let tools: &[Tool] = if img.format == pb::ImageFormat::Raw {
            &[Tool::Ours, Tool::QemuImg, Tool::Dd]
        } else {
            &[Tool::Ours, Tool::QemuImg]
        };
        // rates[tool index] = MB/s of each run; the tools take turns.
        let mut rates = vec![Vec::new(); tools.len()];
        for r in 0..runs {
            for (i, &tool) in tools.iter().enumerate() {
                if !tokio::task::block_in_place(drop_caches) && !warned {
                    eprintln!("  warning: cannot drop the page cache (not root?): runs may read from memory");
                    warned = true;
                }
                let secs = time_one(&mut c, tool, img, &out_dir, r)
                    .await
                    .with_context(|| {
                        format!("{} (pdiskd log: {})", img.label, pdiskd.log.display())
                    })?;
                rates[i].push(img.virtual_size as f64 / 1e6 / secs);
            }
        }
        let med: Vec<f64> = rates.iter().map(|r| percentile(r, 50.0)).collect();
        eprintln!(
            "  {}: ours {:.0} MB/s, qemu-img {:.0} MB/s{}",
            img.label,
            med[0],
            med[1],
            med.get(2)
                .map(|d| format!(", dd {d:.0} MB/s"))
                .unwrap_or_default()
        );
        figs.push(
            Figure::new(
                SCENARIO,
                &format!("{}: ours vs qemu-img", img.label),
                "MB/s",
                med[0],
            )
            .against("qemu-img convert -O raw", med[1])
            .with_samples(rates[0].clone()),
        );
        if let Some(&dd) = med.get(2) {
            figs.push(
                Figure::new(
                    SCENARIO,
                    &format!("{}: ours vs dd", img.label),
                    "MB/s",
                    med[0],
                )
                .against("dd conv=sparse,fsync", dd)
                .with_samples(rates[0].clone()),
            );
        }
    }
    Ok(figs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_images_hold_the_data_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.raw");
        write_raw(&p, 64 * MIB, 4 * MIB).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len() as u64, 64 * MIB);
        let nonzero_mibs = bytes
            .chunks(MIB as usize)
            .filter(|c| c.iter().any(|&b| b != 0))
            .count();
        assert_eq!(nonzero_mibs, 4);
        assert_eq!(size_label(4 << 30), "4 GiB");
        assert_eq!(size_label(16 * MIB), "16 MiB");
    }
}
