//! Unit tests of the rbd backend: exact argv and timeouts through a
//! scripted runner, answers laid out as rbd/ceph 16.2.15 (Debian 12) printed
//! them on the test micro-cluster (testkit's CephCluster). No cluster here;
//! `pdisk/tests/rbd.rs` runs the backend on a real one.

use super::cli::rbd_progress;
use super::*;
use crate::backend::lvm::tests::Script;
use crate::backend::no_progress;
use crate::error::ErrorKind;
use crate::runner::Output;

const VOL: &str = "3f2b8c1e-5d4a-4b7e-9c21-0a6f1e2d3c4b";
const SNAP: &str = "9a1c7e55-02d4-4f0b-8e6a-c3b2d1f0e9a8";
const CLONE: &str = "c0ffee00-1234-4abc-8def-0123456789ab";

fn uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

const CLI: &str =
    "--conf /etc/ceph/ceph.conf --id pdisk --keyring /etc/ceph/ceph.client.pdisk.keyring";

fn settings(staging: &Path) -> RbdSettings {
    RbdSettings {
        pool: CephName::new("pool", "stratus").unwrap(),
        data_pool: None,
        ceph_conf: "/etc/ceph/ceph.conf".into(),
        ceph_id: CephName::new("id", "pdisk").unwrap(),
        keyring: Some("/etc/ceph/ceph.client.pdisk.keyring".into()),
        client_id: CephName::new("client", "compute").unwrap(),
        max_clone_depth: 2,
        staging_dir: staging.to_path_buf(),
    }
}

/// `rbd ls -l --format json stratus` with volume VOL (64 MiB), its snapshot
/// SNAP, a clone CLONE of it, a temporary, and a foreign image.
fn ls_json() -> String {
    format!(
        r#"[{{"image":"pd-tmp-vol-{CLONE}","id":"1","size":67108864,"format":2}},{{"image":"pd-vol-{CLONE}","id":"1022dec2418f","size":67108864,"parent":{{"pool":"stratus","pool_namespace":"","image":"pd-vol-{VOL}","snapshot":"pd-snap-{SNAP}"}},"format":2}},{{"image":"pd-vol-{VOL}","id":"101ccd640dee","size":67108864,"format":2}},{{"image":"pd-vol-{VOL}","id":"101ccd640dee","snapshot":"pd-snap-{SNAP}","snapshot_id":4,"size":67108864,"format":2,"protected":"false"}},{{"image":"backup","id":"99","size":1048576,"format":2}}]"#
    )
}

fn du_json() -> String {
    format!(
        r#"{{"images":[{{"name":"pd-vol-{CLONE}","id":"1022dec2418f","provisioned_size":67108864,"used_size":4194304}},{{"name":"pd-vol-{VOL}","id":"101ccd640dee","snapshot":"pd-snap-{SNAP}","snapshot_id":4,"provisioned_size":67108864,"used_size":8388608}},{{"name":"pd-vol-{VOL}","id":"101ccd640dee","provisioned_size":67108864,"used_size":12582912}}],"total_provisioned_size":201326592,"total_used_size":25165824}}"#
    )
}

/// `ceph mon dump --format json` of a cluster with monitors a (v2 and v1)
/// and b (v2 only).
const MON_DUMP_JSON: &str = r#"{"epoch":1,"fsid":"69d8ee26-508c-4088-b3a4-b2c4a29d107d","min_mon_release":16,"mons":[{"rank":0,"name":"a","public_addrs":{"addrvec":[{"type":"v2","addr":"10.0.0.7:3300","nonce":0},{"type":"v1","addr":"10.0.0.7:6789","nonce":0}]},"addr":"10.0.0.7:6789/0"},{"rank":1,"name":"b","public_addrs":{"addrvec":[{"type":"v2","addr":"10.0.0.8:3300","nonce":0}]},"addr":"10.0.0.8:3300/0"}],"quorum":[0,1]}"#;

const DF_JSON: &str = r#"{"stats":{"total_bytes":1073741824,"total_avail_bytes":1073714684,"total_used_bytes":27140,"total_used_raw_bytes":27140,"total_used_raw_ratio":2.5e-05,"num_osds":1,"num_per_pool_osds":0,"num_per_pool_omap_osds":0},"stats_by_class":{},"pools":[{"name":"device_health_metrics","id":1,"stats":{"stored":0,"objects":0,"kb_used":0,"bytes_used":0,"percent_used":0,"max_avail":1020027072}},{"name":"stratus","id":2,"stats":{"stored":25165824,"objects":9,"kb_used":24576,"bytes_used":25165824,"percent_used":0.02,"max_avail":1020027072}}]}"#;

/// A cluster answering like the one above; `children` is what `rbd
/// children` prints; every change succeeds.
fn cluster(children: &'static str) -> Arc<Script> {
    Script::new(move |argv| cluster_answer(children, argv))
}

