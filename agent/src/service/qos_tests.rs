//! SetDiskQos on the fakes: limits given at start reach QEMU's throttle
//! group, a live change reaches it and the spec with DISK_QOS_CHANGED, a
//! refused change leaves both as they were, a stopped guest's spec only,
//! shared groups, and crashes between QEMU and the store reconciled at
//! adoption (QEMU ends with the stored limits). Runs on
//! `service_tests.rs`'s harness.

use std::sync::Arc;

use stratus_core::error::ErrorKind;

use super::{crash, events_of, small_spec, Host};
use crate::qos::{Bucket, DiskQos, Limits};
use crate::service::Agent;
use crate::spec::{Cause, Disk, DiskSource, EventType};

fn iops(n: u64) -> DiskQos {
    DiskQos {
        limits: Limits {
            iops_total: Bucket {
                avg: n,
                ..Default::default()
            },
            ..Default::default()
        },
        group: None,
    }
}

fn qos_events(agent: &Agent) -> Vec<(Cause, String)> {
    let vm = agent.get_vm("web").unwrap();
    events_of(agent, &vm)
        .into_iter()
        .filter(|e| e.kind == EventType::DiskQosChanged)
        .map(|e| (e.cause, e.detail))
        .collect()
}

async fn running(agent: &Arc<Agent>, qos: DiskQos) -> u32 {
    let mut s = small_spec("web", "root");
    s.disks[0].qos = qos;
    agent.create_vm(s, "", "").await.unwrap();
    agent.start_vm("web").await.unwrap().runtime.unwrap().pid
}

#[tokio::test]
async fn limits_reach_qemu_at_start_and_change_live() {
    let host = Host::new();
    let agent = host.agent();
    let pid = running(&agent, iops(200)).await;
    assert_eq!(
        host.vmm.throttle_group(pid, "qos-vda"),
        Some(iops(200).limits)
    );
    let vm = agent.set_disk_qos("web", "vda", iops(50)).await.unwrap();
    assert_eq!(vm.spec.disks[0].qos, iops(50));
    assert_eq!(
        host.vmm.throttle_group(pid, "qos-vda"),
        Some(iops(50).limits)
    );
    assert_eq!(
        qos_events(&agent),
        vec![(Cause::Api, "vda iops_total=50".to_string())]
    );
    // Unlimited again: QEMU's group is cleared, the spec holds nothing.
    let vm = agent
        .set_disk_qos("web", "vda", DiskQos::default())
        .await
        .unwrap();
    assert!(vm.spec.disks[0].qos.is_default());
    assert_eq!(
        host.vmm.throttle_group(pid, "qos-vda"),
        Some(Limits::default())
    );
}

#[tokio::test]
async fn a_refused_change_changes_nothing() {
    let host = Host::new();
    let agent = host.agent();
    let pid = running(&agent, iops(200)).await;
    let mut bad = iops(100);
    bad.limits.iops_read.avg = 10;
    let e = agent.set_disk_qos("web", "vda", bad).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(
        e.to_string().contains("iops_total cannot be combined"),
        "{e}"
    );
    // A running disk keeps its group.
    let mut grouped = iops(100);
    grouped.group = Some("db".into());
    let e = agent.set_disk_qos("web", "vda", grouped).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let e = agent.set_disk_qos("web", "vdq", iops(1)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    // QEMU refuses: the spec keeps its limits and no event is written.
    host.vmm.failures.fail_times("set_throttle_limits", 1);
    agent
        .set_disk_qos("web", "vda", iops(10))
        .await
        .unwrap_err();
    let vm = agent.get_vm("web").unwrap();
    assert_eq!(vm.spec.disks[0].qos, iops(200));
    assert!(vm.hotplug.is_none());
    assert_eq!(
        host.vmm.throttle_group(pid, "qos-vda"),
        Some(iops(200).limits)
    );
    assert!(qos_events(&agent).is_empty());
}

#[tokio::test]
async fn a_stopped_guests_spec_changes_and_applies_at_start() {
    let host = Host::new();
    let agent = host.agent();
    host.pdisk.add_volume("extra");
    let mut s = small_spec("web", "root");
    s.disks.push(Disk {
        source: DiskSource::Pdisk("extra".parse().unwrap()),
        read_only: false,
        boot_index: 0,
        qos: DiskQos::default(),
    });
    agent.create_vm(s, "", "").await.unwrap();
    // Both disks into one group (allowed while stopped): one set of limits.
    let mut g = iops(300);
    g.group = Some("db".into());
    agent.set_disk_qos("web", "vda", g.clone()).await.unwrap();
    let vm = agent.set_disk_qos("web", "vdb", g.clone()).await.unwrap();
    assert_eq!(vm.spec.disks[0].qos, g);
    assert_eq!(vm.spec.disks[1].qos, g);
    let pid = agent.start_vm("web").await.unwrap().runtime.unwrap().pid;
    assert_eq!(
        host.vmm.throttle_group(pid, "qos-group-db"),
        Some(g.limits.clone())
    );
    assert_eq!(host.vmm.throttle_group(pid, "qos-vda"), None);
    // A live change of one disk of the group is the group's.
    g.limits.iops_total.avg = 30;
    let vm = agent.set_disk_qos("web", "vdb", g.clone()).await.unwrap();
    assert_eq!(vm.spec.disks[0].qos, g);
    assert_eq!(host.vmm.throttle_group(pid, "qos-group-db"), Some(g.limits));
}

/// Crashes between the steps: the intent (QEMU not told) is dropped, a
/// change QEMU has is finished (cause reconciliation); QEMU ends with
/// the stored limits either way.
#[tokio::test]
async fn a_crash_mid_change_is_finished_or_dropped_from_what_qemu_has() {
    for (at, applied) in [("qos.intent", false), ("qos.applied", true)] {
        let host = Host::new();
        let agent = host.agent();
        let pid = running(&agent, iops(200)).await;
        agent.arm_crash_point(Some(at));
        let a = agent.clone();
        let died = tokio::spawn(async move { a.set_disk_qos("web", "vda", iops(20)).await })
            .await
            .expect_err("the change should have crashed");
        assert!(died.is_panic(), "{at}");
        crash(agent).await;
        let agent = host.agent();
        agent.reconcile().await.unwrap();
        let vm = agent.get_vm("web").unwrap();
        assert!(vm.hotplug.is_none(), "{at}");
        let want = if applied { iops(20) } else { iops(200) };
        assert_eq!(vm.spec.disks[0].qos, want, "{at}");
        assert_eq!(
            host.vmm.throttle_group(pid, "qos-vda"),
            Some(want.limits),
            "{at}"
        );
        let events = qos_events(&agent);
        if applied {
            assert_eq!(events.len(), 1, "{at}");
            assert_eq!(events[0].0, Cause::Reconciliation, "{at}");
        } else {
            assert!(events.is_empty(), "{at}: {events:?}");
        }
    }
}

/// A QEMU whose limits drifted from the spec (changed behind agentd's
/// back) gets the stored ones again at adoption.
#[tokio::test]
async fn adoption_gives_qemu_the_stored_limits_again() {
    let host = Host::new();
    let agent = host.agent();
    let pid = running(&agent, iops(200)).await;
    crash(agent).await;
    host.vmm.set_throttle_group(pid, "qos-vda", iops(7).limits);
    let agent = host.agent();
    agent.reconcile().await.unwrap();
    assert_eq!(
        host.vmm.throttle_group(pid, "qos-vda"),
        Some(iops(200).limits)
    );
}
