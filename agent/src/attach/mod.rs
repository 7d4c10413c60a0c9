//! How a guest's network disks reach QEMU: through QEMU's own initiator
//! (`--attach qemu`, the default: libiscsi inside QEMU, nothing on the
//! host), or through the kernel's (`--attach kernel`: the host connects and
//! QEMU opens the block device as a `host_device`).
//!
//! One file per kernel transport:
//! - [`iscsi_kernel`]: open-iscsi, [`KernelAttacher`] (with `iscsi_nodes`:
//!   its node records read from open-iscsi's database);
//! - [`nvme_tcp`]: nvme-cli on an export of pdiskd's `nvmet` exporter,
//!   [`NvmeAttacher`];
//! - [`krbd`]: the kernel's RBD client on an `rbd` export (pdiskd's RBD
//!   backend), [`KrbdAttacher`].
//!
//! Here: the attach mode and who holds an attachment.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use stratus_core::error::{Error, Result};
use stratus_core::runner::{Cmd, Output};

pub mod iscsi_kernel;
mod iscsi_nodes;
pub mod krbd;
pub mod nvme_tcp;

pub use iscsi_kernel::*;
pub use krbd::{KrbdAttacher, KrbdDisk, KrbdOptions, RbdKernel, SysfsKernel};
pub use nvme_tcp::{NvmeAttacher, NvmeDisk, NvmeNamespace, NvmeOptions};

/// How a guest's iSCSI disks reach QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// QEMU's own iSCSI initiator (libiscsi); nothing on the host
    #[default]
    Qemu,
    /// The kernel's initiator (open-iscsi); QEMU opens the SCSI block device
    Kernel,
}

impl AttachMode {
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Qemu => "qemu",
            AttachMode::Kernel => "kernel",
        }
    }

    /// Whether guests' disks can use mutual CHAP this way: only the kernel's
    /// initiator checks the target's answer. libiscsi (QEMU's) has no
    /// setting for the target's account, so "mutual" there would quietly
    /// be one-way: refused, not downgraded.
    pub fn check_mutual_chap(self) -> Result<()> {
        match self {
            AttachMode::Kernel => Ok(()),
            AttachMode::Qemu => Err(Error::invalid(
                "--chap-mutual needs --attach kernel: QEMU's own iSCSI initiator \
                 (libiscsi, --attach qemu) cannot authenticate the target",
            )),
        }
    }
}

/// Who holds a LUN: a guest's disk. Shown in logs as `UUID/vda`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Holder(String);

impl Holder {
    pub fn disk(vm: Uuid, device: &str) -> Holder {
        Holder(format!("{vm}/{device}"))
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A command's failure, naming its whole argv (which never holds a secret)
/// and the first lines of its stderr.
pub(crate) fn command_error(cmd: &Cmd, out: &Output) -> Error {
    let stderr: Vec<&str> = out
        .stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(5)
        .collect();
    Error::internal(format!(
        "`{}` exited with status {}: {}",
        cmd.argv().join(" "),
        out.status,
        if stderr.is_empty() {
            "(no stderr)".to_string()
        } else {
            stderr.join("; ")
        }
    ))
}

/// The step boundaries of an attacher's sequence (`crate::failpoints`'
/// LAB_POINTS, NVME_POINTS): agentd exits there in the fault-injection
/// build; in the unit tier, [`CrashPoints::arm`] makes the named one panic
/// the attach's task instead.
#[derive(Default)]
pub(crate) struct CrashPoints {
    #[cfg(test)]
    armed: std::sync::Mutex<Option<&'static str>>,
}

impl CrashPoints {
    pub(crate) fn hit(&self, name: &'static str) {
        #[cfg(test)]
        if *self.armed.lock().unwrap() == Some(name) {
            panic!("crash point {name}");
        }
        #[cfg(not(test))]
        crate::failpoints::crash_point(name);
    }

    #[cfg(test)]
    pub(crate) fn arm(&self, at: Option<&'static str>) {
        *self.armed.lock().unwrap() = at;
    }
}
