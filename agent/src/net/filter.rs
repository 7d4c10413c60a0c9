//! Anti-spoofing for guests' NICs: what a guest may send into its bridge.
//!
//! A guest is hostile, and on a shared bridge it could forge the Ethernet
//! or IP source of its frames to take over a neighbour's address, answer
//! DHCP for the segment or announce itself as a router. So every frame a
//! tap hands to its bridge passes the rules of that tap (like OpenNebula's
//! and Nova's per-port filters): the source MAC must be the NIC's; ARP must
//! claim that MAC; VLAN-tagged frames (a guest on an access port has no
//! business tagging) are dropped, and so are DHCP/DHCPv6 server replies and
//! IPv6 router advertisements from a guest. When the spec names the NIC's
//! addresses, its IPv4 and IPv6 traffic (and ARP's sender address) must
//! come from them: IPv4 `0.0.0.0` only as a DHCP client, IPv6 also `::`
//! (duplicate address detection) and link-local `fe80::/10` (neighbour
//! discovery), and a neighbour advertisement may only name (as its target)
//! one of its addresses or its own link-local one: the link-local
//! addresses the spec names, or when it names none the one its MAC gives
//! (modified EUI-64, [`Mac::link_local`]; a guest that makes its
//! link-local address otherwise, RFC 7217 stable privacy, names it in the
//! NIC's addresses). Without addresses the MAC rules alone apply.
//!
//! # The one table agentd owns
//! `table bridge stratus`: a base chain on the bridge family's `prerouting`
//! hook (every frame a port receives, before the bridge learns its source
//! or forwards it, so a dropped frame leaves no trace in the bridge's
//! forwarding database either) whose only rule looks the input interface
//! up in the verdict map `nics` (`"TAP" : jump nic-TAP`), and one regular
//! chain `nic-TAP` per protected tap. Nothing else of the host's ruleset
//! is read or touched. Frames of other ports (uplinks, the operator's own
//! taps) are not in the map and pass.
//!
//! # Order and atomicity
//! [`NicFilters::protect`] runs before the tap joins its bridge (and before
//! the tap even exists: the map matches by name), and is one `nft`
//! transaction that also (re)creates the table, the base chain and its one
//! rule, and replaces the tap's chain whole: applying it again (reconcile
//! re-applies it to adopted guests; a ruleset flushed by someone else is
//! rebuilt) never leaves a moment without rules. [`NicFilters::remove`]
//! runs after the tap is deleted, so a tap is never on a bridge without
//! its rules; it is idempotent in one transaction too (it adds what it then
//! deletes, since nft 1.0.6 has no `destroy`).
//!
//! `nft` runs through the command runner: argv only (the script is one
//! argument, which nft parses itself; no shell), `-j` JSON to read the table
//! back ([`NicFilters::protected_taps`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::{Mac, TapName};
use stratus_core::error::{Error, Result};
use stratus_core::runner::{run_checked, Cmd, CommandRunner};

/// The nftables table agentd owns (family `bridge`).
pub const TABLE: &str = "stratus";

/// Prefix of a protected tap's chain in [`TABLE`].
const CHAIN_PREFIX: &str = "nic-";

/// How long one `nft` call may take.
const NFT_TIMEOUT: Duration = Duration::from_secs(10);

/// The anti-spoofing rules of guests' taps, in [`TABLE`], through `nft`.
#[derive(Clone)]
pub struct NicFilters {
    runner: Arc<dyn CommandRunner>,
}

impl NicFilters {
    pub fn new(runner: Arc<dyn CommandRunner>) -> NicFilters {
        NicFilters { runner }
    }

    /// Lets tap `tap` send only frames from `mac` (and, if `ips` is not
    /// empty, IP traffic only from `ips`), replacing any rules it had.
    /// Unavailable when `nft` is missing.
    pub async fn protect(&self, tap: &TapName, mac: Mac, ips: &[IpAddr]) -> Result<()> {
        self.nft(
            &protect_script(tap, mac, ips),
            &format!("protect tap {tap}"),
        )
        .await?;
        tracing::info!(tap = %tap, %mac, ips = ?ips, "anti-spoofing rules in place");
        Ok(())
    }

