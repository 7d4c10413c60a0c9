//! Who may call which agentd RPC: one rule per RPC. The gate
//! (`stratus_pki::gate`) applies the roles before any handler runs; the
//! handlers then scope every guest to the project the call acts in
//! (`stratus_pki::tenancy`): a VM of another project is NotFound.
//!
//! `admin`: everything. `frontend` (a cloud front-end): every VM call for
//! the project it names in each request, and the host's image cache.
//! `project`: its own VMs and their events. `agent` certificates (other
//! agentds) only the destination side of a live migration (and admins,
//! to clean one up by hand); `server` certificates have no business with
//! an agentd. Moving a guest between hosts is placement, the operators'
//! (admin, frontend), never a project's.

use stratus_pki::authz::{Rule, Table};
use stratus_pki::{Caller, Role};
use tonic::Status;

/// The gRPC service the table is for.
pub const SERVICE: &str = "agent.v1.VmService";

const ADMIN: &[Role] = &[Role::Admin];
/// Host-wide calls: the image cache and the host's capacity.
const OPERATORS: &[Role] = &[Role::Admin, Role::Frontend];
/// Agent-to-agent calls: a live migration's destination side.
const PEERS: &[Role] = &[Role::Admin, Role::Agent];
/// Guest calls, scoped to a project.
const TENANTS: &[Role] = &[Role::Admin, Role::Frontend, Role::Project];

/// One rule per RPC of `agent.v1.VmService`.
pub const RULES: &[Rule] = &[
    Rule {
        method: "CreateVm",
        roles: TENANTS,
        note: "in the project the call acts in; stratus.io/ labels: admin; pdisk disks of that project",
    },
    Rule {
        method: "StartVm",
        roles: TENANTS,
        note: "a VM of the project the call acts in",
    },
    Rule {
        method: "StopVm",
        roles: TENANTS,
        note: "a VM of the project the call acts in",
    },
    Rule {
        method: "RebootVm",
        roles: TENANTS,
        note: "a VM of the project the call acts in",
    },
    Rule {
        method: "PauseVm",
        roles: TENANTS,
        note: "a VM of the project the call acts in",
    },
    Rule {
        method: "ResumeVm",
        roles: TENANTS,
        note: "a VM of the project the call acts in",
    },
    Rule {
        method: "DestroyVm",
        roles: TENANTS,
        note: "a VM of the project the call acts in",
    },
    Rule {
        method: "GetVm",
        roles: TENANTS,
        note: "a VM of the project the call acts in",
    },
    Rule {
        method: "ListVms",
        roles: TENANTS,
        note: "the VMs of the project the call acts in",
    },
    Rule {
        method: "WatchEvents",
        roles: TENANTS,
        note: "the events of that project's VMs (host events: all-project callers only)",
    },
    Rule {
        method: "GetHost",
        roles: OPERATORS,
        note: "admin, frontend (host capacity)",
    },
    Rule {
        method: "PullImage",
        roles: OPERATORS,
        note: "admin, frontend (the host's image cache)",
    },
    Rule {
        method: "ListImages",
        roles: OPERATORS,
        note: "admin, frontend",
    },
    Rule {
        method: "EvictImage",
        roles: OPERATORS,
        note: "admin, frontend",
    },
    Rule {
        method: "SaveImage",
        roles: TENANTS,
        note: "from a VM of the project the call acts in",
    },
    Rule {
        method: "SetQuota",
        roles: ADMIN,
        note: "admin",
    },
    Rule {
        method: "GetQuota",
        roles: TENANTS,
        note: "of the project the call acts in",
    },
    Rule {
        method: "ListQuotas",
        roles: ADMIN,
        note: "admin",
    },
    Rule {
        method: "ListUsageRecords",
        roles: TENANTS,
        note: "the usage records of the project's guests",
    },
    Rule {
        method: "AttachDisk",
        roles: TENANTS,
        note: "to a VM of the project the call acts in; a pdisk volume of that project",
    },
    Rule {
        method: "DetachDisk",
        roles: TENANTS,
        note: "from a VM of the project the call acts in",
    },
    Rule {
        method: "AttachNic",
        roles: TENANTS,
        note: "to a VM of the project the call acts in; an allowed bridge",
    },
    Rule {
        method: "DetachNic",
        roles: TENANTS,
        note: "from a VM of the project the call acts in",
    },
    Rule {
        method: "MigrateVm",
        roles: OPERATORS,
        note: "admin, frontend (for the project it names): placement is theirs",
    },
    Rule {
        method: "PrepareIncoming",
        roles: PEERS,
        note: "another agentd (a live migration's source), admin",
    },
    Rule {
        method: "FinishIncoming",
        roles: PEERS,
        note: "another agentd (a live migration's source), admin",
    },
    Rule {
        method: "AbortIncoming",
        roles: PEERS,
        note: "another agentd (a live migration's source), admin",
    },
    Rule {
        method: "ResizeDisk",
        roles: TENANTS,
        note: "a pdisk disk of a VM of the project the call acts in",
    },
    Rule {
        method: "SetDiskQos",
        roles: TENANTS,
        note: "a disk of a VM of the project the call acts in",
    },
];

