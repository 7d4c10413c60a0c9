//! Unit tests of the lvm backend: exact argv and timeouts through a scripted
//! runner, and reports laid out as LVM 2.03.16 (Debian 12) printed them in
//! the lab VM (a 16 GiB PV, the pool made by --lvm-create-pool). No root, no
//! device-mapper.

use std::sync::Mutex;

use super::*;
use crate::backend::no_progress;
use crate::runner::{Cmd, CommandRunner, Output};

pub(crate) const VOL: &str = "3f2b8c1e-5d4a-4b7e-9c21-0a6f1e2d3c4b";
pub(crate) const SNAP: &str = "9a1c7e55-02d4-4f0b-8e6a-c3b2d1f0e9a8";
pub(crate) const CLONE: &str = "c0ffee00-1234-4abc-8def-0123456789ab";

fn uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

/// `vgs --reportformat json --units b --nosuffix -o vg_name,vg_extent_size,vg_size,vg_free stratus`
/// on a 16 GiB PV.
pub(crate) const VGS_JSON: &str = r#"  {
      "report": [
          {
              "vg": [
                  {"vg_name":"stratus", "vg_extent_size":"4194304", "vg_size":"17175674880", "vg_free":"17108566016"}
              ]
          }
      ]
  }
"#;

/// A pool row with the given data and metadata percentages.
pub(crate) fn pool_row(data: &str, meta: &str) -> String {
    format!(
        r#"{{"lv_name":"pool", "lv_attr":"twi-aotz--", "lv_size":"16219373568", "pool_lv":"", "lv_tags":"", "data_percent":"{data}", "metadata_percent":"{meta}", "segtype":"thin-pool"}}"#
    )
}

/// A thin LV row of ours.
pub(crate) fn thin_row(name: &str, attr: &str, size: u64, data: &str) -> String {
    format!(
        r#"{{"lv_name":"{name}", "lv_attr":"{attr}", "lv_size":"{size}", "pool_lv":"pool", "lv_tags":"stratus.pdisk", "data_percent":"{data}", "metadata_percent":"", "segtype":"thin"}}"#
    )
}

/// An `lvs --reportformat json` document holding `rows`, laid out as LVM
/// prints it.
pub(crate) fn lvs_json(rows: &[String]) -> String {
    format!(
        "  {{\n      \"report\": [\n          {{\n              \"lv\": [\n                  {}\n              ]\n          }}\n      ]\n  }}\n",
        rows.join(",\n                  ")
    )
}

/// What `lvs ... stratus` printed on a lab host: the pool, one volume of
/// ours (open: exported), its snapshot (read-only, inactive after a reboot,
/// still carrying the skip flag of an older pdisk), a temporary left by a
/// crash, the host's root LV, an untagged LV named like ours, and a tagged
/// LV in another pool.
pub(crate) fn full_vg_json() -> String {
    lvs_json(&[
        pool_row("12.47", "10.94"),
        thin_row(&format!("pd-vol-{VOL}"), "Vwi-aotz--", 1 << 30, "25.00"),
        thin_row(&format!("pd-snap-{SNAP}"), "Vri---tz-k", 1 << 30, ""),
        thin_row(&format!("pd-tmp-vol-{CLONE}"), "Vwi-a-tz--", 1 << 30, "0.00"),
        r#"{"lv_name":"root", "lv_attr":"-wi-ao----", "lv_size":"4294967296", "pool_lv":"", "lv_tags":"", "data_percent":"", "metadata_percent":"", "segtype":"linear"}"#.into(),
        format!(r#"{{"lv_name":"pd-vol-{CLONE}", "lv_attr":"Vwi-a-tz--", "lv_size":"1073741824", "pool_lv":"pool", "lv_tags":"", "data_percent":"1.00", "metadata_percent":"", "segtype":"thin"}}"#),
        format!(r#"{{"lv_name":"pd-vol-{SNAP}", "lv_attr":"Vwi-a-tz--", "lv_size":"1073741824", "pool_lv":"otherpool", "lv_tags":"stratus.pdisk,backup", "data_percent":"2.00", "metadata_percent":"", "segtype":"thin"}}"#),
    ])
}

pub(crate) const LVS: &str =
    "lvs --reportformat json --units b --nosuffix -o lv_name,lv_attr,lv_size,pool_lv,lv_tags,data_percent,metadata_percent,segtype";

type Respond = dyn Fn(&[String]) -> Output + Send + Sync;

/// Records every command (argv and timeout) and answers from a script.
pub(crate) struct Script {
    calls: Mutex<Vec<Cmd>>,
    respond: Box<Respond>,
}

impl Script {
    pub(crate) fn new(respond: impl Fn(&[String]) -> Output + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Script {
            calls: Mutex::default(),
            respond: Box::new(respond),
        })
    }

    pub(crate) fn lines(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.argv().join(" "))
            .collect()
    }

    pub(crate) fn timeouts(&self) -> Vec<(String, Duration)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| (c.program.clone(), c.timeout))
            .collect()
    }

    pub(crate) fn clear(&self) {
        self.calls.lock().unwrap().clear();
    }
}

