//! Kubernetes pods on Capsa through containerd's own CRI plugin, driven
//! as kubelet drives it (a CRI client, runtime handler `capsa`): pods get
//! CNI addresses and talk over them, are sized from their limits, run
//! containers under the RuntimeDefault seccomp profile in the VMM's pod
//! cgroup, see their volumes (a configMap's updates within 2 s, an
//! emptyDir shared by the pod's containers), exec, log, report stats and
//! take new limits, and leave nothing behind when stopped and removed.

mod client;
mod stream;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use capsa_cri_client::{cri, CriClient};

use crate::registry::Registry;
use crate::suite::Suite;
use crate::suites::shim::containerd::IMAGE;
use crate::vm::Artifacts;
use client::{Cri, BRIDGE_IP, HANDLER, REGISTRY};

/// The CRI's image namespace in containerd.
const CRI_NAMESPACE: &str = "k8s.io";
/// pod-a's hostPort (to its server's port 7000), on the test machine.
const HOST_PORT: u16 = 17000;
/// The cgroup parent the sized pod names (kubelet's would be its pod's).
const POD_CGROUP_PARENT: &str = "/capsa-e2e-pods";

pub fn run(suite: &mut Suite, artifacts: &Artifacts) {
    let result = Cri::start(artifacts).and_then(|mut c| {
        let failed_before = suite.failed;
        let result = checks(suite, &mut c);
        if result.is_err() || suite.failed > failed_before {
            // The shim logs into containerd's log.
            eprintln!("containerd's log:\n{}", c.containerd.log());
        }
        result
    });
    if let Err(e) = result {
        suite.check("the suite ran to its end", || Err(e));
    }
}

fn pod_config(
    name: &str,
    logs: &std::path::Path,
    resources: Option<cri::LinuxContainerResources>,
) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.join(name).display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: if resources.is_some() {
                POD_CGROUP_PARENT.into()
            } else {
                String::new()
            },
            resources,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

fn container_config(
    name: &str,
    command: &[&str],
    seccomp: cri::security_profile::ProfileType,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(image_spec(IMAGE)),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                seccomp: Some(cri::SecurityProfile {
                    profile_type: seccomp as i32,
                    localhost_ref: String::new(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Pod {
    id: String,
    config: cri::PodSandboxConfig,
}

impl Cri<'_> {
    fn run_pod(&self, config: cri::PodSandboxConfig) -> Result<Pod> {
        let id = CriClient::run_pod(self, &config, HANDLER)?;
        Ok(Pod { id, config })
    }

    /// Creates and starts a container in `pod`; returns its id.
    fn start_in(&self, pod: &Pod, config: cri::ContainerConfig) -> Result<String> {
        Ok(self.start_container(&pod.id, &pod.config, config)?)
    }

    /// A streamed exec (CRI Exec, then the streaming server's URL).
    fn exec_stream(&self, id: &str, cmd: &[&str], tty: bool) -> Result<stream::Session> {
        let url = self
            .call(
                &format!("Exec {cmd:?}"),
                self.runtime_service().exec(cri::ExecRequest {
                    container_id: id.into(),
                    cmd: cmd.iter().map(|s| s.to_string()).collect(),
                    tty,
                    stdin: true,
                    stdout: true,
                    stderr: !tty,
                }),
            )?
            .url;
        stream::Session::open(&url)
    }

    fn exec_sync(&self, id: &str, cmd: &[&str]) -> Result<cri::ExecSyncResponse> {
        Ok(self.call(
            &format!("ExecSync {cmd:?}"),
            self.runtime_service().exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 60,
            }),
        )?)
    }

    fn pod_ip(&self, pod: &Pod) -> Result<String> {
        let status = self
            .call(
                "PodSandboxStatus",
                self.runtime_service()
                    .pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: pod.id.clone(),
                        verbose: false,
                    }),
            )?
            .status
            .context("no status")?;
        ensure!(
            status.state == cri::PodSandboxState::SandboxReady as i32,
            "the pod is not ready: state {}",
            status.state
        );
        Ok(status.network.map(|n| n.ip).unwrap_or_default())
    }
}

