//! The agent's container scenarios, run against a booted guest with a
//! busybox OCI image: output and exit codes, signals, stdin, exec, TTY,
//! memory limits, localhost between containers, isolation, bad requests
//! and corrupt layers; each is a check of the agent suite.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use capsa_guest_client::{ExitInfo, Guest, OciImage, Streams};
use capsa_protocol::stdio::{ack, Resume, StreamKind};
use oci_spec::runtime::{LinuxBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, Spec};

use crate::suite::Suite;

/// Runs against the guest and says what it saw.
type Scenario = fn(&Check) -> Result<String>;

pub(super) struct Check<'a> {
    pub(super) guest: &'a Guest,
    pub(super) image: OciImage,
    pub(super) chain: String,
    pub(super) options: Options,
}

/// A network interface the guest has, for the sandbox scenario to
/// configure: its MAC, and the host's address on the other end of it
/// (`10.0.3.1/24` gives the guest `10.0.3.2/24`).
#[derive(Debug, Clone)]
pub struct Nic {
    pub mac: String,
    pub host_address: std::net::Ipv4Addr,
}

/// What the guest has beyond vsock, for the sandbox scenario to use.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub nic: Option<Nic>,
    /// The serial (`--disk PATH,id=SERIAL`) of an empty ext4 disk.
    pub ext4_disk: Option<String>,
}

/// Sends the image in `layout` to the guest, runs every scenario as a
/// check of `suite`, and leaves a container running for the guest's
/// shutdown to stop.
pub fn run(suite: &mut Suite, guest: &Guest, layout: &Path, options: Options) -> Result<()> {
    let image = OciImage::open(layout, None)?;
    let started = Instant::now();
    let chain = guest.push_image(&image).context("sending the image")?;
    suite.verdict(
        "push-image",
        true,
        format!(
            "{} layer(s) in {} ms, chain {chain}",
            image.layers.len(),
            started.elapsed().as_millis()
        ),
    );
    let check = Check {
        guest,
        image,
        chain,
        options,
    };
    let scenarios: &[(&str, Scenario)] = &[
        ("image-shared", image_is_shared),
        // First: the containers after it get the sandbox's files.
        ("sandbox", super::sandbox::sandbox),
        ("hello", hello),
        ("exit-code", exit_code),
        ("sigkill", sigkill),
        ("fast-exit-output", fast_exit_output),
        ("reattach", reattach_resends_unacknowledged),
        ("stdin", stdin_reaches_the_process),
        ("exec", exec_shares_the_container),
        ("tty", tty_resize),
        ("oom", memory_limit),
        ("limits", cpu_and_pids_limits),
        ("localhost", containers_share_localhost),
        ("isolation", isolation),
        ("bad-requests", super::refusals::bad_requests),
        ("corrupt-layer", super::refusals::corrupt_layer),
    ];
    for (name, scenario) in scenarios {
        suite.check(name, || {
            scenario(&check).map_err(crate::suite::unanswered_is_fault)
        });
    }
    // Shutdown must stop what still runs: leave a container running.
    check.guest.create(
        "lingering",
        &check.chain,
        &check.spec(&["sleep", "600"])?,
        Streams::default(),
    )?;
    check.guest.start("lingering")?;
    Ok(())
}

impl Check<'_> {
    pub(super) fn spec(&self, args: &[&str]) -> Result<Spec> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Ok(self.image.spec(Some(&args))?)
    }

    /// Creates `id`, attaches its output, starts it and returns what it
    /// printed and how it exited; the container is deleted after.
    pub(super) fn run(&self, id: &str, spec: &Spec) -> Result<(String, String, ExitInfo)> {
        self.guest.create(id, &self.chain, spec, Streams::OUTPUT)?;
        let result = self.run_created(id);
        self.guest.delete(id)?;
        result
    }

    pub(super) fn run_created(&self, id: &str) -> Result<(String, String, ExitInfo)> {
        let stdout = self.guest.attach(id, "", StreamKind::Stdout)?;
        let stderr = self.guest.attach(id, "", StreamKind::Stderr)?;
        self.guest.start(id)?;
        let (stdout, stderr) = read_both(stdout, stderr)?;
        let exit = self.guest.wait(id, "")?;
        Ok((stdout, stderr, exit))
    }
}

