//! agentd end to end: real guests (the test guest from scripts/guest-image,
//! under TCG) booted from pdisk volumes over iSCSI, taps on a bridge, all in a
//! network namespace the test creates, with its own tgtd and pdiskd.
//! Run by scripts/test (needs root, QEMU, tgt).

use std::os::unix::fs::FileExt;
use std::time::Duration;

use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::*;
use tonic::Code;

const BOOT: Duration = Duration::from_secs(180);

/// The hyperconverged test host ([`AgentHost`]) and this suite's own helpers.
struct Host(AgentHost);

impl Host {
    fn start() -> Host {
        Host::start_with(&[])
    }

    /// With extra agentd flags.
    fn start_with(agentd_flags: &[&str]) -> Host {
        Host(AgentHost::start(4096, agentd_flags))
    }

    /// Imports the test guest into pdisk as `base` and clones it as `name`.
    fn guest_volume(&self, name: &str) {
        let src = guest_dir().join("stratus-guest.raw");
        let dst = self.pdiskd.import_dir.join("stratus-guest.raw");
        if !dst.exists() {
            std::fs::copy(&src, &dst).unwrap();
        }
        let url = self.pdiskd.url();
        let name = name.to_string();
        let dst = dst.display().to_string();
        self.ns.block_on(move || async move {
            let mut c = VolumeServiceClient::new(testkit::channel(&url).await);
            let exists = c
                .get_volume(pdpb::GetVolumeRequest {
                    project: String::new(),
                    volume: "base".into(),
                })
                .await
                .is_ok();
            if !exists {
                c.create_volume(pdpb::CreateVolumeRequest {
                    name: "base".into(),
                    source: Some(pdpb::create_volume_request::Source::FromImage(
                        pdpb::ImageSource {
                            path: dst,
                            format: 0,
                        },
                    )),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            c.clone_volume(pdpb::CloneVolumeRequest {
                source: "base".into(),
                name,
                ..Default::default()
            })
            .await
            .unwrap();
        });
    }

    fn exports(&self) -> Vec<pdpb::Export> {
        let url = self.pdiskd.url();
        self.ns.block_on(move || async move {
            let mut c = VolumeServiceClient::new(testkit::channel(&url).await);
            c.list_exports(pdpb::ListExportsRequest {
                project: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .exports
        })
    }

    fn events(&self, since: u64) -> Vec<pb::Event> {
        let url = self.agentd.url();
        self.ns.block_on(move || agent_events(url, since))
    }
}

testkit::wraps_agent_host!(Host, 0);

fn spec_pdisk(name: &str, volume: &str) -> pb::VmSpec {
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        disks: vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::PdiskVolume(volume.into())),
            read_only: false,
            boot_index: 1,
            ..Default::default()
        }],
        nics: vec![pb::NicSpec {
            bridge: BRIDGE.into(),
            mac: String::new(),
            vlan: 0,
            ips: Vec::new(),
        }],
        ..Default::default()
    }
}

/// Direct kernel boot of the test guest with `cmdline` extras.
fn spec_kernel(name: &str, extra: &str, mac: &str) -> pb::VmSpec {
    let g = guest_dir();
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        nics: vec![pb::NicSpec {
            bridge: BRIDGE.into(),
            mac: mac.into(),
            vlan: 0,
            ips: Vec::new(),
        }],
        kernel: Some(pb::KernelBoot {
            kernel: g.join("vmlinuz").display().to_string(),
            initrd: g.join("initrd.img").display().to_string(),
            cmdline: format!("console=ttyS0 {extra}"),
        }),
        ..Default::default()
    }
}