/// What the cluster of [`cluster`] answers to `argv`.
fn cluster_answer(children: &'static str, argv: &[String]) -> Output {
    {
        let has = |a: &str| argv.iter().any(|x| x == a);
        match argv[0].as_str() {
            "ceph" if has("mon") => Output::ok(MON_DUMP_JSON),
            "ceph" => Output::ok(DF_JSON),
            "rbd" if has("ls") && has("-l") => Output::ok(ls_json()),
            "rbd" if has("du") => Output::ok(du_json()),
            "rbd" if has("children") => Output::ok(children),
            "rbd" if has("snap") && has("ls") => Output::ok(format!(
                r#"[{{"id":4,"name":"pd-snap-{SNAP}","size":67108864,"protected":"false","timestamp":"Thu Dec  3 17:26:36 2026"}}]"#
            )),
            "rbd" if has("info") => {
                let target = argv.iter().find(|a| a.starts_with("stratus/")).unwrap();
                if target.contains(CLONE) {
                    Output::ok(format!(
                        r#"{{"name":"x","size":67108864,"parent":{{"pool":"stratus","pool_namespace":"","image":"pd-vol-{VOL}","id":"1","snapshot":"s","trash":false,"overlap":67108864}},"features":["layering","exclusive-lock","object-map","fast-diff","deep-flatten"]}}"#
                    ))
                } else {
                    Output::ok(r#"{"name":"x","size":67108864,"format":2}"#)
                }
            }
            _ => Output::ok(""),
        }
    }
}

async fn open(runner: Arc<Script>, dir: &Path) -> RbdBackend {
    let b = RbdBackend::open(runner.clone(), settings(dir))
        .await
        .unwrap();
    runner.clear();
    b
}

fn rbd(rest: &str) -> String {
    format!("rbd {CLI} {rest}")
}

#[test]
fn ceph_names_and_paths_are_validated() {
    for ok in ["stratus", "rbd-ec.data", "a_1"] {
        CephName::new("pool", ok).unwrap();
    }
    for bad in ["", "-rf", ".x", "a/b", "a b", "a:b", "a@b"] {
        assert_eq!(
            CephName::new("pool", bad).unwrap_err().kind(),
            ErrorKind::InvalidArgument,
            "{bad:?}"
        );
    }
    check_path_for_rbd("conf", Path::new("/etc/ceph/ceph.conf")).unwrap();
    for bad in ["ceph.conf", "/etc/ceph:x", "/a,b", "/a=b"] {
        assert!(check_path_for_rbd("conf", Path::new(bad)).is_err(), "{bad}");
    }
    // Only the canonical spelling of a UUID names an object of ours.
    assert_eq!(
        parse_suffix(&format!("pd-vol-{VOL}"), VOL_PREFIX),
        Some(uuid(VOL))
    );
    assert_eq!(
        parse_suffix(&format!("pd-vol-{}", VOL.to_uppercase()), VOL_PREFIX),
        None
    );
    assert_eq!(parse_suffix("pd-vol-x", VOL_PREFIX), None);
}

/// The room checks and listings of a burst of calls share one `ceph df`
/// (a Python program) within USAGE_MAX_AGE; an older figure is read again.
#[tokio::test]
async fn usage_checks_and_listings_share_a_recent_ceph_df() {
    let dir = tempfile::tempdir().unwrap();
    let r = cluster("[]");
    let b = open(r.clone(), dir.path()).await;
    let df = format!("ceph {CLI} df --format json");
    let dfs = |r: &Script| r.lines().iter().filter(|l| **l == df).count();
    let first = b.usage().await.unwrap();
    assert_eq!(first.used, 25165824);
    assert_eq!(b.usage().await.unwrap(), first);
    assert_eq!(b.list().await.unwrap().usage, first);
    assert_eq!(dfs(&r), 1, "two checks and a listing in a row, one ceph df");
    // Older than USAGE_MAX_AGE: read again, by a listing as by a check.
    let old = || std::time::Instant::now() - USAGE_MAX_AGE - std::time::Duration::from_millis(1);
    b.usage.lock().unwrap().as_mut().unwrap().0 = old();
    b.list().await.unwrap();
    assert_eq!(dfs(&r), 2);
    b.usage.lock().unwrap().as_mut().unwrap().0 = old();
    b.usage().await.unwrap();
    assert_eq!(dfs(&r), 3);
}

#[tokio::test]
async fn list_reports_volumes_snapshots_allocation_usage_and_foreign_images() {
    let dir = tempfile::tempdir().unwrap();
    let r = cluster("[]");
    let b = open(r.clone(), dir.path()).await;
    let l = b.list().await.unwrap();
    let mut want = vec![
        ObjectId::Volume(uuid(VOL)),
        ObjectId::Volume(uuid(CLONE)),
        ObjectId::Snapshot(uuid(SNAP)),
    ];
    want.sort();
    assert_eq!(l.objects, want);
    assert_eq!(l.foreign, vec!["stratus/backup".to_string()]);
    assert_eq!(l.allocated[&ObjectId::Volume(uuid(VOL))], 12 << 20);
    assert_eq!(l.allocated[&ObjectId::Snapshot(uuid(SNAP))], 8 << 20);
    assert_eq!(l.allocated[&ObjectId::Volume(uuid(CLONE))], 4 << 20);
    assert_eq!(l.usage.used, 25165824);
    assert_eq!(l.usage.capacity, 25165824 + 1020027072);
    assert_eq!(
        r.lines(),
        vec![
            rbd("ls -l stratus --format json"),
            rbd("du --pool stratus --format json"),
            format!("ceph {CLI} df --format json"),
        ]
    );
}

#[tokio::test]
async fn create_builds_under_a_temporary_tags_and_renames() {
    let dir = tempfile::tempdir().unwrap();
    let r = cluster("[]");
    let b = open(r.clone(), dir.path()).await;
    b.create(ObjectId::Volume(uuid(VOL)), (64 << 20) + 1)
        .await
        .unwrap();
    assert_eq!(
        r.lines(),
        vec![
            rbd(&format!("create --size 65M stratus/pd-tmp-vol-{VOL}")),
            rbd(&format!(
                "image-meta set stratus/pd-tmp-vol-{VOL} stratus.pdisk.object volume {VOL}"
            )),
            rbd(&format!(
                "rename stratus/pd-tmp-vol-{VOL} stratus/pd-vol-{VOL}"
            )),
        ]
    );
}

#[tokio::test]
async fn snapshot_clone_and_their_deletes_run_exactly_these_commands() {
    let dir = tempfile::tempdir().unwrap();
    let r = cluster("[]");
    let b = open(r.clone(), dir.path()).await;
    let (vol, snap, clone) = (uuid(VOL), uuid(SNAP), uuid(CLONE));
    b.snapshot(ObjectId::Volume(vol), snap, no_progress())
        .await
        .unwrap();
    b.clone_object(ObjectId::Snapshot(snap), clone, 64 << 20, no_progress())
        .await
        .unwrap();
    let s = format!("stratus/pd-vol-{VOL}@pd-snap-{SNAP}");
    let tmp = format!("stratus/pd-tmp-vol-{CLONE}");
    assert_eq!(
        r.lines(),
        vec![
            rbd(&format!("snap create {s}")),
            // The clone, its size, tag, rename (its depth is the
            // service's question afterwards: wants_flatten).
            rbd(&format!("clone {s} {tmp}")),
            rbd(&format!("info {tmp} --format json")),
            rbd(&format!(
                "image-meta set {tmp} stratus.pdisk.object volume {CLONE}"
            )),
            rbd(&format!("rename {tmp} stratus/pd-vol-{CLONE}")),
        ]
    );
    r.clear();
    b.delete(ObjectId::Snapshot(snap)).await.unwrap();
    assert_eq!(
        r.lines(),
        vec![
            rbd(&format!("children {s} --format json")),
            rbd(&format!("snap ls stratus/pd-vol-{VOL} --format json")),
            rbd(&format!("snap rm {s}")),
        ]
    );
    // Gone from the map: a second delete looks it up, and the listing
    // (this script's) still shows it, so it is deleted again: idempotent.
    r.clear();
    b.delete(ObjectId::Volume(vol)).await.unwrap();
    assert_eq!(
        r.lines(),
        vec![
            rbd(&format!("rm stratus/pd-tmp-vol-{VOL}")),
            // No pd-base among its snapshots: not an image base.
            rbd(&format!("snap ls stratus/pd-vol-{VOL} --format json")),
            rbd(&format!("rm stratus/pd-vol-{VOL}")),
        ]
    );
}

#[tokio::test]
async fn a_snapshot_with_clones_is_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let r = cluster(
        r#"[{"pool":"stratus","pool_namespace":"","image":"pd-vol-c0ffee00-1234-4abc-8def-0123456789ab"}]"#,
    );
    let b = open(r.clone(), dir.path()).await;
    let e = b.delete(ObjectId::Snapshot(uuid(SNAP))).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(
        e.message().contains(&format!("stratus/pd-vol-{CLONE}")),
        "{e}"
    );
    assert!(e.message().contains("flatten"), "{e}");
    assert!(
        !r.lines().iter().any(|l| l.contains("snap rm")),
        "{:?}",
        r.lines()
    );
}

