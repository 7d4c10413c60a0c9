//! The lab VM's stacks pdisk/tests/faults.rs walks, and what it checks on
//! them (STRATUS_STACK=lvm-lio, set by scripts/lab-vm/faults):
//!
//! - lvm+lio: a thin pool of the test's own exported by the kernel's LIO
//!   (the `service::`, `lvm::` and `lio::` points);
//! - lvm+nvmet (and STRATUS_FAULTS_EXPORT=nvmet): the same thin pool
//!   exported by the kernel's nvmet on a port of the test's own (`service::`,
//!   `lvm::`, `nvmet::`; pdiskd drops the exports' CHAP, nvmet has none).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use pdisk::export::lio::{LioConfig, LioExporter};
use pdisk::export::nvmet::{NvmetConfig, NvmetExporter};
use pdisk::export::Exporter;
use pdisk::failpoints::{LVM_LIO, LVM_NVMET};
use stratus_core::runner::HostRunner;
use stratus_proto::pdisk::v1 as pb;
use testkit::*;

/// The nvmet port (and its TCP port) of the lvm-nvmet walk.
const NVMET_PORT_ID: u32 = 7;
const NVMET_PORTAL: &str = "127.0.0.1:4427";
const CONFIGFS: &str = "/sys/kernel/config";

enum Target {
    Lio(Lio),
    Nvmet { iqn_prefix: String },
}

/// The thin pool and exporter under a pdiskd-failpoints. Drop the pdiskd
/// first (nvmet's cleanup and the pool's removal come after it).
pub struct LvmStack {
    pub name: &'static str,
    /// The layers whose crash points this stack reaches.
    pub layers: &'static [&'static str],
    exporter: Box<dyn Exporter>,
    target: Target,
    pool: ThinPool,
}

impl LvmStack {
    /// The stack and its pdiskd-failpoints, with no failpoint set.
    pub fn start() -> (LvmStack, Pdiskd) {
        let pool = ThinPool::new(512);
        let nvmet = std::env::var("STRATUS_FAULTS_EXPORT").as_deref() == Ok("nvmet");
        let mut args: Vec<String> = [
            "--backend",
            "lvm",
            "--vg",
            &pool.vg,
            "--thin-pool",
            &pool.pool,
        ]
        .map(String::from)
        .to_vec();
        let (target, exporter, name, layers): (Target, Box<dyn Exporter>, _, _) = if nvmet {
            let iqn_prefix = format!("iqn.2026-11.io.stratus.faults{}", std::process::id());
            args.extend(
                [
                    "--export",
                    "nvmet",
                    "--portal",
                    NVMET_PORTAL,
                    "--nvmet-port-id",
                    &NVMET_PORT_ID.to_string(),
                    "--iqn-prefix",
                    &iqn_prefix,
                ]
                .map(String::from),
            );
            let exporter = NvmetExporter::new(
                Arc::new(HostRunner),
                NvmetConfig {
                    portal: NVMET_PORTAL.into(),
                    port_id: NVMET_PORT_ID,
                    iqn_prefix: iqn_prefix.clone(),
                    ..NvmetConfig::default()
                },
            )
            .unwrap();
            (
                Target::Nvmet { iqn_prefix },
                Box::new(exporter),
                "lvm+nvmet",
                LVM_NVMET,
            )
        } else {
            let lio = Lio::new();
            args.extend(
                [
                    "--export",
                    "lio",
                    "--portal",
                    &lio.portal(),
                    "--iqn-prefix",
                    &lio.iqn_prefix,
                ]
                .map(String::from),
            );
            let exporter = LioExporter::new(
                Arc::new(HostRunner),
                LioConfig {
                    portal: lio.portal(),
                    iqn_prefix: lio.iqn_prefix.clone(),
                    ..LioConfig::default()
                },
            );
            (Target::Lio(lio), Box::new(exporter), "lvm+lio", LVM_LIO)
        };
        let scratch = pool.dir.path().to_path_buf();
        let pdiskd = Pdiskd::start_on(&scratch, &scratch, scratch.join("staging"), None, args)
            .into_failpoints();
        let stack = LvmStack {
            name,
            layers,
            exporter,
            target,
            pool,
        };
        (stack, pdiskd)
    }

