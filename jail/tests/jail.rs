//! The jail, entered by the real `capsa-jail-check` binary (as root; the
//! tests say they are skipped otherwise): what the jailed process sees of
//! itself, what its supervisor holds, and how both end.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use capsa_jail::{Confinement, TaskStatus};

const UID: u32 = 900_123;
const GID: u32 = 900_124;

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: the jail takes root");
    false
}

fn jail_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("root")).unwrap();
    dir
}

fn check(dir: &tempfile::TempDir, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsa-jail-check"));
    command
        .arg(dir.path().join("root"))
        .args([UID.to_string(), GID.to_string()])
        .args(extra);
    command
}

fn run(dir: &tempfile::TempDir, extra: &[&str]) -> (Output, Option<Confinement>) {
    let output = check(dir, extra).output().unwrap();
    let seen = String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .and_then(|line| serde_json::from_str(line).ok());
    (output, seen)
}

#[test]
fn the_jailed_process_holds_nothing_and_its_exit_code_comes_out() {
    if !is_root() {
        return;
    }
    let dir = jail_dir();
    let (output, seen) = run(&dir, &["exit=7"]);
    assert_eq!(output.status.code(), Some(7), "{output:?}");
    let seen = seen.expect("a report");
    assert_eq!(seen.pid, 1, "PID 1 of a PID namespace of its own");
    assert_eq!(seen.uids, [UID; 3]);
    assert_eq!(seen.gids, [GID; 3]);
    assert_eq!(seen.groups, 0);
    assert_eq!(
        (
            seen.effective_caps,
            seen.permitted_caps,
            seen.inheritable_caps,
            seen.bounding_caps
        ),
        (0, 0, 0, 0)
    );
    assert!(seen.no_new_privs && !seen.dumpable);
    assert_eq!(seen.root_entries, Some(0), "its root is the empty jail");
    assert!(!seen.proc_visible);
    assert_eq!(seen.interfaces, ["lo"], "a network namespace of its own");
    assert_eq!(seen.hostname, "capsa-vmm");
    assert_eq!(seen.fds, [0, 1, 2]);
    assert_eq!(seen.limits, [64, 16, 1 << 20]);
}

#[test]
fn a_seccomp_kill_in_the_jail_ends_the_supervisor_by_sigsys() {
    if !is_root() {
        return;
    }
    let dir = jail_dir();
    let (output, seen) = run(&dir, &["forbidden"]);
    assert!(seen.is_some(), "{output:?}");
    assert_eq!(output.status.signal(), Some(libc::SIGSYS), "{output:?}");
}

#[test]
fn the_supervisor_is_jailed_and_a_sigterm_ends_both() {
    if !is_root() {
        return;
    }
    let dir = jail_dir();
    let mut child = check(&dir, &["wait"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let pid = child.id();
    // The line comes from the jailed process, which the supervisor forks
    // before it confines itself: give the supervisor a moment to finish.
    let read_status =
        || TaskStatus::parse(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut status = read_status();
    while status.seccomp != "2" && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
        status = read_status();
    }
    assert_eq!(status.uids, format!("{UID} {UID} {UID} {UID}"));
    assert_eq!(status.gids, format!("{GID} {GID} {GID} {GID}"));
    assert_eq!(status.cap_eff, "0000000000000000");
    assert_eq!(status.cap_bnd, "0000000000000000");
    assert_eq!(status.no_new_privs, "1");
    assert_eq!(status.seccomp, "2");
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut fds = fds;
    fds.sort();
    assert_eq!(
        fds,
        ["2", "3"],
        "standard error and the pipe its child watches"
    );
    let began = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    assert!(began.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_jail_that_is_not_empty_is_refused_before_anything_changes() {
    if !is_root() {
        return;
    }
    let dir = jail_dir();
    std::fs::write(dir.path().join("root/leftover"), "").unwrap();
    let (output, seen) = run(&dir, &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(seen.is_none());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("is not empty"), "{err}");
}
