use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::super::lio::configfs::{BackingKind, ConfigFs};
use super::fake_configfs::*;
use super::*;
use crate::error::ErrorKind;
use crate::export::{matches_spec, ExportHealth};
use crate::runner::{FakeRunner, Output};
use crate::types::Chap;

const PREFIX: &str = "iqn.2026-11.io.stratus.test";
const VOL_A: &str = "0b5c1e2a-7d4f-4b8e-9a61-3f2d9c8e7a10";
const VOL_B: &str = "5e7f9a1b-2c3d-4e5f-8a9b-0c1d2e3f4a5b";
const H1: &str = "iqn.1993-08.org.debian:01:host1";
const H2: &str = "iqn.1993-08.org.debian:01:host2";
const N1: &str = "nqn.1993-08.org.debian:01:host1";
const N2: &str = "nqn.1993-08.org.debian:01:host2";

struct Lab {
    _dir: tempfile::TempDir,
    fs: Arc<FakeNvmet>,
    runner: FakeRunner,
    exp: NvmetExporter,
}

fn lab() -> Lab {
    let (dir, fs) = FakeNvmet::new(true);
    lab_on(dir, fs, FakeRunner::new(), "192.0.2.10:4420")
}

fn lab_on(dir: tempfile::TempDir, fs: Arc<FakeNvmet>, runner: FakeRunner, portal: &str) -> Lab {
    let stat: Arc<StatFn> = Arc::new(|p: &Path| {
        if p.starts_with("/dev/lab") || p.starts_with("/srv") {
            Ok(BackingKind::Block)
        } else {
            Err(std::io::Error::from_raw_os_error(libc::ENOENT))
        }
    });
    let exp = NvmetExporter::with_host(
        Arc::new(runner.clone()),
        NvmetConfig {
            configfs_root: fs.root.clone(),
            portal: portal.into(),
            iqn_prefix: PREFIX.into(),
            ..NvmetConfig::default()
        },
        fs.clone(),
        stat,
    )
    .unwrap();
    Lab {
        _dir: dir,
        fs,
        runner,
        exp,
    }
}

fn nqn(vol: &str) -> String {
    format!("nqn.2026-11.io.stratus.test:{vol}")
}

fn lv(vol: &str) -> PathBuf {
    PathBuf::from(format!("/dev/lab/vol-{vol}"))
}

fn spec(vol: &str, initiators: &[&str]) -> ExportSpec {
    ExportSpec {
        target_iqn: format!("{PREFIX}:{vol}").parse().unwrap(),
        backing_path: lv(vol),
        initiators: initiators.iter().map(|i| i.parse().unwrap()).collect(),
        chap: None,
    }
}

impl Lab {
    fn at(&self, rel: &str) -> PathBuf {
        self.fs.root.join("nvmet").join(rel)
    }
    fn attr(&self, rel: &str) -> String {
        std::fs::read_to_string(self.at(rel)).unwrap()
    }
    fn links(&self) -> Vec<String> {
        links_under(&self.fs.root.join("nvmet"))
    }
    fn live(&self) -> Vec<LiveExport> {
        block_on(self.exp.list()).unwrap()
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn export_builds_subsystem_namespace_hosts_and_port() {
    let lab = lab();
    let s = spec(VOL_A, &[H1, H2]);
    block_on(lab.exp.export(&s)).unwrap();
    let sub = format!("subsystems/{}", nqn(VOL_A));
    assert_eq!(lab.attr("ports/1/addr_trtype"), "tcp\n");
    assert_eq!(lab.attr("ports/1/addr_adrfam"), "ipv4\n");
    assert_eq!(lab.attr("ports/1/addr_traddr"), "192.0.2.10\n");
    assert_eq!(lab.attr("ports/1/addr_trsvcid"), "4420\n");
    assert_eq!(lab.attr(&format!("{sub}/attr_allow_any_host")), "0\n");
    assert_eq!(
        lab.attr(&format!("{sub}/attr_serial")),
        "0b5c1e2a7d4f4b8e9a61\n"
    );
    assert_eq!(
        lab.attr(&format!("{sub}/namespaces/1/device_path")),
        format!("{}\n", lv(VOL_A).display())
    );
    assert_eq!(
        lab.attr(&format!("{sub}/namespaces/1/device_uuid")),
        format!("{VOL_A}\n")
    );
    assert_eq!(lab.attr(&format!("{sub}/namespaces/1/enable")), "1\n");
    assert_eq!(
        lab.links(),
        vec![
            format!("ports/1/subsystems/{}", nqn(VOL_A)),
            format!("{sub}/allowed_hosts/{N1}"),
            format!("{sub}/allowed_hosts/{N2}"),
        ]
    );
    // The port link comes last: no host connects to a half-made subsystem.
    let ops = lab.fs.ops();
    assert!(
        ops.last()
            .unwrap()
            .starts_with("symlink nvmet/ports/1/subsystems/"),
        "{ops:?}"
    );
    let live = lab.live();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].health, ExportHealth::Whole);
    assert!(matches_spec(&live[0], &s), "{live:?}");
    assert!(lab.fs.connect(&nqn(VOL_A), N1));
    assert!(!lab
        .fs
        .connect(&nqn(VOL_A), "nqn.1993-08.org.debian:01:intruder"));
}

