//! pdiskd end to end on a real stack, run by scripts/test (needs root):
//! on the host an XFS reflink pool on a loop device, tgtd and QEMU's iSCSI
//! initiator; in the lab VM (`STRATUS_STACK=lvm-lio`, scripts/lab) the same
//! tests run against an LVM thin pool, the kernel's LIO target and the
//! kernel's open-iscsi initiator (see testkit's `Stack`).

use std::os::unix::fs::FileExt;
use std::time::Duration;

use stratus_proto::pdisk::v1 as pb;
use testkit::*;
use tonic::Code;

const IGNORE: &str =
    "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test";

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

async fn export(c: &mut Client, vol: &str, initiators: &[&str]) -> pb::Export {
    c.export_volume(pb::ExportVolumeRequest {
        migration: false,
        host_id: String::new(),
        multi_attach: false,
        project: String::new(),
        volume: vol.into(),
        initiators: initiators.iter().map(|s| s.to_string()).collect(),
        chap: None,
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn names(c: &mut Client) -> Vec<String> {
    c.list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| v.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn data_written_through_an_export_reads_back_and_acl_holds() {
    let _ = IGNORE;
    let s = Stack::start();
    let mut c = s.pdiskd.client().await;
    let v = create(&mut c, "data", 64 << 20).await;
    let e = export(&mut c, "data", &[INITIATOR]).await;
    assert_eq!(e.url, format!("iscsi://{}/{}/1", s.portal(), e.target_iqn));
    assert!(e.target_iqn.ends_with(&v.uuid));

    let a = s.initiator(&e.target_iqn, INITIATOR);
    a.io(&["write -P 0xab 1M 1M"]).unwrap();
    a.io(&["read -P 0xab 1M 1M"]).unwrap();
    // The bytes are in the volume's backing file.
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(&v.device_path)
        .unwrap()
        .read_exact_at(&mut buf, 1 << 20)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));

    // An initiator outside the ACL is refused.
    let b = s.initiator(&e.target_iqn, OTHER_INITIATOR);
    assert!(b.io(&["read 0 4k"]).is_err());

    // Unexport makes the LUN unreachable for the allowed initiator too.
    c.unexport_volume(pb::UnexportVolumeRequest {
        project: String::new(),
        volume: "data".into(),
        initiators: vec![],
        request_id: String::new(),
    })
    .await
    .unwrap();
    assert!(a.io(&["read 0 4k"]).is_err());
    assert!(!s.exports.show().contains(&e.target_iqn));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn snapshot_keeps_content_and_clone_is_writable_and_independent() {
    let s = Stack::start();
    let mut c = s.pdiskd.client().await;
    create(&mut c, "origin", 32 << 20).await;
    let e = export(&mut c, "origin", &[INITIATOR]).await;
    let origin = s.initiator(&e.target_iqn, INITIATOR);
    origin.io(&["write -P 0x11 0 1M"]).unwrap();

    c.create_snapshot(pb::CreateSnapshotRequest {
        project: String::new(),
        volume: "origin".into(),
        name: "origin-s1".into(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    origin.io(&["write -P 0x22 0 1M"]).unwrap();

    let clone = c
        .clone_volume(pb::CloneVolumeRequest {
            source: "origin-s1".into(),
            source_is_snapshot: true,
            name: "from-snap".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(clone.size_bytes, 32 << 20);
    let ce = export(&mut c, "from-snap", &[INITIATOR]).await;
    let cl = s.initiator(&ce.target_iqn, INITIATOR);
    // The snapshot kept the content from before the overwrite.
    cl.io(&["read -P 0x11 0 1M"]).unwrap();
    // The clone is writable, and writing it leaves the origin alone.
    cl.io(&["write -P 0x33 0 1M"]).unwrap();
    origin.io(&["read -P 0x22 0 1M"]).unwrap();
    cl.io(&["read -P 0x33 0 1M"]).unwrap();

    // The pool shares blocks: it says reflink (file) or thin (lvm).
    let pool = c
        .get_pool(pb::GetPoolRequest {})
        .await
        .unwrap()
        .into_inner();
    let sharing = match s.kind() {
        StackKind::FileTgt => "reflink",
        StackKind::LvmLio => "thin-snapshot",
    };
    assert!(pool.capabilities.contains(&sharing.to_string()), "{pool:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn resize_shows_the_new_size_to_the_initiator() {
    let s = Stack::start();
    let mut c = s.pdiskd.client().await;
    create(&mut c, "grow", 64 << 20).await;
    let e = export(&mut c, "grow", &[INITIATOR]).await;
    let a = s.initiator(&e.target_iqn, INITIATOR);
    a.io(&["write -P 0x5a 0 64k"]).unwrap();
    assert_eq!(a.length().unwrap(), 64 << 20);
    let v = c
        .resize_volume(pb::ResizeVolumeRequest {
            project: String::new(),
            volume: "grow".into(),
            size_bytes: 128 << 20,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.size_bytes, 128 << 20);
    assert_eq!(a.length().unwrap(), 128 << 20);
    a.io(&["read -P 0x5a 0 64k", "write -P 0x6b 127M 64k"])
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn killing_pdiskd_or_tgtd_loses_no_export() {
    let mut s = Stack::start();
    let mut c = s.pdiskd.client().await;
    create(&mut c, "keep", 16 << 20).await;
    let e = export(&mut c, "keep", &[INITIATOR]).await;
    let a = s.initiator(&e.target_iqn, INITIATOR);
    a.io(&["write -P 0x77 0 64k"]).unwrap();

    // pdiskd crashes; the target keeps serving; the restarted pdiskd still knows.
    s.pdiskd.kill9();
    a.io(&["read -P 0x77 0 64k"]).unwrap();
    s.pdiskd.restart();
    let mut c = s.pdiskd.client().await;
    let exports = c
        .list_exports(pb::ListExportsRequest {
            project: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .exports;
    assert_eq!(exports.len(), 1);

    // The target loses everything (tgtd crash, or LIO after a reboot):
    // pdiskd's watchdog re-creates the export.
    s.exports.forget_all();
    wait_for(
        "export restored after tgtd restart",
        Duration::from_secs(30),
        || a.io(&["read -P 0x77 0 64k"]).ok(),
    );

    // Both down: the target comes back empty while pdiskd is down; pdiskd's
    // start-up reconciliation restores the export.
    s.pdiskd.kill9();
    s.exports.forget_all();
    assert!(a.io(&["read 0 4k"]).is_err());
    s.pdiskd.restart();
    a.io(&["read -P 0x77 0 64k"]).unwrap();
    assert!(s.pdiskd.log_text().contains("re-created export"));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn drift_is_detected_and_nothing_is_deleted() {
    let mut s = Stack::start();
    let mut c = s.pdiskd.client().await;
    let lost = create(&mut c, "lost", 8 << 20).await;
    create(&mut c, "fine", 8 << 20).await;
    s.pdiskd.kill9();
    // Behind pdiskd's back: a stray file or LV appears, a volume's data
    // vanishes, and the target grows a target with pdisk's prefix that
    // nobody asked for.
    let stray = s.add_stray_object();
    s.remove_backing(&lost.device_path);
    let orphan = s.exports.add_orphan_target("orphan");
    s.pdiskd.restart();
    let mut c = s.pdiskd.client().await;
    let pool = c
        .get_pool(pb::GetPoolRequest {})
        .await
        .unwrap()
        .into_inner();
    let has = |k: &str, o: &str| {
        pool.drift
            .iter()
            .any(|d| d.kind == k && d.object.contains(o))
    };
    assert!(has("volume", "lost"), "{:?}", pool.drift);
    assert!(
        pool.drift
            .iter()
            .any(|d| d.kind != "volume" && d.object.contains(&stray)),
        "{:?}",
        pool.drift
    );
    assert!(has("target", "orphan"), "{:?}", pool.drift);
    assert!(!pool.last_reconciled_at.is_empty());
    assert!(s.stray_exists());
    assert!(s.exports.show().contains(&orphan));
    let v = c
        .get_volume(pb::GetVolumeRequest {
            project: String::new(),
            volume: "lost".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.state, pb::VolumeState::Error as i32);
    assert!(v.state_reason.contains("missing"));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn bad_input_gets_the_right_code_and_changes_nothing() {
    let mut s = Stack::start();
    let mut c = s.pdiskd.client().await;
    create(&mut c, "v1", 8 << 20).await;
    export(&mut c, "v1", &[INITIATOR]).await;
    let before_tgt = s.exports.show();
    let before_files = s.backing_objects();

    let code = |r: Result<tonic::Response<pb::Volume>, tonic::Status>| r.unwrap_err().code();
    let req = |name: &str, size: u64| pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        ..Default::default()
    };
    assert_eq!(
        code(c.create_volume(req("Bad_Name", 1 << 20)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_volume(req("../x", 1 << 20)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_volume(req("zero", 0)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_volume(req("v1", 1 << 20)).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.create_volume(req("huge", 1 << 58)).await),
        Code::ResourceExhausted
    );
    let outside = pb::CreateVolumeRequest {
        name: "etc".into(),
        source: Some(pb::create_volume_request::Source::FromImage(
            pb::ImageSource {
                path: "/etc/passwd".into(),
                format: 0,
            },
        )),
        ..Default::default()
    };
    assert_eq!(code(c.create_volume(outside).await), Code::InvalidArgument);
    assert_eq!(
        code(
            c.resize_volume(pb::ResizeVolumeRequest {
                project: String::new(),
                volume: "v1".into(),
                size_bytes: 1 << 20,
                request_id: String::new(),
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.get_volume(pb::GetVolumeRequest {
                project: String::new(),
                volume: "nope".into()
            })
            .await
        ),
        Code::NotFound
    );
    let del = |v: &str| pb::DeleteVolumeRequest {
        now: false,
        project: String::new(),
        volume: v.into(),
        request_id: String::new(),
    };
    assert_eq!(
        c.delete_volume(del("nope")).await.unwrap_err().code(),
        Code::NotFound
    );
    let e = c.delete_volume(del("v1")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("v1") && e.message().contains("exported"),
        "{e:?}"
    );
    let bad_iqn = c
        .export_volume(pb::ExportVolumeRequest {
            migration: false,
            host_id: String::new(),
            multi_attach: false,
            project: String::new(),
            volume: "v1".into(),
            initiators: vec!["host-a".into()],
            chap: None,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_iqn.code(), Code::InvalidArgument);
    let bad_chap = c
        .export_volume(pb::ExportVolumeRequest {
            migration: false,
            host_id: String::new(),
            multi_attach: false,
            project: String::new(),
            volume: "v1".into(),
            initiators: vec![INITIATOR.into()],
            chap: Some(pb::ChapCredentials {
                user: "u".into(),
                secret: "short".into(),
                target: None,
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_chap.code(), Code::InvalidArgument);
    assert!(
        !bad_chap.message().contains("short"),
        "secret echoed: {bad_chap:?}"
    );

    assert_eq!(names(&mut c).await, vec!["v1"]);
    assert_eq!(s.exports.show(), before_tgt);
    assert_eq!(s.backing_objects(), before_files);

    // tgtd down: Unavailable, and the store keeps no half-made export.
    // (LIO lives in the kernel: it cannot be down under a running pdiskd.)
    let Exports::Tgt(tgtd) = &mut s.exports else {
        return;
    };
    create(&mut c, "v2", 8 << 20).await;
    tgtd.kill();
    let e = c
        .export_volume(pb::ExportVolumeRequest {
            migration: false,
            host_id: String::new(),
            multi_attach: false,
            project: String::new(),
            volume: "v2".into(),
            initiators: vec![INITIATOR.into()],
            chap: None,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let exports = c
        .list_exports(pb::ListExportsRequest {
            project: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(exports.exports.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn twenty_concurrent_clients_leave_a_consistent_store() {
    let mut s = Stack::start();
    let c = s.pdiskd.client().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("c{i}");
            create(&mut c, &name, 16 << 20).await;
            for j in 0..2 {
                c.create_snapshot(pb::CreateSnapshotRequest {
                    project: String::new(),
                    volume: name.clone(),
                    name: format!("{name}-s{j}"),
                    request_id: String::new(),
                })
                .await
                .unwrap();
            }
            c.clone_volume(pb::CloneVolumeRequest {
                source: format!("{name}-s0"),
                source_is_snapshot: true,
                name: format!("{name}-clone"),
                ..Default::default()
            })
            .await
            .unwrap();
            // Everyone also tries to take the same name: exactly one wins.
            let shared = c
                .create_volume(pb::CreateVolumeRequest {
                    name: "contested".into(),
                    size_bytes: 1 << 20,
                    ..Default::default()
                })
                .await;
            if i % 2 == 0 {
                for j in 0..2 {
                    c.delete_snapshot(pb::DeleteSnapshotRequest {
                        project: String::new(),
                        snapshot: format!("{name}-s{j}"),
                        request_id: String::new(),
                    })
                    .await
                    .unwrap();
                }
                c.delete_volume(pb::DeleteVolumeRequest {
                    now: false,
                    project: String::new(),
                    volume: name,
                    request_id: String::new(),
                })
                .await
                .unwrap();
            }
            shared.is_ok()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += t.await.unwrap() as usize;
    }
    assert_eq!(winners, 1);
    let mut c = s.pdiskd.client().await;
    let vols = names(&mut c).await;
    // 10 originals survive, 20 clones, 1 contested.
    assert_eq!(vols.len(), 31, "{vols:?}");
    let snaps = c
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(snaps.len(), 20);
    // 31 volumes and 20 snapshots in the pool, nothing else.
    assert_eq!(s.backing_objects().len(), 51, "{:?}", s.backing_objects());
    // A restart finds nothing to reconcile.
    s.pdiskd.restart();
    let mut c = s.pdiskd.client().await;
    let pool = c
        .get_pool(pb::GetPoolRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(pool.drift.is_empty(), "{:?}", pool.drift);
    assert_eq!(pool.volume_count, 31);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn qcow2_and_raw_imports_keep_content_and_holes() {
    let s = Stack::start();
    let mut c = s.pdiskd.client().await;
    // A 256 MiB raw image with 2 MiB of data, and its qcow2 conversion.
    let raw = s.pdiskd.import_dir.join("img.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(256 << 20).unwrap();
    f.write_all_at(&vec![0xc3; 1 << 20], 0).unwrap();
    f.write_all_at(&vec![0x3c; 1 << 20], 200 << 20).unwrap();
    drop(f);
    let qcow = s.pdiskd.import_dir.join("img.qcow2");
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
    for (name, path) in [("from-raw", &raw), ("from-qcow2", &qcow)] {
        let v = c
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                size_bytes: 512 << 20,
                source: Some(pb::create_volume_request::Source::FromImage(
                    pb::ImageSource {
                        path: path.display().to_string(),
                        format: 0,
                    },
                )),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.size_bytes, 512 << 20);
        assert!(
            v.allocated_bytes < 8 << 20,
            "{name}: holes kept: {}",
            v.allocated_bytes
        );
        let out = run(
            "cmp",
            &[
                "-n",
                &(256u64 << 20).to_string(),
                raw.to_str().unwrap(),
                &v.device_path,
            ],
        );
        assert!(out.status.success(), "{name}: content differs");
    }
    // A qcow2 with a backing file is refused.
    let evil = s.pdiskd.import_dir.join("evil.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/hostname",
            evil.to_str().unwrap(),
        ],
    );
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            name: "evil".into(),
            source: Some(pb::create_volume_request::Source::FromImage(
                pb::ImageSource {
                    path: evil.display().to_string(),
                    format: 0,
                },
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("backing file"));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn snapshots_of_large_sparse_volumes_share_extents() {
    let s = Stack::start();
    let mut c = s.pdiskd.client().await;
    // 10 GiB on a 4 GiB filesystem: thin, and a reflink snapshot of it
    // must not copy its 64 MiB of data.
    let v = create(&mut c, "big", 10 << 30).await;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&v.device_path)
        .unwrap();
    for i in 0..64u64 {
        f.write_all_at(&vec![i as u8 + 1; 1 << 20], i * (160 << 20))
            .unwrap();
    }
    f.sync_all().unwrap();
    let used = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            c.get_pool(pb::GetPoolRequest {})
                .await
                .unwrap()
                .into_inner()
                .used_bytes
        }
    };
    let before = used(&mut c).await;
    for i in 0..3 {
        c.create_snapshot(pb::CreateSnapshotRequest {
            project: String::new(),
            volume: "big".into(),
            name: format!("big-s{i}"),
            request_id: String::new(),
        })
        .await
        .unwrap();
    }
    c.clone_volume(pb::CloneVolumeRequest {
        source: "big".into(),
        name: "big-clone".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let after = used(&mut c).await;
    assert!(
        after - before < 16 << 20,
        "3 snapshots and a clone of 64 MiB of data used {} bytes",
        after - before
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn chap_export_needs_the_secret() {
    let s = Stack::start();
    let mut c = s.pdiskd.client().await;
    create(&mut c, "secure", 8 << 20).await;
    let secret = "Sup3rS3cretPass";
    let e = c
        .export_volume(pb::ExportVolumeRequest {
            migration: false,
            host_id: String::new(),
            multi_attach: false,
            project: String::new(),
            volume: "secure".into(),
            initiators: vec![INITIATOR.into()],
            chap: Some(pb::ChapCredentials {
                user: "tenant1".into(),
                secret: secret.into(),
                target: None,
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.chap_user, "tenant1");
    let mut a = s.initiator(&e.target_iqn, INITIATOR);
    assert!(
        a.io(&["read 0 4k"]).is_err(),
        "login without CHAP must fail"
    );
    let secret_file = s.scratch().join("chap.secret");
    std::fs::write(&secret_file, secret).unwrap();
    a.chap = Some(("tenant1".into(), secret_file));
    a.io(&["write -P 0x42 0 4k", "read -P 0x42 0 4k"]).unwrap();
    // The secret is in no log line.
    assert!(!s.pdiskd.log_text().contains(secret));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn reflection_and_health_are_served() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let s = Stack::start();
    // What `grpcurl HOST list` asks (over mTLS).
    let channel = testkit::channel(&s.pdiskd.url()).await;
    let mut r = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = r
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer {msg:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"pdisk.v1.VolumeService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    // Not agentd's, whose proto is in the same descriptor set.
    assert!(!names.iter().any(|n| n.starts_with("agent.")), "{names:?}");

    let mut h = HealthClient::new(channel);
    let st = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "pdisk.v1.VolumeService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn checksum_matches_sha256sum_of_the_backing_file() {
    let s = Stack::start();
    let mut c = s.pdiskd.client().await;
    // 64 MiB (hashing is slow in debug builds), mostly holes: data at the
    // start, across a MiB boundary in the middle, and in the last bytes.
    let v = create(&mut c, "summed", 64 << 20).await;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&v.device_path)
        .unwrap();
    f.write_all_at(&[0x11; 4096], 0).unwrap();
    f.write_all_at(&vec![0x22; 3 << 20], (40 << 20) - 12345)
        .unwrap();
    f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
    f.sync_all().unwrap();
    let summer = c.clone();
    let sum = |volume: &str, is_snapshot: bool, request_id: &str| {
        let mut c = summer.clone();
        let req = pb::ChecksumVolumeRequest {
            project: String::new(),
            volume: volume.into(),
            is_snapshot,
            request_id: request_id.into(),
        };
        async move { c.checksum_volume(req).await.map(|r| r.into_inner()) }
    };

    // Progress is watched alongside, by request id.
    let mut w = c.clone();
    let watcher = tokio::spawn(async move {
        let mut stream = w
            .watch_progress(pb::WatchProgressRequest {
                request_id: "sum-1".into(),
                project: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut last = None;
        while let Some(p) = stream.message().await.unwrap() {
            last = Some(p);
        }
        last.unwrap()
    });
    let r = sum("summed", false, "sum-1").await.unwrap();
    assert_eq!(r.sha256, sha256_of(std::path::Path::new(&v.device_path)));
    assert_eq!(r.size_bytes, 64 << 20);
    let p = tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .unwrap()
        .unwrap();
    assert!(p.finished && p.error.is_empty(), "{p:?}");
    assert_eq!((p.phase.as_str(), p.done_bytes), ("checksum", 64 << 20));

    // A snapshot's checksum is its volume's at the time it was taken.
    let snap = c
        .create_snapshot(pb::CreateSnapshotRequest {
            project: String::new(),
            volume: "summed".into(),
            name: "summed-s1".into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    f.write_all_at(b"changed", 1 << 20).unwrap();
    f.sync_all().unwrap();
    assert_eq!(sum(&snap.uuid, true, "").await.unwrap(), r);
    let now = sum("summed", false, "").await.unwrap();
    assert_ne!(now.sha256, r.sha256);
    assert_eq!(now.sha256, sha256_of(std::path::Path::new(&v.device_path)));

    let code = |r: Result<pb::ChecksumVolumeResponse, tonic::Status>| r.unwrap_err().code();
    assert_eq!(code(sum("nope", false, "").await), Code::NotFound);
    assert_eq!(code(sum("summed", true, "").await), Code::NotFound);
    assert_eq!(
        code(sum("summed", false, "bad id!").await),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn image_bases_are_listed_and_never_removed_while_cloned() {
    const LABEL_SHA256: &str = "stratus.io/image-sha256";
    const LABEL_VM: &str = "stratus.io/vm";
    let s = Stack::start();
    let mut c = s.pdiskd.client().await;
    let sha = "3f5a9c1e00112233445566778899aabbccddeeff00112233445566778899aabb";
    let base = c
        .create_volume(pb::CreateVolumeRequest {
            name: "image-3f5a9c1e00112233".into(),
            size_bytes: 16 << 20,
            labels: [(LABEL_SHA256.to_string(), sha.to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // A guest's clone, labelled as the agent labels them.
    c.clone_volume(pb::CloneVolumeRequest {
        source: "image-3f5a9c1e00112233".into(),
        name: "vm-1-vda".into(),
        labels: [(LABEL_VM.to_string(), "vm1".to_string())].into(),
        ..Default::default()
    })
    .await
    .unwrap();
    create(&mut c, "unrelated", 8 << 20).await;

    let list = s.pdiskd.cli_json(&["image", "list"]);
    let images = list["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{list}");
    assert_eq!(images[0]["sha256"], sha);
    assert_eq!(images[0]["volume"], "image-3f5a9c1e00112233");
    assert_eq!(images[0]["volume_uuid"], base.uuid.as_str());
    assert_eq!(images[0]["clone_count"], 1);
    assert_eq!(images[0]["clones"], serde_json::json!(["vm-1-vda"]));
    let table = s.pdiskd.cli(&["image", "list"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success());
    assert!(text.starts_with("SHA256 "), "{text}");
    assert!(
        text.contains("3f5a9c1e00112233  image-3f5a9c1e00112233"),
        "{text}"
    );

    // Refused while the clone exists, with one line naming it.
    let out = s.pdiskd.cli(&["image", "rm", "3f5a9c1e"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim_end(),
        "pdisk: failed precondition: image 3f5a9c1e00112233 (volume image-3f5a9c1e00112233) \
         has 1 clone(s): vm-1-vda; delete them first"
    );
    let out = s.pdiskd.cli(&["--json", "image", "rm", sha]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["error"]["code"], "FailedPrecondition");
    assert_eq!(names(&mut c).await.len(), 3);
    // Not an image, or no match: NotFound.
    let out = s.pdiskd.cli(&["image", "rm", "unrelated"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    c.delete_volume(pb::DeleteVolumeRequest {
        now: false,
        project: String::new(),
        volume: "vm-1-vda".into(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    let out = s.pdiskd.cli_json(&["image", "rm", "3f5a9c1e"]);
    assert_eq!(out["deleted"], true);
    assert_eq!(out["volume"], "image-3f5a9c1e00112233");
    assert_eq!(names(&mut c).await, vec!["unrelated"]);
    assert_eq!(
        s.pdiskd.cli_json(&["image", "list"]),
        serde_json::json!({ "images": [] })
    );
}
