//! Authorization tables: one written rule per RPC, decided from the caller's
//! role before the handler runs (see [`crate::gate`]). Each daemon keeps only
//! its own [`Table`] (`pdisk::authz`, `agent::authz`); this module holds the
//! shared mechanism, the standard services' rule, and the check that a table
//! has exactly one rule for every RPC its service declares.
//!
//! - a caller without a usable identity gets `Unauthenticated`;
//! - a caller whose role the rule does not list gets `PermissionDenied`;
//! - a method of the daemon's service without a rule is refused
//!   (`PermissionDenied`): a new RPC is closed until someone writes its rule;
//! - health and reflection are open to every connected caller (the TLS
//!   handshake or the local socket's permissions already let it in).

use prost::Message;
use tonic::Status;

use crate::identity::{Caller, Identity, Role, Transport};

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

/// One daemon's authorization: its gRPC service and a rule per RPC.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    /// The service's full name, e.g. `pdisk.v1.VolumeService`.
    pub service: &'static str,
    pub rules: &'static [Rule],
}

impl Table {
    /// The gate's decision for a call to `path` by `caller`.
    pub fn check(&self, path: &str, caller: Option<&Caller>) -> Result<(), Status> {
        check(self.service, self.rules, path, caller)
    }

    /// The gate's answer to a caller holding a certificate of `role` calling
    /// `method`, as a code: what a daemon's matrix test compares.
    pub fn decision(&self, method: &str, role: Role) -> Result<(), tonic::Code> {
        let caller = Caller {
            transport: Transport::Mtls,
            identity: Ok(Identity::new(role, "x")),
        };
        self.check(&format!("/{}/{method}", self.service), Some(&caller))
            .map_err(|s| s.code())
    }

    /// The methods the service declares in `descriptor_set` (an encoded
    /// `FileDescriptorSet`, e.g. `stratus_proto::FILE_DESCRIPTOR_SET`).
    pub fn rpcs(&self, descriptor_set: &[u8]) -> Vec<String> {
        let (package, name) = self.service.rsplit_once('.').unwrap_or(("", self.service));
        let set = prost_types::FileDescriptorSet::decode(descriptor_set)
            .expect("the descriptor set is an encoded FileDescriptorSet");
        set.file
            .iter()
            .filter(|f| f.package() == package)
            .flat_map(|f| f.service.iter())
            .filter(|s| s.name() == name)
            .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
            .collect()
    }

    /// The methods of the service whose answer is a stream (server or
    /// bidirectional streaming): their outcome is in the trailers, after
    /// the response headers the audit layer reads.
    pub fn server_streaming(&self, descriptor_set: &[u8]) -> Vec<String> {
        let (package, name) = self.service.rsplit_once('.').unwrap_or(("", self.service));
        let set = prost_types::FileDescriptorSet::decode(descriptor_set)
            .expect("the descriptor set is an encoded FileDescriptorSet");
        set.file
            .iter()
            .filter(|f| f.package() == package)
            .flat_map(|f| f.service.iter())
            .filter(|s| s.name() == name)
            .flat_map(|s| s.method.iter())
            .filter(|m| m.server_streaming())
            .map(|m| m.name().to_owned())
            .collect()
    }

    /// What is wrong with `mutating` (the audited RPCs) and `reads` against
    /// the service's `rpcs` and its `streamed` answers: an RPC in neither
    /// list or in both, a name that is no RPC, a streamed answer that
    /// mutates (the audit judges a call by its response headers, and a
    /// stream's code comes in its trailers). Empty when every RPC is
    /// audited exactly when it changes something.
    pub fn audit_errors(
        rpcs: &[String],
        streamed: &[String],
        mutating: &[&str],
        reads: &[&str],
    ) -> Vec<String> {
        let mut errors = Vec::new();
        for m in rpcs {
            match (mutating.contains(&m.as_str()), reads.contains(&m.as_str())) {
                (true, true) => errors.push(format!("{m} is listed as mutating and as a read")),
                (false, false) => errors.push(format!(
                    "{m} is neither mutating (audited) nor a read: classify it"
                )),
                _ => {}
            }
        }
        for m in mutating.iter().chain(reads) {
            if !rpcs.iter().any(|r| r == m) {
                errors.push(format!("{m} is no RPC"));
            }
        }
        for m in streamed {
            if mutating.contains(&m.as_str()) {
                errors.push(format!(
                    "{m} answers with a stream: its outcome is not in the headers the audit reads"
                ));
            }
        }
        errors
    }

    /// What is wrong with the table against the service's `rpcs`: an RPC
    /// with no rule or several, a rule for a method the service lacks.
    /// Empty when every RPC has exactly one rule.
    pub fn coverage_errors(&self, rpcs: &[String]) -> Vec<String> {
        let mut errors = Vec::new();
        for m in rpcs {
            let n = self.rules.iter().filter(|r| r.method == m).count();
            if n != 1 {
                errors.push(format!("{m} has {n} rules"));
            }
        }
        for r in self.rules {
            if !rpcs.iter().any(|m| m == r.method) {
                errors.push(format!("{} is no RPC of {}", r.method, self.service));
            }
        }
        errors
    }
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

    /// A descriptor set holding `a.v1.S` with `methods`, and `b.v1.S` with
    /// `Other` (a same-named service of another package is not ours).
    fn descriptor_set(methods: &[&str]) -> Vec<u8> {
        use prost_types::{
            FileDescriptorProto, FileDescriptorSet, MethodDescriptorProto, ServiceDescriptorProto,
        };
        let file = |package: &str, methods: &[&str]| FileDescriptorProto {
            package: Some(package.into()),
            service: vec![ServiceDescriptorProto {
                name: Some("S".into()),
                method: methods
                    .iter()
                    .map(|m| MethodDescriptorProto {
                        name: Some((*m).into()),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        FileDescriptorSet {
            file: vec![file("a.v1", methods), file("b.v1", &["Other"])],
        }
        .encode_to_vec()
    }

    #[test]
    fn coverage_finds_missing_doubled_and_stray_rules() {
        const DOUBLED: &[Rule] = &[
            Rule {
                method: "Get",
                roles: &[Role::Admin],
                note: "",
            },
            Rule {
                method: "Get",
                roles: &[Role::Agent],
                note: "",
            },
            Rule {
                method: "Gone",
                roles: &[Role::Admin],
                note: "",
            },
        ];
        let table = Table {
            service: "a.v1.S",
            rules: TABLE,
        };
        let rpcs = table.rpcs(&descriptor_set(&["Get"]));
        assert_eq!(rpcs, ["Get"]);
        assert!(table.coverage_errors(&rpcs).is_empty());

        let rpcs = table.rpcs(&descriptor_set(&["Get", "Put"]));
        assert_eq!(table.coverage_errors(&rpcs), ["Put has 0 rules"]);

        let doubled = Table {
            service: "a.v1.S",
            rules: DOUBLED,
        };
        assert_eq!(
            doubled.coverage_errors(&["Get".to_owned()]),
            ["Get has 2 rules", "Gone is no RPC of a.v1.S"]
        );
    }

    #[test]
    fn decision_is_the_gates_code_for_a_role() {
        let table = Table {
            service: "a.v1.S",
            rules: TABLE,
        };
        assert_eq!(table.decision("Get", Role::Admin), Ok(()));
        assert_eq!(
            table.decision("Get", Role::Agent),
            Err(tonic::Code::PermissionDenied)
        );
    }
}
