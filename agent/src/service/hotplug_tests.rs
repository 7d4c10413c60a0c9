//! Hot-plug on the fakes: a pdisk disk and a NIC added to and removed
//! from a running guest (QEMU's devices, exports, taps and rules follow the
//! spec), a detach the guest ignores, another project's volume refused,
//! a stopped guest's spec, and crashes between QEMU and the store
//! reconciled from what QEMU has. Runs on `service_tests.rs`'s harness.

use std::sync::Arc;
use std::time::Duration;

use stratus_core::error::ErrorKind;

use super::{crash, events_of, small_spec, Host};
use crate::service::Agent;
use crate::spec::{Cause, Disk, DiskSource, EventType, Nic};

fn pdisk(volume: &str) -> Disk {
    Disk {
        qos: Default::default(),
        source: DiskSource::Pdisk(volume.parse().unwrap()),
        read_only: false,
        boot_index: 0,
    }
}

fn nic(mac: &str) -> Nic {
    Nic {
        bridge: "br0".into(),
        mac: mac.parse().unwrap(),
        vlan: 0,
        ips: Vec::new(),
    }
}

const WAIT: Duration = Duration::from_secs(1);

/// The last event of `kind` of guest `vm`: its cause and detail.
fn last(agent: &Agent, vm: &str, kind: EventType) -> (Cause, String) {
    let vm = agent.get_vm(vm).unwrap();
    let e = events_of(agent, &vm)
        .into_iter()
        .rev()
        .find(|e| e.kind == kind)
        .unwrap_or_else(|| panic!("no {kind:?}"));
    (e.cause, e.detail)
}

async fn running(host: &Host, agent: &Arc<Agent>) -> u32 {
    host.pdisk.add_volume("extra");
    agent
        .create_vm(small_spec("web", "root"), "", "")
        .await
        .unwrap();
    agent.start_vm("web").await.unwrap().runtime.unwrap().pid
}