impl CommandRunner for Script {
    fn run<'a>(&'a self, cmd: &'a Cmd) -> BoxFuture<'a, Result<Output>> {
        self.calls.lock().unwrap().push(cmd.clone());
        let out = (self.respond)(&cmd.argv());
        Box::pin(async move { Ok(out) })
    }
}

pub(crate) fn settings(staging: &Path) -> LvmSettings {
    LvmSettings {
        vg: LvmName::vg("stratus").unwrap(),
        thin_pool: LvmName::lv("pool").unwrap(),
        create_pool: false,
        threshold_percent: 90.0,
        wipe: Wipe::None,
        staging_dir: staging.to_path_buf(),
    }
}

/// A runner that answers `vgs` and `lvs` with these reports and succeeds
/// at everything else.
pub(crate) fn lab(
    vg_lvs: String,
    one_lv: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
) -> Arc<Script> {
    Script::new(move |argv| match argv[0].as_str() {
        "vgs" => Output::ok(VGS_JSON),
        "lvs" => {
            let target = argv.last().unwrap();
            match target.split_once('/') {
                None => Output::ok(vg_lvs.clone()),
                Some((_, lv)) => match one_lv(lv) {
                    Some(row) => Output::ok(lvs_json(&[row])),
                    None => {
                        Output::failed(5, format!("  Failed to find logical volume \"{target}\"\n"))
                    }
                },
            }
        }
        _ => Output::ok(""),
    })
}

/// A backend opened on `runner` (its open-time calls forgotten).
pub(crate) async fn open(runner: Arc<Script>, settings: LvmSettings) -> LvmBackend {
    let mut b = LvmBackend::open(runner.clone(), settings).await.unwrap();
    b.remove_retry_delays = vec![Duration::ZERO; 4];
    runner.clear();
    b
}

/// The answer of `lvs stratus/NAME` for the pool, volume VOL and snapshot
/// SNAP (1 GiB each); other LVs do not exist.
fn ours(lv: &str) -> Option<String> {
    if lv == "pool" {
        Some(pool_row("12.47", "10.94"))
    } else if lv == format!("pd-vol-{VOL}") {
        Some(thin_row(lv, "Vwi-a-tz--", 1 << 30, "25.00"))
    } else if lv == format!("pd-snap-{SNAP}") {
        Some(thin_row(lv, "Vri-a-tz--", 1 << 30, "25.00"))
    } else {
        None
    }
}

