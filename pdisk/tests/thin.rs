//! What only an LVM thin pool does: pool usage, the threshold refusal,
//! snapshot chains, and deletes that give blocks back by discard. Runs in the
//! lab VM (`scripts/lab`, `STRATUS_STACK=lvm-lio`); on other stacks each test
//! says it was skipped and returns.

use std::os::unix::fs::FileExt;

use stratus_proto::pdisk::v1 as pb;
use testkit::*;
use tonic::Code;

const MIB: u64 = 1 << 20;

fn lab() -> bool {
    let yes = stack_kind() == StackKind::LvmLio;
    if !yes {
        eprintln!("skipped: thin-pool tests run on the lvm-lio stack (scripts/lab)");
    }
    yes
}

fn thin(s: &Stack) -> &ThinPool {
    match &s.pool {
        Pool::Thin(p) => p,
        Pool::Xfs(_) => unreachable!("lvm-lio stack"),
    }
}

async fn create(c: &mut Client, name: &str, size: u64) -> Result<pb::Volume, tonic::Status> {
    c.create_volume(pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

async fn pool(c: &mut Client) -> pb::Pool {
    c.get_pool(pb::GetPoolRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Writes `mib` MiB of `byte` at the start of a volume's LV and syncs.
fn fill(v: &pb::Volume, mib: u64, byte: u8) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&v.device_path)
        .unwrap();
    let chunk = vec![byte; MIB as usize];
    for i in 0..mib {
        f.write_all_at(&chunk, i * MIB).unwrap();
    }
    f.sync_all().unwrap();
}

fn first_byte(v: &pb::Volume) -> u8 {
    let mut b = [0u8; 512];
    std::fs::File::open(&v.device_path)
        .unwrap()
        .read_exact_at(&mut b, 0)
        .unwrap();
    b[0]
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the lab VM (LVM thin): run by scripts/lab"]
async fn pool_usage_follows_writes_and_matches_lvm() {
    if !lab() {
        return;
    }
    let s = Stack::start();
    let mut c = s.pdiskd.client().await;
    let before = pool(&mut c).await;
    assert_eq!(before.backend, "lvm");
    assert!(before.data_percent.is_some() && before.metadata_percent.is_some());
    assert_eq!(before.thin_threshold_percent, Some(90.0));
    let v = create(&mut c, "u", 512 * MIB).await.unwrap();
    fill(&v, 256, 0x5a);
    let after = pool(&mut c).await;
    // 256 MiB of a 4 GiB pool: about 6 points more, as lvs says.
    let grew = after.data_percent.unwrap() - before.data_percent.unwrap();
    assert!((5.0..8.0).contains(&grew), "{before:?} -> {after:?}");
    let (data, meta) = thin(&s).percent_used();
    assert!(
        (after.data_percent.unwrap() - data).abs() < 1.0,
        "{after:?} vs lvs {data}"
    );
    assert!(
        (after.metadata_percent.unwrap() - meta).abs() < 1.0,
        "{after:?} vs lvs {meta}"
    );
    assert!(
        after.used_bytes >= before.used_bytes + 200 * MIB,
        "{after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the lab VM (LVM thin): run by scripts/lab"]
async fn past_the_threshold_growth_is_refused_and_nothing_changes() {
    if !lab() {
        return;
    }
    // 400 MiB of a 1 GiB pool is past a 30% threshold (metadata, a few
    // percent, is not).
    let s = Stack::start_sized(1024, &["--thin-threshold", "30"]);
    let mut c = s.pdiskd.client().await;
    let big = create(&mut c, "big", 1024 * MIB).await.unwrap();
    create(&mut c, "small", 64 * MIB).await.unwrap();
    fill(&big, 400, 0x11);
    let objects = s.backing_objects();

    let e = create(&mut c, "more", 64 * MIB).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("30%"), "{e:?}");
    let e = c
        .create_snapshot(pb::CreateSnapshotRequest {
            project: String::new(),
            volume: "small".into(),
            name: "small-s".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = c
        .clone_volume(pb::CloneVolumeRequest {
            source: "small".into(),
            name: "small-c".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = c
        .resize_volume(pb::ResizeVolumeRequest {
            project: String::new(),
            volume: "small".into(),
            size_bytes: 128 * MIB,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(s.backing_objects(), objects, "a refusal changed the pool");

    // Deleting the full volume gives its blocks back (thin discard), and
    // creating works again.
    c.delete_volume(pb::DeleteVolumeRequest {
        now: false,
        project: String::new(),
        volume: "big".into(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    let p = pool(&mut c).await;
    assert!(p.data_percent.unwrap() < 3.0, "{p:?}");
    create(&mut c, "more", 64 * MIB).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the lab VM (LVM thin): run by scripts/lab"]
async fn snapshots_of_clones_of_snapshots_keep_every_generation() {
    if !lab() {
        return;
    }
    let s = Stack::start();
    let mut c = s.pdiskd.client().await;
    let v = create(&mut c, "gen0", 64 * MIB).await.unwrap();
    fill(&v, 4, 0xa0);
    let mut source = "gen0".to_string();
    let mut clones = Vec::new();
    for g in 1..=3u8 {
        let snap = format!("gen{}-s", g - 1);
        c.create_snapshot(pb::CreateSnapshotRequest {
            project: String::new(),
            volume: source.clone(),
            name: snap.clone(),
            request_id: String::new(),
        })
        .await
        .unwrap();
        let clone = c
            .clone_volume(pb::CloneVolumeRequest {
                source: snap,
                source_is_snapshot: true,
                name: format!("gen{g}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Each generation starts with its parent's data, then diverges.
        assert_eq!(first_byte(&clone), 0xa0 + g - 1);
        fill(&clone, 4, 0xa0 + g);
        source = clone.name.clone();
        clones.push(clone);
    }
    assert_eq!(first_byte(&v), 0xa0);
    for (i, cl) in clones.iter().enumerate() {
        assert_eq!(first_byte(cl), 0xa1 + i as u8);
    }
    // Seven thin LVs (4 volumes, 3 snapshots) sharing blocks: the pool
    // holds about 16 MiB of data, not four 64 MiB volumes.
    let p = pool(&mut c).await;
    assert!(p.allocated_bytes < 40 * MIB, "{p:?}");
    assert_eq!(s.backing_objects().len(), 7, "{:?}", s.backing_objects());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the lab VM (LVM thin): run by scripts/lab"]
async fn foreign_lvs_in_the_pool_are_reported_and_left_alone() {
    if !lab() {
        return;
    }
    let mut s = Stack::start();
    let mut c = s.pdiskd.client().await;
    create(&mut c, "mine", 16 * MIB).await.unwrap();
    let stray = s.add_stray_object();
    s.pdiskd.restart();
    let mut c = s.pdiskd.client().await;
    let p = pool(&mut c).await;
    assert!(
        p.drift.iter().any(|d| d.object.contains(&stray)),
        "{:?}",
        p.drift
    );
    assert_eq!(p.volume_count, 1);
    assert!(s.stray_exists());
    // Tags tell ours from theirs.
    let lvs = thin(&s).lvs();
    assert!(
        lvs.iter()
            .any(|l| l.starts_with("stray") && !l.contains("stratus")),
        "{lvs:?}"
    );
    assert_eq!(
        lvs.iter().filter(|l| l.contains("stratus")).count(),
        1,
        "{lvs:?}"
    );
}

async fn quarantined(c: &mut Client) -> Vec<pb::Volume> {
    c.list_volumes(pb::ListVolumesRequest {
        quarantined: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .volumes
}

async fn delete(c: &mut Client, volume: &str) -> pb::DeleteVolumeResponse {
    c.delete_volume(pb::DeleteVolumeRequest {
        volume: volume.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// The thin LVs of pdiskd's in the test's pool (tagged `stratus`).
fn our_lvs(s: &Stack) -> Vec<String> {
    thin(s)
        .lvs()
        .into_iter()
        .filter(|l| l.contains("stratus"))
        .collect()
}

/// Quarantine on LVM thin (issue 19): a deleted volume keeps its LV and its
/// blocks, is listed in quarantine and restorable with its data; at its
/// purge time (seconds here) the LV goes and the pool's data use drops back,
/// as GetPool and `lvs` both say.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the lab VM (LVM thin): run by scripts/lab"]
async fn a_quarantined_volume_keeps_its_blocks_until_the_purge_gives_them_back() {
    if !lab() {
        return;
    }
    const PERIOD: std::time::Duration = std::time::Duration::from_secs(15);
    let s = Stack::start_with(&["--quarantine-period", "15s"]);
    let mut c = s.pdiskd.client().await;
    let empty = pool(&mut c).await;
    let v = create(&mut c, "q", 512 * MIB).await.unwrap();
    fill(&v, 256, 0x5a);
    let full = pool(&mut c).await;
    // 256 MiB of a 4 GiB pool: about 6 points.
    let grew = full.data_percent.unwrap() - empty.data_percent.unwrap();
    assert!((5.0..8.0).contains(&grew), "{empty:?} -> {full:?}");
    assert_eq!(our_lvs(&s).len(), 1, "{:?}", thin(&s).lvs());

    // Deleted: hidden, listed in quarantine, and still holding its LV and
    // blocks (nothing moves in the pool).
    let d = delete(&mut c, "q").await;
    assert!(!d.purge_at.is_empty(), "{d:?}");
    let q = quarantined(&mut c).await;
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(
        (q[0].uuid.as_str(), q[0].purge_at.as_str()),
        (v.uuid.as_str(), d.purge_at.as_str())
    );
    let held = pool(&mut c).await;
    assert_eq!(
        (held.volume_count, held.quarantined_count),
        (0, 1),
        "{held:?}"
    );
    assert!(
        (held.data_percent.unwrap() - full.data_percent.unwrap()).abs() < 1.0,
        "quarantine gave blocks back early: {full:?} -> {held:?}"
    );
    assert_eq!(our_lvs(&s).len(), 1, "{:?}", thin(&s).lvs());
    // Restorable with its data.
    let back = c
        .restore_volume(pb::RestoreVolumeRequest {
            volume: v.uuid.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (back.name.as_str(), back.uuid.as_str()),
        ("q", v.uuid.as_str())
    );
    assert_eq!(first_byte(&back), 0x5a);
    assert!(quarantined(&mut c).await.is_empty());

    // Deleted again and left to its purge time: the LV goes and the pool's
    // data use drops by what the volume held.
    let d = delete(&mut c, "q").await;
    let deleted_at = std::time::Instant::now();
    assert!(!d.purge_at.is_empty(), "{d:?}");
    loop {
        if quarantined(&mut c).await.is_empty() {
            break;
        }
        assert!(
            deleted_at.elapsed() < PERIOD + std::time::Duration::from_secs(120),
            "not purged {:?} after the delete",
            deleted_at.elapsed()
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(
        deleted_at.elapsed() >= PERIOD - std::time::Duration::from_secs(2),
        "purged after {:?}, before its 15 s",
        deleted_at.elapsed()
    );
    assert!(our_lvs(&s).is_empty(), "{:?}", thin(&s).lvs());
    let purged = pool(&mut c).await;
    assert_eq!((purged.volume_count, purged.quarantined_count), (0, 0));
    let dropped = full.data_percent.unwrap() - purged.data_percent.unwrap();
    assert!(
        dropped > grew - 1.0,
        "the purge gave back {dropped} points of {grew}: {full:?} -> {purged:?}"
    );
    let (data, _) = thin(&s).percent_used();
    assert!(
        (purged.data_percent.unwrap() - data).abs() < 1.0,
        "{purged:?} vs lvs {data}"
    );
    assert!(
        data < empty.data_percent.unwrap() + 1.0,
        "lvs says {data}% after the purge"
    );
}
