//! The ready line: one machine-readable line on the console telling the host
//! that the guest is up and what it sees.
//!
//! Format: `CAPSA_READY {"cpus":N,"mem_total_kib":N,"uptime_ms":N}`

use anyhow::{anyhow, Context, Result};

pub const READY_PREFIX: &str = "CAPSA_READY";

#[derive(Debug, PartialEq, Eq)]
pub struct ReadyReport {
    pub cpus: u32,
    pub mem_total_kib: u64,
    pub uptime_ms: u64,
}

impl ReadyReport {
    pub fn collect() -> Result<Self> {
        let read = |path: &str| {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))
        };
        Ok(Self {
            cpus: count_cpus(&read("/sys/devices/system/cpu/online")?)?,
            mem_total_kib: mem_total_kib(&read("/proc/meminfo")?)?,
            uptime_ms: uptime_ms(&read("/proc/uptime")?)?,
        })
    }

    pub fn line(&self) -> String {
        format!(
            "{READY_PREFIX} {{\"cpus\":{},\"mem_total_kib\":{},\"uptime_ms\":{}}}",
            self.cpus, self.mem_total_kib, self.uptime_ms
        )
    }
}

/// Counts CPUs in a sysfs CPU list such as `0-3,5,7-8`.
fn count_cpus(list: &str) -> Result<u32> {
    let mut count = 0;
    for range in list.trim().split(',').filter(|r| !r.is_empty()) {
        let parse = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| anyhow!("bad CPU list {list:?}"))
        };
        count += match range.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (parse(lo)?, parse(hi)?);
                hi.checked_sub(lo)
                    .ok_or_else(|| anyhow!("bad CPU range {range:?}"))?
                    + 1
            }
            None => {
                parse(range)?;
                1
            }
        };
    }
    Ok(count)
}

fn mem_total_kib(meminfo: &str) -> Result<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no MemTotal in /proc/meminfo"))
}

/// Milliseconds since the kernel booted.
pub fn current_uptime_ms() -> Result<u64> {
    uptime_ms(&std::fs::read_to_string("/proc/uptime").context("cannot read /proc/uptime")?)
}

fn uptime_ms(uptime: &str) -> Result<u64> {
    let seconds: f64 = uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad /proc/uptime {uptime:?}"))?;
    Ok((seconds * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cpu_lists() {
        assert_eq!(count_cpus("0\n").unwrap(), 1);
        assert_eq!(count_cpus("0-1\n").unwrap(), 2);
        assert_eq!(count_cpus("0-3,5,7-8").unwrap(), 7);
        assert!(count_cpus("3-1").is_err());
        assert!(count_cpus("x").is_err());
    }

    #[test]
    fn reads_mem_total() {
        let meminfo = "MemTotal:         118084 kB\nMemFree:  1 kB\n";
        assert_eq!(mem_total_kib(meminfo).unwrap(), 118084);
        assert!(mem_total_kib("MemFree: 1 kB\n").is_err());
    }

    #[test]
    fn ready_line_is_json_after_the_prefix() {
        let report = ReadyReport {
            cpus: 2,
            mem_total_kib: 1000,
            uptime_ms: 42,
        };
        assert_eq!(
            report.line(),
            r#"CAPSA_READY {"cpus":2,"mem_total_kib":1000,"uptime_ms":42}"#
        );
        assert_eq!(uptime_ms("0.42 0.10\n").unwrap(), 420);
    }
}
