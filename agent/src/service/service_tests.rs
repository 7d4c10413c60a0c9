//! The agent invariants (ARCHITECTURE.md, "agent invariants"), each pinned
//! without root: the guest service runs against the in-memory pdisk,
//! network and QEMU of [`crate::fakes`], which fail any call on demand and
//! outlive an agent that "crashes" (a crash point panics its task; a new
//! agent then opens the same store, as a restarted agentd would).

use std::sync::Arc;
use std::time::Duration;

use stratus_core::error::ErrorKind;
use stratus_core::types::ByteSize;

use super::{Agent, AgentSettings, HostEffects, HostFacts};
use crate::attach::{AttachMode, KernelOptions};
use crate::confine::{PrivilegeDrop, QemuCaps, QemuUsers};
use crate::fakes::{FakeNet, FakeNft, FakeVmm, FakeVolumes};
use crate::net::HostNet;
use crate::qmp::{PanicAction, QmpEventKind};
use crate::spec::{Cause, Context, Disk, DiskSource, EventType, Nic, VmSpec, VmState};
use crate::store::{AgentStore, Event, OwnedVolume, VmRecord};
use crate::vmm::Accel;

/// A host: the state directory and the fakes, which survive agents.
struct Host {
    dir: tempfile::TempDir,
    pdisk: Arc<FakeVolumes>,
    /// A second storage host, the agent's pdisk server "b".
    pdisk_b: Arc<FakeVolumes>,
    net: Arc<FakeNet>,
    /// `nft`, behind the agent's command runner.
    nft: Arc<FakeNft>,
    /// The agents' command runner (nft's answers; every other command
    /// succeeds), kept to see the argv agentd ran.
    runner: stratus_core::runner::FakeRunner,
    vmm: Arc<FakeVmm>,
}

impl Host {
    fn new() -> Host {
        let pdisk = FakeVolumes::new();
        pdisk.add_volume("root");
        pdisk.add_volume("data");
        let pdisk_b = FakeVolumes::new();
        pdisk_b.add_volume("root-b");
        pdisk_b.add_volume("data-b");
        let net = FakeNet::new();
        let nft = FakeNft::new(net.clone());
        Host {
            dir: {
                let d = tempfile::tempdir().unwrap();
                std::fs::create_dir(d.path().join("host-files")).unwrap();
                d
            },
            pdisk,
            pdisk_b,
            runner: nft.runner(),
            nft,
            net,
            vmm: FakeVmm::new(),
        }
    }

    /// An agent on this host's store and fakes (a fresh agentd process),
    /// confining guests on a QEMU with seccomp.
    fn agent(&self) -> Arc<Agent> {
        self.agent_with(|_, _| {})
    }

    /// An agent whose settings and host facts `adjust` changes first.
    fn agent_with(&self, adjust: impl FnOnce(&mut AgentSettings, &mut HostFacts)) -> Arc<Agent> {
        self.try_agent_with(adjust).unwrap()
    }

    /// [`Self::agent_with`], or why the agent refused its settings.
    fn try_agent_with(
        &self,
        adjust: impl FnOnce(&mut AgentSettings, &mut HostFacts),
    ) -> stratus_core::error::Result<Arc<Agent>> {
        let state = self.dir.path().join("state");
        let mut kernel = KernelOptions::new("iqn.2026-11.io.stratus:unit");
        kernel.sys = self.dir.path().join("sys");
        kernel.dev = self.dir.path().join("dev");
        kernel.iscsi_db = self.dir.path().join("iscsi");
        let mut settings = AgentSettings {
            state_dir: state.clone(),
            default_bridge: "br0".into(),
            allowed_bridges: vec!["br1".into()],
            initiator_iqn: "iqn.2026-11.io.stratus:unit".into(),
            attach: AttachMode::Qemu,
            chap_mutual: false,
            local_host_id: None,
            pdisk: Vec::new(),
            ceph: Default::default(),
            cpu_overcommit: 4,
            reserved_memory: 0,
            image_quota: None,
            image_policy: None,
            image_file_roots: Vec::new(),
            host_file_roots: vec![self.dir.path().join("host-files")],
            image_allow_private: true,
            qemu_users: QemuUsers::pool("64000-64002").unwrap(),
            allow_unsandboxed: false,
            cgroup_parent: None,
            console_log_max: crate::console::DEFAULT_MAX,
            hotplug_ports: 8,
            disk_io: crate::disk_io::DiskIo::measured_default(false),
            peer_tls: None,
            migration_tls: None,
            migration_max_bandwidth: None,
        };
        let mut facts = HostFacts {
            hostname: "unit".into(),
            cpus: 4,
            memory: 8 << 30,
            accel: Accel::Tcg,
            accel_reason: "unit test".into(),
            qemu_version: "7.2.0".into(),
            io_uring: false,
            qemu_caps: QemuCaps {
                drop: PrivilegeDrop::Runas,
                seccomp: true,
            },
        };
        adjust(&mut settings, &mut facts);
        Agent::with_effects(
            AgentStore::open(&state).unwrap(),
            Arc::new(self.runner.clone()),
            settings,
            facts,
            HostEffects {
                volumes: [
                    (crate::spec::ServerName::default(), self.pdisk.clone() as _),
                    ("b".parse().unwrap(), self.pdisk_b.clone() as _),
                ]
                .into(),
                net: self.net.clone(),
                vmm: self.vmm.clone(),
                nvme: crate::attach::NvmeOptions::beside(&kernel),
                // The bus exists only once a test makes it (krbd_host).
                rbd_bus: Arc::new(crate::attach::krbd::tests::FakeKernel::at(self.dir.path())),
                kernel,
            },
        )
    }

    /// Files a start leaves in the guest's directory that must not outlive
    /// its attachments: CHAP secrets and the seed (its user-data).
    fn secrets(&self, vm: &VmRecord) -> Vec<String> {
        let dir = self.dir.path().join("state/vms").join(vm.uuid.to_string());
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("chap-") || n == "seed.img")
            .collect()
    }

    /// Asserts that nothing of guest `vm` is attached on the host.
    fn assert_nothing_attached(&self, vm: &VmRecord, when: &str) {
        assert!(self.pdisk.exported().is_empty(), "{when}: exports left");
        assert!(
            self.pdisk_b.exported().is_empty(),
            "{when}: exports left on b"
        );
        assert!(self.net.taps().is_empty(), "{when}: taps left");
        assert!(self.nft.protected().is_empty(), "{when}: tap rules left");
        assert!(
            self.nft.violations().is_empty(),
            "{when}: {:?}",
            self.nft.violations()
        );
        assert!(self.vmm.pids().is_empty(), "{when}: QEMU left");
        assert!(self.secrets(vm).is_empty(), "{when}: secrets left");
    }
}

/// Two pdisk disks, two NICs (the second on a VLAN) and a context (seed):
/// every kind of attachment a start makes.
fn spec(name: &str) -> VmSpec {
    let disk = |v: &str| Disk {
        qos: Default::default(),
        source: DiskSource::Pdisk(v.parse().unwrap()),
        read_only: false,
        boot_index: 0,
    };
    let nic = |mac: &str, vlan| Nic {
        bridge: "br0".into(),
        mac: mac.parse().unwrap(),
        vlan,
        ips: Vec::new(),
    };
    VmSpec {
        name: name.parse().unwrap(),
        vcpus: 1,
        memory: ByteSize(64 << 20),
        disks: vec![disk("root"), disk("data")],
        nics: vec![nic("52:54:00:00:00:01", 0), nic("52:54:00:00:00:02", 42)],
        kernel: None,
        labels: Default::default(),
        context: Some(Context::default()),
    }
}

/// A spec with one disk of its own, so that several guests can run.
fn small_spec(name: &str, volume: &str) -> VmSpec {
    let mut s = spec(name);
    s.disks.truncate(1);
    s.disks[0].source = DiskSource::Pdisk(volume.parse().unwrap());
    s.nics.truncate(1);
    s
}

/// The volumes of exports left to undo (all on the default server here).
fn uuids(exports: &[crate::store::PdiskExport]) -> Vec<String> {
    assert!(exports.iter().all(|e| e.server.is_default()));
    exports.iter().map(|e| e.volume.clone()).collect()
}

fn events_of(agent: &Agent, vm: &VmRecord) -> Vec<Event> {
    agent
        .store()
        .events_since(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.vm_uuid == vm.uuid)
        .collect()
}

