//! Several storage hosts end to end: two pdiskd, each with its own tgtd and
//! XFS pool, and one agentd that knows them as the servers `default` and
//! `b`, in a network namespace the test creates; real guests (the test
//! guest, TCG) whose disks are on one server, the other, or both.
//! Run by scripts/test's e2e tier (needs root, QEMU, tgt and the test guest).

use std::time::Duration;

use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::*;
use tonic::Code;

const BRIDGE: &str = "stbr0";
const BOOT: Duration = Duration::from_secs(180);

/// One storage host: its pool, tgtd and pdiskd (pdiskd drops first).
struct Storage {
    pdiskd: Pdiskd,
    _tgtd: Tgtd,
    pool: XfsPool,
}

impl Storage {
    fn start(ns: &NetNs) -> Storage {
        let pool = XfsPool::new(1024);
        let tgtd = Tgtd::start_in(pool.dir.path(), Some(ns));
        let pdiskd = Pdiskd::start_in(&pool, &tgtd, Some(ns));
        Storage {
            pdiskd,
            _tgtd: tgtd,
            pool,
        }
    }
}

/// The compute host and its two storage hosts. Fields drop in order:
/// agentd (and its guests) first, the namespace last.
struct Hosts {
    agentd: Agentd,
    a: Storage,
    b: Storage,
    ns: NetNs,
    /// file:// images may come from here.
    images: std::path::PathBuf,
}

impl Hosts {
    fn start() -> Hosts {
        let ns = NetNs::new();
        ns.add_bridge(BRIDGE);
        let a = Storage::start(&ns);
        let b = Storage::start(&ns);
        let images = a.pool.dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let agentd = Agentd::start_in_with(
            a.pool.dir.path(),
            &ns,
            &a.pdiskd.url(),
            BRIDGE,
            &[
                "--pdisk",
                &format!("b={}", b.pdiskd.url()),
                "--image-file-root",
                images.to_str().unwrap(),
            ],
        );
        Hosts {
            agentd,
            a,
            b,
            ns,
            images,
        }
    }

    fn agent<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(VmServiceClient<tonic::transport::Channel>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let url = self.agentd.url();
        self.ns.block_on(move || async move {
            let c = VmServiceClient::new(testkit::channel(&url).await);
            f(c).await
        })
    }

    fn pdisk<F, Fut, T>(&self, s: &Storage, f: F) -> T
    where
        F: FnOnce(VolumeServiceClient<tonic::transport::Channel>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let url = s.pdiskd.url();
        self.ns.block_on(move || async move {
            let c = VolumeServiceClient::new(testkit::channel(&url).await);
            f(c).await
        })
    }

    /// A 1 MiB volume `name` on `s` whose first bytes are the test guest's
    /// marker `STRATUS-MARKER:<marker>`.
    fn marker_volume(&self, s: &Storage, name: &str, marker: &str) {
        let path = s.pdiskd.import_dir.join(format!("{name}.raw"));
        std::fs::write(&path, marker_image(marker)).unwrap();
        let (name, path) = (name.to_string(), path.display().to_string());
        self.pdisk(s, move |mut c| async move {
            c.create_volume(pdpb::CreateVolumeRequest {
                name,
                source: Some(pdpb::create_volume_request::Source::FromImage(
                    pdpb::ImageSource {
                        path,
                        format: pdpb::ImageFormat::Raw as i32,
                    },
                )),
                ..Default::default()
            })
            .await
            .unwrap();
        });
    }

