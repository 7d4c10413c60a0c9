//! The clients' volume operations on pdiskd: create, export, write through
//! the export and snapshot, clone, unexport, delete.

use std::time::Instant;

use sha2::{Digest, Sha256};
use stratus_proto::pdisk::v1 as pdpb;
use tonic::{Code, Status};

use super::{lost, lost_or, SoakClient, HUNG, VOLUME_BYTES, WRITE_BYTES};
use crate::soak::expect::{Known, SnapshotExpect, VolumeExpect};
use crate::soak::WRITER_IQN;

impl SoakClient {
    pub(super) async fn create_volume(&mut self) {
        let name = self.next_name("v");
        let request_id = self.request_id();
        let pdisk = self.pdisk.clone();
        let req = pdpb::CreateVolumeRequest {
            name: name.clone(),
            size_bytes: VOLUME_BYTES,
            request_id,
            ..Default::default()
        };
        let r = self
            .call("create_volume", &name, || {
                let mut c = pdisk.clone();
                let req = req.clone();
                async move { c.create_volume(req).await }
            })
            .await;
        if r.is_ok() || lost_or(&r, Code::AlreadyExists) {
            self.volumes.push(VolumeExpect {
                name,
                acknowledged: r.is_ok(),
                exported: if r.is_ok() { Known::No } else { Known::Unknown },
                sha256: r.is_ok().then(|| content_sha(None)),
            });
        }
    }

    /// Exports volume `i` to the soak's writer; the export's target IQN.
    pub(super) async fn export(&mut self, i: usize) -> Option<String> {
        let name = self.volumes[i].name.clone();
        let pdisk = self.pdisk.clone();
        let r = self
            .call("export", &name, || {
                let mut c = pdisk.clone();
                let req = pdpb::ExportVolumeRequest {
                    volume: name.clone(),
                    initiators: vec![WRITER_IQN.into()],
                    ..Default::default()
                };
                async move { c.export_volume(req).await }
            })
            .await;
        match r {
            Ok(e) => {
                self.volumes[i].exported = Known::Yes;
                Some(e.into_inner().target_iqn)
            }
            Err(s) => {
                self.volume_refused(i, &s);
                None
            }
        }
    }

    pub(super) async fn unexport(&mut self, i: usize) -> bool {
        let name = self.volumes[i].name.clone();
        let pdisk = self.pdisk.clone();
        let r = self
            .call("unexport", &name, || {
                let mut c = pdisk.clone();
                let req = pdpb::UnexportVolumeRequest {
                    volume: name.clone(),
                    ..Default::default()
                };
                async move { c.unexport_volume(req).await.map(drop) }
            })
            .await;
        match r {
            Ok(()) => {
                self.volumes[i].exported = Known::No;
                true
            }
            Err(s) if s.code() == Code::Unavailable && !lost(&s) => {
                // pdiskd answered: the revocation is committed and the
                // exporter (tgtd, killed) removes the target when it returns.
                self.volumes[i].exported = Known::No;
                false
            }
            Err(s) => {
                self.volume_refused(i, &s);
                false
            }
        }
    }

    /// What a refusal about volume `i` tells.
    fn volume_refused(&mut self, i: usize, s: &Status) {
        if s.code() == Code::NotFound && !self.volumes[i].acknowledged {
            // A create whose answer was lost had not made it (rolled back).
            let name = self.volumes.remove(i).name;
            self.snapshots.retain(|s| s.volume != name);
        } else if lost(s) || s.code() == Code::DeadlineExceeded {
            self.volumes[i].exported = Known::Unknown;
        }
    }

    /// Exports a volume, writes a pattern through the export with QEMU's
    /// initiator, then snapshots it; the snapshot's expected content is
    /// the volume's after the write.
    pub(super) async fn write_and_snapshot(&mut self) {
        let i = self.pick(self.volumes.len());
        let Some(target) = self.export(i).await else {
            return;
        };
        let name = self.volumes[i].name.clone();
        let byte = (self.rng.below(255) + 1) as u8;
        // Uncertain from the first byte written until the write answers.
        self.volumes[i].sha256 = None;
        let wrote = self.write(&name, &target, byte).await;
        if !wrote {
            return;
        }
        self.volumes[i].sha256 = Some(content_sha(Some(byte)));
        let snap = self.next_name("s");
        let request_id = self.request_id();
        let pdisk = self.pdisk.clone();
        let req = pdpb::CreateSnapshotRequest {
            volume: name.clone(),
            name: snap.clone(),
            request_id,
            ..Default::default()
        };
        let r = self
            .call("snapshot", &name, || {
                let mut c = pdisk.clone();
                let req = req.clone();
                async move { c.create_snapshot(req).await }
            })
            .await;
        if r.is_ok() || lost_or(&r, Code::AlreadyExists) {
            self.snapshots.push(SnapshotExpect {
                name: snap,
                volume: name,
                acknowledged: r.is_ok(),
                sha256: Some(content_sha(Some(byte))),
            });
        }
    }

