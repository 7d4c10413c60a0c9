//! The exporter suite: the same tests against every [`Exporter`], on the
//! stack `STRATUS_STACK` selects (testkit's `Stack`): tgt with QEMU's
//! initiator on the host (`scripts/test`), LIO with the kernel's open-iscsi
//! initiator in the lab VM (`scripts/lab`). Volumes are sparse files here
//! (tgt rdwr, LIO fileio); pdiskd.rs covers LVs (LIO iblock).
//! tgt_exporter.rs keeps what only tgt has (tgtadm argv, backing stores, tids).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pdisk::export::lio::{LioConfig, LioExporter};
use pdisk::export::{ExportSpec, Exporter, TgtConfig, TgtExporter};
use stratus_core::runner::RecordingRunner;
use stratus_core::types::{Chap, Iqn};
use testkit::*;

const MIB: u64 = 1 << 20;
const IGNORE: &str = "needs root and an iSCSI target (tgtd, or LIO in the lab VM)";

/// One exporter on the selected stack, with its own target and files.
struct Fixture {
    exp: Box<dyn Exporter>,
    rec: Arc<RecordingRunner>,
    exports: Exports,
    prefix: String,
    dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    require_root();
    let _ = IGNORE;
    let dir = tempfile::Builder::new()
        .prefix("stratus-exp-")
        .tempdir()
        .unwrap();
    let rec = Arc::new(RecordingRunner::default());
    let (exp, exports, prefix): (Box<dyn Exporter>, Exports, String) = match stack_kind() {
        StackKind::FileTgt => {
            let tgtd = Tgtd::start(dir.path());
            let prefix = "iqn.2026-11.io.stratus.pdisk".to_string();
            let exp = TgtExporter::new(
                rec.clone(),
                TgtConfig {
                    control_port: tgtd.control_port,
                    portal: tgtd.portal(),
                    iqn_prefix: prefix.clone(),
                    ..TgtConfig::default()
                },
            );
            (Box::new(exp), Exports::Tgt(tgtd), prefix)
        }
        StackKind::LvmLio => {
            let lio = Lio::new();
            let prefix = lio.iqn_prefix.clone();
            let exp = LioExporter::new(
                rec.clone(),
                LioConfig {
                    portal: lio.portal(),
                    iqn_prefix: prefix.clone(),
                    ..LioConfig::default()
                },
            );
            (Box::new(exp), Exports::Lio(lio), prefix)
        }
    };
    Fixture {
        exp,
        rec,
        exports,
        prefix,
        dir,
    }
}

impl Fixture {
    /// A sparse backing file of `size` bytes.
    fn volume(&self, name: &str, size: u64) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.img"));
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    fn spec(
        &self,
        name: &str,
        path: &Path,
        initiators: &[&str],
        chap: Option<&Chap>,
    ) -> ExportSpec {
        ExportSpec {
            target_iqn: format!("{}:{name}", self.prefix).parse().unwrap(),
            backing_path: path.to_owned(),
            initiators: initiators.iter().map(|i| i.parse().unwrap()).collect(),
            chap: chap.cloned(),
        }
    }

    fn initiator(&self, target: &Iqn, name: &str) -> Initiator {
        Initiator::new(&self.exports.portal(), target.as_str(), name)
    }
}

fn first_bytes(path: &Path, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and an iSCSI target (tgtd, or LIO in the lab VM)"]
async fn export_serves_the_acl_only_converges_and_lists_back() {
    let f = fixture();
    f.exp.check().await.unwrap();
    let path = f.volume("vol-1", 64 * MIB);
    let s = f.spec("vol-1", &path, &[INITIATOR], None);
    f.exp.export(&s).await.unwrap();
    f.exp.export(&s).await.unwrap(); // idempotent
    let a = f.initiator(&s.target_iqn, INITIATOR);
    let b = f.initiator(&s.target_iqn, OTHER_INITIATOR);
    a.io(&["write -P 0xab 0 1M", "read -P 0xab 0 1M"]).unwrap();
    assert_eq!(first_bytes(&path, 4), [0xab; 4]);
    assert!(b.io(&["read 0 4k"]).is_err(), "outside the ACL");

    // Add B, then drop A: the live target follows the spec.
    f.exp
        .export(&f.spec("vol-1", &path, &[INITIATOR, OTHER_INITIATOR], None))
        .await
        .unwrap();
    b.io(&["read -P 0xab 0 1M"]).unwrap();
    f.exp
        .export(&f.spec("vol-1", &path, &[OTHER_INITIATOR], None))
        .await
        .unwrap();
    assert!(a.io(&["read 0 4k"]).is_err(), "A was dropped from the ACL");
    b.io(&["read -P 0xab 0 1M"]).unwrap();

    let live = f.exp.list().await.unwrap();
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].target_iqn, s.target_iqn.as_str());
    assert_eq!(live[0].backing_path.as_deref(), Some(path.as_path()));
    assert_eq!(live[0].initiators, vec![OTHER_INITIATOR.to_string()]);
    assert_eq!(live[0].chap_user, None);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and an iSCSI target (tgtd, or LIO in the lab VM)"]