#[test]
fn export_again_changes_nothing() {
    let lab = lab();
    let s = spec(VOL_A, &[H1]);
    block_on(lab.exp.export(&s)).unwrap();
    lab.fs.clear_ops();
    block_on(lab.exp.export(&s)).unwrap();
    assert_eq!(lab.fs.ops(), Vec::<String>::new());
}

#[test]
fn revoking_a_host_ends_its_connection_and_refuses_it() {
    let lab = lab();
    block_on(lab.exp.export(&spec(VOL_A, &[H1, H2]))).unwrap();
    assert!(lab.fs.connect(&nqn(VOL_A), N1));
    assert!(lab.fs.connect(&nqn(VOL_A), N2));
    block_on(lab.exp.export(&spec(VOL_A, &[H1]))).unwrap();
    // nvmet keeps a removed host's controllers: the exporter unlinks the
    // subsystem from the port, which ends them all.
    assert!(lab.fs.connected(&nqn(VOL_A)).is_empty());
    assert!(
        lab.fs.connect(&nqn(VOL_A), N1),
        "the host still allowed reconnects"
    );
    assert!(
        !lab.fs.connect(&nqn(VOL_A), N2),
        "the revoked host is refused"
    );
    assert!(
        !lab.at(&format!("hosts/{N2}")).exists(),
        "unused host removed"
    );
    assert!(lab.at(&format!("hosts/{N1}")).exists());
    assert!(matches_spec(&lab.live()[0], &spec(VOL_A, &[H1])));
}

#[test]
fn adding_a_host_keeps_connections() {
    let lab = lab();
    block_on(lab.exp.export(&spec(VOL_A, &[H1]))).unwrap();
    assert!(lab.fs.connect(&nqn(VOL_A), N1));
    block_on(lab.exp.export(&spec(VOL_A, &[H1, H2]))).unwrap();
    assert!(lab.fs.connected(&nqn(VOL_A)).contains(N1));
}

#[test]
fn unexport_removes_everything_and_ends_connections() {
    let lab = lab();
    block_on(lab.exp.export(&spec(VOL_A, &[H1]))).unwrap();
    block_on(lab.exp.export(&spec(VOL_B, &[H1, H2]))).unwrap();
    assert!(lab.fs.connect(&nqn(VOL_A), N1));
    let a = spec(VOL_A, &[]).target_iqn;
    block_on(lab.exp.unexport(&a)).unwrap();
    assert!(lab.fs.connected(&nqn(VOL_A)).is_empty());
    assert!(!lab.at(&format!("subsystems/{}", nqn(VOL_A))).exists());
    // host1 is still allowed on B: its host entry stays.
    assert!(lab.at(&format!("hosts/{N1}")).exists());
    block_on(lab.exp.unexport(&a)).unwrap();
    block_on(lab.exp.unexport(&spec(VOL_B, &[]).target_iqn)).unwrap();
    assert_eq!(lab.links(), Vec::<String>::new());
    assert!(std::fs::read_dir(lab.at("hosts")).unwrap().next().is_none());
    assert!(std::fs::read_dir(lab.at("subsystems"))
        .unwrap()
        .next()
        .is_none());
    assert!(lab.live().is_empty());
}

