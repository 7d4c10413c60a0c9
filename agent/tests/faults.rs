//! Fault injection: agentd killed at every step boundary of create, start,
//! stop, destroy, image pulls and saves, disk and NIC hot-plug into a
//! running guest and their unplug, and a live change of a disk's limits,
//! then restarted, must leave nothing for anyone to clean up (and, after
//! a hot-plug or unplug, the record must equal QEMU's devices; after a
//! limits change, QEMU must enforce the limits the spec says).
//!
//! Runs `agentd-failpoints` (agentd built with the `failpoints` feature:
//! `cargo build -p agent --features failpoints --bin agentd-failpoints`,
//! which scripts/test's integration tier does) on a real stack in a test
//! namespace: an XFS reflink pool, tgtd, pdiskd, a bridge, and guests under
//! TCG. The guests are the cheapest there are: no kernel, SeaBIOS finding
//! nothing to boot on a 4 MiB pdisk volume and a clone of a 1 MiB image
//! (QEMU runs, QMP answers, nothing boots); but an unplug needs a guest OS
//! that releases the device, so the unplug pairs boot the test guest of
//! scripts/guest-image (`STRATUS_GUEST_DIR`, its kernel and initramfs,
//! "ready" in seconds). For each (operation, crash
//! point) pair of `agent::failpoints::POINTS` it restarts agentd with that
//! point set to exit the process, issues the operation, checks agentd died
//! there (so the pair is covered), restarts it without failpoints and
//! checks: no guest left STARTING/STOPPING/DESTROYING; every QEMU running a
//! guest's UUID is that guest's recorded, RUNNING one and every RUNNING
//! guest's QEMU lives; no tap but those of running guests; pdisk exports to
//! this host only for running guests' disks; no image clone without its
//! guest; no `.partial-*` cache file or overlay; no guest directory without
//! its guest;
//! every acknowledged guest still there; event seqs 1..n with the history
//! before the crash unchanged. The hot-plug and QoS checks against QEMU
//! are in `faults/hotplug.rs`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use agent::failpoints::{CRASH_EXIT_CODE, POINTS};
use stratus_proto::agent::v1 as pb;
use stratus_proto::pdisk::v1 as pdpb;
use testkit::*;

#[path = "faults/hotplug.rs"]
mod hotplug;
#[path = "faults/invariants.rs"]
mod invariants;
use hotplug::{
    check_detached, check_devices, check_qos, new_qos, old_qos, qemu_limits, qmp_socket,
};
use invariants::{check, check_save, qemus};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Start,
    StartLocal,
    Stop,
    Destroy,
    Save,
    Pull,
    AttachDisk,
    AttachNic,
    SetQos,
    DetachDisk,
    DetachNic,
}

impl Op {
    const ALL: [Op; 12] = [
        Op::Create,
        Op::Start,
        Op::StartLocal,
        Op::Stop,
        Op::Destroy,
        Op::Save,
        Op::Pull,
        Op::AttachDisk,
        Op::AttachNic,
        Op::SetQos,
        Op::DetachDisk,
        Op::DetachNic,
    ];

    fn group(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Start => "start",
            Op::StartLocal => "start_local",
            Op::Stop => "stop",
            Op::Destroy => "destroy",
            Op::Save => "save",
            Op::Pull => "pull",
            Op::AttachDisk => "attach_disk",
            Op::AttachNic => "attach_nic",
            Op::SetQos => "set_qos",
            Op::DetachDisk => "detach_disk",
            Op::DetachNic => "detach_nic",
        }
    }
}

fn points(group: &str) -> &'static [&'static str] {
    POINTS
        .iter()
        .find(|(g, _)| *g == group)
        .unwrap_or_else(|| panic!("no crash points for {group}"))
        .1
}

/// The hyperconverged test host ([`AgentHost`], agentd-failpoints) with an
/// httpd serving the images. Fields drop in order: the httpd, then the
/// host (agentd and its guests first, the namespace last).
struct Host {
    _httpd: Httpd,
    base: AgentHost,
    /// `pdisk:///…` of the image every guest's first disk is a clone of.
    image_url: String,
    image_sha: String,
    www: std::path::PathBuf,
}