    /// The LVs, live targets and exporter leftovers against the restarted
    /// pdiskd's records (`vols`, `snaps`). Returns the violations.
    pub async fn violations(
        &self,
        c: &mut Client,
        vols: &[pb::Volume],
        snaps: &[pb::Snapshot],
    ) -> Vec<String> {
        let want_vols: BTreeSet<String> = vols.iter().map(|v| v.uuid.clone()).collect();
        let want_snaps: BTreeSet<String> = snaps.iter().map(|s| s.uuid.clone()).collect();
        let mut bad = self.lv_violations(&want_vols, &want_snaps);
        let stored: BTreeMap<String, BTreeSet<String>> = c
            .list_exports(pb::ListExportsRequest {
                project: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .exports
            .into_iter()
            .map(|e| (e.target_iqn, e.initiators.into_iter().collect()))
            .collect();
        let live_list = self.exporter.list().await.unwrap();
        for l in &live_list {
            if !l.health.is_whole() {
                bad.push(format!("{} is not whole: {:?}", l.target_iqn, l.health));
            }
        }
        let live: BTreeMap<String, BTreeSet<String>> = live_list
            .into_iter()
            .map(|l| (l.target_iqn, l.initiators.into_iter().collect()))
            .collect();
        if stored != live {
            bad.push(format!("the exporter has {live:?}, the store {stored:?}"));
        }
        bad.extend(self.target_orphans());
        bad
    }

    /// LVs without a record, records without theirs, temporaries.
    fn lv_violations(
        &self,
        want_vols: &BTreeSet<String>,
        want_snaps: &BTreeSet<String>,
    ) -> Vec<String> {
        let mut bad = Vec::new();
        let mut vols = BTreeSet::new();
        let mut snaps = BTreeSet::new();
        let mut other = Vec::new();
        for line in self.pool.lvs() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if let Some(u) = name.strip_prefix("pd-vol-") {
                vols.insert(u.to_string());
            } else if let Some(u) = name.strip_prefix("pd-snap-") {
                snaps.insert(u.to_string());
            } else {
                other.push(line);
            }
        }
        if &vols != want_vols || &snaps != want_snaps || !other.is_empty() {
            bad.push(format!(
                "the thin pool holds volumes {vols:?}, snapshots {snaps:?} and {other:?}; \
                 records say {want_vols:?} and {want_snaps:?}"
            ));
        }
        bad
    }

    /// What the exporter holds outside any target: LIO backstores of ours
    /// without their target; nvmet subsystems of ours not linked to our
    /// port, or host entries no subsystem allows.
    fn target_orphans(&self) -> Vec<String> {
        let mut bad = Vec::new();
        match &self.target {
            Target::Lio(lio) => {
                let core = Path::new(CONFIGFS).join("target/core");
                for hba in names(&core) {
                    for b in names(&core.join(&hba)) {
                        let target = Path::new(CONFIGFS).join("target/iscsi").join(&b);
                        if b.starts_with(&lio.iqn_prefix) && !target.exists() {
                            bad.push(format!("LIO backstore {hba}/{b} has no target"));
                        }
                    }
                }
            }
            Target::Nvmet { iqn_prefix } => {
                let root = Path::new(CONFIGFS).join("nvmet");
                let nqn_prefix = format!("nqn.{}", &iqn_prefix["iqn.".len()..]);
                let port = root.join(format!("ports/{NVMET_PORT_ID}/subsystems"));
                let subsystems = names(&root.join("subsystems"));
                for s in &subsystems {
                    if s.starts_with(&nqn_prefix) && !port.join(s).exists() {
                        bad.push(format!("nvmet subsystem {s} is not linked to the port"));
                    }
                }
                for h in names(&root.join("hosts")) {
                    let allowed = subsystems.iter().any(|s| {
                        root.join("subsystems")
                            .join(s)
                            .join("allowed_hosts")
                            .join(&h)
                            .exists()
                    });
                    if !allowed {
                        bad.push(format!("nvmet host entry {h} is allowed nowhere"));
                    }
                }
            }
        }
        bad
    }
}

impl Drop for LvmStack {
    fn drop(&mut self) {
        if let Target::Nvmet { iqn_prefix } = &self.target {
            forget_nvmet(iqn_prefix);
        }
    }
}

/// Removes our subsystems, the host entries they leave unused and our
/// port, as a reboot does (before the thin pool goes: nvmet holds its LVs).
fn forget_nvmet(iqn_prefix: &str) {
    let root = Path::new(CONFIGFS).join("nvmet");
    let nqn_prefix = format!("nqn.{}", &iqn_prefix["iqn.".len()..]);
    let port = root.join(format!("ports/{NVMET_PORT_ID}"));
    for s in names(&root.join("subsystems")) {
        if !s.starts_with(&nqn_prefix) {
            continue;
        }
        let sub = root.join("subsystems").join(&s);
        let _ = std::fs::remove_file(port.join("subsystems").join(&s));
        if let Ok(rd) = std::fs::read_dir(sub.join("allowed_hosts")) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        for n in names(&sub.join("namespaces")) {
            let ns = sub.join("namespaces").join(n);
            let _ = std::fs::write(ns.join("enable"), "0");
            let _ = std::fs::remove_dir(ns);
        }
        let _ = std::fs::remove_dir(sub);
    }
    let subsystems = names(&root.join("subsystems"));
    for h in names(&root.join("hosts")) {
        let allowed = subsystems.iter().any(|s| {
            root.join("subsystems")
                .join(s)
                .join("allowed_hosts")
                .join(&h)
                .exists()
        });
        if !allowed {
            let _ = std::fs::remove_dir(root.join("hosts").join(h));
        }
    }
    let _ = std::fs::remove_dir(port);
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
