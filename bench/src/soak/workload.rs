//! The soak's clients: each drives guests (create, start, stop, destroy) on
//! agentd and volumes (create, write through an export + snapshot, clone,
//! export, unexport, delete) on pdiskd, and keeps what it knows for sure:
//! which objects a call acknowledged, which guests must be running, which
//! exports must exist, and each volume's and snapshot's content hash when
//! it is known.
//!
//! A call whose answer is lost (the daemon died: Unavailable, Unknown,
//! Cancelled, Internal) is repeated with the same request id until the
//! daemon answers (at most [`RETRY_FOR`]); an answer that leaves the
//! outcome uncertain makes the client's expectation of that object unknown,
//! never wrong. Every attempt runs under a watchdog ([`HUNG`]): an operation
//! that takes longer is a violation (a deadlock or a lost wake-up).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::{OpCount, Places, Settings, BRIDGE, WRITER_IQN};

/// How long a lost answer is retried before the client gives up on it.
const RETRY_FOR: Duration = Duration::from_secs(90);
/// One attempt taking longer than this is a violation.
const HUNG: Duration = Duration::from_secs(120);
/// Volumes are small: the soak is about crashes, not bytes.
const VOLUME_BYTES: u64 = 4 << 20;
/// Bytes a write puts at the start of a volume.
const WRITE_BYTES: usize = 1 << 20;
const GUESTS_PER_CLIENT: usize = 2;
const VOLUMES_PER_CLIENT: usize = 3;

/// A small xorshift64* generator: the soak needs repeatable choices from
/// a printed seed, not cryptographic ones.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Three-valued knowledge: what a client can say about an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    Yes,
    No,
    Unknown,
}

/// A guest as its client knows it.
#[derive(Debug, Clone)]
pub(crate) struct GuestExpect {
    pub name: String,
    /// Its create answered OK and no destroy was asked for since.
    pub acknowledged: bool,
    /// Its last start answered OK (Yes) or its last stop did (No).
    pub running: Known,
}

/// A volume as its client knows it.
#[derive(Debug, Clone)]
pub(crate) struct VolumeExpect {
    pub name: String,
    pub acknowledged: bool,
    /// Exported to [`WRITER_IQN`].
    pub exported: Known,
    /// SHA-256 of its whole content, when no write since left it uncertain.
    pub sha256: Option<String>,
}

/// A snapshot as its client knows it.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotExpect {
    pub name: String,
    pub volume: String,
    pub acknowledged: bool,
    /// SHA-256 of the volume's content when the snapshot was taken.
    pub sha256: Option<String>,
}

/// What every client knows, merged, for the final checks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Expectations {
    pub guests: Vec<GuestExpect>,
    pub volumes: Vec<VolumeExpect>,
    pub snapshots: Vec<SnapshotExpect>,
}

/// What the clients bring back.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub by_operation: BTreeMap<String, OpCount>,
    pub expect: Expectations,
    /// Hung operations and answers that break a documented contract.
    pub violations: Vec<String>,
}

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

/// A lazily connecting client channel as the test admin: it reconnects by
/// itself after the daemon restarts.
fn channel(url: &str) -> anyhow::Result<Channel> {
    let files = testkit::TestPki::shared().admin();
    Ok(stratus_pki::Dialer::from_address(url, Some(&files))?
        .with_connect_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Runs `settings.clients` clients until `settings.duration` has passed.
pub(crate) async fn run_clients(places: &Places, settings: &Settings) -> Outcome {
    let deadline = Instant::now() + settings.duration;
    let mut tasks = Vec::new();
    for id in 0..settings.clients {
        let places = places.clone();
        let seed = settings.seed.wrapping_add(id as u64 * 0x1000_0001);
        tasks.push(tokio::spawn(async move {
            let mut c = SoakClient::new(id, places, seed).expect("client channels");
            while Instant::now() < deadline {
                c.step().await;
            }
            c.into_outcome()
        }));
    }
    let mut all = Outcome::default();
    for t in tasks {
        let o = match t.await {
            Ok(o) => o,
            Err(e) => {
                all.violations.push(format!("a client panicked: {e}"));
                continue;
            }
        };
        for (k, c) in o.by_operation {
            let a = all.by_operation.entry(k).or_default();
            a.ok += c.ok;
            a.retries += c.retries;
            for (code, n) in c.failed {
                *a.failed.entry(code).or_insert(0) += n;
            }
            for (code, m) in c.examples {
                a.examples.entry(code).or_insert(m);
            }
        }
        all.expect.guests.extend(o.expect.guests);
        all.expect.volumes.extend(o.expect.volumes);
        all.expect.snapshots.extend(o.expect.snapshots);
        all.violations.extend(o.violations);
    }
    all
}

/// The answer of a call was lost with the daemon or its connection: the
/// status was made by the client's transport, not sent by a daemon (a
/// daemon's answer always carries its `content-type` header). A daemon's own
/// Unavailable (a dependency down) is an answer: the daemon keeps it for
/// the request id, so repeating the call would only get it again.
fn lost(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
    ) && s.metadata().get("content-type").is_none()
}

/// Codes the daemons document for refusals (and Unavailable: a dependency
/// of the daemon is down); anything else that is not a lost answer breaks
/// the API's contract.
fn documented(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::Aborted
    )
}

