//! `capsa`: run and manage container groups through capsad.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use capsa_api::exec::ExecRequest;
use capsa_api::{ApiError, ErrorCode, Event, GroupStats};
use capsa_api::{
    ContainerSpec, GroupSpec, GroupView, ImageView, ImportRequest, LogLine, PersistentSpec,
    PortSpec, PullRequest, RestartPolicy, VolumeGrowRequest, VolumeMount, VolumeRequest,
    VolumeSpec, VolumeView, WaitResponse,
};
use clap::{Parser, Subcommand};
use hyper::Method;

use capsa_cli::client::{self, Client, Endpoint};

mod copy;
mod credentials;
mod env;
mod networks;
mod progress;
mod signals;
mod system;
mod units;

#[derive(Parser)]
#[command(
    name = "capsa",
    version,
    about = "Container groups in microVMs, through capsad"
)]
struct Cli {
    /// capsad's API socket.
    #[arg(
        long,
        env = "CAPSA_SOCKET",
        default_value = "/run/capsa/capsad.sock",
        global = true
    )]
    socket: PathBuf,
    /// capsad elsewhere: https://HOST:PORT (its TLS listener, as a tenant
    /// with --token) or unix:///PATH; the socket above unless given.
    #[arg(long, env = "CAPSA_HOST", global = true)]
    host: Option<String>,
    /// The tenant's bearer token for the TLS listener.
    #[arg(long, env = "CAPSA_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The CA certificate (PEM) that signed capsad's TLS certificate; the
    /// usual web roots unless given.
    #[arg(long, env = "CAPSA_TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,
    /// JSON instead of tables, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per invocation: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run IMAGE in a one-container group; attached, it prints the output
    /// and exits with the container's exit code.
    Run {
        /// Print the group's name and return at once.
        #[arg(short = 'd', long)]
        detach: bool,
        /// Delete the group when it has exited: capsad does, whether or
        /// not this command is still there.
        #[arg(long)]
        rm: bool,
        /// Boot the group's microVM from its kernel at every start, never
        /// from one of capsad's templates.
        #[arg(long)]
        cold_boot: bool,
        /// Keep the container's input open and send this terminal's to it.
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Give the container a terminal (this one, when attached: Ctrl-P
        /// Ctrl-Q detaches).
        #[arg(short = 't', long)]
        tty: bool,
        #[arg(long)]
        name: Option<String>,
        /// CPUs, as docker takes them (2, 0.5): the VM gets that many
        /// vCPUs, rounded up, and a fraction also limits its CPU time.
        #[arg(long, value_parser = units::parse_cpus)]
        cpus: Option<units::Cpus>,
        /// Host CPU time the whole VM may use, in CPUs (0.5: half of one);
        /// its vCPUs unless given.
        #[arg(long)]
        cpu_limit: Option<f64>,
        /// The VM's memory: 512m, 1.5g, or a number of MiB.
        #[arg(short = 'm', long, value_parser = units::parse_mib)]
        memory: Option<u64>,
        /// Disk for the container's writable layer (10g unless given: 512m,
        /// 20g, or a number of MiB); 0 keeps it in the VM's memory (a
        /// tmpfs) instead.
        #[arg(long, value_parser = units::parse_mib)]
        scratch: Option<u64>,
        /// KEY=VALUE, or KEY for the value this shell has.
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        /// A file of KEY=VALUE (or KEY) lines, read before -e.
        #[arg(long = "env-file")]
        env_file: Vec<PathBuf>,
        /// KEY=VALUE, a label of the group.
        #[arg(short = 'l', long = "label")]
        label: Vec<String>,
        /// Start the container again when it exits: never, on-failure or
        /// always.
        #[arg(long, default_value = "never", value_parser = parse_restart_policy)]
        restart: RestartPolicy,
        /// Mount a named volume: NAME:PATH[:ro] (made, 1 GiB, when missing).
        #[arg(short = 'v', long = "volume")]
        volume: Vec<String>,
        /// Publish a port: [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp]
        /// (the host IP is 127.0.0.1 unless given).
        #[arg(short = 'p', long = "publish")]
        publish: Vec<PortSpec>,
        /// Run this program instead of the image's entrypoint; as with
        /// docker, the image's command is then not appended (the
        /// arguments after IMAGE are the program's).
        #[arg(long)]
        entrypoint: Option<String>,
        /// Run as USER[:GROUP] (names or numbers), instead of the image's
        /// user.
        #[arg(short = 'u', long)]
        user: Option<String>,
        /// The working directory, instead of the image's.
        #[arg(short = 'w', long)]
        workdir: Option<String>,
        /// Stop the container with this signal, instead of the image's
        /// (SIGTERM when it names none).
        #[arg(long)]
        stop_signal: Option<String>,
        /// Pull the image first: when the store does not have it
        /// (missing), every time (always), or never.
        #[arg(long, value_enum, default_value_t = PullPolicy::Missing)]
        pull: PullPolicy,
        /// The network the group joins (the default network unless given).
        #[arg(long)]
        network: Option<String>,
        /// Give the container a capability beyond Docker's default set
        /// (NET_ADMIN, SYS_ADMIN...); repeatable. It reaches the guest's
        /// kernel, not the host's.
        #[arg(long = "cap-add")]
        cap_add: Vec<String>,
        image: String,
        /// The command, instead of the image's.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Create a group from a spec file (JSON, or YAML when named .yaml or
    /// .yml), without starting it.
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    Start {
        name: String,
    },
    /// Stop, then start again.
    Restart {
        name: String,
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(short = 't', long)]
        timeout: Option<u64>,
    },
    /// Print a shell completion script (bash, zsh, fish, ...).
    Completions {
        shell: clap_complete::Shell,
    },
    Stop {
        name: String,
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(short = 't', long)]
        timeout: Option<u64>,
    },
    /// Delete groups (stopping them first).
    Rm {
        names: Vec<String>,
    },
    /// List groups.
    Ps,
    Inspect {
        name: String,
    },
    /// A container's output: GROUP or GROUP/CONTAINER.
    Logs {
        target: String,
        #[arg(short = 'f', long)]
        follow: bool,
        #[arg(long)]
        tail: Option<usize>,
        /// Unix milliseconds.
        #[arg(long)]
        since: Option<u64>,
    },
    /// Run a command in a running container: GROUP[/CONTAINER] -- CMD...
    Exec {
        /// Forward this terminal's input.
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Run the command on a terminal.
        #[arg(short = 't', long)]
        tty: bool,
        target: String,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// What a running group uses: its VMM on the host, its containers.
    Stats {
        name: String,
    },
    /// Stream events (created, started, died, stopped, failed, deleted).
    Events,
    /// Wait for a container to exit and exit with its code.
    Wait {
        target: String,
    },
    /// Attach this terminal to a running container: its output from now
    /// on, its input when it keeps it open (`run -i`); Ctrl-P Ctrl-Q
    /// detaches from a terminal. GROUP[/CONTAINER].
    Attach {
        target: String,
    },
    /// The processes of a running container: GROUP[/CONTAINER].
    Top {
        target: String,
    },
    /// The ports a group publishes, as CONTAINER_PORT/PROTOCOL -> HOST:PORT.
    Port {
        name: String,
    },
    /// Send a signal to a running container's main process:
    /// GROUP[/CONTAINER].
    Kill {
        /// A name (TERM, SIGTERM) or a number.
        #[arg(short = 's', long, default_value = "KILL")]
        signal: String,
        target: String,
    },
    /// Copy a file or directory between this host and a running
    /// container: `cp SRC GROUP[/CONTAINER]:DEST` or `cp GROUP[/CONTAINER]:SRC
    /// DEST`; `-` is a tar on stdin or stdout.
    Cp {
        source: String,
        destination: String,
    },
    /// Check credentials with a registry (through capsad) and keep them as
    /// docker does (config.json, or its credential helper); pulls from
    /// that registry then use them.
    Login {
        /// host[:port]; Docker Hub unless given.
        server: Option<String>,
        #[arg(short = 'u', long)]
        username: String,
        /// The password (visible to other users of this host: prefer
        /// --password-stdin).
        #[arg(short = 'p', long, conflicts_with = "password_stdin")]
        password: Option<String>,
        #[arg(long)]
        password_stdin: bool,
        /// Plain HTTP (always for localhost and 127.0.0.1).
        #[arg(long)]
        insecure: bool,
    },
    /// Forget a registry's credentials.
    Logout {
        server: Option<String>,
    },
    /// capsad itself: info, df, prune.
    #[command(subcommand)]
    System(system::SystemCommand),
    /// This command's version, capsad's, and who capsad takes the caller
    /// for (a tenant, or the host's admin).
    Version,
    #[command(subcommand)]
    Image(ImageCommand),
    /// Named persistent volumes (ext4 disks kept until removed).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Group networks (a bridge, a subnet and a DNS of their own each).
    #[command(subcommand)]
    Network(networks::NetworkCommand),
}

