//! pdiskd `--backend rbd` on a real single-node Ceph cluster (testkit's
//! CephCluster: memstore OSD, cephx), as a cephx user limited to its pool.
//! Data is written and checked through QEMU's rbd driver (`qemu-io` with
//! `rbd:` filenames), the images through the `rbd` CLI as admin.
//!
//! The tests of this file share one cluster (bring-up costs about 16 s);
//! each test has its own pool and pdiskd.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use stratus_proto::pdisk::v1 as pb;
use testkit::*;
use tonic::Code;

const MIB: u64 = 1 << 20;

/// The cluster the running tests share; started by the first, torn down
/// when the last one drops it.
fn cluster() -> Arc<CephCluster> {
    static SHARED: Mutex<Weak<CephCluster>> = Mutex::new(Weak::new());
    let mut s = SHARED.lock().unwrap();
    if let Some(c) = s.upgrade() {
        return c;
    }
    let c = Arc::new(CephCluster::start());
    eprintln!("ceph micro-cluster up in {:?}", c.startup);
    *s = Arc::downgrade(&c);
    c
}

/// A pdiskd on pool `pool` of the shared cluster, as `client.<pool>`.
struct RbdPdisk {
    ceph: Arc<CephCluster>,
    pool: String,
    pdiskd: Pdiskd,
    _scratch: tempfile::TempDir,
}

impl RbdPdisk {
    fn start(pool: &str) -> RbdPdisk {
        require_root();
        let ceph = cluster();
        ceph.create_pool(pool);
        let keyring = ceph.create_rbd_user(pool, pool);
        let scratch = tempfile::Builder::new()
            .prefix("stratus-rbd-")
            .tempdir()
            .unwrap();
        let args: Vec<String> = [
            "--backend",
            "rbd",
            "--rbd-pool",
            pool,
            "--ceph-conf",
            ceph.conf.to_str().unwrap(),
            "--ceph-id",
            pool,
            "--ceph-keyring",
            keyring.to_str().unwrap(),
            "--rbd-max-clone-depth",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let pdiskd = Pdiskd::start_on(
            scratch.path(),
            scratch.path(),
            scratch.path().join("unused-pool-dir"),
            None,
            args,
        );
        RbdPdisk {
            ceph,
            pool: pool.to_string(),
            pdiskd,
            _scratch: scratch,
        }
    }

    fn url(&self, image: &str) -> String {
        self.ceph.qemu_url(&self.pool, image)
    }

    fn image(v: &pb::Volume) -> String {
        format!("pd-vol-{}", v.uuid)
    }

    /// Writes `len` bytes of `byte` at `offset` of an image.
    fn write(&self, image: &str, byte: u8, offset: u64, len: u64) {
        let out = run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P {byte} {offset} {len}"),
                &self.url(image),
            ],
        );
        assert!(out.contains("wrote"), "{out}");
    }

    /// Whether `len` bytes at `offset` of an image (or `image@snap`) are all
    /// `byte`.
    fn holds(&self, image: &str, byte: u8, offset: u64, len: u64) -> bool {
        let out = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-r",
                "-c",
                &format!("read -P {byte} {offset} {len}"),
                &self.url(image),
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("Pattern verification failed") {
            return false;
        }
        assert!(
            out.status.success() && text.contains("read "),
            "qemu-io read of {image} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        true
    }

    fn rbd_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        serde_json::from_str(&self.ceph.rbd(&a)).unwrap()
    }
}