struct SoakClient {
    id: usize,
    places: Places,
    rng: Rng,
    agent: VmServiceClient<Channel>,
    pdisk: VolumeServiceClient<Channel>,
    /// Serial for names and request ids.
    serial: u64,
    guests: Vec<GuestExpect>,
    volumes: Vec<VolumeExpect>,
    snapshots: Vec<SnapshotExpect>,
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    CreateGuest,
    StartGuest,
    StopGuest,
    DestroyGuest,
    CreateVolume,
    WriteAndSnapshot,
    CloneSnapshot,
    Export,
    Unexport,
    DeleteSnapshot,
    DeleteVolume,
}

impl SoakClient {
    fn new(id: usize, places: Places, seed: u64) -> anyhow::Result<SoakClient> {
        Ok(SoakClient {
            id,
            agent: VmServiceClient::new(channel(&places.agent_url)?),
            pdisk: VolumeServiceClient::new(channel(&places.pdisk_url)?),
            places,
            rng: Rng::new(seed),
            serial: 0,
            guests: Vec::new(),
            volumes: Vec::new(),
            snapshots: Vec::new(),
            outcome: Outcome::default(),
        })
    }

    fn next_name(&mut self, what: &str) -> String {
        self.serial += 1;
        format!("c{}-{what}{}", self.id, self.serial)
    }

    fn request_id(&mut self) -> String {
        self.serial += 1;
        format!("soak-c{}-{}", self.id, self.serial)
    }

    /// One random operation that makes sense for what this client has.
    async fn step(&mut self) {
        let mut choices: Vec<(Op, u64)> = Vec::new();
        if self.guests.len() < GUESTS_PER_CLIENT {
            choices.push((Op::CreateGuest, 3));
        }
        if !self.guests.is_empty() {
            choices.extend([
                (Op::StartGuest, 4),
                (Op::StopGuest, 3),
                (Op::DestroyGuest, 1),
            ]);
        }
        if self.volumes.len() < VOLUMES_PER_CLIENT {
            choices.push((Op::CreateVolume, 3));
        }
        if !self.volumes.is_empty() {
            choices.extend([
                (Op::WriteAndSnapshot, 3),
                (Op::Export, 1),
                (Op::Unexport, 1),
                (Op::DeleteVolume, 1),
            ]);
        }
        if !self.snapshots.is_empty() {
            choices.push((Op::DeleteSnapshot, 1));
            if self.volumes.len() < VOLUMES_PER_CLIENT {
                choices.push((Op::CloneSnapshot, 2));
            }
        }
        let total: u64 = choices.iter().map(|(_, w)| w).sum();
        let mut pick = self.rng.below(total);
        let op = choices
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map(|(op, _)| *op)
            .expect("a weighted choice");
        match op {
            Op::CreateGuest => self.create_guest().await,
            Op::StartGuest => self.start_guest().await,
            Op::StopGuest => self.stop_guest().await,
            Op::DestroyGuest => self.destroy_guest().await,
            Op::CreateVolume => self.create_volume().await,
            Op::WriteAndSnapshot => self.write_and_snapshot().await,
            Op::CloneSnapshot => self.clone_snapshot().await,
            Op::Export => {
                let i = self.pick(self.volumes.len());
                self.export(i).await;
            }
            Op::Unexport => {
                let i = self.pick(self.volumes.len());
                self.unexport(i).await;
            }
            Op::DeleteSnapshot => {
                let i = self.pick(self.snapshots.len());
                self.delete_snapshot(i).await;
            }
            Op::DeleteVolume => self.delete_volume().await,
        }
    }

    fn pick(&mut self, n: usize) -> usize {
        self.rng.below(n as u64) as usize
    }