impl Host {
    fn start() -> Host {
        let base = AgentHost::start_failpoints(2048);
        let www = base.pool.dir.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        let httpd = Httpd::start_in(&base.ns, &www);
        let mut h = Host {
            base,
            _httpd: httpd,
            image_url: String::new(),
            image_sha: String::new(),
            www,
        };
        // The image the guests' clone disks come from, imported once.
        let (url, sha) = h.new_image("base");
        let pulled = h
            .agent(move |mut c| async move {
                c.pull_image(pb::PullImageRequest {
                    server: String::new(),
                    image: Some(pb::ImageRef {
                        url,
                        sha256: sha,
                        format: pb::ImageFormat::Raw as i32,
                        endorser: String::new(),
                        endorsement: String::new(),
                    }),
                    to_pdisk: true,
                    request_id: String::new(),
                })
                .await
            })
            .unwrap()
            .into_inner();
        h.image_sha = pulled.sha256;
        h.image_url = format!("pdisk:///{}", pulled.volume);
        h
    }

    /// A new 1 MiB raw image of distinct bytes in the httpd's directory.
    fn new_image(&self, name: &str) -> (String, String) {
        let path = self.www.join(format!("{name}.raw"));
        let mut bytes = vec![0u8; 1 << 20];
        let stamp = format!("{name} {:?}", Instant::now());
        bytes[..stamp.len()].copy_from_slice(stamp.as_bytes());
        std::fs::write(&path, &bytes).unwrap();
        (
            format!("http://127.0.0.1:8080/{name}.raw"),
            sha256_of(&path),
        )
    }

