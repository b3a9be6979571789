//! Debian's docker-registry serving the payload's registry-data (busybox
//! as library/busybox:latest, filled by scripts/registry-data.sh): a
//! Docker Hub mirror on loopback for the suites that pull. Stopped when
//! dropped.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::vm::Artifacts;

pub struct Registry(Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Registry {
    /// Serves on `address` (HOST:PORT), in network namespace `netns` or
    /// this one, its config written into `work`; returns once its API
    /// answers.
    pub fn start(
        artifacts: &Artifacts,
        netns: Option<&str>,
        address: &str,
        work: &Path,
    ) -> Result<Registry> {
        let config = work.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n",
                artifacts.path("registry-data").display()
            ),
        )?;
        let program = artifacts.tool("docker-registry");
        let child = artifacts
            .command_in(netns, &program, &["serve".into(), config.into()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let registry = Registry(child);
        // Up when its API answers, seen from the namespace.
        let deadline = Instant::now() + Duration::from_secs(30);
        let url: OsString = format!("http://{address}/v2/").into();
        loop {
            let mut probe =
                artifacts.command_in(netns, &artifacts.tool("curl"), &["-sf".into(), url.clone()]);
            if probe.output().is_ok_and(|o| o.status.success()) {
                return Ok(registry);
            }
            if Instant::now() > deadline {
                bail!("docker-registry did not answer on {address} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