pub(super) fn read_both(stdout: UnixStream, stderr: UnixStream) -> Result<(String, String)> {
    let reader = std::thread::spawn(move || read_to_string(stderr));
    let out = read_to_string(stdout)?;
    let err = reader
        .join()
        .map_err(|_| anyhow!("stderr reader panicked"))??;
    Ok((out, err))
}

pub(super) fn read_to_string(mut stream: UnixStream) -> Result<String> {
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

fn image_is_shared(check: &Check) -> Result<String> {
    let started = Instant::now();
    let again = check.guest.push_image(&check.image)?;
    ensure!(again == check.chain, "chain {again} the second time");
    Ok(format!("second push {} ms", started.elapsed().as_millis()))
}

fn hello(check: &Check) -> Result<String> {
    let (out, err, exit) = check.run("hello", &check.spec(&["echo", "hello"])?)?;
    ensure!(
        out == "hello\n" && exit.code == 0,
        "stdout {out:?}, stderr {err:?}, {exit:?}"
    );
    Ok("stdout \"hello\"".into())
}

fn exit_code(check: &Check) -> Result<String> {
    let (_, err, exit) = check.run("exit42", &check.spec(&["sh", "-c", "exit 42"])?)?;
    ensure!(
        exit.code == 42 && exit.signal == 0,
        "{exit:?}, stderr {err:?}"
    );
    Ok("42".into())
}

fn sigkill(check: &Check) -> Result<String> {
    let id = "killed";
    check.guest.create(
        id,
        &check.chain,
        &check.spec(&["sleep", "600"])?,
        Streams::default(),
    )?;
    check.guest.start(id)?;
    check.guest.signal(id, "", 9)?;
    let exit = check.guest.wait(id, "")?;
    check.guest.delete(id)?;
    ensure!(
        exit.signal == 9 && exit.code == 137 && !exit.oom_killed,
        "{exit:?}"
    );
    Ok("signal 9".into())
}

fn fast_exit_output(check: &Check) -> Result<String> {
    let spec = check.spec(&["sh", "-c", "seq 1 50000; echo done >&2"])?;
    let (out, err, exit) = check.run("burst", &spec)?;
    let lines = out.lines().count();
    ensure!(
        lines == 50000 && out.ends_with("50000\n") && err == "done\n" && exit.code == 0,
        "{lines} lines, stderr {err:?}, {exit:?}"
    );
    Ok(format!("{} bytes", out.len()))
}

/// A host that drops an acked output stream and attaches again gets the
/// stream from the offset it says it kept, whether or not its
/// acknowledgement of that arrived, and nothing before: exactly once. A
/// host that names another stream gets all that was not acknowledged.
fn reattach_resends_unacknowledged(check: &Check) -> Result<String> {
    let id = "reattach";
    let spec = check.spec(&["sh", "-c", "seq 1 2000; sleep 1; seq 2001 3000"])?;
    check
        .guest
        .create(id, &check.chain, &spec, Streams::OUTPUT)?;
    let upto = |last: usize| (1..=last).map(|i| format!("{i}\n")).collect::<String>();
    let result = (|| {
        let mut first = check
            .guest
            .attach_acked(id, "", StreamKind::Stdout, Resume::default())?;
        let stderr = check.guest.attach(id, "", StreamKind::Stderr)?;
        check.guest.start(id)?;
        let preamble = Resume::read_from(&mut first)?;
        ensure!(preamble.offset == 0, "a new stream starts at {preamble:?}");
        let mut seen = Vec::new();
        read_until(&mut first, &mut seen, "\n100\n")?;
        ensure!(
            seen.starts_with(upto(100).as_bytes()),
            "first connection: {seen:?}"
        );
        // Acknowledge lines 1-50; the host then wrote up to line 80 and
        // died before acknowledging those.
        ack(&mut first, upto(50).len() as u64)?;
        std::thread::sleep(Duration::from_millis(200));
        drop(first);
        let kept = Resume {
            stream_id: preamble.stream_id,
            offset: upto(80).len() as u64,
        };
        let mut second = check.guest.attach_acked(id, "", StreamKind::Stdout, kept)?;
        let resumed = Resume::read_from(&mut second)?;
        ensure!(resumed == kept, "resumed at {resumed:?}, asked {kept:?}");
        // Another stream's offset means nothing here: everything held (all
        // after what the host said it kept) comes again.
        let mut seen = Vec::new();
        read_until(&mut second, &mut seen, "\n100\n")?;
        drop(second);
        let stranger = Resume {
            stream_id: preamble.stream_id ^ 1,
            offset: 1 << 40,
        };
        let mut third = check
            .guest
            .attach_acked(id, "", StreamKind::Stdout, stranger)?;
        let start = Resume::read_from(&mut third)?;
        ensure!(
            start.offset == kept.offset,
            "a stranger's resume started at {start:?}"
        );
        let mut rest = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let n = third.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&buffer[..n]);
            ack(&mut third, start.offset + rest.len() as u64)?;
        }
        let err = read_to_string(stderr)?;
        let exit = check.guest.wait(id, "")?;
        // A host attaching once the stream has ended (a daemon restarted
        // then) is told where it ended, and the stream ends.
        let mut late = check.guest.attach_acked(id, "", StreamKind::Stdout, kept)?;
        late.set_read_timeout(Some(Duration::from_secs(10)))?;
        let end = Resume::read_from(&mut late)?;
        let mut after = Vec::new();
        late.read_to_end(&mut after)?;
        ensure!(
            end.offset == upto(3000).len() as u64 && after.is_empty(),
            "a late attach got {end:?} and {} bytes",
            after.len()
        );
        let rest = String::from_utf8_lossy(&rest);
        let expected = (81..=3000).map(|i| format!("{i}\n")).collect::<String>();
        ensure!(
            rest == expected && exit.code == 0,
            "{} lines after the re-attach (first {:?}), stderr {err:?}, {exit:?}",
            rest.lines().count(),
            rest.lines().next()
        );
        Ok(
            "resumed at line 81 where the host said it kept 80 (having acknowledged 50), \
            and there again for another stream's offset"
                .to_string(),
        )
    })();
    check.guest.delete(id)?;
    result
}

