//! The nvmet exporter's blocking configfs logic ([`Nvmet`], run on tokio's
//! blocking pool): paths, primitives with our error messages, and the
//! converging export, unexport and read-back.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use super::super::lio::configfs::{ConfigFs, EntryKind, StatFn};
use super::super::{ExportHealth, ExportSpec, LiveExport};
use super::{NvmetConfig, NSID};
use crate::error::{Error, ErrorKind, Result};
use crate::types::Iqn;

pub(super) enum Probe {
    Ready,
    NotMounted(String),
    NoCore(String),
}

pub(super) struct Nvmet {
    pub(super) cfg: NvmetConfig,
    pub(super) addr: SocketAddr,
    /// `nqn.` form of the IQN prefix: the subsystems this exporter owns.
    pub(super) nqn_prefix: String,
    pub(super) fs: Arc<dyn ConfigFs>,
    pub(super) stat: Arc<StatFn>,
}

/// The configfs error for `op` on `path`; the kernel log has nvmet's reason.
fn cfs_error(op: &str, path: &Path, e: &io::Error) -> Error {
    let kind = match e.raw_os_error() {
        Some(libc::EBUSY) | Some(libc::EACCES) => ErrorKind::FailedPrecondition,
        Some(libc::EADDRINUSE) => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    Error::new(
        kind,
        format!(
            "configfs: {op} {}: {e} (the kernel log has nvmet's reason)",
            path.display()
        ),
    )
}

fn not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOENT)
}

/// An attribute as shown, without its newline; nvmet shows an unset
/// `device_path` as `(null)`.
fn value(s: &str) -> &str {
    let v = s.trim_end_matches('\n');
    if v == "(null)" {
        ""
    } else {
        v
    }
}

/// The volume UUID of a target (`...:<uuid>`), when its IQN ends in one.
pub(super) fn volume_uuid(iqn: &str) -> Option<Uuid> {
    iqn.rsplit_once(':').and_then(|(_, s)| s.parse().ok())
}

/// A subsystem serial (20 characters at most) from the volume UUID.
pub(super) fn serial(uuid: &Uuid) -> String {
    uuid.simple().to_string()[..20].to_owned()
}

impl Nvmet {
    // ---- paths ----

    pub(super) fn root(&self) -> PathBuf {
        self.cfg.configfs_root.join("nvmet")
    }
    pub(super) fn subsys(&self, nqn: &str) -> PathBuf {
        self.root().join("subsystems").join(nqn)
    }
    pub(super) fn ns(&self, nqn: &str) -> PathBuf {
        self.subsys(nqn).join("namespaces").join(NSID.to_string())
    }
    pub(super) fn port(&self) -> PathBuf {
        self.root().join("ports").join(self.cfg.port_id.to_string())
    }
    pub(super) fn port_link(&self, nqn: &str) -> PathBuf {
        self.port().join("subsystems").join(nqn)
    }
    pub(super) fn host(&self, host: &str) -> PathBuf {
        self.root().join("hosts").join(host)
    }
    fn allowed(&self, nqn: &str, host: &str) -> PathBuf {
        self.subsys(nqn).join("allowed_hosts").join(host)
    }

    // ---- primitives ----

    fn exists(&self, p: &Path) -> bool {
        self.fs.exists(p)
    }
    fn read(&self, p: &Path) -> Result<String> {
        self.fs
            .read(p)
            .map(|s| value(&s).to_owned())
            .map_err(|e| cfs_error("read", p, &e))
    }
    fn write(&self, p: &Path, v: &str) -> Result<()> {
        tracing::debug!(path = %p.display(), value = v, "nvmet: write");
        self.fs.write(p, v).map_err(|e| cfs_error("write", p, &e))
    }
    fn mkdir(&self, p: &Path) -> Result<()> {
        self.fs.mkdir(p).map_err(|e| cfs_error("mkdir", p, &e))
    }
    /// rmdir; gone already is fine.
    fn rmdir(&self, p: &Path) -> Result<()> {
        match self.fs.rmdir(p) {
            Err(e) if !not_found(&e) => Err(cfs_error("rmdir", p, &e)),
            _ => Ok(()),
        }
    }
    fn symlink(&self, target: &Path, link: &Path) -> Result<()> {
        self.fs
            .symlink(target, link)
            .map_err(|e| cfs_error("symlink", link, &e))
    }
    /// unlink; gone already is fine.
    fn unlink(&self, p: &Path) -> Result<()> {
        match self.fs.unlink(p) {
            Err(e) if !not_found(&e) => Err(cfs_error("unlink", p, &e)),
            _ => Ok(()),
        }
    }
    /// Names of the entries of `kind` in `dir`; none when it is missing.
    fn names(&self, dir: &Path, kind: EntryKind) -> Result<Vec<String>> {
        match self.fs.entries(dir) {
            Ok(v) => Ok(v
                .into_iter()
                .filter(|(_, k)| *k == kind)
                .map(|(n, _)| n)
                .collect()),
            Err(e) if not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(cfs_error("list", dir, &e)),
        }
    }