    /// Removes tap `tap`'s rules; Ok when it has none.
    pub async fn remove(&self, tap: &TapName) -> Result<()> {
        self.nft(
            &remove_script(tap),
            &format!("remove the rules of tap {tap}"),
        )
        .await?;
        tracing::info!(tap = %tap, "anti-spoofing rules removed");
        Ok(())
    }

    /// The taps that have rules in [`TABLE`] (a chain or a map entry),
    /// sorted; none when the table does not exist.
    pub async fn protected_taps(&self) -> Result<Vec<String>> {
        let cmd = Cmd::new("nft")
            .args(["-j", "list", "table", "bridge", TABLE])
            .timeout(NFT_TIMEOUT);
        let out = self.runner.run(&cmd).await?;
        if !out.success() {
            // nft says "No such file or directory" of a missing table.
            if out.stderr.contains("No such file or directory") {
                return Ok(Vec::new());
            }
            return Err(stratus_core::runner::exit_error(&cmd, &out));
        }
        parse_protected_taps(&out.stdout)
    }

    /// Of `nics` (tap, MAC, addresses, as protected), those whose rules are
    /// not all in place: the table, its base chain's rule, the tap's map
    /// entry, or its chain with every one of its rules (a table, chain or
    /// ruleset someone flushed or edited). Sorted by tap.
    pub async fn incomplete(&self, nics: &[(TapName, Mac, Vec<IpAddr>)]) -> Result<Vec<TapName>> {
        let cmd = Cmd::new("nft")
            .args(["-j", "list", "table", "bridge", TABLE])
            .timeout(NFT_TIMEOUT);
        let out = self.runner.run(&cmd).await?;
        let state = if out.success() {
            TableState::parse(&out.stdout)?
        } else if out.stderr.contains("No such file or directory") {
            TableState::default()
        } else {
            return Err(stratus_core::runner::exit_error(&cmd, &out));
        };
        let mut missing: Vec<TapName> = nics
            .iter()
            .filter(|(tap, mac, ips)| {
                !state.base_rule
                    || !state.mapped.contains(tap.as_str())
                    || state.rules.get(&chain_of(tap)).copied() != Some(tap_rules(*mac, ips).len())
            })
            .map(|(tap, _, _)| tap.clone())
            .collect();
        missing.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(missing)
    }

    async fn nft(&self, script: &str, what: &str) -> Result<()> {
        let cmd = Cmd::new("nft").arg(script).timeout(NFT_TIMEOUT);
        run_checked(self.runner.as_ref(), &cmd)
            .await
            .map(|_| ())
            .map_err(|e| {
                let hint = if e.kind() == stratus_core::error::ErrorKind::Unavailable {
                    " (is nftables installed? agentd needs `nft` for guests' NICs)"
                } else {
                    ""
                };
                Error::new(e.kind(), format!("anti-spoofing: {what}: {e}{hint}"))
            })
    }
}

/// The table, its base chain and map, each made if missing, and the base
/// chain's one rule set anew: the start of every script, so any of them
/// works on a host where the table was never made or was flushed.
fn table_preamble() -> Vec<String> {
    let t = format!("bridge {TABLE}");
    vec![
        format!("add table {t}"),
        format!(
            "add chain {t} prerouting {{ type filter hook prerouting priority -200; policy accept; }}"
        ),
        format!("add map {t} nics {{ type ifname : verdict; }}"),
        format!("flush chain {t} prerouting"),
        format!("add rule {t} prerouting iifname vmap @nics"),
    ]
}

fn chain_of(tap: &TapName) -> String {
    format!("{CHAIN_PREFIX}{tap}")
}

