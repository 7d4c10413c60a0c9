//! pdiskd's `/metrics` after real operations on a real stack (root: an XFS
//! pool on a loop device and tgtd, run by scripts/test's integration tier):
//! the pool's figures, the operation and RPC histograms count exactly what
//! the test did.

use std::os::unix::fs::FileExt;

use stratus_proto::pdisk::v1 as pb;
use testkit::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd): run by scripts/test"]
async fn metrics_count_what_the_test_did() {
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = Stack::start_with(&["--metrics-listen", &addr.to_string()]);
    let mut c = s.pdiskd.client().await;

    // Before anything: an empty pool, the exporter up.
    let m = scrape(addr).await;
    assert_eq!(m.value("stratus_pdisk_volumes", &[]), 0.0);
    assert_eq!(m.value("stratus_pdisk_exporter_up", &[]), 1.0);
    assert_eq!(m.value("stratus_pdisk_drift", &[]), 0.0);
    assert!(m.value("stratus_pdisk_pool_capacity_bytes", &[]) > 0.0);

    // 3 empty volumes of 64 MiB, one refused duplicate, one snapshot, one
    // clone of it, one import of a 4 MiB image with 1 MiB of data, one export.
    for name in ["m1", "m2", "m3"] {
        c.create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            size_bytes: 64 << 20,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let dup = c
        .create_volume(pb::CreateVolumeRequest {
            name: "m1".into(),
            size_bytes: 64 << 20,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    c.create_snapshot(pb::CreateSnapshotRequest {
        project: String::new(),
        volume: "m1".into(),
        name: "m1-s".into(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    c.clone_volume(pb::CloneVolumeRequest {
        source: "m1-s".into(),
        source_is_snapshot: true,
        name: "m1-c".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let raw = s.pdiskd.import_dir.join("img.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(&vec![0xc3; 1 << 20], 0).unwrap();
    drop(f);
    c.create_volume(pb::CreateVolumeRequest {
        name: "imported".into(),
        size_bytes: 64 << 20,
        source: Some(pb::create_volume_request::Source::FromImage(
            pb::ImageSource {
                path: raw.display().to_string(),
                format: 0,
            },
        )),
        ..Default::default()
    })
    .await
    .unwrap();
    c.export_volume(pb::ExportVolumeRequest {
        migration: false,
        host_id: String::new(),
        multi_attach: false,
        project: String::new(),
        volume: "m2".into(),
        initiators: vec![INITIATOR.into()],
        chap: None,
        request_id: String::new(),
    })
    .await
    .unwrap();

    let m = scrape(addr).await;
    assert_eq!(
        m.value("stratus_pdisk_volumes", &[]),
        5.0,
        "m1-3, clone, import"
    );
    assert_eq!(m.value("stratus_pdisk_snapshots", &[]), 1.0);
    assert_eq!(m.value("stratus_pdisk_exports", &[]), 1.0);
    assert_eq!(m.value("stratus_pdisk_exports_broken", &[]), 0.0);
    assert_eq!(
        m.value("stratus_pdisk_pool_provisioned_bytes", &[]),
        (6 * (64u64 << 20)) as f64,
        "5 volumes and a snapshot of 64 MiB"
    );
    let ops = |op: &str, outcome: &str| {
        m.get(
            "stratus_pdisk_operation_duration_seconds_count",
            &[("operation", op), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(ops("create", "ok"), 3.0);
    assert_eq!(ops("create", "error"), 1.0, "the duplicate");
    assert_eq!(ops("snapshot", "ok"), 1.0);
    assert_eq!(ops("clone", "ok"), 1.0);
    assert_eq!(ops("import", "ok"), 1.0);
    assert_eq!(ops("export", "ok"), 1.0);
    assert_eq!(
        m.value("stratus_pdisk_import_bytes_total", &[]),
        (1u64 << 20) as f64,
        "the image's allocated bytes"
    );
    assert!(m.value("stratus_pdisk_last_import_bytes_per_second", &[]) > 0.0);
    let rpc = |method: &str, code: &str| {
        m.value(
            "stratus_rpc_duration_seconds_count",
            &[
                ("service", "pdisk.v1.VolumeService"),
                ("method", method),
                ("code", code),
            ],
        )
    };
    assert_eq!(rpc("CreateVolume", "Ok"), 4.0, "3 empty + 1 import");
    assert_eq!(rpc("CreateVolume", "AlreadyExists"), 1.0);
    assert_eq!(rpc("CloneVolume", "Ok"), 1.0);
    assert_eq!(rpc("CreateSnapshot", "Ok"), 1.0);
    assert_eq!(rpc("ExportVolume", "Ok"), 1.0);
    // Histogram buckets are cumulative and end with +Inf = count.
    assert_eq!(
        m.value(
            "stratus_rpc_duration_seconds_bucket",
            &[("method", "CreateVolume"), ("code", "Ok"), ("le", "+Inf")],
        ),
        4.0
    );
    // Thin figures only on thin pools.
    if stack_kind() == StackKind::FileTgt {
        assert_eq!(m.get("stratus_pdisk_thin_data_percent", &[]), None);
    }
}
