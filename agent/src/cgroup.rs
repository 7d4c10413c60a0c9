//! Per-guest cgroups (v2): each confined guest's QEMU lives in
//! `PARENT/vm-<uuid>`, with `memory.max`, `pids.max` and `cpu.max` set
//! from its spec where the parent has those controllers. QEMU is created
//! in it and never runs anywhere else (`clone3(CLONE_INTO_CGROUP)`, see
//! `stratus_core::detached`), an adopted guest's QEMU
//! is put back in it at agentd's start, and it is removed when the guest's
//! QEMU is gone.
//!
//! The parent is `--cgroup-parent` (default: `stratus.slice` under the
//! host's cgroup v2 mount; on a systemd host give agentd a delegated one).
//! Controllers the parent does not have are reported and their limits
//! skipped: a hybrid cgroup v1 host (this project's test machines) offers
//! v2 membership with only `hugetlb`, so memory, pids and CPU limits there
//! stay with v1 and are not set.
//!
//! A guest's cgroup is removed when its QEMU is gone. At start,
//! reconciliation also sweeps the parent ([`GuestCgroups::sweep`]): a
//! `vm-<uuid>` cgroup of no guest agentd records (left by a crash between
//! a destroy's tear-down and the cgroup's removal, or by a guest whose
//! record went while agentd was down) is removed when it is empty (no
//! process, no child: the kernel refuses anything else) and older than
//! [`SWEEP_MIN_AGE`], and reported. A populated cgroup is never touched,
//! and the age keeps a sweep off a cgroup another agentd sharing the parent
//! has just made for a QEMU about to enter it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use uuid::Uuid;

use stratus_core::error::{Error, Result};

/// Guest `vm`'s cgroup under `parent` (read by usage accounting too).
pub fn guest_dir(parent: &Path, vm: Uuid) -> PathBuf {
    parent.join(format!("vm-{vm}"))
}

/// The controllers whose limits agentd sets, in the order it enables them.
const WANTED: [&str; 3] = ["memory", "pids", "cpu"];

/// QEMU's own memory beside the guest's: device state, I/O buffers, and
/// under TCG the translation cache (1 GiB by default on 64-bit hosts).
const OVERHEAD: u64 = 256 << 20;
const TCG_OVERHEAD: u64 = 1 << 30;

/// QEMU's threads: vCPUs, its I/O worker pool (up to 64), main loop, RCU,
/// io_uring and iSCSI helpers, with room to spare.
const PIDS_MAX: u32 = 1024;

/// How old an empty cgroup of no recorded guest must be before a sweep
/// removes it.
pub const SWEEP_MIN_AGE: Duration = Duration::from_secs(60);

/// The cgroup CPU period, µs.
const CPU_PERIOD: u64 = 100_000;

/// The limits of one guest's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: u64,
    pub pids_max: u32,
    /// Quota per [`CPU_PERIOD`], µs.
    pub cpu_quota: u64,
}

impl Limits {
    /// From a guest's spec: its memory plus QEMU's overhead; its vCPUs plus
    /// one CPU for QEMU's own threads (I/O, main loop).
    pub fn for_guest(memory: u64, vcpus: u32, tcg: bool) -> Limits {
        Limits {
            memory_max: memory + OVERHEAD + if tcg { TCG_OVERHEAD } else { 0 },
            pids_max: PIDS_MAX,
            cpu_quota: (u64::from(vcpus) + 1) * CPU_PERIOD,
        }
    }
}

/// The guests' cgroups under one parent.
#[derive(Debug, Clone)]
pub struct GuestCgroups {
    parent: PathBuf,
    /// Of [`WANTED`], those enabled for the parent's children.
    controllers: Vec<String>,
}

