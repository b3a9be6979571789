//! The daemon and the CLI end to end: run, exit
//! codes, a two-container group from a YAML file, logs as they come, a
//! daemon killed under a running group and its successor adopting it,
//! bad specs and unknown images, progress, networking (addresses, a
//! published port, names), metrics, restart policies and probes, volumes,
//! images and events. The checks decide by the API's types (exit codes,
//! views, wait results, log lines, events) wherever there is one.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use capsa_api::{
    ApiError, ContainerStatus, ErrorCode, Event, GroupStats, GroupStatus, GroupView, LogLine,
    WaitResponse,
};
use hyper::Method;

use super::harness::Capsad;
use super::metrics;
use crate::suite::Suite;

/// The API's error behind `e`, if it is one.
pub(super) fn api_error(e: &anyhow::Error) -> Option<&ApiError> {
    e.downcast_ref::<ApiError>()
}

fn expect_error<T: std::fmt::Debug>(result: Result<T>, code: ErrorCode) -> Result<ApiError> {
    match result {
        Ok(value) => anyhow::bail!("accepted: {value:?}"),
        Err(e) => {
            let error = api_error(&e)
                .cloned()
                .with_context(|| format!("not an API error: {e:#}"))?;
            ensure!(
                error.code == code,
                "{:?} instead of {code:?}: {}",
                error.code,
                error.message
            );
            Ok(error)
        }
    }
}

impl Capsad<'_> {
    pub fn group(&self, name: &str) -> Result<GroupView> {
        self.client()?
            .call(Method::GET, &format!("/v1/groups/{name}"), None)
    }

    pub fn wait(&self, group: &str, container: &str) -> Result<WaitResponse> {
        self.client()?.call(
            Method::POST,
            &format!("/v1/groups/{group}/containers/{container}/wait"),
            None,
        )
    }

    pub fn logs(&self, group: &str, container: &str) -> Result<Vec<LogLine>> {
        let mut bytes = Vec::new();
        self.client()?.stream(
            &format!("/v1/groups/{group}/containers/{container}/logs"),
            |c| {
                bytes.extend_from_slice(c);
                Ok(())
            },
        )?;
        Ok(bytes
            .split(|&b| b == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect())
    }

    pub(super) fn log_lines(&self, group: &str, container: &str) -> Result<Vec<String>> {
        Ok(self
            .logs(group, container)?
            .into_iter()
            .map(|l| l.line)
            .collect())
    }

    fn create(&self, spec: serde_json::Value) -> Result<GroupView> {
        self.client()?
            .call(Method::POST, "/v1/groups", Some(spec.to_string()))
    }

    pub(super) fn start_group(&self, name: &str, progress: &mut Vec<String>) -> Result<GroupView> {
        self.client()?.call_with_progress(
            Method::POST,
            &format!("/v1/groups/{name}/start"),
            None,
            |line| progress.push(line.to_string()),
        )
    }

    pub(super) fn delete(&self, name: &str) -> Result<serde_json::Value> {
        self.client()?
            .call(Method::DELETE, &format!("/v1/groups/{name}"), None)
    }

    fn has_event(&self, group: &str, container: Option<&str>, action: &str) -> Option<Event> {
        self.seen()
            .into_iter()
            .find(|e| e.group == group && e.container.as_deref() == container && e.action == action)
    }
}

/// `capsa ARGS` exiting `code`, with what it printed as detail.
fn exits(d: &Capsad, args: &[&str], code: i32) -> Result<String> {
    let out = d.capsa(args)?;
    ensure!(out.code == Some(code), "{}", out.describe());
    Ok(out.describe())
}