/// Makes `agent` "crash": its monitors stop (no exit is recorded), and
/// once the last handle is gone its store is closed.
async fn crash(agent: Arc<Agent>) {
    for m in agent.monitors.lock().unwrap().drain(..) {
        m.abort();
    }
    while Arc::strong_count(&agent) > 1 {
        tokio::task::yield_now().await;
    }
    drop(agent);
}

/// Starts `name` with the crash point `at` armed: the start's task dies there.
async fn start_and_crash_at(agent: &Arc<Agent>, name: &str, at: &'static str) {
    *agent.crash_at.lock().unwrap() = Some(at);
    let a = agent.clone();
    let name = name.to_string();
    let died = tokio::spawn(async move { a.start_vm(&name).await })
        .await
        .expect_err("the start should have crashed");
    assert!(died.is_panic(), "{at}: {died}");
    *agent.crash_at.lock().unwrap() = None;
}

#[tokio::test]
async fn a_start_that_fails_at_any_step_undoes_everything_and_says_why() {
    // (operation, which call of it fails): each step of a start.
    let steps: [(&str, &'static str, usize); 8] = [
        ("the second disk's export", "export_volume", 2),
        ("the second tap's rules", "nft_protect", 2),
        ("the second tap", "create_tap", 2),
        ("the bridge port", "attach_to_bridge", 1),
        ("the VLAN", "set_vlan", 1),
        ("the launch", "launch", 1),
        ("the QMP connection", "connect_qmp", 1),
        ("the first QMP query", "query_status", 1),
    ];
    for (step, op, nth) in steps {
        let host = Host::new();
        let agent = host.agent();
        let vm = agent.create_vm(spec("web1"), "", "").await.unwrap();
        match op {
            "export_volume" => host.pdisk.failures.fail_nth(op, nth),
            "create_tap" | "attach_to_bridge" | "set_vlan" => host.net.failures.fail_nth(op, nth),
            "nft_protect" => host.nft.failures.fail_nth(op, nth),
            _ => host.vmm.failures.fail_nth(op, nth),
        }
        let err = agent.start_vm("web1").await.expect_err(step);
        let cause = format!("injected failure of {op}");
        assert!(err.to_string().contains(&cause), "{step}: {err}");

        let got = agent.get_vm("web1").unwrap();
        assert_eq!(got.state, VmState::Error, "{step}");
        assert!(
            got.state_reason.contains(&cause),
            "{step}: {}",
            got.state_reason
        );
        assert_eq!(got.runtime, None, "{step}");
        host.assert_nothing_attached(&got, step);
        let last = events_of(&agent, &vm).pop().unwrap();
        assert_eq!(last.kind, EventType::Error, "{step}");
        assert_eq!(last.state, Some(VmState::Error), "{step}");
        assert!(last.detail.contains(&cause), "{step}: {}", last.detail);
        assert_eq!(got.last_event_seq, last.seq, "{step}");

        // The failure is not sticky: the next start works.
        let vm = agent.start_vm("web1").await.unwrap();
        assert_eq!(vm.state, VmState::Running, "{step}");
        assert_eq!(host.pdisk.exported().len(), 2, "{step}");
        assert_eq!(host.net.taps().len(), 2, "{step}");
        assert_eq!(host.nft.protected(), host.net.taps(), "{step}");
        assert!(host.nft.violations().is_empty(), "{step}");
    }
}

#[tokio::test]
async fn a_crash_between_start_steps_is_undone_at_the_next_start() {
    for at in [
        // pdisk granted the export, the attachment is not recorded yet:
        // only the export's intent says it must be undone.
        "start.exported",
        "start.disk_attached",
        "start.nic_attached",
        "start.launched",
    ] {
        let host = Host::new();
        let agent = host.agent();
        agent.create_vm(spec("web1"), "", "").await.unwrap();
        start_and_crash_at(&agent, "web1", at).await;
        // What the crash left: recorded attachments, still in place.
        let left = agent.get_vm("web1").unwrap();
        assert_eq!(left.state, VmState::Starting, "{at}");
        assert!(!host.pdisk.exported().is_empty(), "{at}");
        crash(agent).await;

        let agent = host.agent();
        let report = agent.reconcile().await.unwrap();
        assert!(
            report.iter().any(|l| l == "web1: interrupted start undone"),
            "{at}: {report:?}"
        );
        let vm = agent.get_vm("web1").unwrap();
        assert_eq!(vm.state, VmState::Error, "{at}");
        assert_eq!(vm.state_reason, "start interrupted by an agent restart");
        host.assert_nothing_attached(&vm, at);
        let last = events_of(&agent, &vm).pop().unwrap();
        assert_eq!(
            (last.kind, last.cause),
            (EventType::Error, Cause::Reconciliation)
        );
    }
}

#[tokio::test]
async fn a_guest_running_when_agentd_died_is_adopted_and_still_managed() {
    let host = Host::new();
    let agent = host.agent();
    let web1 = agent.create_vm(spec("web1"), "", "").await.unwrap();
    start_and_crash_at(&agent, "web1", "start.running").await;
    crash(agent).await;
    let pid = host.vmm.pids()[0];
    // A tap of a guest that is gone, and an operator's tap.
    let gone = crate::net::tap_name_for(uuid::Uuid::new_v4(), 0).to_string();
    host.net.add_tap(&gone);
    host.net.add_tap("stoperator");
    // Rules of a tap whose guest is gone (and whose tap went with it).
    let gone_rules = crate::net::tap_name_for(uuid::Uuid::new_v4(), 0).to_string();
    host.nft.add_protected(&gone_rules);
    let kept = host.nft.protected().len();
    // A cgroup of a guest no record holds, and the running guest's.
    let stray = uuid::Uuid::new_v4();
    host.vmm.add_cgroup(stray);
    host.vmm.add_cgroup(web1.uuid);

    let agent = host.agent();
    let report = agent.reconcile().await.unwrap();
    assert!(
        report.contains(&format!("adopted web1 (pid {pid})")),
        "{report:?}"
    );
    assert!(
        report.contains(&format!("removed leftover tap {gone}")),
        "{report:?}"
    );
    assert!(!host.net.taps().contains(&gone));
    assert!(host.net.taps().contains(&"stoperator".to_string()));
    host.net.failures.calls();
    let _ = host.net.delete_tap(&"stoperator".parse().unwrap());
    let vm = agent.get_vm("web1").unwrap();
    assert_eq!(vm.state, VmState::Running);
    let last = events_of(&agent, &vm).pop().unwrap();
    assert_eq!(
        (last.kind, last.cause),
        (EventType::Adopted, Cause::Reconciliation)
    );
    // Its taps were recorded, so the sweep of leftover taps kept them,
    // and their rules (applied again); the gone tap's rules went.
    assert_eq!(host.net.taps().len(), 2);
    assert_eq!(kept, 3);
    assert_eq!(host.nft.protected(), host.net.taps());
    assert!(
        report.contains(&format!(
            "removed anti-spoofing rules of gone tap {gone_rules}"
        )),
        "{report:?}"
    );
    assert!(
        report.contains(&format!("removed cgroup vm-{stray} of no recorded guest")),
        "{report:?}"
    );
    assert_eq!(host.vmm.stray_cgroups(), vec![web1.uuid]);
    // Each removal is a host event too, caused by reconciliation.
    let removals: Vec<String> = agent
        .store()
        .events_since(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EventType::LeftoverRemoved)
        .map(|e| {
            assert_eq!(e.cause, Cause::Reconciliation);
            assert!(e.vm_uuid.is_nil() && e.project.is_empty(), "{e:?}");
            e.detail
        })
        .collect();
    assert_eq!(
        removals,
        vec![
            format!("removed leftover tap {gone}"),
            format!("removed anti-spoofing rules of gone tap {gone_rules}"),
            format!("removed cgroup vm-{stray} of no recorded guest"),
        ]
    );

    // The new monitor follows it: a stop is confirmed and undoes everything.
    let vm = agent
        .stop_vm("web1", Duration::from_secs(5), false)
        .await
        .unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    host.assert_nothing_attached(&vm, "after the stop");
}

#[tokio::test]
async fn the_reconciler_skips_a_broken_guest_and_reconciles_the_others() {
    let host = Host::new();
    let agent = host.agent();
    for (name, volume) in [("a", "root"), ("b", "data")] {
        agent
            .create_vm(small_spec(name, volume), "", "")
            .await
            .unwrap();
        agent.start_vm(name).await.unwrap();
    }
    crash(agent).await;
    // Guest a's QEMU lives but its QMP query fails (guests reconcile by name).
    host.vmm.failures.fail_times("query_status", 1);

    let agent = host.agent();
    let report = agent
        .reconcile()
        .await
        .expect("one broken guest must not fail the start-up");
    assert!(
        report
            .iter()
            .any(|l| l.starts_with("a: could not be reconciled (")
                && l.contains("injected failure of query_status")),
        "{report:?}"
    );
    assert!(
        report.iter().any(|l| l.starts_with("adopted b ")),
        "{report:?}"
    );
    // a is left as it was, b is managed again.
    let a = agent.get_vm("a").unwrap();
    assert_eq!(a.state, VmState::Running);
    assert_eq!(
        events_of(&agent, &a).pop().unwrap().kind,
        EventType::Running
    );
    assert_eq!(host.vmm.pids().len(), 2);
    agent.pause_vm("b").await.unwrap();
    assert_eq!(agent.get_vm("b").unwrap().state, VmState::Paused);
}

#[tokio::test]
async fn destroy_retries_an_unexport_it_could_not_do_until_it_is_done() {
    let host = Host::new();
    let agent = host.agent();
    agent
        .create_vm(small_spec("web1", "root"), "", "")
        .await
        .unwrap();
    agent.start_vm("web1").await.unwrap();
    let exported = host.pdisk.exported();
    assert_eq!(exported.len(), 1);
    host.pdisk.failures.fail("unexport_volume");

    let err = agent
        .destroy_vm("web1", Duration::from_secs(5))
        .await
        .expect_err("pdisk kept the export");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("agentd retries"), "{err}");
    // Nothing runs on this host any more, but the record remembers the export.
    let vm = agent.get_vm("web1").unwrap();
    assert_eq!(vm.state, VmState::Destroying);
    assert_eq!(uuids(&vm.pending_unexports), exported);
    assert_eq!(host.pdisk.exported(), exported);
    assert!(host.net.taps().is_empty() && host.vmm.pids().is_empty());
    // It holds no capacity, and its name is still taken.
    assert_eq!(agent.host_info().unwrap().free_vcpus, 16);
    assert!(agent
        .create_vm(small_spec("web1", "data"), "", "")
        .await
        .is_err());

    // The timer's retry while pdisk still fails: nothing is dropped.
    let report = agent.retry_leftovers().await.unwrap();
    assert!(
        report[0].starts_with("web1: destroy still unfinished"),
        "{report:?}"
    );
    assert_eq!(
        uuids(&agent.get_vm("web1").unwrap().pending_unexports),
        exported
    );

    // agentd restarts once pdisk answers: the destroy finishes at start.
    crash(agent).await;
    host.pdisk.failures.heal("unexport_volume");
    let tries = host.pdisk.failures.count("unexport_volume");
    let agent = host.agent();
    let report = agent.reconcile().await.unwrap();
    assert!(
        report.contains(&"web1: unfinished destroy finished".to_string()),
        "{report:?}"
    );
    assert_eq!(host.pdisk.failures.count("unexport_volume"), tries + 1);
    assert!(host.pdisk.exported().is_empty());
    assert!(agent.get_vm("web1").is_err());
    let all = agent.store().events_since(0, 10_000).unwrap();
    let last = all.last().unwrap();
    assert_eq!(
        (last.kind, last.vm_name.as_str()),
        (EventType::Destroyed, "web1")
    );
}

