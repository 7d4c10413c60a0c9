//! Scenario: what confining a guest costs at launch (issue 12), and where
//! agentd's CPU per launch goes.
//!
//! The launch scenario's guest (1 vCPU, 128 MiB, TCG, the test guest as a
//! pdisk clone over iSCSI, no NICs, image cached in agentd and in pdisk)
//! launched by an agentd that confines it (its own uid from the pool, the
//! full seccomp sandbox, only descriptors agentd opened, its own cgroup:
//! the default) against one started with `--allow-unsandboxed` (QEMU as
//! root, no sandbox, no uid). The machine is shared and loaded, so the two
//! are measured in pairs: each pair launches one guest of each mode back
//! to back (agentd restarted with or without the flag before each launch),
//! the mode that goes first alternating from pair to pair; in full mode an
//! untimed pair goes first. The figure that holds under load is the median
//! of the pairs' ratios; the p50 and p90 of each mode go with it.
//! (The per-guest uid cannot be switched off on its own: without the pool
//! QEMU runs as one shared account, `--qemu-user`, confined all the same.)
//!
//! Each launch is timed from just before CreateVm to StartVm's answer
//! (RUNNING: QEMU runs the guest), and agentd's CPU time (its threads' run
//! times, see `guests::ProcUsage`) is read before CreateVm, after it, and
//! after StartVm, so the CPU splits into CreateVm (the record, the journal)
//! and StartVm (clone, export, attach, the guest's files, QEMU's start and
//! QMP). The guest is then stopped by force and destroyed, not booted: the
//! boot is the launch scenario's, and does not depend on confinement.
//!
//! Figures, confined against unconfined: API call → RUNNING, the median of
//! the pairs' ratios, p50 and p90; agentd CPU per launch p50, and its
//! CreateVm and StartVm parts.

use std::time::Instant;

use anyhow::Context as _;
use stratus_proto::agent::v1 as pb;

use super::guests::{self, Agent, GuestHost, Image};
use super::Ctx;
use crate::report::{percentile, Figure};

const SCENARIO: &str = "launch confinement";
/// Pairs of launches in full mode: ~1.5 s each here. With the machine's
/// other users the ratio of one pair ranges from 0.3 to 1.8, so a figure
/// needs many pairs (the median of 40 still moved by 0.2 between runs at a
/// load of 11 on 2 cores).
const PAIRS: usize = 40;

/// One launch's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Launch {
    /// API call → RUNNING, ms.
    running_ms: f64,
    /// agentd's CPU in CreateVm and in StartVm, ms.
    create_cpu_ms: f64,
    start_cpu_ms: f64,
}

#[derive(Debug, Default)]
struct Runs {
    confined: Vec<Launch>,
    unconfined: Vec<Launch>,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let runs = if ctx.quick { 2 } else { PAIRS };
    let warmup = !ctx.quick;
    tokio::task::block_in_place(|| {
        let mut host = GuestHost::start();
        let image = host.image.clone();
        let img = image.clone();
        host.run(move |url| async move {
            let mut c = guests::connect(&url).await?;
            pull(&mut c, &img).await
        })
        .with_context(|| host.agentd_log_tail())?;
        let runs =
            measure(&mut host, &image, runs, warmup).with_context(|| host.agentd_log_tail())?;
        Ok(figures(&runs))
    })
}

/// Caches the image in agentd and in pdisk, so every launch is a clone,
/// an export and a QEMU.
async fn pull(c: &mut Agent, image: &Image) -> anyhow::Result<()> {
    c.pull_image(pb::PullImageRequest {
        server: String::new(),
        request_id: String::new(),
        image: Some(pb::ImageRef {
            url: image.url.clone(),
            sha256: image.sha256.clone(),
            format: 0,
            endorser: String::new(),
            endorsement: String::new(),
        }),
        to_pdisk: true,
    })
    .await
    .context("PullImage")?;
    Ok(())
}

fn measure(host: &mut GuestHost, image: &Image, runs: usize, warmup: bool) -> anyhow::Result<Runs> {
    let mut out = Runs::default();
    for i in 0..runs + usize::from(warmup) {
        let counted = !warmup || i > 0;
        // Which mode goes first alternates, so neither always follows
        // the other's teardown.
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for confined in order {
            host.agentd
                .restart_with_flag("--allow-unsandboxed", !confined);
            let pid = host.agentd.pid();
            let kind = if confined { "confined" } else { "unconfined" };
            let name = format!("confine-{kind}-{i}");
            let image = image.clone();
            let l = host.run(move |url| async move {
                let mut c = guests::connect(&url).await?;
                // A first call, so the connection's set-up is not counted.
                c.list_vms(pb::ListVmsRequest::default())
                    .await
                    .context("ListVms")?;
                launch(&mut c, pid, &name, &image).await
            })?;
            eprintln!(
                "  {kind} {i}{}: RUNNING {:.0} ms, agentd CPU {:.1} ms (CreateVm {:.1}, StartVm {:.1})",
                if counted { "" } else { " (warm-up)" },
                l.running_ms,
                l.create_cpu_ms + l.start_cpu_ms,
                l.create_cpu_ms,
                l.start_cpu_ms
            );
            if counted {
                if confined {
                    out.confined.push(l);
                } else {
                    out.unconfined.push(l);
                }
            }
        }
    }
    Ok(out)
}

