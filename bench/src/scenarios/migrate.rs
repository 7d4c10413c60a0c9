//! Scenario: live migration (issue 15), over TLS against plain TCP.
//!
//! Two "hosts" as testkit's `TwoHosts` builds them: two network
//! namespaces joined by a veth pair, each with its bridge and agentd (A
//! 10.231.0.1, B 10.231.0.2), one pdiskd/tgtd on A reached by both. The
//! test guest (1 vCPU, 128 MiB, TCG, kernel boot, a pdisk root disk, one
//! NIC, counting on its console) boots on A and then moves A → B → A, once
//! per mode and round: both agentds restarted with or without
//! `--migration-insecure` before each mode's pair of migrations, the mode
//! that goes first alternating. Each migration's MigrateVm answer gives
//! the figures: the call's total time, QEMU's own time, the guest's
//! downtime and the bytes sent. TLS is compared with plain TCP, medians.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use stratus_proto::agent::v1 as pb;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::*;

use super::Ctx;
use crate::report::{percentile, Figure};

const SCENARIO: &str = "live migration";
const BRIDGE: &str = "stbr0";
/// Rounds in full mode (each: A → B → A over TLS and over plain TCP).
const ROUNDS: usize = 4;

/// One migration's answer.
#[derive(Debug, Clone, Copy)]
struct Moved {
    total_ms: f64,
    qemu_ms: f64,
    downtime_ms: f64,
    mib: f64,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let rounds = if ctx.quick { 1 } else { ROUNDS };
    tokio::task::block_in_place(|| measure(rounds))
}

fn measure(rounds: usize) -> anyhow::Result<Vec<Figure>> {
    require_root();
    let mut h = TwoHosts::start(BRIDGE, 1024, [&[], &[]], [&[], &[]]);
    let g: PathBuf = guest_dir();
    let import = h.pdiskd.import_dir.join("stratus-guest.raw");
    std::fs::copy(g.join("stratus-guest.raw"), &import).context("the test guest's disk")?;
    let (url, path) = (h.pdiskd.url(), import.display().to_string());
    h.ns[0].block_on(move || async move {
        let mut c = VolumeServiceClient::new(channel(&url).await);
        c.create_volume(pdpb::CreateVolumeRequest {
            name: "bench-mig-root".into(),
            source: Some(pdpb::create_volume_request::Source::FromImage(
                pdpb::ImageSource {
                    path,
                    format: pdpb::ImageFormat::Raw as i32,
                },
            )),
            ..Default::default()
        })
        .await
    })?;
    let spec = pb::VmSpec {
        name: "bench-mover".into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        disks: vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::PdiskVolume("bench-mig-root".into())),
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
    let vm = h.on(0, move |mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            spec: Some(spec),
            ..Default::default()
        })
        .await?;
        c.start_vm(pb::VmRequest {
            vm: "bench-mover".into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
    })?;
    wait_console(
        Path::new(&vm.console_log),
        "STRATUS-GUEST count 3 ",
        Duration::from_secs(240),
    );
    let (mut tls, mut plain) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for over_tls in order {
            for a in &mut h.hosts {
                a.restart_with_flag("--migration-insecure", !over_tls);
            }
            for (from, to) in [(0, 1), (1, 0)] {
                let m = migrate(&h, from, to)?;
                anyhow::ensure!(m.tls == over_tls, "asked tls={over_tls}, got {m:?}");
                let moved = Moved {
                    total_ms: m.total_ms as f64,
                    qemu_ms: m.qemu_total_ms as f64,
                    downtime_ms: m.downtime_ms as f64,
                    mib: m.transferred_bytes as f64 / f64::from(1 << 20),
                };
                eprintln!(
                    "  round {round} {} {from}→{to}: total {:.0} ms, QEMU {:.0} ms, downtime {:.0} ms, {:.1} MiB",
                    if over_tls { "TLS" } else { "plain" },
                    moved.total_ms,
                    moved.qemu_ms,
                    moved.downtime_ms,
                    moved.mib
                );
                if over_tls {
                    tls.push(moved);
                } else {
                    plain.push(moved);
                }
            }
        }
    }
    h.on(0, |mut c| async move {
        c.stop_vm(pb::StopVmRequest {
            vm: "bench-mover".into(),
            force: true,
            ..Default::default()
        })
        .await
    })?;
    Ok(figures(&tls, &plain))
}

fn migrate(h: &TwoHosts, from: usize, to: usize) -> anyhow::Result<pb::MigrateVmResponse> {
    let destination = h.url(to);
    h.on(from, move |mut c| async move {
        c.migrate_vm(pb::MigrateVmRequest {
            vm: "bench-mover".into(),
            destination,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
    })
    .with_context(|| format!("MigrateVm host {from} → host {to}"))
}

fn figures(tls: &[Moved], plain: &[Moved]) -> Vec<Figure> {
    type Pick = fn(&Moved) -> f64;
    let measures: [(&str, &str, Pick); 4] = [
        ("MigrateVm total, p50", "ms", |m| m.total_ms),
        ("QEMU's migration time, p50", "ms", |m| m.qemu_ms),
        ("guest downtime, p50", "ms", |m| m.downtime_ms),
        ("bytes sent, p50", "MiB", |m| m.mib),
    ];
    measures
        .into_iter()
        .map(|(what, unit, pick)| {
            let t: Vec<f64> = tls.iter().map(pick).collect();
            let p: Vec<f64> = plain.iter().map(pick).collect();
            Figure::new(
                SCENARIO,
                &format!("{what} (TLS)"),
                unit,
                percentile(&t, 50.0),
            )
            .against(&format!("{what} (plain TCP)"), percentile(&p, 50.0))
            .with_samples(t)
            .with_peer_samples(p)
        })
        .collect()
}
