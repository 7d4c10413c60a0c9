//! Scenario 2: snapshot and clone latency through pdiskd's gRPC API, for
//! sparse volumes of 1, 10 and 100 GiB that hold some data (64 MiB in 1 MiB
//! pieces spread evenly across the volume, written straight into the backing
//! file). Each run takes a snapshot of the volume, then clones a volume from
//! that snapshot; both are timed around the gRPC call, and deleted again
//! (untimed) before the next run.
//!
//! On a reflink filesystem both are one FICLONE plus an fsync and a rename,
//! so the latency should not grow with the volume's size: each size's p50
//! and p95 are reported against the 1 GiB figure as peer, and the ratio is
//! the growth (1.00x = none).
//!
//! pdiskd runs on an 8 GiB XFS pool with `--max-overcommit 1000`: a 100 GiB
//! volume, its snapshot and a clone provision 300 GiB of sparse space.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use stratus_proto::pdisk::v1 as pb;
use testkit::{Client, Pdiskd, Tgtd, XfsPool};

use super::Ctx;
use crate::report::{percentile, Figure};

const SCENARIO: &str = "snapshot and clone latency";
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Data written into each volume before it is measured.
const DATA_PIECES: u64 = 64;

/// The latencies measured for one volume size, in ms.
pub(crate) struct Sizes {
    pub(crate) gib: u64,
    pub(crate) snapshot: Vec<f64>,
    pub(crate) clone: Vec<f64>,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let (sizes, runs): (&[u64], usize) = if ctx.quick {
        (&[1, 10], 3)
    } else {
        (&[1, 10, 100], 20)
    };
    let (_pool, _tgtd, pdiskd) = tokio::task::block_in_place(|| {
        let pool = XfsPool::new(8192);
        let tgtd = Tgtd::start(pool.dir.path());
        let pdiskd = Pdiskd::start_with(&pool, &tgtd, &["--max-overcommit", "1000"]);
        (pool, tgtd, pdiskd)
    });
    let mut c = pdiskd.client().await;
    let mut measured = Vec::new();
    for &gib in sizes {
        let m = measure(&mut c, gib, runs)
            .await
            .with_context(|| format!("{gib} GiB volume (pdiskd log: {})", pdiskd.log.display()))?;
        eprintln!(
            "  {gib} GiB: snapshot p50 {:.1} ms, clone p50 {:.1} ms",
            percentile(&m.snapshot, 50.0),
            percentile(&m.clone, 50.0)
        );
        measured.push(m);
    }
    Ok(figures(&measured))
}

/// Creates the volume, writes its data, and times `runs` snapshot + clone
/// pairs, deleting each pair before the next. The volume is deleted at the end.
async fn measure(c: &mut Client, gib: u64, runs: usize) -> anyhow::Result<Sizes> {
    let name = format!("bench-{gib}g");
    let size = gib * GIB;
    let vol = c
        .create_volume(pb::CreateVolumeRequest {
            name: name.clone(),
            size_bytes: size,
            ..Default::default()
        })
        .await?
        .into_inner();
    let path = std::path::PathBuf::from(&vol.device_path);
    tokio::task::block_in_place(|| write_spread(&path, size))
        .with_context(|| format!("writing data into {}", path.display()))?;
    let out = measure_pairs(c, &name, gib, runs).await?;
    c.delete_volume(pb::DeleteVolumeRequest {
        now: false,
        project: String::new(),
        volume: name,
        request_id: String::new(),
    })
    .await?;
    Ok(out)
}