/// CreateVm + StartVm, timed, with agentd's CPU read around each; then the
/// guest is stopped by force and destroyed.
async fn launch(c: &mut Agent, agentd: u32, name: &str, image: &Image) -> anyhow::Result<Launch> {
    let cpu0 = guests::proc_usage(agentd)?;
    let t0 = Instant::now();
    c.create_vm(pb::CreateVmRequest {
        request_id: String::new(),
        project: String::new(),
        spec: Some(guests::image_spec(name, image)),
    })
    .await
    .with_context(|| format!("CreateVm {name}"))?;
    let cpu1 = guests::proc_usage(agentd)?;
    let vm = c
        .start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: name.into(),
        })
        .await
        .with_context(|| format!("StartVm {name}"))?
        .into_inner();
    let running = t0.elapsed();
    let cpu2 = guests::proc_usage(agentd)?;
    anyhow::ensure!(
        vm.state() == pb::VmState::Running,
        "{name}: StartVm answered {:?}",
        vm.state()
    );
    c.stop_vm(pb::StopVmRequest {
        vm: name.into(),
        force: true,
        ..Default::default()
    })
    .await
    .with_context(|| format!("StopVm {name}"))?;
    guests::destroy(c, name, 10).await?;
    Ok(Launch {
        running_ms: guests::ms(running),
        create_cpu_ms: cpu1.cpu_since(&cpu0) * 1e3,
        start_cpu_ms: cpu2.cpu_since(&cpu1) * 1e3,
    })
}

fn figures(r: &Runs) -> Vec<Figure> {
    let running = |v: &[Launch]| v.iter().map(|l| l.running_ms).collect::<Vec<f64>>();
    let (confined, unconfined) = (running(&r.confined), running(&r.unconfined));
    // Pair i is confined[i] and unconfined[i]: launched back to back.
    let ratios: Vec<f64> = confined
        .iter()
        .zip(&unconfined)
        .map(|(c, u)| c / u)
        .collect();
    let mut out = vec![Figure::new(
        SCENARIO,
        "API call → RUNNING, confined / --allow-unsandboxed, median of pairs",
        "x",
        percentile(&ratios, 50.0),
    )
    .with_samples(ratios)];
    type Pick = fn(&Launch) -> f64;
    let measures: [(&str, &str, Pick, &[f64]); 4] = [
        ("API call → RUNNING", "ms", |l| l.running_ms, &[50.0, 90.0]),
        (
            "agentd CPU per launch (CreateVm + StartVm)",
            "ms",
            |l| l.create_cpu_ms + l.start_cpu_ms,
            &[50.0],
        ),
        ("agentd CPU in CreateVm", "ms", |l| l.create_cpu_ms, &[50.0]),
        ("agentd CPU in StartVm", "ms", |l| l.start_cpu_ms, &[50.0]),
    ];
    for (what, unit, pick, ps) in measures {
        let confined: Vec<f64> = r.confined.iter().map(pick).collect();
        let unconfined: Vec<f64> = r.unconfined.iter().map(pick).collect();
        for &p in ps {
            out.push(
                Figure::new(
                    SCENARIO,
                    &format!("{what} p{p} (confined)"),
                    unit,
                    percentile(&confined, p),
                )
                .against(
                    &format!("{what} p{p} (--allow-unsandboxed)"),
                    percentile(&unconfined, p),
                )
                .with_samples(confined.clone())
                .with_peer_samples(unconfined.clone()),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confined_launches_are_compared_with_unconfined_ones() {
        let l = |running_ms: f64, create_cpu_ms: f64, start_cpu_ms: f64| Launch {
            running_ms,
            create_cpu_ms,
            start_cpu_ms,
        };
        let r = Runs {
            confined: vec![l(440.0, 1.0, 9.0), l(600.0, 1.0, 11.0), l(300.0, 1.0, 9.0)],
            unconfined: vec![l(400.0, 1.0, 7.0), l(500.0, 1.0, 9.0), l(310.0, 1.0, 9.0)],
        };
        let f = figures(&r);
        assert_eq!(f.len(), 6);
        // Pairs 1.1, 1.2 and 0.97: the median pair, not p50 / p50.
        assert_eq!(f[0].unit, "x");
        assert_eq!(f[0].value, 1.1);
        assert_eq!(f[0].samples.len(), 3);
        assert_eq!(f[1].name, "API call → RUNNING p50 (confined)");
        assert_eq!(
            f[1].peer.as_deref(),
            Some("API call → RUNNING p50 (--allow-unsandboxed)")
        );
        assert_eq!((f[1].value, f[1].peer_value), (440.0, Some(400.0)));
        assert_eq!(f[2].name, "API call → RUNNING p90 (confined)");
        assert_eq!((f[2].value, f[2].peer_value), (600.0, Some(500.0)));
        // CPU per launch is CreateVm's plus StartVm's.
        assert_eq!((f[3].value, f[3].peer_value), (10.0, Some(10.0)));
        assert_eq!(f[5].name, "agentd CPU in StartVm p50 (confined)");
        assert_eq!((f[5].value, f[5].peer_value), (9.0, Some(9.0)));
    }
}
