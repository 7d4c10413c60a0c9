//! Image disks and the two image caches, seen from the guest service.
//!
//! - `clone` disks (the default): the image is imported once into a pdisk
//!   base volume labelled with its checksum (`LABEL_SHA256`); each guest disk
//!   is a pdisk clone of it, owned by the guest and deleted with it. Imports
//!   of one checksum are serialized by a per-checksum lock, so concurrent
//!   launches import once and the others wait, then find the base.
//! - `local` disks: the image is fetched once into this host's verified
//!   cache; each guest disk is a qcow2 overlay on it in the guest's
//!   directory. The guest pins the image until it is destroyed, so eviction
//!   never takes an image a guest's overlay needs.
//!
//! Every pull is journaled: IMAGE_PULL_STARTED, IMAGE_PULL_PROGRESS (every
//! tenth of the image, or 64 MiB when the size is unknown), IMAGE_CACHED or
//! IMAGE_PULL_FAILED, IMAGE_IMPORTED for a new base volume, IMAGE_EVICTED.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use stratus_proto::pdisk::v1 as pdpb;
use uuid::Uuid;

use super::Agent;
use crate::images::{CachedImageInfo, DeclaredFormat, ImageRef, PulledImage};
use crate::spec::{Cause, DiskSource, EventType, ImageSpec, ServerName};
use crate::store::{now_rfc3339, NewEvent, OwnedVolume, VmRecord};
use crate::volumes::ServerState;
use stratus_core::error::{Error, Result};
use stratus_core::image::ImageFormat;

use stratus_core::types::{LABEL_IMAGE_SHA256 as LABEL_SHA256, LABEL_VM};

/// An image in one of the caches, as ListImages reports it.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub sha256: String,
    pub url: String,
    pub size: u64,
    /// None when not known (an image evicted from the local cache).
    pub format: Option<ImageFormat>,
    /// "local" or "pdisk"
    pub location: String,
    /// The pdisk server of a base volume (None in the local cache).
    pub server: Option<ServerName>,
    pub volume: String,
    pub users: u32,
    pub last_used: String,
    /// The endorsement verified when it was fetched (local cache only).
    pub endorsed: Option<crate::images::Endorsed>,
}

/// What a guest disk resolves to before it is attached.
pub(super) enum ImageDisk {
    /// A pdisk volume by name or UUID on a server (the spec's, or the
    /// guest's clone).
    Pdisk(ServerName, String),
    /// A raw file on this host (a `file:` disk), opened beneath a
    /// `--host-file-root`.
    RawFile(stratus_core::rooted::RootedFile),
    /// A local overlay on a cached image, with the base it must have.
    Overlay {
        path: PathBuf,
        base: PathBuf,
        base_format: ImageFormat,
    },
}

fn local_info(i: &CachedImageInfo) -> ImageInfo {
    ImageInfo {
        sha256: i.image.sha256.to_string(),
        url: i.url.clone(),
        size: i.image.size,
        format: Some(i.image.format),
        location: "local".into(),
        server: None,
        volume: String::new(),
        users: i.pins as u32,
        last_used: humantime::format_rfc3339_seconds(i.last_used).to_string(),
        endorsed: i.endorsed.clone(),
    }
}

impl Agent {
    pub(super) fn journal_host(&self, events: &[NewEvent]) {
        match self.store.record_host(events) {
            Ok(evs) => {
                for e in evs {
                    tracing::info!(seq = e.seq, event = ?e.kind, image = %e.image_sha256,
                        detail = %e.detail, "event");
                }
            }
            Err(e) => tracing::error!(error = %e, "journaling image events"),
        }
    }

