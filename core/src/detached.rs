//! Long-lived programs started detached (a guest's QEMU): born straight
//! into their cgroup, as their user, in a session of their own, with only
//! the descriptors they are given; waited on and killed through a pidfd.
//!
//! Why not `std::process::Command` with a `pre_exec` that writes
//! `cgroup.procs`: moving a live process between cgroups takes the
//! kernel's cgroup threadgroup lock for writing, which waits for an RCU
//! grace period — measured 13 ms at the median per launch on a loaded
//! 2-core host, the largest part of what confining a guest cost at launch.
//! `clone3(CLONE_INTO_CGROUP)` (Linux 5.7) creates the child in the
//! cgroup instead and takes that lock only for reading. Everything the
//! child does between the clone and the exec is async-signal-safe and
//! works on values prepared before the clone; it allocates nothing.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Instant;

use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result};
use crate::runner::Cmd;

/// How [`spawn_detached`] starts a long-lived program.
#[derive(Debug, Default)]
pub struct Detached {
    /// Run as this uid and gid with no supplementary groups; None: as we are.
    pub user: Option<(u32, u32)>,
    /// Descriptors the program inherits under their own numbers (everything
    /// else is close-on-exec, as std opens it).
    pub inherit: Vec<RawFd>,
    /// Its stdout and stderr; None: /dev/null.
    pub output: Option<std::fs::File>,
    /// An open cgroup v2 directory: the program is created in that cgroup
    /// (`CLONE_INTO_CGROUP`), so it never runs anywhere else.
    pub cgroup: Option<RawFd>,
}

/// A program started by [`spawn_detached`]. Dropping it neither kills nor
/// reaps the program: wait on it.
#[derive(Debug)]
pub struct DetachedChild {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
}

impl DetachedChild {
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Waits for the program to end and reaps it. Cancel-safe.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.status {
                return Ok(s);
            }
            let mut ready = self.pidfd.readable().await?;
            match reap(self.pidfd.get_ref().as_raw_fd(), false)? {
                Some(s) => self.status = Some(s),
                None => ready.clear_ready(),
            }
        }
    }

    /// Sends SIGKILL (through the pidfd: never another process that got
    /// the pid after a reap).
    pub fn start_kill(&self) -> std::io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: pidfd_send_signal on our own pidfd with no siginfo.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Reaps the child behind `pidfd` if it has ended (or, with `block`, once
/// it has).
fn reap(pidfd: RawFd, block: bool) -> std::io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain data; waitid writes into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: waitid on our pidfd into `info`, which lives across the call.
        let rc = unsafe { libc::waitid(libc::P_PIDFD, pidfd as libc::id_t, &mut info, flags) };
        if rc == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // SAFETY: waitid filled `info` (si_pid 0: nothing ended yet, WNOHANG).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => ExitStatus::from_raw((status & 0xff) << 8),
        libc::CLD_DUMPED => ExitStatus::from_raw(status | 0x80),
        _ => ExitStatus::from_raw(status),
    }))
}

/// Finds `program` on PATH as execvp would (before the clone: the child
/// may not allocate).
fn resolve(program: &str) -> Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| Error::unavailable(format!("cannot start {program}: not found on PATH")))
}

