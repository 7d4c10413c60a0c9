//! pdiskd: the persistent-disk server of a Stratus storage host.
//!
//! Start-up order matters for crash safety: open the store, open the pool
//! (clearing its staging area), reconcile store with pool and exporter, and
//! only then accept requests (and tell systemd `READY=1`). A watchdog keeps
//! re-applying exports so a restarted tgtd gets them back.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use pdisk::backend::file::FileBackend;
use pdisk::backend::lvm::LvmBackend;
use pdisk::backend::rbd::RbdBackend;
use pdisk::backend::Backend;
use pdisk::config::{BackendKind, Config, ExporterKind, Flags};
use pdisk::export::lio::{LioConfig, LioExporter};
use pdisk::export::nvmet::{NvmetConfig, NvmetExporter};
use pdisk::export::rbd::RbdExporter;
use pdisk::export::tgt::{TgtConfig, TgtExporter};
use pdisk::export::Exporter;
use pdisk::{Api, PoolService, ServiceSettings, Store};
use stratus_core::runner::{CommandRunner, HostRunner};
use stratus_core::systemd::ServiceManager;
use stratus_pki::audit::{AuditLayer, AuditSink};
use stratus_pki::gate::GateLayer;
use stratus_pki::metrics::RpcMetricsLayer;
use stratus_pki::serve::Listeners;
use stratus_proto::pdisk::v1::volume_service_server::VolumeServiceServer;

async fn shutdown_signal(tx: tokio::sync::watch::Sender<bool>, systemd: ServiceManager) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    systemd.stopping("shutting down: letting operations under way finish");
    let _ = tx.send(true);
}

