//! Who may call which pdiskd RPC: one rule per RPC. The gate
//! (`stratus_pki::gate`) applies the roles before any handler runs; the
//! handlers then scope every object to the project the call acts in
//! (`crate::tenancy`, `stratus_pki::tenancy`): a volume, snapshot or export
//! of another project is NotFound.
//!
//! `admin`: everything. `frontend`: the volumes of the project it names in
//! each request. `agent` (a compute host's agentd): what its guests need,
//! in the project it names (a guest's), or across projects when it names
//! none (image bases, leftovers); it may clone image bases into a project,
//! and grow a volume exported to its own initiator (a guest's disk).
//! `project`: its own volumes. `server` certificates: nothing. Only `agent`
//! and `admin` may set `stratus.io/` labels.

use stratus_pki::authz::{Rule, Table};
use stratus_pki::{Caller, Role};
use tonic::Status;

/// The gRPC service the table is for.
pub const SERVICE: &str = "pdisk.v1.VolumeService";

const ADMIN: &[Role] = &[Role::Admin];
const TENANTS: &[Role] = &[Role::Admin, Role::Frontend, Role::Agent, Role::Project];
const NOT_AGENT: &[Role] = &[Role::Admin, Role::Frontend, Role::Project];

/// One rule per RPC of `pdisk.v1.VolumeService`.
pub const RULES: &[Rule] = &[
    Rule {
        method: "CreateVolume",
        roles: TENANTS,
        note: "in the project the call acts in; a source volume or snapshot of that project (agent, admin: or an image base)",
    },
    Rule {
        method: "UploadVolume",
        roles: TENANTS,
        note: "in the project the call acts in",
    },
    Rule {
        method: "GetVolume",
        roles: TENANTS,
        note: "a volume of the project the call acts in",
    },
    Rule {
        method: "ListVolumes",
        roles: TENANTS,
        note: "the volumes of the project the call acts in",
    },
    Rule {
        method: "DeleteVolume",
        roles: TENANTS,
        note: "a volume of the project the call acts in; `now` (no quarantine): admin only, checked by the handler",
    },
    Rule {
        method: "RestoreVolume",
        roles: NOT_AGENT,
        note: "a quarantined volume of the project the call acts in (agents delete guests' disks, people restore them)",
    },
    Rule {
        method: "ResizeVolume",
        roles: TENANTS,
        note: "a volume of the project the call acts in, grown only (shrinking is refused), within its byte quota; agent: only a volume exported to the initiator its certificate binds (its guest's disk, for ResizeDisk), checked by the handler",
    },
    Rule {
        method: "FlattenVolume",
        roles: NOT_AGENT,
        note: "a volume of the project the call acts in",
    },
    Rule {
        method: "CloneVolume",
        roles: TENANTS,
        note: "a source of the project the call acts in (agent, admin: or an image base); the clone in that project",
    },
    Rule {
        method: "CreateSnapshot",
        roles: TENANTS,
        note: "of a volume of the project the call acts in",
    },
    Rule {
        method: "ListSnapshots",
        roles: TENANTS,
        note: "of the volumes of the project the call acts in",
    },
    Rule {
        method: "DeleteSnapshot",
        roles: TENANTS,
        note: "of a volume of the project the call acts in",
    },
    Rule {
        method: "ExportVolume",
        roles: TENANTS,
        note: "a volume of the project the call acts in",
    },
    Rule {
        method: "UnexportVolume",
        roles: TENANTS,
        note: "a volume of the project the call acts in",
    },
    Rule {
        method: "ListExports",
        roles: TENANTS,
        note: "the exports of the project's volumes",
    },
    Rule {
        method: "ChecksumVolume",
        roles: TENANTS,
        note: "a volume or snapshot of the project the call acts in",
    },
    Rule {
        method: "GetPool",
        roles: ADMIN,
        note: "admin (capacity, drift)",
    },
    Rule {
        method: "WatchProgress",
        roles: TENANTS,
        note: "by request id, per project: only operations of calls acting in the caller's project",
    },
    Rule {
        method: "SetQuota",
        roles: ADMIN,
        note: "admin",
    },
    Rule {
        method: "GetQuota",
        roles: NOT_AGENT,
        note: "of the project the call acts in",
    },
    Rule {
        method: "ListQuotas",
        roles: ADMIN,
        note: "admin",
    },
    Rule {
        method: "WatchEvents",
        roles: TENANTS,
        note: "the events of the volumes of the project the call acts in (admin, agent naming none: every event)",
    },
    Rule {
        method: "ListStorageUsage",
        roles: NOT_AGENT,
        note: "the storage usage records of the project the call acts in (admin naming none: every project's)",
    },
];