#[tokio::test]
async fn destroy_retries_an_image_clone_delete_on_the_timer() {
    let host = Host::new();
    let agent = host.agent();
    let mut vm = agent
        .create_vm(small_spec("web1", "root"), "", "")
        .await
        .unwrap();
    // A clone the guest owns (as an image disk's start records it).
    let clone = host.pdisk.add_volume("vm-clone-vda");
    vm.owned_volumes.push(OwnedVolume {
        device: "vda".into(),
        volume: clone,
        name: "vm-clone-vda".into(),
        server: Default::default(),
    });
    agent.store().commit(&mut vm, &[]).unwrap();
    host.pdisk.failures.fail_times("delete_volume", 2);

    assert!(agent
        .destroy_vm("web1", Duration::from_secs(5))
        .await
        .is_err());
    let left = agent.get_vm("web1").unwrap();
    assert_eq!(
        (left.state, left.owned_volumes.len()),
        (VmState::Destroying, 1)
    );
    assert!(host
        .pdisk
        .volume_names()
        .contains(&"vm-clone-vda".to_string()));

    agent.spawn_leftover_retries(Duration::from_millis(20));
    tokio::time::timeout(Duration::from_secs(10), async {
        while agent.get_vm("web1").is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the timer finishes the destroy");
    assert!(!host
        .pdisk
        .volume_names()
        .contains(&"vm-clone-vda".to_string()));
    assert_eq!(host.pdisk.failures.count("delete_volume"), 3);
}

#[tokio::test]
async fn a_crash_mid_destroy_is_finished_at_the_next_start() {
    let host = Host::new();
    let agent = host.agent();
    agent.create_vm(spec("web1"), "", "").await.unwrap();
    agent.start_vm("web1").await.unwrap();
    agent
        .stop_vm("web1", Duration::from_secs(5), false)
        .await
        .unwrap();
    *agent.crash_at.lock().unwrap() = Some("destroy.marked");
    let a = agent.clone();
    let died = tokio::spawn(async move { a.destroy_vm("web1", Duration::from_secs(5)).await })
        .await
        .unwrap_err();
    assert!(died.is_panic());
    assert_eq!(agent.get_vm("web1").unwrap().state, VmState::Destroying);
    crash(agent).await;

    let agent = host.agent();
    agent.reconcile().await.unwrap();
    assert!(agent.get_vm("web1").is_err());
}

#[tokio::test]
async fn an_unexport_that_failed_at_stop_is_retried_and_never_undoes_a_new_start() {
    let host = Host::new();
    let agent = host.agent();
    agent
        .create_vm(small_spec("web1", "root"), "", "")
        .await
        .unwrap();
    agent.start_vm("web1").await.unwrap();
    host.pdisk.failures.fail_times("unexport_volume", 1);
    let vm = agent
        .stop_vm("web1", Duration::from_secs(5), false)
        .await
        .unwrap();
    assert_eq!(vm.pending_unexports.len(), 1);
    assert_eq!(host.pdisk.exported(), uuids(&vm.pending_unexports));

    // Started again before the retry: the export is the guest's again.
    let vm = agent.start_vm("web1").await.unwrap();
    assert!(vm.pending_unexports.is_empty());
    assert!(agent.retry_leftovers().await.unwrap().is_empty());
    assert_eq!(host.pdisk.exported().len(), 1);

    // Stopped with a failed unexport again: this time the retry does it.
    host.pdisk.failures.fail_times("unexport_volume", 1);
    agent
        .stop_vm("web1", Duration::from_secs(5), false)
        .await
        .unwrap();
    let report = agent.retry_leftovers().await.unwrap();
    assert_eq!(
        report,
        vec!["web1: 1 left-over export(s) undone".to_string()]
    );
    assert!(host.pdisk.exported().is_empty());
    assert!(agent.get_vm("web1").unwrap().pending_unexports.is_empty());
}

#[tokio::test]
async fn qemu_events_become_journal_events_with_their_state() {
    let host = Host::new();
    let agent = host.agent();
    let vm = agent.create_vm(spec("web1"), "", "").await.unwrap();
    agent.start_vm("web1").await.unwrap();
    agent.pause_vm("web1").await.unwrap();
    agent.resume_vm("web1").await.unwrap();
    agent.reboot_vm("web1").await.unwrap();
    agent
        .stop_vm("web1", Duration::from_secs(5), false)
        .await
        .unwrap();
    agent.start_vm("web1").await.unwrap();
    // The guest panics, QEMU exits.
    let pid = host.vmm.pids()[0];
    host.vmm.emit(
        pid,
        QmpEventKind::GuestPanicked {
            action: PanicAction::Poweroff,
        },
    );
    host.vmm.die(pid);
    let mut events = agent
        .journal()
        .follow(0, crate::journal::EventFilter::vm("web1"));
    use futures::StreamExt;
    while events.next().await.unwrap().unwrap().kind != EventType::Crashed {}
    let crashed = agent.get_vm("web1").unwrap();
    assert_eq!(crashed.state, VmState::Crashed);
    host.assert_nothing_attached(&crashed, "after the crash");
    agent
        .destroy_vm("web1", Duration::from_secs(5))
        .await
        .unwrap();

    use EventType as E;
    use VmState as S;
    let start = [
        (E::Starting, S::Starting),
        (E::DiskAttached, S::Starting),
        (E::DiskAttached, S::Starting),
        (E::DiskAttached, S::Starting),
        (E::NicAttached, S::Starting),
        (E::NicAttached, S::Starting),
        (E::Running, S::Running),
    ];
    let detach = |s| {
        [
            (E::DiskDetached, s),
            (E::DiskDetached, s),
            (E::DiskDetached, s),
            (E::NicDetached, s),
            (E::NicDetached, s),
        ]
    };
    let mut want = vec![(E::Created, S::Defined)];
    want.extend(start);
    want.extend([
        (E::Paused, S::Paused),
        (E::Resumed, S::Running),
        (E::Rebooted, S::Running),
        (E::Stopping, S::Stopping),
    ]);
    want.extend(detach(S::Stopped));
    want.push((E::Stopped, S::Stopped));
    want.extend(start);
    want.extend(detach(S::Crashed));
    want.push((E::Crashed, S::Crashed));
    want.push((E::Destroyed, S::Destroyed));
    let got: Vec<(EventType, VmState)> = events_of(&agent, &vm)
        .iter()
        .map(|e| (e.kind, e.state.unwrap()))
        .collect();
    assert_eq!(got, want);
    let crashed = events_of(&agent, &vm)
        .into_iter()
        .find(|e| e.kind == E::Crashed)
        .unwrap();
    assert_eq!(crashed.cause, Cause::GuestPanic);
}

#[tokio::test]
async fn state_and_events_are_committed_together_and_seqs_are_never_reused() {
    let host = Host::new();
    let agent = host.agent();
    agent.create_vm(spec("web1"), "", "").await.unwrap();
    start_and_crash_at(&agent, "web1", "start.running").await;
    crash(agent).await;
    let agent = host.agent();
    agent.reconcile().await.unwrap();
    agent.pause_vm("web1").await.unwrap();
    host.pdisk.failures.fail("unexport_volume");
    let _ = agent.destroy_vm("web1", Duration::from_secs(5)).await;
    crash(agent).await;
    host.pdisk.failures.heal("unexport_volume");
    let agent = host.agent();
    agent.reconcile().await.unwrap();

    // Dense seqs across three agents and their restarts.
    let all = agent.store().events_since(0, 10_000).unwrap();
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());
    assert_eq!(agent.store().last_seq().unwrap(), all.len() as u64);
    // One commit, one state: its events all carry the state it wrote (a
    // commit's events share their time). And the state moves only in a
    // commit that announces it, or the stream would disagree with the record.
    let mut commits: Vec<Vec<&Event>> = Vec::new();
    for e in &all {
        match commits.last_mut() {
            Some(c) if c[0].time == e.time => c.push(e),
            _ => commits.push(vec![e]),
        }
    }
    for c in &commits {
        assert!(c.iter().all(|e| e.state == c[0].state), "{c:?}");
    }
    for pair in commits.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let announces = b.iter().any(|e| {
            matches!(
                e.kind,
                EventType::Starting
                    | EventType::Running
                    | EventType::Paused
                    | EventType::Resumed
                    | EventType::Stopping
                    | EventType::Stopped
                    | EventType::Crashed
                    | EventType::Error
                    | EventType::Adopted
                    | EventType::Destroyed
            )
        });
        assert!(
            a[0].state == b[0].state || announces,
            "{b:?} moved the state without saying"
        );
    }
}