    fn exports(&self, s: &Storage) -> usize {
        self.pdisk(s, |mut c| async move {
            c.list_exports(pdpb::ListExportsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .exports
                .len()
        })
    }

    /// Volumes of `s` that are image bases of `sha`.
    fn bases(&self, s: &Storage, sha: &str) -> usize {
        let sha = sha.to_string();
        self.pdisk(s, move |mut c| async move {
            c.list_volumes(pdpb::ListVolumesRequest::default())
                .await
                .unwrap()
                .into_inner()
                .volumes
                .iter()
                .filter(|v| v.image_sha256 == sha)
                .count()
        })
    }

    fn create(&self, spec: pb::VmSpec) -> Result<pb::Vm, tonic::Status> {
        self.agent(move |mut c| async move {
            c.create_vm(pb::CreateVmRequest {
                spec: Some(spec),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
        })
    }

    fn start_vm(&self, vm: &str) -> Result<pb::Vm, tonic::Status> {
        let vm = vm.to_string();
        self.agent(move |mut c| async move {
            c.start_vm(pb::VmRequest {
                vm,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
        })
    }

    fn stop_vm(&self, vm: &str) -> Result<pb::Vm, tonic::Status> {
        let vm = vm.to_string();
        self.agent(move |mut c| async move {
            c.stop_vm(pb::StopVmRequest {
                vm,
                timeout_seconds: 60,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
        })
    }

    fn destroy_vm(&self, vm: &str) -> Result<(), tonic::Status> {
        let vm = vm.to_string();
        self.agent(move |mut c| async move {
            c.destroy_vm(pb::DestroyVmRequest {
                vm,
                timeout_seconds: 60,
                ..Default::default()
            })
            .await
            .map(|_| ())
        })
    }

    fn host(&self) -> pb::Host {
        self.agent(|mut c| async move {
            c.get_host(pb::GetHostRequest {})
                .await
                .unwrap()
                .into_inner()
        })
    }

    fn images(&self) -> pb::ListImagesResponse {
        self.agent(|mut c| async move {
            c.list_images(pb::ListImagesRequest {})
                .await
                .unwrap()
                .into_inner()
        })
    }
}

/// A raw 1 MiB disk whose first bytes are the test guest's marker.
fn marker_image(marker: &str) -> Vec<u8> {
    let mut img = format!("STRATUS-MARKER:{marker}\n").into_bytes();
    img.resize(1 << 20, 0);
    img
}

fn disk(volume: &str, server: &str, boot_index: u32) -> pb::DiskSpec {
    pb::DiskSpec {
        source: Some(pb::disk_spec::Source::PdiskVolume(volume.into())),
        server: server.into(),
        boot_index,
        ..Default::default()
    }
}

/// A tiny guest booted from the test guest's kernel and initramfs (its
/// disks only carry markers), with `disks`.
fn spec(name: &str, mac: &str, disks: Vec<pb::DiskSpec>) -> pb::VmSpec {
    let g = guest_dir();
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        disks,
        nics: vec![pb::NicSpec {
            bridge: BRIDGE.into(),
            mac: mac.into(),
            ..Default::default()
        }],
        kernel: Some(pb::KernelBoot {
            kernel: g.join("vmlinuz").display().to_string(),
            initrd: g.join("initrd.img").display().to_string(),
            cmdline: "console=ttyS0".into(),
        }),
        ..Default::default()
    }
}

/// Waits for the guest's console to say `needle` after its first `from`
/// bytes (what an earlier boot wrote); returns what it wrote since.
fn console_after(path: &str, from: usize, needle: &str) -> String {
    wait_for(&format!("{needle:?} on {path}"), BOOT, || {
        let text = std::fs::read_to_string(path).ok()?;
        let since = text.get(from..).unwrap_or(&text).to_string();
        since.contains(needle).then_some(since)
    })
}

fn console_len(path: &str) -> usize {
    std::fs::metadata(path).map_or(0, |m| m.len() as usize)
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: scripts/test e2e tier"]
fn a_guest_sees_a_disk_on_each_server_and_a_dead_server_stops_only_its_own_guests() {
    let mut h = Hosts::start();
    h.marker_volume(&h.a, "both-a", "on-a");
    h.marker_volume(&h.b, "both-b", "on-b");
    h.marker_volume(&h.a, "solo-a", "solo-a");

    // One guest with a disk on each server sees both, each with its data.
    let both = h
        .create(spec(
            "both",
            "52:54:00:19:00:01",
            vec![disk("both-a", "", 0), disk("both-b", "b", 0)],
        ))
        .unwrap();
    assert_eq!(both.spec.as_ref().unwrap().disks[1].server, "b");
    let vm = h.start_vm("both").unwrap();
    let sources: Vec<&str> = vm.disks.iter().map(|d| d.source.as_str()).collect();
    assert_eq!(sources, ["pdisk:both-a", "pdisk:b/both-b"]);
    let console = console_after(&vm.console_log, 0, "STRATUS-GUEST ready");
    assert!(
        console.contains("STRATUS-GUEST marker vda=on-a\r"),
        "{console}"
    );
    assert!(
        console.contains("STRATUS-GUEST marker vdb=on-b\r"),
        "{console}"
    );
    assert_eq!((h.exports(&h.a), h.exports(&h.b)), (1, 1));

    // A guest only on the default server.
    h.create(spec(
        "solo",
        "52:54:00:19:00:02",
        vec![disk("solo-a", "", 1)],
    ))
    .unwrap();
    let solo = h.start_vm("solo").unwrap();
    console_after(&solo.console_log, 0, "STRATUS-GUEST marker vda=solo-a\r");

    // A server this host does not have: refused, nothing made.
    let e = h
        .create(spec(
            "nowhere",
            "52:54:00:19:00:03",
            vec![disk("x", "c", 1)],
        ))
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("no pdisk server named c"), "{e:?}");

    // Storage host b dies.
    h.b.pdiskd.kill9();
    let host = h.host();
    let state: Vec<(String, bool)> = host
        .pdisk_servers
        .iter()
        .map(|s| (s.name.clone(), s.reachable))
        .collect();
    assert_eq!(
        state,
        [("b".to_string(), false), ("default".to_string(), true)]
    );
    assert!(!host.pdisk_servers[0].last_error.is_empty());
    let images = h.images();
    assert_eq!(images.unreachable.len(), 1, "{images:?}");
    assert_eq!(images.unreachable[0].name, "b");

    // The default server's guest is fully controllable: stop, start (it
    // boots again from its disk), destroy.
    let stopped = h.stop_vm("solo").unwrap();
    assert_eq!(stopped.state(), pb::VmState::Stopped);
    let from = console_len(&solo.console_log);
    let again = h.start_vm("solo").unwrap();
    assert_eq!(again.state(), pb::VmState::Running);
    console_after(
        &again.console_log,
        from,
        "STRATUS-GUEST marker vda=solo-a\r",
    );
    h.destroy_vm("solo").unwrap();

    // The guest with a disk on b stops (b's export is kept to undo) but
    // cannot start: Unavailable, naming the server.
    assert_eq!(h.stop_vm("both").unwrap().state(), pb::VmState::Stopped);
    let e = h.start_vm("both").unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("pdisk server b"), "{e:?}");
    assert_eq!(h.exports(&h.a), 0, "a's exports are undone");

    // agentd restarts while b is down: start-up does not wait for it.
    h.agentd.restart();
    assert_eq!(h.host().pdisk_servers.len(), 2);

    // b is back (its export restored); the next start-up undoes the export
    // it owed, and the guest starts and sees both disks again.
    h.b.pdiskd.restart();
    assert_eq!(h.exports(&h.b), 1, "pdiskd restored its export");
    h.agentd.restart();
    assert_eq!(h.exports(&h.b), 0, "the left-over export is undone");
    let from = console_len(&vm.console_log);
    h.start_vm("both").unwrap();
    let console = console_after(&vm.console_log, from, "STRATUS-GUEST ready");
    assert!(
        console.contains("STRATUS-GUEST marker vdb=on-b\r"),
        "{console}"
    );
    h.destroy_vm("both").unwrap();
    assert_eq!((h.exports(&h.a), h.exports(&h.b)), (0, 0));
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: scripts/test e2e tier"]
fn an_image_used_on_both_servers_is_imported_once_into_each() {
    let h = Hosts::start();
    let file = h.images.join("marked.raw");
    let bytes = marker_image("from-image");
    std::fs::write(&file, &bytes).unwrap();
    let sha = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(&bytes))
    };
    let image_disk = |server: &str| pb::DiskSpec {
        source: Some(pb::disk_spec::Source::Image(pb::ImageRef {
            url: format!("file://{}", file.display()),
            sha256: sha.clone(),
            format: pb::ImageFormat::Raw as i32,
            ..Default::default()
        })),
        server: server.into(),
        boot_index: 1,
        ..Default::default()
    };
    let guests = [
        ("img-a", "", "52:54:00:19:01:01"),
        ("img-b", "b", "52:54:00:19:01:02"),
        ("img-b2", "b", "52:54:00:19:01:03"),
    ];
    for (name, server, mac) in guests {
        h.create(spec(name, mac, vec![image_disk(server)])).unwrap();
        let vm = h.start_vm(name).unwrap();
        // Each guest boots from its own clone, on its server.
        console_after(&vm.console_log, 0, "STRATUS-GUEST marker vda=from-image\r");
    }
    assert_eq!((h.bases(&h.a, &sha), h.bases(&h.b, &sha)), (1, 1));
    let imported: Vec<String> = agent_events_in(&h)
        .into_iter()
        .filter(|e| e.r#type() == pb::EventType::ImageImported)
        .map(|e| e.detail)
        .collect();
    assert_eq!(imported.len(), 2, "{imported:?}");
    assert!(
        imported.iter().any(|d| d.ends_with("on pdisk server b")),
        "{imported:?}"
    );
    // ListImages: one base per server, each with its clones.
    let list = h.images();
    assert!(list.unreachable.is_empty());
    let mut bases: Vec<(String, u32)> = list
        .images
        .iter()
        .filter(|i| i.location == "pdisk" && i.sha256 == sha)
        .map(|i| (i.server.clone(), i.users))
        .collect();
    bases.sort();
    assert_eq!(bases, [("b".to_string(), 2), ("default".to_string(), 1)]);
    for (name, _, _) in guests {
        h.destroy_vm(name).unwrap();
    }
    assert_eq!((h.exports(&h.a), h.exports(&h.b)), (0, 0));
}

/// Every event agentd journaled so far.
fn agent_events_in(h: &Hosts) -> Vec<pb::Event> {
    let url = h.agentd.url();
    h.ns.block_on(move || agent_events(url, 0))
}