fn stdin_reaches_the_process(check: &Check) -> Result<String> {
    let id = "stdin";
    let streams = Streams {
        stdin: true,
        ..Streams::OUTPUT
    };
    check
        .guest
        .create(id, &check.chain, &check.spec(&["cat"])?, streams)?;
    let mut input = check.guest.attach(id, "", StreamKind::Stdin)?;
    let stdout = check.guest.attach(id, "", StreamKind::Stdout)?;
    let stderr = check.guest.attach(id, "", StreamKind::Stderr)?;
    check.guest.start(id)?;
    input.write_all(b"ping\n")?;
    // End of input: cat sees EOF and exits.
    input.shutdown(std::net::Shutdown::Write)?;
    let (out, err) = read_both(stdout, stderr)?;
    let exit = check.guest.wait(id, "")?;
    check.guest.delete(id)?;
    ensure!(
        out == "ping\n" && exit.code == 0,
        "stdout {out:?}, stderr {err:?}, {exit:?}"
    );
    Ok("echoed, EOF ended it".into())
}

fn exec_shares_the_container(check: &Check) -> Result<String> {
    let id = "exec";
    let spec = check.spec(&["sh", "-c", "echo shared > /tmp/marker; exec sleep 600"])?;
    check
        .guest
        .create(id, &check.chain, &spec, Streams::default())?;
    check.guest.start(id)?;
    let result = (|| {
        let mut process = spec.process().clone().context("no process")?;
        let mut seen = String::new();
        for attempt in 0..50 {
            let exec_id = format!("look-{attempt}");
            process.set_args(Some(vec![
                "sh".into(),
                "-c".into(),
                "cat /tmp/marker && cat /proc/1/cmdline | tr '\\0' ' ' && echo && echo pid=$$"
                    .into(),
            ]));
            check.guest.exec(id, &exec_id, &process, Streams::OUTPUT)?;
            let stdout = check.guest.attach(id, &exec_id, StreamKind::Stdout)?;
            let stderr = check.guest.attach(id, &exec_id, StreamKind::Stderr)?;
            let (out, err) = read_both(stdout, stderr)?;
            let exit = check.guest.wait(id, &exec_id)?;
            seen = format!("{out}{err}{exit:?}");
            if exit.code == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let lines: Vec<&str> = seen.lines().collect();
        ensure!(
            lines.first() == Some(&"shared")
                && lines.get(1) == Some(&"sleep 600 ")
                && lines.len() == 4,
            "exec saw {seen:?}"
        );
        let pid: u32 = lines
            .get(2)
            .and_then(|l| l.strip_prefix("pid="))
            .and_then(|p| p.parse().ok())
            .context("no pid line")?;
        ensure!(pid > 1, "exec pid {pid}");
        let pids = check.guest.processes(id)?;
        ensure!(pids == vec![1], "processes {pids:?}");
        let stats = check.guest.stats(id)?;
        ensure!(
            stats.pids_current >= 1 && stats.memory_current_bytes > 0,
            "stats {stats:?}"
        );
        Ok(format!(
            "file and PID 1 shared, exec pid {pid}; stats: {} KiB, {} pids",
            stats.memory_current_bytes / 1024,
            stats.pids_current
        ))
    })();
    check.guest.delete(id)?;
    result
}

fn tty_resize(check: &Check) -> Result<String> {
    let id = "tty";
    let mut spec = check.spec(&["sh", "-c", "stty size; read line; stty size"])?;
    let mut process = spec.process().clone().context("no process")?;
    process.set_terminal(Some(true));
    spec.set_process(Some(process));
    let streams = Streams {
        stdin: true,
        stdout: true,
        stderr: false,
    };
    check.guest.create(id, &check.chain, &spec, streams)?;
    let result = (|| {
        let mut input = check.guest.attach(id, "", StreamKind::Stdin)?;
        let mut output = check.guest.attach(id, "", StreamKind::Stdout)?;
        check.guest.start(id)?;
        let mut seen = Vec::new();
        read_until(&mut output, &mut seen, "24 80")?;
        check.guest.resize(id, "", 40, 100)?;
        input.write_all(b"go\n")?;
        read_until(&mut output, &mut seen, "40 100")?;
        let exit = check.guest.wait(id, "")?;
        ensure!(exit.code == 0, "{exit:?}");
        Ok("24 80, then 40 100".to_string())
    })();
    check.guest.delete(id)?;
    result
}

fn read_until(stream: &mut UnixStream, seen: &mut Vec<u8>, wanted: &str) -> Result<()> {
    let mut buffer = [0u8; 256];
    while !String::from_utf8_lossy(seen).contains(wanted) {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            bail!(
                "terminal ended before {wanted:?}: {:?}",
                String::from_utf8_lossy(seen)
            );
        }
        seen.extend_from_slice(&buffer[..n]);
    }
    Ok(())
}

