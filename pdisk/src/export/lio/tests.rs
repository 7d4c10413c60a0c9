use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};

use super::configfs::{BackingKind, ConfigFs};
use super::fake_configfs::*;
use super::tree::*;
use super::*;
use crate::error::ErrorKind;
use crate::export::{matches_spec, ExportHealth};
use crate::runner::{FakeRunner, Output};

// ---- fixtures --------------------------------------------------------------

const PREFIX: &str = "iqn.2026-11.io.stratus.test";
const VOL_A: &str = "0b5c1e2a-7d4f-4b8e-9a61-3f2d9c8e7a10";
const VOL_B: &str = "5e7f9a1b-2c3d-4e5f-8a9b-0c1d2e3f4a5b";
const INIT_1: &str = "iqn.1993-08.org.debian:01:host1";
const INIT_2: &str = "iqn.1993-08.org.debian:01:host2";
const INIT_3: &str = "iqn.1993-08.org.debian:01:host3";
const SECRET: &str = "s3cr3t-Pa55word";
const SECRET_2: &str = "an0ther-Secr3t!";

/// Backing files and block devices the tests pretend exist.
type Disks = Arc<StdMutex<BTreeMap<PathBuf, BackingKind>>>;

struct Lab {
    _dir: tempfile::TempDir,
    fs: Arc<FakeConfigFs>,
    disks: Disks,
    runner: FakeRunner,
    exp: LioExporter,
}

fn lab() -> Lab {
    lab_with(FakeRunner::new())
}

fn lab_with(runner: FakeRunner) -> Lab {
    let (dir, fs) = FakeConfigFs::new();
    lab_on(dir, fs, runner)
}

fn lab_on(dir: tempfile::TempDir, fs: Arc<FakeConfigFs>, runner: FakeRunner) -> Lab {
    let disks: Disks = Arc::default();
    disks
        .lock()
        .unwrap()
        .insert(file_path(VOL_A), BackingKind::File(1 << 30));
    disks
        .lock()
        .unwrap()
        .insert(file_path(VOL_B), BackingKind::File(2 << 30));
    disks
        .lock()
        .unwrap()
        .insert(PathBuf::from("/dev/pdisk/vol-a"), BackingKind::Block);
    let d2 = disks.clone();
    let stat: Arc<StatFn> = Arc::new(move |p: &Path| {
        d2.lock()
            .unwrap()
            .get(p)
            .copied()
            .ok_or_else(|| errno(libc::ENOENT))
    });
    let exp = LioExporter::with_host(
        Arc::new(runner.clone()),
        LioConfig {
            configfs_root: fs.root.clone(),
            portal: "192.0.2.10:3260".into(),
            iqn_prefix: PREFIX.into(),
            ..LioConfig::default()
        },
        fs.clone(),
        stat,
    );
    Lab {
        _dir: dir,
        fs,
        disks,
        runner,
        exp,
    }
}

fn file_path(vol: &str) -> PathBuf {
    PathBuf::from(format!("/srv/pdisk/pool/volumes/{vol}.raw"))
}

fn iqn(s: &str) -> Iqn {
    s.parse().unwrap()
}

fn target(vol: &str) -> String {
    format!("{PREFIX}:{vol}")
}

fn spec(vol: &str, backing: PathBuf, initiators: &[&str], chap: Option<Chap>) -> ExportSpec {
    ExportSpec {
        target_iqn: iqn(&target(vol)),
        backing_path: backing,
        initiators: initiators.iter().map(|i| iqn(i)).collect(),
        chap,
    }
}

fn chap(user: &str, secret: &str) -> Option<Chap> {
    Some(Chap::new(user, secret).unwrap())
}

/// The tree of a fileio export of VOL_A (1 GiB) to `inits` without CHAP.
fn fileio_tree(inits: &[&str]) -> Vec<String> {
    let t = format!("target/iscsi/{}", target(VOL_A));
    let bs = format!("target/core/fileio_0/{}", target(VOL_A));
    let mut v = vec![
        "d target/iscsi".to_string(),
        "d target/core/fileio_0".into(),
        format!("d {bs}"),
        format!("f {bs}/udev_path = {}", file_path(VOL_A).display()),
        format!("f {bs}/enable = 1"),
        format!("f {bs}/wwn/vpd_unit_serial = T10 VPD Unit Serial Number: {VOL_A}"),
        format!("f {bs}/attrib/emulate_tpu = 1"),
        format!("f {bs}/attrib/emulate_tpws = 1"),
        format!("f {bs}/attrib/emulate_write_cache = 1"),
        format!("d {t}"),
        format!("d {t}/tpgt_1"),
        format!("f {t}/tpgt_1/attrib/demo_mode_discovery = 0"),
        format!("f {t}/tpgt_1/attrib/authentication = 0"),
        format!("d {t}/tpgt_1/lun/lun_1"),
        format!("l {t}/tpgt_1/lun/lun_1/backstore -> {bs}"),
        format!("d {t}/tpgt_1/np/192.0.2.10:3260"),
        format!("f {t}/tpgt_1/enable = 1"),
    ];
    for i in inits {
        let a = format!("{t}/tpgt_1/acls/{i}");
        v.push(format!("d {a}"));
        v.push(format!("f {a}/attrib/authentication = 0"));
        v.push(format!("d {a}/lun_1"));
        v.push(format!("l {a}/lun_1/lun -> {t}/tpgt_1/lun/lun_1"));
        v.push(format!("f {a}/lun_1/write_protect = 0"));
    }
    v.sort();
    v
}

