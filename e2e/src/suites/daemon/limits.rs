//! Host limits on each VM (issue 16): its VMM runs in a cgroup v2 of its
//! own that holds it to its memory, CPU limit and thread count, and that goes
//! with the VM; it is jailed, every thread of it is under its seccomp
//! filter, and a VMM that filter kills fails its group with the reason. Sizes beyond the
//! daemon's maxima or the host's budget are refused.

use anyhow::{ensure, Context, Result};

use super::harness::{cgroup_parent, send_signal, Capsad};
use super::jail;
use crate::suite::Suite;

fn read(dir: &std::path::Path, file: &str) -> Result<String> {
    let path = dir.join(file);
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_string())
}

pub fn run(s: &mut Suite, d: &mut Capsad) -> Result<()> {
    // A small VM: a nested guest filling much memory is what sets the
    // emulated outer machine off most (README, "Hosts with PVM").
    let run = d.capsa(&[
        "run", "-d", "--name", "sized", "--cpus", "1", "--memory", "128m", "busybox", "sleep",
        "300",
    ])?;
    ensure!(run.code == Some(0), "run -d sized: {}", run.describe());
    let dir = cgroup_parent().join("sized");
    s.check(
        "the VMM runs in a cgroup of its own: memory.max its memory plus 128 MiB, no swap, cpu.max its vCPUs, pids.max 128",
        || {
            let pid = d.group("sized")?.vmm_pid.context("no VMM pid")?;
            let cgroup = capsa_cgroup::of_process(pid).context("no cgroup")?;
            ensure!(cgroup == "/capsa/sized", "{cgroup}");
            let files = [
                ("memory.max", ((128 + 128) << 20).to_string()),
                ("memory.swap.max", "0".to_string()),
                ("cpu.max", "100000 100000".to_string()),
                ("pids.max", "128".to_string()),
            ];
            for (file, want) in &files {
                let value = read(&dir, file)?;
                ensure!(&value == want, "{file} is {value}, not {want}");
            }
            Ok(format!("{cgroup}: {files:?}"))
        },
    );
    s.check(
        "a guest that allocates more than its memory stays under memory.max: the guest's OOM killer acts, the VM lives",
        || {
            let out = d.capsa(&[
                "exec", "sized", "--", "sh", "-c",
                "head -c 200m /dev/zero | tail > /dev/null; echo after",
            ])?;
            let view = d.group("sized")?;
            let max: u64 = read(&dir, "memory.max")?.parse()?;
            let peak: u64 = read(&dir, "memory.peak")?.parse()?;
            let events = read(&dir, "memory.events")?;
            let host_oom = events
                .lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .unwrap_or("0");
            ensure!(
                view.status == capsa_api::GroupStatus::Running && peak <= max && host_oom == "0",
                "{view:?}; peak {peak}, max {max}; {events}; exec: {}",
                out.describe()
            );
            Ok(format!(
                "VMM peak {} MiB of {} MiB; exec: {}",
                peak >> 20,
                max >> 20,
                out.describe()
            ))
        },
    );
    s.check(
        "every thread of the jailed VMM (both processes): Seccomp 2, the group's own non-zero uid and gid, no capabilities, no new privileges, the empty jail as root, only its own descriptors",
        || {
            let pid = d.group("sized")?.vmm_pid.context("no VMM pid")?;
            // capsad's state is ROOT (the suite's work directory's root/).
            let root = d.root().join("root");
            let group = root.join("groups/sized");
            jail::inspect(pid, &group.join("jail"), &group, &root)
        },
    );
    s.check(
        "a VMM killed by SIGSYS (what its filter does to a forbidden call) fails its group with that reason",
        || {
            let run = d.capsa(&["run", "-d", "--name", "sigsys", "busybox", "sleep", "300"])?;
            ensure!(run.code == Some(0), "run -d sigsys: {}", run.describe());
            let pid = d.group("sigsys")?.vmm_pid.context("no VMM pid")?;
            send_signal(pid, libc::SIGSYS)?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let view = loop {
                let view = d.group("sigsys")?;
                if view.status != capsa_api::GroupStatus::Running
                    || std::time::Instant::now() > deadline
                {
                    break view;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            };
            let removed = d.capsa(&["rm", "sigsys"])?;
            let error = view.error.clone().unwrap_or_default();
            ensure!(
                view.status == capsa_api::GroupStatus::Failed && error.contains("seccomp"),
                "{view:?}"
            );
            ensure!(removed.code == Some(0), "rm: {}", removed.describe());
            Ok(error.lines().next().unwrap_or_default().to_string())
        },
    );
    s.check(
        "a CPU-bound guest is held to its cpu.max: a VM run with --cpus 0.5 uses at most 0.55 of a host CPU, and at least 0.3",
        || {
            let spin = "i=0; while [ $i -lt 200000000 ]; do i=$((i+1)); done";
            let run = d.capsa(&[
                "run", "-d", "--name", "spinner", "--cpus", "0.5", "--memory", "0.125g",
                "busybox", "sh", "-c", spin,
            ])?;
            ensure!(run.code == Some(0), "run -d spinner: {}", run.describe());
            let measured = (|| {
                let dir = cgroup_parent().join("spinner");
                let max = read(&dir, "cpu.max")?;
                ensure!(max == "50000 100000", "cpu.max is {max}");
                let usage = || -> Result<u64> {
                    read(&dir, "cpu.stat")?
                        .lines()
                        .find_map(|l| l.strip_prefix("usage_usec "))
                        .and_then(|v| v.parse().ok())
                        .context("no usage_usec in cpu.stat")
                };
                // The loop under way first.
                std::thread::sleep(std::time::Duration::from_secs(3));
                let (used, began) = (usage()?, std::time::Instant::now());
                std::thread::sleep(std::time::Duration::from_secs(10));
                let share = (usage()? - used) as f64 / 1e6 / began.elapsed().as_secs_f64();
                ensure!((0.3..=0.55).contains(&share), "the VMM used {share:.2} of a CPU");
                Ok(format!("cpu.max {max}: the VMM used {share:.2} of a CPU over 10 s"))
            })();
            let removed = d.capsa(&["rm", "spinner"])?;
            ensure!(removed.code == Some(0), "rm spinner: {}", removed.describe());
            measured
        },
    );
    s.check(
        "a disk rate limit holds: a guest writing flat out under 2 MiB/s gets its disk 1.8 to 2.2 MiB/s, as the VMM's own write counter shows",
        || {
            let spec = serde_json::json!({"name": "throttled", "memoryMib": 128,
                "diskRateLimit": {"bytesPerSec": 2 << 20, "burstMs": 100},
                "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "300"]}]});
            let client = d.client()?;
            let _: capsa_api::GroupView =
                client.call(hyper::Method::POST, "/v1/groups", Some(spec.to_string()))?;
            let measured = (|| {
                let _: capsa_api::GroupView =
                    client.call(hyper::Method::POST, "/v1/groups/throttled/start", None)?;
                disk_rate(d, &client)
            })();
            let _: serde_json::Value =
                client.call(hyper::Method::DELETE, "/v1/groups/throttled", None)?;
            let (rate, limit) = measured?;
            ensure!(
                limit.and_then(|l| l.bytes_per_sec) == Some(2 << 20),
                "stats show {limit:?}"
            );
            ensure!((1.8..=2.2).contains(&rate), "{rate:.2} MiB/s");
            Ok(format!("{rate:.2} MiB/s; stats report the limit"))
        },
    );
    let mut maximum = None;
    s.check(
        "a VM larger than the daemon allows is refused at create, naming the field and the maximum",
        || {
            let out = d.capsa(&["run", "--rm", "--memory", "1000000", "busybox", "true"])?;
            let at = out
                .stderr
                .find("memoryMib: 1000000 is above this daemon's maximum of ")
                .with_context(|| out.describe())?;
            let rest = &out.stderr[at..];
            let number: String = rest
                .trim_start_matches("memoryMib: 1000000 is above this daemon's maximum of ")
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            maximum = Some(number.parse::<u64>()?);
            ensure!(out.code != Some(0), "{}", out.describe());
            Ok(out.stderr.trim().to_string())
        },
    );
    if let Some(maximum) = maximum {
        s.check(
            "a start beyond the host's memory budget is refused, not overcommitted",
            || {
                let spec = serde_json::json!({"name": "big", "memoryMib": maximum, "containers": [
                    {"name": "main", "image": "busybox", "command": ["true"]}]});
                let client = d.client()?;
                let _: capsa_api::GroupView =
                    client.call(hyper::Method::POST, "/v1/groups", Some(spec.to_string()))?;
                let started = client.call::<capsa_api::GroupView>(
                    hyper::Method::POST,
                    "/v1/groups/big/start",
                    None,
                );
                let _: serde_json::Value =
                    client.call(hyper::Method::DELETE, "/v1/groups/big", None)?;
                let e = match started {
                    Ok(view) => anyhow::bail!("started: {view:?}"),
                    Err(e) => e,
                };
                let message = e
                    .downcast_ref::<capsa_api::ApiError>()
                    .map(|e| e.message.clone())
                    .unwrap_or_else(|| format!("{e:#}"));
                ensure!(message.contains("not enough host memory"), "{message}");
                Ok(message)
            },
        );
    }
    let removed = d.capsa(&["rm", "sized"])?;
    ensure!(removed.code == Some(0), "rm sized: {}", removed.describe());
    s.check("its cgroup goes with the VM", || {
        ensure!(!dir.exists(), "{} is still there", dir.display());
        Ok(format!("{} removed", dir.display()))
    });
    Ok(())
}

/// The disk rate a guest gets while it writes 16 MiB with `fsync`: the
/// VMM's written bytes (its stats, from the host's own I/O counters)
/// sampled while they grow, over the samples strictly between the first
/// and the last figure (the writes' start and end are not steady), in
/// MiB/s; with the limit the stats report.
fn disk_rate(
    d: &Capsad,
    client: &capsa_cli::client::Client,
) -> Result<(f64, Option<capsa_api::RateLimitSpec>)> {
    let began = std::time::Instant::now();
    let sample = || -> Result<(f64, u64, Option<capsa_api::RateLimitSpec>)> {
        let before = began.elapsed().as_secs_f64();
        let stats: capsa_api::GroupStats =
            client.call(hyper::Method::GET, "/v1/groups/throttled/stats", None)?;
        let at = (before + began.elapsed().as_secs_f64()) / 2.0;
        Ok((at, stats.block_write_bytes, stats.disk_rate_limit))
    };
    let (samples, written) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            d.capsa(&[
                "exec",
                "throttled",
                "--",
                "sh",
                "-c",
                "dd if=/dev/zero of=/written bs=1M count=16 conv=fsync 2>/dev/null",
            ])
        });
        let mut samples = Vec::new();
        // Bounded: 16 MiB at 2 MiB/s is 8 s.
        while !writer.is_finished() && began.elapsed() < std::time::Duration::from_secs(120) {
            samples.push(sample());
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        (samples, writer.join())
    });
    let written = written.map_err(|_| anyhow::anyhow!("the writer thread panicked"))??;
    ensure!(written.code == Some(0), "dd: {}", written.describe());
    let samples = samples.into_iter().collect::<Result<Vec<_>>>()?;
    let limit = samples.last().and_then(|s| s.2);
    let (low, high) = match (samples.first(), samples.last()) {
        (Some(first), Some(last)) => (first.1, last.1),
        _ => anyhow::bail!("no stats sampled while the guest wrote"),
    };
    let steady: Vec<(f64, u64)> = samples
        .iter()
        .filter(|s| s.1 > low && s.1 < high)
        .map(|s| (s.0, s.1))
        .collect();
    let (Some(first), Some(last)) = (steady.first(), steady.last()) else {
        anyhow::bail!("the written bytes never grew steadily ({low} to {high})");
    };
    ensure!(
        last.0 - first.0 >= 2.0,
        "the writes were steady for only {:.1} s ({} samples, {low} to {high} bytes)",
        last.0 - first.0,
        samples.len()
    );
    let rate = (last.1 - first.1) as f64 / (last.0 - first.0) / f64::from(1 << 20);
    Ok((rate, limit))
}
