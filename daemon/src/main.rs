//! `capsad`: the Capsa daemon. Runs each container group in a microVM of
//! its own, keeps images (an OCI store), logs and state under its root,
//! and serves an HTTP/JSON API on a Unix socket (0600) for `capsa`.

mod config;
mod errors;
mod groups;
mod http;
mod logs;
mod metrics;
mod probes;
mod state;
mod tenants;
mod volumes;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Structured log lines with levels on stderr (journald keeps them under
/// the service): the daemon's own messages and every group event.
fn init_logs(level: LogLevel, format: LogFormat) {
    let level = match level {
        LogLevel::Error => tracing::Level::ERROR,
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Trace => tracing::Level::TRACE,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[derive(Parser)]
#[command(name = "capsad", version, about = "The Capsa daemon")]
struct Args {
    /// Settings from a TOML file: each flag as a key of the same name
    /// (`memory-budget-mib = 8192`, `dns = ["10.0.0.2"]`, `no-network =
    /// true`); flags given here win over it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State: images, groups, logs.
    #[arg(long, default_value = "/var/lib/capsa")]
    root: PathBuf,
    /// The API socket.
    #[arg(long, default_value = "/run/capsa/capsad.sock")]
    socket: PathBuf,
    /// The guest kernel (vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// The guest initramfs (with capsa-agent as /init).
    #[arg(long)]
    initrd: PathBuf,
    /// capsa-vmm (default: beside capsad, then PATH).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// The bridge groups' taps join (created when missing).
    #[arg(long, default_value = "capsa0")]
    bridge: String,
    /// Groups' addresses come from this subnet; its first address is the
    /// bridge's, the groups' gateway and DNS server.
    #[arg(long, default_value = "10.88.0.0/24")]
    subnet: capsa_network::Ipv4Net,
    /// DNS servers for names that are not groups' (default: the host's
    /// nameservers). Repeatable.
    #[arg(long = "dns", value_name = "ADDRESS")]
    dns: Vec<std::net::IpAddr>,
    /// Whether the default network's groups reach beyond the host
    /// (masqueraded to the host's own addresses, as docker's bridge).
    #[arg(long, value_enum, default_value_t = Switch::On)]
    egress: Switch,
    /// Groups get no network interface (vsock only).
    #[arg(long)]
    no_network: bool,
    /// Serve the API to tenants over TLS here, e.g. 0.0.0.0:7443 (with
    /// --tls-cert, --tls-key and --tenants); each request carries a
    /// tenant's bearer token, and a tenant reaches only what it made.
    #[arg(long, value_name = "ADDRESS:PORT", requires_all = ["tls_cert", "tls_key", "tenants"])]
    tls_listen: Option<std::net::SocketAddr>,
    /// The TLS listener's certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The TLS listener's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The tenants file (TOML): each `[[tenant]]` has a name, the SHA-256
    /// of its bearer token (token-sha256, in hex) and a [tenant.quota]
    /// (groups, vcpus, memory-mib, volume-mib).
    #[arg(long, value_name = "FILE")]
    tenants: Option<PathBuf>,
    /// The least important log lines written (to stderr).
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    log_level: LogLevel,
    /// Log lines as text, or as JSON objects (one per line) for a
    /// collector.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Also serve /metrics (Prometheus) over TCP here, e.g. 127.0.0.1:9464;
    /// it is always on the API socket.
    #[arg(long, value_name = "ADDRESS:PORT")]
    metrics_address: Option<std::net::SocketAddr>,
    /// A Docker Hub mirror (`http://HOST:PORT` or `https://HOST`), asked
    /// before Docker Hub for names such as `busybox`; repeatable, asked in
    /// order, as docker's `registry-mirrors`.
    #[arg(long = "registry-mirror", value_name = "URL", value_parser = mirror_url)]
    registry_mirrors: Vec<String>,
    /// The cgroup (v2) under which each VM gets one of its own, holding it
    /// to its memory, vCPUs and a thread count.
    #[arg(long, default_value = "/sys/fs/cgroup/capsa")]
    cgroup_parent: PathBuf,
    /// The most memory (MiB) one group's VM may ask for (default: the
    /// memory budget less a VMM's overhead).
    #[arg(long)]
    max_vm_memory_mib: Option<u64>,
    /// The most vCPUs one group's VM may ask for.
    #[arg(long)]
    max_vm_cpus: Option<u8>,
    /// The memory (MiB) all running VMs may hold together, each its
    /// guest's memory and its VMM's overhead (default: the host's memory
    /// less 512 MiB). A start beyond it is refused.
    #[arg(long)]
    memory_budget_mib: Option<u64>,
    /// Whether each VMM runs jailed: its own namespaces, an empty root,
    /// an unprivileged user and group of its own, no capabilities (off is
    /// for measuring what the jail costs).
    #[arg(long, value_enum, default_value_t = Switch::On)]
    jail: Switch,
    /// Whether each VMM runs under its seccomp filter, which kills it at a
    /// system call it does not make in its work (off is for measuring
    /// what the filter costs).
    #[arg(long, value_enum, default_value_t = Switch::On)]
    seccomp: Switch,
    /// The first of the user and group ids the jails run as, one per
    /// group; none may be an id anything else on the host uses.
    #[arg(long, default_value_t = capsa_jail::DEFAULT_IDS.first)]
    jail_first_id: u32,
    /// How many jail ids there are: one per group, and the last for the
    /// VMs templates are built from.
    #[arg(long, default_value_t = capsa_jail::DEFAULT_IDS.count)]
    jail_ids: u32,
    /// Whether group starts restore a clone of a template (a VM of the
    /// group's shape booted to its agent once, and snapshotted) instead
    /// of booting a kernel; the first start of a shape boots, and builds
    /// its template after. Off, every VM boots.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    templates: Switch,
    /// The rate limit of each disk of a group whose spec sets none, in
    /// bytes per second (reads and writes together); none by default.
    #[arg(long)]
    disk_bytes_per_sec: Option<u64>,
    /// The same, in requests per second.
    #[arg(long)]
    disk_ops_per_sec: Option<u64>,
    /// The rate limit of a group's network interface, each way, where its
    /// spec sets none: bytes per second.
    #[arg(long)]
    net_bytes_per_sec: Option<u64>,
    /// The same, in frames per second.
    #[arg(long)]
    net_ops_per_sec: Option<u64>,
}

/// A default rate limit from capsad's flags, checked as a spec's is.
fn default_rate(
    field: &str,
    bytes_per_sec: Option<u64>,
    ops_per_sec: Option<u64>,
) -> Result<Option<capsa_api::RateLimitSpec>> {
    if bytes_per_sec.is_none() && ops_per_sec.is_none() {
        return Ok(None);
    }
    let limit = capsa_api::RateLimitSpec {
        bytes_per_sec,
        ops_per_sec,
        burst_ms: None,
    };
    match limit.problems(field).first() {
        Some(problem) => anyhow::bail!("{problem}"),
        None => Ok(Some(limit)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

/// The VMs' parent cgroup, or None (said once) where the host has no
/// cgroup v2 with the memory, cpu and pids controllers.
fn cgroups(parent: &std::path::Path) -> Option<capsa_cgroup::Hierarchy> {
    match capsa_cgroup::Hierarchy::open(parent) {
        Ok(hierarchy) => Some(hierarchy),
        Err(e) => {
            tracing::warn!("VMs run without cgroup limits: {e}");
            None
        }
    }
}

/// A mirror must be an http(s) URL with a host and nothing after it.
fn mirror_url(text: &str) -> Result<String, String> {
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
        .ok_or("a mirror is http://HOST[:PORT] or https://HOST[:PORT]")?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains(['/', '?', '#', ' ']) {
        return Err("a mirror is http://HOST[:PORT] or https://HOST[:PORT], with no path".into());
    }
    Ok(text.trim_end_matches('/').to_string())
}

fn main() -> Result<()> {
    // capsad runs itself again, unprivileged, to convert a layer.
    if let Some(code) = capsa_image_store::converter::serve_if_asked() {
        std::process::exit(code);
    }
    let args = Args::parse_from(with_config(std::env::args_os().collect())?);
    init_logs(args.log_level, args.log_format);
    for file in [&args.kernel, &args.initrd] {
        anyhow::ensure!(file.is_file(), "{} does not exist", file.display());
    }
    let vmm = args
        .vmm
        .clone()
        .unwrap_or_else(capsa_vm_process::default_vmm);
    let images = capsa_image_store::ImageStore::open(&args.root.join("images"))
        .context("opening the image store")?;
    // Group state holds the groups' secrets: for root's eyes only.
    let groups = args.root.join("groups");
    std::fs::create_dir_all(&groups).with_context(|| format!("creating {}", groups.display()))?;
    std::fs::set_permissions(&groups, std::fs::Permissions::from_mode(0o700))?;
    let network = if args.no_network {
        None
    } else {
        let dns = if args.dns.is_empty() {
            host_nameservers()
        } else {
            args.dns.clone()
        };
        let config = capsa_network::NetworkConfig {
            bridge: args.bridge.clone(),
            subnet: args.subnet,
            egress: args.egress == Switch::On,
            store: args.root.join("networks"),
            upstream_dns: dns
                .into_iter()
                .map(|ip| std::net::SocketAddr::new(ip, 53))
                .collect(),
        };
        let networks = capsa_network::Networks::start(config).context(
            "setting up the group networks (capsad needs CAP_NET_ADMIN and nftables; --no-network runs without)",
        )?;
        if networks.firewall_by_tap_name() {
            tracing::warn!(
                "this kernel's nftables cannot tell a frame's bridge (no nft_meta_bridge): taps are held by their names, so a second capsad's groups on this host would be cut off"
            );
        }
        Some(networks)
    };
    let layer_images =
        capsa_image_store::layer_images::LayerImages::open(&args.root.join("layer-images"))
            .and_then(|l| l.isolated(PathBuf::from("/proc/self/exe")))
            .context("cannot open the layer images")?;
    // The last id is the template builds'.
    let jail_ids = match args.jail {
        Switch::Off => None,
        Switch::On => {
            anyhow::ensure!(
                args.jail_ids >= 2,
                "--jail-ids must be at least 2: one per group, and one for building templates"
            );
            Some((
                capsa_jail::IdRange {
                    first: args.jail_first_id,
                    count: args.jail_ids - 1,
                },
                args.jail_first_id
                    .checked_add(args.jail_ids - 1)
                    .context("--jail-first-id and --jail-ids go past the last user id")?,
            ))
        }
    };
    let daemon = groups::Daemon::new(
        args.root.clone(),
        images,
        layer_images,
        capsa_vm_process::VmConfig {
            vmm,
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
            seccomp: match args.seccomp {
                Switch::On => capsa_vmm_config::Seccomp::Kill,
                Switch::Off => capsa_vmm_config::Seccomp::Off,
            },
        },
        network,
        capsa_volumes::VolumeStore::open(&args.root.join("volumes"))
            .context("opening the volume store")?,
        groups::Settings {
            registry_mirrors: args.registry_mirrors.clone(),
            cgroups: cgroups(&args.cgroup_parent),
            capacity: groups::admission::Capacity::of_host(
                args.max_vm_memory_mib,
                args.max_vm_cpus,
                args.memory_budget_mib,
            ),
            jail_ids: jail_ids.map(|(groups, _)| groups),
            template_jail_id: jail_ids.map(|(_, template)| template),
            templates: match args.templates {
                Switch::On => Some(
                    capsa_templates::Templates::open(&args.root.join("templates"))
                        .context("opening the templates")?,
                ),
                Switch::Off => None,
            },
            default_disk_rate: default_rate(
                "--disk-*-per-sec",
                args.disk_bytes_per_sec,
                args.disk_ops_per_sec,
            )?,
            default_network_rate: default_rate(
                "--net-*-per-sec",
                args.net_bytes_per_sec,
                args.net_ops_per_sec,
            )?,
        },
    )
    .context("opening capsad's state")?;
    daemon.restore();
    if let Err(e) = daemon.forget_gone_owners() {
        tracing::warn!("the owners table: {e}");
    }
    let tenants_listener = match &args.tls_listen {
        None => None,
        Some(address) => {
            let (Some(cert), Some(key), Some(tenants)) =
                (&args.tls_cert, &args.tls_key, &args.tenants)
            else {
                anyhow::bail!("--tls-listen needs --tls-cert, --tls-key and --tenants");
            };
            let tenants = tenants::Tenants::load(tenants)?;
            if tenants.is_empty() {
                tracing::warn!(
                    "the tenants file names no tenant: the TLS listener will refuse every request"
                );
            }
            let acceptor = http::tls::acceptor(cert, key)?;
            Some((*address, acceptor, std::sync::Arc::new(tenants)))
        }
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        if let Some(dir) = args.socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&args.socket);
        let listener = tokio::net::UnixListener::bind(&args.socket)
            .with_context(|| format!("listening on {}", args.socket.display()))?;
        std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600))?;
        tracing::info!("listening on {}", args.socket.display());
        if let Some(address) = args.metrics_address {
            let metrics = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("serving metrics on {address}"))?;
            let router = http::metrics_router(daemon.clone());
            tokio::spawn(async move {
                if let Err(e) = axum::serve(metrics, router).await {
                    tracing::warn!("the metrics listener stopped: {e}");
                }
            });
        }
        if let Some((address, acceptor, tenants)) = tenants_listener {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("listening for tenants on {address}"))?;
            tracing::info!("serving tenants over TLS on {address}");
            let router = http::tenant_router(daemon.clone(), tenants);
            tokio::spawn(http::tls::serve(listener, acceptor, router));
        }
        let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
        let signalled = stopping.clone();
        let served =
            axum::serve(listener, http::router(daemon)).with_graceful_shutdown(async move {
                stop_signal().await;
                signalled.notify_one();
            });
        // A client that never hangs up (an event stream) delays the stop
        // by STOP_PATIENCE at most.
        tokio::select! {
            served = served => served.context("serving the API"),
            () = async {
                stopping.notified().await;
                tokio::time::sleep(STOP_PATIENCE).await;
            } => Ok(()),
        }
    })
}

