//! One cgroup v2 directory per container: limits from the spec's
//! resources, statistics, the processes in it, and killing them all.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;

/// The controllers the runtime sets limits with.
const CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {}: the spec asks for a {controller} limit, but that controller is not available here", path.display())]
    MissingController {
        path: PathBuf,
        controller: &'static str,
    },
    #[error("cgroup {}: processes still in it after killing them", path.display())]
    Busy { path: PathBuf },
}

/// What a container's cgroup has counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub memory_current_bytes: u64,
    /// 0: no limit.
    pub memory_limit_bytes: u64,
    pub pids_current: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    pub oom_kills: u64,
}

#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `parent/name` with the limits of `resources`. The parent's
    /// controllers are enabled for its children first.
    pub fn create(
        parent: &Path,
        name: &str,
        resources: Option<&LinuxResources>,
    ) -> Result<Self, CgroupError> {
        fs::create_dir_all(parent).map_err(io_error(parent, "creating"))?;
        // A controller reaches `parent`'s children only if every cgroup
        // from the root down has it enabled for its children.
        let mut path_down: Vec<&Path> = parent
            .ancestors()
            .take_while(|dir| dir.join("cgroup.controllers").exists())
            .collect();
        path_down.reverse();
        for dir in path_down {
            enable_controllers(dir)?;
        }
        let path = parent.join(name);
        fs::create_dir(&path).map_err(io_error(&path, "creating"))?;
        let cgroup = Cgroup { path };
        if let Some(resources) = resources {
            if let Err(e) = cgroup.apply(resources) {
                let _ = fs::remove_dir(&cgroup.path);
                return Err(e);
            }
        }
        Ok(cgroup)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the limits of `resources` (those it sets; the rest stay).
    pub fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        self.apply(resources)
    }

    fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        if let Some(memory) = resources.memory() {
            if let Some(limit) = memory.limit() {
                self.write("memory", "memory.max", &limit_value(limit))?;
                // A limit with swap would only move the pressure to swap;
                // without swap support in the kernel there is none to limit.
                if self.path.join("memory.swap.max").exists() {
                    let swap = memory
                        .swap()
                        .map_or("0".to_string(), |s| limit_value(s - limit.max(0)));
                    self.write("memory", "memory.swap.max", &swap)?;
                }
            }
            if let Some(reservation) = memory.reservation() {
                self.write("memory", "memory.low", &limit_value(reservation))?;
            }
        }
        if let Some(cpu) = resources.cpu() {
            if cpu.quota().is_some() || cpu.period().is_some() {
                let period = cpu.period().unwrap_or(100_000);
                let quota = cpu
                    .quota()
                    .filter(|&q| q > 0)
                    .map_or("max".to_string(), |q| q.to_string());
                self.write("cpu", "cpu.max", &format!("{quota} {period}"))?;
            }
            if let Some(shares) = cpu.shares().filter(|&s| s > 0) {
                // The mapping runc and crun use from cgroup v1 shares.
                let weight = 1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142;
                self.write("cpu", "cpu.weight", &weight.to_string())?;
            }
        }
        if let Some(pids) = resources.pids() {
            self.write("pids", "pids.max", &limit_value(pids.limit()))?;
        }
        Ok(())
    }

    fn write(&self, controller: &'static str, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.path.join(file);
        if !path.exists() {
            return Err(CgroupError::MissingController {
                path: self.path.clone(),
                controller,
            });
        }
        fs::write(&path, value).map_err(io_error(&path, "writing"))
    }

    /// The PIDs (in our namespace) of every process in the cgroup.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let path = self.path.join("cgroup.procs");
        let text = fs::read_to_string(&path).map_err(io_error(&path, "reading"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        let mut stats = CgroupStats::default();
        let cpu = self.read_keyed("cpu.stat")?;
        stats.cpu_usage_usec = lookup(&cpu, "usage_usec");
        stats.cpu_user_usec = lookup(&cpu, "user_usec");
        stats.cpu_system_usec = lookup(&cpu, "system_usec");
        stats.memory_current_bytes = self.read_number("memory.current")?.unwrap_or(0);
        stats.memory_limit_bytes = self.read_number("memory.max")?.unwrap_or(0);
        stats.pids_current = self.read_number("pids.current")?.unwrap_or(0);
        stats.oom_kills = self.oom_kills()?;
        if let Ok(io) = fs::read_to_string(self.path.join("io.stat")) {
            for field in io.split_whitespace() {
                if let Some(n) = field.strip_prefix("rbytes=") {
                    stats.io_read_bytes += n.parse().unwrap_or(0);
                } else if let Some(n) = field.strip_prefix("wbytes=") {
                    stats.io_write_bytes += n.parse().unwrap_or(0);
                }
            }
        }
        Ok(stats)
    }

    /// How many times the kernel has OOM-killed a process here.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        Ok(lookup(&self.read_keyed("memory.events")?, "oom_kill"))
    }

    /// `key value` lines; a missing file (controller not enabled) is empty.
    fn read_keyed(&self, file: &str) -> Result<Vec<(String, u64)>, CgroupError> {
        let path = self.path.join(file);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text
                .lines()
                .filter_map(|line| {
                    let (key, value) = line.split_once(' ')?;
                    Some((key.to_string(), value.trim().parse().ok()?))
                })
                .collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_error(&path, "reading")(e)),
        }
    }

    /// A single number; "max" and a missing file are None.
    fn read_number(&self, file: &str) -> Result<Option<u64>, CgroupError> {
        let path = self.path.join(file);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text.trim().parse().ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path, "reading")(e)),
        }
    }

    /// SIGKILLs every process in the cgroup (cgroup.kill, Linux 5.14).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let path = self.path.join("cgroup.kill");
        fs::write(&path, "1").map_err(io_error(&path, "writing"))
    }

    /// Kills what is left and removes the cgroup, waiting up to `patience`
    /// for the processes to be gone.
    pub fn destroy(&self, patience: Duration) -> Result<(), CgroupError> {
        if !self.path.exists() {
            return Ok(());
        }
        let deadline = Instant::now() + patience;
        loop {
            if self.pids()?.is_empty() {
                match fs::remove_dir(&self.path) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                    Err(e) => return Err(io_error(&self.path, "removing")(e)),
                }
            } else {
                self.kill_all()?;
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Busy {
                    path: self.path.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Enables for `parent`'s children every controller of ours it has.
fn enable_controllers(parent: &Path) -> Result<(), CgroupError> {
    let available_path = parent.join("cgroup.controllers");
    let available =
        fs::read_to_string(&available_path).map_err(io_error(&available_path, "reading"))?;
    let control = parent.join("cgroup.subtree_control");
    for controller in available
        .split_whitespace()
        .filter(|c| CONTROLLERS.contains(c))
    {
        // One at a time and best effort: a controller that cannot be
        // enabled fails only the containers whose limits need it, with
        // MissingController.
        let _ = fs::write(&control, format!("+{controller}"));
    }
    Ok(())
}

fn limit_value(limit: i64) -> String {
    if limit < 0 {
        "max".to_string()
    } else {
        limit.to_string()
    }
}

fn lookup(pairs: &[(String, u64)], key: &str) -> u64 {
    pairs.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
}

fn io_error<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}
