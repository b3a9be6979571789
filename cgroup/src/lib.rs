//! A cgroup v2 per microVM. The daemon keeps a parent cgroup of its own
//! (`/sys/fs/cgroup/capsa` by default) with the memory, cpu and pids
//! controllers enabled for its children, and one child per running VM,
//! named after its group, which the VMM is started in (`cgroup.procs` is
//! written by the VMM's process itself before it executes, so no
//! instruction of it runs outside). The child holds the VM to its size:
//! `memory.max` is the guest's memory plus the VMM's overhead budget, with
//! no swap and the whole VMM killed together when it is exceeded;
//! `cpu.max` is its CPU limit (its vCPUs unless the spec says less);
//! `pids.max` bounds its threads.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a VMM may use beyond its guest's memory: its own code, heap and
/// threads' stacks, and the page cache of the files it reads and writes
/// (layer images, the scratch disk, volumes), which is charged to it and
/// reclaimed under this limit.
pub const VMM_OVERHEAD_MIB: u64 = 128;
/// The CFS period `cpu.max` is a quota of.
pub const CPU_PERIOD_USEC: u64 = 100_000;
/// The VMM's threads: its main loop, one per vCPU, one per device worker.
pub const PIDS_MAX: u64 = 128;

const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// statfs(2)'s f_type of a cgroup v2 file system.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {}: {what}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not in a cgroup v2 file system", .0.display())]
    NotCgroup2(PathBuf),
    #[error("cgroup {}: the {controller} controller is not available (cgroup.controllers: {available})", path.display())]
    NoController {
        path: PathBuf,
        controller: &'static str,
        available: String,
    },
    #[error("cgroup name {0:?} is not a plain name")]
    BadName(String),
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One VM's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub memory_max_bytes: u64,
    /// (quota, period) in microseconds.
    pub cpu_max: (u64, u64),
    pub pids_max: u64,
}

impl Limits {
    /// A VM of `cpus` vCPUs and `memory_mib` of guest memory, that may
    /// use `cpu_limit` CPUs of host time (at most its vCPUs, at least the
    /// 1 ms quota cgroup v2 takes).
    pub fn for_vm(cpus: u8, memory_mib: u64, cpu_limit: f64) -> Limits {
        let most = u64::from(cpus.max(1)) * CPU_PERIOD_USEC;
        let quota = (cpu_limit * CPU_PERIOD_USEC as f64) as u64;
        Limits {
            memory_max_bytes: (memory_mib + VMM_OVERHEAD_MIB) << 20,
            cpu_max: (quota.clamp(1000, most), CPU_PERIOD_USEC),
            pids_max: PIDS_MAX,
        }
    }

    /// The files to write and what, in order.
    fn files(&self) -> [(&'static str, String); 5] {
        [
            ("memory.max", self.memory_max_bytes.to_string()),
            ("memory.swap.max", "0".to_string()),
            ("memory.oom.group", "1".to_string()),
            ("cpu.max", format!("{} {}", self.cpu_max.0, self.cpu_max.1)),
            ("pids.max", self.pids_max.to_string()),
        ]
    }
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is a
    // NUL-terminated string that lives across the call.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

/// Enables the controllers for `dir`'s children.
fn delegate(dir: &Path) -> Result<(), CgroupError> {
    let available_path = dir.join("cgroup.controllers");
    let available =
        fs::read_to_string(&available_path).map_err(io_error("reading", &available_path))?;
    for controller in CONTROLLERS {
        if !available.split_whitespace().any(|c| c == controller) {
            return Err(CgroupError::NoController {
                path: dir.to_path_buf(),
                controller,
                available: available.trim().to_string(),
            });
        }
    }
    let control = dir.join("cgroup.subtree_control");
    let enable: Vec<String> = CONTROLLERS.iter().map(|c| format!("+{c}")).collect();
    fs::write(&control, enable.join(" ")).map_err(io_error("enabling controllers in", &control))
}

/// The daemon's parent cgroup.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    dir: PathBuf,
}

impl Hierarchy {
    /// Makes (or finds) the parent cgroup `dir`, whose own parent must be
    /// a cgroup v2 directory offering the memory, cpu and pids controllers.
    pub fn open(dir: &Path) -> Result<Hierarchy, CgroupError> {
        let parent = dir
            .parent()
            .ok_or_else(|| CgroupError::NotCgroup2(dir.to_path_buf()))?;
        if !is_cgroup2(parent) {
            return Err(CgroupError::NotCgroup2(parent.to_path_buf()));
        }
        delegate(parent)?;
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error("creating", dir)(e)),
        }
        delegate(dir)?;
        Ok(Hierarchy {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn child(&self, name: &str) -> Result<PathBuf, CgroupError> {
        let plain = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !plain {
            return Err(CgroupError::BadName(name.to_string()));
        }
        Ok(self.dir.join(name))
    }

    /// Makes VM `name`'s cgroup with `limits` (one left by a VM before is
    /// emptied of nothing and reused: its limits are written again).
    pub fn create(&self, name: &str, limits: &Limits) -> Result<VmCgroup, CgroupError> {
        let dir = self.child(name)?;
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error("creating", &dir)(e)),
        }
        for (file, value) in limits.files() {
            let path = dir.join(file);
            fs::write(&path, value).map_err(io_error("writing", &path))?;
        }
        Ok(VmCgroup { dir })
    }