fn info_of(lab: &Lab, vol: &str, hba: &str) -> String {
    std::fs::read_to_string(
        lab.fs
            .root
            .join(format!("target/core/{hba}/{}/info", target(vol))),
    )
    .unwrap()
}

/// Makes a target and backstore as another tool would (not ours).
fn foreign(lab: &Lab, name: &str) {
    let fs = &lab.fs;
    let r = &fs.root;
    fs.mkdir(&r.join("target/core/fileio_0")).ok();
    let bs = r.join("target/core/fileio_0").join(name);
    fs.mkdir(&bs).unwrap();
    fs.write(
        &bs.join("control"),
        "fd_dev_name=/tmp/foreign.img,fd_dev_size=1048576",
    )
    .unwrap();
    fs.write(&bs.join("enable"), "1").unwrap();
    let tpg = r.join("target/iscsi").join(name).join("tpgt_1");
    fs.mkdir(&r.join("target/iscsi")).ok();
    fs.mkdir(tpg.parent().unwrap()).unwrap();
    fs.mkdir(&tpg).unwrap();
    fs.mkdir(&tpg.join("lun/lun_0")).unwrap();
    fs.symlink(&bs, &tpg.join("lun/lun_0/abc123")).unwrap();
    fs.mkdir(&tpg.join("np/0.0.0.0:3261")).unwrap();
    fs.mkdir(&tpg.join("acls").join(INIT_1)).unwrap();
    fs.mkdir(&tpg.join("acls").join(INIT_1).join("lun_0"))
        .unwrap();
    fs.symlink(
        &tpg.join("lun/lun_0"),
        &tpg.join("acls").join(INIT_1).join("lun_0/def456"),
    )
    .unwrap();
    fs.write(&tpg.join("enable"), "1").unwrap();
}

// ---- export ----------------------------------------------------------------

#[tokio::test]
async fn fresh_file_export_writes_the_documented_tree() {
    let lab = lab();
    let s = spec(VOL_A, file_path(VOL_A), &[INIT_1, INIT_2], None);
    lab.exp.export(&s).await.unwrap();
    assert_eq!(lab.fs.tree(), fileio_tree(&[INIT_1, INIT_2]));
    let info = info_of(&lab, VOL_A, "fileio_0");
    assert!(
        info.contains(&format!(
            "File: {}  Size: 1073741824  Mode: Buffered-WCE",
            file_path(VOL_A).display()
        )),
        "{info}"
    );
    // The TPG is enabled last, once everything else is in place.
    let ops = lab.fs.ops();
    assert!(ops.last().unwrap().ends_with("tpgt_1/enable=1"), "{ops:?}");
    // The backstore is enabled before its serial is set and before the LUN links it.
    let pos = |needle: &str| ops.iter().position(|o| o.contains(needle)).unwrap();
    assert!(pos("fileio_0/iqn") < pos("/enable=1"));
    assert!(pos("/enable=1") < pos("vpd_unit_serial"));
    assert!(pos("vpd_unit_serial") < pos("symlink"));
    // No program was run: LIO was loaded already.
    assert!(lab.runner.calls().is_empty());
}

#[tokio::test]
async fn block_devices_get_an_iblock_backstore() {
    let lab = lab();
    let s = spec(VOL_A, "/dev/pdisk/vol-a".into(), &[INIT_1], None);
    lab.exp.export(&s).await.unwrap();
    let bs = format!("target/core/iblock_0/{}", target(VOL_A));
    let tree = lab.fs.tree();
    assert!(tree.contains(&format!("d {bs}")), "{tree:?}");
    assert!(tree.contains(&format!("f {bs}/udev_path = /dev/pdisk/vol-a")));
    assert!(tree.contains(&format!(
        "l target/iscsi/{}/tpgt_1/lun/lun_1/backstore -> {bs}",
        target(VOL_A)
    )));
    assert!(lab
        .fs
        .ops()
        .contains(&format!("write {bs}/control=udev_path=/dev/pdisk/vol-a")));
    assert!(info_of(&lab, VOL_A, "iblock_0").contains("UDEV PATH: /dev/pdisk/vol-a"));
    assert!(!tree.iter().any(|l| l.contains("fileio_0")));
}

#[tokio::test]
async fn write_through_fileio_when_write_back_is_off() {
    let (dir, fs) = FakeConfigFs::new();
    let mut lab = lab_on(dir, fs, FakeRunner::new());
    let mut cfg = lab.exp.config().clone();
    cfg.fileio_write_back = false;
    let stat = lab.exp.lio.stat.clone();
    lab.exp = LioExporter::with_host(Arc::new(FakeRunner::new()), cfg, lab.fs.clone(), stat);
    lab.exp
        .export(&spec(VOL_A, file_path(VOL_A), &[INIT_1], None))
        .await
        .unwrap();
    assert!(info_of(&lab, VOL_A, "fileio_0").contains("Mode: O_DSYNC"));
    assert!(!lab.fs.ops().iter().any(|o| o.contains("fd_buffered_io")));
}