/// kubelet's atomic writer, as it lays out a configMap volume: the keys
/// in a timestamped directory, `..data` a symlink to it (switched by a
/// rename), each key a symlink through `..data`.
fn write_config_map(dir: &Path, version: &str, keys: &[(&str, &str)]) -> Result<()> {
    use std::os::unix::fs::symlink;
    std::fs::create_dir_all(dir)?;
    let dated = format!("..{version}");
    std::fs::create_dir(dir.join(&dated))?;
    for (key, value) in keys {
        std::fs::write(dir.join(&dated).join(key), value)?;
        let link = dir.join(key);
        if link.symlink_metadata().is_err() {
            symlink(format!("..data/{key}"), link)?;
        }
    }
    symlink(&dated, dir.join("..data_tmp"))?;
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
    Ok(())
}

fn mount(host: &Path, container: &str, readonly: bool) -> cri::Mount {
    cri::Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

fn in_pod_subnet(ip: &str) -> bool {
    ip.starts_with(client::POD_SUBNET.trim_end_matches("0/24"))
}

fn checks(s: &mut Suite, c: &mut Cri) -> Result<()> {
    let import = c.containerd.import_busybox(Some(CRI_NAMESPACE))?;
    ensure!(
        import.code == Some(0),
        "ctr image import: {}",
        import.describe()
    );
    s.check("the CRI sees the imported image (ImageStatus)", || {
        let image = c
            .call(
                "ImageStatus",
                c.image_service().image_status(cri::ImageStatusRequest {
                    image: Some(image_spec(IMAGE)),
                    verbose: false,
                }),
            )?
            .image
            .context("the CRI does not know the image")?;
        Ok(image.id)
    });

    let logs = c.containerd.dir.join("pod-logs");
    let sized = cri::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 200_000,
        memory_limit_in_bytes: 1 << 30,
        ..Default::default()
    };
    let pod_a = c.run_pod(cri::PodSandboxConfig {
        port_mappings: vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 7000,
            host_port: i32::from(HOST_PORT),
            host_ip: String::new(),
        }],
        ..pod_config("pod-a", &logs, Some(sized))
    })?;
    let pod_b = c.run_pod(pod_config("pod-b", &logs, None))?;
    let (ip_a, ip_b) = (c.pod_ip(&pod_a)?, c.pod_ip(&pod_b)?);
    s.verdict(
        "RunPodSandbox with handler capsa: each pod is ready with a CNI address",
        in_pod_subnet(&ip_a) && in_pod_subnet(&ip_b) && ip_a != ip_b,
        format!("pod-a {ip_a}, pod-b {ip_b}"),
    );

    use cri::security_profile::ProfileType;
    let server = c.start_in(
        &pod_a,
        container_config(
            "server",
            &[
                "sh",
                "-c",
                "while true; do echo pong-from-a | nc -l -p 7000; done",
            ],
            ProfileType::RuntimeDefault,
        ),
    )?;
    let client_confined = c.start_in(
        &pod_b,
        container_config("confined", &["sleep", "3600"], ProfileType::RuntimeDefault),
    )?;
    let client_unconfined = c.start_in(
        &pod_b,
        container_config("unconfined", &["sleep", "3600"], ProfileType::Unconfined),
    )?;
    // pod-b's volumes, where kubelet would keep them.
    let volumes = c.containerd.dir.join("kubelet/pods/uid-pod-b/volumes");
    let config_map = volumes.join("kubernetes.io~configmap/settings");
    write_config_map(&config_map, "v1", &[("color", "red")])?;
    let scratch = volumes.join("kubernetes.io~empty-dir/scratch");
    std::fs::create_dir_all(&scratch)?;
    let talker = c.start_in(
        &pod_b,
        cri::ContainerConfig {
            mounts: vec![
                mount(&config_map, "/etc/settings", true),
                mount(&scratch, "/scratch", false),
            ],
            ..container_config(
                "talker",
                &["sh", "-c", "echo running-line; exec sleep 3600"],
                ProfileType::RuntimeDefault,
            )
        },
    )?;
    let reader = c.start_in(
        &pod_b,
        cri::ContainerConfig {
            mounts: vec![mount(&scratch, "/scratch", false)],
            ..container_config("reader", &["sleep", "3600"], ProfileType::RuntimeDefault)
        },
    )?;
    c.start_in(
        &pod_b,
        container_config(
            "printer",
            &["echo", "exited-line"],
            ProfileType::RuntimeDefault,
        ),
    )?;

    s.check(
        "PullImage fetches an image from a registry, and a container of it runs",
        || {
            let _registry =
                Registry::start(c.containerd.artifacts, None, REGISTRY, &c.containerd.dir)?;
            let image = format!("{REGISTRY}/library/busybox:latest");
            let pulled = c
                .call(
                    "PullImage",
                    c.image_service().pull_image(cri::PullImageRequest {
                        image: Some(image_spec(&image)),
                        auth: None,
                        sandbox_config: Some(pod_b.config.clone()),
                    }),
                )?
                .image_ref;
            let id = c.start_in(
                &pod_b,
                cri::ContainerConfig {
                    image: Some(image_spec(&image)),
                    ..container_config("pulled", &["sleep", "3600"], ProfileType::RuntimeDefault)
                },
            )?;
            let out = c.exec_sync(&id, &["echo", "from-the-pulled-image"])?;
            ensure!(
                text(&out.stdout) == "from-the-pulled-image",
                "exit {}: {}",
                out.exit_code,
                text(&out.stderr)
            );
            Ok(format!("{image} is {pulled}"))
        },
    );
    s.check(
        "a pod limited to 2 CPUs and 1 GiB gets a VM of that size",
        || {
            let cpus = text(&c.exec_sync(&server, &["nproc"])?.stdout);
            let meminfo = text(
                &c.exec_sync(&server, &["head", "-n1", "/proc/meminfo"])?
                    .stdout,
            );
            let kib: u64 = meminfo
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("MemTotal in {meminfo:?}"))?;
            ensure!(cpus == "2", "nproc says {cpus}");
            // 1 GiB plus the shim's overhead, less what the guest kernel keeps.
            ensure!(
                (900 * 1024..=1200 * 1024).contains(&kib),
                "MemTotal {kib} kB"
            );
            Ok(format!("{cpus} vCPUs, MemTotal {kib} kB"))
        },
    );
    let pod_cgroup = format!("{POD_CGROUP_PARENT}/{}", pod_a.id);
    s.check(
        "the sized pod's VMM runs in the pod's cgroup, held to the VM's size",
        || {
            let vmm = crate::suites::shim::vmm_pids()
                .into_iter()
                .find(|&pid| {
                    capsa_cgroup::of_process(pid as u32).as_deref() == Some(pod_cgroup.as_str())
                })
                .with_context(|| format!("no VMM in {pod_cgroup}"))?;
            let max = std::fs::read_to_string(format!("/sys/fs/cgroup{pod_cgroup}/memory.max"))?;
            let max_mib = max.trim().parse::<u64>()? >> 20;
            // The VM's memory (1 GiB and the shim's overhead) and the VMM's own.
            ensure!((1024..=1600).contains(&max_mib), "memory.max {max_mib} MiB");
            Ok(format!(
                "VMM {vmm} in {pod_cgroup}, memory.max {max_mib} MiB"
            ))
        },
    );
    s.check("two pods talk over their CNI addresses", || {
        let mut last = String::new();
        // The server loops; give it a moment to listen.
        for _ in 0..10 {
            let out = c.exec_sync(&client_confined, &["nc", "-w", "5", &ip_a, "7000"])?;
            last = format!(
                "exit {}: {} {}",
                out.exit_code,
                text(&out.stdout),
                text(&out.stderr)
            );
            if text(&out.stdout) == "pong-from-a" {
                return Ok(format!("pod-b reached pod-a at {ip_a}:7000"));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        anyhow::bail!("pod-b could not reach {ip_a}:7000: {last}")
    });
    s.check(
        "a configMap-like host directory is in the container, read-only, and an update shows within 2 s",
        || {
            let cat = |path: &str| -> Result<(i32, String)> {
                let out = c.exec_sync(&talker, &["cat", path])?;
                Ok((out.exit_code, text(&out.stdout)))
            };
            let first = cat("/etc/settings/color")?;
            ensure!(first == (0, "red".into()), "before the update: {first:?}");
            let write = c.exec_sync(&talker, &["touch", "/etc/settings/new"])?;
            ensure!(write.exit_code != 0, "the container could write into the volume");
            write_config_map(&config_map, "v2", &[("color", "blue"), ("shape", "round")])?;
            std::fs::remove_dir_all(config_map.join("..v1"))?;
            let updated = Instant::now();
            loop {
                let asked = updated.elapsed();
                let now = cat("/etc/settings/color")?;
                if now == (0, "blue".into()) {
                    ensure!(
                        asked <= Duration::from_secs(2),
                        "the update showed {} ms after it was made",
                        asked.as_millis()
                    );
                    let shape = cat("/etc/settings/shape")?;
                    ensure!(shape == (0, "round".into()), "the new key: {shape:?}");
                    return Ok(format!("the update showed within {} ms", asked.as_millis()));
                }
                ensure!(asked < Duration::from_secs(10), "after 10 s: {now:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        },
    );
    s.check(
        "an emptyDir is shared by the pod's containers; a writable bind of another host directory is refused",
        || {
            let wrote = c.exec_sync(&reader, &["sh", "-c", "echo from-reader > /scratch/note"])?;
            ensure!(wrote.exit_code == 0, "writing: {}", text(&wrote.stderr));
            let read = c.exec_sync(&talker, &["cat", "/scratch/note"])?;
            ensure!(text(&read.stdout) == "from-reader", "the other container reads {:?}", text(&read.stdout));
            let host_data = c.containerd.dir.join("host-data");
            std::fs::create_dir_all(&host_data)?;
            let refused = c.start_in(
                &pod_b,
                cri::ContainerConfig {
                    mounts: vec![mount(&host_data, "/data", false)],
                    ..container_config("writer", &["true"], ProfileType::RuntimeDefault)
                },
            );
            let message = match refused {
                Ok(id) => anyhow::bail!("container {id} was created with a writable host directory"),
                Err(e) => e.to_string(),
            };
            ensure!(
                message.contains(&format!("the host directory {} is bound read-write", host_data.display())),
                "{message}"
            );
            Ok(message)
        },
    );
    s.check("a hostPort reaches the pod (CNI portmap)", || {
        use std::io::Read;
        let mut last = String::new();
        for _ in 0..10 {
            let reply =
                std::net::TcpStream::connect((BRIDGE_IP, HOST_PORT)).and_then(|mut conn| {
                    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let mut reply = String::new();
                    conn.read_to_string(&mut reply)?;
                    Ok(reply)
                });
            match reply {
                Ok(reply) if reply.trim() == "pong-from-a" => {
                    return Ok(format!("{BRIDGE_IP}:{HOST_PORT} reached pod-a's port 7000"))
                }
                Ok(reply) => last = format!("{reply:?}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        anyhow::bail!("{BRIDGE_IP}:{HOST_PORT}: {last}")
    });
    s.check(
        "containers' root filesystems are EROFS disks, one per image in a pod, none streamed",
        || {
            let lower = |id: &str| -> Result<String> {
                let mounts = text(&c.exec_sync(id, &["cat", "/proc/mounts"])?.stdout);
                mounts
                    .lines()
                    .find(|l| l.split_whitespace().nth(1) == Some("/"))
                    .and_then(|root| {
                        root.split([',', ' '])
                            .find_map(|o| o.strip_prefix("lowerdir="))
                    })
                    .map(str::to_string)
                    .with_context(|| format!("no lower layer for / in {mounts:?}"))
            };
            let (talker_lower, reader_lower) = (lower(&talker)?, lower(&reader)?);
            ensure!(
                talker_lower.starts_with("/run/capsa/layer-disks/rootfs"),
                "the root's lower layer is {talker_lower}"
            );
            ensure!(
                talker_lower == reader_lower,
                "two containers of one image: {talker_lower} and {reader_lower}"
            );
            let log = c.containerd.log();
            let written = log.matches("root filesystem written to disk").count();
            let shared = log.matches("an earlier container's image").count();
            let streamed = log.matches("root filesystem sent to the guest").count();
            ensure!(
                written >= 1 && shared >= 1 && streamed == 0,
                "{written} written, {shared} shared, {streamed} streamed"
            );
            Ok(format!(
                "lower layer {talker_lower}; {written} images written, {shared} shared, none streamed"
            ))
        },
    );
    s.check(
        "RuntimeDefault seccomp: unshare(CLONE_NEWUSER) fails with EPERM, unconfined it works",
        || {
            let confined = c.exec_sync(&client_confined, &["unshare", "-U", "true"])?;
            let unconfined = c.exec_sync(&client_unconfined, &["unshare", "-U", "true"])?;
            ensure!(
                unconfined.exit_code == 0,
                "unconfined: exit {}: {}",
                unconfined.exit_code,
                text(&unconfined.stderr)
            );
            let stderr = text(&confined.stderr);
            ensure!(
                confined.exit_code == 1 && stderr.contains("Operation not permitted"),
                "confined: exit {}: {stderr}",
                confined.exit_code
            );
            Ok(stderr)
        },
    );
    s.check(
        "a streamed exec (CRI Exec, WebSocket): stdout, stderr and the exit code",
        || {
            let session = c.exec_stream(
                &client_confined,
                &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 5"],
                false,
            )?;
            let out = session.finish(Duration::from_secs(60))?;
            ensure!(
                out.stdout.trim() == "to-stdout"
                    && out.stderr.trim() == "to-stderr"
                    && out.exit_code == Some(5),
                "{out:?}"
            );
            Ok(format!("{out:?}"))
        },
    );
    s.check(
        "a streamed exec with a TTY: a terminal of the client's size, stdin, and the exit code",
        || {
            let mut session = c.exec_stream(
                &client_confined,
                &[
                    "sh",
                    "-c",
                    "read line; test -t 0 && echo on-a-terminal; stty size; echo got:$line; exit 3",
                ],
                true,
            )?;
            session.resize(100, 30)?;
            // The size travels apart from stdin (ResizePty); let it land first.
            std::thread::sleep(Duration::from_secs(1));
            session.stdin(b"hello\r")?;
            let out = session.finish(Duration::from_secs(60))?;
            let lines: Vec<&str> = out
                .stdout
                .lines()
                .map(|l| l.trim_end_matches('\r'))
                .collect();
            for wanted in ["on-a-terminal", "30 100", "got:hello"] {
                ensure!(lines.contains(&wanted), "no {wanted:?} in {out:?}");
            }
            ensure!(out.exit_code == Some(3), "{out:?}");
            Ok(format!("{lines:?}, exit {:?}", out.exit_code))
        },
    );
    let log_line = |name: &str, line: &str| -> Result<String> {
        let path = logs.join("pod-b").join(format!("{name}.log"));
        let ending = format!(" stdout F {line}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            // CRI's format: TIMESTAMP STREAM TAG LINE.
            if let Some(found) = log.lines().find(|l| l.ends_with(&ending)) {
                return Ok(found.to_string());
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "no {line:?} in {} after 20 s: {log:?}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    s.check(
        "an exited container's output is in its CRI log file",
        || log_line("printer", "exited-line"),
    );
    s.check(
        "a running container's output is in its CRI log file",
        || log_line("talker", "running-line"),
    );
    s.check(
        "ContainerStats and ListContainers report the pods' containers",
        || {
            let stats = c
                .call(
                    "ContainerStats",
                    c.runtime_service()
                        .container_stats(cri::ContainerStatsRequest {
                            container_id: server.clone(),
                        }),
                )?
                .stats
                .context("no stats")?;
            let memory = stats
                .memory
                .and_then(|m| m.working_set_bytes)
                .map(|v| v.value)
                .unwrap_or(0);
            ensure!(memory > 0, "no memory working set: {memory}");
            let listed: Vec<String> = c
                .call(
                    "ListContainers",
                    c.runtime_service()
                        .list_containers(cri::ListContainersRequest { filter: None }),
                )?
                .containers
                .into_iter()
                .map(|c| c.id)
                .collect();
            for id in [&server, &client_confined, &client_unconfined] {
                ensure!(listed.contains(id), "{id} is not in {listed:?}");
            }
            Ok(format!(
                "working set {memory} bytes, {} containers",
                listed.len()
            ))
        },
    );
    s.check(
        "UpdateContainerResources sets the container's limits in the guest",
        || {
            let limit: i64 = 96 << 20;
            c.call(
                "UpdateContainerResources",
                c.runtime_service().update_container_resources(
                    cri::UpdateContainerResourcesRequest {
                        container_id: server.clone(),
                        linux: Some(cri::LinuxContainerResources {
                            memory_limit_in_bytes: limit,
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ),
            )?;
            // What the shim's Stats reads from the container's cgroup.
            let out = c.containerd.ctr(&[
                "-n",
                CRI_NAMESPACE,
                "task",
                "metrics",
                "--format",
                "json",
                &server,
            ])?;
            ensure!(out.code == Some(0), "ctr task metrics: {}", out.describe());
            let metrics: serde_json::Value = serde_json::from_str(&out.stdout)
                .with_context(|| format!("ctr task metrics: {}", out.describe()))?;
            let seen = metrics["memory"]["usage_limit"].as_i64();
            ensure!(seen == Some(limit), "memory.max is {seen:?}, not {limit}");
            Ok(format!("memory.max {limit}"))
        },
    );
    s.check(
        "ContainerStatus says running, then exited after StopContainer",
        || {
            let state = |id: &str| -> Result<i32> {
                Ok(c.call(
                    "ContainerStatus",
                    c.runtime_service()
                        .container_status(cri::ContainerStatusRequest {
                            container_id: id.into(),
                            verbose: false,
                        }),
                )?
                .status
                .context("no status")?
                .state)
            };
            ensure!(state(&client_unconfined)? == cri::ContainerState::ContainerRunning as i32);
            c.call(
                "StopContainer",
                c.runtime_service()
                    .stop_container(cri::StopContainerRequest {
                        container_id: client_unconfined.clone(),
                        timeout: 2,
                    }),
            )?;
            ensure!(state(&client_unconfined)? == cri::ContainerState::ContainerExited as i32);
            Ok("running, then exited".into())
        },
    );

    let ended: Result<()> = [&pod_a, &pod_b]
        .iter()
        .try_for_each(|pod| Ok(c.end_pod(&pod.id)?));
    s.check(
        "StopPodSandbox and RemovePodSandbox leave no VMM, sandbox or disk directory, mount, netns (nor its tap) or pod cgroup",
        || {
            ended?;
            // containerd's own (the sandboxes' shm, snapshots) and the
            // shim's (the bundles' rootfs) live under containerd's directory.
            let under = format!(" {}", c.containerd.dir.display());
            let mounts: Vec<String> = std::fs::read_to_string("/proc/mounts")?
                .lines()
                .filter(|l| l.contains(&under) || l.contains(" /run/capsa-shim"))
                .map(str::to_string)
                .collect();
            ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
            let cgroup =
                std::path::Path::new("/sys/fs/cgroup").join(pod_cgroup.trim_start_matches('/'));
            ensure!(!cgroup.exists(), "{} is left", cgroup.display());
            let vmms = crate::suites::shim::vmm_pids();
            ensure!(vmms.is_empty(), "VMMs left: {vmms:?}");
            let dirs: Vec<String> = std::fs::read_dir("/run/capsa-shim")
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|name| name != "jail-ids")
                        .collect()
                })
                .unwrap_or_default();
            ensure!(dirs.is_empty(), "sandbox directories left: {dirs:?}");
            let disks: Vec<String> = std::fs::read_dir(c.containerd.dir.join("disks"))
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            ensure!(disks.is_empty(), "disk directories left: {disks:?}");
            let netns: Vec<String> = std::fs::read_dir("/var/run/netns")
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            ensure!(netns.is_empty(), "network namespaces left: {netns:?}");
            Ok("none".into())
        },
    );
    Ok(())
}
