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
        Registry::start_with(artifacts, netns, address, work, None)
    }

    /// As `start`, asking for `user` and `password` (basic auth, an
    /// htpasswd file of bcrypt hashes, as docker-registry wants).
    pub fn start_with(
        artifacts: &Artifacts,
        netns: Option<&str>,
        address: &str,
        work: &Path,
        login: Option<(&str, &str)>,
    ) -> Result<Registry> {
        let port = address.rsplit(':').next().unwrap_or("registry");
        let config = work.join(format!("registry-{port}.yml"));
        let mut text = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n",
            artifacts.path("registry-data").display()
        );
        if let Some((user, password)) = login {
            let htpasswd = work.join(format!("htpasswd-{port}"));
            std::fs::write(
                &htpasswd,
                format!("{user}:{}\n", bcrypt::hash(password, 4)?),
            )?;
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: capsa-e2e\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, text)?;
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
        let args: Vec<OsString> = vec![
            "-s".into(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            url,
        ];
        loop {
            let mut probe = artifacts.command_in(netns, &artifacts.tool("curl"), &args);
            // 401: up, and asking for the login.
            if probe
                .output()
                .is_ok_and(|o| matches!(&o.stdout[..], b"200" | b"401"))
            {
                return Ok(registry);
            }
            if Instant::now() > deadline {
                bail!("docker-registry did not answer on {address} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