fn kinds(events: &[pb::Event], vm: &str) -> Vec<pb::EventType> {
    events
        .iter()
        .filter(|e| e.vm_name == vm)
        .map(|e| e.r#type())
        .collect()
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn guest_boots_from_a_pdisk_volume_and_is_disposed_cleanly() {
    let h = Host::start();
    h.guest_volume("vm1-root");
    let vm = h.agent(|mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec_pdisk("vm1", "vm1-root")),
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "vm1".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(vm.state(), pb::VmState::Running);
    assert!(vm.pid > 0);
    let mac = vm.nics[0].mac.clone();
    let tap = vm.nics[0].tap.clone();
    assert!(h.ns.link_exists(&tap));
    assert!(vm.disks[0].attachment.starts_with("iscsi://"));

    let console = wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST ready",
        BOOT,
    );
    assert!(
        console.contains("STRATUS-GUEST disk vda driver=virtio_blk"),
        "{console}"
    );
    assert!(
        console.contains(&format!(
            "STRATUS-GUEST nic eth0 mac={mac} driver=virtio_net"
        )),
        "{console}"
    );
    // The CHAP secret reached QEMU as a memfd it inherited: never on its
    // command line, never in a file once QEMU runs (nor before).
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.pid)).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(cmdline.contains("password-secret"));
    let fd = cmdline
        .split("secret,id=chap-vda,file=/proc/self/fd/")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .expect("the secret object reads an inherited descriptor");
    let link = std::fs::read_link(format!("/proc/{}/fd/{fd}", vm.pid)).unwrap();
    assert!(link.to_string_lossy().starts_with("/memfd:"), "{link:?}");
    let secret = std::fs::read_to_string(format!("/proc/{}/fd/{fd}", vm.pid)).unwrap();
    assert!(
        secret.len() >= 16,
        "a CHAP secret of {} bytes",
        secret.len()
    );
    assert!(!cmdline.contains(&secret));
    let dir = h.agentd.state_dir.join("vms").join(&vm.uuid);
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with("chap-"), "secret file {name} in {dir:?}");
        if e.file_type().unwrap().is_file() {
            let text = std::fs::read(e.path()).unwrap();
            assert!(
                !text.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "the secret is in {name}"
            );
        }
    }
    assert!(
        !h.agentd.log_text().contains(&secret),
        "the secret is in agentd's log"
    );
    assert_eq!(h.exports().len(), 1);

    let stopped = h.agent(|mut c| async move {
        c.stop_vm(pb::StopVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "vm1".into(),
            timeout_seconds: 60,
            force: false,
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(stopped.state(), pb::VmState::Stopped);
    let events = h.events(0);
    use pb::EventType as T;
    let k = kinds(&events, "vm1");
    for want in [
        T::Created,
        T::Starting,
        T::DiskAttached,
        T::NicAttached,
        T::Running,
        T::Stopping,
        T::Stopped,
    ] {
        assert!(k.contains(&want), "{want:?} missing from {k:?}");
    }
    let stop = events
        .iter()
        .rev()
        .find(|e| e.r#type() == T::Stopped)
        .unwrap();
    assert_eq!(stop.cause(), pb::EventCause::Api);
    // Stopping detached everything.
    assert!(!h.ns.link_exists(&tap));
    assert!(h.exports().is_empty());

    h.agent(|mut c| async move {
        c.destroy_vm(pb::DestroyVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "vm1".into(),
            timeout_seconds: 30,
        })
        .await
        .unwrap();
        let e = c
            .get_vm(pb::VmRequest {
                request_id: String::new(),
                project: String::new(),
                vm: "vm1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    });
    assert!(!h.agentd.state_dir.join("vms").join(&vm.uuid).exists());
    let seqs: Vec<u64> = h.events(0).iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        h.events(0).last().unwrap().r#type(),
        pb::EventType::Destroyed
    );
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn poweroff_inside_the_guest_is_a_stop_caused_by_the_guest() {
    let h = Host::start();
    let vm = h.agent(|mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec_kernel("quitter", "stratus.poweroff_after=2", "")),
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "quitter".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST poweroff",
        BOOT,
    );
    let ev = wait_for("STOPPED event", BOOT, || {
        h.events(0)
            .into_iter()
            .find(|e| e.r#type() == pb::EventType::Stopped)
    });
    assert_eq!(ev.cause(), pb::EventCause::Guest, "{ev:?}");
    let tap = vm.nics[0].tap.clone();
    assert!(!h.ns.link_exists(&tap));
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn two_guests_on_one_bridge_exchange_packets() {
    let h = Host::start();
    let vms = h.agent(|mut c| async move {
        let mut out = Vec::new();
        for (name, me, peer, mac) in [
            ("ping-a", "10.213.0.1", "10.213.0.2", "52:54:00:00:d5:01"),
            ("ping-b", "10.213.0.2", "10.213.0.1", "52:54:00:00:d5:02"),
        ] {
            c.create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                project: String::new(),
                spec: Some(spec_kernel(
                    name,
                    &format!("stratus.ip={me}/24 stratus.peer={peer}"),
                    mac,
                )),
            })
            .await
            .unwrap();
            out.push(
                c.start_vm(pb::VmRequest {
                    request_id: String::new(),
                    project: String::new(),
                    vm: name.into(),
                })
                .await
                .unwrap()
                .into_inner(),
            );
        }
        out
    });
    for (vm, peer) in vms.iter().zip(["10.213.0.2", "10.213.0.1"]) {
        let log = wait_console(
            std::path::Path::new(&vm.console_log),
            &format!("STRATUS-GUEST ping {peer}"),
            BOOT,
        );
        assert!(
            log.contains(&format!("STRATUS-GUEST ping {peer} ok")),
            "{}: {log}",
            vm.name
        );
        assert!(log.contains("driver=virtio_net"));
    }
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn guests_survive_agentd_crashes_and_the_seq_continues() {
    let mut h = Host::start();
    let vms: Vec<pb::Vm> = h.agent(|mut c| async move {
        let mut out = Vec::new();
        for name in ["keeper", "victim"] {
            c.create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                project: String::new(),
                spec: Some(spec_kernel(name, "", "")),
            })
            .await
            .unwrap();
            out.push(
                c.start_vm(pb::VmRequest {
                    request_id: String::new(),
                    project: String::new(),
                    vm: name.into(),
                })
                .await
                .unwrap()
                .into_inner(),
            );
        }
        out
    });
    let before = h.events(0);
    // agentd dies; the guests do not.
    h.agentd.kill9();
    for vm in &vms {
        assert!(std::path::Path::new(&format!("/proc/{}", vm.pid)).exists());
    }
    // One guest dies while agentd is away.
    // SAFETY: signals the pid of a guest this test started.
    unsafe {
        libc::kill(vms[1].pid as libc::pid_t, libc::SIGKILL);
    }
    wait_for("victim gone", Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{}/cmdline", vms[1].pid)).exists()
            || std::fs::read(format!("/proc/{}/cmdline", vms[1].pid))
                .map(|c| c.is_empty())
                .unwrap_or(true))
        .then_some(())
    });
    h.agentd.restart();
    let got: Vec<pb::Vm> = h.agent(|mut c| async move {
        let mut out = Vec::new();
        for name in ["keeper", "victim"] {
            out.push(
                c.get_vm(pb::VmRequest {
                    request_id: String::new(),
                    project: String::new(),
                    vm: name.into(),
                })
                .await
                .unwrap()
                .into_inner(),
            );
        }
        out
    });
    assert_eq!(got[0].state(), pb::VmState::Running);
    assert_eq!(got[0].pid, vms[0].pid);
    assert!(matches!(
        got[1].state(),
        pb::VmState::Stopped | pb::VmState::Crashed
    ));
    let after = h.events(0);
    let seqs: Vec<u64> = after.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "gap or repeat"
    );
    assert_eq!(&after[..before.len()], &before[..], "history rewritten");
    let new = &after[before.len()..];
    assert!(new.iter().any(|e| e.vm_name == "keeper"
        && e.r#type() == pb::EventType::Adopted
        && e.cause() == pb::EventCause::Reconciliation));
    assert!(new.iter().any(|e| e.vm_name == "victim"
        && matches!(e.r#type(), pb::EventType::Stopped | pb::EventType::Crashed)
        && e.cause() == pb::EventCause::Reconciliation));
    assert!(!h.ns.link_exists(&vms[1].nics[0].tap));
    // The adopted guest is still under control.
    let v = h.agent(|mut c| async move {
        c.pause_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "keeper".into(),
        })
        .await
        .unwrap();
        c.resume_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "keeper".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(v.state(), pb::VmState::Running);
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn a_reconnecting_watcher_gets_every_event_once_in_order() {
    let h = Host::start();
    // A watcher that follows live, reads a few events, and disconnects.
    let url = h.agentd.url();
    let first: Vec<u64> = h.ns.block_on(move || async move {
        let mut c = VmServiceClient::new(testkit::channel(&url).await);
        let mut s = c
            .watch_events(pb::WatchEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut c2 = c.clone();
        let maker = tokio::spawn(async move {
            for i in 0..3 {
                c2.create_vm(pb::CreateVmRequest {
                    request_id: String::new(),
                    project: String::new(),
                    spec: Some(spec_kernel(&format!("w{i}"), "", "")),
                })
                .await
                .unwrap();
            }
        });
        let mut got = Vec::new();
        while got.len() < 2 {
            let m = tokio::time::timeout(Duration::from_secs(60), s.message())
                .await
                .expect("no event within 60 s");
            got.push(m.unwrap().unwrap().seq);
        }
        maker.await.unwrap();
        got
    });
    // More happens while it is away.
    h.agent(|mut c| async move {
        for i in 3..6 {
            c.create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                project: String::new(),
                spec: Some(spec_kernel(&format!("w{i}"), "", "")),
            })
            .await
            .unwrap();
        }
        c.destroy_vm(pb::DestroyVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "w0".into(),
            timeout_seconds: 5,
        })
        .await
        .unwrap();
    });
    let last = *first.last().unwrap();
    let rest: Vec<u64> = h.events(last).iter().map(|e| e.seq).collect();
    let all: Vec<u64> = first.iter().chain(&rest).copied().collect();
    let journal: Vec<u64> = h.events(0).iter().map(|e| e.seq).collect();
    assert_eq!(all, journal);
    assert_eq!(journal.len(), 7);
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn bad_input_gets_clear_errors_and_failed_starts_leave_nothing() {
    // missingbr0 is allowed but does not exist; stbr9 exists but is not allowed.
    let h = Host::start_with(&["--allowed-bridge", "missingbr0"]);
    h.ns.add_bridge("stbr9");
    h.guest_volume("disk1");
    let codes = h.agent(|mut c| async move {
        let mut codes = Vec::new();
        let try_spec = |mut c: VmServiceClient<tonic::transport::Channel>, s: pb::VmSpec| async move {
            c.create_vm(pb::CreateVmRequest { request_id: String::new(), project: String::new(), spec: Some(s) })
                .await
                .unwrap_err()
                .code()
        };
        let mut bad_name = spec_pdisk("Bad Name", "disk1");
        codes.push(try_spec(c.clone(), bad_name.clone()).await);
        bad_name.name = "ok".into();
        bad_name.vcpus = 0;
        codes.push(try_spec(c.clone(), bad_name.clone()).await);
        bad_name.vcpus = 1;
        bad_name.memory_bytes = 1 << 50;
        codes.push(try_spec(c.clone(), bad_name.clone()).await);
        bad_name.memory_bytes = 128 << 20;
        bad_name.nics[0].mac = "01:00:5e:00:00:01".into();
        codes.push(try_spec(c.clone(), bad_name.clone()).await);
        codes.push(try_spec(c.clone(), spec_pdisk("ok", "no-such-volume")).await);
        c.create_vm(pb::CreateVmRequest { request_id: String::new(), project: String::new(),
            spec: Some(spec_pdisk("dup", "disk1")),
        })
        .await
        .unwrap();
        codes.push(try_spec(c.clone(), spec_pdisk("dup", "disk1")).await);
        let n = c
            .list_vms(pb::ListVmsRequest { project: String::new(),})
            .await
            .unwrap()
            .into_inner()
            .vms
            .len();
        (codes, n)
    });
    assert_eq!(
        codes.0,
        vec![
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::ResourceExhausted,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists
        ]
    );
    assert_eq!(codes.1, 1);

    // A bridge the host does not let guests join: refused at create.
    let mut spec = spec_pdisk("hostbridge", "disk1");
    spec.nics[0].bridge = "stbr9".into();
    let refused = h.agent(|mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            project: String::new(),
            request_id: String::new(),
            spec: Some(spec),
        })
        .await
        .unwrap_err()
    });
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // A start that fails (the bridge does not exist) leaves an ERROR state
    // with the cause, and no tap, export, process or tap rules behind.
    let mut spec = spec_pdisk("nobridge", "disk1");
    spec.nics[0].bridge = "missingbr0".into();
    let (err, vm) = h.agent(|mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec),
        })
        .await
        .unwrap();
        let e = c
            .start_vm(pb::VmRequest {
                request_id: String::new(),
                project: String::new(),
                vm: "nobridge".into(),
            })
            .await
            .unwrap_err();
        let vm = c
            .get_vm(pb::VmRequest {
                request_id: String::new(),
                project: String::new(),
                vm: "nobridge".into(),
            })
            .await
            .unwrap()
            .into_inner();
        (e, vm)
    });
    assert!(err.message().contains("missingbr0"), "{err:?}");
    assert_eq!(vm.state(), pb::VmState::Error);
    assert!(vm.state_reason.contains("missingbr0"));
    assert!(h.exports().is_empty(), "export left behind");
    assert!(h.agentd.guest_pids().is_empty(), "QEMU left behind");
    let links = h.ns.ip(&["-o", "link", "show", "type", "tun"]);
    assert!(links.trim().is_empty(), "tap left behind: {links}");
    assert!(tap_rules(&h).is_empty(), "tap rules left behind");

    // Host files: only beneath a --host-file-root (testkit gives
    // DIR/host-files), never through a symlink out of it, and a file disk
    // that vanished between create and start leaves the guest in ERROR
    // with nothing attached.
    let files = h.pool.dir.path().join("host-files");
    std::fs::write(h.pool.dir.path().join("outside.raw"), vec![0u8; 1 << 20]).unwrap();
    std::os::unix::fs::symlink("../outside.raw", files.join("escape.raw")).unwrap();
    for (path, want) in [
        (
            h.pool.dir.path().join("outside.raw"),
            Code::PermissionDenied,
        ),
        (files.join("escape.raw"), Code::PermissionDenied),
        (files.join("missing.raw"), Code::NotFound),
    ] {
        let mut spec = spec_kernel("hostfile", "", "");
        spec.disks = vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::File(path.display().to_string())),
            ..Default::default()
        }];
        let err = h.agent(|mut c| async move {
            c.create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                project: String::new(),
                spec: Some(spec),
            })
            .await
            .unwrap_err()
        });
        assert_eq!(err.code(), want, "{}: {err:?}", path.display());
    }
    let bad = files.join("vanished.raw");
    std::fs::write(&bad, vec![0u8; 1 << 20]).unwrap();
    let mut spec = spec_kernel("badimg", "", "");
    spec.disks = vec![pb::DiskSpec {
        source: Some(pb::disk_spec::Source::File(bad.display().to_string())),
        read_only: false,
        boot_index: 0,
        ..Default::default()
    }];
    let b = bad.clone();
    let (err, vm) = h.agent(|mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec),
        })
        .await
        .unwrap();
        std::fs::remove_file(b).unwrap();
        let e = c
            .start_vm(pb::VmRequest {
                request_id: String::new(),
                project: String::new(),
                vm: "badimg".into(),
            })
            .await
            .unwrap_err();
        let vm = c
            .get_vm(pb::VmRequest {
                request_id: String::new(),
                project: String::new(),
                vm: "badimg".into(),
            })
            .await
            .unwrap()
            .into_inner();
        (e, vm)
    });
    assert_eq!(vm.state(), pb::VmState::Error);
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("vanished.raw not found"), "{err:?}");
    assert!(h.agentd.guest_pids().is_empty());
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn a_seed_disk_gives_the_guest_its_hostname() {
    let h = Host::start();
    // A marker disk first, so the seed must come after the spec's disks.
    // Beneath the --host-file-root testkit gives agentd.
    let marker = h.pool.dir.path().join("host-files/marker.raw");
    let mut data = b"STRATUS-MARKER:data disk\n".to_vec();
    data.resize(1 << 20, 0);
    std::fs::write(&marker, &data).unwrap();
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk2 e2e@stratus";
    let mut seeded = spec_kernel("seeded", "", "");
    seeded.disks = vec![pb::DiskSpec {
        source: Some(pb::disk_spec::Source::File(marker.display().to_string())),
        read_only: true,
        boot_index: 0,
        ..Default::default()
    }];
    seeded.context = Some(pb::Contextualization {
        hostname: "seeded-guest".into(),
        ssh_keys: vec![key.into()],
        ..Default::default()
    });
    // An empty context still gives a seed, named after the VM.
    let mut by_name = spec_kernel("named-by-vm", "", "");
    by_name.context = Some(pb::Contextualization::default());
    let vms: Vec<pb::Vm> = h.agent(|mut c| async move {
        let mut out = Vec::new();
        for spec in [seeded, by_name] {
            let name = spec.name.clone();
            c.create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                project: String::new(),
                spec: Some(spec),
            })
            .await
            .unwrap();
            out.push(
                c.start_vm(pb::VmRequest {
                    request_id: String::new(),
                    project: String::new(),
                    vm: name,
                })
                .await
                .unwrap()
                .into_inner(),
            );
        }
        out
    });

    let vm = &vms[0];
    let seed = vm.disks.last().unwrap();
    assert_eq!(
        (seed.device.as_str(), seed.source.as_str(), seed.read_only),
        ("vdb", "seed", true),
        "{:?}",
        vm.disks
    );
    assert!(seed.attachment.ends_with("/seed.img"), "{seed:?}");
    let log = wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST ready",
        BOOT,
    );
    assert!(
        log.contains("STRATUS-GUEST hostname=seeded-guest\r"),
        "{log}"
    );
    assert!(log.contains("STRATUS-GUEST seed vdb\r"), "{log}");
    assert!(log.contains("STRATUS-GUEST marker vda=data disk"), "{log}");

    // On the host: a CIDATA FAT12 image whose meta-data names the instance.
    let image = std::fs::read(&seed.attachment).unwrap();
    assert_eq!(&image[43..54], b"CIDATA     ");
    assert_eq!(&image[54..59], b"FAT12");
    let text = String::from_utf8_lossy(&image);
    assert!(
        text.contains(&format!("instance-id: \"{}\"", vm.uuid)),
        "meta-data not found in the image"
    );
    assert!(text.contains(&format!("public-keys:\n  - \"{key}\"")));
    // QEMU opened it read-only and raw.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.pid)).unwrap();
    let blockdev = cmdline
        .split(|&b| b == 0)
        .map(String::from_utf8_lossy)
        .find(|a| a.contains("\"node-name\":\"vdb\""))
        .expect("no blockdev for the seed");
    let v: serde_json::Value = serde_json::from_str(&blockdev).unwrap();
    assert_eq!(v["read-only"], true, "{v}");
    assert_eq!(v["driver"], "raw", "{v}");
    // By a descriptor agentd opened on the seed: QEMU names no host path.
    let set = v["file"]["filename"].as_str().unwrap();
    assert!(set.starts_with("/dev/fdset/"), "{v}");
    let seed_path = std::path::Path::new(&seed.attachment);
    assert!(qemu_holds(vm.pid, seed_path), "QEMU does not hold the seed");

    let other = &vms[1];
    let log = wait_console(
        std::path::Path::new(&other.console_log),
        "STRATUS-GUEST ready",
        BOOT,
    );
    assert!(
        log.contains("STRATUS-GUEST hostname=named-by-vm\r"),
        "{log}"
    );
    assert!(log.contains("STRATUS-GUEST seed vda\r"), "{log}");

    let events = h.events(0);
    let attached: Vec<&str> = events
        .iter()
        .filter(|e| e.vm_name == "seeded" && e.r#type() == pb::EventType::DiskAttached)
        .map(|e| e.detail.as_str())
        .collect();
    assert_eq!(
        attached,
        [
            format!("vda file:{}", marker.display()).as_str(),
            "vdb seed hostname=seeded-guest"
        ]
    );

    // Stopping removes the seed (user-data may hold secrets); the next
    // start builds it again; destroying removes the guest's directory.
    h.agent(|mut c| async move {
        c.stop_vm(pb::StopVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "seeded".into(),
            timeout_seconds: 30,
            force: true,
        })
        .await
        .unwrap();
    });
    assert!(!std::path::Path::new(&seed.attachment).exists());
    let dir = h.agentd.state_dir.join("vms").join(&vm.uuid);
    h.agent(|mut c| async move {
        c.destroy_vm(pb::DestroyVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "seeded".into(),
            timeout_seconds: 30,
        })
        .await
        .unwrap();
    });
    assert!(!dir.exists());
}

