//! The command line of `agentctl`. Every argument is parsed here into a
//! validated type (names, sizes, disk and NIC specs, image references and
//! checksums, MACs), so bad input is refused with exit status 2 before the
//! agent is contacted; agentd checks again. [`CreateArgs::spec`] adds the checks that span several arguments
//! and builds the CreateVm request.

use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use agent::images::{DeclaredFormat, ImageRef, Sha256};
use agent::seed::{
    check_document, check_hostname, check_ssh_key, MAX_NETWORK_CONFIG, MAX_SSH_KEYS, MAX_USER_DATA,
};
use agent::spec::{check_ifname, MAX_DISKS, MAX_NICS, MAX_VCPUS, MIN_MEMORY};
use clap::{Args, Parser, Subcommand};
use stratus_core::cli::args::{label_arg, label_map, Ref};
use stratus_core::types::{ByteSize, VolumeName};
use stratus_proto::agent::v1::{
    disk_spec, Contextualization, DiskPersistence, DiskSpec, ImageFormat, ImageRef as PbImageRef,
    KernelBoot, NicSpec, PullImageRequest, VmSpec,
};

pub const DEFAULT_AGENT: &str = "http://127.0.0.1:7401";

/// Help heading of the options every command accepts.
const GLOBAL: &str = "Global options";

/// Help heading of the options that make the guest's cloud-init seed.
const CONTEXT: &str = "Contextualization (a cloud-init NoCloud seed disk)";

/// Highest boot index a disk may be given (QEMU's bootindex is small anyway).
const MAX_BOOT_INDEX: u32 = 255;

const EXAMPLES: &str = "\
Examples:
  agentctl vm create web1 --vcpus 2 --memory 512M --disk pdisk:web1-root --nic bridge=br0
  agentctl vm create t1 --vcpus 1 --memory 256M --kernel /boot/vmlinuz --initrd /boot/initrd.img \\
      --cmdline 'console=ttyS0' --disk file:/srv/images/scratch.qcow2 --nic bridge=br0,vlan=20
  agentctl vm create app1 --vcpus 1 --memory 1G --disk pdisk:app1-root --nic default \\
      --hostname app1.example.org --ssh-key-file ~/.ssh/id_ed25519.pub --user-data-file init.yaml
  agentctl image pull https://images.example/debian-12.qcow2 --sha256 \"$SHA\" --pdisk
  agentctl vm create img1 --vcpus 1 --memory 512M --nic default \\
      --disk \"image:https://images.example/debian-12.qcow2,sha256=$SHA,size=10G\"
  agentctl image list
  agentctl vm start web1
  agentctl vm console web1 --follow
  agentctl vm stop web1 --timeout 30
  agentctl events --since 120 --vm web1
  agentctl --json events --follow | jq .type";

/// Operator's client for agentd, the agent that runs the QEMU/KVM guests of
/// one Stratus host: define, start, stop and inspect VMs, read their serial
/// consoles, follow the event stream, manage the image caches, and see the
/// host's capacity.
///
/// VMs are referred to by name or by UUID. Sizes take binary suffixes (256M,
/// 2G). Paths (file disks, kernels, console logs) are on this host, the
/// agent's: agentctl runs beside agentd.
#[derive(Debug, Parser)]
#[command(name = "agentctl", version, after_help = EXAMPLES)]
pub struct Cli {
    /// Address of agentd's gRPC endpoint; "http://" is assumed without a scheme.
    #[arg(
        long,
        global = true,
        env = "AGENT_SERVER",
        hide_env_values = true,
        default_value = DEFAULT_AGENT,
        value_name = "URL",
        help_heading = GLOBAL
    )]
    pub agent: String,

    /// Print the result, or the error, as JSON on stdout (events as JSON
    /// Lines, one object per line; no spinners).
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Define, start, stop, inspect and destroy VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Print the agent's events: replayed from its journal, then (with
    /// --follow) live.
    Events(EventsArgs),
    /// Fetch, list and evict the images cached on this host and imported
    /// into pdisk, keyed by their SHA-256.
    #[command(subcommand)]
    Image(ImageCommand),
    /// The host the agent runs on.
    #[command(subcommand)]
    Host(HostCommand),
}

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
    },
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

    /// A disk, in device order (vda, vdb, ...): pdisk:VOLUME, file:PATH or
    /// image:URL,sha256=HEX, then ",ro" for read-only and ",boot=N" for its
    /// place in the boot order (1 first). Without any boot=, the first disk
    /// boots. Repeat for several.
    ///
    /// An image disk is fetched once per host from its http://, https:// or
    /// file:/// URL and must hash to the SHA-256 given (64 hex digits). By
    /// default the guest gets its own pdisk clone of the image; ",local"
    /// makes it an ephemeral overlay on this host's cached copy instead.
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
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events after this sequence number (0: all still journaled).
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    pub since: u64,

    /// Only the events of this VM (name or UUID).
    #[arg(long, value_name = "NAME")]
    pub vm: Option<Ref>,

    /// After the replay, keep printing live events until Ctrl-C.
    #[arg(long, short)]
    pub follow: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Fetch an image into this host's cache ahead of the guests that use it,
    /// verifying its SHA-256; with --pdisk, also import it into a pdisk base
    /// volume for clone disks. Prints the cached image.
    Pull(PullArgs),
    /// List the images in this host's cache and the pdisk base volumes made
    /// from images.
    List,
    /// Evict an image from this host's cache and/or pdisk: both unless
    /// --local or --pdisk narrows it. Refused while a guest uses it (a local
    /// overlay, or a clone of its pdisk base).
    Rm(RmArgs),
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Where to fetch the image: an http:// or https:// URL, or a file:///
    /// URL naming an absolute path on this host.
    #[arg(value_name = "URL", value_parser = image_url)]
    pub url: String,

    /// The SHA-256 the image must hash to (64 hex digits); a download that
    /// hashes otherwise is refused and dropped.
    #[arg(long, value_name = "HEX", value_parser = sha256_arg)]
    pub sha256: Sha256,

    /// The image's format: raw, qcow2, or auto (what its header says).
    #[arg(long, value_name = "FORMAT", default_value = "auto", value_parser = format_arg)]
    pub format: DeclaredFormat,

    /// Who endorsed the image, checked against the host's image policy.
    #[arg(long, value_name = "NAME")]
    pub endorser: Option<String>,

    /// Also import the image into a pdisk base volume (for clone disks).
    #[arg(long)]
    pub pdisk: bool,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// The image's SHA-256, or a unique prefix of it of at least
    /// 8 hex digits (as `image list` shows).
    #[arg(value_name = "SHA256", value_parser = sha256_prefix)]
    pub sha256: String,

    /// Only from this host's cache.
    #[arg(long)]
    pub local: bool,

    /// Only the pdisk base volume.
    #[arg(long)]
    pub pdisk: bool,
}