/// Times `runs` snapshot + clone pairs of volume `name` (of `gib` GiB),
/// deleting each pair before the next.
pub(crate) async fn measure_pairs(
    c: &mut Client,
    name: &str,
    gib: u64,
    runs: usize,
) -> anyhow::Result<Sizes> {
    let name = name.to_string();
    let mut out = Sizes {
        gib,
        snapshot: Vec::with_capacity(runs),
        clone: Vec::with_capacity(runs),
    };
    for i in 0..runs {
        let snap = format!("{name}-s{i}");
        let clone = format!("{name}-c{i}");
        let t = Instant::now();
        c.create_snapshot(pb::CreateSnapshotRequest {
            project: String::new(),
            volume: name.clone(),
            name: snap.clone(),
            request_id: String::new(),
        })
        .await?;
        out.snapshot.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        c.clone_volume(pb::CloneVolumeRequest {
            source: snap.clone(),
            source_is_snapshot: true,
            name: clone.clone(),
            ..Default::default()
        })
        .await?;
        out.clone.push(t.elapsed().as_secs_f64() * 1e3);
        c.delete_volume(pb::DeleteVolumeRequest {
            now: false,
            project: String::new(),
            volume: clone,
            request_id: String::new(),
        })
        .await?;
        c.delete_snapshot(pb::DeleteSnapshotRequest {
            project: String::new(),
            snapshot: snap,
            request_id: String::new(),
        })
        .await?;
    }
    Ok(out)
}

/// Writes DATA_PIECES MiB of non-zero bytes, 1 MiB at a time, at evenly
/// spread MiB-aligned offsets of the (sparse) file, and fsyncs it, so the
/// first snapshot does not pay for writing back dirty pages.
fn write_spread(path: &Path, size: u64) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut piece = vec![0u8; MIB as usize];
    let stride = size / DATA_PIECES / MIB * MIB;
    for i in 0..DATA_PIECES {
        super::import::fill_pseudo_random(&mut piece, i + 1);
        f.write_all_at(&piece, i * stride)?;
    }
    f.sync_all()
}

/// p50 and p95 of snapshot and clone for each size, grouped by measure, each
/// against the 1 GiB volume's value of the same measure.
pub(crate) fn figures(measured: &[Sizes]) -> Vec<Figure> {
    type Pick = fn(&Sizes) -> &Vec<f64>;
    let measures: [(&str, Pick, f64); 4] = [
        ("snapshot p50", |s| &s.snapshot, 50.0),
        ("snapshot p95", |s| &s.snapshot, 95.0),
        ("clone p50", |s| &s.clone, 50.0),
        ("clone p95", |s| &s.clone, 95.0),
    ];
    let mut out = Vec::new();
    for (what, pick, p) in measures {
        let base = measured.first().map(|s| percentile(pick(s), p));
        for s in measured {
            let samples = pick(s).clone();
            let v = percentile(&samples, p);
            let mut f = Figure::new(SCENARIO, &format!("{what} ({} GiB)", s.gib), "ms", v)
                .with_samples(samples);
            if let (Some(base), true) = (base, s.gib != measured[0].gib) {
                let peer = format!("{what} ({} GiB)", measured[0].gib);
                f = f.against(&peer, base);
            }
            out.push(f);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_compare_every_size_with_the_smallest() {
        let m = vec![
            Sizes {
                gib: 1,
                snapshot: vec![2.0, 4.0],
                clone: vec![3.0],
            },
            Sizes {
                gib: 10,
                snapshot: vec![4.0, 8.0],
                clone: vec![3.0],
            },
        ];
        let f = figures(&m);
        let names: Vec<&str> = f.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "snapshot p50 (1 GiB)",
                "snapshot p50 (10 GiB)",
                "snapshot p95 (1 GiB)",
                "snapshot p95 (10 GiB)",
                "clone p50 (1 GiB)",
                "clone p50 (10 GiB)",
                "clone p95 (1 GiB)",
                "clone p95 (10 GiB)",
            ]
        );
        assert_eq!(f[0].peer, None);
        assert_eq!(f[1].peer.as_deref(), Some("snapshot p50 (1 GiB)"));
        assert_eq!(f[1].ratio, Some(2.0));
        assert_eq!(f[5].ratio, Some(1.0));
    }
}
