//! QEMU's side of the data path (issue 16): the levers of QEMU's own block
//! layer that agentd chooses per disk, measured in the data path run
//! beside the tgt levers, on the goals' four cases, interleaved with the
//! other subjects.
//!
//! - Files (a `file:` disk, an overlay, a same-host attachment on a file
//!   pool): `aio=io_uring`, `native` and `threads`, all with O_DIRECT
//!   (`cache=none`), and `cache=writeback` (the host page cache,
//!   `cache.direct=off`) with `threads` and with `io_uring`, each against
//!   the local file opened with agentd's default (the `local(AIO)`
//!   subject). The lever equal to that default measures the noise: two
//!   identical paths, one run.
//! - Host devices (a kernel-attached iSCSI LUN, a same-host attachment on
//!   an LV): the same volume file behind a loop device of its own with
//!   direct I/O, opened with QEMU's `host_device` driver, `io_uring`,
//!   `native` and `threads`, O_DIRECT, against agentd's default for
//!   devices (the `dev(AIO)` subject).
//! - QEMU's iSCSI initiator (libiscsi) has neither lever: it does its own
//!   socket I/O and has no host page cache to bypass.
//!
//! Every flushed case also counts the cache flushes the pool's block
//! device received during the run (`/sys/block/DEV/stat`, flush requests
//! completed) per flush the client sent: a path on which a guest's fsync
//! is durable sends at least one. `cache=writeback` must keep that (QEMU
//! turns a guest flush into fdatasync); tgt's `aio` store does not.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{goals, peer_of, run_ok, Measured, Subject, Target};
use crate::report::Figure;

/// The file levers (name, aio, O_DIRECT), against the local file opened
/// as agentd does.
const FILE_LEVERS: [(&str, &str, bool); 5] = [
    ("file-io_uring", "io_uring", true),
    ("file-native", "native", true),
    ("file-threads", "threads", true),
    ("file-writeback-threads", "threads", false),
    ("file-writeback-io_uring", "io_uring", false),
];

/// The host device levers (aio), O_DIRECT.
const DEVICE_AIO: [&str; 3] = ["io_uring", "native", "threads"];

/// QEMU's `--image-opts` for a raw volume at `path`.
pub(super) fn opts(driver: &str, path: &Path, aio: &str, direct: bool) -> String {
    let direct = if direct { "on" } else { "off" };
    format!(
        "driver=raw,file.driver={driver},file.filename={},file.aio={aio},file.cache.direct={direct}",
        path.display()
    )
}

