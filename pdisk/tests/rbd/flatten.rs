//! The rbd backend's flattens (part of `pdisk/tests/rbd.rs`, sharing its
//! cluster): deep clone chains flattened in the background, a flatten on
//! request, one killed mid-way, and one that fails (VOLUME_FLATTEN_FAILED,
//! then the retry's VOLUME_FLATTENED).

use super::*;

/// Waits until volume `name` is no longer marked for a background flatten.
async fn wait_flattened(c: &mut Client, name: &str, limit: Duration) -> pb::Volume {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let v = get(c, name).await;
        if !v.flatten_pending {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} still not flattened after {limit:?}: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many VOLUME_FLATTENED events volume `uuid` has.
async fn flattened_events(c: &mut Client, uuid: &str) -> usize {
    let mut s = c
        .watch_events(pb::WatchEventsRequest {
            volume: uuid.into(),
            no_follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(e) = s.message().await.unwrap() {
        n += usize::from(e.r#type() == pb::PoolEventType::VolumeFlattened);
    }
    n
}

/// The children of process `pid` whose command line has the word `word`.
fn children_of(pid: u32, word: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // "PID (COMM) STATE PPID ...": COMM may hold spaces; PPID follows ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let has = cmdline.split(|b| *b == 0).any(|a| a == word.as_bytes());
        if ppid == Some(pid) && has {
            out.push(child);
        }
    }
    out
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
    // The third clone in the chain is published at once and flattened in
    // the background; then VOLUME_FLATTENED, and it is flat.
    let c3 = wait_flattened(&mut c, "c3", Duration::from_secs(300)).await;
    assert_eq!((c3.flatten_done_bytes, c3.flatten_total_bytes), (0, 0));
    assert_eq!(
        parent(&imgs[2]),
        None,
        "the third clone in the chain is flat"
    );
    assert!(flattened_events(&mut c, &c3.uuid).await == 1);
    for name in ["c1", "c2"] {
        let v = get(&mut c, name).await;
        assert!(!v.flatten_pending, "{name} is within the depth: {v:?}");
    }
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
async fn flatten_frees_a_clones_parent_and_keeps_its_data() {
    let t = RbdPdisk::start("pd-flat");
    let mut c = t.pdiskd.client().await;
    let v = create(&mut c, "origin", 16 * MIB).await;
    t.write(&RbdPdisk::image(&v), 0x71, 0, 2 * MIB);
    snapshot(&mut c, "origin", "s1").await.unwrap();
    let cl = clone_snapshot(&mut c, "s1", "child", 0).await.unwrap();
    let cl_img = RbdPdisk::image(&cl);
    t.write(&cl_img, 0x72, MIB, MIB);
    assert_eq!(
        delete_snapshot(&mut c, "s1").await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // An agent may not flatten (its guests' disks are not its to rewrite).
    let pki = TestPki::shared();
    let mut agent = stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient::new(
        channel_as(&t.pdiskd.url(), &pki.agent()).await,
    );
    let e = agent
        .flatten_volume(pb::FlattenVolumeRequest {
            volume: "child".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(t.rbd_json(&["info", &format!("pd-flat/{cl_img}")])["parent"].is_object());

    // The CLI, as an admin: the clone no longer has a parent, its data
    // (the parent's and its own) is all there, and the snapshot can go.
    let j = t.pdiskd.cli_json(&["volume", "flatten", "child"]);
    assert_eq!(j["name"], "child", "{j}");
    let info = t.rbd_json(&["info", &format!("pd-flat/{cl_img}")]);
    assert!(info["parent"].is_null(), "{info}");
    assert!(t.holds(&cl_img, 0x71, 0, MIB));
    assert!(t.holds(&cl_img, 0x72, MIB, MIB));
    delete_snapshot(&mut c, "s1").await.unwrap();
    // Flattening what has no parent changes nothing and succeeds.
    let again = c
        .flatten_volume(pb::FlattenVolumeRequest {
            volume: "child".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.uuid, cl.uuid);
    assert!(t.holds(&cl_img, 0x72, MIB, MIB));
}

/// A background flatten survives a kill -9 of pdiskd while it runs (and of
/// its `rbd flatten`, as systemd kills the unit's whole cgroup): the clone
/// was usable at once, its `flatten_pending` mark is in the store, and the
/// restarted pdiskd flattens it, clears the mark and journals
/// VOLUME_FLATTENED; the data (the parents' and its own) is all there.
/// A delete of a clone waiting its turn is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and ceph (scripts/test)"]
async fn a_background_flatten_killed_midway_resumes_at_start() {
    let mut t = RbdPdisk::start("pd-fcrash");
    // 1 MiB objects (order 20), copied one at a time: the flatten lasts
    // long enough to be caught (a Get costs an `rbd du`, about a second).
    for (key, value) in [
        ("rbd_concurrent_management_ops", "1"),
        ("rbd_default_order", "20"),
    ] {
        t.ceph
            .ceph(&["config", "set", "client.pd-fcrash", key, value]);
    }
    let mut c = t.pdiskd.client().await;
    // max clone depth 2: c0 <- c1 <- c2 are layered, c3 is too deep.
    let c0 = create(&mut c, "c0", 160 * MIB).await;
    t.write(&RbdPdisk::image(&c0), 0x21, 0, 160 * MIB);
    let mut prev = "c0".to_string();
    for i in 1..=3 {
        snapshot(&mut c, &prev, &format!("s{i}")).await.unwrap();
        clone_snapshot(&mut c, &format!("s{i}"), &format!("c{i}"), 0)
            .await
            .unwrap();
        prev = format!("c{i}");
    }
    // Caught while it runs (progress shown; polled at once, as the task
    // starts as soon as the clone is committed), then killed.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut seen = None;
    while std::time::Instant::now() < deadline {
        let v = get(&mut c, "c3").await;
        if !v.flatten_pending {
            break;
        }
        if v.flatten_total_bytes > 0 {
            seen = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let running = seen.expect("the background flatten was seen running");
    assert_eq!(running.flatten_total_bytes, 160 * MIB);
    let img = RbdPdisk::image(&running);
    let cli = t.pdiskd.cli_json(&["volume", "show", "c3"]);
    assert!(cli["flatten"].is_object(), "{cli}");
    // systemd kills the unit's cgroup: pdiskd's rbd child goes too.
    let children = children_of(t.pdiskd.pid(), "flatten");
    t.pdiskd.kill9();
    for pid in children {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    // Usable meanwhile: readable (the parents' data) and writable.
    t.write(&img, 0x43, 0, MIB);
    let parent_at_restart =
        t.rbd_json(&["info", &format!("pd-fcrash/{img}")])["parent"].is_object();
    eprintln!(
        "killed at {} of {} bytes; parent still there at restart: {parent_at_restart}",
        running.flatten_done_bytes, running.flatten_total_bytes
    );
    t.pdiskd.restart();
    let mut c = t.pdiskd.client().await;
    let v = wait_flattened(&mut c, "c3", Duration::from_secs(300)).await;
    assert_eq!(v.state, pb::VolumeState::Ready as i32);
    let info = t.rbd_json(&["info", &format!("pd-fcrash/{img}")]);
    assert!(info["parent"].is_null(), "{info}");
    assert_eq!(flattened_events(&mut c, &v.uuid).await, 1);
    assert!(t.holds(&img, 0x43, 0, MIB), "its own write");
    assert!(t.holds(&img, 0x21, MIB, 159 * MIB), "the parents' data");
    // Flat: the snapshot it was cloned from can go.
    delete_snapshot(&mut c, "s3").await.unwrap();

    // A deep clone deleted while its flatten waits or runs: the delete
    // succeeds (waiting for a running flatten), and nothing is left.
    snapshot(&mut c, "c2", "s4").await.unwrap();
    let c4 = clone_snapshot(&mut c, "s4", "c4", 0).await.unwrap();
    assert!(c4.flatten_pending, "{c4:?}");
    delete_volume(&mut c, "c4").await.unwrap();
    delete_snapshot(&mut c, "s4").await.unwrap();
    let left = t.ceph.rbd(&["ls", "pd-fcrash"]);
    assert!(!left.contains(&RbdPdisk::image(&c4)), "{left}");
    assert!(!left.contains("pd-tmp-"), "{left}");
}

/// The events of volume `uuid` so far, as (type, detail), in seq order.
async fn events_of(c: &mut Client, uuid: &str) -> Vec<(pb::PoolEventType, String)> {
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
        out.push((e.r#type(), e.detail));
    }
    out
}

/// A background flatten that fails for real journals VOLUME_FLATTEN_FAILED
/// with the error, keeps its mark, and its retry (60 s later) ends in
/// VOLUME_FLATTENED. The failure: pdiskd's cephx user may still change
/// the images' metadata (so the deep clone is made) but no longer write
/// data objects, which the flatten's copy-ups do (EPERM). The retry's
/// image holds its parents' data: the failed copy-ups left no object
/// marked in an object map that the retry would skip (the flatten runs
/// with the map off; `rbd object-map rebuild` did not clear such marks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and ceph (scripts/test)"]
async fn a_failed_background_flatten_is_journaled_and_retried() {
    let pool = "pd-fflat";
    let t = RbdPdisk::start(pool);
    let mut c = t.pdiskd.client().await;
    let c0 = create(&mut c, "c0", 8 * MIB).await;
    t.write(&RbdPdisk::image(&c0), 0x3c, 0, 8 * MIB);
    for i in 1..=2 {
        let prev = format!("c{}", i - 1);
        snapshot(&mut c, &prev, &format!("s{i}")).await.unwrap();
        clone_snapshot(&mut c, &format!("s{i}"), &format!("c{i}"), 0)
            .await
            .unwrap();
    }
    snapshot(&mut c, "c2", "s3").await.unwrap();
    let user = format!("client.{pool}");
    let meta_only = [
        "rbd_header.",
        "rbd_id.",
        "rbd_directory",
        "rbd_children",
        "rbd_object_map",
        "rbd_info",
        "rbd_trash",
    ]
    .iter()
    .map(|p| format!(", allow rwx pool={pool} object_prefix {p}"))
    .collect::<String>();
    let osd = format!("allow r class-read pool={pool}{meta_only}");
    t.ceph.ceph(&[
        "auth",
        "caps",
        &user,
        "mon",
        "profile rbd",
        "osd",
        &osd,
        "mgr",
        &format!("profile rbd pool={pool}"),
    ]);
    // Depth 3 > 2: published at once, its flatten fails.
    let c3 = clone_snapshot(&mut c, "s3", "c3", 0).await.unwrap();
    assert!(c3.flatten_pending, "{c3:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let failed = loop {
        let evs = events_of(&mut c, &c3.uuid).await;
        let failed: Vec<String> = evs
            .into_iter()
            .filter(|(t, _)| *t == pb::PoolEventType::VolumeFlattenFailed)
            .map(|(_, d)| d)
            .collect();
        if !failed.is_empty() {
            break failed;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no VOLUME_FLATTEN_FAILED after 60 s:\n{}",
            t.pdiskd.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0].contains("Operation not permitted") && failed[0].contains("retried"),
        "the event carries the error: {failed:?}"
    );
    let v = get(&mut c, "c3").await;
    assert!(v.flatten_pending, "the mark stays: {v:?}");
    assert_eq!(v.state, pb::VolumeState::Ready as i32);
    // Its caps back: the retry flattens it.
    t.ceph.ceph(&[
        "auth",
        "caps",
        &user,
        "mon",
        "profile rbd",
        "osd",
        &format!("profile rbd pool={pool}"),
        "mgr",
        &format!("profile rbd pool={pool}"),
    ]);
    let v = wait_flattened(&mut c, "c3", Duration::from_secs(150)).await;
    let kinds: Vec<pb::PoolEventType> = events_of(&mut c, &v.uuid)
        .await
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| {
            matches!(
                t,
                pb::PoolEventType::VolumeFlattenFailed | pb::PoolEventType::VolumeFlattened
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            pb::PoolEventType::VolumeFlattenFailed,
            pb::PoolEventType::VolumeFlattened
        ],
        "one failed attempt, then the retry's success"
    );
    let img = RbdPdisk::image(&v);
    let info = t.rbd_json(&["info", &format!("{pool}/{img}")]);
    assert!(info["parent"].is_null(), "{info}");
    assert!(t.holds(&img, 0x3c, 0, 8 * MIB), "the parents' data");
}
