//! The pool as a whole: opening it (monitors, staging), clearing what
//! interrupted operations left, what clients are told to reach, usage
//! (`ceph df`, `rbd du`) and the listing drift is computed from.

use std::sync::{Arc, Mutex};

use super::cli::{parse, Df, Du, MonDump};
use super::{parse_suffix, volume_image, RbdAccess, RbdBackend, RbdSettings};
use super::{
    BASE_SNAP, MON_REFRESH, REPORT_TIMEOUT, SNAP_PREFIX, TMP_PREFIX, USAGE_MAX_AGE, VOL_PREFIX,
};
use crate::backend::{ObjectId, PoolListing, PoolUsage};
use crate::error::{Error, Result};
use crate::runner::CommandRunner;
use uuid::Uuid;

impl RbdBackend {
    /// Opens the pool: checks that the user reaches it (one `rbd ls`),
    /// reads the monitors clients are sent to (`ceph mon dump`) and makes
    /// the staging directory.
    pub async fn open(runner: Arc<dyn CommandRunner>, settings: RbdSettings) -> Result<RbdBackend> {
        let mut b = RbdBackend {
            runner,
            settings,
            monitors: Mutex::new((Vec::new(), std::time::Instant::now())),
            fsid: String::new(),
            snap_parent: Mutex::default(),
            usage: Mutex::default(),
        };
        b.ls()
            .await
            .map_err(|e| e.context(format!("rbd pool {}", b.settings.pool)))?;
        let (monitors, fsid) = b.mon_dump().await?;
        b.fsid = fsid;
        let dir = &b.settings.staging_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
        tracing::info!(pool = %b.settings.pool, user = %b.settings.ceph_id,
            client_user = %b.settings.client_id, monitors = ?monitors, fsid = %b.fsid,
            max_clone_depth = b.settings.max_clone_depth, "rbd backend: pool ready");
        *b.monitors.lock().unwrap() = (monitors, std::time::Instant::now());
        Ok(b)
    }

    /// `ceph mon dump`: the monitors clients can be sent to, and the fsid.
    pub(super) async fn mon_dump(&self) -> Result<(Vec<String>, String)> {
        let cmd = self
            .cli("ceph")
            .args(["mon", "dump", "--format", "json"])
            .timeout(REPORT_TIMEOUT);
        let out = self
            .run(&cmd)
            .await
            .map_err(|e| e.context("ceph mon dump"))?;
        let dump: MonDump = parse("ceph mon dump", &out.stdout)?;
        let monitors = dump.monitors();
        if monitors.is_empty() {
            return Err(Error::unavailable(
                "ceph mon dump lists no monitor address clients could be sent to",
            ));
        }
        Ok((monitors, dump.fsid))
    }

    /// Reads the monitors again when [`MON_REFRESH`] has passed since the
    /// last read (see the field). A failure is logged and keeps the list.
    pub(super) async fn refresh_monitors(&self, now: std::time::Instant) {
        if now.duration_since(self.monitors.lock().unwrap().1) < MON_REFRESH {
            return;
        }
        match self.mon_dump().await {
            Ok((monitors, fsid)) if fsid == self.fsid => {
                let mut m = self.monitors.lock().unwrap();
                if m.0 != monitors {
                    tracing::info!(before = ?m.0, now = ?monitors, "rbd backend: the cluster's monitors changed");
                }
                *m = (monitors, now);
            }
            Ok((_, fsid)) => {
                tracing::warn!(fsid = %fsid, expected = %self.fsid,
                    "ceph mon dump names another cluster; monitors kept");
                self.monitors.lock().unwrap().1 = now;
            }
            Err(e) => {
                tracing::warn!(error = %e, "monitors not re-read; the last list kept");
                self.monitors.lock().unwrap().1 = now;
            }
        }
    }

