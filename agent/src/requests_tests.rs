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
