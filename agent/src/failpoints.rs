//! Named crash points for fault injection, as in pdiskd
//! (`pdisk::failpoints`). With the cargo feature `failpoints`,
//! `crash_point(name)` evaluates the `fail` crate's point `name`,
//! configured by the FAILPOINTS environment variable
//! (`name=return;other=sleep(2000)`): `return` makes agentd exit at once, as
//! a crash would (no destructor, no reply, no further store write; guests'
//! QEMUs keep running). Without the feature every point is an empty inline
//! function. The unit tier arms the same names on one agent
//! (`Agent::crash_point`, a panic of the operation's task).
//!
//! Every name is listed in [`POINTS`], which the fault-injection test
//! (`agent/tests/faults.rs`) walks, so a new point must be added there
//! (a live migration's in [`MIGRATION_POINTS`], walked by
//! `agent/tests/faults_migrate.rs`; the kernel initiator's in
//! [`LAB_POINTS`]).

/// The exit status of a crash point, so tests can tell it from a failure.
pub const CRASH_EXIT_CODE: i32 = 86;

/// Every crash point, grouped by operation, in the order they are reached.
pub const POINTS: &[(&str, &[&str])] = &[
    ("create", &["create.committed"]),
    (
        "start",
        &[
            "start.starting",
            "start.clone_intent",
            "start.cloned",
            "start.export_intent",
            "start.exported",
            "start.disk_attached",
            "start.seed_built",
            "start.nic_recorded",
            "start.nic_attached",
            "start.launched",
            "start.running",
        ],
    ),
    // A start whose disk is a local qcow2 overlay on a cached image.
    ("start_local", &["overlay.created", "overlay.linked"]),
    ("stop", &["stop.stopping", "stop.exited"]),
    (
        "destroy",
        &["destroy.marked", "destroy.torn_down", "destroy.dir_removed"],
    ),
    (
        "save",
        &[
            "save.intent",
            "save.snapshotted",
            "save.checksummed",
            "save.cloned",
            "save.snapshot_removed",
        ],
    ),
    (
        "pull",
        &[
            "image.downloaded",
            "image.meta_written",
            "image.published",
            "image.imported",
        ],
    ),
    // Hot-plug into a running guest (QMP device_add).
    (
        "attach_disk",
        &["hotplug.disk_intent", "hotplug.disk_added"],
    ),
    ("attach_nic", &["hotplug.nic_intent"]),
    // SetDiskQos of a running guest's disk (QMP qom-set of its group).
    ("set_qos", &["qos.intent", "qos.applied"]),
    // Unplug from a running guest, once QEMU released the device (which
    // needs a guest OS that answers device_del: the fault tier boots the
    // test guest of scripts/guest-image for these).
    ("detach_disk", &["hotplug.disk_removed"]),
    ("detach_nic", &["hotplug.nic_removed"]),
];

/// The crash points of a live migration (`service/migrate.rs`), by the
/// side they live on: the source agentd's (`migrate_out`) and the
/// destination's (`migrate_in`). Walked by `agent/tests/faults_migrate.rs`
/// with two agentd-failpoints and a real guest moving between them (not by
/// faults.rs, which has one host).
pub const MIGRATION_POINTS: &[(&str, &[&str])] = &[
    (
        "migrate_out",
        &[
            "migrate.intent",
            "migrate.prepared",
            "migrate.pre_switchover",
            "migrate.completed",
        ],
    ),
    (
        "migrate_in",
        &["incoming.recorded", "incoming.prepared", "incoming.resumed"],
    ),
];

/// Crash points only the lab VM can reach (the kernel's iSCSI initiator,
/// `--attach kernel`): the login sequence of a disk's session, walked by
/// `agent/tests/kernel_attach.rs` in the lab (not by faults.rs, whose host
/// has no iscsi_tcp). A crash at any of them leaves a node record or a
/// session that the guest's record names (it is stored before the login),
/// undone by the reconciliation of the interrupted start; a record or
/// session nothing names is removed by `KernelAttacher::reap`.
pub const LAB_POINTS: &[(&str, &[&str])] = &[(
    "start_kernel",
    &["kernel.node_created", "kernel.logged_in", "kernel.scanned"],
)];

/// The NVMe/TCP connect of a disk (`--attach kernel` on an nvmet export),
/// lab only like [`LAB_POINTS`]: after `nvme connect`, after the namespace's
/// block device was found. The attachment is stored before the connect, so
/// the interrupted start's undo disconnects; a controller nothing names is
/// disconnected by `NvmeAttacher::reap`.
pub const NVME_POINTS: &[(&str, &[&str])] =
    &[("start_nvme", &["nvme.connected", "nvme.device_found"])];

/// The krbd map of an RBD disk (`--attach kernel` on an rbd export, when
/// the host has the rbd module), lab only like [`LAB_POINTS`]: after the
/// map request was written, after the mapping's block device was found.
/// The attachment is stored before the map, so the interrupted start's
/// undo unmaps; a mapping of a pdisk image nothing names is unmapped by
/// `KrbdAttacher::reap`.
pub const KRBD_POINTS: &[(&str, &[&str])] =
    &[("start_krbd", &["krbd.mapped", "krbd.device_found"])];

/// Exits the process when the point `name` is configured to `return`.
#[cfg(feature = "failpoints")]
pub fn crash_point(name: &str) {
    if fail::eval(name, |_| ()).is_some() {
        eprintln!("failpoint {name}: exiting as a crash would");
        std::process::exit(CRASH_EXIT_CODE);
    }
}

/// Without the `failpoints` feature: nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn crash_point(_name: &str) {}

/// Reads FAILPOINTS. The returned scenario must live as long as the daemon.
#[cfg(feature = "failpoints")]
pub fn setup() -> fail::FailScenario<'static> {
    let s = fail::FailScenario::setup();
    if let Ok(v) = std::env::var("FAILPOINTS") {
        eprintln!("failpoints configured: {v}");
    }
    s
}