/// `file:` disks, kernels and initrds come only from beneath a
/// `--host-file-root`; QEMU is handed the very file agentd opened (its
/// `/proc` path), so a path swapped for a symlink after the check is never
/// followed; a refused spec creates nothing.
#[tokio::test]
async fn host_files_come_only_from_beneath_the_root_and_qemu_gets_the_opened_file() {
    let host = Host::new();
    let agent = host.agent();
    let root = host.dir.path().join("host-files");
    std::fs::write(root.join("data.raw"), b"disk bytes").unwrap();
    std::fs::write(root.join("vmlinuz"), b"kernel bytes").unwrap();
    std::fs::write(host.dir.path().join("shadow"), b"host secret").unwrap();
    std::os::unix::fs::symlink("../shadow", root.join("escape.raw")).unwrap();
    let file_spec = |name: &str, disk: &std::path::Path| {
        let mut s = small_spec(name, "root");
        s.context = None;
        s.disks[0].source = DiskSource::File(disk.to_path_buf());
        s.kernel = Some(crate::spec::KernelBoot {
            kernel: root.join("vmlinuz"),
            initrd: None,
            cmdline: String::new(),
        });
        s
    };
    for (disk, want) in [
        (root.join("escape.raw"), ErrorKind::PermissionDenied),
        (host.dir.path().join("shadow"), ErrorKind::PermissionDenied),
        (root.join("missing.raw"), ErrorKind::NotFound),
        (root.clone(), ErrorKind::InvalidArgument),
    ] {
        let e = agent
            .create_vm(file_spec("bad", &disk), "", "")
            .await
            .unwrap_err();
        assert_eq!(e.kind(), want, "{}: {e}", disk.display());
        assert!(!e.message().contains("host secret"));
    }
    assert!(
        agent.list_vms().unwrap().is_empty(),
        "a refused spec made a VM"
    );

    let vm = agent
        .create_vm(file_spec("good", &root.join("data.raw")), "", "")
        .await
        .unwrap();
    // Between the create and the start the disk becomes a symlink out of
    // the root: the start refuses it, nothing is attached.
    std::fs::rename(root.join("data.raw"), root.join("data.keep")).unwrap();
    std::os::unix::fs::symlink("../shadow", root.join("data.raw")).unwrap();
    let e = agent.start_vm("good").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    host.assert_nothing_attached(&vm, "after a refused host file");
    assert!(host.vmm.host_reads().is_empty());

    std::fs::remove_file(root.join("data.raw")).unwrap();
    std::fs::rename(root.join("data.keep"), root.join("data.raw")).unwrap();
    let vm = agent.start_vm("good").await.unwrap();
    let reads = host.vmm.host_reads();
    let bytes: Vec<&[u8]> = reads
        .iter()
        .map(|(p, r)| {
            assert!(
                p.starts_with("/proc"),
                "QEMU got a path, not the opened file: {p:?}"
            );
            r.as_deref().expect("QEMU could open what agentd opened")
        })
        .collect();
    assert_eq!(bytes, [&b"disk bytes"[..], &b"kernel bytes"[..]]);
    // The record names the file as the spec did.
    let disk = &vm.runtime.as_ref().unwrap().disks[0];
    assert_eq!(
        disk.source,
        format!("file:{}", root.join("data.raw").display())
    );
}

#[tokio::test]
async fn without_a_host_file_root_no_host_file_is_accepted() {
    let host = Host::new();
    let agent = host.agent_with(|s, _| s.host_file_roots.clear());
    let mut s = small_spec("k", "root");
    s.kernel = Some(crate::spec::KernelBoot {
        kernel: "/boot/vmlinuz".into(),
        initrd: None,
        cmdline: String::new(),
    });
    let e = agent.create_vm(s, "", "").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.message().contains("--host-file-root"), "{e}");
}

