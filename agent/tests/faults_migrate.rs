//! Fault injection for live migration (issues 13 and 15): each crash point
//! of `agent::failpoints::MIGRATION_POINTS` walked with two real
//! agentd-failpoints and a real guest moving between them.
//!
//! Two hosts as testkit's `TwoHosts` builds them (two network namespaces
//! joined by a veth pair, A 10.231.0.1 and B 10.231.0.2, each with its
//! bridge and agentd; one pdiskd/tgtd on A reached by both), both agentds
//! `agentd-failpoints`. One test guest (TCG, 128 MiB, kernel boot, an empty
//! pdisk volume as its disk, one NIC, counting on its console) boots once
//! on A. For each crash point, from wherever the guest runs: the side the
//! point lives on (the source for `migrate.*`, the destination for
//! `incoming.*`) is restarted with that point set to exit the process;
//! MigrateVm moves the guest to the other host; the armed agentd must die
//! there (so the pair is covered); it is restarted without failpoints and
//! then, within a minute:
//! - the guest runs exactly once: one live QEMU with its UUID, on the side
//!   the journal says owns it (the destination once QEMU completed or
//!   resumed it there, the source before; an incoming QEMU no stream
//!   reaches is undone after agentd's 30 s grace), its pid file in that
//!   agentd's state directory, and it
//!   keeps counting on that side's console without booting again;
//! - the other side holds nothing: no record (ListVms empty, GetVm
//!   NotFound), no guest directory, no tap, no QEMU, and pdisk's export of
//!   the volume names only the owner's initiator;
//! - GetVm and ListVms of the owner agree with QEMU (RUNNING, its pid);
//! - the events say what happened: the restarted agentd journaled the
//!   reconciliation's outcome (MIGRATED or MIGRATION_FAILED, cause
//!   reconciliation), the other side's last word on the guest agrees, and
//!   each journal's seqs are 1..n.
//!
//! Each point starts from that checked clean state.
//!
//! A second test (its own two hosts, both agentds with
//! `--migration-max-bandwidth=8M` so a kill lands mid-transfer) kills, once
//! the source journaled MIGRATION_PROGRESS: the destination's incoming
//! QEMU, both agentds (restarted the source first, then again the
//! destination first), the source's QEMU.
//! After each the guest runs on the source only (the first two) or is
//! CRASHED there with nothing left anywhere (the last), both journals end
//! in MIGRATION_FAILED, and a retry of the migration (after a StartVm for
//! the crashed guest) moves it.
//!
//! Run by scripts/test's
//! integration tier (the fault tier; needs root, QEMU, tgt, the test guest
//! and agentd-failpoints).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::failpoints::{CRASH_EXIT_CODE, MIGRATION_POINTS};
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::*;

const BRIDGE: &str = "stbr0";
const NAME: &str = "fmover";
const VOLUME: &str = "fmover-root";
const IQN: [&str; 2] = [INITIATOR, OTHER_INITIATOR];
/// How long the two sides may take to settle after the restart (the
/// destination's monitor follows its QEMU on its own).
const SETTLE: Duration = Duration::from_secs(60);

/// The two hosts (testkit's), both agentds `agentd-failpoints` with `extra`.
fn two_hosts(extra: &[&str]) -> TwoHosts {
    let mut h = TwoHosts::start(BRIDGE, 512, [&[], &[]], [extra, extra]);
    h.hosts = h.hosts.map(Agentd::into_failpoints);
    h
}

/// What these tests ask of the two hosts about the guest.
trait Guest {
    fn migrate(
        &self,
        from: usize,
    ) -> std::thread::JoinHandle<Result<pb::MigrateVmResponse, tonic::Status>>;
    fn vms(&self, i: usize) -> Vec<pb::Vm>;
    fn get(&self, i: usize) -> Result<pb::Vm, tonic::Status>;
    fn events(&self, i: usize) -> Vec<pb::Event>;
    fn taps(&self, i: usize) -> Vec<String>;
    fn guest_dirs(&self, i: usize) -> Vec<String>;
}

