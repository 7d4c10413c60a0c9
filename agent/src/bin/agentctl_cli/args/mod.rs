//! The command line of `agentctl`. Every argument is parsed here into a
//! validated type (names, sizes, disk and NIC specs, image references and
//! checksums, MACs), so bad input is refused with exit status 2 before the
//! agent is contacted; agentd checks again. [`vm::CreateArgs::spec`] adds the
//! checks that span several arguments and builds the CreateVm request.
//!
//! One file per noun: `vm.rs` (with `disk.rs` and `nic.rs` for `vm create`'s
//! `--disk` and `--nic`), `image.rs`; `events` and `host` are a few lines
//! each and stay here beside [`Command`].

use std::path::{Component, PathBuf};

use clap::{Args, Parser, Subcommand};
use stratus_core::cli::args::{unix_time, Limit, Ref};

mod disk;
mod image;
mod nic;
mod qos;
#[cfg(test)]
mod qos_tests;
#[cfg(test)]
mod tests;
mod vm;

pub use image::{ImageCommand, RmArgs};
pub use vm::{attach_disk_spec, attach_nic_spec, DiskCommand, NicCommand, VmCommand};

pub const DEFAULT_AGENT: &str = "unix:/run/stratus/agentd.sock";

/// Help heading of the options every command accepts.
const GLOBAL: &str = "Global options";

const EXAMPLES: &str = "\
Examples:
  agentctl vm create web1 --vcpus 2 --memory 512M --disk pdisk:web1-root --nic bridge=br0
  agentctl vm create t1 --vcpus 1 --memory 256M --kernel /boot/vmlinuz --initrd /boot/initrd.img \\
      --cmdline 'console=ttyS0' --disk file:/srv/images/scratch.raw --nic bridge=br0,vlan=20
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
  agentctl --json events --follow | jq .type
  agentctl events --from-nats nats://127.0.0.1:4222 --durable ops   # via the broker";

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
    /// agentd: unix:/PATH (its local socket), https://HOST:PORT (mTLS with
    /// --cert, --key, --ca; HOST:PORT alone means https), or a loopback
    /// http://HOST:PORT (its --insecure-listen)
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

    #[command(flatten)]
    pub tls: stratus_core::cli::TlsArgs,

    /// Print the result, or the error, as JSON on stdout (events as JSON
    /// Lines, one object per line; no spinners).
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,

    /// The project to act in: required with a frontend certificate; with a
    /// project certificate, its own (the default); admins act in every
    /// project without it, and create VMs of no project
    #[arg(
        long,
        global = true,
        env = "AGENTCTL_PROJECT",
        value_name = "PROJECT",
        help_heading = GLOBAL
    )]
    pub project: Option<String>,

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
    /// Per-project quotas on this host: VMs, vCPUs and memory.
    #[command(subcommand)]
    Quota(QuotaCommand),
    /// Usage records of the VMs that ran on this host (EGI cloud
    /// accounting: APEL `APEL-cloud-message: v0.4`, JSON or CSV).
    Usage(UsageArgs),
}

/// How `agentctl usage` prints the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UsageFormat {
    /// An APEL cloud message (MB, GB and whole seconds, as APEL has them).
    Apel,
    /// A JSON array of records in exact units (what --json prints).
    Json,
    /// CSV with a header line, the JSON fields as columns.
    Csv,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// From this time: RFC 3339 (2026-12-01T00:00:00Z) or Unix seconds
    /// [default: the first record kept]
    #[arg(long, value_name = "TIME", value_parser = unix_time)]
    pub since: Option<u64>,

    /// Up to this time, each VM as of its last reading before it
    /// [default: now, after reading every VM]
    #[arg(long, value_name = "TIME", value_parser = unix_time)]
    pub until: Option<u64>,

    /// Only this VM (name, or UUID: a destroyed one's too).
    #[arg(long, value_name = "NAME")]
    pub vm: Option<Ref>,

    #[arg(long, value_enum, default_value_t = UsageFormat::Apel)]
    pub format: UsageFormat,
}

#[derive(Debug, Subcommand)]
pub enum QuotaCommand {
    /// Set a project's limits (admins). Limits not given keep their value;
    /// `unlimited` removes one.
    Set {
        /// The project.
        project: String,
        /// Most VMs the project may define on this host, or `unlimited`.
        #[arg(long, value_parser = Limit::parse_count)]
        vms: Option<Limit>,
        /// Most vCPUs of its VMs, or `unlimited`.
        #[arg(long, value_parser = Limit::parse_count)]
        vcpus: Option<Limit>,
        /// Most memory of its VMs (e.g. 64G), or `unlimited`.
        #[arg(long, value_parser = Limit::parse_bytes)]
        memory: Option<Limit>,
    },
    /// A project's limits and usage (a project certificate: its own).
    Show {
        /// The project; defaults to --project.
        project: Option<String>,
    },
    /// Every project with a quota or with VMs (admins).
    List,
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

    /// From the broker instead of the agent (--from-nats URL --durable NAME).
    #[command(flatten)]
    pub nats: stratus_core::nats::FromNatsArgs,
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Capacity, accelerator, versions, iSCSI initiator and VM counts.
    Show,
}

/// A path on this host: not empty, no NUL, no ',' (QEMU's option syntax), no
/// '..'. Relative paths are made absolute by [`vm::CreateArgs::spec`], since the
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
