//! `agent::net` against the real kernel, and QEMU attaching to its taps.
//!
//! Each test makes its own network namespace and runs the module's calls on a
//! thread that has entered it (setns), so the host's network is never touched
//! and tests run in parallel. `ip` and `bridge` appear only here, to set the
//! scene and to look at the result. They need root: `#[ignore]`d, run by
//! `scripts/test` (`cargo test -p agent --test net -- --ignored`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agent::net::{
    attach_to_bridge, create_tap, delete_tap, link_exists, list_taps_with_prefix, set_vlan,
    tap_name_for, TapName, TAP_PREFIX,
};
use serde_json::Value;
use stratus_core::error::ErrorKind;
use uuid::Uuid;

/// A network namespace of this test, deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "stratus-net-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a fresh thread inside the namespace; the calling thread
    /// (and so the host) stays where it is.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            let worker = s.spawn(move || {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: `ns` is an open namespace file; setns only changes
                // the network namespace of this thread, which ends with `f`.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            });
            worker
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// `ip -n NS ARGS`, which must succeed; its stdout.
    fn ip(&self, args: &[&str]) -> String {
        let out = run_ok(Command::new("ip").args(["-n", &self.name]).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip netns exec NS ARGV`, whatever its outcome.
    fn exec(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .expect("run ip netns exec")
    }

    /// `ip -d -j link show NAME` as JSON, or None if there is no such link.
    fn link(&self, name: &str) -> Option<Value> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-d", "-j", "link", "show", "dev", name])
            .output()
            .expect("run ip");
        if !out.status.success() {
            return None;
        }
        let mut links: Vec<Value> = serde_json::from_slice(&out.stdout).expect("ip -j output");
        Some(links.remove(0))
    }

    /// A bridge, up; with VLAN filtering if asked (see [`Netns::has_vlan_filtering`]).
    fn bridge(&self, name: &str, vlan_filtering: bool) {
        self.ip(&["link", "add", name, "type", "bridge"]);
        if vlan_filtering {
            self.ip(&["link", "set", name, "type", "bridge", "vlan_filtering", "1"]);
        }
        self.ip(&["link", "set", name, "up"]);
    }

    /// Whether the kernel can filter VLANs on a bridge: without
    /// CONFIG_BRIDGE_VLAN_FILTERING, setting vlan_filtering is EOPNOTSUPP.
    fn has_vlan_filtering(&self) -> bool {
        self.ip(&["link", "add", "probe-br", "type", "bridge"]);
        let out = Command::new("ip")
            .args([
                "-n", &self.name, "link", "set", "probe-br", "type", "bridge",
            ])
            .args(["vlan_filtering", "1"])
            .output()
            .expect("run ip");
        self.ip(&["link", "del", "probe-br"]);
        if !out.status.success() {
            eprintln!(
                "this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING): {}",
                stderr(&out).trim()
            );
        }
        out.status.success()
    }

    /// The port VLANs of `dev` as (vid, flags), from `bridge -j vlan show`.
    fn vlans(&self, dev: &str) -> Vec<(u64, Vec<String>)> {
        let out = self.exec(&["bridge", "-j", "vlan", "show", "dev", dev]);
        assert!(out.status.success(), "bridge vlan show: {}", stderr(&out));
        let ports: Vec<Value> = serde_json::from_slice(&out.stdout).expect("bridge -j output");
        let mut vlans = Vec::new();
        for port in ports.iter().filter(|p| p["ifname"] == dev) {
            for v in port["vlans"].as_array().into_iter().flatten() {
                let flags = v["flags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|f| f.as_str().unwrap_or_default().to_owned())
                    .collect();
                vlans.push((v["vlan"].as_u64().expect("vid"), flags));
            }
        }
        vlans
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn flags(link: &Value) -> Vec<&str> {
    link["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

fn tap() -> TapName {
    tap_name_for(Uuid::new_v4(), 0)
}

#[test]
#[ignore = "needs root and network namespaces: run by scripts/test"]
fn create_tap_makes_a_persistent_up_single_queue_tap_idempotently() {
    let ns = Netns::new();
    let t = tap();
    ns.run(|| create_tap(&t)).unwrap();

    let link = ns.link(t.as_str()).expect("tap exists");
    assert!(flags(&link).contains(&"UP"), "{link}");
    let info = &link["linkinfo"];
    assert_eq!(info["info_kind"], "tun", "{link}");
    assert_eq!(info["info_data"]["type"], "tap", "{link}");
    assert_eq!(info["info_data"]["pi"], false, "{link}");
    assert_eq!(info["info_data"]["vnet_hdr"], true, "{link}");
    assert_eq!(info["info_data"]["multi_queue"], false, "{link}");
    assert_eq!(info["info_data"]["persist"], true, "{link}");
    // Owned by us (root), so no unprivileged process can attach to it; `ip`
    // prints the user by name, or by number where there is no passwd file.
    let user = &info["info_data"]["user"];
    assert!(*user == "root" || *user == 0, "{link}");

    // Again, and again after someone set it down: Ok, and up.
    ns.run(|| create_tap(&t)).unwrap();
    ns.ip(&["link", "set", t.as_str(), "down"]);
    ns.run(|| create_tap(&t)).unwrap();
    assert!(flags(&ns.link(t.as_str()).unwrap()).contains(&"UP"));

    assert!(ns.run(|| link_exists(t.as_str())));
    assert!(ns.run(|| link_exists("lo")));
    assert!(!ns.run(|| link_exists("st-nothing")));
    // The host does not see it.
    assert!(!link_exists(t.as_str()));
}

#[test]
#[ignore = "needs root and network namespaces: run by scripts/test"]
fn create_tap_refuses_a_name_held_by_another_kind_of_link() {
    let ns = Netns::new();
    ns.bridge("st-br", false);
    let err = ns
        .run(|| create_tap(&TapName::new("st-br").unwrap()))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert!(
        err.message().contains("st-br") && err.message().contains("bridge"),
        "{err}"
    );
    assert_eq!(ns.link("st-br").unwrap()["linkinfo"]["info_kind"], "bridge");

    // A multi-queue tap cannot take QEMU's single-queue attach.
    ns.ip(&[
        "tuntap",
        "add",
        "dev",
        "st-mq",
        "mode",
        "tap",
        "multi_queue",
    ]);
    let err = ns
        .run(|| create_tap(&TapName::new("st-mq").unwrap()))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.message().contains("multi-queue"), "{err}");
}

#[test]
#[ignore = "needs root and network namespaces: run by scripts/test"]
fn attach_to_bridge_sets_the_master_idempotently() {
    let ns = Netns::new();
    ns.bridge("br0", false);
    ns.bridge("br1", false);
    let t = tap();
    ns.run(|| {
        create_tap(&t)?;
        attach_to_bridge(&t, "br0", 0)?;
        attach_to_bridge(&t, "br0", 0)
    })
    .unwrap();
    assert_eq!(ns.link(t.as_str()).unwrap()["master"], "br0");

    // Moving to another bridge works too.
    ns.run(|| attach_to_bridge(&t, "br1", 0)).unwrap();
    assert_eq!(ns.link(t.as_str()).unwrap()["master"], "br1");
}

#[test]
#[ignore = "needs root and network namespaces: run by scripts/test"]
fn attach_to_a_missing_or_non_bridge_fails_and_leaves_the_tap_alone() {
    let ns = Netns::new();
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ]);
    let t = tap();
    ns.run(|| create_tap(&t)).unwrap();
    let before = ns.link(t.as_str()).unwrap();

    let err = ns
        .run(|| attach_to_bridge(&t, "br-missing", 0))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert_eq!(
        err.message(),
        "bridge br-missing does not exist on this host"
    );

    let err = ns.run(|| attach_to_bridge(&t, "veth0", 0)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(
        err.message()
            .contains("veth0 is not a bridge (it is a veth)"),
        "{err}"
    );

    let err = ns.run(|| attach_to_bridge(&t, "bad/name", 0)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");

    let after = ns.link(t.as_str()).unwrap();
    assert!(after.get("master").is_none(), "{after}");
    assert_eq!(before["flags"], after["flags"]);

    // A missing tap on an existing bridge is NotFound.
    ns.bridge("br0", false);
    let err = ns
        .run(|| attach_to_bridge(&TapName::new("st-none").unwrap(), "br0", 0))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.message().contains("st-none"), "{err}");
}

#[test]
#[ignore = "needs root and network namespaces: run by scripts/test"]
fn delete_tap_removes_it_idempotently_and_spares_other_links() {
    let ns = Netns::new();
    ns.bridge("br0", false);
    let t = tap();
    ns.run(|| {
        create_tap(&t)?;
        attach_to_bridge(&t, "br0", 0)?;
        delete_tap(&t)
    })
    .unwrap();
    assert!(ns.link(t.as_str()).is_none());
    ns.run(|| delete_tap(&t)).unwrap();

    ns.ip(&[
        "link",
        "add",
        "st-veth",
        "type",
        "veth",
        "peer",
        "name",
        "st-veth-p",
    ]);
    let err = ns
        .run(|| delete_tap(&TapName::new("st-veth").unwrap()))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(ns.link("st-veth").is_some());
    assert!(ns.link("br0").is_some());
}

#[test]
#[ignore = "needs root and network namespaces: run by scripts/test"]
fn set_vlan_makes_it_the_ports_only_untagged_pvid() {
    let ns = Netns::new();
    if !ns.has_vlan_filtering() {
        eprintln!("SKIPPED: set_vlan needs a kernel with bridge VLAN filtering");
        return;
    }
    ns.bridge("br0", true);
    let t = tap();
    ns.run(|| {
        create_tap(&t)?;
        attach_to_bridge(&t, "br0", 100)
    })
    .unwrap();
    // A new port starts on the bridge's default PVID 1.
    assert_eq!(ns.vlans(t.as_str()).len(), 1);

    let access = |vid| vec![(vid, vec!["PVID".to_owned(), "Egress Untagged".to_owned()])];
    ns.run(|| set_vlan(&t, 100)).unwrap();
    assert_eq!(ns.vlans(t.as_str()), access(100));
    ns.run(|| set_vlan(&t, 100)).unwrap();
    assert_eq!(ns.vlans(t.as_str()), access(100));

    // Other VLANs, trunk-style ones included, are removed on a change.
    ns.exec(&["bridge", "vlan", "add", "dev", t.as_str(), "vid", "300"]);
    ns.exec(&[
        "bridge",
        "vlan",
        "add",
        "dev",
        t.as_str(),
        "vid",
        "4000-4010",
    ]);
    ns.run(|| set_vlan(&t, 200)).unwrap();
    assert_eq!(ns.vlans(t.as_str()), access(200));
    ns.run(|| set_vlan(&t, 4094)).unwrap();
    assert_eq!(ns.vlans(t.as_str()), access(4094));
    ns.run(|| set_vlan(&t, 1)).unwrap();
    assert_eq!(ns.vlans(t.as_str()), access(1));

    for bad in [0, 4095] {
        let err = ns.run(|| set_vlan(&t, bad)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    }
}

#[test]
#[ignore = "needs root and network namespaces: run by scripts/test"]
fn set_vlan_needs_a_filtering_bridge() {
    let ns = Netns::new();
    ns.bridge("br-plain", false);
    let (loose, attached) = (tap(), tap_name_for(Uuid::new_v4(), 1));
    ns.run(|| {
        create_tap(&loose)?;
        create_tap(&attached)?;
        attach_to_bridge(&attached, "br-plain", 0)
    })
    .unwrap();

    let err = ns.run(|| set_vlan(&attached, 100)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("br-plain") && err.message().contains("vlan_filtering"),
        "{err}"
    );

    let err = ns.run(|| set_vlan(&loose, 100)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.message().contains("not a port of a bridge"), "{err}");

    let err = ns
        .run(|| set_vlan(&TapName::new("st-none").unwrap(), 100))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[test]
#[ignore = "needs root and network namespaces: run by scripts/test"]
fn list_taps_with_prefix_finds_only_taps() {
    let ns = Netns::new();
    let vm = Uuid::new_v4();
    let (a, b) = (tap_name_for(vm, 0), tap_name_for(vm, 1));
    ns.bridge("st-br", false);
    ns.ip(&[
        "link",
        "add",
        "st-veth",
        "type",
        "veth",
        "peer",
        "name",
        "st-veth-p",
    ]);
    ns.ip(&["tuntap", "add", "dev", "st-tun", "mode", "tun"]);
    ns.ip(&["tuntap", "add", "dev", "xx-tap", "mode", "tap"]);
    ns.run(|| {
        create_tap(&b)?;
        create_tap(&a)
    })
    .unwrap();

    let found = ns.run(|| list_taps_with_prefix(TAP_PREFIX));
    assert_eq!(found, vec![a.to_string(), b.to_string()]);
    assert_eq!(ns.run(|| list_taps_with_prefix("")).len(), 3);
    assert!(ns.run(|| list_taps_with_prefix("zz")).is_empty());
}

/// A daemonized QEMU, killed when dropped.
struct Qemu {
    pid: libc::pid_t,
}

impl Qemu {
    fn alive(&self) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(self.pid, 0) == 0 }
    }

    fn stop(&self) {
        // SAFETY: sends SIGTERM to the QEMU this test started.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.alive() {
            assert!(Instant::now() < deadline, "QEMU {} did not exit", self.pid);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.alive() {
            // SAFETY: sends SIGKILL to the QEMU this test started.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}

#[test]
#[ignore = "needs root and network namespaces: run by scripts/test"]
fn qemu_attaches_to_a_precreated_tap_which_outlives_it() {
    let ns = Netns::new();
    // The VLAN part only where the kernel can filter VLANs.
    let vlan = ns.has_vlan_filtering();
    ns.bridge("br0", vlan);
    let t = tap();
    let plumb = || {
        create_tap(&t)?;
        attach_to_bridge(&t, "br0", 0)?;
        if vlan {
            set_vlan(&t, 42)?;
        }
        Ok::<(), stratus_core::error::Error>(())
    };
    ns.run(plumb).unwrap();
    assert!(!flags(&ns.link(t.as_str()).unwrap()).contains(&"LOWER_UP"));

    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("qemu.pid");
    let netdev = format!("tap,id=n0,ifname={t},script=no,downscript=no");
    let out = ns.exec(&[
        "qemu-system-x86_64",
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-m",
        "64",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-netdev",
        &netdev,
        "-device",
        "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
        "-daemonize",
        "-pidfile",
        pidfile.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "QEMU refused the tap: {}",
        stderr(&out)
    );
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let qemu = Qemu {
        pid: pid.trim().parse().expect("pid"),
    };
    assert!(qemu.alive());

    // Attached: the carrier is on, and the port kept its bridge and VLAN.
    let link = ns.link(t.as_str()).unwrap();
    assert!(flags(&link).contains(&"LOWER_UP"), "{link}");
    assert_eq!(link["master"], "br0");
    assert_eq!(link["linkinfo"]["info_data"]["vnet_hdr"], true, "{link}");
    // Idempotent calls while QEMU holds it (an agentd restart's reconcile).
    ns.run(plumb).unwrap();

    qemu.stop();
    let link = ns.link(t.as_str()).expect("the tap outlives QEMU");
    assert!(!flags(&link).contains(&"LOWER_UP"), "{link}");
    assert!(flags(&link).contains(&"UP"), "{link}");
    assert_eq!(link["master"], "br0");
    if vlan {
        assert_eq!(
            ns.vlans(t.as_str()),
            vec![(42, vec!["PVID".to_owned(), "Egress Untagged".to_owned()])]
        );
    }
    ns.run(|| delete_tap(&t)).unwrap();
    assert!(ns.link(t.as_str()).is_none());
}
