//! The data path scenario's figures from its measurements: which peer
//! each one is set against.

use super::{goals, peer_of, Measured, Subject, TGTD_DEFAULT_THREADS, THREAD_COUNTS};
use crate::report::Figure;

/// The figures: every path against the local file, every lever against
/// tgt with its own parameters (the export before issue 16), the threads
/// against the default 16; QEMU's levers (`qemu_levers`).
pub(super) fn figures(subjects: &[Subject], measured: &[Vec<Measured>]) -> Vec<Figure> {
    let by_name = |n: &str| {
        let i = subjects
            .iter()
            .position(|s| s.name == n || s.name.starts_with(&format!("{n}(")))
            .expect("subject");
        &measured[i]
    };
    let local = by_name("local");
    let tgt = by_name("tgt");
    let tuned = by_name("tuned");
    let mut figures = Vec::new();
    for m in local {
        figures.push(m.figure(format!("{} (local)", m.label())));
    }
    let paths = [
        ("same-host", "same host, local attachment"),
        ("tuned", "tgt rdwr, tuned params (pdisk default)"),
        ("tgt", "tgt rdwr, tgt's own params"),
    ];
    for (name, what) in paths {
        for m in by_name(name) {
            let l = peer_of(local, m);
            figures.push(
                m.figure(format!("{} ({what})", m.label()))
                    .against("local", l.value),
            );
        }
    }
    // What each path costs the host's CPU, on the goals' four cases.
    let cases = goals();
    let in_goals = |m: &&Measured| cases.iter().any(|(p, d)| p.label(*d) == m.label());
    for m in local.iter().filter(in_goals) {
        figures.push(m.cpu_figure(format!("CPU per GiB, {} (local)", m.label())));
    }
    for (name, what) in paths {
        for m in by_name(name).iter().filter(in_goals) {
            let l = peer_of(local, m);
            figures.push(
                m.cpu_figure(format!("CPU per GiB, {} ({what})", m.label()))
                    .against("local", l.cpu_per_gib * 1e3),
            );
        }
    }
    let levers = [
        ("tuned", "all tuned params"),
        ("pdu256k", "256 KiB data PDUs only"),
        ("noR2T", "InitialR2T=No, 256 KiB first burst only"),
        ("aio", "aio store, tgt's own params"),
    ];
    for (name, what) in levers {
        for m in by_name(name) {
            let d = peer_of(tgt, m);
            figures.push(
                m.figure(format!("lever {what}: {}", m.label()))
                    .against("tgt rdwr, tgt's own params", d.value),
            );
        }
    }
    for threads in THREAD_COUNTS {
        for m in by_name(&format!("tuned-t{threads}")) {
            let d = peer_of(tuned, m);
            figures.push(
                m.figure(format!("tuned, {threads} tgtd threads: {}", m.label()))
                    .against(
                        &format!("tuned, {TGTD_DEFAULT_THREADS} threads (default)"),
                        d.value,
                    ),
            );
        }
    }
    figures.extend(super::qemu_levers::figures(subjects, measured, local));
    figures
}