pub fn run(s: &mut Suite, d: &mut Capsad) -> Result<()> {
    s.check("without a daemon the CLI says how to start one", || {
        let out = d.capsa(&["ps"])?;
        ensure!(
            out.code == Some(125) && out.stderr.contains("Start it with: capsad"),
            "{}",
            out.describe()
        );
        Ok(out.stderr.trim().to_string())
    });
    d.start()?;
    let import = d.import_busybox()?;
    s.verdict(
        "a busybox OCI layout imports",
        import.code == Some(0),
        import.describe(),
    );
    let stored = format!("{}{}", import.stdout, import.stderr);
    s.verdict(
        "reporting each blob as it is stored",
        stored
            .lines()
            .any(|l| l.starts_with("sha256:") && l.ends_with(" stored")),
        stored.trim().to_string(),
    );
    s.check(
        "capsa run --rm busybox echo hi prints hi and exits 0",
        || {
            d.capsa(&["run", "--rm", "busybox", "echo", "hi"])?
                .exited_with(0, &["hi"])
        },
    );
    s.check(
        "a container writes 256 MiB into its root filesystem, twice its VM's memory, and reads it back",
        || {
            let script = "dd if=/dev/zero of=/big bs=1M count=256 2>/dev/null && sync \
                          && wc -c < /big && rm /big";
            d.capsa(&["run", "--rm", "--memory", "128", "busybox", "sh", "-c", script])?
                .exited_with(0, &["268435456"])
        },
    );
    s.check(
        "a failing command's exit code and output pass through",
        || {
            d.capsa(&["run", "--rm", "busybox", "sh", "-c", "echo failing; exit 3"])?
                .exited_with(3, &["failing"])
        },
    );
    s.check(
        "--entrypoint runs the program alone, without the image's command (as docker does)",
        || {
            d.capsa(&["run", "--rm", "--entrypoint", "echo", "busybox"])?
                .exited_with(0, &[""])
        },
    );
    s.check(
        "a command without args drops the image's command (as Kubernetes does)",
        || {
            let spec = serde_json::json!({"name": "command-only", "containers": [
                {"name": "main", "image": "busybox", "command": ["sh", "-c", "echo \"$0\" $#"]}]});
            d.create(spec)?;
            d.start_group("command-only", &mut Vec::new())?;
            let exit = d.wait("command-only", "main")?;
            let lines = d.log_lines("command-only", "main")?;
            d.delete("command-only")?;
            ensure!(
                exit.exit_code == 0 && lines == ["sh 0"],
                "{exit:?}: {lines:?}"
            );
            Ok(lines.join(""))
        },
    );
    s.check("an unknown image is refused at create", || {
        let spec = serde_json::json!({"name": "unknown", "containers": [{"name": "main", "image": "no-such-image"}]});
        let error = expect_error(d.create(spec), ErrorCode::ImageNotFound)?;
        Ok(error.message)
    });
    let bad = |file: &str| -> Result<ApiError> {
        let text = std::fs::read_to_string(d.fixture(file))?;
        expect_error(
            d.client()?
                .call::<GroupView>(Method::POST, "/v1/groups", Some(text)),
            ErrorCode::InvalidSpec,
        )
    };
    s.check("unknown fields are refused", || {
        let error = bad("bad.json")?;
        let all = format!("{} {}", error.message, error.details.join(" "));
        ensure!(all.contains("colour"), "{all}");
        Ok(all)
    });
    s.check("field errors name their field", || {
        let error = bad("bad-fields.json")?;
        ensure!(
            error
                .details
                .iter()
                .any(|d| d.contains("containers[0].workingDir")),
            "{:?}",
            error.details
        );
        Ok(error.details.join("; "))
    });
    pair(s, d)?;
    follow(s, d)?;
    adoption(s, d)?;
    network(s, d)?;
    restarts(s, d)?;
    volumes(s, d)?;
    s.check("an image not in use can be removed", || {
        exits(d, &["image", "ls"], 0)?;
        exits(d, &["image", "rm", "busybox"], 0)?;
        exits(d, &["image", "ls"], 0)
    });
    s.check(
        "events: a group created, its container died with its code, the group deleted",
        || {
            let died = d
                .has_event("pair", Some("second"), "died")
                .context("no died event")?;
            ensure!(died.detail.as_deref() == Some("exit code 5"), "{died:?}");
            d.has_event("pair", None, "created")
                .context("no created event")?;
            d.has_event("pair", None, "deleted")
                .context("no deleted event")?;
            Ok(format!("{} events", d.seen().len()))
        },
    );
    Ok(())
}

