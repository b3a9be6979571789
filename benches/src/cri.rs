//! Starting a pod through the CRI, as kubelet does: RunPodSandbox on a
//! runtime handler, then CreateContainer and StartContainer of its first
//! container, timed until the container runs; then StopPodSandbox and
//! RemovePodSandbox, timed apart. Each handler given (Capsa, a microVM per
//! pod, next to runc), same containerd, same image, same CNI network,
//! runs interleaved so that drift hits each alike.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsa_cri_client::{cri, CriClient};
use serde::Serialize;

use crate::stats::{cell, Summary};

/// How long one CRI call may take (a VM boots, perhaps nested).
const CALL_BOUND: Duration = Duration::from_secs(300);

#[derive(clap::Args)]
pub struct CriArgs {
    /// Pods per handler.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// containerd's socket (its CRI plugin on).
    #[arg(long)]
    address: PathBuf,
    /// The container's image, already in containerd's k8s.io namespace.
    #[arg(long, default_value = "docker.io/library/busybox:latest")]
    image: String,
    /// LABEL=HANDLER: a runtime handler of containerd's CRI plugin.
    #[arg(long = "handler", required = true)]
    handlers: Vec<String>,
    /// Where the pods' CRI log directories go.
    #[arg(long, default_value = "/tmp/capsa-bench-cri-logs")]
    logs: PathBuf,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    label: String,
    handler: String,
    /// RunPodSandbox to the first container running.
    pod_and_container_ms: Option<Summary>,
    run_pod_sandbox_ms: Option<Summary>,
    create_and_start_container_ms: Option<Summary>,
    stop_and_remove_pod_ms: Option<Summary>,
}

#[derive(Serialize)]
struct Report {
    runs: usize,
    image: String,
    rows: Vec<Row>,
}

#[derive(Default)]
struct Samples {
    total: Vec<f64>,
    pod: Vec<f64>,
    container: Vec<f64>,
    end: Vec<f64>,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn one_pod(client: &CriClient, args: &CriArgs, handler: &str, name: &str) -> Result<[f64; 4]> {
    let pod = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: args.logs.join(name).display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig::default()),
        ..Default::default()
    };
    let container = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "first".into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: args.image.clone(),
            ..Default::default()
        }),
        command: vec!["sleep".into(), "3600".into()],
        log_path: "first.log".into(),
        linux: Some(cri::LinuxContainerConfig::default()),
        ..Default::default()
    };
    let started = Instant::now();
    let pod_id = client.run_pod(&pod, handler)?;
    let pod_ms = ms(started);
    let container_started = Instant::now();
    let made = client.start_container(&pod_id, &pod, container);
    let container_ms = ms(container_started);
    let total_ms = ms(started);
    let ending = Instant::now();
    let ended = client.end_pod(&pod_id);
    let end_ms = ms(ending);
    made?;
    ended?;
    Ok([total_ms, pod_ms, container_ms, end_ms])
}

pub fn run(args: &CriArgs) -> Result<()> {
    let mut handlers = Vec::new();
    for given in &args.handlers {
        let Some((label, handler)) = given.split_once('=') else {
            bail!("--handler {given}: expected LABEL=HANDLER");
        };
        handlers.push((label.to_string(), handler.to_string(), Samples::default()));
    }
    let client = CriClient::connect(&args.address, CALL_BOUND)
        .with_context(|| format!("the CRI at {}", args.address.display()))?;
    for run in 0..args.runs {
        for (label, handler, samples) in handlers.iter_mut() {
            let name = format!("bench-{label}-{}-{run}", std::process::id());
            match one_pod(&client, args, handler, &name) {
                Ok([total, pod, container, end]) => {
                    eprintln!("{label} run {run}: {total:.0} ms to a running container ({pod:.0} pod, {container:.0} container), {end:.0} ms to end");
                    samples.total.push(total);
                    samples.pod.push(pod);
                    samples.container.push(container);
                    samples.end.push(end);
                }
                Err(e) => eprintln!("{label} run {run}: {e:#}"),
            }
        }
    }
    let rows: Vec<Row> = handlers
        .into_iter()
        .map(|(label, handler, samples)| Row {
            label,
            handler,
            pod_and_container_ms: Summary::of(&samples.total),
            run_pod_sandbox_ms: Summary::of(&samples.pod),
            create_and_start_container_ms: Summary::of(&samples.container),
            stop_and_remove_pod_ms: Summary::of(&samples.end),
        })
        .collect();
    if rows.iter().any(|r| r.pod_and_container_ms.is_none()) {
        bail!("a handler had no run that worked (above)");
    }
    println!(
        "a pod and its first container ({}, sleep) through the CRI, ms, median (min-max) of {} runs",
        args.image, args.runs
    );
    println!("| handler | pod + first container running | RunPodSandbox | Create+StartContainer | StopPodSandbox+RemovePodSandbox |");
    println!("|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} ({}) | {} | {} | {} | {} |",
            row.label,
            row.handler,
            cell(&row.pod_and_container_ms),
            cell(&row.run_pod_sandbox_ms),
            cell(&row.create_and_start_container_ms),
            cell(&row.stop_and_remove_pod_ms)
        );
    }
    let report = Report {
        runs: args.runs,
        image: args.image.clone(),
        rows,
    };
    crate::write_json(
        args.json.as_deref().unwrap_or(&crate::default_json("cri")),
        &report,
    )
}
