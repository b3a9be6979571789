//! The VMM's seccomp filters (rust-vmm's `seccompiler`). Once the VM is
//! built (memory mapped, kernel loaded, backends opened, each device's
//! thread started) the process filter goes on every thread (TSYNC): the
//! system calls any running VMM thread makes, and nothing else. Then,
//! before any vCPU runs guest code, each thread adds the filter of its
//! role (`Role`): a vCPU, each kind of device, the main thread. Filters
//! stack, so a thread may make only the calls both allow. No role may
//! start a thread, and `ioctl` is held to the requests each role makes
//! (a vCPU: KVM_RUN, KVM_GET_REGS to report an internal error, and
//! TUNSETOFFLOAD as virtio-net goes live; the vsock device: FIONBIO; the
//! others none). A call outside a filter kills
//! the whole VMM with SIGSYS (or, with `--seccomp log`, is logged by the
//! kernel and let through, to learn what a new code path needs). The
//! entropy source is getrandom(2) itself (`virtio::rng::fill_random`),
//! which opens nothing.

use std::collections::BTreeMap;

use capsa_vmm_config::Seccomp;
use seccompiler::{
    apply_filter, apply_filter_all_threads, BpfProgram, SeccompAction, SeccompCmpArgLen,
    SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

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
    libc::SYS_timerfd_gettime,
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
    // Each thread adding its role's filter (a filter can only narrow).
    libc::SYS_seccomp,
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

/// What every thread may need of the runtime once it runs: memory,
/// futexes (locks, channels, joins), time, its own end, and what a panic
/// (abort) and a message on stderr take.
const RUNTIME: &[i64] = &[
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_restart_syscall,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // A HashMap's keys, seeded per thread.
    libc::SYS_getrandom,
];

/// A device thread's loop: epoll over its eventfds and backends, and the
/// rate limiter's timer.
const DEVICE_LOOP: &[i64] = &[
    libc::SYS_read,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// A thread's part in the VMM, and so the filter it adds to the process's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Waits for the guest's end, then stops the others; where the VMM
    /// takes snapshots, reads the VM's and vCPUs' state from KVM and
    /// writes it and the memory to the snapshot's files.
    Main { snapshots: bool },
    /// Waits for the byte that asks for a snapshot.
    Control,
    /// Runs guest code and the register files it exits to: the serial
    /// port, the virtio-mmio transports (whose activation makes a device's
    /// eventfds, epoll and rate-limit timers, and hands its loop to the
    /// device's thread).
    Vcpu,
    /// A device's thread, by its virtio device type.
    Device(u32),
}

/// The ioctl requests a vCPU thread makes.
pub const KVM_RUN: u64 = ioctl_expr(_IOC_NONE, kvm_bindings::KVMIO, 0x80, 0) as u64;
pub const KVM_GET_REGS: u64 = ioctl_expr(
    _IOC_READ,
    kvm_bindings::KVMIO,
    0x81,
    std::mem::size_of::<kvm_bindings::kvm_regs>() as u32,
) as u64;

/// What the main thread reads of KVM for a snapshot.
pub fn snapshot_ioctls() -> Vec<u64> {
    use std::mem::size_of;
    use vmm_sys_util::ioctl::ioctl_expr as io;
    let k = kvm_bindings::KVMIO;
    let rw = _IOC_READ | _IOC_WRITE;
    vec![
        KVM_GET_REGS,
        io(
            _IOC_READ,
            k,
            0x83,
            size_of::<kvm_bindings::kvm_sregs>() as u32,
        ) as u64,
        io(rw, k, 0x88, size_of::<kvm_bindings::kvm_msrs>() as u32) as u64,
        io(
            _IOC_READ,
            k,
            0x8c,
            size_of::<kvm_bindings::kvm_fpu>() as u32,
        ) as u64,
        io(
            _IOC_READ,
            k,
            0x8e,
            size_of::<kvm_bindings::kvm_lapic_state>() as u32,
        ) as u64,
        io(rw, k, 0x91, size_of::<kvm_bindings::kvm_cpuid2>() as u32) as u64,
        io(
            _IOC_READ,
            k,
            0x98,
            size_of::<kvm_bindings::kvm_mp_state>() as u32,
        ) as u64,
        io(
            _IOC_READ,
            k,
            0x9f,
            size_of::<kvm_bindings::kvm_vcpu_events>() as u32,
        ) as u64,
        io(
            _IOC_READ,
            k,
            0xa1,
            size_of::<kvm_bindings::kvm_debugregs>() as u32,
        ) as u64,
        io(
            _IOC_READ,
            k,
            0xa4,
            size_of::<kvm_bindings::kvm_xsave>() as u32,
        ) as u64,
        io(
            _IOC_READ,
            k,
            0xa6,
            size_of::<kvm_bindings::kvm_xcrs>() as u32,
        ) as u64,
        io(rw, k, 0x62, size_of::<kvm_bindings::kvm_irqchip>() as u32) as u64,
        io(
            _IOC_READ,
            k,
            0x9f,
            size_of::<kvm_bindings::kvm_pit_state2>() as u32,
        ) as u64,
        io(
            _IOC_READ,
            k,
            0x7c,
            size_of::<kvm_bindings::kvm_clock_data>() as u32,
        ) as u64,
    ]
}

/// What virtio-net's activation sets on the tap: the offloads the
/// guest's driver accepted.
pub const TUNSETOFFLOAD: u64 = ioctl_expr(
    _IOC_WRITE,
    b'T' as u32,
    208,
    std::mem::size_of::<libc::c_uint>() as u32,
) as u64;

impl Role {
    /// The calls this role makes beyond the runtime's, each with the
    /// argument rules it is held to (none: any arguments).
    fn calls(self) -> Result<Vec<(i64, Vec<SeccompRule>)>, SeccompError> {
        let plain = |calls: &[i64]| calls.iter().map(|&c| (c, Vec::new())).collect::<Vec<_>>();
        let ioctls = |requests: &[u64]| -> Result<(i64, Vec<SeccompRule>), SeccompError> {
            let rules = requests
                .iter()
                .map(|&request| {
                    let condition = SeccompCondition::new(
                        1,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        request,
                    )?;
                    SeccompRule::new(vec![condition])
                })
                .collect::<Result<_, _>>()
                .map_err(|e| SeccompError::Build(e.to_string()))?;
            Ok((libc::SYS_ioctl, rules))
        };
        let mut calls = match self {
            Role::Main { snapshots: false } => plain(&[libc::SYS_read]),
            Role::Main { snapshots: true } => {
                let mut calls = plain(&[
                    libc::SYS_read,
                    // The answer on the control socket.
                    libc::SYS_sendto,
                    libc::SYS_pwrite64,
                    libc::SYS_fsync,
                    libc::SYS_fstat,
                    libc::SYS_statx,
                ]);
                calls.push(ioctls(&snapshot_ioctls())?);
                calls
            }
            // A read on the control socket (recv, to Rust's std).
            Role::Control => plain(&[libc::SYS_read, libc::SYS_recvfrom]),
            Role::Vcpu => {
                let mut calls = plain(&[
                    libc::SYS_read,
                    libc::SYS_writev,
                    // Activation: eventfds and disk handles duplicated,
                    // the worker's epoll and its rate-limit timers.
                    libc::SYS_fcntl,
                    libc::SYS_eventfd2,
                    libc::SYS_epoll_create1,
                    libc::SYS_epoll_ctl,
                    libc::SYS_timerfd_create,
                    libc::SYS_timerfd_settime,
                    libc::SYS_fstat,
                    libc::SYS_statx,
                    libc::SYS_newfstatat,
                ]);
                calls.push(ioctls(&[KVM_RUN, KVM_GET_REGS, TUNSETOFFLOAD])?);
                calls
            }
            Role::Device(device_type) => {
                let mut calls = plain(DEVICE_LOOP);
                calls.extend(plain(match device_type {
                    // block
                    2 => &[
                        libc::SYS_pread64,
                        libc::SYS_pwrite64,
                        libc::SYS_preadv,
                        libc::SYS_pwritev,
                        libc::SYS_preadv2,
                        libc::SYS_pwritev2,
                        libc::SYS_lseek,
                        libc::SYS_fsync,
                        libc::SYS_fdatasync,
                        libc::SYS_fallocate,
                        libc::SYS_fstat,
                        libc::SYS_statx,
                    ][..],
                    // net: the tap
                    1 => &[libc::SYS_readv, libc::SYS_writev][..],
                    // vsock: the host's side is Unix sockets
                    19 => &[
                        libc::SYS_readv,
                        libc::SYS_writev,
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
                        libc::SYS_fcntl,
                        libc::SYS_poll,
                        libc::SYS_ppoll,
                    ][..],
                    // rng, and any other: its queue only
                    _ => &[][..],
                }));
                if device_type == 19 {
                    calls.push(ioctls(&[libc::FIONBIO])?);
                }
                calls
            }
        };
        calls.extend(plain(RUNTIME));
        Ok(calls)
    }
}

fn mismatch(mode: Seccomp) -> Option<SeccompAction> {
    match mode {
        Seccomp::Off => None,
        Seccomp::Kill => Some(SeccompAction::KillProcess),
        Seccomp::Log => Some(SeccompAction::Log),
    }
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(e.to_string()))
}