/// Invariant 11: every guest's QEMU runs as a uid of the pool that no
/// other live guest holds, under the sandbox; the uid is recorded before
/// QEMU starts, kept by an adopted guest across an agentd crash, and freed
/// when its QEMU is gone. A QEMU without seccomp gets no guests unless
/// agentd runs with --allow-unsandboxed (and then they run as root).
#[tokio::test]
async fn each_guest_runs_as_its_own_uid_kept_across_a_restart_and_freed_at_stop() {
    let host = Host::new();
    let agent = host.agent();
    let user_of = |agent: &Agent, name: &str| {
        let vm = agent.get_vm(name).unwrap();
        let rt = vm.runtime.unwrap();
        let launched = host.vmm.confinement_of(rt.pid).expect("launched confined");
        assert!(launched.sandbox);
        assert_eq!(rt.qemu_user, Some(launched.user), "recorded as launched");
        launched.user.uid
    };
    for (name, volume) in [("a", "root"), ("b", "data")] {
        agent
            .create_vm(small_spec(name, volume), "", "")
            .await
            .unwrap();
        agent.start_vm(name).await.unwrap();
    }
    assert_eq!((user_of(&agent, "a"), user_of(&agent, "b")), (64000, 64001));
    crash(agent).await;

    let agent = host.agent();
    agent.reconcile().await.unwrap();
    assert_eq!((user_of(&agent, "a"), user_of(&agent, "b")), (64000, 64001));
    // A new guest gets neither adopted guest's uid; the pool then runs out.
    host.pdisk.add_volume("c");
    host.pdisk.add_volume("d");
    agent.create_vm(small_spec("c", "c"), "", "").await.unwrap();
    agent.start_vm("c").await.unwrap();
    assert_eq!(user_of(&agent, "c"), 64002);
    agent.create_vm(small_spec("d", "d"), "", "").await.unwrap();
    let e = agent.start_vm("d").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    assert!(e.message().contains("64000-64002"), "{e}");
    // A stop frees its uid for the next start.
    agent
        .stop_vm("a", Duration::from_secs(5), false)
        .await
        .unwrap();
    agent.start_vm("d").await.unwrap();
    assert_eq!(user_of(&agent, "d"), 64000);
    assert!(agent.confinement().contains("uid pool 64000-64002"));

    // No seccomp: refused, nothing attached; --allow-unsandboxed: as root.
    let host = Host::new();
    let no_seccomp = |_: &mut AgentSettings, h: &mut HostFacts| h.qemu_caps.seccomp = false;
    let agent = host.agent_with(no_seccomp);
    agent
        .create_vm(small_spec("e", "root"), "", "")
        .await
        .unwrap();
    let e = agent.start_vm("e").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(e.message().contains("--allow-unsandboxed"), "{e}");
    let vm = agent.get_vm("e").unwrap();
    host.assert_nothing_attached(&vm, "after a refused start");
    assert!(agent.confinement().starts_with("guests refused"));
    crash(agent).await;
    let agent = host.agent_with(|s, h| {
        no_seccomp(s, h);
        s.allow_unsandboxed = true;
    });
    agent.start_vm("e").await.unwrap();
    let rt = agent.get_vm("e").unwrap().runtime.unwrap();
    assert_eq!(rt.qemu_user, None);
    assert!(host.vmm.launched_unconfined(rt.pid));
    assert!(agent.confinement().starts_with("UNCONFINED"));
}

