//! Named crash points for fault injection. With the cargo feature
//! `failpoints`, `crash_point(name)` evaluates the `fail` crate's point
//! `name`, configured by the FAILPOINTS environment variable
//! (`name=return;other=sleep(2000)`): `return` makes pdiskd exit at once,
//! as a crash would (no destructor, no reply, no further store write);
//! other actions (`sleep`, `pause`, `panic`) behave as the `fail` crate
//! documents. Without the feature every point is an empty inline function.
//!
//! Every name is listed in [`POINTS`], which the fault-injection tests
//! walk (`pdisk/tests/faults.rs` every group but `purge`, which needs a
//! volume in quarantine and is walked by `pdisk/tests/quarantine.rs`; the
//! `rbd_*` groups on the Ceph micro-cluster), so a new point must be added
//! there.

/// The exit status of a crash point, so tests can tell it from a failure.
pub const CRASH_EXIT_CODE: i32 = 86;

/// Every crash point, grouped by operation, in the order they are reached.
/// The `tgt::` points are inside the tgt exporter, between the steps of
/// one target's export (target, CHAP account, LUN, then ACL) and unexport
/// (ACL emptied, accounts deleted, then the target); the `file::` points
/// inside the file backend.
pub const POINTS: &[(&str, &[&str])] = &[
    (
        "create",
        &[
            "service::create::after_intent",
            "file::publish::before_rename",
            "file::publish::after_rename",
            "service::create::before_commit",
        ],
    ),
    (
        "snapshot",
        &[
            "service::snapshot::after_intent",
            "file::publish::before_rename",
            "file::publish::after_rename",
            "service::snapshot::before_commit",
        ],
    ),
    (
        "resize",
        &[
            "service::resize::before_backend",
            "service::resize::after_backend",
            "service::resize::after_commit",
        ],
    ),
    (
        "export",
        &[
            "service::export::after_intent",
            "tgt::export::target_created",
            "tgt::export::chap_bound",
            "tgt::export::lun_added",
            "service::export::after_exporter",
        ],
    ),
    (
        "unexport",
        &[
            "service::unexport::after_commit",
            "tgt::unexport::closed",
            "tgt::unexport::accounts_deleted",
            "service::unexport::after_exporter",
        ],
    ),
    (
        "unexport_initiators",
        &["service::unexport_initiators::after_commit"],
    ),
    (
        "delete",
        &[
            "service::delete::after_intent",
            "file::delete::after_unlink",
            "service::delete::after_backend",
        ],
    ),
    (
        "purge",
        &[
            "service::purge::after_intent",
            "file::delete::after_unlink",
            "service::purge::after_backend",
        ],
    ),
    (
        "delete_snapshot",
        &[
            "service::delete_snapshot::after_intent",
            "file::delete::after_unlink",
        ],
    ),
    // ---- the rbd backend (walked by pdisk/tests/faults.rs on the Ceph
    // micro-cluster): its own points between its CLI steps, with the
    // service's around them. `rbd::build::*` are crossed by every create,
    // import and clone (the image made under its temporary name, then
    // tagged with image-meta, then renamed). A snapshot and a resize are
    // one `rbd` call each: the service's points bracket them. Snapshot
    // protection is not used on clusters that allow clone format 2 (the
    // micro-cluster requires mimic clients), so it has no point.
    (
        "rbd_create",
        &[
            "service::create::after_intent",
            "rbd::build::built",
            "rbd::build::tagged",
            "service::create::before_commit",
        ],
    ),
    (
        "rbd_import",
        &[
            "rbd::import::imported",
            "rbd::build::built",
            "rbd::build::tagged",
        ],
    ),
    // A clone of a volume (`rbd cp`), of a snapshot (`rbd clone`), and of
    // an image base (its `pd-base` snapshot taken, then `rbd clone`).
    ("rbd_clone", &["rbd::build::built", "rbd::build::tagged"]),
    (
        "rbd_clone_base",
        &[
            "rbd::clone::base_snapshot",
            "rbd::build::built",
            "rbd::build::tagged",
            "service::create::before_commit",
        ],
    ),
    (
        "rbd_snapshot",
        &[
            "service::snapshot::after_intent",
            "service::snapshot::before_commit",
        ],
    ),
    (
        "rbd_resize",
        &[
            "service::resize::before_backend",
            "service::resize::after_backend",
        ],
    ),
    // A volume: its `pd-base` snapshot (an image base's) checked for
    // children and removed, then `rbd rm`.
    (
        "rbd_delete",
        &[
            "service::delete::after_intent",
            "rbd::delete::children_checked",
            "rbd::delete::base_removed",
            "service::delete::after_backend",
        ],
    ),
    (
        "rbd_delete_snapshot",
        &[
            "service::delete_snapshot::after_intent",
            "rbd::delete_snapshot::children_checked",
            "rbd::delete_snapshot::removed",
        ],
    ),
    // A background flatten (`service/flatten.rs`): the object map noted
    // and turned off, `rbd flatten`, the map on again and rebuilt, the
    // note removed, then the service clears the mark.
    (
        "rbd_flatten",
        &[
            "rbd::flatten::map_off",
            "rbd::flatten::flattened",
            "rbd::flatten::map_restored",
        ],
    ),
];

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
pub fn setup() -> Option<fail::FailScenario<'static>> {
    let s = fail::FailScenario::setup();
    if let Ok(v) = std::env::var("FAILPOINTS") {
        eprintln!("failpoints configured: {v}");
    }
    Some(s)
}