    pub(super) fn owns(&self, nqn: &str) -> bool {
        super::super::lio::owns(&self.nqn_prefix, nqn)
    }

    pub(super) fn probe(&self) -> Probe {
        if !self.fs.mounted(&self.cfg.configfs_root) {
            return Probe::NotMounted(format!(
                "configfs is not mounted at {}",
                self.cfg.configfs_root.display()
            ));
        }
        if !self.exists(&self.root().join("subsystems")) {
            return Probe::NoCore(format!(
                "{} is missing: the nvmet module is not loaded",
                self.root().display()
            ));
        }
        Probe::Ready
    }

    /// The port's address attributes, as they must read.
    fn port_attrs(&self) -> [(&'static str, String); 4] {
        let fam = if self.addr.is_ipv4() { "ipv4" } else { "ipv6" };
        [
            ("addr_trtype", "tcp".to_owned()),
            ("addr_adrfam", fam.to_owned()),
            ("addr_traddr", self.addr.ip().to_string()),
            ("addr_trsvcid", self.addr.port().to_string()),
        ]
    }

    /// The port attributes that differ from the configured portal.
    fn port_differs(&self) -> Result<Vec<(&'static str, String)>> {
        let port = self.port();
        let mut out = Vec::new();
        for (k, v) in self.port_attrs() {
            if self.read(&port.join(k))? != v {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    /// Creates the port or corrects its address. nvmet refuses address
    /// changes while subsystems are linked, so ours are unlinked for the
    /// change (their connections drop and come back); a port that serves
    /// subsystems of someone else is not ours to change.
    fn ensure_port(&self) -> Result<()> {
        let port = self.port();
        if !self.exists(&port) {
            self.mkdir(&port)?;
        }
        let differs = self.port_differs()?;
        if differs.is_empty() {
            return Ok(());
        }
        let linked = self.names(&port.join("subsystems"), EntryKind::Link)?;
        if let Some(other) = linked.iter().find(|n| !self.owns(n)) {
            return Err(Error::precondition(format!(
                "nvmet port {} serves {other}, which is not pdisk's, at another address \
                 than {}: choose another port id",
                self.cfg.port_id, self.addr
            )));
        }
        for n in &linked {
            self.unlink(&self.port_link(n))?;
        }
        for (k, v) in &differs {
            self.write(&port.join(k), v)?;
        }
        tracing::info!(port = self.cfg.port_id, addr = %self.addr, "nvmet: port configured");
        for n in &linked {
            self.symlink(&self.subsys(n), &self.port_link(n))?;
        }
        Ok(())
    }

    /// Makes the subsystem of `spec` match it: namespace 1 on the backing,
    /// exactly the spec's hosts, linked to the port.
    pub(super) fn export(&self, spec: &ExportSpec) -> Result<()> {
        let nqn = spec.target_iqn.to_nqn()?;
        let hosts = spec
            .initiators
            .iter()
            .map(Iqn::to_nqn)
            .collect::<Result<BTreeSet<String>>>()?;
        let path = self.check_backing(&spec.backing_path)?;
        self.ensure_port()?;
        let sub = self.subsys(&nqn);
        let uuid = volume_uuid(spec.target_iqn.as_str());
        if !self.exists(&sub) {
            self.mkdir(&sub)?;
            if let Some(u) = &uuid {
                self.write(&sub.join("attr_serial"), &serial(u))?;
            }
            crate::failpoints::crash_point("nvmet::export::subsystem_created");
        }
        if self.read(&sub.join("attr_allow_any_host"))? != "0" {
            self.write(&sub.join("attr_allow_any_host"), "0")?;
        }
        self.converge_namespace(&nqn, &path, uuid)?;
        crate::failpoints::crash_point("nvmet::export::namespace_enabled");
        let have: BTreeSet<String> = self
            .names(&sub.join("allowed_hosts"), EntryKind::Link)?
            .into_iter()
            .collect();
        let revoked: Vec<&String> = have.difference(&hosts).collect();
        let link = self.port_link(&nqn);
        if !revoked.is_empty() && self.exists(&link) {
            // A revoked host keeps the connections it has: drop every
            // controller of the subsystem on the port (allowed hosts
            // reconnect by themselves). Before the links go, so a crash
            // in between leaves the subsystem closed (linked again below
            // by the retry), never a revoked host still connected.
            self.unlink(&link)?;
        }
        for h in &revoked {
            self.unlink(&self.allowed(&nqn, h))?;
            crate::failpoints::crash_point("nvmet::export::host_unlinked");
        }
        for h in hosts.difference(&have) {
            if !self.exists(&self.host(h)) {
                self.mkdir(&self.host(h))?;
                crate::failpoints::crash_point("nvmet::export::host_created");
            }
            self.symlink(&self.host(h), &self.allowed(&nqn, h))?;
            crate::failpoints::crash_point("nvmet::export::host_allowed");
        }
        if !self.exists(&link) {
            self.symlink(&sub, &link)?;
            crate::failpoints::crash_point("nvmet::export::port_linked");
        }
        // The revoked hosts' entries, and any an interrupted revocation
        // left (its host no longer linked here, so no longer "revoked").
        self.remove_unused_hosts()
    }

    fn check_backing(&self, path: &Path) -> Result<String> {
        (self.stat)(path).map_err(|e| {
            Error::new(
                if not_found(&e) {
                    ErrorKind::NotFound
                } else {
                    ErrorKind::InvalidArgument
                },
                format!("backing {} can't be exported: {e}", path.display()),
            )
        })?;
        let s = path
            .to_str()
            .filter(|s| !s.contains('\n'))
            .ok_or_else(|| Error::invalid(format!("backing path {path:?} is not plain text")))?;
        Ok(s.to_owned())
    }

    fn converge_namespace(&self, nqn: &str, path: &str, uuid: Option<Uuid>) -> Result<()> {
        let ns = self.ns(nqn);
        if !self.exists(&ns) {
            self.mkdir(&ns)?;
        }
        let path_differs = self.read(&ns.join("device_path"))? != path;
        let want_uuid = uuid.map(|u| u.hyphenated().to_string());
        let uuid_differs = match &want_uuid {
            Some(u) => self.read(&ns.join("device_uuid"))? != *u,
            None => false,
        };
        let enabled = self.read(&ns.join("enable"))? == "1";
        if path_differs || uuid_differs {
            if enabled {
                self.write(&ns.join("enable"), "0")?;
            }
            if path_differs {
                self.write(&ns.join("device_path"), path)?;
            }
            if let (true, Some(u)) = (uuid_differs, &want_uuid) {
                self.write(&ns.join("device_uuid"), u)?;
            }
            self.write(&ns.join("enable"), "1")
        } else if !enabled {
            self.write(&ns.join("enable"), "1")
        } else {
            Ok(())
        }
    }

    /// Removes every `hosts/<host>` no subsystem allows: the end of every
    /// export and unexport. Once a host's link is gone nothing says which
    /// subsystem allowed it, so what a crash left between a link's removal
    /// and its entry's (an unexport, a revocation) is only found this way.
    /// A host entry no subsystem links grants nothing, whoever made it.
    fn remove_unused_hosts(&self) -> Result<()> {
        for h in self.names(&self.root().join("hosts"), EntryKind::Dir)? {
            self.remove_host_if_unused(&h)?;
        }
        Ok(())
    }

    /// Removes `hosts/<host>` once no subsystem allows it any more (it
    /// grants nothing by itself, and would pile up).
    fn remove_host_if_unused(&self, host: &str) -> Result<()> {
        for s in self.names(&self.root().join("subsystems"), EntryKind::Dir)? {
            if self.exists(&self.allowed(&s, host)) {
                return Ok(());
            }
        }
        self.rmdir(&self.host(host))
    }

    pub(super) fn unexport(&self, iqn: &Iqn) -> Result<()> {
        let nqn = iqn.to_nqn()?;
        // Unlinked from the port first: every connection ends here.
        self.unlink(&self.port_link(&nqn))?;
        crate::failpoints::crash_point("nvmet::unexport::port_unlinked");
        let sub = self.subsys(&nqn);
        if !self.exists(&sub) {
            // Gone already: an unexport that a crash interrupted after the
            // subsystem's rmdir may have left the hosts it allowed.
            return self.remove_unused_hosts();
        }
        let hosts = self.names(&sub.join("allowed_hosts"), EntryKind::Link)?;
        for h in &hosts {
            self.unlink(&self.allowed(&nqn, h))?;
        }
        crate::failpoints::crash_point("nvmet::unexport::hosts_unlinked");
        for n in self.names(&sub.join("namespaces"), EntryKind::Dir)? {
            let ns = sub.join("namespaces").join(&n);
            if self.read(&ns.join("enable"))? == "1" {
                self.write(&ns.join("enable"), "0")?;
            }
            self.rmdir(&ns)?;
        }
        self.rmdir(&sub)?;
        crate::failpoints::crash_point("nvmet::unexport::subsystem_removed");
        // Not only `hosts`: a retry after a crash between the links' removal
        // and here finds none linked.
        self.remove_unused_hosts()
    }

    pub(super) fn refresh_size(&self, spec: &ExportSpec) -> Result<()> {
        let nqn = spec.target_iqn.to_nqn()?;
        if !self.exists(&self.subsys(&nqn)) {
            return Err(Error::not_found(format!(
                "target {} is not exported by nvmet",
                spec.target_iqn
            )));
        }
        self.export(spec)?;
        let reval = self.ns(&nqn).join("revalidate_size");
        if self.exists(&reval) {
            self.write(&reval, "1")?;
        }
        Ok(())
    }

    pub(super) fn list(&self) -> Result<Vec<LiveExport>> {
        let port_ok = self.exists(&self.port()) && self.port_differs()?.is_empty();
        let mut out = Vec::new();
        for nqn in self.names(&self.root().join("subsystems"), EntryKind::Dir)? {
            if !self.owns(&nqn) {
                continue;
            }
            let sub = self.subsys(&nqn);
            let ns = self.ns(&nqn);
            let mut broken = Vec::new();
            let mut backing = None;
            if self.exists(&ns) {
                let p = self.read(&ns.join("device_path"))?;
                if !p.is_empty() {
                    backing = Some(PathBuf::from(p));
                }
                if self.read(&ns.join("enable"))? != "1" {
                    broken.push("namespace 1 is not enabled");
                }
            } else {
                broken.push("namespace 1 is missing");
            }
            if self.read(&sub.join("attr_allow_any_host"))? != "0" {
                broken.push("any host may connect");
            }
            if !self.exists(&self.port_link(&nqn)) {
                broken.push("not linked to the port");
            } else if !port_ok {
                broken.push("the port's address differs");
            }
            let initiators = self
                .names(&sub.join("allowed_hosts"), EntryKind::Link)?
                .into_iter()
                .map(|h| Iqn::from_nqn(&h).map(String::from).unwrap_or(h))
                .collect();
            out.push(LiveExport {
                target_iqn: Iqn::from_nqn(&nqn).map(String::from).unwrap_or(nqn),
                backing_path: backing,
                initiators,
                chap_user: None,
                chap_target_user: None,
                health: if broken.is_empty() {
                    ExportHealth::Whole
                } else {
                    ExportHealth::Broken(broken.join(", "))
                },
            });
        }
        Ok(out)
    }
}