/// What a crash at each step of an export or unexport leaves (the
/// `nvmet::` crash points) is finished by the next export (pdiskd rolls
/// export intents forward) or unexport (unexports are committed first).
#[test]
fn half_made_exports_and_unexports_are_finished() {
    let lab = lab();
    let a = spec(VOL_A, &[H1, H2]);
    let sub = lab.at(&format!("subsystems/{}", nqn(VOL_A)));
    // Export interrupted after the subsystem, and after a host entry.
    lab.fs.mkdir(&sub).unwrap();
    lab.fs.mkdir(&lab.at(&format!("hosts/{N1}"))).unwrap();
    assert!(!matches_spec(&lab.live()[0], &a));
    block_on(lab.exp.restore(std::slice::from_ref(&a))).unwrap();
    assert!(matches_spec(&lab.live()[0], &a), "{:?}", lab.live());
    assert!(lab.fs.connect(&nqn(VOL_A), N1));

    // Unexport interrupted after the subsystem's rmdir: its host entries
    // are left, and nothing says whose they were.
    let b = spec(VOL_B, &[H2]);
    block_on(lab.exp.export(&b)).unwrap();
    let fs: &dyn ConfigFs = lab.fs.as_ref();
    fs.unlink(&lab.at(&format!("ports/1/subsystems/{}", nqn(VOL_A))))
        .unwrap();
    for n in [N1, N2] {
        fs.unlink(&sub.join("allowed_hosts").join(n)).unwrap();
    }
    fs.write(&sub.join("namespaces/1/enable"), "0").unwrap();
    fs.rmdir(&sub.join("namespaces/1")).unwrap();
    fs.rmdir(&sub).unwrap();
    block_on(lab.exp.unexport(&a.target_iqn)).unwrap();
    // host1 went; host2 stays, VOL_B allows it.
    assert!(!lab.at(&format!("hosts/{N1}")).exists());
    assert!(lab.at(&format!("hosts/{N2}")).exists());
    assert!(matches_spec(&lab.live()[0], &b));
    // A revocation interrupted after the host's link went (the port link
    // went first, so its connections ended): the retry removes its entry.
    let ab = spec(VOL_A, &[H1, H2]);
    block_on(lab.exp.export(&ab)).unwrap();
    fs.unlink(&lab.at(&format!("ports/1/subsystems/{}", nqn(VOL_A))))
        .unwrap();
    fs.unlink(&sub.join("allowed_hosts").join(N1)).unwrap();
    block_on(lab.exp.export(&spec(VOL_A, &[H2]))).unwrap();
    assert!(!lab.at(&format!("hosts/{N1}")).exists());
    assert!(lab.fs.connect(&nqn(VOL_A), N2));
    // An unexport interrupted after the hosts' links, before the rmdirs.
    fs.unlink(&lab.at(&format!("ports/1/subsystems/{}", nqn(VOL_A))))
        .unwrap();
    fs.unlink(&sub.join("allowed_hosts").join(N2)).unwrap();
    block_on(lab.exp.unexport(&a.target_iqn)).unwrap();
    block_on(lab.exp.unexport(&b.target_iqn)).unwrap();
    assert!(std::fs::read_dir(lab.at("hosts")).unwrap().next().is_none());
    assert_eq!(lab.links(), Vec::<String>::new());
}

