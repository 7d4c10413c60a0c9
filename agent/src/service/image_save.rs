//! SaveImage: a stopped guest's pdisk disk becomes an image base volume.
//! The snapshot is taken before the call returns; the checksum and the
//! labelled base clone follow in the background, journaled as
//! IMAGE_SAVE_STARTED, IMAGE_SAVE_PROGRESS, IMAGE_SAVED or IMAGE_SAVE_FAILED.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use stratus_proto::pdisk::v1 as pdpb;
use uuid::Uuid;

use super::Agent;
use crate::spec::{Cause, DiskSource, EventType, ServerName};
use crate::store::NewEvent;
use stratus_core::error::{Error, Result};
use stratus_core::types::LABEL_IMAGE_SHA256 as LABEL_SHA256;

impl Agent {
    /// Saves disk `device` of stopped guest `vm_ref` as image base volume
    /// `name`, on the disk's own pdisk server (returned with the name). The
    /// snapshot is taken before returning (the image is the disk as it is
    /// now); the checksum and the detached base follow in the background,
    /// announced by IMAGE_SAVED (or IMAGE_SAVE_FAILED).
    pub async fn save_image(
        self: &Arc<Self>,
        vm_ref: &str,
        device: &str,
        name: &str,
    ) -> Result<(String, ServerName)> {
        let name: stratus_core::types::VolumeName = name.parse()?;
        let vm = self.store.find_vm(vm_ref)?;
        let _g = self.lock(vm.uuid).await;
        let vm = self.store.find_vm(&vm.uuid.to_string())?;
        if vm.state.is_active() {
            return Err(Error::precondition(format!(
                "vm {} is {:?}: stop it before saving its disk",
                vm.spec.name, vm.state
            )));
        }
        let idx = device
            .strip_prefix("vd")
            .and_then(|l| l.bytes().next())
            .filter(|_| device.len() == 3)
            .map(|b| b.wrapping_sub(b'a') as usize)
            .filter(|&i| i < vm.spec.disks.len())
            .ok_or_else(|| Error::invalid(format!("vm {} has no disk {device:?}", vm.spec.name)))?;
        let (server, volume) = match &vm.spec.disks[idx].source {
            DiskSource::Pdisk(v) => (v.server.clone(), v.volume.to_string()),
            DiskSource::Image { local: false, .. } => vm
                .owned_volumes
                .iter()
                .find(|o| o.device == device && !o.volume.is_empty())
                .map(|o| (o.server.clone(), o.volume.clone()))
                .ok_or_else(|| {
                    Error::precondition(format!(
                        "vm {} disk {device} was never started: nothing to save",
                        vm.spec.name
                    ))
                })?,
            _ => {
                return Err(Error::precondition(format!(
                    "vm {} disk {device} is not on pdisk: only pdisk disks can be saved",
                    vm.spec.name
                )))
            }
        };
        let pdisk = self.pdisk(&server)?;
        if pdisk
            .get_volume(name.to_string(), String::new())
            .await
            .is_ok()
        {
            return Err(Error::exists(format!(
                "volume {name} already exists in pdisk"
            )));
        }
        let snap_name = format!("save-{}", &Uuid::new_v4().simple().to_string()[..12]);
        let snap = pdisk
            .create_snapshot(pdpb::CreateSnapshotRequest {
                volume,
                name: snap_name,
                request_id: String::new(),
                project: vm.project.clone(),
            })
            .await
            .map_err(|s| pdisk.error(s, &format!("snapshotting {device} of {}", vm.spec.name)))?;
        let on = if server.is_default() {
            String::new()
        } else {
            format!(" on pdisk server {server}")
        };
        self.journal_host(&[NewEvent::image(
            EventType::ImageSaveStarted,
            Cause::Api,
            "",
            format!("{} {device} -> pdisk:///{name}{on}", vm.spec.name),
            0,
            snap.size_bytes,
        )]);
        let agent = self.clone();
        let target = name.to_string();
        let on_server = server.clone();
        tokio::spawn(async move {
            let server = on_server;
            let result = agent.finish_save(&server, &snap, &target).await;
            let Ok(pdisk) = agent.pdisk(&server) else {
                return;
            };
            let _ = pdisk.delete_snapshot(snap.uuid.clone()).await;
            match result {
                Ok(sha) => agent.journal_host(&[NewEvent::image(
                    EventType::ImageSaved,
                    Cause::Api,
                    &sha,
                    format!("pdisk:///{target}{on}"),
                    snap.size_bytes,
                    snap.size_bytes,
                )]),
                Err(e) => agent.journal_host(&[NewEvent::image(
                    EventType::ImageSaveFailed,
                    Cause::Api,
                    "",
                    format!("pdisk:///{target}{on}: {e}"),
                    0,
                    0,
                )]),
            }
        });
        Ok((name.to_string(), server))
    }

    /// Checksums the snapshot (journaling progress) and clones it into the
    /// labelled base volume. Returns the sha256.
    async fn finish_save(
        &self,
        server: &ServerName,
        snap: &pdpb::Snapshot,
        name: &str,
    ) -> Result<String> {
        let pdisk = self.pdisk(server)?;
        let request_id = format!("save-{}", snap.uuid);
        let total = snap.size_bytes;
        let progress = async {
            let mut s = pdisk.watch_progress(request_id.clone()).await;
            let mut next = 0u64;
            while let Some(p) = s.next().await {
                if p.done_bytes >= next && !p.finished {
                    next = p.done_bytes + (total / 10).max(1);
                    self.journal_host(&[NewEvent::image(
                        EventType::ImageSaveProgress,
                        Cause::Api,
                        "",
                        format!("checksum of pdisk:///{name}"),
                        p.done_bytes,
                        p.total_bytes,
                    )]);
                }
                if p.finished {
                    break;
                }
            }
        };
        let sum = async {
            pdisk
                .checksum_volume(pdpb::ChecksumVolumeRequest {
                    volume: snap.uuid.clone(),
                    is_snapshot: true,
                    request_id: request_id.clone(),
                    project: String::new(),
                })
                .await
                .map_err(|s| pdisk.error(s, "checksumming the saved disk"))
        };
        let (sum, ()) = tokio::join!(sum, progress);
        let sha = sum?;
        pdisk
            .clone_volume(pdpb::CloneVolumeRequest {
                source: snap.uuid.clone(),
                source_is_snapshot: true,
                name: name.to_string(),
                labels: HashMap::from([(LABEL_SHA256.to_string(), sha.clone())]),
                size_bytes: 0,
                request_id: String::new(),
                // An image base belongs to no project: every project's
                // guests on every host may launch from it.
                project: String::new(),
            })
            .await
            .map_err(|s| pdisk.error(s, &format!("making base volume {name}")))?;
        Ok(sha)
    }
}
