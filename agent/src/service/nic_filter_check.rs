//! The periodic check that every running guest's anti-spoofing rules are
//! still in place. agentd owns its nftables table, but root on the host
//! can flush it (`nft flush ruleset`, a firewall reload that replaces the
//! whole ruleset): from then on the guests' frames pass unchecked. So
//! every `--nic-filter-check` interval agentd reads its table once and, for
//! each tap whose rules are not all there, applies them again (under the
//! guest's lock, from its record, so a guest stopping meanwhile does not
//! get rules back) and logs a warning naming the guest and the tap.

use std::sync::Arc;
use std::time::Duration;

use super::Agent;
use crate::net::{self, TapName};

impl Agent {
    /// Re-installs the rules of running guests' taps that lost them;
    /// returns what it did (one line per tap), empty when all were there.
    pub async fn check_nic_filters(&self) -> Vec<String> {
        let vms = match self.store.vms() {
            Ok(v) => v,
            Err(e) => return vec![format!("anti-spoofing rules not checked ({e})")],
        };
        let nics: Vec<(TapName, net::Mac, Vec<std::net::IpAddr>)> = vms
            .iter()
            .filter(|v| v.state.is_active())
            .filter_map(|v| v.runtime.as_ref())
            .flat_map(|r| &r.nics)
            .filter_map(|n| Some((n.tap.parse::<TapName>().ok()?, n.mac, n.ips.clone())))
            .collect();
        if nics.is_empty() {
            return Vec::new();
        }
        let missing = match self.filters.incomplete(&nics).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "could not check the anti-spoofing rules");
                return vec![format!("anti-spoofing rules not checked ({e})")];
            }
        };
        let mut report = Vec::new();
        for tap in missing {
            let Some(vm) = vms.iter().find(|v| {
                v.runtime
                    .as_ref()
                    .is_some_and(|r| r.nics.iter().any(|n| n.tap == tap.as_str()))
            }) else {
                continue;
            };
            let _g = self.lock(vm.uuid).await;
            // Read again under the lock: the guest may have stopped (its
            // rules removed on purpose) since the table was read.
            let Ok(Some(now)) = self.store.vm(vm.uuid) else {
                continue;
            };
            let Some(nic) = now
                .runtime
                .as_ref()
                .filter(|_| now.state.is_active())
                .and_then(|r| r.nics.iter().find(|n| n.tap == tap.as_str()))
            else {
                continue;
            };
            let name = now.spec.name.to_string();
            match self.filters.protect(&tap, nic.mac, &nic.ips).await {
                Ok(()) => {
                    tracing::warn!(vm = %name, tap = %tap,
                        "anti-spoofing rules of the guest's tap were missing (flushed by someone?); re-installed");
                    report.push(format!(
                        "{name}: anti-spoofing rules of tap {tap} were missing; re-installed"
                    ));
                }
                Err(e) => {
                    tracing::error!(vm = %name, tap = %tap, error = %e,
                        "anti-spoofing rules of the guest's tap are missing and could not be re-installed");
                    report.push(format!(
                        "{name}: anti-spoofing rules of tap {tap} missing, not re-installed ({e})"
                    ));
                }
            }
        }
        report
    }

    /// Runs [`Agent::check_nic_filters`] every `every`, for as long as the
    /// agent lives.
    pub fn spawn_nic_filter_checks(self: &Arc<Self>, every: Duration) {
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(agent) = agent.upgrade() else { return };
                agent.check_nic_filters().await;
            }
        });
    }
}
