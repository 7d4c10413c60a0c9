//! agentd settings: command-line flags over a TOML file over defaults.
//! Every flag has the same key in the TOML file with `_` for `-`; unknown
//! keys are errors.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

use crate::attach::AttachMode;
use crate::vmm::AccelChoice;
use stratus_core::error::{Error, Result};
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
    /// gRPC listen address [default: 127.0.0.1:7401]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory of the agent's state and guest files [default: /var/lib/stratus-agent]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// pdiskd's URL, e.g. http://192.0.2.10:7400 (needed for pdisk disks)
    #[arg(long, value_name = "URL")]
    pub pdisk: Option<String>,
    /// Bridge for NICs that name none [default: br0]
    #[arg(long, value_name = "NAME")]
    pub bridge: Option<String>,
    /// Accelerator: auto uses KVM when the CPU and /dev/kvm allow [default: auto]
    #[arg(long, value_enum)]
    pub accel: Option<AccelChoice>,
    /// How pdisk volumes reach QEMU: qemu (QEMU's own iSCSI initiator) or
    /// kernel (open-iscsi logs the host in; QEMU opens the SCSI disk)
    /// [default: qemu]
    #[arg(long, value_enum)]
    pub attach: Option<AttachMode>,
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
    /// Log format [default: human]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter [default: info, or RUST_LOG]
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub pdisk: Option<String>,
    pub bridge: String,
    pub accel: AccelChoice,
    pub attach: AttachMode,
    pub initiator_iqn: Iqn,
    pub cpu_overcommit: u32,
    pub reserved_memory: u64,
    pub image_quota: u64,
    pub image_policy: Option<PathBuf>,
    pub image_file_roots: Vec<PathBuf>,
    pub log_format: LogFormat,
    pub log_level: String,
}

impl Flags {
    pub fn resolve(self) -> Result<Config> {
        let file: Flags = stratus_core::settings::load_toml(self.config.as_deref())?;
        macro_rules! pick {
            ($f:ident, $default:expr) => {
                self.$f.or(file.$f).unwrap_or_else(|| $default)
            };
        }
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_ascii_lowercase())
            .unwrap_or_else(|_| "localhost".into());
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
        let cfg = Config {
            listen: pick!(listen, "127.0.0.1:7401".parse().unwrap()),
            state_dir: pick!(state_dir, PathBuf::from("/var/lib/stratus-agent")),
            pdisk: self.pdisk.or(file.pdisk),
            bridge: pick!(bridge, "br0".into()),
            accel: pick!(accel, AccelChoice::Auto),
            attach: pick!(attach, AttachMode::Qemu),
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
            log_format: pick!(log_format, LogFormat::Human),
            log_level: pick!(
                log_level,
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())
            ),
        };
        crate::spec::check_ifname("bridge", &cfg.bridge)?;
        if cfg.cpu_overcommit == 0 {
            return Err(Error::invalid("cpu-overcommit must be at least 1"));
        }
        if let Some(u) = &cfg.pdisk {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(Error::invalid(format!(
                    "pdisk URL {u:?} must start with http:// or https://"
                )));
            }
        }
        Ok(cfg)
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
        assert_eq!(c.listen.to_string(), "127.0.0.1:7401");
        assert_eq!(c.accel, AccelChoice::Tcg);
        assert_eq!(c.bridge, "stbr0");
        assert_eq!(c.attach, AttachMode::Qemu);
        assert!(c
            .initiator_iqn
            .as_str()
            .starts_with("iqn.2026-11.io.stratus.agent:"));
        assert!(Flags::parse_from(["agentd", "--pdisk", "127.0.0.1:7400"])
            .resolve()
            .is_err());
        assert!(Flags::parse_from(["agentd", "--bridge", "a/b"])
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
    fn the_example_config_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agentd.toml");
        std::fs::write(&f, include_str!("../../examples/agentd.toml")).unwrap();
        let c = Flags::parse_from(["agentd", "--config", f.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert_eq!(c.pdisk.as_deref(), Some("http://192.0.2.10:7400"));
        assert_eq!(c.reserved_memory, 2 << 30);
    }
}