fn pair(s: &mut Suite, d: &Capsad) -> Result<()> {
    let created = d.capsa(&["create", "-f", &d.fixture("pair.yaml").to_string_lossy()])?;
    ensure!(
        created.code == Some(0),
        "create -f pair.yaml: {}",
        created.describe()
    );
    let mut progress = Vec::new();
    let started = d.start_group("pair", &mut progress);
    s.check("start reports the boot and each container", || {
        started?;
        ensure!(
            // Restored from a template when one of its shape is kept.
            progress.iter().any(|p| {
                p.starts_with("booting the microVM")
                    || p.starts_with("restoring the microVM from template")
            }),
            "{progress:?}"
        );
        ensure!(
            progress.iter().any(|p| p == "container second started"),
            "{progress:?}"
        );
        Ok(progress.join("; "))
    });
    s.check(
        "the image's layer disk was converted once (at the first run) and is now cached",
        || {
            let cached = progress
                .iter()
                .filter(|p| p.contains("disk image cached"))
                .count();
            let converted = progress.iter().any(|p| p.contains("converted"));
            let images: Vec<_> = std::fs::read_dir(d.root().join("root/layer-images"))?
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "erofs"))
                .collect();
            ensure!(
                cached == 1 && !converted && images.len() == 1,
                "{cached} cached, converted {converted}, {} images: {progress:?}",
                images.len()
            );
            Ok("one layer disk, cached, shared by both containers".into())
        },
    );
    s.check(
        "both containers of a two-container group ran, with their exit codes",
        || {
            let (first, second) = (d.wait("pair", "first")?, d.wait("pair", "second")?);
            ensure!(
                first.exit_code == 0 && second.exit_code == 5,
                "{first:?} {second:?}"
            );
            Ok(format!(
                "first {}, second {}",
                first.exit_code, second.exit_code
            ))
        },
    );
    s.check(
        "logs are kept for each container, with the env applied",
        || {
            let first = d.logs("pair", "first")?;
            let second = d.logs("pair", "second")?;
            ensure!(
                first
                    .iter()
                    .any(|l| l.line == "from-first" && l.stream == "stdout"),
                "{first:?}"
            );
            ensure!(
                second
                    .iter()
                    .any(|l| l.line == "from-second-hello" && l.stream == "stderr"),
                "{second:?}"
            );
            Ok("from-first, from-second-hello".into())
        },
    );
    s.check("a stopped group restarts", || {
        exits(d, &["restart", "pair"], 0)?;
        let second = d.wait("pair", "second")?;
        ensure!(second.exit_code == 5, "{second:?}");
        exits(d, &["rm", "pair"], 0)
    });
    Ok(())
}

fn follow(s: &mut Suite, d: &Capsad) -> Result<()> {
    let run = d.capsa(&[
        "run",
        "-d",
        "--name",
        "ticker",
        "busybox",
        "sh",
        "-c",
        "for i in 1 2 3; do echo tick-$i; sleep 1; done",
    ])?;
    ensure!(run.code == Some(0), "run -d ticker: {}", run.describe());
    s.check(
        "logs -f streams lines as they come and ends with the container",
        || {
            let mut child = Command::new(d.artifacts.path("capsa"))
                .args(["logs", "-f", "ticker"])
                .env("CAPSA_SOCKET", &d.socket)
                .stdout(Stdio::piped())
                .spawn()?;
            let began = Instant::now();
            let mut seen = Vec::new();
            for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
                let line = line?;
                if line.starts_with("tick-") {
                    seen.push((line, began.elapsed()));
                }
            }
            let status = child.wait()?;
            ensure!(status.success() && seen.len() == 3, "{status}: {seen:?}");
            ensure!(
                seen[2].1 >= seen[0].1 + Duration::from_millis(1500),
                "all at once: {seen:?}"
            );
            Ok(format!("{seen:?}"))
        },
    );
    exits(d, &["rm", "ticker"], 0)?;
    Ok(())
}