fn cstring(s: &OsStr) -> Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| Error::invalid(format!("{s:?}: contains a NUL byte")))
}

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Starts `cmd` as a long-lived program in a session of its own (no
/// terminal, not in our process group, so signals meant for us never reach
/// it and it outlives us), as described by `how`. Never a shell; argv is
/// logged. Returns once the program has been exec'd (an exec that failed
/// is this call's error). The caller owns the child: wait on it and bound
/// how long it waits for the program to be ready. Needs a tokio runtime.
pub fn spawn_detached(cmd: &Cmd, how: Detached) -> Result<DetachedChild> {
    let started = Instant::now();
    let cannot = |what: &str, e: std::io::Error| {
        Error::unavailable(format!("cannot start {}: {what}: {e}", cmd.program)).with_source(e)
    };
    // Everything the child touches, made now.
    let path = cstring(resolve(&cmd.program)?.as_os_str())?;
    let argv: Vec<CString> = std::iter::once(cmd.program.as_str())
        .chain(cmd.args.iter().map(String::as_str))
        .map(|a| cstring(OsStr::new(a)))
        .collect::<Result<_>>()?;
    let envp: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            CString::new(kv).map_err(|_| Error::invalid("an environment variable holds a NUL"))
        })
        .collect::<Result<_>>()?;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let null = std::fs::File::open("/dev/null").map_err(|e| cannot("/dev/null", e))?;
    let out = how
        .output
        .as_ref()
        .map_or(null.as_raw_fd(), AsRawFd::as_raw_fd);
    // The child reports a failed step here (close-on-exec: EOF once it runs).
    let mut p = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `p`.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(cannot("pipe2", std::io::Error::last_os_error()));
    }
    // SAFETY: both ends are ours from here on.
    let (report_r, report_w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    let child = Child {
        path: path.as_ptr(),
        argv: argv_p.as_ptr(),
        envp: envp_p.as_ptr(),
        stdin: null.as_raw_fd(),
        out,
        user: how.user,
        inherit: &how.inherit,
        report: report_w.as_raw_fd(),
    };

    let mut pidfd: RawFd = -1;
    // SAFETY: clone_args is plain data; zero is "unset" for every field.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = CLONE_PIDFD;
    args.pidfd = std::ptr::addr_of_mut!(pidfd) as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    if let Some(dir) = how.cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = dir as u64;
    }
    // SAFETY: clone3 without CLONE_VM is a fork: the child gets a copy of
    // this thread's memory and runs only `child.exec()`, which never returns
    // and calls only async-signal-safe functions on the prepared values.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of_mut!(args),
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if pid == 0 {
        // SAFETY: in the child, see above.
        unsafe { child.exec() }
    }
    if pid < 0 {
        return Err(cannot("clone3", std::io::Error::last_os_error()));
    }
    drop(report_w);
    // SAFETY: CLONE_PIDFD stored a new descriptor (close-on-exec) in pidfd.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut failed = [0u8; 8];
    let n = loop {
        // SAFETY: read into `failed`, of the length given.
        let n = unsafe { libc::read(report_r.as_raw_fd(), failed.as_mut_ptr().cast(), 8) };
        if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break n;
        }
    };
    if n != 0 {
        let _ = reap(pidfd.as_raw_fd(), true);
        let step = i32::from_ne_bytes(failed[..4].try_into().expect("4 bytes"));
        let errno = i32::from_ne_bytes(failed[4..].try_into().expect("4 bytes"));
        let step = STEPS.get(step as usize).copied().unwrap_or("?");
        return Err(cannot(step, std::io::Error::from_raw_os_error(errno)));
    }
    // SAFETY: the pidfd is an OwnedFd that AsyncFd owns from here on;
    // nothing else closes or replaces it.
    let pidfd = unsafe { AsyncFd::register(pidfd) }.map_err(|e| cannot("pidfd", e.into()))?;
    tracing::info!(argv = %cmd.argv().join(" "), pid, user = ?how.user, cgroup = how.cgroup.is_some(),
        duration_ms = started.elapsed().as_secs_f64() * 1000.0, "started detached");
    Ok(DetachedChild {
        pid: pid as u32,
        pidfd,
        status: None,
    })
}

/// The steps of [`Child::exec`], as reported to the parent.
const STEPS: &[&str] = &[
    "signal mask",
    "stdio",
    "setsid",
    "setgroups",
    "setgid",
    "setuid",
    "inherited descriptors",
    "exec",
];

/// What the child needs, as raw pointers and descriptors into the parent's
/// prepared values (valid in the child's copy of memory).
struct Child<'a> {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stdin: RawFd,
    out: RawFd,
    user: Option<(u32, u32)>,
    inherit: &'a [RawFd],
    report: RawFd,
}

