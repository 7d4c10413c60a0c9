//! Mutating calls outlive their callers, and a retry with the same
//! `request_id` gets the first attempt's result: through the gRPC handlers,
//! on the fakes of [`crate::fakes`].

use std::time::Duration;

use stratus_pki::Role;
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_server::VmService;
use tonic::Code;

use super::tenancy_tests::{agent, request, spec};
use crate::fakes::FakeVolumes;
use crate::grpc::Api;
use crate::spec::{EventType, VmState};

fn create(name: &str, request_id: &str) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        spec: Some(spec(name, "disk")),
        project: String::new(),
        request_id: request_id.into(),
    }
}

fn vm_request(vm: &str, request_id: &str) -> pb::VmRequest {
    pb::VmRequest {
        vm: vm.into(),
        project: String::new(),
        request_id: request_id.into(),
    }
}

#[tokio::test]
async fn a_create_retried_with_its_request_id_answers_with_the_same_guest() {
    let dir = tempfile::tempdir().unwrap();
    let pdisk = FakeVolumes::new();
    pdisk.add_volume("disk");
    let agent = agent(dir.path(), pdisk);
    let api = Api::new(agent.clone());
    // Three attempts at once and one late: one guest, one CREATED.
    let (a, b, c) = tokio::join!(
        api.create_vm(request(Role::Admin, create("web", "req-1"))),
        api.create_vm(request(Role::Admin, create("web", "req-1"))),
        api.create_vm(request(Role::Admin, create("web", "req-1"))),
    );
    let uuids: Vec<String> = [a, b, c]
        .into_iter()
        .map(|r| r.unwrap().into_inner().uuid)
        .collect();
    assert!(uuids.iter().all(|u| *u == uuids[0]), "{uuids:?}");
    let late = api
        .create_vm(request(Role::Admin, create("web", "req-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.uuid, uuids[0]);
    // After a restart (the log in memory is gone) the record still knows
    // its request id.
    let restarted = Api::new(agent.clone());
    let again = restarted
        .create_vm(request(Role::Admin, create("web", "req-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.uuid, uuids[0]);
    let created = agent
        .store()
        .events_since(0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EventType::Created)
        .count();
    assert_eq!(created, 1);
    // Without a request id the same create is refused as a duplicate, and
    // a reused id with another request is InvalidArgument.
    let dup = api.create_vm(request(Role::Admin, create("web", ""))).await;
    assert_eq!(dup.unwrap_err().code(), Code::AlreadyExists);
    let other = api
        .create_vm(request(Role::Admin, create("db", "req-1")))
        .await;
    assert_eq!(other.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(agent.list_vms().unwrap().len(), 1);
}

#[tokio::test]
async fn a_start_whose_caller_gives_up_still_ends_running_and_its_retry_gets_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let pdisk = FakeVolumes::new();
    pdisk.add_volume("disk");
    *pdisk.export_delay.lock().unwrap() = Duration::from_millis(300);
    let agent = agent(dir.path(), pdisk.clone());
    let api = Api::new(agent.clone());
    api.create_vm(request(Role::Admin, create("web", "")))
        .await
        .unwrap();
    // The caller's deadline passes while pdisk exports the disk: tonic
    // drops the handler's future there.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(50),
        api.start_vm(request(Role::Admin, vm_request("web", "start-1"))),
    )
    .await;
    assert!(gave_up.is_err(), "the start should still be running");
    assert_eq!(agent.get_vm("web").unwrap().state, VmState::Starting);
    // The retry waits for the first attempt and answers with its result,
    // without a second start.
    let vm = api
        .start_vm(request(Role::Admin, vm_request("web", "start-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.state(), pb::VmState::Running);
    assert_eq!(agent.get_vm("web").unwrap().state, VmState::Running);
    assert_eq!(pdisk.failures.count("export_volume"), 1);

    // Same for a caller that goes away without a request id: the stop
    // runs to its end, with its events.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(1),
        api.stop_vm(request(
            Role::Admin,
            pb::StopVmRequest {
                vm: "web".into(),
                force: true,
                ..Default::default()
            },
        )),
    )
    .await;
    drop(gave_up);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while agent.get_vm("web").unwrap().state != VmState::Stopped {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stop never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(pdisk.exported().is_empty());
}

fn stop(vm: &str, request_id: &str) -> pb::StopVmRequest {
    pb::StopVmRequest {
        vm: vm.into(),
        force: true,
        request_id: request_id.into(),
        ..Default::default()
    }
}

fn destroy(vm: &str, request_id: &str) -> pb::DestroyVmRequest {
    pb::DestroyVmRequest {
        vm: vm.into(),
        timeout_seconds: 5,
        request_id: request_id.into(),
        ..Default::default()
    }
}

fn events(agent: &crate::service::Agent) -> usize {
    agent.store().events_since(0, 1000).unwrap().len()
}

/// agentd restarted between an answer and its retry (a new `Api`: the log
/// in memory is gone, agent.redb is not): every guest call's retry gets
/// the first answer, and nothing runs again. Before the outcomes were kept
/// in agent.redb, these retries were refused (a start of a running guest,
/// a stop of a stopped one) or NotFound (a destroyed guest).
#[tokio::test]
async fn retries_after_a_restart_of_agentd_get_the_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let pdisk = FakeVolumes::new();
    pdisk.add_volume("disk");
    let agent = agent(dir.path(), pdisk.clone());
    let api = Api::new(agent.clone());
    let created = api
        .create_vm(request(Role::Admin, create("web", "c-1")))
        .await
        .unwrap()
        .into_inner();
    let started = api
        .start_vm(request(Role::Admin, vm_request("web", "s-1")))
        .await
        .unwrap()
        .into_inner();
    let paused = api
        .pause_vm(request(Role::Admin, vm_request("web", "p-1")))
        .await
        .unwrap()
        .into_inner();
    let resumed = api
        .resume_vm(request(Role::Admin, vm_request("web", "r-1")))
        .await
        .unwrap()
        .into_inner();
    let stopped = api
        .stop_vm(request(Role::Admin, stop("web", "t-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            started.state(),
            paused.state(),
            resumed.state(),
            stopped.state()
        ),
        (
            pb::VmState::Running,
            pb::VmState::Paused,
            pb::VmState::Running,
            pb::VmState::Stopped
        )
    );
    let journal = events(&agent);

    let api = Api::new(agent.clone());
    let again = |id: &str| request(Role::Admin, vm_request("web", id));
    assert_eq!(
        api.create_vm(request(Role::Admin, create("web", "c-1")))
            .await
            .unwrap()
            .into_inner()
            .uuid,
        created.uuid
    );
    assert_eq!(
        api.start_vm(again("s-1")).await.unwrap().into_inner(),
        started
    );
    assert_eq!(
        api.pause_vm(again("p-1")).await.unwrap().into_inner(),
        paused
    );
    assert_eq!(
        api.resume_vm(again("r-1")).await.unwrap().into_inner(),
        resumed
    );
    assert_eq!(
        api.stop_vm(request(Role::Admin, stop("web", "t-1")))
            .await
            .unwrap()
            .into_inner(),
        stopped
    );
    assert_eq!(events(&agent), journal, "a retry ran its operation again");
    assert_eq!(pdisk.failures.count("export_volume"), 1);
    assert_eq!(agent.get_vm("web").unwrap().state, VmState::Stopped);
    // A kept id with another request is refused, after a restart too.
    let e = api.stop_vm(request(Role::Admin, stop("web", "s-1"))).await;
    assert_eq!(e.unwrap_err().code(), Code::InvalidArgument);

    // A destroy: its retry answers OK, not NotFound, before and after a
    // restart.
    api.destroy_vm(request(Role::Admin, destroy("web", "d-1")))
        .await
        .unwrap();
    api.destroy_vm(request(Role::Admin, destroy("web", "d-1")))
        .await
        .unwrap();
    let api = Api::new(agent.clone());
    api.destroy_vm(request(Role::Admin, destroy("web", "d-1")))
        .await
        .unwrap();
    // Without an id, a destroy of what is gone is NotFound, as before.
    let e = api
        .destroy_vm(request(Role::Admin, destroy("web", "")))
        .await;
    assert_eq!(e.unwrap_err().code(), Code::NotFound);
    let destroyed = agent
        .store()
        .events_since(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EventType::Destroyed)
        .count();
    assert_eq!(destroyed, 1);
}

/// agentd killed during the operation (a crash point: the operation's
/// task dies there, its answer never given), then restarted: the retry
/// runs again knowing so, and answers from what it finds instead of
/// refusing (a start that got to RUNNING) or NotFound (a destroy that
/// reconciliation finished).
#[tokio::test]
async fn a_retry_of_an_attempt_killed_mid_way_answers_from_the_state_it_finds() {
    let dir = tempfile::tempdir().unwrap();
    let pdisk = FakeVolumes::new();
    pdisk.add_volume("disk");
    let agent = agent(dir.path(), pdisk.clone());
    let api = Api::new(agent.clone());
    api.create_vm(request(Role::Admin, create("web", "")))
        .await
        .unwrap();
    agent.arm_crash_point(Some("start.running"));
    let lost = api
        .start_vm(request(Role::Admin, vm_request("web", "s-1")))
        .await;
    agent.arm_crash_point(None);
    assert_eq!(lost.unwrap_err().code(), Code::Internal);
    assert_eq!(agent.get_vm("web").unwrap().state, VmState::Running);

    let api = Api::new(agent.clone());
    let vm = api
        .start_vm(request(Role::Admin, vm_request("web", "s-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.state(), pb::VmState::Running);
    assert_eq!(pdisk.failures.count("export_volume"), 1);

    api.stop_vm(request(Role::Admin, stop("web", "")))
        .await
        .unwrap();
    agent.arm_crash_point(Some("destroy.marked"));
    let lost = api
        .destroy_vm(request(Role::Admin, destroy("web", "d-1")))
        .await;
    agent.arm_crash_point(None);
    assert_eq!(lost.unwrap_err().code(), Code::Internal);
    assert_eq!(agent.get_vm("web").unwrap().state, VmState::Destroying);
    // Reconciliation at the restart finishes the destroy.
    agent.reconcile().await.unwrap();
    assert!(agent.get_vm("web").is_err());
    let api = Api::new(agent.clone());
    api.destroy_vm(request(Role::Admin, destroy("web", "d-1")))
        .await
        .unwrap();
    // And the answer is kept now: once more after another restart.
    let api = Api::new(agent.clone());
    api.destroy_vm(request(Role::Admin, destroy("web", "d-1")))
        .await
        .unwrap();
}

/// 50 clients × 200 mixed operations on ten overlapping guests, each
/// operation under a 60 s watchdog: only the documented refusals, and at
/// the end the store equals the host (each running guest's one QEMU, its
/// taps and exports; nothing else).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_clients_times_two_hundred_operations_end_with_the_store_equal_to_the_host() {
    use crate::fakes::{FakeNet, FakeVmm};
    use crate::service::{AgentSettings, HostEffects, HostFacts};
    const CLIENTS: usize = 50;
    const OPS: usize = 200;
    const GUESTS: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let pdisk = FakeVolumes::new();
    for g in 0..GUESTS {
        pdisk.add_volume(&format!("disk{g}"));
    }
    // The fixture's agent, but with fakes this test can look into.
    let base = agent(dir.path(), pdisk.clone());
    let settings: AgentSettings = base.settings().clone();
    let facts: HostFacts = base.host_facts().clone();
    drop(base);
    let (net, vmm) = (FakeNet::new(), FakeVmm::new());
    let agent = crate::service::Agent::with_effects(
        crate::store::AgentStore::open(&settings.state_dir).unwrap(),
        std::sync::Arc::new(stratus_core::runner::FakeRunner::new()),
        settings.clone(),
        facts,
        HostEffects {
            volumes: [(crate::spec::ServerName::default(), pdisk.clone() as _)].into(),
            net: net.clone(),
            vmm: vmm.clone(),
            nvme: crate::attach::NvmeOptions::new(&settings.initiator_iqn),
            rbd_bus: std::sync::Arc::new(crate::attach::SysfsKernel),
            kernel: {
                let mut k = crate::attach::KernelOptions::new(&settings.initiator_iqn);
                k.sys = dir.path().join("sys");
                k.dev = dir.path().join("dev");
                k.iscsi_db = dir.path().join("iscsi");
                k
            },
        },
    )
    .unwrap();
    let api = std::sync::Arc::new(Api::new(agent.clone()));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let api = api.clone();
        clients.push(tokio::spawn(async move {
            let mut seed = c as u64 * 7919 + 1;
            let mut next = move |n: usize| {
                // xorshift: a fixed sequence per client, no dependency.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % n as u64) as usize
            };
            for i in 0..OPS {
                let g = next(GUESTS);
                let name = format!("g{g}");
                let op = next(8);
                let what = format!("client {c} op {i}: {op} on {name}");
                let call = async {
                    let r = |vm: &str| request(Role::Admin, vm_request(vm, ""));
                    match op {
                        0 | 1 => api
                            .create_vm(request(
                                Role::Admin,
                                pb::CreateVmRequest {
                                    spec: Some(spec(&name, &format!("disk{g}"))),
                                    ..Default::default()
                                },
                            ))
                            .await
                            .map(drop),
                        2 | 3 => api.start_vm(r(&name)).await.map(drop),
                        4 => api
                            .stop_vm(request(
                                Role::Admin,
                                pb::StopVmRequest {
                                    vm: name.clone(),
                                    timeout_seconds: 1,
                                    force: next(2) == 0,
                                    ..Default::default()
                                },
                            ))
                            .await
                            .map(drop),
                        5 => api.pause_vm(r(&name)).await.map(drop),
                        6 => api.resume_vm(r(&name)).await.map(drop),
                        _ => api
                            .destroy_vm(request(
                                Role::Admin,
                                pb::DestroyVmRequest {
                                    vm: name.clone(),
                                    timeout_seconds: 1,
                                    ..Default::default()
                                },
                            ))
                            .await
                            .map(drop),
                    }
                };
                match tokio::time::timeout(Duration::from_secs(60), call).await {
                    Err(_) => panic!("{what}: took over 60 s (deadlock?)"),
                    Ok(Ok(())) => {}
                    Ok(Err(s)) => assert!(
                        matches!(
                            s.code(),
                            Code::NotFound
                                | Code::AlreadyExists
                                | Code::FailedPrecondition
                                | Code::ResourceExhausted
                        ),
                        "{what}: {s:?}"
                    ),
                }
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    // The store equals the host.
    let vms = agent.list_vms().unwrap();
    let mut pids = Vec::new();
    let mut taps = Vec::new();
    let mut exports = Vec::new();
    for v in &vms {
        assert!(
            matches!(
                v.state,
                VmState::Defined
                    | VmState::Running
                    | VmState::Paused
                    | VmState::Stopped
                    | VmState::Error
            ),
            "{} left {:?}",
            v.spec.name,
            v.state
        );
        assert!(v.pending_unexports.is_empty(), "{}", v.spec.name);
        if let Some(rt) = &v.runtime {
            assert!(matches!(v.state, VmState::Running | VmState::Paused));
            assert_eq!(vmm.pids_of(v.uuid), vec![rt.pid], "{}", v.spec.name);
            pids.push(rt.pid);
            taps.extend(rt.nics.iter().map(|n| n.tap.clone()));
            exports.extend(rt.disks.iter().filter_map(|d| d.pdisk_volume.clone()));
        }
    }
    pids.sort();
    taps.sort();
    exports.sort();
    assert_eq!(vmm.pids(), pids, "QEMUs without a running record");
    let mut live_taps = net.taps();
    live_taps.sort();
    assert_eq!(live_taps, taps, "taps without a running record");
    assert_eq!(
        pdisk.exported(),
        exports,
        "exports without a running record"
    );
    // And the journal: every seq once, in order.
    let seqs: Vec<u64> = agent
        .store()
        .events_since(0, 1_000_000)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}