#[test]
fn chap_eui_and_foreign_prefix_are_refused_with_nothing_changed() {
    let lab = lab();
    let mut s = spec(VOL_A, &[H1]);
    s.chap = Some(Chap::new("agent", "s3cr3t-Pa55word").unwrap());
    let e = block_on(lab.exp.export(&s)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("DH-HMAC-CHAP"), "{e}");
    assert!(!e.to_string().contains("s3cr3t"), "{e}");
    let e = block_on(lab.exp.export(&spec(VOL_A, &["eui.0123456789abcdef"]))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let mut s = spec(VOL_A, &[H1]);
    s.target_iqn = format!("iqn.2026-11.io.other:{VOL_A}").parse().unwrap();
    let e = block_on(lab.exp.export(&s)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let mut s = spec(VOL_A, &[H1]);
    s.backing_path = PathBuf::from("/nonexistent/lv");
    let e = block_on(lab.exp.export(&s)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(lab.fs.ops(), Vec::<String>::new());
}

#[test]
fn restore_after_reboot_and_drift() {
    let lab = lab();
    let a = spec(VOL_A, &[H1]);
    let b = spec(VOL_B, &[H2]);
    block_on(lab.exp.export(&a)).unwrap();
    block_on(lab.exp.export(&b)).unwrap();
    lab.fs.reboot();
    assert!(lab.live().is_empty());
    let report = block_on(lab.exp.restore(std::slice::from_ref(&a))).unwrap();
    assert_eq!(report.restored, vec![a.target_iqn.to_string()]);
    assert!(matches_spec(&lab.live()[0], &a));
    // Drift: the namespace disabled by hand, an unknown subsystem of ours.
    std::fs::write(
        lab.at(&format!("subsystems/{}/namespaces/1/enable", nqn(VOL_A))),
        "0\n",
    )
    .unwrap();
    block_on(lab.exp.export(&b)).unwrap();
    let live = lab.live();
    let la = live
        .iter()
        .find(|l| l.target_iqn == a.target_iqn.as_str())
        .unwrap();
    assert!(matches!(la.health, ExportHealth::Broken(ref w) if w.contains("not enabled")));
    let report = block_on(lab.exp.restore(std::slice::from_ref(&a))).unwrap();
    assert_eq!(report.restored, vec![a.target_iqn.to_string()]);
    assert_eq!(report.unknown, vec![b.target_iqn.to_string()]);
    assert!(lab.live().iter().all(|l| l.health.is_whole()));
}

#[test]
fn a_new_backing_is_swapped_with_the_namespace_disabled() {
    let lab = lab();
    let mut s = spec(VOL_A, &[H1]);
    block_on(lab.exp.export(&s)).unwrap();
    lab.fs.clear_ops();
    s.backing_path = PathBuf::from("/dev/lab/other");
    block_on(lab.exp.export(&s)).unwrap();
    let ns = format!("nvmet/subsystems/{}/namespaces/1", nqn(VOL_A));
    assert_eq!(
        lab.fs.ops(),
        vec![
            format!("write {ns}/enable=0"),
            format!("write {ns}/device_path=/dev/lab/other"),
            format!("write {ns}/enable=1"),
        ]
    );
}

#[test]
fn the_port_follows_the_portal_and_foreign_ports_are_left_alone() {
    let lab = lab();
    block_on(lab.exp.export(&spec(VOL_A, &[H1]))).unwrap();
    assert!(lab.fs.connect(&nqn(VOL_A), N1));
    // pdiskd restarted with another portal (IPv6): the port is re-addressed.
    let Lab { _dir, fs, .. } = lab;
    let lab = lab_on(_dir, fs, FakeRunner::new(), "[2001:db8::10]:4421");
    block_on(lab.exp.export(&spec(VOL_A, &[H1]))).unwrap();
    assert_eq!(lab.attr("ports/1/addr_adrfam"), "ipv6\n");
    assert_eq!(lab.attr("ports/1/addr_traddr"), "2001:db8::10\n");
    assert_eq!(lab.attr("ports/1/addr_trsvcid"), "4421\n");
    assert!(lab.live()[0].health.is_whole());
    // A subsystem of someone else's on the port: not ours to re-address.
    std::fs::create_dir(lab.at("subsystems/nqn.2014-08.org.example:theirs")).unwrap();
    std::os::unix::fs::symlink(
        lab.at("subsystems/nqn.2014-08.org.example:theirs"),
        lab.at("ports/1/subsystems/nqn.2014-08.org.example:theirs"),
    )
    .unwrap();
    let Lab { _dir, fs, .. } = lab;
    let lab = lab_on(_dir, fs, FakeRunner::new(), "192.0.2.10:4420");
    let e = block_on(lab.exp.export(&spec(VOL_B, &[H1]))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("example:theirs"), "{e}");
    assert_eq!(lab.attr("ports/1/addr_traddr"), "2001:db8::10\n");
}

#[test]
fn refresh_size_revalidates_and_needs_an_export() {
    let lab = lab();
    let s = spec(VOL_A, &[H1]);
    let e = block_on(lab.exp.refresh_size(&s)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    block_on(lab.exp.export(&s)).unwrap();
    lab.fs.clear_ops();
    block_on(lab.exp.refresh_size(&s)).unwrap();
    assert_eq!(
        lab.fs.ops(),
        vec![format!(
            "write nvmet/subsystems/{}/namespaces/1/revalidate_size=1",
            nqn(VOL_A)
        )]
    );
}

#[test]
fn modules_are_loaded_once_when_missing() {
    let (dir, fs) = FakeNvmet::new(false);
    let fs2 = fs.clone();
    let runner = FakeRunner::with(move |argv| {
        if argv[0] == "modprobe" {
            fs2.load();
        }
        Ok(Output::ok(""))
    });
    let lab = lab_on(dir, fs, runner, "127.0.0.1:4420");
    block_on(lab.exp.export(&spec(VOL_A, &[H1]))).unwrap();
    block_on(lab.exp.export(&spec(VOL_B, &[H1]))).unwrap();
    assert_eq!(
        lab.runner.command_lines(),
        vec!["modprobe -a nvmet nvmet_tcp".to_string()]
    );
    // Modules that never load: Unavailable, and modprobe is not retried.
    let (dir, fs) = FakeNvmet::new(false);
    let runner = FakeRunner::with(|_| Ok(Output::failed(1, "FATAL: Module nvmet not found")));
    let lab = lab_on(dir, fs, runner, "127.0.0.1:4420");
    for _ in 0..2 {
        let e = block_on(lab.exp.export(&spec(VOL_A, &[H1]))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    }
    assert_eq!(lab.runner.command_lines().len(), 1);
}

#[test]
fn a_portal_that_is_not_an_address_is_refused() {
    let (_dir, fs) = FakeNvmet::new(true);
    let stat: Arc<StatFn> = Arc::new(|_: &Path| Ok(BackingKind::Block));
    let cfg = NvmetConfig {
        configfs_root: fs.root.clone(),
        portal: "storage.example:4420".into(),
        ..NvmetConfig::default()
    };
    let e = NvmetExporter::with_host(Arc::new(FakeRunner::new()), cfg, fs, stat)
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}
