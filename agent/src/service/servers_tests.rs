//! Several storage hosts: every pdisk call goes to the server of the disk
//! it is for, so one server that is down (the fake's `set_down`) fails only
//! its own guests' operations, and what it left undone is retried once it
//! answers. Runs on the harness of `service_tests.rs` (its `Host` has two
//! pdisk servers: the default one and "b").

use std::time::Duration;

use stratus_core::error::ErrorKind;

use super::{events_of, small_spec, Host};
use crate::spec::{DiskSource, ImageSpec, ServerName, VmState};
use crate::store::PdiskExport;

/// A one-disk guest whose disk is volume `volume` on pdisk server `server`.
fn spec_on(name: &str, server: &str, volume: &str) -> crate::spec::VmSpec {
    let mut s = small_spec(name, "root");
    s.disks[0].source = DiskSource::Pdisk(format!("{server}/{volume}").parse().unwrap());
    s
}

fn b() -> ServerName {
    "b".parse().unwrap()
}

#[tokio::test]
async fn a_storage_host_that_is_down_fails_only_its_own_guests() {
    let host = Host::new();
    let agent = host.agent();
    agent
        .create_vm(small_spec("web-a", "root"), "", "")
        .await
        .unwrap();
    agent
        .create_vm(spec_on("web-b", "b", "data-b"), "", "")
        .await
        .unwrap();
    agent.start_vm("web-a").await.unwrap();
    let started = agent.start_vm("web-b").await.unwrap();
    assert_eq!(host.pdisk.exported().len(), 1);
    assert_eq!(host.pdisk_b.exported().len(), 1);
    let att = &started.runtime.as_ref().unwrap().disks[0];
    assert_eq!(att.pdisk_server, b());
    assert_eq!(att.source, "pdisk:b/data-b");
    let b_export = host.pdisk_b.exported()[0].clone();

    host.pdisk_b.set_down(true);
    // Its guest stops (the export to undo is kept, naming its server)...
    let stopped = agent
        .stop_vm("web-b", Duration::from_secs(5), false)
        .await
        .unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
    assert_eq!(
        stopped.pending_unexports,
        [PdiskExport {
            server: b(),
            volume: b_export.clone()
        }]
    );
    // ...but cannot start: Unavailable, naming the server.
    let e = agent.start_vm("web-b").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("pdisk server b"), "{e}");
    // A new guest on it cannot be made; one on no such server is a bad
    // argument, and neither leaves anything behind.
    let before = agent.list_vms().unwrap().len();
    let e = agent
        .create_vm(spec_on("web-b2", "b", "root-b"), "", "")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    let e = agent
        .create_vm(spec_on("web-c", "c", "root"), "", "")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("no pdisk server named c"), "{e}");
    assert_eq!(agent.list_vms().unwrap().len(), before);

    // The default server's guest is fully controllable meanwhile.
    let a = agent
        .stop_vm("web-a", Duration::from_secs(5), false)
        .await
        .unwrap();
    assert!(a.pending_unexports.is_empty());
    assert_eq!(
        agent.start_vm("web-a").await.unwrap().state,
        VmState::Running
    );
    agent
        .destroy_vm("web-a", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(host.pdisk.exported().is_empty());
    agent
        .create_vm(small_spec("web-a2", "data"), "", "")
        .await
        .unwrap();
    assert_eq!(
        agent.start_vm("web-a2").await.unwrap().state,
        VmState::Running
    );

    // The image list is partial, naming the server it could not reach.
    host.pdisk.add_image_base("base-a", &"ab".repeat(32));
    let (images, unreachable) = agent.list_images().await.unwrap();
    assert_eq!(unreachable.len(), 1);
    assert_eq!(unreachable[0].name, b());
    assert!(unreachable[0].last_error.contains("pdisk server b"));
    assert!(images
        .iter()
        .any(|i| i.volume == "base-a" && i.server == Some(ServerName::default())));
    // The host's view: one server reachable, one not, with its last error.
    let states = futures::future::join_all(
        agent
            .pdisk_servers()
            .iter()
            .map(|p| p.probe(Duration::from_secs(1))),
    )
    .await;
    assert_eq!(
        states
            .iter()
            .map(|s| (s.name.as_str(), s.reachable))
            .collect::<Vec<_>>(),
        [("b", false), ("default", true)]
    );
    assert!(!states[0].last_error.is_empty() && states[1].last_error.is_empty());

    // A restart while b is down reconciles (the default server's guest is
    // kept running); b's left-over export waits.
    super::crash(agent).await;
    let agent = host.agent();
    agent.reconcile().await.unwrap();
    assert_eq!(agent.get_vm("web-a2").unwrap().state, VmState::Running);
    assert_eq!(agent.get_vm("web-b").unwrap().pending_unexports.len(), 1);
    assert_eq!(host.pdisk_b.exported(), std::slice::from_ref(&b_export));

    // Back: the retry undoes it, and b's guest starts and goes.
    host.pdisk_b.set_down(false);
    let report = agent.retry_leftovers().await.unwrap();
    assert!(
        report
            .iter()
            .any(|l| l.contains("web-b: 1 left-over export")),
        "{report:?}"
    );
    assert!(host.pdisk_b.exported().is_empty());
    assert_eq!(
        agent.start_vm("web-b").await.unwrap().state,
        VmState::Running
    );
    for vm in ["web-b", "web-a2"] {
        agent.destroy_vm(vm, Duration::from_secs(5)).await.unwrap();
    }
    host.assert_nothing_attached(&stopped, "both destroyed");
}

