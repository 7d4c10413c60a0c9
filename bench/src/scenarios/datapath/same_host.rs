//! The same-host subject of the data path scenario (issue 16): a volume
//! that pdiskd creates and exports to an agent on its own host. The bench
//! asks as agentd does (ExportVolume with the host id both daemons know),
//! pdiskd answers with a local attachment (the volume's own file, raw), and
//! QEMU's block layer opens the answered path with the driver options
//! agentd gives it (`file` or `host_device`, `cache.direct`, io_uring or
//! native). agentd hands QEMU a descriptor it opened on that path; QEMU
//! re-applies O_DIRECT to it, so opening the path here is the same I/O.

use std::path::PathBuf;

use anyhow::{bail, Context};
use stratus_proto::pdisk::v1 as pb;
use testkit::{Pdiskd, Tgtd, XfsPool, INITIATOR};
use tokio::runtime::Handle;

/// The host id pdiskd and the bench's "agent" share.
const HOST_ID: &str = "bench-datapath-host";
const VOLUME: &str = "bench-same-host";

/// pdiskd serving the volume, and what it answered.
pub(super) struct SameHost {
    pub path: PathBuf,
    pub block_device: bool,
    // pdiskd before its tgtd (never used: the export is local).
    _pdiskd: Pdiskd,
    _tgtd: Tgtd,
}

/// Starts pdiskd on `pool` (file backend), creates a volume of `size`
/// bytes and exports it for this host; fails unless the answer is a local
/// attachment.
pub(super) fn start(rt: &Handle, pool: &XfsPool, size: u64) -> anyhow::Result<SameHost> {
    let tgtd = Tgtd::start(pool.dir.path());
    let pdiskd = Pdiskd::start_with(pool, &tgtd, &["--host-id", HOST_ID]);
    let export = rt
        .block_on(async {
            let mut c = pdiskd.client().await;
            c.create_volume(pb::CreateVolumeRequest {
                name: VOLUME.into(),
                size_bytes: size,
                ..Default::default()
            })
            .await?;
            let e = c
                .export_volume(pb::ExportVolumeRequest {
                    volume: VOLUME.into(),
                    initiators: vec![INITIATOR.into()],
                    host_id: HOST_ID.into(),
                    ..Default::default()
                })
                .await?;
            Ok::<_, tonic::Status>(e.into_inner())
        })
        .with_context(|| format!("pdiskd (log: {})", pdiskd.log.display()))?;
    let Some(local) = export.local else {
        bail!(
            "pdiskd answered {} ({}), not a local attachment",
            export.url,
            export.exporter
        );
    };
    if local.format != "raw" {
        bail!("local attachment of format {:?}, not raw", local.format);
    }
    Ok(SameHost {
        path: PathBuf::from(local.path),
        block_device: local.block_device,
        _pdiskd: pdiskd,
        _tgtd: tgtd,
    })
}
