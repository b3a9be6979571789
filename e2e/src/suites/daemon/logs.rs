//! The `logs` suite: capsad killed with SIGKILL at random moments while a
//! group's containers print (steadily on both streams, and in bursts), and
//! started again each time; every log must then hold exactly what its
//! container printed, in order: no line lost, none twice.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use capsa_api::{ContainerStatus, GroupStatus, GroupView};
use hyper::Method;

use super::harness::Capsad;
use crate::suite::{EmulationFault, Suite};
use crate::vm::TRIPLE_FAULT_TEXT;

/// Kills that must land while the containers are still printing.
pub const KILLS: u32 = 24;
const STEADY_LINES: u32 = 3000;
const BURSTS: u32 = 80;
const BURST_LINES: u32 = 300;
/// How long the containers may take to finish printing after the kills.
const FINISH_PATIENCE: Duration = Duration::from_secs(300);

/// A small xorshift generator: the kills' moments, reproducible from the
/// seed the suite prints.
struct Moments(u64);

impl Moments {
    /// Milliseconds between `low` and `high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        low + self.0 % (high - low + 1)
    }
}

fn spec() -> serde_json::Value {
    let steady = format!(
        "i=1; while [ $i -le {STEADY_LINES} ]; do echo \"out $i\"; echo \"err $i\" >&2; \
         i=$((i+1)); usleep 20000; done"
    );
    let bursts = format!(
        "j=1; while [ $j -le {BURSTS} ]; do seq 1 {BURST_LINES} | sed \"s/^/b$j./\"; \
         j=$((j+1)); sleep 1; done"
    );
    serde_json::json!({
        "name": "chatty",
        "restartPolicy": "Never",
        "containers": [
            {"name": "steady", "image": "busybox", "command": ["sh", "-c", steady]},
            {"name": "bursts", "image": "busybox", "command": ["sh", "-c", bursts]},
        ],
    })
}

/// The lines of `stream` in a container's log.
fn stream_lines(d: &Capsad, container: &str, stream: &str) -> Result<Vec<String>> {
    Ok(d.logs("chatty", container)?
        .into_iter()
        .filter(|l| l.stream == stream)
        .map(|l| l.line)
        .collect())
}

/// Where `got` first differs from `want`, in words.
fn difference(got: &[String], want: &[String]) -> String {
    let at = got
        .iter()
        .zip(want)
        .position(|(g, w)| g != w)
        .unwrap_or(got.len().min(want.len()));
    format!(
        "{} lines for {}; first difference at line {}: got {:?}, wanted {:?}",
        got.len(),
        want.len(),
        at + 1,
        got.get(at),
        want.get(at)
    )
}

/// A group whose VM failed: the emulation's fault when capsa-vmm said the
/// guest triple-faulted (nested KVM does that now and then), else a
/// failure.
fn failed(d: &Capsad, view: &GroupView) -> anyhow::Error {
    let console = std::fs::read_to_string(d.root().join("root/groups/chatty/console.log"))
        .unwrap_or_default();
    if console.contains(TRIPLE_FAULT_TEXT) {
        return EmulationFault(format!("the group's microVM {TRIPLE_FAULT_TEXT}")).into();
    }
    anyhow::anyhow!(
        "the group failed: {}",
        view.error.clone().unwrap_or_default()
    )
}

fn printing(view: &GroupView) -> bool {
    view.status == GroupStatus::Running
        && view
            .containers
            .iter()
            .any(|c| c.status == ContainerStatus::Running)
}

