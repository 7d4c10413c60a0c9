//! One hyperconverged test host for the agent's suites: a network
//! namespace of the test's own with a bridge, an XFS pool, tgtd and pdiskd
//! on that pool, and agentd using them; gRPC clients made inside the
//! namespace. Suites with more on the host (an httpd, a second pdiskd) wrap
//! it in a struct of their own.

use std::future::Future;
use std::path::Path;

use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use tonic::transport::Channel;

use crate::{guest_dir, sha256_of, Agentd, Httpd, NetNs, Pdiskd, Tgtd, XfsPool};

/// The bridge every guest NIC of an [`AgentHost`] joins.
pub const BRIDGE: &str = "stbr0";

/// Fields drop in order: agentd (and its guests) first, the namespace last.
pub struct AgentHost {
    pub agentd: Agentd,
    pub pdiskd: Pdiskd,
    pub tgtd: Tgtd,
    pub pool: XfsPool,
    pub ns: NetNs,
}

/// The test guest's qcow2 image served over HTTP inside the host's namespace.
pub struct ServedGuest {
    pub httpd: Httpd,
    pub url: String,
    pub sha256: String,
    pub size: u64,
}

impl AgentHost {
    /// A pool of `pool_mib` MiB; agentd with `agentd_flags` besides the usual.
    pub fn start(pool_mib: u64, agentd_flags: &[&str]) -> AgentHost {
        AgentHost::start_agentd(pool_mib, &[], |dir, ns, pdisk| {
            Agentd::start_in_with(dir, ns, pdisk, BRIDGE, agentd_flags)
        })
    }

    /// The same with `pdiskd_flags` for pdiskd besides the usual (e.g. a
    /// `--quarantine-period`; the harness's default is 0).
    pub fn start_with_pdiskd(
        pool_mib: u64,
        agentd_flags: &[&str],
        pdiskd_flags: &[&str],
    ) -> AgentHost {
        AgentHost::start_agentd(pool_mib, pdiskd_flags, |dir, ns, pdisk| {
            Agentd::start_in_with(dir, ns, pdisk, BRIDGE, agentd_flags)
        })
    }

    /// A host whose agentd and pdiskd both know it as `host_id` (issue
    /// 16): pdisk volumes are opened directly, with no iSCSI target.
    pub fn start_same_host(pool_mib: u64, host_id: &str, agentd_flags: &[&str]) -> AgentHost {
        let mut flags = vec!["--host-id", host_id];
        flags.extend_from_slice(agentd_flags);
        AgentHost::start_with_pdiskd(pool_mib, &flags, &["--host-id", host_id])
    }

    /// The same with `agentd-failpoints`, for crash-point walks.
    pub fn start_failpoints(pool_mib: u64) -> AgentHost {
        AgentHost::start_agentd(pool_mib, &[], |dir, ns, pdisk| {
            Agentd::start_failpoints_in(dir, ns, pdisk, BRIDGE)
        })
    }

    fn start_agentd(
        pool_mib: u64,
        pdiskd_flags: &[&str],
        agentd: impl FnOnce(&Path, &NetNs, &str) -> Agentd,
    ) -> AgentHost {
        let ns = NetNs::new();
        ns.add_bridge(BRIDGE);
        let pool = XfsPool::new(pool_mib);
        let tgtd = Tgtd::start_in(pool.dir.path(), Some(&ns));
        let pdiskd = Pdiskd::start_in_with(&pool, &tgtd, Some(&ns), pdiskd_flags);
        let agentd = agentd(pool.dir.path(), &ns, &pdiskd.url());
        AgentHost {
            agentd,
            pdiskd,
            tgtd,
            pool,
            ns,
        }
    }

    /// Runs `f` with a client of agentd, inside the namespace.
    pub fn agent<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(VmServiceClient<Channel>) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let url = self.agentd.url();
        self.ns.block_on(move || async move {
            f(VmServiceClient::new(crate::channel(&url).await)).await
        })
    }

    /// Creates `spec` in `project` ("": none) and starts it, as a client
    /// does (no request id); the started guest. Panics on a refusal.
    pub fn launch(&self, project: &str, spec: pb::VmSpec) -> pb::Vm {
        let project = project.to_owned();
        self.agent(move |mut c| async move {
            let name = spec.name.clone();
            c.create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                project: project.clone(),
                spec: Some(spec),
            })
            .await
            .unwrap();
            c.start_vm(pb::VmRequest {
                request_id: String::new(),
                project,
                vm: name,
            })
            .await
            .unwrap()
            .into_inner()
        })
    }

    /// Runs `f` with a client of pdiskd, inside the namespace.
    pub fn pdisk<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(VolumeServiceClient<Channel>) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let url = self.pdiskd.url();
        self.ns.block_on(move || async move {
            f(VolumeServiceClient::new(crate::channel(&url).await)).await
        })
    }

    /// Serves a copy of the test guest's qcow2 image from `POOL/www`.
    pub fn serve_guest(&self) -> ServedGuest {
        let dir = self.pool.dir.path().join("www");
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("guest.qcow2");
        std::fs::copy(guest_dir().join("stratus-guest.qcow2"), &img).unwrap();
        let httpd = Httpd::start_in(&self.ns, &dir);
        ServedGuest {
            url: httpd.url("guest.qcow2"),
            sha256: sha256_of(&img),
            size: std::fs::metadata(&img).unwrap().len(),
            httpd,
        }
    }
}

/// `Deref` and `DerefMut` to the [`AgentHost`] in field `$field` of a
/// suite's own host type (one with more on the host: an httpd, helpers).
#[macro_export]
macro_rules! wraps_agent_host {
    ($host:ty, $field:tt) => {
        impl std::ops::Deref for $host {
            type Target = $crate::AgentHost;
            fn deref(&self) -> &$crate::AgentHost {
                &self.$field
            }
        }

        impl std::ops::DerefMut for $host {
            fn deref_mut(&mut self) -> &mut $crate::AgentHost {
                &mut self.$field
            }
        }
    };
}
