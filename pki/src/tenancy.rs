//! Projects: which project a call acts in, what it may see, and who made an
//! object. The same rules for pdiskd and agentd; each daemon applies them to
//! its own objects (volumes, VMs).
//!
//! Every object belongs to one project, fixed at creation (`""`: no project,
//! admin-only; objects of stores older than projects load as `""`). A
//! request's `project` field names the project the call acts in:
//!
//! | caller | `project` empty | `project` = P |
//! |---|---|---|
//! | `project/NAME` | acts in NAME | P must be NAME, else `PermissionDenied` |
//! | `frontend` | `InvalidArgument` (it must say for whom) | acts in P |
//! | `admin`, `agent` | every project; creates in `""` | acts in P |
//!
//! A call acting in P sees only P's objects; any other object is
//! `NotFound`, with the message a missing object gets (no existence leak).

use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::identity::{check_name, Caller, Identity, Role};

/// Label keys in this namespace are set by Stratus itself (image bases,
/// guests' clones); only `agent` and `admin` callers may set them.
pub const RESERVED_LABEL_PREFIX: &str = "stratus.io/";

/// The projects a call may see and the project it creates in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every project (an admin or agent naming none); creates in `""`.
    All,
    /// One project.
    Project(String),
}

impl Scope {
    /// The scope of a call by `identity` naming `requested` (the request's
    /// `project` field, possibly empty).
    pub fn of(identity: &Identity, requested: &str) -> Result<Scope, Status> {
        if !requested.is_empty() {
            check_name(requested)
                .map_err(|why| Status::invalid_argument(format!("project: {why}")))?;
        }
        match identity.role {
            Role::Project if requested.is_empty() || requested == identity.name => {
                Ok(Scope::Project(identity.name.clone()))
            }
            Role::Project => Err(Status::permission_denied(format!(
                "{identity} acts only in project {}, not {requested}",
                identity.name
            ))),
            Role::Frontend if requested.is_empty() => Err(Status::invalid_argument(
                "a frontend must name the project it acts for (the request's project field)",
            )),
            Role::Frontend | Role::Admin | Role::Agent if !requested.is_empty() => {
                Ok(Scope::Project(requested.to_owned()))
            }
            Role::Admin | Role::Agent => Ok(Scope::All),
            Role::Frontend => unreachable!("handled above"),
            Role::Server => Err(Status::permission_denied(format!(
                "{identity} is a server certificate, not a caller"
            ))),
        }
    }

    /// [`Scope::of`] for a request's caller (Unauthenticated without one).
    pub fn of_caller(caller: &Caller, requested: &str) -> Result<Scope, Status> {
        match &caller.identity {
            Ok(i) => Scope::of(i, requested),
            Err(why) => Err(Status::unauthenticated(why.clone())),
        }
    }

    /// Whether an object of `project` is visible in this scope.
    pub fn sees(&self, project: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Project(p) => p == project,
        }
    }

    /// The project a new object created in this scope belongs to.
    pub fn project(&self) -> &str {
        match self {
            Scope::All => "",
            Scope::Project(p) => p,
        }
    }
}

/// Who created an object, recorded with it (an image base is trusted only
/// when an agent or an admin made it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creator {
    pub role: Role,
    pub name: String,
}

impl Creator {
    pub fn of(identity: &Identity) -> Creator {
        Creator {
            role: identity.role,
            name: identity.name.clone(),
        }
    }

    /// Made by Stratus's own infrastructure (an agent) or an admin: may
    /// carry what `stratus.io/` labels mean (an image base).
    pub fn is_trusted(&self) -> bool {
        matches!(self.role, Role::Admin | Role::Agent)
    }
}

impl std::fmt::Display for Creator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// Refuses `stratus.io/` label keys from callers other than agents and
/// admins (PermissionDenied, naming the first such key).
pub fn check_reserved_labels<'a>(
    identity: &Identity,
    keys: impl IntoIterator<Item = &'a String>,
) -> Result<(), Status> {
    if matches!(identity.role, Role::Admin | Role::Agent) {
        return Ok(());
    }
    match keys
        .into_iter()
        .find(|k| k.starts_with(RESERVED_LABEL_PREFIX))
    {
        Some(k) => Err(Status::permission_denied(format!(
            "label {k}: the {RESERVED_LABEL_PREFIX} namespace is reserved to agents and admins ({identity} may not set it)"
        ))),
        None => Ok(()),
    }
}

