//! agentd settings: command-line flags over a TOML file over defaults.
//! Every flag has the same key in the TOML file with `_` for `-`; unknown
//! keys are errors.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use stratus_pki::serve::{ServeFlags, ServeSettings};
use stratus_pki::TlsFiles;

use crate::attach::AttachMode;
use crate::confine::QemuUsers;
use crate::spec::ServerName;
use crate::store::Retention;
use crate::vmm::AccelChoice;
use stratus_core::error::{Error, Result};
use stratus_core::nats::{NatsFlags, NatsSettings};
use stratus_core::settings::LogFormat;
use stratus_core::types::{ByteSize, Iqn};

#[derive(Debug, Clone, Default, Parser, Deserialize)]
#[command(
    name = "agentd",
    version,
    about = "Stratus host agent: runs QEMU/KVM guests"
)]
#[serde(deny_unknown_fields, default)]
pub struct Flags {
    /// TOML file with settings; flags override it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Listeners: mTLS, the local socket, loopback plain TCP; agentd's
    /// certificate and key are also what it presents to pdiskd.
    #[command(flatten)]
    #[serde(flatten)]
    pub serve: ServeFlags,
    /// Publishing events to NATS JetStream (`--nats-url` and the rest).
    #[command(flatten)]
    #[serde(flatten)]
    pub nats: NatsFlags,
    /// RBD disks: the cephx user, keyring and client conf (`--ceph-id`...).
    #[command(flatten)]
    #[serde(flatten)]
    pub ceph: crate::rbd::CephFlags,
    /// Directory of the agent's state and guest files [default: /var/lib/stratus-agent]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// A pdisk server (repeatable): URL names the server "default",
    /// NAME=URL another one (disks then say pdisk:NAME/VOLUME). URL is
    /// pdiskd's address, e.g. https://192.0.2.10:7400 (mTLS with this
    /// host's --tls-cert and --tls-key, pdiskd verified against
    /// --tls-client-ca), unix:/run/stratus/pdiskd.sock on a host running
    /// both, or http://127.0.0.1:PORT (pdiskd's --insecure-listen); needed
    /// for pdisk disks. In the TOML file: `pdisk = "URL"`, or a table per
    /// server, `[pdisk.NAME]` with `url` and, when this server needs other
    /// TLS files than the host's, `tls_cert`, `tls_key` and `tls_ca`
    #[arg(long = "pdisk", value_name = "[NAME=]URL")]
    #[serde(skip)]
    pub pdisk: Vec<String>,
    /// The TOML file's `pdisk` (a URL or `[pdisk.NAME]` tables), read by
    /// [`pdisk_servers_from_toml`].
    #[arg(skip)]
    #[serde(rename = "pdisk")]
    pub pdisk_file: Option<toml::Value>,
    /// Bridge for NICs that name none; guests may always join it [default: br0]
    #[arg(long, value_name = "NAME")]
    pub bridge: Option<String>,
    /// Another bridge guests' NICs may join (repeatable); a NIC naming any
    /// other bridge is refused
    #[arg(long = "allowed-bridge", value_name = "NAME")]
    pub allowed_bridges: Option<Vec<String>>,
    /// Accelerator: auto uses KVM when the CPU and /dev/kvm allow [default: auto]
    #[arg(long, value_enum)]
    pub accel: Option<AccelChoice>,
    /// How pdisk volumes reach QEMU: qemu (QEMU's own iSCSI initiator) or
    /// kernel (open-iscsi logs the host in; QEMU opens the SCSI disk)
    /// [default: qemu]
    #[arg(long, value_enum)]
    pub attach: Option<AttachMode>,
    /// Mutual CHAP: every pdisk disk's login also makes the storage target
    /// prove itself, with a per-volume target account and a fresh random
    /// secret. Needs --attach kernel (QEMU's iSCSI initiator cannot check
    /// the target) [default: off]
    #[arg(long)]
    pub chap_mutual: bool,
    /// This host's id, sent with pdisk exports: a pdiskd with the same id
    /// (its --host-id) runs on this host and answers with the volume's own
    /// file or device instead of an iSCSI target [default: /etc/machine-id]
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,
    /// Open pdisk volumes directly when pdiskd runs on this host (the same
    /// host id); false: always through iSCSI [default: true]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub local_attach: Option<bool>,
    /// This host's iSCSI initiator name [default: iqn.2026-11.io.stratus.agent:HOSTNAME]
    #[arg(long, value_name = "IQN")]
    pub initiator_iqn: Option<String>,
    /// Guests' vCPUs may reach host CPUs times this [default: 8]
    #[arg(long, value_name = "N")]
    pub cpu_overcommit: Option<u32>,
    /// Memory kept for the host, not given to guests [default: 1G]
    #[arg(long, value_name = "SIZE")]
    pub reserved_memory: Option<String>,
    /// Bytes the local image cache may hold, e.g. 50G [default: 20G]
    #[arg(long, value_name = "SIZE")]
    pub image_quota: Option<String>,
    /// Image policy file (TOML: allow_sha256, deny_sha256, allow_endorsers,
    /// deny_endorsers); without it every verified image is allowed
    #[arg(long, value_name = "FILE")]
    pub image_policy: Option<PathBuf>,
    /// Directory file:// images may be read from (repeatable); without one,
    /// file:// images are refused
    #[arg(long = "image-file-root", value_name = "DIR")]
    pub image_file_roots: Option<Vec<PathBuf>>,
    /// Directory `file:` disks, kernels and initrds may be opened from
    /// (repeatable; admin callers only); without one, host files are refused
    #[arg(long = "host-file-root", value_name = "DIR")]
    pub host_file_roots: Option<Vec<PathBuf>>,
    /// Let image URLs reach loopback, link-local, unspecified and this
    /// host's own addresses (refused by default: a URL must not reach
    /// services only the host can see)
    #[arg(long)]
    pub image_allow_private: bool,
    /// Events older than this are compacted out of the journal (each live
    /// guest's latest state event stays), e.g. 7d, 12h [default: 7d]
    #[arg(long, value_name = "DURATION")]
    pub event_retention: Option<String>,
    /// At most this many of the newest events are kept [default: 1000000]
    #[arg(long, value_name = "N")]
    pub event_max: Option<u64>,
    /// Each guest's QEMU runs as its own uid (gid = uid) from FIRST-LAST;
    /// no account needs to exist [default: 64000-64999]
    #[arg(long, value_name = "FIRST-LAST", conflicts_with = "qemu_user")]
    pub qemu_uid_range: Option<String>,
    /// Run every guest's QEMU as this one account instead of a uid pool
    #[arg(long, value_name = "USER")]
    pub qemu_user: Option<String>,
    /// Start guests unconfined: QEMU as root, without the seccomp sandbox.
    /// Needed on a QEMU built without seccomp (guests are refused there
    /// otherwise); never on a host that can confine them
    #[arg(long)]
    pub allow_unsandboxed: bool,
    /// cgroup v2 directory each confined guest gets a cgroup under (memory,
    /// pids and CPU limits where it has those controllers), or "none"
    /// [default: stratus.slice under the host's cgroup v2 mount]
    #[arg(long, value_name = "DIR")]
    pub cgroup_parent: Option<PathBuf>,
    /// Bytes each guest's serial console log may take, kept as two files
    /// (console.log and console.log.1, each half), e.g. 4M [default: 1M]
    #[arg(long, value_name = "SIZE")]
    pub console_log_max: Option<String>,
    /// Empty PCIe root ports each guest starts with, for hot-plugged disks
    /// and NICs (one device each), at most 16 [default: 8]
    #[arg(long, value_name = "N")]
    pub hotplug_ports: Option<u32>,
    /// Live migrations send guest memory as plain TCP instead of TLS (the
    /// default whenever agentd has --tls-cert): only on a trusted lab
    /// network. A destination with it also takes plain-TCP migrations
    #[arg(long)]
    pub migration_insecure: bool,
    /// Bytes per second an outgoing live migration may send (QEMU's
    /// `max-bandwidth`), e.g. 100M, so a migration leaves the network to
    /// the guests [default: QEMU's own]
    #[arg(long, value_name = "SIZE")]
    pub migration_max_bandwidth: Option<String>,
    /// QEMU's `aio` engine for file disks (`file:` disks, overlays, the
    /// seed, same-host attachments on a file pool): auto (the measured
    /// default, native), io_uring, native or threads [default: auto;
    /// README, Performance]
    #[arg(long, value_enum)]
    pub file_aio: Option<crate::disk_io::AioChoice>,
    /// QEMU's `aio` engine for host block devices (kernel-attached LUNs,
    /// same-host LVs), as for --file-aio; auto is io_uring where QEMU has
    /// it, else native [default: auto]
    #[arg(long, value_enum)]
    pub device_aio: Option<crate::disk_io::AioChoice>,
    /// One QEMU iothread per guest disk (`iothread=` on its virtio-blk),
    /// hot-plugged disks too; false: disks' I/O on QEMU's main loop
    /// [default: true]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub disk_iothreads: Option<bool>,
    /// How often running guests' anti-spoofing rules are checked and put
    /// back if someone flushed them, e.g. 30s, 5m; 0s turns the check off
    /// [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub nic_filter_check: Option<String>,
    /// How often each guest's usage (CPU, network, wall time) is read
    /// into its accounting, besides at every state change, e.g. 60s, 5m
    /// [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub usage_interval: Option<String>,
    /// This site's name in usage records (APEL SiteName, the GOCDB name)
    /// [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub usage_site: Option<String>,
    /// This cloud resource within the site in usage records (APEL
    /// CloudComputeService) [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub usage_service: Option<String>,
    /// Log format [default: human]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter [default: info, or RUST_LOG]
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Where and how to serve (mTLS, local socket, loopback plain TCP).
    pub serve: ServeSettings,
    /// This host's certificate, key and the cloud's CA, also used to call pdiskd.
    pub tls: Option<TlsFiles>,
    /// The broker events are published to (None: not published).
    pub nats: Option<NatsSettings>,
    pub state_dir: PathBuf,
    /// The pdisk servers, by name (sorted); empty: no pdisk disks here.
    pub pdisk: Vec<PdiskServerSettings>,
    pub bridge: String,
    /// Bridges besides `bridge` that guests may join.
    pub allowed_bridges: Vec<String>,
    pub accel: AccelChoice,
    pub attach: AttachMode,
    /// Mutual CHAP on pdisk disks (only with the kernel initiator).
    pub chap_mutual: bool,
    /// This host's id sent with pdisk exports (same-host attachments);
    /// None with --local-attach=false.
    pub local_host_id: Option<String>,
    /// This host as a Ceph client, for pdisk disks on RBD.
    pub ceph: crate::rbd::CephClient,
    pub initiator_iqn: Iqn,
    pub cpu_overcommit: u32,
    pub reserved_memory: u64,
    pub image_quota: u64,
    pub image_policy: Option<PathBuf>,
    pub image_file_roots: Vec<PathBuf>,
    pub host_file_roots: Vec<PathBuf>,
    pub image_allow_private: bool,
    /// How much of the event journal is kept.
    pub event_retention: Retention,
    pub qemu_users: QemuUsers,
    pub allow_unsandboxed: bool,
    pub cgroup_parent: Option<PathBuf>,
    pub console_log_max: u64,
    /// Empty PCIe root ports per guest, for hot-plug.
    pub hotplug_ports: u32,
    /// The files both QEMUs of a live migration encrypt its stream with
    /// (this host's `tls`); None: plain TCP (`--migration-insecure`, or no
    /// TLS files).
    pub migration_tls: Option<TlsFiles>,
    /// Bytes per second an outgoing migration may send; None: QEMU's default.
    pub migration_max_bandwidth: Option<u64>,
    /// Guests' disk I/O as configured (resolved once QEMU is probed).
    pub disk_io: crate::disk_io::DiskIoChoice,
    /// None: no periodic check of the anti-spoofing rules.
    pub nic_filter_check: Option<std::time::Duration>,
    /// How often guests' usage is read.
    pub usage_interval: std::time::Duration,
    /// Who this host is in usage records.
    pub usage_site: crate::usage::Site,
    pub log_format: LogFormat,
    pub log_level: String,
}

