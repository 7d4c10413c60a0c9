//! The soak's final checks: what must hold once the daemons have recovered
//! from every SIGKILL (issue 13). Each failed check is a violation string
//! naming the object; [`Checks::count`] says how many checks ran.
//!
//! agentd: no guest STARTING/STOPPING/DESTROYING; every acknowledged guest
//! still there; a guest whose last start answered OK runs, one whose last
//! stop did does not; each QEMU of a soak guest is its RUNNING record's and
//! each RUNNING record has exactly one live QEMU; no tap but running
//! guests'; pdisk exports to agentd's IQN only for running guests' disks;
//! no image clone without its guest; no `.partial-*` cache file; no guest
//! directory without its guest; event seqs 1..n, and every event the
//! follower saw across restarts equal to the replay's.
//!
//! pdiskd: every volume `ready`; files in `volumes/`, `snapshots/` equal
//! to the records and `staging/` empty; tgt's targets and ACLs equal to the
//! stored exports; no drift but `rolled back`; every acknowledged volume and
//! snapshot still there with the content hash it must have; exports the
//! clients were told exist (or were removed) are (or are not) stored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use pdisk::export::tgt::{TgtConfig, TgtExporter};
use pdisk::export::Exporter;
use stratus_core::runner::HostRunner;
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;

use super::events::Followed;
use super::expect::{Expectations, Known};
use super::{state_name, Places, BRIDGE, WRITER_IQN};

/// One pass of the checks.
#[derive(Debug, Default)]
pub(crate) struct Checks {
    pub count: u64,
    pub violations: Vec<String>,
}

impl Checks {
    fn expect(&mut self, ok: bool, why: impl FnOnce() -> String) {
        self.count += 1;
        if !ok {
            self.violations.push(why());
        }
    }
}

/// Runs every check once (in the namespace: a task of the soak's runtime).
pub(crate) async fn check(places: &Places, expect: &Expectations, followed: &Followed) -> Checks {
    let places = places.clone();
    let expect = expect.clone();
    let seen: BTreeMap<u64, pb::Event> = followed.by_seq.clone();
    let task = tokio::spawn(async move {
        let mut c = Checks::default();
        if let Err(e) = agent_checks(&places, &expect, &seen, &mut c).await {
            c.violations
                .push(format!("agentd checks could not run: {e:#}"));
        }
        if let Err(e) = pdisk_checks(&places, &expect, &mut c).await {
            c.violations
                .push(format!("pdiskd checks could not run: {e:#}"));
        }
        c
    });
    match task.await {
        Ok(c) => c,
        Err(e) => Checks {
            count: 0,
            violations: vec![format!("the checks panicked: {e}")],
        },
    }
}

/// Plants an orphan tap and a stray file in the pool, checks that both are
/// reported, and removes them; a violation for each one the checks missed.
pub(crate) async fn prove(
    places: &Places,
    expect: &Expectations,
    followed: &Followed,
) -> Vec<String> {
    const TAP: &str = "stsoakplanted";
    let stray = places
        .pool_dir
        .join("volumes")
        .join("00000000-0000-4000-8000-00000000beef.raw");
    let mut missed = Vec::new();
    let tap = testkit::run(
        "ip",
        &["-n", &places.ns, "tuntap", "add", "dev", TAP, "mode", "tap"],
    );
    if !tap.status.success() {
        missed.push(format!(
            "could not plant a tap: {}",
            String::from_utf8_lossy(&tap.stderr)
        ));
    }
    if let Err(e) = std::fs::write(&stray, b"planted") {
        missed.push(format!("could not plant {}: {e}", stray.display()));
    }
    let found = check(places, expect, followed).await.violations;
    let _ = testkit::run("ip", &["-n", &places.ns, "link", "del", TAP]);
    let _ = std::fs::remove_file(&stray);
    if !found.iter().any(|v| v.contains(TAP)) {
        missed.push("the checks missed a planted orphan tap".into());
    }
    if !found.iter().any(|v| v.contains("beef")) {
        missed.push("the checks missed a planted stray volume file".into());
    }
    missed
}

async fn clients(
    places: &Places,
) -> anyhow::Result<(
    VmServiceClient<tonic::transport::Channel>,
    VolumeServiceClient<tonic::transport::Channel>,
)> {
    let files = testkit::TestPki::shared().admin();
    let agent = stratus_pki::Dialer::from_address(&places.agent_url, Some(&files))?
        .connect()
        .await?;
    let pdisk = stratus_pki::Dialer::from_address(&places.pdisk_url, Some(&files))?
        .connect()
        .await?;
    Ok((VmServiceClient::new(agent), VolumeServiceClient::new(pdisk)))
}

