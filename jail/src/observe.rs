//! What can be seen of a jailed process: from the inside, the record
//! `capsa-jail-check` prints ([`Confinement`]); from the host, each of its
//! threads' status file ([`TaskStatus`]).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    pub pid: i32,
    /// Real, effective and saved.
    pub uids: [u32; 3],
    pub gids: [u32; 3],
    pub groups: usize,
    pub effective_caps: u64,
    pub permitted_caps: u64,
    pub inheritable_caps: u64,
    /// Capabilities left in the bounding set.
    pub bounding_caps: u32,
    pub no_new_privs: bool,
    pub dumpable: bool,
    /// Entries in its root directory (an empty jail has none).
    pub root_entries: Option<usize>,
    /// Whether /proc/self answers (no /proc is mounted in a jail).
    pub proc_visible: bool,
    pub interfaces: Vec<String>,
    pub hostname: String,
    /// Descriptors open below 1024.
    pub fds: Vec<i32>,
    /// Soft limits: open files, threads, file size.
    pub limits: [u64; 3],
}

impl Confinement {
    pub fn observe() -> Confinement {
        let uids = nix::unistd::getresuid()
            .map(|ids| {
                [
                    ids.real.as_raw(),
                    ids.effective.as_raw(),
                    ids.saved.as_raw(),
                ]
            })
            .unwrap_or([u32::MAX; 3]);
        let gids = nix::unistd::getresgid()
            .map(|ids| {
                [
                    ids.real.as_raw(),
                    ids.effective.as_raw(),
                    ids.saved.as_raw(),
                ]
            })
            .unwrap_or([u32::MAX; 3]);
        let caps = crate::caps::read().unwrap_or(crate::caps::Sets {
            effective: u64::MAX,
            permitted: u64::MAX,
            inheritable: u64::MAX,
        });
        let bounding_caps = (0..64)
            // SAFETY: PR_CAPBSET_READ takes a number and touches no memory.
            .map(|cap| unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) })
            .take_while(|answer| *answer >= 0)
            .filter(|answer| *answer == 1)
            .count() as u32;
        let limit = |resource| {
            nix::sys::resource::getrlimit(resource)
                .map(|(soft, _)| soft)
                .unwrap_or(u64::MAX)
        };
        use nix::sys::resource::Resource;
        Confinement {
            pid: std::process::id() as i32,
            uids,
            gids,
            groups: nix::unistd::getgroups()
                .map(|g| g.len())
                .unwrap_or(usize::MAX),
            effective_caps: caps.effective,
            permitted_caps: caps.permitted,
            inheritable_caps: caps.inheritable,
            bounding_caps,
            no_new_privs: nix::sys::prctl::get_no_new_privs().unwrap_or(false),
            dumpable: nix::sys::prctl::get_dumpable().unwrap_or(true),
            root_entries: std::fs::read_dir("/").ok().map(|d| d.count()),
            proc_visible: std::path::Path::new("/proc/self/status").exists(),
            interfaces: nix::net::if_::if_nameindex()
                .map(|list| {
                    list.iter()
                        .map(|i| i.name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default(),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            fds: (0..1024)
                .filter(|fd| nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_GETFD).is_ok())
                .collect(),
            limits: [
                limit(Resource::RLIMIT_NOFILE),
                limit(Resource::RLIMIT_NPROC),
                limit(Resource::RLIMIT_FSIZE),
            ],
        }
    }
}

/// One thread's credentials and confinement, as its /proc status file
/// gives them (fields joined by single spaces).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskStatus {
    pub name: String,
    pub uids: String,
    pub gids: String,
    pub cap_eff: String,
    pub cap_prm: String,
    pub cap_bnd: String,
    pub no_new_privs: String,
    pub seccomp: String,
}

impl TaskStatus {
    pub fn parse(status: &str) -> TaskStatus {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        TaskStatus {
            name: field("Name:"),
            uids: field("Uid:"),
            gids: field("Gid:"),
            cap_eff: field("CapEff:"),
            cap_prm: field("CapPrm:"),
            cap_bnd: field("CapBnd:"),
            no_new_privs: field("NoNewPrivs:"),
            seccomp: field("Seccomp:"),
        }
    }

    /// Whether it runs as `id` (every uid and gid), with no capability
    /// at all, no new privileges and a seccomp filter.
    pub fn is_jailed_as(&self, id: u32) -> bool {
        let id_text = id.to_string();
        let ids = [id_text.as_str(); 4].join(" ");
        let none = "0000000000000000";
        id != 0
            && self.uids == ids
            && self.gids == ids
            && [&self.cap_eff, &self.cap_prm, &self.cap_bnd]
                .iter()
                .all(|c| c.as_str() == none)
            && self.no_new_privs == "1"
            && self.seccomp == "2"
    }
}
