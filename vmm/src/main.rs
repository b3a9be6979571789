//! `capsa-vmm`: boot one microVM and exit with the guest's outcome.

use std::path::PathBuf;
use std::process::ExitCode;

use capsa_vmm::virtio::block::DiskConfig;
use capsa_vmm::virtio::net::NetConfig;
use capsa_vmm::virtio::vsock::{VsockConfig, DEFAULT_GUEST_CID};
use capsa_vmm::{ConsoleOutput, VmConfig};
use clap::Parser;

/// Lines of console output shown when the guest crashes.
const CRASH_TAIL_LINES: usize = 40;

#[derive(Parser, Debug)]
#[command(name = "capsa-vmm", version, about = "Boot a Capsa microVM on KVM")]
struct Args {
    /// Uncompressed ELF kernel (vmlinux) with a PVH entry point.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs (cpio, newc) to hand to the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Extra kernel parameters, appended to the ones the VMM requires
    /// (console=ttyS0 reboot=k panic=-1).
    #[arg(long, default_value = "quiet")]
    cmdline: String,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Attach a raw disk image as virtio-blk: PATH[,ro][,id=SERIAL].
    /// Repeat for more disks; the guest sees them as vda, vdb, ...
    #[arg(long = "disk", value_name = "PATH[,ro][,id=SERIAL]", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// Attach a virtio-net interface on the host tap NAME, with a MAC
    /// address (random, locally administered, by default). Repeatable.
    /// (and, with bridge=NAME, added to that bridge and brought up).
    #[arg(long = "net", value_name = "TAP[,mac=XX:XX:XX:XX:XX:XX][,bridge=NAME]", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// Attach a virtio-vsock bridged to the Unix socket PATH (host
    /// processes connect to it with `CONNECT <port>`; guest connections to
    /// port P go to PATH_P). The guest's CID defaults to 3.
    #[arg(long, value_name = "PATH[,cid=N]", value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
    /// Do not attach the virtio-rng entropy device.
    #[arg(long)]
    no_rng: bool,
}

/// Splits a device spec `HEAD[,OPTION]...` into its head (a path or a
/// name, which must be there) and its options.
fn split_spec<'a>(
    spec: &'a str,
    what: &str,
) -> Result<(&'a str, std::str::Split<'a, char>), String> {
    let mut parts = spec.split(',');
    let head = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("{what} is missing"))?;
    Ok((head, parts))
}

fn parse_net(spec: &str) -> Result<NetConfig, String> {
    let (tap, options) = split_spec(spec, "the tap name")?;
    let mut net = NetConfig {
        tap: tap.to_string(),
        mac: NetConfig::random_mac(),
        bridge: None,
    };
    for option in options {
        match option.split_once('=') {
            Some(("mac", mac)) => net.mac = parse_mac(mac)?,
            Some(("bridge", bridge)) if !bridge.is_empty() => net.bridge = Some(bridge.into()),
            _ => {
                return Err(format!(
                    "unknown net option {option:?} (expected mac=... or bridge=...)"
                ))
            }
        }
    }
    Ok(net)
}

fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad =
        || format!("bad MAC address {text:?} (expected six hex bytes like 02:ca:95:00:00:01)");
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| {
            (b.len() == 2)
                .then(|| u8::from_str_radix(b, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    let mac: [u8; 6] = bytes.try_into().map_err(|_| bad())?;
    if mac[0] & 1 != 0 {
        return Err(format!("MAC address {text} is a multicast address"));
    }
    Ok(mac)
}

fn parse_vsock(spec: &str) -> Result<VsockConfig, String> {
    let (path, options) = split_spec(spec, "the vsock socket path")?;
    let mut vsock = VsockConfig {
        path: PathBuf::from(path),
        guest_cid: DEFAULT_GUEST_CID,
    };
    for option in options {
        match option.split_once('=') {
            Some(("cid", cid)) => {
                vsock.guest_cid = cid.parse().map_err(|_| format!("bad vsock CID {cid:?}"))?
            }
            _ => return Err(format!("unknown vsock option {option:?} (expected cid=N)")),
        }
    }
    Ok(vsock)
}

fn parse_disk(spec: &str) -> Result<DiskConfig, String> {
    let (path, options) = split_spec(spec, "the disk image path")?;
    let mut disk = DiskConfig {
        path: PathBuf::from(path),
        read_only: false,
        id: None,
    };
    for option in options {
        match option.split_once('=') {
            None if option == "ro" => disk.read_only = true,
            Some(("id", id)) => disk.id = Some(id.to_string()),
            _ => {
                return Err(format!(
                    "unknown disk option {option:?} (expected ro or id=SERIAL)"
                ))
            }
        }
    }
    Ok(disk)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match boot(args) {
        Ok(code) => code,
        Err(e) => {
            // Every VmError message already names its cause; printing the
            // source chain as well would say it twice.
            eprintln!("capsa-vmm: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn boot(args: Args) -> Result<ExitCode, capsa_vmm::VmError> {
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        vcpus: args.cpus,
        memory_mib: args.memory_mib,
        cmdline: args.cmdline,
        console: args
            .console
            .map_or(ConsoleOutput::Stdout, ConsoleOutput::File),
        disks: args.disks,
        rng: !args.no_rng,
        vsock: args.vsock,
        nets: args.nets,
    };
    let outcome = capsa_vmm::run(&config)?;
    if !outcome.exit.is_clean() {
        eprintln!(
            "capsa-vmm: {}; last console output:\n{}",
            outcome.exit.describe(),
            outcome.console_tail.last_lines(CRASH_TAIL_LINES)
        );
    }
    Ok(ExitCode::from(outcome.exit.exit_code() as u8))
}