    /// Removes what interrupted operations left: temporary images and
    /// staged uploads. Returns their names.
    pub async fn clear_temporaries(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for row in self.ls().await? {
            if row.snapshot.is_none() && parse_suffix(&row.image, TMP_PREFIX).is_some() {
                self.remove_image(&row.image).await?;
                removed.push(self.spec(&row.image));
            }
        }
        let dir = &self.settings.staging_dir;
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir.display(), e))? {
            let e = e.map_err(|e| Error::io(dir.display(), e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".upload") {
                std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path().display(), err))?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// How a client opens volume `u`'s image (see the module doc).
    pub fn native_access(&self, u: Uuid) -> RbdAccess {
        RbdAccess {
            monitors: self.monitors.lock().unwrap().0.clone(),
            pool: self.settings.pool.to_string(),
            image: volume_image(u),
            user: self.settings.client_id.to_string(),
            secret_ref: format!("keyring:client.{}", self.settings.client_id),
            cluster_fsid: self.fsid.clone(),
        }
    }

    pub(super) async fn du(&self, spec: Option<&str>) -> Result<Du> {
        let cmd = match spec {
            Some(s) => self.rbd_report(["du", s]),
            None => self.rbd_report(["du", "--pool", self.settings.pool.as_str()]),
        };
        let out = self.run(&cmd).await?;
        parse("rbd du", &out.stdout)
    }

    /// The pool's usage as read within [`USAGE_MAX_AGE`], else afresh.
    pub(super) async fn usage_recent(&self) -> Result<PoolUsage> {
        if let Some((at, u)) = self.usage.lock().unwrap().clone() {
            if at.elapsed() < USAGE_MAX_AGE {
                return Ok(u);
            }
        }
        self.usage_now().await
    }

    /// `ceph df`: the pool's capacity and what it stores; remembered for
    /// [`Self::usage_recent`].
    pub(super) async fn usage_now(&self) -> Result<PoolUsage> {
        self.refresh_monitors(std::time::Instant::now()).await;
        let cmd = self
            .cli("ceph")
            .args(["df", "--format", "json"])
            .timeout(REPORT_TIMEOUT);
        let out = self.run(&cmd).await?;
        let df: Df = parse("ceph df", &out.stdout)?;
        let p = df
            .pools
            .iter()
            .find(|p| p.name == self.settings.pool.as_str())
            .ok_or_else(|| {
                Error::unavailable(format!("ceph df does not list pool {}", self.settings.pool))
            })?;
        // The pool's data lives in the data pool when there is one.
        let data = match &self.settings.data_pool {
            Some(d) => df.pools.iter().find(|p| p.name == d.as_str()).unwrap_or(p),
            None => p,
        };
        let usage = PoolUsage {
            capacity: data.stats.stored + data.stats.max_avail,
            used: data.stats.stored,
            thin: None,
        };
        *self.usage.lock().unwrap() = Some((std::time::Instant::now(), usage.clone()));
        Ok(usage)
    }

    pub(super) async fn list_now(&self) -> Result<PoolListing> {
        self.refresh_monitors(std::time::Instant::now()).await;
        let rows = self.ls().await?;
        self.remember_snapshots(&rows);
        let mut out = PoolListing::default();
        for r in &rows {
            let id = match (&r.snapshot, parse_suffix(&r.image, VOL_PREFIX)) {
                (None, Some(v)) => Some(ObjectId::Volume(v)),
                // An image base's own snapshot: part of its volume.
                (Some(s), Some(_)) if s == BASE_SNAP => continue,
                (Some(s), Some(_)) => parse_suffix(s, SNAP_PREFIX).map(ObjectId::Snapshot),
                _ => None,
            };
            match id {
                Some(id) => out.objects.push(id),
                // Being built, or left by a crash (cleared at start).
                None if r.snapshot.is_none() && parse_suffix(&r.image, TMP_PREFIX).is_some() => {}
                None => out.foreign.push(match &r.snapshot {
                    Some(s) => format!("{}@{s}", self.spec(&r.image)),
                    None => self.spec(&r.image),
                }),
            }
        }
        if !rows.is_empty() {
            for d in self.du(None).await?.images {
                let id = match (&d.snapshot, parse_suffix(&d.name, VOL_PREFIX)) {
                    (None, Some(v)) => ObjectId::Volume(v),
                    // An image base's data sits in its pd-base snapshot.
                    (Some(s), Some(v)) if s == BASE_SNAP => ObjectId::Volume(v),
                    (Some(s), Some(_)) => match parse_suffix(s, SNAP_PREFIX) {
                        Some(s) => ObjectId::Snapshot(s),
                        None => continue,
                    },
                    _ => continue,
                };
                *out.allocated.entry(id).or_default() += d.used_size;
            }
        }
        out.usage = self.usage_recent().await?;
        out.objects.sort();
        Ok(out)
    }
}
