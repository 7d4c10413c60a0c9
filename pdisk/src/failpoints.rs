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
//! there. faults.rs walks file+tgt on the host and lvm+lio and lvm+nvmet in
//! the lab VM (`scripts/lab faults`).

/// The exit status of a crash point, so tests can tell it from a failure.
pub const CRASH_EXIT_CODE: i32 = 86;

/// Every crash point, grouped by operation, in the order they are reached.
/// A point's layer is its name up to the first `::`: `service::` points are
/// in the service and reached on every stack; the others inside one backend
/// (`file::`, `lvm::`, `rbd::`) or exporter (`tgt::`, `lio::`, `nvmet::`), reached
/// only when pdiskd runs on it. [`points_on`] gives the points one stack
/// reaches, which is what a walk on that stack covers.
///
/// The backend's points: `file::` around the rename that publishes a staged
/// file and after the unlink of a delete; `lvm::` after every `lvcreate` of
/// an object (create, snapshot, same-size clone; an import's temporary),
/// around the `lvrename` that publishes an import's temporary, and after the
/// `lvremove` of a delete. The exporter's: `tgt::` between one target's
/// export steps (target, CHAP account, LUN, then ACL) and unexport steps
/// (ACL emptied, accounts deleted, then the target); `lio::` after the
/// backstore, the target with its TPG, LUN 1, the ACLs (the TPG is enabled
/// last) and after an ACL removed; on unexport after the ACLs, then the
/// target are removed (the backstore last); `nvmet::` after the subsystem,
/// its namespace enabled, a host entry made, a host allowed, the port link
/// (last), a host's link removed; on unexport after the port link, the
/// hosts' links and the subsystem are removed (the host entries last).
pub const POINTS: &[(&str, &[&str])] = &[
    (
        "create",
        &[
            "service::create::after_intent",
            "file::publish::before_rename",
            "lvm::lvcreate::done",
            "file::publish::after_rename",
            "service::create::before_commit",
        ],
    ),
    (
        "import",
        &[
            "service::create::after_intent",
            "lvm::lvcreate::done",
            "file::publish::before_rename",
            "lvm::publish::before_rename",
            "file::publish::after_rename",
            "lvm::publish::after_rename",
            "service::create::before_commit",
        ],
    ),
    (
        "clone",
        &[
            "service::create::after_intent",
            "file::publish::before_rename",
            "lvm::lvcreate::done",
            "file::publish::after_rename",
            "service::create::before_commit",
        ],
    ),
    (
        "snapshot",
        &[
            "service::snapshot::after_intent",
            "file::publish::before_rename",
            "lvm::lvcreate::done",
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
            "lio::export::backstore_created",
            "lio::export::target_created",
            "lio::export::lun_added",
            "lio::export::acls_set",
            "nvmet::export::subsystem_created",
            "nvmet::export::namespace_enabled",
            "nvmet::export::host_created",
            "nvmet::export::host_allowed",
            "nvmet::export::port_linked",
            "service::export::after_exporter",
        ],
    ),
    (
        "unexport",
        &[
            "service::unexport::after_commit",
            "tgt::unexport::closed",
            "tgt::unexport::accounts_deleted",
            "lio::unexport::acls_removed",
            "lio::unexport::target_removed",
            "nvmet::unexport::port_unlinked",
            "nvmet::unexport::hosts_unlinked",
            "nvmet::unexport::subsystem_removed",
            "service::unexport::after_exporter",
        ],
    ),
    (
        "unexport_initiators",
        &[
            "service::unexport_initiators::after_commit",
            "lio::export::acl_removed",
            "nvmet::export::host_unlinked",
        ],
    ),
    (
        "delete",
        &[
            "service::delete::after_intent",
            "file::delete::after_unlink",
            "lvm::delete::after_lvremove",
            "service::delete::after_backend",
        ],
    ),
    (
        "purge",
        &[
            "service::purge::after_intent",
            "file::delete::after_unlink",
            "lvm::delete::after_lvremove",
            "service::purge::after_backend",
        ],
    ),
    (
        "delete_snapshot",
        &[
            "service::delete_snapshot::after_intent",
            "file::delete::after_unlink",
            "lvm::delete::after_lvremove",
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

/// The layers of pdiskd's default stack (a file pool exported by tgt).
pub const FILE_TGT: &[&str] = &["service", "file", "tgt"];
/// An LVM thin pool exported by LIO.
pub const LVM_LIO: &[&str] = &["service", "lvm", "lio"];
/// An LVM thin pool exported by nvmet.
pub const LVM_NVMET: &[&str] = &["service", "lvm", "nvmet"];
/// The rbd backend (no exporter); its groups are the `rbd_*` ones.
pub const RBD: &[&str] = &["service", "rbd"];

/// The crash points of `group` that pdiskd reaches on a stack of `layers`
/// (e.g. [`LVM_LIO`]), in order; empty for an unknown group.
pub fn points_on(group: &str, layers: &[&str]) -> Vec<&'static str> {
    POINTS
        .iter()
        .filter(|(g, _)| *g == group)
        .flat_map(|(_, points)| points.iter().copied())
        .filter(|p| layers.iter().any(|l| layer_of(p) == *l))
        .collect()
}

fn layer_of(point: &str) -> &str {
    point.split("::").next().unwrap_or_default()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_point_belongs_to_a_known_layer_and_each_stack_keeps_its_own() {
        for (group, points) in POINTS {
            for p in *points {
                assert!(
                    ["service", "file", "lvm", "rbd", "tgt", "lio", "nvmet"].contains(&layer_of(p)),
                    "{group}: {p}"
                );
            }
        }
        assert_eq!(
            points_on("create", FILE_TGT),
            [
                "service::create::after_intent",
                "file::publish::before_rename",
                "file::publish::after_rename",
                "service::create::before_commit",
            ]
        );
        assert_eq!(
            points_on("unexport", LVM_LIO),
            [
                "service::unexport::after_commit",
                "lio::unexport::acls_removed",
                "lio::unexport::target_removed",
                "service::unexport::after_exporter",
            ]
        );
        assert_eq!(
            points_on("delete_snapshot", LVM_NVMET),
            [
                "service::delete_snapshot::after_intent",
                "lvm::delete::after_lvremove",
            ]
        );
        assert!(points_on("no-such-group", FILE_TGT).is_empty());
        // The rbd walk reaches every point of its groups.
        for (group, points) in POINTS.iter().filter(|(g, _)| g.starts_with("rbd_")) {
            assert_eq!(points_on(group, RBD), points.to_vec(), "{group}");
        }
    }
}
