//! `capsa-bench containment`: one battery of escape probes (`probes.rs`)
//! run inside a Capsa group and, as peers, inside runc and crun containers
//! on the same host, each as root with the capabilities the attacks need
//! (so that the guest kernel, not the container, is the boundary under
//! test). Prints a table probe × runtime (contained / escaped / not
//! applicable) and writes JSON; fails unless every Capsa row is contained.
//!
//! The host plants what the probes look for (a marker file, a marker
//! process, a service on 0.0.0.0) and looks itself for the effects of the
//! probes that only try (`host.rs`): a sysrq in its kernel log, its
//! core_pattern or a cgroup v1 release_agent changed, a connection to its
//! service.

mod host;
mod net_probes;
mod probes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::process;
use probes::PROBES;

/// The cgroup v1 hierarchy the release_agent probe mounts (a named one:
/// it needs no controller). The host holds it mounted while the probes
/// run, so that a container's mount of it is the host's hierarchy.
pub const RELEASE_AGENT_HIERARCHY: &str = "none,name=capsa-probe";

/// The capabilities the probes run with, beyond a runtime's defaults.
const CAPABILITIES: &[&str] = &[
    "SYS_ADMIN",
    "SYS_MODULE",
    "SYS_RAWIO",
    "MKNOD",
    "NET_ADMIN",
    "NET_RAW",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Contained,
    Escaped,
    NotApplicable,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Contained => "contained",
            Outcome::Escaped => "escaped",
            Outcome::NotApplicable => "not applicable",
        }
    }
}

/// One probe's result, as the probe prints it (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub probe: String,
    pub outcome: Outcome,
    pub evidence: String,
}

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// The host's boot id (/proc/sys/kernel/random/boot_id).
    #[arg(long)]
    pub boot_id: String,
    /// What the host's markers hold.
    #[arg(long)]
    pub token: String,
    /// The host's marker file.
    #[arg(long)]
    pub marker: String,
    /// The port of the host's service on 0.0.0.0.
    #[arg(long)]
    pub host_port: u16,
    /// A listening group of another network.
    #[arg(long)]
    pub other_group: Option<std::net::SocketAddr>,
    /// The DNS (gateway) of that other network.
    #[arg(long)]
    pub other_dns: Option<std::net::Ipv4Addr>,
}

#[derive(clap::Args)]
pub struct ContainmentArgs {
    /// The capsa CLI (CAPSA_SOCKET names the daemon).
    #[arg(long)]
    capsa: PathBuf,
    /// The imported image that holds capsa-bench at /bin/capsa-bench.
    #[arg(long)]
    image: String,
    /// The same root filesystem as an OCI bundle, for the peers.
    #[arg(long)]
    bundle: PathBuf,
    /// Peers: NAME=PATH of an OCI runtime (runc, crun).
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// More arguments for the peers' `run` (`--no-pivot` where the root
    /// is an initramfs).
    #[arg(long = "peer-run-arg", allow_hyphen_values = true)]
    peer_run_args: Vec<String>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    probe: String,
    tries: String,
    /// Runtime name to its finding.
    results: BTreeMap<String, Finding>,
}

#[derive(Serialize)]
struct Report<'a> {
    runtimes: &'a [String],
    rows: &'a [Row],
}

const CAPSA: &str = "capsa";
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// Parses the probe's output: one finding per known probe, in any order.
fn parse_findings(stdout: &str) -> Result<BTreeMap<String, Finding>> {
    let mut found = BTreeMap::new();
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let finding: Finding =
            serde_json::from_str(line).with_context(|| format!("a probe's line {line:?}"))?;
        if PROBES.iter().any(|p| p.name == finding.probe) {
            found.insert(finding.probe.clone(), finding);
        }
    }
    if let Some(missing) = PROBES.iter().find(|p| !found.contains_key(p.name)) {
        let missing = missing.name;
        bail!("the probe printed no finding for {missing}");
    }
    Ok(found)
}

fn capsa_command(args: &ContainmentArgs, probe_args: &[String]) -> Command {
    let mut command = Command::new(&args.capsa);
    command.args(["run", "--rm"]);
    for capability in CAPABILITIES {
        command.args(["--cap-add", capability]);
    }
    command
        .arg(&args.image)
        .arg("/bin/capsa-bench")
        .arg("probe");
    command.args(probe_args);
    command
}