fn adoption(s: &mut Suite, d: &mut Capsad) -> Result<()> {
    let run = d.capsa(&[
        "run",
        "-d",
        "--name",
        "survivor",
        "busybox",
        "sh",
        "-c",
        "for i in $(seq 15); do echo beat-$i; sleep 1; done; sleep 5; exit 7",
    ])?;
    ensure!(run.code == Some(0), "run -d survivor: {}", run.describe());
    std::thread::sleep(Duration::from_secs(2));
    d.kill();
    std::thread::sleep(Duration::from_secs(1));
    s.check("the CLI tells a daemon that is down", || {
        exits(d, &["ps"], 125)
    });
    d.start()?;
    s.check("the restarted daemon has the group running", || {
        let view = d.group("survivor")?;
        ensure!(view.status == GroupStatus::Running, "{view:?}");
        Ok(format!("VMM pid {}", view.vmm_pid.unwrap_or_default()))
    });
    s.check("stats show the VMM and the running container", || {
        let stats: GroupStats = d
            .client()?
            .call(Method::GET, "/v1/groups/survivor/stats", None)?;
        let main = stats
            .containers
            .iter()
            .find(|c| c.name == "main")
            .context("no main")?;
        ensure!(
            stats.vmm_rss_kib > 0
                && stats.vmm_overhead_kib > 0
                && stats.vmm_overhead_kib < stats.vmm_rss_kib
                && main.memory_bytes > 0
                && main.pids >= 1,
            "{stats:?}"
        );
        Ok(format!(
            "VMM {} KiB ({} KiB its own), main {} bytes, {} pids",
            stats.vmm_rss_kib, stats.vmm_overhead_kib, main.memory_bytes, main.pids
        ))
    });
    s.check("exec runs in it, with its output and exit code", || {
        d.capsa(&["exec", "survivor", "--", "sh", "-c", "echo in-exec; exit 4"])?
            .exited_with(4, &["in-exec"])
    });
    s.check(
        "exec -it runs on a pty, with the terminal's size and its exit code",
        || {
            let script = b"stty size; [ -t 0 ] && echo on-a-terminal; exit 3\n";
            let out = d.capsa_with(&["exec", "-it", "survivor", "--", "sh"], Some(script))?;
            ensure!(out.code == Some(3), "{}", out.describe());
            ensure!(
                out.stdout.contains("on-a-terminal") && out.stdout.contains("24 80"),
                "{}",
                out.describe()
            );
            Ok(out.describe())
        },
    );
    s.check("it sees the adopted container exit", || {
        let exit = d.wait("survivor", "main")?;
        ensure!(exit.exit_code == 7, "{exit:?}");
        Ok("exit 7".into())
    });
    s.check(
        "its log has the output from before, during and after the restart",
        || {
            // Exactly once: none lost, none twice.
            let beats: Vec<String> = d
                .log_lines("survivor", "main")?
                .into_iter()
                .filter(|l| l.starts_with("beat-"))
                .collect();
            let want: Vec<String> = (1..=15).map(|i| format!("beat-{i}")).collect();
            ensure!(beats == want, "{beats:?}");
            Ok("beat-1 to beat-15, each once".into())
        },
    );
    exits(d, &["rm", "survivor"], 0)?;
    Ok(())
}

fn network(s: &mut Suite, d: &Capsad) -> Result<()> {
    let web = d.capsa(&[
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        "127.0.0.1:18080:80",
        "busybox",
        "sh",
        "-c",
        "mkdir -p /www && echo served-by-web > /www/index.html && exec httpd -f -p 80 -h /www",
    ])?;
    ensure!(web.code == Some(0), "run -d web: {}", web.describe());
    s.check("a group gets an address on the daemon's bridge", || {
        let view = d.group("web")?;
        let ip = view.ip.context("no address")?;
        ensure!(
            view.status == GroupStatus::Running && ip.octets()[..3] == [10, 88, 0],
            "{view:?}"
        );
        Ok(ip.to_string())
    });
    s.check(
        "a published port serves the group's httpd to the host",
        || {
            let mut last = String::new();
            for _ in 0..60 {
                let run = d.curl("http://127.0.0.1:18080/")?;
                if run.status == Some(0) && run.stdout.trim() == "served-by-web" {
                    return Ok("served-by-web".into());
                }
                last = run.tail(3);
                std::thread::sleep(Duration::from_millis(500));
            }
            anyhow::bail!("no page: {last}")
        },
    );
    s.check("a port already published is refused", || {
        let out = d.capsa(&[
            "run",
            "-d",
            "--name",
            "web2",
            "-p",
            "127.0.0.1:18080:80",
            "busybox",
            "true",
        ])?;
        ensure!(out.code == Some(125), "{}", out.describe());
        expect_error(d.group("web2"), ErrorCode::NotFound)?;
        Ok(out.stderr.trim().to_string())
    });
    s.check("another group reaches it by its name", || {
        d.capsa(&[
            "run",
            "--rm",
            "--name",
            "client",
            "busybox",
            "sh",
            "-c",
            "echo \"wget-got=$(wget -q -O - http://web/)\"",
        ])?
        .exited_with(0, &["wget-got=served-by-web"])
    });
    s.check("/metrics has the group's series", || {
        let mut text = Vec::new();
        d.client()?.stream("/metrics", |c| {
            text.extend_from_slice(c);
            Ok(())
        })?;
        metrics::check_web(&String::from_utf8_lossy(&text))
    });
    exits(d, &["stop", "web"], 0)?;
    exits(d, &["rm", "web"], 0)?;
    Ok(())
}

