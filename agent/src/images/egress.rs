//! Which addresses an image download may connect to.
//!
//! An image URL comes from a caller, and agentd fetches it from inside the
//! host's network: without a rule, `http://127.0.0.1:7400/`,
//! `http://169.254.169.254/` (a cloud's metadata service) or any service
//! bound to one of this host's addresses would be one request away. By
//! default ([`Egress::public_only`]) a download refuses loopback,
//! link-local (169.254.0.0/16, fe80::/10), unspecified, broadcast and
//! multicast addresses and every address of this host's interfaces;
//! `--image-allow-private` lifts that (tests and the quickstart serve images
//! from loopback).
//!
//! The rule is applied to the addresses actually connected to, at every hop:
//! host names are resolved by [`CheckedResolver`] (so the connection uses
//! exactly the addresses that were checked: a DNS answer that changes
//! between a check and the connect, DNS rebinding, cannot slip through),
//! IP literals in the URL and in every redirect are checked by
//! [`Egress::check_url`] (reqwest does not resolve them), redirects are
//! limited to [`MAX_REDIRECTS`] hops and to http/https, and the peer of
//! the response is checked once more. A refusal is PermissionDenied naming
//! the address and its class, never the body of what answered.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use stratus_core::error::{Error, Result};

/// Redirect hops a download follows before giving up.
pub const MAX_REDIRECTS: usize = 5;

/// The address rule of image downloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Egress {
    allow_private: bool,
    /// Unit tests only: one loopback address treated as public, so a test
    /// server can stand for a public one and redirect to a refused one.
    #[cfg(test)]
    exempt: Option<IpAddr>,
}

impl Default for Egress {
    fn default() -> Self {
        Egress::public_only()
    }
}

impl Egress {
    /// The default: no loopback, link-local, unspecified or own address.
    pub fn public_only() -> Egress {
        Egress {
            allow_private: false,
            #[cfg(test)]
            exempt: None,
        }
    }

    /// `--image-allow-private`: any address.
    pub fn allow_private() -> Egress {
        Egress {
            allow_private: true,
            #[cfg(test)]
            exempt: None,
        }
    }

    /// [`Egress::public_only`], with `ip` allowed (unit tests: a loopback
    /// server playing a public one).
    #[cfg(test)]
    pub(crate) fn public_only_except(ip: IpAddr) -> Egress {
        Egress {
            allow_private: false,
            exempt: Some(ip),
        }
    }

    /// Why `ip` may not be connected to, or None when it may.
    pub fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        if self.allow_private {
            return None;
        }
        #[cfg(test)]
        if self.exempt == Some(ip) {
            return None;
        }
        let ip = match ip {
            // ::ffff:127.0.0.1 is 127.0.0.1 on the wire.
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let class = match ip {
            IpAddr::V4(a) => v4_class(a),
            IpAddr::V6(a) => v6_class(a),
        };
        class.or_else(|| {
            own_addresses()
                .contains(&ip)
                .then_some("an address of this host")
        })
    }

    /// Checks an address about to be (or just) connected to.
    pub fn check_addr(&self, url: &str, addr: SocketAddr) -> Result<()> {
        match self.refusal(addr.ip()) {
            None => Ok(()),
            Some(why) => Err(refused(url, addr.ip(), why)),
        }
    }

    /// Checks what can be checked of a URL before connecting: the scheme
    /// (http or https) and an IP literal host. Host names are checked when
    /// they resolve ([`CheckedResolver`]).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<()> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::denied(format!(
                "image {}: scheme {:?} is not allowed for a download (http or https)",
                shown(url),
                url.scheme()
            )));
        }
        // The URL parser has normalized IPv4 literals (0x7f.1 is
        // 127.0.0.1 here); IPv6 ones keep their brackets.
        let Some(host) = url.host_str() else {
            return Err(Error::invalid(format!(
                "image {}: the URL has no host",
                shown(url)
            )));
        };
        let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        else {
            return Ok(());
        };
        match self.refusal(ip) {
            None => Ok(()),
            Some(why) => Err(refused(&shown(url), ip, why)),
        }
    }

    /// The redirect policy of the download clients: at most
    /// [`MAX_REDIRECTS`] hops, each checked like the first URL.
    pub fn redirect_policy(self) -> reqwest::redirect::Policy {
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match self.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(format!("redirect refused: {}", e.message())),
            }
        })
    }

    /// The resolver of the download clients.
    pub fn resolver(self) -> Arc<CheckedResolver> {
        Arc::new(CheckedResolver { egress: self })
    }
}