#[tokio::test]
async fn nics_join_only_allowed_bridges_and_only_behind_their_rules() {
    let host = Host::new();
    let agent = host.agent();
    let mut s = small_spec("web1", "root");
    s.nics[0].bridge = "br-hosts".into();
    let e = agent.create_vm(s.clone(), "", "").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.message().contains("br-hosts"), "{e}");
    assert!(agent.list_vms().unwrap().is_empty());

    // The default bridge and --allowed-bridge ones are fine.
    for (name, bridge) in [("web1", "br0"), ("web3", "br1")] {
        let mut s = small_spec(name, if name == "web1" { "root" } else { "data" });
        s.nics[0].bridge = bridge.into();
        s.nics[0].ips = vec!["10.0.0.5".parse().unwrap()];
        agent.create_vm(s, "", "").await.unwrap();
    }
    let vm = agent.start_vm("web3").await.unwrap();
    let tap = &vm.runtime.as_ref().unwrap().nics[0];
    assert_eq!(tap.bridge, "br1");
    assert_eq!(tap.ips, ["10.0.0.5".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(host.net.bridge_of(&tap.tap).as_deref(), Some("br1"));
    assert_eq!(host.nft.protected(), vec![tap.tap.clone()]);
    assert!(
        host.nft.violations().is_empty(),
        "{:?}",
        host.nft.violations()
    );
    agent
        .stop_vm("web3", Duration::from_secs(5), false)
        .await
        .unwrap();
    assert!(host.nft.protected().is_empty());
    assert!(
        host.nft.violations().is_empty(),
        "{:?}",
        host.nft.violations()
    );

    // A bridge allowed at create but no longer at start: refused, undone.
    crash(agent).await;
    let strict = host.agent_with(|s, _| s.allowed_bridges.clear());
    let e = strict.start_vm("web3").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    host.assert_nothing_attached(&strict.get_vm("web3").unwrap(), "refused bridge");
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// A spec whose one disk is a clone of a pdisk image base.
fn image_spec(name: &str, sha: &str) -> VmSpec {
    let mut s = small_spec(name, "root");
    s.disks[0].source = DiskSource::Image {
        image: crate::spec::ImageSpec {
            url: "pdisk:///base".into(),
            sha256: sha.into(),
            format: crate::images::DeclaredFormat::Raw,
            endorser: None,
            endorsement: None,
        },
        size: 0,
        local: false,
        server: Default::default(),
    };
    s
}

#[tokio::test]
async fn an_image_clone_is_owned_before_it_is_made_and_a_crash_never_orphans_it() {
    let sha = "ab".repeat(32);
    for at in ["start.clone_intent", "start.cloned"] {
        let host = Host::new();
        host.pdisk.add_image_base("base", &sha);
        let agent = host.agent();
        let vm = agent
            .create_vm(image_spec("web1", &sha), "", "")
            .await
            .unwrap();
        start_and_crash_at(&agent, "web1", at).await;
        crash(agent).await;
        let clone = format!("vm-{}-vda", &vm.uuid.simple().to_string()[..12]);
        // Made by pdisk only past the intent.
        assert_eq!(
            host.pdisk.volume_names().contains(&clone),
            at == "start.cloned",
            "{at}"
        );
        let agent = host.agent();
        agent.reconcile().await.unwrap();
        // The next start uses the clone pdisk made (no AlreadyExists), and
        // records it.
        let started = agent.start_vm("web1").await.unwrap();
        assert_eq!(started.state, VmState::Running, "{at}");
        assert_eq!(started.owned_volumes.len(), 1, "{at}");
        assert!(!started.owned_volumes[0].volume.is_empty(), "{at}");
        let clones = host
            .pdisk
            .volume_names()
            .into_iter()
            .filter(|n| n.starts_with("vm-"))
            .count();
        assert_eq!(clones, 1, "{at}: one clone");
        agent
            .destroy_vm("web1", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            sorted(host.pdisk.volume_names()),
            ["base", "data", "root"],
            "{at}"
        );
    }
    // A crash once pdisk made the clone, before its UUID was recorded,
    // then a destroy: the clone is found by its recorded name and deleted.
    let host = Host::new();
    host.pdisk.add_image_base("base", &sha);
    let agent = host.agent();
    agent
        .create_vm(image_spec("web1", &sha), "", "")
        .await
        .unwrap();
    start_and_crash_at(&agent, "web1", "start.cloned").await;
    crash(agent).await;
    let agent = host.agent();
    agent.reconcile().await.unwrap();
    agent
        .destroy_vm("web1", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(sorted(host.pdisk.volume_names()), ["base", "data", "root"]);
    assert!(host.pdisk.exported().is_empty());
}

/// The case reported under load (issue 13): after an agentd restart, a
/// guest's record said it was stopped (no runtime) while a QEMU of it still
/// ran; its destroy deleted the directory and dropped the record without
/// looking for a QEMU. Now tear-down looks for any QEMU running the guest's
/// UUID, and a destroy ends only once none is left: until then the record
/// stays DESTROYING with the pid and its directory stays.
#[tokio::test]
async fn a_destroy_never_ends_while_a_qemu_of_the_guest_runs() {
    let host = Host::new();
    let agent = host.agent();
    agent
        .create_vm(small_spec("web1", "root"), "", "")
        .await
        .unwrap();
    start_and_crash_at(&agent, "web1", "start.running").await;
    let pid = host.vmm.pids()[0];
    // What the record said: stopped, nothing attached.
    let mut vm = agent.get_vm("web1").unwrap();
    vm.state = VmState::Stopped;
    vm.runtime = None;
    agent.store().commit(&mut vm, &[]).unwrap();
    crash(agent).await;
    let dir = host.dir.path().join("state/vms").join(vm.uuid.to_string());
    assert!(dir.exists());

    let agent = host.agent();
    agent.reconcile().await.unwrap();
    // QEMU outlives the first SIGKILLs (stuck in the kernel under load).
    host.vmm.failures.fail_times("kill", 2);
    let err = agent
        .destroy_vm("web1", Duration::from_secs(5))
        .await
        .expect_err("its QEMU still runs");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string().contains(&format!("QEMU pid {pid}")),
        "{err}"
    );
    let left = agent.get_vm("web1").unwrap();
    assert_eq!(left.state, VmState::Destroying);
    assert_eq!(left.runtime.as_ref().map(|r| r.pid), Some(pid));
    assert!(dir.exists(), "the directory of a running QEMU was removed");
    assert_eq!(host.vmm.pids(), vec![pid]);
    // The timer's retry kills it (the second SIGKILL fails too), then
    // the next one finishes the destroy.
    let report = agent.retry_leftovers().await.unwrap();
    assert!(report[0].contains("destroy still unfinished"), "{report:?}");
    let report = agent.retry_leftovers().await.unwrap();
    assert_eq!(
        report,
        vec!["web1: unfinished destroy finished".to_string()]
    );
    assert!(host.vmm.pids().is_empty());
    assert!(!dir.exists());
    assert!(agent.get_vm("web1").is_err());
    let last = agent
        .store()
        .events_since(0, 10_000)
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        (last.kind, last.cause),
        (EventType::Destroyed, Cause::Reconciliation)
    );
}

#[tokio::test]
async fn a_guest_adopted_without_a_qmp_connection_can_still_be_stopped_and_destroyed() {
    let host = Host::new();
    let agent = host.agent();
    agent
        .create_vm(small_spec("web1", "root"), "", "")
        .await
        .unwrap();
    start_and_crash_at(&agent, "web1", "start.running").await;
    crash(agent).await;
    // Its QMP socket does not answer at adoption: left RUNNING, no monitor.
    host.vmm.failures.fail_times("connect_qmp", 1);
    let agent = host.agent();
    let report = agent.reconcile().await.unwrap();
    assert!(report[0].contains("does not answer"), "{report:?}");
    let vm = agent
        .stop_vm("web1", Duration::from_secs(5), false)
        .await
        .unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    host.assert_nothing_attached(&vm, "after the stop");
    agent
        .destroy_vm("web1", Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_interrupted_stop_is_finished_at_the_next_start() {
    let host = Host::new();
    let agent = host.agent();
    let vm = agent
        .create_vm(small_spec("web1", "root"), "", "")
        .await
        .unwrap();
    start_and_crash_at(&agent, "web1", "start.running").await;
    // agentd died after recording STOPPING, before QEMU was asked.
    let mut rec = agent.get_vm("web1").unwrap();
    rec.state = VmState::Stopping;
    agent.store().commit(&mut rec, &[]).unwrap();
    crash(agent).await;
    let agent = host.agent();
    let report = agent.reconcile().await.unwrap();
    assert!(
        report.contains(&"web1: interrupted stop finished (Stopped)".to_string()),
        "{report:?}"
    );
    let vm = agent.get_vm(&vm.uuid.to_string()).unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    host.assert_nothing_attached(&vm, "after the interrupted stop");
}

#[test]
fn each_disk_gets_fresh_chap_secrets_and_with_mutual_a_per_volume_target_account() {
    let vm = uuid::Uuid::new_v4();
    let volume = uuid::Uuid::new_v4().to_string();
    let one_way = super::attachments::disk_chap(vm, "vda", &volume, false).unwrap();
    assert!(one_way.mutual().is_none());
    assert_eq!(
        one_way.user,
        format!("st{}vda", &vm.simple().to_string()[..12])
    );
    let a = super::attachments::disk_chap(vm, "vda", &volume, true).unwrap();
    let b = super::attachments::disk_chap(vm, "vda", &volume, true).unwrap();
    let (ta, tb) = (a.mutual().unwrap(), b.mutual().unwrap());
    assert_eq!(ta.user, format!("stt-{volume}"));
    assert_eq!(ta.user, tb.user, "one target account per volume");
    // 128 random bits each (32 hex digits), drawn separately every time.
    for s in [a.secret(), ta.secret(), b.secret(), tb.secret()] {
        assert_eq!(s.len(), 32);
        assert!(s.bytes().all(|c| c.is_ascii_hexdigit()), "not hex");
    }
    let all = [a.secret(), ta.secret(), b.secret(), tb.secret()];
    for (i, x) in all.iter().enumerate() {
        for y in &all[i + 1..] {
            assert_ne!(x, y, "a secret was reused");
        }
    }
    // Debug output never shows either secret.
    let shown = format!("{a:?}");
    assert!(
        !shown.contains(a.secret()) && !shown.contains(ta.secret()),
        "{shown}"
    );
    assert!(shown.contains(&ta.user), "{shown}");
    // What ExportVolume carries.
    let pb = super::attachments::chap_credentials(&a);
    assert_eq!(
        (pb.user.as_str(), pb.secret.as_str()),
        (a.user.as_str(), a.secret())
    );
    let t = pb.target.unwrap();
    assert_eq!(
        (t.user.as_str(), t.secret.as_str()),
        (ta.user.as_str(), ta.secret())
    );
    assert!(super::attachments::chap_credentials(&one_way)
        .target
        .is_none());
}

#[tokio::test]
async fn chap_mutual_sends_the_targets_account_to_pdisk_and_stores_no_secret() {
    let host = Host::new();
    let root = host.pdisk.add_volume("mutual-root");
    let agent = host.agent_with(|s, _| {
        s.attach = AttachMode::Kernel;
        s.chap_mutual = true;
    });
    let mut spec = small_spec("mc", "mutual-root");
    spec.nics.clear();
    spec.context = None;
    let vm = agent.create_vm(spec, "", "").await.unwrap();
    // The fake runner has no open-iscsi: the login fails after the export.
    let e = agent.start_vm(&vm.uuid.to_string()).await.unwrap_err();
    let sent = host.pdisk.export_chaps.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "{e}");
    let chap = sent[0].clone().expect("CHAP credentials");
    let target = chap.target.expect("the target's account (mutual CHAP)");
    assert_eq!(target.user, format!("stt-{root}"));
    assert_ne!(target.secret, chap.secret);
    assert_ne!(target.user, chap.user);
    assert!(!e.to_string().contains(&target.secret), "{e}");
    // Undone, and neither secret is anywhere in agentd's state directory.
    let vm = agent.get_vm(&vm.uuid.to_string()).unwrap();
    host.assert_nothing_attached(&vm, "after the failed login");
    fn grep(dir: &std::path::Path, needle: &[u8], hits: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                grep(&p, needle, hits);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                hits.push(p);
            }
        }
    }
    let mut hits = Vec::new();
    for secret in [&chap.secret, &target.secret] {
        grep(&host.dir.path().join("state"), secret.as_bytes(), &mut hits);
    }
    assert!(hits.is_empty(), "secrets stored in {hits:?}");

    // Without --chap-mutual: one-way, no target account.
    crash(agent).await;
    let agent = host.agent_with(|s, _| s.attach = AttachMode::Kernel);
    let _ = agent.start_vm(&vm.uuid.to_string()).await;
    let sent = host.pdisk.export_chaps.lock().unwrap().clone();
    assert_eq!(sent.len(), 2);
    assert!(sent[1].as_ref().unwrap().target.is_none());
}

#[test]
fn chap_mutual_with_qemus_initiator_is_refused_by_the_agent_too() {
    let host = Host::new();
    let Err(e) = host.try_agent_with(|s, _| s.chap_mutual = true) else {
        panic!("an agent with --chap-mutual and --attach qemu started");
    };
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("--attach kernel"), "{e}");
}

#[tokio::test]
async fn turning_chap_mutual_on_names_the_running_disks_still_on_one_way_chap() {
    let host = Host::new();
    let agent = host.agent();
    agent.create_vm(spec("web1"), "", "").await.unwrap();
    start_and_crash_at(&agent, "web1", "start.running").await;
    crash(agent).await;
    // As an agentd with --attach kernel recorded them: vda one-way (before
    // --chap-mutual), vdb mutual.
    {
        let store = AgentStore::open(&host.dir.path().join("state")).unwrap();
        let mut vm = store.find_vm("web1").unwrap();
        let disks = &mut vm.runtime.as_mut().unwrap().disks;
        for (d, target_user) in disks.iter_mut().zip([None, Some("stt-data")]) {
            d.mode = AttachMode::Kernel;
            d.kernel = Some(crate::attach::KernelDisk {
                lun: crate::attach::IscsiLun::new(
                    "127.0.0.1:3260".parse().unwrap(),
                    &format!("iqn.2026-11.io.stratus.pdisk:{}", d.device),
                    1,
                )
                .unwrap(),
                device: Some(format!("/dev/sd{}", d.device).into()),
                chap_target_user: target_user.map(String::from),
            });
        }
        store.commit(&mut vm, &[]).unwrap();
    }
    let agent = host.agent_with(|s, _| {
        s.attach = AttachMode::Kernel;
        s.chap_mutual = true;
    });
    let report = agent.reconcile().await.unwrap();
    let one_way: Vec<_> = report.iter().filter(|l| l.contains("one-way")).collect();
    assert_eq!(
        one_way,
        vec!["web1 vda: attached with one-way CHAP (before --chap-mutual); mutual from its next start"],
        "{report:?}"
    );
    assert_eq!(agent.get_vm("web1").unwrap().state, VmState::Running);
}

