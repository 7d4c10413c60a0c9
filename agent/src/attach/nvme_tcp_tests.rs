//! Unit tests of the NVMe/TCP host: a fake runner plays nvme-cli and the
//! kernel (a connect makes the controller, the subsystem with its
//! namespace head and the /dev node in a temp directory playing /sys and
//! /dev; a disconnect removes them).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stratus_core::runner::{FakeRunner, Output};
use uuid::Uuid;

use super::*;

const INITIATOR: &str = "iqn.2026-11.io.stratus.agent:host1";
const HOSTNQN: &str = "nqn.2026-11.io.stratus.agent:host1";
const TARGET: &str = "iqn.2026-11.io.stratus.pdisk:vol-1";
const SUBNQN: &str = "nqn.2026-11.io.stratus.pdisk:vol-1";

struct Host {
    dir: tempfile::TempDir,
    runner: FakeRunner,
    /// Connects fail (the target refused the host).
    refuse: Arc<AtomicBool>,
}

fn ns(sub: &str) -> NvmeNamespace {
    NvmeNamespace::new("127.0.0.1:4420".parse().unwrap(), sub, 1).unwrap()
}

fn holder(n: u8) -> Holder {
    Holder::disk(Uuid::from_bytes([n; 16]), "vda")
}

/// The kernel's side of a connect as `host` to `sub`: controller nvmeC,
/// subsystem nvme-subsysC with its head nvmeCn1, /dev/nvmeCn1.
fn connect(root: &Path, sub: &str, host: &str) {
    let n = std::fs::read_dir(root.join("sys/class/nvme"))
        .map(|d| d.count())
        .unwrap_or(0)
        + 10;
    let ctrl = root.join(format!("sys/class/nvme/nvme{n}"));
    std::fs::create_dir_all(&ctrl).unwrap();
    std::fs::write(ctrl.join("subsysnqn"), format!("{sub}\n")).unwrap();
    std::fs::write(ctrl.join("hostnqn"), format!("{host}\n")).unwrap();
    std::fs::write(ctrl.join("transport"), "tcp\n").unwrap();
    std::fs::write(
        ctrl.join("address"),
        "traddr=127.0.0.1,trsvcid=4420,src_addr=127.0.0.1\n",
    )
    .unwrap();
    let subsys = root.join(format!("sys/class/nvme-subsystem/nvme-subsys{n}"));
    std::fs::create_dir_all(subsys.join(format!("nvme{n}n1"))).unwrap();
    // A hidden path and a partition must not be taken for the head.
    std::fs::create_dir_all(subsys.join(format!("nvme{n}c{n}n1"))).unwrap();
    std::fs::write(subsys.join("subsysnqn"), format!("{sub}\n")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::write(root.join(format!("dev/nvme{n}n1")), "").unwrap();
}

/// `nvme disconnect -d nvmeC`: the controller goes; its subsystem (and
/// the head's /dev node) with its last controller.
fn disconnect_controller(root: &Path, name: &str) -> bool {
    let ctrl = root.join("sys/class/nvme").join(name);
    let Ok(sub) = std::fs::read_to_string(ctrl.join("subsysnqn")) else {
        return false;
    };
    std::fs::remove_dir_all(&ctrl).unwrap();
    let left = std::fs::read_dir(root.join("sys/class/nvme"))
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_to_string(e.path().join("subsysnqn")).unwrap() == sub);
    if !left {
        disconnect(root, sub.trim());
    }
    true
}

fn disconnect(root: &Path, sub: &str) {
    for class in ["sys/class/nvme", "sys/class/nvme-subsystem"] {
        for e in std::fs::read_dir(root.join(class)).unwrap().flatten() {
            let nqn = std::fs::read_to_string(e.path().join("subsysnqn")).unwrap();
            if nqn.trim() == sub {
                let name = e.file_name().to_string_lossy().into_owned();
                std::fs::remove_dir_all(e.path()).unwrap();
                if let Some(n) = name.strip_prefix("nvme-subsys") {
                    let _ = std::fs::remove_file(root.join(format!("dev/nvme{n}n1")));
                }
            }
        }
    }
}