#[test]
fn parses_reports_of_lvm_2_03_16() {
    let lvs = parse_lvs(&full_vg_json()).unwrap();
    assert_eq!(lvs.len(), 7);
    let pool = &lvs[0];
    assert!(pool.is_thin_pool() && pool.active());
    assert_eq!(pool.size, 16219373568);
    assert_eq!(
        (pool.data_percent, pool.metadata_percent),
        (Some(12.47), Some(10.94))
    );
    let vol = &lvs[1];
    assert_eq!(vol.tags, vec!["stratus.pdisk"]);
    assert_eq!(vol.allocated(), 1 << 28);
    assert!(vol.writable() && vol.active());
    let snap = &lvs[2];
    assert!(!snap.writable() && !snap.active());
    assert_eq!((snap.data_percent, snap.allocated()), (None, 0));
    assert_eq!(lvs[6].tags, vec!["stratus.pdisk", "backup"]);
    assert_eq!(parse_extent_size(VGS_JSON, "stratus").unwrap(), 4 << 20);
    assert_eq!(
        parse_extent_size(VGS_JSON, "other").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // An empty VG, and output that is not a report.
    assert!(parse_lvs(&lvs_json(&[])).unwrap().is_empty());
    assert!(parse_lvs("  Volume group \"x\" not found").is_err());
    let bad = lvs_json(&[thin_row("pd-vol-x", "Vwi-a-tz--", 1, "lots")]);
    assert!(parse_lvs(&bad)
        .unwrap_err()
        .message()
        .contains("data_percent"));
}

#[test]
fn names_map_to_objects_and_back() {
    let v = ObjectId::Volume(uuid(VOL));
    let s = ObjectId::Snapshot(uuid(SNAP));
    assert_eq!(object_lv(v), format!("pd-vol-{VOL}"));
    assert_eq!(temp_lv(v), format!("pd-tmp-vol-{VOL}"));
    assert_eq!(object_lv(s), format!("pd-snap-{SNAP}"));
    for id in [v, s] {
        assert_eq!(parse_role(&object_lv(id)), Some(Role::Object(id)));
        assert_eq!(parse_role(&temp_lv(id)), Some(Role::Temporary(id)));
    }
    for other in [
        "pool",
        "root",
        "pd-vol-",
        "pd-vol-notauuid",
        &format!("pd-vol-{}", VOL.to_uppercase()),
        &format!("pd-vol-{VOL}x"),
        &format!("pd-disk-{VOL}"),
    ] {
        assert_eq!(parse_role(other), None, "{other}");
    }
}

#[test]
fn lvm_names_are_validated() {
    for ok in ["stratus", "vg0", "data_pool", "a.b-c+d"] {
        LvmName::vg(ok).unwrap();
        LvmName::lv(ok).unwrap();
    }
    for bad in [
        "",
        "-vg",
        ".",
        "..",
        "vg 0",
        "vg/x",
        "vg;rm",
        "ü",
        &"x".repeat(128),
    ] {
        assert_eq!(
            LvmName::vg(bad).unwrap_err().kind(),
            ErrorKind::InvalidArgument,
            "{bad}"
        );
    }
    for reserved in ["snapshot1", "pvmove0", "pool_tmeta", "x_pmspare"] {
        assert!(LvmName::lv(reserved)
            .unwrap_err()
            .message()
            .contains("reserves"));
    }
}

#[tokio::test]
async fn open_checks_the_vg_and_pool_and_activates_inactive_lvs_of_ours() {
    let dir = tempfile::tempdir().unwrap();
    let vg = lvs_json(&[
        r#"{"lv_name":"pool", "lv_attr":"twi---tz--", "lv_size":"16219373568", "pool_lv":"", "lv_tags":"", "data_percent":"", "metadata_percent":"", "segtype":"thin-pool"}"#.into(),
        thin_row(&format!("pd-snap-{SNAP}"), "Vri---tz-k", 1 << 30, ""),
        thin_row(&format!("pd-vol-{VOL}"), "Vwi-a-tz--", 1 << 30, "25.00"),
        r#"{"lv_name":"root", "lv_attr":"-wi-------", "lv_size":"4294967296", "pool_lv":"", "lv_tags":"", "data_percent":"", "metadata_percent":"", "segtype":"linear"}"#.into(),
    ]);
    let r = lab(vg, |_| None);
    let staging = dir.path().join("staging");
    let b = LvmBackend::open(r.clone(), settings(&staging))
        .await
        .unwrap();
    assert_eq!(
        r.lines(),
        vec![
            "vgs --reportformat json --units b --nosuffix -o vg_name,vg_extent_size,vg_size,vg_free stratus".to_string(),
            format!("{LVS} stratus"),
            "lvchange --activate y stratus/pool".into(),
            format!("lvchange --activate y --ignoreactivationskip stratus/pd-snap-{SNAP}"),
        ]
    );
    assert_eq!(b.size_granularity(), 4 << 20);
    assert!(staging.is_dir());
    assert_eq!(b.location(), "stratus/pool");
    assert_eq!(
        b.device_path(ObjectId::Volume(uuid(VOL))),
        PathBuf::from(format!("/dev/stratus/pd-vol-{VOL}"))
    );
}

#[tokio::test]
async fn open_without_the_pool_fails_or_creates_it_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let root = r#"{"lv_name":"root", "lv_attr":"-wi-ao----", "lv_size":"4294967296", "pool_lv":"", "lv_tags":"", "data_percent":"", "metadata_percent":"", "segtype":"linear"}"#;
    let r = lab(lvs_json(&[root.into()]), |_| None);
    let e = LvmBackend::open(r.clone(), settings(dir.path()))
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().contains("--lvm-create-pool"), "{e}");

    // Asked to create it: lvcreate, then the pool is looked up again.
    let created = Arc::new(Mutex::new(false));
    let c2 = created.clone();
    let r = Script::new(move |argv| match argv[0].as_str() {
        "vgs" => Output::ok(VGS_JSON),
        "lvs" if *c2.lock().unwrap() => {
            Output::ok(lvs_json(&[root.into(), pool_row("0.00", "10.43")]))
        }
        "lvs" => Output::ok(lvs_json(&[root.into()])),
        "lvcreate" => {
            *c2.lock().unwrap() = true;
            Output::ok("  Logical volume \"pool\" created.\n")
        }
        _ => Output::failed(1, "unexpected"),
    });
    let s = LvmSettings {
        create_pool: true,
        ..settings(dir.path())
    };
    LvmBackend::open(r.clone(), s.clone()).await.unwrap();
    assert_eq!(
        r.lines()[2],
        "lvcreate --type thin-pool --extents 95%FREE --zero y --discards passdown --yes --name pool stratus"
    );
    assert_eq!(r.lines().len(), 4);
    assert_eq!(r.timeouts()[2], ("lvcreate".into(), POOL_CREATE_TIMEOUT));

    // A VG that has another thin pool: refused, nothing created.
    let other = pool_row("1.00", "1.00").replace("\"pool\"", "\"tp0\"");
    let r = lab(lvs_json(&[other]), |_| None);
    let e = LvmBackend::open(r.clone(), s).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(e.message().contains("--thin-pool tp0"), "{e}");
    assert!(!r.lines().iter().any(|l| l.starts_with("lvcreate")));

    // The named LV exists but is no thin pool.
    let linear = root.replace("\"root\"", "\"pool\"");
    let r = lab(lvs_json(&[linear]), |_| None);
    let e = LvmBackend::open(r, settings(dir.path()))
        .await
        .err()
        .unwrap();
    assert!(e.message().contains("not a thin pool"), "{e}");
}