#[tokio::test]
async fn a_clone_past_the_maximum_depth_is_published_layered_and_wants_a_flatten() {
    let dir = tempfile::tempdir().unwrap();
    let new = Uuid::new_v4();
    // SNAP belongs to CLONE here, whose parent is VOL: a clone of SNAP has
    // depth 2, so with max_clone_depth 1 it is flattened.
    let runner = Script::new(move |argv| {
        let has = |a: &str| argv.iter().any(|x| x == a);
        if has("mon") {
            return Output::ok(MON_DUMP_JSON);
        }
        if has("ls") {
            return Output::ok(format!(
                r#"[{{"image":"pd-vol-{CLONE}","size":1,"snapshot":"pd-snap-{SNAP}"}}]"#
            ));
        }
        if has("info") && argv.iter().any(|a| a.contains(CLONE)) {
            return Output::ok(format!(
                r#"{{"size":67108864,"parent":{{"pool":"stratus","image":"pd-vol-{VOL}"}}}}"#
            ));
        }
        if has("info") && argv.iter().any(|a| a == &format!("stratus/pd-vol-{new}")) {
            return Output::ok(format!(
                r#"{{"size":134217728,"parent":{{"pool":"stratus","image":"pd-vol-{CLONE}"}}}}"#
            ));
        }
        if has("info") {
            return Output::ok(r#"{"size":67108864}"#);
        }
        Output::ok("")
    });
    let mut s = settings(dir.path());
    s.max_clone_depth = 1;
    let b = RbdBackend::open(runner.clone(), s).await.unwrap();
    runner.clear();
    b.clone_object(
        ObjectId::Snapshot(uuid(SNAP)),
        new,
        128 << 20,
        no_progress(),
    )
    .await
    .unwrap();
    let tmp = format!("stratus/pd-tmp-vol-{new}");
    let lines = runner.lines();
    assert!(
        !lines.iter().any(|l| l.contains(" flatten ")),
        "the service flattens it in the background: {lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("rename")), "{lines:?}");
    assert!(
        lines.contains(&rbd(&format!("resize --size 128M {tmp}"))),
        "{lines:?}"
    );
    // Its depth (CLONE's parent VOL, then CLONE, then it: 2) passes 1.
    assert!(b.wants_flatten(ObjectId::Volume(new)).await.unwrap());
    // Within the depth: no flatten wanted; a snapshot never.
    let mut s = settings(dir.path());
    s.max_clone_depth = 2;
    let b = RbdBackend::open(runner.clone(), s).await.unwrap();
    assert!(!b.wants_flatten(ObjectId::Volume(new)).await.unwrap());
    assert!(!b
        .wants_flatten(ObjectId::Snapshot(uuid(SNAP)))
        .await
        .unwrap());
}

#[tokio::test]
async fn clones_need_protection_only_when_the_cluster_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let t = tries.clone();
    let runner = Script::new(move |argv| {
        let has = |a: &str| argv.iter().any(|x| x == a);
        if has("mon") {
            return Output::ok(MON_DUMP_JSON);
        }
        if has("ls") {
            return Output::ok(format!(
                r#"[{{"image":"pd-vol-{VOL}","size":1,"snapshot":"pd-snap-{SNAP}"}}]"#
            ));
        }
        if has("clone") && t.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            return Output::failed(
                22,
                "2026-12-03T17:26:36.000+0000 7f librbd::image::CloneRequest: 0x1 validate_parent: parent snapshot must be protected\nrbd: clone error: (22) Invalid argument\n",
            );
        }
        if has("info") {
            return Output::ok(r#"{"size":67108864}"#);
        }
        Output::ok("")
    });
    let b = RbdBackend::open(runner.clone(), settings(dir.path()))
        .await
        .unwrap();
    runner.clear();
    b.clone_object(
        ObjectId::Snapshot(uuid(SNAP)),
        uuid(CLONE),
        1,
        no_progress(),
    )
    .await
    .unwrap();
    let s = format!("stratus/pd-vol-{VOL}@pd-snap-{SNAP}");
    let lines = runner.lines();
    let clone = rbd(&format!("clone {s} stratus/pd-tmp-vol-{CLONE}"));
    assert_eq!(
        lines.iter().filter(|l| **l == clone).count(),
        2,
        "{lines:?}"
    );
    assert!(lines.contains(&rbd(&format!("snap protect {s}"))));
}

/// Two clones of one snapshot at once on a cluster that wants protected
/// parents: the second's `snap protect` finds it protected already (EBUSY),
/// which is no failure; its clone is retried and made.
#[tokio::test]
async fn a_snapshot_protected_meanwhile_by_another_clone_is_no_failure() {
    let dir = tempfile::tempdir().unwrap();
    let tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let t = tries.clone();
    let runner = Script::new(move |argv| {
        let has = |a: &str| argv.iter().any(|x| x == a);
        if has("mon") {
            return Output::ok(MON_DUMP_JSON);
        }
        if has("ls") {
            return Output::ok(format!(
                r#"[{{"image":"pd-vol-{VOL}","size":1,"snapshot":"pd-snap-{SNAP}"}}]"#
            ));
        }
        if has("clone") && t.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            return Output::failed(
                22,
                "librbd::image::CloneRequest: 0x1 validate_parent: parent snapshot must be protected\nrbd: clone error: (22) Invalid argument\n",
            );
        }
        if has("protect") {
            return Output::failed(
                16,
                "librbd::Operations: snap is already protected\nrbd: protecting snap failed: (16) Device or resource busy\n",
            );
        }
        if has("info") {
            return Output::ok(r#"{"size":67108864}"#);
        }
        Output::ok("")
    });
    let b = RbdBackend::open(runner.clone(), settings(dir.path()))
        .await
        .unwrap();
    runner.clear();
    b.clone_object(
        ObjectId::Snapshot(uuid(SNAP)),
        uuid(CLONE),
        1,
        no_progress(),
    )
    .await
    .unwrap();
    let lines = runner.lines();
    let publish = rbd(&format!(
        "rename stratus/pd-tmp-vol-{CLONE} stratus/pd-vol-{CLONE}"
    ));
    assert!(lines.contains(&publish), "{lines:?}");
    assert_eq!(tries.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn failures_keep_their_kind_and_stderr_and_remove_the_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let runner = Script::new(|argv| {
        let has = |a: &str| argv.iter().any(|x| x == a);
        if has("mon") {
            return Output::ok(MON_DUMP_JSON);
        }
        if has("ls") {
            return Output::ok("");
        }
        if has("image-meta") {
            return Output::failed(
                1,
                "rbd: failed to set metadata: (28) No space left on device\n",
            );
        }
        Output::ok("")
    });
    let b = RbdBackend::open(runner.clone(), settings(dir.path()))
        .await
        .unwrap();
    runner.clear();
    let e = b
        .create(ObjectId::Volume(uuid(VOL)), 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    assert!(e.message().contains("No space left"), "{e}");
    assert_eq!(
        runner.lines().last().unwrap(),
        &rbd(&format!("rm stratus/pd-tmp-vol-{VOL}"))
    );
    // Resizing down is refused before anything changes.
    let r = cluster("[]");
    let b = open(r.clone(), dir.path()).await;
    let e = b
        .resize(ObjectId::Volume(uuid(VOL)), 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(!r.lines().iter().any(|l| l.contains("resize")));
}

#[tokio::test]
async fn calls_name_the_user_and_keyring_never_a_key_with_timeouts_by_kind() {
    let dir = tempfile::tempdir().unwrap();
    let r = cluster("[]");
    let b = open(r.clone(), dir.path()).await;
    b.create(ObjectId::Volume(uuid(VOL)), 1 << 20)
        .await
        .unwrap();
    b.list().await.unwrap();
    b.delete(ObjectId::Volume(uuid(VOL))).await.unwrap();
    for l in r.lines() {
        assert!(l.contains("--id pdisk --keyring /etc/ceph/"), "{l}");
        assert!(!l.contains("key="), "{l}");
    }
    let t = r.timeouts();
    for (line, (_, timeout)) in r.lines().iter().zip(&t) {
        let want = if line.contains(" rm ") {
            DATA_TIMEOUT
        } else if line.contains("--format json") {
            REPORT_TIMEOUT
        } else {
            CHANGE_TIMEOUT
        };
        assert_eq!(*timeout, want, "{line}");
    }
}

#[tokio::test]
async fn native_access_names_monitors_image_and_user_and_only_a_key_reference() {
    let dir = tempfile::tempdir().unwrap();
    let r = cluster("[]");
    let b = open(r.clone(), dir.path()).await;
    let a = Backend::native_access(&b, ObjectId::Volume(uuid(VOL))).unwrap();
    assert_eq!(
        a,
        RbdAccess {
            // a's v1 address; b has only v2.
            monitors: vec!["10.0.0.7:6789".into(), "10.0.0.8:3300".into()],
            pool: "stratus".into(),
            image: format!("pd-vol-{VOL}"),
            user: "compute".into(),
            secret_ref: "keyring:client.compute".into(),
            cluster_fsid: "69d8ee26-508c-4088-b3a4-b2c4a29d107d".into(),
        }
    );
    assert_eq!(
        Backend::native_access(&b, ObjectId::Snapshot(uuid(SNAP))),
        None
    );
    // Opening read the monitors once, as pdiskd's own user.
    let r = cluster("[]");
    RbdBackend::open(r.clone(), settings(dir.path()))
        .await
        .unwrap();
    assert!(r
        .lines()
        .contains(&format!("ceph {CLI} mon dump --format json")));
    // A cluster whose monitors have no address is refused at open.
    let bad = Script::new(|argv| {
        if argv.iter().any(|a| a == "mon") {
            return Output::ok(r#"{"fsid":"f","mons":[]}"#);
        }
        Output::ok("")
    });
    let e = RbdBackend::open(bad, settings(dir.path()))
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
}

/// A cluster where VOL is an image base (read-only) with a `pd-base`
/// snapshot that CLONE was cloned from; `children` is what `rbd children`
/// of that snapshot prints.
fn base_cluster(children: &'static str) -> Arc<Script> {
    Script::new(move |argv| {
        let has = |a: &str| argv.iter().any(|x| x == a);
        if has("mon") {
            return Output::ok(MON_DUMP_JSON);
        }
        if argv[0] == "ceph" {
            return Output::ok(DF_JSON);
        }
        if has("image-meta") && has("get") {
            return Output::ok("true\n");
        }
        if has("snap") && has("create") {
            return Output::failed(17, "rbd: failed to create snapshot: (17) File exists\n");
        }
        if has("snap") && has("ls") {
            return Output::ok(
                r#"[{"id":7,"name":"pd-base","size":67108864,"protected":"false","timestamp":"Thu Dec  3 17:26:36 2026"}]"#,
            );
        }
        if has("children") {
            return Output::ok(children);
        }
        if has("ls") {
            return Output::ok(format!(
                r#"[{{"image":"pd-vol-{VOL}","size":67108864,"format":2}},{{"image":"pd-vol-{VOL}","snapshot":"pd-base","snapshot_id":7,"size":67108864,"format":2,"protected":"false"}},{{"image":"pd-vol-{CLONE}","size":67108864,"format":2}}]"#
            ));
        }
        if has("du") {
            return Output::ok(format!(
                r#"{{"images":[{{"name":"pd-vol-{VOL}","snapshot":"pd-base","provisioned_size":67108864,"used_size":20971520}},{{"name":"pd-vol-{VOL}","provisioned_size":67108864,"used_size":0}},{{"name":"pd-vol-{CLONE}","provisioned_size":67108864,"used_size":4194304}}]}}"#
            ));
        }
        if has("info") {
            return Output::ok(r#"{"size":67108864,"format":2}"#);
        }
        Output::ok("")
    })
}

#[tokio::test]
async fn clones_of_an_image_base_are_rbd_clones_of_its_base_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let r = base_cluster("[]");
    let b = open(r.clone(), dir.path()).await;
    let new = Uuid::new_v4();
    b.clone_object(ObjectId::Volume(uuid(VOL)), new, 0, no_progress())
        .await
        .unwrap();
    let base = format!("stratus/pd-vol-{VOL}");
    let tmp = format!("stratus/pd-tmp-vol-{new}");
    let lines = r.lines();
    assert_eq!(
        &lines[..3],
        &[
            rbd(&format!("image-meta get {base} stratus.pdisk.read-only")),
            // Taken by an earlier clone: "exists" is fine.
            rbd(&format!("snap create {base}@pd-base")),
            rbd(&format!("clone {base}@pd-base {tmp}")),
        ],
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains(" cp ")), "{lines:?}");

    // pd-base is the volume's own: neither a snapshot of pdisk's nor a
    // foreign one, and its data counts as the volume's.
    let listing = b.list().await.unwrap();
    assert_eq!(listing.objects, {
        let mut v = vec![ObjectId::Volume(uuid(VOL)), ObjectId::Volume(uuid(CLONE))];
        v.sort();
        v
    });
    assert!(listing.foreign.is_empty(), "{:?}", listing.foreign);
    assert_eq!(
        listing.allocated.get(&ObjectId::Volume(uuid(VOL))),
        Some(&(20 << 20))
    );
}

#[tokio::test]
async fn an_image_base_with_clones_is_not_deleted_and_without_them_loses_its_base_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let r = base_cluster(
        r#"[{"pool":"stratus","pool_namespace":"","image":"pd-vol-c0ffee00-1234-4abc-8def-0123456789ab"}]"#,
    );
    let b = open(r.clone(), dir.path()).await;
    let e = b.delete(ObjectId::Volume(uuid(VOL))).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(e.message().contains(&format!("pd-vol-{CLONE}")), "{e}");
    assert!(e.message().contains("flatten"), "{e}");
    let base = format!("stratus/pd-vol-{VOL}");
    assert!(
        !r.lines()
            .iter()
            .any(|l| l.contains(" rm ") && l.contains(&base)),
        "{:?}",
        r.lines()
    );

    let r = base_cluster("[]");
    let b = open(r.clone(), dir.path()).await;
    b.delete(ObjectId::Volume(uuid(VOL))).await.unwrap();
    assert_eq!(
        r.lines(),
        vec![
            rbd(&format!("rm stratus/pd-tmp-vol-{VOL}")),
            rbd(&format!("snap ls {base} --format json")),
            rbd(&format!("children {base}@pd-base --format json")),
            rbd(&format!("snap rm {base}@pd-base")),
            rbd(&format!("rm {base}")),
        ]
    );
}

/// The cluster of [`cluster`], where CLONE's image-meta holds a flatten's
/// note when `noted`, and its features lack the object map when `off`.
fn flatten_cluster(noted: bool, off: bool) -> Arc<Script> {
    Script::new(move |argv| {
        let has = |a: &str| argv.iter().any(|x| x == a);
        if has("image-meta") && has("get") {
            return if noted {
                Output::ok("fast-diff,object-map\n")
            } else {
                Output::failed(
                    2,
                    "rbd: failed to get metadata stratus.pdisk.flatten-map-off of image : (2) No such file or directory\n",
                )
            };
        }
        if off && has("info") && argv.iter().any(|a| a.contains(CLONE)) {
            return Output::ok(
                r#"{"name":"x","size":67108864,"features":["layering","exclusive-lock","deep-flatten"]}"#,
            );
        }
        cluster_answer("[]", argv)
    })
}

#[tokio::test]
async fn flatten_turns_the_object_map_off_flattens_then_restores_it_with_the_long_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let key = "stratus.pdisk.flatten-map-off";
    let r = flatten_cluster(true, false);
    let b = open(r.clone(), dir.path()).await;
    // CLONE has a parent in this cluster: flattened with its map off.
    assert!(b
        .flatten(ObjectId::Volume(uuid(CLONE)), no_progress())
        .await
        .unwrap());
    let spec = format!("stratus/pd-vol-{CLONE}");
    assert_eq!(
        r.lines(),
        vec![
            rbd(&format!("info {spec} --format json")),
            rbd(&format!("image-meta set {spec} {key} fast-diff,object-map")),
            rbd(&format!("feature disable {spec} fast-diff object-map")),
            rbd(&format!("flatten {spec}")),
            rbd(&format!("image-meta get {spec} {key}")),
            rbd(&format!("info {spec} --format json")),
            rbd(&format!("object-map rebuild --no-progress {spec}")),
            rbd(&format!("image-meta remove {spec} {key}")),
        ]
    );
    assert_eq!(r.timeouts()[3].1, DATA_TIMEOUT);
    assert_eq!(r.timeouts()[6].1, DATA_TIMEOUT);

    // A flatten a crash interrupted after turning the map off: the image
    // is flat now (nothing to flatten); the map is turned on again
    // (object-map first).
    let r = flatten_cluster(true, true);
    let b = open(r.clone(), dir.path()).await;
    assert!(!b
        .flatten(ObjectId::Volume(uuid(CLONE)), no_progress())
        .await
        .unwrap());
    let lines = r.lines();
    assert!(!lines.iter().any(|l| l.contains("disable")), "{lines:?}");
    assert!(
        lines.contains(&rbd(&format!("feature enable {spec} object-map fast-diff"))),
        "{lines:?}"
    );

    // VOL has no parent and no note: nothing to do.
    let r = flatten_cluster(false, false);
    let b = open(r.clone(), dir.path()).await;
    assert!(!b
        .flatten(ObjectId::Volume(uuid(VOL)), no_progress())
        .await
        .unwrap());
    let lines = r.lines();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("flatten ") || l.contains("feature") || l.contains("rebuild")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn a_checksum_streams_rbd_export_and_a_short_stream_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let r = cluster("[]");
    let b = open(r.clone(), dir.path()).await;
    // The script writes nothing to stdout: 0 bytes of 64 MiB.
    let e = b
        .checksum(ObjectId::Volume(uuid(VOL)), 64 << 20, no_progress())
        .unwrap()
        .await
        .unwrap_err();
    assert!(e.message().contains("0 bytes of 67108864"), "{e}");
    assert_eq!(
        r.lines(),
        vec![rbd(&format!("export --no-progress stratus/pd-vol-{VOL} -"))]
    );
    assert_eq!(r.timeouts()[0].1, DATA_TIMEOUT);
}

#[tokio::test]
async fn raw_imports_go_through_rbd_import_then_grow() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("img.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    let r = cluster("[]");
    let b = open(r.clone(), dir.path()).await;
    b.import(uuid(VOL), &raw, ImageFormat::Raw, 8 << 20, no_progress())
        .await
        .unwrap();
    let tmp = format!("stratus/pd-tmp-vol-{VOL}");
    assert_eq!(
        r.lines(),
        vec![
            rbd(&format!("import --image-format 2 {} {tmp}", raw.display())),
            rbd(&format!("resize --size 8M {tmp}")),
            rbd(&format!(
                "image-meta set {tmp} stratus.pdisk.object volume {VOL}"
            )),
            rbd(&format!("rename {tmp} stratus/pd-vol-{VOL}")),
        ]
    );
    // The copy may run for hours: it has the data timeout, not a change's.
    assert!(r.timeouts()[0].1 >= Duration::from_secs(3600));

    // At the file's size already: no resize.
    r.clear();
    b.import(uuid(CLONE), &raw, ImageFormat::Raw, 3 << 20, no_progress())
        .await
        .unwrap();
    assert!(
        !r.lines().iter().any(|l| l.contains(" resize ")),
        "{:?}",
        r.lines()
    );
}

#[tokio::test]
async fn a_failed_raw_import_leaves_no_image_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("img.raw");
    std::fs::write(&raw, vec![7u8; 4096]).unwrap();
    let r = Script::new(|argv| {
        let has = |a: &str| argv.iter().any(|x| x == a);
        if has("mon") {
            Output::ok(MON_DUMP_JSON)
        } else if has("import") {
            Output::failed(
                1,
                "Importing image: 10% complete...\rImporting image: 20% complete...failed.\n\
                 rbd: import failed: (28) No space left on device\n",
            )
        } else {
            Output::ok("")
        }
    });
    let b = open(r.clone(), dir.path()).await;
    let e = b
        .import(uuid(VOL), &raw, ImageFormat::Raw, 1 << 20, no_progress())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("No space left"), "{e}");
    assert!(!e.to_string().contains("% complete"), "{e}");
    let lines = r.lines();
    assert_eq!(
        lines.last().unwrap(),
        &rbd(&format!("rm stratus/pd-tmp-vol-{VOL}")),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains(" rename ")), "{lines:?}");
}