#[tokio::test]
async fn the_tpg_offers_the_configured_iscsi_params_before_it_opens() {
    let (dir, fs) = FakeConfigFs::new();
    let mut lab = lab_on(dir, fs, FakeRunner::new());
    let mut cfg = lab.exp.config().clone();
    cfg.params = "InitialR2T=No,MaxRecvDataSegmentLength=262144,QueueDepth=128"
        .parse()
        .unwrap();
    let stat = lab.exp.lio.stat.clone();
    lab.exp = LioExporter::with_host(Arc::new(FakeRunner::new()), cfg, lab.fs.clone(), stat);
    let s = spec(VOL_A, file_path(VOL_A), &[INIT_1], None);
    lab.exp.export(&s).await.unwrap();
    let tpg = format!("target/iscsi/{}/tpgt_1", target(VOL_A));
    let tree = lab.fs.tree();
    for (attr, value) in [
        ("param/MaxRecvDataSegmentLength", "262144"),
        ("param/InitialR2T", "No"),
        ("attrib/default_cmdsn_depth", "128"),
    ] {
        assert!(
            tree.contains(&format!("f {tpg}/{attr} = {value}")),
            "{tree:?}"
        );
    }
    // Before the ACL, so its command window is the new depth, and before
    // the TPG opens.
    let ops = lab.fs.ops();
    let pos = |needle: &str| ops.iter().position(|o| o.contains(needle)).unwrap();
    assert!(pos("default_cmdsn_depth=128") < pos(&format!("mkdir {tpg}/acls")));
    assert!(pos("param/InitialR2T=No") < pos("tpgt_1/enable=1"));

    // Converged: a TPG whose parameter was changed behind our back gets
    // it back at the next export, and an export that matches writes nothing.
    std::fs::write(lab.fs.root.join(format!("{tpg}/param/InitialR2T")), "Yes\n").unwrap();
    lab.fs.clear_ops();
    lab.exp.export(&s).await.unwrap();
    assert_eq!(
        lab.fs.ops(),
        vec![format!("write {tpg}/param/InitialR2T=No")]
    );
    lab.fs.clear_ops();
    lab.exp.export(&s).await.unwrap();
    assert_eq!(lab.fs.ops(), Vec::<String>::new());
}

#[tokio::test]
async fn re_export_of_a_matching_target_changes_nothing() {
    let lab = lab();
    let s = spec(VOL_A, file_path(VOL_A), &[INIT_1], chap("alice", SECRET));
    lab.exp.export(&s).await.unwrap();
    let before = lab.fs.tree();
    lab.fs.clear_ops();
    lab.exp.export(&s).await.unwrap();
    assert_eq!(lab.fs.ops(), Vec::<String>::new());
    assert_eq!(lab.fs.tree(), before);
}

#[tokio::test]
async fn re_export_converges_acls_and_chap() {
    let lab = lab();
    let t = format!("target/iscsi/{}/tpgt_1", target(VOL_A));
    lab.exp
        .export(&spec(VOL_A, file_path(VOL_A), &[INIT_1, INIT_2], None))
        .await
        .unwrap();

    // Drop host1, add host3, turn CHAP on.
    lab.fs.clear_ops();
    lab.exp
        .export(&spec(
            VOL_A,
            file_path(VOL_A),
            &[INIT_2, INIT_3],
            chap("alice", SECRET),
        ))
        .await
        .unwrap();
    let mut want = fileio_tree(&[INIT_2, INIT_3]);
    want.retain(|l| !l.contains("authentication = 0"));
    for i in [INIT_2, INIT_3] {
        let a = format!("{t}/acls/{i}");
        want.push(format!("f {a}/attrib/authentication = 1"));
        want.push(format!("f {a}/auth/userid = alice"));
        want.push(format!("f {a}/auth/password = {SECRET}"));
    }
    want.push(format!("f {t}/attrib/authentication = 1"));
    want.sort();
    assert_eq!(lab.fs.tree(), want);
    let ops = lab.fs.ops();
    let pos = |needle: &str| {
        ops.iter()
            .position(|o| o.contains(needle))
            .unwrap_or_else(|| panic!("no {needle} in {ops:?}"))
    };
    // Tighten first, then require CHAP before the new ACL exists, and
    // give every ACL its credentials before its mapped LUN.
    assert!(pos(&format!("rmdir {t}/acls/{INIT_1}")) < pos(&format!("mkdir {t}/acls/{INIT_3}")));
    assert!(
        pos(&format!("write {t}/attrib/authentication=1"))
            < pos(&format!("mkdir {t}/acls/{INIT_3}"))
    );
    assert!(
        pos(&format!("{INIT_3}/attrib/authentication=1")) < pos(&format!("{INIT_3}/auth/password"))
    );
    assert!(
        pos(&format!("{INIT_3}/auth/password")) < pos(&format!("mkdir {t}/acls/{INIT_3}/lun_1"))
    );
    // The TPG stayed enabled: existing sessions were never dropped.
    assert!(!ops.iter().any(|o| o.contains("tpgt_1/enable=")), "{ops:?}");
    // The backstore and LUN were left alone.
    assert!(!ops.iter().any(|o| o.contains("target/core")), "{ops:?}");

    // Another user and secret.
    lab.exp
        .export(&spec(
            VOL_A,
            file_path(VOL_A),
            &[INIT_2, INIT_3],
            chap("bob", SECRET_2),
        ))
        .await
        .unwrap();
    let tree = lab.fs.tree();
    for i in [INIT_2, INIT_3] {
        assert!(
            tree.contains(&format!("f {t}/acls/{i}/auth/userid = bob")),
            "{tree:?}"
        );
        assert!(tree.contains(&format!("f {t}/acls/{i}/auth/password = {SECRET_2}")));
    }

    // CHAP off again: credentials cleared the way LIO clears them.
    lab.exp
        .export(&spec(VOL_A, file_path(VOL_A), &[INIT_2, INIT_3], None))
        .await
        .unwrap();
    let tree = lab.fs.tree();
    assert!(tree.contains(&format!("f {t}/attrib/authentication = 0")));
    for i in [INIT_2, INIT_3] {
        assert!(
            tree.contains(&format!("f {t}/acls/{i}/auth/userid = NULL")),
            "{tree:?}"
        );
        assert!(tree.contains(&format!("f {t}/acls/{i}/auth/password = NULL")));
        assert!(tree.contains(&format!("f {t}/acls/{i}/attrib/authentication = 0")));
    }
    let live = lab.exp.list().await.unwrap();
    assert_eq!(live[0].chap_user, None);
    assert!(live[0].backing_path.is_some());
}

