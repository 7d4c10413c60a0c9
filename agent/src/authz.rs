//! Who may call which agentd RPC: one rule per RPC, checked at the gate
//! (`stratus_pki::gate`) from the caller's role before any handler runs.
//!
//! `admin` and `frontend` (a cloud front-end acting for its projects) may
//! call every RPC. Until guests carry an owning project, `project` callers
//! are refused (they would see every project's guests); `agent` and `server`
//! certificates have no business with another host's agentd.

use stratus_pki::authz::{Rule, Table};
use stratus_pki::{Caller, Role};
use tonic::Status;

/// The gRPC service the table is for.
pub const SERVICE: &str = "agent.v1.VmService";

const OPERATORS: &[Role] = &[Role::Admin, Role::Frontend];

/// One rule per RPC of `agent.v1.VmService`.
pub const RULES: &[Rule] = &[
    Rule {
        method: "CreateVm",
        roles: OPERATORS,
        note: "admin, frontend",
    },
    Rule {
        method: "StartVm",
        roles: OPERATORS,
        note: "admin, frontend",
    },
    Rule {
        method: "StopVm",
        roles: OPERATORS,
        note: "admin, frontend",
    },
    Rule {
        method: "RebootVm",
        roles: OPERATORS,
        note: "admin, frontend",
    },
    Rule {
        method: "PauseVm",
        roles: OPERATORS,
        note: "admin, frontend",
    },
    Rule {
        method: "ResumeVm",
        roles: OPERATORS,
        note: "admin, frontend",
    },
    Rule {
        method: "DestroyVm",
        roles: OPERATORS,
        note: "admin, frontend",
    },
    Rule {
        method: "GetVm",
        roles: OPERATORS,
        note: "admin, frontend",
    },
    Rule {
        method: "ListVms",
        roles: OPERATORS,
        note: "admin, frontend",
    },
    Rule {
        method: "WatchEvents",
        roles: OPERATORS,
        note: "admin, frontend",
    },
    Rule {
        method: "GetHost",
        roles: OPERATORS,
        note: "admin, frontend",
    },
    Rule {
        method: "PullImage",
        roles: OPERATORS,
        note: "admin, frontend",
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
        roles: OPERATORS,
        note: "admin, frontend",
    },
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
                let want = match role {
                    Role::Admin | Role::Frontend => Ok(()),
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