#[test]
fn rbd_progress_lines_become_bytes_done() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let sink = rbd_progress(
        "import",
        1000,
        Arc::new(move |phase: &str, done, total| {
            s2.lock().unwrap().push((phase.to_string(), done, total))
        }),
    );
    for l in [
        "Importing image: 1% complete...",
        "Importing image: 42% complete...",
        "rbd: something else",
        "Importing image: 100% complete...done.",
    ] {
        sink(l);
    }
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            ("import".to_string(), 10, 1000),
            ("import".to_string(), 420, 1000),
            ("import".to_string(), 1000, 1000),
        ]
    );
}

#[tokio::test]
async fn monitors_are_read_again_once_a_minute_and_kept_when_that_fails() {
    let dir = tempfile::tempdir().unwrap();
    // What `ceph mon dump` answers: the first cluster, then monitor a
    // replaced by c, then an error.
    let answer = Arc::new(Mutex::new(0u8));
    let a2 = answer.clone();
    let r = Script::new(move |argv| {
        let has = |a: &str| argv.iter().any(|x| x == a);
        if !has("mon") {
            return Output::ok(if argv[0] == "ceph" {
                DF_JSON.to_string()
            } else if has("du") {
                du_json()
            } else {
                "[]".to_string()
            });
        }
        match *a2.lock().unwrap() {
            0 => Output::ok(MON_DUMP_JSON),
            1 => Output::ok(MON_DUMP_JSON.replace("10.0.0.7", "10.0.0.9")),
            _ => Output::failed(
                1,
                "[errno 110] RADOS timed out (error connecting to the cluster)",
            ),
        }
    });
    let b = open(r.clone(), dir.path()).await;
    let mons = |b: &RbdBackend| {
        Backend::native_access(b, ObjectId::Volume(uuid(VOL)))
            .unwrap()
            .monitors
    };
    assert_eq!(mons(&b), ["10.0.0.7:6789", "10.0.0.8:3300"]);
    *answer.lock().unwrap() = 1;
    // Within the minute: not asked again.
    b.list().await.unwrap();
    assert!(
        !r.lines().iter().any(|l| l.contains("mon dump")),
        "{:?}",
        r.lines()
    );
    assert_eq!(mons(&b), ["10.0.0.7:6789", "10.0.0.8:3300"]);
    // A minute later: read again, the new monitor is what exports name.
    let later = std::time::Instant::now() + MON_REFRESH + Duration::from_secs(1);
    b.refresh_monitors(later).await;
    assert_eq!(mons(&b), ["10.0.0.9:6789", "10.0.0.8:3300"]);
    // The cluster unreachable: the last list stays.
    *answer.lock().unwrap() = 2;
    b.refresh_monitors(later + MON_REFRESH + Duration::from_secs(1))
        .await;
    assert_eq!(mons(&b), ["10.0.0.9:6789", "10.0.0.8:3300"]);
    assert_eq!(
        r.lines().iter().filter(|l| l.contains("mon dump")).count(),
        2
    );
}
