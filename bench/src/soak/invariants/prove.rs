//! The checks must be able to fail: after the final pass the soak plants
//! what they must find — an orphan tap, a stray pool file, a stray `save-*`
//! snapshot on pdisk, a tgt target pdiskd never exported (which the
//! comparison after each restart must report too), a guest paused behind
//! its client's back (its last answer said RUNNING) and another whose QEMU
//! is killed unannounced — runs them again, requires each reported, and
//! undoes the plants.

use std::collections::BTreeSet;
use std::time::Duration;

use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pdpb;
use tonic::transport::Channel;

use super::{check, clients, exports_converge};
use crate::soak::events::Followed;
use crate::soak::expect::{Expectations, GuestExpect, Want};
use crate::soak::workload::guest_spec;
use crate::soak::Places;

const TAP: &str = "stsoakplanted";
const STRAY_VOLUME: &str = "soak-planted";
const STRAY_SAVE: &str = "save-planted0000";
/// A target in pdiskd's IQN namespace on tgtd that its store does not have.
const STRAY_TARGET: &str = "iqn.2026-11.io.stratus.pdisk:soak-planted";
const STRAY_TID: &str = "9999";

/// Plants, checks, unplants; a violation for each plant the checks missed.
pub(crate) async fn prove(
    places: &Places,
    expect: &Expectations,
    followed: &Followed,
    killed: &BTreeSet<u32>,
) -> Vec<String> {
    let places = places.clone();
    let mut expect = expect.clone();
    let followed = Followed {
        events: followed.events,
        by_seq: followed.by_seq.clone(),
        violations: Vec::new(),
    };
    let killed = killed.clone();
    // In a task: the runtime's threads are in the soak's namespace.
    let task = tokio::spawn(async move {
        match plant_and_check(&places, &mut expect, &followed, &killed).await {
            Ok(missed) => missed,
            Err(e) => vec![format!("could not plant what the checks must find: {e:#}")],
        }
    });
    task.await
        .unwrap_or_else(|e| vec![format!("the proof of the checks panicked: {e}")])
}

async fn plant_and_check(
    places: &Places,
    expect: &mut Expectations,
    followed: &Followed,
    killed: &BTreeSet<u32>,
) -> anyhow::Result<Vec<String>> {
    let (mut agent, mut pdisk) = clients(places).await?;
    let stray = places
        .pool_dir
        .join("volumes")
        .join("00000000-0000-4000-8000-00000000beef.raw");
    let mut missed = Vec::new();
    let tap = testkit::run(
        "ip",
        &["-n", &places.ns, "tuntap", "add", "dev", TAP, "mode", "tap"],
    );
    anyhow::ensure!(
        tap.status.success(),
        "could not plant a tap: {}",
        String::from_utf8_lossy(&tap.stderr)
    );
    std::fs::write(&stray, b"planted")?;
    // A save snapshot nobody finishes, as a lost save would leave it.
    pdisk
        .create_volume(pdpb::CreateVolumeRequest {
            name: STRAY_VOLUME.into(),
            size_bytes: 1 << 20,
            ..Default::default()
        })
        .await?;
    pdisk
        .create_snapshot(pdpb::CreateSnapshotRequest {
            volume: STRAY_VOLUME.into(),
            name: STRAY_SAVE.into(),
            ..Default::default()
        })
        .await?;
    let port = places.tgt_control_port.to_string();
    let tgtadm = |args: &[&str]| {
        let mut all = vec!["-C", &port, "--lld", "iscsi", "--mode", "target"];
        all.extend_from_slice(args);
        testkit::run("tgtadm", &all)
    };
    let target = tgtadm(&["--op", "new", "--tid", STRAY_TID, "-T", STRAY_TARGET]);
    anyhow::ensure!(
        target.status.success(),
        "could not plant a tgt target: {}",
        String::from_utf8_lossy(&target.stderr)
    );
    // A guest paused although its last answer left it running.
    let paused = pause_behind_the_back(places, &mut agent, expect, killed).await?;
    // Another guest's QEMU dies without the chaos having killed it.
    let crashed = crash_behind_the_back(places, &mut agent, expect, killed, &paused).await?;

    let mut found = check(places, expect, followed, killed).await.violations;
    if let Err(e) = exports_converge(places, Duration::from_secs(3)).await {
        found.push(format!("after a restart: {e:#}"));
    }
    for v in &found {
        eprintln!("stratus-soak: planted, reported: {v}");
    }

    let _ = testkit::run("ip", &["-n", &places.ns, "link", "del", TAP]);
    let _ = tgtadm(&["--op", "delete", "--force", "--tid", STRAY_TID]);
    let _ = std::fs::remove_file(&stray);
    pdisk
        .delete_snapshot(pdpb::DeleteSnapshotRequest {
            snapshot: STRAY_SAVE.into(),
            ..Default::default()
        })
        .await?;
    pdisk
        .delete_volume(pdpb::DeleteVolumeRequest {
            volume: STRAY_VOLUME.into(),
            now: true,
            ..Default::default()
        })
        .await?;
    agent
        .resume_vm(pb::VmRequest {
            vm: paused.clone(),
            ..Default::default()
        })
        .await?;

    if !found.iter().any(|v| v.contains(TAP)) {
        missed.push("the checks missed a planted orphan tap".into());
    }
    if !found.iter().any(|v| v.contains("beef")) {
        missed.push("the checks missed a planted stray volume file".into());
    }
    for how in ["tgt has", "after a restart"] {
        if !found
            .iter()
            .any(|v| v.contains(how) && v.contains(STRAY_TARGET))
        {
            missed.push(format!("the checks missed a stray tgt target ({how})"));
        }
    }
    if !found.iter().any(|v| v.contains(STRAY_SAVE)) {
        missed.push("the checks missed a planted save-* snapshot".into());
    }
    if !found
        .iter()
        .any(|v| v.contains(&format!("guest {paused} ")) && v.contains("PAUSED"))
    {
        missed.push(format!(
            "the checks missed guest {paused} paused behind its client's back"
        ));
    }
    if !found
        .iter()
        .any(|v| v.contains(&format!("guest {crashed} ")) && v.contains("CRASHED"))
    {
        missed.push(format!(
            "the checks missed guest {crashed}'s QEMU killed unannounced"
        ));
    }
    Ok(missed)
}