#[tokio::test]
async fn list_reports_ours_as_objects_and_every_other_lv_as_foreign() {
    let dir = tempfile::tempdir().unwrap();
    let r = lab(full_vg_json(), ours);
    let b = open(r.clone(), settings(dir.path())).await;
    let l = b.list().await.unwrap();
    let (v, s) = (ObjectId::Volume(uuid(VOL)), ObjectId::Snapshot(uuid(SNAP)));
    assert_eq!(l.objects, vec![v, s]);
    assert_eq!(l.allocated.get(&v), Some(&(1 << 28)));
    assert_eq!(l.allocated.get(&s), None, "inactive: unknown");
    assert_eq!(
        l.foreign,
        vec![
            "stratus/root".to_string(),
            format!("stratus/pd-vol-{CLONE}"),
            format!("stratus/pd-vol-{SNAP}"),
        ]
    );
    assert_eq!(l.usage.capacity, 16219373568);
    let t = l.usage.thin.as_ref().unwrap();
    assert_eq!((t.data_percent, t.metadata_percent), (12.47, 10.94));
    assert_eq!(t.pool, "stratus/pool");
    // One report for all of it.
    assert_eq!(r.lines(), vec![format!("{LVS} stratus")]);
    assert_eq!(r.timeouts(), vec![("lvs".to_string(), REPORT_TIMEOUT)]);
}

