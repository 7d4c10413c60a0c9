//! In-memory host effects for the unit tier: a pdisk ([`FakeVolumes`]), a
//! host network ([`FakeNet`], its nftables [`FakeNft`]) and QEMU
//! ([`FakeVmm`]). Each keeps the state a test asserts on (exports, taps,
//! processes), records its calls, and fails any call on demand
//! ([`Failures`]). They outlive an [`Agent`] dropped in a test, as the host
//! outlives a crash of agentd.
//!
//! [`Agent`]: crate::service::Agent

use std::collections::HashMap;
use std::sync::Mutex;

mod net;
mod nft;
mod vmm;
mod volumes;

pub use net::FakeNet;
pub use nft::FakeNft;
pub use vmm::FakeVmm;
pub use volumes::FakeVolumes;

/// Calls to fail, by operation name: every time, or the next n times.
#[derive(Default)]
pub struct Failures {
    armed: Mutex<HashMap<&'static str, Armed>>,
    calls: Mutex<Vec<String>>,
}

/// Which calls of one operation fail.
#[derive(Clone, Copy)]
struct Armed {
    /// Calls to let through first.
    skip: usize,
    /// Calls to fail after those; None: all.
    times: Option<usize>,
}

impl Failures {
    /// Fails every call of `op` until [`Failures::heal`].
    pub fn fail(&self, op: &'static str) {
        self.armed.lock().unwrap().insert(
            op,
            Armed {
                skip: 0,
                times: None,
            },
        );
    }

    /// Fails the next `n` calls of `op`.
    pub fn fail_times(&self, op: &'static str, n: usize) {
        self.armed.lock().unwrap().insert(
            op,
            Armed {
                skip: 0,
                times: Some(n),
            },
        );
    }

    /// Fails only the `n`th call of `op` from now (1: the next).
    pub fn fail_nth(&self, op: &'static str, n: usize) {
        self.armed.lock().unwrap().insert(
            op,
            Armed {
                skip: n - 1,
                times: Some(1),
            },
        );
    }

    pub fn heal(&self, op: &'static str) {
        self.armed.lock().unwrap().remove(op);
    }

    /// Every call so far, `op detail`.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// How many calls of `op` were made.
    pub fn count(&self, op: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.split(' ').next() == Some(op))
            .count()
    }

    /// Records a call of `op`; true when it must fail.
    fn call(&self, op: &'static str, detail: impl std::fmt::Display) -> bool {
        self.calls.lock().unwrap().push(format!("{op} {detail}"));
        let mut armed = self.armed.lock().unwrap();
        let Some(a) = armed.get_mut(op) else {
            return false;
        };
        if a.skip > 0 {
            a.skip -= 1;
            return false;
        }
        if let Some(n) = &mut a.times {
            *n -= 1;
            if *n == 0 {
                armed.remove(op);
            }
        }
        true
    }
}

fn injected(op: &str) -> String {
    format!("injected failure of {op}")
}
