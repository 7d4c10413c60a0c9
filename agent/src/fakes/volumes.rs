//! A pdisk server in memory ([`FakeVolumes`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use stratus_core::types::{LABEL_IMAGE_SHA256, LABEL_VM};
use stratus_proto::pdisk::v1 as pdpb;
use tonic::Status;
use uuid::Uuid;

use crate::volumes::VolumeClient;

use super::{injected, Failures};

/// A pdisk server in memory: volumes by UUID, the set exported to us.
#[derive(Default)]
pub struct FakeVolumes {
    pub failures: Failures,
    state: Mutex<PdiskState>,
    /// How long each export takes (none by default), for callers that give
    /// up half-way.
    pub export_delay: Mutex<Duration>,
    /// The CHAP credentials of every export asked for, in order.
    pub export_chaps: Mutex<Vec<Option<pdpb::ChapCredentials>>>,
    /// The whole server is unreachable: every call fails Unavailable (as
    /// when its host is down), and is still recorded.
    down: std::sync::atomic::AtomicBool,
    /// Set: a pool of RBD images (pdiskd --backend rbd). Exports answer
    /// this attachment, its image the volume's `pd-vol-UUID`, and no target.
    pub export_rbd: Mutex<Option<pdpb::RbdAttachment>>,
    /// Set: exports are pdiskd's nvmet exporter's (NVMe/TCP, port 4420).
    pub export_nvmet: Mutex<bool>,
    /// Set: pdiskd runs on the host with this id, its volumes `DIR/vol-UUID`
    /// files: an export asked with that host id answers a local attachment.
    pub export_local: Mutex<Option<(String, PathBuf)>>,
    /// The host id of every export asked for, in order.
    pub export_host_ids: Mutex<Vec<String>>,
}

#[derive(Default)]
struct PdiskState {
    volumes: BTreeMap<String, pdpb::Volume>,
    exported: BTreeSet<String>,
}

impl PdiskState {
    fn resolve(&self, r: &str) -> std::result::Result<String, Status> {
        if self.volumes.contains_key(r) {
            return Ok(r.to_string());
        }
        self.volumes
            .values()
            .find(|v| v.name == r)
            .map(|v| v.uuid.clone())
            .ok_or_else(|| Status::not_found(format!("volume {r} not found")))
    }

    /// [`Self::resolve`] in a project, as pdiskd scopes it: a volume of
    /// another project is NotFound ("" = every project).
    fn resolve_in(&self, r: &str, project: &str) -> std::result::Result<String, Status> {
        let id = self.resolve(r)?;
        if project.is_empty() || self.volumes[&id].project == project {
            Ok(id)
        } else {
            Err(Status::not_found(format!("volume {r} not found")))
        }
    }

    fn add(&mut self, name: &str, labels: HashMap<String, String>, source: String) -> pdpb::Volume {
        let v = pdpb::Volume {
            uuid: Uuid::new_v4().to_string(),
            name: name.to_string(),
            size_bytes: 1 << 30,
            state: pdpb::VolumeState::Ready as i32,
            image_sha256: match labels.get(LABEL_IMAGE_SHA256) {
                Some(sha) if !labels.contains_key(LABEL_VM) => sha.clone(),
                _ => String::new(),
            },
            labels,
            source,
            ..Default::default()
        };
        self.volumes.insert(v.uuid.clone(), v.clone());
        v
    }
}

impl FakeVolumes {
    pub fn new() -> Arc<FakeVolumes> {
        Arc::default()
    }

    /// Adds a ready volume named `name`; returns its UUID.
    pub fn add_volume(&self, name: &str) -> String {
        self.state
            .lock()
            .unwrap()
            .add(name, HashMap::new(), String::new())
            .uuid
    }

    /// Adds a ready volume named `name` of `project`; returns its UUID.
    pub fn add_volume_in(&self, name: &str, project: &str) -> String {
        let mut st = self.state.lock().unwrap();
        let uuid = st.add(name, HashMap::new(), String::new()).uuid;
        st.volumes.get_mut(&uuid).unwrap().project = project.to_owned();
        uuid
    }

