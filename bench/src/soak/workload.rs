//! The soak's clients: each drives guests (create, start, stop, pause,
//! resume, destroy, save a stopped one's disk as an image) and images (pull
//! its own from the soak's httpd into the cache or pdisk, evict them) on
//! agentd, and volumes (create, write through an export + snapshot, clone,
//! export, unexport, delete) on pdiskd, and keeps what it knows for sure
//! ([`super::expect`]).
//!
//! A call whose answer is lost (the daemon died: Unavailable, Unknown,
//! Cancelled, Internal) is repeated with the same request id until the
//! daemon answers (at most [`RETRY_FOR`]); an answer that leaves the
//! outcome uncertain makes the client's expectation of that object unknown,
//! never wrong. Every attempt runs under a watchdog ([`HUNG`]): an operation
//! that takes longer is a violation (a deadlock or a lost wake-up).
//!
//! - this module: the client, its choice of operation, the retrying call;
//! - [`guests`]: operations on agentd's guests;
//! - [`images`]: pulls, evictions and saves of images through agentd;
//! - [`volumes`]: operations on pdiskd's volumes, snapshots and exports.

mod guests;
mod images;
mod volumes;

use std::future::Future;
use std::time::{Duration, Instant};

use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub(crate) use guests::{guest_spec, pull_base};

use super::expect::{
    GuestExpect, ImageExpect, Known, Outcome, Rng, SaveExpect, SnapshotExpect, VolumeExpect, Want,
};
use super::{Places, Settings};

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
/// Saved images a client keeps before it deletes one.
const SAVED_PER_CLIENT: usize = 2;

/// A lazily connecting client channel as the test admin: it reconnects by
/// itself after the daemon restarts.
pub(crate) fn channel(url: &str) -> anyhow::Result<Channel> {
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
        all.expect.images.extend(o.expect.images);
        all.expect.saves.extend(o.expect.saves);
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
    /// The client's own images (fixed: pulled and evicted, never added).
    images: Vec<ImageExpect>,
    saves: Vec<SaveExpect>,
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    CreateGuest,
    StartGuest,
    StopGuest,
    PauseGuest,
    ResumeGuest,
    DestroyGuest,
    SaveImage,
    DeleteSaved,
    PullImage,
    EvictImage,
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
        let images = places.client_images[id]
            .iter()
            .map(|(url, sha256)| ImageExpect {
                url: url.clone(),
                sha256: sha256.clone(),
                local: Known::No,
                pdisk: Known::No,
            })
            .collect();
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
            images,
            saves: Vec::new(),
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
            // Pause, resume and save where some guest may take them.
            let may = |w: Want| {
                self.guests
                    .iter()
                    .any(|g| g.state == w || g.state == Want::Unknown)
            };
            if may(Want::Running) {
                choices.push((Op::PauseGuest, 2));
            }
            if may(Want::Paused) {
                choices.push((Op::ResumeGuest, 2));
            }
            if may(Want::Stopped) {
                choices.push((Op::SaveImage, 1));
            }
        }
        let live_saves = self
            .saves
            .iter()
            .filter(|s| s.acknowledged && s.deleted == Known::No)
            .count();
        if live_saves > SAVED_PER_CLIENT {
            choices.push((Op::DeleteSaved, 2));
        }
        choices.extend([(Op::PullImage, 2), (Op::EvictImage, 1)]);
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
            Op::PauseGuest => self.pause_guest().await,
            Op::ResumeGuest => self.resume_guest().await,
            Op::DestroyGuest => self.destroy_guest().await,
            Op::SaveImage => self.save_image().await,
            Op::DeleteSaved => self.delete_saved().await,
            Op::PullImage => self.pull_image().await,
            Op::EvictImage => self.evict_image().await,
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

    fn into_outcome(mut self) -> Outcome {
        let mut o = std::mem::take(&mut self.outcome);
        o.expect.guests = std::mem::take(&mut self.guests);
        o.expect.volumes = std::mem::take(&mut self.volumes);
        o.expect.snapshots = std::mem::take(&mut self.snapshots);
        o.expect.images = std::mem::take(&mut self.images);
        o.expect.saves = std::mem::take(&mut self.saves);
        o
    }
}

/// The answer was lost, or (after a lost first attempt) `code`.
fn lost_or<T>(r: &Result<T, Status>, code: Code) -> bool {
    r.as_ref()
        .is_err_and(|s| lost(s) || s.code() == Code::DeadlineExceeded || s.code() == code)
}
