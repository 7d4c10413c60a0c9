//! Network namespaces of the test's own ([`NetNs`]) and connecting from
//! inside one.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{require_root, run, run_ok};

static NEXT_NS: AtomicU32 = AtomicU32::new(0);

/// A network namespace of the test's own, with loopback up. Processes
/// started through [`NetNs::command`] live in it; [`NetNs::block_on`] runs
/// async client code whose sockets are created inside it. Deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    // Not Default: creating one changes the host (a new namespace).
    #[allow(clippy::new_without_default)]
    pub fn new() -> NetNs {
        require_root();
        let name = format!(
            "stratus-t{}-{}",
            std::process::id(),
            NEXT_NS.fetch_add(1, Ordering::SeqCst)
        );
        run_ok("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS...`, asserting success.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run_ok("ip", &a)
    }

    /// A bridge inside the namespace, up.
    pub fn add_bridge(&self, name: &str) {
        self.ip(&["link", "add", name, "type", "bridge"]);
        self.ip(&["link", "set", name, "up"]);
    }

    pub fn link_exists(&self, name: &str) -> bool {
        run("ip", &["-n", &self.name, "link", "show", name])
            .status
            .success()
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Moves the calling thread into the namespace.
    pub fn enter_this_thread(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.name)).unwrap();
        // SAFETY: setns on an open namespace fd only changes this thread's
        // network namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// Runs `f` on a fresh thread inside the namespace, on a current-thread
    /// runtime, so every socket it opens belongs to the namespace.
    pub fn block_on<F, Fut>(&self, f: F) -> Fut::Output
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future,
        Fut::Output: Send + 'static,
    {
        self.spawn(f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Like [`NetNs::block_on`] without waiting: join the thread for the
    /// output (e.g. a call the test interrupts meanwhile).
    pub fn spawn<F, Fut>(&self, f: F) -> std::thread::JoinHandle<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future,
        Fut::Output: Send + 'static,
    {
        let name = self.name.clone();
        std::thread::spawn(move || {
            NetNs { name }.enter_without_drop();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
    }

    fn enter_without_drop(self) {
        self.enter_this_thread();
        std::mem::forget(self);
    }

    /// True when a TCP connect to `addr` succeeds from inside the namespace.
    pub fn can_connect(&self, addr: SocketAddr) -> bool {
        can_connect_in(&self.name, addr)
    }
}

/// True when a TCP connect to `addr` succeeds from inside namespace `name`.
pub fn can_connect_in(name: &str, addr: SocketAddr) -> bool {
    let name = name.to_string();
    std::thread::spawn(move || {
        NetNs { name }.enter_without_drop();
        std::net::TcpStream::connect(addr).is_ok()
    })
    .join()
    .unwrap()
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

impl NetNs {
    /// The network namespace this test process runs in, under a name of its
    /// own (`ip netns attach`), so helpers that take a [`NetNs`] (such as
    /// [`Agentd::start_in_with`]) run there. For daemons that a private
    /// namespace cuts off: agentd with `--attach kernel` must reach iscsid,
    /// whose control socket is an abstract Unix socket (one per network
    /// namespace), and a pdiskd listening on this namespace's 127.0.0.1.
    /// Drop removes only the name; the namespace is this process's own.
    pub fn host() -> NetNs {
        require_root();
        let name = format!(
            "stratus-h{}-{}",
            std::process::id(),
            NEXT_NS.fetch_add(1, Ordering::SeqCst)
        );
        run_ok(
            "ip",
            &["netns", "attach", &name, &std::process::id().to_string()],
        );
        NetNs { name }
    }
}