#[tokio::test]
async fn an_rbd_export_is_opened_by_qemus_rbd_driver_with_the_hosts_key() {
    let host = Host::new();
    let root = host.pdisk.add_volume("rbd-root");
    const KEY: &str = "AQB37hFrNEJkMhAAqUs+QZS9zmTGOfQGD4T7xg==";
    let keyring = host.dir.path().join("ceph.client.compute.keyring");
    std::fs::write(&keyring, format!("[client.compute]\n\tkey = {KEY}\n")).unwrap();
    *host.pdisk.export_rbd.lock().unwrap() = Some(stratus_proto::pdisk::v1::RbdAttachment {
        monitors: vec!["10.0.0.7:6789".into()],
        pool: "pdisk".into(),
        image: String::new(),
        user: "compute".into(),
        secret_ref: "keyring:client.compute".into(),
        cluster_fsid: "f".into(),
    });
    let client = |id: Option<&str>| crate::rbd::CephClient {
        id: id.map(str::to_string),
        keyring: Some(keyring.clone()),
        conf: None,
    };
    // No target, no kernel login; --attach kernel on a host without krbd
    // (no /sys/bus/rbd under the test's root): QEMU's driver all the same.
    let c = client(None);
    let agent = host.agent_with(move |s, _| {
        s.ceph = c;
        s.attach = AttachMode::Kernel;
    });
    let mut spec = small_spec("rbd1", "rbd-root");
    spec.context = None;
    let vm = agent.create_vm(spec, "", "").await.unwrap();
    agent.start_vm(&vm.uuid.to_string()).await.unwrap();
    let rec = agent.get_vm(&vm.uuid.to_string()).unwrap();
    let d = &rec.runtime.as_ref().unwrap().disks[0];
    assert_eq!(d.attachment, format!("rbd:pdisk/pd-vol-{root}"));
    assert_eq!(d.mode, AttachMode::Qemu);
    assert!(d.kernel.is_none());
    assert_eq!(d.pdisk_volume.as_deref(), Some(root.as_str()));
    assert_eq!(host.pdisk.exported(), std::slice::from_ref(&root));
    // The key is nowhere in agentd's state.
    fn holds(dir: &std::path::Path, needle: &[u8]) -> bool {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let p = e.path();
                if p.is_dir() {
                    holds(&p, needle)
                } else {
                    std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
                }
            })
    }
    assert!(!holds(&host.dir.path().join("state"), KEY.as_bytes()));
    agent
        .stop_vm(&vm.uuid.to_string(), Duration::from_secs(5), true)
        .await
        .unwrap();
    assert!(host.pdisk.exported().is_empty());

    // A host pinned to another cephx user refuses the export, and undoes it.
    crash(agent).await;
    let c = client(Some("other"));
    let agent = host.agent_with(move |s, _| s.ceph = c);
    let e = agent.start_vm(&vm.uuid.to_string()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("--ceph-id"), "{e}");
    let vm = agent.get_vm(&vm.uuid.to_string()).unwrap();
    host.assert_nothing_attached(&vm, "after the refused rbd export");
}

/// An RBD export with --attach kernel on a host with krbd (the fake rbd
/// bus): recorded, mapped, handed to QEMU as /dev/rbdN; kept and re-found
/// across an agentd crash; unmapped at stop; a mapping no record holds is
/// reaped at start.
#[tokio::test]
async fn an_rbd_export_is_mapped_by_krbd_with_attach_kernel_on_a_host_with_the_module() {
    use crate::attach::RbdKernel;
    let host = Host::new();
    let root = host.pdisk.add_volume("rbd-root");
    const KEY: &str = "AQB37hFrNEJkMhAAqUs+QZS9zmTGOfQGD4T7xg==";
    let keyring = host.dir.path().join("ceph.client.compute.keyring");
    std::fs::write(&keyring, format!("[client.compute]\n\tkey = {KEY}\n")).unwrap();
    *host.pdisk.export_rbd.lock().unwrap() = Some(stratus_proto::pdisk::v1::RbdAttachment {
        monitors: vec!["10.0.0.7:6789".into()],
        pool: "pdisk".into(),
        image: String::new(),
        user: "compute".into(),
        secret_ref: "keyring:client.compute".into(),
        cluster_fsid: "69d8ee26-508c-4088-b3a4-b2c4a29d107d".into(),
    });
    let bus = crate::attach::krbd::tests::FakeKernel::with_bus(host.dir.path());
    let agent_of = |host: &Host| {
        let k = keyring.clone();
        host.agent_with(move |s, _| {
            s.ceph = crate::rbd::CephClient {
                keyring: Some(k),
                ..Default::default()
            };
            s.attach = AttachMode::Kernel;
        })
    };
    let agent = agent_of(&host);
    let mut spec = small_spec("krbd1", "rbd-root");
    spec.context = None;
    let vm = agent.create_vm(spec, "", "").await.unwrap();
    let id = vm.uuid.to_string();
    agent.start_vm(&id).await.unwrap();
    let rec = agent.get_vm(&id).unwrap();
    let d = &rec.runtime.as_ref().unwrap().disks[0];
    let dev = host.dir.path().join("dev/rbd0");
    assert_eq!(d.mode, AttachMode::Kernel);
    assert_eq!(d.attachment, dev.display().to_string());
    let k = d.krbd.as_ref().unwrap();
    assert_eq!(
        (k.pool.as_str(), k.image.as_str(), k.device.as_ref()),
        ("pdisk", format!("pd-vol-{root}").as_str(), Some(&dev))
    );
    assert!(dev.exists());
    let mapped = std::fs::read_to_string(host.dir.path().join("sys/bus/rbd/devices/0/name"));
    assert_eq!(mapped.unwrap().trim(), format!("pd-vol-{root}"));
    // The key: in no store file, no argv.
    let state = std::fs::read_dir(host.dir.path().join("state")).unwrap();
    for e in state.flatten() {
        let b = std::fs::read(e.path()).unwrap_or_default();
        assert!(!b.windows(KEY.len()).any(|w| w == KEY.as_bytes()));
    }
    assert!(!host.runner.command_lines().iter().any(|l| l.contains(KEY)));

    // agentd crashes: the guest's mapping is adopted, not reaped; a
    // mapping of a pdisk image no record holds is.
    crash(agent).await;
    let left = host.dir.path().join("dev/rbd1");
    bus.write(
        &host.dir.path().join("sys/bus/rbd/add_single_major"),
        "10.0.0.7:6789 name=compute,key=k pdisk pd-vol-left",
        None,
    )
    .unwrap();
    assert!(left.exists());
    let agent = agent_of(&host);
    agent.reconcile().await.unwrap();
    assert!(dev.exists(), "the running guest's mapping was kept");
    assert!(!left.exists(), "the leftover mapping was reaped");
    let reaped: Vec<String> = agent
        .store()
        .events_since(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EventType::LeftoverRemoved)
        .map(|e| e.detail)
        .collect();
    assert_eq!(
        reaped,
        ["unmapped krbd mapping rbd1 of rbd:pdisk/pd-vol-left (no guest holds it)"]
    );

    agent
        .stop_vm(&id, Duration::from_secs(5), true)
        .await
        .unwrap();
    assert!(!dev.exists(), "unmapped at stop");
    assert!(host.pdisk.exported().is_empty());
}