fn container<'a>(view: &'a GroupView, name: &str) -> Result<&'a capsa_api::ContainerView> {
    view.containers
        .iter()
        .find(|c| c.name == name)
        .with_context(|| format!("no container {name}"))
}

fn restarts(s: &mut Suite, d: &Capsad) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let out = d.capsa(args)?;
        ensure!(out.code == Some(0), "{args:?}: {}", out.describe());
        Ok(())
    };
    // A VMM that dies unasked fails its group; OnFailure boots it again.
    run(&[
        "run",
        "-d",
        "--name",
        "crashy",
        "--restart",
        "on-failure",
        "busybox",
        "sleep",
        "600",
    ])?;
    let vmm = d.group("crashy")?.vmm_pid.context("crashy has no VMM")?;
    // SAFETY: kill(2) with a PID and a signal number touches no memory.
    unsafe { libc::kill(vmm as i32, libc::SIGKILL) };
    run(&[
        "run",
        "-d",
        "--name",
        "flaky",
        "--restart",
        "on-failure",
        "busybox",
        "sh",
        "-c",
        "echo attempt; exit 1",
    ])?;
    run(&[
        "run",
        "-d",
        "--name",
        "once",
        "--restart",
        "never",
        "busybox",
        "sh",
        "-c",
        "echo once; exit 1",
    ])?;
    run(&["create", "-f", &d.fixture("probed.yaml").to_string_lossy()])?;
    run(&["start", "probed"])?;
    // Back-off of 1, 2, 4 s between attempts.
    std::thread::sleep(Duration::from_secs(12));
    s.check(
        "OnFailure restarts a failing container, with back-off, counted",
        || {
            let view = d.group("flaky")?;
            let main = container(&view, "main")?;
            ensure!(main.restart_count >= 2, "{main:?}");
            let attempts = d
                .log_lines("flaky", "main")?
                .iter()
                .filter(|l| *l == "attempt")
                .count();
            ensure!(attempts >= 3, "{attempts} attempts");
            Ok(format!(
                "{} restarts, {attempts} attempts",
                main.restart_count
            ))
        },
    );
    s.check("Never leaves it exited after one run", || {
        let view = d.group("once")?;
        let main = container(&view, "main")?;
        ensure!(
            main.status == ContainerStatus::Exited
                && main.exit_code == Some(1)
                && main.restart_count == 0,
            "{main:?}"
        );
        let runs = d
            .log_lines("once", "main")?
            .iter()
            .filter(|l| *l == "once")
            .count();
        ensure!(runs == 1, "{runs} runs");
        Ok("exited 1, once".into())
    });
    s.check(
        "a VMM killed under OnFailure: the group is booted again",
        || {
            let view = d.group("crashy")?;
            ensure!(
                view.restart_count >= 1 && view.status == GroupStatus::Running,
                "{view:?}"
            );
            d.has_event("crashy", None, "restarted")
                .context("no restarted event")?;
            Ok(format!("{} restart(s)", view.restart_count))
        },
    );
    s.check(
        "a failing liveness probe kills the container and it is restarted",
        || {
            // The probe's failures take their periods: on a slow machine
            // the checks before may not have taken as long.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
            let view = loop {
                let view = d.group("probed")?;
                let restarted = container(&view, "app")?.restart_count >= 1;
                if restarted || std::time::Instant::now() > deadline {
                    break view;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            };
            let app = container(&view, "app")?;
            ensure!(app.restart_count >= 1, "{app:?}");
            d.has_event("probed", Some("app"), "unhealthy")
                .context("no unhealthy event")?;
            Ok(format!("{} restart(s)", app.restart_count))
        },
    );
    s.check("events: restarts, counted", || {
        let restarted = d
            .has_event("flaky", Some("main"), "restarted")
            .context("no restarted event")?;
        ensure!(
            restarted.detail.as_deref() == Some("restart 1"),
            "{restarted:?}"
        );
        Ok("restart 1".into())
    });
    run(&["stop", "flaky"])?;
    run(&["rm", "flaky", "once"])?;
    run(&["stop", "-t", "1", "crashy"])?;
    run(&["rm", "crashy"])?;
    run(&["stop", "-t", "1", "probed"])?;
    run(&["rm", "probed"])
}