// ---------- images ----------

/// Serves the test guest's qcow2 over HTTP inside the host's namespace.
fn serve_guest(h: &Host) -> (Httpd, String, String) {
    let g = h.serve_guest();
    (g.httpd, g.url, g.sha256)
}

fn spec_image(name: &str, url: &str, sha: &str, local: bool) -> pb::VmSpec {
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        disks: vec![pb::DiskSpec {
            qos: None,
            server: String::new(),
            source: Some(pb::disk_spec::Source::Image(pb::ImageRef {
                url: url.into(),
                sha256: sha.into(),
                format: 0,
                endorser: String::new(),
                endorsement: String::new(),
            })),
            read_only: false,
            boot_index: 1,
            size_bytes: 256 << 20,
            persistence: if local {
                pb::DiskPersistence::Local
            } else {
                pb::DiskPersistence::Clone
            } as i32,
        }],
        ..Default::default()
    }
}

fn pool_used(h: &Host) -> (u64, Vec<pdpb::Volume>) {
    let url = h.pdiskd.url();
    h.ns.block_on(move || async move {
        let mut c = VolumeServiceClient::new(testkit::channel(&url).await);
        let used = c
            .get_pool(pdpb::GetPoolRequest {})
            .await
            .unwrap()
            .into_inner()
            .used_bytes;
        let vols = c
            .list_volumes(pdpb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .volumes;
        (used, vols)
    })
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn concurrent_launches_of_one_image_import_it_once_and_clones_share_blocks() {
    let h = Host::start();
    let (httpd, url, sha) = serve_guest(&h);
    let (u2, s2) = (url.clone(), sha.clone());
    let vms: Vec<pb::Vm> = h.agent(move |c| async move {
        let mut tasks = Vec::new();
        for i in 0..5 {
            let mut c = c.clone();
            let (url, sha) = (u2.clone(), s2.clone());
            tasks.push(tokio::spawn(async move {
                let name = format!("img{i}");
                c.create_vm(pb::CreateVmRequest {
                    request_id: String::new(),
                    project: String::new(),
                    spec: Some(spec_image(&name, &url, &sha, false)),
                })
                .await
                .unwrap();
                c.start_vm(pb::VmRequest {
                    request_id: String::new(),
                    project: String::new(),
                    vm: name,
                })
                .await
                .unwrap()
                .into_inner()
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert_eq!(
        httpd.requests("guest.qcow2"),
        1,
        "downloaded more than once"
    );
    let events = h.events(0);
    let count = |t: pb::EventType| events.iter().filter(|e| e.r#type() == t).count();
    assert_eq!(count(pb::EventType::ImagePullStarted), 1);
    assert_eq!(count(pb::EventType::ImageCached), 1);
    assert_eq!(count(pb::EventType::ImageImported), 1);
    let (used_before, vols) = pool_used(&h);
    let bases: Vec<_> = vols
        .iter()
        .filter(|v| v.labels.get("stratus.io/image-sha256") == Some(&sha))
        .collect();
    assert_eq!(bases.len(), 1, "one base volume per image");
    assert_eq!(vols.len(), 6, "a base and five clones");
    // The guest boots from its clone of the image, over iSCSI.
    let console = wait_console(
        std::path::Path::new(&vms[0].console_log),
        "STRATUS-GUEST ready",
        BOOT,
    );
    assert!(
        console.contains("disk vda driver=virtio_blk size=268435456"),
        "{console}"
    );
    // A further launch copies nothing: the clone shares the base's blocks.
    let (u3, s3) = (url.clone(), sha.clone());
    h.agent(move |mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec_image("img5", &u3, &s3, false)),
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "img5".into(),
        })
        .await
        .unwrap();
    });
    let (used_after, _) = pool_used(&h);
    assert!(
        used_after.saturating_sub(used_before) < 4 << 20,
        "a cached launch used {} bytes of pool",
        used_after - used_before
    );
    assert_eq!(httpd.requests("guest.qcow2"), 1);
    // Destroying a guest deletes its clone; the base stays, and cannot be
    // evicted while clones remain.
    let (evict_err, left) = h.agent(move |mut c| async move {
        c.destroy_vm(pb::DestroyVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "img5".into(),
            timeout_seconds: 5,
        })
        .await
        .unwrap();
        let e = c
            .evict_image(pb::EvictImageRequest {
                server: String::new(),
                request_id: String::new(),
                sha256: sha.clone(),
                local: false,
                pdisk: true,
            })
            .await
            .unwrap_err();
        let left = c
            .list_images(pb::ListImagesRequest {})
            .await
            .unwrap()
            .into_inner()
            .images;
        (e, left)
    });
    assert_eq!(evict_err.code(), Code::FailedPrecondition, "{evict_err:?}");
    assert!(
        left.iter().any(|i| i.location == "pdisk" && i.users == 5),
        "{left:?}"
    );
    assert_eq!(pool_used(&h).1.len(), 6);
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn checksum_mismatch_and_policy_refusal_leave_nothing_cached() {
    let mut h = Host::start();
    let (httpd, url, sha) = serve_guest(&h);
    let wrong = "0".repeat(64);
    let (u, w) = (url.clone(), wrong.clone());
    let err = h.agent(move |mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec_image("bad", &u, &w, false)),
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "bad".into(),
        })
        .await
        .unwrap_err()
    });
    assert!(
        err.message().contains(&wrong) && err.message().contains(&sha),
        "{err:?}"
    );
    let cache = h.agentd.state_dir.join("images");
    let leftovers: Vec<_> = std::fs::read_dir(&cache)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().ends_with(".img")
                && !n.to_string_lossy().starts_with(".partial")),
        "{leftovers:?}"
    );
    assert!(pool_used(&h).1.is_empty(), "nothing reached pdisk");
    assert!(h
        .events(0)
        .iter()
        .any(|e| e.r#type() == pb::EventType::ImagePullFailed));

    // A policy that denies the image: refused before any download.
    let policy = h.pool.dir.path().join("policy.toml");
    std::fs::write(&policy, format!("deny_sha256 = [\"{sha}\"]\n")).unwrap();
    let before = httpd.requests("guest.qcow2");
    h.agentd.kill9();
    let agentd = Agentd::start_in_with(
        h.pool.dir.path(),
        &h.ns,
        &h.pdiskd.url(),
        BRIDGE,
        &["--image-policy", policy.to_str().unwrap()],
    );
    drop(std::mem::replace(&mut h.agentd, agentd));
    let (u, s) = (url.clone(), sha.clone());
    let err = h.agent(move |mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec_image("denied", &u, &s, true)),
        })
        .await
        .unwrap_err()
    });
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("denied"), "{err:?}");
    assert_eq!(httpd.requests("guest.qcow2"), before);
}