/// One pdisk server agentd talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PdiskServerSettings {
    pub name: ServerName,
    /// pdiskd's address (`https://`, `unix:` or loopback `http://`).
    pub url: String,
    /// The certificate, key and CA agentd calls it with over mTLS: the
    /// server's own from the TOML file, else this host's (`--tls-*`).
    pub tls: Option<TlsFiles>,
}

/// The server one `--pdisk` names: `NAME=URL`, or a bare URL for the
/// default server. A URL has no '=' before its scheme's ':', so the two
/// cannot be confused.
fn pdisk_flag(arg: &str) -> Result<(ServerName, String)> {
    match arg.split_once('=') {
        Some((name, url)) if !name.contains(':') && !name.contains('/') => Ok((
            name.parse()
                .map_err(|e: Error| Error::invalid(format!("--pdisk {arg}: {}", e.message())))?,
            url.to_owned(),
        )),
        _ => Ok((ServerName::default(), arg.to_owned())),
    }
}

/// The TOML file's `pdisk`: `"URL"` (the default server) or a table of
/// servers, each `{ url, tls_cert, tls_key, tls_ca }` (the TLS files all
/// three or none).
pub fn pdisk_servers_from_toml(
    v: &toml::Value,
) -> Result<Vec<(ServerName, String, Option<TlsFiles>)>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Server {
        url: String,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        tls_ca: Option<PathBuf>,
    }
    match v {
        toml::Value::String(url) => Ok(vec![(ServerName::default(), url.clone(), None)]),
        toml::Value::Table(t) => t
            .iter()
            .map(|(name, v)| {
                let name: ServerName = name.parse().map_err(|e: Error| {
                    Error::invalid(format!("[pdisk.{name}]: {}", e.message()))
                })?;
                let s: Server = v
                    .clone()
                    .try_into()
                    .map_err(|e| Error::invalid(format!("[pdisk.{name}]: {e}")))?;
                let tls = TlsFiles::from_parts(
                    s.tls_cert,
                    s.tls_key,
                    s.tls_ca,
                    ["tls_cert", "tls_key", "tls_ca"],
                )
                .map_err(|e| Error::invalid(format!("[pdisk.{name}]: {e}")))?;
                Ok((name, s.url, tls))
            })
            .collect(),
        _ => Err(Error::invalid(
            "pdisk: a URL (pdisk = \"https://...\") or tables of servers ([pdisk.NAME] url = ...)",
        )),
    }
}