async fn chap_is_required_when_set_and_the_secret_reaches_no_argv() {
    let f = fixture();
    let path = f.volume("vol-c", 16 * MIB);
    let secret = "Exp0rtSuiteS3c";
    let chap = Chap::new("tenant9", secret).unwrap();
    let s = f.spec("vol-c", &path, &[INITIATOR], Some(&chap));
    f.exp.export(&s).await.unwrap();
    let mut a = f.initiator(&s.target_iqn, INITIATOR);
    assert!(a.io(&["read 0 4k"]).is_err(), "a login without CHAP");
    let wrong = f.dir.path().join("wrong.secret");
    std::fs::write(&wrong, "NotTheS3cret1").unwrap();
    a.chap = Some(("tenant9".into(), wrong));
    assert!(
        a.io(&["read 0 4k"]).is_err(),
        "a login with the wrong secret"
    );
    let right = f.dir.path().join("right.secret");
    std::fs::write(&right, secret).unwrap();
    a.chap = Some(("tenant9".into(), right));
    a.io(&["write -P 0x42 0 4k", "read -P 0x42 0 4k"]).unwrap();
    let live = f.exp.list().await.unwrap();
    assert_eq!(live[0].chap_user.as_deref(), Some("tenant9"));
    let lines = f.rec.lines();
    assert!(lines.iter().all(|l| !l.contains(secret)), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and an iSCSI target (tgtd, or LIO in the lab VM)"]
async fn unexport_cuts_the_initiator_off_and_is_idempotent() {
    let f = fixture();
    let path = f.volume("vol-u", 16 * MIB);
    let s = f.spec("vol-u", &path, &[INITIATOR], None);
    f.exp.export(&s).await.unwrap();
    let a = f.initiator(&s.target_iqn, INITIATOR);
    a.io(&["write -P 0x11 0 64k"]).unwrap();
    f.exp.unexport(&s.target_iqn).await.unwrap();
    f.exp.unexport(&s.target_iqn).await.unwrap();
    assert!(a.io(&["read 0 4k"]).is_err());
    assert!(f.exp.list().await.unwrap().is_empty());
    assert!(!f.exports.show().contains(s.target_iqn.as_str()));
    // The data stays in the volume.
    assert_eq!(first_bytes(&path, 4), [0x11; 4]);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and an iSCSI target (tgtd, or LIO in the lab VM)"]
async fn restore_recreates_every_export_the_target_forgot() {
    let mut f = fixture();
    let specs: Vec<ExportSpec> = (0..2)
        .map(|i| {
            let name = format!("vol-r{i}");
            let path = f.volume(&name, 16 * MIB);
            f.spec(&name, &path, &[INITIATOR], None)
        })
        .collect();
    for (i, s) in specs.iter().enumerate() {
        f.exp.export(s).await.unwrap();
        f.initiator(&s.target_iqn, INITIATOR)
            .io(&[&format!("write -P 0x{:x} 0 64k", 0x60 + i)])
            .unwrap();
    }
    // tgtd restarted, or the host rebooted: the target knows nothing.
    f.exports.forget_all();
    assert!(f.exp.list().await.unwrap().is_empty());
    let report = f.exp.restore(&specs).await.unwrap();
    assert_eq!(report.restored.len(), 2, "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    for (i, s) in specs.iter().enumerate() {
        f.initiator(&s.target_iqn, INITIATOR)
            .io(&[&format!("read -P 0x{:x} 0 64k", 0x60 + i)])
            .unwrap();
    }
    // A second restore finds nothing to do.
    let again = f.exp.restore(&specs).await.unwrap();
    assert_eq!(again.unchanged.len(), 2, "{again:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and an iSCSI target (tgtd, or LIO in the lab VM)"]
async fn refresh_size_shows_a_grown_volume() {
    let f = fixture();
    let path = f.volume("vol-g", 32 * MIB);
    let s = f.spec("vol-g", &path, &[INITIATOR], None);
    f.exp.export(&s).await.unwrap();
    let a = f.initiator(&s.target_iqn, INITIATOR);
    a.io(&["write -P 0x5a 0 64k"]).unwrap();
    assert_eq!(a.length().unwrap(), 32 * MIB);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(96 * MIB)
        .unwrap();
    f.exp.refresh_size(&s).await.unwrap();
    assert_eq!(a.length().unwrap(), 96 * MIB);
    a.io(&[
        "read -P 0x5a 0 64k",
        "write -P 0x6b 95M 64k",
        "read -P 0x6b 95M 64k",
    ])
    .unwrap();
}
