//! The host's side of the containment probes: the markers they look for,
//! and what the host itself sees of the probes that only try (a sysrq in
//! its kernel log, its core_pattern, a cgroup v1 release_agent, a
//! connection to its service). What a probe changed on the host is put
//! back at once.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use super::{probes, Finding, Outcome, RELEASE_AGENT_HIERARCHY};

const CORE_PATTERN: &str = "/proc/sys/kernel/core_pattern";

pub struct Host {
    token: String,
    boot_id: String,
    marker: std::path::PathBuf,
    marker_process: Child,
    port: u16,
    connections: Arc<Mutex<Vec<SocketAddr>>>,
    core_pattern: String,
    /// The release_agent probe's hierarchy, held mounted here, or why the
    /// host could not mount it.
    hierarchy: Result<tempfile::TempDir, String>,
}

/// What the host's log and settings held before a runtime's probes.
pub struct Before {
    sysrq_lines: usize,
    connections: usize,
}

/// What the host saw of one runtime's probes.
pub struct Observed {
    sysrq: Option<String>,
    core_pattern: Option<String>,
    release_agent: Result<Option<String>, String>,
    connections: Vec<SocketAddr>,
}

fn read_trimmed(path: &str) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .to_string())
}

impl Host {
    pub fn plant() -> Result<Host> {
        let token: String = read_trimmed("/proc/sys/kernel/random/uuid")?
            .chars()
            .filter(|c| c.is_ascii_hexdigit())
            .take(16)
            .collect();
        let marker = std::env::temp_dir().join(format!("capsa-containment-{token}"));
        std::fs::write(&marker, &token).with_context(|| format!("writing {}", marker.display()))?;
        let marker_process = Command::new("sh")
            .arg("-c")
            .arg(format!("sleep 900; : capsa-pid-{token}"))
            .spawn()
            .context("starting the marker process")?;
        let listener = TcpListener::bind("0.0.0.0:0").context("binding the host service")?;
        let port = listener.local_addr()?.port();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let seen = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let (Ok(peer), Ok(mut list)) = (stream.peer_addr(), seen.lock()) {
                    list.push(peer);
                }
            }
        });
        Ok(Host {
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id")?,
            core_pattern: read_trimmed(CORE_PATTERN)?,
            hierarchy: mount_hierarchy(),
            token,
            marker,
            marker_process,
            port,
            connections,
        })
    }

    pub fn probe_args(&self) -> Vec<String> {
        vec![
            "--boot-id".into(),
            self.boot_id.clone(),
            "--token".into(),
            self.token.clone(),
            "--marker".into(),
            self.marker.display().to_string(),
            "--host-port".into(),
            self.port.to_string(),
        ]
    }

    fn connections(&self) -> Vec<SocketAddr> {
        self.connections
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    pub fn observe_before(&self) -> Result<Before> {
        Ok(Before {
            sysrq_lines: sysrq_lines()?.len(),
            connections: self.connections().len(),
        })
    }

    /// Looks for the probes' effects and undoes them.
    pub fn observe_after(&self, before: &Before) -> Result<Observed> {
        let sysrq = sysrq_lines()?.into_iter().nth(before.sysrq_lines);
        let now = read_trimmed(CORE_PATTERN)?;
        let core_pattern = if now != self.core_pattern {
            std::fs::write(CORE_PATTERN, &self.core_pattern)
                .context("putting the host's core_pattern back")?;
            Some(now)
        } else {
            None
        };
        Ok(Observed {
            sysrq,
            core_pattern,
            release_agent: self.release_agent(),
            connections: self.connections().split_off(before.connections),
        })
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.marker_process.kill();
        let _ = self.marker_process.wait();
        let _ = std::fs::remove_file(&self.marker);
        if let Ok(dir) = &self.hierarchy {
            let _ = probes::umount(&dir.path().display().to_string());
        }
    }
}

/// The kernel log's sysrq lines so far (/dev/kmsg, every record kept).
fn sysrq_lines() -> Result<Vec<String>> {
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .context("opening /dev/kmsg")?;
    let mut lines = Vec::new();
    let mut record = vec![0u8; 8192];
    // Bounded: the log holds a bounded number of records.
    for _ in 0..1_000_000 {
        match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => {
                let text = String::from_utf8_lossy(&record[..n]);
                if let Some((_, message)) = text.split_once(';') {
                    if message.to_ascii_lowercase().starts_with("sysrq") {
                        lines.push(message.trim().to_string());
                    }
                }
            }
            // A record overwritten while reading: go on with the next.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    Ok(lines)
}

fn mount_hierarchy() -> Result<tempfile::TempDir, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("a directory to mount on: {e}"))?;
    probes::mount_fs(
        "cgroup",
        &dir.path().display().to_string(),
        "cgroup",
        RELEASE_AGENT_HIERARCHY,
    )
    .map_err(|e| format!("mounting the cgroup v1 hierarchy on the host: {e}"))?;
    Ok(dir)
}

impl Host {
    /// The release_agent of the probes' hierarchy (cleared again), or why
    /// the host cannot look.
    fn release_agent(&self) -> Result<Option<String>, String> {
        let dir = self.hierarchy.as_ref().map_err(Clone::clone)?;
        let path = dir.path().join("release_agent");
        let agent = std::fs::read_to_string(&path)
            .map(|a| a.trim().to_string())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if agent.is_empty() {
            return Ok(None);
        }
        let _ = std::fs::write(&path, "\n");
        Ok(Some(agent))
    }
}