#[tokio::test]
async fn a_pdisk_on_this_host_is_opened_directly_and_a_remote_one_by_iscsi() {
    let host = Host::new();
    let root = host.pdisk.add_volume("local-root");
    let pool = host.dir.path().join("pdisk-pool");
    std::fs::create_dir_all(&pool).unwrap();
    let file = pool.join(format!("vol-{root}"));
    std::fs::write(&file, b"the volume's own bytes").unwrap();
    *host.pdisk.export_local.lock().unwrap() = Some(("h-1".into(), pool.clone()));
    // The same host id: the volume's file, whatever --attach says.
    let agent = host.agent_with(|s, _| {
        s.local_host_id = Some("h-1".into());
        s.attach = AttachMode::Kernel;
    });
    let mut spec = small_spec("loc1", "local-root");
    spec.context = None;
    let vm = agent.create_vm(spec, "", "").await.unwrap();
    let id = vm.uuid.to_string();
    agent.start_vm(&id).await.unwrap();
    let rec = agent.get_vm(&id).unwrap();
    let d = &rec.runtime.as_ref().unwrap().disks[0];
    assert_eq!(d.attachment, format!("file:{}", file.display()));
    assert_eq!(d.mode, AttachMode::Qemu);
    assert!(d.kernel.is_none());
    assert_eq!(d.pdisk_volume.as_deref(), Some(root.as_str()));
    // QEMU was handed that file, and read its bytes.
    let reads = host.vmm.host_reads();
    let (_, got) = reads.iter().find(|(p, _)| *p == file).expect("read");
    assert_eq!(got.as_deref().unwrap(), b"the volume's own bytes");
    assert_eq!(*host.pdisk.export_host_ids.lock().unwrap(), vec!["h-1"]);
    // The export is undone as any other.
    agent
        .stop_vm(&id, Duration::from_secs(5), true)
        .await
        .unwrap();
    assert!(host.pdisk.exported().is_empty());
    crash(agent).await;

    // --local-attach=false (no host id sent), or another host: iSCSI.
    for local_host_id in [None, Some("h-2")] {
        let agent = host.agent_with(move |s, _| s.local_host_id = local_host_id.map(Into::into));
        agent.start_vm(&id).await.unwrap();
        let rec = agent.get_vm(&id).unwrap();
        let d = &rec.runtime.as_ref().unwrap().disks[0];
        assert!(d.attachment.starts_with("iscsi://"), "{}", d.attachment);
        agent
            .stop_vm(&id, Duration::from_secs(5), true)
            .await
            .unwrap();
        crash(agent).await;
    }
    assert_eq!(
        *host.pdisk.export_host_ids.lock().unwrap(),
        vec!["h-1", "", "h-2"]
    );
}

#[test]
fn a_local_attachment_is_checked_before_qemu_sees_it() {
    use stratus_proto::pdisk::v1::LocalAttachment;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vol-1");
    std::fs::write(&file, b"x").unwrap();
    let att = |path: &str, format: &str, block_device: bool| LocalAttachment {
        path: path.into(),
        format: format.into(),
        block_device,
    };
    let f = file.display().to_string();
    assert_eq!(
        super::attachments::local_disk(&att(&f, "raw", false), true).unwrap(),
        file
    );
    let dotdot = format!("{}/../vol-1", dir.path().join("sub").display());
    for (a, asked, why) in [
        (att(&f, "raw", false), false, "did not ask"),
        (att("vol-1", "raw", false), true, "absolute"),
        (att(&dotdot, "raw", false), true, "absolute"),
        (att(&f, "qcow2", false), true, "not raw"),
        (att(&f, "raw", true), true, "not a block device"),
        (
            att(&dir.path().display().to_string(), "raw", false),
            true,
            "not a regular file",
        ),
        (
            att("/nonexistent/vol-2", "raw", false),
            true,
            "not on this host",
        ),
    ] {
        let e = super::attachments::local_disk(&a, asked).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
        assert!(e.to_string().contains(why), "{why}: {e}");
    }
}

#[path = "servers_tests.rs"]
mod servers_tests;

#[path = "hotplug_tests.rs"]
mod hotplug_tests;

#[path = "qos_tests.rs"]
mod qos_tests;

#[path = "migrate_tests.rs"]
mod migrate_tests;

/// An nvmet export (NVMe/TCP): refused with QEMU's initiator; with
/// `--attach kernel` connected as the host NQN pdiskd derives from the
/// initiator IQN, the namespace found by its subsystem NQN in sysfs handed
/// to QEMU, the attachment recorded before the connect, and disconnected
/// at stop; a controller of ours no record names is swept at restart.
#[tokio::test]
async fn an_nvmet_export_is_connected_with_attach_kernel_and_refused_without() {
    let host = Host::new();
    host.pdisk.add_volume("nv-root");
    *host.pdisk.export_nvmet.lock().unwrap() = true;
    let subnqn = "nqn.2026-11.io.stratus.pdisk:nv-root";
    let hostnqn = "nqn.2026-11.io.stratus:unit";
    let agent = host.agent();
    let mut spec = small_spec("nv1", "nv-root");
    spec.nics.clear();
    spec.context = None;
    let vm = agent.create_vm(spec, "", "").await.unwrap();
    let id = vm.uuid.to_string();
    let e = agent.start_vm(&id).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("--attach kernel"), "{e}");
    host.assert_nothing_attached(&agent.get_vm(&id).unwrap(), "--attach qemu");
    crash(agent).await;

    // The kernel's side of the connect, as sysfs shows it: the subsystem's
    // head nvme3n1 (its controller appears below, once connected).
    let sys = host.dir.path().join("sys/class");
    let subsys = sys.join("nvme-subsystem/nvme-subsys3");
    std::fs::create_dir_all(subsys.join("nvme3n1")).unwrap();
    std::fs::write(subsys.join("subsysnqn"), format!("{subnqn}\n")).unwrap();
    std::fs::create_dir_all(host.dir.path().join("dev")).unwrap();
    let dev = host.dir.path().join("dev/nvme3n1");
    std::fs::write(&dev, b"the namespace's bytes").unwrap();
    let agent = host.agent_with(|s, _| s.attach = AttachMode::Kernel);
    host.runner.clear();
    agent.start_vm(&id).await.unwrap();
    let connect = format!("nvme connect -t tcp -a 127.0.0.1 -s 4420 -n {subnqn} -q {hostnqn}");
    assert_eq!(host.runner.command_lines(), [connect]);
    let rec = agent.get_vm(&id).unwrap();
    let d = &rec.runtime.as_ref().unwrap().disks[0];
    assert_eq!(d.mode, AttachMode::Kernel);
    assert_eq!(d.attachment, dev.display().to_string());
    assert_eq!(d.nvme.as_ref().unwrap().namespace.subnqn, subnqn);
    assert!(d.kernel.is_none());
    let reads = host.vmm.host_reads();
    let (_, got) = reads
        .iter()
        .find(|(p, _)| *p == dev)
        .expect("QEMU opened the namespace");
    assert_eq!(got.as_deref().unwrap(), b"the namespace's bytes");
    // Connected: the controller, with our host NQN.
    let ctrl = sys.join("nvme/nvme3");
    std::fs::create_dir_all(&ctrl).unwrap();
    std::fs::write(ctrl.join("subsysnqn"), format!("{subnqn}\n")).unwrap();
    std::fs::write(ctrl.join("hostnqn"), format!("{hostnqn}\n")).unwrap();
    std::fs::write(ctrl.join("transport"), "tcp\n").unwrap();
    std::fs::write(ctrl.join("address"), "traddr=127.0.0.1,trsvcid=4420\n").unwrap();
    // A restart adopts it: no disconnect while the guest runs.
    crash(agent).await;
    host.runner.clear();
    let agent = host.agent_with(|s, _| s.attach = AttachMode::Kernel);
    agent.reconcile().await.unwrap();
    assert!(host
        .runner
        .command_lines()
        .iter()
        .all(|l| !l.starts_with("nvme")));
    host.runner.clear();
    agent
        .stop_vm(&id, Duration::from_secs(5), true)
        .await
        .unwrap();
    assert_eq!(
        host.runner.command_lines(),
        [
            format!("blockdev --flushbufs {}", dev.display()),
            "nvme disconnect -d nvme3".to_string()
        ]
    );
    host.assert_nothing_attached(&agent.get_vm(&id).unwrap(), "after stop");
    // The fake kernel kept the controller: no record holds it now, so the
    // next agentd's sweep disconnects it and says so.
    crash(agent).await;
    host.runner.clear();
    let agent = host.agent_with(|s, _| s.attach = AttachMode::Kernel);
    let report = agent.reconcile().await.unwrap();
    assert!(
        report
            .iter()
            .any(|l| l.contains("disconnected NVMe/TCP controller nvme3")),
        "{report:?}"
    );
    let nvme: Vec<String> = host
        .runner
        .command_lines()
        .into_iter()
        .filter(|l| l.starts_with("nvme"))
        .collect();
    assert_eq!(nvme, ["nvme disconnect -d nvme3"]);
}
