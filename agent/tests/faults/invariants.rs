//! The fault tier's invariants after a restart (see `faults.rs`): no
//! stuck state, no orphan of any kind, no acknowledged guest lost, events
//! continuous; and the outcome of an interrupted save.

use std::collections::BTreeSet;
use std::time::Duration;

use stratus_proto::agent::v1 as pb;
use stratus_proto::pdisk::v1 as pdpb;
use testkit::*;

use super::Host;

/// Live processes running some guest's UUID (`-uuid X`): (pid, uuid).
pub fn qemus() -> Vec<(u32, String)> {
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
pub fn check(
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

/// After a save of `name`'s vdb was interrupted: once reconciliation is
/// done, no `save-*` snapshot is left, exactly one IMAGE_SAVED or
/// IMAGE_SAVE_FAILED after `history` names the image, with cause
/// reconciliation when the crash came before the outcome was journaled;
/// a saved image exists with the checksum of the disk, a failed one does
/// not; an acknowledged save is saved.
pub fn check_save(h: &Host, what: &str, name: &str, acknowledged: bool, history: &[pb::Event]) {
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