impl GuestCgroups {
    /// Opens (creates) `parent`, which must be on a cgroup v2 file system,
    /// and enables for its children whichever of memory, pids and cpu it
    /// has.
    pub fn open(parent: &Path) -> Result<GuestCgroups> {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent.display(), e))?;
        if !is_cgroup2(parent) {
            return Err(Error::invalid(format!(
                "cgroup parent {}: not on a cgroup v2 file system",
                parent.display()
            )));
        }
        let available = read_words(&parent.join("cgroup.controllers"));
        for c in WANTED.iter().filter(|c| available.iter().any(|a| a == *c)) {
            if let Err(e) = write_file(&parent.join("cgroup.subtree_control"), &format!("+{c}")) {
                tracing::warn!(parent = %parent.display(), controller = c, error = %e,
                    "could not enable a cgroup controller for guests");
            }
        }
        let enabled = read_words(&parent.join("cgroup.subtree_control"));
        Ok(GuestCgroups {
            parent: parent.to_path_buf(),
            controllers: WANTED
                .iter()
                .filter(|c| enabled.iter().any(|e| e == *c))
                .map(|c| c.to_string())
                .collect(),
        })
    }

    /// `stratus.slice` under the host's cgroup v2 mount, if it has one
    /// (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host).
    pub fn default_parent() -> Option<PathBuf> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        let mount = mounts.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, fs) = (f.next()?, f.next()?, f.next()?);
            (fs == "cgroup2").then(|| PathBuf::from(at))
        })?;
        Some(mount.join("stratus.slice"))
    }

    /// One line for GetHost and the logs.
    pub fn describe(&self) -> String {
        let missing: Vec<&str> = WANTED
            .iter()
            .copied()
            .filter(|c| !self.controllers.iter().any(|e| e == c))
            .collect();
        let mut s = format!("cgroup per guest under {}", self.parent.display());
        if !missing.is_empty() {
            s.push_str(&format!(
                " (no {} controller here: those limits are not set)",
                missing.join(", ")
            ));
        }
        s
    }

    /// The controllers whose limits are set.
    pub fn controllers(&self) -> &[String] {
        &self.controllers
    }

    /// Guest `vm`'s cgroup.
    pub fn path(&self, vm: Uuid) -> PathBuf {
        guest_dir(&self.parent, vm)
    }

    /// Creates guest `vm`'s cgroup (kept if it exists), sets its limits and
    /// opens its directory for the QEMU about to be created in it.
    pub fn prepare(&self, vm: Uuid, limits: Limits) -> Result<std::fs::File> {
        let dir = self.path(vm);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(dir.display(), e)),
        }
        let has = |c: &str| self.controllers.iter().any(|e| e == c);
        if has("memory") {
            write_file(&dir.join("memory.max"), &limits.memory_max.to_string())?;
        }
        if has("pids") {
            write_file(&dir.join("pids.max"), &limits.pids_max.to_string())?;
        }
        if has("cpu") {
            write_file(
                &dir.join("cpu.max"),
                &format!("{} {CPU_PERIOD}", limits.cpu_quota),
            )?;
        }
        std::fs::File::open(&dir).map_err(|e| Error::io(dir.display(), e))
    }

    /// Puts an adopted guest's QEMU `pid` back in its cgroup (made again if
    /// it is missing, with `limits`). Returns whether it had to move.
    pub fn adopt(&self, vm: Uuid, pid: u32, limits: Limits) -> Result<bool> {
        let dir = self.path(vm);
        if cgroup_of(pid).is_some_and(|c| c.ends_with(&format!("/vm-{vm}"))) {
            return Ok(false);
        }
        self.prepare(vm, limits)?;
        let procs = dir.join("cgroup.procs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .and_then(|mut f| f.write_all(pid.to_string().as_bytes()))
            .map_err(|e| Error::io(procs.display(), e))?;
        Ok(true)
    }

    /// Removes the empty `vm-<uuid>` cgroups under the parent whose guest
    /// `known` does not know and older than `min_age` (see the module
    /// doc). Each line says what it removed (Ok) or could not (Err).
    pub fn sweep(
        &self,
        known: impl Fn(Uuid) -> bool,
        min_age: Duration,
    ) -> Vec<std::result::Result<String, String>> {
        sweep(&self.parent, known, min_age)
    }

    /// Removes guest `vm`'s cgroup once its QEMU is gone; waits up to
    /// `limit` for the kernel to finish the exit (a cgroup stays populated
    /// until its last task has fully exited). Ok(false) when there is none.
    pub async fn remove(&self, vm: Uuid, limit: Duration) -> Result<bool> {
        let dir = self.path(vm);
        let start = std::time::Instant::now();
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < limit => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(Error::io(dir.display(), e)),
            }
        }
    }
}