async fn create(c: &mut Client, name: &str, size: u64) -> pb::Volume {
    c.create_volume(pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

async fn snapshot(c: &mut Client, volume: &str, name: &str) -> Result<pb::Snapshot, tonic::Status> {
    c.create_snapshot(pb::CreateSnapshotRequest {
        volume: volume.into(),
        name: name.into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

async fn clone_snapshot(
    c: &mut Client,
    snap: &str,
    name: &str,
    size: u64,
) -> Result<pb::Volume, tonic::Status> {
    c.clone_volume(pb::CloneVolumeRequest {
        source: snap.into(),
        source_is_snapshot: true,
        name: name.into(),
        size_bytes: size,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

async fn delete_snapshot(c: &mut Client, name: &str) -> Result<(), tonic::Status> {
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot: name.into(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn delete_volume(c: &mut Client, name: &str) -> Result<(), tonic::Status> {
    c.delete_volume(pb::DeleteVolumeRequest {
        volume: name.into(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn pool(c: &mut Client) -> pb::Pool {
    c.get_pool(pb::GetPoolRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and ceph (scripts/test)"]
async fn volumes_snapshots_and_clones_are_rbd_images_snapshots_and_clones() {
    let t = RbdPdisk::start("pd-life");
    let mut c = t.pdiskd.client().await;

    let v = create(&mut c, "base", 64 * MIB).await;
    let img = RbdPdisk::image(&v);
    assert_eq!(v.device_path, format!("rbd:pd-life/{img}"));
    let info = t.rbd_json(&["info", &format!("pd-life/{img}")]);
    assert_eq!(info["size"].as_u64(), Some(64 * MIB));
    let meta = t.ceph.rbd(&[
        "image-meta",
        "get",
        &format!("pd-life/{img}"),
        "stratus.pdisk.object",
    ]);
    assert_eq!(meta.trim(), format!("volume {}", v.uuid));
    assert!(t.holds(&img, 0, 0, 64 * MIB), "a new volume reads as zeros");

    // A snapshot keeps its content after the volume is overwritten.
    t.write(&img, 0x11, 0, 4 * MIB);
    let s = snapshot(&mut c, "base", "s1").await.unwrap();
    t.write(&img, 0x22, 0, 4 * MIB);
    let snap_spec = format!("{img}@pd-snap-{}", s.uuid);
    assert!(t.holds(&snap_spec, 0x11, 0, 4 * MIB));
    assert!(t.holds(&img, 0x22, 0, 4 * MIB));

    // A clone of it is an RBD clone, grown on request, independent both ways.
    let cl = clone_snapshot(&mut c, "s1", "clone", 96 * MIB)
        .await
        .unwrap();
    let cl_img = RbdPdisk::image(&cl);
    let info = t.rbd_json(&["info", &format!("pd-life/{cl_img}")]);
    assert_eq!(
        info["parent"]["image"].as_str(),
        Some(img.as_str()),
        "{info}"
    );
    assert_eq!(info["size"].as_u64(), Some(96 * MIB));
    assert!(t.holds(&cl_img, 0x11, 0, 4 * MIB));
    t.write(&cl_img, 0x33, 0, MIB);
    assert!(t.holds(&snap_spec, 0x11, 0, 4 * MIB));
    assert!(t.holds(&img, 0x22, 0, 4 * MIB));

    // Resize is seen by the client.
    c.resize_volume(pb::ResizeVolumeRequest {
        volume: "base".into(),
        size_bytes: 128 * MIB,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        t.rbd_json(&["info", &format!("pd-life/{img}")])["size"].as_u64(),
        Some(128 * MIB)
    );
    t.write(&img, 0x44, 120 * MIB, MIB);
    assert!(t.holds(&img, 0x44, 120 * MIB, MIB));

    // The snapshot is not deleted while the clone depends on it, and
    // nothing changes; once the clone is gone, it is.
    let e = delete_snapshot(&mut c, "s1").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&cl_img), "{e:?}");
    assert!(t.holds(&cl_img, 0x33, 0, MIB));
    assert!(t.holds(&snap_spec, 0x11, 0, 4 * MIB));
    delete_volume(&mut c, "clone").await.unwrap();
    delete_snapshot(&mut c, "s1").await.unwrap();
    delete_volume(&mut c, "base").await.unwrap();
    let left = t.ceph.rbd(&["ls", "pd-life"]);
    assert!(left.trim().is_empty(), "images left: {left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and ceph (scripts/test)"]
async fn deep_clone_chains_are_flattened_and_pool_status_comes_from_ceph() {
    let t = RbdPdisk::start("pd-chain");
    let mut c = t.pdiskd.client().await;
    // max clone depth 2: v0 <- c1 <- c2 are layered, c3 is flattened.
    create(&mut c, "c0", 16 * MIB).await;
    let mut prev = "c0".to_string();
    let mut imgs = Vec::new();
    for i in 1..=3 {
        snapshot(&mut c, &prev, &format!("s{i}")).await.unwrap();
        let v = clone_snapshot(&mut c, &format!("s{i}"), &format!("c{i}"), 0)
            .await
            .unwrap();
        imgs.push(RbdPdisk::image(&v));
        prev = format!("c{i}");
    }
    let parent = |img: &str| {
        t.rbd_json(&["info", &format!("pd-chain/{img}")])["parent"]["image"]
            .as_str()
            .map(str::to_string)
    };
    assert!(parent(&imgs[0]).is_some());
    assert!(parent(&imgs[1]).is_some());
    assert_eq!(
        parent(&imgs[2]),
        None,
        "the third clone in the chain is flat"
    );
    // Flat: its snapshot's parent can go.
    delete_snapshot(&mut c, "s3").await.unwrap();

    t.write(&imgs[1], 0x55, 0, 8 * MIB);
    let p = pool(&mut c).await;
    assert_eq!(p.backend, "rbd");
    assert_eq!(p.location, "rbd:pd-chain");
    assert!(
        p.capacity_bytes > 512 * MIB && p.capacity_bytes <= MEMSTORE_BYTES,
        "{p:?}"
    );
    assert!(p.allocated_bytes >= 8 * MIB, "{p:?}");
    assert_eq!(p.volume_count, 4);
    // No tgtd runs beside these pdiskds: "exports not checked" is the
    // exporter's drift, not the pool's.
    let pool_drift: Vec<_> = p.drift.iter().filter(|d| d.kind != "export").collect();
    assert!(pool_drift.is_empty(), "{pool_drift:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and ceph (scripts/test)"]
async fn drift_after_restart_names_stray_and_missing_images_and_touches_neither() {
    let mut t = RbdPdisk::start("pd-drift");
    let mut c = t.pdiskd.client().await;
    let gone = create(&mut c, "gone", 8 * MIB).await;
    create(&mut c, "kept", 8 * MIB).await;
    // Behind pdiskd's back: an image of ours removed, a stray one named
    // like ours, and one of someone else.
    t.ceph
        .rbd(&["rm", &format!("pd-drift/{}", RbdPdisk::image(&gone))]);
    let stray = format!("pd-vol-{}", "0badc0de-0000-4000-8000-000000000001");
    t.ceph
        .rbd(&["create", "--size", "4", &format!("pd-drift/{stray}")]);
    t.ceph.rbd(&["create", "--size", "4", "pd-drift/backup"]);
    t.pdiskd.kill9();
    t.pdiskd.restart();
    let mut c = t.pdiskd.client().await;
    let p = pool(&mut c).await;
    let drift: Vec<String> = p
        .drift
        .iter()
        .map(|d| format!("{} {} {}", d.kind, d.object, d.detail))
        .collect();
    assert!(
        drift
            .iter()
            .any(|d| d.starts_with("volume gone") && d.contains("missing")),
        "{drift:?}"
    );
    assert!(
        drift
            .iter()
            .any(|d| d.starts_with(&format!("image rbd:pd-drift/{stray}"))),
        "{drift:?}"
    );
    assert!(
        drift.iter().any(|d| d.starts_with("image pd-drift/backup")),
        "{drift:?}"
    );
    let left = t.ceph.rbd(&["ls", "pd-drift"]);
    assert!(left.contains(&stray) && left.contains("backup"), "{left}");
    // Bad input changes nothing.
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            name: "../x".into(),
            size_bytes: MIB,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(t.ceph.rbd(&["ls", "pd-drift"]), left);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and ceph (scripts/test)"]
async fn twenty_concurrent_clients_each_get_their_volume() {
    let t = RbdPdisk::start("pd-many");
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = t.pdiskd.client().await;
        tasks.push(tokio::spawn(async move {
            create(&mut c, &format!("v{i}"), 4 * MIB).await;
            snapshot(&mut c, &format!("v{i}"), &format!("s{i}"))
                .await
                .unwrap();
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(600), task)
            .await
            .expect("20 creates and snapshots within 10 minutes")
            .unwrap();
    }
    let ls = t.rbd_json(&["ls", "-l", "pd-many"]);
    let rows = ls.as_array().unwrap();
    assert_eq!(rows.iter().filter(|r| r["snapshot"].is_null()).count(), 20);
    assert_eq!(rows.iter().filter(|r| !r["snapshot"].is_null()).count(), 20);
}
