//! The reference: each row as docker would run it, as an OCI bundle under
//! crun. The bundle is built here from docker's documented rules (moby's
//! container create and runc's user lookup), on purpose apart from
//! Capsa's code, so that the two can disagree.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::probe::{Caught, ProcessReport};
use super::table::{Row, GROUPS, HOSTNAME, STOP_TIMEOUT_SECS, USERS};
use super::Observed;

const DOCKER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// docker's default capabilities.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

fn owned(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// docker's argv: an entrypoint given at create replaces the image's and
/// resets its cmd; a cmd given replaces the image's.
fn docker_argv(row: &Row) -> Vec<String> {
    let (entrypoint, cmd) = match (row.spec.command, row.spec.args) {
        (Some(entrypoint), cmd) => (owned(entrypoint), cmd.map(owned).unwrap_or_default()),
        (None, Some(cmd)) => (
            row.image.entrypoint.map(owned).unwrap_or_default(),
            owned(cmd),
        ),
        (None, None) => (
            row.image.entrypoint.map(owned).unwrap_or_default(),
            row.image.cmd.map(owned).unwrap_or_default(),
        ),
    };
    [entrypoint, cmd].concat()
}

/// docker's environment: the run's variables, then the image's that the
/// run does not set, laid over PATH and HOSTNAME (replacing in place);
/// and HOME, when none is set, from the user's passwd entry, else `/`, as
/// runc (docker's runtime) sets it. (crun sets it only for a user in
/// /etc/passwd; given here, its own rule does not come into play.)
fn docker_env(row: &Row) -> Vec<String> {
    let mut config: Vec<String> = row
        .spec
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let key = |e: &str| e.split('=').next().unwrap_or_default().to_string();
    for entry in row.image.env {
        if !config.iter().any(|c| key(c) == key(entry)) {
            config.push(entry.to_string());
        }
    }
    let mut env = vec![
        format!("PATH={DOCKER_PATH}"),
        format!("HOSTNAME={HOSTNAME}"),
    ];
    for entry in config {
        match env.iter_mut().find(|e| key(e) == key(&entry)) {
            Some(slot) => *slot = entry,
            None => env.push(entry),
        }
    }
    if !env.iter().any(|e| key(e) == "HOME") {
        let uid = docker_user(row).map_or(u32::MAX, |(uid, ..)| uid);
        let home = USERS
            .iter()
            .find(|(_, u, ..)| *u == uid)
            .map_or("/", |(.., home)| *home);
        env.push(format!("HOME={home}"));
    }
    env
}

/// runc's user lookup against the table's users and groups: uid, gid,
/// supplementary gids.
fn docker_user(row: &Row) -> Result<(u32, u32, Vec<u32>)> {
    let user = row.spec.user.or(row.image.user).unwrap_or("");
    let (name, group) = match user.split_once(':') {
        Some((n, g)) => (n, Some(g)),
        None => (user, None),
    };
    let name = if name.is_empty() { "root" } else { name };
    let entry = USERS
        .iter()
        .find(|(n, uid, ..)| *n == name || name.parse() == Ok(*uid));
    let (uid, mut gid, matched) = match entry {
        Some((n, uid, gid, _)) => (*uid, *gid, Some(*n)),
        None => (name.parse().context("no such user")?, 0, None),
    };
    let mut extra = Vec::new();
    match group {
        Some(group) => {
            gid = match group.parse() {
                Ok(number) => number,
                Err(_) => GROUPS
                    .iter()
                    .find(|(n, ..)| *n == group)
                    .map(|(_, g, _)| *g)
                    .context("no such group")?,
            }
        }
        None => {
            if let Some(matched) = matched {
                extra = GROUPS
                    .iter()
                    .filter(|(_, _, members)| members.contains(&matched))
                    .map(|(_, g, _)| *g)
                    .collect();
            }
        }
    }
    Ok((uid, gid, extra))
}

fn docker_stop_signal(row: &Row) -> String {
    row.spec
        .stop_signal
        .or(row.image.stop_signal)
        .unwrap_or("SIGTERM")
        .to_string()
}

fn config_json(row: &Row, rootfs: &Path) -> Result<serde_json::Value> {
    let (uid, gid, additional) = docker_user(row)?;
    let cwd = row
        .spec
        .working_dir
        .or(row.image.working_dir)
        .unwrap_or("/");
    Ok(serde_json::json!({
        "ociVersion": "1.0.2",
        "hostname": HOSTNAME,
        "root": {"path": rootfs, "readonly": false},
        "process": {
            "terminal": false,
            "args": docker_argv(row),
            "env": docker_env(row),
            "cwd": cwd,
            "user": {"uid": uid, "gid": gid, "additionalGids": additional},
            "capabilities": {
                "bounding": CAPABILITIES, "effective": CAPABILITIES, "permitted": CAPABILITIES,
            },
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
        },
    }))
}

/// Runs every row under crun.
pub fn run_all(crun: &Path, work: &Path, rootfs: &Path, rows: &[Row]) -> HashMap<String, Observed> {
    rows.iter()
        .map(|row| {
            let observed = run_row(crun, work, rootfs, row).unwrap_or_else(|e| Observed {
                error: Some(format!("{e:#}")),
                ..Observed::default()
            });
            (row.name.to_string(), observed)
        })
        .collect()
}

fn crun_command(crun: &Path) -> Command {
    let mut command = Command::new(crun);
    // The outer machine's root is an initramfs (no pivot_root), and the
    // reference needs no cgroup of its own.
    command.arg("--cgroup-manager=disabled");
    command
}

fn run_row(crun: &Path, work: &Path, rootfs: &Path, row: &Row) -> Result<Observed> {
    let bundle: PathBuf = work.join("bundles").join(row.name);
    let _ = fs::remove_dir_all(&bundle);
    fs::create_dir_all(&bundle)?;
    fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&config_json(row, rootfs)?)?,
    )?;
    let id = format!("capsa-conf-{}", row.name);
    let _ = crun_command(crun).args(["delete", "-f", &id]).output();
    let mut child = crun_command(crun)
        .args(["run", "--no-pivot", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting crun")?;
    let stdout = child.stdout.take().context("crun's stdout")?;
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let Ok(first) = received.recv_timeout(Duration::from_secs(30)) else {
        let _ = super::wait_bounded(&mut child, Duration::from_secs(5));
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        bail!("the probe printed nothing: {}", stderr.trim());
    };
    let report: ProcessReport =
        serde_json::from_str(&first).with_context(|| format!("the probe's report: {first}"))?;
    if row.stopped {
        let signal = docker_stop_signal(row);
        let kill = crun_command(crun).args(["kill", &id, &signal]).output()?;
        if !kill.status.success() {
            bail!(
                "crun kill {signal}: {}",
                String::from_utf8_lossy(&kill.stderr)
            );
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(STOP_TIMEOUT_SECS);
        while std::time::Instant::now() < deadline && child.try_wait()?.is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        if child.try_wait()?.is_none() {
            let _ = crun_command(crun).args(["kill", &id, "KILL"]).output();
        }
    }
    let status = super::wait_bounded(&mut child, Duration::from_secs(60))?;
    let caught = received
        .try_iter()
        .find_map(|line| serde_json::from_str::<Caught>(&line).ok());
    let _ = crun_command(crun).args(["delete", "-f", &id]).output();
    let stderr = {
        let mut text = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        }
        text
    };
    use std::os::unix::process::ExitStatusExt;
    // crun exits 128 + N for a container that signal N killed; only the
    // stopped rows can die so.
    let (exit_code, signal) = match (status.code(), status.signal()) {
        (Some(code), _) if code > 128 && row.stopped => (Some(code), Some(code - 128)),
        (Some(code), _) => (Some(code), None),
        (None, Some(signal)) => (Some(128 + signal), Some(signal)),
        (None, None) => (None, None),
    };
    Ok(Observed {
        report: Some(report),
        exit_code,
        signal,
        caught: caught.map(|c| c.signal),
        error: (exit_code.is_none()).then(|| format!("crun ended oddly: {stderr}")),
    })
}