impl PullArgs {
    /// The PullImage request, after the checks that span the arguments (the
    /// endorser, in the agent's words).
    pub fn request(&self) -> Result<PullImageRequest, String> {
        let image = ImageRef::new(
            &self.url,
            self.sha256.as_str(),
            self.format,
            self.endorser.clone(),
        )
        .map_err(|e| e.to_string())?;
        Ok(PullImageRequest {
            image: Some(image_pb(&image)),
            to_pdisk: self.pdisk,
        })
    }
}

impl RmArgs {
    /// The whole checksum when one was given.
    pub fn whole(&self) -> Option<&str> {
        (self.sha256.len() == 64).then_some(self.sha256.as_str())
    }

    /// The distinct checksums among `listed` that start with the one given,
    /// sorted (an image both cached here and in pdisk is listed twice).
    pub fn matching<'a>(&self, listed: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut found: Vec<String> = listed
            .into_iter()
            .filter(|s| s.starts_with(&self.sha256))
            .map(str::to_owned)
            .collect();
        found.sort();
        found.dedup();
        found
    }

    /// (local, pdisk) as EvictImage takes them: neither flag means both.
    pub fn caches(&self) -> (bool, bool) {
        if self.local || self.pdisk {
            (self.local, self.pdisk)
        } else {
            (true, true)
        }
    }
}

/// Digits of a SHA-256 prefix that `image rm` accepts at least.
pub const MIN_SHA256_PREFIX: usize = 8;

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Capacity, accelerator, versions, iSCSI initiator and VM counts.
    Show,
}

/// `--timeout`: a positive number of seconds, at most a day.
fn timeout(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=86_400).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number of seconds from 1 to 86400")),
    }
}

/// An image URL, checked by the agent's own rules (scheme, host, absolute
/// `file://` path, no `..`). The reference type needs a checksum too; a
/// placeholder stands in, as only the URL's checks can fail here.
fn image_url(s: &str) -> Result<String, String> {
    const PLACEHOLDER: &str = "0000000000000000000000000000000000000000000000000000000000000000";
    ImageRef::new(s, PLACEHOLDER, DeclaredFormat::Auto, None).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// `--sha256`: 64 hex digits, kept lowercase.
fn sha256_arg(s: &str) -> Result<Sha256, String> {
    Sha256::parse(s).map_err(|e| e.to_string())
}

/// `--format`: raw, qcow2 or auto.
fn format_arg(s: &str) -> Result<DeclaredFormat, String> {
    if s.is_empty() {
        return Err("expected raw, qcow2 or auto".into());
    }
    s.parse()
        .map_err(|e: stratus_core::error::Error| e.to_string())
}

/// `image rm`'s checksum: 8 to 64 hex digits, lowercased.
fn sha256_prefix(s: &str) -> Result<String, String> {
    if !(MIN_SHA256_PREFIX..=64).contains(&s.len()) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not a SHA-256 or a prefix of one: {MIN_SHA256_PREFIX} to 64 hex digits"
        ));
    }
    Ok(s.to_ascii_lowercase())
}

/// Guest memory: rounded up to a whole MiB, as QEMU allocates it.
fn memory(s: &str) -> Result<ByteSize, String> {
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

/// A path on this host: not empty, no NUL, no ',' (QEMU's option syntax), no
/// '..'. Relative paths are made absolute by [`CreateArgs::spec`], since the
/// agent does not share this process's working directory.
fn host_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("the path is empty".into());
    }
    if s.contains('\0') || s.contains(',') {
        return Err(format!("{s:?}: paths may not contain ',' or NUL"));
    }
    let path = PathBuf::from(s);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{s:?}: paths may not contain '..'"));
    }
    Ok(path)
}

/// `--hostname`: the agent's grammar.
fn hostname(s: &str) -> Result<String, String> {
    check_hostname(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// A file agentctl reads itself (contents go in the request): any path but
/// an empty one.
fn local_file(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("the path is empty".into());
    }
    Ok(PathBuf::from(s))
}

/// Reads a text file given with `flag`, relative to `cwd`.
fn read_text(flag: &str, path: &Path, cwd: &Path) -> Result<String, String> {
    let bytes = std::fs::read(cwd.join(path))
        .map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| format!("{flag} {} is not UTF-8 text", path.display()))
}

/// The keys of an authorized_keys-style file: one per line, blank lines and
/// '#' comments skipped, each checked as the agent will.
fn ssh_keys_of(path: &Path, text: &str) -> Result<Vec<String>, String> {
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

/// Where a disk's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A pdisk volume, by name or UUID; the agent has it exported to this host.
    Pdisk(Ref),
    /// An image file on this host (raw or qcow2).
    File(PathBuf),
    /// An image by URL and checksum, through the agent's image caches.
    Image(ImageDisk),
}

/// The image-only part of an `image:` disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDisk {
    /// URL, checksum, declared format and endorser, checked by the agent's
    /// own type, so client and server accept exactly the same references.
    pub image: ImageRef,
    /// The disk's size, grown from the image's; `None`: the image's size.
    pub size: Option<ByteSize>,
    /// An ephemeral qcow2 overlay on this host's cached copy instead of a
    /// per-guest pdisk clone.
    pub local: bool,
}

