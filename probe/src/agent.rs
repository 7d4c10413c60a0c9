//! The agentd check: the health service, the host (`GetHost`), guests that
//! need an operator, and with `--launch-test` a tiny guest created from a
//! cached image, started, seen running (or its console showing a marker),
//! then destroyed: what the federation's availability probes ask of a site.

use std::time::{Duration, Instant};

use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use tonic::transport::Channel;

use crate::verdict::{Perf, Status, Verdict};

/// What `--launch-test` launches.
#[derive(Debug, Clone)]
pub struct LaunchTest {
    pub image_url: String,
    pub image_sha256: String,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    pub memory_mib: u64,
    pub ready_marker: Option<String>,
    pub settle: Duration,
}

pub async fn check(ch: Channel, launch: Option<&LaunchTest>, health_secs: f64) -> Verdict {
    let mut c = VmServiceClient::new(ch);
    let host = match c.get_host(pb::GetHostRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(s) => return crate::refused("GetHost", &s),
    };
    let vms = match c.list_vms(pb::ListVmsRequest::default()).await {
        Ok(r) => r.into_inner().vms,
        Err(s) => return crate::refused("ListVms", &s),
    };
    let mut v = judge(&host, &vms, health_secs);
    if let Some(t) = launch {
        let (status, finding, secs) = launch_test(&mut c, t).await;
        v.add(status, finding);
        if let Some(s) = secs {
            v.perf.push(Perf::gauge("launch", s, "s"));
        }
    }
    v
}

/// The verdict on a host and its guests: CRITICAL when this host refuses
/// guests (its QEMU cannot be confined), WARNING for guests in ERROR or
/// CRASHED (they need an operator) and for destroys still retrying pdisk
/// work (an unexport or clone delete pdisk refused).
pub fn judge(host: &pb::Host, vms: &[pb::Vm], health_secs: f64) -> Verdict {
    let mut v = Verdict::new();
    if host.qemu_confinement.starts_with("guests refused") {
        v.add(Status::Critical, host.qemu_confinement.clone());
    }
    let broken: Vec<&pb::Vm> = vms
        .iter()
        .filter(|vm| matches!(vm.state(), pb::VmState::Error | pb::VmState::Crashed))
        .collect();
    if let Some(first) = broken.first() {
        v.add(
            Status::Warning,
            format!(
                "guests in error or crashed: {} (first: {} {}: {})",
                broken.len(),
                first.name,
                state_word(first.state()),
                first.state_reason
            ),
        );
    }
    // A storage host this agent cannot reach: its guests' operations fail
    // (the others' do not).
    let unreachable: Vec<&pb::PdiskServer> =
        host.pdisk_servers.iter().filter(|s| !s.reachable).collect();
    if let Some(first) = unreachable.first() {
        v.add(
            Status::Warning,
            format!(
                "pdisk servers unreachable: {} (first: {}: {})",
                unreachable
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                first.name,
                first.last_error
            ),
        );
    }
    let destroying = vms
        .iter()
        .filter(|vm| vm.state() == pb::VmState::Destroying)
        .count();
    if destroying > 0 {
        v.add(
            Status::Warning,
            format!("destroys retrying pdisk work: {destroying}"),
        );
    }
    v.add(
        Status::Ok,
        format!(
            "{} guests, {} running, {} vCPUs free, accelerator {}",
            host.vm_count, host.running_vms, host.free_vcpus, host.accelerator
        ),
    );
    v.perf = vec![
        Perf::gauge("guests", f64::from(host.vm_count), ""),
        Perf::gauge("running", f64::from(host.running_vms), ""),
        Perf::gauge("broken", broken.len() as f64, "").warn_at(1.0),
        Perf::gauge("destroying", destroying as f64, "").warn_at(1.0),
        Perf::gauge("pdisk_unreachable", unreachable.len() as f64, "").warn_at(1.0),
        Perf::gauge("free_vcpus", f64::from(host.free_vcpus), ""),
        Perf::gauge("free_memory", host.free_memory_bytes as f64, "B"),
        Perf::gauge("time", health_secs, "s"),
    ];
    v
}

fn state_word(s: pb::VmState) -> &'static str {
    s.as_str_name()
        .strip_prefix("VM_STATE_")
        .unwrap_or("UNKNOWN")
}

/// Creates, starts, watches and destroys a guest named
/// `stratus-probe-<8 hex>`: (status, what happened, seconds to ready).
async fn launch_test(
    c: &mut VmServiceClient<Channel>,
    t: &LaunchTest,
) -> (Status, String, Option<f64>) {
    // The test is about launching, not downloading: an image that is not
    // cached is the probe's configuration, not the host's fault.
    let cached = match c.list_images(pb::ListImagesRequest {}).await {
        Ok(r) => r
            .into_inner()
            .images
            .iter()
            .any(|i| i.sha256 == t.image_sha256 && i.location == "local"),
        Err(s) => {
            return (
                Status::Critical,
                format!(
                    "launch test: ListImages failed: {:?}: {}",
                    s.code(),
                    s.message()
                ),
                None,
            )
        }
    };
    if !cached {
        return (
            Status::Unknown,
            format!(
                "launch test: image {} is not in the agent's cache (`agentctl image pull` it first)",
                t.image_sha256
            ),
            None,
        );
    }
    let name = format!(
        "stratus-probe-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let spec = pb::VmSpec {
        name: name.clone(),
        vcpus: 1,
        memory_bytes: t.memory_mib << 20,
        disks: vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::Image(pb::ImageRef {
                url: t.image_url.clone(),
                sha256: t.image_sha256.clone(),
                ..Default::default()
            })),
            boot_index: 1,
            persistence: pb::DiskPersistence::Local as i32,
            ..Default::default()
        }],
        kernel: t.kernel.as_ref().map(|k| pb::KernelBoot {
            kernel: k.clone(),
            initrd: t.initrd.clone().unwrap_or_default(),
            cmdline: t.cmdline.clone().unwrap_or_default(),
        }),
        ..Default::default()
    };
    if let Err(s) = c
        .create_vm(pb::CreateVmRequest {
            spec: Some(spec),
            ..Default::default()
        })
        .await
    {
        return (
            Status::Critical,
            format!(
                "launch test: guest refused: {:?}: {}",
                s.code(),
                s.message()
            ),
            None,
        );
    }
    let started = Instant::now();
    let (mut status, mut finding, secs) = watch_launch(c, &name, t, started).await;
    // Destroyed whatever happened, so a failing host does not fill up with
    // probe guests.
    if let Err(s) = c
        .destroy_vm(pb::DestroyVmRequest {
            vm: name.clone(),
            ..Default::default()
        })
        .await
    {
        status = status.max(Status::Warning);
        finding = format!(
            "{finding}; test guest {name} left behind: {:?}: {}",
            s.code(),
            s.message()
        );
    }
    (status, finding, secs)
}