    /// VM `name`'s cgroup, if it exists (say after a daemon restart).
    pub fn find(&self, name: &str) -> Option<VmCgroup> {
        let dir = self.child(name).ok()?;
        dir.is_dir().then_some(VmCgroup { dir })
    }
}

/// One VM's cgroup.
#[derive(Debug, Clone)]
pub struct VmCgroup {
    dir: PathBuf,
}

impl VmCgroup {
    /// The VM cgroup at `dir`, as recorded by whoever made it.
    pub fn at(dir: PathBuf) -> VmCgroup {
        VmCgroup { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a process writes `0` into to join.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Removes it once its processes are gone (a VMM's threads may take a
    /// moment after its exit is seen); gives up after `patience`.
    pub fn remove(&self, patience: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + patience;
        loop {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io_error("removing", &self.dir)(e)),
            }
        }
    }

    /// A value of one of its files (`memory.max`, `memory.peak`, ...).
    pub fn read(&self, file: &str) -> Result<String, CgroupError> {
        let path = self.dir.join(file);
        fs::read_to_string(&path)
            .map(|s| s.trim().to_string())
            .map_err(io_error("reading", &path))
    }
}

/// The cgroup v2 path of process `pid` (`0::/capsa/web` gives
/// `/capsa/web`), from /proc/PID/cgroup.
pub fn of_process(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_is_held_to_its_size() {
        let limits = Limits::for_vm(2, 256, 2.0);
        assert_eq!(limits.memory_max_bytes, (256 + VMM_OVERHEAD_MIB) << 20);
        assert_eq!(limits.cpu_max, (200_000, 100_000));
        assert_eq!(Limits::for_vm(2, 256, 0.5).cpu_max, (50_000, 100_000));
        assert_eq!(Limits::for_vm(1, 256, 4.0).cpu_max, (100_000, 100_000));
        assert_eq!(Limits::for_vm(1, 256, 0.0).cpu_max, (1000, 100_000));
        let files = limits.files();
        assert!(files.contains(&("memory.swap.max", "0".into())));
        assert!(files.contains(&("memory.oom.group", "1".into())));
        assert!(files.contains(&("cpu.max", "200000 100000".into())));
    }

    #[test]
    fn a_directory_that_is_not_a_cgroup_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = Hierarchy::open(&dir.path().join("capsa")).unwrap_err();
        assert!(matches!(e, CgroupError::NotCgroup2(_)), "{e}");
    }

    #[test]
    fn names_are_plain() {
        let hierarchy = Hierarchy {
            dir: PathBuf::from("/nonexistent"),
        };
        for bad in ["", "..", "a/b", "../x"] {
            assert!(matches!(hierarchy.child(bad), Err(CgroupError::BadName(_))));
        }
        assert!(hierarchy.find("web").is_none());
    }

    #[test]
    fn this_process_has_a_cgroup_path() {
        // Every Linux process has one, on any host with cgroups.
        if let Some(path) = of_process(std::process::id()) {
            assert!(path.starts_with('/'), "{path}");
        }
    }
}
