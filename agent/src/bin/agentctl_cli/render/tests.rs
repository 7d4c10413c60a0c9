use serde_json::{json, Value};
use stratus_proto::agent::v1::{
    disk_spec, AttachedDisk, AttachedNic, CachedImage, Contextualization, DiskSpec, Event, Host,
    ImageRef, KernelBoot, NicSpec, Vm, VmSpec,
};

use super::*;

fn vm() -> Vm {
    Vm {
        project: String::new(),
        uuid: "6f9619ff-8b86-d011-b42d-00c04fc964ff".into(),
        name: "web1".into(),
        spec: Some(VmSpec {
            name: "web1".into(),
            vcpus: 2,
            memory_bytes: 512 << 20,
            disks: vec![
                DiskSpec {
                    source: Some(disk_spec::Source::PdiskVolume("web1-root".into())),
                    read_only: false,
                    boot_index: 1,
                    ..DiskSpec::default()
                },
                DiskSpec {
                    source: Some(disk_spec::Source::File("/srv/seed.iso".into())),
                    read_only: true,
                    boot_index: 0,
                    ..DiskSpec::default()
                },
            ],
            nics: vec![NicSpec {
                bridge: "br0".into(),
                mac: String::new(),
                vlan: 20,
                ips: vec!["10.0.0.5".into()],
            }],
            kernel: None,
            labels: [("tier", "web"), ("app", "shop")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            context: None,
        }),
        state: VmState::Running as i32,
        state_reason: String::new(),
        pid: 4242,
        disks: vec![AttachedDisk {
            device: "vda".into(),
            source: "pdisk:web1-root".into(),
            attachment: "iscsi://127.0.0.1:3260/iqn.2026-11.io.stratus:web1-root/1".into(),
            read_only: false,
        }],
        nics: vec![AttachedNic {
            tap: "st-6f9619ff-0".into(),
            bridge: "br0".into(),
            mac: "52:54:00:12:34:56".into(),
            vlan: 20,
        }],
        console_log: "/var/lib/stratus/agent/vms/6f96/console.log".into(),
        created_at: "2026-11-02T10:00:00Z".into(),
        last_event_seq: 42,
    }
}

#[test]
fn enums_are_lowercase_words() {
    assert_eq!(state_word(VmState::Running as i32), "running");
    assert_eq!(state_word(VmState::Unspecified as i32), "unspecified");
    assert_eq!(state_word(99), "unknown(99)");
    assert_eq!(
        event_type_word(EventType::DiskAttached as i32),
        "disk_attached"
    );
    assert_eq!(
        event_type_word(EventType::DiskIoError as i32),
        "disk_io_error"
    );
    assert_eq!(cause_word(EventCause::Api as i32), "api");
    assert_eq!(cause_word(EventCause::GuestPanic as i32), "guest_panic");
    assert!(is_active(VmState::Paused as i32));
    assert!(!is_active(VmState::Stopped as i32));
    assert!(!is_active(77));
}

#[test]
fn vm_json_keeps_proto_names() {
    let j = vm_json(&vm());
    assert_eq!(j["state"], "running");
    assert_eq!(j["spec"]["memory_bytes"], 512u64 << 20);
    assert_eq!(j["spec"]["disks"][0]["pdisk_volume"], "web1-root");
    assert_eq!(j["spec"]["disks"][0]["boot_index"], 1);
    assert_eq!(j["spec"]["disks"][1]["file"], "/srv/seed.iso");
    assert_eq!(j["spec"]["disks"][1]["read_only"], true);
    assert_eq!(j["spec"]["nics"][0]["vlan"], 20);
    assert_eq!(j["spec"]["kernel"], Value::Null);
    assert_eq!(
        serde_json::to_string(&j["spec"]["labels"]).unwrap(),
        r#"{"app":"shop","tier":"web"}"#,
        "keys sorted"
    );
    assert_eq!(j["disks"][0]["device"], "vda");
    assert_eq!(j["nics"][0]["mac"], "52:54:00:12:34:56");
    assert_eq!(j["spec"]["nics"][0]["ips"][0], "10.0.0.5");
    assert_eq!(j["last_event_seq"], 42);
    assert_eq!(vms_json(&[vm()])["vms"][0]["name"], "web1");

    let mut v = vm();
    v.spec.as_mut().unwrap().kernel = Some(KernelBoot {
        kernel: "/boot/vmlinuz".into(),
        initrd: String::new(),
        cmdline: "console=ttyS0".into(),
    });
    assert_eq!(vm_json(&v)["spec"]["kernel"]["cmdline"], "console=ttyS0");
}

#[test]
fn vm_view_shows_disks_and_nics() {
    let text = vm_view(&vm());
    assert!(text.starts_with("name:        web1\n"), "{text}");
    assert!(text.contains("state:       running\n"), "{text}");
    assert!(text.contains("memory:      512M\n"), "{text}");
    assert!(text.contains("labels:      app=shop,tier=web\n"), "{text}");
    assert!(
        text.contains("kernel:      - (boots from disk)\n"),
        "{text}"
    );
    let tables: Vec<&str> = text.split("\n\n").collect();
    assert_eq!(tables.len(), 3, "{text}");
    assert_eq!(
        tables[1],
        "DEVICE  SOURCE              MODE  BOOT  ATTACHMENT\n\
             vda     pdisk:web1-root     rw    1     \
             iscsi://127.0.0.1:3260/iqn.2026-11.io.stratus:web1-root/1\n\
             -       file:/srv/seed.iso  ro    -     -"
    );
    assert_eq!(
        tables[2],
        "TAP            BRIDGE  MAC                VLAN  IPS\n\
             st-6f9619ff-0  br0     52:54:00:12:34:56  20    10.0.0.5\n"
    );

    let mut defined = vm();
    defined.state = VmState::Error as i32;
    defined.state_reason = "qemu: could not open\n/dev/x".into();
    defined.pid = 0;
    defined.disks.clear();
    defined.nics.clear();
    let text = vm_view(&defined);
    assert!(
        text.contains("state:       error (qemu: could not open /dev/x)\n"),
        "{text}"
    );
    assert!(text.contains("pid:         -\n"), "{text}");
    assert!(
        text.contains("-    br0     (generated)  20    10.0.0.5\n"),
        "the MAC is generated at start: {text}"
    );
}

#[test]
fn the_seed_shows_as_hostname_and_contents() {
    let text = vm_view(&vm());
    assert!(text.contains("hostname:    -\n"), "{text}");
    assert!(text.contains("seed:        -\n"), "{text}");
    assert_eq!(vm_json(&vm())["spec"]["context"], Value::Null);

    let mut v = vm();
    v.spec.as_mut().unwrap().context = Some(Contextualization::default());
    v.disks.push(AttachedDisk {
        device: "vdb".into(),
        source: "file:/srv/seed.iso".into(),
        attachment: "/srv/seed.iso".into(),
        read_only: true,
    });
    v.disks.push(AttachedDisk {
        device: "vdc".into(),
        source: "seed".into(),
        attachment: "/var/lib/stratus/agent/vms/6f96/seed.img".into(),
        read_only: true,
    });
    let text = vm_view(&v);
    assert!(text.contains("hostname:    web1 (the VM name)\n"), "{text}");
    assert!(text.contains("seed:        default user-data\n"), "{text}");
    assert!(
        text.contains(
            "vdc     seed                ro    -     /var/lib/stratus/agent/vms/6f96/seed.img"
        ),
        "{text}"
    );

    v.spec.as_mut().unwrap().context = Some(Contextualization {
        hostname: "app1.example.org".into(),
        user_data: "#cloud-config\n".into(),
        network_config: "version: 2\n".into(),
        ssh_keys: vec!["ssh-ed25519 AAAA a".into(), "ssh-ed25519 AAAA b".into()],
    });
    let text = vm_view(&v);
    assert!(text.contains("hostname:    app1.example.org\n"), "{text}");
    assert!(
        text.contains("seed:        user-data 14B, network-config 11B, 2 ssh keys\n"),
        "{text}"
    );
    let j = vm_json(&v);
    assert_eq!(j["spec"]["context"]["hostname"], "app1.example.org");
    assert_eq!(j["spec"]["context"]["ssh_keys"][1], "ssh-ed25519 AAAA b");
}

#[test]
fn vm_table_is_human() {
    let mut stopped = vm();
    stopped.name = "db".into();
    stopped.state = VmState::Stopped as i32;
    stopped.pid = 0;
    stopped.spec.as_mut().unwrap().labels.clear();
    let out = vms_table(&[vm(), stopped]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("NAME  UUID"), "{out}");
    assert!(
        lines[1].ends_with("running  2      512M    2      1     4242  app=shop,tier=web"),
        "{out}"
    );
    assert!(
        lines[2].ends_with("stopped  2      512M    2      1     -     -"),
        "{out}"
    );
    assert_eq!(
        vms_table(&[]),
        "NAME  UUID  STATE  VCPUS  MEMORY  DISKS  NICS  PID  LABELS\n"
    );
}

#[test]
fn events_print_one_line_each() {
    let mut e = Event {
        seq: 42,
        time: "2026-11-02T10:00:00.123456Z".into(),
        vm_uuid: "6f96".into(),
        vm_name: "web1".into(),
        r#type: EventType::DiskAttached as i32,
        state: VmState::Starting as i32,
        cause: EventCause::Api as i32,
        detail: "vda pdisk:web1-root\nvia iscsi".into(),
        ..Event::default()
    };
    assert_eq!(
        event_line(&e),
        "42 2026-11-02T10:00:00.123456Z web1 disk_attached starting cause=api \
             vda pdisk:web1-root via iscsi\n"
    );
    let j = event_json(&e);
    assert_eq!(j["type"], "disk_attached");
    assert_eq!(j["state"], "starting");
    assert_eq!(j["cause"], "api");
    assert_eq!(j["seq"], 42);
    assert!(!j.to_string().contains('\n'), "one JSON Line");
    e.vm_name.clear();
    e.detail.clear();
    e.state = VmState::Unspecified as i32;
    e.cause = EventCause::Reconciliation as i32;
    e.r#type = EventType::Adopted as i32;
    assert_eq!(
        event_line(&e),
        "42 2026-11-02T10:00:00.123456Z 6f96 adopted - cause=reconciliation\n"
    );
    assert_eq!(event_json(&e)["state"], "unspecified");
}

const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn image_vm() -> Vm {
    let mut v = vm();
    let disks = &mut v.spec.as_mut().unwrap().disks;
    disks[0] = DiskSpec {
        qos: None,
        server: String::new(),
        source: Some(disk_spec::Source::Image(ImageRef {
            url: "https://img.example/deb.qcow2".into(),
            sha256: SHA.into(),
            format: ImageFormat::Qcow2 as i32,
            endorser: "ops".into(),
            endorsement: String::new(),
        })),
        read_only: false,
        boot_index: 1,
        size_bytes: 10 << 30,
        persistence: DiskPersistence::Clone as i32,
    };
    disks.push(DiskSpec {
        source: Some(disk_spec::Source::Image(ImageRef {
            url: "file:///srv/a.raw".into(),
            sha256: SHA.into(),
            format: ImageFormat::Auto as i32,
            endorser: String::new(),
            endorsement: String::new(),
        })),
        persistence: DiskPersistence::Local as i32,
        ..DiskSpec::default()
    });
    v.disks[0].source = format!("image:{SHA}");
    v
}

#[test]
fn image_disks_show_url_checksum_size_and_persistence() {
    let text = vm_view(&image_vm());
    let tables: Vec<&str> = text.split("\n\n").collect();
    assert_eq!(
        tables[1],
        "DEVICE  SOURCE                                                   MODE  BOOT  SIZE   \
             PERSISTENCE  ATTACHMENT\n\
             vda     image:https://img.example/deb.qcow2 sha256=9f86d081884c  rw    1     10G    \
             clone        iscsi://127.0.0.1:3260/iqn.2026-11.io.stratus:web1-root/1\n\
             -       file:/srv/seed.iso                                       ro    -     -      \
             -            -\n\
             -       image:file:///srv/a.raw sha256=9f86d081884c              rw    -     image  \
             local        -"
    );
    // Without image disks, the table keeps its five columns.
    assert!(vm_view(&vm()).contains("\nDEVICE  SOURCE              MODE  BOOT  ATTACHMENT\n"));

    let j = vm_json(&image_vm());
    let d = &j["spec"]["disks"][0];
    assert_eq!(d["image"]["url"], "https://img.example/deb.qcow2");
    assert_eq!(d["image"]["sha256"], SHA, "whole in JSON");
    assert_eq!(d["image"]["format"], "qcow2");
    assert_eq!(d["image"]["endorser"], "ops");
    assert_eq!(d["size_bytes"], 10u64 << 30);
    assert_eq!(d["persistence"], "clone");
    assert_eq!(d["boot_index"], 1);
    assert_eq!(d.get("pdisk_volume"), None);
    let d = &j["spec"]["disks"][2];
    assert_eq!(d["image"]["format"], "auto");
    assert_eq!(d["size_bytes"], 0);
    assert_eq!(d["persistence"], "local");
    let d = &j["spec"]["disks"][1];
    assert_eq!(d["file"], "/srv/seed.iso");
    assert_eq!(d.get("persistence"), None, "image disks only");
    assert_eq!(j["disks"][0]["source"], format!("image:{SHA}"));
    assert_eq!(format_word(7), "unknown(7)");
    assert_eq!(persistence_word(DiskPersistence::Local as i32), "local");
}

fn images() -> Vec<CachedImage> {
    vec![
        CachedImage {
            server: String::new(),
            sha256: SHA.into(),
            url: "https://img.example/deb.qcow2".into(),
            size_bytes: 2 << 30,
            format: "qcow2".into(),
            location: "local".into(),
            volume: String::new(),
            users: 2,
            last_used: "2026-11-02T10:00:00Z".into(),
            endorser: "ops@example.org".into(),
            endorser_key: "ed25519:KEY".into(),
        },
        CachedImage {
            server: String::new(),
            sha256: SHA.into(),
            url: String::new(),
            size_bytes: 2 << 30,
            format: "raw".into(),
            location: "pdisk".into(),
            volume: "image-9f86d081884c".into(),
            users: 0,
            last_used: "2026-11-01T09:00:00Z".into(),
            endorser: String::new(),
            endorser_key: String::new(),
        },
    ]
}

#[test]
fn images_list_as_a_table_and_json() {
    assert_eq!(
        images_table(&images(), &[]),
        "SHA256            LOCATION  VOLUME              SIZE  FORMAT  USERS  \
             LAST USED             ENDORSED BY      URL\n\
             9f86d081884c7d65  local     -                   2G    qcow2   2      \
             2026-11-02T10:00:00Z  ops@example.org  https://img.example/deb.qcow2\n\
             9f86d081884c7d65  pdisk     image-9f86d081884c  2G    raw     0      \
             2026-11-01T09:00:00Z  -                -\n"
    );
    assert_eq!(
        images_table(&[], &[]),
        "SHA256  LOCATION  VOLUME  SIZE  FORMAT  USERS  LAST USED  ENDORSED BY  URL\n"
    );
    let j = images_json(&images(), &[]);
    assert_eq!(j["images"][0]["sha256"], SHA);
    assert_eq!(j["images"][0]["size_bytes"], 2u64 << 30);
    assert_eq!(j["images"][0]["users"], 2);
    assert_eq!(j["images"][1]["volume"], "image-9f86d081884c");
    assert_eq!(j["images"][1]["location"], "pdisk");
    assert_eq!(j["images"][1]["last_used"], "2026-11-01T09:00:00Z");
    assert_eq!(j["images"][0]["endorser"], "ops@example.org");
    assert_eq!(j["images"][0]["endorser_key"], "ed25519:KEY");
}

#[test]
fn a_pulled_image_shows_in_full() {
    let [local, pdisk] = images().try_into().unwrap();
    let text = image_view(&local);
    assert_eq!(
        text,
        format!(
            "sha256:       {SHA}\n\
                 url:          https://img.example/deb.qcow2\n\
                 location:     local\n\
                 volume:       -\n\
                 size:         2G\n\
                 format:       qcow2\n\
                 users:        2 guests\n\
                 last used:    2026-11-02T10:00:00Z\n\
                 endorsed by:  ops@example.org (key ed25519:KEY)\n"
        )
    );
    let text = image_view(&pdisk);
    assert!(
        text.contains("volume:       image-9f86d081884c\n"),
        "{text}"
    );
    assert!(text.contains("users:        0 clones\n"), "{text}");
    assert!(text.contains("endorsed by:  -\n"), "{text}");
    let one = CachedImage { users: 1, ..pdisk };
    assert!(image_view(&one).contains("users:        1 clone\n"));
    assert_eq!(cached_image_json(&local)["format"], "qcow2");
}

#[test]
fn evictions_print_one_line_per_copy() {
    let mut evicted = images();
    evicted[1].sha256.clear();
    assert_eq!(
        evicted_text(SHA, &evicted),
        "Evicted image 9f86d081884c7d65 from the local cache (2G).\n\
             Evicted image 9f86d081884c7d65 from pdisk volume image-9f86d081884c (2G).\n"
    );
    assert_eq!(
        evicted_text(SHA, &[]),
        "Nothing evicted: image 9f86d081884c7d65 is not cached.\n"
    );
    let j = evicted_json(SHA, &evicted);
    assert_eq!(j["sha256"], SHA);
    assert_eq!(j["evicted"][0]["location"], "local");
    assert_eq!(j["evicted"][1]["volume"], "image-9f86d081884c");
    assert_eq!(evicted_json(SHA, &[])["evicted"], json!([]));
}

#[test]
fn image_events_show_checksum_and_progress() {
    let mut e = Event {
        seq: 7,
        time: "2026-11-02T10:00:00.000001Z".into(),
        r#type: EventType::ImagePullProgress as i32,
        cause: EventCause::Api as i32,
        detail: "https://img.example/deb.qcow2".into(),
        image_sha256: SHA.into(),
        bytes: 512 << 20,
        total_bytes: 2 << 30,
        ..Event::default()
    };
    assert_eq!(
        event_line(&e),
        "7 2026-11-02T10:00:00.000001Z - image_pull_progress - cause=api \
             image=9f86d081884c 512M/2G https://img.example/deb.qcow2\n"
    );
    let j = event_json(&e);
    assert_eq!(j["type"], "image_pull_progress");
    assert_eq!(j["image_sha256"], SHA);
    assert_eq!(j["bytes"], 512u64 << 20);
    assert_eq!(j["total_bytes"], 2u64 << 30);
    assert_eq!(j["vm_name"], "");

    e.total_bytes = 0;
    e.bytes = 1536 << 20;
    assert!(
        event_line(&e).contains(" image=9f86d081884c 1.5G/? "),
        "unknown total: {}",
        event_line(&e)
    );
    e.bytes = 0;
    e.r#type = EventType::ImagePullStarted as i32;
    e.vm_name = "web1".into();
    e.state = VmState::Starting as i32;
    assert_eq!(
        event_line(&e),
        "7 2026-11-02T10:00:00.000001Z web1 image_pull_started starting cause=api \
             image=9f86d081884c https://img.example/deb.qcow2\n"
    );
    for (t, word) in [
        (EventType::ImageCached, "image_cached"),
        (EventType::ImagePullFailed, "image_pull_failed"),
        (EventType::ImageEvicted, "image_evicted"),
        (EventType::ImageImported, "image_imported"),
    ] {
        e.r#type = t as i32;
        assert!(event_line(&e).contains(&format!(" {word} ")), "{word}");
        assert_eq!(event_json(&e)["type"], word);
    }
    // Other events: no image fields on the line, zeros in JSON.
    let plain = Event {
        seq: 8,
        r#type: EventType::Running as i32,
        ..Event::default()
    };
    assert_eq!(event_line(&plain), "8 - - running - cause=-\n");
    assert_eq!(event_json(&plain)["image_sha256"], "");
    assert_eq!(event_json(&plain)["bytes"], 0);
}

#[test]
fn host_shows_capacity_and_accelerator() {
    let h = Host {
        pdisk_servers: Vec::new(),
        hostname: "hv1".into(),
        cpus: 8,
        memory_bytes: 32 << 30,
        free_vcpus: 6,
        free_memory_bytes: 31 << 30,
        accelerator: "tcg".into(),
        accelerator_reason: "the CPU has no vmx or svm flag".into(),
        qemu_version: "7.2.0".into(),
        agent_version: "0.1.0".into(),
        initiator_iqn: "iqn.2026-11.io.stratus:hv1".into(),
        vm_count: 3,
        running_vms: 1,
        last_event_seq: 42,
        pdisk_server: String::new(),
        qemu_confinement: "uid pool 64000-64999, seccomp sandbox".into(),
        qemu_privilege_option: "-runas".into(),
        qemu_seccomp: true,
    };
    let j = host_json(&h);
    assert_eq!(j["qemu_privilege_option"], "-runas");
    assert_eq!(j["qemu_seccomp"], true);
    assert_eq!(j["qemu_confinement"], h.qemu_confinement);
    assert_eq!(j["memory_bytes"], 32u64 << 30);
    assert_eq!(j["accelerator"], "tcg");
    assert_eq!(j["running_vms"], 1);
    let text = host_view(&h);
    assert!(
        text.contains("accelerator:   tcg (the CPU has no vmx or svm flag)\n"),
        "{text}"
    );
    assert!(text.contains("memory:        32G\n"), "{text}");
    assert!(text.contains("vms:           3 (1 running)\n"), "{text}");
    assert!(text.contains("pdisk server:  -\n"), "{text}");
    assert!(
        text.contains("confinement:   uid pool 64000-64999, seccomp sandbox\n"),
        "{text}"
    );
    assert!(text.contains("qemu offers:   -runas, seccomp\n"), "{text}");

    // Several pdisk servers: a line each with its address and state.
    let h = Host {
        pdisk_server: "https://192.0.2.10:7400".into(),
        pdisk_servers: vec![
            stratus_proto::agent::v1::PdiskServer {
                name: "default".into(),
                url: "https://192.0.2.10:7400".into(),
                reachable: true,
                ..Default::default()
            },
            stratus_proto::agent::v1::PdiskServer {
                name: "store-b".into(),
                url: "https://192.0.2.11:7400".into(),
                reachable: false,
                last_error: "probe: tcp connect error\nrefused".into(),
                last_error_at: "2026-12-03T23:00:00Z".into(),
            },
        ],
        ..h
    };
    let text = host_view(&h);
    assert!(
        text.contains("pdisk server:  default https://192.0.2.10:7400, reachable\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "pdisk server:  store-b https://192.0.2.11:7400, UNREACHABLE \
             (2026-12-03T23:00:00Z: probe: tcp connect error refused)\n"
        ),
        "{text}"
    );
    // Widths as before: the key is the one a single server had.
    assert!(text.contains("qemu offers:   "), "{text}");
    assert!(!text.contains("pdisk server:  -"), "{text}");
    let j = host_json(&h);
    assert_eq!(j["pdisk_servers"][1]["name"], "store-b");
    assert_eq!(j["pdisk_servers"][1]["reachable"], false);
    assert_eq!(j["pdisk_servers"][0]["reachable"], true);
}

#[test]
fn images_on_other_pdisk_servers_and_unreachable_ones_are_named() {
    let mut on_b = images().remove(1);
    on_b.server = "store-b".into();
    let down = stratus_proto::agent::v1::PdiskServer {
        name: "store-c".into(),
        reachable: false,
        last_error: "listing pdisk volumes: pdisk server store-c unavailable: refused".into(),
        ..Default::default()
    };
    let text = images_table(std::slice::from_ref(&on_b), std::slice::from_ref(&down));
    assert!(
        text.contains("  pdisk:store-b  image-9f86d081884c  "),
        "{text}"
    );
    assert!(
        text.ends_with(
            "pdisk server store-c could not be listed (its image bases are missing above): \
             listing pdisk volumes: pdisk server store-c unavailable: refused\n"
        ),
        "{text}"
    );
    let j = images_json(std::slice::from_ref(&on_b), &[down]);
    assert_eq!(j["images"][0]["server"], "store-b");
    assert_eq!(j["unreachable_servers"][0]["name"], "store-c");
    assert!(
        image_view(&on_b).contains("volume:       image-9f86d081884c on pdisk server store-b\n")
    );
}

#[test]
fn disk_limits_show_in_their_own_column_and_json() {
    let mut v = vm();
    v.spec.as_mut().unwrap().disks[0].qos = Some(stratus_proto::agent::v1::DiskQos {
        iops_total: 200,
        bps_write: 10 << 20,
        group: "db".into(),
        ..Default::default()
    });
    let text = vm_view(&v);
    assert!(text.contains("QOS"), "{text}");
    assert!(
        text.contains("iops_total=200 bps_write=10485760 group=db"),
        "{text}"
    );
    let j = vm_json(&v);
    let q = &j["spec"]["disks"][0]["qos"];
    assert_eq!(q["iops_total"], 200);
    assert_eq!(q["bps_write"], 10 << 20);
    assert_eq!(q["group"], "db");
    // Unlimited disks have no key; a VM without limits no column.
    assert!(j["spec"]["disks"][1].get("qos").is_none());
    assert!(!vm_view(&vm()).contains("QOS"));
}