fn host() -> Host {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("sys/class/nvme")).unwrap();
    std::fs::create_dir_all(dir.path().join("sys/class/nvme-subsystem")).unwrap();
    let root = dir.path().to_owned();
    let refuse = Arc::new(AtomicBool::new(false));
    let r = refuse.clone();
    let runner = FakeRunner::with(move |argv| {
        let a: Vec<&str> = argv.iter().map(String::as_str).collect();
        match a.as_slice() {
            ["nvme", "connect", "-t", "tcp", "-a", _, "-s", _, "-n", sub, "-q", host] => {
                if r.load(Ordering::SeqCst) {
                    return Ok(Output::failed(
                        1,
                        "could not add new controller: failed to write to nvme-fabrics device",
                    ));
                }
                connect(&root, sub, host);
                Ok(Output::ok(""))
            }
            ["nvme", "disconnect", "-d", name] => {
                if disconnect_controller(&root, name) {
                    Ok(Output::ok(format!("Disconnected {name}\n")))
                } else {
                    Ok(Output::failed(1, format!("Failed to disconnect {name}")))
                }
            }
            ["blockdev", "--flushbufs", _] => Ok(Output::ok("")),
            _ => Ok(Output::failed(99, format!("unexpected {a:?}"))),
        }
    });
    Host {
        dir,
        runner,
        refuse,
    }
}

impl Host {
    fn attacher(&self) -> NvmeAttacher {
        let mut o = NvmeOptions::new(INITIATOR);
        o.sys = self.dir.path().join("sys");
        o.dev = self.dir.path().join("dev");
        o.device_timeout = Duration::from_millis(300);
        NvmeAttacher::new(Arc::new(self.runner.clone()), o)
    }

    fn controllers(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("sys/class/nvme"))
            .unwrap()
            .count()
    }

    fn lines(&self, program: &str) -> Vec<String> {
        self.runner
            .command_lines()
            .into_iter()
            .filter(|l| l.starts_with(program))
            .collect()
    }
}

#[test]
fn the_host_nqn_is_pdiskds_derivation_of_the_initiator_iqn() {
    let o = NvmeOptions::new(INITIATOR);
    assert_eq!(o.host_nqn().unwrap(), HOSTNQN);
    let eui = NvmeOptions::new("eui.0123456789abcdef");
    let e = eui.host_nqn().unwrap_err().to_string();
    assert!(e.contains("only iqn. names"), "{e}");
}

#[tokio::test]
async fn the_export_url_gives_the_namespace_and_must_match_the_target() {
    let url = format!("nvme+tcp://127.0.0.1:4420/{SUBNQN}/1");
    let n = NvmeNamespace::from_export(&url, TARGET).await.unwrap();
    assert_eq!(n, ns(SUBNQN));
    for (bad, target) in [
        (format!("iscsi://127.0.0.1:3260/{TARGET}/1"), TARGET),
        (format!("nvme+tcp://127.0.0.1:4420/{SUBNQN}/x"), TARGET),
        (format!("nvme+tcp://127.0.0.1:4420/{SUBNQN}/0"), TARGET),
        (url.clone(), "iqn.2026-11.io.stratus.pdisk:vol-2"),
        (
            "nvme+tcp://127.0.0.1:4420/nqn.x;reboot/1".to_string(),
            "iqn.x;reboot",
        ),
    ] {
        let e = NvmeNamespace::from_export(&bad, target).await.unwrap_err();
        assert_eq!(
            e.kind(),
            stratus_core::error::ErrorKind::InvalidArgument,
            "{bad}: {e}"
        );
    }
}