/// One `--disk`: `pdisk:VOLUME`, `file:PATH` or `image:URL,sha256=HEX`, then
/// options (`ro`, `boot=N`; for images also `size=`, `local`, `format=`,
/// `endorser=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    pub source: DiskSource,
    pub read_only: bool,
    /// Place in the boot order, 1 first; `None`: not bootable unless no disk
    /// has one (then the first disk boots).
    pub boot: Option<u32>,
}

/// The options of an `image:` disk, as `--disk` usage errors list them.
const IMAGE_OPTIONS: &str =
    "sha256=HEX, size=SIZE, local, format=raw|qcow2|auto, endorser=NAME, ro or boot=N";

/// Why a URL cannot be given with a ',' in it, and what to do instead.
const URL_COMMA: &str = "an image URL in --disk cannot contain ',': write it as %2C";

/// The options of one `--disk`, each at most once.
#[derive(Default)]
struct DiskOptions<'a> {
    read_only: bool,
    boot: Option<u32>,
    sha256: Option<Sha256>,
    size: Option<ByteSize>,
    local: bool,
    format: Option<DeclaredFormat>,
    endorser: Option<&'a str>,
}

impl<'a> DiskOptions<'a> {
    /// Parses the options after the source; `image` says whether the
    /// image-only ones are allowed.
    fn parse(options: impl Iterator<Item = &'a str>, image: bool) -> Result<Self, String> {
        let mut o = DiskOptions::default();
        let mut seen: Vec<&str> = Vec::new();
        for option in options {
            let (key, value) = option
                .split_once('=')
                .map_or((option, None), |(k, v)| (k, Some(v)));
            let placeholder = match key {
                "ro" | "local" => None,
                "boot" => Some("N"),
                "sha256" => Some("HEX"),
                "size" => Some("SIZE"),
                "format" => Some("raw|qcow2|auto"),
                "endorser" => Some("NAME"),
                _ => return Err(unknown_disk_option(option, image)),
            };
            if !image && !matches!(key, "ro" | "boot") {
                return Err(format!(
                    "disk option {key:?} is only for image disks (image:URL,sha256=HEX,...)"
                ));
            }
            if seen.contains(&key) {
                return Err(format!("disk option {key:?} is given twice"));
            }
            seen.push(key);
            let value = match (placeholder, value) {
                (None, None) => "",
                (None, Some(_)) => return Err(format!("disk option {key:?} takes no value")),
                (Some(p), None | Some("")) => {
                    return Err(format!("disk option {key:?} needs a value: {key}={p}"))
                }
                (Some(_), Some(v)) => v,
            };
            match key {
                "ro" => o.read_only = true,
                "local" => o.local = true,
                "boot" => {
                    o.boot = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|n| (1..=MAX_BOOT_INDEX).contains(n))
                            .ok_or_else(|| {
                                format!(
                                    "boot={value}: the boot index is a number from 1 (boots \
                                     first) to {MAX_BOOT_INDEX}"
                                )
                            })?,
                    );
                }
                "sha256" => o.sha256 = Some(Sha256::parse(value).map_err(|e| e.to_string())?),
                "size" => o.size = Some(image_size(value)?),
                "format" => {
                    o.format = Some(value.parse::<DeclaredFormat>().map_err(|e| e.to_string())?)
                }
                "endorser" => o.endorser = Some(value),
                _ => unreachable!("option {key} is known"),
            }
        }
        Ok(o)
    }
}

/// An option this `--disk` does not know. For an image disk, a piece with
/// '/', '.', '?' or '&' in it is most likely the rest of a URL cut at a ','.
fn unknown_disk_option(option: &str, image: bool) -> String {
    if !image {
        return format!(
            "unknown disk option {option:?}: expected ro or boot=N (paths cannot contain ',')"
        );
    }
    let key = option.split_once('=').map_or(option, |(k, _)| k);
    if key.contains(['/', '.', '?', '&', '%']) {
        return format!("{option:?} looks like the rest of the image URL: {URL_COMMA}");
    }
    format!("unknown disk option {option:?}: expected {IMAGE_OPTIONS} ({URL_COMMA})")
}

/// `size=` of an image disk: a size, rounded up to a whole MiB as pdisk
/// volumes are; more than zero (leave it out for the image's own size).
fn image_size(s: &str) -> Result<ByteSize, String> {
    let size = s
        .parse::<ByteSize>()
        .map_err(|e| format!("size={s}: {e}"))?;
    ByteSize::volume_size(size.0)
        .map_err(|e| format!("size={s}: {e} (leave size= out for the image's own size)"))
}

impl FromStr for DiskArg {
    type Err = String;
    fn from_str(s: &str) -> Result<DiskArg, String> {
        let mut parts = s.split(',');
        let first = parts.next().unwrap_or_default();
        let Some((kind, what)) = first.split_once(':') else {
            return Err(format!(
                "{s:?} has no source: use pdisk:VOLUME, file:PATH or image:URL,sha256=HEX, \
                 optionally followed by ,ro and ,boot=N"
            ));
        };
        let image = kind == "image";
        let source = match kind {
            "pdisk" => Some(DiskSource::Pdisk(
                what.parse()
                    .map_err(|e| format!("pdisk volume {what:?}: {e}"))?,
            )),
            "file" => Some(DiskSource::File(host_path(what)?)),
            // Built once its options are known.
            "image" if what.is_empty() => {
                return Err("the image disk has no URL: use image:URL,sha256=HEX".into())
            }
            "image" => None,
            other => {
                return Err(format!(
                    "unknown disk source {other:?}: use pdisk:VOLUME, file:PATH or \
                     image:URL,sha256=HEX"
                ))
            }
        };
        let o = DiskOptions::parse(parts, image)?;
        let source = match source {
            Some(source) => source,
            None => {
                let sha256 = o.sha256.ok_or_else(|| {
                    format!(
                        "image disk {what}: sha256=HEX is required (the SHA-256 the image \
                         must hash to, 64 hex digits)"
                    )
                })?;
                let image = ImageRef::new(
                    what,
                    sha256.as_str(),
                    o.format.unwrap_or_default(),
                    o.endorser.map(str::to_owned),
                )
                .map_err(|e| e.to_string())?;
                DiskSource::Image(ImageDisk {
                    image,
                    size: o.size,
                    local: o.local,
                })
            }
        };
        Ok(DiskArg {
            source,
            read_only: o.read_only,
            boot: o.boot,
        })
    }
}

