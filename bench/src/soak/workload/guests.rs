//! The clients' guest operations on agentd: create, start, stop, pause,
//! resume, destroy.

use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use tonic::{Code, Status};

use super::{channel, lost_or, SoakClient};
use crate::soak::expect::{GuestExpect, Want};
use crate::soak::{Places, BRIDGE};

/// Imports the base image into pdisk through agentd; its volume name.
pub(crate) async fn pull_base(places: &Places, url: String) -> anyhow::Result<String> {
    let places = places.clone();
    let task = tokio::spawn(async move {
        let mut c = VmServiceClient::new(channel(&places.agent_url)?);
        let image = c
            .pull_image(pb::PullImageRequest {
                server: String::new(),
                image: Some(pb::ImageRef {
                    url,
                    sha256: places.image_sha.clone(),
                    format: pb::ImageFormat::Raw as i32,
                    ..Default::default()
                }),
                to_pdisk: true,
                request_id: String::new(),
            })
            .await?
            .into_inner();
        anyhow::Ok(image.volume)
    });
    task.await?
}

/// The soak's guest: 1 vCPU, 64 MiB, a pdisk clone of the base image
/// (SeaBIOS finds nothing to boot on it), a NIC on the soak's bridge.
pub(crate) fn guest_spec(places: &Places, name: &str) -> pb::VmSpec {
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 64 << 20,
        disks: vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::Image(pb::ImageRef {
                url: places.image_url.clone(),
                sha256: places.image_sha.clone(),
                format: pb::ImageFormat::Raw as i32,
                ..Default::default()
            })),
            boot_index: 1,
            ..Default::default()
        }],
        nics: vec![pb::NicSpec {
            bridge: BRIDGE.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

impl SoakClient {
    pub(super) async fn create_guest(&mut self) {
        let name = self.next_name("g");
        let spec = guest_spec(&self.places, &name);
        let request_id = self.request_id();
        let agent = self.agent.clone();
        let r = self
            .call("create_guest", &name, || {
                let mut c = agent.clone();
                let req = pb::CreateVmRequest {
                    spec: Some(spec.clone()),
                    request_id: request_id.clone(),
                    ..Default::default()
                };
                async move { c.create_vm(req).await }
            })
            .await;
        // A create whose answer was lost may have made the guest: it is
        // tracked (not acknowledged) and found out by later calls.
        if r.is_ok() || lost_or(&r, Code::AlreadyExists) {
            self.guests.push(GuestExpect {
                name,
                acknowledged: r.is_ok(),
                state: if r.is_ok() {
                    Want::Stopped
                } else {
                    Want::Unknown
                },
                pid: 0,
            });
        }
    }

    /// A guest whose expected state fits `fit`, or any when there is none.
    pub(super) fn pick_guest(&mut self, fit: impl Fn(Want) -> bool) -> usize {
        let fitting: Vec<usize> = (0..self.guests.len())
            .filter(|&i| fit(self.guests[i].state))
            .collect();
        if fitting.is_empty() {
            self.pick(self.guests.len())
        } else {
            fitting[self.pick(fitting.len())]
        }
    }

    pub(super) async fn start_guest(&mut self) {
        let i = self.pick_guest(|w| !matches!(w, Want::Running | Want::Paused));
        let r = self.vm_call("start_guest", i).await;
        self.after_guest_call(i, r, Want::Running).await;
    }

    pub(super) async fn pause_guest(&mut self) {
        let i = self.pick_guest(|w| w == Want::Running);
        let r = self.vm_call("pause_guest", i).await;
        self.after_guest_call(i, r, Want::Paused).await;
    }

    pub(super) async fn resume_guest(&mut self) {
        let i = self.pick_guest(|w| w == Want::Paused);
        let r = self.vm_call("resume_guest", i).await;
        self.after_guest_call(i, r, Want::Running).await;
    }

    /// StartVm, PauseVm or ResumeVm (by `kind`) of guest `i`.
    async fn vm_call(&mut self, kind: &str, i: usize) -> Result<pb::Vm, Status> {
        let name = self.guests[i].name.clone();
        let request_id = self.request_id();
        let agent = self.agent.clone();
        let kind_owned = kind.to_string();
        self.call(kind, &name, || {
            let mut c = agent.clone();
            let req = pb::VmRequest {
                vm: name.clone(),
                request_id: request_id.clone(),
                ..Default::default()
            };
            let kind = kind_owned.clone();
            async move {
                let r = match kind.as_str() {
                    "start_guest" => c.start_vm(req).await,
                    "pause_guest" => c.pause_vm(req).await,
                    _ => c.resume_vm(req).await,
                };
                r.map(|v| v.into_inner())
            }
        })
        .await
    }

    pub(super) async fn stop_guest(&mut self) {
        let i = self.pick_guest(|w| w != Want::Stopped);
        let name = self.guests[i].name.clone();
        let request_id = self.request_id();
        let agent = self.agent.clone();
        let r = self
            .call("stop_guest", &name, || {
                let mut c = agent.clone();
                let req = pb::StopVmRequest {
                    vm: name.clone(),
                    force: true,
                    request_id: request_id.clone(),
                    ..Default::default()
                };
                async move { c.stop_vm(req).await.map(|v| v.into_inner()) }
            })
            .await;
        self.after_guest_call(i, r, Want::Stopped).await;
    }

    /// What a start's, stop's, pause's or resume's answer tells about guest
    /// `i`: on OK the state `on_ok` with the QEMU the answer names; after a
    /// refusal, what GetVm says now.
    async fn after_guest_call(&mut self, i: usize, r: Result<pb::Vm, Status>, on_ok: Want) {
        match r {
            Ok(vm) => {
                self.guests[i].state = on_ok;
                self.guests[i].pid = if on_ok == Want::Stopped { 0 } else { vm.pid };
            }
            Err(s) if s.code() == Code::NotFound && !self.guests[i].acknowledged => {
                // A create whose answer was lost had not made it.
                self.guests.remove(i);
            }
            // A refusal (already running, still stopping) changed nothing
            // but says nothing sure either; a lost answer even less.
            Err(s) => {
                self.guests[i].state = Want::Unknown;
                self.guests[i].pid = 0;
                if s.code() == Code::FailedPrecondition {
                    self.observe(i).await;
                }
            }
        }
    }

    /// Takes guest `i`'s state and QEMU from GetVm (a settled state only):
    /// from then on only the client's own calls or a QEMU kill may change
    /// them.
    async fn observe(&mut self, i: usize) {
        let name = self.guests[i].name.clone();
        let agent = self.agent.clone();
        let r = self
            .call("get_guest", &name, || {
                let mut c = agent.clone();
                let req = pb::VmRequest {
                    vm: name.clone(),
                    ..Default::default()
                };
                async move { c.get_vm(req).await.map(|v| v.into_inner()) }
            })
            .await;
        let Ok(vm) = r else {
            return;
        };
        let (state, pid) = match vm.state() {
            pb::VmState::Running => (Want::Running, vm.pid),
            pb::VmState::Paused => (Want::Paused, vm.pid),
            pb::VmState::Defined
            | pb::VmState::Stopped
            | pb::VmState::Crashed
            | pb::VmState::Error => (Want::Stopped, 0),
            _ => (Want::Unknown, 0),
        };
        self.guests[i].state = state;
        self.guests[i].pid = pid;
    }

    pub(super) async fn destroy_guest(&mut self) {
        let i = self.pick(self.guests.len());
        let name = self.guests[i].name.clone();
        // From here on the guest may be gone: never "acknowledged lost".
        self.guests[i].acknowledged = false;
        self.guests[i].state = Want::Unknown;
        let request_id = self.request_id();
        let agent = self.agent.clone();
        let r = self
            .call("destroy_guest", &name, || {
                let mut c = agent.clone();
                let req = pb::DestroyVmRequest {
                    vm: name.clone(),
                    timeout_seconds: 5,
                    request_id: request_id.clone(),
                    ..Default::default()
                };
                async move { c.destroy_vm(req).await.map(drop) }
            })
            .await;
        if r.is_ok() || r.as_ref().is_err_and(|s| s.code() == Code::NotFound) {
            self.guests.remove(i);
        }
    }
}