    /// Adds the ready pdisk base volume of the image with checksum `sha`
    /// (as an import by agentd makes it); returns its UUID.
    pub fn add_image_base(&self, name: &str, sha: &str) -> String {
        self.state
            .lock()
            .unwrap()
            .add(
                name,
                HashMap::from([(LABEL_IMAGE_SHA256.to_string(), sha.to_string())]),
                String::new(),
            )
            .uuid
    }

    /// UUIDs of the volumes exported to us.
    pub fn exported(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .exported
            .iter()
            .cloned()
            .collect()
    }

    /// Names of all volumes.
    pub fn volume_names(&self) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.volumes.values().map(|v| v.name.clone()).collect()
    }

    /// Takes the whole server down (every call Unavailable) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn check(&self, op: &'static str, detail: &str) -> std::result::Result<(), Status> {
        if self.failures.call(op, detail) || self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Status::unavailable(injected(op)));
        }
        Ok(())
    }
}

type Answer<'a, T> = BoxFuture<'a, std::result::Result<T, Status>>;

impl VolumeClient for FakeVolumes {
    /// Grows only, as pdisk does.
    fn resize_volume(
        &self,
        volume: String,
        size: u64,
        project: String,
    ) -> Answer<'_, pdpb::Volume> {
        Box::pin(async move {
            self.check("resize_volume", &volume)?;
            let mut st = self.state.lock().unwrap();
            let id = st.resolve_in(&volume, &project)?;
            let v = st.volumes.get_mut(&id).expect("resolved");
            if size < v.size_bytes {
                return Err(Status::invalid_argument(format!(
                    "volume {volume}: {size} is smaller than its {} bytes",
                    v.size_bytes
                )));
            }
            v.size_bytes = size;
            Ok(v.clone())
        })
    }

    fn get_volume(&self, volume: String, project: String) -> Answer<'_, pdpb::Volume> {
        Box::pin(async move {
            self.check("get_volume", &volume)?;
            let st = self.state.lock().unwrap();
            let id = st.resolve_in(&volume, &project)?;
            Ok(st.volumes[&id].clone())
        })
    }

    fn list_volumes(&self, req: pdpb::ListVolumesRequest) -> Answer<'_, Vec<pdpb::Volume>> {
        Box::pin(async move {
            self.check("list_volumes", "")?;
            let st = self.state.lock().unwrap();
            Ok(st
                .volumes
                .values()
                .filter(|v| {
                    req.label_selector
                        .iter()
                        .all(|(k, val)| v.labels.get(k) == Some(val))
                })
                .cloned()
                .collect())
        })
    }

    fn export_volume(&self, req: pdpb::ExportVolumeRequest) -> Answer<'_, pdpb::Export> {
        Box::pin(async move {
            self.check("export_volume", &req.volume)?;
            self.export_chaps.lock().unwrap().push(req.chap.clone());
            let delay = *self.export_delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut st = self.state.lock().unwrap();
            let id = st.resolve_in(&req.volume, &req.project)?;
            let name = st.volumes[&id].name.clone();
            st.exported.insert(id.clone());
            self.export_host_ids
                .lock()
                .unwrap()
                .push(req.host_id.clone());
            if let Some((host, dir)) = self.export_local.lock().unwrap().clone() {
                if !req.host_id.is_empty() && req.host_id == host {
                    let path = dir.join(format!("vol-{id}"));
                    return Ok(pdpb::Export {
                        url: format!("file:{}", path.display()),
                        volume_uuid: id,
                        volume_name: name,
                        initiators: req.initiators,
                        exporter: "local".into(),
                        local: Some(pdpb::LocalAttachment {
                            path: path.display().to_string(),
                            format: "raw".into(),
                            block_device: false,
                        }),
                        ..Default::default()
                    });
                }
            }
            if let Some(mut rbd) = self.export_rbd.lock().unwrap().clone() {
                rbd.image = format!("pd-vol-{id}");
                return Ok(pdpb::Export {
                    url: format!("rbd:{}/{}", rbd.pool, rbd.image),
                    volume_uuid: id,
                    volume_name: name,
                    initiators: req.initiators,
                    exporter: "rbd".into(),
                    rbd: Some(rbd),
                    ..Default::default()
                });
            }
            let target_iqn = format!("iqn.2026-11.io.stratus.pdisk:{name}");
            if *self.export_nvmet.lock().unwrap() {
                let nqn = target_iqn.replacen("iqn.", "nqn.", 1);
                return Ok(pdpb::Export {
                    volume_uuid: id,
                    volume_name: name,
                    url: format!("nvme+tcp://127.0.0.1:4420/{nqn}/1"),
                    target_iqn,
                    portal: "127.0.0.1:4420".into(),
                    lun: 1,
                    initiators: req.initiators,
                    exporter: "nvmet".into(),
                    ..Default::default()
                });
            }
            Ok(pdpb::Export {
                volume_uuid: id,
                volume_name: name,
                url: format!("iscsi://127.0.0.1:3260/{target_iqn}/1"),
                target_iqn,
                portal: "127.0.0.1:3260".into(),
                lun: 1,
                initiators: req.initiators,
                ..Default::default()
            })
        })
    }

    fn unexport_volume(&self, req: pdpb::UnexportVolumeRequest) -> Answer<'_, ()> {
        Box::pin(async move {
            self.check("unexport_volume", &req.volume)?;
            let mut st = self.state.lock().unwrap();
            let id = st.resolve(&req.volume)?;
            if !st.exported.remove(&id) {
                return Err(Status::not_found(format!("volume {id} is not exported")));
            }
            Ok(())
        })
    }

    fn clone_volume(&self, req: pdpb::CloneVolumeRequest) -> Answer<'_, pdpb::Volume> {
        Box::pin(async move {
            self.check("clone_volume", &req.name)?;
            let mut st = self.state.lock().unwrap();
            if st.volumes.values().any(|v| v.name == req.name) {
                return Err(Status::already_exists(format!(
                    "volume {} already exists",
                    req.name
                )));
            }
            let (source, of_volume, of_snapshot) = if req.source_is_snapshot {
                (
                    format!("snapshot:{}", req.source),
                    String::new(),
                    req.source,
                )
            } else {
                let id = st.resolve(&req.source)?;
                (format!("volume:{id}"), id, String::new())
            };
            let mut v = st.add(&req.name, req.labels, source);
            v.clone_of_volume = of_volume;
            v.clone_of_snapshot = of_snapshot;
            v.project = req.project;
            st.volumes.insert(v.uuid.clone(), v.clone());
            Ok(v)
        })
    }

    fn delete_volume(&self, volume: String) -> Answer<'_, ()> {
        Box::pin(async move {
            self.check("delete_volume", &volume)?;
            let mut st = self.state.lock().unwrap();
            let id = st.resolve(&volume)?;
            if st.exported.contains(&id) {
                return Err(Status::failed_precondition(format!(
                    "volume {id} is exported"
                )));
            }
            st.volumes.remove(&id);
            Ok(())
        })
    }

    fn upload_volume(
        &self,
        header: pdpb::UploadHeader,
        _path: PathBuf,
    ) -> Answer<'_, pdpb::Volume> {
        Box::pin(async move {
            self.check("upload_volume", &header.name)?;
            let mut st = self.state.lock().unwrap();
            Ok(st.add(&header.name, header.labels, String::new()))
        })
    }

    fn create_snapshot(&self, req: pdpb::CreateSnapshotRequest) -> Answer<'_, pdpb::Snapshot> {
        Box::pin(async move {
            self.check("create_snapshot", &req.volume)?;
            Ok(pdpb::Snapshot {
                uuid: Uuid::new_v4().to_string(),
                name: req.name,
                volume_uuid: req.volume,
                ..Default::default()
            })
        })
    }

    fn delete_snapshot(&self, snapshot: String) -> Answer<'_, ()> {
        Box::pin(async move { self.check("delete_snapshot", &snapshot) })
    }

    fn checksum_volume(&self, req: pdpb::ChecksumVolumeRequest) -> Answer<'_, String> {
        Box::pin(async move {
            self.check("checksum_volume", &req.volume)?;
            Ok("0".repeat(64))
        })
    }

    fn watch_progress(
        &self,
        _request_id: String,
    ) -> BoxFuture<'_, BoxStream<'static, pdpb::Progress>> {
        Box::pin(async { Box::pin(futures::stream::empty()) as BoxStream<'static, pdpb::Progress> })
    }
}