impl Flags {
    pub fn resolve(self) -> Result<Config> {
        let file: Flags = stratus_core::settings::load_toml(self.config.as_deref())?;
        macro_rules! pick {
            ($f:ident, $default:expr) => {
                self.$f.or(file.$f).unwrap_or_else(|| $default)
            };
        }
        let hostname = stratus_core::host::hostname();
        let host_part: String = hostname
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let iqn = pick!(
            initiator_iqn,
            format!("iqn.2026-11.io.stratus.agent:{host_part}")
        );
        let reserved = pick!(reserved_memory, "1G".into());
        let quota = pick!(image_quota, "20G".into());
        let serve = self
            .serve
            .resolve(
                &file.serve,
                "127.0.0.1:7401".parse().expect("a socket address"),
                Path::new("/run/stratus/agentd.sock"),
            )
            .map_err(Error::invalid)?;
        let tls = serve.mtls.as_ref().map(|(_, files)| files.clone());
        let qemu_users = match (
            self.qemu_uid_range.or(file.qemu_uid_range),
            self.qemu_user.or(file.qemu_user),
        ) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "qemu-uid-range and qemu-user exclude each other",
                ))
            }
            (None, Some(user)) => QemuUsers::shared(&user)?,
            (range, None) => QemuUsers::pool(range.as_deref().unwrap_or("64000-64999"))?,
        };
        // The file's servers, then the flags' (a flag naming a server the
        // file has replaces its URL, and its TLS files with the host's).
        let mut servers: std::collections::BTreeMap<ServerName, (String, Option<TlsFiles>)> =
            Default::default();
        if let Some(v) = &file.pdisk_file {
            for (name, url, own_tls) in pdisk_servers_from_toml(v)? {
                servers.insert(name, (url, own_tls.or_else(|| tls.clone())));
            }
        }
        let mut flagged = std::collections::BTreeSet::new();
        for arg in &self.pdisk {
            let (name, url) = pdisk_flag(arg)?;
            if !flagged.insert(name.clone()) {
                return Err(Error::invalid(format!(
                    "--pdisk names the pdisk server {name} twice"
                )));
            }
            servers.insert(name, (url, tls.clone()));
        }
        let pdisk: Vec<PdiskServerSettings> = servers
            .into_iter()
            .map(|(name, (url, tls))| PdiskServerSettings { name, url, tls })
            .collect();
        let nats = self.nats.resolve(&file.nats)?;
        let migration_tls = if self.migration_insecure || file.migration_insecure {
            None
        } else {
            tls.clone()
        };
        // Usage records go to `stratus.usage.<host>` with the events' host.
        let nats_host = nats.as_ref().map(|n| n.host.clone());
        let cfg = Config {
            serve,
            tls,
            nats,
            state_dir: pick!(state_dir, PathBuf::from("/var/lib/stratus-agent")),
            pdisk,
            bridge: pick!(bridge, "br0".into()),
            allowed_bridges: pick!(allowed_bridges, Vec::new()),
            accel: pick!(accel, AccelChoice::Auto),
            attach: pick!(attach, AttachMode::Qemu),
            chap_mutual: self.chap_mutual || file.chap_mutual,
            local_host_id: if pick!(local_attach, true) {
                stratus_core::host::host_id(self.host_id.or(file.host_id).as_deref())?
            } else {
                None
            },
            ceph: self.ceph.resolve(&file.ceph)?,
            initiator_iqn: iqn
                .parse()
                .map_err(|e| Error::invalid(format!("initiator-iqn: {e}")))?,
            cpu_overcommit: pick!(cpu_overcommit, 8),
            reserved_memory: reserved
                .parse::<ByteSize>()
                .map_err(|e| Error::invalid(format!("reserved-memory: {e}")))?
                .0,
            image_quota: quota
                .parse::<ByteSize>()
                .map_err(|e| Error::invalid(format!("image-quota: {e}")))?
                .0,
            image_policy: self.image_policy.or(file.image_policy),
            image_file_roots: pick!(image_file_roots, Vec::new()),
            host_file_roots: pick!(host_file_roots, Vec::new()),
            image_allow_private: self.image_allow_private || file.image_allow_private,
            event_retention: Retention {
                max_age: humantime::parse_duration(&pick!(event_retention, "7d".into()))
                    .map_err(|e| Error::invalid(format!("event-retention: {e}")))?,
                max_events: pick!(event_max, 1_000_000),
            },
            qemu_users,
            allow_unsandboxed: self.allow_unsandboxed || file.allow_unsandboxed,
            cgroup_parent: match self.cgroup_parent.or(file.cgroup_parent) {
                Some(p) if p.as_os_str() == "none" => None,
                Some(p) => Some(p),
                None => crate::cgroup::GuestCgroups::default_parent(),
            },
            console_log_max: pick!(console_log_max, "1M".into())
                .parse::<ByteSize>()
                .map_err(|e| Error::invalid(format!("console-log-max: {e}")))?
                .0,
            hotplug_ports: pick!(hotplug_ports, 8),
            migration_tls,
            migration_max_bandwidth: migration_bandwidth(
                self.migration_max_bandwidth
                    .or(file.migration_max_bandwidth),
            )?,
            disk_io: crate::disk_io::DiskIoChoice {
                file_aio: pick!(file_aio, Default::default()),
                device_aio: pick!(device_aio, Default::default()),
                iothreads: pick!(disk_iothreads, true),
            },
            nic_filter_check: Some(
                humantime::parse_duration(&pick!(nic_filter_check, "30s".into()))
                    .map_err(|e| Error::invalid(format!("nic-filter-check: {e}")))?,
            )
            .filter(|d| !d.is_zero()),
            usage_interval: humantime::parse_duration(&pick!(usage_interval, "60s".into()))
                .map_err(|e| Error::invalid(format!("usage-interval: {e}")))?,
            usage_site: {
                let here = crate::usage::Site::of_this_host();
                crate::usage::Site {
                    site_name: pick!(usage_site, here.site_name),
                    cloud_compute_service: pick!(usage_service, here.cloud_compute_service),
                    host: nats_host.clone().unwrap_or(here.host),
                }
            },
            log_format: pick!(log_format, LogFormat::Human),
            log_level: pick!(
                log_level,
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())
            ),
        };
        crate::spec::check_ifname("bridge", &cfg.bridge)?;
        for b in &cfg.allowed_bridges {
            crate::spec::check_ifname("allowed-bridge", b)?;
        }
        if cfg.chap_mutual {
            cfg.attach.check_mutual_chap()?;
        }
        if cfg.console_log_max < crate::console::MIN_MAX {
            return Err(Error::invalid(format!(
                "console-log-max must be at least {} KiB",
                crate::console::MIN_MAX >> 10
            )));
        }
        if cfg.hotplug_ports > crate::vmm::MAX_HOTPLUG_PORTS {
            return Err(Error::invalid(format!(
                "hotplug-ports: at most {} (got {})",
                crate::vmm::MAX_HOTPLUG_PORTS,
                cfg.hotplug_ports
            )));
        }
        if cfg.usage_interval < std::time::Duration::from_secs(1) {
            return Err(Error::invalid("usage-interval must be at least 1s"));
        }
        if cfg.event_retention.max_events == 0 {
            return Err(Error::invalid("event-max must be at least 1"));
        }
        if cfg.cpu_overcommit == 0 {
            return Err(Error::invalid("cpu-overcommit must be at least 1"));
        }
        for p in &cfg.pdisk {
            let u = &p.url;
            let target = stratus_pki::Target::parse(u)
                .map_err(|e| Error::invalid(format!("pdisk server {} address: {e}", p.name)))?;
            if matches!(target, stratus_pki::Target::Mtls { .. }) && p.tls.is_none() {
                return Err(Error::invalid(format!(
                    "pdisk server {} address {u}: calling pdiskd over mTLS needs this host's \
                     --tls-cert, --tls-key and --tls-client-ca (or the server's own \
                     tls_cert, tls_key and tls_ca in the TOML file)",
                    p.name
                )));
            }
        }
        Ok(cfg)
    }
}

