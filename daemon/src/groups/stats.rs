//! A group's figures: the VMM's host RSS, CPU time and I/O from /proc,
//! its tap's counters, and each running container's cgroup figures from
//! the agent.

use capsa_api::{ApiError, ContainerStats, ContainerStatus, GroupStats};

use super::Daemon;
use crate::errors::{conflict, internal};

/// The figures of one process, from its /proc files.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProcFigures {
    pub rss_kib: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
}

impl ProcFigures {
    /// Parses /proc/PID/status, stat and io; what a file lacks counts 0.
    pub fn parse(status: &str, stat: &str, io: &str) -> Self {
        let rss_kib = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // utime and stime: fields 14 and 15, the 12th and 13th after the
        // command's closing parenthesis (the command may hold spaces and
        // parentheses itself).
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let cpu_ticks = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
            .sum();
        let io_field = |key: &str| {
            io.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        ProcFigures {
            rss_kib,
            cpu_ticks,
            read_bytes: io_field("read_bytes:"),
            write_bytes: io_field("write_bytes:"),
        }
    }

    pub fn of(pid: u32) -> Self {
        let read =
            |file: &str| std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
        Self::parse(&read("status"), &read("stat"), &read("io"))
    }

    /// The sum over `pids`.
    pub fn of_all(pids: &[u32]) -> Self {
        pids.iter()
            .map(|pid| Self::of(*pid))
            .fold(Self::default(), |sum, one| ProcFigures {
                rss_kib: sum.rss_kib + one.rss_kib,
                cpu_ticks: sum.cpu_ticks + one.cpu_ticks,
                read_bytes: sum.read_bytes + one.read_bytes,
                write_bytes: sum.write_bytes + one.write_bytes,
            })
    }
}

/// The resident KiB of the guest's memory in a VMM's /proc/PID/smaps: its
/// largest anonymous or private writable mappings (a VM restored from a
/// template maps its memory file privately) that together are `guest_kib`
/// (the guest's RAM, below and above the MMIO gap), None when none add up
/// to it.
pub fn guest_rss_kib(smaps: &str, guest_kib: u64) -> Option<u64> {
    // (size, rss) of each such mapping.
    let mut mappings: Vec<(u64, u64)> = Vec::new();
    let mut candidate = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: address perms offset dev inode [path].
            let perms = words.next().unwrap_or("");
            let private_writable = perms.starts_with("rw") && perms.ends_with('p');
            candidate = words.nth(3).is_none() || private_writable;
            if candidate {
                mappings.push((0, 0));
            }
            continue;
        }
        let mut value = || words.next().and_then(|v| v.parse::<u64>().ok());
        match (candidate, first, mappings.last_mut()) {
            (true, "Size:", Some(last)) => last.0 = value().unwrap_or(0),
            (true, "Rss:", Some(last)) => last.1 = value().unwrap_or(0),
            _ => {}
        }
    }
    mappings.sort_by_key(|m| std::cmp::Reverse(m.0));
    let (mut size, mut rss) = (0, 0);
    for (mapping_size, mapping_rss) in mappings {
        if size + mapping_size > guest_kib {
            continue;
        }
        size += mapping_size;
        rss += mapping_rss;
        if size == guest_kib {
            return Some(rss);
        }
    }
    None
}

