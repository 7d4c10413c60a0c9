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

#[path = "rbd/flatten.rs"]
mod flatten;

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
        Self::start_with(pool, &[])
    }

    /// Like `start`, with more arguments for pdiskd.
    fn start_with(pool: &str, more: &[&str]) -> RbdPdisk {
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
        .chain(more)
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

async fn get(c: &mut Client, name: &str) -> pb::Volume {
    c.get_volume(pb::GetVolumeRequest {
        volume: name.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
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

/// QEMU's rbd driver opening `image` of `pool` the way an agent does from an
/// export: the monitors it names as `server`, no conf of the cluster's (an
/// empty one), `user`, and the key as a `secret` object read from a file
/// (what agentd hands QEMU as a sealed memfd). Runs `cmd` with qemu-io and
/// returns (success, output).
fn qemu_io_as(
    dir: &std::path::Path,
    monitors: &[String],
    pool: &str,
    image: &str,
    user: &str,
    key: &str,
    cmd: &str,
) -> (bool, String) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key_file = dir.join("client.key");
    let _ = std::fs::remove_file(&key_file);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_file)
        .unwrap()
        .write_all(key.as_bytes())
        .unwrap();
    let empty = dir.join("empty.conf");
    std::fs::write(&empty, "").unwrap();
    let servers: Vec<serde_json::Value> = monitors
        .iter()
        .map(|m| {
            let (host, port) = m.rsplit_once(':').unwrap();
            serde_json::json!({"host": host, "port": port})
        })
        .collect();
    let spec = serde_json::json!({
        "driver": "raw",
        "file": {
            "driver": "rbd",
            "pool": pool,
            "image": image,
            "user": user,
            "key-secret": "k0",
            "conf": empty,
            "server": servers,
        }
    });
    let out = run(
        "qemu-io",
        &[
            "--object",
            &format!("secret,id=k0,file={},format=base64", key_file.display()),
            "-c",
            cmd,
            &format!("json:{spec}"),
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success() && !text.contains("Pattern verification failed"),
        text,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and ceph (scripts/test)"]
async fn exports_are_rbd_attachments_fenced_like_iscsi_that_qemu_opens() {
    use stratus_pki::identity::Role;
    use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
    let t = RbdPdisk::start("pd-export");
    let mut admin = t.pdiskd.client().await;
    let pki = TestPki::shared();
    let mut a = VolumeServiceClient::new(channel_as(&t.pdiskd.url(), &pki.agent()).await);
    let mut b = VolumeServiceClient::new(
        channel_as(
            &t.pdiskd.url(),
            &pki.issue(Role::Agent, "rbd-b", Some(OTHER_INITIATOR), &[]),
        )
        .await,
    );
    let v = create(&mut admin, "disk", 16 * MIB).await;
    let img = RbdPdisk::image(&v);
    t.write(&img, 0x5a, 0, MIB);
    let req = |iqn: &str, multi: bool| pb::ExportVolumeRequest {
        volume: "disk".into(),
        initiators: vec![iqn.into()],
        multi_attach: multi,
        // Agents send CHAP whatever the pool: with no target it is dropped.
        chap: Some(pb::ChapCredentials {
            user: "guest".into(),
            secret: "a1b2c3d4e5f60718293a4b5c6d7e8f90".into(),
            target: None,
        }),
        ..Default::default()
    };

    // An agent exports only for its own initiator: nothing recorded else.
    let e = a
        .export_volume(req(OTHER_INITIATOR, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let listed = |exports: pb::ListExportsResponse| exports.exports;
    assert!(listed(
        admin
            .list_exports(pb::ListExportsRequest::default())
            .await
            .unwrap()
            .into_inner()
    )
    .is_empty());

    let exported = a
        .export_volume(req(INITIATOR, false))
        .await
        .unwrap()
        .into_inner();
    let e = &exported;
    assert_eq!(e.exporter, "rbd");
    assert_eq!(e.url, format!("rbd:pd-export/{img}"));
    assert_eq!(
        (e.target_iqn.as_str(), e.portal.as_str(), e.lun),
        ("", "", 0)
    );
    assert_eq!(e.chap_user, "", "no CHAP is kept without a target");
    assert_eq!(e.initiators, [INITIATOR]);
    let r = e.rbd.clone().expect("an rbd attachment");
    assert_eq!(
        (r.pool.as_str(), r.image.as_str()),
        ("pd-export", img.as_str())
    );
    assert_eq!(r.user, "pd-export");
    assert_eq!(r.secret_ref, "keyring:client.pd-export");
    assert_eq!(r.cluster_fsid, t.ceph.fsid);
    let v1 = t
        .ceph
        .mon_addrs
        .split("v1:")
        .nth(1)
        .unwrap()
        .trim_end_matches(']');
    assert_eq!(r.monitors, [v1]);
    // The key is in no reply and no log line.
    let key = t.ceph.key_of("pd-export");
    assert!(!format!("{e:?}").contains(&key));
    assert!(!t.pdiskd.log_text().contains(&key));

    // The attachment is all a client needs, with the key of its own host:
    // QEMU's rbd driver reads the volume's data through it.
    let scratch = tempfile::tempdir().unwrap();
    let (ok, out) = qemu_io_as(
        scratch.path(),
        &r.monitors,
        &r.pool,
        &r.image,
        &r.user,
        &key,
        &format!("read -P {} 0 {MIB}", 0x5a),
    );
    assert!(ok, "{out}");
    // A wrong key is refused by the cluster.
    let (ok, _) = qemu_io_as(
        scratch.path(),
        &r.monitors,
        &r.pool,
        &r.image,
        &r.user,
        "AQBbadbadbadbadbadbadbadbadbadbadbadbadba==",
        "read 0 4k",
    );
    assert!(!ok);

    // Fencing as for iSCSI: a second host is refused (with or without
    // multi_attach on a volume that does not allow it), and the record
    // keeps only host a.
    for multi in [false, true] {
        let e = b
            .export_volume(req(OTHER_INITIATOR, multi))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    }
    let now = listed(
        admin
            .list_exports(pb::ListExportsRequest::default())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].initiators, [INITIATOR]);
    assert_eq!(now[0].rbd, exported.rbd);

    // The pool: an exporter with no daemon to be down, no export drift.
    let p = pool(&mut admin).await;
    assert_eq!(
        (p.exporter.as_str(), p.exporter_status.as_str()),
        ("rbd", "up")
    );
    assert_eq!(p.export_count, 1);
    assert!(p.drift.is_empty(), "{:?}", p.drift);

    // Exported: not deleted. Host b's unexport takes nothing of a's; a's own
    // ends it, and then the volume goes.
    assert_eq!(
        delete_volume(&mut admin, "disk").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let e = b
        .unexport_volume(pb::UnexportVolumeRequest {
            volume: "disk".into(),
            initiators: vec![INITIATOR.into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    a.unexport_volume(pb::UnexportVolumeRequest {
        volume: "disk".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    delete_volume(&mut admin, "disk").await.unwrap();
    // No target daemon was ever asked for.
    assert!(!t.pdiskd.log_text().contains("tgtadm"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and ceph (scripts/test)"]
async fn clones_of_an_image_base_are_rbd_clones_and_hold_the_base() {
    let t = RbdPdisk::start("pd-base");
    let mut c = t.pdiskd.client().await;
    // An image base: labelled with an image checksum, made by an admin.
    let sha = "ab".repeat(32);
    let base = c
        .create_volume(pb::CreateVolumeRequest {
            name: "image-base".into(),
            size_bytes: 32 * MIB,
            labels: [("stratus.io/image-sha256".to_string(), sha.clone())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(base.image_sha256, sha);
    let base_img = RbdPdisk::image(&base);
    let mut clones = Vec::new();
    for name in ["guest-1", "guest-2"] {
        let v = c
            .clone_volume(pb::CloneVolumeRequest {
                source: "image-base".into(),
                name: name.into(),
                labels: [("stratus.io/vm".to_string(), name.to_string())].into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let img = RbdPdisk::image(&v);
        let info = t.rbd_json(&["info", &format!("pd-base/{img}")]);
        assert_eq!(
            info["parent"]["image"].as_str(),
            Some(base_img.as_str()),
            "{info}"
        );
        assert_eq!(
            info["parent"]["snapshot"].as_str(),
            Some("pd-base"),
            "{info}"
        );
        clones.push(img);
    }
    t.write(&clones[0], 0x61, 0, MIB);
    assert!(t.holds(&clones[1], 0, 0, MIB), "clones are independent");
    // pd-base is no pdisk snapshot and no drift.
    let p = pool(&mut c).await;
    assert_eq!(p.snapshot_count, 0);
    assert!(p.drift.is_empty(), "{:?}", p.drift);
    // The base is not deleted while its clones depend on it; nothing changes.
    let e = delete_volume(&mut c, "image-base").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&clones[0]), "{e:?}");
    assert!(t.holds(&clones[0], 0x61, 0, MIB));
    for name in ["guest-1", "guest-2"] {
        delete_volume(&mut c, name).await.unwrap();
    }
    delete_volume(&mut c, "image-base").await.unwrap();
    let left = t.ceph.rbd(&["ls", "pd-base"]);
    assert!(left.trim().is_empty(), "images left: {left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and ceph (scripts/test)"]
async fn checksums_of_rbd_volumes_and_snapshots_are_their_whole_content() {
    use sha2::Digest;
    let t = RbdPdisk::start("pd-sum");
    let mut c = t.pdiskd.client().await;
    let v = create(&mut c, "summed", 8 * MIB).await;
    let img = RbdPdisk::image(&v);
    t.write(&img, 0x5a, MIB, MIB);
    snapshot(&mut c, "summed", "before").await.unwrap();
    t.write(&img, 0x5b, 0, MIB);
    // What sha256sum of the volume's bytes prints: holes as zeros.
    let expect = |first: u8| {
        let mut data = vec![0u8; 8 * MIB as usize];
        data[..MIB as usize].fill(first);
        data[MIB as usize..2 * MIB as usize].fill(0x5a);
        format!("{:x}", sha2::Sha256::digest(&data))
    };
    let sum = |volume: &str, is_snapshot: bool| {
        let mut c = c.clone();
        let volume = volume.to_string();
        async move {
            c.checksum_volume(pb::ChecksumVolumeRequest {
                volume,
                is_snapshot,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let now = sum("summed", false).await;
    assert_eq!((now.sha256, now.size_bytes), (expect(0x5b), 8 * MIB));
    let then = sum("before", true).await;
    assert_eq!(then.sha256, expect(0));
    // The same through the CLI, as an admin: --json and the sha256sum form.
    let j = t.pdiskd.cli_json(&["volume", "checksum", "summed"]);
    assert_eq!(j["sha256"], expect(0x5b), "{j}");
    assert_eq!(j["size_bytes"], 8 * MIB, "{j}");
    let j = t
        .pdiskd
        .cli_json(&["volume", "checksum", "before", "--snapshot"]);
    assert_eq!(
        (j["sha256"].as_str(), j["snapshot"].as_bool()),
        (Some(expect(0).as_str()), Some(true))
    );
    let out = t.pdiskd.cli(&["volume", "checksum", "summed"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}  summed\n", expect(0x5b))
    );
    // A snapshot name without --snapshot is no volume: an error, exit 1.
    let out = t.pdiskd.cli(&["volume", "checksum", "before"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and ceph (scripts/test)"]
async fn raw_imports_use_rbd_import_qcow2_qemu_img_both_sparse_with_content() {
    use std::os::unix::fs::FileExt;
    // With the commands pdiskd runs in its log.
    let t = RbdPdisk::start_with(
        "pd-imp",
        &["--log-level", "pdisk=debug,stratus_core=debug,info"],
    );
    let mut c = t.pdiskd.client().await;
    // 64 MiB raw with three islands of data; its qcow2 conversion.
    let raw = t.pdiskd.import_dir.join("img.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(64 * MIB).unwrap();
    f.write_all_at(&[0x11; 4096], 0).unwrap();
    f.write_all_at(&vec![0x22; 3 << 20], (40 * MIB) - 12345)
        .unwrap();
    f.write_all_at(b"tail", (64 * MIB) - 4).unwrap();
    drop(f);
    let qcow = t.pdiskd.import_dir.join("img.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            qcow.to_str().unwrap(),
        ],
    );
    let import = |name: &'static str, path: &std::path::Path, request_id: &'static str| {
        let mut c = c.clone();
        let req = pb::CreateVolumeRequest {
            name: name.into(),
            size_bytes: 96 * MIB,
            request_id: request_id.into(),
            source: Some(pb::create_volume_request::Source::FromImage(
                pb::ImageSource {
                    path: path.display().to_string(),
                    format: 0,
                },
            )),
            ..Default::default()
        };
        async move { c.create_volume(req).await.unwrap().into_inner() }
    };
    // The raw import's progress, watched by request id: rbd import's own
    // percentages, ending at the image's length.
    let mut w = c.clone();
    let watcher = tokio::spawn(async move {
        let mut stream = w
            .watch_progress(pb::WatchProgressRequest {
                request_id: "imp-raw".into(),
                project: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::new();
        while let Some(p) = stream.message().await.unwrap() {
            seen.push(p);
        }
        seen
    });
    let from_raw = import("from-raw", &raw, "imp-raw").await;
    let seen = tokio::time::timeout(Duration::from_secs(60), watcher)
        .await
        .unwrap()
        .unwrap();
    let last = seen.last().expect("progress of the import");
    assert!(last.finished && last.error.is_empty(), "{last:?}");
    assert_eq!((last.phase.as_str(), last.done_bytes), ("import", 64 * MIB));
    eprintln!(
        "raw import: {} progress messages, done bytes {:?}",
        seen.len(),
        seen.iter().map(|p| p.done_bytes).collect::<Vec<_>>()
    );
    let from_qcow2 = import("from-qcow2", &qcow, "").await;

    // Which tool pdiskd ran for each (its debug log has every command).
    let log = t.pdiskd.log_text();
    let imported = |tool: &str, file: &std::path::Path| {
        log.lines().any(|l| {
            l.contains(tool)
                && l.contains(&format!("{} ", file.display()))
                && l.contains("pd-tmp-vol-")
        })
    };
    assert!(
        imported("import --image-format 2", &raw),
        "raw through rbd import"
    );
    assert!(
        !imported("qemu-img convert", &raw),
        "raw not through qemu-img"
    );
    assert!(
        imported("qemu-img convert", &qcow),
        "qcow2 through qemu-img convert"
    );

    for v in [&from_raw, &from_qcow2] {
        let img = RbdPdisk::image(v);
        assert_eq!(
            v.size_bytes,
            96 * MIB,
            "{}: grown to the size asked",
            v.name
        );
        let info = t.rbd_json(&["info", &format!("pd-imp/{img}")]);
        assert_eq!(info["size"].as_u64(), Some(96 * MIB), "{info}");
        // Sparse: four 4 MiB objects hold data, not the whole 64 MiB.
        assert!(
            v.allocated_bytes <= 16 * MIB,
            "{}: holes kept: {} bytes allocated",
            v.name,
            v.allocated_bytes
        );
        // Same bytes as the file through QEMU's rbd driver; the grown
        // tail reads as zeros.
        let out = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                raw.to_str().unwrap(),
                &t.url(&img),
            ],
        );
        assert!(
            out.status.success(),
            "{}: {}{}",
            v.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A raw path outside the import directory changes nothing.
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            name: "escape".into(),
            source: Some(pb::create_volume_request::Source::FromImage(
                pb::ImageSource {
                    path: "/etc/shadow".into(),
                    format: 0,
                },
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut images: Vec<String> = t
        .ceph
        .rbd(&["ls", "pd-imp"])
        .lines()
        .map(String::from)
        .collect();
    images.sort();
    let mut want = vec![RbdPdisk::image(&from_raw), RbdPdisk::image(&from_qcow2)];
    want.sort();
    assert_eq!(images, want);
}

/// Clones of an image base and of a snapshot share their source's lock and
/// run at once (the boot storm); a delete of either source, sent while they
/// run, waits for them and is then refused (clones depend on it). Nothing
/// races: every clone is made once, holds the source's data, no temporary
/// is left, `pd-base` is taken once, and the pool shows no drift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and ceph (scripts/test)"]
async fn clones_of_one_base_or_snapshot_run_at_once_and_a_racing_delete_waits() {
    let t = RbdPdisk::start("pd-storm");
    let mut c = t.pdiskd.client().await;
    let sha = "cd".repeat(32);
    let base = c
        .create_volume(pb::CreateVolumeRequest {
            name: "image-base".into(),
            size_bytes: 16 * MIB,
            labels: [("stratus.io/image-sha256".to_string(), sha)].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Written before any clone (the base's pd-base is taken by the first).
    t.write(&RbdPdisk::image(&base), 0x5a, 0, MIB);
    let origin = create(&mut c, "origin", 16 * MIB).await;
    t.write(&RbdPdisk::image(&origin), 0x6b, 0, MIB);
    snapshot(&mut c, "origin", "s1").await.unwrap();

    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let mut c = t.pdiskd.client().await;
        let (source, is_snap) = if i % 3 == 2 {
            ("s1", true)
        } else {
            ("image-base", false)
        };
        tasks.push(tokio::spawn(async move {
            let r = c
                .clone_volume(pb::CloneVolumeRequest {
                    source: source.into(),
                    source_is_snapshot: is_snap,
                    name: format!("g{i}"),
                    labels: [("stratus.io/vm".to_string(), format!("g{i}"))].into(),
                    ..Default::default()
                })
                .await;
            (is_snap, r)
        }));
    }
    // The deletes race the clones: sent once the clones are under way.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (del_base, del_snap) = {
        let mut c1 = t.pdiskd.client().await;
        let mut c2 = t.pdiskd.client().await;
        tokio::join!(
            delete_volume(&mut c1, "image-base"),
            delete_snapshot(&mut c2, "s1")
        )
    };
    let mut made = Vec::new();
    for task in tasks {
        let (is_snap, r) = tokio::time::timeout(Duration::from_secs(600), task)
            .await
            .expect("12 clones within 10 minutes")
            .unwrap();
        let v = r
            .expect("a clone of a source that clones depend on")
            .into_inner();
        made.push((is_snap, RbdPdisk::image(&v)));
    }
    eprintln!("12 clones at once: {:?}", started.elapsed());
    for (what, r) in [("base", &del_base), ("snapshot", &del_snap)] {
        let e = r.as_ref().expect_err(what);
        assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
    }
    for (is_snap, img) in &made {
        let info = t.rbd_json(&["info", &format!("pd-storm/{img}")]);
        let want = if *is_snap {
            RbdPdisk::image(&origin)
        } else {
            RbdPdisk::image(&base)
        };
        assert_eq!(
            info["parent"]["image"].as_str(),
            Some(want.as_str()),
            "{info}"
        );
        let byte = if *is_snap { 0x6b } else { 0x5a };
        assert!(t.holds(img, byte, 0, MIB), "{img}");
    }
    let ls = t.rbd_json(&["ls", "-l", "pd-storm"]);
    let rows = ls.as_array().unwrap();
    let images: Vec<&str> = rows
        .iter()
        .filter(|r| r["snapshot"].is_null())
        .map(|r| r["image"].as_str().unwrap())
        .collect();
    assert_eq!(images.len(), 14, "12 clones, the base, origin: {images:?}");
    assert!(
        images.iter().all(|i| !i.starts_with("pd-tmp-")),
        "{images:?}"
    );
    let base_snaps = rows.iter().filter(|r| r["snapshot"] == "pd-base").count();
    assert_eq!(base_snaps, 1, "{ls}");
    let p = pool(&mut c).await;
    assert_eq!(p.volume_count, 14);
    let pool_drift: Vec<_> = p.drift.iter().filter(|d| d.kind != "export").collect();
    assert!(pool_drift.is_empty(), "{pool_drift:?}");
}
