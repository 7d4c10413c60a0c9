//! The lab variant of the data path scenario (`stratus-bench --only
//! datapath-lab`, issue 16), run inside the lab VM by `scripts/lab
//! datapath`: the kernel's targets and initiators, which this host's kernel
//! lacks. Three thin LVs of one pool, each written once first (a thin LV
//! reads unprovisioned blocks as zeros without I/O):
//! - `local`: the LV itself, as agentd opens a same-host LV (`host_device`,
//!   O_DIRECT, io_uring or native);
//! - `lio`: an LV exported by pdisk's LIO exporter (iblock, pdisk's iSCSI
//!   parameters) on 127.0.0.1:3260, logged in by open-iscsi, and opened as
//!   the SCSI disk it becomes (`/dev/sdX`), as agentd `--attach kernel`
//!   hands it to QEMU;
//! - `nvme`: an LV exported by pdisk's nvmet exporter on 127.0.0.1:4420,
//!   connected with `nvme connect -t tcp`, opened as `/dev/nvmeXnY`.
//!
//! Each case is run on the three, interleaved, median of the runs (the
//! same [`Bench`] as the host scenario). Everything runs in one VM, so the
//! target and the initiator share its 2 vCPUs, and under TCG (no KVM on
//! the lab's host) every instruction is emulated: the ratios compare the
//! paths in one run, the absolute figures mean nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pdisk::export::lio::{LioConfig, LioExporter};
use pdisk::export::nvmet::{NvmetConfig, NvmetExporter};
use pdisk::export::{ExportSpec, Exporter, IscsiParams};
use stratus_core::runner::HostRunner;
use stratus_core::types::Iqn;
use tokio::runtime::Handle;

use super::{goals, matrix, peer_of, run_ok, Bench, Plan, Subject, Target, MIB};
use crate::report::Figure;

const PREFIX: &str = "iqn.2026-11.io.stratus.bench";
const POOL: &str = "dpbench";
const ISCSI_PORTAL: &str = "127.0.0.1:3260";
const NVME_PORTAL: &str = "127.0.0.1:4420";
const DEVICE_WAIT: Duration = Duration::from_secs(60);

/// The cases: the goals' four, plus 4 KiB random reads and writes at queue
/// depth 1 (where peers report NVMe/TCP's largest gain over iSCSI).
fn cases() -> Vec<(super::Pattern, u32)> {
    let mut c = goals();
    c.extend(
        matrix()
            .into_iter()
            .filter(|(p, d)| p.random && p.flush_every == 0 && *d == 1),
    );
    c
}

pub async fn run(ctx: &super::super::Ctx) -> anyhow::Result<Vec<Figure>> {
    let plan = if ctx.quick {
        Plan {
            quick: true,
            vol_size: 64 * MIB,
            run_secs: 0.0,
            reps: 1,
        }
    } else {
        Plan {
            quick: false,
            vol_size: 256 * MIB,
            run_secs: 0.7,
            reps: 7,
        }
    };
    let rt = Handle::current();
    tokio::task::spawn_blocking(move || run_blocking(&rt, &plan))
        .await
        .context("lab data path task")?
}

/// The volume group: `STRATUS_LAB_VG`, as the lab's topologies set it.
fn vg() -> String {
    std::env::var("STRATUS_LAB_VG").unwrap_or_else(|_| "lab".into())
}

/// The thin pool and its LVs; removed when dropped.
struct Lvs {
    vg: String,
}

impl Lvs {
    fn create(size: u64, names: &[&str]) -> anyhow::Result<Lvs> {
        let vg = vg();
        let pool_mib = (size / MIB) * (names.len() as u64 + 1);
        run_ok(
            "lvcreate",
            &[
                "-q",
                "-y",
                "--type",
                "thin-pool",
                "-L",
                &format!("{pool_mib}m"),
                "-n",
                POOL,
                &vg,
            ],
        )
        .context("creating the thin pool (the lab VM's volume group)")?;
        let lvs = Lvs { vg };
        for n in names {
            run_ok(
                "lvcreate",
                &[
                    "-q",
                    "-y",
                    "-V",
                    &format!("{}m", size / MIB),
                    "-T",
                    &format!("{}/{POOL}", lvs.vg),
                    "-n",
                    n,
                ],
            )?;
        }
        Ok(lvs)
    }

    fn path(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/dev/{}/{name}", self.vg))
    }
}

