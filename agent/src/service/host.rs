//! Host facts (CPUs, memory, accelerator, QEMU), found once at start, and
//! the capacity GetHost reports and creates are checked against.

use super::Agent;
use crate::spec::VmState;
use crate::vmm::{self, Accel};
use stratus_core::error::Result;
use stratus_core::runner::CommandRunner;

/// Facts about this host, found at start.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub hostname: String,
    pub cpus: u32,
    pub memory: u64,
    pub accel: Accel,
    pub accel_reason: String,
    pub qemu_version: String,
    pub io_uring: bool,
    /// What QEMU offers for confinement (from its `-help`).
    pub qemu_caps: crate::confine::QemuCaps,
}

impl HostFacts {
    pub async fn probe(runner: &dyn CommandRunner, accel: vmm::AccelChoice) -> HostFacts {
        let (accel, accel_reason) = vmm::choose_accel(accel);
        let memory = stratus_core::host::memory_total().unwrap_or(0);
        HostFacts {
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            memory,
            accel,
            accel_reason,
            qemu_version: vmm::qemu_version(runner).await,
            io_uring: vmm::io_uring_supported(runner).await,
            qemu_caps: vmm::qemu_caps(runner).await,
        }
    }
}

/// What GetHost reports.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub facts: HostFacts,
    pub free_vcpus: u32,
    pub free_memory: u64,
    pub vm_count: u32,
    pub running: u32,
    pub last_seq: u64,
}

impl Agent {
    /// Capacity left for new guests: every guest counts with its spec until
    /// it is destroyed; a guest whose destroy is unfinished (DESTROYING)
    /// holds nothing on this host any more.
    pub fn host_info(&self) -> Result<HostInfo> {
        let vms = self.store.vms()?;
        let held = || vms.iter().filter(|v| v.state != VmState::Destroying);
        let vcpus: u32 = held().map(|v| v.spec.vcpus).sum();
        let mem: u64 = held().map(|v| v.spec.memory.0).sum();
        let cap_vcpus = self.host.cpus * self.settings.cpu_overcommit;
        let cap_mem = self
            .host
            .memory
            .saturating_sub(self.settings.reserved_memory);
        Ok(HostInfo {
            facts: self.host.clone(),
            free_vcpus: cap_vcpus.saturating_sub(vcpus),
            free_memory: cap_mem.saturating_sub(mem),
            vm_count: vms.len() as u32,
            running: vms.iter().filter(|v| v.state.is_active()).count() as u32,
            last_seq: self.store.last_seq()?,
        })
    }
}