/// A probe that only tried, judged by what the host saw: escaped when it
/// saw the effect, contained when it did not.
fn confirm(
    findings: &mut BTreeMap<String, Finding>,
    probe: &str,
    seen: Option<String>,
    unseen: &str,
) {
    let Some(finding) = findings.get_mut(probe) else {
        return;
    };
    let tried = finding.evidence.clone();
    match seen {
        Some(seen) => {
            finding.outcome = Outcome::Escaped;
            finding.evidence = format!("{tried}; the host saw {seen}");
        }
        None if finding.outcome == Outcome::Escaped => {
            finding.outcome = Outcome::Contained;
            finding.evidence = format!("{tried}; {unseen}");
        }
        None => {}
    }
}

/// The final verdicts: the probes that only try are judged by what the
/// host saw; the others stand as the probe found them.
pub fn judge(
    mut findings: BTreeMap<String, Finding>,
    observed: &Observed,
) -> BTreeMap<String, Finding> {
    confirm(
        &mut findings,
        "sysrq",
        observed
            .sysrq
            .as_ref()
            .map(|l| format!("{l:?} in its kernel log")),
        "the host's kernel log shows no sysrq (the guest kernel's own)",
    );
    confirm(
        &mut findings,
        "core-pattern",
        observed
            .core_pattern
            .as_ref()
            .map(|p| format!("its core_pattern become {p:?} (put back)")),
        "the host's core_pattern is unchanged",
    );
    match &observed.release_agent {
        Ok(agent) => confirm(
            &mut findings,
            "release-agent",
            agent
                .as_ref()
                .map(|a| format!("release_agent {a:?} on its hierarchy (cleared)")),
            "the host's hierarchy has no release_agent",
        ),
        Err(why) => {
            if let Some(f) = findings.get_mut("release-agent") {
                f.evidence = format!("{}; the host cannot look: {why}", f.evidence);
            }
        }
    }
    confirm(
        &mut findings,
        "host-service",
        (!observed.connections.is_empty())
            .then(|| format!("connections from {:?}", observed.connections)),
        "the host's service saw no connection",
    );
    findings
}

/// A network of its own with a listening group on it, made through the
/// capsa CLI for the probes that try to cross networks; removed on drop.
pub struct OtherNetwork {
    capsa: std::path::PathBuf,
    pub group: SocketAddr,
    pub dns: std::net::Ipv4Addr,
}

const OTHER: &str = "capsa-probe-other";
const OTHER_PORT: u16 = 5001;

fn capsa_json(capsa: &std::path::Path, args: &[&str]) -> Result<serde_json::Value> {
    let mut command = Command::new(capsa);
    command.args(args);
    let done = crate::process::run(command, std::time::Duration::from_secs(120))?.success()?;
    serde_json::from_str(&done.stdout)
        .with_context(|| format!("capsa {}: its JSON", args.join(" ")))
}

fn capsa_ok(capsa: &std::path::Path, args: &[&str]) -> Result<()> {
    let mut command = Command::new(capsa);
    command.args(args);
    crate::process::run(command, std::time::Duration::from_secs(120))?
        .success()
        .with_context(|| format!("capsa {}", args.join(" ")))?;
    Ok(())
}

impl OtherNetwork {
    pub fn start(capsa: &std::path::Path, image: &str) -> Result<OtherNetwork> {
        capsa_ok(capsa, &["network", "create", OTHER])?;
        let other = OtherNetwork {
            capsa: capsa.to_path_buf(),
            group: SocketAddr::from(([0, 0, 0, 0], 0)),
            dns: std::net::Ipv4Addr::UNSPECIFIED,
        };
        let listen = format!("0.0.0.0:{OTHER_PORT}");
        capsa_ok(
            capsa,
            &[
                "run",
                "-d",
                "--name",
                OTHER,
                "--network",
                OTHER,
                image,
                "/bin/capsa-bench",
                "sink",
                "--listen",
                &listen,
            ],
        )?;
        let group = capsa_json(capsa, &["inspect", OTHER])?;
        let network = capsa_json(capsa, &["network", "inspect", OTHER])?;
        let ip = group["ip"]
            .as_str()
            .and_then(|ip| ip.parse::<std::net::Ipv4Addr>().ok())
            .context("the other group has no address")?;
        let dns = network["gateway"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .context("the other network has no gateway")?;
        let mut other = other;
        other.group = SocketAddr::from((ip, OTHER_PORT));
        other.dns = dns;
        Ok(other)
    }

    pub fn probe_args(&self) -> Vec<String> {
        vec![
            "--other-group".into(),
            self.group.to_string(),
            "--other-dns".into(),
            self.dns.to_string(),
        ]
    }
}

impl Drop for OtherNetwork {
    fn drop(&mut self) {
        let _ = capsa_ok(&self.capsa, &["stop", OTHER]);
        let _ = capsa_ok(&self.capsa, &["rm", OTHER]);
        let _ = capsa_ok(&self.capsa, &["network", "rm", OTHER]);
    }
}
