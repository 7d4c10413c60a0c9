//! Who may call which pdiskd RPC: one rule per RPC, checked at the gate
//! (`stratus_pki::gate`) from the caller's role before any handler runs.
//!
//! Until volumes carry an owning project, `project` callers are refused
//! everywhere and `frontend` callers too (both would otherwise see every
//! project's volumes); `agent` callers get what an agentd needs for its
//! guests; `admin` everything; `server` certificates nothing.

use stratus_pki::authz::{Rule, Table};
use stratus_pki::{Caller, Role};
use tonic::Status;

/// The gRPC service the table is for.
pub const SERVICE: &str = "pdisk.v1.VolumeService";

const ADMIN: &[Role] = &[Role::Admin];
const ADMIN_AGENT: &[Role] = &[Role::Admin, Role::Agent];

/// One rule per RPC of `pdisk.v1.VolumeService`.
pub const RULES: &[Rule] = &[
    Rule {
        method: "CreateVolume",
        roles: ADMIN_AGENT,
        note: "admin; agent (image bases)",
    },
    Rule {
        method: "UploadVolume",
        roles: ADMIN_AGENT,
        note: "admin; agent (image imports)",
    },
    Rule {
        method: "GetVolume",
        roles: ADMIN_AGENT,
        note: "admin; agent",
    },
    Rule {
        method: "ListVolumes",
        roles: ADMIN_AGENT,
        note: "admin; agent",
    },
    Rule {
        method: "DeleteVolume",
        roles: ADMIN_AGENT,
        note: "admin; agent (its guests' clones, evicted bases)",
    },
    Rule {
        method: "ResizeVolume",
        roles: ADMIN,
        note: "admin",
    },
    Rule {
        method: "CloneVolume",
        roles: ADMIN_AGENT,
        note: "admin; agent (guest disks from image bases)",
    },
    Rule {
        method: "CreateSnapshot",
        roles: ADMIN_AGENT,
        note: "admin; agent (SaveImage)",
    },
    Rule {
        method: "ListSnapshots",
        roles: ADMIN_AGENT,
        note: "admin; agent",
    },
    Rule {
        method: "DeleteSnapshot",
        roles: ADMIN_AGENT,
        note: "admin; agent (SaveImage)",
    },
    Rule {
        method: "ExportVolume",
        roles: ADMIN_AGENT,
        note: "admin; agent (to its own host)",
    },
    Rule {
        method: "UnexportVolume",
        roles: ADMIN_AGENT,
        note: "admin; agent (its own host)",
    },
    Rule {
        method: "ListExports",
        roles: ADMIN_AGENT,
        note: "admin; agent",
    },
    Rule {
        method: "ChecksumVolume",
        roles: ADMIN_AGENT,
        note: "admin; agent (SaveImage)",
    },
    Rule {
        method: "GetPool",
        roles: ADMIN,
        note: "admin (capacity, drift)",
    },
    Rule {
        method: "WatchProgress",
        roles: ADMIN_AGENT,
        note: "admin; agent",
    },
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
                let want = match role {
                    Role::Admin => Ok(()),
                    Role::Agent if !matches!(m.as_str(), "GetPool" | "ResizeVolume") => Ok(()),
                    _ => Err(tonic::Code::PermissionDenied),
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