#[tokio::test]
async fn mutual_chap_writes_the_targets_account_on_every_acl_and_clears_it_when_dropped() {
    let lab = lab();
    let t = format!("target/iscsi/{}/tpgt_1", target(VOL_A));
    let mutual = Chap::new("alice", SECRET)
        .unwrap()
        .with_mutual(Chap::new("tgt-vol-a", SECRET_2).unwrap())
        .unwrap();
    lab.exp
        .export(&spec(
            VOL_A,
            file_path(VOL_A),
            &[INIT_1, INIT_2],
            Some(mutual.clone()),
        ))
        .await
        .unwrap();
    let tree = lab.fs.tree();
    for i in [INIT_1, INIT_2] {
        let a = format!("{t}/acls/{i}/auth");
        for want in [
            format!("f {a}/userid = alice"),
            format!("f {a}/password = {SECRET}"),
            format!("f {a}/userid_mutual = tgt-vol-a"),
            format!("f {a}/password_mutual = {SECRET_2}"),
        ] {
            assert!(tree.contains(&want), "{want} not in {tree:#?}");
        }
    }
    let ops = lab.fs.ops();
    let pos = |needle: &str| {
        ops.iter()
            .position(|o| o.contains(needle))
            .unwrap_or_else(|| panic!("no {needle} in {ops:?}"))
    };
    // The target's account is in place before the initiator can log in.
    assert!(
        pos(&format!("{INIT_2}/auth/password_mutual"))
            < pos(&format!("mkdir {t}/acls/{INIT_2}/lun_1"))
    );
    let live = lab.exp.list().await.unwrap();
    assert_eq!(live[0].chap_user.as_deref(), Some("alice"));
    assert_eq!(live[0].chap_target_user.as_deref(), Some("tgt-vol-a"));
    let s = spec(VOL_A, file_path(VOL_A), &[INIT_1, INIT_2], Some(mutual));
    assert!(crate::export::matches_spec(&live[0], &s));

    // One-way again: the target's account is cleared, and the live export
    // no longer matches a mutual spec (so restore would re-apply it).
    lab.exp
        .export(&spec(
            VOL_A,
            file_path(VOL_A),
            &[INIT_1, INIT_2],
            chap("alice", SECRET),
        ))
        .await
        .unwrap();
    let tree = lab.fs.tree();
    for i in [INIT_1, INIT_2] {
        let a = format!("{t}/acls/{i}/auth");
        assert!(
            tree.contains(&format!("f {a}/userid_mutual = NULL")),
            "{tree:#?}"
        );
        assert!(tree.contains(&format!("f {a}/password_mutual = NULL")));
    }
    let live = lab.exp.list().await.unwrap();
    assert_eq!(live[0].chap_target_user, None);
    assert!(!crate::export::matches_spec(&live[0], &s));
}

#[tokio::test]
async fn a_new_backing_path_recreates_backstore_and_lun_with_the_same_serial() {
    let lab = lab();
    lab.exp
        .export(&spec(VOL_A, file_path(VOL_A), &[INIT_1], None))
        .await
        .unwrap();
    lab.fs.clear_ops();
    lab.exp
        .export(&spec(VOL_A, "/dev/pdisk/vol-a".into(), &[INIT_1], None))
        .await
        .unwrap();
    let t = format!("target/iscsi/{}/tpgt_1", target(VOL_A));
    let old = format!("target/core/fileio_0/{}", target(VOL_A));
    let new = format!("target/core/iblock_0/{}", target(VOL_A));
    let ops = lab.fs.ops();
    let pos = |needle: &str| {
        ops.iter()
            .position(|o| o == needle)
            .unwrap_or_else(|| panic!("no {needle} in {ops:?}"))
    };
    // Mapped LUN, LUN link, LUN, then the old backstore.
    assert!(
        pos(&format!("unlink {t}/acls/{INIT_1}/lun_1/lun"))
            < pos(&format!("unlink {t}/lun/lun_1/backstore"))
    );
    assert!(pos(&format!("unlink {t}/lun/lun_1/backstore")) < pos(&format!("rmdir {t}/lun/lun_1")));
    assert!(pos(&format!("rmdir {t}/lun/lun_1")) < pos(&format!("rmdir {old}")));
    let tree = lab.fs.tree();
    assert!(!tree.iter().any(|l| l.contains(&old)), "{tree:?}");
    assert!(tree.contains(&format!("l {t}/lun/lun_1/backstore -> {new}")));
    assert!(tree.contains(&format!("l {t}/acls/{INIT_1}/lun_1/lun -> {t}/lun/lun_1")));
    assert!(tree.contains(&format!(
        "f {new}/wwn/vpd_unit_serial = T10 VPD Unit Serial Number: {VOL_A}"
    )));
    let live = lab.exp.list().await.unwrap();
    assert_eq!(
        live[0].backing_path,
        Some(PathBuf::from("/dev/pdisk/vol-a"))
    );
}

