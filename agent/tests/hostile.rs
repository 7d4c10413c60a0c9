//! The hostile-input suite for agentd: over 100 requests from an
//! authenticated but unprivileged caller (a `project/eve` certificate from
//! stratus-pki) — bad VM names, vCPUs, memory, host files (disks, kernels,
//! initrds, file:// images), image URLs and checksums, MACs, VLANs,
//! bridges, labels, another project's guest and volume. Each is refused
//! with its code; the guests (as the admin lists them), agentd's guest
//! directories, the namespace's taps, QEMU processes and pdisk's volumes
//! are the same before and after, and agentd is the same process. Then
//! every RPC of the service by every role the authorization table refuses
//! it to: PermissionDenied, nothing changed. No guest boots. Needs root (agentd in a test namespace); run by scripts/test.

use stratus_pki::identity::Role;
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::*;
use tonic::Code;

const BRIDGE: &str = "stbr0";
const SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn base_spec(name: &str) -> pb::VmSpec {
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 64 << 20,
        disks: vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::PdiskVolume("eve-disk".into())),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// (what, the spec eve sends, the codes that are a correct refusal)
fn cases(files: &std::path::Path) -> Vec<(String, pb::VmSpec, &'static [Code])> {
    const INVALID: &[Code] = &[Code::InvalidArgument];
    const DENIED: &[Code] = &[Code::PermissionDenied];
    let mut v: Vec<(String, pb::VmSpec, &'static [Code])> = Vec::new();
    let names = [
        "".to_string(),
        "Upper".into(),
        "-lead".into(),
        "a/b".into(),
        "..".into(),
        "a b".into(),
        "a\nb".into(),
        "a\0b".into(),
        "é".into(),
        "x\u{202e}y".into(),
        "a".repeat(64),
        "a".repeat(10_000),
        "$(reboot)".into(),
        "a;b".into(),
        "a,b".into(),
        "a\u{7}".into(),
        "\u{feff}bom".into(),
        "a\\b".into(),
        "%2e%2e".into(),
        "a\rb".into(),
        "A-1".into(),
    ];
    for n in names {
        v.push((format!("name {n:?}"), base_spec(&n), INVALID));
    }
    for (vcpus, mem) in [(0, 64u64 << 20), (100_000, 64 << 20), (u32::MAX, 64 << 20)] {
        let mut s = base_spec("eve-cpu");
        s.vcpus = vcpus;
        s.memory_bytes = mem;
        v.push((
            format!("vcpus {vcpus}"),
            s,
            &[Code::InvalidArgument, Code::ResourceExhausted],
        ));
    }
    for mem in [0u64, 1, 1 << 50, u64::MAX] {
        let mut s = base_spec("eve-mem");
        s.memory_bytes = mem;
        v.push((
            format!("memory {mem}"),
            s,
            &[Code::InvalidArgument, Code::ResourceExhausted],
        ));
    }
    // Host files: an admin's only, even beneath the root.
    let host_paths = [
        "/etc/shadow".to_string(),
        "/proc/self/environ".into(),
        "/dev/sda".into(),
        files.join("ok.raw").display().to_string(),
        format!("{}/../etc/shadow", files.display()),
        "/var/lib/stratus-agent/agent.redb".into(),
        "/root/.ssh/id_rsa".into(),
        "/boot/vmlinuz".into(),
    ];
    for p in &host_paths {
        let mut s = base_spec("eve-file");
        s.disks = vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::File(p.clone())),
            ..Default::default()
        }];
        v.push((
            format!("file disk {p}"),
            s,
            &[Code::PermissionDenied, Code::InvalidArgument],
        ));
        let mut s = base_spec("eve-kernel");
        s.kernel = Some(pb::KernelBoot {
            kernel: p.clone(),
            ..Default::default()
        });
        v.push((
            format!("kernel {p}"),
            s,
            &[Code::PermissionDenied, Code::InvalidArgument],
        ));
        let mut s = base_spec("eve-initrd");
        s.kernel = Some(pb::KernelBoot {
            kernel: files.join("ok.raw").display().to_string(),
            initrd: p.clone(),
            ..Default::default()
        });
        v.push((
            format!("initrd {p}"),
            s,
            &[Code::PermissionDenied, Code::InvalidArgument],
        ));
    }
    for p in ["relative", "", "a\0b"] {
        let mut s = base_spec("eve-rel");
        s.disks = vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::File(p.into())),
            ..Default::default()
        }];
        v.push((format!("file disk {p:?}"), s, INVALID));
    }
    // Image URLs and checksums.
    let image = |url: &str, sha: &str| {
        let mut s = base_spec("eve-image");
        s.disks = vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::Image(pb::ImageRef {
                url: url.into(),
                sha256: sha.into(),
                ..Default::default()
            })),
            ..Default::default()
        }];
        s
    };
    for url in [
        "ftp://192.0.2.1/x.img",
        "gopher://192.0.2.1/x",
        "ldap://192.0.2.1/x",
        "dict://127.0.0.1:11211/",
        "javascript:alert(1)",
        "data:text/plain,hi",
        "not a url",
        "",
        "http://",
        "file://relative/x.img",
        "file:///srv/../etc/shadow",
        "file:///srv/%2e%2e/etc/shadow",
    ] {
        v.push((format!("image url {url:?}"), image(url, SHA), INVALID));
    }
    for url in [
        "file:///etc/shadow",
        "file:///var/lib/stratus-agent/agent.redb",
    ] {
        v.push((format!("image url {url}"), image(url, SHA), DENIED));
    }
    for sha in ["", "abc", &"g".repeat(64), &"0".repeat(63), &"0".repeat(65)] {
        v.push((
            format!("image sha256 {sha:?}"),
            image("https://images.example.org/x.img", sha),
            INVALID,
        ));
    }
    // NICs.
    for mac in [
        "zz:zz:zz:zz:zz:zz",
        "01:00:5e:00:00:01",
        "ff:ff:ff:ff:ff:ff",
        "00:00:00:00:00:00",
        "52:54:00:00:00",
        "52:54:00:00:00:00:00",
    ] {
        let mut s = base_spec("eve-mac");
        s.nics = vec![pb::NicSpec {
            bridge: BRIDGE.into(),
            mac: mac.into(),
            vlan: 0,
            ips: Vec::new(),
        }];
        v.push((format!("mac {mac}"), s, INVALID));
    }
    for vlan in [4095u32, 4096, u32::MAX] {
        let mut s = base_spec("eve-vlan");
        s.nics = vec![pb::NicSpec {
            bridge: BRIDGE.into(),
            mac: String::new(),
            vlan,
            ips: Vec::new(),
        }];
        v.push((format!("vlan {vlan}"), s, INVALID));
    }
    // Addresses a NIC may not claim.
    let many: Vec<String> = (1..=17).map(|i| format!("10.9.0.{i}")).collect();
    for ips in [
        vec!["not-an-ip".to_string()],
        vec!["224.0.0.1".into()],
        vec!["0.0.0.0".into()],
        vec!["::1".into()],
        many,
    ] {
        let mut s = base_spec("eve-ip");
        s.nics = vec![pb::NicSpec {
            bridge: BRIDGE.into(),
            ips: ips.clone(),
            ..Default::default()
        }];
        v.push((format!("nic ips {:?}", &ips[..1]), s, INVALID));
    }
    // A well-formed bridge the host does not let guests join.
    let mut s = base_spec("eve-br-host");
    s.nics = vec![pb::NicSpec {
        bridge: "br-hosts".into(),
        ..Default::default()
    }];
    v.push(("bridge not allowed".into(), s, DENIED));
    for bridge in ["a/b", "..", "x".repeat(16).as_str(), "a b", "a:b"] {
        let mut s = base_spec("eve-br");
        s.nics = vec![pb::NicSpec {
            bridge: bridge.into(),
            mac: String::new(),
            vlan: 0,
            ips: Vec::new(),
        }];
        v.push((format!("bridge {bridge:?}"), s, INVALID));
    }
    // Labels.
    for k in ["stratus.io/vm", "stratus.io/image-sha256", "stratus.io/x"] {
        let mut s = base_spec("eve-label");
        s.labels = [(k.to_string(), "x".to_string())].into();
        v.push((format!("label {k}"), s, DENIED));
    }
    // Another project's volume as a disk: as if it did not exist.
    for vol in ["astro-disk", "no-such-volume"] {
        let mut s = base_spec("eve-steal");
        s.disks[0].source = Some(pb::disk_spec::Source::PdiskVolume(vol.into()));
        v.push((format!("pdisk disk {vol}"), s, &[Code::NotFound]));
    }
    // pdisk servers: a name that is not one, one this host does not have.
    for server in ["../etc", "B", "x".repeat(33).as_str(), "no-such-server"] {
        let mut s = base_spec("eve-server");
        s.disks[0].server = server.into();
        v.push((format!("pdisk server {server:?}"), s, INVALID));
    }
    let mut s = base_spec("eve-nodisk");
    s.disks.clear();
    v.push(("nothing to boot".into(), s, INVALID));
    v
}

