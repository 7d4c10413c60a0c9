//! How QEMU does a guest disk's I/O (issue 16, QEMU's side): the `aio`
//! engine per kind of disk, one iothread per disk, and virtio-blk queues.
//! The defaults are what `stratus-bench datapath` measured (README,
//! Performance); agentd's `--file-aio`, `--device-aio` and
//! `--disk-iothreads` override them.
//!
//! - Files (`file:` disks, overlays and their bases, the seed, same-host
//!   attachments on a file pool) get `aio=native` and host block devices
//!   (kernel-attached LUNs, same-host LVs) `aio=io_uring` where QEMU has
//!   it; both keep O_DIRECT (`cache=none`) where the filesystem has it
//!   (`cache=writeback` was measured and rejected: more CPU per GiB, the
//!   host page cache holding guests' data, no consistent gain).
//! - Each disk gets `-object iothread,id=iothread-<node>` and
//!   `iothread=` on its virtio-blk (hot-plugged disks too: `object-add`
//!   before `device_add`), so its I/O is submitted and completed off
//!   QEMU's main loop.
//! - virtio-blk's `num-queues` is the guest's vCPUs, QEMU's own default
//!   since 5.2, written out so that a migration's destination, which
//!   builds the same command line, has the same device whatever its QEMU
//!   defaults to.

use serde::Deserialize;

use stratus_core::error::{Error, Result};

/// An `aio` engine as configured: `auto` is the measured default, native
/// for files, io_uring for host devices where QEMU has it (else native).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AioChoice {
    /// the measured default: native for files, io_uring for devices
    #[default]
    Auto,
    /// io_uring (QEMU built with liburing)
    #[value(name = "io_uring")]
    IoUring,
    /// Linux native AIO (needs O_DIRECT; threads where it is missing)
    Native,
    /// QEMU's thread pool with preadv/pwritev
    Threads,
}

/// The `aio` engine QEMU is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aio {
    IoUring,
    Native,
    Threads,
}

impl Aio {
    pub fn name(self) -> &'static str {
        match self {
            Aio::IoUring => "io_uring",
            Aio::Native => "native",
            Aio::Threads => "threads",
        }
    }

    /// What QEMU accepts on a file opened with or without O_DIRECT: native
    /// AIO needs it, the others do not.
    pub fn with_direct(self, direct: bool) -> Aio {
        match (self, direct) {
            (Aio::Native, false) => Aio::Threads,
            (aio, _) => aio,
        }
    }
}

impl AioChoice {
    /// The engine on a host whose QEMU has io_uring or not; `auto` is
    /// `default` (io_uring becoming native where QEMU lacks it).
    pub fn resolve(self, io_uring: bool, default: Aio, what: &str) -> Result<Aio> {
        Ok(match self {
            AioChoice::Auto if default == Aio::IoUring && !io_uring => Aio::Native,
            AioChoice::Auto => default,
            AioChoice::IoUring if !io_uring => {
                return Err(Error::invalid(format!(
                    "{what} io_uring: this host's QEMU has no io_uring (choose native or threads)"
                )))
            }
            AioChoice::IoUring => Aio::IoUring,
            AioChoice::Native => Aio::Native,
            AioChoice::Threads => Aio::Threads,
        })
    }
}

/// The measured default for files (README, Performance: over three
/// `stratus-bench datapath` runs native's medians were 1.07-1.43x
/// io_uring's on the goals' four cases, at the same CPU per GiB; threads
/// bought more throughput with 2-2.5x the CPU per GiB).
const FILE_AIO: Aio = Aio::Native;
/// The measured default for host devices (native's medians 0.74-1.00x
/// io_uring's; threads as for files).
const DEVICE_AIO: Aio = Aio::IoUring;

/// agentd's disk I/O settings as configured (before the host is probed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskIoChoice {
    pub file_aio: AioChoice,
    pub device_aio: AioChoice,
    pub iothreads: bool,
}

impl DiskIoChoice {
    /// The settings on a host whose QEMU has io_uring or not; an explicit
    /// io_uring on a QEMU without it is an error.
    pub fn resolve(self, io_uring: bool) -> Result<DiskIo> {
        Ok(DiskIo {
            file_aio: self.file_aio.resolve(io_uring, FILE_AIO, "file-aio")?,
            device_aio: self
                .device_aio
                .resolve(io_uring, DEVICE_AIO, "device-aio")?,
            iothreads: self.iothreads,
        })
    }
}

/// How QEMU does every disk's I/O on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskIo {
    /// Files: `file:` disks, overlays and their bases, the seed, same-host
    /// attachments on a file pool.
    pub file_aio: Aio,
    /// Host block devices: kernel-attached LUNs, same-host LVs.
    pub device_aio: Aio,
    /// One iothread per disk.
    pub iothreads: bool,
}

impl DiskIo {
    /// The measured defaults on a host whose QEMU has io_uring or not.
    pub fn measured_default(io_uring: bool) -> DiskIo {
        DiskIoChoice {
            file_aio: AioChoice::Auto,
            device_aio: AioChoice::Auto,
            iothreads: true,
        }
        .resolve(io_uring)
        .expect("auto always resolves")
    }

    /// The iothread of disk `node`, when disks get one.
    pub fn iothread(&self, node: &str) -> Option<String> {
        self.iothreads.then(|| iothread_id(node))
    }

    /// The virtio-blk properties of disk `node` in a guest of `vcpus`
    /// vCPUs: `,num-queues=N` and, with iothreads, `,iothread=ID`.
    pub fn device_props(&self, node: &str, vcpus: u32) -> String {
        let mut props = format!(",num-queues={}", vcpus.max(1));
        if let Some(id) = self.iothread(node) {
            props.push_str(&format!(",iothread={id}"));
        }
        props
    }
}

/// The id of disk `node`'s iothread object.
pub fn iothread_id(node: &str) -> String {
    format!("iothread-{node}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_native_for_files_and_io_uring_for_devices_where_qemu_has_it() {
        let io = DiskIo::measured_default(true);
        assert_eq!((io.file_aio, io.device_aio), (Aio::Native, Aio::IoUring));
        assert!(io.iothreads);
        let io = DiskIo::measured_default(false);
        assert_eq!((io.file_aio, io.device_aio), (Aio::Native, Aio::Native));
    }

    #[test]
    fn explicit_io_uring_without_it_is_refused() {
        let c = DiskIoChoice {
            file_aio: AioChoice::IoUring,
            device_aio: AioChoice::Threads,
            iothreads: false,
        };
        let e = c.resolve(false).unwrap_err();
        assert!(e.message().contains("file-aio io_uring"), "{e}");
        let io = c.resolve(true).unwrap();
        assert_eq!((io.file_aio, io.device_aio), (Aio::IoUring, Aio::Threads));
        assert_eq!(io.iothread("vda"), None);
        assert_eq!(io.device_props("vda", 4), ",num-queues=4");
    }

    #[test]
    fn device_props_name_the_disks_iothread() {
        let io = DiskIo::measured_default(true);
        assert_eq!(
            io.device_props("vdb", 2),
            ",num-queues=2,iothread=iothread-vdb"
        );
        assert_eq!(Aio::Native.with_direct(false), Aio::Threads);
        assert_eq!(Aio::IoUring.with_direct(false), Aio::IoUring);
    }
}
