//! Debian's containerd for the shim and CRI suites: its own config, root,
//! state and sockets in a temporary directory, the CRI plugin off or
//! configured by the suite; `ctr` to drive it, and the Capsa shim as the
//! runtime.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::suites::daemon::{Output, COMMAND_TIMEOUT};
use crate::vm::{self, Artifacts};

pub const RUNTIME: &str = "io.containerd.capsa.v2";
pub const IMAGE: &str = "docker.io/library/busybox:latest";

pub struct Containerd<'a> {
    pub artifacts: &'a Artifacts,
    pub dir: PathBuf,
    child: Child,
    events: Option<Child>,
}

impl<'a> Containerd<'a> {
    /// containerd with the CRI plugin off.
    pub fn start(artifacts: &'a Artifacts) -> Result<Self> {
        Self::start_in(artifacts, "capsa-e2e-containerd", |_| {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_string()
        })
    }

    /// containerd in a temporary directory `name`, with what `plugins`
    /// writes (given that directory) added to its config.
    pub fn start_in(
        artifacts: &'a Artifacts,
        name: &str,
        plugins: impl FnOnce(&std::path::Path) -> String,
    ) -> Result<Self> {
        let dir = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let d = dir.display();
        let plugins = plugins(&dir);
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 {plugins}\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
            ),
        )?;
        std::fs::write(
            dir.join("shim.toml"),
            format!(
                "kernel = \"{}\"\ninitrd = \"{}\"\ncpus = 1\nmemory_mib = 256\ndisk_dir = \"{d}/disks\"\n",
                artifacts.path("vmlinux").display(),
                artifacts.path("initramfs.cpio").display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new(artifacts.tool("containerd"))
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path_with_shim(artifacts))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let containerd = Containerd {
            artifacts,
            dir,
            child,
            events: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !containerd.dir.join("containerd.sock").exists() {
            if Instant::now() > deadline {
                bail!("containerd did not come up: {}", containerd.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(containerd)
    }

    fn base(&self) -> Command {
        let mut command = Command::new(self.artifacts.tool("ctr"));
        command
            .arg("--address")
            .arg(self.dir.join("containerd.sock"));
        command
    }

    /// `ctr ARGS`, its stdin empty.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        let mut command = self.base();
        command.args(args);
        let run = vm::Background::spawn(command)?.finish_or_fail(COMMAND_TIMEOUT)?;
        Ok(Output::from(run))
    }

    /// `ctr [-n NAMESPACE] image import` of the payload's busybox image,
    /// named IMAGE.
    pub fn import_busybox(&self, namespace: Option<&str>) -> Result<Output> {
        let tar = self.artifacts.path("busybox.tar").display().to_string();
        let mut args = Vec::new();
        if let Some(namespace) = namespace {
            args.extend(["-n", namespace]);
        }
        args.extend([
            "image",
            "import",
            "--base-name",
            "docker.io/library/busybox",
            &tar,
        ]);
        self.ctr(&args)
    }

    /// `ctr run` with the Capsa shim: ARGS are run's own and then IMAGE ID
    /// COMMAND as usual.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        let config = self.dir.join("shim.toml");
        let config = config.to_string_lossy();
        let mut all = vec![
            "run",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            &config,
        ];
        all.extend_from_slice(args);
        self.ctr(&all)
    }

    /// The words of `ctr run` with the Capsa shim, for a command line.
    pub fn run_words(&self) -> String {
        format!(
            "{} --address {} run --runtime {RUNTIME} --runtime-config-path {}",
            self.artifacts.tool("ctr").display(),
            self.dir.join("containerd.sock").display(),
            self.dir.join("shim.toml").display()
        )
    }

    /// Follows `ctr events` until [`Containerd::events`] is called.
    pub fn follow_events(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.join("events.log"))?;
        self.events = Some(
            self.base()
                .arg("events")
                .stdout(log)
                .stderr(Stdio::null())
                .spawn()?,
        );
        Ok(())
    }

    /// The task topics `ctr events` saw (`/tasks/exit`, ...).
    pub fn events(&mut self) -> Vec<String> {
        if let Some(mut child) = self.events.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        task_topics(&std::fs::read_to_string(self.dir.join("events.log")).unwrap_or_default())
    }

    /// The status `ctr task ls` gives task `id`, if it lists it.
    pub fn status(&self, id: &str) -> Result<Option<String>> {
        let out = self.ctr(&["task", "ls"])?;
        // TASK PID STATUS
        Ok(out.stdout.lines().skip(1).find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.first() == Some(&id)).then(|| fields.get(2).unwrap_or(&"").to_string())
        }))
    }

    /// Waits (10 s at most) for task `id` to be STOPPED.
    pub fn stopped(&self, id: &str) -> Result<bool> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.status(id)?.as_deref() == Some("STOPPED") {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(false)
    }

    /// Stops task `id` (`kill` with `args`), waits for it to be STOPPED,
    /// then deletes it and its container; returns what `task delete` said.
    pub fn end_task(&self, id: &str, args: &[&str]) -> Result<Output> {
        let mut kill = vec!["task", "kill"];
        kill.extend_from_slice(args);
        kill.push(id);
        self.ctr(&kill)?;
        if !self.stopped(id)? {
            bail!("task {id} did not stop: {:?}", self.status(id)?);
        }
        let deleted = self.ctr(&["task", "delete", id])?;
        let removed = self.ctr(&["container", "rm", id])?;
        if removed.code != Some(0) {
            bail!("container rm {id}: {}", removed.describe());
        }
        Ok(deleted)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd<'_> {
    fn drop(&mut self) {
        self.events();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The task topics of `ctr events` lines: TIMESTAMP NAMESPACE TOPIC EVENT,
/// the timestamp in several words.
fn task_topics(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")))
        .map(str::to_string)
        .collect()
}

/// PATH with the payload's programs first: containerd finds the shim,
/// and the shim capsa-vmm beside it.
fn path_with_shim(artifacts: &Artifacts) -> std::ffi::OsString {
    let mut path = std::ffi::OsString::from(artifacts.path("bin"));
    if let Some(rest) = std::env::var_os("PATH") {
        path.push(":");
        path.push(rest);
    }
    path
}

#[cfg(test)]
mod tests {
    #[test]
    fn task_topics_are_read_off_ctr_events() {
        let text = "2026-12-01 10:12:34.123456789 +0000 UTC default /tasks/create {\"container_id\":\"a\"}\n\
                    2026-12-01 10:12:35.1 +0000 UTC default /containers/create {}\n";
        assert_eq!(super::task_topics(text), ["/tasks/create"]);
    }
}
