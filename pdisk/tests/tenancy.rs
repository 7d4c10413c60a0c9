//! Projects on a real pdiskd with real certificates from stratus-pki: a
//! project cannot see or touch another project's volumes (NotFound, and
//! nothing changes), a tenant cannot set stratus.io/ labels, a quota holds
//! against twenty concurrent clients and for streamed uploads, and every
//! mutating call leaves one audit line without secrets. Needs root (the
//! harness's XFS pool and tgtd); run by scripts/test.

use std::collections::HashMap;
use std::time::Duration;

use stratus_pki::identity::Role;
use stratus_pki::TlsFiles;
use stratus_proto::pdisk::v1 as pb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::*;
use tonic::transport::Channel;
use tonic::Code;

async fn client(s: &Stack, files: &TlsFiles) -> VolumeServiceClient<Channel> {
    VolumeServiceClient::new(channel_as(&s.pdiskd.url(), files).await)
}

/// Everything a refused call must leave as it was, as the admin sees it.
async fn pool_state(admin: &mut VolumeServiceClient<Channel>) -> String {
    let mut vols: Vec<_> = admin
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| {
            (
                v.name,
                v.size_bytes,
                v.project,
                v.exported,
                v.snapshot_count,
            )
        })
        .collect();
    vols.sort();
    let snaps = admin
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .len();
    let exports = admin
        .list_exports(pb::ListExportsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .exports
        .len();
    format!("{vols:?} snapshots={snaps} exports={exports}")
}