/// The process filter `mode` asks for, or None for no filter.
pub fn program(mode: Seccomp) -> Result<Option<BpfProgram>, SeccompError> {
    let Some(mismatch) = mismatch(mode) else {
        return Ok(None);
    };
    let rules = ALLOWED.iter().map(|&call| (call, Vec::new())).collect();
    compile(rules, mismatch).map(Some)
}

/// The filter `role` adds, or None for none.
pub fn role_program(role: Role, mode: Seccomp) -> Result<Option<BpfProgram>, SeccompError> {
    let Some(mismatch) = mismatch(mode) else {
        return Ok(None);
    };
    // A call is listed once with its rules, or more than once with none.
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (call, call_rules) in role.calls()? {
        rules.entry(call).or_default().extend(call_rules);
    }
    compile(rules, mismatch).map(Some)
}

/// Installs the process filter `mode` asks for on every thread.
pub fn install(mode: Seccomp) -> Result<(), SeccompError> {
    match program(mode)? {
        Some(program) => apply_filter_all_threads(&program).map_err(SeccompError::Install),
        None => Ok(()),
    }
}

/// Adds `program` (a role's) to the calling thread's filters.
pub fn install_on_this_thread(program: Option<&BpfProgram>) -> Result<(), SeccompError> {
    match program {
        Some(program) => apply_filter(program).map_err(SeccompError::Install),
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

    #[test]
    fn every_role_has_a_filter_within_the_process_filter() {
        let process: Vec<i64> = ALLOWED.to_vec();
        for role in [
            Role::Main { snapshots: false },
            Role::Main { snapshots: true },
            Role::Control,
            Role::Vcpu,
            Role::Device(1),
            Role::Device(2),
            Role::Device(4),
            Role::Device(19),
        ] {
            assert!(role_program(role, Seccomp::Kill).unwrap().is_some());
            assert!(role_program(role, Seccomp::Off).unwrap().is_none());
            for (call, _) in role.calls().unwrap() {
                assert!(
                    process.contains(&call),
                    "{role:?} lists {call}, which the process filter does not"
                );
                assert!(
                    call != libc::SYS_clone && call != libc::SYS_clone3,
                    "{role:?} may start threads"
                );
            }
        }
    }

    #[test]
    fn a_vcpu_may_run_its_vcpu_but_not_make_other_ioctls() {
        let process = program(Seccomp::Kill).unwrap().unwrap();
        let vcpu = role_program(Role::Vcpu, Seccomp::Kill).unwrap().unwrap();
        let allowed = in_child({
            let (process, vcpu) = (process.clone(), vcpu.clone());
            move || {
                if apply_filter_all_threads(&process).is_err() || apply_filter(&vcpu).is_err() {
                    return 2;
                }
                // KVM_RUN on a descriptor that is no vCPU: refused by the
                // kernel (EBADF), let through by the filter.
                // SAFETY: an ioctl on an invalid descriptor touches nothing.
                unsafe { libc::ioctl(-1, KVM_RUN as libc::c_ulong, 0) };
                0
            }
        });
        assert!(
            libc::WIFEXITED(allowed) && libc::WEXITSTATUS(allowed) == 0,
            "{allowed:#x}"
        );
        let refused = in_child(move || {
            if apply_filter_all_threads(&process).is_err() || apply_filter(&vcpu).is_err() {
                return 2;
            }
            // FIONBIO is the vsock device's, not a vCPU's.
            // SAFETY: as above.
            unsafe { libc::ioctl(-1, libc::FIONBIO, 0) };
            0
        });
        assert!(libc::WIFSIGNALED(refused), "status {refused:#x}");
        assert_eq!(libc::WTERMSIG(refused), libc::SIGSYS);
    }

    #[test]
    fn a_device_thread_may_not_start_a_thread() {
        let block = role_program(Role::Device(2), Seccomp::Kill)
            .unwrap()
            .unwrap();
        let status = in_child(move || {
            if apply_filter(&block).is_err() {
                return 2;
            }
            // SAFETY: a raw clone that the filter kills before it runs.
            unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) };
            0
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    fn program_is_none(mode: Seccomp) -> bool {
        program(mode).unwrap().is_none()
    }
}