fn memory_limit(check: &Check) -> Result<String> {
    let limit: i64 = 16 * 1024 * 1024;
    // Bounded (48 MiB, three times the limit), so that a limit that did
    // not hold would show as a clean exit rather than exhaust the guest.
    // Small, too: under emulated nested paging, a guest touching memory
    // fast has been seen to bring the outer machine down (README).
    let script = "cat /sys/fs/cgroup/memory.max; x=$(head -c 50331648 /dev/zero | tr '\\0' a); echo survived";
    let mut spec = check.spec(&["sh", "-c", script])?;
    let resources = LinuxResourcesBuilder::default()
        .memory(LinuxMemoryBuilder::default().limit(limit).build()?)
        .build()?;
    with_resources(&mut spec, resources)?;
    let (out, err, exit) = check.run("oom", &spec)?;
    ensure!(
        out.lines().next() == Some(limit.to_string().as_str()),
        "memory.max in the container: {out:?}, stderr {err:?}"
    );
    ensure!(
        exit.oom_killed && exit.signal == 9,
        "{exit:?}, stdout {out:?}, stderr {err:?}"
    );
    Ok("OOM-killed at 16 MiB and reported".into())
}

fn with_resources(spec: &mut Spec, resources: oci_spec::runtime::LinuxResources) -> Result<()> {
    let mut linux = spec
        .linux()
        .clone()
        .unwrap_or(LinuxBuilder::default().build()?);
    linux.set_resources(Some(resources));
    spec.set_linux(Some(linux));
    Ok(())
}