#[tokio::test]
async fn size_allocated_and_usage_are_one_report_each() {
    let dir = tempfile::tempdir().unwrap();
    let r = lab(full_vg_json(), ours);
    let b = open(r.clone(), settings(dir.path())).await;
    let v = ObjectId::Volume(uuid(VOL));
    assert_eq!(b.size(v).await.unwrap(), 1 << 30);
    assert_eq!(b.allocated(v).await.unwrap(), 1 << 28);
    let u = b.usage().await.unwrap();
    assert_eq!(u.used, (16219373568f64 * 12.47 / 100.0).round() as u64);
    assert_eq!(
        r.lines(),
        vec![
            format!("{LVS} stratus/pd-vol-{VOL}"),
            format!("{LVS} stratus/pd-vol-{VOL}"),
            format!("{LVS} stratus/pool"),
        ]
    );
    let e = b.size(ObjectId::Volume(uuid(CLONE))).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn create_snapshot_clone_resize_delete_run_exactly_these_commands() {
    let dir = tempfile::tempdir().unwrap();
    let vg = lvs_json(&[
        pool_row("12.47", "10.94"),
        thin_row(&format!("pd-vol-{VOL}"), "Vwi-a-tz--", 1 << 30, "25.00"),
    ]);
    let r = lab(vg, ours);
    let b = open(r.clone(), settings(dir.path())).await;
    let (v, s, c) = (uuid(VOL), uuid(SNAP), uuid(CLONE));

    b.create(ObjectId::Volume(v), 1 << 30).await.unwrap();
    b.snapshot(ObjectId::Volume(v), s, no_progress())
        .await
        .unwrap();
    // A clone of the same size is one lvcreate; a larger one is built
    // under the temporary name, grown, then renamed.
    b.clone_object(ObjectId::Snapshot(s), c, 1 << 30, no_progress())
        .await
        .unwrap();
    b.clone_object(ObjectId::Snapshot(s), c, 3 << 30, no_progress())
        .await
        .unwrap();
    b.resize(ObjectId::Volume(v), 2 << 30).await.unwrap();
    b.set_read_only(ObjectId::Volume(v)).await.unwrap();
    b.delete(ObjectId::Volume(v)).await.unwrap();
    let t = "--addtag stratus.pdisk";
    assert_eq!(
        r.lines(),
        vec![
            format!("lvcreate --type thin --virtualsize 1073741824b --thinpool pool --name pd-vol-{VOL} {t} stratus"),
            format!("lvcreate --snapshot --setactivationskip n --permission r --name pd-snap-{SNAP} {t} stratus/pd-vol-{VOL}"),
            format!("{LVS} stratus/pd-snap-{SNAP}"),
            format!("lvcreate --snapshot --setactivationskip n --permission rw --name pd-vol-{CLONE} {t} stratus/pd-snap-{SNAP}"),
            format!("{LVS} stratus/pd-snap-{SNAP}"),
            format!("lvcreate --snapshot --setactivationskip n --permission rw --name pd-tmp-vol-{CLONE} {t} stratus/pd-snap-{SNAP}"),
            format!("lvextend --size 3221225472b stratus/pd-tmp-vol-{CLONE}"),
            format!("lvrename stratus pd-tmp-vol-{CLONE} pd-vol-{CLONE}"),
            format!("{LVS} stratus/pd-vol-{VOL}"),
            format!("lvextend --size 2147483648b stratus/pd-vol-{VOL}"),
            format!("{LVS} stratus/pd-vol-{VOL}"),
            format!("lvchange --permission r stratus/pd-vol-{VOL}"),
            format!("{LVS} stratus"),
            format!("lvremove --yes stratus/pd-vol-{VOL}"),
        ]
    );
    for (program, timeout) in r.timeouts() {
        let want = if program == "lvs" {
            REPORT_TIMEOUT
        } else {
            CHANGE_TIMEOUT
        };
        assert_eq!(timeout, want, "{program}");
    }
}

#[tokio::test]
async fn sizes_round_up_to_extents_and_shrinking_is_refused_before_any_change() {
    let dir = tempfile::tempdir().unwrap();
    let r = lab(lvs_json(&[pool_row("1.00", "1.00")]), ours);
    let b = open(r.clone(), settings(dir.path())).await;
    let v = ObjectId::Volume(uuid(VOL));
    b.create(v, (1 << 30) + (1 << 20)).await.unwrap();
    assert!(
        r.lines()[0].contains("--virtualsize 1077936128b"),
        "{:?}",
        r.lines()
    );
    r.clear();
    let e = b.resize(v, 512 << 20).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    b.resize(v, 1 << 30).await.unwrap(); // same size: nothing to do
    assert!(
        r.lines().iter().all(|l| l.starts_with("lvs ")),
        "{:?}",
        r.lines()
    );
}

#[tokio::test]
async fn delete_removes_the_temporary_too_never_a_foreign_lv_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let r = lab(full_vg_json(), ours);
    let b = open(r.clone(), settings(dir.path())).await;
    // pd-vol-CLONE exists untagged (foreign); pd-tmp-vol-CLONE is ours.
    b.delete(ObjectId::Volume(uuid(CLONE))).await.unwrap();
    assert_eq!(
        r.lines(),
        vec![
            format!("{LVS} stratus"),
            format!("lvremove --yes stratus/pd-tmp-vol-{CLONE}"),
        ]
    );
    r.clear();
    // Nothing of ours: nothing removed, Ok.
    b.delete(ObjectId::Snapshot(uuid(CLONE))).await.unwrap();
    assert_eq!(r.lines(), vec![format!("{LVS} stratus")]);
}

