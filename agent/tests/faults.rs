//! Fault injection: agentd killed at every step boundary of create, start,
//! stop, destroy, image pulls and saves, and disk and NIC hot-plug into a
//! running guest, then restarted, must leave nothing for anyone to clean
//! up (and, after a hot-plug, the record must equal QEMU's devices).
//!
//! Runs `agentd-failpoints` (agentd built with the `failpoints` feature:
//! `cargo build -p agent --features failpoints --bin agentd-failpoints`,
//! which scripts/test's integration tier does) on a real stack in a test
//! namespace: an XFS reflink pool, tgtd, pdiskd, a bridge, and guests under
//! TCG. The guests are the cheapest there are: no kernel, SeaBIOS finding
//! nothing to boot on a 4 MiB pdisk volume and a clone of a 1 MiB image
//! (QEMU runs, QMP answers, nothing boots). For each (operation, crash
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
//! before the crash unchanged.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use agent::failpoints::{CRASH_EXIT_CODE, POINTS};
use stratus_proto::agent::v1 as pb;
use stratus_proto::pdisk::v1 as pdpb;
use testkit::*;

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
}

impl Op {
    const ALL: [Op; 9] = [
        Op::Create,
        Op::Start,
        Op::StartLocal,
        Op::Stop,
        Op::Destroy,
        Op::Save,
        Op::Pull,
        Op::AttachDisk,
        Op::AttachNic,
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

impl std::ops::Deref for Host {
    type Target = AgentHost;
    fn deref(&self) -> &AgentHost {
        &self.base
    }
}

impl std::ops::DerefMut for Host {
    fn deref_mut(&mut self) -> &mut AgentHost {
        &mut self.base
    }
}

/// Live processes running some guest's UUID (`-uuid X`): (pid, uuid).
fn qemus() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
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

/// Checks the invariants after agentd restarted; `acknowledged` are guests
/// whose create answered and whose destroy did not; `seen` the UUIDs of
/// every guest this test made (a QEMU of one of them must be a running
/// guest's).
fn check(
    h: &Host,
    what: &str,
    acknowledged: &BTreeSet<String>,
    history: &[pb::Event],
    seen: &mut BTreeSet<String>,
) {
    let vms = h.vms();
    let names: BTreeSet<String> = vms.iter().map(|v| v.name.clone()).collect();
    for v in &vms {
        assert!(
            !matches!(
                v.state(),
                pb::VmState::Starting | pb::VmState::Stopping | pb::VmState::Destroying
            ),
            "{what}: {} left {:?} ({})",
            v.name,
            v.state(),
            v.state_reason
        );
    }
    for a in acknowledged {
        assert!(names.contains(a), "{what}: acknowledged guest {a} lost");
    }
    // QEMUs: exactly the running guests', each once.
    let running: Vec<&pb::Vm> = vms
        .iter()
        .filter(|v| matches!(v.state(), pb::VmState::Running | pb::VmState::Paused))
        .collect();
    let ours: BTreeSet<String> = vms.iter().map(|v| v.uuid.clone()).collect();
    seen.extend(ours.iter().cloned());
    // QEMUs of this test's guests only: other tests may run guests too.
    let live: Vec<(u32, String)> = qemus()
        .into_iter()
        .filter(|(_, u)| seen.contains(u))
        .collect();
    for (pid, uuid) in &live {
        let owner = running.iter().find(|v| &v.uuid == uuid);
        assert!(
            owner.is_some_and(|v| v.pid == *pid),
            "{what}: QEMU pid {pid} of {uuid} without a running record ({:?})",
            vms.iter()
                .map(|v| (&v.name, v.state(), v.pid))
                .collect::<Vec<_>>()
        );
    }
    for v in &running {
        assert!(
            live.iter().any(|(p, _)| *p == v.pid),
            "{what}: {} is running without its QEMU",
            v.name
        );
    }
    // Taps: only running guests'.
    let wanted: BTreeSet<String> = running
        .iter()
        .flat_map(|v| v.nics.iter().map(|n| n.tap.clone()))
        .collect();
    let links = h.ns.ip(&["-o", "link", "show"]);
    for l in links.lines() {
        let Some(name) = l.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap();
        if name.starts_with("st") && name != BRIDGE {
            assert!(wanted.contains(name), "{what}: orphan tap {name}");
        }
    }
    // pdisk: exports to this host only for running guests' disks; clones
    // only of guests that exist.
    let exports = h.pdisk(|mut c| async move {
        c.list_exports(pdpb::ListExportsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .exports
    });
    let mut disks = BTreeSet::new();
    for v in &running {
        // Its spec's pdisk volumes (a hot-plugged one once it is in).
        for d in v.spec.iter().flat_map(|s| s.disks.iter()) {
            if let Some(pb::disk_spec::Source::PdiskVolume(n)) = &d.source {
                disks.insert(n.clone());
            }
        }
        disks.insert(format!("{}-data", v.name));
        disks.insert(format!("vm-{}-vda", &v.uuid.replace('-', "")[..12]));
    }
    for e in &exports {
        if e.initiators.iter().any(|i| i == INITIATOR) {
            assert!(
                disks.contains(&e.volume_name),
                "{what}: orphan export of {}",
                e.volume_name
            );
        }
    }
    let volumes = h.pdisk(|mut c| async move {
        c.list_volumes(pdpb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .volumes
    });
    for v in &volumes {
        if let Some(owner) = v.labels.get("stratus.io/vm") {
            assert!(ours.contains(owner), "{what}: orphan clone {}", v.name);
        }
        assert_ne!(
            v.state(),
            pdpb::VolumeState::Creating,
            "{what}: {} creating",
            v.name
        );
    }
    // Files: no partial cache file, no directory without its guest.
    let state = &h.agentd.state_dir;
    for e in std::fs::read_dir(state.join("images")).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(!n.starts_with(".partial-"), "{what}: orphan cache file {n}");
    }
    if let Ok(dirs) = std::fs::read_dir(state.join("vms")) {
        for d in dirs.flatten() {
            let n = d.file_name().to_string_lossy().into_owned();
            assert!(ours.contains(&n), "{what}: orphan guest directory {n}");
            for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                let f = f.file_name().to_string_lossy().into_owned();
                assert!(
                    !f.contains(".partial-"),
                    "{what}: unfinished overlay {f} of {n}"
                );
            }
            // A seed only while its guest runs.
            let runs = running.iter().any(|v| v.uuid == n);
            assert!(
                runs || !d.path().join("seed.img").exists(),
                "{what}: seed of {n}, which does not run"
            );
        }
    }
    // Events: 1..n, the history before the crash unchanged.
    let events = h.events();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{what}: gap or repeat"
    );
    assert!(events.len() >= history.len(), "{what}: events lost");
    assert_eq!(
        &events[..history.len()],
        history,
        "{what}: history rewritten"
    );
}

/// After a hot-plug into running guest `name` was interrupted: the guest
/// still runs, and what agentd records equals what its QEMU has. agentd
/// holds the guest's one QMP connection, so it is killed (the guest runs
/// on) while the test asks QEMU itself (`qom-list /machine/peripheral`),
/// then restarted. Every disk device QEMU has (`vdX-dev`) is one of the
/// record's disks and every recorded pdisk disk is in QEMU; every NIC
/// device (`netN-dev`) is one of the record's NICs and every recorded NIC
/// is in QEMU; the hot-plugged volume is in the spec exactly when QEMU has
/// it.
fn check_devices(h: &mut Host, what: &str, name: &str) {
    let vm = h
        .vms()
        .into_iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("{what}: {name} lost"));
    assert_eq!(vm.state(), pb::VmState::Running, "{what}: {name} stopped");
    let socket = h
        .agentd
        .state_dir
        .join("vms")
        .join(&vm.uuid)
        .join("qmp.sock");
    h.agentd.kill9();
    let ids = qemu_peripherals(&socket);
    h.agentd.restart_with_failpoints(None);
    let qemu_disks: BTreeSet<String> = ids
        .iter()
        .filter_map(|i| i.strip_suffix("-dev"))
        .filter(|i| i.starts_with("vd"))
        .map(str::to_string)
        .collect();
    let recorded: BTreeSet<String> = vm.disks.iter().map(|d| d.device.clone()).collect();
    for d in &qemu_disks {
        assert!(
            recorded.contains(d),
            "{what}: QEMU has disk {d}, the record only {recorded:?}"
        );
    }
    for d in vm.disks.iter().filter(|d| d.source.starts_with("pdisk:")) {
        assert!(
            qemu_disks.contains(&d.device),
            "{what}: recorded disk {} ({}) is not in QEMU ({ids:?})",
            d.device,
            d.source
        );
    }
    let hot = format!("{name}-hot");
    let in_spec = vm
        .spec
        .iter()
        .flat_map(|s| s.disks.iter())
        .any(|d| matches!(&d.source, Some(pb::disk_spec::Source::PdiskVolume(n)) if *n == hot));
    let in_qemu = vm
        .disks
        .iter()
        .any(|d| d.source.ends_with(&format!(":{hot}")) && qemu_disks.contains(&d.device));
    assert_eq!(
        in_spec, in_qemu,
        "{what}: {hot} in the spec: {in_spec}, in QEMU: {in_qemu}"
    );
    let qemu_nics: BTreeSet<String> = ids
        .iter()
        .filter_map(|i| i.strip_suffix("-dev"))
        .filter(|i| i.starts_with("net"))
        .map(str::to_string)
        .collect();
    // NIC i's tap ends in `n<i>`, its netdev is `net<i>`.
    let recorded: BTreeSet<String> = vm
        .nics
        .iter()
        .map(|n| format!("net{}", n.tap.rsplit('n').next().unwrap_or("0")))
        .collect();
    assert_eq!(qemu_nics, recorded, "{what}: QEMU's NICs, the record's");
    let spec_nics = vm.spec.as_ref().map_or(0, |s| s.nics.len());
    assert_eq!(
        spec_nics,
        recorded.len(),
        "{what}: spec's NICs, the record's"
    );
}

