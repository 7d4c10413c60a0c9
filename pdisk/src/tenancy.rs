//! Projects at pdiskd's gRPC edge: which volumes a call may see and touch,
//! in the project it acts in ([`stratus_pki::tenancy::Scope`]). Handlers
//! resolve every ref through a [`Call`] before the service sees it, and pass
//! the service the UUID they resolved, so an operation can only reach an
//! object its caller may see. A volume (or snapshot, or export) outside the
//! scope is NotFound with the very message a missing one gets.
//!
//! Snapshots and exports belong to their volume's project.

use stratus_pki::audit::AuditNote;
use stratus_pki::tenancy::{check_reserved_labels, Creator, Scope};
use stratus_pki::{Caller, Identity, Role};
use tonic::{Request, Status};

use crate::error::{Error, Result};
use crate::service::{is_image_base, Owner, PoolService};
use crate::store::{NameScope, SnapshotRecord, VolumeRecord};
use crate::types::Labels;

/// One call's caller and the project scope it acts in.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub identity: Identity,
    pub scope: Scope,
    /// Where the audit layer wants the call's project and object (mutating
    /// calls only).
    audit: Option<AuditNote>,
}

impl Call {
    /// The call of `caller` naming `project` in its request.
    pub fn new(caller: &Caller, project: &str) -> Result<Call, Status> {
        let identity = caller.identity.clone().map_err(Status::unauthenticated)?;
        let scope = Scope::of(&identity, project)?;
        Ok(Call {
            identity,
            scope,
            audit: None,
        })
    }

    /// [`Call::new`] for a request the audit layer may have noted.
    pub fn audited<T>(req: &Request<T>, caller: &Caller, project: &str) -> Result<Call, Status> {
        let mut call = Call::new(caller, project)?;
        call.audit = stratus_pki::audit::note(req);
        if let Some(n) = &call.audit {
            n.set_project(call.scope.project());
        }
        Ok(call)
    }

    /// Names the object of this call in its audit record.
    pub fn note(&self, object: impl Into<String>) {
        if let Some(n) = &self.audit {
            n.set_object(object);
        }
    }

    /// Splits a request into its call (caller + its `project` field) and
    /// its message.
    pub fn split<T>(req: Request<T>, project: impl Fn(&T) -> &str) -> Result<(Call, T), Status> {
        let caller = stratus_pki::gate::caller(&req)?.clone();
        let call = Call::audited(&req, &caller, project(req.get_ref()))?;
        Ok((call, req.into_inner()))
    }

    /// Who owns what this call creates.
    pub fn owner(&self) -> Owner {
        Owner {
            project: self.scope.project().to_owned(),
            creator: Some(Creator::of(&self.identity)),
        }
    }

    /// The progress hub's key of this call's request id (see
    /// [`crate::progress::key`]).
    pub fn progress_key(&self, request_id: &str) -> Result<String> {
        crate::progress::key(self.scope.project(), request_id)
    }

    /// Refuses `stratus.io/` labels unless the caller is an agent or an admin.
    pub fn check_labels(&self, labels: &Labels) -> Result<(), Status> {
        check_reserved_labels(&self.identity, labels.keys())
    }

    pub fn sees_volume(&self, v: &VolumeRecord) -> bool {
        self.scope.sees(&v.project)
    }

    /// Where names are looked up: names are unique per project, so a name
    /// means the object of that name in the project the call acts in.
    pub fn names(&self) -> NameScope<'_> {
        match &self.scope {
            Scope::All => NameScope::All,
            Scope::Project(p) => NameScope::Project(p),
        }
    }

    /// The volume `r` names, if this call may see it.
    pub fn volume(&self, svc: &PoolService, r: &str) -> Result<VolumeRecord> {
        self.note(format!("volume {r}"));
        let v = svc.store().find_volume_in(self.names(), r)?;
        if self.sees_volume(&v) {
            Ok(v)
        } else {
            Err(Error::not_found(format!("volume {r} not found")))
        }
    }

    /// The quarantined volume `r` names (its UUID, or a name only one
    /// quarantined volume of the call's scope has), if this call may see it.
    pub fn quarantined_volume(&self, svc: &PoolService, r: &str) -> Result<VolumeRecord> {
        self.note(format!("volume {r}"));
        let v = svc.store().find_quarantined_in(self.names(), r)?;
        if self.sees_volume(&v) {
            Ok(v)
        } else {
            Err(Error::not_found(format!(
                "quarantined volume {r} not found"
            )))
        }
    }

    /// The volume a clone or a create copies from: one this call may see,
    /// or, for agents and admins, an image base (of no project) that they
    /// clone into the project they act in.
    pub fn source_volume(&self, svc: &PoolService, r: &str) -> Result<VolumeRecord> {
        let infra = matches!(self.identity.role, Role::Agent | Role::Admin);
        let v = match svc.store().find_volume_in(self.names(), r) {
            // An image base is of no project: found by name from any.
            Err(e) if infra && e.kind() == crate::error::ErrorKind::NotFound => svc
                .store()
                .find_volume_in(NameScope::Project(""), r)
                .map_err(|_| e)?,
            found => found?,
        };
        let base_for_infra = infra && is_image_base(&v);
        if self.sees_volume(&v) || base_for_infra {
            Ok(v)
        } else {
            Err(Error::not_found(format!("volume {r} not found")))
        }
    }

    /// The snapshot `r` names, if this call may see its volume.
    pub fn snapshot(&self, svc: &PoolService, r: &str) -> Result<SnapshotRecord> {
        self.note(format!("snapshot {r}"));
        let s = svc.store().find_snapshot_in(self.names(), r)?;
        if self.sees_project_of(svc, s.volume)? {
            Ok(s)
        } else {
            Err(Error::not_found(format!("snapshot {r} not found")))
        }
    }

    /// Whether this call sees volume `uuid` (and so its snapshots and export).
    pub fn sees_project_of(&self, svc: &PoolService, uuid: uuid::Uuid) -> Result<bool> {
        if self.scope == Scope::All {
            return Ok(true);
        }
        Ok(svc
            .store()
            .volume(uuid)?
            .is_some_and(|v| self.sees_volume(&v)))
    }
}

#[cfg(test)]
#[path = "tenancy_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "requests_tests.rs"]
mod requests_tests;
