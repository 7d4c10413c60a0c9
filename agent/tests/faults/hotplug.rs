//! The fault tier's checks of hot-plug and disk QoS against QEMU itself:
//! agentd holds a guest's one QMP connection, so it is killed (the guest
//! runs on) while the test asks QEMU over the guest's QMP socket, then
//! restarted without failpoints.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent::qos::{DiskQos, Limits};
use serde_json::{json, Value};
use stratus_proto::agent::v1 as pb;

use super::Host;

/// After a hot-plug into (or an unplug from) running guest `name` was
/// interrupted: the guest still runs, and what agentd records equals what
/// its QEMU has. agentd holds the guest's one QMP connection, so it is
/// killed (the guest runs on) while the test asks QEMU itself (`qom-list
/// /machine/peripheral`), then restarted. Every disk device QEMU has (`vdX-dev`) is one of the
/// record's disks and every recorded pdisk disk is in QEMU; every NIC
/// device (`netN-dev`) is one of the record's NICs and every recorded NIC
/// is in QEMU; the hot-plugged volume is in the spec exactly when QEMU has
/// it.
pub fn check_devices(h: &mut Host, what: &str, name: &str) {
    let vm = h
        .vms()
        .into_iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("{what}: {name} lost"));
    assert_eq!(vm.state(), pb::VmState::Running, "{what}: {name} stopped");
    h.agentd.kill9();
    let ids = qemu_peripherals(&qmp_socket(h, &vm.uuid));
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

/// After a detach from running guest `name` was interrupted once QEMU
/// had released the device (the last crash point of a detach): the
/// detach is finished at adoption: the hot-plugged disk (`disk`) or NIC
/// is in neither the spec nor the record, and exactly one DISK_DETACHED
/// or NIC_DETACHED after `history` says so, cause reconciliation. (Its
/// export and tap are gone: `check`'s orphan checks.)
pub fn check_detached(h: &Host, what: &str, name: &str, disk: bool, history: usize) {
    let vm = h.vm(name);
    let spec = vm.spec.clone().unwrap_or_default();
    let kind = if disk {
        let hot = format!("{name}-hot");
        let in_spec = spec
            .disks
            .iter()
            .any(|d| matches!(&d.source, Some(pb::disk_spec::Source::PdiskVolume(n)) if *n == hot));
        let recorded = vm.disks.iter().any(|d| d.source == format!("pdisk:{hot}"));
        assert!(
            !in_spec && !recorded,
            "{what}: {hot} still attached: {vm:?}"
        );
        pb::EventType::DiskDetached
    } else {
        assert!(
            spec.nics.is_empty() && vm.nics.is_empty(),
            "{what}: the NIC is still attached: {vm:?}"
        );
        pb::EventType::NicDetached
    };
    let detached: Vec<pb::Event> = h.events()[history..]
        .iter()
        .filter(|e| e.r#type() == kind && e.vm_name == name)
        .cloned()
        .collect();
    assert_eq!(detached.len(), 1, "{what}: {kind:?} events {detached:?}");
    assert_eq!(
        detached[0].cause(),
        pb::EventCause::Reconciliation,
        "{what}: {detached:?}"
    );
}

/// The QMP socket of guest `uuid`.
pub fn qmp_socket(h: &Host, uuid: &str) -> PathBuf {
    h.agentd.state_dir.join("vms").join(uuid).join("qmp.sock")
}

/// QEMU's answers to `commands`, in order, over its QMP socket (nobody
/// else may be connected: agentd is dead).
fn qmp(socket: &Path, commands: &[Value]) -> Vec<Value> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut answer = |cmd: &Value| -> Value {
        writeln!(s, "{cmd}").unwrap();
        loop {
            let mut line = String::new();
            assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: Value = serde_json::from_str(&line).unwrap();
            if let Some(ret) = v.get("return") {
                return ret.clone();
            }
            assert!(v.get("error").is_none(), "QMP {cmd}: {v}");
        }
    };
    answer(&json!({"execute": "qmp_capabilities"}));
    commands.iter().map(answer).collect()
}