/// The rules of one tap (see the module's doc), without the table's.
fn tap_rules(mac: Mac, ips: &[IpAddr]) -> Vec<String> {
    let mut r = vec![
        format!("ether saddr != {mac} counter drop"),
        // 802.1Q and 802.1ad: a tag would also hide the IP header below
        // from the rules that follow.
        "ether type { 0x8100, 0x88a8 } counter drop".into(),
        format!("ether type arp arp saddr ether != {mac} counter drop"),
        // DHCP and DHCPv6 servers, and IPv6 routers, are the network's, not a guest's.
        "ether type ip udp sport 67 counter drop".into(),
        "ether type ip6 udp sport 547 counter drop".into(),
        "ether type ip6 icmpv6 type nd-router-advert counter drop".into(),
    ];
    if ips.is_empty() {
        return r;
    }
    let v4: Vec<String> = ips
        .iter()
        .filter(|a| a.is_ipv4())
        .map(|a| a.to_string())
        .collect();
    let v6: Vec<String> = ips
        .iter()
        .filter(|a| a.is_ipv6())
        .map(|a| a.to_string())
        .collect();
    let set = |fixed: &[&str], own: &[String]| {
        let all: Vec<String> = fixed
            .iter()
            .map(|s| s.to_string())
            .chain(own.iter().cloned())
            .collect();
        format!("{{ {} }}", all.join(", "))
    };
    // ARP probes (RFC 5227) claim 0.0.0.0.
    r.push(format!(
        "ether type arp arp saddr ip != {} counter drop",
        set(&["0.0.0.0"], &v4)
    ));
    r.push("ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept".into());
    if v4.is_empty() {
        r.push("ether type ip counter drop".into());
    } else {
        r.push(format!(
            "ether type ip ip saddr != {} counter drop",
            set(&[], &v4)
        ));
    }
    r.push(format!(
        "ether type ip6 ip6 saddr != {} counter drop",
        set(&["::", "fe80::/10"], &v6)
    ));
    // A neighbour advertisement from the guest's own source can still claim
    // another's address (its target) and poison neighbours' caches: the
    // target must be one of the guest's own addresses or its own
    // link-local one (those named, else its MAC's EUI-64 one). nft 1.0.6
    // has no `icmpv6 taddr`, so the target is read raw: the 128 bits after
    // the ICMPv6 header's first 8 bytes (RFC 4861 4.4).
    let mut targets: Vec<std::net::Ipv6Addr> = ips
        .iter()
        .filter_map(|a| match a {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
        .collect();
    if !targets.iter().any(|a| is_link_local(*a)) {
        targets.push(mac.link_local());
    }
    let targets: Vec<String> = targets
        .iter()
        .map(|a| format!("0x{:032x}", u128::from(*a)))
        .collect();
    r.push(format!(
        "ether type ip6 icmpv6 type nd-neighbor-advert @th,64,128 != {} counter drop",
        set(&[], &targets)
    ));
    r
}

/// In `fe80::/10`.
fn is_link_local(a: std::net::Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// One transaction: the table, then tap `tap`'s chain replaced whole and
/// entered in the map.
pub(crate) fn protect_script(tap: &TapName, mac: Mac, ips: &[IpAddr]) -> String {
    let t = format!("bridge {TABLE}");
    let chain = chain_of(tap);
    let mut cmds = table_preamble();
    cmds.push(format!("add chain {t} {chain}"));
    cmds.push(format!("flush chain {t} {chain}"));
    for rule in tap_rules(mac, ips) {
        cmds.push(format!("add rule {t} {chain} {rule}"));
    }
    cmds.push(format!(
        "add element {t} nics {{ \"{tap}\" : jump {chain} }}"
    ));
    cmds.join("; ")
}

/// One transaction that leaves tap `tap` without rules whether or not it
/// had any: made first, so the deletes always find what they delete.
pub(crate) fn remove_script(tap: &TapName) -> String {
    let t = format!("bridge {TABLE}");
    let chain = chain_of(tap);
    let mut cmds = table_preamble();
    cmds.extend([
        format!("add chain {t} {chain}"),
        format!("add element {t} nics {{ \"{tap}\" : jump {chain} }}"),
        format!("delete element {t} nics {{ \"{tap}\" }}"),
        format!("flush chain {t} {chain}"),
        format!("delete chain {t} {chain}"),
    ]);
    cmds.join("; ")
}

/// What `nft -j list table` shows of the table, enough to tell whether a
/// tap's rules are all there.
#[derive(Debug, Default)]
struct TableState {
    /// The base chain's one rule (the lookup in `nics`).
    base_rule: bool,
    /// Taps with an entry in the `nics` map.
    mapped: std::collections::HashSet<String>,
    /// Rules per chain (chains without rules: 0).
    rules: std::collections::HashMap<String, usize>,
}

impl TableState {
    fn parse(json: &str) -> Result<TableState> {
        let v: Value = serde_json::from_str(json)
            .map_err(|e| Error::internal(format!("nft -j list table: unreadable output: {e}")))?;
        let items = v
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::internal("nft -j list table: no \"nftables\" array"))?;
        let mut st = TableState::default();
        for item in items {
            if let Some(name) = item.pointer("/chain/name").and_then(Value::as_str) {
                st.rules.entry(name.to_string()).or_insert(0);
            }
            if let Some(chain) = item.pointer("/rule/chain").and_then(Value::as_str) {
                *st.rules.entry(chain.to_string()).or_insert(0) += 1;
                if chain == "prerouting" {
                    st.base_rule = true;
                }
            }
            if let Some(elems) = item
                .get("map")
                .filter(|m| m.get("name").and_then(Value::as_str) == Some("nics"))
                .and_then(|m| m.get("elem"))
                .and_then(Value::as_array)
            {
                st.mapped.extend(
                    elems
                        .iter()
                        .filter_map(|e| e.get(0).and_then(Value::as_str))
                        .map(str::to_string),
                );
            }
        }
        Ok(st)
    }
}

/// The taps named by `nic-TAP` chains and by map entries in `nft -j list
/// table` output.
fn parse_protected_taps(json: &str) -> Result<Vec<String>> {
    let v: Value = serde_json::from_str(json)
        .map_err(|e| Error::internal(format!("nft -j list table: unreadable output: {e}")))?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::internal("nft -j list table: no \"nftables\" array"))?;
    let mut taps = Vec::new();
    for item in items {
        if let Some(name) = item
            .get("chain")
            .and_then(|c| c.get("name"))
            .and_then(Value::as_str)
        {
            if let Some(tap) = name.strip_prefix(CHAIN_PREFIX) {
                taps.push(tap.to_string());
            }
        }
        if let Some(elems) = item
            .get("map")
            .filter(|m| m.get("name").and_then(Value::as_str) == Some("nics"))
            .and_then(|m| m.get("elem"))
            .and_then(Value::as_array)
        {
            for e in elems {
                if let Some(tap) = e.get(0).and_then(Value::as_str) {
                    taps.push(tap.to_string());
                }
            }
        }
    }
    taps.sort();
    taps.dedup();
    Ok(taps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_core::error::ErrorKind;
    use stratus_core::runner::{FakeRunner, Output};

    fn tap() -> TapName {
        TapName::new("st1b4e28ban0").unwrap()
    }

    fn mac() -> Mac {
        "52:54:00:12:34:56".parse().unwrap()
    }

    #[test]
    fn a_nic_without_addresses_is_held_to_its_mac() {
        let s = protect_script(&tap(), mac(), &[]);
        assert!(
            s.starts_with(
                "add table bridge stratus; \
                 add chain bridge stratus prerouting \
                 { type filter hook prerouting priority -200; policy accept; }; \
                 add map bridge stratus nics { type ifname : verdict; }; "
            ),
            "{s}"
        );
        for want in [
            "flush chain bridge stratus prerouting",
            "add rule bridge stratus prerouting iifname vmap @nics",
            "add chain bridge stratus nic-st1b4e28ban0",
            "flush chain bridge stratus nic-st1b4e28ban0",
            "add rule bridge stratus nic-st1b4e28ban0 ether saddr != 52:54:00:12:34:56 counter drop",
            "add rule bridge stratus nic-st1b4e28ban0 ether type arp arp saddr ether != 52:54:00:12:34:56 counter drop",
            "add rule bridge stratus nic-st1b4e28ban0 ether type ip udp sport 67 counter drop",
            "add element bridge stratus nics { \"st1b4e28ban0\" : jump nic-st1b4e28ban0 }",
        ] {
            assert!(s.contains(want), "{want}\n in {s}");
        }
        assert!(
            !s.contains("ip saddr"),
            "no address rules without addresses: {s}"
        );
        // The chain is emptied before its rules are added, and entered in
        // the map only once it holds them.
        let pos = |p: &str| s.find(p).unwrap();
        assert!(pos("flush chain bridge stratus nic-") < pos("add rule bridge stratus nic-"));
        assert!(pos("ether saddr !=") < pos("add element"));
    }

    #[test]
    fn named_addresses_are_the_only_ip_sources() {
        let ips: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "2001:db8::5".parse().unwrap()];
        let s = protect_script(&tap(), mac(), &ips);
        for want in [
            "ether type arp arp saddr ip != { 0.0.0.0, 10.0.0.5 } counter drop",
            "ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",
            "ether type ip ip saddr != { 10.0.0.5 } counter drop",
            "ether type ip6 ip6 saddr != { ::, fe80::/10, 2001:db8::5 } counter drop",
            // Neighbour advertisements only for its own addresses and its
            // MAC's link-local one (fe80::5054:ff:fe12:3456).
            "ether type ip6 icmpv6 type nd-neighbor-advert @th,64,128 != \
             { 0x20010db8000000000000000000000005, 0xfe80000000000000505400fffe123456 } \
             counter drop",
        ] {
            assert!(s.contains(want), "{want}\n in {s}");
        }
        // The DHCP client exception comes before the source check.
        assert!(s.find("udp dport 67 accept").unwrap() < s.find("ip saddr != {").unwrap());

        // Only IPv6 named: IPv4 may be only a DHCP client.
        let s = protect_script(&tap(), mac(), &["2001:db8::5".parse().unwrap()]);
        assert!(
            s.contains("arp saddr ip != { 0.0.0.0 } counter drop"),
            "{s}"
        );
        assert!(
            s.contains("nic-st1b4e28ban0 ether type ip counter drop"),
            "{s}"
        );

        // Only IPv4 named: a neighbour advertisement may only be of its
        // MAC's link-local address.
        let s = protect_script(&tap(), mac(), &["10.0.0.5".parse().unwrap()]);
        assert!(
            s.contains(
                "nic-st1b4e28ban0 ether type ip6 icmpv6 type nd-neighbor-advert \
                 @th,64,128 != { 0xfe80000000000000505400fffe123456 } counter drop"
            ),
            "{s}"
        );
        // A link-local address named (a guest with stable-privacy
        // addresses) replaces the MAC's.
        let s = protect_script(
            &tap(),
            mac(),
            &["fe80::1234:5678:9abc:def0".parse().unwrap()],
        );
        assert!(
            s.contains(
                "nd-neighbor-advert @th,64,128 != \
                 { 0xfe80000000000000123456789abcdef0 } counter drop"
            ),
            "{s}"
        );
    }

    #[test]
    fn removal_is_one_idempotent_transaction() {
        let s = remove_script(&tap());
        let tail = "add chain bridge stratus nic-st1b4e28ban0; \
                    add element bridge stratus nics { \"st1b4e28ban0\" : jump nic-st1b4e28ban0 }; \
                    delete element bridge stratus nics { \"st1b4e28ban0\" }; \
                    flush chain bridge stratus nic-st1b4e28ban0; \
                    delete chain bridge stratus nic-st1b4e28ban0";
        assert!(s.ends_with(tail), "{s}");
        assert!(s.starts_with("add table bridge stratus; "), "{s}");
    }

    #[tokio::test]
    async fn nft_gets_the_script_as_one_argument() {
        let runner = FakeRunner::new();
        let f = NicFilters::new(Arc::new(runner.clone()));
        f.protect(&tap(), mac(), &[]).await.unwrap();
        f.remove(&tap()).await.unwrap();
        let calls = runner.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[0],
            ["nft".to_string(), protect_script(&tap(), mac(), &[])]
        );
        assert_eq!(calls[1], ["nft".to_string(), remove_script(&tap())]);
    }

    #[tokio::test]
    async fn a_failing_nft_is_an_error_naming_the_tap() {
        let runner = FakeRunner::with(|_| Ok(Output::failed(1, "Error: Could not process rule")));
        let f = NicFilters::new(Arc::new(runner));
        let e = f.protect(&tap(), mac(), &[]).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(e.message().contains("protect tap st1b4e28ban0"), "{e}");
        assert!(e.message().contains("Could not process rule"), "{e}");
    }

    #[tokio::test]
    async fn taps_whose_rules_are_not_all_there_are_found() {
        let other = TapName::new("st2b4e28ban0").unwrap();
        let n = tap_rules(mac(), &[]).len();
        // tap(): complete; other: its chain lost a rule.
        let rule = |chain: &str| {
            format!(
                r#"{{"rule": {{"family": "bridge", "table": "stratus", "chain": "{chain}", "expr": []}}}}"#
            )
        };
        let mut items = vec![
            r#"{"metainfo": {"version": "1.0.6"}}"#.to_string(),
            r#"{"map": {"family": "bridge", "name": "nics", "table": "stratus", "type": "ifname",
                "map": "verdict", "elem": [["st1b4e28ban0", {"jump": {"target": "nic-st1b4e28ban0"}}],
                                           ["st2b4e28ban0", {"jump": {"target": "nic-st2b4e28ban0"}}]]}}"#
                .to_string(),
            r#"{"chain": {"family": "bridge", "table": "stratus", "name": "prerouting"}}"#.to_string(),
            rule("prerouting"),
            r#"{"chain": {"family": "bridge", "table": "stratus", "name": "nic-st1b4e28ban0"}}"#
                .to_string(),
            r#"{"chain": {"family": "bridge", "table": "stratus", "name": "nic-st2b4e28ban0"}}"#
                .to_string(),
        ];
        items.extend((0..n).map(|_| rule("nic-st1b4e28ban0")));
        items.extend((0..n - 1).map(|_| rule("nic-st2b4e28ban0")));
        let json = format!(r#"{{"nftables": [{}]}}"#, items.join(","));
        let nics = vec![
            (tap(), mac(), Vec::new()),
            (other.clone(), mac(), Vec::new()),
        ];
        let j = json.clone();
        let f = NicFilters::new(Arc::new(FakeRunner::with(move |_| Ok(Output::ok(&j)))));
        assert_eq!(
            f.incomplete(&nics).await.unwrap(),
            std::slice::from_ref(&other)
        );

        // The same tap with addresses expects more rules than it has.
        let with_ips = vec![(tap(), mac(), vec!["10.0.0.5".parse().unwrap()])];
        let j = json.clone();
        let f = NicFilters::new(Arc::new(FakeRunner::with(move |_| Ok(Output::ok(&j)))));
        assert_eq!(f.incomplete(&with_ips).await.unwrap(), [tap()]);

        // The base chain's rule flushed: every tap.
        let flushed = json.replacen(&rule("prerouting"), r#"{"metainfo": {}}"#, 1);
        let f = NicFilters::new(Arc::new(FakeRunner::with(move |_| {
            Ok(Output::ok(&flushed))
        })));
        assert_eq!(f.incomplete(&nics).await.unwrap(), [tap(), other.clone()]);

        // No table at all: every tap.
        let f = NicFilters::new(Arc::new(FakeRunner::with(|_| {
            Ok(Output::failed(1, "Error: No such file or directory"))
        })));
        assert_eq!(f.incomplete(&nics).await.unwrap(), [tap(), other]);
    }

    #[tokio::test]
    async fn protected_taps_are_read_back_from_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "bridge", "name": "stratus", "handle": 1}},
            {"map": {"family": "bridge", "name": "nics", "table": "stratus", "type": "ifname",
                     "map": "verdict", "elem": [["st1b4e28ban0", {"jump": {"target": "nic-st1b4e28ban0"}}],
                                                ["st2b4e28ban0", {"jump": {"target": "nic-st2b4e28ban0"}}]]}},
            {"chain": {"family": "bridge", "table": "stratus", "name": "prerouting", "hook": "prerouting"}},
            {"chain": {"family": "bridge", "table": "stratus", "name": "nic-st1b4e28ban0"}},
            {"chain": {"family": "bridge", "table": "stratus", "name": "nic-st9b4e28ban1"}}]}"#;
        let runner = FakeRunner::with(move |argv| {
            assert_eq!(argv, ["nft", "-j", "list", "table", "bridge", "stratus"]);
            Ok(Output::ok(json))
        });
        let f = NicFilters::new(Arc::new(runner));
        assert_eq!(
            f.protected_taps().await.unwrap(),
            ["st1b4e28ban0", "st2b4e28ban0", "st9b4e28ban1"]
        );

        let missing = FakeRunner::with(|_| {
            Ok(Output::failed(
                1,
                "Error: No such file or directory\nlist table bridge stratus",
            ))
        });
        let f = NicFilters::new(Arc::new(missing));
        assert!(f.protected_taps().await.unwrap().is_empty());

        let garbage = FakeRunner::with(|_| Ok(Output::ok("not json")));
        let f = NicFilters::new(Arc::new(garbage));
        assert!(f.protected_taps().await.is_err());
    }
}