#[tokio::test]
async fn a_destroy_on_a_server_that_is_down_finishes_when_it_answers() {
    let host = Host::new();
    let agent = host.agent();
    agent
        .create_vm(spec_on("web-b", "b", "data-b"), "", "")
        .await
        .unwrap();
    let vm = agent.start_vm("web-b").await.unwrap();
    host.pdisk_b.set_down(true);
    let e = agent
        .destroy_vm("web-b", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("pdisk server b still holds"), "{e}");
    assert_eq!(agent.get_vm("web-b").unwrap().state, VmState::Destroying);
    host.pdisk_b.set_down(false);
    agent.retry_leftovers().await.unwrap();
    assert!(agent.get_vm("web-b").is_err(), "destroyed");
    host.assert_nothing_attached(&vm, "after the retry");
    assert!(events_of(&agent, &vm)
        .iter()
        .any(|e| e.kind == crate::spec::EventType::Destroyed));
}

#[tokio::test]
async fn an_image_is_imported_once_into_each_server_its_clones_live_on() {
    let host = Host::new();
    let roots = host.dir.path().join("images-in");
    std::fs::create_dir_all(&roots).unwrap();
    let file = roots.join("tiny.raw");
    std::fs::write(&file, vec![7u8; 1 << 20]).unwrap();
    let sha = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(std::fs::read(&file).unwrap()))
    };
    let agent = host.agent_with(|s, _| {
        s.image_file_roots = vec![roots.clone()];
        s.qemu_users = crate::confine::QemuUsers::pool("64000-64009").unwrap();
    });
    let image = |name: &str, server: &str| {
        let mut s = small_spec(name, "root");
        s.disks[0].source = DiskSource::Image {
            image: ImageSpec {
                url: format!("file://{}", file.display()),
                sha256: sha.clone(),
                format: crate::images::DeclaredFormat::Raw,
                endorser: None,
                endorsement: None,
            },
            size: 0,
            local: false,
            server: server.parse().unwrap(),
        };
        s
    };
    for (name, server) in [
        ("i1", "default"),
        ("i2", "b"),
        ("i3", "b"),
        ("i4", "default"),
    ] {
        agent.create_vm(image(name, server), "", "").await.unwrap();
        let vm = agent.start_vm(name).await.unwrap();
        assert_eq!(vm.owned_volumes[0].server.as_str(), server, "{name}");
    }
    assert_eq!(host.pdisk.failures.count("upload_volume"), 1);
    assert_eq!(host.pdisk_b.failures.count("upload_volume"), 1);
    // Each server holds its own base and the clones made on it.
    let clones = |p: &crate::fakes::FakeVolumes| {
        p.volume_names()
            .into_iter()
            .filter(|n| n.starts_with("vm-"))
            .count()
    };
    assert_eq!((clones(&host.pdisk), clones(&host.pdisk_b)), (2, 2));
    // Destroying them deletes each clone on its own server.
    for name in ["i1", "i2", "i3", "i4"] {
        agent
            .destroy_vm(name, Duration::from_secs(5))
            .await
            .unwrap();
    }
    assert_eq!((clones(&host.pdisk), clones(&host.pdisk_b)), (0, 0));
}
