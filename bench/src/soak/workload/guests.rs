//! The clients' guest operations on agentd: create, start, stop, destroy.

use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use tonic::{Code, Status};

use super::{channel, lost_or, SoakClient};
use crate::soak::expect::{GuestExpect, Known};
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

impl SoakClient {
    pub(super) async fn create_guest(&mut self) {
        let name = self.next_name("g");
        let spec = pb::VmSpec {
            name: name.clone(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            disks: vec![pb::DiskSpec {
                source: Some(pb::disk_spec::Source::Image(pb::ImageRef {
                    url: self.places.image_url.clone(),
                    sha256: self.places.image_sha.clone(),
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
        };
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
                running: if r.is_ok() { Known::No } else { Known::Unknown },
            });
        }
    }

    /// A guest not known to be `not`, or any when there is none.
    fn pick_guest(&mut self, not: Known) -> usize {
        let fit: Vec<usize> = (0..self.guests.len())
            .filter(|&i| self.guests[i].running != not)
            .collect();
        if fit.is_empty() {
            self.pick(self.guests.len())
        } else {
            fit[self.pick(fit.len())]
        }
    }

    pub(super) async fn start_guest(&mut self) {
        let i = self.pick_guest(Known::Yes);
        let name = self.guests[i].name.clone();
        let request_id = self.request_id();
        let agent = self.agent.clone();
        let r = self
            .call("start_guest", &name, || {
                let mut c = agent.clone();
                let req = pb::VmRequest {
                    vm: name.clone(),
                    request_id: request_id.clone(),
                    ..Default::default()
                };
                async move { c.start_vm(req).await.map(drop) }
            })
            .await;
        self.after_guest_call(i, &r, Known::Yes);
    }

    pub(super) async fn stop_guest(&mut self) {
        let i = self.pick_guest(Known::No);
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
                async move { c.stop_vm(req).await.map(drop) }
            })
            .await;
        self.after_guest_call(i, &r, Known::No);
    }

    /// What a start's or stop's answer tells about guest `i`.
    fn after_guest_call(&mut self, i: usize, r: &Result<(), Status>, on_ok: Known) {
        match r {
            Ok(()) => self.guests[i].running = on_ok,
            Err(s) if s.code() == Code::NotFound && !self.guests[i].acknowledged => {
                // A create whose answer was lost had not made it.
                self.guests.remove(i);
            }
            // A refusal (already running, still stopping) changed nothing
            // but says nothing sure either; a lost answer even less.
            Err(_) => self.guests[i].running = Known::Unknown,
        }
    }

    pub(super) async fn destroy_guest(&mut self) {
        let i = self.pick(self.guests.len());
        let name = self.guests[i].name.clone();
        // From here on the guest may be gone: never "acknowledged lost".
        self.guests[i].acknowledged = false;
        self.guests[i].running = Known::Unknown;
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
