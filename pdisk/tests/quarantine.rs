//! Quarantine before delete, on a real stack (an XFS reflink pool on a loop
//! device, tgtd, pdiskd and the `pdisk` CLI): a deleted volume is hidden
//! and restorable with its data whole; at its purge time (seconds here)
//! its data is destroyed and the pool's space comes back, also across a
//! restart; pdiskd killed at each step of a purge (`pdiskd-failpoints`:
//! `cargo build -p pdisk --features failpoints --bin pdiskd-failpoints`,
//! which scripts/test's integration tier does) finishes it at the next
//! start and says so. Run by scripts/test (needs root).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use pdisk::failpoints::{points_on, CRASH_EXIT_CODE, FILE_TGT};
use stratus_proto::pdisk::v1 as pb;
use testkit::*;

const MIB: u64 = 1 << 20;

/// Imports `mib` MiB of incompressible data as volume `name` (through a
/// file in pdiskd's import directory); returns the volume.
async fn import(c: &mut Client, pdiskd: &Pdiskd, name: &str, mib: u64) -> pb::Volume {
    let path = pdiskd.import_dir.join(format!("{name}.raw"));
    let mut data = vec![0u8; (mib * MIB) as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ name.len() as u64;
    for b in data.iter_mut() {
        // xorshift: cheap bytes no filesystem can compress or share.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&path, data).unwrap();
    let v = c
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            source: Some(pb::create_volume_request::Source::FromImage(
                pb::ImageSource {
                    path: path.display().to_string(),
                    format: pb::ImageFormat::Raw as i32,
                },
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    std::fs::remove_file(&path).unwrap();
    v
}

async fn checksum(c: &mut Client, volume: &str) -> String {
    c.checksum_volume(pb::ChecksumVolumeRequest {
        volume: volume.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .sha256
}

async fn listed(c: &mut Client, quarantined: bool) -> Vec<pb::Volume> {
    c.list_volumes(pb::ListVolumesRequest {
        quarantined,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .volumes
}

async fn pool(c: &mut Client) -> pb::Pool {
    c.get_pool(pb::GetPoolRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The journaled events of volume `uuid`: (type, name, detail).
async fn events_of(c: &mut Client, uuid: &str) -> Vec<(pb::PoolEventType, String, String)> {
    let mut s = c
        .watch_events(pb::WatchEventsRequest {
            volume: uuid.into(),
            no_follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = s.message().await.unwrap() {
        out.push((e.r#type(), e.volume_name, e.detail));
    }
    out
}

/// Waits until volume `uuid` is neither live nor in quarantine.
async fn wait_purged(c: &mut Client, uuid: &str, limit: Duration) {
    let started = Instant::now();
    loop {
        let mut all = listed(c, false).await;
        all.extend(listed(c, true).await);
        if !all.iter().any(|v| v.uuid == uuid) {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{uuid} not purged after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, tgtd and an XFS loop pool: run by scripts/test"]
async fn a_deleted_volume_is_hidden_restorable_and_whole_and_its_name_reusable() {
    let pool_dev = XfsPool::new(512);
    let tgtd = Tgtd::start(pool_dev.dir.path());
    // pdiskd's own default period (24h): the harness's 0 is overridden.
    let pdiskd = Pdiskd::start_with(&pool_dev, &tgtd, &["--quarantine-period", "24h"]);
    let mut c = pdiskd.client().await;
    let v = import(&mut c, &pdiskd, "db", 16).await;
    let sum = checksum(&mut c, "db").await;

    let out = pdiskd.cli_json(&["volume", "delete", "db"]);
    assert_eq!(out["quarantined"], true, "{out}");
    let purge_at = out["purge_at"].as_str().unwrap().to_owned();
    let left = humantime::parse_rfc3339(&purge_at)
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left > Duration::from_secs(23 * 3600), "{left:?}");
    // Hidden from Get and List, kept in the pool, listed in quarantine.
    let s = c
        .get_volume(pb::GetVolumeRequest {
            volume: v.uuid.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::NotFound);
    assert!(listed(&mut c, false).await.is_empty());
    assert!(Path::new(&v.device_path).exists());
    let q = pdiskd.cli_json(&["volume", "list", "--quarantined"]);
    let q = q["volumes"].as_array().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0]["uuid"], v.uuid.as_str());
    assert_eq!(q[0]["state"], "quarantined");
    assert_eq!(q[0]["purge_at"], purge_at.as_str());
    let p = pool(&mut c).await;
    assert_eq!((p.volume_count, p.quarantined_count), (0, 1));
    assert_eq!(p.quarantined_bytes, 16 * MIB);
    let human = pdiskd.cli(&["volume", "list", "--quarantined"]);
    assert!(human.status.success());
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("PURGE AT") && human.contains(&purge_at),
        "{human}"
    );

    // The name is free: a new "db" takes it; restoring into it is refused
    // and asks for --as; under a new name the data is whole.
    let newer = import(&mut c, &pdiskd, "db", 1).await;
    let refused = pdiskd.cli(&["--json", "volume", "restore", "db"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--as"), "{err}");
    assert_eq!(
        listed(&mut c, true).await.len(),
        1,
        "a refused restore changed nothing"
    );
    let back = pdiskd.cli_json(&["volume", "restore", &v.uuid, "--as", "db-restored"]);
    assert_eq!(back["name"], "db-restored");
    assert_eq!(back["state"], "ready");
    assert_eq!(back["uuid"], v.uuid.as_str());
    assert_eq!(checksum(&mut c, "db-restored").await, sum);
    assert!(listed(&mut c, true).await.is_empty());
    let mut names: Vec<String> = listed(&mut c, false)
        .await
        .into_iter()
        .map(|v| v.name)
        .collect();
    names.sort();
    assert_eq!(names, ["db", "db-restored"]);
    assert_ne!(newer.uuid, v.uuid);
    // A restored volume is a whole volume again: exported and read back.
    c.export_volume(pb::ExportVolumeRequest {
        volume: "db-restored".into(),
        initiators: vec![INITIATOR.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    use pb::PoolEventType as T;
    let kinds: Vec<_> = events_of(&mut c, &v.uuid)
        .await
        .into_iter()
        .filter(|k| k.0 != T::ImportProgress)
        .collect();
    assert_eq!(
        kinds.iter().map(|k| k.0).collect::<Vec<_>>(),
        [
            T::ImportFinished,
            T::VolumeQuarantined,
            T::VolumeRestored,
            T::ExportAdded
        ]
    );
    assert_eq!(kinds[1].2, format!("purge at {purge_at}"));
    let restored = kinds.iter().find(|k| k.0 == T::VolumeRestored).unwrap();
    assert_eq!(
        (restored.1.as_str(), restored.2.as_str()),
        ("db-restored", "deleted as db")
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, tgtd and an XFS loop pool: run by scripts/test"]
async fn at_the_purge_time_the_data_goes_and_the_space_comes_back_across_a_restart() {
    let pool_dev = XfsPool::new(512);
    let tgtd = Tgtd::start(pool_dev.dir.path());
    let mut pdiskd = Pdiskd::start_with(&pool_dev, &tgtd, &["--quarantine-period", "4s"]);
    let mut c = pdiskd.client().await;
    let v = import(&mut c, &pdiskd, "scratch", 64).await;
    let blocks = std::fs::metadata(&v.device_path).unwrap().blocks() * 512;
    assert!(blocks >= 64 * MIB, "{blocks} bytes allocated");
    let used_before = pool(&mut c).await.used_bytes;

    let deleted = c
        .delete_volume(pb::DeleteVolumeRequest {
            volume: "scratch".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!deleted.purge_at.is_empty());
    let deleted_at = Instant::now();
    // A restart (kill -9) forgets nothing: the purge time is in the store.
    pdiskd.restart();
    let mut c = pdiskd.client().await;
    assert_eq!(listed(&mut c, true).await.len(), 1);
    assert!(Path::new(&v.device_path).exists(), "purged before its time");
    wait_purged(&mut c, &v.uuid, Duration::from_secs(60)).await;
    assert!(
        deleted_at.elapsed() >= Duration::from_secs(3),
        "purged after {:?}, before its 4 s",
        deleted_at.elapsed()
    );
    assert!(!Path::new(&v.device_path).exists());
    let p = pool(&mut c).await;
    assert_eq!((p.quarantined_count, p.quarantined_bytes), (0, 0));
    assert!(
        p.used_bytes + 48 * MIB <= used_before,
        "the pool's used bytes went from {used_before} to {}: its 64 MiB were not given back",
        p.used_bytes
    );
    let events = events_of(&mut c, &v.uuid).await;
    let last = events.last().unwrap();
    assert_eq!(last.0, pb::PoolEventType::VolumeDeleted);
    assert!(last.2.contains("quarantine ended"), "{last:?}");
    let s = c
        .restore_volume(pb::RestoreVolumeRequest {
            volume: v.uuid.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::NotFound);
    // An admin's --now skips quarantine altogether.
    let w = import(&mut c, &pdiskd, "now", 4).await;
    let out = pdiskd.cli_json(&["volume", "delete", "now", "--now"]);
    assert_eq!(
        (out["quarantined"].as_bool(), out["purge_at"].as_str()),
        (Some(false), Some(""))
    );
    assert!(!Path::new(&w.device_path).exists());
}

/// pdiskd killed at each crash point of a purge finishes the purge at its
/// next start, reports it, and leaves nothing behind.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, tgtd, an XFS loop pool and pdiskd-failpoints: run by scripts/test"]
async fn a_purge_killed_at_any_step_is_finished_at_the_next_start() {
    let pool_dev = XfsPool::new(512);
    let tgtd = Tgtd::start(pool_dev.dir.path());
    let mut pdiskd =
        Pdiskd::start_failpoints_with(&pool_dev, &tgtd, &["--quarantine-period", "2s"]);
    let points = points_on("purge", FILE_TGT);
    assert_eq!(points.len(), 3);
    let mut c = pdiskd.client().await;
    let kept = import(&mut c, &pdiskd, "kept", 2).await;
    let kept_sum = checksum(&mut c, "kept").await;
    for (i, point) in points.iter().enumerate() {
        let name = format!("doomed-{i}");
        let mut c = pdiskd.client().await;
        let v = import(&mut c, &pdiskd, &name, 8).await;
        drop(c);
        // Armed before the delete, so the crash comes from the purge task
        // of a daemon that is up, 2 s after the delete.
        pdiskd.restart_with_failpoints(Some(&format!("{point}=return")));
        let mut c = pdiskd.client().await;
        let r = c
            .delete_volume(pb::DeleteVolumeRequest {
                volume: name.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.purge_at.is_empty());
        drop(c);
        let status = pdiskd.wait_exit(Duration::from_secs(30));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(CRASH_EXIT_CODE),
            "the purge never reached {point}:\n{}",
            pdiskd.log_text()
        );
        let log_before = pdiskd.log_text().len();
        pdiskd.restart_with_failpoints(None);
        let mut c = pdiskd.client().await;
        let mut all = listed(&mut c, false).await;
        all.extend(listed(&mut c, true).await);
        assert!(
            !all.iter().any(|x| x.uuid == v.uuid),
            "{point}: {name} still there: {all:?}"
        );
        assert!(!Path::new(&v.device_path).exists(), "{point}: data left");
        let log = pdiskd.log_text();
        assert!(
            log[log_before..].contains(&format!(
                "finished the interrupted purge of quarantined volume {name}"
            )),
            "{point}: reconciliation did not report the purge:\n{}",
            &log[log_before..]
        );
        let events = events_of(&mut c, &v.uuid).await;
        let last = events.last().unwrap();
        assert_eq!(last.0, pb::PoolEventType::VolumeDeleted, "{point}");
        assert_eq!(last.2, "an interrupted purge finished at start", "{point}");
        let p = pool(&mut c).await;
        assert!(p.drift.is_empty(), "{point}: {:?}", p.drift);
        // Nothing else was touched.
        let files: Vec<_> = std::fs::read_dir(pdiskd.pool_dir.join("volumes"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, [format!("{}.raw", kept.uuid)], "{point}");
        assert_eq!(checksum(&mut c, "kept").await, kept_sum, "{point}");
    }
}