/// [`GuestCgroups::sweep`] of the directory `parent` (any directory: the
/// unit tests sweep a temporary one).
fn sweep(
    parent: &Path,
    known: impl Fn(Uuid) -> bool,
    min_age: Duration,
) -> Vec<std::result::Result<String, String>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(vm) = name
            .strip_prefix("vm-")
            .and_then(|u| Uuid::parse_str(u).ok())
        else {
            continue;
        };
        if known(vm) || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let young = e
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default() < min_age)
            .unwrap_or(true);
        if young {
            continue;
        }
        let path = e.path();
        match std::fs::remove_dir(&path) {
            Ok(()) => out.push(Ok(format!(
                "removed cgroup {} of no recorded guest",
                path.display()
            ))),
            // Populated (EBUSY on cgroupfs, ENOTEMPTY elsewhere): a QEMU
            // of no record of ours, maybe another agentd's; left alone.
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EBUSY) | Some(libc::ENOTEMPTY)
                ) =>
            {
                tracing::debug!(cgroup = %path.display(), "populated cgroup of no recorded guest left alone");
            }
            Err(err) => out.push(Err(format!(
                "cgroup {} of no recorded guest not removed ({err})",
                path.display()
            ))),
        }
    }
    out
}

/// The cgroup v2 path of `pid` (its `0::` line), if it runs.
pub fn cgroup_of(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

fn is_cgroup2(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes only into `st`, a live, zeroed struct; `c` is
    // a NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::CGROUP2_SUPER_MAGIC
    }
}

fn read_words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|e| Error::io(path.display(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_spec_with_room_for_qemu() {
        let l = Limits::for_guest(512 << 20, 2, false);
        assert_eq!(l.memory_max, (512 << 20) + OVERHEAD);
        assert_eq!(l.cpu_quota, 300_000);
        assert_eq!(l.pids_max, PIDS_MAX);
        let tcg = Limits::for_guest(512 << 20, 2, true);
        assert_eq!(tcg.memory_max, l.memory_max + TCG_OVERHEAD);
    }

    #[test]
    fn a_sweep_removes_only_old_empty_cgroups_of_no_recorded_guest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let (recorded, stray, busy, young) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        for u in [recorded, stray, busy, young] {
            std::fs::create_dir(guest_dir(p, u)).unwrap();
        }
        // Populated: a process (here a file) in it.
        std::fs::write(guest_dir(p, busy).join("cgroup.procs"), "4242").unwrap();
        // Not ours by name: an operator's.
        std::fs::create_dir(p.join("operator.scope")).unwrap();
        std::fs::create_dir(p.join("vm-not-a-uuid")).unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        for u in [recorded, stray, busy] {
            std::fs::File::open(guest_dir(p, u))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let out = sweep(p, |u| u == recorded, SWEEP_MIN_AGE);
        assert_eq!(
            out,
            vec![Ok(format!(
                "removed cgroup {} of no recorded guest",
                guest_dir(p, stray).display()
            ))]
        );
        for (u, kept) in [
            (recorded, true),
            (stray, false),
            (busy, true),
            (young, true),
        ] {
            assert_eq!(guest_dir(p, u).exists(), kept, "{u}");
        }
        assert!(p.join("operator.scope").exists() && p.join("vm-not-a-uuid").exists());
        // With no minimum age the young one goes too; nothing else.
        let out = sweep(p, |u| u == recorded, Duration::ZERO);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(!guest_dir(p, young).exists());
        // A parent that does not exist: nothing to do.
        assert!(sweep(&p.join("none"), |_| false, Duration::ZERO).is_empty());
    }

    #[test]
    fn a_parent_off_cgroup2_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = GuestCgroups::open(&dir.path().join("stratus.slice")).unwrap_err();
        assert!(e.message().contains("not on a cgroup v2"), "{e}");
    }

    #[test]
    fn our_own_cgroup_is_read_from_proc() {
        // Every process has a v2 line (`0::/...`) when a v2 hierarchy is
        // mounted, as on every systemd or hybrid host.
        if GuestCgroups::default_parent().is_some() {
            assert!(cgroup_of(std::process::id()).is_some());
        }
        assert_eq!(cgroup_of(u32::MAX - 1), None);
    }
}
