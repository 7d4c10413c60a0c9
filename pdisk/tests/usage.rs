//! Storage accounting on a real pdiskd (root: the harness's pool and
//! exporter; run by scripts/test's integration tier): projects' samples
//! every --usage-interval and after changes, with the bytes the test wrote
//! and the sizes it asked for, contiguous over time and durable across
//! kill -9; `pdisk usage` as StAR XML, CSV and JSON; a project sees only its
//! own records, and may not ask for another's; agents are refused.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use stratus_pki::identity::Role;
use stratus_pki::TlsFiles;
use stratus_proto::pdisk::v1 as pb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::*;
use tonic::transport::Channel;
use tonic::Code;

const MIB: u64 = 1 << 20;

async fn client(s: &Stack, files: &TlsFiles) -> VolumeServiceClient<Channel> {
    VolumeServiceClient::new(channel_as(&s.pdiskd.url(), files).await)
}

/// `pdisk ARGS` as the holder of `files`.
fn cli_as(s: &Stack, files: &TlsFiles, args: &[&str]) -> Output {
    Command::new(bin("pdisk"))
        .arg("--server")
        .arg(s.pdiskd.url())
        .args(cli_tls_args(files))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every record kept, without sampling now (until: far ahead).
async fn records(c: &mut VolumeServiceClient<Channel>) -> Vec<pb::StorageUsageRecord> {
    c.list_storage_usage(pb::ListStorageUsageRequest {
        until: 4_000_000_000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .records
}

fn of(records: &[pb::StorageUsageRecord], group: &str) -> Vec<pb::StorageUsageRecord> {
    records
        .iter()
        .filter(|r| r.group == group)
        .cloned()
        .collect()
}

/// The text of each `<sr:NAME>` element of each StAR record, and the
/// record id (a reader written from the StAR spec's element names).
fn star_records(doc: &str) -> Vec<BTreeMap<String, String>> {
    assert!(
        doc.contains("xmlns:sr=\"http://eu-emi.eu/namespaces/2011/02/storagerecord\""),
        "{doc}"
    );
    doc.split("<sr:StorageUsageRecord>")
        .skip(1)
        .map(|rec| {
            let rec = rec.split("</sr:StorageUsageRecord>").next().unwrap();
            let mut m = BTreeMap::new();
            let id = rec.split("sr:recordId=\"").nth(1).unwrap();
            m.insert("RecordId".into(), id[..id.find('"').unwrap()].to_owned());
            for part in rec.split("<sr:").skip(1) {
                if let Some((name, rest)) = part.split_once('>') {
                    if let Some((text, _)) = rest.split_once("</sr:") {
                        if !text.contains('<') {
                            m.insert(name.to_owned(), text.to_owned());
                        }
                    }
                }
            }
            m
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd): run by scripts/test"]
async fn projects_storage_is_accounted_over_time_and_each_sees_its_own() {
    require_root();
    let mut s = Stack::start_with(&[
        "--usage-interval",
        "1s",
        "--usage-site",
        "STRATUS-TEST",
        "--usage-service",
        "store1.test",
        "--quarantine-period",
        "1h",
    ]);
    let pki = TestPki::shared();
    let (astro, bio) = (
        pki.issue(Role::Project, "astro", None, &[]),
        pki.issue(Role::Project, "bio", None, &[]),
    );
    let agent = pki.issue(
        Role::Agent,
        "compute-1",
        Some("iqn.2026-11.io.stratus:c1"),
        &[],
    );
    let mut a = client(&s, &astro).await;
    let mut b = client(&s, &bio).await;
    let mut admin = s.pdiskd.client().await;

    let v = a
        .create_volume(pb::CreateVolumeRequest {
            name: "data".into(),
            size_bytes: 64 * MIB,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    b.create_volume(pb::CreateVolumeRequest {
        name: "data".into(),
        size_bytes: 32 * MIB,
        ..Default::default()
    })
    .await
    .unwrap();
    // 8 MiB written into astro's volume, through its device.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&v.device_path)
        .unwrap();
    f.write_all_at(&vec![0xa5; 8 * MIB as usize], 4 * MIB)
        .unwrap();
    f.sync_all().unwrap();
    drop(f);
    let written_at = unix_now();

    // Samples every second: astro's show the 8 MiB once taken after the
    // write, each covering the time since the one before.
    let deadline = Instant::now() + Duration::from_secs(30);
    let astro_recs = loop {
        let r = of(&records(&mut admin).await, "astro");
        if r.iter().filter(|r| r.start_time > written_at).count() >= 2 {
            break r;
        }
        assert!(Instant::now() < deadline, "no samples every second: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for w in astro_recs.windows(2) {
        assert_eq!(w[1].start_time, w[0].end_time, "contiguous: {w:?}");
    }
    let last = astro_recs.last().unwrap();
    assert_eq!(
        (last.volumes, last.snapshots, last.provisioned_bytes),
        (1, 0, 64 * MIB)
    );
    assert!(
        (8 * MIB..=12 * MIB).contains(&last.allocated_bytes),
        "allocated {} after 8 MiB written",
        last.allocated_bytes
    );
    assert_eq!(
        (
            last.site.as_str(),
            last.storage_system.as_str(),
            last.storage_media.as_str()
        ),
        ("STRATUS-TEST", "store1.test", "disk")
    );

    // A resize and a snapshot show in the next sample (taken after the change).
    a.resize_volume(pb::ResizeVolumeRequest {
        volume: "data".into(),
        size_bytes: 128 * MIB,
        project: String::new(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    a.create_snapshot(pb::CreateSnapshotRequest {
        volume: "data".into(),
        name: "data-s".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // The caller's own view, sampled now (until = 0).
    let now = a
        .list_storage_usage(pb::ListStorageUsageRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(now.iter().all(|r| r.group == "astro"), "{now:?}");
    let newest = now.last().unwrap();
    assert_eq!(
        (newest.volumes, newest.snapshots, newest.provisioned_bytes),
        (1, 1, 256 * MIB)
    );

    // Refused, with nothing sampled: bio naming astro, an agent.
    let before = records(&mut admin).await.len();
    let denied = b
        .list_storage_usage(pb::ListStorageUsageRequest {
            project: "astro".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = client(&s, &agent)
        .await
        .list_storage_usage(pb::ListStorageUsageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let out = cli_as(&s, &bio, &["usage", "--project", "astro"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("astro"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // (The 1 s sampler may have added its own meanwhile: at most a few.)
    assert!(records(&mut admin).await.len() < before + 8);

    // `pdisk usage` as bio: StAR XML of bio's records only.
    let doc = ok(cli_as(&s, &bio, &["usage"]));
    let star = star_records(&doc);
    assert!(!star.is_empty(), "{doc}");
    for r in &star {
        assert_eq!(r["Group"], "bio", "{doc}");
        assert_eq!(r["ResourceCapacityAllocated"], (32 * MIB).to_string());
        assert_eq!(r["Site"], "STRATUS-TEST");
        for k in [
            "StorageSystem",
            "StartTime",
            "EndTime",
            "ResourceCapacityUsed",
        ] {
            assert!(r.contains_key(k), "{k} is mandatory: {r:?}");
        }
    }
    let csv = ok(cli_as(&s, &bio, &["usage", "--format", "csv"]));
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with("record_id,create_time,"));
    assert!(lines.all(|l| l.contains(",bio,")), "{csv}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(cli_as(&s, &bio, &["--json", "usage"]))).unwrap();
    assert!(json.as_array().unwrap().iter().all(|r| r["group"] == "bio"));

    // Durable: pdiskd killed -9 and started again keeps every record, and
    // the seq goes on (no record id twice).
    let kept = records(&mut admin).await;
    s.pdiskd.kill9();
    s.pdiskd.restart();
    let mut admin = s.pdiskd.client().await;
    let mut a = client(&s, &astro).await;
    a.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot: "data-s".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    a.delete_volume(pb::DeleteVolumeRequest {
        volume: "data".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let after = admin
        .list_storage_usage(pb::ListStorageUsageRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    // The same records, made again for this reply (create_time aside).
    let timeless = |r: &[pb::StorageUsageRecord]| {
        r.iter()
            .map(|r| pb::StorageUsageRecord {
                create_time: 0,
                ..r.clone()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        timeless(&after[..kept.len()]),
        timeless(&kept),
        "records kept across kill -9"
    );
    let ids: std::collections::BTreeSet<&str> =
        after.iter().map(|r| r.record_id.as_str()).collect();
    assert_eq!(ids.len(), after.len());
    // astro's last record: no volume any more, but the deleted one waits
    // in quarantine (--quarantine-period 1h) and its 128 MiB are still held.
    let last = of(&after, "astro").pop().unwrap();
    assert_eq!(
        (last.volumes, last.snapshots, last.provisioned_bytes),
        (0, 0, 128 * MIB),
        "{last:?}"
    );
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