/// The ids of QEMU's user-created devices, through its QMP socket.
fn qemu_peripherals(socket: &std::path::Path) -> Vec<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut answer = |cmd: &str| -> serde_json::Value {
        writeln!(s, "{cmd}").unwrap();
        loop {
            let mut line = String::new();
            assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if let Some(ret) = v.get("return") {
                return ret.clone();
            }
            assert!(v.get("error").is_none(), "QMP {cmd}: {v}");
        }
    };
    answer(r#"{"execute": "qmp_capabilities"}"#);
    let props = answer(r#"{"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}"#);
    props
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"].as_str().is_some_and(|t| t.starts_with("child<")))
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

/// After a save of `name`'s vdb was interrupted: once reconciliation is
/// done, no `save-*` snapshot is left, exactly one IMAGE_SAVED or
/// IMAGE_SAVE_FAILED after `history` names the image, with cause
/// reconciliation when the crash came before the outcome was journaled;
/// a saved image exists with the checksum of the disk, a failed one does
/// not; an acknowledged save is saved.
fn check_save(h: &Host, what: &str, name: &str, acknowledged: bool, history: &[pb::Event]) {
    let image = format!("{name}-img");
    let outcome = wait_for(what, Duration::from_secs(60), || {
        let events = h.events();
        let ends: Vec<pb::Event> = events[history.len()..]
            .iter()
            .filter(|e| {
                matches!(
                    e.r#type(),
                    pb::EventType::ImageSaved | pb::EventType::ImageSaveFailed
                ) && e.detail.contains(&format!("pdisk:///{image}"))
            })
            .cloned()
            .collect();
        let snapshots = h.pdisk(|mut c| async move {
            c.list_snapshots(pdpb::ListSnapshotsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .snapshots
        });
        let left = snapshots.iter().any(|s| s.name.starts_with("save-"));
        (!ends.is_empty() && !left).then_some(ends)
    });
    assert_eq!(outcome.len(), 1, "{what}: outcomes {outcome:?}");
    let end = &outcome[0];
    let img = image.clone();
    let volume = h.pdisk(move |mut c| async move {
        c.get_volume(pdpb::GetVolumeRequest {
            volume: img,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
    });
    if end.r#type() == pb::EventType::ImageSaved {
        let v = volume.unwrap_or_else(|s| panic!("{what}: saved {image} missing: {s}"));
        let data = format!("{name}-data");
        let want = h.pdisk(move |mut c| async move {
            c.checksum_volume(pdpb::ChecksumVolumeRequest {
                volume: data,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .sha256
        });
        assert_eq!(v.image_sha256, want, "{what}: saved image's checksum");
        assert_eq!(end.image_sha256, want, "{what}: IMAGE_SAVED's checksum");
        // Cleaned up for the next pair.
        h.pdisk(move |mut c| async move {
            c.delete_volume(pdpb::DeleteVolumeRequest {
                volume: image,
                now: true,
                ..Default::default()
            })
            .await
            .unwrap();
        });
    } else {
        assert!(
            !acknowledged,
            "{what}: an acknowledged save failed: {end:?}"
        );
        assert_eq!(
            end.cause(),
            pb::EventCause::Reconciliation,
            "{what}: {end:?}"
        );
        assert!(volume.is_err(), "{what}: a failed save left {image}");
    }
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
            h.agentd.restart_with_failpoints(None);
            check(&h, &what, &acknowledged, &history, &mut seen);
            if matches!(op, Op::AttachDisk | Op::AttachNic) {
                check_devices(&mut h, &what, &name);
            }
            if op == Op::Save {
                check_save(&h, &what, &name, answer.is_ok(), &history);
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
