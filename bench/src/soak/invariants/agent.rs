//! agentd's side of the final checks: guests' states and QEMUs, taps,
//! exports and clones in pdisk, files, events.

use std::collections::{BTreeMap, BTreeSet};

use stratus_proto::agent::v1 as pb;
use stratus_proto::pdisk::v1 as pdpb;

use super::{clients, qemus, Checks};
use crate::soak::expect::{Expectations, Want};
use crate::soak::{state_name, Places, BRIDGE};

pub(super) async fn checks(
    places: &Places,
    expect: &Expectations,
    followed: &BTreeMap<u64, pb::Event>,
    killed: &BTreeSet<u32>,
    c: &mut Checks,
) -> anyhow::Result<()> {
    let (mut agent, mut pdisk) = clients(places).await?;
    let vms = agent
        .list_vms(pb::ListVmsRequest::default())
        .await?
        .into_inner()
        .vms;
    let mut replay = Vec::new();
    let mut s = agent
        .watch_events(pb::WatchEventsRequest {
            no_follow: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(e) = s.message().await? {
        replay.push(e);
    }
    let by_name: BTreeMap<&str, &pb::Vm> = vms.iter().map(|v| (v.name.as_str(), v)).collect();
    for v in &vms {
        c.expect(
            !matches!(
                v.state(),
                pb::VmState::Starting | pb::VmState::Stopping | pb::VmState::Destroying
            ),
            || {
                format!(
                    "guest {} left {} ({})",
                    v.name,
                    state_name(v),
                    v.state_reason
                )
            },
        );
    }
    for g in &expect.guests {
        let vm = by_name.get(g.name.as_str());
        if g.acknowledged {
            c.expect(vm.is_some(), || {
                format!("acknowledged guest {} lost", g.name)
            });
        }
        // The QEMU the last acknowledged start, pause or resume named was
        // killed since (no call about the guest answered after, or it would
        // name another pid or none): agentd's monitor records the guest
        // CRASHED, reconciliation STOPPED when agentd was down; it is never
        // restarted.
        let crashed = g.pid != 0 && killed.contains(&g.pid);
        match (g.state, vm) {
            (Want::Running | Want::Paused, _) if crashed => c.expect(
                vm.is_some_and(|v| {
                    matches!(v.state(), pb::VmState::Crashed | pb::VmState::Stopped)
                }),
                || {
                    format!(
                        "guest {}'s QEMU (pid {}) was killed but it is {}, not CRASHED or STOPPED",
                        g.name,
                        g.pid,
                        vm.map_or("gone", |v| state_name(v))
                    )
                },
            ),
            (Want::Running | Want::Paused, _) => {
                let want = if g.state == Want::Running {
                    pb::VmState::Running
                } else {
                    pb::VmState::Paused
                };
                c.expect(
                    vm.is_some_and(|v| v.state() == want && v.pid == g.pid),
                    || {
                        format!(
                            "guest {} was left {} (pid {}) by its last answer but is {} (pid {})",
                            g.name,
                            want.as_str_name(),
                            g.pid,
                            vm.map_or("gone", |v| state_name(v)),
                            vm.map_or(0, |v| v.pid)
                        )
                    },
                )
            }
            (Want::Stopped, Some(v)) => c.expect(
                !matches!(v.state(), pb::VmState::Running | pb::VmState::Paused),
                || format!("guest {} was stopped but is {}", g.name, state_name(v)),
            ),
            _ => {}
        }
    }
    // QEMUs: each soak guest's (any UUID the journal ever named) belongs
    // to its running record, once.
    let seen: BTreeSet<&str> = replay
        .iter()
        .map(|e| e.vm_uuid.as_str())
        .filter(|u| !u.is_empty())
        .collect();
    let running: Vec<&pb::Vm> = vms
        .iter()
        .filter(|v| matches!(v.state(), pb::VmState::Running | pb::VmState::Paused))
        .collect();
    let live: Vec<(u32, String)> = qemus()
        .into_iter()
        .filter(|(_, u)| seen.contains(u.as_str()))
        .collect();
    for (pid, uuid) in &live {
        let owner = running.iter().find(|v| &v.uuid == uuid);
        c.expect(owner.is_some_and(|v| v.pid == *pid), || {
            format!(
                "QEMU pid {pid} of guest {uuid} without a running record ({})",
                vms.iter()
                    .find(|v| &v.uuid == uuid)
                    .map_or("no record".into(), |v| format!(
                        "{} {} pid {}",
                        v.name,
                        state_name(v),
                        v.pid
                    ))
            )
        });
    }
    for v in &running {
        let n = live.iter().filter(|(_, u)| *u == v.uuid).count();
        c.expect(n == 1, || {
            format!("guest {} is {} with {n} QEMUs", v.name, state_name(v))
        });
    }
    // Taps: only running guests'.
    let wanted: BTreeSet<&str> = running
        .iter()
        .flat_map(|v| v.nics.iter().map(|n| n.tap.as_str()))
        .collect();
    let links = testkit::run_ok("ip", &["-n", &places.ns, "-o", "link", "show"]);
    for l in links.lines() {
        let Some(name) = l.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if name.starts_with("st") && name != BRIDGE {
            c.expect(wanted.contains(name), || format!("orphan tap {name}"));
        }
    }
    // pdisk: agentd's exports only for running guests' disks; clones only
    // of guests that exist.
    let exports = pdisk
        .list_exports(pdpb::ListExportsRequest::default())
        .await?
        .into_inner()
        .exports;
    let disks: BTreeSet<String> = running.iter().map(|v| clone_name(&v.uuid)).collect();
    for e in &exports {
        if e.initiators.iter().any(|i| i == testkit::INITIATOR) {
            c.expect(disks.contains(&e.volume_name), || {
                format!(
                    "export of {} to agentd without a running guest",
                    e.volume_name
                )
            });
        }
    }
    let uuids: BTreeSet<&str> = vms.iter().map(|v| v.uuid.as_str()).collect();
    let volumes = pdisk
        .list_volumes(pdpb::ListVolumesRequest::default())
        .await?
        .into_inner()
        .volumes;
    for v in &volumes {
        if let Some(owner) = v.labels.get("stratus.io/vm") {
            c.expect(uuids.contains(owner.as_str()), || {
                format!("image clone {} of a guest that is gone ({owner})", v.name)
            });
        }
    }
    // Files: no partial cache file, no directory without its guest.
    for e in std::fs::read_dir(places.agent_state.join("images"))?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        c.expect(!n.starts_with(".partial-"), || {
            format!("orphan cache file {n}")
        });
    }
    if let Ok(dirs) = std::fs::read_dir(places.agent_state.join("vms")) {
        for d in dirs.flatten() {
            let n = d.file_name().to_string_lossy().into_owned();
            c.expect(uuids.contains(n.as_str()), || {
                format!("guest directory {n} without its guest")
            });
        }
    }
    // Events: 1..n; what the follower saw is what the journal holds.
    let seqs: Vec<u64> = replay.iter().map(|e| e.seq).collect();
    c.expect(seqs == (1..=seqs.len() as u64).collect::<Vec<_>>(), || {
        "event seqs are not 1..n (gap or repeat)".into()
    });
    let by_seq: BTreeMap<u64, &pb::Event> = replay.iter().map(|e| (e.seq, e)).collect();
    for (seq, e) in followed {
        c.expect(by_seq.get(seq).is_some_and(|r| *r == e), || {
            format!("event {seq} as followed differs from the journal's")
        });
    }
    Ok(())
}

/// The name agentd gives a guest's image clone of its first disk.
fn clone_name(uuid: &str) -> String {
    format!("vm-{}-vda", &uuid.replace('-', "")[..12])
}