#[derive(Subcommand)]
enum VolumeCommand {
    Create {
        name: String,
        /// 512m, 20g, or a number of MiB.
        #[arg(long, default_value_t = DEFAULT_VOLUME_MIB, value_parser = units::parse_mib)]
        size: u64,
    },
    Ls,
    /// Grow a volume (not attached to a running group) and its file system.
    Grow {
        name: String,
        /// The new size: 2g, or a number of MiB.
        #[arg(long, value_parser = units::parse_mib)]
        size: u64,
    },
    /// Delete volumes and their data.
    Rm {
        names: Vec<String>,
    },
}

/// The size of a volume made by `capsa volume create` or `run -v` unless
/// given (a sparse file: unused space costs nothing).
const DEFAULT_VOLUME_MIB: u64 = 1024;

#[derive(Subcommand)]
enum ImageCommand {
    /// Push an image to a registry (credentials from capsa login), as
    /// TARGET (`registry/repository[:tag]`) or under its own name.
    Push {
        name: String,
        target: Option<String>,
        /// Plain HTTP (always for localhost and 127.0.0.1).
        #[arg(long)]
        insecure: bool,
    },
    /// Give an image another name: SOURCE TARGET.
    Tag {
        source: String,
        target: String,
    },
    /// Remove every image no group uses.
    Prune,
    /// Import an OCI layout directory, an oci-archive or a docker-save tar
    /// (a path on the daemon's host).
    Import {
        path: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// Pull from an OCI registry, showing progress.
    Pull {
        reference: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        username: Option<String>,
        /// Read the password from standard input.
        #[arg(long, requires = "username")]
        password_stdin: bool,
        /// Plain HTTP (always for localhost and 127.0.0.1).
        #[arg(long)]
        insecure: bool,
    },
    Ls,
    /// An image's digest, size and layers.
    Inspect {
        name: String,
    },
    Rm {
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("capsa: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// GROUP/CONTAINER, or GROUP alone for its only (or first) container.
fn target(client: &Client, text: &str) -> Result<(String, String)> {
    if let Some((group, container)) = text.split_once('/') {
        return Ok((group.to_string(), container.to_string()));
    }
    let view: GroupView = client.call(Method::GET, &format!("/v1/groups/{text}"), None)?;
    let container = view
        .containers
        .first()
        .context("the group has no containers")?;
    Ok((text.to_string(), container.name.clone()))
}

fn run(cli: Cli) -> Result<u8> {
    let endpoint = match &cli.host {
        Some(host) => Endpoint::parse(host, cli.tls_ca.as_deref(), cli.token.clone())?,
        None => Endpoint::Unix(cli.socket.clone()),
    };
    let client = Client::to(endpoint.clone())?;
    match cli.command {
        Command::Run {
            detach,
            rm,
            cold_boot,
            interactive,
            tty,
            name,
            cpus,
            cpu_limit,
            memory,
            scratch,
            env,
            env_file,
            label,
            publish,
            restart,
            volume,
            entrypoint,
            user,
            workdir,
            stop_signal,
            pull,
            network,
            cap_add,
            image,
            args,
        } => {
            let (volumes, volume_mounts) = volume_options(&volume)?;
            let name = name
                .unwrap_or_else(|| format!("run-{:08x}", std::process::id() ^ (now_ms() as u32)));
            let variables = env::variables(&env, &env_file, |name| std::env::var(name).ok())?;
            let mut labels = BTreeMap::new();
            for pair in label {
                let (key, value) = pair
                    .split_once('=')
                    .with_context(|| format!("--label {pair}: expected KEY=VALUE"))?;
                labels.insert(key.to_string(), value.to_string());
            }
            let spec = GroupSpec {
                name: name.clone(),
                containers: vec![ContainerSpec {
                    name: "main".into(),
                    image: image.clone(),
                    command: entrypoint.map(|program| vec![program]),
                    args: (!args.is_empty()).then_some(args),
                    env: variables,
                    working_dir: workdir,
                    user,
                    stop_signal,
                    cpu_limit: None,
                    memory_limit_mib: None,
                    cpu_request: None,
                    memory_request_mib: None,
                    tty,
                    stdin: interactive,
                    ports: publish,
                    volume_mounts,
                    cap_add,
                    liveness_probe: None,
                    readiness_probe: None,
                }],
                cpus: cpus.map(units::Cpus::vcpus),
                cpu_limit: cpu_limit.or_else(|| cpus.and_then(units::Cpus::limit)),
                memory_mib: memory,
                labels,
                restart_policy: restart,
                volumes,
                scratch_mib: scratch,
                disk_rate_limit: None,
                network_rate_limit: None,
                network,
                auto_remove: rm,
                cold_boot,
                init_containers: Vec::new(),
            };
            create_pulling(&client, &spec, &image, pull)?;
            // Attached, the exit and the output are asked for before the
            // start: capsad keeps an auto-removed group (--rm) until both
            // have been sent, however soon it ends.
            // Keys go to a terminal's container as they are; else this
            // command's signals are passed on.
            let keys_to_terminal = interactive && tty;
            if !detach && !keys_to_terminal {
                signals::proxy(endpoint.clone(), name.clone(), "main".into());
            }
            if !detach && (interactive || tty) {
                return run_interactive(&client, &name, interactive, tty, rm);
            }
            let attached = if detach {
                None
            } else {
                let waiting = client.begin(
                    Method::POST,
                    &format!("/v1/groups/{name}/containers/main/wait"),
                    None,
                )?;
                Some((
                    waiting,
                    begin_logs(&client, &name, "main", true, None, None)?,
                ))
            };
            // Attached, the container's stderr is ours: steps only go to a
            // terminal there.
            let started = start_group(&client, &name, detach || std::io::stderr().is_terminal());
            if let Err(e) = started {
                // A group that never started is not removed by capsad.
                if rm {
                    let _: Result<serde_json::Value> =
                        client.call(Method::DELETE, &format!("/v1/groups/{name}"), None);
                }
                return Err(e);
            }
            let Some((waiting, following)) = attached else {
                println!("{name}");
                return Ok(0);
            };
            print_logs(&client, following)?;
            let exit: WaitResponse = client.finish(waiting, |_| {})?;
            if rm {
                // As docker's: the group, its volumes' attachments and its
                // ports are gone when the command returns.
                wait_removed(&client, &name)?;
            }
            Ok(exit.exit_code.clamp(0, 255) as u8)
        }
        Command::Create { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let view: GroupView =
                client.call(Method::POST, "/v1/groups", Some(spec_json(&file, &text)?))?;
            if cli.json {
                print_json(&view)?;
            } else {
                println!("{}", view.name);
            }
            Ok(0)
        }
        Command::Restart { name, timeout } => {
            let query = timeout.map(|t| format!("?timeout={t}")).unwrap_or_default();
            let _: GroupView = client.call(
                Method::POST,
                &format!("/v1/groups/{name}/stop{query}"),
                None,
            )?;
            let view = start_group(&client, &name, true)?;
            println!("{}", view.name);
            Ok(0)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "capsa", &mut std::io::stdout());
            Ok(0)
        }
        Command::Start { name } => {
            let view = start_group(&client, &name, true)?;
            println!("{}", view.name);
            Ok(0)
        }
        Command::Stop { name, timeout } => {
            let query = timeout.map(|t| format!("?timeout={t}")).unwrap_or_default();
            let view: GroupView = client.call(
                Method::POST,
                &format!("/v1/groups/{name}/stop{query}"),
                None,
            )?;
            println!("{}", view.name);
            Ok(0)
        }
        Command::Rm { names } => {
            for name in names {
                let _: serde_json::Value =
                    client.call(Method::DELETE, &format!("/v1/groups/{name}"), None)?;
                println!("{name}");
            }
            Ok(0)
        }
        Command::Ps => {
            let groups: Vec<GroupView> = client.call(Method::GET, "/v1/groups", None)?;
            if cli.json {
                print_json(&groups)?;
                return Ok(0);
            }
            println!(
                "{:<24} {:<9} {:<15} {:>4} {:>7}  CONTAINERS",
                "NAME", "STATUS", "IP", "CPUS", "MEMORY"
            );
            for group in groups {
                let containers: Vec<String> = group
                    .containers
                    .iter()
                    .map(|c| {
                        let mut state = format!("{:?}", c.status).to_lowercase();
                        if let Some(code) = c.exit_code {
                            state.push_str(&format!(", {code}"));
                        }
                        if c.restart_count > 0 {
                            state.push_str(&format!(", {} restarts", c.restart_count));
                        }
                        format!("{} ({state})", c.name)
                    })
                    .collect();
                println!(
                    "{:<24} {:<9} {:<15} {:>4} {:>6}M  {}",
                    group.name,
                    format!("{:?}", group.status).to_lowercase(),
                    group.ip.map(|ip| ip.to_string()).unwrap_or("-".into()),
                    group.cpus,
                    group.memory_mib,
                    containers.join(", ")
                );
            }
            Ok(0)
        }
        Command::Inspect { name } => {
            let view: GroupView = client.call(Method::GET, &format!("/v1/groups/{name}"), None)?;
            print_json(&view)?;
            Ok(0)
        }
        Command::Logs {
            target: text,
            follow,
            tail,
            since,
        } => {
            let (group, container) = target(&client, &text)?;
            follow_logs(&client, &group, &container, follow, tail, since)?;
            Ok(0)
        }
        Command::Exec {
            interactive,
            tty,
            target: text,
            command,
        } => {
            let (group, container) = target(&client, &text)?;
            let (rows, columns) = client::terminal_size().unwrap_or((24, 80));
            let request = ExecRequest {
                command,
                tty,
                stdin: interactive,
                rows,
                columns,
            };
            let code = client.exec(
                &format!("/v1/groups/{group}/containers/{container}/exec"),
                &request,
            )?;
            Ok(code.clamp(0, 255) as u8)
        }
        Command::Stats { name } => {
            let stats: GroupStats =
                client.call(Method::GET, &format!("/v1/groups/{name}/stats"), None)?;
            if cli.json {
                print_json(&stats)?;
                return Ok(0);
            }
            println!(
                "group {}: VMM RSS {:.1} MiB, VMM CPU {:.2} s, network {} B in / {} B out, disk {} B read / {} B written",
                stats.group,
                stats.vmm_rss_kib as f64 / 1024.0,
                stats.vmm_cpu_seconds,
                stats.net_to_guest_bytes,
                stats.net_from_guest_bytes,
                stats.block_read_bytes,
                stats.block_write_bytes
            );
            println!(
                "{:<16} {:>12} {:>12} {:>12} {:>6}",
                "CONTAINER", "CPU s", "MEMORY", "LIMIT", "PIDS"
            );
            for c in stats.containers {
                let limit = if c.memory_limit_bytes == 0 {
                    "-".to_string()
                } else {
                    format!("{:.1}M", c.memory_limit_bytes as f64 / 1048576.0)
                };
                println!(
                    "{:<16} {:>12.3} {:>11.1}M {:>12} {:>6}",
                    c.name,
                    c.cpu_usage_usec as f64 / 1e6,
                    c.memory_bytes as f64 / 1048576.0,
                    limit,
                    c.pids
                );
            }
            Ok(0)
        }
        Command::Events => {
            let mut pending = Vec::new();
            let json = cli.json;
            client.stream("/v1/events", |chunk| {
                pending.extend_from_slice(chunk);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let event: Event = serde_json::from_slice(&line)?;
                    let mut out = std::io::stdout().lock();
                    if json {
                        writeln!(out, "{}", String::from_utf8_lossy(&line).trim_end())?;
                    } else {
                        let subject = match &event.container {
                            Some(c) => format!("{}/{c}", event.group),
                            None => event.group.clone(),
                        };
                        let detail = event.detail.map(|d| format!(" ({d})")).unwrap_or_default();
                        writeln!(out, "{} {} {subject}{detail}", event.time, event.action)?;
                    }
                    out.flush()?;
                }
                Ok(())
            })?;
            Ok(0)
        }
        Command::Wait { target: text } => {
            let (group, container) = target(&client, &text)?;
            let exit: WaitResponse = client.call(
                Method::POST,
                &format!("/v1/groups/{group}/containers/{container}/wait"),
                None,
            )?;
            if cli.json {
                print_json(&exit)?;
            }
            Ok(exit.exit_code.clamp(0, 255) as u8)
        }
        Command::Attach { target: text } => {
            let (group, container) = target(&client, &text)?;
            let view: GroupView = client.call(Method::GET, &format!("/v1/groups/{group}"), None)?;
            let spec = view
                .spec
                .containers
                .iter()
                .find(|c| c.name == container)
                .with_context(|| format!("no container {container} in {group}"))?;
            let session = client::Session {
                stdin: spec.stdin,
                tty: spec.tty,
            };
            if !(session.stdin && session.tty) {
                signals::proxy(endpoint.clone(), group.clone(), container.clone());
            }
            let path = format!("/v1/groups/{group}/containers/{container}/attach");
            match client.interactive(&path, None, session, || {})? {
                client::Ended::Exited(code) => Ok(code.clamp(0, 255) as u8),
                client::Ended::Detached => {
                    eprintln!("capsa: detached from {group}/{container}");
                    Ok(0)
                }
            }
        }
        Command::Top { target: text } => {
            let (group, container) = target(&client, &text)?;
            let processes: Vec<capsa_api::ProcessView> = client.call(
                Method::GET,
                &format!("/v1/groups/{group}/containers/{container}/top"),
                None,
            )?;
            if cli.json {
                print_json(&processes)?;
            } else {
                println!("{:>7} {:>7}  COMMAND", "PID", "UID");
                for p in processes {
                    println!("{:>7} {:>7}  {}", p.pid, p.uid, p.command);
                }
            }
            Ok(0)
        }
        Command::Port { name } => {
            let view: GroupView = client.call(Method::GET, &format!("/v1/groups/{name}"), None)?;
            let ports: Vec<_> = view.spec.containers.iter().flat_map(|c| &c.ports).collect();
            if cli.json {
                print_json(&ports)?;
            } else {
                for port in ports {
                    println!("{port}");
                }
            }
            Ok(0)
        }
        Command::Cp {
            source,
            destination,
        } => copy::run(&client, &source, &destination, target),
        Command::Login {
            server,
            username,
            password,
            password_stdin,
            insecure,
        } => {
            let registry = server.unwrap_or_else(|| "docker.io".to_string());
            let password = match password {
                Some(password) => password,
                None if password_stdin || !client::stdin_is_terminal() => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
                None => client::read_secret("Password: ")?,
            };
            let request = capsa_api::LoginRequest {
                registry: registry.clone(),
                username: username.clone(),
                password: password.clone(),
                insecure,
            };
            let _: capsa_api::LoginView = client.call(
                Method::POST,
                "/v1/registries/login",
                Some(serde_json::to_string(&request)?),
            )?;
            let path = credentials::Credentials::default_path()?;
            credentials::Credentials::open(&path)?.store(&registry, &username, &password)?;
            println!("Login Succeeded");
            Ok(0)
        }
        Command::Logout { server } => {
            let registry = server.unwrap_or_else(|| "docker.io".to_string());
            let path = credentials::Credentials::default_path()?;
            if credentials::Credentials::open(&path)?.erase(&registry)? {
                println!(
                    "Removing login credentials for {}",
                    credentials::server_key(&registry)
                );
            } else {
                println!("Not logged in to {}", credentials::server_key(&registry));
            }
            Ok(0)
        }
        Command::Version => {
            let server: capsa_api::VersionView = client.call(Method::GET, "/v1/version", None)?;
            let client_version = env!("CARGO_PKG_VERSION");
            if cli.json {
                print_json(&serde_json::json!({"client": client_version, "server": server}))?;
            } else {
                println!("capsa   {client_version}");
                println!("capsad  {} (API {})", server.version, server.api);
                println!(
                    "caller  {} at {}",
                    server
                        .tenant
                        .map_or("the host's admin".to_string(), |t| format!("tenant {t}")),
                    client.endpoint().describe()
                );
            }
            Ok(0)
        }
        Command::Kill {
            signal,
            target: text,
        } => {
            let signal = capsa_api::signal::number(&signal)
                .with_context(|| format!("--signal {signal}: not a signal"))?;
            let (group, container) = target(&client, &text)?;
            let _: serde_json::Value = client.call(
                Method::POST,
                &format!("/v1/groups/{group}/containers/{container}/kill?signal={signal}"),
                None,
            )?;
            Ok(0)
        }
        Command::Image(ImageCommand::Import { path, name }) => {
            let path =
                std::fs::canonicalize(&path).with_context(|| format!("{}", path.display()))?;
            let request = ImportRequest {
                path: path.to_string_lossy().into_owned(),
                name,
            };
            store_image(&client, "/v1/images/import", &request, cli.json)
        }
        Command::Image(ImageCommand::Pull {
            reference,
            name,
            username,
            password_stdin,
            insecure,
        }) => {
            let (username, password) = if password_stdin {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                (username, Some(line.trim_end().to_string()))
            } else if username.is_none() {
                match credentials::for_reference(&reference) {
                    Some((user, password)) => (Some(user), Some(password)),
                    None => (None, None),
                }
            } else {
                (username, None)
            };
            let request = PullRequest {
                reference,
                name,
                username,
                password,
                insecure,
            };
            store_image(&client, "/v1/images/pull", &request, cli.json)
        }
        Command::Image(ImageCommand::Ls) => {
            let images: Vec<ImageView> = client.call(Method::GET, "/v1/images", None)?;
            if cli.json {
                print_json(&images)?;
                return Ok(0);
            }
            println!("{:<40} {:<20} {:>10} LAYERS", "NAME", "DIGEST", "SIZE");
            for image in images {
                println!(
                    "{:<40} {:<20} {:>9.1}M {}",
                    image.name,
                    &image.digest[..image.digest.len().min(19)],
                    image.size as f64 / 1e6,
                    image.layers
                );
            }
            Ok(0)
        }
        Command::Image(ImageCommand::Inspect { name }) => {
            let images: Vec<ImageView> = client.call(Method::GET, "/v1/images", None)?;
            let wanted = if name
                .rsplit('/')
                .next()
                .is_some_and(|last| last.contains(':'))
            {
                name.clone()
            } else {
                format!("{name}:latest")
            };
            let image = images
                .into_iter()
                .find(|i| i.name == wanted)
                .with_context(|| format!("no image {wanted:?} (see `capsa image ls`)"))?;
            print_json(&image)?;
            Ok(0)
        }
        Command::Volume(VolumeCommand::Create { name, size }) => {
            let request = VolumeRequest {
                name,
                size_mib: size,
            };
            let view: VolumeView = client.call(
                Method::POST,
                "/v1/volumes",
                Some(serde_json::to_string(&request)?),
            )?;
            print_volume(&view, cli.json)
        }
        Command::Volume(VolumeCommand::Grow { name, size }) => {
            let view: VolumeView = client.call(
                Method::POST,
                &format!("/v1/volumes/{name}/grow"),
                Some(serde_json::to_string(&VolumeGrowRequest {
                    size_mib: size,
                })?),
            )?;
            print_volume(&view, cli.json)
        }
        Command::Volume(VolumeCommand::Ls) => {
            let volumes: Vec<VolumeView> = client.call(Method::GET, "/v1/volumes", None)?;
            if cli.json {
                print_json(&volumes)?;
                return Ok(0);
            }
            println!("{:<32} {:>9}  ATTACHED TO", "NAME", "SIZE");
            for volume in volumes {
                println!(
                    "{:<32} {:>8}M  {}",
                    volume.name,
                    volume.size_bytes >> 20,
                    volume.attached_to.join(", ")
                );
            }
            Ok(0)
        }
        Command::Volume(VolumeCommand::Rm { names }) => {
            for name in names {
                let _: serde_json::Value =
                    client.call(Method::DELETE, &format!("/v1/volumes/{name}"), None)?;
                println!("{name}");
            }
            Ok(0)
        }
        Command::Network(command) => networks::run(&client, command, cli.json),
        Command::System(command) => system::run(&client, command, cli.json),
        Command::Image(ImageCommand::Tag { source, target }) => {
            system::tag(&client, source, target, cli.json)
        }
        Command::Image(ImageCommand::Prune) => system::prune_images(&client, cli.json),
        Command::Image(ImageCommand::Push {
            name,
            target,
            insecure,
        }) => {
            let destination = target.clone().unwrap_or_else(|| name.clone());
            let credentials = credentials::for_reference(&destination);
            let request = capsa_api::PushRequest {
                name,
                target,
                username: credentials.as_ref().map(|c| c.0.clone()),
                password: credentials.map(|c| c.1),
                insecure,
            };
            let mut bars = progress::Bars::new();
            let pushed: capsa_api::PushView = client.call_with_notes(
                Method::POST,
                "/v1/images/push",
                Some(serde_json::to_string(&request)?),
                |note| bars.note(note),
            )?;
            drop(bars);
            if cli.json {
                print_json(&pushed)?;
            } else {
                println!("{} {}", pushed.target, pushed.digest);
            }
            Ok(0)
        }
        Command::Image(ImageCommand::Rm { name }) => {
            let _: serde_json::Value =
                client.call(Method::DELETE, &format!("/v1/images?name={name}"), None)?;
            println!("{name}");
            Ok(0)
        }
    }
}

/// An import or a pull: its progress on stderr, then the stored image.
/// When `capsa run` pulls its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PullPolicy {
    Missing,
    Always,
    Never,
}

/// Creates the group `spec`, pulling `image` (with progress on stderr)
/// first or when capsad does not have it, as `policy` says, as docker does.
fn create_pulling(
    client: &Client,
    spec: &GroupSpec,
    image: &str,
    policy: PullPolicy,
) -> Result<()> {
    let pull = || {
        let credentials = credentials::for_reference(image);
        let request = PullRequest {
            reference: image.to_string(),
            name: None,
            username: credentials.as_ref().map(|c| c.0.clone()),
            password: credentials.map(|c| c.1),
            insecure: false,
        };
        let mut bars = progress::Bars::new();
        client
            .call_with_notes::<ImageView>(
                Method::POST,
                "/v1/images/pull",
                Some(serde_json::to_string(&request)?),
                |note| bars.note(note),
            )
            .with_context(|| format!("pulling {image}"))
    };
    if policy == PullPolicy::Always {
        pull()?;
    }
    let body = serde_json::to_string(spec)?;
    let created = client.call::<GroupView>(Method::POST, "/v1/groups", Some(body.clone()));
    let missing = created
        .as_ref()
        .err()
        .and_then(|e| e.downcast_ref::<ApiError>())
        .is_some_and(|e| e.code == ErrorCode::ImageNotFound);
    if !(missing && policy == PullPolicy::Missing) {
        return created.map(drop);
    }
    eprintln!("no image {image} here: pulling it");
    pull()?;
    client.call::<GroupView>(Method::POST, "/v1/groups", Some(body))?;
    Ok(())
}

fn store_image(
    client: &Client,
    path: &str,
    request: &impl serde::Serialize,
    json: bool,
) -> Result<u8> {
    let mut bars = progress::Bars::new();
    let view: ImageView = client.call_with_notes(
        Method::POST,
        path,
        Some(serde_json::to_string(request)?),
        |note| bars.note(note),
    )?;
    drop(bars);
    if json {
        print_json(&view)?;
    } else {
        println!("{} {}", view.name, view.digest);
    }
    Ok(0)
}

fn print_volume(view: &VolumeView, json: bool) -> Result<u8> {
    if json {
        print_json(view)?;
    } else {
        println!("{} {}M", view.name, view.size_bytes >> 20);
    }
    Ok(0)
}

/// `-v NAME:PATH[:ro]`: the group's persistent volumes and the mounts.
fn volume_options(options: &[String]) -> Result<(Vec<VolumeSpec>, Vec<VolumeMount>)> {
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for option in options {
        let (name, path, read_only) = match option.split(':').collect::<Vec<_>>().as_slice() {
            [name, path] => (*name, *path, false),
            [name, path, "ro"] => (*name, *path, true),
            [name, path, "rw"] => (*name, *path, false),
            _ => bail!("-v {option}: expected NAME:PATH[:ro]"),
        };
        let volume = format!("vol-{}", volumes.len());
        volumes.push(VolumeSpec {
            name: volume.clone(),
            empty_dir: None,
            secret: None,
            persistent: Some(PersistentSpec {
                volume: name.to_string(),
                size_mib: Some(DEFAULT_VOLUME_MIB),
                read_only,
            }),
        });
        mounts.push(VolumeMount {
            name: volume,
            mount_path: path.to_string(),
            read_only,
        });
    }
    Ok((volumes, mounts))
}

/// The spec as JSON: YAML files (.yaml, .yml) are converted; the daemon
/// checks the fields either way.
/// The spec in a file for `create -f`: JSON, or YAML when named .yaml or
/// .yml; `capsa inspect` output (a group with its spec) gives its spec,
/// and an Azure Container Instances container group is mapped to one.
fn spec_json(file: &std::path::Path, text: &str) -> Result<String> {
    let yaml = file.extension().is_some_and(|e| e == "yaml" || e == "yml");
    let value: serde_json::Value = if yaml {
        serde_yaml_ng::from_str(text)
            .with_context(|| format!("{} is not valid YAML", file.display()))?
    } else {
        match serde_json::from_str(text) {
            Ok(value) => value,
            // capsad names what is wrong with it.
            Err(_) => return Ok(text.to_string()),
        }
    };
    if capsa_api::aci::is_aci(&value) {
        let spec = capsa_api::aci::group_spec(value)
            .with_context(|| format!("{}: an ACI container group", file.display()))?;
        return Ok(serde_json::to_string(&spec)?);
    }
    Ok(serde_json::to_string(
        inspected_spec(&value).unwrap_or(&value),
    )?)
}

/// The spec of `capsa inspect` output: an object with a status and a spec.
fn inspected_spec(value: &serde_json::Value) -> Option<&serde_json::Value> {
    let object = value.as_object()?;
    object.get("status")?;
    object.get("spec").filter(|spec| spec.is_object())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Prints a container's log lines, stdout to stdout and stderr to stderr.
fn follow_logs(
    client: &Client,
    group: &str,
    container: &str,
    follow: bool,
    tail: Option<usize>,
    since: Option<u64>,
) -> Result<()> {
    let pending = begin_logs(client, group, container, follow, tail, since)?;
    print_logs(client, pending)
}

/// `capsa run -i`/`-t`, attached: the session is set up before the
/// group starts (nothing it prints is missed), and the start runs beside
/// it; exits with the container's code.
fn run_interactive(client: &Client, name: &str, stdin: bool, tty: bool, rm: bool) -> Result<u8> {
    let waiting = client.begin(
        Method::POST,
        &format!("/v1/groups/{name}/containers/main/wait"),
        None,
    )?;
    let mut starting = None;
    let ended = client.interactive(
        &format!("/v1/groups/{name}/containers/main/attach"),
        None,
        client::Session { stdin, tty },
        || {
            let (endpoint, name) = (client.endpoint().clone(), name.to_string());
            starting = Some(std::thread::spawn(move || {
                Client::to(endpoint).and_then(|c| start_group(&c, &name, false))
            }));
        },
    );
    let started = match starting.map(std::thread::JoinHandle::join) {
        Some(Ok(started)) => started.map(|_| ()),
        Some(Err(_)) => Err(anyhow::anyhow!("the thread starting {name} panicked")),
        None => Ok(()),
    };
    if let Err(e) = started {
        if rm {
            let _: Result<serde_json::Value> =
                client.call(Method::DELETE, &format!("/v1/groups/{name}"), None);
        }
        return Err(e);
    }
    match ended? {
        client::Ended::Detached => {
            eprintln!("capsa: detached from {name}; it goes on (capsa attach {name})");
            Ok(0)
        }
        client::Ended::Exited(code) => {
            let _: Result<WaitResponse> = client.finish(waiting, |_| {});
            if rm {
                wait_removed(client, name)?;
            }
            Ok(code.clamp(0, 255) as u8)
        }
    }
}

/// Waits until capsad has deleted the auto-removed group `name`.
fn wait_removed(client: &Client, name: &str) -> Result<()> {
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);
    let started = std::time::Instant::now();
    loop {
        match client.call::<GroupView>(Method::GET, &format!("/v1/groups/{name}"), None) {
            Err(e)
                if e.downcast_ref::<ApiError>()
                    .is_some_and(|a| a.code == ErrorCode::NotFound) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
            Ok(_) if started.elapsed() > PATIENCE => {
                bail!(
                    "group {name} has exited but capsad has not removed it after {} s",
                    PATIENCE.as_secs()
                )
            }
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// Asks for a container's log (and, with `follow`, what it writes next).
fn begin_logs(
    client: &Client,
    group: &str,
    container: &str,
    follow: bool,
    tail: Option<usize>,
    since: Option<u64>,
) -> Result<client::Pending> {
    let mut query = vec![format!("follow={follow}")];
    if let Some(tail) = tail {
        query.push(format!("tail={tail}"));
    }
    if let Some(since) = since {
        query.push(format!("since={since}"));
    }
    let path = format!(
        "/v1/groups/{group}/containers/{container}/logs?{}",
        query.join("&")
    );
    client.begin(Method::GET, &path, None)
}

/// Prints a log's records as they come: stdout's to stdout, stderr's to
/// stderr.
fn print_logs(client: &Client, pending: client::Pending) -> Result<()> {
    let mut pending_bytes = Vec::new();
    client.drain(pending, |chunk| {
        pending_bytes.extend_from_slice(chunk);
        while let Some(end) = pending_bytes.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending_bytes.drain(..=end).collect();
            let Ok(record) = serde_json::from_slice::<LogLine>(&line) else {
                bail!(
                    "a log line that is not JSON: {}",
                    String::from_utf8_lossy(&line)
                );
            };
            // A piece of a long line: the next record continues it.
            let end = if record.partial { "" } else { "\n" };
            if record.stream == "stderr" {
                let _ = write!(std::io::stderr(), "{}{end}", record.line);
            } else {
                let mut out = std::io::stdout().lock();
                write!(out, "{}{end}", record.line)?;
                out.flush()?;
            }
        }
        Ok(())
    })
}

/// Boots a group, showing its steps on stderr when `show_progress`.
fn start_group(client: &Client, name: &str, show_progress: bool) -> Result<GroupView> {
    client.call_with_progress(
        Method::POST,
        &format!("/v1/groups/{name}/start"),
        None,
        |step| {
            if show_progress {
                eprintln!("{name}: {step}");
            }
        },
    )
}

fn parse_restart_policy(text: &str) -> Result<RestartPolicy, String> {
    match text {
        "never" | "no" => Ok(RestartPolicy::Never),
        "on-failure" => Ok(RestartPolicy::OnFailure),
        "always" => Ok(RestartPolicy::Always),
        other => Err(format!("{other:?}: expected never, on-failure or always")),
    }
}
