//! Who owns a CreateKey intent, and whether that owner can still finish it.
//!
//! An owner id names the process: `host/boot/pid/start/random`. A lease alone would make a
//! restarted server wait out the lease before rolling back what its own crash left; with the
//! process named, `recover` rolls back at once an intent whose owner is gone from this host
//! (no process with that pid and start time, or the host rebooted). An owner on another host
//! (a shared database) is judged by its lease alone.

use std::sync::OnceLock;

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains('/'))
}

fn host() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| read_trimmed("/proc/sys/kernel/hostname").unwrap_or_default())
}

fn boot() -> &'static str {
    static BOOT: OnceLock<String> = OnceLock::new();
    BOOT.get_or_init(|| read_trimmed("/proc/sys/kernel/random/boot_id").unwrap_or_default())
}

/// A process's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`): with the
/// pid, it names one process even after the pid is reused.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The owner id of the live process `pid`, or None if there is none (or no /proc).
pub fn process_owner(pid: u32) -> Option<String> {
    let start = start_time(pid)?;
    Some(format!(
        "{}/{}/{pid}/{start}/{}",
        host(),
        boot(),
        uuid::Uuid::new_v4().simple()
    ))
}

/// This process's owner id, drawn once.
pub fn this_process() -> String {
    process_owner(std::process::id())
        .unwrap_or_else(|| format!("///{}", uuid::Uuid::new_v4().simple()))
}

/// True only when `owner` certainly cannot renew its lease any more: it names a process of this
/// host that no longer runs (or ran before the last reboot). Unknown forms, owners of other
/// hosts and hosts without /proc give false: their lease decides.
pub fn owner_is_gone(owner: &str) -> bool {
    let parts: Vec<&str> = owner.split('/').collect();
    let [owner_host, owner_boot, pid, start, _] = parts[..] else {
        return false;
    };
    if owner_host.is_empty() || owner_host != host() || boot().is_empty() {
        return false;
    }
    if owner_boot != boot() {
        return true;
    }
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    start_time(pid) != Some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_not_gone_and_other_hosts_are_left_to_their_lease() {
        assert!(!owner_is_gone(&this_process()));
        assert!(!owner_is_gone("elsewhere/b/1/2/r"));
        assert!(!owner_is_gone(""));
        assert!(!owner_is_gone("another-live-process"));
        let rebooted = format!("{}/not-this-boot/1/1/r", host());
        assert_eq!(
            owner_is_gone(&rebooted),
            !host().is_empty() && !boot().is_empty()
        );
    }
}
