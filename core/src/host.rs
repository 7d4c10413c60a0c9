//! Facts about the host this process runs on, read the same way by agentd
//! (GetHost) and by stratus-bench (its machine line), and the hostname
//! events are published under.

/// Total memory of the host in bytes (`MemTotal` of /proc/meminfo), or None
/// when it cannot be read.
pub fn memory_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// This host's name (the kernel's), lower case; "localhost" when it cannot
/// be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_ascii_lowercase())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_total_reads_meminfo() {
        // Every Linux host has /proc/meminfo; a host with less than 64 MiB
        // could not build this crate.
        let total = super::memory_total().expect("MemTotal in /proc/meminfo");
        assert!(total >= 64 << 20, "{total}");
        assert_eq!(total % 1024, 0);
    }
}