#[tokio::test]
async fn thin_provisioning_refused_by_lio_is_not_fatal() {
    let lab = lab();
    lab.fs.fail_writes("attrib/emulate_tpu", libc::ENOSYS);
    lab.exp
        .export(&spec(VOL_A, "/dev/pdisk/vol-a".into(), &[INIT_1], None))
        .await
        .unwrap();
    assert!(!lab.fs.ops().iter().any(|o| o.contains("emulate_tp")));
    assert!(lab.exp.list().await.unwrap()[0].backing_path.is_some());
}

#[tokio::test]
async fn bad_specs_are_refused_before_anything_changes() {
    let lab = lab();
    for (path, kind) in [
        ("relative/x.raw", ErrorKind::InvalidArgument),
        ("/srv/a,b.raw", ErrorKind::InvalidArgument),
        ("/srv/with space.raw", ErrorKind::InvalidArgument),
        ("/srv/missing.raw", ErrorKind::NotFound),
    ] {
        let e = lab
            .exp
            .export(&spec(VOL_A, path.into(), &[INIT_1], None))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), kind, "{path}: {e}");
    }
    lab.disks
        .lock()
        .unwrap()
        .insert("/srv/tiny.raw".into(), BackingKind::File(512));
    assert!(lab
        .exp
        .export(&spec(VOL_A, "/srv/tiny.raw".into(), &[INIT_1], None))
        .await
        .is_err());
    let e = lab
        .exp
        .export(&spec(
            VOL_A,
            file_path(VOL_A),
            &[INIT_1],
            chap("alice", "NULLsecret123"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(!e.message().contains("NULLsecret123"), "{e}");
    let e = lab
        .exp
        .export(&ExportSpec {
            target_iqn: iqn("iqn.2026-11.io.stratus.other:x"),
            ..spec(VOL_A, file_path(VOL_A), &[INIT_1], None)
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    // Only `mkdir target/iscsi` (done when LIO is checked) happened.
    assert_eq!(lab.fs.ops(), vec!["mkdir target/iscsi"]);
}

// ---- unexport --------------------------------------------------------------

#[tokio::test]
async fn unexport_tears_down_leaf_first_and_leaves_others_alone() {
    let lab = lab();
    foreign(&lab, "iqn.2003-01.org.linux-iscsi.other:sn.1234");
    // Shares our prefix but not as a prefix of the name: not ours.
    foreign(&lab, &format!("{PREFIX}x:lookalike"));
    let untouched = lab.fs.tree();
    lab.exp
        .export(&spec(
            VOL_A,
            file_path(VOL_A),
            &[INIT_1, INIT_2],
            chap("alice", SECRET),
        ))
        .await
        .unwrap();
    lab.exp
        .export(&spec(VOL_B, file_path(VOL_B), &[INIT_1], None))
        .await
        .unwrap();
    lab.fs.clear_ops();
    lab.exp.unexport(&iqn(&target(VOL_A))).await.unwrap();

    let t = format!("target/iscsi/{}", target(VOL_A));
    let a1 = format!("{t}/tpgt_1/acls/{INIT_1}");
    let a2 = format!("{t}/tpgt_1/acls/{INIT_2}");
    let bs = format!("target/core/fileio_0/{}", target(VOL_A));
    assert_eq!(
        lab.fs.ops(),
        vec![
            format!("write {t}/tpgt_1/enable=0"),
            format!("unlink {a1}/lun_1/lun"),
            format!("rmdir {a1}/lun_1"),
            format!("rmdir {a1}"),
            format!("unlink {a2}/lun_1/lun"),
            format!("rmdir {a2}/lun_1"),
            format!("rmdir {a2}"),
            format!("unlink {t}/tpgt_1/lun/lun_1/backstore"),
            format!("rmdir {t}/tpgt_1/lun/lun_1"),
            format!("rmdir {t}/tpgt_1/np/192.0.2.10:3260"),
            format!("rmdir {t}/tpgt_1"),
            format!("rmdir {t}"),
            format!("rmdir {bs}"),
        ]
    );
    // Nothing of VOL_A left; VOL_B and the foreign targets as they were.
    let tree = lab.fs.tree();
    assert!(!tree.iter().any(|l| l.contains(VOL_A)), "{tree:?}");
    assert!(tree.iter().any(|l| l.contains(VOL_B)));
    lab.exp.unexport(&iqn(&target(VOL_B))).await.unwrap();
    assert_eq!(lab.fs.tree(), untouched);
    assert!(lab.exp.list().await.unwrap().is_empty());

    // Absent: still fine, and nothing happens.
    lab.fs.clear_ops();
    lab.exp.unexport(&iqn(&target(VOL_A))).await.unwrap();
    assert!(lab.fs.ops().is_empty());
    // Not ours: refused.
    let e = lab
        .exp
        .unexport(&iqn("iqn.2003-01.org.linux-iscsi.other:sn.1234"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn unexport_finishes_a_half_made_export() {
    let lab = lab();
    // A crash after the backstore was made, before the target.
    let bs = lab.fs.root.join("target/core/fileio_0").join(target(VOL_A));
    lab.fs
        .mkdir(&lab.fs.root.join("target/core/fileio_0"))
        .unwrap();
    lab.fs.mkdir(&bs).unwrap();
    lab.exp.unexport(&iqn(&target(VOL_A))).await.unwrap();
    assert!(!bs.exists());
    // After the target's TPG and LUN 1, before its portal and ACLs
    // (`lio::export::lun_added`), and after the ACLs, not yet enabled.
    let a = spec(VOL_A, file_path(VOL_A), &[INIT_1], None);
    for disable in [false, true] {
        lab.exp.export(&a).await.unwrap();
        let tpg = lab
            .fs
            .root
            .join("target/iscsi")
            .join(target(VOL_A))
            .join("tpgt_1");
        lab.fs.write(&tpg.join("enable"), "0").unwrap();
        if !disable {
            let m = tpg.join("acls").join(INIT_1).join("lun_1");
            lab.fs.unlink(&m.join("lun")).unwrap();
            lab.fs.rmdir(&m).unwrap();
            lab.fs.rmdir(&tpg.join("acls").join(INIT_1)).unwrap();
            lab.fs.rmdir(&tpg.join("np/192.0.2.10:3260")).unwrap();
        }
        lab.exp.unexport(&iqn(&target(VOL_A))).await.unwrap();
        assert!(lab.exp.list().await.unwrap().is_empty());
        assert!(!bs.exists());
    }
}

// ---- list and restore ------------------------------------------------------

#[tokio::test]
async fn list_reads_the_live_tree_back() {
    let lab = lab();
    foreign(&lab, "iqn.2003-01.org.linux-iscsi.other:sn.1234");
    let a = spec(
        VOL_A,
        file_path(VOL_A),
        &[INIT_1, INIT_2],
        chap("alice", SECRET),
    );
    let b = spec(VOL_B, "/dev/pdisk/vol-a".into(), &[INIT_3], None);
    lab.exp.export(&a).await.unwrap();
    lab.exp.export(&b).await.unwrap();
    let mut live = lab.exp.list().await.unwrap();
    live.sort_by(|x, y| x.target_iqn.cmp(&y.target_iqn));
    assert_eq!(
        live,
        vec![
            LiveExport {
                target_iqn: target(VOL_A),
                backing_path: Some(file_path(VOL_A)),
                initiators: vec![INIT_1.into(), INIT_2.into()],
                chap_user: Some("alice".into()),
                chap_target_user: None,
                health: ExportHealth::Whole,
            },
            LiveExport {
                target_iqn: target(VOL_B),
                backing_path: Some("/dev/pdisk/vol-a".into()),
                initiators: vec![INIT_3.into()],
                chap_user: None,
                chap_target_user: None,
                health: ExportHealth::Whole,
            },
        ]
    );
    assert!(matches_spec(&live[0], &a));
    assert!(matches_spec(&live[1], &b));
}

#[tokio::test]
async fn restore_after_reboot_recreates_every_export() {
    let lab = lab();
    let a = spec(
        VOL_A,
        file_path(VOL_A),
        &[INIT_1, INIT_2],
        chap("alice", SECRET),
    );
    let b = spec(VOL_B, file_path(VOL_B), &[INIT_3], None);
    lab.exp.export(&a).await.unwrap();
    lab.exp.export(&b).await.unwrap();
    let before = lab.fs.tree();
    let r = lab.exp.restore(&[a.clone(), b.clone()]).await.unwrap();
    assert_eq!(r.unchanged.len(), 2, "{r:?}");

    lab.fs.reboot();
    assert!(lab.exp.list().await.unwrap().is_empty());
    let r = lab.exp.restore(&[a, b]).await.unwrap();
    assert_eq!(r.restored.len(), 2, "{r:?}");
    assert!(r.failed.is_empty() && r.unknown.is_empty(), "{r:?}");
    assert_eq!(lab.fs.tree(), before);
}

#[tokio::test]
async fn restore_repairs_targets_that_are_not_whole() {
    let lab = lab();
    let a = spec(VOL_A, file_path(VOL_A), &[INIT_1], None);
    lab.exp.export(&a).await.unwrap();
    let tpg = lab
        .fs
        .root
        .join("target/iscsi")
        .join(target(VOL_A))
        .join("tpgt_1");

    // A crash before the TPG was enabled: the target is listed as broken,
    // with its backstore's path and why, and does not match its spec.
    lab.fs.write(&tpg.join("enable"), "0").unwrap();
    let live = lab.exp.list().await.unwrap();
    assert_eq!(
        live[0].health,
        ExportHealth::Broken("its TPG is not enabled".into())
    );
    assert_eq!(live[0].backing_path, Some(file_path(VOL_A)));
    assert!(!matches_spec(&live[0], &a));
    let r = lab.exp.restore(std::slice::from_ref(&a)).await.unwrap();
    assert_eq!(r.restored, vec![target(VOL_A)]);
    assert_eq!(std::fs::read_to_string(tpg.join("enable")).unwrap(), "1\n");

    // A mapped LUN gone missing.
    let m = tpg.join("acls").join(INIT_1).join("lun_1");
    lab.fs.unlink(&m.join("lun")).unwrap();
    lab.fs.rmdir(&m).unwrap();
    assert!(!lab.exp.list().await.unwrap()[0].health.is_whole());
    lab.exp.restore(std::slice::from_ref(&a)).await.unwrap();
    assert_eq!(
        lab.exp.list().await.unwrap()[0].backing_path,
        Some(file_path(VOL_A))
    );

    // The file grew but nobody told LIO.
    lab.disks
        .lock()
        .unwrap()
        .insert(file_path(VOL_A), BackingKind::File(3 << 30));
    assert!(!lab.exp.list().await.unwrap()[0].health.is_whole());
    lab.exp.restore(std::slice::from_ref(&a)).await.unwrap();
    assert!(info_of(&lab, VOL_A, "fileio_0").contains("Size: 3221225472"));

    // Unknown targets with our prefix are reported, never removed.
    let r = lab.exp.restore(&[]).await.unwrap();
    assert_eq!(r.unknown, vec![target(VOL_A)]);
    assert!(lab
        .fs
        .root
        .join("target/iscsi")
        .join(target(VOL_A))
        .exists());
}

// ---- refresh_size ----------------------------------------------------------

#[tokio::test]
async fn refresh_size_sets_fd_dev_size_on_the_live_fileio_backstore() {
    let lab = lab();
    let a = spec(VOL_A, file_path(VOL_A), &[INIT_1], None);
    lab.exp.export(&a).await.unwrap();
    lab.disks
        .lock()
        .unwrap()
        .insert(file_path(VOL_A), BackingKind::File(2 << 30));
    lab.fs.clear_ops();
    lab.exp.refresh_size(&a).await.unwrap();
    let bs = format!("target/core/fileio_0/{}", target(VOL_A));
    assert_eq!(
        lab.fs.ops(),
        vec![format!("write {bs}/control=fd_dev_size=2147483648")]
    );
    assert!(info_of(&lab, VOL_A, "fileio_0").contains("Size: 2147483648"));
}

#[tokio::test]
async fn refresh_size_recreates_the_fileio_backstore_when_lio_refuses() {
    let lab = lab();
    lab.fs.state.lock().unwrap().live_fd_size = false;
    let a = spec(VOL_A, file_path(VOL_A), &[INIT_1], chap("alice", SECRET));
    lab.exp.export(&a).await.unwrap();
    let before = lab.fs.tree();
    lab.disks
        .lock()
        .unwrap()
        .insert(file_path(VOL_A), BackingKind::File(2 << 30));
    lab.fs.clear_ops();
    lab.exp.refresh_size(&a).await.unwrap();
    assert!(info_of(&lab, VOL_A, "fileio_0").contains("Size: 2147483648"));
    // Same tree: same serial, LUN and mappings back, TPG never disabled.
    assert_eq!(lab.fs.tree(), before);
    let ops = lab.fs.ops();
    assert!(
        ops.contains(&format!("rmdir target/core/fileio_0/{}", target(VOL_A))),
        "{ops:?}"
    );
    assert!(!ops.iter().any(|o| o.contains("tpgt_1/enable")), "{ops:?}");
}

#[tokio::test]
async fn refresh_size_of_a_block_device_changes_nothing() {
    let lab = lab();
    let a = spec(VOL_A, "/dev/pdisk/vol-a".into(), &[INIT_1], None);
    lab.exp.export(&a).await.unwrap();
    lab.fs.clear_ops();
    lab.exp.refresh_size(&a).await.unwrap();
    assert!(lab.fs.ops().is_empty(), "{:?}", lab.fs.ops());
}

#[tokio::test]
async fn refresh_size_of_a_missing_target_is_not_found() {
    let lab = lab();
    let e = lab
        .exp
        .refresh_size(&spec(VOL_A, file_path(VOL_A), &[INIT_1], None))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

// ---- secrets ---------------------------------------------------------------

/// A tracing writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<StdMutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_secret_reaches_only_the_password_attribute() {
    // While a single subscriber is registered, tracing computes a
    // callsite's interest with the subscriber of whichever thread hits
    // it first: a lio callsite first reached by another test's thread
    // (no subscriber) would be off for ours too. A second registered
    // subscriber makes tracing ask every live one instead.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let log = Captured::default();
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // Callsites whose registration was under way meanwhile: recompute.
    std::thread::sleep(Duration::from_millis(50));
    tracing::callsite::rebuild_interest_cache();

    let lab = lab();
    lab.exp
        .export(&spec(
            VOL_A,
            file_path(VOL_A),
            &[INIT_1, INIT_2],
            chap("alice", SECRET),
        ))
        .await
        .unwrap();
    // Re-keyed, then a failure right after the secret was written.
    lab.fs
        .fail_writes(&format!("{INIT_1}/lun_1/write_protect"), libc::EIO);
    let mut s = spec(
        VOL_A,
        file_path(VOL_A),
        &[INIT_1, INIT_2],
        chap("alice", SECRET_2),
    );
    s.initiators.reverse();
    lab.fs.reboot();
    let e = lab.exp.export(&s).await.unwrap_err();
    let r = lab.exp.restore(std::slice::from_ref(&s)).await.unwrap();

    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("lio: created target"),
        "nothing captured: {text}"
    );
    assert!(text.contains("<redacted>"));
    for secret in [SECRET, SECRET_2] {
        assert!(!text.contains(secret), "secret in the log:\n{text}");
        assert!(!e.message().contains(secret) && !format!("{e:?}").contains(secret));
        assert!(!format!("{r:?}").contains(secret));
        assert!(!format!("{s:?}").contains(secret));
        for argv in lab.runner.calls() {
            assert!(!argv.iter().any(|a| a.contains(secret)), "{argv:?}");
        }
        for op in lab.fs.ops() {
            if op.contains(secret) {
                assert!(op.contains("/auth/password="), "{op}");
                assert!(!op.ends_with('\n'), "{op}");
            }
        }
    }
}

// ---- check -----------------------------------------------------------------

#[tokio::test]
async fn check_passes_when_lio_is_loaded_and_makes_the_iscsi_group() {
    let lab = lab();
    lab.exp.check().await.unwrap();
    assert!(lab.fs.root.join("target/iscsi/lio_version").exists());
    assert!(lab.runner.calls().is_empty());
}

#[tokio::test]
async fn check_without_configfs_is_unavailable() {
    let lab = lab();
    std::fs::remove_dir_all(lab.fs.root.join("target")).unwrap();
    lab.fs.state.lock().unwrap().mounted = false;
    let e = lab.exp.check().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.message().contains("configfs is not mounted"), "{e}");
    let e = lab
        .exp
        .export(&spec(VOL_A, file_path(VOL_A), &[INIT_1], None))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(lab.runner.calls().is_empty());
}

#[tokio::test]
async fn check_loads_missing_modules_with_modprobe_once() {
    let (dir, fs) = FakeConfigFs::new();
    std::fs::remove_dir_all(fs.root.join("target")).unwrap();
    fs.state.lock().unwrap().iscsi_loadable = false;
    // modprobe "loads" what it is asked for.
    let f2 = fs.clone();
    let runner = FakeRunner::with(move |argv| {
        match argv[1].as_str() {
            "target_core_mod" => f2.load_core(),
            "iscsi_target_mod" => f2.state.lock().unwrap().iscsi_loadable = true,
            _ => return Ok(Output::failed(1, "modprobe: FATAL: Module not found")),
        }
        Ok(Output::ok(""))
    });
    let lab = lab_on(dir, fs, runner);
    lab.exp.check().await.unwrap();
    assert_eq!(
        lab.runner.command_lines(),
        vec!["modprobe target_core_mod", "modprobe iscsi_target_mod"]
    );
    lab.exp.check().await.unwrap();
    assert_eq!(lab.runner.calls().len(), 2);
}

#[tokio::test]
async fn check_reports_modules_that_do_not_load_and_tries_only_once() {
    let (dir, fs) = FakeConfigFs::new();
    std::fs::remove_dir_all(fs.root.join("target")).unwrap();
    let runner = FakeRunner::with(|_| {
        Ok(Output::failed(
            1,
            "modprobe: FATAL: Module target_core_mod not found",
        ))
    });
    let lab = lab_on(dir, fs, runner);
    let e = lab.exp.check().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.message().contains("target_core_mod"), "{e}");
    assert!(e.message().contains("not found"), "{e}");
    let e = lab.exp.check().await.unwrap_err();
    assert!(e.message().contains("tried already"), "{e}");
    assert_eq!(lab.runner.calls().len(), 1);

    // The iSCSI fabric that can't be loaded.
    let (dir, fs) = FakeConfigFs::new();
    fs.state.lock().unwrap().iscsi_loadable = false;
    let lab = lab_on(dir, fs, FakeRunner::new());
    let e = lab.exp.check().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.message().contains("iscsi_target_mod"), "{e}");
    assert_eq!(
        lab.runner.command_lines(),
        vec!["modprobe iscsi_target_mod"]
    );
}

#[test]
fn helpers() {
    assert!(owns(PREFIX, &format!("{PREFIX}:x")));
    assert!(owns(PREFIX, PREFIX));
    assert!(!owns(PREFIX, &format!("{PREFIX}x:y")));
    assert_eq!(unit_serial(&target(VOL_A)), VOL_A);
    assert_eq!(unit_serial("iqn.2026-11.io.x"), "iqn.2026-11.io.x");
    assert_eq!(backstore_hba("fileio_12"), Some("fileio"));
    assert_eq!(backstore_hba("pscsi_0"), None);
    assert_eq!(backstore_hba("iblock_"), None);
    assert_eq!(
        link_tail(Path::new("../../../../../../target/core/fileio_0/iqn.x:y")),
        Some(("fileio_0".into(), "iqn.x:y".into()))
    );
    let info = "TCM FILEIO ID: 0        File: /a/b.raw  Size: 4096  Mode: O_DSYNC Async: 0\n";
    assert_eq!(info_field(info, "File"), Some("/a/b.raw"));
    assert_eq!(info_field(info, "Size"), Some("4096"));
    let real = "Status: ACTIVATED  Max Queue Depth: 128  SectorSize: 512  HwMaxSectors: 16384\n\
                    TCM FILEIO ID: 0        File: /a.raw  Size: 8192  Mode: O_DSYNC Async: 0\n";
    assert_eq!(info_field(real, "Size"), Some("8192"));
    assert_eq!(info_field(real, "Mode"), Some("O_DSYNC"));
    assert_eq!(info_field("SectorSize: 512", "Size"), None);
    assert_eq!(chap_value("NULL\n"), None);
    assert_eq!(chap_value("\n"), None);
    assert_eq!(chap_value("alice\n"), Some("alice"));
}
