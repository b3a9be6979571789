//! The VMM's seccomp filter (rust-vmm's `seccompiler`), installed on every
//! thread (TSYNC) once the VM is built (memory mapped, kernel loaded,
//! backends opened) and before any vCPU runs guest code; threads started
//! later (vCPUs, device workers) inherit it. It allows the system calls a
//! running VMM makes and nothing else: a call outside the list kills the
//! whole VMM with SIGSYS (or, with `--seccomp log`, is logged by the kernel
//! and let through, to learn what a new code path needs). The entropy
//! source is getrandom(2) itself (`virtio::rng::fill_random`), which opens
//! nothing.

use std::collections::BTreeMap;

use capsa_vmm_config::Seccomp;
use seccompiler::{apply_filter_all_threads, BpfProgram, SeccompAction, SeccompFilter, TargetArch};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter: {0}")]
    Build(String),
    #[error("installing the seccomp filter: {0}")]
    Install(seccompiler::Error),
}

/// What a running VMM calls: its own I/O (KVM, eventfds, epoll, the disk
/// files, the tap, the vsock sockets) and what Rust's runtime needs for
/// threads, memory, time and signals.
pub const ALLOWED: &[i64] = &[
    // I/O on descriptors it holds.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    // Waiting.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    // Rate limiters' timers, made when the guest's driver starts a device.
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_sched_yield,
    libc::SYS_restart_syscall,
    // vsock: the host's side is Unix sockets.
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    // Threads (device workers start when the guest's driver is ready).
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Signals (the vCPU kick).
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    // The entropy device.
    libc::SYS_getrandom,
];

/// The filter `mode` asks for, or None for no filter.
pub fn program(mode: Seccomp) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        Seccomp::Off => return Ok(None),
        Seccomp::Kill => SeccompAction::KillProcess,
        Seccomp::Log => SeccompAction::Log,
    };
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        ALLOWED.iter().map(|&call| (call, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(e.to_string()))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(e.to_string()))?;
    Ok(Some(program))
}

/// Installs the filter `mode` asks for on every thread of this process.
pub fn install(mode: Seccomp) -> Result<(), SeccompError> {
    match program(mode)? {
        Some(program) => apply_filter_all_threads(&program).map_err(SeccompError::Install),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child and returns how it ended.
    fn in_child(f: impl FnOnce() -> i32) -> libc::c_int {
        // SAFETY: the child only runs `f` (no allocation in the tests
        // below after the filter is in) and exits without unwinding.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork");
            if pid == 0 {
                libc::_exit(f());
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            status
        }
    }

    #[test]
    fn a_call_outside_the_list_kills_the_process_with_sigsys() {
        let program = program(Seccomp::Kill).unwrap().unwrap();
        let status = in_child(move || {
            if apply_filter_all_threads(&program).is_err() {
                return 2;
            }
            // Allowed: carries on.
            // SAFETY: getpid takes no arguments.
            unsafe { libc::syscall(libc::SYS_getpid) };
            // Not allowed: a VMM never forks a shell or reads the host's
            // files by path.
            // SAFETY: the path is a NUL-terminated literal.
            unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), 0) };
            0
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn log_lets_the_call_through_and_off_installs_nothing() {
        let program = program(Seccomp::Log).unwrap().unwrap();
        let status = in_child(move || {
            if apply_filter_all_threads(&program).is_err() {
                return 2;
            }
            // SAFETY: the path is a NUL-terminated literal.
            let fd = unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/".as_ptr(), 0) };
            if fd >= 0 {
                0
            } else {
                3
            }
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x}"
        );
        assert!(program_is_none(Seccomp::Off));
    }

    fn program_is_none(mode: Seccomp) -> bool {
        program(mode).unwrap().is_none()
    }
}