async fn watch_launch(
    c: &mut VmServiceClient<Channel>,
    name: &str,
    t: &LaunchTest,
    started: Instant,
) -> (Status, String, Option<f64>) {
    let vm = match c
        .start_vm(pb::VmRequest {
            vm: name.to_owned(),
            ..Default::default()
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => {
            return (
                Status::Critical,
                format!(
                    "launch test: guest did not start: {:?}: {}",
                    s.code(),
                    s.message()
                ),
                None,
            )
        }
    };
    let running = started.elapsed().as_secs_f64();
    if let Some(marker) = &t.ready_marker {
        // The log is agentd's file on this host; the probe's own timeout
        // bounds the wait.
        loop {
            let log = std::fs::read_to_string(&vm.console_log).unwrap_or_default();
            if log.contains(marker.as_str()) {
                break;
            }
            if let Some(why) = not_running(c, name).await {
                return (Status::Critical, why, Some(running));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let ready = started.elapsed().as_secs_f64();
    tokio::time::sleep(t.settle).await;
    if let Some(why) = not_running(c, name).await {
        return (Status::Critical, why, Some(ready));
    }
    let how = if t.ready_marker.is_some() {
        "ready"
    } else {
        "running"
    };
    (
        Status::Ok,
        format!(
            "launch test: guest {how} in {ready:.1} s, still running after {} s, destroyed",
            t.settle.as_secs()
        ),
        Some(ready),
    )
}

/// Why the test guest no longer runs, if it does not.
async fn not_running(c: &mut VmServiceClient<Channel>, name: &str) -> Option<String> {
    match c
        .get_vm(pb::VmRequest {
            vm: name.to_owned(),
            ..Default::default()
        })
        .await
    {
        Ok(r) => {
            let vm = r.into_inner();
            (vm.state() != pb::VmState::Running).then(|| {
                format!(
                    "launch test: guest {} after its start: {}",
                    state_word(vm.state()),
                    vm.state_reason
                )
            })
        }
        Err(s) => Some(format!(
            "launch test: guest vanished: {:?}: {}",
            s.code(),
            s.message()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, state: pb::VmState) -> pb::Vm {
        pb::Vm {
            name: name.into(),
            state: state as i32,
            state_reason: "qemu exited".into(),
            ..Default::default()
        }
    }

    #[test]
    fn broken_guests_warn_and_a_host_refusing_guests_is_critical() {
        let mut host = pb::Host {
            accelerator: "tcg".into(),
            qemu_confinement: "uid pool 64000-64999".into(),
            ..Default::default()
        };
        let ok = judge(&host, &[vm("a", pb::VmState::Running)], 0.0);
        assert_eq!(ok.status(), Status::Ok, "{}", ok.line("AGENT"));
        let w = judge(
            &host,
            &[vm("a", pb::VmState::Running), vm("b", pb::VmState::Crashed)],
            0.0,
        );
        assert_eq!(w.status(), Status::Warning);
        assert!(
            w.line("AGENT").starts_with(
                "STRATUS AGENT WARNING - guests in error or crashed: 1 (first: b CRASHED"
            ),
            "{}",
            w.line("AGENT")
        );
        host.qemu_confinement = "guests refused: this QEMU has no -sandbox".into();
        assert_eq!(judge(&host, &[], 0.0).status(), Status::Critical);
    }

    #[test]
    fn an_unreachable_pdisk_server_warns_naming_it() {
        let server = |name: &str, reachable: bool| pb::PdiskServer {
            name: name.into(),
            reachable,
            last_error: if reachable {
                ""
            } else {
                "probe: connection refused"
            }
            .into(),
            ..Default::default()
        };
        let mut host = pb::Host {
            accelerator: "tcg".into(),
            pdisk_servers: vec![server("default", true), server("b", true)],
            ..Default::default()
        };
        assert_eq!(judge(&host, &[], 0.0).status(), Status::Ok);
        host.pdisk_servers[1].reachable = false;
        host.pdisk_servers[1].last_error = "probe: connection refused".into();
        let w = judge(&host, &[], 0.0);
        assert_eq!(w.status(), Status::Warning);
        let line = w.line("AGENT");
        assert!(
            line.starts_with(
                "STRATUS AGENT WARNING - pdisk servers unreachable: b (first: b: probe: \
                 connection refused)"
            ),
            "{line}"
        );
        assert!(line.contains("pdisk_unreachable=1;1"), "{line}");
    }
}