/// The ids of QEMU's user-created devices.
fn qemu_peripherals(socket: &Path) -> Vec<String> {
    let props = qmp(
        socket,
        &[json!({"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}})],
    );
    props[0]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"].as_str().is_some_and(|t| t.starts_with("child<")))
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

/// The limits QEMU enforces for throttle group `group` (`qom-get` of its
/// `limits`).
pub fn qemu_limits(socket: &Path, group: &str) -> Limits {
    let v = qmp(
        socket,
        &[json!({"execute": "qom-get",
                 "arguments": {"path": format!("/objects/{group}"), "property": "limits"}})],
    );
    Limits::from_qemu(&v[0])
}

/// vdb's limits before the interrupted SetDiskQos, and the ones it asked
/// for: every field differs, so a mix of the two is seen.
pub fn old_qos() -> pb::DiskQos {
    pb::DiskQos {
        iops_total: 100,
        iops_total_max: 200,
        iops_total_max_length: 3,
        bps_read: 4 << 20,
        ..Default::default()
    }
}

pub fn new_qos() -> pb::DiskQos {
    pb::DiskQos {
        iops_read: 300,
        iops_write: 200,
        bps_write: 1 << 20,
        bps_write_max: 2 << 20,
        iops_size: 4096,
        ..Default::default()
    }
}

/// After a SetDiskQos of running guest `name`'s vdb was interrupted, when
/// QEMU had `at_crash` (asked while agentd was dead): the limits are the
/// old or the new ones, never a mix; the spec GetVm reports has QEMU's
/// (a change QEMU got is finished, one it did not is rolled back); QEMU
/// still enforces the spec's once agentd adopted the guest again; exactly
/// one DISK_QOS_CHANGED after `history` for a finished change, none for a
/// rolled-back one; no intent is left (a new change goes through).
pub fn check_qos(h: &mut Host, what: &str, name: &str, at_crash: &Limits, history: usize) {
    let (old, new) = (
        DiskQos::from_pb(old_qos()).limits,
        DiskQos::from_pb(new_qos()).limits,
    );
    assert!(
        *at_crash == old || *at_crash == new,
        "{what}: QEMU had a mix: {}",
        at_crash.describe()
    );
    let vm = h
        .vms()
        .into_iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("{what}: {name} lost"));
    assert_eq!(vm.state(), pb::VmState::Running, "{what}: {name} stopped");
    let spec = DiskQos::from_pb(
        vm.spec.as_ref().unwrap().disks[1]
            .qos
            .clone()
            .unwrap_or_default(),
    );
    assert_eq!(
        spec.limits, *at_crash,
        "{what}: the spec's limits, QEMU's at the crash"
    );
    h.agentd.kill9();
    let enforced = qemu_limits(&qmp_socket(h, &vm.uuid), "qos-vdb");
    h.agentd.restart_with_failpoints(None);
    assert_eq!(
        enforced, spec.limits,
        "{what}: QEMU's limits after the adoption, the spec's"
    );
    let changed: Vec<pb::Event> = h.events()[history..]
        .iter()
        .filter(|e| e.r#type() == pb::EventType::DiskQosChanged)
        .cloned()
        .collect();
    let want = usize::from(spec.limits == new);
    eprintln!(
        "{what}: QEMU had the {} limits; the change was {}",
        if *at_crash == new { "new" } else { "old" },
        if want == 1 { "finished" } else { "rolled back" }
    );
    assert_eq!(changed.len(), want, "{what}: DISK_QOS_CHANGED {changed:?}");
    for e in &changed {
        assert_eq!(e.cause(), pb::EventCause::Reconciliation, "{what}: {e:?}");
    }
    // Nothing unfinished is left: the change goes through now.
    h.set_qos(name, new_qos())
        .unwrap_or_else(|s| panic!("{what}: the change after the crash: {s}"));
}