/// Waits (bounded) for both containers to exit 0; a wait that runs out
/// says where each stream got to and what the guest's console shows.
fn finish(d: &Capsad) -> Result<()> {
    let deadline = Instant::now() + FINISH_PATIENCE;
    loop {
        let view = d.group("chatty")?;
        if view.status == GroupStatus::Failed {
            return Err(failed(d, &view));
        }
        let exited: Vec<_> = view
            .containers
            .iter()
            .filter(|c| c.status == ContainerStatus::Exited)
            .collect();
        if exited.len() == view.containers.len() {
            for c in exited {
                ensure!(c.exit_code == Some(0), "{}: exit {:?}", c.name, c.exit_code);
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let mut where_ = Vec::new();
            for (container, stream) in [
                ("steady", "stdout"),
                ("steady", "stderr"),
                ("bursts", "stdout"),
            ] {
                let lines = stream_lines(d, container, stream)?;
                where_.push(format!(
                    "{container} {stream}: {} lines, last {:?}",
                    lines.len(),
                    lines.last()
                ));
            }
            let console = std::fs::read_to_string(d.root().join("root/groups/chatty/console.log"))
                .unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(15).collect();
            anyhow::bail!(
                "the containers did not finish in {} s: {:?}; {}; console: {}",
                FINISH_PATIENCE.as_secs(),
                view.containers
                    .iter()
                    .map(|c| (&c.name, c.status))
                    .collect::<Vec<_>>(),
                where_.join("; "),
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

pub fn run(s: &mut Suite, d: &mut Capsad) -> Result<()> {
    d.start()?;
    let import = d.import_busybox()?;
    ensure!(import.code == Some(0), "import: {}", import.describe());
    let _: GroupView = d
        .client()?
        .call(Method::POST, "/v1/groups", Some(spec().to_string()))?;
    let started: GroupView = d
        .client()?
        .call(Method::POST, "/v1/groups/chatty/start", None)?;
    ensure!(printing(&started), "the group did not start: {started:?}");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    let mut moments = Moments(seed);
    let (mut kills, mut while_printing) = (0u32, 0u32);
    let began = Instant::now();
    while while_printing < KILLS {
        std::thread::sleep(Duration::from_millis(moments.between(100, 1500)));
        let view = d.group("chatty")?;
        if view.status == GroupStatus::Failed {
            return Err(failed(d, &view));
        }
        if !printing(&view) {
            break;
        }
        d.kill();
        kills += 1;
        while_printing += 1;
        std::thread::sleep(Duration::from_millis(moments.between(0, 800)));
        d.start()
            .with_context(|| format!("starting capsad after kill {kills}"))?;
    }
    s.verdict(
        &format!("capsad was killed {KILLS} times (SIGKILL, at random moments) while the containers printed"),
        while_printing >= KILLS,
        format!(
            "{while_printing} kills in {} s, seed {seed:#x}",
            began.elapsed().as_secs()
        ),
    );
    finish(d)?;
    let expect = |f: &dyn Fn(u32) -> String, n: u32| (1..=n).map(f).collect::<Vec<_>>();
    s.check(
        "each line of stdout and stderr is in the log exactly once, in order",
        || {
            let out = stream_lines(d, "steady", "stdout")?;
            let err = stream_lines(d, "steady", "stderr")?;
            let want_out = expect(&|i| format!("out {i}"), STEADY_LINES);
            let want_err = expect(&|i| format!("err {i}"), STEADY_LINES);
            ensure!(out == want_out, "stdout: {}", difference(&out, &want_out));
            ensure!(err == want_err, "stderr: {}", difference(&err, &want_err));
            Ok(format!("{STEADY_LINES} lines on each stream"))
        },
    );
    s.check("and so is each line of output that came in bursts", || {
        let got = stream_lines(d, "bursts", "stdout")?;
        let want: Vec<String> = (1..=BURSTS)
            .flat_map(|j| (1..=BURST_LINES).map(move |k| format!("b{j}.{k}")))
            .collect();
        ensure!(got == want, "{}", difference(&got, &want));
        Ok(format!("{} lines in {BURSTS} bursts", want.len()))
    });
    let _: serde_json::Value = d
        .client()?
        .call(Method::DELETE, "/v1/groups/chatty", None)?;
    Ok(())
}