/// `stratus-image ARGS --json`, as an endorser runs it.
fn stratus_image(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&run_ok(
        testkit::bin("stratus-image").to_str().unwrap(),
        &all,
    ))
    .unwrap()
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn an_endorsed_image_launches_and_bad_endorsements_are_refused_before_any_download() {
    // The endorser's key and a host policy trusting it, requiring endorsements.
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("endorser.key");
    let key = key.to_str().unwrap();
    let public = stratus_image(&["keygen", "--out", key])["public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let stranger = keys.path().join("stranger.key");
    let stranger = stranger.to_str().unwrap();
    stratus_image(&["keygen", "--out", stranger]);
    let policy = keys.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!("allow_endorser_keys = [\"{public}\"]\nrequire_endorsement = true\n"),
    )
    .unwrap();
    let h = Host::start_with(&["--image-policy", policy.to_str().unwrap()]);
    let (httpd, url, sha) = serve_guest(&h);
    let other_sha = "ab".repeat(32);
    let sign = |key: &str, sha: &str, valid_for: &str| {
        stratus_image(&[
            "sign",
            "--key",
            key,
            "--url",
            &url,
            "--sha256",
            sha,
            "--endorser",
            "ops@example.org",
            "--valid-for",
            valid_for,
        ])["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let good = sign(key, &sha, "1h");
    // Tampered: the manifest of an endorsement for another checksum, changed
    // to this image's, with the original signature.
    let for_other = sign(key, &other_sha, "1h");
    let tampered = format!(
        "{}.{}",
        good.split_once('.').unwrap().0,
        for_other.split_once('.').unwrap().1
    );
    let untrusted = sign(stranger, &sha, "1h");
    let expired = sign(key, &sha, "0s");
    let with = |name: &str, token: &str| {
        let mut spec = spec_image(name, &url, &sha, true);
        if let Some(pb::disk_spec::Source::Image(i)) = &mut spec.disks[0].source {
            i.endorsement = token.to_owned();
        }
        spec
    };
    for (name, token, why) in [
        ("tampered", tampered, "does not verify"),
        ("untrusted", untrusted, "not a trusted endorser key"),
        ("expired", expired, "expired"),
        ("unendorsed", String::new(), "no endorsement"),
    ] {
        let spec = with(name, &token);
        let err = h.agent(move |mut c| async move {
            c.create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                project: String::new(),
                spec: Some(spec),
            })
            .await
            .unwrap_err()
        });
        assert_eq!(err.code(), Code::FailedPrecondition, "{name}: {err:?}");
        assert!(err.message().contains(why), "{name}: {err:?}");
    }
    assert_eq!(
        httpd.requests("guest.qcow2"),
        0,
        "refused before any download"
    );

    let spec = with("endorsed", &good);
    let vm = h.launch("", spec);
    wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST ready",
        BOOT,
    );
    let images = h.agent(|mut c| async move {
        c.list_images(pb::ListImagesRequest {})
            .await
            .unwrap()
            .into_inner()
            .images
    });
    let cached = images.iter().find(|i| i.location == "local").unwrap();
    assert_eq!(cached.sha256, sha);
    assert_eq!(cached.endorser, "ops@example.org");
    assert_eq!(cached.endorser_key, public);
    // And the CLI a verifier uses agrees.
    let v = stratus_image(&["verify", "--trust", &public, &good]);
    assert_eq!(v["manifest"]["sha256"], sha.as_str());
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn local_image_disks_boot_from_an_overlay_and_pin_their_image() {
    let h = Host::start();
    let (_httpd, url, sha) = serve_guest(&h);
    let (u, s) = (url.clone(), sha.clone());
    let vm = h.launch("", spec_image("ephemeral", &u, &s, true));
    let console = wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST ready",
        BOOT,
    );
    assert!(
        console.contains("disk vda driver=virtio_blk size=268435456"),
        "{console}"
    );
    let overlay = h
        .agentd
        .state_dir
        .join("vms")
        .join(&vm.uuid)
        .join("vda.qcow2");
    let info = run_ok("qemu-img", &["info", "-U", overlay.to_str().unwrap()]);
    assert!(info.contains(&format!("{sha}.img")), "{info}");
    assert!(pool_used(&h).1.is_empty(), "local disks do not touch pdisk");
    // A second start reuses the overlay, checked and given its base
    // explicitly (never read from its header).
    let vm = h.agent(|mut c| async move {
        c.stop_vm(pb::StopVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "ephemeral".into(),
            timeout_seconds: 5,
            force: true,
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "ephemeral".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST ready",
        BOOT,
    );
    let vda = qemu_blockdev(vm.pid, "vda");
    assert_eq!(vda["driver"], "qcow2", "{vda}");
    assert_eq!(vda["backing"]["driver"], "qcow2", "{vda}");
    // The base is a descriptor agentd opened on the cached image.
    let base = h.agentd.state_dir.join("images").join(format!("{sha}.img"));
    let set = vda["backing"]["file"]["filename"].as_str().unwrap();
    assert!(set.starts_with("/dev/fdset/"), "{vda}");
    assert!(qemu_holds(vm.pid, &base), "QEMU does not hold {base:?}");
    let s = sha.clone();
    let (in_use, evicted) = h.agent(move |mut c| async move {
        let e = c
            .evict_image(pb::EvictImageRequest {
                server: String::new(),
                request_id: String::new(),
                sha256: s.clone(),
                local: true,
                pdisk: false,
            })
            .await
            .unwrap_err();
        c.destroy_vm(pb::DestroyVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "ephemeral".into(),
            timeout_seconds: 5,
        })
        .await
        .unwrap();
        let ev = c
            .evict_image(pb::EvictImageRequest {
                server: String::new(),
                request_id: String::new(),
                sha256: s,
                local: true,
                pdisk: false,
            })
            .await
            .unwrap()
            .into_inner()
            .evicted;
        (e, ev)
    });
    assert_eq!(in_use.code(), Code::FailedPrecondition, "{in_use:?}");
    assert_eq!(evicted.len(), 1);
    assert!(!h
        .agentd
        .state_dir
        .join("images")
        .join(format!("{sha}.img"))
        .exists());
    assert!(h
        .events(0)
        .iter()
        .any(|e| e.r#type() == pb::EventType::ImageEvicted && e.image_sha256 == sha));
}

/// Destroying a guest deletes its image clone through pdisk's quarantine
/// like any delete (issue 19): hidden from pdisk's list, listed in
/// quarantine with its purge time, and restorable with its data whole.
#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn a_destroyed_guests_image_clone_is_quarantined_and_restorable() {
    let h = Host(AgentHost::start_with_pdiskd(
        4096,
        &[],
        &["--quarantine-period", "1h"],
    ));
    let (_httpd, url, sha) = serve_guest(&h);
    let vm = h.agent(move |mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec_image("doomed", &url, &sha, false)),
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "doomed".into(),
        })
        .await
        .unwrap();
        // Stopped, so the clone's data no longer changes.
        c.stop_vm(pb::StopVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "doomed".into(),
            timeout_seconds: 5,
            force: true,
        })
        .await
        .unwrap()
        .into_inner()
    });
    let (_, vols) = pool_used(&h);
    let clone = vols
        .iter()
        .find(|v| v.labels.get("stratus.io/vm") == Some(&vm.uuid))
        .unwrap_or_else(|| panic!("no clone of guest {}: {vols:?}", vm.uuid))
        .clone();
    assert!(!clone.clone_of_volume.is_empty(), "{clone:?}");
    let url = h.pdiskd.url();
    let clone_uuid = clone.uuid.clone();
    let sum = h.ns.block_on(move || async move {
        let mut c = VolumeServiceClient::new(testkit::channel(&url).await);
        c.checksum_volume(pdpb::ChecksumVolumeRequest {
            volume: clone_uuid,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sha256
    });

    h.agent(|mut c| async move {
        c.destroy_vm(pb::DestroyVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "doomed".into(),
            timeout_seconds: 5,
        })
        .await
        .unwrap();
    });
    let (_, live) = pool_used(&h);
    assert!(
        !live.iter().any(|v| v.uuid == clone.uuid),
        "the destroyed guest's clone is still live: {live:?}"
    );
    assert!(
        live.iter().any(|v| v.uuid == clone.clone_of_volume),
        "the image's base went with the guest: {live:?}"
    );
    let url = h.pdiskd.url();
    let c_uuid = clone.uuid.clone();
    let (quarantined, restored, restored_sum) = h.ns.block_on(move || async move {
        let mut c = VolumeServiceClient::new(testkit::channel(&url).await);
        let q = c
            .list_volumes(pdpb::ListVolumesRequest {
                quarantined: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volumes;
        let r = c
            .restore_volume(pdpb::RestoreVolumeRequest {
                volume: c_uuid.clone(),
                new_name: "kept".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let sum = c
            .checksum_volume(pdpb::ChecksumVolumeRequest {
                volume: "kept".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .sha256;
        (q, r, sum)
    });
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    let q = &quarantined[0];
    assert_eq!(
        (q.uuid.as_str(), q.name.as_str()),
        (clone.uuid.as_str(), clone.name.as_str())
    );
    assert_eq!(q.state(), pdpb::VolumeState::Quarantined, "{q:?}");
    let left = humantime::parse_rfc3339(&q.purge_at)
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left > Duration::from_secs(50 * 60), "purge in {left:?}");
    assert_eq!(
        (restored.uuid.as_str(), restored.name.as_str()),
        (clone.uuid.as_str(), "kept")
    );
    assert_eq!(restored_sum, sum, "the restored clone's data changed");
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn a_saved_disk_becomes_an_image_another_guest_boots_with() {
    let h = Host::start();
    // A pdisk volume carrying a marker, written before saving.
    let url = h.pdiskd.url();
    let device_path = h.ns.block_on(move || async move {
        let mut c = VolumeServiceClient::new(testkit::channel(&url).await);
        c.create_volume(pdpb::CreateVolumeRequest {
            name: "data".into(),
            size_bytes: 16 << 20,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .device_path
    });
    std::fs::OpenOptions::new()
        .write(true)
        .open(&device_path)
        .unwrap()
        .write_all_at(b"STRATUS-MARKER:saved-before\n", 0)
        .unwrap();
    let expected_sha = sha256_of(std::path::Path::new(&device_path));
    let mut src = spec_kernel("src", "", "");
    src.disks = vec![pb::DiskSpec {
        source: Some(pb::disk_spec::Source::PdiskVolume("data".into())),
        ..Default::default()
    }];
    let since = h.events(0).last().map(|e| e.seq).unwrap_or(0);
    let saved = h.agent(move |mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(src),
        })
        .await
        .unwrap();
        c.save_image(pb::SaveImageRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "src".into(),
            device: "vda".into(),
            name: "saved-img".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(saved.url, "pdisk:///saved-img");
    let done = wait_for("IMAGE_SAVED", Duration::from_secs(60), || {
        h.events(since).into_iter().find(|e| {
            matches!(
                e.r#type(),
                pb::EventType::ImageSaved | pb::EventType::ImageSaveFailed
            )
        })
    });
    assert_eq!(done.r#type(), pb::EventType::ImageSaved, "{done:?}");
    assert_eq!(done.image_sha256, expected_sha);
    assert!(h
        .events(since)
        .iter()
        .any(|e| e.r#type() == pb::EventType::ImageSaveStarted));
    // Another guest boots with the saved image as a clone disk.
    let mut dst = spec_kernel("dst", "", "");
    dst.disks = spec_image("x", &saved.url, &expected_sha, false).disks;
    dst.disks[0].boot_index = 0;
    let vm = h.launch("", dst);
    let console = wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST ready",
        BOOT,
    );
    assert!(
        console.contains("STRATUS-GUEST marker vda=saved-before"),
        "{console}"
    );
}

/// Whether process `pid` has `path` open (QEMU keeps its own duplicate of
/// each descriptor agentd handed over, under another number).
fn qemu_holds(pid: u32, path: &std::path::Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
}

/// The names of QEMU `pid`'s threads.
fn qemu_threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

/// The `-blockdev` JSON of node `node` on QEMU `pid`'s command line:
/// its format node, below the throttle node every disk has (issue 15's
/// QoS).
fn qemu_blockdev(pid: u32, node: &str) -> serde_json::Value {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let arg = cmdline
        .split(|&b| b == 0)
        .map(String::from_utf8_lossy)
        .find(|a| a.contains(&format!("\"node-name\":\"{node}\"")))
        .unwrap_or_else(|| panic!("no blockdev {node} on QEMU {pid}'s command line"));
    let v: serde_json::Value = serde_json::from_str(&arg).unwrap();
    match v["driver"].as_str() {
        Some("throttle") => v["file"].clone(),
        _ => v,
    }
}

// ---------- confinement ----------

/// The escape that needs no QEMU bug: a guest writes a qcow2 header naming
/// a host file into its own raw disk. Formats are never probed, so at the
/// next start the guest sees exactly the bytes it wrote, and no host data.
#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn a_guest_written_qcow2_header_never_opens_a_host_file() {
    let h = Host::start();
    // Beneath the --host-file-root testkit gives agentd.
    let dir = &h.pool.dir.path().join("host-files");
    // What the hostile guest writes: a real qcow2 header whose backing file
    // is /etc/shadow (qemu-img makes it; the guest gets it on a second disk).
    let payload = dir.join("payload.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/shadow",
            payload.to_str().unwrap(),
            "1M",
        ],
    );
    let header = std::fs::read(&payload).unwrap();
    let md5 = |path: &std::path::Path| {
        run_ok("md5sum", &[path.to_str().unwrap()])
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let victim = dir.join("victim.raw");
    std::fs::write(&victim, vec![0u8; 4 << 20]).unwrap();
    let mut spec = spec_kernel(
        "hostile",
        &format!(
            "stratus.digest=vda:{} stratus.copy_disk=vdb:vda",
            header.len()
        ),
        "",
    );
    spec.disks = vec![
        pb::DiskSpec {
            source: Some(pb::disk_spec::Source::File(victim.display().to_string())),
            read_only: false,
            boot_index: 0,
            ..Default::default()
        },
        pb::DiskSpec {
            source: Some(pb::disk_spec::Source::File(payload.display().to_string())),
            read_only: true,
            boot_index: 0,
            ..Default::default()
        },
    ];
    let vm = h.agent(|mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec),
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "hostile".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    let log = wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST copied vdb vda",
        BOOT,
    );
    assert!(
        log.contains("disk vda driver=virtio_blk size=4194304"),
        "{log}"
    );
    // The header reached the host file, as raw bytes.
    assert_eq!(&std::fs::read(&victim).unwrap()[..4], b"QFI\xfb");

    let vm = h.agent(|mut c| async move {
        c.stop_vm(pb::StopVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "hostile".into(),
            timeout_seconds: 5,
            force: true,
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "hostile".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    let log = wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST ready",
        BOOT,
    );
    // Probed, vda would be a 1 MiB qcow2 reading through to /etc/shadow.
    assert!(
        log.contains("disk vda driver=virtio_blk size=4194304"),
        "{log}"
    );
    assert!(
        log.contains(&format!("STRATUS-GUEST digest vda={}\r", md5(&payload))),
        "the guest must see the header it wrote: {log}"
    );
    for node in ["vda", "vdb"] {
        let v = qemu_blockdev(vm.pid, node);
        assert_eq!(v["driver"], "raw", "{v}");
        assert!(v.get("backing").is_none(), "{v}");
    }
}

/// `Uid:` (real, effective, saved, fs), `Seccomp:` and `NoNewPrivs:` of a
/// process, from /proc/PID/status.
fn proc_status(pid: u32) -> (Vec<u32>, String, String) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in /proc/{pid}/status"))
            .trim()
            .to_string()
    };
    let uids = field("Uid:")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    (uids, field("Seccomp:"), field("NoNewPrivs:"))
}

/// Whether a process running as `uid`:`uid` can open `path` for reading.
fn opens_as(uid: u32, path: &std::path::Path) -> bool {
    use std::os::unix::process::CommandExt;
    std::process::Command::new("head")
        .args(["-c", "1"])
        .arg(path)
        .uid(uid)
        .gid(uid)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Every guest's QEMU runs as its own unprivileged uid under the full
/// seccomp sandbox with NoNewPrivs; no guest's uid opens another guest's
/// disk; after an agentd crash the adopted guests keep their uids and a new
/// guest gets another.
#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn guests_run_confined_each_as_its_own_user() {
    let mut h = Host::start();
    // Beneath the --host-file-root testkit gives agentd.
    let root = h.pool.dir.path().join("host-files");
    let mut specs = Vec::new();
    let mut disks = Vec::new();
    for name in ["first", "second"] {
        let disk = root.join(format!("{name}.raw"));
        let mut data = format!("STRATUS-MARKER:{name}\n").into_bytes();
        data.resize(1 << 20, 0);
        std::fs::write(&disk, &data).unwrap();
        let mut spec = spec_kernel(name, "", "");
        spec.disks = vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::File(disk.display().to_string())),
            read_only: false,
            boot_index: 0,
            ..Default::default()
        }];
        specs.push(spec);
        disks.push(disk);
    }
    // A world-readable file beside the disks: the control that shows a
    // guest's uid can reach this directory, so a refusal below is the
    // disk's own permissions.
    let control = root.join("control.raw");
    std::fs::write(&control, b"anyone").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut up = root.parent();
    while let Some(d) = up {
        // The test's temporary directories above the pool.
        if d.starts_with(std::env::temp_dir()) && d != std::env::temp_dir() {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        up = d.parent();
    }
    let vms: Vec<pb::Vm> = h.agent(|mut c| async move {
        let mut out = Vec::new();
        for spec in specs {
            let name = spec.name.clone();
            c.create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                project: String::new(),
                spec: Some(spec),
            })
            .await
            .unwrap();
            out.push(
                c.start_vm(pb::VmRequest {
                    request_id: String::new(),
                    project: String::new(),
                    vm: name,
                })
                .await
                .unwrap()
                .into_inner(),
            );
        }
        out
    });
    for (vm, name) in vms.iter().zip(["first", "second"]) {
        let log = wait_console(
            std::path::Path::new(&vm.console_log),
            "STRATUS-GUEST ready",
            BOOT,
        );
        assert!(log.contains(&format!("marker vda={name}")), "{log}");
    }
    let mut uids = Vec::new();
    for vm in &vms {
        let (uid, seccomp, no_new_privs) = proc_status(vm.pid);
        assert!(uid.iter().all(|&u| u == uid[0] && u != 0), "{uid:?}");
        assert_eq!(seccomp, "2", "QEMU must run under a seccomp filter");
        assert_eq!(no_new_privs, "1");
        uids.push(uid[0]);
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.pid)).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            cmdline.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{cmdline}"
        );
    }
    assert_ne!(uids[0], uids[1], "each guest has its own uid");
    // Each QEMU is in its guest's cgroup, with the limits the host's
    // cgroup v2 has controllers for.
    let parent = test_cgroup_parent().expect("a cgroup v2 hierarchy");
    let controllers = std::fs::read_to_string(parent.join("cgroup.controllers")).unwrap();
    for vm in &vms {
        let cg = parent.join(format!("vm-{}", vm.uuid));
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), vm.pid.to_string(), "{}", cg.display());
        let limits = [
            (
                "memory",
                "memory.max",
                ((128u64 << 20) + (256 << 20) + (1 << 30)).to_string(),
            ),
            ("pids", "pids.max", "1024".to_string()),
            ("cpu", "cpu.max", "200000 100000".to_string()),
        ];
        for (controller, file, want) in limits {
            if controllers.split_whitespace().any(|c| c == controller) {
                let got = std::fs::read_to_string(cg.join(file)).unwrap();
                assert_eq!(got.trim(), want, "{}", cg.join(file).display());
            } else {
                eprintln!(
                    "skipped: {file} (the cgroup v2 hierarchy here has no {controller} \
                     controller: {})",
                    controllers.trim()
                );
            }
        }
    }
    let host = h.agent(|mut c| async move {
        c.get_host(pb::GetHostRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(
        host.qemu_privilege_option, "-runas",
        "QEMU 7.2 offers -runas"
    );
    assert!(host.qemu_seccomp);
    assert!(
        host.qemu_confinement.contains("uid pool") && host.qemu_confinement.contains("spawn=deny"),
        "{}",
        host.qemu_confinement
    );
    let shown = h.agentd.ctl(&["host", "show"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("qemu offers:   -runas, seccomp"), "{shown}");

    for (i, disk) in disks.iter().enumerate() {
        let other = uids[1 - i];
        assert!(
            opens_as(other, &control),
            "uid {other} reaches the directory"
        );
        assert!(
            !opens_as(other, disk),
            "uid {other} opened guest {i}'s disk {}",
            disk.display()
        );
        // Nor the guest's files under agentd's state directory.
        let console = std::path::Path::new(&vms[i].console_log);
        assert!(!opens_as(other, console), "{}", console.display());
    }

    // agentd dies and comes back: the guests keep their uids and cgroups
    // (the second one, moved out meanwhile, is put back), and a new guest
    // gets neither uid.
    h.agentd.kill9();
    let top_procs = parent.parent().unwrap().join("cgroup.procs");
    std::fs::write(&top_procs, vms[1].pid.to_string()).unwrap();
    h.agentd.restart();
    let third = h.agent(|mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec_kernel("third", "", "")),
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "third".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    for (vm, uid) in vms.iter().zip(&uids) {
        assert_eq!(proc_status(vm.pid).0[0], *uid, "adopted guest changed uid");
        let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", vm.pid)).unwrap();
        assert!(
            cg.lines()
                .any(|l| l == format!("0::/stratus-test.slice/vm-{}", vm.uuid)),
            "adopted guest left its cgroup: {cg}"
        );
    }
    let (third_uid, seccomp, _) = proc_status(third.pid);
    assert_eq!(seccomp, "2");
    assert!(
        !uids.contains(&third_uid[0]) && third_uid[0] != 0,
        "{third_uid:?} vs {uids:?}"
    );
    // The adopted guests are still managed: a stop ends the first one.
    let stopped = h.agent(|mut c| async move {
        c.stop_vm(pb::StopVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "first".into(),
            timeout_seconds: 5,
            force: true,
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(stopped.state(), pb::VmState::Stopped);
    assert!(
        !parent.join(format!("vm-{}", vms[0].uuid)).exists(),
        "a stopped guest's cgroup is removed"
    );
    assert!(parent.join(format!("vm-{}", vms[1].uuid)).exists());
}

/// Guests whose QEMU ended while agentd was down: at its restart,
/// reconciliation records them STOPPED, removes their cgroups, releases
/// their uids (the next guest gets the lowest one again) and says so in its
/// report; a guest still running keeps both.
#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn guests_that_ended_while_agentd_was_down_lose_their_cgroup_and_uid() {
    let mut h = Host::start();
    let start = |h: &Host, name: &'static str| {
        h.agent(move |mut c| async move {
            c.create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                project: String::new(),
                spec: Some(spec_kernel(name, "", "")),
            })
            .await
            .unwrap();
            c.start_vm(pb::VmRequest {
                request_id: String::new(),
                project: String::new(),
                vm: name.into(),
            })
            .await
            .unwrap()
            .into_inner()
        })
    };
    let gone = start(&h, "gone");
    let kept = start(&h, "kept");
    let parent = test_cgroup_parent().expect("a cgroup v2 hierarchy");
    let cgroup = |vm: &pb::Vm| parent.join(format!("vm-{}", vm.uuid));
    let gone_uid = proc_status(gone.pid).0[0];
    let kept_uid = proc_status(kept.pid).0[0];
    assert!(gone_uid < kept_uid, "{gone_uid} {kept_uid}");
    assert!(cgroup(&gone).exists() && cgroup(&kept).exists());

    h.agentd.kill9();
    // SAFETY: signals the pid of a guest this test started.
    unsafe { libc::kill(gone.pid as libc::pid_t, libc::SIGKILL) };
    wait_for("gone's QEMU to end", Duration::from_secs(10), || {
        std::fs::read(format!("/proc/{}/cmdline", gone.pid))
            .map_or(true, |c| c.is_empty())
            .then_some(())
    });
    // Until agentd is back, the dead guest's cgroup stays.
    assert!(cgroup(&gone).exists());
    // A cgroup no record holds (a crash after a destroy's tear-down), an
    // hour old, and one just made (another agentd's guest about to enter
    // it: the test agentds share the parent).
    let stray = parent.join(format!("vm-{}", uuid::Uuid::new_v4()));
    let fresh = parent.join(format!("vm-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&stray).unwrap();
    std::fs::create_dir(&fresh).unwrap();
    let touched = std::process::Command::new("touch")
        .args(["-d", "1 hour ago"])
        .arg(&stray)
        .status()
        .unwrap();
    assert!(touched.success());
    h.agentd.restart();

    let log = h.agentd.log_text();
    let want = format!(
        "gone: QEMU ended while agentd was away; its cgroup removed; uid {gone_uid} released"
    );
    assert!(log.contains(&want), "no {want:?} in agentd's log:\n{log}");
    assert!(!cgroup(&gone).exists(), "{}", cgroup(&gone).display());
    let swept = format!("removed cgroup {} of no recorded guest", stray.display());
    assert!(log.contains(&swept), "no {swept:?} in agentd's log:\n{log}");
    assert!(!stray.exists());
    assert!(fresh.exists(), "a young cgroup was swept");
    std::fs::remove_dir(&fresh).unwrap();
    assert!(
        h.events(0)
            .iter()
            .any(|e| e.r#type() == pb::EventType::LeftoverRemoved
                && e.detail == swept
                && e.cause() == pb::EventCause::Reconciliation),
        "no LEFTOVER_REMOVED event for {}",
        stray.display()
    );
    let procs = std::fs::read_to_string(cgroup(&kept).join("cgroup.procs")).unwrap();
    assert_eq!(procs.trim(), kept.pid.to_string());
    assert_eq!(proc_status(kept.pid).0[0], kept_uid);
    let state = h.agent(|mut c| async move {
        c.get_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "gone".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .state()
    });
    assert_eq!(state, pb::VmState::Stopped);
    let events: Vec<pb::Event> = h
        .events(0)
        .into_iter()
        .filter(|e| e.vm_name == "gone")
        .collect();
    let last = events.last().expect("gone has events");
    assert_eq!(last.r#type(), pb::EventType::Stopped, "{events:?}");
    assert!(
        last.detail.contains("ended while agentd was not running"),
        "{last:?}"
    );

    // The released uid is free again: the next guest gets it.
    let next = start(&h, "next");
    assert_eq!(proc_status(next.pid).0[0], gone_uid);
    assert!(cgroup(&next).exists());
}

/// Whether agentd's table holds every rule of `tap`'s chain (`rules` of
/// them) and its map entry; false when the table is gone.
fn tap_fully_protected(h: &Host, tap: &str, rules: usize) -> bool {
    let out =
        h.ns.command("nft")
            .args(["-j", "list", "table", "bridge", "stratus"])
            .output()
            .unwrap();
    if !out.status.success() {
        return false;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = v["nftables"].as_array().unwrap();
    let chain = format!("nic-{tap}");
    let in_chain = items.iter().filter(|i| i["rule"]["chain"] == chain).count();
    let mapped = items.iter().any(|i| {
        i["map"]["name"] == "nics"
            && i["map"]["elem"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e[0] == tap))
    });
    in_chain == rules && mapped
}

/// Someone flushes the host's ruleset, or empties one guest's chain: within
/// agentd's check interval the rules are back, and agentd's log says which
/// guest and tap; a destroyed guest's rules are not brought back.
#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn flushed_anti_spoofing_rules_are_put_back() {
    let h = Host::start_with(&["--nic-filter-check", "1s"]);
    h.agent(|mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec_kernel("watched", "", "52:54:00:00:e7:01")),
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "watched".into(),
        })
        .await
        .unwrap();
    });
    let taps: Vec<String> = tap_rules(&h).into_keys().collect();
    assert_eq!(taps.len(), 1, "{taps:?}");
    let tap = taps[0].clone();
    let out =
        h.ns.command("nft")
            .args([
                "-j",
                "list",
                "chain",
                "bridge",
                "stratus",
                &format!("nic-{tap}"),
            ])
            .output()
            .unwrap();
    let rules = String::from_utf8_lossy(&out.stdout)
        .matches("\"rule\"")
        .count();
    assert!(rules >= 6, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(tap_fully_protected(&h, &tap, rules));

    const LOGGED: &str = "were missing (flushed by someone?); re-installed";
    let chain = format!("nic-{tap}");
    for (what, args) in [
        ("the whole ruleset flushed", vec!["flush", "ruleset"]),
        (
            "the guest's chain emptied",
            vec!["flush", "chain", "bridge", "stratus", &chain],
        ),
    ] {
        let before = h.agentd.log_text().matches(LOGGED).count();
        assert!(h.ns.command("nft").args(&args).status().unwrap().success());
        assert!(!tap_fully_protected(&h, &tap, rules), "{what}");
        wait_for(
            &format!("the rules back after {what}"),
            Duration::from_secs(15),
            || tap_fully_protected(&h, &tap, rules).then_some(()),
        );
        let log = h.agentd.log_text();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(LOGGED)).collect();
        assert_eq!(lines.len(), before + 1, "{what}: {log}");
        assert!(
            lines.last().unwrap().contains("watched") && lines.last().unwrap().contains(&tap),
            "{lines:?}"
        );
    }

    // Destroyed: its rules go and stay gone.
    h.agent(|mut c| async move {
        c.destroy_vm(pb::DestroyVmRequest {
            project: String::new(),
            vm: "watched".into(),
            timeout_seconds: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(tap_rules(&h).is_empty());
}

/// The anti-spoofing chain of each tap in agentd's nftables table, with the
/// packets its drop rules counted, from inside the test namespace.
fn tap_rules(h: &Host) -> std::collections::BTreeMap<String, u64> {
    let out =
        h.ns.command("nft")
            .args(["-j", "list", "table", "bridge", "stratus"])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut chains = std::collections::BTreeMap::new();
    for item in v["nftables"].as_array().unwrap() {
        if let Some(tap) = item["chain"]["name"]
            .as_str()
            .and_then(|n| n.strip_prefix("nic-"))
        {
            chains.entry(tap.to_string()).or_insert(0);
        }
        if let Some(tap) = item["rule"]["chain"]
            .as_str()
            .and_then(|n| n.strip_prefix("nic-"))
        {
            let dropped: u64 = item["rule"]["expr"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|e| e["counter"]["packets"].as_u64())
                .sum();
            *chains.entry(tap.to_string()).or_insert(0) += dropped;
        }
    }
    chains
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn a_guest_forging_its_mac_or_ip_is_not_heard_and_its_rules_follow_it() {
    const FORGED_MAC: &str = "52:54:00:00:d6:66";
    let mut h = Host::start();
    // honest pings liar; liar pings honest, then forges its MAC, then its
    // IP, pinging after each and again once it is itself.
    let vms = h.agent(|mut c| async move {
        let mut out = Vec::new();
        for (name, me, peer, mac, extra) in [
            (
                "honest",
                "10.213.1.1",
                "10.213.1.2",
                "52:54:00:00:d6:01",
                String::new(),
            ),
            (
                "liar",
                "10.213.1.2",
                "10.213.1.1",
                "52:54:00:00:d6:02",
                format!("stratus.spoof=mac:{FORGED_MAC},ip:10.213.1.9/24"),
            ),
        ] {
            let mut spec = spec_kernel(
                name,
                &format!("stratus.ip={me}/24 stratus.peer={peer} {extra}"),
                mac,
            );
            spec.nics[0].ips = vec![me.into()];
            c.create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                project: String::new(),
                spec: Some(spec),
            })
            .await
            .unwrap();
            out.push(
                c.start_vm(pb::VmRequest {
                    request_id: String::new(),
                    project: String::new(),
                    vm: name.into(),
                })
                .await
                .unwrap()
                .into_inner(),
            );
        }
        out
    });
    let taps: Vec<String> = vms.iter().map(|v| v.nics[0].tap.clone()).collect();
    assert_eq!(tap_rules(&h).keys().cloned().collect::<Vec<_>>(), {
        let mut t = taps.clone();
        t.sort();
        t
    });
    let honest_log = wait_console(
        std::path::Path::new(&vms[0].console_log),
        "STRATUS-GUEST ping 10.213.1.2",
        BOOT,
    );
    assert!(
        honest_log.contains("STRATUS-GUEST ping 10.213.1.2 ok"),
        "{honest_log}"
    );
    let liar = std::path::Path::new(&vms[1].console_log);
    let log = wait_console(liar, "STRATUS-GUEST restored ping 10.213.1.1", BOOT);
    assert!(log.contains("STRATUS-GUEST ping 10.213.1.1 ok"), "{log}");
    assert!(
        log.contains("STRATUS-GUEST spoofed mac ping 10.213.1.1 failed"),
        "{log}"
    );
    let log = wait_console(liar, "STRATUS-GUEST spoofed ip ping", BOOT);
    assert!(
        log.contains("STRATUS-GUEST spoofed ip ping 10.213.1.1 failed"),
        "{log}"
    );
    let log = wait_for("two restored pings", BOOT, || {
        let text = std::fs::read_to_string(liar).ok()?;
        (text
            .matches("STRATUS-GUEST restored ping 10.213.1.1")
            .count()
            >= 2)
            .then_some(text)
    });
    assert_eq!(
        log.matches("STRATUS-GUEST restored ping 10.213.1.1 ok")
            .count(),
        2,
        "its own traffic flows again after each forgery: {log}"
    );
    // Dropped by the liar's rules before the bridge learned from them: the
    // bridge never saw the forged MAC on any port.
    let counted = tap_rules(&h);
    assert!(counted[&taps[1]] > 0, "{counted:?}");
    let out =
        h.ns.command("bridge")
            .args(["-j", "fdb", "show", "br", BRIDGE])
            .output()
            .unwrap();
    let fdb = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        fdb.contains("52:54:00:00:d6:02"),
        "the liar's own MAC was learned: {fdb}"
    );
    assert!(
        !fdb.contains(FORGED_MAC),
        "the forged MAC reached the bridge: {fdb}"
    );

    // agentd dies; the honest guest dies while it is away. At restart the
    // adopted liar keeps its rules and the honest guest's go.
    h.agentd.kill9();
    // SAFETY: signals the pid of a guest this test started.
    unsafe { libc::kill(vms[0].pid as libc::pid_t, libc::SIGKILL) };
    wait_for("honest gone", Duration::from_secs(10), || {
        std::fs::read(format!("/proc/{}/cmdline", vms[0].pid))
            .map_or(true, |c| c.is_empty())
            .then_some(())
    });
    h.agentd.restart();
    let agentd_log = h.agentd.log_text();
    assert!(
        !agentd_log.contains("console not followed"),
        "the adopted guest's console log is kept again: {agentd_log}"
    );
    let rules = tap_rules(&h);
    assert_eq!(rules.keys().collect::<Vec<_>>(), [&taps[1]], "{rules:?}");
    h.agent(|mut c| async move {
        c.destroy_vm(pb::DestroyVmRequest {
            project: String::new(),
            vm: "liar".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    assert!(tap_rules(&h).is_empty());
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn a_guest_spamming_its_console_never_grows_the_log_past_the_cap() {
    const CAP: u64 = 32 << 10;
    let h = Host::start_with(&["--console-log-max", "32K"]);
    // About 100 bytes a line: 2000 lines are six times the cap.
    let vm = h.agent(|mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            project: String::new(),
            request_id: String::new(),
            spec: Some(spec_kernel("spammer", "stratus.spam=2000", "")),
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            project: String::new(),
            request_id: String::new(),
            vm: "spammer".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    let log = std::path::PathBuf::from(&vm.console_log);
    let old = agent::console::rotated(&log);
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    // Watched while the guest prints, not only at the end.
    let mut most = 0;
    let text = wait_for("spam done", BOOT, || {
        let (cur, prev) = (size(&log), size(&old));
        most = most.max(cur + prev);
        assert!(cur <= CAP / 2 && prev <= CAP / 2, "{cur} + {prev} bytes");
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("STRATUS-GUEST spam done").then_some(text)
    });
    assert!(most > CAP / 2, "the log was rotated at least once: {most}");
    assert!(size(&old) > 0);
    assert!(
        !text.contains("STRATUS-GUEST ready"),
        "the oldest lines are gone"
    );
    assert!(text.contains("STRATUS-SPAM 001999"), "the newest are kept");

    // agentctl shows both files, oldest first, with the guest's terminal
    // control removed; --raw keeps it.
    let out = h.agentd.ctl(&["vm", "console", "spammer"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        shown.ends_with("STRATUS-GUEST spam done\n"),
        "{}",
        &shown[shown.len().saturating_sub(300)..]
    );
    assert!(
        !shown.contains('\x1b') && !shown.contains('\x07'),
        "escapes reached the terminal"
    );
    assert!(
        shown.len() as u64 > size(&log),
        "the previous file is shown too"
    );
    let raw = h.agentd.ctl(&["vm", "console", "spammer", "--raw"]);
    assert!(String::from_utf8_lossy(&raw.stdout).contains("\x1b[2J\x1b]0;owned\x07"));
}

/// A pdisk client call inside the host's namespace.
fn pdisk_call<F, Fut, T>(h: &Host, f: F) -> T
where
    F: FnOnce(VolumeServiceClient<tonic::transport::Channel>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let url = h.pdiskd.url();
    h.ns.block_on(
        move || async move { f(VolumeServiceClient::new(testkit::channel(&url).await)).await },
    )
}

fn checksum(h: &Host, volume: &str) -> String {
    let volume = volume.to_string();
    pdisk_call(h, move |mut c| async move {
        c.checksum_volume(pdpb::ChecksumVolumeRequest {
            volume,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sha256
    })
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn on_the_storage_host_a_guest_opens_its_pdisk_volumes_directly_with_no_target() {
    // agentd and pdiskd know this host by one id (issue 16).
    let h = Host(AgentHost::start_same_host(4096, "e2e-same-host", &[]));
    h.guest_volume("same-root");
    // 1. A guest boots from its pdisk volume: the volume's own file, held
    //    by QEMU, no target in tgtd, the export pdisk's record ("local").
    let vm = h.agent(|mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec_pdisk("same1", "same-root")),
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "same1".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    let console = wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST ready",
        BOOT,
    );
    assert!(
        console.contains("STRATUS-GUEST disk vda driver=virtio_blk"),
        "{console}"
    );
    let exports = h.exports();
    assert_eq!(exports.len(), 1, "{exports:?}");
    assert_eq!(exports[0].exporter, "local");
    assert_eq!(exports[0].initiators, vec![INITIATOR.to_string()]);
    let root_file = std::path::PathBuf::from(&exports[0].local.as_ref().unwrap().path);
    assert_eq!(
        vm.disks[0].attachment,
        format!("file:{}", root_file.display())
    );
    assert!(qemu_holds(vm.pid, &root_file), "QEMU holds {root_file:?}");
    let vda = qemu_blockdev(vm.pid, "vda");
    assert_eq!(vda["file"]["driver"], "file", "{vda}");
    assert_eq!(vda["file"]["cache"]["direct"], true, "{vda}");
    // Its I/O runs in an iothread of its own (agentd's default, issue
    // 16): QEMU made the thread (named so with debug-threads=on).
    let threads = qemu_threads(vm.pid);
    assert!(
        threads.iter().any(|t| t == "IO iothread-vda"),
        "{threads:?}"
    );
    assert!(
        vda["file"]["filename"]
            .as_str()
            .unwrap()
            .starts_with("/dev/fdset/"),
        "{vda}"
    );
    let show = h.tgtd.show();
    assert!(!show.contains("Target "), "no target: {show}");
    // The file stays pdiskd's: QEMU (the guest's uid) got a descriptor.
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&root_file).unwrap().uid(), 0);
    }
    h.agent(|mut c| async move {
        c.stop_vm(pb::StopVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "same1".into(),
            timeout_seconds: 5,
            force: true,
        })
        .await
        .unwrap();
    });
    assert!(h.exports().is_empty());

    // 2. A guest writes into a second pdisk volume (copy_disk, fsynced);
    //    pdisk's checksum reads the same bytes back, and its snapshot
    //    and clone keep them.
    let dir = h.pool.dir.path().join("host-files");
    let payload = dir.join("payload.raw");
    let mut bytes = b"STRATUS-MARKER:written-on-the-storage-host\n".to_vec();
    bytes.extend((0..(1u32 << 20) - bytes.len() as u32).map(|i| (i % 251) as u8));
    std::fs::write(&payload, &bytes).unwrap();
    pdisk_call(&h, |mut c| async move {
        c.create_volume(pdpb::CreateVolumeRequest {
            name: "same-data".into(),
            size_bytes: 4 << 20,
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let mut spec = spec_kernel("same2", "stratus.copy_disk=vdb:vda", "");
    spec.disks = vec![
        pb::DiskSpec {
            source: Some(pb::disk_spec::Source::PdiskVolume("same-data".into())),
            read_only: false,
            boot_index: 0,
            ..Default::default()
        },
        pb::DiskSpec {
            source: Some(pb::disk_spec::Source::File(payload.display().to_string())),
            read_only: true,
            boot_index: 0,
            ..Default::default()
        },
    ];
    let vm = h.agent(|mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec),
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "same2".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert!(
        vm.disks[0].attachment.starts_with("file:"),
        "{:?}",
        vm.disks
    );
    wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST copied vdb vda",
        BOOT,
    );
    assert!(!h.tgtd.show().contains("Target "));
    let mut want = bytes.clone();
    want.resize(4 << 20, 0);
    let want = {
        let f = dir.join("want.raw");
        std::fs::write(&f, &want).unwrap();
        sha256_of(&f)
    };
    assert_eq!(checksum(&h, "same-data"), want);
    pdisk_call(&h, |mut c| async move {
        c.create_snapshot(pdpb::CreateSnapshotRequest {
            volume: "same-data".into(),
            name: "s1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.clone_volume(pdpb::CloneVolumeRequest {
            source: "same-data".into(),
            name: "same-copy".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    assert_eq!(checksum(&h, "same-copy"), want);
    // 3. Destroying the guest unexports; the volumes are pdisk's as ever.
    h.agent(|mut c| async move {
        c.destroy_vm(pb::DestroyVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "same2".into(),
            timeout_seconds: 5,
        })
        .await
        .unwrap();
    });
    assert!(h.exports().is_empty());
    pdisk_call(&h, |mut c| async move {
        c.delete_volume(pdpb::DeleteVolumeRequest {
            volume: "same-copy".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    assert_eq!(checksum(&h, "same-data"), want);
}