    /// Writes `byte` over the first MiB of the export and flushes.
    async fn write(&mut self, volume: &str, target: &str, byte: u8) -> bool {
        let opts = format!(
            "driver=iscsi,transport=tcp,portal={},target={target},lun=1,initiator-name={WRITER_IQN}",
            self.places.portal
        );
        let started = Instant::now();
        let out = tokio::time::timeout(
            HUNG,
            tokio::process::Command::new("qemu-io")
                .args(["--image-opts", "-c"])
                .arg(format!("write -P {byte} 0 {WRITE_BYTES}"))
                .args(["-c", "flush"])
                .arg(opts)
                .kill_on_drop(true)
                .output(),
        )
        .await;
        let count = self.outcome.by_operation.entry("write".into()).or_default();
        match out {
            Ok(Ok(o)) => {
                let stdout = String::from_utf8_lossy(&o.stdout);
                let ok = o.status.success() && !stdout.contains("failed");
                if ok {
                    count.ok += 1;
                } else {
                    // tgtd killed under it, or the export went away.
                    *count.failed.entry("io".into()).or_insert(0) += 1;
                }
                ok
            }
            Ok(Err(e)) => {
                self.outcome
                    .violations
                    .push(format!("client {}: cannot run qemu-io: {e}", self.id));
                false
            }
            Err(_) => {
                *count.failed.entry("hung".into()).or_insert(0) += 1;
                self.outcome.violations.push(format!(
                    "client {}: write to {volume} took more than {:?}",
                    self.id,
                    started.elapsed()
                ));
                false
            }
        }
    }

    pub(super) async fn clone_snapshot(&mut self) {
        let i = self.pick(self.snapshots.len());
        let source = self.snapshots[i].name.clone();
        let sha = self.snapshots[i].sha256.clone();
        let name = self.next_name("v");
        let request_id = self.request_id();
        let pdisk = self.pdisk.clone();
        let req = pdpb::CloneVolumeRequest {
            source: source.clone(),
            source_is_snapshot: true,
            name: name.clone(),
            request_id,
            ..Default::default()
        };
        let r = self
            .call("clone", &source, || {
                let mut c = pdisk.clone();
                let req = req.clone();
                async move { c.clone_volume(req).await }
            })
            .await;
        if r.is_ok() || lost_or(&r, Code::AlreadyExists) {
            self.volumes.push(VolumeExpect {
                name,
                acknowledged: r.is_ok(),
                exported: if r.is_ok() { Known::No } else { Known::Unknown },
                sha256: if r.is_ok() { sha } else { None },
            });
        } else if r.is_err_and(|s| s.code() == Code::NotFound) && !self.snapshots[i].acknowledged {
            self.snapshots.remove(i);
        }
    }

    pub(super) async fn delete_snapshot(&mut self, i: usize) -> bool {
        let name = self.snapshots[i].name.clone();
        self.snapshots[i].acknowledged = false;
        let pdisk = self.pdisk.clone();
        let r = self
            .call("delete_snapshot", &name, || {
                let mut c = pdisk.clone();
                let req = pdpb::DeleteSnapshotRequest {
                    snapshot: name.clone(),
                    ..Default::default()
                };
                async move { c.delete_snapshot(req).await.map(drop) }
            })
            .await;
        if r.is_ok() || r.is_err_and(|s| s.code() == Code::NotFound) {
            self.snapshots.remove(i);
            true
        } else {
            false
        }
    }

    /// Unexports a volume, deletes its snapshots, then the volume.
    pub(super) async fn delete_volume(&mut self) {
        let i = self.pick(self.volumes.len());
        let name = self.volumes[i].name.clone();
        if self.volumes[i].exported != Known::No && !self.unexport(i).await {
            return;
        }
        while let Some(s) = self.snapshots.iter().position(|s| s.volume == name) {
            if !self.delete_snapshot(s).await {
                return;
            }
        }
        let Some(i) = self.volumes.iter().position(|v| v.name == name) else {
            return;
        };
        self.volumes[i].acknowledged = false;
        self.volumes[i].sha256 = None;
        let pdisk = self.pdisk.clone();
        let r = self
            .call("delete_volume", &name, || {
                let mut c = pdisk.clone();
                let req = pdpb::DeleteVolumeRequest {
                    volume: name.clone(),
                    ..Default::default()
                };
                async move { c.delete_volume(req).await.map(drop) }
            })
            .await;
        if r.is_ok() || r.is_err_and(|s| s.code() == Code::NotFound) {
            self.volumes.remove(i);
        }
    }
}

/// SHA-256 of a soak volume: zeros, or the first MiB written with `byte`.
fn content_sha(byte: Option<u8>) -> String {
    let mut h = Sha256::new();
    let mut head = vec![0u8; WRITE_BYTES];
    if let Some(b) = byte {
        head.fill(b);
    }
    h.update(&head);
    h.update(vec![0u8; VOLUME_BYTES as usize - WRITE_BYTES]);
    format!("{:x}", h.finalize())
}