#[tokio::test]
async fn attach_connects_once_finds_the_head_by_nqn_and_the_last_detach_disconnects() {
    let h = host();
    let a = h.attacher();
    // Another subsystem, connected by someone else, is never touched.
    connect(
        h.dir.path(),
        "nqn.2026-11.io.other:x",
        "nqn.2014-08.org.nvmexpress:other",
    );
    let dev = a.attach(&holder(1), &ns(SUBNQN)).await.unwrap();
    assert_eq!(dev, h.dir.path().join("dev/nvme11n1"));
    assert_eq!(
        h.lines("nvme"),
        [format!(
            "nvme connect -t tcp -a 127.0.0.1 -s 4420 -n {SUBNQN} -q {HOSTNQN}"
        )]
    );
    // A second holder of the same subsystem: no second connect.
    let again = a.attach(&holder(2), &ns(SUBNQN)).await.unwrap();
    assert_eq!(again, dev);
    assert_eq!(h.lines("nvme").len(), 1);
    assert_eq!(a.holders(&ns(SUBNQN)).await, 2);
    // The first detach (twice: a repeated undo) keeps the controller.
    a.detach(&holder(1), &ns(SUBNQN)).await.unwrap();
    a.detach(&holder(1), &ns(SUBNQN)).await.unwrap();
    assert_eq!(h.controllers(), 2);
    a.detach(&holder(2), &ns(SUBNQN)).await.unwrap();
    assert_eq!(
        h.controllers(),
        1,
        "only the other host's controller is left"
    );
    let lines = h.runner.command_lines();
    assert_eq!(
        lines[lines.len() - 2..],
        [
            format!("blockdev --flushbufs {}", dev.display()),
            "nvme disconnect -d nvme11".to_string()
        ]
    );
    // Detaching what is gone runs nothing.
    h.runner.clear();
    a.detach(&holder(2), &ns(SUBNQN)).await.unwrap();
    assert!(h.runner.command_lines().is_empty());
}

#[tokio::test]
async fn a_refused_connect_is_an_error_naming_nvme_and_leaves_nothing() {
    let h = host();
    h.refuse.store(true, Ordering::SeqCst);
    let a = h.attacher();
    let e = a
        .attach(&holder(1), &ns(SUBNQN))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nvme connect") && e.contains("failed to write"),
        "{e}"
    );
    assert_eq!(h.controllers(), 0);
    assert_eq!(a.holders(&ns(SUBNQN)).await, 0);
}

#[tokio::test]
async fn a_namespace_that_never_appears_is_disconnected_again() {
    let h = host();
    let a = h.attacher();
    // The subsystem serves namespace 1 only.
    let two = NvmeNamespace::new("127.0.0.1:4420".parse().unwrap(), SUBNQN, 2).unwrap();
    let e = a.attach(&holder(1), &two).await.unwrap_err().to_string();
    assert!(e.contains("no block device"), "{e}");
    assert_eq!(h.controllers(), 0);
    assert_eq!(h.lines("nvme disconnect"), ["nvme disconnect -d nvme10"]);
}

