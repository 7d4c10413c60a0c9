//! The rbd exporter: no target at all. A volume of the rbd backend is an
//! RBD image that clients (agents' QEMUs) open with Ceph's own client, so
//! an export is only pdisk's record of who holds the volume: the same
//! intent, fencing (one host unless multi-attach) and events as an iSCSI
//! export, with nothing to create, check or restore on a target daemon.
//! The answer names the image and the cluster instead of a target
//! (`ExportInfo::rbd`, from [`crate::backend::Backend::native_access`]).
//!
//! What the record does not do: cephx caps are per pool, so a host holding
//! the client user's key can open any image of the pool whatever pdisk
//! records. The fence is pdisk's refusal to hand a second host an export,
//! and agentd's own rule of attaching only what it was exported.

use crate::error::Result;
use crate::runner::BoxFuture;
use crate::types::Iqn;

use super::{ExportSpec, Exporter, LiveExport, RestoreReport};

/// See the module doc.
pub struct RbdExporter {
    /// Export records still carry a target name (never served): the
    /// configured prefix and the volume UUID, as with the other exporters.
    iqn_prefix: String,
}

impl RbdExporter {
    pub fn new(iqn_prefix: &str) -> RbdExporter {
        RbdExporter {
            iqn_prefix: iqn_prefix.to_string(),
        }
    }
}

impl Exporter for RbdExporter {
    fn kind(&self) -> &'static str {
        "rbd"
    }

    fn portal(&self) -> String {
        String::new()
    }

    fn iqn_prefix(&self) -> &str {
        &self.iqn_prefix
    }

    fn native_client(&self) -> bool {
        true
    }

    fn export<'a>(&'a self, _spec: &'a ExportSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn unexport<'a>(&'a self, _target_iqn: &'a Iqn) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn refresh_size<'a>(&'a self, _spec: &'a ExportSpec) -> BoxFuture<'a, Result<()>> {
        // The client sees a grown image when it reopens it, or at once
        // after QEMU's block_resize: nothing to tell a target.
        Box::pin(async { Ok(()) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<LiveExport>>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn check(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Nothing live can differ from the records: every export is as stored.
    fn restore<'a>(&'a self, specs: &'a [ExportSpec]) -> BoxFuture<'a, Result<RestoreReport>> {
        Box::pin(async move {
            Ok(RestoreReport {
                unchanged: specs.iter().map(|s| s.target_iqn.to_string()).collect(),
                ..RestoreReport::default()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nothing_is_served_so_nothing_is_ever_lost_or_restored() {
        let e = RbdExporter::new("iqn.2026-11.io.stratus.pdisk");
        let spec = ExportSpec {
            target_iqn: "iqn.2026-11.io.stratus.pdisk:v1".parse().unwrap(),
            backing_path: "rbd:pool/pd-vol-x".into(),
            initiators: vec!["iqn.2026-11.io.stratus.agent:h1".parse().unwrap()],
            chap: None,
        };
        e.export(&spec).await.unwrap();
        e.check().await.unwrap();
        assert!(e.list().await.unwrap().is_empty());
        let r = e.restore(std::slice::from_ref(&spec)).await.unwrap();
        assert!(r.restored.is_empty() && r.failed.is_empty() && r.unknown.is_empty());
        assert_eq!(r.unchanged, vec![spec.target_iqn.to_string()]);
        assert!(e.native_client());
        assert_eq!(e.portal(), "");
    }
}
