//! What the soak's clients know for sure, merged for the final checks:
//! which objects a call acknowledged, which guests must be running or
//! paused (and with which QEMU), which exports must exist, content hashes
//! when they are known, which images are pulled and which saves were
//! acknowledged.

use std::collections::BTreeMap;

use super::OpCount;

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
    /// What its last answered start, stop, pause or resume left it in.
    pub state: Want,
    /// The QEMU pid that answer named (0 when stopped or unknown): a guest
    /// whose QEMU the chaos thread killed since is not running.
    pub pid: u32,
}

/// The state a guest's last acknowledged call leaves it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    Running,
    Paused,
    Stopped,
    Unknown,
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

/// One of a client's own images (served by the soak's httpd) as the
/// client knows it: pulled into agentd's cache and into a pdisk base, or
/// evicted.
#[derive(Debug, Clone)]
pub(crate) struct ImageExpect {
    pub url: String,
    pub sha256: String,
    pub local: Known,
    pub pdisk: Known,
}

/// A SaveImage of a stopped guest's disk into pdisk base `name`.
#[derive(Debug, Clone)]
pub(crate) struct SaveExpect {
    pub name: String,
    pub guest: String,
    /// SaveImage answered OK: the save must end IMAGE_SAVED.
    pub acknowledged: bool,
    /// The SHA-256 the saved image must have (the guest's disk is a clone
    /// of the base image nobody writes to).
    pub sha256: String,
    /// The client deleted the saved base afterwards (Yes: DeleteVolume
    /// answered OK).
    pub deleted: Known,
}

/// What every client knows, merged, for the final checks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Expectations {
    pub guests: Vec<GuestExpect>,
    pub volumes: Vec<VolumeExpect>,
    pub snapshots: Vec<SnapshotExpect>,
    pub images: Vec<ImageExpect>,
    pub saves: Vec<SaveExpect>,
}

/// What the clients bring back.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub by_operation: BTreeMap<String, OpCount>,
    pub expect: Expectations,
    /// Hung operations and answers that break a documented contract.
    pub violations: Vec<String>,
}