#[tokio::test]
async fn a_pdisk_disk_and_a_nic_are_hot_plugged_into_a_running_guest_and_unplugged() {
    let host = Host::new();
    let agent = host.agent();
    let pid = running(&host, &agent).await;
    assert_eq!(host.pdisk.exported().len(), 1);

    let vm = agent.attach_disk_to("web", pdisk("extra")).await.unwrap();
    // vda (root), vdb (the seed), then the hot-plugged disk.
    assert_eq!(vm.spec.disks.len(), 2);
    let rt = vm.runtime.as_ref().unwrap();
    assert_eq!(rt.disks.last().unwrap().device, "vdc");
    assert!(vm.pending_unexports.is_empty());
    assert!(vm.hotplug.is_none());
    assert_eq!(host.pdisk.exported().len(), 2);
    assert_eq!(host.vmm.devices_of(pid)["vdc-dev"].as_deref(), Some("hp0"));
    let (cause, detail) = last(&agent, "web", EventType::DiskAttached);
    assert_eq!(cause, Cause::Api);
    assert!(
        detail.contains("vdc pdisk:extra hot-plugged on hp0"),
        "{detail}"
    );
    // Twice: refused, nothing changed.
    let err = agent
        .attach_disk_to("web", pdisk("extra"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert_eq!(host.pdisk.exported().len(), 2);

    let vm = agent
        .attach_nic_to("web", nic("52:54:00:00:00:09"))
        .await
        .unwrap();
    assert_eq!(vm.spec.nics.len(), 2);
    let tap = vm.runtime.as_ref().unwrap().nics[1].tap.clone();
    assert!(host.net.taps().contains(&tap));
    assert!(
        host.nft.protected().contains(&tap),
        "rules before the bridge"
    );
    assert!(
        host.nft.violations().is_empty(),
        "{:?}",
        host.nft.violations()
    );
    assert_eq!(host.vmm.devices_of(pid)["net1-dev"].as_deref(), Some("hp1"));

    // The seed is not the caller's to detach.
    let err = agent
        .detach_disk_from("web", "vdb", WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");

    let vm = agent.detach_disk_from("web", "vdc", WAIT).await.unwrap();
    assert_eq!(vm.spec.disks.len(), 1);
    assert_eq!(host.pdisk.exported().len(), 1);
    assert!(!host.vmm.devices_of(pid).contains_key("vdc-dev"));
    assert_eq!(last(&agent, "web", EventType::DiskDetached).0, Cause::Api);

    let vm = agent
        .detach_nic_from("web", "52:54:00:00:00:09", WAIT)
        .await
        .unwrap();
    assert_eq!(vm.spec.nics.len(), 1);
    assert!(!host.net.taps().contains(&tap));
    assert!(!host.nft.protected().contains(&tap));
    assert!(!host.vmm.devices_of(pid).contains_key("net1-dev"));
}

#[tokio::test]
async fn a_detach_the_guest_ignores_keeps_the_disk_until_qemu_lets_it_go() {
    let host = Host::new();
    let agent = host.agent();
    let pid = running(&host, &agent).await;
    agent.attach_disk_to("web", pdisk("extra")).await.unwrap();
    host.vmm.keep_devices(pid, true);
    let err = agent
        .detach_disk_from("web", "vdc", WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    // Nothing changed but the event saying so.
    let vm = agent.get_vm("web").unwrap();
    assert_eq!(vm.spec.disks.len(), 2);
    assert_eq!(host.pdisk.exported().len(), 2);
    let (_, detail) = last(&agent, "web", EventType::DiskDetachPending);
    assert!(detail.contains("vdc pdisk:extra"), "{detail}");

    // The guest lets go while agentd is away: the restarted agentd sees
    // QEMU no longer has it and finishes the detach.
    host.vmm.release_device(pid, "vdc-dev");
    crash(agent).await;
    let agent = host.agent();
    agent.reconcile().await.unwrap();
    let vm = agent.get_vm("web").unwrap();
    assert_eq!(vm.spec.disks.len(), 1);
    assert_eq!(host.pdisk.exported().len(), 1);
    assert_eq!(
        last(&agent, "web", EventType::DiskDetached).0,
        Cause::Reconciliation
    );
}

#[tokio::test]
async fn another_projects_volume_is_not_found_and_nothing_changes() {
    let host = Host::new();
    let agent = host.agent();
    host.pdisk.add_volume_in("ours", "p1");
    host.pdisk.add_volume_in("theirs", "p2");
    agent
        .create_vm(small_spec("web", "ours"), "p1", "")
        .await
        .unwrap();
    let before = agent.start_vm("web").await.unwrap();
    let err = agent
        .attach_disk_to("web", pdisk("theirs"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let after = agent.get_vm("web").unwrap();
    assert_eq!(after.spec, before.spec);
    assert_eq!(host.pdisk.exported().len(), 1);
    // Not a pdisk volume: refused at once.
    let file = Disk {
        qos: Default::default(),
        source: DiskSource::File("/etc/passwd".into()),
        read_only: true,
        boot_index: 0,
    };
    let err = agent.attach_disk_to("web", file).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
}

#[tokio::test]
async fn a_stopped_guest_changes_its_spec_and_the_next_start_attaches_it() {
    let host = Host::new();
    let agent = host.agent();
    host.pdisk.add_volume("extra");
    agent
        .create_vm(small_spec("web", "root"), "", "")
        .await
        .unwrap();
    let vm = agent.attach_disk_to("web", pdisk("extra")).await.unwrap();
    assert_eq!(vm.spec.disks.len(), 2);
    assert!(host.pdisk.exported().is_empty());
    agent.start_vm("web").await.unwrap();
    assert_eq!(host.pdisk.exported().len(), 2);
    agent.stop_vm("web", WAIT, true).await.unwrap();
    let vm = agent.detach_disk_from("web", "vdb", WAIT).await.unwrap();
    assert_eq!(vm.spec.disks.len(), 1);
    let err = agent
        .detach_disk_from("web", "vdq", WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

/// Crashes between the steps of a disk hot-plug: before QEMU was asked
/// the intent is undone (no export left); after, the restarted agentd
/// finds the device in QEMU and finishes it. Either way the spec says
/// what QEMU has.
#[tokio::test]
async fn a_crash_mid_hot_plug_is_finished_or_undone_from_what_qemu_has() {
    for (at, in_qemu) in [("hotplug.disk_intent", false), ("hotplug.disk_added", true)] {
        let host = Host::new();
        let agent = host.agent();
        let pid = running(&host, &agent).await;
        agent.arm_crash_point(Some(at));
        let a = agent.clone();
        let died = tokio::spawn(async move { a.attach_disk_to("web", pdisk("extra")).await })
            .await
            .expect_err("the attach should have crashed");
        assert!(died.is_panic(), "{at}");
        crash(agent).await;
        assert_eq!(
            host.vmm.devices_of(pid).contains_key("vdc-dev"),
            in_qemu,
            "{at}"
        );
        let agent = host.agent();
        agent.reconcile().await.unwrap();
        let vm = agent.get_vm("web").unwrap();
        assert!(vm.hotplug.is_none(), "{at}");
        if in_qemu {
            assert_eq!(vm.spec.disks.len(), 2, "{at}");
            assert_eq!(host.pdisk.exported().len(), 2, "{at}");
            assert_eq!(
                last(&agent, "web", EventType::DiskAttached).0,
                Cause::Reconciliation
            );
        } else {
            assert_eq!(vm.spec.disks.len(), 1, "{at}");
            assert_eq!(host.pdisk.exported().len(), 1, "{at}: export undone");
        }
    }
}

#[tokio::test]
async fn a_pdisk_disk_grows_in_pdisk_then_in_qemu() {
    let host = Host::new();
    let agent = host.agent();
    let pid = running(&host, &agent).await;
    agent.resize_disk("web", "vda", 2 << 30).await.unwrap();
    assert_eq!(host.vmm.size_of(pid, "vda"), Some(2 << 30));
    let (cause, detail) = last(&agent, "web", EventType::DiskResized);
    assert_eq!(cause, Cause::Api);
    assert!(
        detail.contains("vda pdisk:") && detail.contains("size=2147483648"),
        "{detail}"
    );
    // A shrink is pdisk's to refuse; QEMU is not told.
    let err = agent.resize_disk("web", "vda", 1 << 20).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert_eq!(host.vmm.size_of(pid, "vda"), Some(2 << 30));
    // The seed is no pdisk disk.
    let err = agent.resize_disk("web", "vdb", 4 << 30).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    // Stopped: pdisk only.
    agent.stop_vm("web", WAIT, true).await.unwrap();
    agent.resize_disk("web", "vda", 3 << 30).await.unwrap();
    assert!(last(&agent, "web", EventType::DiskResized)
        .1
        .contains("size=3221225472"));
}
