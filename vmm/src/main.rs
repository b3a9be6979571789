//! `capsa-vmm`: boot one microVM and exit with the guest's outcome. Its
//! command line is `capsa_vmm_config::VmmArgs`, which whoever starts a VMM
//! formats with the same types.

use std::process::ExitCode;

use capsa_vmm::{ConsoleOutput, VmConfig};
use capsa_vmm_config::VmmArgs;
use clap::Parser;

/// Lines of console output shown when the guest crashes.
const CRASH_TAIL_LINES: usize = 40;

fn main() -> ExitCode {
    // One malloc arena: glibc's per-thread arenas read
    // /proc/sys/vm/overcommit_memory when they shrink, a file the seccomp
    // filter (rightly) does not let a running VMM open.
    // SAFETY: mallopt only sets an allocator tunable; no thread runs yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    abort_on_panic();
    let args = VmmArgs::parse();
    // Only the descriptors its devices were given follow the VMM in.
    let kept = args
        .inherited_fds()
        .map_err(|e| e.to_string())
        .and_then(|fds| {
            capsa_jail::close_other_fds(&fds).map_err(|e| format!("closing stray descriptors: {e}"))
        });
    if let Err(e) = kept {
        eprintln!("capsa-vmm: error: {e}");
        return ExitCode::from(1);
    }
    match boot(args) {
        Ok(code) => code,
        Err(e) => {
            // Every VmError message already names its cause; printing the
            // source chain as well would say it twice.
            eprintln!("capsa-vmm: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// A panic in any thread ends the whole VMM at once (as panic = "abort"
/// would, which a workspace profile cannot set for one binary): a VMM
/// with a dead device thread must not go on serving its guest.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

fn boot(args: VmmArgs) -> Result<ExitCode, capsa_vmm::VmError> {
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        vcpus: args.cpus,
        memory_mib: args.memory_mib,
        cmdline: args.cmdline,
        console: args
            .console
            .map_or(ConsoleOutput::Stdout, ConsoleOutput::File),
        disks: args.disks,
        rng: !args.no_rng,
        vsock: args.vsock,
        nets: args.nets,
        seccomp: args.seccomp,
        jail: args.jail,
        snapshot_to: args.snapshot_to,
        restore_from: args.restore_from,
    };
    let outcome = capsa_vmm::run(&config)?;
    if !outcome.exit.is_clean() {
        eprintln!(
            "capsa-vmm: {}; last console output:\n{}",
            outcome.exit.describe(),
            outcome.console_tail.last_lines(CRASH_TAIL_LINES)
        );
    }
    Ok(ExitCode::from(outcome.exit.exit_code() as u8))
}
