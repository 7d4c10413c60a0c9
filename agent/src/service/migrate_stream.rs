//! What the two QEMUs of a live migration are told about its stream
//! (`crate::service::migrate` drives the migration): the destination's
//! wait (port, TLS credentials, the one source it lets in) and reading
//! QEMU's figures once it completed.

use std::time::Duration;

use serde_json::{json, Value};

use super::migrate::status_of;
use crate::confine::QemuUser;
use crate::layout::DeviceLayout;
use crate::migration_tls::{self, Endpoint};
use crate::vmm::QmpCommands;
use stratus_core::error::Result;
use stratus_pki::TlsFiles;

/// What a destination's QEMU waits for: the port (every address of this
/// host) and, over TLS, this host's certificate files.
pub(super) struct Incoming {
    pub port: u16,
    pub tls: Option<TlsFiles>,
    /// Over TLS, the subject of the one client certificate let in (the
    /// source agent's).
    pub source_dn: Option<String>,
    /// Where the source has each device.
    pub layout: Option<DeviceLayout>,
}

/// Tells a QEMU started with `-incoming defer` to wait as `incoming` says;
/// `guest_dir` and `owner`: where its TLS files are written, for whom.
pub(super) async fn listen_incoming(
    qmp: &dyn QmpCommands,
    incoming: &Incoming,
    guest_dir: &std::path::Path,
    owner: Option<QemuUser>,
) -> Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "events", "state": true}]})),
    )
    .await?;
    if let Some(tls) = &incoming.tls {
        qmp.install_migration_tls(guest_dir, tls, Endpoint::Destination, owner)
            .await?;
        if let Some(dn) = &incoming.source_dn {
            migration_tls::allow_only(qmp, dn).await?;
        }
        qmp.execute(
            "migrate-set-parameters",
            Some(migration_tls::destination_parameters(
                incoming.source_dn.is_some(),
            )),
        )
        .await?;
    }
    let port = incoming.port;
    qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": format!("tcp:0.0.0.0:{port}") })),
    )
    .await?;
    Ok(())
}

/// `query-migrate`'s answer once QEMU has its times: it says `completed`
/// a moment before it computes `total-time` and `downtime` (both 0 until
/// then), so a completed answer without them is asked again, briefly.
pub(super) async fn with_times(qmp: &dyn QmpCommands, mut info: Value) -> Value {
    for _ in 0..20 {
        if info["total-time"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        match qmp.execute("query-migrate", None).await {
            Ok(again) if status_of(&again) == "completed" => info = again,
            _ => break,
        }
    }
    info
}