impl Daemon {
    pub fn stats(&self, name: &str) -> Result<GroupStats, ApiError> {
        let group = self.group(name)?;
        let guest = group.guest_within(super::ADOPTION_PATIENCE);
        let record = group.snapshot();
        let (Some(pid), Some(guest)) = (record.vmm_pid, guest) else {
            return Err(conflict(format!("group {name:?} is not running")));
        };
        // A jailed VMM is two processes: the one started, which waits, and
        // the VMM in the jail's PID namespace.
        let processes = capsa_vm_process::vmm_processes(pid);
        let figures = ProcFigures::of_all(&processes);
        // SAFETY: sysconf reads a constant and touches no memory of ours.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let mut containers = Vec::new();
        for container in record
            .containers
            .iter()
            .filter(|c| c.status == ContainerStatus::Running)
        {
            let stats = guest.stats(&container.name).map_err(internal)?;
            containers.push(ContainerStats {
                name: container.name.clone(),
                cpu_usage_usec: stats.cpu_usage_usec,
                memory_bytes: stats.memory_current_bytes,
                memory_limit_bytes: stats.memory_limit_bytes,
                pids: stats.pids_current,
            });
        }
        let tap = |counter: &str| {
            record
                .ip
                .and_then(|ip| {
                    let tap = capsa_network::tap_name(ip);
                    std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{counter}"))
                        .ok()
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let smaps: String = processes
            .iter()
            .map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default())
            .collect();
        let vmm_overhead_kib = guest_rss_kib(&smaps, record.spec.memory_mib() << 10)
            .map(|guest| figures.rss_kib.saturating_sub(guest))
            .unwrap_or(0);
        let (disk_rate_limit, network_rate_limit) = self.settings.rates(&record.spec);
        Ok(GroupStats {
            group: name.to_string(),
            vmm_rss_kib: figures.rss_kib,
            vmm_overhead_kib,
            vmm_cpu_seconds: figures.cpu_ticks as f64 / per_second,
            net_from_guest_bytes: tap("rx_bytes"),
            net_to_guest_bytes: tap("tx_bytes"),
            block_read_bytes: figures.read_bytes,
            block_write_bytes: figures.write_bytes,
            disk_rate_limit,
            network_rate_limit,
            containers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse_into_figures() {
        let status = "Name:\tcapsa-vmm\nVmPeak:\t  9999 kB\nVmRSS:\t  123456 kB\n";
        let stat = "4242 (capsa (vmm) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0";
        let io = "rchar: 1\nwchar: 2\nread_bytes: 4096\nwrite_bytes: 8192\n";
        assert_eq!(
            ProcFigures::parse(status, stat, io),
            ProcFigures {
                rss_kib: 123456,
                cpu_ticks: 325,
                read_bytes: 4096,
                write_bytes: 8192,
            }
        );
    }

    #[test]
    fn the_guests_memory_is_told_apart_from_the_vmms_own() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /payload/capsa-vmm
Size:               1024 kB
Rss:                 900 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:               30000 kB
7f0010000000-7f0010800000 rw-p 00000000 00:00 0
Size:               8192 kB
Rss:                  64 kB
7f0020000000-7f0020100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 500 kB
";
        assert_eq!(guest_rss_kib(smaps, 262144), Some(30000));
        // Two regions (below and above the MMIO gap).
        assert_eq!(guest_rss_kib(smaps, 262144 + 8192), Some(30064));
        assert_eq!(guest_rss_kib(smaps, 999), None);
        assert_eq!(guest_rss_kib("", 262144), None);
        // A clone's memory: its template's file, mapped privately.
        let restored = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /payload/capsa-vmm
Size:               1024 kB
Rss:                 900 kB
7f0000000000-7f0010000000 rw-p 00000000 08:01 99 /templates/6aa3f9691e8da0ff/memory
Size:             262144 kB
Rss:               12000 kB
7f0020000000-7f0020100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 500 kB
";
        assert_eq!(guest_rss_kib(restored, 262144), Some(12000));
    }

    #[test]
    fn missing_or_garbled_files_count_zero() {
        assert_eq!(ProcFigures::parse("", "", ""), ProcFigures::default());
        assert_eq!(
            ProcFigures::parse("VmRSS: lots", "1 (x) S", "read_bytes: -1"),
            ProcFigures::default()
        );
        assert_eq!(ProcFigures::of(u32::MAX), ProcFigures::default());
    }

    #[test]
    fn this_process_has_figures() {
        assert!(ProcFigures::of(std::process::id()).rss_kib > 0);
    }
}