/// SIGKILLs the QEMU of a guest (other than `not`) its client expects
/// RUNNING, without telling the checks, and waits until agentd records it
/// CRASHED; its name.
async fn crash_behind_the_back(
    places: &Places,
    agent: &mut VmServiceClient<Channel>,
    expect: &mut Expectations,
    killed: &BTreeSet<u32>,
    not: &str,
) -> anyhow::Result<String> {
    let (name, pid) = running_guest(places, agent, expect, killed, not).await?;
    // SAFETY: kill(2) of the QEMU agentd reports for the soak's guest.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    for _ in 0..100 {
        let vm = agent
            .get_vm(pb::VmRequest {
                vm: name.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        if vm.state() == pb::VmState::Crashed {
            return Ok(name);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("guest {name} not CRASHED 20 s after its QEMU was killed")
}

/// Pauses a guest its client expects RUNNING; its name.
async fn pause_behind_the_back(
    places: &Places,
    agent: &mut VmServiceClient<Channel>,
    expect: &mut Expectations,
    killed: &BTreeSet<u32>,
) -> anyhow::Result<String> {
    let (name, _) = running_guest(places, agent, expect, killed, "").await?;
    agent
        .pause_vm(pb::VmRequest {
            vm: name.clone(),
            ..Default::default()
        })
        .await?;
    Ok(name)
}

/// A guest (not `not`) its client expects RUNNING and that runs with the
/// expected QEMU; when there is none, a stopped guest (or a new one)
/// started now and expected RUNNING from here on. Its name and QEMU pid.
async fn running_guest(
    places: &Places,
    agent: &mut VmServiceClient<Channel>,
    expect: &mut Expectations,
    killed: &BTreeSet<u32>,
    not: &str,
) -> anyhow::Result<(String, u32)> {
    let vms = agent
        .list_vms(pb::ListVmsRequest::default())
        .await?
        .into_inner()
        .vms;
    let running = expect.guests.iter().find(|g| {
        g.name != not
            && g.state == Want::Running
            && !killed.contains(&g.pid)
            && vms
                .iter()
                .any(|v| v.name == g.name && v.state() == pb::VmState::Running && v.pid == g.pid)
    });
    if let Some(g) = running {
        return Ok((g.name.clone(), g.pid));
    }
    let stopped = vms.iter().find(|v| {
        v.name != not
            && matches!(
                v.state(),
                pb::VmState::Stopped | pb::VmState::Defined | pb::VmState::Crashed
            )
    });
    let name = match stopped {
        Some(v) => v.name.clone(),
        // Too few guests left: one of the proof's own.
        None => {
            let name = format!("soak-planted-{}", if not.is_empty() { "a" } else { "b" });
            agent
                .create_vm(pb::CreateVmRequest {
                    spec: Some(guest_spec(places, &name)),
                    ..Default::default()
                })
                .await?;
            name
        }
    };
    let started = agent
        .start_vm(pb::VmRequest {
            vm: name.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    expect.guests.retain(|g| g.name != name);
    expect.guests.push(GuestExpect {
        name: name.clone(),
        acknowledged: true,
        state: Want::Running,
        pid: started.pid,
    });
    Ok((name, started.pid))
}
