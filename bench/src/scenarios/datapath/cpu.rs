//! CPU time a data path costs the host: the client (`qemu-img bench`, the
//! guest's QEMU in production) plus the iSCSI target (tgtd), per GiB moved.
//! On a real host the target competes with guests for the same cores.

use std::time::Duration;

/// CPU time used so far by the reaped children of this process and by the
/// process `pid` (tgtd, all its threads).
#[derive(Debug, Clone, Copy)]
pub(super) struct CpuMark {
    children: Duration,
    other: Duration,
}

impl CpuMark {
    pub(super) fn now(pid: Option<u32>) -> CpuMark {
        CpuMark {
            children: children_cpu(),
            other: pid.map(process_cpu).unwrap_or_default(),
        }
    }

    /// CPU seconds used since `self` (same `pid`). The children's share
    /// counts only children reaped in between: the caller reaps exactly
    /// one, the measured qemu-img.
    pub(super) fn since(&self, pid: Option<u32>) -> f64 {
        let now = CpuMark::now(pid);
        (now.children.saturating_sub(self.children) + now.other.saturating_sub(self.other))
            .as_secs_f64()
    }
}

/// User + system time of every waited-for child (RUSAGE_CHILDREN).
fn children_cpu() -> Duration {
    // SAFETY: getrusage only writes the rusage struct we pass, which is
    // plain data and fully initialised by zeroing.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to an rusage that lives across the call.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// User + system time of process `pid`, from /proc/PID/stat; zero when it
/// cannot be read.
fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    parse_stat_ticks(&stat)
        .map(|ticks| {
            // SAFETY: sysconf only reads a constant of the system.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            Duration::from_secs_f64(ticks as f64 / hz)
        })
        .unwrap_or_default()
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line; the command
/// name (field 2) may hold spaces and parentheses, so fields are counted
/// after its last ')'.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, index 11.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_utime_and_stime_after_the_command_name() {
        let line = "4242 (tgtd (x) y) S 1 4242 4242 0 -1 4194560 300 0 0 0 17 5 0 0 20 0 3 0 100";
        assert_eq!(super::parse_stat_ticks(line), Some(22));
        assert_eq!(super::parse_stat_ticks("garbage"), None);
        let own = super::process_cpu(std::process::id());
        let _ = own; // reads; may be zero early in a test process
    }
}