impl Drop for Lvs {
    fn drop(&mut self) {
        if let Err(e) = run_ok("lvremove", &["-q", "-y", &format!("{}/{POOL}", self.vg)]) {
            eprintln!("  warning: removing the bench's thin pool: {e:#}");
        }
    }
}

/// The initiator IQN open-iscsi logs in with (the lab image sets it).
fn vm_iqn() -> anyhow::Result<Iqn> {
    let f = std::fs::read_to_string("/etc/iscsi/initiatorname.iscsi")
        .context("reading /etc/iscsi/initiatorname.iscsi")?;
    let name = f
        .lines()
        .find_map(|l| l.trim().strip_prefix("InitiatorName="))
        .context("no InitiatorName in /etc/iscsi/initiatorname.iscsi")?;
    Ok(name.parse()?)
}

fn spec(iqn: &Iqn, lv: &Path, initiator: &Iqn) -> ExportSpec {
    ExportSpec {
        target_iqn: iqn.clone(),
        backing_path: lv.to_path_buf(),
        initiators: vec![initiator.clone()],
        chap: None,
    }
}

/// Polls `find` until it answers or `DEVICE_WAIT` passes.
fn wait_for(what: &str, mut find: impl FnMut() -> Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let t = Instant::now();
    while t.elapsed() < DEVICE_WAIT {
        if let Some(p) = find() {
            return Ok(p);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("{what} did not appear within {DEVICE_WAIT:?}")
}

/// Logs open-iscsi in to LUN 1 of `target`; returns its SCSI disk.
fn iscsi_login(target: &str) -> anyhow::Result<PathBuf> {
    let node = ["-m", "node", "-T", target, "-p", ISCSI_PORTAL];
    run_ok("iscsiadm", &[&node[..], &["-o", "new"]].concat())?;
    run_ok("iscsiadm", &[&node[..], &["--login"]].concat())?;
    let link = PathBuf::from(format!(
        "/dev/disk/by-path/ip-{ISCSI_PORTAL}-iscsi-{target}-lun-1"
    ));
    let dev = wait_for(&link.display().to_string(), || {
        link.exists().then(|| link.clone())
    })?;
    Ok(std::fs::canonicalize(dev)?)
}

fn iscsi_logout(target: &str) {
    let node = ["-m", "node", "-T", target, "-p", ISCSI_PORTAL];
    let _ = run_ok("iscsiadm", &[&node[..], &["--logout"]].concat());
    let _ = run_ok("iscsiadm", &[&node[..], &["-o", "delete"]].concat());
}

/// Connects to namespace 1 of `nqn` as `host`; returns its block device,
/// found by the namespace UUID nvmet serves (`wwid` = `uuid.<uuid>`).
fn nvme_connect(nqn: &str, host: &str, uuid: &uuid::Uuid) -> anyhow::Result<PathBuf> {
    let (addr, port) = NVME_PORTAL.split_once(':').expect("IP:PORT");
    run_ok(
        "nvme",
        &[
            "connect", "-t", "tcp", "-a", addr, "-s", port, "-n", nqn, "-q", host,
        ],
    )?;
    let want = format!("uuid.{uuid}");
    wait_for(&format!("the NVMe namespace {want}"), || {
        let it = std::fs::read_dir("/sys/block").ok()?;
        it.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            // nvmeXnY is the multipath head; nvmeXcYnZ its hidden path.
            .filter(|n| n.starts_with("nvme") && !n.contains('c'))
            .find(|n| {
                std::fs::read_to_string(format!("/sys/block/{n}/wwid"))
                    .is_ok_and(|w| w.trim() == want)
            })
            .map(|n| PathBuf::from(format!("/dev/{n}")))
    })
}

fn run_blocking(rt: &Handle, plan: &Plan) -> anyhow::Result<Vec<Figure>> {
    for tool in ["lvcreate", "iscsiadm", "nvme"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is missing: datapath-lab runs inside the lab VM (scripts/lab datapath)");
        }
    }
    let initiator = vm_iqn()?;
    let host_nqn = initiator.to_nqn()?;
    let lvs = Lvs::create(plan.vol_size, &["dp-local", "dp-lio", "dp-nvme"])?;
    let t = Instant::now();
    for n in ["dp-local", "dp-lio", "dp-nvme"] {
        super::fill_volume(&lvs.path(n), "host_device", plan.vol_size)?;
    }
    eprintln!(
        "  3 thin LVs of {} MiB written in {:.1} s",
        plan.vol_size / MIB,
        t.elapsed().as_secs_f64()
    );

    let runner = Arc::new(HostRunner);
    let lio = LioExporter::new(
        runner.clone(),
        LioConfig {
            portal: ISCSI_PORTAL.into(),
            iqn_prefix: PREFIX.into(),
            params: IscsiParams::measured_default(),
            ..LioConfig::default()
        },
    );
    let nvmet = NvmetExporter::new(
        runner,
        NvmetConfig {
            portal: NVME_PORTAL.into(),
            iqn_prefix: PREFIX.into(),
            ..NvmetConfig::default()
        },
    )?;
    let lio_uuid = uuid::Uuid::new_v4();
    let nvme_uuid = uuid::Uuid::new_v4();
    let lio_iqn: Iqn = format!("{PREFIX}:{lio_uuid}").parse()?;
    let nvme_iqn: Iqn = format!("{PREFIX}:{nvme_uuid}").parse()?;
    rt.block_on(lio.export(&spec(&lio_iqn, &lvs.path("dp-lio"), &initiator)))
        .context("LIO export")?;
    rt.block_on(nvmet.export(&spec(&nvme_iqn, &lvs.path("dp-nvme"), &initiator)))
        .context("nvmet export")?;
    let result = (|| {
        let sd = iscsi_login(lio_iqn.as_str())?;
        let nvme = nvme_connect(&nvme_iqn.to_nqn()?, &host_nqn, &nvme_uuid)?;
        eprintln!(
            "  LIO LUN as {} (open-iscsi), nvmet namespace as {} (nvme-tcp)",
            sd.display(),
            nvme.display()
        );
        measure(plan, &lvs, &sd, &nvme)
    })();
    let _ = run_ok("nvme", &["disconnect", "-n", &nvme_iqn.to_nqn()?]);
    iscsi_logout(lio_iqn.as_str());
    for (exp, iqn) in [
        (&lio as &dyn Exporter, &lio_iqn),
        (&nvmet as &dyn Exporter, &nvme_iqn),
    ] {
        if let Err(e) = rt.block_on(exp.unexport(iqn)) {
            eprintln!("  warning: unexport of {iqn}: {e}");
        }
    }
    drop(lvs);
    result
}

/// io_uring where this QEMU has it for block devices (as agentd decides),
/// else Linux AIO.
fn device_aio(dev: &Path) -> &'static str {
    let opts = format!(
        "driver=raw,file.driver=host_device,file.filename={},file.aio=io_uring",
        dev.display()
    );
    let ok = Command::new("qemu-img")
        .args(["info", "--image-opts", &opts])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        "io_uring"
    } else {
        "native"
    }
}