impl Child<'_> {
    /// In the child: stdio, a session, the user, the inherited descriptors,
    /// exec. Only async-signal-safe calls; no allocation, no locks.
    unsafe fn exec(&self) -> ! {
        // SAFETY: the caller runs this in the child of a clone without
        // CLONE_VM, on values prepared before it (see Child).
        unsafe {
            let fail = |step: usize| -> ! {
                let errno = *libc::__errno_location();
                let mut msg = [0u8; 8];
                msg[..4].copy_from_slice(&(step as i32).to_ne_bytes());
                msg[4..].copy_from_slice(&errno.to_ne_bytes());
                libc::write(self.report, msg.as_ptr().cast(), 8);
                libc::_exit(127)
            };
            // As std does: no blocked signals, SIGPIPE back to its default
            // (the Rust runtime ignores it, and an ignored signal stays ignored
            // across exec).
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0
                || libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR
            {
                fail(0);
            }
            for (from, to) in [(self.stdin, 0), (self.out, 1), (self.out, 2)] {
                // dup2 onto itself keeps close-on-exec: clear it then.
                let rc = if from == to {
                    libc::fcntl(to, libc::F_SETFD, 0)
                } else {
                    libc::dup2(from, to)
                };
                if rc < 0 {
                    fail(1);
                }
            }
            if libc::setsid() < 0 {
                fail(2);
            }
            if let Some((uid, gid)) = self.user {
                if libc::setgroups(0, std::ptr::null()) < 0 {
                    fail(3);
                }
                if libc::setgid(gid) < 0 {
                    fail(4);
                }
                if libc::setuid(uid) < 0 {
                    fail(5);
                }
            }
            for &fd in self.inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    fail(6);
                }
            }
            libc::execve(self.path, self.argv, self.envp);
            fail(7)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn cmd(program: &str, args: &[&str]) -> Cmd {
        Cmd::new(program).args(args.iter().map(|a| a.to_string()))
    }

    #[tokio::test]
    async fn a_program_runs_with_its_output_and_inherited_descriptors_and_is_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out");
        let output = std::fs::File::create(&log).unwrap();
        // A descriptor to inherit (std opens it close-on-exec): the program
        // copies it, as /proc/self/fd/N, to its stdout.
        let src = dir.path().join("in");
        std::fs::write(&src, "through fd\n").unwrap();
        let r = std::fs::File::open(&src).unwrap();
        let fd = r.as_raw_fd();
        let c = cmd("cat", &[&format!("/proc/self/fd/{fd}")]);
        let how = Detached {
            inherit: vec![fd],
            output: Some(output),
            ..Default::default()
        };
        let mut child = spawn_detached(&c, how).unwrap();
        let status = child.wait().await.unwrap();
        assert!(status.success(), "{status}");
        let mut got = String::new();
        std::fs::File::open(&log)
            .unwrap()
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "through fd\n");
        // Reaped: no zombie left behind under that pid.
        assert!(!std::path::Path::new(&format!("/proc/{}", child.id())).exists());
        assert_eq!(child.wait().await.unwrap(), status, "asked again");
    }

    #[tokio::test]
    async fn exit_codes_kills_and_failed_execs_are_told_apart() {
        let mut f = spawn_detached(&cmd("false", &[]), Detached::default()).unwrap();
        assert_eq!(f.wait().await.unwrap().code(), Some(1));

        let mut s = spawn_detached(&cmd("sleep", &["30"]), Detached::default()).unwrap();
        // Its own session: not in our process group.
        let sid = std::fs::read_to_string(format!("/proc/{}/stat", s.id())).unwrap();
        let fields: Vec<&str> = sid.rsplit(')').next().unwrap().split_whitespace().collect();
        assert_eq!(fields[3], s.id().to_string(), "session id is its own pid");
        s.start_kill().unwrap();
        assert_eq!(s.wait().await.unwrap().signal(), Some(libc::SIGKILL));

        let e = spawn_detached(&cmd("/nonexistent/qemu", &[]), Detached::default()).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/qemu: exec"), "{e}");
        let e = spawn_detached(&cmd("no-such-program-here", &[]), Detached::default()).unwrap_err();
        assert!(e.to_string().contains("not found on PATH"), "{e}");
    }
}