/// `nvme disconnect -n SUBNQN` would drop every controller of the
/// subsystem: another host NQN's on it stays, and so does one of ours
/// to another address (another path), when our last holder detaches.
#[tokio::test]
async fn detach_disconnects_only_our_controller_of_the_subsystem() {
    let h = host();
    let a = h.attacher();
    let dev = a.attach(&holder(1), &ns(SUBNQN)).await.unwrap();
    connect(
        h.dir.path(),
        SUBNQN,
        "nqn.2014-08.org.nvmexpress:other-host",
    );
    connect(h.dir.path(), SUBNQN, HOSTNQN);
    std::fs::write(
        h.dir.path().join("sys/class/nvme/nvme12/address"),
        "traddr=192.0.2.7,trsvcid=4420\n",
    )
    .unwrap();
    a.detach(&holder(1), &ns(SUBNQN)).await.unwrap();
    assert_eq!(h.lines("nvme disconnect"), ["nvme disconnect -d nvme10"]);
    let left: Vec<String> = std::fs::read_dir(h.dir.path().join("sys/class/nvme"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(left, ["nvme11", "nvme12"]);
    // The subsystem's head stays for the controllers left.
    assert!(dev.exists());
}

/// A crash at every step of the connect: the restarted attacher adopts
/// what the store recorded (the attachment is recorded before the connect)
/// and the undo disconnects; with nothing recorded, the sweep does.
#[tokio::test]
async fn a_crash_at_any_connect_step_leaves_no_controller_after_restart() {
    for point in crate::failpoints::NVME_POINTS[0].1 {
        for recorded in [true, false] {
            let h = host();
            let a = Arc::new(h.attacher());
            a.arm_crash_point(Some(point));
            let task = {
                let a = a.clone();
                tokio::spawn(async move { a.attach(&holder(1), &ns(SUBNQN)).await })
            };
            assert!(task.await.unwrap_err().is_panic(), "{point}");
            assert_eq!(h.controllers(), 1, "{point}: connected before the crash");
            // agentd again: a fresh attacher.
            let b = h.attacher();
            if recorded {
                b.adopt(holder(1), &ns(SUBNQN)).await;
                assert!(
                    b.reap().await.is_empty(),
                    "{point}: a held controller is kept"
                );
                assert_eq!(h.controllers(), 1);
                b.detach(&holder(1), &ns(SUBNQN)).await.unwrap();
            } else {
                let report = b.reap().await;
                assert_eq!(report.len(), 1, "{point}: {report:?}");
                let line = report[0].as_ref().unwrap();
                assert!(
                    line.contains(SUBNQN) && line.contains("no guest holds it"),
                    "{line}"
                );
            }
            assert_eq!(h.controllers(), 0, "{point} recorded={recorded}");
        }
    }
}

#[tokio::test]
async fn the_sweep_keeps_other_hosts_controllers_and_reports_failures() {
    let h = host();
    connect(
        h.dir.path(),
        SUBNQN,
        "nqn.2014-08.org.nvmexpress:someone-else",
    );
    let a = h.attacher();
    assert!(a.reap().await.is_empty());
    assert_eq!(h.controllers(), 1);
    // Ours, but nvme disconnect fails: reported as an Err line.
    let failing = FakeRunner::with(|_| Ok(Output::failed(1, "Failed to disconnect")));
    connect(h.dir.path(), "nqn.2026-11.io.stratus.pdisk:vol-9", HOSTNQN);
    let mut o = NvmeOptions::new(INITIATOR);
    o.sys = h.dir.path().join("sys");
    o.dev = h.dir.path().join("dev");
    let b = NvmeAttacher::new(Arc::new(failing), o);
    let report = b.reap().await;
    assert_eq!(report.len(), 1);
    assert!(report[0]
        .as_ref()
        .unwrap_err()
        .contains("Failed to disconnect"));
}

#[test]
fn only_namespace_heads_of_the_nsid_match() {
    assert!(is_namespace_of("nvme0n1", 1));
    assert!(is_namespace_of("nvme12n1", 1));
    assert!(!is_namespace_of("nvme0c0n1", 1));
    assert!(!is_namespace_of("nvme0n1p1", 1));
    assert!(!is_namespace_of("nvme0n2", 1));
    assert!(!is_namespace_of("nvme-subsys0", 1));
    assert!(!is_namespace_of("nvmen1", 1));
}

#[tokio::test]
async fn the_probe_names_a_missing_nvme_cli_or_nvme_tcp_module() {
    let dir = tempfile::tempdir().unwrap();
    let attacher = |runner: FakeRunner| {
        let mut o = NvmeOptions::new(INITIATOR);
        o.sys = dir.path().join("sys");
        NvmeAttacher::new(Arc::new(runner), o)
    };
    let no_cli = FakeRunner::with(|argv| match argv[0].as_str() {
        "nvme" => Err(stratus_core::error::Error::unavailable(
            "nvme: No such file or directory",
        )),
        _ => Ok(Output::ok("")),
    });
    let e = attacher(no_cli).probe().await.unwrap_err().to_string();
    assert!(e.contains("need nvme-cli"), "{e}");
    let no_module = FakeRunner::with(|argv| match argv[0].as_str() {
        "nvme" => Ok(Output::ok("nvme version 2.4\n")),
        _ => Ok(Output::failed(
            1,
            "modprobe: FATAL: Module nvme_tcp not found",
        )),
    });
    let e = attacher(no_module.clone())
        .probe()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nvme_tcp module") && e.contains("not found"),
        "{e}"
    );
    // Loaded already: no modprobe.
    std::fs::create_dir_all(dir.path().join("sys/module/nvme_tcp")).unwrap();
    let fine = FakeRunner::with(|argv| match argv[0].as_str() {
        "nvme" => Ok(Output::ok("nvme version 2.4\n")),
        _ => Ok(Output::failed(99, "unexpected")),
    });
    assert_eq!(
        attacher(fine.clone()).probe().await.unwrap(),
        "nvme version 2.4"
    );
    assert_eq!(fine.command_lines(), ["nvme version"]);
}
