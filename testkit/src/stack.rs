//! The storage stack a pdisk test runs against, chosen by `STRATUS_STACK`:
//!
//! - `file-tgt` (default, on the host): an XFS reflink pool on a loop device
//!   and a tgtd of the test's own; initiator = QEMU's libiscsi (qemu-io).
//! - `lvm-lio` (inside the lab VM, set by `scripts/lab-vm/topology1`): a thin
//!   pool of the test's own in the VM's volume group (`STRATUS_LAB_VG`), the
//!   kernel's LIO target with an IQN prefix and portal of the test's own;
//!   initiator = the kernel's open-iscsi (qemu-io on the logged-in device).
//!
//! The suites ask the stack for what differs (portal, live exports, backing
//! objects, how to make the exporter forget everything) so the same test
//! proves the same behaviour on both.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{free_port, require_root, run, run_ok, Initiator, Pdiskd, Tgtd, XfsPool};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackKind {
    FileTgt,
    LvmLio,
}

/// The stack selected by `STRATUS_STACK` (`file-tgt` when unset).
pub fn stack_kind() -> StackKind {
    match std::env::var("STRATUS_STACK").as_deref() {
        Err(_) | Ok("") | Ok("file-tgt") => StackKind::FileTgt,
        Ok("lvm-lio") => StackKind::LvmLio,
        Ok(other) => panic!("STRATUS_STACK={other}: expected file-tgt or lvm-lio"),
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, usable in LV names and IQNs.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

const CONFIGFS_ISCSI: &str = "/sys/kernel/config/target/iscsi";

/// A thin pool of the test's own in the lab VM's volume group.
pub struct ThinPool {
    /// Scratch space for the test (pdiskd's store, imports, secrets).
    pub dir: tempfile::TempDir,
    pub vg: String,
    pub pool: String,
}

impl ThinPool {
    pub fn new(size_mib: u64) -> ThinPool {
        require_root();
        let vg = std::env::var("STRATUS_LAB_VG")
            .expect("STRATUS_LAB_VG (the lab VM's volume group; scripts/lab sets it)");
        let pool = unique("tp");
        run_ok(
            "lvcreate",
            &[
                "-q",
                "--type",
                "thin-pool",
                "-L",
                &format!("{size_mib}M"),
                // LVM's default metadata for a small pool starts ~11% used,
                // which would trip low thresholds before any data is written.
                "--poolmetadatasize",
                "32M",
                "-n",
                &pool,
                &vg,
            ],
        );
        let dir = tempfile::Builder::new()
            .prefix("stratus-it-")
            .tempdir()
            .unwrap();
        ThinPool { dir, vg, pool }
    }

    /// `lvs` columns of every LV in this thin pool, as `name tags` lines.
    pub fn lvs(&self) -> Vec<String> {
        let out = run_ok(
            "lvs",
            &[
                "--noheadings",
                "-o",
                "lv_name,lv_tags",
                "-S",
                &format!("pool_lv={}", self.pool),
                &self.vg,
            ],
        );
        let mut v: Vec<String> = out
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }

    /// Data and metadata use of the pool, in percent.
    pub fn percent_used(&self) -> (f64, f64) {
        let out = run_ok(
            "lvs",
            &[
                "--noheadings",
                "-o",
                "data_percent,metadata_percent",
                &format!("{}/{}", self.vg, self.pool),
            ],
        );
        let mut it = out.split_whitespace().map(|x| x.parse::<f64>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    }
}

impl Drop for ThinPool {
    fn drop(&mut self) {
        // Thin LVs first (the pool refuses to go while they exist).
        let _ = run(
            "lvremove",
            &[
                "-q",
                "-y",
                "-f",
                "-S",
                &format!("pool_lv={}", self.pool),
                &self.vg,
            ],
        );
        let _ = run(
            "lvremove",
            &["-q", "-y", "-f", &format!("{}/{}", self.vg, self.pool)],
        );
    }
}

/// The kernel's LIO target as one test sees it: its own portal port and IQN
/// prefix, so tests running side by side never see each other's targets.
pub struct Lio {
    pub portal_port: u16,
    pub iqn_prefix: String,
}

impl Lio {
    pub fn new() -> Lio {
        require_root();
        // The iSCSI fabric's group appears when it is made (this loads
        // iscsi_target_mod when needed).
        let _ = std::fs::create_dir_all(CONFIGFS_ISCSI);
        assert!(
            Path::new(CONFIGFS_ISCSI).exists(),
            "{CONFIGFS_ISCSI} missing: LIO needs configfs and iscsi_target_mod (the lab VM has them)"
        );
        Lio {
            portal_port: free_port(),
            iqn_prefix: format!("iqn.2026-11.io.stratus.{}", unique("it")),
        }
    }

    pub fn portal(&self) -> String {
        format!("127.0.0.1:{}", self.portal_port)
    }

    fn ours(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(CONFIGFS_ISCSI)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(&self.iqn_prefix))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// A listing of our live targets: IQN, LUN backstores, portals, ACLs and
    /// CHAP users, one fact per line (compare before/after a refused call).
    pub fn show(&self) -> String {
        let mut out = String::new();
        for t in self.ours() {
            out.push_str(&format!("target {}\n", name_of(&t)));
            for tpg in sorted_dirs(&t) {
                let tpg_name = name_of(&tpg);
                let enable = read_attr(&tpg.join("enable"));
                out.push_str(&format!("  {tpg_name} enable={enable}\n"));
                for np in sorted_dirs(&tpg.join("np")) {
                    out.push_str(&format!("  portal {}\n", name_of(&np)));
                }
                for lun in sorted_dirs(&tpg.join("lun")) {
                    for link in sorted_entries(&lun) {
                        if let Ok(dest) = std::fs::read_link(&link) {
                            out.push_str(&format!("  {} -> {}\n", name_of(&lun), dest.display()));
                        }
                    }
                }
                for acl in sorted_dirs(&tpg.join("acls")) {
                    let user = read_attr(&acl.join("auth/userid"));
                    out.push_str(&format!("  acl {} chap_user={user}\n", name_of(&acl)));
                }
            }
        }
        out
    }

    /// Creates a target with our prefix that no pdiskd asked for.
    pub fn add_orphan_target(&self, suffix: &str) -> String {
        let iqn = format!("{}:{suffix}", self.iqn_prefix);
        std::fs::create_dir_all(Path::new(CONFIGFS_ISCSI).join(&iqn).join("tpgt_1")).unwrap();
        iqn
    }

    /// Removes every target of ours and its backstores, as a reboot does.
    pub fn forget_all(&self) {
        let mut backstores = Vec::new();
        for t in self.ours() {
            for tpg in sorted_dirs(&t) {
                let _ = std::fs::write(tpg.join("enable"), "0");
                for acl in sorted_dirs(&tpg.join("acls")) {
                    for ml in sorted_dirs(&acl) {
                        if name_of(&ml).starts_with("lun_") {
                            for e in sorted_entries(&ml) {
                                if e.is_symlink() {
                                    let _ = std::fs::remove_file(&e);
                                }
                            }
                            let _ = std::fs::remove_dir(&ml);
                        }
                    }
                    let _ = std::fs::remove_dir(&acl);
                }
                for lun in sorted_dirs(&tpg.join("lun")) {
                    for e in sorted_entries(&lun) {
                        if e.is_symlink() {
                            if let Ok(dest) = std::fs::canonicalize(&e) {
                                backstores.push(dest);
                            }
                            let _ = std::fs::remove_file(&e);
                        }
                    }
                    let _ = std::fs::remove_dir(&lun);
                }
                for np in sorted_dirs(&tpg.join("np")) {
                    let _ = std::fs::remove_dir(&np);
                }
                let _ = std::fs::remove_dir(&tpg);
            }
            let _ = std::fs::remove_dir(&t);
        }
        for b in backstores {
            let _ = std::fs::remove_dir(&b);
        }
    }
}

impl Default for Lio {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lio {
    fn drop(&mut self) {
        self.forget_all();
    }
}

fn name_of(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn sorted_dirs(dir: &Path) -> Vec<PathBuf> {
    sorted_entries(dir)
        .into_iter()
        .filter(|p| p.is_dir() && !p.is_symlink())
        .collect()
}

fn read_attr(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The pool under a test's pdiskd.
pub enum Pool {
    Xfs(XfsPool),
    Thin(ThinPool),
}

/// The iSCSI target under a test's pdiskd.
pub enum Exports {
    Tgt(Tgtd),
    Lio(Lio),
}

impl Exports {
    pub fn portal(&self) -> String {
        match self {
            Exports::Tgt(t) => t.portal(),
            Exports::Lio(l) => l.portal(),
        }
    }

    /// The exporter's live state as text (`tgtadm show` or our LIO tree).
    pub fn show(&self) -> String {
        match self {
            Exports::Tgt(t) => t.show(),
            Exports::Lio(l) => l.show(),
        }
    }

    /// The exporter loses every target: tgtd is killed and restarted; LIO
    /// is emptied as by a reboot.
    pub fn forget_all(&mut self) {
        match self {
            Exports::Tgt(t) => t.restart(),
            Exports::Lio(l) => l.forget_all(),
        }
    }

    /// A live target with our prefix that pdiskd never asked for.
    pub fn add_orphan_target(&self, suffix: &str) -> String {
        match self {
            Exports::Tgt(t) => {
                let iqn = format!("iqn.2026-11.io.stratus.pdisk:{suffix}");
                let port = t.control_port.to_string();
                run_ok(
                    "tgtadm",
                    &[
                        "-C",
                        &port,
                        "--lld",
                        "iscsi",
                        "--mode",
                        "target",
                        "--op",
                        "new",
                        "--tid",
                        "99",
                        "--targetname",
                        &iqn,
                    ],
                );
                iqn
            }
            Exports::Lio(l) => l.add_orphan_target(suffix),
        }
    }
}

/// pdiskd on the selected stack, for one test.
pub struct Stack {
    pub pdiskd: Pdiskd,
    pub exports: Exports,
    pub pool: Pool,
}

impl Stack {
    pub fn start() -> Stack {
        Self::start_with(&[])
    }

    /// Starts the stack with extra pdiskd flags.
    pub fn start_with(extra: &[&str]) -> Stack {
        Self::start_sized(4096, extra)
    }

    /// Starts the stack on a pool of `pool_mib` MiB, with extra pdiskd flags.
    pub fn start_sized(pool_mib: u64, extra: &[&str]) -> Stack {
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        match stack_kind() {
            StackKind::FileTgt => {
                let pool = XfsPool::new(pool_mib);
                let tgtd = Tgtd::start(pool.dir.path());
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                let pdiskd = Pdiskd::start_with(&pool, &tgtd, &extra);
                Stack {
                    pdiskd,
                    exports: Exports::Tgt(tgtd),
                    pool: Pool::Xfs(pool),
                }
            }
            StackKind::LvmLio => {
                // As large as the host's XFS pool by default, so the
                // overcommit limit (20x the pool) allows the same sizes.
                let pool = ThinPool::new(pool_mib);
                let lio = Lio::new();
                let mut args = vec![
                    "--backend".to_string(),
                    "lvm".into(),
                    "--vg".into(),
                    pool.vg.clone(),
                    "--thin-pool".into(),
                    pool.pool.clone(),
                    "--export".into(),
                    "lio".into(),
                    "--portal".into(),
                    lio.portal(),
                    "--iqn-prefix".into(),
                    lio.iqn_prefix.clone(),
                ];
                args.extend(extra);
                let scratch = pool.dir.path().to_path_buf();
                let pdiskd =
                    Pdiskd::start_on(&scratch, &scratch, scratch.join("staging"), None, args);
                Stack {
                    pdiskd,
                    exports: Exports::Lio(lio),
                    pool: Pool::Thin(pool),
                }
            }
        }
    }

    pub fn kind(&self) -> StackKind {
        match self.pool {
            Pool::Xfs(_) => StackKind::FileTgt,
            Pool::Thin(_) => StackKind::LvmLio,
        }
    }

    pub fn portal(&self) -> String {
        self.exports.portal()
    }

    pub fn initiator(&self, target: &str, name: &str) -> Initiator {
        Initiator::new(&self.portal(), target, name)
    }

    /// A directory for the test's own files (secrets, images).
    pub fn scratch(&self) -> &Path {
        match &self.pool {
            Pool::Xfs(p) => p.dir.path(),
            Pool::Thin(p) => p.dir.path(),
        }
    }

    /// The objects holding volume data: files of the file pool, or the LVs
    /// (with their tags) of the thin pool. Sorted.
    pub fn backing_objects(&self) -> Vec<String> {
        match &self.pool {
            Pool::Xfs(_) => {
                let mut v = Vec::new();
                for d in ["volumes", "snapshots"] {
                    if let Ok(rd) = std::fs::read_dir(self.pdiskd.pool_dir.join(d)) {
                        v.extend(rd.flatten().map(|e| format!("{d}/{}", name_of(&e.path()))));
                    }
                }
                v.sort();
                v
            }
            Pool::Thin(p) => p.lvs(),
        }
    }

    /// Puts an object into the pool that pdiskd did not make; returns its name.
    pub fn add_stray_object(&self) -> String {
        match &self.pool {
            Pool::Xfs(_) => {
                let stray = self.pdiskd.pool_dir.join("volumes/stray.raw");
                std::fs::write(&stray, b"someone else's").unwrap();
                "stray.raw".into()
            }
            Pool::Thin(p) => {
                run_ok(
                    "lvcreate",
                    &[
                        "-q",
                        "-T",
                        &format!("{}/{}", p.vg, p.pool),
                        "-V",
                        "8M",
                        "-n",
                        "stray",
                    ],
                );
                "stray".into()
            }
        }
    }

    /// True while the stray object of [`Stack::add_stray_object`] exists.
    pub fn stray_exists(&self) -> bool {
        match &self.pool {
            Pool::Xfs(_) => self.pdiskd.pool_dir.join("volumes/stray.raw").exists(),
            Pool::Thin(p) => p.lvs().iter().any(|l| l.starts_with("stray")),
        }
    }

    /// Destroys a volume's data behind pdiskd's back.
    pub fn remove_backing(&self, device_path: &str) {
        match &self.pool {
            Pool::Xfs(_) => std::fs::remove_file(device_path).unwrap(),
            Pool::Thin(_) => {
                run_ok("lvremove", &["-q", "-y", "-f", device_path]);
            }
        }
    }
}
