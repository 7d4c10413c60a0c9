//! `vm create --nic`: `bridge=BR[,mac=MAC][,vlan=N][,ip=ADDR...]` or `default`.

use std::str::FromStr;

use agent::spec::check_ifname;

/// A guest NIC's Ethernet address: the agent's own type, so client and
/// server accept exactly the same addresses.
pub use agent::net::Mac;

/// One `--nic`: `bridge=BR[,mac=MAC][,vlan=N][,ip=ADDR...]` with the keys
/// in any order, each optional (`ip` repeatable), or `default`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NicArg {
    /// `None`: the agent's default bridge.
    pub bridge: Option<String>,
    /// `None`: the agent generates one.
    pub mac: Option<Mac>,
    /// 802.1Q tag, 1 to 4094; `None`: untagged.
    pub vlan: Option<u16>,
    /// The only IP sources the guest may use on it; empty: any.
    pub ips: Vec<std::net::IpAddr>,
}

impl FromStr for NicArg {
    type Err = String;
    fn from_str(s: &str) -> Result<NicArg, String> {
        if s == "default" {
            return Ok(NicArg::default());
        }
        if s.is_empty() {
            return Err("empty NIC: use bridge=BR[,mac=MAC][,vlan=N][,ip=ADDR], or default".into());
        }
        let mut nic = NicArg::default();
        for option in s.split(',') {
            let Some((key, value)) = option.split_once('=') else {
                return Err(format!(
                    "NIC option {option:?} is not KEY=VALUE: use bridge=BR[,mac=MAC][,vlan=N][,ip=ADDR]"
                ));
            };
            let twice = || format!("NIC option {key:?} is given twice");
            match key {
                "bridge" if nic.bridge.is_some() => return Err(twice()),
                "bridge" => {
                    check_ifname("bridge", value).map_err(|e| e.to_string())?;
                    nic.bridge = Some(value.to_owned());
                }
                "mac" if nic.mac.is_some() => return Err(twice()),
                "mac" => {
                    nic.mac = Some(
                        value
                            .parse()
                            .map_err(|e: stratus_core::error::Error| e.to_string())?,
                    )
                }
                "vlan" if nic.vlan.is_some() => return Err(twice()),
                "vlan" => {
                    nic.vlan = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|v| (1..=4094).contains(v))
                            .ok_or_else(|| {
                                format!(
                                    "vlan={value}: the VLAN tag is a number from 1 to 4094 \
                                     (leave it out for an untagged port)"
                                )
                            })?,
                    );
                }
                "ip" => {
                    let ip: std::net::IpAddr = value
                        .parse()
                        .map_err(|_| format!("ip={value}: not an IPv4 or IPv6 address"))?;
                    agent::spec::check_nic_ip(ip).map_err(|e| e.to_string())?;
                    nic.ips.push(ip);
                }
                _ => {
                    return Err(format!(
                        "unknown NIC option {key:?}: expected bridge, mac, vlan or ip"
                    ))
                }
            }
        }
        Ok(nic)
    }
}