/// Resolves host names with the system resolver and keeps only the
/// addresses the rule allows; a name left with none is an error (that
/// names the refused addresses).
#[derive(Debug)]
pub struct CheckedResolver {
    egress: Egress,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.egress;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let (ok, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = all
                .into_iter()
                .partition(|a| egress.refusal(a.ip()).is_none());
            if ok.is_empty() {
                let why: Vec<String> = refused
                    .iter()
                    .map(|a| format!("{} ({})", a.ip(), egress.refusal(a.ip()).unwrap_or("?")))
                    .collect();
                return Err(Box::new(RefusedAddress(format!(
                    "{host} resolves only to addresses image downloads may not reach: {} \
                     (agentd --image-allow-private allows them)",
                    why.join(", ")
                )))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A name resolved only to refused addresses: found in a download error's
/// causes, it makes the error PermissionDenied rather than Unavailable.
#[derive(Debug)]
pub struct RefusedAddress(pub String);

impl std::fmt::Display for RefusedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RefusedAddress {}

fn v4_class(a: Ipv4Addr) -> Option<&'static str> {
    if a.is_loopback() {
        Some("loopback")
    } else if a.is_link_local() {
        Some("link-local")
    } else if a.octets()[0] == 0 {
        // 0.0.0.0/8: "this network", which Linux connects to loopback.
        Some("unspecified")
    } else if a.is_broadcast() || a.is_multicast() {
        Some("broadcast or multicast")
    } else {
        None
    }
}

fn v6_class(a: Ipv6Addr) -> Option<&'static str> {
    if a.is_loopback() {
        Some("loopback")
    } else if a.is_unspecified() {
        Some("unspecified")
    } else if a.segments()[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if a.is_multicast() {
        Some("broadcast or multicast")
    } else {
        None
    }
}

/// The addresses of this host's interfaces, read now (they change).
fn own_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; on error
    // it returns -1 and we return an empty list (the other checks stand).
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive
        // until freeifaddrs; ifa_addr is null or points to a sockaddr whose
        // family says which struct it is.
        unsafe {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match (*addr).sa_family as libc::c_int {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

fn refused(url: &str, ip: IpAddr, why: &str) -> Error {
    Error::denied(format!(
        "image {url}: {ip} is {} image downloads may not reach \
         (agentd --image-allow-private allows it)",
        if why == "an address of this host" {
            why.to_string()
        } else {
            format!("a {why} address")
        }
    ))
}

/// A URL for messages: without user info (a password in a URL is a secret).
fn shown(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_classes_are_refused_and_public_ones_allowed() {
        let e = Egress::public_only();
        for ip in [
            "127.0.0.1",
            "127.255.0.9",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "febf::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "ff02::1",
        ] {
            assert!(e.refusal(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in ["192.0.2.10", "8.8.8.8", "2001:db8::1", "fec0::1"] {
            assert_eq!(e.refusal(ip.parse().unwrap()), None, "{ip}");
        }
        for ip in ["127.0.0.1", "169.254.169.254", "::1"] {
            assert_eq!(
                Egress::allow_private().refusal(ip.parse().unwrap()),
                None,
                "{ip}"
            );
        }
    }

    #[test]
    fn this_hosts_own_addresses_are_refused() {
        let own = own_addresses();
        assert!(own.iter().any(|a| a.is_loopback()), "{own:?}");
        for a in own {
            assert!(Egress::public_only().refusal(a).is_some(), "{a}");
        }
    }

    #[test]
    fn urls_are_checked_by_scheme_and_ip_literal_without_echoing_passwords() {
        let e = Egress::public_only();
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        let err = e.check_url(&u("http://127.0.0.1:7400/x")).unwrap_err();
        assert_eq!(err.kind(), stratus_core::error::ErrorKind::PermissionDenied);
        assert!(err.message().contains("loopback"), "{err}");
        assert!(e.check_url(&u("http://[::1]/x")).is_err());
        assert!(e.check_url(&u("http://[fe80::1]/x")).is_err());
        assert!(e.check_url(&u("http://0x7f.1/x")).is_err());
        assert!(e.check_url(&u("http://2130706433/x")).is_err());
        assert!(e.check_url(&u("file:///etc/shadow")).is_err());
        assert!(e.check_url(&u("gopher://192.0.2.1/")).is_err());
        let err = e
            .check_url(&u("http://user:hunter2@169.254.169.254/latest"))
            .unwrap_err();
        assert!(!err.message().contains("hunter2"), "{err}");
        e.check_url(&u("https://images.example.org/a.img")).unwrap();
        e.check_url(&u("http://192.0.2.10/a.img")).unwrap();
    }

    #[tokio::test]
    async fn names_resolving_only_to_refused_addresses_fail_to_resolve() {
        use reqwest::dns::Resolve;
        let r = Egress::public_only().resolver();
        let err = match r.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => panic!("resolved: {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("loopback"), "{err}");
        let ok: Vec<SocketAddr> = Egress::allow_private()
            .resolver()
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(ok.iter().all(|a| a.ip().is_loopback()) && !ok.is_empty());
    }
}
