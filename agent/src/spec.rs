//! What a guest should be: the validated form of `agent.v1.VmSpec`, and the
//! states and causes the agent reports. Parsed at the gRPC edge; nothing
//! past it can hold an invalid name, MAC, size or path.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use pdisk::error::{Error, Result};
use pdisk::types::{ByteSize, VolumeName, MIB};

/// Guest names follow the volume-name grammar (they name files and taps).
pub type VmName = VolumeName;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "ref")]
pub enum DiskSource {
    /// A pdisk volume by name or UUID.
    Pdisk(String),
    /// A raw or qcow2 image on this host.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub source: DiskSource,
    pub read_only: bool,
    /// 0: not bootable; 1 boots first.
    pub boot_index: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub bridge: String,
    /// Validated by `net::Mac` at the edge; stored in 52:54:00:xx:xx:xx form.
    pub mac: String,
    pub vlan: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: VmName,
    pub vcpus: u32,
    pub memory: ByteSize,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    pub kernel: Option<KernelBoot>,
    pub labels: BTreeMap<String, String>,
}

pub const MAX_VCPUS: u32 = 255;
pub const MIN_MEMORY: u64 = 16 * MIB;
pub const MAX_DISKS: usize = 16;
pub const MAX_NICS: usize = 8;

/// Checks a host path given in a spec: absolute, no `..`, no NUL or comma
/// (QEMU's option syntax), and an existing regular file.
pub fn check_host_file(what: &str, p: &str) -> Result<PathBuf> {
    let path = PathBuf::from(p);
    if !path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        || p.contains('\0')
        || p.contains(',')
    {
        return Err(Error::invalid(format!(
            "{what} {p:?} must be an absolute path without '..' or ','"
        )));
    }
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err(Error::invalid(format!("{what} {p} is not a regular file"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Error::not_found(format!("{what} {p} not found")))
        }
        Err(e) => Err(Error::invalid(format!("{what} {p}: {e}"))),
    }
}

/// Bridge names are Linux interface names.
pub fn check_ifname(what: &str, s: &str) -> Result<()> {
    if s.is_empty()
        || s.len() > 15
        || s == "."
        || s == ".."
        || s.bytes()
            .any(|c| c == b'/' || c == b':' || c.is_ascii_whitespace() || !c.is_ascii_graphic())
    {
        return Err(Error::invalid(format!(
            "{what} {s:?} is not a valid interface name"
        )));
    }
    Ok(())
}

impl VmSpec {
    /// Checks the limits that do not depend on the host.
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::invalid(format!(
                "vm {}: vcpus must be 1 to {MAX_VCPUS}, not {}",
                self.name, self.vcpus
            )));
        }
        if self.memory.0 < MIN_MEMORY || !self.memory.0.is_multiple_of(MIB) {
            return Err(Error::invalid(format!(
                "vm {}: memory must be a whole number of MiB, at least 16M (got {})",
                self.name, self.memory
            )));
        }
        if self.disks.len() > MAX_DISKS || self.nics.len() > MAX_NICS {
            return Err(Error::invalid(format!(
                "vm {}: at most {MAX_DISKS} disks and {MAX_NICS} NICs",
                self.name
            )));
        }
        if self.disks.is_empty() && self.kernel.is_none() {
            return Err(Error::invalid(format!(
                "vm {}: nothing to boot: give a disk or a kernel",
                self.name
            )));
        }
        let dup = self
            .nics
            .iter()
            .enumerate()
            .any(|(i, a)| self.nics[..i].iter().any(|b| b.mac == a.mac));
        if dup {
            return Err(Error::invalid(format!("vm {}: duplicate MAC", self.name)));
        }
        for n in &self.nics {
            check_ifname("bridge", &n.bridge)?;
            if n.vlan > 4094 {
                return Err(Error::invalid(format!("vlan {} is out of 0..4094", n.vlan)));
            }
        }
        pdisk::types::validate_labels(self.labels.iter())?;
        Ok(())
    }
}

/// The life of a guest as the agent tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Defined,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Crashed,
    Error,
    Destroyed,
}

impl VmState {
    /// A QEMU process exists (or is being made) in these states.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Created,
    Starting,
    Running,
    Paused,
    Resumed,
    Stopping,
    Stopped,
    Crashed,
    Destroyed,
    DiskAttached,
    DiskDetached,
    Error,
    Rebooted,
    NicAttached,
    NicDetached,
    DiskIoError,
    Adopted,
}

/// Who or what caused an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    Api,
    Guest,
    GuestPanic,
    Qemu,
    Host,
    Reconciliation,
}
