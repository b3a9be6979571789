//! `capsa-jail-check ROOT UID GID [exit=N | forbidden | wait]`: enters the jail a
//! VMM would (see capsa-jail) and prints, as one JSON line, what the
//! jailed process sees of itself; then exits with N, or makes a system
//! call a seccomp filter forbids (the jail's supervisor must end by the
//! same SIGSYS). An operator's check of a host, and the jail's tests.

use capsa_jail::{Confinement, Jail, Limits};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!("usage: capsa-jail-check ROOT UID GID [exit=N | forbidden | wait]");
        std::process::exit(2)
    };
    let [root, uid, gid, rest @ ..] = args.as_slice() else {
        usage()
    };
    let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse()) else {
        usage()
    };
    let jail = Jail {
        root: root.into(),
        uid,
        gid,
        limits: Limits {
            open_files: 64,
            threads: 16,
            file_size: 1 << 20,
        },
    };
    if let Err(e) = capsa_jail::close_other_fds(&[]) {
        eprintln!("capsa-jail-check: {e}");
        std::process::exit(1);
    }
    if let Err(e) = capsa_jail::enter(&jail) {
        eprintln!("capsa-jail-check: {e}");
        std::process::exit(1);
    }
    match serde_json::to_string(&Confinement::observe()) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("capsa-jail-check: {e}"),
    }
    match rest {
        [] => {}
        [word] if word == "forbidden" => forbidden(),
        [word] if word == "wait" => std::thread::sleep(std::time::Duration::from_secs(60)),
        [word] => match word.strip_prefix("exit=").and_then(|n| n.parse().ok()) {
            Some(code) => std::process::exit(code),
            None => usage(),
        },
        _ => usage(),
    }
}

/// Forbids getpriority(2) to this process with a killing filter, then
/// calls it.
fn forbidden() {
    let rules = [(libc::SYS_getpriority, Vec::new())].into_iter().collect();
    let program: Result<seccompiler::BpfProgram, _> = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::KillProcess,
        seccompiler::TargetArch::x86_64,
    )
    .and_then(TryInto::try_into);
    match program.map(|p| seccompiler::apply_filter(&p)) {
        Ok(Ok(())) => {
            // SAFETY: getpriority takes numbers only; the filter kills the
            // process before it returns.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            eprintln!("capsa-jail-check: the forbidden call returned");
            std::process::exit(1)
        }
        _ => {
            eprintln!("capsa-jail-check: no seccomp filter");
            std::process::exit(1)
        }
    }
}
