//! Two agent hosts on one machine, for live migration (agent/tests/migrate.rs,
//! agent/tests/faults_migrate.rs, stratus-bench's migrate scenario): two
//! network namespaces joined by a veth pair (A [`MIGRATION_HOST_A`], B
//! [`MIGRATION_HOST_B`]), each with its bridges and agentd listening on
//! every address of its namespace, with its own certificate and initiator
//! ([`INITIATOR`], [`OTHER_INITIATOR`]); one pdiskd and tgtd on A, reached
//! by both across the link.

use stratus_pki::Role;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;

use crate::{
    channel, Agentd, NetNs, Pdiskd, TestPki, Tgtd, XfsPool, INITIATOR, MIGRATION_HOST_A,
    MIGRATION_HOST_B, OTHER_INITIATOR,
};

/// Hosts A (0) and B (1). Fields drop in order: the agentds (and their
/// guests) first, then storage, the namespaces last.
pub struct TwoHosts {
    pub hosts: [Agentd; 2],
    pub pdiskd: Pdiskd,
    pub tgtd: Tgtd,
    pub pool: XfsPool,
    pub ns: [NetNs; 2],
}

impl TwoHosts {
    /// Both hosts with `bridge` as agentd's bridge, host `i` also with the
    /// bridges `more[i]` (agentd allows them only if `extra[i]` says so)
    /// and agentd flags `extra[i]`; a pool of `pool_mib` MiB.
    pub fn start(bridge: &str, pool_mib: u64, more: [&[&str]; 2], extra: [&[&str]; 2]) -> TwoHosts {
        let (ns_a, ns_b) = (NetNs::new(), NetNs::new());
        for (ns, more) in [(&ns_a, more[0]), (&ns_b, more[1])] {
            ns.add_bridge(bridge);
            for b in more {
                ns.add_bridge(b);
            }
        }
        ns_a.ip(&[
            "link", "add", "mig-a", "type", "veth", "peer", "name", "mig-b", "netns", &ns_b.name,
        ]);
        for (ns, dev, addr) in [
            (&ns_a, "mig-a", MIGRATION_HOST_A),
            (&ns_b, "mig-b", MIGRATION_HOST_B),
        ] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        let pool = XfsPool::new(pool_mib);
        let tgtd = Tgtd::start_in_at(pool.dir.path(), &ns_a, MIGRATION_HOST_A);
        let pdiskd = Pdiskd::start_in_at(&pool, &tgtd, &ns_a, MIGRATION_HOST_A);
        let dir = |h: &str| {
            let d = pool.dir.path().join(h);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        // Both listen on their host's address: guests move both ways.
        let a = Agentd::start_in_as(
            &dir("host-a"),
            &ns_a,
            &pdiskd.url(),
            bridge,
            INITIATOR,
            &TestPki::shared().files("agent-test-host"),
            extra[0],
        );
        let b_tls = TestPki::shared().issue(
            Role::Agent,
            "host-b",
            Some(OTHER_INITIATOR),
            &["127.0.0.1", "localhost", MIGRATION_HOST_B],
        );
        let b = Agentd::start_in_as(
            &dir("host-b"),
            &ns_b,
            &pdiskd.url(),
            bridge,
            OTHER_INITIATOR,
            &b_tls,
            extra[1],
        );
        TwoHosts {
            hosts: [a, b],
            pdiskd,
            tgtd,
            pool,
            ns: [ns_a, ns_b],
        }
    }

    /// Host `i`'s address as the other agentd dials it.
    pub fn url(&self, i: usize) -> String {
        let ip = [MIGRATION_HOST_A, MIGRATION_HOST_B][i];
        format!("https://{ip}:{}", self.hosts[i].listen.port())
    }

    /// Runs `f` with a client of host `i`'s agentd, from its namespace.
    pub fn on<F, Fut, T>(&self, i: usize, f: F) -> T
    where
        F: FnOnce(VmServiceClient<tonic::transport::Channel>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let url = self.hosts[i].url();
        self.ns[i]
            .block_on(move || async move { f(VmServiceClient::new(channel(&url).await)).await })
    }

    /// The initiators of pdisk's export of `volume`, sorted (none when not
    /// exported).
    pub fn export_initiators(&self, volume: &str) -> Vec<String> {
        let (url, volume) = (self.pdiskd.url(), volume.to_string());
        let mut out: Vec<String> = self.ns[0].block_on(move || async move {
            let mut c = VolumeServiceClient::new(channel(&url).await);
            c.list_exports(pdpb::ListExportsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .exports
                .into_iter()
                .filter(|e| e.volume_name == volume)
                .flat_map(|e| e.initiators)
                .collect()
        });
        out.sort();
        out
    }
}
