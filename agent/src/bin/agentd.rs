//! agentd: the Stratus host agent.
//!
//! Start-up order: open the store, probe the host (accelerator, QEMU, and
//! iscsiadm with `--attach kernel`), reconcile (adopt live guests, record
//! the ones that ended while we were away), and only then serve (and tell
//! systemd `READY=1`; `STOPPING=1` when a signal stops us). Guests are
//! daemonized QEMUs: stopping agentd leaves them running.

use std::sync::Arc;

use agent::attach::AttachMode;
use agent::config::{Config, Flags};
use agent::store::AgentStore;
use agent::{Agent, AgentSettings, Api, HostFacts};
use anyhow::Context;
use clap::{CommandFactory, Parser};
use stratus_core::runner::{CommandRunner, HostRunner};
use stratus_core::systemd::ServiceManager;
use stratus_pki::audit::{AuditLayer, AuditSink};
use stratus_pki::gate::GateLayer;
use stratus_pki::metrics::RpcMetricsLayer;
use stratus_pki::serve::Listeners;
use stratus_proto::agent::v1::vm_service_server::VmServiceServer;

/// Also the entry point of `agentd-failpoints`, the fault-injection build
/// (`src/bin/agentd_failpoints.rs`).
#[tokio::main]
pub(crate) async fn main() {
    stratus_core::cli::docs::write_if_asked("8", Flags::command);
    let cfg = match Flags::parse().resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentd: {e}");
            std::process::exit(2);
        }
    };
    stratus_core::settings::init_logging(cfg.log_format, &cfg.log_level);
    // Fault-injection builds only: crash points from FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let _failpoints = agent::failpoints::setup();
    if let Err(e) = run(cfg).await {
        tracing::error!("{e:#}");
        eprintln!("agentd: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let runner: Arc<dyn CommandRunner> = Arc::new(HostRunner);
    let store = AgentStore::open(&cfg.state_dir).context("opening the agent store")?;
    let host = HostFacts::probe(runner.as_ref(), cfg.accel).await;
    tracing::info!(accel = host.accel.name(), reason = %host.accel_reason,
        qemu = %host.qemu_version, io_uring = host.io_uring, cpus = host.cpus,
        memory = host.memory, "host probed");
    let disk_io = cfg.disk_io.resolve(host.io_uring)?;
    tracing::info!(
        file_aio = disk_io.file_aio.name(),
        device_aio = disk_io.device_aio.name(),
        iothreads = disk_io.iothreads,
        "guest disk I/O"
    );
    let agent = Agent::new(
        store,
        runner,
        AgentSettings {
            state_dir: cfg.state_dir.clone(),
            default_bridge: cfg.bridge.clone(),
            allowed_bridges: cfg.allowed_bridges.clone(),
            initiator_iqn: cfg.initiator_iqn.to_string(),
            attach: cfg.attach,
            chap_mutual: cfg.chap_mutual,
            local_host_id: cfg.local_host_id.clone(),
            pdisk: cfg.pdisk.clone(),
            ceph: cfg.ceph.clone(),
            cpu_overcommit: cfg.cpu_overcommit,
            reserved_memory: cfg.reserved_memory,
            image_quota: Some(cfg.image_quota),
            image_policy: cfg.image_policy.clone(),
            image_file_roots: cfg.image_file_roots.clone(),
            host_file_roots: cfg.host_file_roots.clone(),
            image_allow_private: cfg.image_allow_private,
            qemu_users: cfg.qemu_users.clone(),
            allow_unsandboxed: cfg.allow_unsandboxed,
            cgroup_parent: cfg.cgroup_parent.clone(),
            console_log_max: cfg.console_log_max,
            hotplug_ports: cfg.hotplug_ports,
            disk_io,
            peer_tls: cfg.tls.clone(),
            migration_tls: cfg.migration_tls.clone(),
            migration_max_bandwidth: cfg.migration_max_bandwidth,
        },
        host,
    )?;
    tracing::info!(confinement = %agent.confinement(), "guest confinement");
    if cfg.attach == AttachMode::Kernel {
        // Fail at start, not at the first guest, when open-iscsi is missing.
        let version = agent.kernel_initiator().probe().await?;
        tracing::info!(iscsiadm = %version, "kernel iSCSI initiator");
        // NVMe/TCP is only needed for disks on nvmet exports: a host without
        // nvme-cli or nvme_tcp still attaches iSCSI disks, and says now why
        // an NVMe/TCP disk would fail (its attach fails with the same cause).
        match agent.nvme_host().probe().await {
            Ok(v) => tracing::info!(nvme = %v, "kernel NVMe/TCP host"),
            Err(e) => tracing::warn!(error = %e,
                "--attach kernel: disks on NVMe/TCP (nvmet) exports cannot be attached on this host"),
        }
    }
    // Fail at start, not at the first guest, when --ceph-id's key is missing.
    if let Some(client) = cfg.ceph.check()? {
        tracing::info!(client = %client, "ceph client for RBD disks");
    }
    let report = agent.reconcile().await.context("reconciling")?;
    tracing::info!(actions = report.len(), "start-up reconciliation done");
    // pdisk work left undone (pdisk unreachable) is finished when it answers.
    agent.spawn_leftover_retries(std::time::Duration::from_secs(60));
    // Guests' anti-spoofing rules stay in place even if someone flushes them.
    if let Some(every) = cfg.nic_filter_check {
        agent.spawn_nic_filter_checks(every);
    }
    // Usage accounting: every guest read each --usage-interval and at
    // each state change.
    agent.usage_book().set_site(cfg.usage_site.clone());
    agent::usage::spawn_sampler(agent.clone(), cfg.usage_interval);
    // The event journal and the usage log stay bounded: compacted now and
    // every hour.
    {
        let agent = agent.clone();
        let retention = cfg.event_retention;
        tokio::spawn(async move {
            let mut hourly = tokio::time::interval(std::time::Duration::from_secs(3600));
            loop {
                hourly.tick().await;
                let now = std::time::SystemTime::now();
                match tokio::task::block_in_place(|| agent.store().compact(retention, now)) {
                    Ok(c) if c.removed > 0 => tracing::info!(
                        removed = c.removed,
                        oldest_seq = c.oldest_seq,
                        kept_states = c.kept_states,
                        "event journal compacted"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "event journal compaction failed"),
                }
                let usage = agent.usage_book();
                if let Err(e) =
                    tokio::task::block_in_place(|| usage.compact(retention.max_age, now))
                {
                    tracing::warn!(error = %e, "usage log compaction failed");
                }
            }
        });
    }

    // The journal is the outbox: with a broker, every event is published
    // in seq order, resuming after the last one it acknowledged.
    // Each publisher's lag (journaled vs acknowledged) for `/metrics`.
    let mut publishers = Vec::new();
    if let Some(nats) = &cfg.nats {
        use stratus_core::outbox::{Publisher, PublisherLag};
        let broker =
            stratus_core::nats::Broker::connect(nats, &format!("agentd {}", nats.host), false)
                .await
                .context("NATS")?;
        let outbox = Arc::new(agent::publisher::AgentOutbox::new(
            agent.shared_store(),
            &nats.host,
        ));
        let store = agent.shared_store();
        publishers.push(PublisherLag::new(
            "events",
            Publisher::spawn(outbox, broker.clone()),
            move || store.last_seq(),
        ));
        // Usage records the same way, from the usage log.
        let a = agent.clone();
        publishers.push(PublisherLag::new(
            "usage",
            Publisher::spawn(
                Arc::new(agent::usage::UsageOutbox::new(agent.clone())),
                broker,
            ),
            move || a.usage_book().last_seq(),
        ));
        tracing::info!(url = %nats.url, host = %nats.host, stream = stratus_core::nats::STREAM,
            "publishing events to NATS");
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<VmServiceServer<Api>>().await;
    let (reflection, reflection_v1alpha) =
        stratus_pki::serve::reflection(agent::authz::SERVICE, stratus_proto::FILE_DESCRIPTOR_SET)?;
    let audit = AuditSink::from_setting(cfg.serve.audit_log.as_deref())?;
    let mut registry = prometheus_client::registry::Registry::default();
    let rpc_metrics = RpcMetricsLayer::register(&mut registry, &agent::authz::TABLE);
    let refresh = agent::metrics::register(&mut registry, agent.clone());
    stratus_pki::metrics::register_publishers(
        &mut registry,
        "stratus_agent",
        Arc::new(move || publishers.iter().map(|p| p.figures()).collect()),
    );
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = cfg.serve.metrics_listen {
        let bound = stratus_pki::metrics::spawn(addr, Arc::new(registry), refresh, async {
            let _ = metrics_stopped.await;
        })
        .await
        .with_context(|| format!("metrics listener {addr}"))?;
        tracing::info!(%bound, "metrics at http://{bound}/metrics");
    }
    let listeners = Listeners::bind(&cfg.serve).await?;
    stratus_pki::serve::reload_on_sighup(listeners.tls())?;
    tracing::info!(listen = ?listeners.description, state_dir = %cfg.state_dir.display(),
        pdisk = ?cfg.pdisk.iter().map(|p| format!("{}={}", p.name, p.url)).collect::<Vec<_>>(),
        bridge = %cfg.bridge, initiator = %cfg.initiator_iqn,
        attach = cfg.attach.name(), chap_mutual = cfg.chap_mutual, "agentd ready");
    // Reconciled and listening: systemd may start what depends on us.
    let systemd = ServiceManager::from_env();
    systemd.ready(&format!("serving on {}", listeners.description.join(", ")));
    tonic::transport::Server::builder()
        // The audit layer outside the gate: refused calls are recorded too.
        .layer(AuditLayer::new(
            agent::authz::SERVICE,
            agent::authz::MUTATING,
            audit,
        ))
        // Every call is timed, the refused ones too.
        .layer(rpc_metrics)
        .layer(GateLayer::new(Arc::new(agent::authz::check)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(VmServiceServer::new(Api::new(agent)))
        .serve_with_incoming_shutdown(listeners.incoming(), async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down; guests keep running");
            systemd.stopping("shutting down; guests keep running");
        })
        .await
        .context("serving gRPC")?;
    let _ = stop_metrics.send(());
    Ok(())
}