/// SetQuota's `unlimited` list applied to the limits to clear: each name
/// sets its slot (`Some(0)`: "remove this limit"); a name that is no quota
/// is an error naming the ones there are. Both daemons' SetQuota use it.
pub fn clear_quotas<const N: usize>(
    unlimited: &[String],
    slots: [(&str, &mut Option<u64>); N],
) -> Result<(), String> {
    let names: Vec<&str> = slots.iter().map(|(n, _)| *n).collect();
    let mut slots = slots;
    for u in unlimited {
        match slots.iter_mut().find(|(n, _)| *n == u.as_str()) {
            Some((_, slot)) => **slot = Some(0),
            None => {
                return Err(format!(
                    "unlimited: {u:?} is no quota ({})",
                    names.join(", ")
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn scope(role: Role, name: &str, requested: &str) -> Result<Scope, Code> {
        Scope::of(&Identity::new(role, name), requested).map_err(|s| s.code())
    }

    #[test]
    fn the_scope_table() {
        let p = |s: &str| Ok(Scope::Project(s.into()));
        assert_eq!(scope(Role::Project, "astro", ""), p("astro"));
        assert_eq!(scope(Role::Project, "astro", "astro"), p("astro"));
        assert_eq!(
            scope(Role::Project, "astro", "bio"),
            Err(Code::PermissionDenied)
        );
        assert_eq!(scope(Role::Frontend, "one", ""), Err(Code::InvalidArgument));
        assert_eq!(scope(Role::Frontend, "one", "bio"), p("bio"));
        assert_eq!(scope(Role::Admin, "alice", ""), Ok(Scope::All));
        assert_eq!(scope(Role::Admin, "alice", "bio"), p("bio"));
        assert_eq!(scope(Role::Agent, "compute-7", ""), Ok(Scope::All));
        assert_eq!(scope(Role::Agent, "compute-7", "bio"), p("bio"));
        assert_eq!(scope(Role::Server, "s", ""), Err(Code::PermissionDenied));
        assert_eq!(
            scope(Role::Admin, "alice", "Bad/Name"),
            Err(Code::InvalidArgument)
        );
        assert!(Scope::All.sees("x") && Scope::All.sees(""));
        assert!(Scope::Project("a".into()).sees("a"));
        assert!(!Scope::Project("a".into()).sees("") && !Scope::Project("a".into()).sees("b"));
        assert_eq!(Scope::All.project(), "");
    }

    #[test]
    fn reserved_labels_are_for_agents_and_admins() {
        let keys = ["app".to_string(), "stratus.io/image-sha256".to_string()];
        for role in [Role::Admin, Role::Agent] {
            assert!(check_reserved_labels(&Identity::new(role, "x"), &keys).is_ok());
        }
        for role in [Role::Frontend, Role::Project] {
            let err = check_reserved_labels(&Identity::new(role, "x"), &keys).unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied);
            assert!(err.message().contains("stratus.io/image-sha256"));
            assert!(check_reserved_labels(&Identity::new(role, "x"), &keys[..1]).is_ok());
        }
    }

    #[test]
    fn creators_round_trip_and_trust() {
        let c = Creator::of(&Identity::new(Role::Agent, "compute-7"));
        assert_eq!(c.to_string(), "agent/compute-7");
        let back: Creator = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(c.is_trusted());
        assert!(!Creator::of(&Identity::new(Role::Project, "a")).is_trusted());
        assert!(!Creator::of(&Identity::new(Role::Frontend, "a")).is_trusted());
    }

    #[test]
    fn unlimited_names_clear_their_quota_and_unknown_ones_are_refused() {
        let (mut a, mut b) = (None, None);
        clear_quotas(&["b".to_owned()], [("a", &mut a), ("b", &mut b)]).unwrap();
        assert_eq!((a, b), (None, Some(0)));
        let (mut a, mut b) = (None, None);
        let err = clear_quotas(&["z".to_owned()], [("a", &mut a), ("b", &mut b)]).unwrap_err();
        assert_eq!(err, "unlimited: \"z\" is no quota (a, b)");
        assert_eq!((a, b), (None, None));
    }
}
