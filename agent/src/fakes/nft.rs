//! nftables as the anti-spoofing code sees it, for the unit tier.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use stratus_core::error::Result;

use super::{injected, Failures, FakeNet};

/// `nft` as the agent's command runner sees it: the anti-spoofing scripts
/// of [`crate::net::NicFilters`] change a set of protected taps, `nft -j
/// list table` reads it back; every other command succeeds silently (as
/// [`stratus_core::runner::FakeRunner::new`] would). It also notes every
/// break of the order a start and a tear-down must keep: rules before the
/// tap joins a bridge, removed only once the tap is gone.
pub struct FakeNft {
    net: Arc<FakeNet>,
    protected: Mutex<BTreeSet<String>>,
    violations: Mutex<Vec<String>>,
    pub failures: Failures,
}

impl FakeNft {
    pub fn new(net: Arc<FakeNet>) -> Arc<FakeNft> {
        Arc::new(FakeNft {
            net,
            protected: Mutex::default(),
            violations: Mutex::default(),
            failures: Failures::default(),
        })
    }

    /// A command runner answering as described above.
    pub fn runner(self: &Arc<Self>) -> stratus_core::runner::FakeRunner {
        let me = self.clone();
        stratus_core::runner::FakeRunner::with(move |argv| me.answer(argv))
    }

    /// Taps with rules.
    pub fn protected(&self) -> Vec<String> {
        self.protected.lock().unwrap().iter().cloned().collect()
    }

    /// Rules of a guest that is gone (as a crash would leave them).
    pub fn add_protected(&self, tap: &str) {
        self.protected.lock().unwrap().insert(tap.into());
    }

    /// Each time a tap was on a bridge without rules.
    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    fn answer(&self, argv: &[String]) -> Result<stratus_core::runner::Output> {
        use stratus_core::runner::Output;
        if argv.first().map(String::as_str) != Some("nft") {
            return Ok(Output::ok(""));
        }
        if argv.get(1).map(String::as_str) == Some("-j") {
            let elems: Vec<serde_json::Value> = self
                .protected()
                .iter()
                .map(|t| serde_json::json!([t, {"jump": {"target": format!("nic-{t}")}}]))
                .collect();
            let json = serde_json::json!({"nftables": [
                {"map": {"family": "bridge", "table": "stratus", "name": "nics", "elem": elems}}
            ]});
            return Ok(Output::ok(json.to_string()));
        }
        let script = argv.get(1).cloned().unwrap_or_default();
        // The tap the script is about: the last `nics { "TAP"` in it.
        let tap = script
            .rsplit("nics { \"")
            .next()
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_default()
            .to_string();
        let removing = script.contains("delete element");
        let op = if removing {
            "nft_remove"
        } else {
            "nft_protect"
        };
        if self.failures.call(op, &tap) {
            return Ok(Output::failed(1, injected(op)));
        }
        if removing {
            if self.net.taps().contains(&tap) {
                self.violations
                    .lock()
                    .unwrap()
                    .push(format!("rules of {tap} removed while the tap exists"));
            }
            self.protected.lock().unwrap().remove(&tap);
        } else {
            // Replacing the rules of a tap that has them (reconcile) is fine.
            let mut protected = self.protected.lock().unwrap();
            if let (false, Some(br)) = (protected.contains(&tap), self.net.bridge_of(&tap)) {
                self.violations
                    .lock()
                    .unwrap()
                    .push(format!("{tap} was on {br} before its rules"));
            }
            protected.insert(tap);
        }
        Ok(Output::ok(""))
    }
}