/// The command line with the settings of its `--config FILE` put first.
fn with_config(args: Vec<std::ffi::OsString>) -> Result<Vec<std::ffi::OsString>> {
    use clap::CommandFactory;
    let command = Args::command();
    let (mut flags, mut switches) = (Vec::new(), Vec::new());
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if arg.get_action().takes_values() {
            flags.push(long.to_string());
        } else if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
            switches.push(long.to_string());
        }
    }
    Ok(config::expand(args, &flags, &switches)?)
}

/// Resolves at SIGINT or SIGTERM (a service manager's stop). The groups'
/// VMs keep running and the next capsad adopts them.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).ok();
    let terminated = async {
        match terminate.as_mut() {
            Some(terminate) => {
                terminate.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminated => {}
    }
    tracing::info!("stopping; the groups keep running, and the next capsad adopts them");
}

/// How long requests under way (a log follower, an event stream) may go
/// on after a stop signal.
const STOP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// The host's nameservers a group can use through the daemon: loopback
/// ones (a local cache) are fine, since the daemon asks on their behalf.
fn host_nameservers() -> Vec<std::net::IpAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args> {
        let args = with_config(args.iter().map(std::ffi::OsString::from).collect())?;
        Ok(Args::try_parse_from(args)?)
    }

    #[test]
    fn the_example_config_sets_every_flag_it_names() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/capsad.toml");
        let args = parse(&["capsad", "--config", file]).unwrap();
        assert_eq!(args.root, PathBuf::from("/var/lib/capsa"));
        assert_eq!(args.jail_ids, 65536);
        assert_eq!(args.egress, Switch::On);
        assert!(args.kernel.ends_with("vmlinux"));
    }

    #[test]
    fn the_command_line_wins_over_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "kernel = \"/k\"\ninitrd = \"/i\"\nroot = \"/from-file\"\nno_network = true\ndns = [\"10.0.0.2\"]\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();
        let args = parse(&["capsad", "--root", "/flag", "--config", file]).unwrap();
        assert_eq!(args.root, PathBuf::from("/flag"));
        assert!(args.no_network);
        assert_eq!(args.dns, ["10.0.0.2".parse::<std::net::IpAddr>().unwrap()]);
        let args = parse(&["capsad", "--config", file, "--dns=10.0.0.9"]).unwrap();
        assert_eq!(args.dns, ["10.0.0.9".parse::<std::net::IpAddr>().unwrap()]);
        let Err(error) = parse(&["capsad", "--config", "/nonexistent.toml"]) else {
            panic!("a missing config file was taken");
        };
        assert!(error.to_string().contains("/nonexistent.toml"), "{error}");
    }
}