impl Guest for TwoHosts {
    /// MigrateVm of the guest from host `from` to the other one, on a
    /// thread of its own (join it for the answer).
    fn migrate(
        &self,
        from: usize,
    ) -> std::thread::JoinHandle<Result<pb::MigrateVmResponse, tonic::Status>> {
        let (url, to) = (self.hosts[from].url(), self.url(1 - from));
        self.ns[from].spawn(move || async move {
            VmServiceClient::new(channel(&url).await)
                .migrate_vm(pb::MigrateVmRequest {
                    vm: NAME.into(),
                    destination: to,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
        })
    }

    fn vms(&self, i: usize) -> Vec<pb::Vm> {
        self.on(i, |mut c| async move {
            c.list_vms(pb::ListVmsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .vms
        })
    }

    fn get(&self, i: usize) -> Result<pb::Vm, tonic::Status> {
        self.on(i, |mut c| async move {
            c.get_vm(pb::VmRequest {
                vm: NAME.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
        })
    }

    fn events(&self, i: usize) -> Vec<pb::Event> {
        let url = self.hosts[i].url();
        self.ns[i].block_on(move || agent_events(url, 0))
    }

    /// Guest taps (`st…` links but the bridge) in host `i`'s namespace.
    fn taps(&self, i: usize) -> Vec<String> {
        self.ns[i]
            .ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("st") && n != BRIDGE)
            .collect()
    }

    /// Guest directories under host `i`'s state directory.
    fn guest_dirs(&self, i: usize) -> Vec<String> {
        std::fs::read_dir(self.hosts[i].state_dir.join("vms"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Pids of live QEMUs running UUID `uuid` (`-uuid X` on their command line).
fn qemus_of(uuid: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let is_qemu = args
            .first()
            .is_some_and(|a| String::from_utf8_lossy(a).contains("qemu-system"));
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"-uuid" && w[1] == uuid.as_bytes());
        if is_qemu && ours {
            out.push(pid);
        }
    }
    out
}

/// The guest's last count on the console at `log` (0 when none yet).
fn last_count(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split("STRATUS-GUEST count ").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// Waits until the console at `log` shows a count past `after`.
fn count_past(log: &Path, after: u64, limit: Duration) -> Result<u64, String> {
    let deadline = Instant::now() + limit;
    loop {
        let n = last_count(log);
        if n > after {
            return Ok(n);
        }
        if Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            return Err(format!(
                "no count past {after} on {} within {limit:?}; it ends:\n{tail}",
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The guest runs on `owner` only, and the two agentds and pdisk say so.
fn runs_only_on(h: &TwoHosts, uuid: &str, owner: usize) -> Result<pb::Vm, String> {
    let other = 1 - owner;
    let mine = h.vms(owner);
    let theirs = h.vms(other);
    let summary = |v: &[pb::Vm]| {
        v.iter()
            .map(|v| format!("{} {:?} pid {}", v.name, v.state(), v.pid))
            .collect::<Vec<_>>()
    };
    let [listed] = &mine[..] else {
        return Err(format!("host {owner} lists {:?}", summary(&mine)));
    };
    if !theirs.is_empty() {
        return Err(format!("host {other} lists {:?}", summary(&theirs)));
    }
    if listed.uuid != uuid || listed.state() != pb::VmState::Running {
        return Err(format!(
            "host {owner} lists {:?} ({})",
            summary(&mine),
            listed.state_reason
        ));
    }
    let got = h.get(owner).map_err(|s| format!("GetVm on {owner}: {s}"))?;
    if got.state() != listed.state() || got.pid != listed.pid || got.uuid != listed.uuid {
        return Err(format!(
            "GetVm on {owner} says {:?} pid {}, ListVms {:?} pid {}",
            got.state(),
            got.pid,
            listed.state(),
            listed.pid
        ));
    }
    match h.get(other) {
        Err(s) if s.code() == tonic::Code::NotFound => {}
        r => return Err(format!("GetVm on {other}: {r:?}")),
    }
    let live = qemus_of(uuid);
    if live != vec![got.pid] {
        return Err(format!(
            "QEMUs of the guest {live:?}, host {owner} records pid {}",
            got.pid
        ));
    }
    if !h.hosts[owner].guest_pids().contains(&got.pid) {
        return Err(format!("pid {} is not host {owner}'s guest", got.pid));
    }
    let dirs = h.guest_dirs(other);
    if !dirs.is_empty() {
        return Err(format!("host {other} keeps guest directories {dirs:?}"));
    }
    let wanted: Vec<String> = got.nics.iter().map(|n| n.tap.clone()).collect();
    let taps = h.taps(owner);
    if taps != wanted {
        return Err(format!("host {owner} has taps {taps:?}, wants {wanted:?}"));
    }
    let taps = h.taps(other);
    if !taps.is_empty() {
        return Err(format!("host {other} keeps taps {taps:?}"));
    }
    let acl = h.export_initiators(VOLUME);
    if acl != vec![IQN[owner].to_string()] {
        return Err(format!(
            "export of {VOLUME} for {acl:?}, only host {owner}'s wanted"
        ));
    }
    Ok(got)
}

/// Host `i`'s events about the guest after `since`, and a check that its
/// journal's seqs are 1..n.
fn guest_events(h: &TwoHosts, i: usize, since: u64) -> Vec<pb::Event> {
    let all = h.events(i);
    for (n, e) in all.iter().enumerate() {
        assert_eq!(e.seq, n as u64 + 1, "host {i}: seqs not continuous");
    }
    all.into_iter()
        .filter(|e| e.seq > since && e.vm_name == NAME)
        .collect()
}

fn last_seq(h: &TwoHosts, i: usize) -> u64 {
    h.events(i).last().map_or(0, |e| e.seq)
}

fn describe(events: &[pb::Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{:?}/{:?}: {}", e.r#type(), e.cause(), e.detail))
        .collect()
}

/// Creates the test guest (its pdisk volume too) on host 0 and starts it.
fn start_guest(h: &TwoHosts) -> pb::Vm {
    let (url, volume) = (h.pdiskd.url(), VOLUME.to_string());
    h.ns[0].block_on(move || async move {
        let mut c = VolumeServiceClient::new(channel(&url).await);
        c.create_volume(pdpb::CreateVolumeRequest {
            name: volume,
            size_bytes: 8 << 20,
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let g: PathBuf = guest_dir();
    let spec = pb::VmSpec {
        name: NAME.into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        disks: vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::PdiskVolume(VOLUME.into())),
            ..Default::default()
        }],
        nics: vec![pb::NicSpec {
            bridge: BRIDGE.into(),
            ..Default::default()
        }],
        kernel: Some(pb::KernelBoot {
            kernel: g.join("vmlinuz").display().to_string(),
            initrd: g.join("initrd.img").display().to_string(),
            cmdline: "console=ttyS0 stratus.count=1".into(),
        }),
        ..Default::default()
    };
    h.on(0, move |mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            spec: Some(spec),
            ..Default::default()
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            vm: NAME.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    })
}

#[test]
#[ignore = "needs root, QEMU, tgt, the test guest and agentd-failpoints: run by scripts/test"]
fn agentd_killed_at_every_migration_step_leaves_the_guest_on_exactly_one_host() {
    let started = Instant::now();
    let mut h = two_hosts(&[]);
    let vm = start_guest(&h);
    let uuid = vm.uuid.clone();
    let mut count = count_past(Path::new(&vm.console_log), 2, Duration::from_secs(240)).unwrap();
    let booted = started.elapsed();
    let mut owner = 0;
    let mut pairs = 0;
    let mut moves = 0;
    for (group, points) in MIGRATION_POINTS {
        for point in points.iter().copied() {
            let source = owner;
            let destination = 1 - owner;
            let armed = if *group == "migrate_out" {
                source
            } else {
                destination
            };
            let since = [last_seq(&h, 0), last_seq(&h, 1)];
            h.hosts[armed].restart_with_failpoints(Some(&format!("{point}=return")));
            let to = h.url(destination);
            let answer = h.on(source, move |mut c| async move {
                c.migrate_vm(pb::MigrateVmRequest {
                    vm: NAME.into(),
                    destination: to,
                    ..Default::default()
                })
                .await
            });
            let status = h.hosts[armed].wait_exit(Duration::from_secs(120));
            assert_eq!(
                status.and_then(|s| s.code()),
                Some(CRASH_EXIT_CODE),
                "{point}: host {armed}'s agentd did not die there (MigrateVm: {answer:?})"
            );
            // The guest moved once QEMU completed (the source journaled
            // it: migrate.completed) or the destination's QEMU resumed it
            // (incoming.resumed): it is the destination's from then on.
            let moved = matches!(point, "migrate.completed" | "incoming.resumed");
            // The source may answer a move the destination's agentd did
            // not see to its end; never a failure as a success.
            assert!(
                moved || answer.is_err(),
                "{point}: MigrateVm answered {answer:?}"
            );
            pairs += 1;
            h.hosts[armed].restart_with_failpoints(None);

            let expected = if moved { destination } else { source };
            let deadline = Instant::now() + SETTLE;
            let vm = loop {
                match runs_only_on(&h, &uuid, expected) {
                    Ok(vm) => break vm,
                    Err(e) if Instant::now() > deadline => {
                        panic!(
                            "{point} (host {armed} killed, {source} -> {destination}): {e}\n\
                             events of {source}: {:#?}\nevents of {destination}: {:#?}",
                            describe(&guest_events(&h, source, since[source])),
                            describe(&guest_events(&h, destination, since[destination]))
                        )
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(500)),
                }
            };
            // The same boot goes on counting on the owner's console.
            let log = PathBuf::from(&vm.console_log);
            count = count_past(&log, count, Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("{point}: the guest does not run on: {e}"));
            let text = std::fs::read_to_string(&log).unwrap();
            if moved {
                assert!(
                    !text.contains("STRATUS-GUEST init"),
                    "{point}: the guest booted again on host {expected}:\n{text}"
                );
            }

            // The events: the restarted agentd says what its
            // reconciliation decided, the other side agrees.
            let outcome = if moved {
                pb::EventType::Migrated
            } else {
                pb::EventType::MigrationFailed
            };
            // A destination's own reconciliation, or the source's
            // AbortIncoming if it reaches the restarted destination first
            // (cause api): either says it. Not the monitor's word for an
            // exit an undo caused (that lost the undo's reason once).
            let of_armed = guest_events(&h, armed, since[armed]);
            let said = |e: &&pb::Event| {
                e.r#type() == outcome
                    && (e.cause() == pb::EventCause::Reconciliation
                        || (armed == destination
                            && e.cause() == pb::EventCause::Api
                            && !e.detail.starts_with("the incoming QEMU ended")))
            };
            assert!(
                of_armed.iter().any(|e| said(&e)),
                "{point}: host {armed} journaled no {outcome:?} after its restart: {:#?}",
                describe(&of_armed)
            );
            let other = 1 - armed;
            let of_other = guest_events(&h, other, since[other]);
            let last =
                of_other.iter().rev().map(|e| e.r#type()).find(|t| {
                    matches!(t, pb::EventType::Migrated | pb::EventType::MigrationFailed)
                });
            // A destination that never heard of the guest says nothing.
            let silent = point == "migrate.intent";
            if silent {
                assert_eq!(
                    last,
                    None,
                    "{point}: host {other}: {:#?}",
                    describe(&of_other)
                );
            } else {
                assert_eq!(
                    last,
                    Some(outcome),
                    "{point}: host {other}: {:#?}",
                    describe(&of_other)
                );
            }
            let kinds = |ev: &[pb::Event]| {
                ev.iter()
                    .map(|e| format!("{:?}/{:?}", e.r#type(), e.cause()))
                    .collect::<Vec<_>>()
            };
            eprintln!(
                "{point}: host {armed} killed; the guest runs on host {expected} only ({:.0?}); \
                 events of host {armed}: {:?}; of host {other}: {:?}",
                started.elapsed(),
                kinds(&of_armed),
                kinds(&of_other)
            );
            if moved {
                moves += 1;
                owner = destination;
            }
        }
    }
    let total: usize = MIGRATION_POINTS.iter().map(|(_, p)| p.len()).sum();
    assert_eq!(pairs, total);

    // The owner really owns it: it stops, and nothing is left anywhere.
    let stopped = h.on(owner, |mut c| async move {
        c.stop_vm(pb::StopVmRequest {
            vm: NAME.into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(stopped.state(), pb::VmState::Stopped);
    assert!(qemus_of(&uuid).is_empty());
    assert!(h.export_initiators(VOLUME).is_empty());
    assert!(h.taps(0).is_empty() && h.taps(1).is_empty());
    eprintln!(
        "migration fault walk: {pairs} (side, crash point) pairs, {moves} moved, \
         0 violations, boot {booted:.0?}, total {:.0?}",
        started.elapsed()
    );
}

/// What the kill test's migrations may send per second: the guest's ~100 MiB
/// then take ~12 s, so a kill after the first MIGRATION_PROGRESS (2 s in)
/// lands mid-migration every time.
const SLOW: &str = "--migration-max-bandwidth=8M";

/// Waits until host `source` journals MIGRATION_PROGRESS after `since` for a
/// migration still under way (`call` unanswered).
fn mid_migration<T>(h: &TwoHosts, source: usize, since: u64, call: &std::thread::JoinHandle<T>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let progress = guest_events(h, source, since)
            .into_iter()
            .any(|e| e.r#type() == pb::EventType::MigrationProgress && e.bytes > 0);
        assert!(
            !call.is_finished(),
            "the migration ended before the kill (progress seen: {progress}): slow it down ({SLOW})"
        );
        if progress {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no MIGRATION_PROGRESS within 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sigkill(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -KILL {pid}");
}

/// Waits up to [`SETTLE`] for `check` to pass; panics with its last word
/// and both journals since `since`.
fn settle<T>(
    h: &TwoHosts,
    what: &str,
    since: [u64; 2],
    check: impl Fn() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + SETTLE;
    loop {
        match check() {
            Ok(t) => return t,
            Err(e) if Instant::now() > deadline => panic!(
                "{what}: {e}\nevents of host 0: {:#?}\nevents of host 1: {:#?}",
                describe(&guest_events(h, 0, since[0])),
                describe(&guest_events(h, 1, since[1]))
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The guest is recorded on `owner` only, CRASHED, and nothing of it runs
/// or is held anywhere (QEMU, taps, exports, the other side's record and
/// directory).
fn crashed_only_on(h: &TwoHosts, uuid: &str, owner: usize) -> Result<pb::Vm, String> {
    let other = 1 - owner;
    let mine = h.vms(owner);
    let [listed] = &mine[..] else {
        return Err(format!("host {owner} lists {} guests", mine.len()));
    };
    if listed.uuid != uuid || listed.state() != pb::VmState::Crashed {
        return Err(format!(
            "host {owner} lists {} {:?} ({})",
            listed.name,
            listed.state(),
            listed.state_reason
        ));
    }
    let got = h.get(owner).map_err(|s| format!("GetVm on {owner}: {s}"))?;
    if got.state() != pb::VmState::Crashed {
        return Err(format!("GetVm on {owner} says {:?}", got.state()));
    }
    if !h.vms(other).is_empty() || h.get(other).is_ok() {
        return Err(format!("host {other} still has a guest"));
    }
    let live = qemus_of(uuid);
    if !live.is_empty() {
        return Err(format!("QEMUs of the guest still run: {live:?}"));
    }
    let dirs = h.guest_dirs(other);
    if !dirs.is_empty() {
        return Err(format!("host {other} keeps guest directories {dirs:?}"));
    }
    for i in [0, 1] {
        let taps = h.taps(i);
        if !taps.is_empty() {
            return Err(format!("host {i} keeps taps {taps:?}"));
        }
    }
    let acl = h.export_initiators(VOLUME);
    if !acl.is_empty() {
        return Err(format!("{VOLUME} still exported to {acl:?}"));
    }
    Ok(got)
}

/// The last MIGRATED/MIGRATION_FAILED of `events`.
fn last_outcome(events: &[pb::Event]) -> Option<pb::EventType> {
    events
        .iter()
        .rev()
        .map(|e| e.r#type())
        .find(|t| matches!(t, pb::EventType::Migrated | pb::EventType::MigrationFailed))
}

#[test]
#[ignore = "needs root, QEMU, tgt, the test guest and agentd-failpoints: run by scripts/test"]
fn qemu_or_both_agentds_killed_mid_migration_leave_the_guest_on_one_host() {
    let started = Instant::now();
    let mut h = two_hosts(&[SLOW]);
    let vm = start_guest(&h);
    let uuid = vm.uuid.clone();
    let mut count = count_past(Path::new(&vm.console_log), 2, Duration::from_secs(240)).unwrap();
    let mut owner = 0;
    let kills = [
        "incoming QEMU",
        "both agentds (source restarted first)",
        "both agentds (destination restarted first)",
        "source QEMU",
    ];
    for kill in kills {
        let (source, destination) = (owner, 1 - owner);
        let since = [last_seq(&h, 0), last_seq(&h, 1)];
        let from = Instant::now();
        let call = h.migrate(source);
        mid_migration(&h, source, since[source], &call);
        match kill {
            "incoming QEMU" => {
                let theirs = h.hosts[destination].guest_pids();
                let pids: Vec<u32> = qemus_of(&uuid)
                    .into_iter()
                    .filter(|p| theirs.contains(p))
                    .collect();
                let [pid] = pids[..] else {
                    panic!("host {destination}'s incoming QEMUs: {pids:?}");
                };
                sigkill(pid);
            }
            _ if kill.starts_with("both agentds") => {
                h.hosts[0].kill9();
                h.hosts[1].kill9();
                // QEMU's migration goes on alone up to the switchover,
                // which waits for the source's agentd.
                std::thread::sleep(Duration::from_secs(2));
            }
            _ => sigkill(h.get(source).unwrap().pid),
        }
        let answer = call.join().unwrap();
        assert!(answer.is_err(), "{kill}: MigrateVm answered {answer:?}");
        // The source first: its AbortIncoming finds the destination down.
        // The destination first: it finds its QEMU receiving and follows it
        // until the source's reconciliation cancels the migration.
        if kill.starts_with("both agentds (source") {
            h.hosts[source].restart();
            h.hosts[destination].restart();
        } else if kill.starts_with("both agentds (destination") {
            h.hosts[destination].restart();
            h.hosts[source].restart();
        }
        let what = format!("{kill} killed, {source} -> {destination}");
        let runs = kill != "source QEMU";
        if runs {
            let vm = settle(&h, &what, since, || runs_only_on(&h, &uuid, source));
            count = count_past(Path::new(&vm.console_log), count, Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("{what}: the guest does not run on: {e}"));
        } else {
            settle(&h, &what, since, || crashed_only_on(&h, &uuid, source));
        }
        // Both sides say the migration failed; the source says why.
        let of_source = guest_events(&h, source, since[source]);
        let of_destination = guest_events(&h, destination, since[destination]);
        for (i, ev) in [(source, &of_source), (destination, &of_destination)] {
            assert_eq!(
                last_outcome(ev),
                Some(pb::EventType::MigrationFailed),
                "{what}: host {i}: {:#?}",
                describe(ev)
            );
        }
        if !runs {
            assert!(
                of_source
                    .iter()
                    .any(|e| e.r#type() == pb::EventType::Crashed),
                "{what}: host {source}: {:#?}",
                describe(&of_source)
            );
        }
        let kinds = |ev: &[pb::Event]| {
            ev.iter()
                .map(|e| format!("{:?}/{:?}", e.r#type(), e.cause()))
                .filter(|k| !k.starts_with("MigrationProgress"))
                .collect::<Vec<_>>()
        };
        eprintln!(
            "{what}: settled in {:.0?}; events of host {source}: {:?}; of host {destination}: {:?}",
            from.elapsed(),
            kinds(&of_source),
            kinds(&of_destination)
        );

        // A retry succeeds (the crashed guest started again first).
        if !runs {
            let vm = h.on(source, |mut c| async move {
                c.start_vm(pb::VmRequest {
                    vm: NAME.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
            });
            count = count_past(Path::new(&vm.console_log), 0, Duration::from_secs(240)).unwrap();
        }
        let retry = h.migrate(source).join().unwrap();
        assert!(retry.is_ok(), "{what}: the retry: {retry:?}");
        let vm = settle(&h, &what, since, || runs_only_on(&h, &uuid, destination));
        count = count_past(Path::new(&vm.console_log), count, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{what}: the guest does not run on after the retry: {e}"));
        owner = destination;
    }
    let stopped = h.on(owner, |mut c| async move {
        c.stop_vm(pb::StopVmRequest {
            vm: NAME.into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(stopped.state(), pb::VmState::Stopped);
    assert!(qemus_of(&uuid).is_empty());
    eprintln!(
        "migration kill walk: {} kills, {} retries, 0 violations, {:.0?} in all",
        kills.len(),
        kills.len(),
        started.elapsed()
    );
}
