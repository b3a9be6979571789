//! What the host can hold: a spec's VM size against capsad's maxima (at
//! create), and a start against the host's memory budget (the running
//! VMs' memory plus their VMMs' overhead, never overcommitted).

use capsa_api::GroupSpec;
use capsa_cgroup::VMM_OVERHEAD_MIB;

/// Memory left to the host itself when the budget is not given.
const HOST_RESERVE_MIB: u64 = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    /// The most memory one VM may ask for.
    pub max_memory_mib: u64,
    /// The most vCPUs one VM may ask for.
    pub max_cpus: u8,
    /// The memory all running VMs may hold together (each its guest's
    /// memory and its VMM's overhead budget).
    pub memory_budget_mib: u64,
}

impl Default for Capacity {
    /// No limits beyond the spec's own.
    fn default() -> Self {
        Capacity {
            max_memory_mib: u64::MAX,
            max_cpus: u8::MAX,
            memory_budget_mib: u64::MAX,
        }
    }
}

/// MemTotal of /proc/meminfo, in MiB.
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib >> 10)
}

/// What a VM of `spec` holds on the host at most.
pub fn footprint_mib(spec: &GroupSpec) -> u64 {
    spec.memory_mib().saturating_add(VMM_OVERHEAD_MIB)
}

impl Capacity {
    /// The budget is the host's memory less a reserve unless given; one
    /// VM may use all of it unless a maximum is given.
    pub fn of_host(
        max_memory_mib: Option<u64>,
        max_cpus: Option<u8>,
        memory_budget_mib: Option<u64>,
    ) -> Capacity {
        let budget = memory_budget_mib
            .or_else(|| host_memory_mib().map(|m| m.saturating_sub(HOST_RESERVE_MIB)))
            .unwrap_or(u64::MAX);
        Capacity {
            max_memory_mib: max_memory_mib
                .unwrap_or_else(|| budget.saturating_sub(VMM_OVERHEAD_MIB)),
            max_cpus: max_cpus.unwrap_or(u8::MAX),
            memory_budget_mib: budget,
        }
    }

    /// The spec's problems with this daemon's maxima, by field.
    pub fn check_spec(&self, spec: &GroupSpec) -> Vec<String> {
        let mut problems = Vec::new();
        if spec.memory_mib() > self.max_memory_mib {
            problems.push(format!(
                "memoryMib: {} is above this daemon's maximum of {} (capsad --max-vm-memory-mib)",
                spec.memory_mib(),
                self.max_memory_mib
            ));
        }
        if spec.cpus() > self.max_cpus {
            problems.push(format!(
                "cpus: {} is above this daemon's maximum of {} (capsad --max-vm-cpus)",
                spec.cpus(),
                self.max_cpus
            ));
        }
        problems
    }

    /// Whether `spec` may start beside the `running` groups.
    pub fn admit(&self, spec: &GroupSpec, running: &[GroupSpec]) -> Result<(), String> {
        let held: u64 = running.iter().map(footprint_mib).sum();
        let needed = footprint_mib(spec);
        if held.saturating_add(needed) > self.memory_budget_mib {
            return Err(format!(
                "not enough host memory for group {:?}: it needs {needed} MiB ({} for the guest, {VMM_OVERHEAD_MIB} for its VMM), and {held} MiB of the {} MiB budget are held by {} running group(s) (capsad --memory-budget-mib)",
                spec.name,
                spec.memory_mib(),
                self.memory_budget_mib,
                running.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, memory_mib: u64, cpus: u8) -> GroupSpec {
        serde_json::from_value(serde_json::json!({
            "name": name, "memoryMib": memory_mib, "cpus": cpus,
            "containers": [{"name": "main", "image": "busybox"}],
        }))
        .unwrap()
    }

    #[test]
    fn sizes_above_the_maxima_are_refused_by_field() {
        let capacity = Capacity {
            max_memory_mib: 1024,
            max_cpus: 2,
            memory_budget_mib: 4096,
        };
        assert!(capacity.check_spec(&spec("a", 1024, 2)).is_empty());
        let problems = capacity.check_spec(&spec("a", 2048, 4));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("memoryMib: 2048"));
        assert!(problems[1].starts_with("cpus: 4"));
    }

    #[test]
    fn a_start_beyond_the_budget_is_refused_not_overcommitted() {
        let capacity = Capacity {
            memory_budget_mib: 3 * (256 + VMM_OVERHEAD_MIB),
            ..Capacity::default()
        };
        let running = [spec("a", 256, 1), spec("b", 256, 1)];
        assert!(capacity.admit(&spec("c", 256, 1), &running).is_ok());
        let e = capacity.admit(&spec("c", 512, 1), &running).unwrap_err();
        assert!(
            e.contains("not enough host memory") && e.contains("2 running"),
            "{e}"
        );
    }

    #[test]
    fn the_host_budget_leaves_a_reserve() {
        let capacity = Capacity::of_host(None, None, None);
        if let Some(total) = host_memory_mib() {
            assert_eq!(capacity.memory_budget_mib, total - HOST_RESERVE_MIB);
            assert_eq!(
                capacity.max_memory_mib,
                capacity.memory_budget_mib - VMM_OVERHEAD_MIB
            );
        }
        assert_eq!(
            Capacity::of_host(Some(1), Some(2), Some(3)).memory_budget_mib,
            3
        );
    }
}
