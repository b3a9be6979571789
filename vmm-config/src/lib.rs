//! The capsa-vmm command line as types. The VMM parses its arguments into
//! [`VmmArgs`]; capsad, the shim and the benchmarks build a `VmmArgs` and
//! turn it into argv with [`VmmArgs::to_args`]. Each device form
//! (`--disk`, `--net`, `--vsock`) is parsed and formatted side by side
//! here, and nowhere else.

mod device;
mod jail;
mod rate;
mod snapshot;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

pub use device::{ArgError, DiskConfig, MacAddr, NetConfig, VsockConfig, DEFAULT_GUEST_CID};
pub use jail::JailConfig;
pub use rate::{RateLimit, DEFAULT_BURST_MS};
pub use snapshot::{RestoreFrom, SnapshotTo};

/// What the VMM appends to the kernel command line unless told otherwise.
pub const DEFAULT_CMDLINE: &str = "quiet";
pub const DEFAULT_CPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// The VMM's seccomp filter, for a system call it does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Seccomp {
    Kill,
    Log,
    Off,
}

#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(name = "capsa-vmm", version, about = "Boot a Capsa microVM on KVM")]
pub struct VmmArgs {
    /// Uncompressed ELF kernel (vmlinux) with a PVH entry point.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initramfs (cpio, newc) to hand to the kernel.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = DEFAULT_CPUS)]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    pub memory_mib: u64,
    /// Extra kernel parameters, appended to the ones the VMM requires
    /// (console=ttyS0 reboot=k panic=-1).
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// Attach a raw disk image as virtio-blk: PATH[,ro][,id=SERIAL].
    /// Repeat for more disks; the guest sees them as vda, vdb, ...
    #[arg(long = "disk", value_name = "PATH[,ro][,id=SERIAL]")]
    pub disks: Vec<DiskConfig>,
    /// Attach a virtio-net interface on the host tap NAME, with a MAC
    /// address (random, locally administered, by default) and, with
    /// bridge=NAME, added to that bridge and brought up. Repeatable.
    #[arg(long = "net", value_name = "TAP[,mac=XX:XX:XX:XX:XX:XX][,bridge=NAME]")]
    pub nets: Vec<NetConfig>,
    /// Attach a virtio-vsock bridged to the Unix socket PATH (host
    /// processes connect to it with `CONNECT <port>`; guest connections to
    /// port P go to PATH_P). The guest's CID defaults to 3.
    #[arg(long, value_name = "PATH[,cid=N]")]
    pub vsock: Option<VsockConfig>,
    /// Do not attach the virtio-rng entropy device.
    #[arg(long)]
    pub no_rng: bool,
    /// What the VMM's seccomp filter does with a system call it does not
    /// allow: kill the VMM (the default), log it and let it through (to
    /// learn a new code path's calls), or no filter at all.
    #[arg(long, value_enum, default_value_t = Seccomp::Kill)]
    pub seccomp: Seccomp,
    /// Before the guest runs, confine the VMM (started as root): new
    /// mount, PID, IPC, UTS, network and cgroup namespaces, the empty
    /// directory ROOT as its root, user and group ids U and G, no
    /// capabilities, no new privileges, and limits on files and threads.
    /// Devices are then best passed as descriptors (fd=N).
    #[arg(long, value_name = "ROOT,uid=U,gid=G")]
    pub jail: Option<JailConfig>,
    /// Snapshot the VM when asked: a byte read on the socket CONTROL
    /// pauses the guest, writes its state to STATE and its memory to
    /// MEMORY (descriptors), answers `ok` or `error: WHY` on CONTROL and
    /// ends the VMM.
    #[arg(long, value_name = "control=N,state=N,memory=N")]
    pub snapshot_to: Option<SnapshotTo>,
    /// Restore the VM from a snapshot's STATE and MEMORY (descriptors)
    /// instead of booting it: its devices get the backends given here,
    /// in the snapshot's order and kinds; --kernel and --initrd are not
    /// read.
    #[arg(long, value_name = "state=N,memory=N", conflicts_with = "snapshot_to")]
    pub restore_from: Option<RestoreFrom>,
}