fn cpu_and_pids_limits(check: &Check) -> Result<String> {
    use oci_spec::runtime::{LinuxCpuBuilder, LinuxPidsBuilder};
    let script = "cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max; \
                  i=0; while [ $i -lt 12 ]; do sleep 2 & i=$((i+1)); done; wait";
    let mut spec = check.spec(&["sh", "-c", script])?;
    let resources = LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(6).build()?)
        .cpu(
            LinuxCpuBuilder::default()
                .quota(50_000i64)
                .period(100_000u64)
                .build()?,
        )
        .build()?;
    with_resources(&mut spec, resources)?;
    let (out, err, exit) = check.run("limits", &spec)?;
    ensure!(
        out == "6\n50000 100000\n",
        "limits in the container: {out:?}, stderr {err:?}"
    );
    ensure!(
        err.contains("fork"),
        "12 children under pids.max 6 all started: {err:?} {exit:?}"
    );
    Ok("pids.max 6 refuses the 7th process, cpu.max 50000 100000".into())
}

fn containers_share_localhost(check: &Check) -> Result<String> {
    let server = check.spec(&[
        "sh",
        "-c",
        "mkdir -p /www && echo from-a > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www",
    ])?;
    check
        .guest
        .create("web", &check.chain, &server, Streams::OUTPUT)?;
    let web_out = check.guest.attach("web", "", StreamKind::Stdout)?;
    let web_err = check.guest.attach("web", "", StreamKind::Stderr)?;
    check.guest.start("web")?;
    let client = check.spec(&[
        "sh",
        "-c",
        "for i in $(seq 100); do wget -q -O - http://127.0.0.1:8080/ && exit 0; sleep 0.1; done; exit 1",
    ])?;
    let result = check.run("client", &client);
    check.guest.delete("web")?;
    let (web_out, web_err) = read_both(web_out, web_err)?;
    let (out, err, exit) = result?;
    let err = format!(
        "{}; the server said {web_out:?} {web_err:?}",
        err.lines().last().unwrap_or("")
    );
    ensure!(
        out == "from-a\n" && exit.code == 0,
        "stdout {out:?}, stderr {err:?}, {exit:?}"
    );
    Ok("b fetched a's page from 127.0.0.1:8080".into())
}

fn isolation(check: &Check) -> Result<String> {
    let script = "ls /proc | grep -c '^[0-9]'; \
                  test -e /init && echo agent-root-visible; \
                  test -e /run/capsa && echo agent-state-visible; \
                  ps -o comm | grep -q capsa-agent && echo agent-visible; \
                  test -s /proc/kcore && echo kcore-not-masked; \
                  (echo 1 > /proc/sys/vm/drop_caches) 2>/dev/null && echo proc-sys-writable; \
                  echo nofile=$(ulimit -n); true";
    let (out, err, exit) = check.run("isolated", &check.spec(&["sh", "-c", script])?)?;
    ensure!(exit.code == 0, "{exit:?}, stderr {err:?}");
    let count: u32 = out
        .lines()
        .next()
        .and_then(|l| l.parse().ok())
        .context("no count")?;
    ensure!(count <= 4, "sees {count} processes: {out:?}");
    ensure!(
        !out.contains("visible") && !out.contains("not-masked") && !out.contains("writable"),
        "{out:?}"
    );
    ensure!(
        out.contains("nofile=1024"),
        "the spec's RLIMIT_NOFILE: {out:?}"
    );
    Ok(format!(
        "{count} processes visible, none of the agent's; /proc/kcore masked, /proc/sys read-only, nofile 1024"
    ))
}
