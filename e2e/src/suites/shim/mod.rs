//! containerd end to end with the Capsa shim (containerd-shim-capsa-v2):
//! Debian's containerd and ctr, a busybox image imported with `ctr image
//! import`, and the tasks, execs, terminals, pods, kills, OOM, events, bad
//! configs and leftovers a containerd user meets.

pub mod containerd;

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::suite::Suite;
use crate::vm::{self, Artifacts};
use containerd::{Containerd, IMAGE};

/// "Linux version X (Y)" of a kernel image or /proc/version.
fn kernel_version(text: &[u8]) -> Option<String> {
    let at = text.windows(14).position(|w| w == b"Linux version ")?;
    let rest = &text[at..];
    let end = rest.iter().position(|&b| b == b')')?;
    Some(String::from_utf8_lossy(&rest[..=end]).into_owned())
}

/// Processes whose command is `capsa-vmm` or the Capsa shim.
fn ours() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let program = cmdline.split(|&b| b == 0).next()?;
            let name = String::from_utf8_lossy(program).into_owned();
            (name.ends_with("capsa-vmm") || name.ends_with("containerd-shim-capsa-v2"))
                .then(|| format!("{} {name}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// The running VMMs, one PID each: a jailed VMM is two processes (the
/// supervisor the shim started and the jailed VMM under it), counted by
/// its supervisor.
pub fn vmm_pids() -> Vec<i32> {
    let all: Vec<i32> = ours()
        .iter()
        .filter(|p| p.ends_with("capsa-vmm"))
        .filter_map(|p| p.split(' ').next()?.parse().ok())
        .collect();
    let parent = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    all.iter()
        .copied()
        .filter(|&pid| parent(pid).is_none_or(|p| !all.contains(&p)))
        .collect()
}

/// The exit code ctr reports when it deletes a task that ended so.
fn deleted_with(out: &crate::suites::daemon::Output) -> Option<i32> {
    let text = format!("{}{}", out.stdout, out.stderr);
    let at = text.find("exit code ")? + "exit code ".len();
    text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

pub fn run(suite: &mut Suite, artifacts: &Artifacts) {
    let result = Containerd::start(artifacts).and_then(|mut c| {
        let failed_before = suite.failed;
        let result = checks(suite, &mut c);
        if result.is_err() || suite.failed > failed_before {
            // The shim logs into containerd's log.
            eprintln!("containerd's log:\n{}", c.log());
        }
        result
    });
    if let Err(e) = result {
        suite.check("the suite ran to its end", || Err(e));
    }
}

fn checks(s: &mut Suite, c: &mut Containerd) -> Result<()> {
    let import = c.import_busybox(None)?;
    s.verdict(
        "ctr imports the busybox image",
        import.code == Some(0),
        import.describe(),
    );
    c.follow_events()?;
    s.check(
        "ctr run with the Capsa runtime prints hello and exits 0",
        || {
            c.run(&["--rm", IMAGE, "hello", "echo", "hello"])?
                .exited_with(0, &["hello"])
        },
    );
    s.check(
        "a failing command's exit code and output pass through ctr",
        || {
            c.run(&["--rm", IMAGE, "failing", "sh", "-c", "echo failing; exit 7"])?
                .exited_with(7, &["failing"])
        },
    );
    s.check(
        "the container's /proc/version is the guest kernel's, not the host's",
        || {
            let guest = kernel_version(&std::fs::read(c.artifacts.path("vmlinux"))?)
                .context("no version in vmlinux")?;
            let outer =
                kernel_version(&std::fs::read("/proc/version")?).context("no /proc/version")?;
            let out = c.run(&["--rm", IMAGE, "kernel", "cat", "/proc/version"])?;
            ensure!(
                out.stdout.starts_with(&guest),
                "{} (guest kernel: {guest})",
                out.describe()
            );
            ensure!(guest != outer, "the host runs the guest's kernel: {outer}");
            Ok(guest)
        },
    );
    s.check(
        "a bound host file is copied into the container, a read-only host directory shared, a writable one refused",
        || {
            let hosts = c.dir.join("hosts");
            std::fs::write(&hosts, "10.1.2.3 pod-peer\n")?;
            let shared = c.dir.join("shared");
            std::fs::create_dir_all(shared.join("sub"))?;
            std::fs::write(shared.join("sub/greeting"), "hello from the host\n")?;
            let file = format!(
                "type=bind,src={},dst=/etc/hosts,options=rbind:ro",
                hosts.display()
            );
            let dir = format!(
                "type=bind,src={},dst=/hostdir,options=rbind:ro",
                shared.display()
            );
            let out = c.run(&[
                "--rm",
                "--mount",
                &file,
                "--mount",
                &dir,
                IMAGE,
                "binds",
                "sh",
                "-c",
                "cat /etc/hosts /hostdir/sub/greeting; touch /hostdir/x 2>/dev/null || echo read-only",
            ])?;
            ensure!(
                out.code == Some(0)
                    && out.lines() == ["10.1.2.3 pod-peer", "hello from the host", "read-only"],
                "{}",
                out.describe()
            );
            let writable = format!(
                "type=bind,src={},dst=/hostdir,options=rbind",
                shared.display()
            );
            let refused = c.run(&["--rm", "--mount", &writable, IMAGE, "rw-bind", "true"])?;
            let wanted = format!("the host directory {} is bound read-write", shared.display());
            ensure!(
                refused.code != Some(0) && refused.stderr.contains(&wanted),
                "{}",
                refused.describe()
            );
            let log = c.log();
            ensure!(
                log.contains("hosts is copied into the root filesystem at /etc/hosts"),
                "no copy in the log"
            );
            Ok(out.describe())
        },
    );
    s.check("ctr run -t: a terminal of ctr's own size, and the exit code", || {
        // script(1) gives ctr a terminal, sized 30x100.
        let line = format!(
            "stty rows 30 cols 100; {} --rm -t {IMAGE} tty sh -c 'test -t 0 && echo stdin-is-a-terminal; stty size; exit 3'",
            c.run_words()
        );
        let mut command = Command::new(c.artifacts.tool("script"));
        command.args(["-q", "-e", "-c", &line, "/dev/null"]);
        let run = vm::Background::spawn(command)?.finish_or_fail(Duration::from_secs(120))?;
        ensure!(run.status == Some(3), "status {:?}: {}", run.status, run.tail(5));
        ensure!(run.stdout.contains("stdin-is-a-terminal") && run.stdout.contains("30 100"), "{}", run.tail(5));
        Ok("30 100, exit 3".into())
    });
    running(s, c)?;
    pod(s, c)?;
    s.check(
        "kill -s SIGKILL ends a task that ignores SIGTERM, with status 137",
        || {
            let out = c.run(&[
                "-d",
                "--null-io",
                IMAGE,
                "doomed",
                "sh",
                "-c",
                "trap '' TERM; sleep 600",
            ])?;
            ensure!(out.code == Some(0), "{}", out.describe());
            let deleted = c.end_task("doomed", &["-s", "SIGKILL"])?;
            ensure!(
                deleted_with(&deleted) == Some(137),
                "{}",
                deleted.describe()
            );
            Ok("137".into())
        },
    );
    s.check(
        "a misspelt shim config key and a missing kernel are named",
        || {
            std::fs::write(c.dir.join("bad.toml"), "kernal = \"x\"\n")?;
            let bad = c.ctr(&[
                "run",
                "--rm",
                "--runtime",
                containerd::RUNTIME,
                "--runtime-config-path",
                &artifacts_path_of(&c.dir.join("bad.toml")),
                IMAGE,
                "bad",
                "true",
            ])?;
            ensure!(
                bad.code != Some(0) && bad.stderr.contains("unknown field `kernal`"),
                "{}",
                bad.describe()
            );
            let initrd = c.artifacts.path("initramfs.cpio");
            std::fs::write(
                c.dir.join("nokernel.toml"),
                format!(
                    "kernel = \"/nonexistent/vmlinux\"\ninitrd = \"{}\"\n",
                    initrd.display()
                ),
            )?;
            let missing = c.ctr(&[
                "run",
                "--rm",
                "--runtime",
                containerd::RUNTIME,
                "--runtime-config-path",
                &artifacts_path_of(&c.dir.join("nokernel.toml")),
                IMAGE,
                "nokernel",
                "true",
            ])?;
            ensure!(
                missing.code != Some(0)
                    && missing
                        .stderr
                        .contains("/nonexistent/vmlinux does not exist"),
                "{}",
                missing.describe()
            );
            Ok("both named".into())
        },
    );
    s.check(
        "a container over its memory limit is OOM-killed with status 137",
        || {
            // Bounded at three times the limit, so that a limit not applied ends too.
            let out = c.run(&[
                "--rm",
                "--memory-limit",
                "16777216",
                IMAGE,
                "oom",
                "sh",
                "-c",
                "x=$(head -c 50331648 /dev/zero | tr '\\0' a); echo survived",
            ])?;
            ensure!(
                out.code == Some(137) && !out.stdout.contains("survived"),
                "{}",
                out.describe()
            );
            Ok("137".into())
        },
    );
    let topics = c.events();
    for topic in [
        "create",
        "start",
        "exec-added",
        "exec-started",
        "exit",
        "delete",
        "oom",
    ] {
        let wanted = format!("/tasks/{topic}");
        s.verdict(
            &format!("containerd got {wanted} events from the shim"),
            topics.contains(&wanted),
            format!("{} task events", topics.len()),
        );
    }
    s.check(
        "a task whose VM is killed stops with status 137 and is deleted",
        || {
            let out = c.run(&["-d", "--null-io", IMAGE, "victim", "sleep", "600"])?;
            ensure!(out.code == Some(0), "{}", out.describe());
            for pid in vmm_pids() {
                // SAFETY: kill(2) with a PID and a signal number touches no memory.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            ensure!(c.stopped("victim")?, "not stopped");
            let deleted = c.ctr(&["task", "delete", "victim"])?;
            let removed = c.ctr(&["container", "rm", "victim"])?;
            ensure!(
                deleted_with(&deleted) == Some(137) && removed.code == Some(0),
                "{} / {}",
                deleted.describe(),
                removed.describe()
            );
            Ok("137, deleted".into())
        },
    );
    s.check(
        "no VMM, shim, sandbox or disk directory, jail id claim or mount is left behind",
        || {
            std::thread::sleep(Duration::from_secs(1));
            let processes = ours();
            let names = |dir: &str| -> Vec<String> {
                std::fs::read_dir(dir)
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default()
            };
            // The jail ids' claims stay as a directory, with no claim left.
            let claims = names("/run/capsa-shim/jail-ids");
            let mut dirs: Vec<String> = names("/run/capsa-shim")
                .into_iter()
                .filter(|d| d != "jail-ids")
                .collect();
            dirs.extend(names(&c.dir.join("disks").display().to_string()));
            let state = format!(" {}", c.dir.join("state").display());
            let mounts: Vec<String> = std::fs::read_to_string("/proc/mounts")?
                .lines()
                .filter(|l| l.contains(&state))
                .map(str::to_string)
                .collect();
            ensure!(
                processes.is_empty() && dirs.is_empty() && mounts.is_empty() && claims.is_empty(),
                "processes {processes:?}, sandbox dirs {dirs:?}, mounts {mounts:?}, jail id claims {claims:?}"
            );
            Ok("nothing".into())
        },
    );
    Ok(())
}

fn artifacts_path_of(path: &std::path::Path) -> String {
    path.to_string_lossy().into_owned()
}

fn running(s: &mut Suite, c: &Containerd) -> Result<()> {
    // PID 1 of a PID namespace ignores signals it has no handler for.
    let out = c.run(&[
        "-d",
        "--null-io",
        IMAGE,
        "long",
        "sh",
        "-c",
        "trap 'exit 0' TERM; while :; do sleep 1; done",
    ])?;
    ensure!(out.code == Some(0), "run -d long: {}", out.describe());
    s.check(
        "ctr task exec runs in a running task, with its stdout, stderr and exit code",
        || {
            let out = c.ctr(&[
                "task",
                "exec",
                "--exec-id",
                "e1",
                "long",
                "sh",
                "-c",
                "echo in-exec; echo to-stderr >&2; exit 4",
            ])?;
            ensure!(
                out.code == Some(4)
                    && out.lines() == ["in-exec"]
                    && out.stderr.lines().any(|l| l == "to-stderr"),
                "{}",
                out.describe()
            );
            Ok(out.describe())
        },
    );
    s.check("ctr task ps lists its processes", || {
        let out = c.ctr(&["task", "ps", "long"])?;
        let pids: Vec<&str> = out.stdout.lines().skip(1).collect();
        ensure!(
            out.code == Some(0) && out.stdout.starts_with("PID") && !pids.is_empty(),
            "{}",
            out.describe()
        );
        Ok(format!("{} processes", pids.len()))
    });
    s.check("ctr task metrics reads its cgroup", || {
        let out = c.ctr(&["task", "metrics", "long"])?;
        ensure!(
            out.code == Some(0) && out.stdout.lines().count() > 1,
            "{}",
            out.describe()
        );
        Ok(format!("{} lines", out.stdout.lines().count()))
    });
    s.check("ctr task kill stops it, and it is deleted", || {
        let deleted = c.end_task("long", &[])?;
        ensure!(deleted.code == Some(0), "{}", deleted.describe());
        Ok("stopped, deleted".into())
    });
    Ok(())
}

fn pod(s: &mut Suite, c: &Containerd) -> Result<()> {
    let annotation = "io.kubernetes.cri.sandbox-id=pod1";
    let out = c.run(&[
        "-d",
        "--null-io",
        "--annotation",
        annotation,
        IMAGE,
        "pod1",
        "sh",
        "-c",
        "trap 'exit 0' TERM; while :; do sleep 1; done",
    ])?;
    ensure!(out.code == Some(0), "run -d pod1: {}", out.describe());
    s.check(
        "a pod's second container runs in the first one's VM, one VMM for both",
        || {
            let first = c.ctr(&[
                "task",
                "exec",
                "--exec-id",
                "b1",
                "pod1",
                "cat",
                "/proc/sys/kernel/random/boot_id",
            ])?;
            let member = c.run(&[
                "--rm",
                "--annotation",
                annotation,
                IMAGE,
                "member",
                "cat",
                "/proc/sys/kernel/random/boot_id",
            ])?;
            let vmms = vmm_pids().len();
            ensure!(
                first.code == Some(0)
                    && !first.stdout.trim().is_empty()
                    && first.stdout == member.stdout,
                "{} / {}",
                first.describe(),
                member.describe()
            );
            ensure!(vmms == 1, "{vmms} VMMs");
            Ok(format!("boot id {}", first.stdout.trim()))
        },
    );
    s.check("and the pod ends cleanly", || {
        let deleted = c.end_task("pod1", &[])?;
        ensure!(deleted.code == Some(0), "{}", deleted.describe());
        Ok("deleted".into())
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_are_found_in_images_and_proc() {
        let text = b"\0\0Linux version 6.1.192 (root@vm) (gcc 12) #1\0";
        assert_eq!(
            kernel_version(text).as_deref(),
            Some("Linux version 6.1.192 (root@vm)")
        );
        assert_eq!(kernel_version(b"nothing"), None);
    }

    #[test]
    fn ctr_exit_codes_are_read() {
        let out = crate::suites::daemon::Output {
            code: Some(0),
            stdout: String::new(),
            stderr: "WARN[0000] task victim exit with non-zero exit code 137\n".into(),
        };
        assert_eq!(deleted_with(&out), Some(137));
    }
}
