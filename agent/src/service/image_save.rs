//! SaveImage: a stopped guest's pdisk disk becomes an image base volume.
//! The snapshot is taken before the call returns; the checksum and the
//! labelled base clone follow in the background, journaled as
//! IMAGE_SAVE_STARTED, IMAGE_SAVE_PROGRESS, IMAGE_SAVED or IMAGE_SAVE_FAILED.
//!
//! Crash safety: the save is recorded (`store::PendingSave`) before its
//! snapshot is asked for, with the snapshot once pdisk answers, and removed
//! with its final event. After a restart a save whose snapshot was never
//! answered is rolled back (the snapshot asked for again by its request id,
//! so one a lost answer made is found, and removed) and one whose snapshot
//! was is finished (its clone's request id joins a clone left running);
//! either way exactly one IMAGE_SAVED or IMAGE_SAVE_FAILED says so, with
//! cause reconciliation. No `save-*` snapshot outlives its save.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use stratus_proto::pdisk::v1 as pdpb;
use uuid::Uuid;

use super::Agent;
use crate::spec::{Cause, DiskSource, EventType, ServerName};
use crate::store::{NewEvent, PendingSave};
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
        let id = format!("save-{}", &Uuid::new_v4().simple().to_string()[..12]);
        let mut save = PendingSave {
            id: id.clone(),
            vm: vm.uuid,
            vm_name: vm.spec.name.to_string(),
            device: device.to_string(),
            server: server.clone(),
            volume,
            project: vm.project.clone(),
            target: name.to_string(),
            snapshot: None,
            size_bytes: 0,
        };
        // Intent first: a crash from here on is found by reconciliation.
        self.store.put_save(&save, &[])?;
        self.crash_point("save.intent");
        let snap = match pdisk.create_snapshot(snapshot_request(&save)).await {
            Ok(s) => s,
            Err(s) => {
                // A lost answer may have made the snapshot: reconciliation
                // asks again (the same request id) and removes it.
                if !lost(&s) {
                    self.store.end_save(&id, &[])?;
                }
                return Err(pdisk.error(s, &format!("snapshotting {device} of {}", vm.spec.name)));
            }
        };
        save.snapshot = Some(snap.uuid.clone());
        save.size_bytes = snap.size_bytes;
        let started = NewEvent::image(
            EventType::ImageSaveStarted,
            Cause::Api,
            "",
            format!(
                "{} {device} -> pdisk:///{name}{}",
                vm.spec.name,
                on(&server)
            ),
            0,
            snap.size_bytes,
        );
        self.store.put_save(&save, &[started])?;
        self.crash_point("save.snapshotted");
        self.spawn_save(save, Cause::Api);
        Ok((name.to_string(), server))
    }

    /// Finishes `save` in the background, unless this agentd already is.
    fn spawn_save(self: &Arc<Self>, save: PendingSave, cause: Cause) {
        if !self.saves_running.lock().unwrap().insert(save.id.clone()) {
            return;
        }
        let agent = self.clone();
        tokio::spawn(async move {
            let id = save.id.clone();
            if let Err(e) = agent.complete_save(&save, cause).await {
                tracing::warn!(save = %id, error = %e, "image save left for a retry");
            }
            agent.saves_running.lock().unwrap().remove(&id);
        });
    }

    /// Checksums and clones the snapshot of `save`, removes the snapshot
    /// and journals IMAGE_SAVED, or on a refusal removes the snapshot and
    /// journals IMAGE_SAVE_FAILED. An unreachable pdisk leaves the save
    /// recorded (an error here) for `retry_saves`.
    async fn complete_save(&self, save: &PendingSave, cause: Cause) -> Result<()> {
        let pdisk = self.pdisk(&save.server)?;
        let snapshot = save.snapshot.clone().unwrap_or_default();
        let target = format!("pdisk:///{}{}", save.target, on(&save.server));
        let outcome = match self.finish_save(save, &snapshot).await {
            Err(Step::Lost(e)) => return Err(e),
            Ok(sha) => Ok(sha),
            Err(Step::Refused(e)) => Err(e),
        };
        match pdisk.delete_snapshot(snapshot.clone()).await {
            Ok(()) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(pdisk.error(s, &format!("removing snapshot {}", save.id))),
        }
        self.crash_point("save.snapshot_removed");
        let event = match outcome {
            Ok(sha) => NewEvent::image(
                EventType::ImageSaved,
                cause,
                &sha,
                target,
                save.size_bytes,
                save.size_bytes,
            ),
            Err(e) => NewEvent::image(
                EventType::ImageSaveFailed,
                cause,
                "",
                format!("{target}: {e}"),
                0,
                0,
            ),
        };
        self.store.end_save(&save.id, &[event])?;
        Ok(())
    }

    /// Undoes `save`, whose snapshot was never answered: asks for it again
    /// with the same request id (pdisk answers with the first attempt's
    /// snapshot, or makes it now), removes it, and journals
    /// IMAGE_SAVE_FAILED with cause reconciliation. Nothing was
    /// acknowledged for it.
    async fn roll_back_save(&self, save: &PendingSave) -> Result<()> {
        let pdisk = self.pdisk(&save.server)?;
        let what = match pdisk.create_snapshot(snapshot_request(save)).await {
            Ok(snap) => match pdisk.delete_snapshot(snap.uuid.clone()).await {
                Ok(()) => format!("snapshot {} removed", save.id),
                Err(s) if s.code() == tonic::Code::NotFound => "nothing to remove".to_string(),
                Err(s) => return Err(pdisk.error(s, &format!("removing snapshot {}", save.id))),
            },
            Err(s) if lost(&s) => {
                return Err(pdisk.error(s, "asking for an interrupted save's snapshot"))
            }
            // The volume is gone or refuses snapshots: nothing was made.
            Err(s) => format!("nothing to remove ({})", s.message()),
        };
        let event = NewEvent::image(
            EventType::ImageSaveFailed,
            Cause::Reconciliation,
            "",
            format!(
                "pdisk:///{}{}: interrupted by a restart of agentd before SaveImage answered; \
                 rolled back ({what})",
                save.target,
                on(&save.server)
            ),
            0,
            0,
        );
        self.store.end_save(&save.id, &[event])?;
        Ok(())
    }

    /// At start and with every retry of left-over work: each recorded save
    /// not running here is finished (its snapshot was acknowledged) or
    /// rolled back (it was not). Returns the report's lines.
    pub(super) async fn retry_saves(self: &Arc<Self>) -> Result<Vec<String>> {
        let mut report = Vec::new();
        for save in self.store.saves()? {
            if self.saves_running.lock().unwrap().contains(&save.id) {
                continue;
            }
            let what = format!(
                "image save {} of {} {}",
                save.target, save.vm_name, save.device
            );
            if save.snapshot.is_some() {
                report.push(format!("{what}: being finished"));
                self.spawn_save(save, Cause::Reconciliation);
            } else {
                match self.roll_back_save(&save).await {
                    Ok(()) => report.push(format!("{what}: rolled back")),
                    Err(e) => report.push(format!("{what}: not yet rolled back ({e})")),
                }
            }
        }
        Ok(report)
    }

    /// Checksums the snapshot (journaling progress) and clones it into the
    /// labelled base volume. Returns the sha256.
    async fn finish_save(&self, save: &PendingSave, snapshot: &str) -> Result<String, Step> {
        let pdisk = self.pdisk(&save.server).map_err(Step::Refused)?;
        let name = &save.target;
        // Already made from this snapshot, before a crash?
        match pdisk.get_volume(name.to_string(), String::new()).await {
            Ok(v) if v.clone_of_snapshot == snapshot => {
                if let Some(sha) = v.labels.get(LABEL_SHA256) {
                    return Ok(sha.clone());
                }
            }
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => {
                return Err(Step::of(
                    pdisk,
                    s,
                    &format!("looking for base volume {name}"),
                ))
            }
        }
        let request_id = format!("sum-{}", save.id);
        let total = save.size_bytes;
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
        let sum = pdisk.checksum_volume(pdpb::ChecksumVolumeRequest {
            volume: snapshot.to_string(),
            is_snapshot: true,
            request_id: request_id.clone(),
            project: String::new(),
        });
        let (sum, ()) = tokio::join!(sum, progress);
        let sha = sum.map_err(|s| Step::of(pdisk, s, "checksumming the saved disk"))?;
        self.crash_point("save.checksummed");
        let made = pdisk
            .clone_volume(pdpb::CloneVolumeRequest {
                source: snapshot.to_string(),
                source_is_snapshot: true,
                name: name.to_string(),
                labels: HashMap::from([(LABEL_SHA256.to_string(), sha.clone())]),
                size_bytes: 0,
                // A retry after a crash joins the clone it left running.
                request_id: format!("clone-{}", save.id),
                // An image base belongs to no project: every project's
                // guests on every host may launch from it.
                project: String::new(),
            })
            .await;
        match made {
            Ok(_) => {}
            // Made by an attempt whose answer a restart lost.
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                let v = pdisk
                    .get_volume(name.to_string(), String::new())
                    .await
                    .map_err(|s| Step::of(pdisk, s, &format!("reading base volume {name}")))?;
                if v.labels.get(LABEL_SHA256) != Some(&sha) {
                    return Err(Step::Refused(Error::exists(format!(
                        "volume {name} already exists in pdisk"
                    ))));
                }
            }
            Err(s) => return Err(Step::of(pdisk, s, &format!("making base volume {name}"))),
        }
        self.crash_point("save.cloned");
        Ok(sha)
    }
}

/// How a step of a save ended when it did not succeed.
enum Step {
    /// pdisk did not answer: the save stays recorded and is retried.
    Lost(Error),
    /// pdisk refused: the save fails.
    Refused(Error),
}

impl Step {
    fn of(pdisk: &crate::volumes::PdiskServer, s: tonic::Status, what: &str) -> Step {
        if lost(&s) {
            Step::Lost(pdisk.error(s, what))
        } else {
            Step::Refused(pdisk.error(s, what))
        }
    }
}

/// Whether a call's answer was lost (the call may have happened).
fn lost(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
    )
}

/// The snapshot request of `save`: the same for a retry, so pdisk answers
/// it with the first attempt's snapshot.
fn snapshot_request(save: &PendingSave) -> pdpb::CreateSnapshotRequest {
    pdpb::CreateSnapshotRequest {
        volume: save.volume.clone(),
        name: save.id.clone(),
        request_id: format!("snap-{}", save.id),
        project: save.project.clone(),
    }
}

/// " on pdisk server NAME", or nothing for the default server.
fn on(server: &ServerName) -> String {
    if server.is_default() {
        String::new()
    } else {
        format!(" on pdisk server {server}")
    }
}