    /// Calls `f` until its answer is not lost (same request, so the same
    /// request id), counting the operation under `kind`.
    async fn call<T, F, Fut>(&mut self, kind: &str, what: &str, mut f: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let mut retries = 0;
        let result = loop {
            let r = match tokio::time::timeout(HUNG, f()).await {
                Ok(r) => r,
                Err(_) => {
                    self.outcome.violations.push(format!(
                        "client {}: {kind} of {what} took more than {HUNG:?}",
                        self.id
                    ));
                    break Err(Status::deadline_exceeded("hung"));
                }
            };
            match r {
                Err(s) if lost(&s) && started.elapsed() < RETRY_FOR => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                r => break r,
            }
        };
        let count = self.outcome.by_operation.entry(kind.into()).or_default();
        count.retries += retries;
        match &result {
            Ok(_) => count.ok += 1,
            Err(s) => {
                let code = format!("{:?}", s.code());
                count
                    .examples
                    .entry(code.clone())
                    .or_insert_with(|| s.message().to_string());
                *count.failed.entry(code).or_insert(0) += 1;
                if !lost(s) && !documented(s) && s.code() != Code::DeadlineExceeded {
                    self.outcome.violations.push(format!(
                        "client {}: {kind} of {what} answered {:?}: {}",
                        self.id,
                        s.code(),
                        s.message()
                    ));
                }
            }
        }
        result
    }

    async fn create_guest(&mut self) {
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

    async fn start_guest(&mut self) {
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

    async fn stop_guest(&mut self) {
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

    async fn destroy_guest(&mut self) {
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

    async fn create_volume(&mut self) {
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
    async fn export(&mut self, i: usize) -> Option<String> {
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

    async fn unexport(&mut self, i: usize) -> bool {
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
    async fn write_and_snapshot(&mut self) {
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

    async fn clone_snapshot(&mut self) {
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

    async fn delete_snapshot(&mut self, i: usize) -> bool {
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
    async fn delete_volume(&mut self) {
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

impl SoakClient {
    fn into_outcome(mut self) -> Outcome {
        let mut o = std::mem::take(&mut self.outcome);
        o.expect.guests = std::mem::take(&mut self.guests);
        o.expect.volumes = std::mem::take(&mut self.volumes);
        o.expect.snapshots = std::mem::take(&mut self.snapshots);
        o
    }
}

/// The answer was lost, or (after a lost first attempt) `code`.
fn lost_or<T>(r: &Result<T, Status>, code: Code) -> bool {
    r.as_ref()
        .is_err_and(|s| lost(s) || s.code() == Code::DeadlineExceeded || s.code() == code)
}

/// SHA-256 of a soak volume: zeros, or the first MiB written with `byte`.
pub(crate) fn content_sha(byte: Option<u8>) -> String {
    let mut h = Sha256::new();
    let mut head = vec![0u8; WRITE_BYTES];
    if let Some(b) = byte {
        head.fill(b);
    }
    h.update(&head);
    h.update(vec![0u8; VOLUME_BYTES as usize - WRITE_BYTES]);
    format!("{:x}", h.finalize())
}

/// What the event follower saw.
#[derive(Debug, Default)]
pub(crate) struct Followed {
    pub events: u64,
    /// Every event seen, by seq, for the final comparison with a replay.
    pub by_seq: BTreeMap<u64, pb::Event>,
    pub violations: Vec<String>,
}

/// Follows agentd's WatchEvents through its restarts: after each broken
/// stream it resumes after the last seq it saw, and each event must be the
/// next seq (no gap, no repeat), until `stop` and one last drain.
pub(crate) async fn follow_events(places: Places, stop: Arc<AtomicBool>) -> Followed {
    let mut f = Followed::default();
    let mut last = 0u64;
    let Ok(channel) = channel(&places.agent_url) else {
        f.violations.push("event follower: no channel".into());
        return f;
    };
    let mut client = VmServiceClient::new(channel);
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let req = pb::WatchEventsRequest {
            since_seq: last,
            no_follow: stopping,
            ..Default::default()
        };
        let mut ended = false;
        if let Ok(stream) = client.watch_events(req).await {
            let mut stream = stream.into_inner();
            loop {
                let next = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
                match next {
                    Ok(Ok(Some(e))) => {
                        if e.seq != last + 1 {
                            f.violations.push(format!(
                                "events: seq {} followed {last} (gap or repeat)",
                                e.seq
                            ));
                        }
                        last = e.seq;
                        f.events += 1;
                        f.by_seq.insert(e.seq, e);
                    }
                    // The stream ended (no_follow drained) or broke (agentd died).
                    Ok(Ok(None)) => {
                        ended = true;
                        break;
                    }
                    Ok(Err(_)) => break,
                    Err(_) if stop.load(Ordering::SeqCst) && !stopping => break,
                    Err(_) => {}
                }
            }
        }
        if stopping && ended {
            return f;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