#[tokio::test]
async fn lvremove_is_retried_only_while_the_lv_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let vg = lvs_json(&[
        pool_row("12.47", "10.94"),
        thin_row(&format!("pd-vol-{VOL}"), "Vwi-aotz--", 1 << 30, "25.00"),
    ]);
    let v = ObjectId::Volume(uuid(VOL));
    let remove = format!("lvremove --yes stratus/pd-vol-{VOL}");
    let in_use = format!("  Logical volume stratus/pd-vol-{VOL} in use.\n");

    // In use twice (udev's probe, an exporter closing), then removed.
    let failures = Arc::new(Mutex::new(2));
    let (vg2, f2, iu) = (vg.clone(), failures.clone(), in_use.clone());
    let r = Script::new(move |argv| match argv[0].as_str() {
        "vgs" => Output::ok(VGS_JSON),
        "lvs" => Output::ok(vg2.clone()),
        "lvremove" => {
            let mut f = f2.lock().unwrap();
            if *f > 0 {
                *f -= 1;
                Output::failed(5, iu.clone())
            } else {
                Output::ok(format!(
                    "  Logical volume \"pd-vol-{VOL}\" successfully removed.\n"
                ))
            }
        }
        _ => Output::ok(""),
    });
    let b = open(r.clone(), settings(dir.path())).await;
    b.delete(v).await.unwrap();
    assert_eq!(
        r.lines()[1..],
        [remove.clone(), remove.clone(), remove.clone()]
    );

    // Still in use after every retry: FailedPrecondition with LVM's words.
    let (vg2, iu) = (vg.clone(), in_use.clone());
    let r = Script::new(move |argv| match argv[0].as_str() {
        "vgs" => Output::ok(VGS_JSON),
        "lvs" => Output::ok(vg2.clone()),
        _ => Output::failed(5, iu.clone()),
    });
    let b = open(r.clone(), settings(dir.path())).await;
    let e = b.delete(v).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(e.message().contains("in use"), "{e}");
    assert_eq!(r.lines().len(), 1 + 5);

    // A holder device does not go away by waiting: no retry.
    let vg2 = vg.clone();
    let r = Script::new(move |argv| match argv[0].as_str() {
        "vgs" => Output::ok(VGS_JSON),
        "lvs" => Output::ok(vg2.clone()),
        _ => Output::failed(
            5,
            format!("  Logical volume stratus/pd-vol-{VOL} is used by another device.\n"),
        ),
    });
    let b = open(r.clone(), settings(dir.path())).await;
    assert_eq!(b.delete(v).await.unwrap_err().kind(), ErrorKind::Internal);
    assert_eq!(r.lines().len(), 2);
}

#[tokio::test]
async fn secure_wipe_zeroes_before_removal_and_refuses_to_fill_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let s = LvmSettings {
        wipe: Wipe::Zero,
        ..settings(dir.path())
    };
    let r = lab(full_vg_json(), ours);
    let b = open(r.clone(), s.clone()).await;
    assert!(b.capabilities().contains(&"secure-wipe".to_string()));
    // The snapshot is read-only and inactive: activate, make writable,
    // zero, remove.
    b.delete(ObjectId::Snapshot(uuid(SNAP))).await.unwrap();
    assert_eq!(
        r.lines(),
        vec![
            format!("{LVS} stratus"),
            format!("lvchange --activate y --ignoreactivationskip stratus/pd-snap-{SNAP}"),
            format!("lvchange --permission rw stratus/pd-snap-{SNAP}"),
            format!("blkdiscard --zeroout /dev/stratus/pd-snap-{SNAP}"),
            format!("lvremove --yes stratus/pd-snap-{SNAP}"),
        ]
    );
    assert_eq!(
        r.timeouts()[3],
        (
            "blkdiscard".into(),
            WIPE_BASE_TIMEOUT + Duration::from_secs(32)
        )
    );

    // A 1 TiB volume with little data in a nearly full pool: zeroing would
    // provision it all. Refused; nothing runs after the report.
    let vg = lvs_json(&[
        pool_row("80.00", "10.00"),
        thin_row(&format!("pd-vol-{VOL}"), "Vwi-a-tz--", 1 << 40, "0.10"),
    ]);
    let r = lab(vg, ours);
    let b = open(r.clone(), s).await;
    let e = b.delete(ObjectId::Volume(uuid(VOL))).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    assert!(e.message().contains("lvm_wipe = none"), "{e}");
    assert_eq!(r.lines(), vec![format!("{LVS} stratus")]);
}