    /// Fetches (or finds) `image` in the local cache, journaling the pull.
    pub(super) async fn pull_local(&self, image: &ImageRef, cause: Cause) -> Result<PulledImage> {
        let sha = image.sha256().to_string();
        let started = std::sync::atomic::AtomicBool::new(false);
        let mut next_report = 0u64;
        let progress = |done: u64, total: u64| {
            if !started.swap(true, std::sync::atomic::Ordering::SeqCst) {
                self.journal_host(&[NewEvent::image(
                    EventType::ImagePullStarted,
                    cause,
                    &sha,
                    image.url().to_string(),
                    0,
                    total,
                )]);
            }
            if done >= next_report {
                let step = if total > 0 {
                    (total / 10).max(1)
                } else {
                    64 << 20
                };
                next_report = done + step;
                self.journal_host(&[NewEvent::image(
                    EventType::ImagePullProgress,
                    cause,
                    &sha,
                    "",
                    done,
                    total,
                )]);
            }
        };
        match self.images.get_or_fetch(image, progress).await {
            Ok(pulled) => {
                if pulled.downloaded {
                    let mut evs = vec![NewEvent::image(
                        EventType::ImageCached,
                        cause,
                        &sha,
                        pulled.image.path.display().to_string(),
                        pulled.image.size,
                        pulled.image.size,
                    )];
                    for e in &pulled.evicted {
                        evs.push(NewEvent::image(
                            EventType::ImageEvicted,
                            Cause::Host,
                            e.sha256.as_str(),
                            format!("quota: {}", e.url),
                            e.size,
                            e.size,
                        ));
                    }
                    self.journal_host(&evs);
                }
                Ok(pulled)
            }
            Err(e) => {
                self.journal_host(&[NewEvent::image(
                    EventType::ImagePullFailed,
                    cause,
                    &sha,
                    e.to_string(),
                    0,
                    0,
                )]);
                Err(e)
            }
        }
    }

