//! `agentctl vm ...`: the lifecycle commands, and `vm create`'s arguments
//! with the checks that span them ([`CreateArgs::spec`] builds the CreateVm
//! request).

use std::path::{Path, PathBuf};

use agent::seed::{
    check_document, check_hostname, check_ssh_key, MAX_NETWORK_CONFIG, MAX_SSH_KEYS, MAX_USER_DATA,
};
use agent::spec::{device_name, MAX_DISKS, MAX_NICS, MAX_VCPUS, MIN_MEMORY};
use clap::{Args, Subcommand};
use stratus_core::cli::args::{label_arg, label_map, Ref};
use stratus_core::types::{ByteSize, VolumeName};
use stratus_proto::agent::v1::{
    disk_spec, Contextualization, DiskPersistence, DiskSpec, KernelBoot, NicSpec, VmSpec,
};

use super::disk::{DiskArg, DiskSource};
use super::host_path;
use super::image::image_pb;
use super::nic::{Mac, NicArg};
use super::qos::{QosArgs, QOS};

/// Help heading of the options that make the guest's cloud-init seed.
pub(super) const CONTEXT: &str = "Contextualization (a cloud-init NoCloud seed disk)";

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Define a VM (state "defined"); nothing runs until `vm start`.
    Create(Box<CreateArgs>),
    /// Attach the disks, create the taps, launch QEMU; prints the VM once the
    /// guest runs.
    Start {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
    },
    /// Power the guest off: ACPI powerdown, forced stop after --timeout.
    Stop {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
        /// Seconds to wait for the guest to power off before forcing it.
        #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = timeout)]
        timeout: u32,
        /// Stop at once, without asking the guest.
        #[arg(long, conflicts_with = "timeout")]
        force: bool,
    },
    /// Reset the guest.
    Reboot {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
    },
    /// Freeze the guest's vCPUs.
    Pause {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
    },
    /// Let a paused guest run again.
    Resume {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
    },
    /// Save a stopped VM's pdisk disk as a new image (pdisk:///NAME); with
    /// --wait, until its checksum is known (IMAGE_SAVED).
    Save {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
        /// The disk to save.
        #[arg(long, value_name = "DEVICE", default_value = "vda")]
        disk: String,
        /// Name of the new image's base volume in pdisk.
        #[arg(long, value_name = "NAME", value_parser = image_name)]
        image: String,
        /// Wait until the image is saved and print its reference.
        #[arg(long)]
        wait: bool,
    },
    /// Attach or detach a disk: on a running VM it is hot-plugged.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Attach or detach a NIC: on a running VM it is hot-plugged.
    #[command(subcommand)]
    Nic(NicCommand),
    /// Stop the VM if it runs, detach its disks, remove its taps and files,
    /// and forget it. Its pdisk volumes are kept.
    Destroy {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
        /// Seconds to wait for a running guest to power off before forcing it.
        #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = timeout)]
        timeout: u32,
    },
    /// Move a running guest live to another host's agent (its pdisk disks
    /// stay where they are; the destination needs the same bridges). Shows
    /// QEMU's progress; prints the downtime and total time once the guest
    /// runs there. On failure the guest keeps running here.
    Migrate {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
        /// The destination agent's address, https://HOST:PORT.
        #[arg(long = "to", value_name = "URL")]
        to: String,
    },
    /// Show one VM in detail: state, disks, NICs, console log.
    Show {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
    },
    /// List the VMs of this host.
    List,
    /// Print the VM's serial console log, a file on this host. With --json,
    /// JSON Lines: {"vm", "console_log", "text"} per batch of output.
    Console {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
        /// Keep printing what the guest writes until it stops running (or Ctrl-C).
        #[arg(long, short)]
        follow: bool,
        /// Print the guest's bytes as they are; by default escape sequences
        /// and control characters (but newline and tab) are removed, so a
        /// guest cannot drive your terminal.
        #[arg(long)]
        raw: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Attach a pdisk volume of the VM's project: pdisk:[SERVER/]VOLUME[,ro],
    /// with its I/O limits if given (as `vm disk qos` takes them).
    Attach {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
        /// The disk, as `vm create --disk` takes it (pdisk volumes only).
        #[arg(value_name = "DISK", value_parser = boxed_disk)]
        disk: Box<DiskArg>,
        #[command(flatten)]
        qos: Box<QosArgs>,
    },
    /// Grow a pdisk disk (pdisk resizes the volume; a running guest sees
    /// the new capacity at once).
    Resize {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
        /// The disk's device (vda, vdb, ...).
        #[arg(value_name = "DEVICE")]
        device: String,
        /// The new size (e.g. 20G), larger than the current one.
        #[arg(value_name = "SIZE", value_parser = disk_size)]
        size: ByteSize,
    },
    /// Set a disk's I/O limits (all of them: what is not given is
    /// unlimited); a running guest's at once, a stopped one's at its next
    /// start. QEMU's rules: a total limit or a read/write split, a burst
    /// (`*-max`) above its base, a burst length (`*-max-length`) with its
    /// burst.
    Qos {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
        /// The disk's device (vda, vdb, ...).
        #[arg(value_name = "DEVICE")]
        device: String,
        #[command(flatten)]
        limits: Box<QosArgs>,
    },
    /// Detach a disk by its device (vda, vdb, ...: see `vm show`).
    Detach {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
        /// The disk's device.
        #[arg(value_name = "DEVICE")]
        device: String,
        /// Seconds to wait for a running guest to release it.
        #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = timeout)]
        timeout: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum NicCommand {
    /// Attach a NIC: bridge=BR[,mac=MAC][,vlan=N][,ip=ADDR...] or default.
    Attach {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
        /// The NIC, as `vm create --nic` takes it.
        #[arg(value_name = "NIC")]
        nic: NicArg,
    },
    /// Detach a NIC by its MAC (or, on a running VM, its tap).
    Detach {
        /// VM name or UUID.
        #[arg(value_name = "NAME")]
        vm: Ref,
        /// The NIC's MAC address or tap.
        #[arg(value_name = "MAC")]
        nic: String,
        /// Seconds to wait for a running guest to release it.
        #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = timeout)]
        timeout: u32,
    },
}

/// A disk size: 20G, 512M, bytes.
pub(super) fn disk_size(s: &str) -> Result<ByteSize, String> {
    s.parse::<ByteSize>().map_err(|e| format!("{s:?}: {e}"))
}

/// A `--disk`-like argument, boxed (it is the largest of its command's).
fn boxed_disk(s: &str) -> Result<Box<DiskArg>, String> {
    s.parse().map(Box::new)
}

/// The DiskSpec of `vm disk attach`: pdisk volumes only, with `qos`'s
/// limits (checked).
pub fn attach_disk_spec(d: &DiskArg, qos: &QosArgs) -> Result<DiskSpec, String> {
    let DiskSource::Pdisk(v) = &d.source else {
        return Err("only pdisk:[SERVER/]VOLUME disks are attached to a VM".into());
    };
    Ok(DiskSpec {
        read_only: d.read_only,
        boot_index: d.boot.unwrap_or(0),
        server: d.server.as_ref().map(|s| s.to_string()).unwrap_or_default(),
        source: Some(disk_spec::Source::PdiskVolume(v.to_string())),
        qos: qos.spec()?,
        ..DiskSpec::default()
    })
}

/// The NicSpec of `vm nic attach`.
pub fn attach_nic_spec(n: &NicArg) -> NicSpec {
    NicSpec {
        bridge: n.bridge.clone().unwrap_or_default(),
        mac: n.mac.map(|m| m.to_string()).unwrap_or_default(),
        vlan: n.vlan.map_or(0, u32::from),
        ips: n.ips.iter().map(|ip| ip.to_string()).collect(),
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name of the VM: lowercase letters, digits, '.', '_' and '-', starting
    /// with a letter or digit, at most 63 characters.
    pub name: VolumeName,

    /// Number of virtual CPUs (1 to 255).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_VCPUS)))]
    pub vcpus: u32,

    /// Guest memory (e.g. 256M, 2G), at least 16M; rounded up to a whole MiB.
    #[arg(long, value_name = "SIZE", value_parser = memory)]
    pub memory: ByteSize,

    /// A disk, in device order (vda, vdb, ...): pdisk:[SERVER/]VOLUME,
    /// file:PATH or image:URL,sha256=HEX, then ",ro" for read-only and
    /// ",boot=N" for its place in the boot order (1 first). Without any
    /// boot=, the first disk boots. Repeat for several. SERVER is one of
    /// the agent's pdisk servers (agentd --pdisk NAME=URL; none: the
    /// default one).
    ///
    /// An image disk is fetched once per host from its http://, https:// or
    /// file:/// URL and must hash to the SHA-256 given (64 hex digits). By
    /// default the guest gets its own pdisk clone of the image; ",local"
    /// makes it an ephemeral overlay on this host's cached copy instead.
    /// ",server=NAME" makes the clone on that pdisk server;
    /// ",size=SIZE" grows the disk beyond the image's size;
    /// ",format=raw|qcow2|auto" (default auto) and ",endorser=NAME" are
    /// checked by the agent. The URL cannot contain ',': write it as %2C.
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<DiskArg>,

    /// A NIC as bridge=BR[,mac=MAC][,vlan=N]; each key may be left out (the
    /// agent's default bridge, a generated MAC, untagged), and "default"
    /// takes all three defaults. Repeat for several.
    #[arg(long = "nic", value_name = "SPEC")]
    pub nics: Vec<NicArg>,

    /// Boot this kernel directly instead of from a disk.
    #[arg(long, value_name = "PATH", value_parser = host_path)]
    pub kernel: Option<PathBuf>,

    /// Initramfs for --kernel.
    #[arg(long, value_name = "PATH", value_parser = host_path, requires = "kernel")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line for --kernel.
    #[arg(
        long,
        value_name = "ARGS",
        requires = "kernel",
        allow_hyphen_values = true
    )]
    pub cmdline: Option<String>,

    /// Label as KEY=VALUE; repeat for several.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = label_arg)]
    pub labels: Vec<(String, String)>,

    /// The guest's hostname (RFC 1123: labels of letters, digits and '-',
    /// joined by '.'). Any option of this group gives the guest a cloud-init
    /// NoCloud seed: a small read-only disk labelled CIDATA after the other
    /// disks, rebuilt at every start, whose meta-data has the VM UUID as
    /// instance-id and this hostname (default: the VM name).
    #[arg(long, value_name = "HOST", value_parser = hostname, help_heading = CONTEXT)]
    pub hostname: Option<String>,

    /// A file of OpenSSH public keys, one per line ('#' comments and blank
    /// lines skipped), for the guest's default user. Repeat for several.
    #[arg(long = "ssh-key-file", value_name = "FILE", value_parser = local_file, help_heading = CONTEXT)]
    pub ssh_key_files: Vec<PathBuf>,

    /// The guest's cloud-init user-data (#cloud-config, a script...), at most
    /// 1 MiB, passed as is. Default: a #cloud-config that only authorizes the
    /// SSH keys.
    #[arg(long, value_name = "FILE", value_parser = local_file, help_heading = CONTEXT)]
    pub user_data_file: Option<PathBuf>,

    /// The guest's cloud-init network-config (v1 or v2), at most 64 KiB,
    /// passed as is. Default: none (cloud-init configures the first NIC by DHCP).
    #[arg(long, value_name = "FILE", value_parser = local_file, help_heading = CONTEXT)]
    pub network_config_file: Option<PathBuf>,

    /// The disks the QoS options limit, by device (vda is the first
    /// --disk, vdb the second...); repeat for several. Default: every
    /// --disk, each with these limits of its own, or all sharing them
    /// with --group. Other limits per disk: `vm disk qos` before the start.
    #[arg(long = "qos-disk", value_name = "DEVICE", help_heading = QOS)]
    pub qos_disks: Vec<String>,

    #[command(flatten)]
    pub qos: QosArgs,
}

/// `--timeout`: a positive number of seconds, at most a day.
pub(super) fn timeout(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=86_400).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number of seconds from 1 to 86400")),
    }
}