async fn agent_checks(
    places: &Places,
    expect: &Expectations,
    followed: &BTreeMap<u64, pb::Event>,
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
        match (g.running, vm) {
            (Known::Yes, _) => c.expect(
                vm.is_some_and(|v| v.state() == pb::VmState::Running),
                || {
                    format!(
                        "guest {} was started and never stopped but is {}",
                        g.name,
                        vm.map_or("gone", |v| state_name(v))
                    )
                },
            ),
            (Known::No, Some(v)) => c.expect(v.state() != pb::VmState::Running, || {
                format!("guest {} was stopped but runs", g.name)
            }),
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

async fn pdisk_checks(
    places: &Places,
    expect: &Expectations,
    c: &mut Checks,
) -> anyhow::Result<()> {
    let (_, mut pdisk) = clients(places).await?;
    let vols = pdisk
        .list_volumes(pdpb::ListVolumesRequest::default())
        .await?
        .into_inner()
        .volumes;
    let snaps = pdisk
        .list_snapshots(pdpb::ListSnapshotsRequest::default())
        .await?
        .into_inner()
        .snapshots;
    for v in &vols {
        c.expect(v.state() == pdpb::VolumeState::Ready, || {
            format!(
                "volume {} is {}: {}",
                v.name,
                v.state().as_str_name(),
                v.state_reason
            )
        });
    }
    let want_vols: BTreeSet<String> = vols.iter().map(|v| v.uuid.clone()).collect();
    let want_snaps: BTreeSet<String> = snaps.iter().map(|s| s.uuid.clone()).collect();
    for (dir, want) in [("volumes", &want_vols), ("snapshots", &want_snaps)] {
        let (have, other) = files(&places.pool_dir.join(dir))?;
        c.expect(&have == want && other.is_empty(), || {
            format!(
                "{dir}/ holds {:?} {other:?}; records without a file {:?}",
                have.difference(want).collect::<Vec<_>>(),
                want.difference(&have).collect::<Vec<_>>()
            )
        });
    }
    let (staged, other) = files(&places.pool_dir.join("staging"))?;
    c.expect(staged.is_empty() && other.is_empty(), || {
        format!("staging/ not empty: {staged:?} {other:?}")
    });
    let exports = pdisk
        .list_exports(pdpb::ListExportsRequest::default())
        .await?
        .into_inner()
        .exports;
    let stored: BTreeMap<String, BTreeSet<String>> = exports
        .iter()
        .map(|e| (e.target_iqn.clone(), e.initiators.iter().cloned().collect()))
        .collect();
    let tgt = TgtExporter::new(
        Arc::new(HostRunner),
        TgtConfig {
            control_port: places.tgt_control_port,
            portal: places.portal.clone(),
            ..TgtConfig::default()
        },
    );
    let live: BTreeMap<String, BTreeSet<String>> = tgt
        .list()
        .await?
        .into_iter()
        .map(|l| (l.target_iqn, l.initiators.into_iter().collect()))
        .collect();
    c.expect(stored == live, || {
        format!("tgt has {live:?}, the store {stored:?}")
    });
    let pool = pdisk.get_pool(pdpb::GetPoolRequest {}).await?.into_inner();
    for d in &pool.drift {
        c.expect(d.detail.starts_with("rolled back"), || {
            format!("drift {} {}: {}", d.kind, d.object, d.detail)
        });
    }
    // What the clients were told.
    let by_name: BTreeMap<&str, &pdpb::Volume> =
        vols.iter().map(|v| (v.name.as_str(), v)).collect();
    let exported: BTreeSet<&str> = exports
        .iter()
        .filter(|e| e.initiators.iter().any(|i| i == WRITER_IQN))
        .map(|e| e.volume_name.as_str())
        .collect();
    for v in &expect.volumes {
        if v.acknowledged {
            c.expect(by_name.contains_key(v.name.as_str()), || {
                format!("acknowledged volume {} lost", v.name)
            });
        }
        if !by_name.contains_key(v.name.as_str()) {
            continue;
        }
        match v.exported {
            Known::Yes => c.expect(exported.contains(v.name.as_str()), || {
                format!("acknowledged export of {} lost", v.name)
            }),
            Known::No => c.expect(!exported.contains(v.name.as_str()), || {
                format!("volume {} exported after its unexport answered", v.name)
            }),
            Known::Unknown => {}
        }
        if let Some(want) = &v.sha256 {
            let got = checksum(&mut pdisk, &v.name, false).await?;
            c.expect(&got == want, || {
                format!("volume {} reads back {got}, written {want}", v.name)
            });
        }
    }
    let snap_names: BTreeSet<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
    for s in &expect.snapshots {
        if s.acknowledged {
            c.expect(snap_names.contains(s.name.as_str()), || {
                format!("acknowledged snapshot {} lost", s.name)
            });
        }
        if let (true, Some(want)) = (snap_names.contains(s.name.as_str()), &s.sha256) {
            let got = checksum(&mut pdisk, &s.name, true).await?;
            c.expect(&got == want, || {
                format!("snapshot {} reads back {got}, written {want}", s.name)
            });
        }
    }
    Ok(())
}

async fn checksum(
    pdisk: &mut VolumeServiceClient<tonic::transport::Channel>,
    name: &str,
    is_snapshot: bool,
) -> anyhow::Result<String> {
    Ok(pdisk
        .checksum_volume(pdpb::ChecksumVolumeRequest {
            volume: name.into(),
            is_snapshot,
            ..Default::default()
        })
        .await?
        .into_inner()
        .sha256)
}

/// UUIDs of the `.raw` files in `dir`, and any other entry.
fn files(dir: &Path) -> anyhow::Result<(BTreeSet<String>, Vec<String>)> {
    let mut uuids = BTreeSet::new();
    let mut other = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let n = e?.file_name().to_string_lossy().into_owned();
        match n.strip_suffix(".raw") {
            Some(u) => {
                uuids.insert(u.to_string());
            }
            None => other.push(n),
        }
    }
    Ok((uuids, other))
}

/// Live QEMUs running some guest's UUID (`-uuid X`): (pid, uuid).
fn qemus() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in procs.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if !args
            .first()
            .is_some_and(|a| String::from_utf8_lossy(a).contains("qemu-system"))
        {
            continue;
        }
        if let Some(i) = args.iter().position(|a| *a == b"-uuid") {
            if let Some(u) = args.get(i + 1) {
                out.push((pid, String::from_utf8_lossy(u).into_owned()));
            }
        }
    }
    out
}
