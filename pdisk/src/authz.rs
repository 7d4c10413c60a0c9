//! Who may call which pdiskd RPC: one rule per RPC, checked at the gate
//! (`stratus_pki::gate`) from the caller's role before any handler runs.
//!
//! Until volumes carry an owning project, `project` callers are refused
//! everywhere and `frontend` callers too (both would otherwise see every
//! project's volumes); `agent` callers get what an agentd needs for its
//! guests; `admin` everything; `server` certificates nothing.

use stratus_pki::authz::Rule;
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

/// The gate's check for pdiskd.
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
            .filter(|f| f.package() == "pdisk.v1")
            .flat_map(|f| f.service.iter())
            .filter(|s| s.name() == "VolumeService")
            .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
            .collect()
    }

    #[test]
    fn every_rpc_has_exactly_one_rule() {
        let rpcs = rpcs();
        assert!(rpcs.len() >= 16, "{rpcs:?}");
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