/// Also the entry point of `pdiskd-failpoints`, the fault-injection build
/// (`src/bin/pdiskd_failpoints.rs`).
#[tokio::main]
pub(crate) async fn main() {
    stratus_core::cli::docs::write_if_asked("8", Flags::command);
    let flags = Flags::parse();
    let cfg = match flags.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pdiskd: {e}");
            std::process::exit(2);
        }
    };
    stratus_core::settings::init_logging(cfg.log_format, &cfg.log_level);
    // Fault-injection builds only: crash points from FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let _failpoints = pdisk::failpoints::setup();
    if let Err(e) = run(cfg).await {
        tracing::error!("{e:#}");
        eprintln!("pdiskd: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let runner: Arc<dyn CommandRunner> = Arc::new(HostRunner);
    for d in &cfg.import_dirs {
        std::fs::create_dir_all(d).with_context(|| format!("import dir {}", d.display()))?;
    }
    let store = Store::open(&cfg.data_dir).context("opening the metadata store")?;
    let backend: Arc<dyn Backend> = match cfg.backend {
        BackendKind::File => {
            let b = FileBackend::open(&cfg.pool_dir, runner.clone()).context("opening the pool")?;
            let cleared = b.clear_staging()?;
            if !cleared.is_empty() {
                tracing::info!(files = ?cleared, "removed temporaries of interrupted operations");
            }
            Arc::new(b)
        }
        BackendKind::Lvm => {
            let settings = cfg.lvm.clone().context("lvm settings missing")?;
            let b = LvmBackend::open(runner.clone(), settings)
                .await
                .context("opening the thin pool")?;
            let cleared = b.clear_temporaries().await?;
            if !cleared.is_empty() {
                tracing::info!(removed = ?cleared, "removed temporaries of interrupted operations");
            }
            Arc::new(b)
        }
        BackendKind::Rbd => {
            let settings = cfg.rbd.clone().context("rbd settings missing")?;
            let b = RbdBackend::open(runner.clone(), settings)
                .await
                .context("opening the rbd pool")?;
            let cleared = b.clear_temporaries().await?;
            if !cleared.is_empty() {
                tracing::info!(removed = ?cleared, "removed temporaries of interrupted operations");
            }
            Arc::new(b)
        }
    };
    let pool = backend.location();
    let exporter: Arc<dyn Exporter> = match cfg.exporter {
        ExporterKind::Tgt => Arc::new(TgtExporter::new(
            runner.clone(),
            TgtConfig {
                control_port: cfg.tgt_control_port,
                portal: cfg.portal.clone(),
                iqn_prefix: cfg.iqn_prefix.clone(),
                bstype: cfg.tgt_bstype.clone(),
                params: cfg.iscsi_params.clone(),
                ..TgtConfig::default()
            },
        )),
        ExporterKind::Rbd => Arc::new(RbdExporter::new(&cfg.iqn_prefix)),
        ExporterKind::Lio => Arc::new(LioExporter::new(
            runner.clone(),
            LioConfig {
                configfs_root: cfg.lio_configfs.clone(),
                portal: cfg.portal.clone(),
                iqn_prefix: cfg.iqn_prefix.clone(),
                params: cfg.iscsi_params.clone(),
                ..LioConfig::default()
            },
        )),
        ExporterKind::Nvmet => {
            tracing::warn!(
                "--export nvmet: NVMe/TCP without DH-HMAC-CHAP; hosts are admitted by \
                 the host NQN they claim, keep the portal on a storage network"
            );
            Arc::new(NvmetExporter::new(
                runner.clone(),
                NvmetConfig {
                    configfs_root: cfg.lio_configfs.clone(),
                    portal: cfg.portal.clone(),
                    port_id: cfg.nvmet_port_id,
                    iqn_prefix: cfg.iqn_prefix.clone(),
                    ..NvmetConfig::default()
                },
            )?)
        }
    };
    let svc = Arc::new(PoolService::new(
        store,
        backend,
        exporter,
        runner,
        ServiceSettings {
            max_overcommit: cfg.max_overcommit,
            import_dirs: cfg.import_dirs.clone(),
            quarantine_period: cfg.quarantine_period,
            host_id: cfg.host_id.clone(),
        },
    ));
    let report = svc.reconcile().await.context("reconciling")?;
    tracing::info!(
        actions = report.actions.len(),
        drift = report.drift.len(),
        "start-up reconciliation done"
    );

    // Storage accounting: every project sampled each --usage-interval and
    // after each change to its volumes.
    svc.usage().set_site(pdisk::usage::StorageSite {
        site: cfg.usage_site.clone(),
        storage_system: cfg.usage_service.clone(),
        storage_share: pool.clone(),
        host: cfg
            .nats
            .as_ref()
            .map(|n| n.host.clone())
            .unwrap_or_else(|| pdisk::usage::StorageSite::of_this_host().host),
    });
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    pdisk::usage::spawn_sampler(svc.clone(), cfg.usage_interval, shutdown_rx.clone());

    // The journal is the outbox: with a broker, every event is published in
    // seq order, resuming after the last one it acknowledged.
    // The publisher's lag (journaled vs acknowledged) for `/metrics`.
    let mut publishers = Vec::new();
    if let Some(nats) = &cfg.nats {
        let broker =
            stratus_core::nats::Broker::connect(nats, &format!("pdiskd {}", nats.host), false)
                .await
                .context("NATS")?;
        let outbox = Arc::new(pdisk::events::PoolOutbox::new(
            svc.shared_store(),
            &nats.host,
        ));
        let store = svc.shared_store();
        publishers.push(stratus_core::outbox::PublisherLag::new(
            "events",
            stratus_core::outbox::Publisher::spawn(outbox, broker.clone()),
            move || store.last_seq(),
        ));
        // Storage usage records the same way, from the usage log.
        let s = svc.clone();
        publishers.push(stratus_core::outbox::PublisherLag::new(
            "usage",
            stratus_core::outbox::Publisher::spawn(
                Arc::new(pdisk::usage::UsageOutbox::new(svc.clone())),
                broker,
            ),
            move || s.usage().last_seq(),
        ));
        tracing::info!(url = %nats.url, host = %nats.host, stream = stratus_core::nats::STREAM,
            "publishing events to NATS");
    }
    // The event journal and the usage log stay bounded: compacted now and
    // every hour.
    {
        let store = svc.shared_store();
        let svc = svc.clone();
        let (max, age) = (cfg.event_max, cfg.event_max_age);
        tokio::spawn(async move {
            let mut hourly = tokio::time::interval(Duration::from_secs(3600));
            loop {
                hourly.tick().await;
                let now = std::time::SystemTime::now();
                match tokio::task::block_in_place(|| store.compact_events(max, age, now)) {
                    Ok((removed, oldest)) if removed > 0 => {
                        tracing::info!(removed, oldest_seq = oldest, "event journal compacted")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "event journal compaction failed"),
                }
                let usage = svc.usage();
                match tokio::task::block_in_place(|| usage.compact(age, now)) {
                    Ok(removed) if removed > 0 => {
                        tracing::info!(removed, "usage log compacted")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "usage log compaction failed"),
                }
            }
        });
    }

    // A target daemon can lose exports (tgtd restarted); with no target
    // (rbd) there is nothing to watch, and no tgtadm to poll.
    if !svc.exporter().native_client() {
        tokio::spawn(svc.clone().watch_exports(
            Duration::from_secs(cfg.export_check_interval),
            shutdown_rx.clone(),
        ));
    }
    // Quarantined volumes are purged at their purge time (kept in the
    // store: a restart delays nothing).
    tokio::spawn(svc.clone().watch_quarantine(shutdown_rx.clone()));
    // Clones past the maximum clone depth are flattened in the background;
    // marks left by a previous run are resumed at once.
    tokio::spawn(svc.clone().watch_flattens(shutdown_rx.clone()));
    tracing::info!(period = %humantime::format_duration(cfg.quarantine_period), "quarantine of deleted volumes");

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<VolumeServiceServer<Api>>()
        .await;
    let (reflection, reflection_v1alpha) =
        stratus_pki::serve::reflection(pdisk::authz::SERVICE, stratus_proto::FILE_DESCRIPTOR_SET)?;

    let audit = AuditSink::from_setting(cfg.serve.audit_log.as_deref())?;
    let mut registry = prometheus_client::registry::Registry::default();
    let rpc_metrics = RpcMetricsLayer::register(&mut registry, &pdisk::authz::TABLE);
    let refresh = pdisk::metrics::register(&mut registry, svc.clone());
    stratus_pki::metrics::register_publishers(
        &mut registry,
        "stratus_pdisk",
        Arc::new(move || publishers.iter().map(|p| p.figures()).collect()),
    );
    if let Some(addr) = cfg.serve.metrics_listen {
        let mut rx = shutdown_rx.clone();
        let bound = stratus_pki::metrics::spawn(addr, Arc::new(registry), refresh, async move {
            let _ = rx.wait_for(|v| *v).await;
        })
        .await
        .with_context(|| format!("metrics listener {addr}"))?;
        tracing::info!(%bound, "metrics at http://{bound}/metrics");
    }
    let listeners = Listeners::bind(&cfg.serve).await?;
    stratus_pki::serve::reload_on_sighup(listeners.tls())?;
    tracing::info!(
        listen = ?listeners.description,
        backend = ?cfg.backend,
        pool = %pool,
        exporter = ?cfg.exporter,
        portal = %cfg.portal,
        "pdiskd ready"
    );
    // Reconciled and listening: systemd may start what depends on us.
    let systemd = ServiceManager::from_env();
    systemd.ready(&format!("serving on {}", listeners.description.join(", ")));
    tokio::spawn(shutdown_signal(shutdown_tx, systemd));
    let mut rx = shutdown_rx;
    tonic::transport::Server::builder()
        // The audit layer outside the gate: refused calls are recorded too.
        .layer(AuditLayer::new(
            pdisk::authz::SERVICE,
            pdisk::authz::MUTATING,
            audit,
        ))
        // Every call is timed, the refused ones too.
        .layer(rpc_metrics)
        .layer(GateLayer::new(Arc::new(pdisk::authz::check)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(VolumeServiceServer::new(Api::new(svc)).max_decoding_message_size(8 << 20))
        .serve_with_incoming_shutdown(listeners.incoming(), async move {
            let _ = rx.wait_for(|v| *v).await;
        })
        .await
        .context("serving gRPC")?;
    Ok(())
}