#[tokio::test]
async fn import_writes_into_a_fresh_thin_lv_and_renames_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![1u8; 3 << 20]).unwrap();
    let r = lab(lvs_json(&[pool_row("1.00", "1.00")]), ours);
    let b = open(r.clone(), settings(dir.path())).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let progress: ProgressFn = Arc::new(move |phase, done, total| {
        s2.lock().unwrap().push((phase.to_string(), done, total))
    });
    b.import(uuid(VOL), &img, ImageFormat::Raw, 8 << 20, progress)
        .await
        .unwrap();
    assert_eq!(
        r.lines(),
        vec![
            format!("lvcreate --type thin --virtualsize 8388608b --thinpool pool --name pd-tmp-vol-{VOL} --addtag stratus.pdisk stratus"),
            format!(
                "qemu-img convert -p -n --target-is-zero -t none -f raw -O raw {} /dev/stratus/pd-tmp-vol-{VOL}",
                img.display()
            ),
            format!("lvrename stratus pd-tmp-vol-{VOL} pd-vol-{VOL}"),
        ]
    );
    assert_eq!(
        r.timeouts()[1],
        ("qemu-img".into(), Duration::from_secs(6 * 3600))
    );
    assert_eq!(
        seen.lock().unwrap().last().unwrap(),
        &("import".to_string(), 3 << 20, 3 << 20)
    );

    // qemu-img fails: the temporary is removed, the error kept.
    let r = Script::new(|argv| match argv[0].as_str() {
        "vgs" => Output::ok(VGS_JSON),
        "lvs" => Output::ok(lvs_json(&[pool_row("1.00", "1.00")])),
        "qemu-img" => Output::failed(
            1,
            "qemu-img: error while writing at byte 0: No space left on device",
        ),
        _ => Output::ok(""),
    });
    let b = open(r.clone(), settings(dir.path())).await;
    let e = b
        .import(uuid(VOL), &img, ImageFormat::Raw, 8 << 20, no_progress())
        .await
        .unwrap_err();
    assert!(e.message().contains("No space left"), "{e}");
    assert_eq!(
        r.lines().last().unwrap(),
        &format!("lvremove --yes stratus/pd-tmp-vol-{VOL}")
    );
    assert!(!r.lines().iter().any(|l| l.starts_with("lvrename")));
}

#[tokio::test]
async fn import_refuses_a_qcow2_with_a_backing_file_before_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let r = Script::new(|argv| match argv[0].as_str() {
        "vgs" => Output::ok(VGS_JSON),
        "lvs" => Output::ok(lvs_json(&[pool_row("1.00", "1.00")])),
        "qemu-img" => Output::ok(
            r#"{"format":"qcow2","virtual-size":1048576,"backing-filename":"/etc/shadow"}"#,
        ),
        _ => Output::ok(""),
    });
    let b = open(r.clone(), settings(dir.path())).await;
    let e = b
        .import(
            uuid(VOL),
            Path::new("/x.qcow2"),
            ImageFormat::Qcow2,
            1 << 20,
            no_progress(),
        )
        .await
        .unwrap_err();
    assert!(e.message().contains("backing file"), "{e}");
    assert_eq!(
        r.lines(),
        vec!["qemu-img info --output=json -f qcow2 /x.qcow2"]
    );
}

#[tokio::test]
async fn usage_past_the_threshold_refuses_room() {
    let dir = tempfile::tempdir().unwrap();
    for (data, meta, refused) in [
        ("89.99", "10.00", None),
        (
            "90.01",
            "10.00",
            Some("data usage is 90.01%, past the 90% threshold"),
        ),
        (
            "10.00",
            "91.50",
            Some("metadata usage is 91.50%, past the 90% threshold"),
        ),
    ] {
        let pool = pool_row(data, meta);
        let r = lab(lvs_json(std::slice::from_ref(&pool)), move |_| {
            Some(pool.clone())
        });
        let b = open(r, settings(dir.path())).await;
        let u = b.usage().await.unwrap();
        match refused {
            None => u.check_room("volume v", 0).unwrap(),
            Some(m) => {
                let e = u.check_room("volume v", 0).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
                assert!(e.message().contains(m), "{e}");
                assert!(e.message().contains("thin pool stratus/pool"), "{e}");
            }
        }
    }
    // Data to be written counts: 80% + 2 GiB of a 15.1 GiB pool passes 90%.
    let pool = pool_row("80.00", "10.00");
    let r = lab(lvs_json(std::slice::from_ref(&pool)), move |_| {
        Some(pool.clone())
    });
    let u = open(r, settings(dir.path())).await.usage().await.unwrap();
    u.check_room("import", 1 << 30).unwrap();
    let e = u.check_room("import", 2 << 30).unwrap_err();
    assert!(e.message().contains("would reach 93.24%"), "{e}");
}