/// A loop device over the volume file with direct I/O (no page cache of
/// the file below it), standing in for a host block device. Detached when
/// dropped.
pub(super) struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    pub(super) fn attach(file: &Path) -> anyhow::Result<LoopDevice> {
        let file = file.to_str().context("volume path is not UTF-8")?;
        let dev = run_ok(
            "losetup",
            &[
                "--find",
                "--show",
                "--direct-io=on",
                "--sector-size=512",
                file,
            ],
        )?;
        Ok(LoopDevice {
            path: PathBuf::from(dev.trim()),
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .status();
    }
}

/// The lever subjects: files on `volume`, host devices on `device`, the
/// one with agentd's default `aio` for devices named `dev(AIO)` (the peer
/// of the others).
pub(super) fn subjects(volume: &Path, device: Option<(&Path, &str)>) -> Vec<Subject> {
    let mut out: Vec<Subject> = FILE_LEVERS
        .iter()
        .map(|(name, aio, direct)| Subject {
            name: (*name).into(),
            target: Target::Opts(opts("file", volume, aio, *direct)),
            cases: goals(),
            tgtd: None,
        })
        .collect();
    if let Some((dev, default)) = device {
        out.extend(DEVICE_AIO.iter().map(|aio| Subject {
            name: if *aio == default {
                format!("dev({aio})")
            } else {
                format!("dev-{aio}")
            },
            target: Target::Opts(opts("host_device", dev, aio, true)),
            cases: goals(),
            tgtd: None,
        }));
    }
    out
}

/// What a lever subject is, in a figure's name.
fn what(name: &str) -> String {
    let dev = name
        .strip_prefix("dev-")
        .or_else(|| name.strip_prefix("dev(")?.strip_suffix(')'));
    match dev {
        Some(aio) => format!("host device aio={aio} cache=none"),
        None => {
            let (_, aio, direct) = FILE_LEVERS
                .iter()
                .find(|l| l.0 == name)
                .expect("a file lever");
            let cache = if *direct { "none" } else { "writeback" };
            format!("file aio={aio} cache={cache}")
        }
    }
}

/// The lever figures (throughput and CPU per GiB, each against its
/// group's peer) and, for every subject of the run, the device flushes per
/// client flush of the flushed cases.
pub(super) fn figures(
    subjects: &[Subject],
    measured: &[Vec<Measured>],
    local: &[Measured],
) -> Vec<Figure> {
    let mut figures = Vec::new();
    let name_of = |prefix: &str| subjects.iter().position(|s| s.name.starts_with(prefix));
    let local_name = name_of("local(").map(|i| subjects[i].name.clone());
    let local_name = format!(
        "{}: file, agentd's default",
        local_name.as_deref().unwrap_or("local")
    );
    let dev_peer = name_of("dev(").map(|i| (&measured[i], subjects[i].name.clone()));
    let dev_name = dev_peer
        .as_ref()
        .map(|(_, n)| format!("{n}: host device, agentd's default"));
    for (s, ms) in subjects.iter().zip(measured) {
        let (peer, peer_name) = if s.name.starts_with("file-") {
            (local, local_name.as_str())
        } else if s.name.starts_with("dev-") {
            match (&dev_peer, &dev_name) {
                (Some((p, _)), Some(n)) => (p.as_slice(), n.as_str()),
                _ => continue,
            }
        } else {
            continue;
        };
        for m in ms {
            let p = peer_of(peer, m);
            let w = what(&s.name);
            figures.push(
                m.figure(format!("QEMU lever {w}: {}", m.label()))
                    .against(peer_name, p.value),
            );
            figures.push(
                m.cpu_figure(format!("CPU per GiB, QEMU lever {w}: {}", m.label()))
                    .against(peer_name, p.cpu_per_gib * 1e3),
            );
        }
    }
    // The host device group's own peer, against the local file.
    if let Some((dev, name)) = &dev_peer {
        for m in dev.iter() {
            let p = peer_of(local, m);
            figures.push(
                m.figure(format!("QEMU lever {}: {}", what(name), m.label()))
                    .against(&local_name, p.value),
            );
        }
    }
    for (s, ms) in subjects.iter().zip(measured) {
        for m in ms {
            if let Some(f) = m.flushes_per_flush {
                figures.push(Figure::new(
                    super::SCENARIO,
                    &format!("device flushes per client flush, {}: {}", s.name, m.label()),
                    "flushes",
                    f,
                ));
            }
        }
    }
    figures
}

/// Subjects that must be durable (all but tgt's `aio` store, which
/// completes SYNCHRONIZE CACHE without syncing: the module comment of
/// `datapath`).
const NOT_DURABLE: &[&str] = &["aio"];

/// Fails when none of a client's flushes reached the pool's device on a
/// path that promises durability. Fewer device flushes than client
/// flushes is only reported: a file system may answer an fdatasync with
/// its log's own pre-flush, which the device's flush count does not show
/// (the `--quick` run of the CI once counted 1 of 2 on a local file, where
/// a loop device under qemu-img bench alone counts every one).
pub(super) fn check_durable(
    subjects: &[Subject],
    measured: &[Vec<Measured>],
) -> anyhow::Result<()> {
    for (s, ms) in subjects.iter().zip(measured) {
        for m in ms {
            match m.flushes_per_flush {
                Some(f) if f == 0.0 && !NOT_DURABLE.contains(&s.name.as_str()) => anyhow::bail!(
                    "{}: {}: no client flush reached the device: a guest's fsync \
                     would not be durable",
                    s.name,
                    m.label()
                ),
                Some(f) if f < 1.0 && !NOT_DURABLE.contains(&s.name.as_str()) => eprintln!(
                    "  {} {}: {f:.2} device flushes per client flush (some answered \
                     without a flush of their own)",
                    s.name,
                    m.label()
                ),
                Some(f) if f < 1.0 => eprintln!(
                    "  {} {}: {f:.2} device flushes per client flush (not durable, known)",
                    s.name,
                    m.label()
                ),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Cache flushes block device `dev` (e.g. `loop3`) completed so far: field
/// 16 of `/sys/block/DEV/stat` (Linux 5.5 and later); None when absent.
pub(super) fn device_flushes(dev: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/sys/block/{dev}/stat")).ok()?;
    parse_flushes(&stat)
}

fn parse_flushes(stat: &str) -> Option<u64> {
    stat.split_whitespace().nth(15)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_names() {
        let o = opts("file", Path::new("/p/v.raw"), "threads", false);
        assert_eq!(
            o,
            "driver=raw,file.driver=file,file.filename=/p/v.raw,file.aio=threads,file.cache.direct=off"
        );
        let s = subjects(
            Path::new("/p/v.raw"),
            Some((Path::new("/dev/loop9"), "io_uring")),
        );
        assert_eq!(s.len(), FILE_LEVERS.len() + DEVICE_AIO.len());
        let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"dev(io_uring)") && names.contains(&"dev-native"));
        assert_eq!(what("dev(io_uring)"), "host device aio=io_uring cache=none");
        assert!(s.iter().all(|s| s.cases.len() == 4));
        assert_eq!(
            what("file-writeback-threads"),
            "file aio=threads cache=writeback"
        );
        assert_eq!(what("dev-native"), "host device aio=native cache=none");
        assert_eq!(subjects(Path::new("/v"), None).len(), FILE_LEVERS.len());
    }

    #[test]
    fn reads_the_flush_count() {
        let stat = "  10 0 80 3 2 0 8 0 0 4 3 0 0 0 0 7 1\n";
        assert_eq!(parse_flushes(stat), Some(7));
        // A kernel before 5.5 has no flush fields.
        assert_eq!(parse_flushes("1 2 3 4 5 6 7 8 9 10 11"), None);
    }
}