/// Guest memory: rounded up to a whole MiB, as QEMU allocates it.
pub(super) fn memory(s: &str) -> Result<ByteSize, String> {
    let size = s.parse::<ByteSize>().map_err(|e| e.to_string())?;
    let size = ByteSize::volume_size(size.0).map_err(|e| format!("memory {s:?}: {e}"))?;
    if size.0 < MIN_MEMORY {
        return Err(format!(
            "memory {size} is too small: at least {}",
            ByteSize(MIN_MEMORY)
        ));
    }
    Ok(size)
}

/// `--hostname`: the agent's grammar.
pub(super) fn hostname(s: &str) -> Result<String, String> {
    check_hostname(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// A file agentctl reads itself (contents go in the request): any path but
/// an empty one.
pub(super) fn local_file(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("the path is empty".into());
    }
    Ok(PathBuf::from(s))
}

/// Reads a text file given with `flag`, relative to `cwd`.
pub(super) fn read_text(flag: &str, path: &Path, cwd: &Path) -> Result<String, String> {
    let bytes = std::fs::read(cwd.join(path))
        .map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| format!("{flag} {} is not UTF-8 text", path.display()))
}

/// The keys of an authorized_keys-style file: one per line, blank lines and
/// '#' comments skipped, each checked as the agent will.
pub(super) fn ssh_keys_of(path: &Path, text: &str) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        check_ssh_key(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        keys.push(line.to_owned());
    }
    if keys.is_empty() {
        return Err(format!("--ssh-key-file {} holds no key", path.display()));
    }
    Ok(keys)
}

