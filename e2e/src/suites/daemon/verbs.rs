//! The everyday verbs of the CLI, end to end: `--rm` done by capsad,
//! `kill`, `port`, `inspect` fed back to `create`, an ACI group, and
//! interactive runs (`run -i`, `attach`, and `run -it` in a terminal
//! driven through tmux).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use capsa_api::{ErrorCode, GroupStatus, GroupView, PortSpec, ProcessView};

use super::harness::Capsad;
use super::main_checks::api_error;
use crate::suite::Suite;

pub fn run(s: &mut Suite, d: &Capsad) -> Result<()> {
    s.check(
        "capsad deletes a --rm group once it exits, though its CLI was killed while it ran",
        || {
            let mut cli = Command::new(d.artifacts.path("capsa"))
                .args(["run", "--rm", "--name", "orphan", "busybox", "sleep", "3"])
                .env("CAPSA_SOCKET", &d.socket)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let deadline = Instant::now() + Duration::from_secs(60);
            let running = loop {
                match d.group("orphan") {
                    Ok(view) if view.status == GroupStatus::Running => break true,
                    _ if Instant::now() > deadline => break false,
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            let _ = cli.kill();
            let _ = cli.wait();
            ensure!(running, "the group never ran");
            let started = Instant::now();
            loop {
                match d.group("orphan") {
                    Err(e) if api_error(&e).is_some_and(|a| a.code == ErrorCode::NotFound) => {
                        break;
                    }
                    Ok(view) if started.elapsed() > Duration::from_secs(60) => {
                        anyhow::bail!("still there after 60 s: {:?}", view.status)
                    }
                    Err(e) if started.elapsed() > Duration::from_secs(60) => return Err(e),
                    _ => std::thread::sleep(Duration::from_millis(200)),
                }
            }
            Ok(format!(
                "deleted {} ms after its CLI was killed",
                started.elapsed().as_millis()
            ))
        },
    );
    s.check(
        "an Azure Container Instances group YAML runs: env and secureValue, a secret volume, an emptyDir",
        || {
            let file = d.fixture("aci-group.yaml");
            let created = d.capsa(&["create", "-f", &file.to_string_lossy()])?;
            ensure!(created.code == Some(0), "{}", created.describe());
            let view = d.group("aci-hello")?;
            let mut progress = Vec::new();
            d.start_group("aci-hello", &mut progress)?;
            let exit = d.wait("aci-hello", "app")?;
            let lines = d.log_lines("aci-hello", "app")?;
            d.delete("aci-hello")?;
            ensure!(
                view.spec.labels.get("origin").map(String::as_str) == Some("aci")
                    && view.memory_mib == 256,
                "mapped to {:?}",
                view.spec
            );
            ensure!(
                exit.exit_code == 0 && lines == ["hello from-aci secret-file 0"],
                "exit {exit:?}, output {lines:?}"
            );
            Ok(lines.join(""))
        },
    );
    s.check(
        "capsa inspect gives the whole spec, and its output fed back to create makes an equal group",
        || {
            let out = d.capsa(&[
                "run", "-d", "--name", "shape", "-e", "GREETING=hi", "-l", "team=a", "-m", "192m",
                "-p", "18091:80", "-w", "/tmp", "busybox", "sleep", "300",
            ])?;
            ensure!(out.code == Some(0), "run -d shape: {}", out.describe());
            let inspected = d.capsa(&["inspect", "shape"])?;
            ensure!(inspected.code == Some(0), "{}", inspected.describe());
            let before: GroupView = serde_json::from_str(&inspected.stdout)?;
            let port = d.capsa(&["--json", "port", "shape"])?;
            ensure!(port.code == Some(0), "{}", port.describe());
            let ports: Vec<PortSpec> = serde_json::from_str(&port.stdout)?;
            ensure!(
                ports.len() == 1 && ports[0].host_port == 18091 && ports[0].container_port == 80,
                "capsa port: {ports:?}"
            );
            d.delete("shape")?;
            let file = d.work.join("shape.json");
            std::fs::write(&file, &inspected.stdout)?;
            let created = d.capsa(&["create", "-f", &file.display().to_string()])?;
            ensure!(created.code == Some(0), "{}", created.describe());
            let after = d.group("shape")?;
            d.delete("shape")?;
            ensure!(
                after.spec == before.spec,
                "{:?} became {:?}",
                before.spec,
                after.spec
            );
            let main = &before.spec.containers[0];
            ensure!(
                main.env.get("GREETING").map(String::as_str) == Some("hi")
                    && main.ports.len() == 1
                    && before.spec.memory_mib == Some(192),
                "the spec lacks what run was given: {:?}",
                before.spec
            );
            Ok(format!("{} containers, {} labels", after.spec.containers.len(), after.spec.labels.len()))
        },
    );
    s.check(
        "capsa kill sends a signal the container traps, and SIGKILL unless told",
        || {
            let script = "trap 'exit 7' USR1; while :; do sleep 1; done";
            for name in ["trapper", "killed"] {
                let out = d.capsa(&["run", "-d", "--name", name, "busybox", "sh", "-c", script])?;
                ensure!(out.code == Some(0), "run -d {name}: {}", out.describe());
            }
            let bad = d.capsa(&["kill", "-s", "NOPE", "trapper"])?;
            ensure!(
                bad.code != Some(0),
                "a bad signal was taken: {}",
                bad.describe()
            );
            let sent = d.capsa(&["kill", "-s", "USR1", "trapper"])?;
            ensure!(sent.code == Some(0), "{}", sent.describe());
            let trapped = d.wait("trapper", "main")?;
            let sent = d.capsa(&["kill", "killed"])?;
            ensure!(sent.code == Some(0), "{}", sent.describe());
            let killed = d.wait("killed", "main")?;
            for name in ["trapper", "killed"] {
                d.delete(name)?;
            }
            ensure!(trapped.exit_code == 7, "USR1: {trapped:?}");
            ensure!(
                killed.exit_code == 137 || killed.signal == Some(libc::SIGKILL),
                "KILL: {killed:?}"
            );
            Ok(format!(
                "USR1: exit {}; KILL: exit {}",
                trapped.exit_code, killed.exit_code
            ))
        },
    );
    s.check(
        "capsa top lists a running container's processes with their command lines",
        || {
            let script = "sleep 1001 & exec sleep 1002";
            let out = d.capsa(&[
                "run", "-d", "--name", "topped", "busybox", "sh", "-c", script,
            ])?;
            ensure!(out.code == Some(0), "run -d: {}", out.describe());
            // The shell forks and execs as the container starts: asked
            // too early, top sees it half-way (seen: "[sh]" for PID 1).
            let listed = (|| -> Result<Vec<ProcessView>> {
                let deadline = Instant::now() + Duration::from_secs(15);
                loop {
                    let top = d.capsa(&["--json", "top", "topped"])?;
                    ensure!(top.code == Some(0), "{}", top.describe());
                    let processes: Vec<ProcessView> = serde_json::from_str(&top.stdout)?;
                    let main = processes.iter().find(|p| p.pid == 1);
                    if main.is_some_and(|p| p.command == "sleep 1002" && p.uid == 0)
                        && processes.iter().any(|p| p.command == "sleep 1001")
                    {
                        return Ok(processes);
                    }
                    ensure!(Instant::now() < deadline, "{processes:?}");
                    std::thread::sleep(Duration::from_millis(300));
                }
            })();
            d.delete("topped")?;
            let processes = listed?;
            Ok(format!("{} processes", processes.len()))
        },
    );
    s.check("capsa version names both sides and the caller", || {
        let out = d.capsa(&["--json", "version"])?;
        ensure!(out.code == Some(0), "{}", out.describe());
        let answer: serde_json::Value = serde_json::from_str(&out.stdout)?;
        let server: capsa_api::VersionView = serde_json::from_value(answer["server"].clone())?;
        ensure!(
            answer["client"] == env!("CARGO_PKG_VERSION")
                && server.version == env!("CARGO_PKG_VERSION")
                && server.api == "v1"
                && server.tenant.is_none(),
            "{answer}"
        );
        let flag = d.capsa(&["--version"])?;
        flag.exited_with(0, &[&format!("capsa {}", env!("CARGO_PKG_VERSION"))])
    });
    s.check(
        "capsa image tag names an image again; capsa system info and df count it",
        || {
            let count = |d: &Capsad| -> Result<(u64, u64)> {
                let info = d.capsa(&["--json", "system", "info"])?;
                ensure!(info.code == Some(0), "{}", info.describe());
                let info: capsa_api::SystemInfoView = serde_json::from_str(&info.stdout)?;
                let df = d.capsa(&["--json", "system", "df"])?;
                ensure!(df.code == Some(0), "{}", df.describe());
                let df: capsa_api::DiskUsageView = serde_json::from_str(&df.stdout)?;
                ensure!(info.images == Some(df.images), "{info:?} {df:?}");
                ensure!(df.image_bytes > 0 && df.layer_disk_bytes > 0, "{df:?}");
                Ok((df.images, df.group_bytes))
            };
            let (before, _) = count(d)?;
            let tagged = d.capsa(&["--json", "image", "tag", "busybox", "busybox:e2e-copy"])?;
            ensure!(tagged.code == Some(0), "{}", tagged.describe());
            let (after, _) = count(d)?;
            let removed = d.capsa(&["image", "rm", "busybox:e2e-copy"])?;
            ensure!(removed.code == Some(0), "{}", removed.describe());
            ensure!(after == before + 1, "images: {before} then {after}");
            Ok(format!("images: {before} then {after}"))
        },
    );
    s.check(
        "a readiness probe gates ready: not until it passes, ready while it does, unready again when it fails",
        || {
            let fixture = d.fixture("gated.yaml");
            let created = d.capsa(&["create", "-f", &fixture.to_string_lossy()])?;
            ensure!(created.code == Some(0), "{}", created.describe());
            let started = d.capsa(&["start", "gated"])?;
            ensure!(started.code == Some(0), "{}", started.describe());
            let result = readiness(d);
            d.delete("gated")?;
            result
        },
    );
    s.check(
        "init containers run one after another before the containers, and one that fails fails the start",
        || {
            let fixture = d.fixture("init.yaml");
            let created = d.capsa(&["create", "-f", &fixture.to_string_lossy()])?;
            ensure!(created.code == Some(0), "{}", created.describe());
            let started = d.capsa(&["start", "inited"]);
            let exit = d.wait("inited", "main");
            let logs = d.capsa(&["logs", "inited/main"]);
            let first = d.capsa(&["logs", "inited/first"]);
            let view = d
                .client()?
                .call::<GroupView>(hyper::Method::GET, "/v1/groups/inited", None);
            d.delete("inited")?;
            let started = started?;
            ensure!(started.code == Some(0), "start: {}", started.describe());
            ensure!(exit?.exit_code == 0, "main did not exit 0");
            logs?.exited_with(0, &["made-by-first", "and-second"])?;
            first?.exited_with(0, &["first-ran"])?;
            let view = view?;
            let inits: Vec<(&str, Option<i32>)> = view
                .init_containers
                .iter()
                .map(|c| (c.name.as_str(), c.exit_code))
                .collect();
            ensure!(
                inits == [("first", Some(0)), ("second", Some(0))],
                "{inits:?}"
            );
            // A failing one: the start fails, saying which, and main never runs.
            let failing = std::fs::read_to_string(&fixture)?
                .replace("name: inited", "name: inited-bad")
                .replace("echo and-second >> /shared/note", "exit 3");
            let bad = d.work.join("init-bad.yaml");
            std::fs::write(&bad, failing)?;
            let created = d.capsa(&["create", "-f", &bad.to_string_lossy()])?;
            ensure!(created.code == Some(0), "{}", created.describe());
            let refused = d.capsa(&["start", "inited-bad"])?;
            let view = d
                .client()?
                .call::<GroupView>(hyper::Method::GET, "/v1/groups/inited-bad", None);
            d.delete("inited-bad")?;
            ensure!(
                refused.code != Some(0)
                    && refused.stderr.contains("init container second exited 3"),
                "{}",
                refused.describe()
            );
            let view = view?;
            ensure!(
                view.containers.iter().all(|c| c.started_at.is_none()),
                "main ran: {:?}",
                view.containers
            );
            Ok(format!("main read both notes; the failing start: {}", refused.stderr.trim()))
        },
    );
    super::copies::run(s, d);
    interactive(s, d);
    terminal(s, d);
    Ok(())
}

/// The gated group's app: unready, ready once /tmp/ready exists, unready
/// once it is gone; each change an event.
fn readiness(d: &Capsad) -> Result<String> {
    let ready = || -> Result<bool> {
        let view = d
            .client()?
            .call::<GroupView>(hyper::Method::GET, "/v1/groups/gated", None)?;
        Ok(view.containers.iter().any(|c| c.name == "app" && c.ready))
    };
    let until = |wanted: bool| -> Result<Duration> {
        let began = Instant::now();
        while ready()? != wanted {
            ensure!(
                began.elapsed() < Duration::from_secs(20),
                "app not {} within 20 s",
                if wanted { "ready" } else { "unready" }
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(began.elapsed())
    };
    // Periods of 1 s: three of them fail before the file is there.
    std::thread::sleep(Duration::from_secs(3));
    ensure!(!ready()?, "ready before its probe passed");
    let touched = d.capsa(&["exec", "gated", "touch", "/tmp/ready"])?;
    ensure!(touched.code == Some(0), "{}", touched.describe());
    let became_ready = until(true)?;
    let removed = d.capsa(&["exec", "gated", "rm", "/tmp/ready"])?;
    ensure!(removed.code == Some(0), "{}", removed.describe());
    let became_unready = until(false)?;
    let events: Vec<String> = d
        .seen()
        .into_iter()
        .filter(|e| e.group == "gated" && matches!(e.action.as_str(), "ready" | "unready"))
        .map(|e| e.action)
        .collect();
    ensure!(events == ["ready", "unready"], "events: {events:?}");
    Ok(format!(
        "ready {} ms after the file, unready {} ms after its removal",
        became_ready.as_millis(),
        became_unready.as_millis()
    ))
}

/// What each thread of process `pid` is doing: its name, state, kernel
/// wait channel and system call, for a process that does not end.
fn threads_of(pid: &str) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("no process {pid}");
    };
    let read = |path: std::path::PathBuf| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    tasks
        .flatten()
        .map(|task| {
            let dir = task.path();
            let state = read(dir.join("stat"))
                .rsplit(") ")
                .next()
                .and_then(|rest| rest.split(' ').next())
                .unwrap_or("?")
                .to_string();
            format!(
                "[{} {} {state} wchan={} syscall={}]",
                task.file_name().to_string_lossy(),
                read(dir.join("comm")),
                read(dir.join("wchan")),
                read(dir.join("syscall"))
                    .split(' ')
                    .next()
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits until group `name` is gone, for up to `patience`.
fn gone(d: &Capsad, name: &str, patience: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        match d.group(name) {
            Err(e) if api_error(&e).is_some_and(|a| a.code == ErrorCode::NotFound) => {
                return Ok(started.elapsed());
            }
            Ok(view) if started.elapsed() > patience => {
                anyhow::bail!(
                    "{name} still there after {} s: {:?}",
                    patience.as_secs(),
                    view.status
                )
            }
            Err(e) if started.elapsed() > patience => return Err(e),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn interactive(s: &mut Suite, d: &Capsad) {
    s.check(
        "Ctrl-C to an attached capsa run reaches the container as SIGINT (its trap runs, its code passes)",
        || {
            let script = "trap 'echo got-INT; exit 3' INT; while :; do sleep 1; done";
            let mut cli = Command::new(d.artifacts.path("capsa"))
                .args(["run", "--rm", "--name", "sigs", "busybox", "sh", "-c", script])
                .env("CAPSA_SOCKET", &d.socket)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            let stdout = cli.stdout.take().context("no stdout")?;
            let output = std::thread::spawn(move || {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut { stdout }, &mut text);
                text
            });
            // Its container running, not only its VM: a signal before the
            // start has no process to reach.
            let deadline = Instant::now() + Duration::from_secs(90);
            let running = loop {
                match d.group("sigs") {
                    Ok(view)
                        if view
                            .containers
                            .iter()
                            .any(|c| c.status == capsa_api::ContainerStatus::Running) =>
                    {
                        break true
                    }
                    _ if Instant::now() > deadline => break false,
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            // The trap is set once the shell runs.
            std::thread::sleep(Duration::from_secs(2));
            super::harness::send_signal(cli.id(), libc::SIGINT)?;
            let deadline = Instant::now() + Duration::from_secs(60);
            let status = loop {
                if let Some(status) = cli.try_wait()? {
                    break Some(status);
                }
                if Instant::now() > deadline {
                    let _ = cli.kill();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let text = output.join().unwrap_or_default();
            if status.is_none() {
                // Not left running for the checks after this one.
                let _ = d.delete("sigs");
            }
            ensure!(running, "the group never ran");
            let status = status.context("capsa still running 60 s after SIGINT")?;
            ensure!(
                status.code() == Some(3) && text.lines().any(|l| l == "got-INT"),
                "exit {status}, output {text:?}"
            );
            gone(d, "sigs", Duration::from_secs(5))?;
            Ok(format!("exit 3, {text:?}"))
        },
    );
    s.check(
        "capsa run -i sends its input to the container, which reads it, and --rm removes it",
        || {
            let script = "read line; echo got-$line; exit 4";
            let out = d.capsa_with(
                &[
                    "run", "-i", "--rm", "--name", "reader", "busybox", "sh", "-c", script,
                ],
                Some(b"hello\n"),
            )?;
            let done = out.exited_with(4, &["got-hello"])?;
            gone(d, "reader", Duration::from_secs(5))?;
            Ok(done)
        },
    );
    s.check(
        "capsa attach joins a running container: its input in, its output out, its exit code",
        || {
            let script = "while read line; do echo echo-$line; done; echo bye; exit 6";
            let out = d.capsa(&[
                "run", "-d", "-i", "--name", "listener", "busybox", "sh", "-c", script,
            ])?;
            ensure!(out.code == Some(0), "run -d -i: {}", out.describe());
            let attached = d.capsa_with(&["attach", "listener"], Some(b"one\ntwo\n"))?;
            d.delete("listener")?;
            attached.exited_with(6, &["echo-one", "echo-two", "bye"])
        },
    );
}

/// `capsa run -it` in a terminal of tmux's, typed into and read back.
fn terminal(s: &mut Suite, d: &Capsad) {
    s.check(
        "capsa run -it busybox sh in tmux: commands run, a resize is seen, Ctrl-C stops a sleep, exit passes the shell's status",
        || {
            let socket = d.work.join("tmux.sock");
            let tmux = |args: &[&str]| -> Result<String> {
                let out = Command::new(d.artifacts.tool("tmux"))
                    .arg("-u")
                    .arg("-S")
                    .arg(&socket)
                    .args(args)
                    .env("CAPSA_SOCKET", &d.socket)
                    .stdin(Stdio::null())
                    .output()
                    .context("running tmux")?;
                ensure!(
                    out.status.success(),
                    "tmux {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            };
            let screen = || tmux(&["capture-pane", "-p"]);
            // Until `ready` finds what it wants on the screen.
            let until = |what: &str, secs: u64, ready: &dyn Fn(&str) -> bool| -> Result<String> {
                let deadline = Instant::now() + Duration::from_secs(secs);
                loop {
                    let now = screen()?;
                    if ready(&now) {
                        return Ok(now);
                    }
                    ensure!(Instant::now() < deadline, "no {what} within {secs} s; the screen:\n{now}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            };
            // capture-pane drops a line's trailing blanks: "/ # " is "/ #".
            let prompts = |screen: &str| screen.lines().filter(|l| l.starts_with("/ #")).count();
            // A shell of its own waits for capsa and writes its status down:
            // tmux's pane_dead was seen to stay 0 after capsa had exited (a
            // zombie tmux did not reap), so the status comes from the file.
            let status_file = d.work.join("tty-status");
            let _ = std::fs::remove_file(&status_file);
            let command = format!(
                "sh -c '{} run -it --rm --name tty busybox sh; echo $? > {}'",
                d.artifacts.path("capsa").display(),
                status_file.display()
            );
            tmux(&[
                "-f", "/dev/null", "new-session", "-d", "-x", "100", "-y", "30", &command, ";",
                "set-option", "-g", "remain-on-exit", "on",
            ])?;
            let ran = (|| -> Result<String> {
                until("prompt", 120, &|s| prompts(s) >= 1)?;
                tmux(&["send-keys", "stty size", "Enter"])?;
                until("first size", 30, &|s| s.lines().any(|l| l.trim() == "30 100"))?;
                tmux(&["resize-window", "-x", "120", "-y", "40"])?;
                tmux(&["send-keys", "stty size", "Enter"])?;
                until("new size", 30, &|s| s.lines().any(|l| l.trim() == "40 120"))?;
                let before = prompts(&screen()?);
                tmux(&["send-keys", "sleep 300", "Enter"])?;
                std::thread::sleep(Duration::from_secs(2));
                let interrupted = Instant::now();
                tmux(&["send-keys", "C-c"])?;
                until("prompt after Ctrl-C", 30, &|s| prompts(s) > before)?;
                let stopped_in = interrupted.elapsed();
                tmux(&["send-keys", "exit 7", "Enter"])?;
                let deadline = Instant::now() + Duration::from_secs(60);
                let status = loop {
                    if let Ok(status) = std::fs::read_to_string(&status_file) {
                        if status.ends_with('\n') {
                            break status.trim().to_string();
                        }
                    }
                    if Instant::now() >= deadline {
                        let group = d
                            .client()?
                            .call::<GroupView>(hyper::Method::GET, "/v1/groups/tty", None)
                            .map(|g| format!("{:?}, containers {:?}", g.status, g.containers))
                            .unwrap_or_else(|e| format!("{e:#}"));
                        let shell = tmux(&["display", "-p", "#{pane_pid}"])?;
                        let shell = shell.trim();
                        let children = std::fs::read_to_string(format!(
                            "/proc/{shell}/task/{shell}/children"
                        ))
                        .unwrap_or_default();
                        let threads: Vec<String> =
                            children.split_whitespace().map(threads_of).collect();
                        anyhow::bail!(
                            "capsa still running 60 s after exit 7; the group: {group}; its threads: {}; the screen:\n{}",
                            threads.join(" "),
                            screen()?
                        );
                    }
                    std::thread::sleep(Duration::from_millis(200));
                };
                ensure!(status == "7", "capsa exited {status}, not the shell's 7");
                gone(d, "tty", Duration::from_secs(5))?;
                Ok(format!(
                    "sizes 30x100 then 40x120, sleep stopped {} ms after Ctrl-C, exit 7",
                    stopped_in.as_millis()
                ))
            })();
            let _ = tmux(&["kill-server"]);
            ran
        },
    );
}