/// The audit file's records once it holds at least `n` (the writer syncs
/// in batches of its own).
fn audit_records(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= n {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    lines
}

#[tokio::test]
#[ignore = "needs root: run by scripts/test"]
async fn a_project_cannot_see_or_touch_another_projects_volumes_and_each_try_is_audited() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let s = Stack::start_with(&["--audit-log", audit.to_str().unwrap()]);
    let pki = TestPki::shared();
    let (astro, bio) = (
        pki.issue(Role::Project, "astro", None, &[]),
        pki.issue(Role::Project, "bio", None, &[]),
    );
    let mut bio_c = client(&s, &bio).await;
    let v = bio_c
        .create_volume(pb::CreateVolumeRequest {
            name: "bio-data".into(),
            size_bytes: 8 << 20,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.project.as_str(), v.created_by.as_str()),
        ("bio", "project/bio")
    );
    bio_c
        .create_snapshot(pb::CreateSnapshotRequest {
            volume: "bio-data".into(),
            name: "bio-snap".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut admin = client(&s, &pki.admin()).await;
    let before = pool_state(&mut admin).await;

    let mut c = client(&s, &astro).await;
    let secret = "NoLog-Q7x-9kZ2";
    let nf = |r: Result<Code, tonic::Status>, what: &str| {
        let code = r.unwrap_or_else(|s| s.code());
        assert_eq!(code, Code::NotFound, "{what}");
    };
    let get = c
        .get_volume(pb::GetVolumeRequest {
            volume: "bio-data".into(),
            project: String::new(),
        })
        .await
        .map(|_| Code::Ok);
    nf(get, "get");
    let export = c
        .export_volume(pb::ExportVolumeRequest {
            migration: false,
            host_id: String::new(),
            multi_attach: false,
            volume: "bio-data".into(),
            initiators: vec!["iqn.2026-11.io.stratus:thief".into()],
            chap: Some(pb::ChapCredentials {
                user: "thief".into(),
                secret: secret.into(),
                target: None,
            }),
            project: String::new(),
            request_id: String::new(),
        })
        .await
        .map(|_| Code::Ok);
    nf(export, "export");
    let snap = c
        .create_snapshot(pb::CreateSnapshotRequest {
            volume: "bio-data".into(),
            name: "stolen-snap".into(),
            ..Default::default()
        })
        .await
        .map(|_| Code::Ok);
    nf(snap, "snapshot");
    for (source, is_snap) in [("bio-data", false), ("bio-snap", true)] {
        let clone = c
            .clone_volume(pb::CloneVolumeRequest {
                source: source.into(),
                source_is_snapshot: is_snap,
                name: "stolen".into(),
                ..Default::default()
            })
            .await
            .map(|_| Code::Ok);
        nf(clone, "clone");
    }
    let delete = c
        .delete_volume(pb::DeleteVolumeRequest {
            now: false,
            volume: v.uuid.clone(),
            project: String::new(),
            request_id: String::new(),
        })
        .await
        .map(|_| Code::Ok);
    nf(delete, "delete by uuid");
    let sum = c
        .checksum_volume(pb::ChecksumVolumeRequest {
            volume: "bio-data".into(),
            ..Default::default()
        })
        .await
        .map(|_| Code::Ok);
    nf(sum, "checksum");
    // Listings show nothing of bio's.
    let listed = c
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert!(listed.is_empty(), "{listed:?}");
    let snaps = c
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert!(snaps.is_empty(), "{snaps:?}");
    // Naming bio's project outright is not allowed either.
    let err = c
        .list_volumes(pb::ListVolumesRequest {
            project: "bio".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A tenant cannot set stratus.io/ labels (forge an image base).
    let err = c
        .create_volume(pb::CreateVolumeRequest {
            name: "image-forged".into(),
            size_bytes: 8 << 20,
            labels: HashMap::from([("stratus.io/image-sha256".into(), "ab".repeat(32))]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(
        pool_state(&mut admin).await,
        before,
        "a refusal changed something"
    );

    // One audit line per mutating call (2 of bio's, 6 refused of astro's),
    // none for reads, and no secret anywhere.
    let records = audit_records(&audit, 8);
    let astro_lines: Vec<_> = records
        .iter()
        .filter(|r| r["caller"] == "project/astro")
        .collect();
    assert_eq!(astro_lines.len(), 6, "{records:#?}");
    let delete = astro_lines
        .iter()
        .find(|r| r["rpc"] == "pdisk.v1.VolumeService/DeleteVolume")
        .unwrap();
    assert_eq!(delete["outcome"], "NotFound");
    assert_eq!(delete["project"], "astro");
    assert_eq!(delete["role"], "project");
    assert_eq!(delete["object"], format!("volume {}", v.uuid));
    assert!(delete["duration_ms"].as_f64().is_some());
    let create = records
        .iter()
        .find(|r| r["caller"] == "project/bio")
        .unwrap();
    assert_eq!(
        (&create["rpc"], &create["outcome"], &create["object"]),
        (
            &"pdisk.v1.VolumeService/CreateVolume".into(),
            &"Ok".into(),
            &"volume bio-data".into()
        )
    );
    assert!(records
        .iter()
        .all(|r| r["rpc"] != "pdisk.v1.VolumeService/ListVolumes"));
    let file = std::fs::read_to_string(&audit).unwrap();
    assert!(
        !file.contains(secret),
        "a CHAP secret reached the audit file"
    );
    assert!(
        !s.pdiskd.log_text().contains(secret),
        "a CHAP secret reached the log"
    );
    assert!(
        s.pdiskd.log_text().contains("audit"),
        "audit records are logged too"
    );
}

#[tokio::test]
#[ignore = "needs root: run by scripts/test"]
async fn a_quota_holds_against_twenty_concurrent_clients() {
    require_root();
    let s = Stack::start();
    let pki = TestPki::shared();
    let out = s
        .pdiskd
        .cli_json(&["quota", "set", "gamma", "--volumes", "5", "--bytes", "1G"]);
    assert_eq!(out["limits"]["volumes"], 5);
    assert_eq!(out["limits"]["bytes"], 1u64 << 30);
    let gamma = pki.issue(Role::Project, "gamma", None, &[]);
    let url = s.pdiskd.url();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (url, files) = (url.clone(), gamma.clone());
            tokio::spawn(async move {
                // Each client on its own connection.
                let mut c = VolumeServiceClient::new(channel_as(&url, &files).await);
                c.create_volume(pb::CreateVolumeRequest {
                    name: format!("q{i}"),
                    size_bytes: 16 << 20,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|s| (s.code(), s.message().to_owned()))
            })
        })
        .collect();
    let mut made = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => made += 1,
            Err((code, msg)) => {
                assert_eq!(code, Code::ResourceExhausted, "{msg}");
                assert!(
                    msg.contains("project gamma: volume quota reached (5 of 5 volumes)"),
                    "{msg}"
                );
            }
        }
    }
    assert_eq!(made, 5);
    // Exactly five, all ready, and the pool holds exactly their data.
    let mut admin = client(&s, &pki.admin()).await;
    let vols = admin
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(vols.len(), 5);
    assert!(vols
        .iter()
        .all(|v| v.state == pb::VolumeState::Ready as i32 && v.project == "gamma"));
    let files = std::fs::read_dir(s.pdiskd.pool_dir.join("volumes")).map(|d| d.count());
    if let Ok(n) = files {
        assert_eq!(n, 5, "data files in the pool");
    }
    let shown = s.pdiskd.cli_json(&["quota", "show", "gamma"]);
    assert_eq!(shown["usage"]["volumes"], 5);
    assert_eq!(shown["usage"]["bytes"], 5u64 * (16 << 20));
    let listed = s.pdiskd.cli_json(&["quota", "list"]);
    assert_eq!(listed["quotas"][0]["project"], "gamma");
}

/// An UploadVolume of `chunks` MiB of raw data (non-zero, so it is
/// written), announcing `content_length`.
async fn upload(
    c: &mut VolumeServiceClient<Channel>,
    name: &str,
    content_length: u64,
    chunks: usize,
) -> Result<pb::Volume, tonic::Status> {
    use pb::upload_volume_request::Part;
    let header = pb::UploadVolumeRequest {
        part: Some(Part::Header(pb::UploadHeader {
            name: name.into(),
            format: pb::ImageFormat::Raw as i32,
            content_length,
            ..Default::default()
        })),
    };
    let data = (0..chunks).map(|_| pb::UploadVolumeRequest {
        part: Some(Part::Data(vec![0xa5; 1 << 20])),
    });
    let msgs: Vec<_> = std::iter::once(header).chain(data).collect();
    c.upload_volume(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
#[ignore = "needs root: run by scripts/test"]
async fn the_byte_quota_holds_for_streamed_uploads() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let s = Stack::start_with(&["--audit-log", audit.to_str().unwrap()]);
    let pki = TestPki::shared();
    s.pdiskd
        .cli_json(&["quota", "set", "delta", "--bytes", "8M"]);
    let delta = pki.issue(Role::Project, "delta", None, &[]);
    let mut c = client(&s, &delta).await;
    let staged = || {
        std::fs::read_dir(s.pdiskd.pool_dir.join("staging"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    // Announced larger than the room: refused before any data is taken.
    let err = upload(&mut c, "big", 16 << 20, 16).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("upload of big")
            && err.message().contains("project delta: byte quota exceeded"),
        "refused before the data, by the upload's own check: {err:?}"
    );
    // Announced as unknown (0): refused once the stream passes the room.
    let err = upload(&mut c, "sneaky", 0, 24).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("more than 8M streamed"), "{err:?}");
    // Within the room it works, and then the room is what is left.
    let v = upload(&mut c, "small", 6 << 20, 6).await.unwrap();
    assert_eq!((v.project.as_str(), v.size_bytes), ("delta", 6 << 20));
    let err = upload(&mut c, "more", 0, 4).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Nothing of the refused uploads stayed: one volume, no staged file.
    let mut admin = client(&s, &pki.admin()).await;
    let names: Vec<String> = admin
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, vec!["small".to_string()]);
    wait_for("staged uploads removed", Duration::from_secs(10), || {
        (staged() == 0).then_some(())
    });
    let shown = s.pdiskd.cli_json(&["quota", "show", "delta"]);
    assert_eq!(shown["usage"]["bytes"], 6u64 << 20);
    // Each upload (a client stream) is audited once, with its outcome.
    let uploads: Vec<(String, String, String)> = audit_records(&audit, 5)
        .into_iter()
        .filter(|r| r["rpc"] == "pdisk.v1.VolumeService/UploadVolume")
        .map(|r| {
            (
                r["object"].as_str().unwrap().to_owned(),
                r["project"].as_str().unwrap().to_owned(),
                r["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = [
        ("big", "ResourceExhausted"),
        ("sneaky", "ResourceExhausted"),
        ("small", "Ok"),
        ("more", "ResourceExhausted"),
    ]
    .map(|(v, o)| (format!("volume {v}"), "delta".to_string(), o.to_string()));
    assert_eq!(uploads, want);
}