#[tokio::test]
async fn lvm_failures_keep_their_kind() {
    let dir = tempfile::tempdir().unwrap();
    let r = Script::new(|argv| {
        match argv[0].as_str() {
        "vgs" => Output::ok(VGS_JSON),
        "lvs" => Output::ok(lvs_json(&[pool_row("1.00", "1.00")])),
        "lvcreate" if argv.contains(&"--snapshot".to_string()) => Output::failed(
            5,
            "  Couldn't find origin volume 'pd-vol-3f2b8c1e-5d4a-4b7e-9c21-0a6f1e2d3c4b'.\n",
        ),
        "lvcreate" if argv.iter().any(|a| a.contains(CLONE)) => Output::failed(
            5,
            "  Cannot create new thin volume, free space in thin pool stratus/pool reached threshold.\n",
        ),
        "lvcreate" => Output::failed(
            5,
            format!("  Logical Volume \"pd-vol-{VOL}\" already exists in volume group \"stratus\"\n"),
        ),
        _ => Output::ok(""),
    }
    });
    let b = open(r, settings(dir.path())).await;
    let e = b
        .create(ObjectId::Volume(uuid(VOL)), 1 << 30)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(e.message().starts_with("creating volume"), "{e}");
    let e = b
        .create(ObjectId::Volume(uuid(CLONE)), 1 << 30)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    let e = b
        .snapshot(ObjectId::Volume(uuid(VOL)), uuid(SNAP), no_progress())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[tokio::test]
async fn clear_temporaries_removes_temporary_lvs_and_staged_uploads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.upload"), b"x").unwrap();
    std::fs::write(dir.path().join("keep.txt"), b"x").unwrap();
    let r = lab(full_vg_json(), ours);
    let b = open(r.clone(), settings(dir.path())).await;
    let mut removed = b.clear_temporaries().await.unwrap();
    removed.sort();
    assert_eq!(
        removed,
        vec!["a.upload".to_string(), format!("pd-tmp-vol-{CLONE}")]
    );
    assert_eq!(
        r.lines(),
        vec![
            format!("{LVS} stratus"),
            format!("lvremove --yes stratus/pd-tmp-vol-{CLONE}"),
        ]
    );
    assert!(dir.path().join("keep.txt").exists());
}

/// Answers like [`lab`] but takes a while over each change, counting how
/// many changes are in flight at once.
struct SlowChanges {
    inner: Arc<Script>,
    in_flight: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

impl CommandRunner for SlowChanges {
    fn run<'a>(&'a self, cmd: &'a Cmd) -> BoxFuture<'a, Result<Output>> {
        use std::sync::atomic::Ordering::SeqCst;
        Box::pin(async move {
            let change = cmd.program.starts_with("lv") && cmd.program != "lvs";
            if change {
                let now = self.in_flight.fetch_add(1, SeqCst) + 1;
                self.most.fetch_max(now, SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let out = self.inner.run(cmd).await;
            if change {
                self.in_flight.fetch_sub(1, SeqCst);
            }
            out
        })
    }
}

/// Changes of every kind (lvcreate for creates, lvremove for deletes with
/// its in-use retries) queue behind one another; reports do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_changes_queue_in_pdiskd_so_each_timeout_measures_only_its_change() {
    let dir = tempfile::tempdir().unwrap();
    let vg = lvs_json(&[
        pool_row("12.47", "10.94"),
        thin_row(&format!("pd-vol-{VOL}"), "Vwi-a-tz--", 1 << 30, "25.00"),
    ]);
    let script = lab(vg, ours);
    let slow = Arc::new(SlowChanges {
        inner: script.clone(),
        in_flight: Default::default(),
        most: Default::default(),
    });
    let b = Arc::new(
        LvmBackend::open(slow.clone(), settings(dir.path()))
            .await
            .unwrap(),
    );
    script.clear();
    let creates = (0..8).map(|_| {
        let b = b.clone();
        tokio::spawn(async move { b.create(ObjectId::Volume(Uuid::new_v4()), 1 << 30).await })
    });
    let deletes = (0..4).map(|_| {
        let b = b.clone();
        tokio::spawn(async move { b.delete(ObjectId::Volume(uuid(VOL))).await })
    });
    for c in futures::future::join_all(creates.chain(deletes)).await {
        c.unwrap().unwrap();
    }
    let count = |program: &str| {
        script
            .lines()
            .iter()
            .filter(|l| l.starts_with(program))
            .count()
    };
    assert_eq!((count("lvcreate"), count("lvremove")), (8, 4));
    assert_eq!(
        slow.most.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "LVM changes ran side by side"
    );
}