impl VmmArgs {
    /// A VM of the default shape booting `kernel`, with no devices but
    /// the entropy source.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmmArgs {
            kernel: kernel.into(),
            initrd: None,
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            cmdline: DEFAULT_CMDLINE.to_string(),
            console: None,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            no_rng: false,
            seccomp: Seccomp::Kill,
            jail: None,
            snapshot_to: None,
            restore_from: None,
        }
    }

    /// The descriptors the VMM inherits for its devices, each given to
    /// one device only.
    pub fn inherited_fds(&self) -> Result<Vec<i32>, ArgError> {
        let mut fds = inherited_fds(&self.disks, &self.nets, self.vsock.as_ref())?;
        let snapshot = self.snapshot_to.iter().flat_map(|s| s.fds());
        let restore = self.restore_from.iter().flat_map(|r| r.fds());
        for fd in snapshot.chain(restore) {
            if fds.contains(&fd) {
                return Err(ArgError::SharedFd(fd));
            }
            fds.push(fd);
        }
        Ok(fds)
    }

    /// The arguments (without the program name) that parse back into
    /// exactly these; a device whose text would not (a path with a comma
    /// in it, say) is refused.
    pub fn to_args(&self) -> Result<Vec<OsString>, ArgError> {
        let mut args: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: OsString| {
            args.push(format!("--{name}").into());
            args.push(value);
        };
        flag("kernel", self.kernel.clone().into());
        if let Some(initrd) = &self.initrd {
            flag("initrd", initrd.clone().into());
        }
        flag("cpus", self.cpus.to_string().into());
        flag("memory-mib", self.memory_mib.to_string().into());
        flag("cmdline", self.cmdline.clone().into());
        if let Some(console) = &self.console {
            flag("console", console.clone().into());
        }
        for disk in &self.disks {
            flag("disk", disk.to_arg()?.into());
        }
        for net in &self.nets {
            flag("net", net.to_arg()?.into());
        }
        if let Some(vsock) = &self.vsock {
            flag("vsock", vsock.to_arg()?.into());
        }
        if self.no_rng {
            args.push("--no-rng".into());
        }
        if let Some(jail) = &self.jail {
            args.push("--jail".into());
            args.push(jail.to_arg()?.into());
        }
        if let Some(to) = &self.snapshot_to {
            args.push("--snapshot-to".into());
            args.push(to.to_arg().into());
        }
        if let Some(from) = &self.restore_from {
            args.push("--restore-from".into());
            args.push(from.to_arg().into());
        }
        if self.seccomp != Seccomp::Kill {
            args.push("--seccomp".into());
            args.push(
                match self.seccomp {
                    Seccomp::Kill => "kill",
                    Seccomp::Log => "log",
                    Seccomp::Off => "off",
                }
                .into(),
            );
        }
        Ok(args)
    }
}

/// The descriptors these devices inherit, each given to one device only.
pub fn inherited_fds(
    disks: &[DiskConfig],
    nets: &[NetConfig],
    vsock: Option<&VsockConfig>,
) -> Result<Vec<i32>, ArgError> {
    let fds: Vec<i32> = disks
        .iter()
        .filter_map(|d| d.fd)
        .chain(nets.iter().filter_map(|n| n.fd))
        .chain(vsock.and_then(|v| v.listener_fd))
        .collect();
    for (i, fd) in fds.iter().enumerate() {
        if fds[..i].contains(fd) {
            return Err(ArgError::SharedFd(*fd));
        }
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: Vec<OsString>) -> VmmArgs {
        VmmArgs::try_parse_from(std::iter::once(OsString::from("capsa-vmm")).chain(args))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_full_command_line_round_trips() {
        let args = VmmArgs {
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initramfs.cpio".into()),
            cpus: 4,
            memory_mib: 1024,
            cmdline: "quiet rdinit=/bin/probe -- a=b".into(),
            console: Some("/run/g/console.log".into()),
            disks: vec![
                DiskConfig {
                    fd: Some(7),
                    ..DiskConfig::at("/v/a.ext4", true, Some("capsa-vol0".into()))
                },
                DiskConfig::at("/v/b.img", false, None),
            ],
            nets: vec![NetConfig {
                tap: "capsa-0a000002".into(),
                mac: MacAddr([0x02, 0xca, 0x95, 0, 0, 2]),
                bridge: Some("capsa0".into()),
                fd: Some(8),
                rate: Some(RateLimit {
                    bytes_per_sec: Some(1 << 20),
                    ops_per_sec: None,
                    burst_ms: 50,
                }),
            }],
            vsock: Some(VsockConfig {
                path: "/run/g/v.sock".into(),
                guest_cid: 7,
                listener_fd: Some(9),
            }),
            no_rng: true,
            seccomp: Seccomp::Log,
            jail: Some(JailConfig {
                root: "/run/g/jail".into(),
                uid: 900000,
                gid: 900000,
            }),
            snapshot_to: None,
            restore_from: Some(RestoreFrom {
                state: 10,
                memory: 11,
            }),
        };
        assert_eq!(parse(args.to_args().unwrap()), args);
        assert_eq!(args.inherited_fds(), Ok(vec![7, 8, 9, 10, 11]));
        let mut shared = args.clone();
        shared.disks[1].fd = Some(9);
        assert_eq!(shared.inherited_fds(), Err(ArgError::SharedFd(9)));
    }

    #[test]
    fn the_defaults_round_trip_and_match_a_bare_command_line() {
        let args = VmmArgs::new("/k/vmlinux");
        assert_eq!(parse(args.to_args().unwrap()), args);
        assert_eq!(parse(vec!["--kernel".into(), "/k/vmlinux".into()]), args);
    }

    #[test]
    fn a_device_that_would_not_parse_back_is_refused() {
        let mut args = VmmArgs::new("/k/vmlinux");
        args.disks.push(DiskConfig::at("/v/a,ro.img", false, None));
        let err = args.to_args().unwrap_err().to_string();
        assert!(err.contains("/v/a,ro.img"), "{err}");
    }
}