/// The proto's format for the agent's.
pub fn format_pb(f: DeclaredFormat) -> ImageFormat {
    match f {
        DeclaredFormat::Raw => ImageFormat::Raw,
        DeclaredFormat::Qcow2 => ImageFormat::Qcow2,
        DeclaredFormat::Auto => ImageFormat::Auto,
    }
}

/// An image reference as the API takes it.
pub fn image_pb(i: &ImageRef) -> PbImageRef {
    PbImageRef {
        url: i.url().to_owned(),
        sha256: i.sha256().to_string(),
        format: format_pb(i.format()) as i32,
        endorser: i.endorser().unwrap_or_default().to_owned(),
    }
}

/// A guest NIC's Ethernet address: the agent's own type, so client and
/// server accept exactly the same addresses.
pub use agent::net::Mac;

/// One `--nic`: `bridge=BR[,mac=MAC][,vlan=N]` with the keys in any order,
/// each optional, or `default`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NicArg {
    /// `None`: the agent's default bridge.
    pub bridge: Option<String>,
    /// `None`: the agent generates one.
    pub mac: Option<Mac>,
    /// 802.1Q tag, 1 to 4094; `None`: untagged.
    pub vlan: Option<u16>,
}

impl FromStr for NicArg {
    type Err = String;
    fn from_str(s: &str) -> Result<NicArg, String> {
        if s == "default" {
            return Ok(NicArg::default());
        }
        if s.is_empty() {
            return Err("empty NIC: use bridge=BR[,mac=MAC][,vlan=N], or default".into());
        }
        let mut nic = NicArg::default();
        for option in s.split(',') {
            let Some((key, value)) = option.split_once('=') else {
                return Err(format!(
                    "NIC option {option:?} is not KEY=VALUE: use bridge=BR[,mac=MAC][,vlan=N]"
                ));
            };
            let twice = || format!("NIC option {key:?} is given twice");
            match key {
                "bridge" if nic.bridge.is_some() => return Err(twice()),
                "bridge" => {
                    check_ifname("bridge", value).map_err(|e| e.to_string())?;
                    nic.bridge = Some(value.to_owned());
                }
                "mac" if nic.mac.is_some() => return Err(twice()),
                "mac" => {
                    nic.mac = Some(
                        value
                            .parse()
                            .map_err(|e: stratus_core::error::Error| e.to_string())?,
                    )
                }
                "vlan" if nic.vlan.is_some() => return Err(twice()),
                "vlan" => {
                    nic.vlan = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|v| (1..=4094).contains(v))
                            .ok_or_else(|| {
                                format!(
                                    "vlan={value}: the VLAN tag is a number from 1 to 4094 \
                                     (leave it out for an untagged port)"
                                )
                            })?,
                    );
                }
                _ => {
                    return Err(format!(
                        "unknown NIC option {key:?}: expected bridge, mac or vlan"
                    ))
                }
            }
        }
        Ok(nic)
    }
}