/// A peer's run of the bundle, its config set to the probe with the
/// probes' capabilities.
fn peer_command(
    args: &ContainmentArgs,
    runtime: &str,
    id: &str,
    probe_args: &[String],
) -> Result<Command> {
    let path = args.bundle.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).context("the bundle's config")?;
    let process = config
        .get_mut("process")
        .context("the bundle's config has no process")?;
    let mut argv = vec!["/bin/capsa-bench".to_string(), "probe".to_string()];
    argv.extend(probe_args.iter().cloned());
    process["args"] = serde_json::json!(argv);
    process["terminal"] = serde_json::json!(false);
    let capabilities = process
        .get("capabilities")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    let mut capabilities = capabilities;
    for set in ["bounding", "effective", "permitted"] {
        let mut list: Vec<String> = capabilities[set]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|c| c.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        for capability in CAPABILITIES {
            let full = format!("CAP_{capability}");
            if !list.contains(&full) {
                list.push(full);
            }
        }
        capabilities[set] = serde_json::json!(list);
    }
    process["capabilities"] = capabilities;
    std::fs::write(&path, serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let mut command = Command::new(runtime);
    command.arg("run").args(&args.peer_run_args);
    command.arg("--bundle").arg(&args.bundle).arg(id);
    Ok(command)
}

pub fn run(args: &ContainmentArgs) -> Result<()> {
    let host = host::Host::plant()?;
    let other = host::OtherNetwork::start(&args.capsa, &args.image)
        .context("making another network with a group on it")?;
    let mut probe_args = host.probe_args();
    probe_args.extend(other.probe_args());
    let mut runtimes: Vec<(String, Command)> =
        vec![(CAPSA.into(), capsa_command(args, &probe_args))];
    for (i, peer) in args.peers.iter().enumerate() {
        let (name, path) = peer
            .split_once('=')
            .with_context(|| format!("--peer {peer:?}: expected NAME=PATH"))?;
        let id = format!("capsa-containment-{}-{i}", std::process::id());
        runtimes.push((
            name.to_string(),
            peer_command(args, path, &id, &probe_args)?,
        ));
    }
    let mut columns = Vec::new();
    let mut results: BTreeMap<String, BTreeMap<String, Finding>> = BTreeMap::new();
    for (name, command) in runtimes {
        eprintln!("containment: probing {name}");
        let before = host.observe_before()?;
        let finished = process::run(command, RUN_LIMIT);
        let observed = host.observe_after(&before);
        let findings = finished
            .and_then(|f| f.success())
            .and_then(|f| parse_findings(&f.stdout))
            .with_context(|| format!("the probes in {name}"))?;
        columns.push(name.clone());
        results.insert(name, host::judge(findings, &observed?));
    }
    let rows: Vec<Row> = PROBES
        .iter()
        .map(|probe| Row {
            probe: probe.name.to_string(),
            tries: probe.tries.to_string(),
            results: columns
                .iter()
                .filter_map(|c| Some((c.clone(), results.get(c)?.get(probe.name)?.clone())))
                .collect(),
        })
        .collect();
    print_table(&columns, &rows);
    let json = args
        .json
        .clone()
        .unwrap_or_else(|| crate::default_json("containment"));
    crate::write_json(
        &json,
        &Report {
            runtimes: &columns,
            rows: &rows,
        },
    )?;
    let not_contained: Vec<String> = rows
        .iter()
        .filter(|r| r.results.get(CAPSA).map(|f| f.outcome) != Some(Outcome::Contained))
        .map(|r| {
            let evidence = r
                .results
                .get(CAPSA)
                .map_or("no finding", |f| f.evidence.as_str());
            format!("{} ({evidence})", r.probe)
        })
        .collect();
    if !not_contained.is_empty() {
        bail!("Capsa is not contained on: {}", not_contained.join("; "));
    }
    Ok(())
}

fn print_table(columns: &[String], rows: &[Row]) {
    println!(
        "Containment: probe x runtime (each as root with {})",
        CAPABILITIES.join(", ")
    );
    let mut header = format!("{:<20}", "probe");
    for column in columns {
        header.push_str(&format!(" {column:<15}"));
    }
    println!("{header}");
    for row in rows {
        let mut line = format!("{:<20}", row.probe);
        for column in columns {
            let word = row
                .results
                .get(column)
                .map_or("no finding", |f| f.outcome.word());
            line.push_str(&format!(" {word:<15}"));
        }
        println!("{line}");
    }
    println!();
    for row in rows {
        for column in columns {
            if let Some(f) = row.results.get(column) {
                println!("{} / {column}: {}", row.probe, f.evidence);
            }
        }
    }
}

/// `capsa-bench probe`: the probes, in the container under test.
pub fn probe(args: &ProbeArgs) -> Result<()> {
    probes::run(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_are_parsed_and_a_missing_probe_is_an_error() {
        let lines: Vec<String> = PROBES
            .iter()
            .map(|p| {
                serde_json::to_string(&Finding {
                    probe: p.name.to_string(),
                    outcome: Outcome::Contained,
                    evidence: "x".into(),
                })
                .unwrap()
            })
            .collect();
        let all = format!("noise\n{}\n", lines.join("\n"));
        assert_eq!(parse_findings(&all).unwrap().len(), PROBES.len());
        let short = lines[1..].join("\n");
        assert!(parse_findings(&short).is_err());
        assert!(parse_findings("{not json").is_err());
    }
}
