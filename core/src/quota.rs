//! Project quotas as both daemons serve them: SetQuota's checks and write,
//! and the listing of every project's quota. Each daemon keeps its own
//! limits, usage and store ([`Book`]); the handling around them is this one.

use std::fmt::Debug;

use crate::error::{Error, Result};

/// A daemon's quota limits (None: no limit).
pub trait Limits: Copy + Default + Debug + PartialEq {
    /// Each limit with the name SetQuota's `unlimited` list gives it.
    fn named(&mut self) -> [(&'static str, &mut Option<u64>); 3];
}

/// Where a daemon keeps its quotas, and what its projects hold.
pub trait Book {
    type Limits: Limits;
    type Usage;
    /// Changes `project`'s limits: `set` ones (Some) set, the others kept,
    /// then `clear` ones removed. Returns the new limits.
    fn set_quota(
        &self,
        project: &str,
        set: Self::Limits,
        clear: Self::Limits,
    ) -> Result<Self::Limits>;
    /// `project`'s limits (none set: all None) and usage.
    fn quota(&self, project: &str) -> Result<(Self::Limits, Self::Usage)>;
    /// Every project with a quota or with objects, sorted.
    fn quota_projects(&self) -> Result<Vec<String>>;
}

/// A project's quota as the API answers it: the project, its limits and
/// its usage.
pub type Quota<B> = (String, <B as Book>::Limits, <B as Book>::Usage);

/// `old` changed by SetQuota: `set` limits (Some) set, the others kept,
/// then `clear` ones (Some) removed.
pub fn merged<L: Limits>(mut old: L, mut set: L, mut clear: L) -> L {
    for (((_, o), (_, s)), (_, c)) in old.named().into_iter().zip(set.named()).zip(clear.named()) {
        *o = s.or(*o).filter(|_| c.is_none());
    }
    old
}

/// A SetQuota request's parts.
pub struct Change<L> {
    pub project: String,
    /// The limits to set (None: keep).
    pub set: L,
    /// The names of the limits to remove.
    pub unlimited: Vec<String>,
}

/// SetQuota: notes the project for the audit, checks its name and the
/// `unlimited` names (a bad one: InvalidArgument, nothing changed), then
/// writes the change. Returns the project, its new limits and its usage.
pub fn set<B: Book, T>(
    book: &B,
    req: tonic::Request<T>,
    change: impl FnOnce(T) -> Change<B::Limits>,
) -> Result<Quota<B>> {
    let note = stratus_pki::audit::note(&req);
    let c = change(req.into_inner());
    if let Some(n) = note {
        n.set_project(&c.project);
        n.set_object(format!("quota {}", c.project));
    }
    stratus_pki::identity::check_name(&c.project)
        .map_err(|why| Error::invalid(format!("project: {why}")))?;
    let mut clear = B::Limits::default();
    stratus_pki::tenancy::clear_quotas(&c.unlimited, clear.named()).map_err(Error::invalid)?;
    let limits = book.set_quota(&c.project, c.set, clear)?;
    let (_, usage) = book.quota(&c.project)?;
    tracing::info!(project = %c.project, ?limits, "quota set");
    Ok((c.project, limits, usage))
}

/// GetQuota: the limits and usage of the project the call is scoped to;
/// InvalidArgument when it names none (an admin's call without one).
pub fn get<B: Book>(book: &B, scope: stratus_pki::tenancy::Scope) -> Result<Quota<B>> {
    let stratus_pki::tenancy::Scope::Project(project) = scope else {
        return Err(Error::invalid("GetQuota: name the project"));
    };
    let (limits, usage) = book.quota(&project)?;
    Ok((project, limits, usage))
}

/// ListQuotas: every project's limits and usage, by project.
pub fn all<B: Book>(book: &B) -> Result<Vec<Quota<B>>> {
    let mut out = Vec::new();
    for p in book.quota_projects()? {
        let (limits, usage) = book.quota(&p)?;
        out.push((p, limits, usage));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, Default, PartialEq)]
    struct L {
        a: Option<u64>,
        b: Option<u64>,
        c: Option<u64>,
    }

    impl Limits for L {
        fn named(&mut self) -> [(&'static str, &mut Option<u64>); 3] {
            [("a", &mut self.a), ("b", &mut self.b), ("c", &mut self.c)]
        }
    }

    #[test]
    fn merged_sets_keeps_and_clears() {
        let old = L {
            a: Some(1),
            b: Some(2),
            c: None,
        };
        let set = L {
            a: Some(5),
            b: None,
            c: Some(7),
        };
        let clear = L {
            c: Some(0),
            ..L::default()
        };
        assert_eq!(
            merged(old, set, clear),
            L {
                a: Some(5),
                b: Some(2),
                c: None
            }
        );
    }

    /// One project with limits `a: 3`, nothing held.
    struct OneBook;

    impl Book for OneBook {
        type Limits = L;
        type Usage = u64;
        fn set_quota(&self, _: &str, _: L, _: L) -> Result<L> {
            unreachable!()
        }
        fn quota(&self, _: &str) -> Result<(L, u64)> {
            Ok((
                L {
                    a: Some(3),
                    ..L::default()
                },
                0,
            ))
        }
        fn quota_projects(&self) -> Result<Vec<String>> {
            Ok(vec!["p".into()])
        }
    }

    #[test]
    fn get_needs_a_project_and_all_lists_each() {
        use stratus_pki::tenancy::Scope;
        let err = get(&OneBook, Scope::All).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::InvalidArgument);
        assert_eq!(err.message(), "GetQuota: name the project");
        let (p, l, _) = get(&OneBook, Scope::Project("p".into())).unwrap();
        assert_eq!((p.as_str(), l.a), ("p", Some(3)));
        assert_eq!(all(&OneBook).unwrap().len(), 1);
    }
}
