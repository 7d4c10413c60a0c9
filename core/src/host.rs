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

/// The id agentd and pdiskd compare to know they run on one host (issue
/// 16's same-host attachment): `flag` (`--host-id`) when given, else
/// /etc/machine-id; None when neither is there. An id is 1 to 64 letters,
/// digits, '-', '_' or '.'.
pub fn host_id(flag: Option<&str>) -> crate::error::Result<Option<String>> {
    let ok = |s: &str| {
        (1..=64).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match flag {
        Some(f) if ok(f) => Ok(Some(f.to_string())),
        Some(f) => Err(crate::error::Error::invalid(format!(
            "host-id {f:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
        ))),
        None => Ok(std::fs::read_to_string("/etc/machine-id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| ok(s))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_host_id_is_the_flag_or_the_machine_id_and_nothing_odd() {
        assert_eq!(
            super::host_id(Some("rack1-h7")).unwrap().as_deref(),
            Some("rack1-h7")
        );
        for bad in ["", "a b", "../x", &"x".repeat(65)] {
            assert!(super::host_id(Some(bad)).is_err(), "{bad:?}");
        }
        let machine = std::fs::read_to_string("/etc/machine-id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        assert_eq!(super::host_id(None).unwrap(), machine);
    }

    #[test]
    fn memory_total_reads_meminfo() {
        // Every Linux host has /proc/meminfo; a host with less than 64 MiB
        // could not build this crate.
        let total = super::memory_total().expect("MemTotal in /proc/meminfo");
        assert!(total >= 64 << 20, "{total}");
        assert_eq!(total % 1024, 0);
    }
}
