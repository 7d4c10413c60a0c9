//! Who may call which agentd RPC: one rule per RPC, checked at the gate
//! (`stratus_pki::gate`) from the caller's role before any handler runs.
//!
//! `admin` and `frontend` (a cloud front-end acting for its projects) may
//! call every RPC. Until guests carry an owning project, `project` callers
//! are refused (they would see every project's guests); `agent` and `server`
//! certificates have no business with another host's agentd.

use stratus_pki::authz::Rule;
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

/// The gate's check for agentd.
pub fn check(path: &str, caller: Option<&Caller>) -> Result<(), Status> {
    stratus_pki::authz::check(SERVICE, RULES, path, caller)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use stratus_pki::{Identity, Transport};

    fn rpcs() -> Vec<String> {
        let set =
            prost_types::FileDescriptorSet::decode(stratus_proto::FILE_DESCRIPTOR_SET).unwrap();
        set.file
            .iter()
            .filter(|f| f.package() == "agent.v1")
            .flat_map(|f| f.service.iter())
            .filter(|s| s.name() == "VmService")
            .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
            .collect()
    }

    #[test]
    fn every_rpc_has_exactly_one_rule() {
        let rpcs = rpcs();
        assert!(rpcs.len() >= 15, "{rpcs:?}");
        for m in &rpcs {
            let n = RULES.iter().filter(|r| r.method == m).count();
            assert_eq!(n, 1, "{m} has {n} rules");
        }
        for r in RULES {
            assert!(rpcs.iter().any(|m| m == r.method), "{} is no RPC", r.method);
        }
    }

    #[test]
    fn the_matrix_of_rpcs_and_roles() {
        for m in rpcs() {
            let path = format!("/{SERVICE}/{m}");
            for role in Role::ALL {
                let caller = Caller {
                    transport: Transport::Mtls,
                    identity: Ok(Identity::new(role, "x")),
                };
                let got = check(&path, Some(&caller)).map_err(|s| s.code());
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
