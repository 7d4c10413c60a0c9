//! The chaos thread: SIGKILL of a random victim (pdiskd, agentd, tgtd, or
//! a running soak guest's QEMU) every so often, the daemon restarted after
//! up to 2 s; after each restart of tgtd or pdiskd, tgt's targets and ACLs
//! must come to equal pdiskd's ListExports within [`EXPORTS_SETTLE`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{expect, invariants, Crash, Daemon, Daemons, Places, Settings};

/// The chaos thread's state: it kills a random victim every so often.
pub(crate) struct Chaos<'a> {
    pub daemons: &'a Mutex<Option<Daemons>>,
    pub places: &'a Places,
    pub runtime: &'a tokio::runtime::Handle,
    pub crashes: Vec<Crash>,
    /// Exporters that stayed unequal to pdiskd's exports after a restart.
    pub violations: Vec<String>,
}

impl Chaos<'_> {
    /// Kills a random victim every so often (restarting a daemon), until
    /// `stop`.
    pub fn run(&mut self, stop: &AtomicBool, settings: &Settings, started: Instant) {
        let mut rng = expect::Rng::new(settings.seed ^ 0x9e37_79b9_7f4a_7c15);
        if settings.victims.is_empty() {
            return;
        }
        loop {
            let (lo, hi) = settings.kill_every;
            let wait = lo + Duration::from_millis(rng.below((hi - lo).as_millis() as u64 + 1));
            let until = Instant::now() + wait;
            while Instant::now() < until {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let victim = settings.victims[rng.below(settings.victims.len() as u64) as usize];
            let at = started.elapsed();
            let t = Instant::now();
            // Down for up to 2 s: calls in between find nothing listening.
            let down = Duration::from_millis(rng.below(2000));
            let mut pid = None;
            {
                let mut guard = self.daemons.lock().unwrap();
                let d = guard.as_mut().expect("daemons live while the chaos runs");
                match victim {
                    Daemon::Pdiskd => {
                        d.pdiskd.kill9();
                        std::thread::sleep(down);
                        d.pdiskd.restart();
                    }
                    Daemon::Agentd => {
                        d.agentd.kill9();
                        std::thread::sleep(down);
                        d.agentd.restart();
                    }
                    Daemon::Tgtd => {
                        d.tgtd.kill();
                        std::thread::sleep(down);
                        d.tgtd.restart();
                    }
                    Daemon::Qemu => {
                        let mut live = guest_qemus(self.places);
                        if live.is_empty() {
                            continue;
                        }
                        let (p, _) = live.swap_remove(rng.below(live.len() as u64) as usize);
                        // SAFETY: kill(2) on a pid this soak's agentd
                        // started (its guest's UUID on the command line).
                        unsafe { libc::kill(p as i32, libc::SIGKILL) };
                        pid = Some(p);
                    }
                }
            }
            let down_ms = if victim == Daemon::Qemu {
                0
            } else {
                t.elapsed().as_millis() as u64
            };
            eprintln!(
                "stratus-soak: {:>5.1} s: killed {}{} (back after {down_ms} ms)",
                at.as_secs_f64(),
                victim.name(),
                pid.map_or(String::new(), |p| format!(" pid {p}")),
            );
            self.crashes.push(Crash {
                daemon: victim,
                at_s: at.as_secs_f64(),
                down_ms,
                pid,
            });
            if matches!(victim, Daemon::Tgtd | Daemon::Pdiskd) {
                self.exports_settle(victim);
            }
        }
    }

    /// After a restart of tgtd or pdiskd: within [`EXPORTS_SETTLE`], tgt's
    /// targets and ACLs must equal pdiskd's ListExports (pdiskd's watchdog
    /// re-applies them to a restarted tgtd; its start-up reconciles both).
    fn exports_settle(&mut self, victim: Daemon) {
        let places = self.places.clone();
        let task = self
            .runtime
            .spawn(async move { invariants::exports_converge(&places, EXPORTS_SETTLE).await });
        match self.runtime.block_on(task) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self
                .violations
                .push(format!("after the restart of {}: {e:#}", victim.name())),
            Err(e) => self
                .violations
                .push(format!("the export comparison panicked: {e}")),
        }
    }
}

/// How long tgt may differ from pdiskd's exports after a restart.
const EXPORTS_SETTLE: Duration = Duration::from_secs(30);

/// Live QEMUs of this soak's guests (a guest directory of its agentd names
/// their UUID): (pid, uuid).
pub(crate) fn guest_qemus(places: &Places) -> Vec<(u32, String)> {
    let dirs: std::collections::BTreeSet<String> =
        match std::fs::read_dir(places.agent_state.join("vms")) {
            Ok(d) => d
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => return Vec::new(),
        };
    invariants::qemus()
        .into_iter()
        .filter(|(_, u)| dirs.contains(u))
        .collect()
}