/// `path` as the agent must see it: absolute, relative to `cwd`.
fn absolute(path: &Path, cwd: &Path) -> String {
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
fn image_name(s: &str) -> Result<String, String> {
    s.parse::<stratus_core::types::VolumeName>()
        .map(|n| n.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("agentctl").chain(args.iter().copied()))
    }

    fn fails(args: &[&str]) -> clap::Error {
        parse(args).expect_err(&format!("{args:?} should be refused"))
    }

    /// `vm create web1` with `extra`, and --vcpus 2 --memory 512M unless given.
    fn create(extra: &[&str]) -> Result<CreateArgs, clap::Error> {
        let mut args = vec!["vm", "create", "web1"];
        args.extend_from_slice(extra);
        for (flag, value) in [("--vcpus", "2"), ("--memory", "512M")] {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        match parse(&args)?.command {
            Command::Vm(VmCommand::Create(a)) => Ok(*a),
            other => panic!("wrong command {other:?}"),
        }
    }

    fn spec(extra: &[&str]) -> Result<VmSpec, String> {
        create(extra).unwrap().spec(Path::new("/home/op"))
    }

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let before = parse(&["--json", "--agent", "h:1", "host", "show"]).unwrap();
        let after = parse(&["host", "show", "--json", "--agent", "h:1"]).unwrap();
        for cli in [before, after] {
            assert!(cli.json);
            assert_eq!(cli.agent, "h:1");
            assert!(matches!(cli.command, Command::Host(HostCommand::Show)));
        }
    }

    #[test]
    fn create_with_disks_nics_and_labels() {
        let s = spec(&[
            "--disk",
            "pdisk:web1-root",
            "--disk",
            "file:images/seed.iso,ro",
            "--nic",
            "bridge=br0,mac=52:54:00:AB:cd:01,vlan=20",
            "--nic",
            "default",
            "--label",
            "app=web",
        ])
        .unwrap();
        assert_eq!(s.name, "web1");
        assert_eq!(s.vcpus, 2);
        assert_eq!(s.memory_bytes, 512 << 20);
        assert_eq!(
            s.disks[0].source,
            Some(disk_spec::Source::PdiskVolume("web1-root".into()))
        );
        assert_eq!(s.disks[0].boot_index, 1, "the first disk boots by default");
        assert_eq!(
            s.disks[1].source,
            Some(disk_spec::Source::File("/home/op/images/seed.iso".into()))
        );
        assert!(s.disks[1].read_only);
        assert_eq!(s.disks[1].boot_index, 0);
        assert_eq!(s.nics[0].bridge, "br0");
        assert_eq!(s.nics[0].mac, "52:54:00:ab:cd:01");
        assert_eq!(s.nics[0].vlan, 20);
        assert_eq!(s.nics[1], NicSpec::default());
        assert_eq!(s.labels["app"], "web");
        assert!(s.kernel.is_none());
    }

    #[test]
    fn explicit_boot_indices_replace_the_default() {
        let s = spec(&["--disk", "file:/a.img", "--disk", "pdisk:b,boot=1,ro"]).unwrap();
        assert_eq!(s.disks[0].boot_index, 0);
        assert_eq!(s.disks[1].boot_index, 1);
        assert!(s.disks[1].read_only);
        let err = spec(&["--disk", "pdisk:a,boot=2", "--disk", "pdisk:b,boot=2"]).unwrap_err();
        assert_eq!(err, "boot=2 is given to more than one disk");
    }

    #[test]
    fn kernel_boot_needs_no_disk() {
        let s = spec(&[
            "--kernel",
            "vmlinuz",
            "--initrd",
            "/boot/initrd.img",
            "--cmdline",
            "console=ttyS0 quiet",
            "--disk",
            "pdisk:data",
        ])
        .unwrap();
        let k = s.kernel.unwrap();
        assert_eq!(k.kernel, "/home/op/vmlinuz");
        assert_eq!(k.initrd, "/boot/initrd.img");
        assert_eq!(k.cmdline, "console=ttyS0 quiet");
        assert_eq!(s.disks[0].boot_index, 1);
        assert_eq!(
            spec(&[]).unwrap_err(),
            "nothing to boot: give a --disk or a --kernel"
        );
        assert_eq!(
            fails(&["vm", "create", "a", "--vcpus", "1", "--memory", "1G", "--initrd", "/i"])
                .kind(),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn memory_is_rounded_up_and_at_least_16m() {
        assert_eq!(
            create(&["--memory", "1.5G"]).unwrap().memory,
            ByteSize(1536 << 20)
        );
        assert_eq!(
            create(&["--memory", "16777217"]).unwrap().memory,
            ByteSize(17 << 20)
        );
        let err = fails(&["vm", "create", "a", "--vcpus", "1", "--memory", "8M"]);
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert!(
            err.to_string()
                .contains("memory 8M is too small: at least 16M"),
            "{err}"
        );
    }

    #[test]
    fn bad_create_arguments_are_usage_errors() {
        for (args, words) in [
            (&["--vcpus", "0"][..], "0 is not in 1..=255"),
            (&["--vcpus", "256"], "256 is not in 1..=255"),
            (&["--memory", "lots"], "invalid size"),
            (&["--disk", "db1"], "has no source"),
            (&["--disk", "iscsi:x"], "unknown disk source \"iscsi\""),
            (
                &["--disk", "pdisk:DB1"],
                "is neither a UUID nor a valid name",
            ),
            (&["--disk", "pdisk:"], "is neither a UUID nor a valid name"),
            (&["--disk", "file:"], "the path is empty"),
            (&["--disk", "file:../x.img"], "may not contain '..'"),
            (&["--disk", "pdisk:a,rw"], "unknown disk option \"rw\""),
            (&["--disk", "pdisk:a,ro,ro"], "\"ro\" is given twice"),
            (&["--disk", "pdisk:a,boot=0"], "boot=0: the boot index"),
            (&["--disk", "pdisk:a,boot=x"], "boot=x: the boot index"),
            (
                &["--disk", "pdisk:a,boot"],
                "disk option \"boot\" needs a value: boot=N",
            ),
            (&["--disk", "pdisk:a,ro=1"], "\"ro\" takes no value"),
            (&["--nic", "br0"], "is not KEY=VALUE"),
            (
                &["--nic", "bridge=br0,bridge=br1"],
                "\"bridge\" is given twice",
            ),
            (&["--nic", "bridge=a/b"], "not a valid interface name"),
            (
                &["--nic", "bridge=a-very-long-bridge"],
                "not a valid interface name",
            ),
            (&["--nic", "mac=52:54:00:12:34"], "MAC"),
            (&["--nic", "mac=52:54:00:12:34:5g"], "MAC"),
            (&["--nic", "mac=01:00:5e:00:00:01"], "multicast"),
            (&["--nic", "mac=00:00:00:00:00:00"], "not a NIC address"),
            (
                &["--nic", "vlan=0"],
                "vlan=0: the VLAN tag is a number from 1 to 4094",
            ),
            (&["--nic", "vlan=4095"], "vlan=4095"),
            (&["--nic", "speed=10"], "unknown NIC option \"speed\""),
            (&["--nic", ""], "empty NIC"),
            (&["--label", "novalue"], "expected key=value"),
            (&["--kernel", "/a,b"], "may not contain ','"),
        ] {
            let err = create(args).expect_err(&format!("{args:?} should be refused"));
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{args:?}: {err}");
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains(words), "{args:?}: {err}");
        }
        let err = fails(&["vm", "create", "Web1", "--vcpus", "1", "--memory", "1G"]);
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert_eq!(
            fails(&["vm", "create", "web1", "--memory", "1G"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn checks_across_arguments() {
        let err = spec(&["--disk", "pdisk:a", "--label", "k=1", "--label", "k=2"]).unwrap_err();
        assert!(err.contains("more than once"), "{err}");
        let err = spec(&[
            "--disk",
            "pdisk:a",
            "--nic",
            "mac=52:54:00:00:00:01",
            "--nic",
            "bridge=br1,mac=52:54:00:00:00:01",
        ])
        .unwrap_err();
        assert_eq!(err, "MAC 52:54:00:00:00:01 is given to more than one NIC");
        let many: Vec<String> = (0..17).map(|i| format!("--disk=pdisk:d{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(spec(&many).unwrap_err().contains("at most 16"));
    }

    #[test]
    fn contextualization_reads_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk2 op@example";
        std::fs::write(
            dir.path().join("keys"),
            format!("# mine\n{key}\r\n\n  {key}2  \n"),
        )
        .unwrap();
        std::fs::write(dir.path().join("more.pub"), format!("{key}3\n")).unwrap();
        std::fs::write(
            dir.path().join("ud.yaml"),
            "#cloud-config\nruncmd: [true]\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("net.yaml"), "version: 2\n").unwrap();
        let s = create(&[
            "--kernel",
            "/k",
            "--hostname",
            "app1.example.org",
            "--ssh-key-file",
            "keys",
            "--ssh-key-file",
            "more.pub",
            "--user-data-file",
            "ud.yaml",
            "--network-config-file",
            &dir.path().join("net.yaml").display().to_string(),
        ])
        .unwrap()
        .spec(dir.path())
        .unwrap();
        let c = s.context.unwrap();
        assert_eq!(c.hostname, "app1.example.org");
        assert_eq!(
            c.ssh_keys,
            [key.to_string(), format!("{key}2"), format!("{key}3")]
        );
        assert_eq!(c.user_data, "#cloud-config\nruncmd: [true]\n");
        assert_eq!(c.network_config, "version: 2\n");

        // Without any of these options, no seed; with any, a seed.
        assert!(spec(&["--kernel", "/k"]).unwrap().context.is_none());
        let c = create(&["--kernel", "/k", "--user-data-file", "ud.yaml"])
            .unwrap()
            .spec(dir.path())
            .unwrap()
            .context
            .unwrap();
        assert_eq!(c.hostname, "", "the agent names the guest after the VM");
        assert!(c.ssh_keys.is_empty());
    }

    #[test]
    fn bad_contextualization_is_refused_before_sending() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("priv"),
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("empty"), "# nothing\n").unwrap();
        std::fs::write(dir.path().join("bin"), b"\xff\xfe").unwrap();
        std::fs::write(dir.path().join("nul"), "a\0b").unwrap();
        std::fs::write(dir.path().join("blank"), "").unwrap();
        let with = |extra: &[&str]| {
            let mut args = vec!["--kernel", "/k"];
            args.extend_from_slice(extra);
            create(&args).unwrap().spec(dir.path()).unwrap_err()
        };
        for (args, words) in [
            (&["--ssh-key-file", "priv"][..], "priv:1: ssh key"),
            (&["--ssh-key-file", "empty"], "holds no key"),
            (
                &["--ssh-key-file", "missing"],
                "cannot read --ssh-key-file missing",
            ),
            (&["--user-data-file", "bin"], "is not UTF-8 text"),
            (&["--user-data-file", "nul"], "NUL"),
            (
                &["--network-config-file", "blank"],
                "--network-config-file blank is empty",
            ),
        ] {
            let err = with(args);
            assert!(err.contains(words), "{args:?}: {err}");
        }
        for bad in ["-x", "a..b", "web_1", "a b"] {
            let flag = format!("--hostname={bad}");
            let err = create(&["--kernel", "/k", &flag]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}");
            assert!(err.to_string().contains("hostname"), "{err}");
        }
        // The VM name stands in for the hostname only when it is one.
        std::fs::write(dir.path().join("ud"), "#cloud-config\n").unwrap();
        let a = parse(&[
            "vm",
            "create",
            "web_1",
            "--vcpus",
            "1",
            "--memory",
            "1G",
            "--kernel",
            "/k",
            "--user-data-file",
            "ud",
        ])
        .unwrap();
        let Command::Vm(VmCommand::Create(a)) = a.command else {
            panic!("wrong command")
        };
        let err = a.spec(dir.path()).unwrap_err();
        assert!(
            err.contains("not a valid hostname for the guest: give --hostname"),
            "{err}"
        );
        let many: Vec<String> = (0..16).map(|i| format!("--disk=pdisk:d{i}")).collect();
        let mut args: Vec<&str> = many.iter().map(String::as_str).collect();
        args.extend(["--hostname", "h"]);
        assert!(spec(&args).unwrap_err().contains("at most 15"));
    }

    #[test]
    fn macs_print_lowercase() {
        let mac: Mac = "52:54:00:AB:CD:EF".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:ef");
        assert!("52:54:00:ab:cd:ef:00".parse::<Mac>().is_err());
        assert!("5254.00ab.cdef".parse::<Mac>().is_err());
        assert!("+2:54:00:ab:cd:ef".parse::<Mac>().is_err());
    }

    #[test]
    fn lifecycle_commands_take_a_name_or_uuid() {
        let cli = parse(&["vm", "stop", "web1", "--timeout", "30"]).unwrap();
        let Command::Vm(VmCommand::Stop { vm, timeout, force }) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!((vm.as_str(), timeout, force), ("web1", 30, false));
        let cli = parse(&["vm", "stop", "web1", "--force"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Vm(VmCommand::Stop {
                timeout: 60,
                force: true,
                ..
            })
        ));
        assert_eq!(
            fails(&["vm", "stop", "web1", "--force", "--timeout", "5"]).kind(),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            fails(&["vm", "stop", "web1", "--timeout", "0"]).kind(),
            ErrorKind::ValueValidation
        );
        let cli = parse(&["vm", "destroy", "6F9619FF-8B86-D011-B42D-00C04FC964FF"]).unwrap();
        let Command::Vm(VmCommand::Destroy { vm, timeout }) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(vm.as_str(), "6f9619ff-8b86-d011-b42d-00c04fc964ff");
        assert_eq!(timeout, 60);
        for command in ["start", "reboot", "pause", "resume", "show", "console"] {
            assert!(parse(&["vm", command, "web1"]).is_ok(), "{command}");
            assert_eq!(
                fails(&["vm", command, "../x"]).kind(),
                ErrorKind::ValueValidation
            );
            assert_eq!(
                fails(&["vm", command]).kind(),
                ErrorKind::MissingRequiredArgument
            );
        }
        assert!(matches!(
            parse(&["vm", "console", "web1", "-f"]).unwrap().command,
            Command::Vm(VmCommand::Console { follow: true, .. })
        ));
    }

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn image_disk(spec: &str) -> Result<DiskArg, String> {
        spec.parse()
    }

    #[test]
    fn image_disks_parse_with_their_options() {
        let upper = SHA.to_ascii_uppercase();
        let s = spec(&[
            "--disk",
            &format!("image:https://images.example/debian-12.qcow2?v=2&x=1,sha256={upper}"),
            "--disk",
            &format!(
                "image:file:///srv/images/my%2Cdisk.img,sha256={SHA},size=1.5G,local,ro,boot=2,\
                 format=qcow2,endorser=ops@example.org"
            ),
            "--disk",
            "pdisk:data",
        ])
        .unwrap();
        let d = &s.disks[0];
        let Some(disk_spec::Source::Image(i)) = &d.source else {
            panic!("not an image: {d:?}")
        };
        assert_eq!(i.url, "https://images.example/debian-12.qcow2?v=2&x=1");
        assert_eq!(i.sha256, SHA, "kept lowercase");
        assert_eq!(i.format(), ImageFormat::Auto);
        assert_eq!(i.endorser, "");
        assert_eq!(d.size_bytes, 0, "the image's own size");
        assert_eq!(d.persistence(), DiskPersistence::Clone, "clone by default");
        assert!(!d.read_only);
        assert_eq!(d.boot_index, 0, "boot=2 on another disk: no default");

        let d = &s.disks[1];
        let Some(disk_spec::Source::Image(i)) = &d.source else {
            panic!("not an image: {d:?}")
        };
        assert_eq!(i.url, "file:///srv/images/my%2Cdisk.img", "sent as given");
        assert_eq!(i.format(), ImageFormat::Qcow2);
        assert_eq!(i.endorser, "ops@example.org");
        assert_eq!(d.size_bytes, 1536 << 20);
        assert_eq!(d.persistence(), DiskPersistence::Local);
        assert!(d.read_only);
        assert_eq!(d.boot_index, 2);

        // Alone, an image disk boots; sizes round up to a whole MiB.
        let s = spec(&[
            "--disk",
            &format!("image:http://127.0.0.1:8080/a.raw,size=1000001,sha256={SHA},format=raw"),
        ])
        .unwrap();
        assert_eq!(s.disks[0].boot_index, 1);
        assert_eq!(s.disks[0].size_bytes, 1 << 20);
        let Some(disk_spec::Source::Image(i)) = &s.disks[0].source else {
            panic!("not an image")
        };
        assert_eq!(i.format(), ImageFormat::Raw);

        let arg = image_disk(&format!("image:https://h/a.img,sha256={SHA},local")).unwrap();
        let DiskSource::Image(image) = arg.source else {
            panic!("not an image")
        };
        assert!(image.local);
        assert_eq!(image.size, None);
        assert_eq!(image.image.sha256().as_str(), SHA);
    }

    #[test]
    fn bad_image_disks_are_usage_errors() {
        let sha = format!("sha256={SHA}");
        for (disk, words) in [
            ("image:".to_owned(), "the image disk has no URL"),
            ("image:https://h/a.img".to_owned(), "sha256=HEX is required"),
            (
                format!("image:https://h/a.img,sha256={}", &SHA[1..]),
                "expected 64 hex digits",
            ),
            (
                format!("image:https://h/a.img,sha256={}g", &SHA[1..]),
                "expected 64 hex digits",
            ),
            (
                "image:https://h/a.img,sha256".to_owned(),
                "\"sha256\" needs a value: sha256=HEX",
            ),
            (format!("image:ftp://h/a.img,{sha}"), "scheme \"ftp\""),
            (format!("image:/srv/a.img,{sha}"), "not a URL"),
            (format!("image:file://srv/a.img,{sha}"), "absolute path"),
            (format!("image:file:///srv/../a.img,{sha}"), "`..`"),
            (
                format!("image:http://u:p@h/a.img,{sha}"),
                "credentials in image URLs",
            ),
            (
                format!("image:https://h/a,b.img,{sha}"),
                "\"b.img\" looks like the rest of the image URL: \
                 an image URL in --disk cannot contain ',': write it as %2C",
            ),
            (
                format!("image:https://h/a?x=1,y=2,{sha}"),
                "unknown disk option \"y=2\": expected sha256=HEX, size=SIZE, local",
            ),
            (
                format!("image:https://h/a,{sha},size=0"),
                "size=0: size must be greater than 0",
            ),
            (
                format!("image:https://h/a,{sha},size=lots"),
                "size=lots: invalid size",
            ),
            (
                format!("image:https://h/a,{sha},format=vhd"),
                "image format \"vhd\": expected raw, qcow2 or auto",
            ),
            (
                format!("image:https://h/a,{sha},format="),
                "\"format\" needs a value",
            ),
            (
                format!("image:https://h/a,{sha},local=yes"),
                "\"local\" takes no value",
            ),
            (
                format!("image:https://h/a,{sha},{sha}"),
                "\"sha256\" is given twice",
            ),
            (
                format!("image:https://h/a,{sha},local,local"),
                "\"local\" is given twice",
            ),
            (
                format!("image:https://h/a,{sha},boot=0"),
                "boot=0: the boot index",
            ),
            (
                "pdisk:a,size=1G".to_owned(),
                "disk option \"size\" is only for image disks",
            ),
            (
                format!("file:/a.img,{sha}"),
                "disk option \"sha256\" is only for image disks",
            ),
            (
                "pdisk:a,local".to_owned(),
                "\"local\" is only for image disks",
            ),
            ("img:https://h/a".to_owned(), "unknown disk source \"img\""),
        ] {
            let err = create(&["--disk", &disk]).expect_err(&format!("{disk:?} should be refused"));
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{disk:?}: {err}");
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains(words), "{disk:?}: {err}");
        }
        // The endorser is checked by the agent's rules too.
        let err = image_disk(&format!("image:https://h/a,{sha},endorser=a\tb")).unwrap_err();
        assert!(err.contains("endorser"), "{err}");
    }

    #[test]
    fn image_pull_builds_the_request() {
        let cli = parse(&[
            "image",
            "pull",
            "https://images.example/a.qcow2",
            "--sha256",
            &SHA.to_ascii_uppercase(),
            "--format",
            "qcow2",
            "--endorser",
            "ops",
            "--pdisk",
        ])
        .unwrap();
        let Command::Image(ImageCommand::Pull(a)) = cli.command else {
            panic!("wrong command")
        };
        let r = a.request().unwrap();
        assert!(r.to_pdisk);
        let i = r.image.unwrap();
        assert_eq!(i.url, "https://images.example/a.qcow2");
        assert_eq!(i.sha256, SHA);
        assert_eq!(i.format(), ImageFormat::Qcow2);
        assert_eq!(i.endorser, "ops");

        let cli = parse(&["image", "pull", "file:///srv/a.img", "--sha256", SHA]).unwrap();
        let Command::Image(ImageCommand::Pull(a)) = cli.command else {
            panic!("wrong command")
        };
        let r = a.request().unwrap();
        assert!(!r.to_pdisk);
        assert_eq!(r.image.unwrap().format(), ImageFormat::Auto);

        let cli = parse(&[
            "image",
            "pull",
            "http://h/a",
            "--sha256",
            SHA,
            "--endorser",
            "a\nb",
        ])
        .unwrap();
        let Command::Image(ImageCommand::Pull(a)) = cli.command else {
            panic!("wrong command")
        };
        assert!(a.request().unwrap_err().contains("endorser"));

        for (args, kind, words) in [
            (
                &["image", "pull", "ftp://h/a", "--sha256", SHA][..],
                ErrorKind::ValueValidation,
                "scheme \"ftp\"",
            ),
            (
                &["image", "pull", "file://rel/a", "--sha256", SHA],
                ErrorKind::ValueValidation,
                "absolute path",
            ),
            (
                &["image", "pull", "http://h/a", "--sha256", "abc"],
                ErrorKind::ValueValidation,
                "expected 64 hex digits",
            ),
            (
                &[
                    "image",
                    "pull",
                    "http://h/a",
                    "--sha256",
                    SHA,
                    "--format",
                    "vmdk",
                ],
                ErrorKind::ValueValidation,
                "expected raw, qcow2 or auto",
            ),
            (
                &["image", "pull", "http://h/a"],
                ErrorKind::MissingRequiredArgument,
                "--sha256",
            ),
        ] {
            let err = fails(args);
            assert_eq!(err.kind(), kind, "{args:?}: {err}");
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains(words), "{args:?}: {err}");
        }
    }

    #[test]
    fn image_list_and_rm() {
        assert!(matches!(
            parse(&["image", "list"]).unwrap().command,
            Command::Image(ImageCommand::List)
        ));
        let rm = |args: &[&str]| {
            let mut all = vec!["image", "rm"];
            all.extend_from_slice(args);
            match parse(&all).unwrap().command {
                Command::Image(ImageCommand::Rm(a)) => a,
                other => panic!("wrong command {other:?}"),
            }
        };
        let a = rm(&[&SHA.to_ascii_uppercase()]);
        assert_eq!(a.sha256, SHA);
        assert_eq!(a.caches(), (true, true), "neither flag: both caches");
        assert_eq!(rm(&[SHA, "--local"]).caches(), (true, false));
        assert_eq!(rm(&[SHA, "--pdisk"]).caches(), (false, true));
        assert_eq!(rm(&[SHA, "--local", "--pdisk"]).caches(), (true, true));
        assert_eq!(a.whole(), Some(SHA));
        let prefix = rm(&["9F86D081"]);
        assert_eq!(prefix.sha256, "9f86d081", "a prefix");
        assert_eq!(prefix.whole(), None);
        let other = format!("9f86d081{}", &SHA[..56]);
        let listed = [SHA, "0123456789abcdef", SHA, other.as_str()];
        assert_eq!(prefix.matching(listed), [SHA.to_owned(), other.clone()]);
        assert_eq!(rm(&["9f86d0818"]).matching(listed), [SHA]);
        assert!(rm(&["abcdef01"]).matching(listed).is_empty());
        for bad in ["9f86d08", "xyz12345", &format!("{SHA}0")] {
            let err = fails(&["image", "rm", bad]);
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}");
            assert!(err.to_string().contains("8 to 64 hex digits"), "{err}");
        }
        assert_eq!(
            fails(&["image", "rm"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(fails(&["image"]).exit_code(), 2);
    }

    #[test]
    fn events_replay_by_default() {
        let cli = parse(&["events"]).unwrap();
        let Command::Events(e) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!((e.since, e.vm, e.follow), (0, None, false));
        let cli = parse(&["events", "--since", "42", "--vm", "web1", "--follow"]).unwrap();
        let Command::Events(e) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(e.since, 42);
        assert_eq!(e.vm.unwrap().as_str(), "web1");
        assert!(e.follow);
        assert_eq!(
            fails(&["events", "--since", "-1"]).kind(),
            ErrorKind::UnknownArgument
        );
    }

    #[test]
    fn missing_subcommand_is_a_usage_error() {
        assert_eq!(fails(&["vm"]).exit_code(), 2);
        assert_eq!(fails(&["host"]).exit_code(), 2);
    }

    #[test]
    fn save_takes_a_disk_and_an_image_name() {
        let cli = parse(&["vm", "save", "web1", "--image", "web1-golden", "--wait"]).unwrap();
        let Command::Vm(VmCommand::Save {
            vm,
            disk,
            image,
            wait,
        }) = cli.command
        else {
            panic!("wrong command")
        };
        assert_eq!(
            (vm.as_str(), disk.as_str(), image.as_str(), wait),
            ("web1", "vda", "web1-golden", true)
        );
        assert!(parse(&["vm", "save", "web1", "--image", "Bad Name"]).is_err());
        assert!(parse(&["vm", "save", "web1"]).is_err());
    }
}