fn measure(plan: &Plan, lvs: &Lvs, sd: &Path, nvme: &Path) -> anyhow::Result<Vec<Figure>> {
    let local = lvs.path("dp-local");
    let aio = device_aio(&local);
    let subject = |name: &str, path: &Path| Subject {
        name: name.into(),
        target: Target::Local {
            path: path.to_path_buf(),
            aio,
            driver: "host_device",
        },
        cases: cases(),
        tgtd: None,
    };
    let subjects = vec![
        subject("local", &local),
        subject("lio", sd),
        subject("nvme", nvme),
    ];
    let volumes = [local.clone(), sd.to_path_buf(), nvme.to_path_buf()];
    let bench = Bench {
        plan,
        volumes: &volumes,
        // Flush counting is the host scenario's (its loop device).
        pool_dev: None,
    };
    let measured = bench.all(&subjects)?;
    let (local, lio, nvme) = (&measured[0], &measured[1], &measured[2]);
    let mut figures = Vec::new();
    for m in local {
        figures.push(m.figure(format!("{} (lab VM, local thin LV)", m.label())));
    }
    for (path, what) in [
        (lio, "LIO iSCSI + open-iscsi"),
        (nvme, "nvmet NVMe/TCP + nvme-tcp"),
    ] {
        for m in path {
            figures.push(
                m.figure(format!("{} (lab VM, {what})", m.label()))
                    .against("local thin LV", peer_of(local, m).value),
            );
        }
    }
    for m in nvme {
        figures.push(
            m.figure(format!(
                "{} (lab VM, NVMe/TCP against LIO iSCSI)",
                m.label()
            ))
            .against("LIO iSCSI + open-iscsi", peer_of(lio, m).value),
        );
    }
    Ok(figures)
}
