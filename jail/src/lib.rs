//! The jail a VMM enters before its guest runs, so that a guest which
//! takes over the VMM holds nothing worth having: new mount, PID, IPC,
//! UTS, network and cgroup namespaces; an empty, read-only directory as
//! its root (whatever it needs is already open); an unprivileged user and
//! group of its own; no capabilities, bounding set included; no new
//! privileges; not dumpable; limits on open files, threads and file size.
//!
//! [`enter`] is called by the process to be jailed, started as root and
//! still single-threaded. A process only joins a new PID namespace by
//! being born in it, so `enter` forks: the child returns, jailed, as PID 1
//! of its namespace; the caller's process stays behind as a supervisor,
//! jailed as well, holding nothing, under a seccomp filter that allows it
//! only to wait. It passes on the signals its starter sends and ends as
//! the child ends (the same exit code, or the same signal), and the child
//! dies with it.

mod ids;
mod observe;
mod supervisor;

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{ForkResult, Gid, Uid};

pub use ids::{Claims, IdRange, DEFAULT_IDS};
pub use observe::{Confinement, TaskStatus};

/// Where and as whom a process is confined.
#[derive(Debug, Clone)]
pub struct Jail {
    /// An empty directory owned by root: the jail's root.
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub limits: Limits,
}

/// The resource limits inside the jail (soft and hard alike).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub open_files: u64,
    /// Threads and processes of the jail's user, all together.
    pub threads: u64,
    /// The largest offset a write may reach in any file.
    pub file_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("entering a jail takes root (this process runs as uid {0})")]
    NotRoot(u32),
    #[error("a process enters its jail before it starts threads (this one has {0})")]
    Threads(usize),
    #[error("the jail directory {}: {why}", path.display())]
    Root { path: PathBuf, why: String },
    #[error("the jail's uid and gid must not be 0")]
    RootIds,
    #[error("could not {what} for the jail: {source}")]
    Step {
        what: &'static str,
        source: nix::Error,
    },
    #[error("the jail's supervisor filter: {0}")]
    Filter(String),
    #[error("the jail was left with privileges: {0}")]
    Leftover(String),
}

fn step(what: &'static str) -> impl Fn(nix::Error) -> JailError {
    move |source| JailError::Step { what, source }
}

/// Confines the calling process as `jail` says; see the crate's summary.
/// Returns in the jailed child, PID 1 of its namespace, with every
/// descriptor it had; the calling process never returns from here.
pub fn enter(jail: &Jail) -> Result<(), JailError> {
    check(jail)?;
    // SAFETY: ignoring a signal touches no memory. A write beyond the
    // file-size limit then fails with EFBIG instead of killing the VMM.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::SIGXFSZ,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }
    .map_err(step("ignore SIGXFSZ"))?;
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(step("create its namespaces"))?;
    change_root(&jail.root)?;
    nix::unistd::sethostname("capsa-vmm").map_err(step("set the hostname"))?;
    // The child's end sees the supervisor die, should it go before the
    // child has asked to die with it.
    let (alive_read, alive_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(step("make a pipe"))?;
    // SAFETY: the process has one thread (checked above), so the child
    // may run any code.
    match unsafe { nix::unistd::fork() }.map_err(step("fork"))? {
        ForkResult::Parent { child } => {
            drop(alive_read);
            supervisor::run(jail, child, alive_write)
        }
        ForkResult::Child => {
            drop(alive_write);
            drop_privileges(jail)?;
            die_with_supervisor(alive_read)?;
            nix::sys::prctl::set_dumpable(false).map_err(step("make it undumpable"))?;
            Ok(())
        }
    }
}

/// Closes every descriptor above standard error that is not in `keep`:
/// what a process inherited by mistake (its starter's files, say) must
/// not follow it into a jail. Called first thing, before the process
/// opens its own.
pub fn close_other_fds(keep: &[i32]) -> std::io::Result<()> {
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: nothing in this process owns a descriptor it did not
            // open, and it has opened none yet (see above); the one
            // read_dir held is closed by now, so closing a stale number
            // only fails with EBADF.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// Refuses what would make a weak jail, before anything changes.
fn check(jail: &Jail) -> Result<(), JailError> {
    let euid = nix::unistd::geteuid().as_raw();
    if euid != 0 {
        return Err(JailError::NotRoot(euid));
    }
    if jail.uid == 0 || jail.gid == 0 {
        return Err(JailError::RootIds);
    }
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|tasks| tasks.count())
        .unwrap_or(1);
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    let bad = |why: String| JailError::Root {
        path: jail.root.clone(),
        why,
    };
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(&jail.root).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("is not a directory".into()));
    }
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(bad("must be owned by root and writable by root only".into()));
    }
    let mut entries = std::fs::read_dir(&jail.root).map_err(|e| bad(e.to_string()))?;
    if entries.next().is_some() {
        return Err(bad("is not empty".into()));
    }
    Ok(())
}

