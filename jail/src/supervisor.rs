//! What the jailing process becomes once its child is born in the new PID
//! namespace: a jailed waiter that holds only its standard error and the
//! pipe its child watches, passes a terminating signal on, and ends the
//! way its child ended.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::{drop_privileges, Jail};

static CHILD: AtomicI32 = AtomicI32::new(0);
/// The terminating signal the supervisor was sent, if any.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// Signals whose default action ends a process. The child, as PID 1 of
/// its namespace, would ignore them, so it is killed instead; the
/// supervisor then ends by the signal it was sent, as an unjailed
/// process would.
const TERMINATING: [libc::c_int; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
];

extern "C" fn pass_on(signal: libc::c_int) {
    RECEIVED.store(signal, Ordering::SeqCst);
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill(2) is async-signal-safe and touches no memory.
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
}

pub(crate) fn run(jail: &Jail, child: Pid, alive: OwnedFd) -> ! {
    CHILD.store(child.as_raw(), Ordering::SeqCst);
    let failed = |what: &str| -> ! {
        eprintln!("capsa-jail: the supervisor could not {what}; stopping the jailed process");
        // SAFETY: kill(2) and _exit(2) touch no memory.
        unsafe {
            libc::kill(child.as_raw(), libc::SIGKILL);
            libc::_exit(1)
        }
    };
    hold_only(alive);
    for signal in TERMINATING {
        // SAFETY: the handler only stores to atomics and calls kill(2).
        let installed = unsafe {
            nix::sys::signal::sigaction(
                signal.try_into().unwrap_or(nix::sys::signal::SIGTERM),
                &nix::sys::signal::SigAction::new(
                    nix::sys::signal::SigHandler::Handler(pass_on),
                    nix::sys::signal::SaFlags::SA_RESTART,
                    nix::sys::signal::SigSet::empty(),
                ),
            )
        };
        if installed.is_err() {
            failed("pass signals on");
        }
    }
    if let Err(e) = drop_privileges(jail) {
        eprintln!("capsa-jail: {e}");
        failed("drop its privileges");
    }
    match filter() {
        Ok(program) => {
            if seccompiler::apply_filter(&program).is_err() {
                failed("install its seccomp filter");
            }
        }
        Err(_) => failed("build its seccomp filter"),
    }
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => {
                // SAFETY: _exit(2) ends the process; no memory is touched.
                unsafe { libc::_exit(code) }
            }
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                let received = RECEIVED.load(Ordering::SeqCst);
                let signal = if signal == nix::sys::signal::SIGKILL && received != 0 {
                    received
                } else {
                    signal as libc::c_int
                };
                end_by(signal)
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            // SAFETY: as above.
            Err(_) => unsafe { libc::_exit(1) },
        }
    }
}

/// Closes every descriptor but standard error and `alive` (moved to 3).
fn hold_only(alive: OwnedFd) {
    // SAFETY: dup2 and close_range take numbers; `alive` stays open until
    // dup2 has copied it, and the descriptors closed are owned by nothing
    // this process goes on to use (it only waits from here).
    unsafe {
        if alive.as_raw_fd() != 3 {
            libc::dup2(alive.as_raw_fd(), 3);
        }
        std::mem::forget(alive);
        libc::close(0);
        libc::close(1);
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
    }
}

/// Ends the process by `signal`, with its default action (RLIMIT_CORE is
/// 0: no core is written); 128 + the signal if that action does not end
/// it.
fn end_by(signal: libc::c_int) -> ! {
    // SAFETY: resetting a disposition, unblocking and sending a signal to
    // oneself, then _exit: none of these touch memory the process uses.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::kill(libc::getpid(), signal);
        libc::_exit(128 + signal)
    }
}

/// The supervisor only waits, passes a signal on and ends.
fn filter() -> Result<BpfProgram, seccompiler::BackendError> {
    let allowed = [
        libc::SYS_wait4,
        libc::SYS_kill,
        libc::SYS_getpid,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_write,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        allowed.iter().map(|call| (*call, Vec::new())).collect();
    SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?
    .try_into()
}