    fn vms(&self) -> Vec<pb::Vm> {
        self.agent(|mut c| async move {
            c.list_vms(pb::ListVmsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .vms
        })
    }

    fn events(&self) -> Vec<pb::Event> {
        let url = self.agentd.url();
        self.ns.block_on(move || agent_events(url, 0))
    }

    /// A guest named `name`: a clone of the test image and its own empty
    /// pdisk volume, one NIC; defined, not started.
    fn define(&self, name: &str) -> Result<pb::Vm, tonic::Status> {
        let volume = format!("{name}-data");
        let v = volume.clone();
        self.pdisk(move |mut c| async move {
            c.create_volume(pdpb::CreateVolumeRequest {
                name: v,
                size_bytes: 4 << 20,
                ..Default::default()
            })
            .await
            .unwrap();
        });
        let spec = pb::VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            disks: vec![
                pb::DiskSpec {
                    source: Some(pb::disk_spec::Source::Image(pb::ImageRef {
                        url: self.image_url.clone(),
                        sha256: self.image_sha.clone(),
                        format: pb::ImageFormat::Raw as i32,
                        endorser: String::new(),
                        endorsement: String::new(),
                    })),
                    boot_index: 1,
                    ..Default::default()
                },
                pb::DiskSpec {
                    source: Some(pb::disk_spec::Source::PdiskVolume(volume)),
                    ..Default::default()
                },
            ],
            nics: vec![pb::NicSpec {
                bridge: BRIDGE.into(),
                ..Default::default()
            }],
            // A NoCloud seed too (its user-data may hold secrets: it must
            // not outlive a run).
            context: Some(pb::Contextualization {
                user_data: "#cloud-config\n".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.agent(move |mut c| async move {
            c.create_vm(pb::CreateVmRequest {
                spec: Some(spec),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
        })
    }

    /// A guest named `name` whose one disk is a local qcow2 overlay on a
    /// cached image (pulled by its start); defined, not started.
    fn define_local(&self, name: &str) -> Result<pb::Vm, tonic::Status> {
        let (url, sha256) = self.new_image(name);
        let spec = pb::VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            disks: vec![pb::DiskSpec {
                source: Some(pb::disk_spec::Source::Image(pb::ImageRef {
                    url,
                    sha256,
                    format: pb::ImageFormat::Raw as i32,
                    endorser: String::new(),
                    endorsement: String::new(),
                })),
                persistence: pb::DiskPersistence::Local as i32,
                boot_index: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        self.agent(move |mut c| async move {
            c.create_vm(pb::CreateVmRequest {
                spec: Some(spec),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
        })
    }

    fn call(&self, op: Op, name: &str) -> Result<(), tonic::Status> {
        let vm = name.to_string();
        let req = pb::VmRequest {
            vm: vm.clone(),
            ..Default::default()
        };
        match op {
            Op::Create => self.define(name).map(drop),
            Op::Start | Op::StartLocal => {
                self.agent(move |mut c| async move { c.start_vm(req).await.map(drop) })
            }
            Op::Stop => self.agent(move |mut c| async move {
                c.stop_vm(pb::StopVmRequest {
                    vm,
                    force: true,
                    ..Default::default()
                })
                .await
                .map(drop)
            }),
            Op::Destroy => self.agent(move |mut c| async move {
                c.destroy_vm(pb::DestroyVmRequest {
                    vm,
                    timeout_seconds: 5,
                    ..Default::default()
                })
                .await
                .map(drop)
            }),
            // The guest's own pdisk volume becomes image base NAME-img.
            Op::Save => self.agent(move |mut c| async move {
                c.save_image(pb::SaveImageRequest {
                    vm: vm.clone(),
                    device: "vdb".into(),
                    name: format!("{vm}-img"),
                    ..Default::default()
                })
                .await
                .map(drop)
            }),
            // Its own volume NAME-hot, hot-plugged into the running guest.
            Op::AttachDisk => self.agent(move |mut c| async move {
                c.attach_disk(pb::AttachDiskRequest {
                    disk: Some(pb::DiskSpec {
                        source: Some(pb::disk_spec::Source::PdiskVolume(format!("{vm}-hot"))),
                        ..Default::default()
                    }),
                    vm,
                    ..Default::default()
                })
                .await
                .map(drop)
            }),
            Op::AttachNic => self.agent(move |mut c| async move {
                c.attach_nic(pb::AttachNicRequest {
                    vm,
                    nic: Some(pb::NicSpec {
                        bridge: BRIDGE.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .map(drop)
            }),
            Op::SetQos => self.set_qos(name, new_qos()),
            // The hot-plugged volume NAME-hot, and the hot-plugged NIC.
            Op::DetachDisk => {
                let hot = format!("pdisk:{name}-hot");
                let device = self.vm(name).disks.into_iter().find(|d| d.source == hot);
                let device = device.expect("the hot-plugged disk").device;
                self.agent(move |mut c| async move {
                    c.detach_disk(pb::DetachDiskRequest {
                        vm,
                        device,
                        timeout_seconds: 60,
                        ..Default::default()
                    })
                    .await
                    .map(drop)
                })
            }
            Op::DetachNic => {
                let mac = self.vm(name).nics[0].mac.clone();
                self.agent(move |mut c| async move {
                    c.detach_nic(pb::DetachNicRequest {
                        vm,
                        nic: mac,
                        timeout_seconds: 60,
                        ..Default::default()
                    })
                    .await
                    .map(drop)
                })
            }
            Op::Pull => {
                let (url, sha) = self.new_image(name);
                self.agent(move |mut c| async move {
                    c.pull_image(pb::PullImageRequest {
                        server: String::new(),
                        image: Some(pb::ImageRef {
                            url,
                            sha256: sha,
                            format: pb::ImageFormat::Raw as i32,
                            endorser: String::new(),
                            endorsement: String::new(),
                        }),
                        to_pdisk: true,
                        request_id: String::new(),
                    })
                    .await
                    .map(drop)
                })
            }
        }
    }

    /// A running guest with an OS (the test guest of scripts/guest-image,
    /// booted from its kernel: it releases a device on `device_del`), its
    /// own volume `NAME-hot` and a NIC hot-plugged once it is ready.
    fn boot_with_hot_devices(&self, name: &str) -> pb::Vm {
        let g = guest_dir();
        let spec = pb::VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_bytes: 128 << 20,
            kernel: Some(pb::KernelBoot {
                kernel: g.join("vmlinuz").display().to_string(),
                initrd: g.join("initrd.img").display().to_string(),
                cmdline: "console=ttyS0".into(),
            }),
            ..Default::default()
        };
        let hot = format!("{name}-hot");
        self.pdisk(move |mut c| async move {
            c.create_volume(pdpb::CreateVolumeRequest {
                name: hot,
                size_bytes: 4 << 20,
                ..Default::default()
            })
            .await
            .unwrap();
        });
        let vm = self.agent(move |mut c| async move {
            let name = spec.name.clone();
            c.create_vm(pb::CreateVmRequest {
                spec: Some(spec),
                ..Default::default()
            })
            .await
            .unwrap();
            c.start_vm(pb::VmRequest {
                vm: name,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        });
        wait_console(
            std::path::Path::new(&vm.console_log),
            "STRATUS-GUEST ready",
            Duration::from_secs(180),
        );
        self.call(Op::AttachDisk, name).unwrap();
        self.call(Op::AttachNic, name).unwrap();
        vm
    }

    /// Guest `name`'s record.
    fn vm(&self, name: &str) -> pb::Vm {
        self.vms()
            .into_iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no guest {name}"))
    }

    /// SetDiskQos of running guest `vm`'s vdb.
    fn set_qos(&self, vm: &str, qos: pb::DiskQos) -> Result<(), tonic::Status> {
        let vm = vm.to_owned();
        self.agent(move |mut c| async move {
            c.set_disk_qos(pb::SetDiskQosRequest {
                vm,
                device: "vdb".into(),
                qos: Some(qos),
                ..Default::default()
            })
            .await
            .map(drop)
        })
    }

    /// Destroys every guest (end of a pair), retrying while agentd says
    /// pdisk work is left.
    fn destroy_all(&self) {
        for vm in self.vms() {
            let name = vm.name.clone();
            wait_for(
                &format!("destroy of {name}"),
                Duration::from_secs(60),
                || {
                    self.call(Op::Destroy, &name)
                        .or_else(|s| {
                            if s.code() == tonic::Code::NotFound {
                                Ok(())
                            } else {
                                Err(s)
                            }
                        })
                        .ok()
                },
            );
        }
    }
}

testkit::wraps_agent_host!(Host, base);

/// The UUID of guest `name`, from its events in `history`.
fn uuid_of(history: &[pb::Event], name: &str) -> String {
    history
        .iter()
        .rev()
        .find(|e| e.vm_name == name)
        .map(|e| e.vm_uuid.clone())
        .unwrap_or_else(|| panic!("no event of {name}"))
}

#[test]
#[ignore = "needs root, QEMU, tgt and agentd-failpoints: run by scripts/test"]
fn agentd_killed_at_every_step_leaves_nothing_to_clean_up() {
    let started = Instant::now();
    let mut h = Host::start();
    let mut pairs = 0;
    let mut acknowledged = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for op in Op::ALL {
        for (i, point) in points(op.group()).iter().enumerate() {
            let what = format!("{op:?} at {point}");
            // A guest's name is its hostname: no '_'.
            let name = format!("{}{i}", op.group().replace('_', "-"));
            // What the operation needs, made before agentd may crash.
            match op {
                Op::Create | Op::Pull => {}
                Op::Start | Op::Save => {
                    h.define(&name).unwrap();
                    acknowledged.insert(name.clone());
                }
                Op::StartLocal => {
                    h.define_local(&name).unwrap();
                    acknowledged.insert(name.clone());
                }
                Op::AttachDisk | Op::AttachNic => {
                    h.define(&name).unwrap();
                    acknowledged.insert(name.clone());
                    h.call(Op::Start, &name).unwrap();
                    let hot = format!("{name}-hot");
                    h.pdisk(move |mut c| async move {
                        c.create_volume(pdpb::CreateVolumeRequest {
                            name: hot,
                            size_bytes: 4 << 20,
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                    });
                }
                Op::SetQos => {
                    h.define(&name).unwrap();
                    acknowledged.insert(name.clone());
                    h.call(Op::Start, &name).unwrap();
                    h.set_qos(&name, old_qos()).unwrap();
                }
                Op::DetachDisk | Op::DetachNic => {
                    h.boot_with_hot_devices(&name);
                    acknowledged.insert(name.clone());
                }
                Op::Stop | Op::Destroy => {
                    h.define(&name).unwrap();
                    // A guest whose destroy was asked for may be gone
                    // after the crash (its DESTROYING was durable), or not.
                    if op == Op::Stop {
                        acknowledged.insert(name.clone());
                    }
                    h.call(Op::Start, &name).unwrap();
                }
            }
            seen.extend(h.vms().into_iter().map(|v| v.uuid));
            let history = h.events();
            h.agentd
                .restart_with_failpoints(Some(&format!("{point}=return")));
            let answer = h.call(op, &name);
            let status = h.agentd.wait_exit(Duration::from_secs(60));
            assert_eq!(
                status.and_then(|s| s.code()),
                Some(CRASH_EXIT_CODE),
                "{what}: agentd did not stop at the point (answer {answer:?})"
            );
            // What QEMU had when agentd died (agentd holds its QMP).
            let at_crash = (op == Op::SetQos).then(|| {
                let uuid = uuid_of(&history, &name);
                qemu_limits(&qmp_socket(&h, &uuid), "qos-vdb")
            });
            h.agentd.restart_with_failpoints(None);
            if op == Op::Save {
                // An interrupted save with its snapshot is finished in the
                // background after the restart (its image volume is
                // `creating` meanwhile): its outcome first.
                check_save(&h, &what, &name, answer.is_ok(), &history);
            }
            check(&h, &what, &acknowledged, &history, &mut seen);
            if let Some(at_crash) = at_crash {
                check_qos(&mut h, &what, &name, &at_crash, history.len());
            }
            if matches!(
                op,
                Op::AttachDisk | Op::AttachNic | Op::DetachDisk | Op::DetachNic
            ) {
                check_devices(&mut h, &what, &name);
            }
            if matches!(op, Op::DetachDisk | Op::DetachNic) {
                check_detached(&h, &what, &name, op == Op::DetachDisk, history.len());
            }
            if op == Op::StartLocal {
                // Its overlay is whole or absent: the guest starts (on the
                // overlay made before the crash, checked, or a new one).
                h.call(Op::Start, &name)
                    .unwrap_or_else(|s| panic!("{what}: the start after the crash: {s}"));
            }
            pairs += 1;
            // Clean slate for the next pair.
            h.destroy_all();
            acknowledged.clear();
            let leftover: Vec<_> = qemus()
                .into_iter()
                .filter(|(_, u)| seen.contains(u))
                .collect();
            assert!(
                leftover.is_empty(),
                "{what}: QEMUs after the cleanup: {leftover:?}"
            );
        }
    }
    let total: usize = POINTS.iter().map(|(_, p)| p.len()).sum();
    assert_eq!(pairs, total);
    eprintln!(
        "fault tier: {pairs} (operation, crash point) pairs in {:.0?}",
        started.elapsed()
    );
}

/// Retries by `request_id` across a kill -9 of agentd: a call answered,
/// agentd killed, restarted, the same call again gets the first answer
/// without running again (start: the same QEMU; destroy: OK, not
/// NotFound); a call whose agentd died at a crash point before answering
/// runs again knowing so and answers from what it finds.
#[test]
#[ignore = "needs root, QEMU, tgt and agentd-failpoints: run by scripts/test"]
fn retries_after_agentd_was_killed_get_the_first_answer() {
    let mut h = Host::start();
    let start = |h: &Host, vm: &str, id: &str| {
        let req = pb::VmRequest {
            vm: vm.into(),
            request_id: id.into(),
            ..Default::default()
        };
        h.agent(move |mut c| async move { c.start_vm(req).await.map(|r| r.into_inner()) })
    };
    let stop = |h: &Host, vm: &str, id: &str| {
        let req = pb::StopVmRequest {
            vm: vm.into(),
            force: true,
            request_id: id.into(),
            ..Default::default()
        };
        h.agent(move |mut c| async move { c.stop_vm(req).await.map(|r| r.into_inner()) })
    };
    let destroy = |h: &Host, vm: &str, id: &str| {
        let req = pb::DestroyVmRequest {
            vm: vm.into(),
            timeout_seconds: 5,
            request_id: id.into(),
            ..Default::default()
        };
        h.agent(move |mut c| async move { c.destroy_vm(req).await.map(drop) })
    };
    let qemus_of = |uuid: &str| -> Vec<u32> {
        qemus()
            .into_iter()
            .filter(|(_, u)| u == uuid)
            .map(|(p, _)| p)
            .collect()
    };

    // Answered, then agentd killed: the retries get the first answers.
    let web = h.define("web").unwrap();
    let started = start(&h, "web", "start-1").unwrap();
    assert_eq!(started.state(), pb::VmState::Running);
    h.agentd.kill9();
    h.agentd.restart_with_failpoints(None);
    let again = start(&h, "web", "start-1").expect("the retry of an answered start");
    assert_eq!(again, started);
    assert_eq!(qemus_of(&web.uuid), vec![started.pid]);
    let stopped = stop(&h, "web", "stop-1").unwrap();
    assert_eq!(stopped.state(), pb::VmState::Stopped);
    h.agentd.kill9();
    h.agentd.restart_with_failpoints(None);
    assert_eq!(stop(&h, "web", "stop-1").unwrap(), stopped);
    // Another request with a kept id is refused.
    let reused = stop(&h, "web", "start-1").unwrap_err();
    assert_eq!(reused.code(), tonic::Code::InvalidArgument);
    destroy(&h, "web", "destroy-1").unwrap();
    h.agentd.kill9();
    h.agentd.restart_with_failpoints(None);
    destroy(&h, "web", "destroy-1").expect("the retry of an answered destroy");
    let gone = destroy(&h, "web", "").unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);

    // agentd dies before answering (after the start's RUNNING, after the
    // destroy's DESTROYING): the retry answers from what it finds.
    let db = h.define("db").unwrap();
    h.agentd
        .restart_with_failpoints(Some("start.running=return"));
    let lost = start(&h, "db", "start-2");
    assert_eq!(
        h.agentd
            .wait_exit(Duration::from_secs(60))
            .and_then(|s| s.code()),
        Some(CRASH_EXIT_CODE),
        "agentd did not stop at start.running ({lost:?})"
    );
    h.agentd.restart_with_failpoints(None);
    let running = start(&h, "db", "start-2").expect("the retry of a start that got to RUNNING");
    assert_eq!(running.state(), pb::VmState::Running);
    assert_eq!(qemus_of(&db.uuid), vec![running.pid]);
    h.agentd
        .restart_with_failpoints(Some("destroy.marked=return"));
    let lost = destroy(&h, "db", "destroy-2");
    assert_eq!(
        h.agentd
            .wait_exit(Duration::from_secs(60))
            .and_then(|s| s.code()),
        Some(CRASH_EXIT_CODE),
        "agentd did not stop at destroy.marked ({lost:?})"
    );
    // Reconciliation at the restart finishes the destroy.
    h.agentd.restart_with_failpoints(None);
    destroy(&h, "db", "destroy-2").expect("the retry of a destroy reconciliation finished");
    assert!(h.vms().is_empty());
    assert!(qemus_of(&db.uuid).is_empty());
    let destroyed = h
        .events()
        .iter()
        .filter(|e| e.r#type() == pb::EventType::Destroyed)
        .count();
    assert_eq!(destroyed, 2);
}