/// `--migration-max-bandwidth`: bytes per second, more than 0.
fn migration_bandwidth(flag: Option<String>) -> Result<Option<u64>> {
    let Some(s) = flag else {
        return Ok(None);
    };
    match s.parse::<ByteSize>() {
        Ok(ByteSize(0)) => Err(Error::invalid(
            "migration-max-bandwidth: 0 would stall every migration",
        )),
        Ok(b) => Ok(Some(b.0)),
        Err(e) => Err(Error::invalid(format!("migration-max-bandwidth: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Flags::parse_from(["agentd", "--accel", "tcg", "--bridge", "stbr0"])
            .resolve()
            .unwrap();
        assert_eq!(c.serve.mtls, None);
        assert_eq!(
            c.serve.local_socket.as_deref(),
            Some(std::path::Path::new("/run/stratus/agentd.sock"))
        );
        assert_eq!(c.accel, AccelChoice::Tcg);
        assert_eq!(c.bridge, "stbr0");
        assert_eq!(c.attach, AttachMode::Qemu);
        assert_eq!(
            c.qemu_users,
            QemuUsers::Pool {
                first: 64000,
                last: 64999
            }
        );
        assert!(!c.allow_unsandboxed);
        assert!(Flags::parse_from(["agentd", "--qemu-uid-range", "0-100"])
            .resolve()
            .is_err());
        assert!(
            Flags::try_parse_from(["agentd", "--qemu-uid-range", "1-2", "--qemu-user", "x"])
                .is_err()
        );
        assert!(
            Flags::parse_from(["agentd", "--allow-unsandboxed"])
                .resolve()
                .unwrap()
                .allow_unsandboxed
        );
        assert!(c
            .initiator_iqn
            .as_str()
            .starts_with("iqn.2026-11.io.stratus.agent:"));
        let e = Flags::parse_from(["agentd", "--pdisk", "https://127.0.0.1:7400"])
            .resolve()
            .unwrap_err();
        assert!(e.message().contains("--tls-cert"), "{e}");
        assert!(
            Flags::parse_from(["agentd", "--pdisk", "ftp://127.0.0.1:7400"])
                .resolve()
                .is_err()
        );
        assert!(Flags::parse_from(["agentd", "--bridge", "a/b"])
            .resolve()
            .is_err());
        assert!(c.allowed_bridges.is_empty());
        assert_eq!(c.usage_interval, std::time::Duration::from_secs(60));
        let u = Flags::parse_from([
            "agentd",
            "--usage-interval",
            "5m",
            "--usage-site",
            "SITE-1",
            "--usage-service",
            "c1.example",
        ])
        .resolve()
        .unwrap();
        assert_eq!(u.usage_interval, std::time::Duration::from_secs(300));
        assert_eq!(u.usage_site.site_name, "SITE-1");
        assert_eq!(u.usage_site.cloud_compute_service, "c1.example");
        assert!(Flags::parse_from(["agentd", "--usage-interval", "10ms"])
            .resolve()
            .is_err());
        assert_eq!(c.console_log_max, crate::console::DEFAULT_MAX);
        let c = Flags::parse_from(["agentd", "--console-log-max", "64K"])
            .resolve()
            .unwrap();
        assert_eq!(c.console_log_max, 64 << 10);
        assert!(Flags::parse_from(["agentd", "--console-log-max", "1K"])
            .resolve()
            .is_err());
    }

    #[test]
    fn allowed_bridges_from_flags_or_toml() {
        let c = Flags::parse_from([
            "agentd",
            "--allowed-bridge",
            "br1",
            "--allowed-bridge",
            "br2",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.allowed_bridges, ["br1", "br2"]);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agentd.toml");
        std::fs::write(&f, "allowed_bridges = [\"br-tenant\"]\n").unwrap();
        let c = Flags::parse_from(["agentd", "--config", f.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert_eq!(c.allowed_bridges, ["br-tenant"]);
        assert!(
            Flags::parse_from(["agentd", "--allowed-bridge", "x".repeat(16).as_str()])
                .resolve()
                .is_err()
        );
    }

    #[test]
    fn disk_io_from_flags_or_toml() {
        use crate::disk_io::AioChoice;
        let c = Flags::parse_from(["agentd"]).resolve().unwrap();
        assert_eq!(c.disk_io.file_aio, AioChoice::Auto);
        assert_eq!(c.disk_io.device_aio, AioChoice::Auto);
        assert!(c.disk_io.iothreads);
        let c = Flags::parse_from([
            "agentd",
            "--file-aio",
            "io_uring",
            "--device-aio",
            "native",
            "--disk-iothreads=false",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.disk_io.file_aio, AioChoice::IoUring);
        assert_eq!(c.disk_io.device_aio, AioChoice::Native);
        assert!(!c.disk_io.iothreads);
        assert!(Flags::try_parse_from(["agentd", "--file-aio", "posix"]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agentd.toml");
        std::fs::write(
            &f,
            "file_aio = \"threads\"\ndevice_aio = \"io_uring\"\ndisk_iothreads = false\n",
        )
        .unwrap();
        let file = f.to_str().unwrap();
        let c = Flags::parse_from(["agentd", "--config", file])
            .resolve()
            .unwrap();
        assert_eq!(c.disk_io.file_aio, AioChoice::Threads);
        assert_eq!(c.disk_io.device_aio, AioChoice::IoUring);
        assert!(!c.disk_io.iothreads);
        // Flags over the file.
        let c = Flags::parse_from(["agentd", "--config", file, "--disk-iothreads"])
            .resolve()
            .unwrap();
        assert!(c.disk_io.iothreads);
        std::fs::write(&f, "file_aio = \"posix\"\n").unwrap();
        assert!(Flags::parse_from(["agentd", "--config", file])
            .resolve()
            .is_err());
    }

    #[test]
    fn attach_mode_from_flag_or_toml() {
        let c = Flags::parse_from(["agentd", "--attach", "kernel"])
            .resolve()
            .unwrap();
        assert_eq!(c.attach, AttachMode::Kernel);
        assert!(Flags::try_parse_from(["agentd", "--attach", "libiscsi"]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agentd.toml");
        std::fs::write(&f, "attach = \"kernel\"\n").unwrap();
        let c = Flags::parse_from(["agentd", "--config", f.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert_eq!(c.attach, AttachMode::Kernel);
        let c = Flags::parse_from([
            "agentd",
            "--config",
            f.to_str().unwrap(),
            "--attach",
            "qemu",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.attach, AttachMode::Qemu);
        std::fs::write(&f, "attach = \"iscsi\"\n").unwrap();
        assert!(
            Flags::parse_from(["agentd", "--config", f.to_str().unwrap()])
                .resolve()
                .is_err()
        );
    }

    #[test]
    fn local_attach_is_on_with_the_machine_id_unless_turned_off() {
        let machine = stratus_core::host::host_id(None).unwrap();
        let c = Flags::parse_from(["agentd"]).resolve().unwrap();
        assert_eq!(c.local_host_id, machine);
        let c = Flags::parse_from(["agentd", "--host-id", "rack1-h7"])
            .resolve()
            .unwrap();
        assert_eq!(c.local_host_id.as_deref(), Some("rack1-h7"));
        for argv in [
            &["agentd", "--local-attach=false"][..],
            &["agentd", "--host-id", "rack1-h7", "--local-attach", "false"],
        ] {
            let c = Flags::parse_from(argv).resolve().unwrap();
            assert_eq!(c.local_host_id, None, "{argv:?}");
        }
        assert!(Flags::parse_from(["agentd", "--host-id", "../x"])
            .resolve()
            .is_err());
    }

    #[test]
    fn chap_mutual_is_off_by_default_and_needs_the_kernel_initiator() {
        let c = Flags::parse_from(["agentd"]).resolve().unwrap();
        assert!(!c.chap_mutual);
        let c = Flags::parse_from(["agentd", "--attach", "kernel", "--chap-mutual"])
            .resolve()
            .unwrap();
        assert!(c.chap_mutual);
        assert_eq!(c.attach, AttachMode::Kernel);
        // QEMU's initiator (the default attach) cannot check the target:
        // refused at start-up, naming the way out.
        for argv in [
            &["agentd", "--chap-mutual"][..],
            &["agentd", "--attach", "qemu", "--chap-mutual"][..],
        ] {
            let e = Flags::parse_from(argv).resolve().unwrap_err();
            assert_eq!(e.kind(), stratus_core::error::ErrorKind::InvalidArgument);
            let m = e.to_string();
            assert!(
                m.contains("--chap-mutual") && m.contains("--attach kernel"),
                "{m}"
            );
        }
        // The same from the TOML file, and a flag over a file's attach.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agentd.toml");
        std::fs::write(&f, "attach = \"kernel\"\nchap_mutual = true\n").unwrap();
        let path = f.to_str().unwrap();
        let c = Flags::parse_from(["agentd", "--config", path])
            .resolve()
            .unwrap();
        assert!(c.chap_mutual);
        assert!(
            Flags::parse_from(["agentd", "--config", path, "--attach", "qemu"])
                .resolve()
                .is_err()
        );
        std::fs::write(&f, "chap_mutual = true\n").unwrap();
        assert!(Flags::parse_from(["agentd", "--config", path])
            .resolve()
            .is_err());
    }

    #[test]
    fn the_example_config_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agentd.toml");
        std::fs::write(&f, include_str!("../../examples/agentd.toml")).unwrap();
        let c = Flags::parse_from(["agentd", "--config", f.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert_eq!(c.pdisk.len(), 1);
        assert!(c.pdisk[0].name.is_default());
        assert_eq!(c.pdisk[0].url, "https://192.0.2.10:7400");
        assert_eq!(c.pdisk[0].tls, c.tls);
        assert!(c.serve.mtls.is_some());
        assert_eq!(c.reserved_memory, 2 << 30);
    }

    #[test]
    fn several_pdisk_servers_from_flags_and_toml() {
        let c = Flags::parse_from([
            "agentd",
            "--pdisk",
            "http://127.0.0.1:7400",
            "--pdisk",
            "store-b=unix:/run/b.sock",
        ])
        .resolve()
        .unwrap();
        let names: Vec<&str> = c.pdisk.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["default", "store-b"]);
        assert_eq!(c.pdisk[1].url, "unix:/run/b.sock");
        // Twice the same name, or a bad one: refused.
        for argv in [
            &[
                "agentd",
                "--pdisk",
                "b=http://127.0.0.1:1",
                "--pdisk",
                "b=http://127.0.0.1:2",
            ][..],
            &[
                "agentd",
                "--pdisk",
                "http://127.0.0.1:1",
                "--pdisk",
                "http://127.0.0.1:2",
            ][..],
            &["agentd", "--pdisk", "B=http://127.0.0.1:1"][..],
        ] {
            let e = Flags::parse_from(argv).resolve().unwrap_err();
            assert_eq!(
                e.kind(),
                stratus_core::error::ErrorKind::InvalidArgument,
                "{e}"
            );
        }
        // TOML: a table per server, each with its own TLS files or the host's.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agentd.toml");
        std::fs::write(
            &f,
            "tls_cert = \"/h.crt\"\ntls_key = \"/h.key\"\ntls_client_ca = \"/ca.crt\"\n\
             [pdisk.default]\nurl = \"https://192.0.2.10:7400\"\n\
             [pdisk.store-b]\nurl = \"https://192.0.2.11:7400\"\n\
             tls_cert = \"/b.crt\"\ntls_key = \"/b.key\"\ntls_ca = \"/b-ca.crt\"\n",
        )
        .unwrap();
        let path = f.to_str().unwrap();
        let c = Flags::parse_from(["agentd", "--config", path])
            .resolve()
            .unwrap();
        assert_eq!(c.pdisk.len(), 2);
        assert_eq!(c.pdisk[0].tls, c.tls, "the host's files by default");
        // Migration streams: TLS with the host's files unless insecure.
        assert_eq!(c.migration_tls, c.tls);
        assert!(c.tls.is_some());
        let insecure = Flags::parse_from(["agentd", "--config", path, "--migration-insecure"])
            .resolve()
            .unwrap();
        assert_eq!(insecure.migration_tls, None);
        assert_eq!(insecure.tls, c.tls);
        assert_eq!(
            c.pdisk[1].tls.as_ref().unwrap().cert,
            std::path::Path::new("/b.crt")
        );
        // A flag adds a server to the file's (or replaces one by name).
        let c = Flags::parse_from([
            "agentd",
            "--config",
            path,
            "--pdisk",
            "c=http://127.0.0.1:9",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.pdisk.len(), 3);
        // Half a set of TLS files, or an unknown key, is refused with the table named.
        std::fs::write(
            &f,
            "[pdisk.b]\nurl = \"http://127.0.0.1:1\"\ntls_cert = \"/b.crt\"\n",
        )
        .unwrap();
        let e = Flags::parse_from(["agentd", "--config", path])
            .resolve()
            .unwrap_err();
        assert!(
            e.to_string().contains("[pdisk.b]") && e.to_string().contains("tls_key"),
            "{e}"
        );
        std::fs::write(&f, "[pdisk.b]\nurl = \"http://127.0.0.1:1\"\nport = 1\n").unwrap();
        let e = Flags::parse_from(["agentd", "--config", path])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("[pdisk.b]"), "{e}");
        // An mTLS server with no TLS files at all.
        std::fs::write(&f, "[pdisk.b]\nurl = \"https://192.0.2.11:7400\"\n").unwrap();
        let e = Flags::parse_from(["agentd", "--config", path])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("pdisk server b"), "{e}");
    }

    #[test]
    fn migration_max_bandwidth_is_a_size_above_zero() {
        let parse =
            |v: &str| Flags::parse_from(["agentd", "--migration-max-bandwidth", v]).resolve();
        assert_eq!(parse("4M").unwrap().migration_max_bandwidth, Some(4 << 20));
        assert_eq!(
            Flags::parse_from(["agentd"])
                .resolve()
                .unwrap()
                .migration_max_bandwidth,
            None
        );
        for bad in ["0", "fast"] {
            let e = parse(bad).unwrap_err();
            assert!(e.to_string().contains("migration-max-bandwidth"), "{e}");
        }
    }
}