/// The RPCs that change something: each call is audited (`stratus_pki::audit`).
pub const MUTATING: &[&str] = &[
    "CreateVolume",
    "UploadVolume",
    "DeleteVolume",
    "RestoreVolume",
    "ResizeVolume",
    "FlattenVolume",
    "CloneVolume",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ExportVolume",
    "UnexportVolume",
    "SetQuota",
];

/// pdiskd's table.
pub const TABLE: Table = Table {
    service: SERVICE,
    rules: RULES,
};

/// The gate's check for pdiskd.
pub fn check(path: &str, caller: Option<&Caller>) -> Result<(), Status> {
    TABLE.check(path, caller)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_pki::Transport;

    fn rpcs() -> Vec<String> {
        TABLE.rpcs(stratus_proto::FILE_DESCRIPTOR_SET)
    }

    /// The RPCs that change nothing: with [`MUTATING`], every RPC.
    const READS: &[&str] = &[
        "GetVolume",
        "ListVolumes",
        "ListSnapshots",
        "ListExports",
        "ChecksumVolume",
        "GetPool",
        "WatchProgress",
        "GetQuota",
        "ListQuotas",
        "WatchEvents",
        "ListStorageUsage",
    ];

    #[test]
    fn every_rpc_is_audited_exactly_when_it_changes_something() {
        let rpcs = rpcs();
        let streamed = TABLE.server_streaming(stratus_proto::FILE_DESCRIPTOR_SET);
        assert_eq!(
            streamed,
            vec!["WatchProgress".to_string(), "WatchEvents".to_string()]
        );
        assert_eq!(
            Table::audit_errors(&rpcs, &streamed, MUTATING, READS),
            Vec::<String>::new()
        );
        // The check catches each kind of mistake.
        let missing: Vec<&str> = MUTATING.iter().copied().skip(1).collect();
        assert_eq!(
            Table::audit_errors(&rpcs, &streamed, &missing, READS).len(),
            1
        );
        let streamed_mutating = [MUTATING, &["WatchProgress"]].concat();
        let reads: Vec<&str> = READS
            .iter()
            .copied()
            .filter(|r| *r != "WatchProgress")
            .collect();
        assert_eq!(
            Table::audit_errors(&rpcs, &streamed, &streamed_mutating, &reads).len(),
            1
        );
    }

    #[test]
    fn every_rpc_has_exactly_one_rule() {
        let rpcs = rpcs();
        assert!(rpcs.len() >= 16, "{rpcs:?}");
        assert_eq!(TABLE.coverage_errors(&rpcs), Vec::<String>::new());
    }

    #[test]
    fn the_matrix_of_rpcs_and_roles() {
        for m in rpcs() {
            let path = format!("/{SERVICE}/{m}");
            for role in Role::ALL {
                let got = TABLE.decision(&m, role);
                let want = match (role, m.as_str()) {
                    (Role::Admin, _) => Ok(()),
                    (Role::Server, _)
                    | (_, "GetPool" | "SetQuota" | "ListQuotas")
                    | (
                        Role::Agent,
                        "FlattenVolume" | "RestoreVolume" | "GetQuota" | "ListStorageUsage",
                    ) => Err(tonic::Code::PermissionDenied),
                    _ => Ok(()),
                };
                assert_eq!(got, want, "{m} by {role}");
            }
            let stranger = Caller {
                transport: Transport::Local,
                identity: Err("uid 1000 is not in group stratus".into()),
            };
            assert_eq!(
                check(&path, Some(&stranger)).unwrap_err().code(),
                tonic::Code::Unauthenticated
            );
        }
    }
}