/// The RPCs that change something: each call is audited (`stratus_pki::audit`).
pub const MUTATING: &[&str] = &[
    "CreateVm",
    "StartVm",
    "StopVm",
    "RebootVm",
    "PauseVm",
    "ResumeVm",
    "DestroyVm",
    "PullImage",
    "EvictImage",
    "SaveImage",
    "SetQuota",
    "AttachDisk",
    "DetachDisk",
    "AttachNic",
    "DetachNic",
    "MigrateVm",
    "PrepareIncoming",
    "FinishIncoming",
    "AbortIncoming",
    "ResizeDisk",
    "SetDiskQos",
];

/// agentd's table.
pub const TABLE: Table = Table {
    service: SERVICE,
    rules: RULES,
};

/// The gate's check for agentd.
pub fn check(path: &str, caller: Option<&Caller>) -> Result<(), Status> {
    TABLE.check(path, caller)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpcs() -> Vec<String> {
        TABLE.rpcs(stratus_proto::FILE_DESCRIPTOR_SET)
    }

    /// The RPCs that change nothing: with [`MUTATING`], every RPC.
    const READS: &[&str] = &[
        "GetVm",
        "ListVms",
        "WatchEvents",
        "GetHost",
        "ListImages",
        "GetQuota",
        "ListQuotas",
        "ListUsageRecords",
    ];

    #[test]
    fn every_rpc_is_audited_exactly_when_it_changes_something() {
        let rpcs = rpcs();
        let streamed = TABLE.server_streaming(stratus_proto::FILE_DESCRIPTOR_SET);
        assert_eq!(streamed, vec!["WatchEvents".to_string()]);
        assert_eq!(
            Table::audit_errors(&rpcs, &streamed, MUTATING, READS),
            Vec::<String>::new()
        );
    }

    #[test]
    fn every_rpc_has_exactly_one_rule() {
        let rpcs = rpcs();
        assert!(rpcs.len() >= 15, "{rpcs:?}");
        assert_eq!(TABLE.coverage_errors(&rpcs), Vec::<String>::new());
    }

    #[test]
    fn the_matrix_of_rpcs_and_roles() {
        for m in rpcs() {
            let path = format!("/{SERVICE}/{m}");
            for role in Role::ALL {
                let got = TABLE.decision(&m, role);
                let host_wide = matches!(
                    m.as_str(),
                    "GetHost" | "PullImage" | "ListImages" | "EvictImage"
                );
                let admin_only = matches!(m.as_str(), "SetQuota" | "ListQuotas");
                let peer = matches!(
                    m.as_str(),
                    "PrepareIncoming" | "FinishIncoming" | "AbortIncoming"
                );
                let operators = m == "MigrateVm";
                let want = match role {
                    Role::Admin => Ok(()),
                    Role::Agent if peer => Ok(()),
                    _ if peer => Err(tonic::Code::PermissionDenied),
                    Role::Frontend if operators => Ok(()),
                    _ if operators => Err(tonic::Code::PermissionDenied),
                    Role::Frontend if !admin_only => Ok(()),
                    Role::Project if !host_wide && !admin_only => Ok(()),
                    _ => Err(tonic::Code::PermissionDenied),
                };
                assert_eq!(got, want, "{m} by {role}");
            }
            assert_eq!(
                check(&path, None).unwrap_err().code(),
                tonic::Code::Unauthenticated
            );
        }
    }
}