/// What must not change: guests (as the admin sees them), their
/// directories, the namespace's taps, QEMU processes, pdisk's volumes.
type State = (Vec<String>, Vec<String>, String, Vec<u32>, Vec<String>);

fn state(h: &Hosts) -> State {
    let (ag_url, pd_url) = (h.agentd.url(), h.pdiskd.url());
    let (vms, vols) = h.ns.block_on(move || async move {
        let mut admin = VmServiceClient::new(testkit::channel(&ag_url).await);
        let mut vms: Vec<String> = admin
            .list_vms(pb::ListVmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .vms
            .into_iter()
            .map(|v| format!("{} {} {:?}", v.uuid, v.name, v.state()))
            .collect();
        vms.sort();
        let mut pd = VolumeServiceClient::new(testkit::channel(&pd_url).await);
        let mut vols: Vec<String> = pd
            .list_volumes(pdpb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .volumes
            .into_iter()
            .map(|v| format!("{} {} exported={}", v.uuid, v.name, v.exported))
            .collect();
        vols.sort();
        (vms, vols)
    });
    let mut dirs: Vec<String> = std::fs::read_dir(h.agentd.state_dir.join("vms"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    let taps = h.ns.ip(&["-o", "link", "show", "type", "tun"]);
    (vms, dirs, taps, h.agentd.guest_pids(), vols)
}

struct Hosts {
    agentd: Agentd,
    pdiskd: Pdiskd,
    _tgtd: Tgtd,
    _pool: XfsPool,
    ns: NetNs,
}

#[test]
#[ignore = "needs root, tgt and QEMU's tools: run by scripts/test"]
fn an_unprivileged_caller_gets_only_refusals_and_changes_nothing() {
    require_root();
    let ns = NetNs::new();
    ns.add_bridge(BRIDGE);
    let pool = XfsPool::new(1024);
    let tgtd = Tgtd::start_in(pool.dir.path(), Some(&ns));
    let pdiskd = Pdiskd::start_in(&pool, &tgtd, Some(&ns));
    let agentd = Agentd::start_in(pool.dir.path(), &ns, &pdiskd.url(), BRIDGE);
    let files = pool.dir.path().join("host-files");
    std::fs::write(files.join("ok.raw"), vec![0u8; 1 << 20]).unwrap();
    let h = Hosts {
        agentd,
        pdiskd,
        _tgtd: tgtd,
        _pool: pool,
        ns,
    };
    let eve = TestPki::shared().issue(Role::Project, "eve", None, &[]);
    let (pd_url, ag_url) = (h.pdiskd.url(), h.agentd.url());
    // astro owns a volume and a guest; eve owns a volume of her own.
    h.ns.block_on(move || async move {
        let mut pd = VolumeServiceClient::new(testkit::channel(&pd_url).await);
        for (name, project) in [("astro-disk", "astro"), ("eve-disk", "eve")] {
            pd.create_volume(pdpb::CreateVolumeRequest {
                name: name.into(),
                size_bytes: 16 << 20,
                project: project.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let mut ag = VmServiceClient::new(testkit::channel(&ag_url).await);
        let mut spec = base_spec("astro-vm");
        spec.disks[0].source = Some(pb::disk_spec::Source::PdiskVolume("astro-disk".into()));
        ag.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            spec: Some(spec),
            project: "astro".into(),
        })
        .await
        .unwrap();
    });
    let pid = h.agentd_pid();
    let before = state(&h);

    let cases = cases(&files);
    let ag_url = h.agentd.url();
    let (wrong, n) = h.ns.block_on(move || async move {
        let mut c = VmServiceClient::new(channel_as(&ag_url, &eve).await);
        let n = cases.len() + 8;
        let mut wrong = Vec::new();
        let mut check = |what: String, got: Code, want: &[Code]| {
            if !want.contains(&got) {
                wrong.push(format!("{what}: got {got:?}, want {want:?}"));
            }
        };
        for (what, spec, want) in cases {
            let got = c
                .create_vm(pb::CreateVmRequest {
                    request_id: String::new(),
                    spec: Some(spec),
                    project: String::new(),
                })
                .await
                .err()
                .map(|s| s.code())
                .unwrap_or(Code::Ok);
            check(format!("create: {what}"), got, want);
        }
        // astro's guest, by every verb: NotFound; acting in astro: denied.
        let vm = || pb::VmRequest {
            request_id: String::new(),
            vm: "astro-vm".into(),
            project: String::new(),
        };
        let code = |r: Result<(), tonic::Status>| r.err().map(|s| s.code()).unwrap_or(Code::Ok);
        check(
            "start".into(),
            code(c.start_vm(vm()).await.map(|_| ())),
            &[Code::NotFound],
        );
        check(
            "get".into(),
            code(c.get_vm(vm()).await.map(|_| ())),
            &[Code::NotFound],
        );
        check(
            "pause".into(),
            code(c.pause_vm(vm()).await.map(|_| ())),
            &[Code::NotFound],
        );
        check(
            "reboot".into(),
            code(c.reboot_vm(vm()).await.map(|_| ())),
            &[Code::NotFound],
        );
        let stop = pb::StopVmRequest {
            vm: "astro-vm".into(),
            ..Default::default()
        };
        check(
            "stop".into(),
            code(c.stop_vm(stop).await.map(|_| ())),
            &[Code::NotFound],
        );
        let destroy = pb::DestroyVmRequest {
            vm: "astro-vm".into(),
            ..Default::default()
        };
        check(
            "destroy".into(),
            code(c.destroy_vm(destroy).await.map(|_| ())),
            &[Code::NotFound],
        );
        let in_astro = pb::VmRequest {
            request_id: String::new(),
            vm: "astro-vm".into(),
            project: "astro".into(),
        };
        check(
            "get in astro".into(),
            code(c.get_vm(in_astro).await.map(|_| ())),
            &[Code::PermissionDenied],
        );
        let pull = pb::PullImageRequest {
            image: Some(pb::ImageRef {
                url: "file:///etc/shadow".into(),
                sha256: SHA.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        check(
            "pull file:///etc/shadow".into(),
            code(c.pull_image(pull).await.map(|_| ())),
            &[Code::PermissionDenied],
        );
        (wrong, n)
    });
    assert!(n >= 100, "only {n} requests");
    assert!(
        wrong.is_empty(),
        "{} of {n} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // Every RPC, read from the descriptor set, by each role the table
    // refuses it to: `agent` and `server` certificates (nothing on an
    // agentd), `project` (host-wide and admin calls), `frontend` (admin
    // calls). Each gets PermissionDenied from the gate.
    let pki = TestPki::shared();
    let callers = vec![
        (Role::Agent, pki.agent()),
        (
            Role::Server,
            pki.issue(Role::Server, "other-daemon", None, &["127.0.0.1"]),
        ),
        (Role::Project, pki.issue(Role::Project, "eve", None, &[])),
        (Role::Frontend, pki.issue(Role::Frontend, "one", None, &[])),
    ];
    let ag_url = h.agentd.url();
    let (wrong, refused, rpcs, host_before, host_after) = h.ns.block_on(move || async move {
        let table = agent::authz::TABLE;
        let rpcs = table.rpcs(stratus_proto::FILE_DESCRIPTOR_SET);
        let host = || async {
            let mut admin = VmServiceClient::new(testkit::channel(&ag_url).await);
            let images = admin
                .list_images(pb::ListImagesRequest::default())
                .await
                .unwrap()
                .into_inner();
            let quotas = admin
                .list_quotas(pb::ListQuotasRequest::default())
                .await
                .unwrap()
                .into_inner();
            format!("{images:?} {quotas:?}")
        };
        let before = host().await;
        let mut wrong = Vec::new();
        let mut refused = 0;
        for (role, files) in &callers {
            let ch = channel_as(&ag_url, files).await;
            for m in &rpcs {
                if table.decision(m, *role).is_ok() {
                    continue;
                }
                refused += 1;
                let got = call_empty(ch.clone(), agent::authz::SERVICE, m, false).await;
                if got != Code::PermissionDenied {
                    wrong.push(format!("{m} by {role}: {got:?}"));
                }
            }
        }
        (wrong, refused, rpcs.len(), before, host().await)
    });
    assert!(
        wrong.is_empty(),
        "not refused by the gate:\n{}",
        wrong.join("\n")
    );
    assert!(refused >= 2 * rpcs, "{refused} refusals of {rpcs} RPCs");
    assert_eq!(host_before, host_after, "images or quotas changed");

    // Even an admin gets no host file from outside --host-file-root: not
    // by its path, nor through a symlink beneath the root (a disk or a
    // kernel), nor through `..`.
    let root = h.agentd_root_files();
    std::os::unix::fs::symlink("/etc/shadow", root.join("escape.raw")).unwrap();
    std::os::unix::fs::symlink("../../../../../../boot", root.join("boot")).unwrap();
    let ag_url = h.agentd.url();
    let wrong = h.ns.block_on(move || async move {
        let mut admin = VmServiceClient::new(testkit::channel(&ag_url).await);
        let mut wrong = Vec::new();
        let disk = |p: &std::path::Path| {
            let mut s = base_spec("admin-escape");
            s.disks = vec![pb::DiskSpec {
                source: Some(pb::disk_spec::Source::File(p.display().to_string())),
                boot_index: 1,
                ..Default::default()
            }];
            s
        };
        let mut kernel = disk(&root.join("ok.raw"));
        kernel.kernel = Some(pb::KernelBoot {
            kernel: root.join("boot/vmlinuz").display().to_string(),
            ..Default::default()
        });
        const DENIED: Code = Code::PermissionDenied;
        let specs = [
            ("symlinked disk", disk(&root.join("escape.raw")), DENIED),
            (
                "disk outside the root",
                disk(std::path::Path::new("/etc/shadow")),
                DENIED,
            ),
            // A path with `..` is malformed before it is outside.
            (
                "disk through ..",
                disk(&root.join("../../../etc/shadow")),
                Code::InvalidArgument,
            ),
            ("kernel through a symlinked directory", kernel, DENIED),
        ];
        for (what, spec, want) in specs {
            let got = admin
                .create_vm(pb::CreateVmRequest {
                    request_id: String::new(),
                    spec: Some(spec),
                    project: "astro".into(),
                })
                .await;
            match got {
                Err(s) if s.code() == want => {}
                other => wrong.push(format!("{what}: {other:?}")),
            }
        }
        wrong
    });
    assert!(
        wrong.is_empty(),
        "host files escaped:\n{}",
        wrong.join("\n")
    );

    let after = state(&h);
    assert_eq!(before, after, "state changed");
    assert_eq!(h.agentd_pid(), pid, "agentd restarted");
}

impl Hosts {
    /// agentd's `--host-file-root` (testkit's `DIR/host-files`).
    fn agentd_root_files(&self) -> std::path::PathBuf {
        self._pool.dir.path().join("host-files")
    }

    /// agentd's pid, by its executable and state directory.
    fn agentd_pid(&self) -> u32 {
        let exe = testkit::bin("agentd");
        let state = self.agentd.state_dir.display().to_string();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let same = std::fs::read_link(e.path().join("exe")).is_ok_and(|p| p == exe);
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if same && String::from_utf8_lossy(&cmdline).contains(&state) {
                return pid;
            }
        }
        panic!("agentd is not running");
    }
}
