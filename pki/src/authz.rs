//! Authorization tables: one written rule per RPC, decided from the caller's
//! role before the handler runs (see [`crate::gate`]). Each daemon keeps its
//! own table (`pdisk::authz`, `agent::authz`); this module holds the shared
//! mechanism and the standard services' rule.
//!
//! - a caller without a usable identity gets `Unauthenticated`;
//! - a caller whose role the rule does not list gets `PermissionDenied`;
//! - a method of the daemon's service without a rule is refused
//!   (`PermissionDenied`): a new RPC is closed until someone writes its rule;
//! - health and reflection are open to every connected caller (the TLS
//!   handshake or the local socket's permissions already let it in).

use tonic::Status;

use crate::identity::{Caller, Role};

/// Who may call one RPC, and what the handler still checks.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// The method name, e.g. `CreateVolume`.
    pub method: &'static str,
    /// Roles allowed past the gate.
    pub roles: &'static [Role],
    /// The rule in words (what the handler scopes), for the README and tests.
    pub note: &'static str,
}

/// Services every caller may use.
const OPEN_SERVICES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Decides a call to `path` by `caller` against `service`'s `table`
/// (`service` is the full name, e.g. `pdisk.v1.VolumeService`).
pub fn check(
    service: &str,
    table: &[Rule],
    path: &str,
    caller: Option<&Caller>,
) -> Result<(), Status> {
    if OPEN_SERVICES.iter().any(|p| path.starts_with(p)) {
        return Ok(());
    }
    let identity = match caller.map(|c| &c.identity) {
        Some(Ok(i)) => i,
        Some(Err(why)) => return Err(Status::unauthenticated(why.clone())),
        None => return Err(Status::unauthenticated("no caller identity")),
    };
    let method = path
        .strip_prefix('/')
        .and_then(|p| p.strip_prefix(service))
        .and_then(|p| p.strip_prefix('/'));
    let Some(method) = method else {
        return Err(Status::unimplemented(format!("no such service: {path}")));
    };
    let Some(rule) = table.iter().find(|r| r.method == method) else {
        return Err(Status::permission_denied(format!(
            "{method} has no authorization rule"
        )));
    };
    if rule.roles.contains(&identity.role) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{} may not call {method} (allowed: {})",
            identity,
            rule.roles
                .iter()
                .map(|r| r.name())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// The table as Markdown rows (`| RPC | roles | rule |`), for the README.
pub fn markdown(table: &[Rule]) -> String {
    table
        .iter()
        .map(|r| {
            let roles: Vec<&str> = r.roles.iter().map(|r| r.name()).collect();
            format!("| {} | {} | {} |\n", r.method, roles.join(", "), r.note)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, Transport};

    const TABLE: &[Rule] = &[Rule {
        method: "Get",
        roles: &[Role::Admin],
        note: "",
    }];

    fn caller(role: Role) -> Caller {
        Caller {
            transport: Transport::Mtls,
            identity: Ok(Identity::new(role, "x")),
        }
    }

    #[test]
    fn codes_follow_identity_then_role_then_rule() {
        let code =
            |path: &str, c: Option<&Caller>| check("a.v1.S", TABLE, path, c).map_err(|s| s.code());
        assert_eq!(code("/a.v1.S/Get", Some(&caller(Role::Admin))), Ok(()));
        assert_eq!(
            code("/a.v1.S/Get", Some(&caller(Role::Project))),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            code("/a.v1.S/New", Some(&caller(Role::Admin))),
            Err(tonic::Code::PermissionDenied)
        );
        let nobody = Caller {
            transport: Transport::Local,
            identity: Err("uid 1000".into()),
        };
        assert_eq!(
            code("/a.v1.S/Get", Some(&nobody)),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(code("/a.v1.S/Get", None), Err(tonic::Code::Unauthenticated));
        assert_eq!(code("/grpc.health.v1.Health/Check", Some(&nobody)), Ok(()));
    }
}
