//! Host taps in memory ([`FakeNet`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::net::{HostNet, TapName};
use stratus_core::error::{Error, Result};

use super::{injected, Failures};

/// Taps in memory: name → (bridge, vlan).
#[derive(Default)]
pub struct FakeNet {
    pub failures: Failures,
    taps: Mutex<BTreeMap<String, (Option<String>, u16)>>,
}

impl FakeNet {
    pub fn new() -> Arc<FakeNet> {
        Arc::default()
    }

    /// Names of the taps that exist.
    pub fn taps(&self) -> Vec<String> {
        self.taps.lock().unwrap().keys().cloned().collect()
    }

    /// A tap made by someone else (an operator, or a guest agentd forgot).
    pub fn add_tap(&self, name: &str) {
        self.taps.lock().unwrap().insert(name.into(), (None, 0));
    }

    fn check(&self, op: &'static str, tap: &TapName) -> Result<()> {
        if self.failures.call(op, tap) {
            return Err(Error::internal(injected(op)));
        }
        Ok(())
    }

    /// The bridge tap `name` is a port of, if it exists and is one.
    pub fn bridge_of(&self, name: &str) -> Option<String> {
        self.taps
            .lock()
            .unwrap()
            .get(name)
            .and_then(|t| t.0.clone())
    }
}

impl HostNet for FakeNet {
    fn create_tap(&self, name: &TapName) -> Result<()> {
        self.check("create_tap", name)?;
        self.taps
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default();
        Ok(())
    }

    fn delete_tap(&self, name: &TapName) -> Result<()> {
        self.check("delete_tap", name)?;
        self.taps.lock().unwrap().remove(name.as_str());
        Ok(())
    }

    fn attach_to_bridge(&self, tap: &TapName, bridge: &str, _vlan: u16) -> Result<()> {
        self.check("attach_to_bridge", tap)?;
        match self.taps.lock().unwrap().get_mut(tap.as_str()) {
            Some(t) => {
                t.0 = Some(bridge.to_string());
                Ok(())
            }
            None => Err(Error::not_found(format!("tap {tap} does not exist"))),
        }
    }

    fn set_vlan(&self, tap: &TapName, vlan: u16) -> Result<()> {
        self.check("set_vlan", tap)?;
        match self.taps.lock().unwrap().get_mut(tap.as_str()) {
            Some(t) => {
                t.1 = vlan;
                Ok(())
            }
            None => Err(Error::not_found(format!("tap {tap} does not exist"))),
        }
    }

    fn list_taps_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.taps()
            .into_iter()
            .filter(|t| t.starts_with(prefix))
            .collect()
    }
}
