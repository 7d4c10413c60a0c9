//! The soak's final checks: what must hold once the daemons have recovered
//! from every SIGKILL (issue 13). Each failed check is a violation string
//! naming the object; [`Checks::count`] says how many checks ran.
//!
//! - [`agent`]: guests' states and QEMUs (a guest whose QEMU the chaos
//!   killed is not running), taps, agentd's exports and clones, files,
//!   events;
//! - [`volumes`]: pdiskd's volumes, pool files, tgt against the store, drift, content;
//! - [`images`]: pulled images cached and verified or evicted, saves ended
//!   once each with the saved image's checksum, no `save-*` snapshot;
//! - [`prove`]: plants what the checks must find;
//! - this module: one pass, the comparison of tgt with pdiskd's exports
//!   after each restart, helpers.

mod agent;
mod images;
mod prove;
mod volumes;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pdisk::export::tgt::{TgtConfig, TgtExporter};
use pdisk::export::Exporter;
use stratus_core::runner::HostRunner;
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;

pub(crate) use prove::prove;

use super::events::Followed;
use super::expect::Expectations;
use super::Places;

/// One pass of the checks.
#[derive(Debug, Default)]
pub(crate) struct Checks {
    pub count: u64,
    pub violations: Vec<String>,
}

impl Checks {
    fn expect(&mut self, ok: bool, why: impl FnOnce() -> String) {
        self.count += 1;
        if !ok {
            self.violations.push(why());
        }
    }
}

/// Runs every check once (in the namespace: a task of the soak's runtime).
/// `killed`: the QEMU pids the chaos thread killed.
pub(crate) async fn check(
    places: &Places,
    expect: &Expectations,
    followed: &Followed,
    killed: &BTreeSet<u32>,
) -> Checks {
    let places = places.clone();
    let expect = expect.clone();
    let seen: BTreeMap<u64, pb::Event> = followed.by_seq.clone();
    let killed = killed.clone();
    let task = tokio::spawn(async move {
        let mut c = Checks::default();
        if let Err(e) = agent::checks(&places, &expect, &seen, &killed, &mut c).await {
            c.violations
                .push(format!("agentd checks could not run: {e:#}"));
        }
        if let Err(e) = volumes::checks(&places, &expect, &mut c).await {
            c.violations
                .push(format!("pdiskd checks could not run: {e:#}"));
        }
        if let Err(e) = images::checks(&places, &expect, &mut c).await {
            c.violations
                .push(format!("image checks could not run: {e:#}"));
        }
        c
    });
    match task.await {
        Ok(c) => c,
        Err(e) => Checks {
            count: 0,
            violations: vec![format!("the checks panicked: {e}")],
        },
    }
}

async fn clients(
    places: &Places,
) -> anyhow::Result<(
    VmServiceClient<tonic::transport::Channel>,
    VolumeServiceClient<tonic::transport::Channel>,
)> {
    let files = testkit::TestPki::shared().admin();
    let agent = stratus_pki::Dialer::from_address(&places.agent_url, Some(&files))?
        .connect()
        .await?;
    let pdisk = stratus_pki::Dialer::from_address(&places.pdisk_url, Some(&files))?
        .connect()
        .await?;
    Ok((VmServiceClient::new(agent), VolumeServiceClient::new(pdisk)))
}

/// Targets and their ACLs as tgtd has them now.
async fn tgt_exports(places: &Places) -> anyhow::Result<ExportMap> {
    let tgt = TgtExporter::new(
        Arc::new(HostRunner),
        TgtConfig {
            control_port: places.tgt_control_port,
            portal: places.portal.clone(),
            ..TgtConfig::default()
        },
    );
    Ok(tgt
        .list()
        .await?
        .into_iter()
        .map(|l| (l.target_iqn, l.initiators.into_iter().collect()))
        .collect())
}

/// Target IQN → initiators.
type ExportMap = BTreeMap<String, BTreeSet<String>>;

/// pdiskd's stored exports as an [`ExportMap`].
fn stored_exports(exports: &[pdpb::Export]) -> ExportMap {
    exports
        .iter()
        .map(|e| (e.target_iqn.clone(), e.initiators.iter().cloned().collect()))
        .collect()
}

/// Waits (at most `wait`) until tgt's targets and ACLs equal pdiskd's
/// ListExports: tgt listed twice, unchanged, around one ListExports equal
/// to it (so an export or unexport in flight is not taken for a
/// difference). An error naming both sides past `wait`.
pub(crate) async fn exports_converge(places: &Places, wait: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < wait {
        match exports_once(places).await {
            Ok((before, stored, after)) if before == stored && stored == after => return Ok(()),
            Ok((_, stored, after)) => {
                last = format!("tgt has {after:?}, pdiskd's ListExports {stored:?}")
            }
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("exports still differ after {wait:?}: {last}")
}

async fn exports_once(places: &Places) -> anyhow::Result<(ExportMap, ExportMap, ExportMap)> {
    let (_, mut pdisk) = clients(places).await?;
    let before = tgt_exports(places).await?;
    let exports = pdisk
        .list_exports(pdpb::ListExportsRequest::default())
        .await?
        .into_inner()
        .exports;
    let after = tgt_exports(places).await?;
    Ok((before, stored_exports(&exports), after))
}

async fn checksum(
    pdisk: &mut VolumeServiceClient<tonic::transport::Channel>,
    name: &str,
    is_snapshot: bool,
) -> anyhow::Result<String> {
    Ok(pdisk
        .checksum_volume(pdpb::ChecksumVolumeRequest {
            volume: name.into(),
            is_snapshot,
            ..Default::default()
        })
        .await?
        .into_inner()
        .sha256)
}

/// UUIDs of the `.raw` files in `dir`, and any other entry.
fn files(dir: &Path) -> anyhow::Result<(BTreeSet<String>, Vec<String>)> {
    let mut uuids = BTreeSet::new();
    let mut other = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let n = e?.file_name().to_string_lossy().into_owned();
        match n.strip_suffix(".raw") {
            Some(u) => {
                uuids.insert(u.to_string());
            }
            None => other.push(n),
        }
    }
    Ok((uuids, other))
}

/// Live QEMUs running some guest's UUID (`-uuid X`): (pid, uuid).
pub(crate) fn qemus() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in procs.flatten() {
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
