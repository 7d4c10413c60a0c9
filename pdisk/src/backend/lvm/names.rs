//! Names: what LVM accepts as a VG or LV name ([`LvmName`]), and the names
//! of our LVs (`pd-vol-<uuid>`, `pd-snap-<uuid>`, `pd-tmp-*`) with what an
//! LV of the VG is to us ([`Class`]).

use std::fmt;

use uuid::Uuid;

use super::super::ObjectId;
use crate::error::{Error, Result};

/// A VG or LV name LVM accepts, so nothing odd ever reaches argv: letters,
/// digits and `+_.-`, at most 127 characters, not starting with `-`, not `.`
/// or `..`; LV names also avoid LVM's reserved prefixes and suffixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvmName(String);

impl LvmName {
    /// A volume group name.
    pub fn vg(s: &str) -> Result<LvmName> {
        Self::check("volume group", s).map(|()| LvmName(s.to_owned()))
    }

    /// A logical volume name (the thin pool's).
    pub fn lv(s: &str) -> Result<LvmName> {
        Self::check("logical volume", s)?;
        let reserved_prefix = ["pvmove", "snapshot"]
            .into_iter()
            .find(|p| s.starts_with(p));
        let reserved_part = [
            "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_wcorig", "_mimage", "_mlog",
            "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_imeta", "_iorig", "_pmspare",
            "_vorigin",
        ]
        .into_iter()
        .find(|p| s.contains(p));
        if let Some(r) = reserved_prefix.or(reserved_part) {
            return Err(Error::invalid(format!(
                "logical volume name {s:?} uses {r:?}, which LVM reserves"
            )));
        }
        Ok(LvmName(s.to_owned()))
    }

    fn check(what: &str, s: &str) -> Result<()> {
        let bad = |why: &str| Err(Error::invalid(format!("{what} name {s:?} {why}")));
        if s.is_empty() {
            return bad("is empty");
        }
        if s.len() > 127 {
            return bad("is longer than 127 characters");
        }
        if s.starts_with('-') {
            return bad("starts with '-'");
        }
        if s == "." || s == ".." {
            return bad("is not a name");
        }
        if !s
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+_.-".contains(&c))
        {
            return bad("may only hold letters, digits and + _ . -");
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LvmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an LV of ours exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Object(ObjectId),
    /// An object being built, under its temporary name.
    Temporary(ObjectId),
}

pub(super) fn object_lv(id: ObjectId) -> String {
    match id {
        ObjectId::Volume(u) => format!("pd-vol-{u}"),
        ObjectId::Snapshot(u) => format!("pd-snap-{u}"),
    }
}

pub(super) fn temp_lv(id: ObjectId) -> String {
    format!("pd-tmp-{}", &object_lv(id)["pd-".len()..])
}

pub(super) fn parse_role(name: &str) -> Option<Role> {
    let (temp, rest) = match name.strip_prefix("pd-tmp-") {
        Some(r) => (true, r),
        None => (false, name.strip_prefix("pd-")?),
    };
    let uuid = |s: &str| {
        Uuid::parse_str(s)
            .ok()
            .filter(|u| u.hyphenated().to_string() == s)
    };
    let id = if let Some(u) = rest.strip_prefix("vol-") {
        ObjectId::Volume(uuid(u)?)
    } else {
        ObjectId::Snapshot(uuid(rest.strip_prefix("snap-")?)?)
    };
    Some(if temp {
        Role::Temporary(id)
    } else {
        Role::Object(id)
    })
}

/// Where an LV of the VG stands with us.
#[derive(Debug, PartialEq)]
pub(super) enum Class {
    Pool,
    Ours(Role),
    Foreign,
}