/// Makes `root` the root of this mount namespace, read-only, with the
/// host's tree detached.
fn change_root(root: &Path) -> Result<(), JailError> {
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(step("make its mounts private"))?;
    let root = CString::new(root.as_os_str().as_bytes()).map_err(|_| JailError::Root {
        path: root.to_path_buf(),
        why: "has a NUL byte".into(),
    })?;
    mount(
        Some(root.as_c_str()),
        root.as_c_str(),
        none,
        MsFlags::MS_BIND,
        none,
    )
    .map_err(step("bind its root"))?;
    nix::unistd::chdir(root.as_c_str()).map_err(step("enter its root"))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the host's tree"))?;
        }
        // A host whose root is the initramfs itself (rootfs, which has no
        // parent to pivot from; a minimal machine's, the test machines'):
        // the jail's mount is moved over the root and the process chroots
        // into it, as switch_root does. The host's tree stays in this
        // namespace, covered and out of reach of a process without
        // CAP_SYS_CHROOT or CAP_SYS_ADMIN, which the jailed one is about
        // to lose.
        Err(nix::errno::Errno::EINVAL) => {
            mount(Some("."), "/", none, MsFlags::MS_MOVE, none)
                .map_err(step("move its root over the initramfs"))?;
            nix::unistd::chroot(".").map_err(step("enter its root"))?;
        }
        Err(e) => return Err(step("pivot into its root")(e)),
    }
    nix::unistd::chdir("/").map_err(step("enter its root"))?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(step("make its root read-only"))
}

/// Limits, then the user and group, then the capabilities that are left
/// (the bounding, inheritable and ambient sets), then no new privileges;
/// and a check that nothing is left.
pub(crate) fn drop_privileges(jail: &Jail) -> Result<(), JailError> {
    let limits = jail.limits;
    for (resource, value, what) in [
        (
            Resource::RLIMIT_NOFILE,
            limits.open_files,
            "limit its files",
        ),
        (Resource::RLIMIT_NPROC, limits.threads, "limit its threads"),
        (
            Resource::RLIMIT_FSIZE,
            limits.file_size,
            "limit its file size",
        ),
        (Resource::RLIMIT_CORE, 0, "forbid core dumps"),
    ] {
        setrlimit(resource, value, value).map_err(step(what))?;
    }
    // While root may still drop them: every capability leaves the
    // bounding set (the loop ends past the kernel's last one).
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_DROP takes a number and touches no memory.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            if nix::errno::Errno::last() == nix::errno::Errno::EINVAL {
                break;
            }
            return Err(JailError::Step {
                what: "drop its bounding capabilities",
                source: nix::errno::Errno::last(),
            });
        }
    }
    nix::unistd::setgroups(&[]).map_err(step("drop its groups"))?;
    let (uid, gid) = (Uid::from_raw(jail.uid), Gid::from_raw(jail.gid));
    nix::unistd::setresgid(gid, gid, gid).map_err(step("take its group"))?;
    // Leaving uid 0 clears the permitted and effective capabilities.
    nix::unistd::setresuid(uid, uid, uid).map_err(step("take its user"))?;
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes numbers only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    caps::clear_all().map_err(step("clear its capabilities"))?;
    nix::sys::prctl::set_no_new_privs().map_err(step("forbid new privileges"))?;
    verify(jail)
}

fn verify(jail: &Jail) -> Result<(), JailError> {
    let ids = nix::unistd::getresuid().map_err(step("read its user"))?;
    if [ids.real, ids.effective, ids.saved]
        .iter()
        .any(|id| id.as_raw() != jail.uid)
    {
        return Err(JailError::Leftover(
            "a user id other than the jail's".into(),
        ));
    }
    let sets = caps::read().map_err(step("read its capabilities"))?;
    if sets != caps::Sets::default() {
        return Err(JailError::Leftover(format!(
            "capabilities {:#x}/{:#x}/{:#x} (effective/permitted/inheritable)",
            sets.effective, sets.permitted, sets.inheritable
        )));
    }
    Ok(())
}

/// Asks for SIGKILL when the supervisor dies (it has to be asked after
/// the change of user, which clears it), then makes sure the supervisor
/// had not died already.
fn die_with_supervisor(alive: OwnedFd) -> Result<(), JailError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::SIGKILL)
        .map_err(step("ask to die with its supervisor"))?;
    let mut poll = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&alive),
        nix::poll::PollFlags::POLLIN,
    )];
    let ready =
        nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO).map_err(step("poll a pipe"))?;
    if ready > 0 {
        // The write end closed: the supervisor is gone.
        std::process::exit(1);
    }
    Ok(())
}

/// The capability sets, read and cleared with capget(2) and capset(2).
mod caps {
    const VERSION_3: u32 = 0x2008_0522;

    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }

    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }

    #[derive(Debug, Default, PartialEq, Eq)]
    pub struct Sets {
        pub effective: u64,
        pub permitted: u64,
        pub inheritable: u64,
    }

    pub fn read() -> nix::Result<Sets> {
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget writes two Data structs (version 3) and reads the
        // header; both live for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_capget,
                &mut header as *mut Header,
                data.as_mut_ptr(),
            )
        };
        nix::errno::Errno::result(rc)?;
        let wide = |f: fn(&Data) -> u32| u64::from(f(&data[0])) | u64::from(f(&data[1])) << 32;
        Ok(Sets {
            effective: wide(|d| d.effective),
            permitted: wide(|d| d.permitted),
            inheritable: wide(|d| d.inheritable),
        })
    }

    pub fn clear_all() -> nix::Result<()> {
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let data = [Data::default(); 2];
        // SAFETY: capset reads the header and two Data structs.
        let rc =
            unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
        nix::errno::Errno::result(rc).map(drop)
    }
}
