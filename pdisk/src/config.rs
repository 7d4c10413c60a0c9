//! pdiskd settings: command-line flags over a TOML file over defaults.
//!
//! Every flag has the same name in the TOML file with `_` for `-`, e.g.
//! `--pool-dir` is `pool_dir = "/srv/pdisk/pool"`. Unknown keys are an error,
//! so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use stratus_core::settings::load_toml;
pub use stratus_core::settings::LogFormat;

use crate::backend::lvm::{LvmName, LvmSettings, Wipe};
use crate::backend::rbd::{check_path_for_rbd, CephName, RbdSettings};
use crate::error::{Error, Result};
use crate::export::IscsiParams;
use crate::types::Iqn;
use stratus_core::nats::{NatsFlags, NatsSettings};
use stratus_pki::serve::{ServeFlags, ServeSettings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Sparse files on a (preferably reflink-capable) filesystem.
    File,
    /// Thin LVs in an LVM thin pool (--vg, --thin-pool).
    Lvm,
    /// RBD images in a Ceph pool (--rbd-pool, --ceph-conf, --ceph-id).
    Rbd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExporterKind {
    /// Userspace tgtd, driven by tgtadm.
    Tgt,
    /// The kernel's LIO target, configured through configfs.
    Lio,
    /// The kernel's NVMe/TCP target (nvmet), configured through configfs.
    /// No DH-HMAC-CHAP on kernels without CONFIG_NVME_TARGET_AUTH: host
    /// NQNs are the only access control (README, "NVMe/TCP").
    Nvmet,
    /// No target: clients open RBD images with Ceph's own client (the
    /// rbd backend's only exporter, and its default).
    Rbd,
}

/// Flags of pdiskd; each can also be set in the `--config` TOML file.
#[derive(Debug, Clone, Default, Parser, Deserialize)]
#[command(name = "pdiskd", version, about = "Stratus persistent-disk server")]
#[serde(deny_unknown_fields, default)]
pub struct Flags {
    /// TOML file with settings; flags override it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Listeners: mTLS, the local socket, loopback plain TCP.
    #[command(flatten)]
    #[serde(flatten)]
    pub serve: ServeFlags,
    /// Publishing events to NATS JetStream (`--nats-url` and the rest).
    #[command(flatten)]
    #[serde(flatten)]
    pub nats: NatsFlags,
    /// Events older than this are compacted out of the journal, e.g. 7d
    /// [default: 7d]
    #[arg(long, value_name = "DURATION")]
    pub event_retention: Option<String>,
    /// At most this many of the newest events are kept [default: 1000000]
    #[arg(long, value_name = "N")]
    pub event_max: Option<u64>,
    /// Directory of the metadata store [default: /var/lib/pdisk]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Volume backend [default: file]
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Pool directory of the file backend [default: DATA_DIR/pool]
    #[arg(long, value_name = "DIR")]
    pub pool_dir: Option<PathBuf>,
    /// lvm backend: the volume group holding the thin pool (required with
    /// --backend lvm)
    #[arg(long, value_name = "NAME")]
    pub vg: Option<String>,
    /// lvm backend: the thin pool volumes live in (required with --backend
    /// lvm)
    #[arg(long, value_name = "NAME")]
    pub thin_pool: Option<String>,
    /// lvm backend: when the VG has no thin pool yet, create THIN_POOL from
    /// 95% of the VG's free space (zeroing new blocks, passing discards
    /// down); the other 5% leaves room to grow the pool's metadata. Refused
    /// when the VG already has a thin pool of another name.
    #[arg(long)]
    pub lvm_create_pool: bool,
    /// lvm backend: refuse creating, growing, cloning and snapshotting once
    /// the thin pool's data or metadata usage would pass this percentage
    /// [default: 90]
    #[arg(long, value_name = "PERCENT")]
    pub thin_threshold: Option<f64>,
    /// lvm backend: what delete does to an LV's data before removing it:
    /// none (the thin pool discards its blocks) or zero (overwrite it with
    /// blkdiscard --zeroout first: slow, provisions the whole LV while it
    /// runs) [default: none]
    #[arg(long, value_enum, value_name = "MODE")]
    pub lvm_wipe: Option<Wipe>,
    /// rbd backend: the Ceph pool volumes live in (required with --backend
    /// rbd)
    #[arg(long, value_name = "POOL")]
    pub rbd_pool: Option<String>,
    /// rbd backend: an erasure-coded pool for the images' data (their
    /// metadata stays in --rbd-pool)
    #[arg(long, value_name = "POOL")]
    pub rbd_data_pool: Option<String>,
    /// rbd backend: a clone whose chain of parents would pass this depth is
    /// flattened before it is published [default: 5]
    #[arg(long, value_name = "N")]
    pub rbd_max_clone_depth: Option<u32>,
    /// rbd backend: the cluster's ceph.conf [default: /etc/ceph/ceph.conf]
    #[arg(long, value_name = "FILE")]
    pub ceph_conf: Option<PathBuf>,
    /// rbd backend: the cephx user, without "client." [default: admin]
    #[arg(long, value_name = "USER")]
    pub ceph_id: Option<String>,
    /// rbd backend: the user's keyring [default: the locations ceph.conf
    /// names, e.g. /etc/ceph/ceph.client.USER.keyring]
    #[arg(long, value_name = "FILE")]
    pub ceph_keyring: Option<PathBuf>,
    /// rbd backend: the cephx user clients (agents' QEMUs) attach volumes
    /// as, named in exports; each client host holds its key in its own
    /// keyring [default: --ceph-id]
    #[arg(long, value_name = "USER")]
    pub rbd_client_id: Option<String>,
    /// Exporter: tgt or lio (iSCSI), nvmet (NVMe/TCP), or rbd (no target;
    /// the rbd backend's) [default: tgt, rbd with --backend rbd]
    #[arg(long = "export", value_enum)]
    #[serde(rename = "export")]
    pub exporter: Option<ExporterKind>,
    /// Portal IP:PORT that initiators connect to [default: 127.0.0.1:3260;
    /// 127.0.0.1:4420 with --export nvmet]
    #[arg(long, value_name = "HOST:PORT")]
    pub portal: Option<String>,
    /// The nvmet port id (configfs nvmet/ports/N) pdiskd owns with --export
    /// nvmet [default: 1]
    #[arg(long, value_name = "N")]
    pub nvmet_port_id: Option<u32>,
    /// tgtd control port (tgtd -C N) [default: 0]
    #[arg(long, value_name = "N")]
    pub tgt_control_port: Option<u32>,
    /// tgt backing store: rdwr (honours guest flushes, thin provisioning) or
    /// aio (skips flushes: not crash-safe) [default: rdwr]
    #[arg(long, value_name = "TYPE")]
    pub tgt_bstype: Option<String>,
    /// lio and nvmet exporters: where configfs is mounted [default: /sys/kernel/config]
    #[arg(long, value_name = "DIR")]
    pub lio_configfs: Option<PathBuf>,
    /// iSCSI parameters every target offers (tgt, lio): KEY=VALUE,... or
    /// none (the target's own) [default: measured, see the README]
    #[arg(long, value_name = "KEY=VALUE,...")]
    pub iscsi_params: Option<String>,
    /// Prefix of target IQNs [default: iqn.2026-11.io.stratus.pdisk]
    #[arg(long, value_name = "IQN")]
    pub iqn_prefix: Option<String>,
    /// Directory server-side image imports may read from (repeatable)
    /// [default: DATA_DIR/import]
    #[arg(long = "import-dir", value_name = "DIR")]
    pub import_dirs: Option<Vec<PathBuf>>,
    /// Provisioned bytes may reach pool capacity times this [default: 20]
    #[arg(long, value_name = "RATIO")]
    pub max_overcommit: Option<f64>,
    /// How long a deleted volume stays in quarantine (its data kept,
    /// restorable with `pdisk volume restore`) before it is purged, e.g.
    /// 24h, 7d, 30s; 0 deletes at once [default: 24h]
    #[arg(long, value_name = "DURATION")]
    pub quarantine_period: Option<String>,
    /// This storage host's id: an agent asking for an export with the same
    /// id (agentd --host-id) runs here and gets the volume's own file or
    /// device instead of an iSCSI target [default: /etc/machine-id]
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,
    /// Seconds between checks that the exporter still has every export [default: 5]
    #[arg(long, value_name = "SECS")]
    pub export_check_interval: Option<u64>,
    /// How often each project's storage (volumes, snapshots, provisioned
    /// and allocated bytes) is sampled into its accounting, besides after
    /// each change to its volumes, e.g. 15m, 1h [default: 1h]
    #[arg(long, value_name = "DURATION")]
    pub usage_interval: Option<String>,
    /// This site's name in storage usage records (StAR Site, the GOCDB
    /// name) [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub usage_site: Option<String>,
    /// This storage system in storage usage records (StAR StorageSystem,
    /// best its FQDN) [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub usage_service: Option<String>,
    /// Log format [default: human]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. info or pdisk=debug [default: info, or RUST_LOG]
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where and how to serve (mTLS, local socket, loopback plain TCP).
    pub serve: ServeSettings,
    /// The broker events are published to (None: not published).
    pub nats: Option<NatsSettings>,
    /// The event journal keeps events this long...
    pub event_max_age: std::time::Duration,
    /// ... and at most this many.
    pub event_max: u64,
    pub data_dir: PathBuf,
    pub backend: BackendKind,
    pub pool_dir: PathBuf,
    /// Set when `backend` is lvm.
    pub lvm: Option<LvmSettings>,
    /// Set when `backend` is rbd.
    pub rbd: Option<RbdSettings>,
    pub exporter: ExporterKind,
    pub portal: String,
    pub tgt_control_port: u32,
    pub tgt_bstype: String,
    pub lio_configfs: PathBuf,
    pub nvmet_port_id: u32,
    pub iscsi_params: IscsiParams,
    pub iqn_prefix: String,
    pub import_dirs: Vec<PathBuf>,
    pub max_overcommit: f64,
    pub export_check_interval: u64,
    /// Zero: deletes are at once.
    pub quarantine_period: std::time::Duration,
    /// This storage host's id (same-host attachments); None: never local.
    pub host_id: Option<String>,
    /// How often every project's storage is sampled.
    pub usage_interval: std::time::Duration,
    /// StAR Site and StorageSystem of the records.
    pub usage_site: String,
    pub usage_service: String,
    pub log_format: LogFormat,
    pub log_level: String,
}

impl Flags {
    /// Merges flags over the `--config` file over defaults, and validates.
    pub fn resolve(self) -> Result<Config> {
        let file: Flags = load_toml(self.config.as_deref())?;
        macro_rules! pick {
            ($f:ident, $default:expr) => {
                self.$f.or(file.$f).unwrap_or_else(|| $default)
            };
        }
        let serve = self.serve_settings(&file)?;
        let backend = pick!(backend, BackendKind::File);
        let mut lvm = self.lvm_settings(&file, backend)?;
        let mut rbd = self.rbd_settings(&file, backend)?;
        let data_dir = pick!(data_dir, PathBuf::from("/var/lib/pdisk"));
        let exporter = pick!(
            exporter,
            if backend == BackendKind::Rbd {
                ExporterKind::Rbd
            } else {
                ExporterKind::Tgt
            }
        );
        if let Some(l) = &mut lvm {
            l.staging_dir = data_dir.join("staging");
        }
        if let Some(r) = &mut rbd {
            r.staging_dir = data_dir.join("staging");
        }
        let nats = self.nats.resolve(&file.nats)?;
        let event_max_age = humantime::parse_duration(&pick!(event_retention, "7d".into()))
            .map_err(|e| Error::invalid(format!("event-retention: {e}")))?;
        let quarantine_period = parse_period(&pick!(quarantine_period, "24h".into()))?;
        let event_max = pick!(event_max, 1_000_000);
        if event_max == 0 {
            return Err(Error::invalid("event-max must be at least 1"));
        }
        let cfg = Config {
            serve,
            nats,
            event_max_age,
            event_max,
            backend,
            lvm,
            rbd,
            pool_dir: pick!(pool_dir, data_dir.join("pool")),
            // RBD images are reached by Ceph's own client, not a target.
            exporter,
            portal: pick!(
                portal,
                if exporter == ExporterKind::Nvmet {
                    "127.0.0.1:4420".into()
                } else {
                    "127.0.0.1:3260".into()
                }
            ),
            nvmet_port_id: pick!(nvmet_port_id, 1),
            tgt_control_port: pick!(tgt_control_port, 0),
            tgt_bstype: pick!(tgt_bstype, "rdwr".into()),
            lio_configfs: pick!(lio_configfs, PathBuf::from("/sys/kernel/config")),
            iscsi_params: match self.iscsi_params.or(file.iscsi_params) {
                Some(p) => p.parse()?,
                None => IscsiParams::measured_default(),
            },
            iqn_prefix: pick!(iqn_prefix, "iqn.2026-11.io.stratus.pdisk".into()),
            import_dirs: pick!(import_dirs, vec![data_dir.join("import")]),
            max_overcommit: pick!(max_overcommit, 20.0),
            export_check_interval: pick!(export_check_interval, 5),
            quarantine_period,
            host_id: stratus_core::host::host_id(self.host_id.or(file.host_id).as_deref())?,
            usage_interval: humantime::parse_duration(&pick!(usage_interval, "1h".into()))
                .map_err(|e| Error::invalid(format!("usage-interval: {e}")))?,
            usage_site: pick!(usage_site, crate::usage::StorageSite::of_this_host().site),
            usage_service: pick!(
                usage_service,
                crate::usage::StorageSite::of_this_host().storage_system
            ),
            log_format: pick!(log_format, LogFormat::Human),
            log_level: pick!(
                log_level,
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())
            ),
            data_dir,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The listeners: flags over file; see [`ServeFlags::resolve`].
    fn serve_settings(&self, file: &Flags) -> Result<ServeSettings> {
        self.serve
            .resolve(
                &file.serve,
                "127.0.0.1:7400".parse().expect("a socket address"),
                Path::new("/run/stratus/pdiskd.sock"),
            )
            .map_err(Error::invalid)
    }

    /// The rbd backend's settings, validated (Ceph names without odd
    /// characters, paths QEMU's rbd: filenames can carry); None for other
    /// backends, which take no rbd keys.
    fn rbd_settings(&self, file: &Flags, backend: BackendKind) -> Result<Option<RbdSettings>> {
        let pool = self.rbd_pool.clone().or(file.rbd_pool.clone());
        let data_pool = self.rbd_data_pool.clone().or(file.rbd_data_pool.clone());
        let depth = self.rbd_max_clone_depth.or(file.rbd_max_clone_depth);
        let conf = self.ceph_conf.clone().or(file.ceph_conf.clone());
        let id = self.ceph_id.clone().or(file.ceph_id.clone());
        let keyring = self.ceph_keyring.clone().or(file.ceph_keyring.clone());
        let client_id = self.rbd_client_id.clone().or(file.rbd_client_id.clone());
        if backend != BackendKind::Rbd {
            if pool.is_some()
                || data_pool.is_some()
                || depth.is_some()
                || conf.is_some()
                || id.is_some()
                || keyring.is_some()
                || client_id.is_some()
            {
                return Err(Error::invalid(
                    "rbd-pool, rbd-data-pool, rbd-max-clone-depth, rbd-client-id, ceph-conf, ceph-id and ceph-keyring are settings of the rbd backend: set backend = rbd or remove them",
                ));
            }
            return Ok(None);
        }
        let Some(pool) = pool else {
            return Err(Error::invalid(
                "the rbd backend needs --rbd-pool (rbd_pool in the config file)",
            ));
        };
        let ceph_conf = conf.unwrap_or_else(|| PathBuf::from("/etc/ceph/ceph.conf"));
        check_path_for_rbd("ceph-conf", &ceph_conf)?;
        if let Some(k) = &keyring {
            check_path_for_rbd("ceph-keyring", k)?;
        }
        let ceph_id = CephName::new("ceph-id", id.as_deref().unwrap_or("admin"))?;
        Ok(Some(RbdSettings {
            pool: CephName::new("rbd-pool", &pool)?,
            data_pool: data_pool
                .map(|d| CephName::new("rbd-data-pool", &d))
                .transpose()?,
            ceph_conf,
            client_id: match client_id {
                Some(c) => CephName::new("rbd-client-id", &c)?,
                None => ceph_id.clone(),
            },
            ceph_id,
            keyring,
            max_clone_depth: depth.unwrap_or(5),
            staging_dir: PathBuf::new(),
        }))
    }

    /// The lvm backend's settings, validated (names LVM accepts, so nothing
    /// odd reaches argv), staging under the data dir; None for other
    /// backends, which take no lvm keys.
    fn lvm_settings(&self, file: &Flags, backend: BackendKind) -> Result<Option<LvmSettings>> {
        let vg = self.vg.clone().or(file.vg.clone());
        let thin_pool = self.thin_pool.clone().or(file.thin_pool.clone());
        let create_pool = self.lvm_create_pool || file.lvm_create_pool;
        let threshold = self.thin_threshold.or(file.thin_threshold);
        let wipe = self.lvm_wipe.or(file.lvm_wipe);
        if backend != BackendKind::Lvm {
            if vg.is_some()
                || thin_pool.is_some()
                || create_pool
                || threshold.is_some()
                || wipe.is_some()
            {
                return Err(Error::invalid(
                    "vg, thin-pool, lvm-create-pool, thin-threshold and lvm-wipe are settings of the lvm backend: set backend = lvm or remove them",
                ));
            }
            return Ok(None);
        }
        let (Some(vg), Some(thin_pool)) = (vg, thin_pool) else {
            return Err(Error::invalid(
                "the lvm backend needs --vg and --thin-pool (vg and thin_pool in the config file)",
            ));
        };
        let threshold_percent = threshold.unwrap_or(90.0);
        if !(threshold_percent > 0.0 && threshold_percent <= 100.0) {
            return Err(Error::invalid(
                "thin-threshold must be a percentage above 0 and at most 100",
            ));
        }
        Ok(Some(LvmSettings {
            vg: LvmName::vg(&vg).map_err(|e| e.context("vg"))?,
            thin_pool: LvmName::lv(&thin_pool).map_err(|e| e.context("thin-pool"))?,
            create_pool,
            threshold_percent,
            wipe: wipe.unwrap_or_default(),
            staging_dir: PathBuf::new(),
        }))
    }
}

/// A quarantine period: a duration (`24h`, `7d`, `90s`) or `0`.
fn parse_period(s: &str) -> Result<std::time::Duration> {
    if s.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    humantime::parse_duration(s.trim()).map_err(|e| {
        Error::invalid(format!(
            "quarantine-period {s:?}: {e} (a duration such as 24h, 7d or 30s; 0 deletes at once)"
        ))
    })
}

impl Config {
    fn validate(&self) -> Result<()> {
        if self.portal.parse::<SocketAddr>().is_err() {
            return Err(Error::invalid(format!(
                "portal {:?} must be IP:PORT, e.g. 192.0.2.10:3260",
                self.portal
            )));
        }
        self.iqn_prefix
            .parse::<Iqn>()
            .map_err(|e| Error::invalid(format!("iqn-prefix: {e}")))?;
        if self.iqn_prefix.contains(':') {
            return Err(Error::invalid(
                "iqn-prefix must not contain ':' (the volume UUID follows it after ':')",
            ));
        }
        if !(self.max_overcommit > 0.0 && self.max_overcommit.is_finite()) {
            return Err(Error::invalid("max-overcommit must be a positive number"));
        }
        if !matches!(self.tgt_bstype.as_str(), "aio" | "rdwr") {
            return Err(Error::invalid("tgt-bstype must be aio or rdwr"));
        }
        if self.tgt_control_port > 32767 {
            return Err(Error::invalid("tgt-control-port must be at most 32767"));
        }
        if self.usage_interval < std::time::Duration::from_secs(1) {
            return Err(Error::invalid("usage-interval must be at least 1s"));
        }
        if self.export_check_interval == 0 {
            return Err(Error::invalid("export-check-interval must be at least 1"));
        }
        // tgt and LIO serve files and block devices; an RBD image is
        // neither (krbd or tgt's bs-type rbd are not supported), and the
        // rbd exporter has only RBD images to offer.
        match (self.backend, self.exporter) {
            (BackendKind::Rbd, ExporterKind::Rbd) => {}
            (BackendKind::Rbd, e) => {
                return Err(Error::invalid(format!(
                    "the rbd backend exports with --export rbd (clients attach with Ceph's own                      client), not {e:?}: iSCSI exports of RBD images are not supported"
                )))
            }
            (_, ExporterKind::Rbd) => {
                return Err(Error::invalid(
                    "--export rbd needs --backend rbd: only RBD images are opened by Ceph's own client",
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