fn volumes(s: &mut Suite, d: &Capsad) -> Result<()> {
    exits(d, &["volume", "create", "data", "--size", "16"], 0)?;
    s.check("a file written to a persistent volume", || {
        exits(
            d,
            &[
                "run",
                "--rm",
                "-v",
                "data:/data",
                "busybox",
                "sh",
                "-c",
                "echo kept-across-groups > /data/file",
            ],
            0,
        )
    });
    let holder = d.capsa(&[
        "run",
        "-d",
        "--name",
        "holder",
        "-v",
        "data:/data",
        "busybox",
        "sleep",
        "60",
    ])?;
    ensure!(
        holder.code == Some(0),
        "run -d holder: {}",
        holder.describe()
    );
    s.check(
        "a volume attached read-write to a running group is refused to a second",
        || {
            let spec = serde_json::json!({
                "name": "second",
                "volumes": [{"name": "data", "persistent": {"volume": "data"}}],
                "containers": [{"name": "main", "image": "busybox", "args": ["true"],
                                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]
            });
            d.create(spec)?;
            let error = expect_error(
                d.start_group("second", &mut Vec::new()),
                ErrorCode::Conflict,
            );
            d.delete("second")?;
            Ok(error?.message)
        },
    );
    s.check("and cannot be removed meanwhile", || {
        let removed =
            d.client()?
                .call::<serde_json::Value>(Method::DELETE, "/v1/volumes/data", None);
        Ok(expect_error(removed, ErrorCode::Conflict)?.message)
    });
    exits(d, &["stop", "-t", "1", "holder"], 0)?;
    exits(d, &["rm", "holder"], 0)?;
    s.check("it survives its group and is read by a new one", || {
        d.capsa(&[
            "run",
            "--rm",
            "-v",
            "data:/data:ro",
            "busybox",
            "cat",
            "/data/file",
        ])?
        .exited_with(0, &["kept-across-groups"])
    });
    exits(
        d,
        &["create", "-f", &d.fixture("shared.yaml").to_string_lossy()],
        0,
    )?;
    exits(d, &["start", "shared"], 0)?;
    s.check(
        "an emptyDir is shared by two containers, and a secret is readable with mode 0400",
        || {
            let exit = d.wait("shared", "reader")?;
            let lines = d.log_lines("shared", "reader")?;
            ensure!(exit.exit_code == 0, "{exit:?}: {lines:?}");
            ensure!(
                lines == ["from-writer", "secret-mode=400", "secret=s3cret"],
                "{lines:?}"
            );
            Ok(lines.join(", "))
        },
    );
    exits(d, &["rm", "shared"], 0)?;
    s.check(
        "a volume grows: its file on the host, its file system in the guest at the next mount, keeping its data (no e2fsck or resize2fs on the host)",
        || {
            exits(d, &["volume", "grow", "data", "--size", "32m"], 0)?;
            let out = d.capsa(&[
                "run",
                "--rm",
                "-v",
                "data:/data",
                "busybox",
                "sh",
                "-c",
                "cat /data/file; df -k /data | tail -1",
            ])?;
            let lines = out.lines();
            let total_kib: u64 = lines
                .get(1)
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
                .with_context(|| out.describe())?;
            ensure!(
                out.code == Some(0) && lines[0] == "kept-across-groups" && total_kib > 24 << 10,
                "{}",
                out.describe()
            );
            exits(d, &["volume", "ls"], 0)?;
            exits(d, &["volume", "rm", "data"], 0)?;
            Ok(format!("{total_kib} KiB after growing to 32 MiB from 16"))
        },
    );
    Ok(())
}