/// `path` as the agent must see it: absolute, relative to `cwd`.
pub(super) fn absolute(path: &Path, cwd: &Path) -> String {
    cwd.join(path).to_string_lossy().into_owned()
}

impl CreateArgs {
    /// The VmSpec to send, after the checks that span several arguments:
    /// label set, counts, boot order, MACs, something to boot. File paths are
    /// made absolute against `cwd`.
    pub fn spec(&self, cwd: &Path) -> Result<VmSpec, String> {
        let labels = label_map(&self.labels)?;
        if self.disks.len() > MAX_DISKS {
            return Err(format!(
                "{} disks: a VM has at most {MAX_DISKS}",
                self.disks.len()
            ));
        }
        if self.nics.len() > MAX_NICS {
            return Err(format!(
                "{} NICs: a VM has at most {MAX_NICS}",
                self.nics.len()
            ));
        }
        if self.disks.is_empty() && self.kernel.is_none() {
            return Err("nothing to boot: give a --disk or a --kernel".into());
        }
        let context = self.context(cwd)?;
        if context.is_some() && self.disks.len() >= MAX_DISKS {
            return Err(format!(
                "{} disks: a VM with a cloud-init seed has at most {}",
                self.disks.len(),
                MAX_DISKS - 1
            ));
        }
        let boots: Vec<u32> = self.disks.iter().filter_map(|d| d.boot).collect();
        if let Some(dup) = boots
            .iter()
            .enumerate()
            .find(|(i, b)| boots[..*i].contains(b))
        {
            return Err(format!("boot={} is given to more than one disk", dup.1));
        }
        let macs: Vec<Mac> = self.nics.iter().filter_map(|n| n.mac).collect();
        if let Some((_, mac)) = macs
            .iter()
            .enumerate()
            .find(|(i, m)| macs[..*i].contains(m))
        {
            return Err(format!("MAC {mac} is given to more than one NIC"));
        }
        let qos = self.disk_qos()?;
        let first_boots = boots.is_empty();
        let disks = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut disk = DiskSpec {
                    read_only: d.read_only,
                    boot_index: match d.boot {
                        Some(n) => n,
                        None if first_boots && i == 0 => 1,
                        None => 0,
                    },
                    server: d.server.as_ref().map(|s| s.to_string()).unwrap_or_default(),
                    qos: qos[i].clone(),
                    ..DiskSpec::default()
                };
                disk.source = Some(match &d.source {
                    DiskSource::Pdisk(v) => disk_spec::Source::PdiskVolume(v.to_string()),
                    DiskSource::File(p) => disk_spec::Source::File(absolute(p, cwd)),
                    DiskSource::Image(image) => {
                        disk.size_bytes = image.size.map_or(0, |s| s.0);
                        disk.set_persistence(if image.local {
                            DiskPersistence::Local
                        } else {
                            DiskPersistence::Clone
                        });
                        disk_spec::Source::Image(image_pb(&image.image))
                    }
                });
                disk
            })
            .collect();
        let nics = self
            .nics
            .iter()
            .map(|n| NicSpec {
                bridge: n.bridge.clone().unwrap_or_default(),
                mac: n.mac.map(|m| m.to_string()).unwrap_or_default(),
                vlan: n.vlan.map_or(0, u32::from),
                ips: n.ips.iter().map(|ip| ip.to_string()).collect(),
            })
            .collect();
        let kernel = self.kernel.as_ref().map(|k| KernelBoot {
            kernel: absolute(k, cwd),
            initrd: self
                .initrd
                .as_ref()
                .map(|i| absolute(i, cwd))
                .unwrap_or_default(),
            cmdline: self.cmdline.clone().unwrap_or_default(),
        });
        Ok(VmSpec {
            name: self.name.to_string(),
            vcpus: self.vcpus,
            memory_bytes: self.memory.0,
            disks,
            nics,
            kernel,
            labels,
            context,
        })
    }

    /// Each --disk's limits: the QoS options' (checked) for the disks
    /// --qos-disk names, or every disk without --qos-disk.
    fn disk_qos(&self) -> Result<Vec<Option<stratus_proto::agent::v1::DiskQos>>, String> {
        let qos = self.qos.spec()?;
        let devices: Vec<String> = (0..self.disks.len()).map(device_name).collect();
        for d in &self.qos_disks {
            if !devices.contains(d) {
                return Err(format!(
                    "--qos-disk {d}: the VM's disks are {} (one per --disk, in order)",
                    if devices.is_empty() {
                        "none".to_owned()
                    } else {
                        devices.join(", ")
                    }
                ));
            }
        }
        if qos.is_none() && !self.qos_disks.is_empty() {
            return Err("--qos-disk needs a limit or a --group to give".into());
        }
        Ok(devices
            .iter()
            .map(|d| {
                (self.qos_disks.is_empty() || self.qos_disks.contains(d))
                    .then(|| qos.clone())
                    .flatten()
            })
            .collect())
    }

    /// The seed's contents when any contextualization option is given, with
    /// the files read (relative to `cwd`) and checked as the agent will.
    fn context(&self, cwd: &Path) -> Result<Option<Contextualization>, String> {
        if self.hostname.is_none()
            && self.ssh_key_files.is_empty()
            && self.user_data_file.is_none()
            && self.network_config_file.is_none()
        {
            return Ok(None);
        }
        if self.hostname.is_none() && check_hostname(self.name.as_str()).is_err() {
            return Err(format!(
                "the VM name {} is not a valid hostname for the guest: give --hostname",
                self.name
            ));
        }
        let mut ssh_keys = Vec::new();
        for path in &self.ssh_key_files {
            let text = read_text("--ssh-key-file", path, cwd)?;
            ssh_keys.extend(ssh_keys_of(path, &text)?);
        }
        if ssh_keys.len() > MAX_SSH_KEYS {
            return Err(format!(
                "{} ssh keys: at most {MAX_SSH_KEYS}",
                ssh_keys.len()
            ));
        }
        let document = |flag: &str, path: &Option<PathBuf>, what: &str, limit: usize| {
            let Some(path) = path else {
                return Ok(String::new());
            };
            let text = read_text(flag, path, cwd)?;
            check_document(&format!("{what} {}", path.display()), &text, limit)
                .map_err(|e| e.to_string())?;
            if text.is_empty() {
                return Err(format!("{flag} {} is empty", path.display()));
            }
            Ok(text)
        };
        Ok(Some(Contextualization {
            hostname: self.hostname.clone().unwrap_or_default(),
            user_data: document(
                "--user-data-file",
                &self.user_data_file,
                "user-data",
                MAX_USER_DATA,
            )?,
            network_config: document(
                "--network-config-file",
                &self.network_config_file,
                "network-config",
                MAX_NETWORK_CONFIG,
            )?,
            ssh_keys,
        }))
    }
}

/// A pdisk volume name for a saved image.
pub(super) fn image_name(s: &str) -> Result<String, String> {
    s.parse::<stratus_core::types::VolumeName>()
        .map(|n| n.to_string())
        .map_err(|e| e.to_string())
}