    /// The base volume of `image` on pdisk server `server`, importing it
    /// there once if needed (each server has its own base, from the one
    /// local cache). Returns the base's UUID.
    pub(super) async fn pdisk_base(
        &self,
        image: &ImageRef,
        cause: Cause,
        server: &ServerName,
    ) -> Result<String> {
        let pdisk = self.pdisk(server)?;
        let sha = image.sha256().to_string();
        // Per server: an import into a server that is down holds up no
        // other server's.
        let flight = self
            .base_flights
            .lock()
            .unwrap()
            .entry((server.clone(), sha.clone()))
            .or_default()
            .clone();
        let _only_one = flight.lock().await;
        if let Some(v) = self.find_base(server, &sha).await? {
            return Ok(v.uuid);
        }
        if let crate::images::ImageSource::Pdisk(volume) = image.source() {
            return Err(Error::not_found(format!(
                "image {}: no pdisk base volume {volume} with sha256 {sha} on pdisk server {server}",
                image.url()
            )));
        }
        let pulled = self.pull_local(image, cause).await?;
        let name = format!("image-{}", &sha[..16]);
        let format = match pulled.image.format {
            ImageFormat::Raw => pdpb::ImageFormat::Raw,
            ImageFormat::Qcow2 => pdpb::ImageFormat::Qcow2,
        };
        let header = pdpb::UploadHeader {
            name: name.clone(),
            size_bytes: 0,
            labels: HashMap::from([(LABEL_SHA256.to_string(), sha.clone())]),
            format: format as i32,
            content_length: pulled.image.size,
            request_id: String::new(),
            // Image bases belong to no project.
            project: String::new(),
        };
        let v = match pdisk.upload_volume(header, pulled.image.path.clone()).await {
            Ok(v) => v,
            // Another host imported it meanwhile.
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                match self.find_base(server, &sha).await? {
                    Some(v) => return Ok(v.uuid),
                    None => return Err(pdisk.error(s, &format!("importing image {sha}"))),
                }
            }
            Err(s) => {
                return Err(pdisk.error(
                    s,
                    &format!("importing image {sha} into pdisk server {server}"),
                ))
            }
        };
        drop(pulled);
        self.crash_point("image.imported");
        self.journal_host(&[NewEvent::image(
            EventType::ImageImported,
            cause,
            &sha,
            format!("pdisk base volume {}", base_on(server, &v.name)),
            v.size_bytes,
            v.size_bytes,
        )]);
        Ok(v.uuid)
    }

    async fn find_base(&self, server: &ServerName, sha: &str) -> Result<Option<pdpb::Volume>> {
        let pdisk = self.pdisk(server)?;
        let vols = pdisk
            .list_volumes(pdpb::ListVolumesRequest {
                label_selector: HashMap::from([(LABEL_SHA256.to_string(), sha.to_string())]),
                project: String::new(),
                quarantined: false,
            })
            .await
            .map_err(|s| pdisk.error(s, "looking up image bases in pdisk"))?;
        Ok(vols
            .into_iter()
            .find(|v| v.state == pdpb::VolumeState::Ready as i32 && v.image_sha256 == sha))
    }

    /// Turns an image disk of `vm` into what QEMU attaches: a pdisk clone
    /// (made once, recorded as owned before use) or a local overlay.
    pub(super) async fn image_disk(
        &self,
        vm: &mut VmRecord,
        device: &str,
        image: &ImageSpec,
        size: u64,
        local: bool,
        server: &ServerName,
    ) -> Result<ImageDisk> {
        let r = image.to_ref()?;
        if local {
            let overlay = self.vm_dir(vm.uuid).join(format!("{device}.qcow2"));
            let (base, base_format) = if overlay.exists() {
                // Made at an earlier start: its base is the cached image the
                // spec names, pinned since (see `repin`), opened as the
                // spec declares it (Auto: as cached, by its verified magic;
                // the cached bytes are fixed by their checksum).
                let cached = self
                    .images
                    .list()
                    .into_iter()
                    .find(|i| &i.image.sha256 == r.sha256())
                    .ok_or_else(|| {
                        Error::precondition(format!(
                            "local disk {device}: its base image {} is no longer cached",
                            r.sha256()
                        ))
                    })?;
                let format = match r.format() {
                    DeclaredFormat::Raw => ImageFormat::Raw,
                    DeclaredFormat::Qcow2 => ImageFormat::Qcow2,
                    DeclaredFormat::Auto => cached.image.format,
                };
                (cached.image.path, format)
            } else {
                let pulled = self.pull_local(&r, Cause::Api).await?;
                crate::images::overlay(
                    self.runner.as_ref(),
                    &pulled.image.path,
                    pulled.image.format,
                    &overlay,
                    (size > 0).then_some(size),
                )
                .await?;
                let base = (pulled.image.path.clone(), pulled.image.format);
                self.pins
                    .lock()
                    .unwrap()
                    .entry(vm.uuid)
                    .or_default()
                    .push(pulled.pin);
                base
            };
            return Ok(ImageDisk::Overlay {
                path: overlay,
                base,
                base_format,
            });
        }
        // A clone of an earlier start, or one only intended when agentd
        // stopped: pdisk may have made it meanwhile.
        let owned = vm
            .owned_volumes
            .iter()
            .find(|o| o.device == device)
            .cloned();
        // The clone stays on the server it was made on.
        let server = owned.as_ref().map_or(server, |o| &o.server);
        if let Some(o) = &owned {
            if !o.volume.is_empty() {
                return Ok(ImageDisk::Pdisk(o.server.clone(), o.volume.clone()));
            }
        }
        let name = match &owned {
            Some(o) if !o.name.is_empty() => o.name.clone(),
            _ => clone_name(vm.uuid, device),
        };
        if let Some(v) = self.our_clone(vm, server, &name).await? {
            self.record_clone(vm, device, &name, &v, server)?;
            return Ok(ImageDisk::Pdisk(server.clone(), v));
        }
        let pdisk = self.pdisk(server)?;
        let base = self.pdisk_base(&r, Cause::Api, server).await?;
        // Intent first: the clone's name, owned, before pdisk makes it.
        if owned.is_none() {
            vm.owned_volumes.push(OwnedVolume {
                device: device.to_string(),
                volume: String::new(),
                name: name.clone(),
                server: server.clone(),
            });
            self.commit(vm, &[])?;
        }
        self.crash_point("start.clone_intent");
        let made = pdisk
            .clone_volume(pdpb::CloneVolumeRequest {
                source: base,
                source_is_snapshot: false,
                name: name.clone(),
                labels: HashMap::from([
                    (LABEL_VM.to_string(), vm.uuid.to_string()),
                    ("stratus.io/from-image".to_string(), r.sha256().to_string()),
                ]),
                size_bytes: size,
                request_id: String::new(),
                // The guest's clone belongs to the guest's project.
                project: vm.project.clone(),
            })
            .await;
        let uuid = match made {
            Ok(v) => v.uuid,
            // Made by an attempt whose answer was lost: ours if it says so.
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                match self.our_clone(vm, server, &name).await? {
                    Some(v) => v,
                    None => {
                        return Err(
                            pdisk.error(s, &format!("cloning image {} for {device}", r.sha256()))
                        )
                    }
                }
            }
            Err(s) => {
                return Err(pdisk.error(s, &format!("cloning image {} for {device}", r.sha256())))
            }
        };
        self.crash_point("start.cloned");
        self.record_clone(vm, device, &name, &uuid, server)?;
        Ok(ImageDisk::Pdisk(server.clone(), uuid))
    }

    /// The UUID of the ready pdisk volume `name` when it is `vm`'s own
    /// (labelled with its UUID); None when pdisk has none by that name.
    /// A clone pdisk is still making is Unavailable: the start fails, and
    /// the next one finds it made.
    async fn our_clone(
        &self,
        vm: &VmRecord,
        server: &ServerName,
        name: &str,
    ) -> Result<Option<String>> {
        let pdisk = self.pdisk(server)?;
        let v = match pdisk.get_volume(name.to_string(), vm.project.clone()).await {
            Ok(v) => v,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(pdisk.error(s, &format!("looking up clone {name}"))),
        };
        if v.labels.get(LABEL_VM) != Some(&vm.uuid.to_string()) {
            return Err(Error::exists(format!(
                "pdisk volume {name} exists and is not vm {}'s",
                vm.spec.name
            )));
        }
        if v.state != pdpb::VolumeState::Ready as i32 {
            return Err(Error::unavailable(format!(
                "pdisk is still making clone {name} of vm {}; start it again",
                vm.spec.name
            )));
        }
        Ok(Some(v.uuid))
    }

    /// Records clone `uuid` (named `name`, on `server`) as `vm`'s disk `device`.
    fn record_clone(
        &self,
        vm: &mut VmRecord,
        device: &str,
        name: &str,
        uuid: &str,
        server: &ServerName,
    ) -> Result<()> {
        vm.owned_volumes.retain(|o| o.device != device);
        vm.owned_volumes.push(OwnedVolume {
            device: device.to_string(),
            volume: uuid.to_string(),
            name: name.to_string(),
            server: server.clone(),
        });
        self.commit(vm, &[])?;
        Ok(())
    }

    /// Deletes the pdisk volumes a guest owns (its image clones); those
    /// pdisk could not delete stay in `vm.owned_volumes`, and so do those
    /// on a server that still has an export of the guest's to undo (pdisk
    /// refuses to delete an exported volume).
    pub(super) async fn delete_owned_volumes(&self, vm: &mut VmRecord) {
        let mut kept = Vec::new();
        for o in std::mem::take(&mut vm.owned_volumes) {
            let pdisk = match self.pdisk(&o.server) {
                Ok(p) if !vm.pending_unexports.iter().any(|e| e.server == o.server) => p,
                _ => {
                    kept.push(o);
                    continue;
                }
            };
            // Only intended: pdisk may or may not have made it.
            let volume = if o.volume.is_empty() {
                match self.our_clone(vm, &o.server, &o.name).await {
                    Ok(None) => continue,
                    Ok(Some(v)) => v,
                    // Not ours: someone else's volume took the name.
                    Err(e) if e.kind() == stratus_core::error::ErrorKind::AlreadyExists => continue,
                    Err(e) => {
                        tracing::warn!(vm = %vm.spec.name, clone = %o.name, error = %e,
                            "could not look up the guest's image clone; retried later");
                        kept.push(o);
                        continue;
                    }
                }
            } else {
                o.volume.clone()
            };
            match pdisk.delete_volume(volume).await {
                Ok(()) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => {
                    tracing::warn!(vm = %vm.spec.name, volume = %o.volume, error = %s.message(),
                        "could not delete the guest's image clone; retried later");
                    kept.push(o);
                }
            }
        }
        vm.owned_volumes = kept;
    }

    /// Pins the cached images of `vm`'s local image disks again (at start,
    /// after a restart lost the in-memory pins).
    pub(super) fn repin(&self, vm: &VmRecord) {
        for (i, d) in vm.spec.disks.iter().enumerate() {
            if let DiskSource::Image {
                image, local: true, ..
            } = &d.source
            {
                let overlay = self
                    .vm_dir(vm.uuid)
                    .join(format!("vd{}.qcow2", (b'a' + i as u8) as char));
                if !overlay.exists() {
                    continue;
                }
                if let Ok(r) = image.to_ref() {
                    match self.images.pin(r.sha256()) {
                        Ok(p) => self
                            .pins
                            .lock()
                            .unwrap()
                            .entry(vm.uuid)
                            .or_default()
                            .push(p),
                        Err(e) => tracing::warn!(vm = %vm.spec.name, error = %e,
                            "a local disk's base image is no longer cached"),
                    }
                }
            }
        }
    }

    pub(super) fn unpin(&self, vm: Uuid) {
        self.pins.lock().unwrap().remove(&vm);
    }

    // ---------- the image API ----------

    /// Fetches `image` into the local cache and, with `to_pdisk`, imports
    /// it into pdisk server `server`'s base volume.
    pub async fn pull_image(
        &self,
        image: ImageSpec,
        to_pdisk: bool,
        server: &ServerName,
    ) -> Result<ImageInfo> {
        if to_pdisk {
            self.pdisk(server)?;
        }
        let r = image.to_ref()?;
        let pulled = self.pull_local(&r, Cause::Api).await?;
        let mut info = self
            .images
            .list()
            .iter()
            .find(|i| i.image.sha256 == pulled.image.sha256)
            .map(local_info)
            .ok_or_else(|| Error::internal("pulled image vanished from the cache"))?;
        // The pull's own pin is not a user of the image.
        info.users = info.users.saturating_sub(1);
        drop(pulled);
        if to_pdisk {
            let base = self.pdisk_base(&r, Cause::Api, server).await?;
            info.location = "pdisk".into();
            info.server = Some(server.clone());
            info.volume = base;
        }
        Ok(info)
    }

    /// The images in the local cache and every pdisk server's bases, with
    /// the servers that could not be listed (partial rather than failed:
    /// a storage host that is down hides only its own bases).
    pub async fn list_images(&self) -> Result<(Vec<ImageInfo>, Vec<ServerState>)> {
        let mut out: Vec<ImageInfo> = self.images.list().iter().map(local_info).collect();
        let lists = futures::future::join_all(self.pdisk.iter().map(|pdisk| async move {
            (
                pdisk,
                pdisk
                    .list_volumes(pdpb::ListVolumesRequest::default())
                    .await,
            )
        }))
        .await;
        let mut unreachable = Vec::new();
        for (pdisk, listed) in lists {
            let vols = match listed {
                Ok(v) => v,
                Err(s) => {
                    let e = pdisk.error(s, "listing pdisk volumes");
                    tracing::warn!(server = %pdisk.name(), error = %e, "image bases not listed");
                    unreachable.push(ServerState {
                        name: pdisk.name().clone(),
                        url: String::new(),
                        reachable: false,
                        last_error: e.to_string(),
                        last_error_at: now_rfc3339(),
                    });
                    continue;
                }
            };
            for b in vols.iter().filter(|v| !v.image_sha256.is_empty()) {
                let sha = &b.image_sha256;
                let users = vols.iter().filter(|v| v.clone_of_volume == b.uuid).count() as u32;
                out.push(ImageInfo {
                    sha256: sha.clone(),
                    url: String::new(),
                    size: b.size_bytes,
                    format: Some(ImageFormat::Raw),
                    location: "pdisk".into(),
                    server: Some(pdisk.name().clone()),
                    volume: b.name.clone(),
                    users,
                    last_used: b.created_at.clone(),
                    endorsed: None,
                });
            }
        }
        Ok((out, unreachable))
    }

    /// Evicts `sha256` from the local cache and/or pdisk server `server`;
    /// refuses an image in use (pinned by a guest, or a base with clones).
    pub async fn evict_image(
        &self,
        sha256: &str,
        local: bool,
        pdisk: bool,
        server: &ServerName,
    ) -> Result<Vec<ImageInfo>> {
        let sha = crate::images::Sha256::parse(sha256)?;
        let mut evicted = Vec::new();
        if pdisk && !self.pdisk.is_empty() {
            let pdisk = self.pdisk(server)?;
            if let Some(base) = self.find_base(server, sha.as_str()).await? {
                let vols = pdisk
                    .list_volumes(pdpb::ListVolumesRequest::default())
                    .await
                    .map_err(|s| pdisk.error(s, "listing pdisk volumes"))?;
                let clones: Vec<String> = vols
                    .iter()
                    .filter(|v| v.clone_of_volume == base.uuid)
                    .map(|v| v.name.clone())
                    .collect();
                if !clones.is_empty() {
                    return Err(Error::precondition(format!(
                        "image {sha} is in use: its pdisk base {} has clones ({})",
                        base_on(server, &base.name),
                        clones.join(", ")
                    )));
                }
                pdisk
                    .delete_volume(base.uuid.clone())
                    .await
                    .map_err(|s| pdisk.error(s, &format!("deleting base volume {}", base.name)))?;
                self.journal_host(&[NewEvent::image(
                    EventType::ImageEvicted,
                    Cause::Api,
                    sha.as_str(),
                    format!("pdisk base volume {}", base_on(server, &base.name)),
                    base.size_bytes,
                    base.size_bytes,
                )]);
                evicted.push(ImageInfo {
                    sha256: sha.to_string(),
                    url: String::new(),
                    size: base.size_bytes,
                    format: Some(ImageFormat::Raw),
                    location: "pdisk".into(),
                    server: Some(server.clone()),
                    volume: base.name,
                    users: 0,
                    last_used: String::new(),
                    endorsed: None,
                });
            }
        }
        if local && self.images.list().iter().any(|i| i.image.sha256 == sha) {
            let e = self.images.evict(&sha)?;
            self.journal_host(&[NewEvent::image(
                EventType::ImageEvicted,
                Cause::Api,
                sha.as_str(),
                format!("local cache: {}", e.url),
                e.size,
                e.size,
            )]);
            evicted.push(ImageInfo {
                sha256: sha.to_string(),
                url: e.url,
                size: e.size,
                format: None,
                location: "local".into(),
                server: None,
                volume: String::new(),
                users: 0,
                last_used: String::new(),
                endorsed: None,
            });
        }
        if evicted.is_empty() {
            return Err(Error::not_found(format!("image {sha} is not cached")));
        }
        Ok(evicted)
    }
}

/// Base volume `name` as messages and events name it: with its server
/// unless that is the default one.
fn base_on(server: &ServerName, name: &str) -> String {
    if server.is_default() {
        name.to_owned()
    } else {
        format!("{name} on pdisk server {server}")
    }
}

/// The pdisk name of guest `vm`'s clone for disk `device`.
fn clone_name(vm: Uuid, device: &str) -> String {
    format!("vm-{}-{device}", &vm.simple().to_string()[..12])
}

/// Where cached images live under the agent's state dir.
pub fn cache_dir(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("images")
}

/// Kept for the guest service: import locks per server and checksum.
pub type BaseFlights = std::sync::Mutex<HashMap<(ServerName, String), Arc<tokio::sync::Mutex<()>>>>;
