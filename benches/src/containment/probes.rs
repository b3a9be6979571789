//! The probes, run inside the container under test (`capsa-bench probe`)
//! as root with the capabilities the attacks need: each tries one way out
//! and prints one JSON line, a `Finding`. Nothing here writes to a host
//! device or I/O port: where a device opens on the host's own kernel the
//! opening is the escape. Four probes only try (sysrq, core_pattern,
//! release_agent, a host service); whether the host saw the effect is
//! decided on the host (`super::host`).

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;

use super::net_probes as net;
use super::{Finding, Outcome, ProbeArgs};

/// Where the probes make device nodes and mount what they mount.
const WORK: &str = "/tmp/capsa-probe";

pub(super) struct Context<'a> {
    pub args: &'a ProbeArgs,
    /// Whether this kernel is the host's (the same boot id).
    host_kernel: bool,
}

pub(super) fn finding(probe: &str, outcome: Outcome, evidence: impl Into<String>) -> Finding {
    Finding {
        probe: probe.to_string(),
        outcome,
        evidence: evidence.into(),
    }
}

fn errno_text(e: &std::io::Error) -> String {
    e.to_string()
}

/// A probe: its name, what it tries, and how.
pub struct Probe {
    pub name: &'static str,
    pub tries: &'static str,
    run: fn(&Context) -> Finding,
}

const fn probe(name: &'static str, tries: &'static str, run: fn(&Context) -> Finding) -> Probe {
    Probe { name, tries, run }
}

/// Every probe, in the table's order.
pub const PROBES: &[Probe] = &[
    probe(
        "kernel",
        "which kernel answers (the host's boot id or another)",
        kernel,
    ),
    probe(
        "host-files",
        "a host file, by path and by mounting block devices",
        host_files,
    ),
    probe("host-pids", "a host process in /proc", host_pids),
    probe(
        "dev-mem",
        "/dev/mem opened for reading and writing",
        dev_mem,
    ),
    probe("dev-kvm", "/dev/kvm opened", dev_kvm),
    probe("raw-disks", "each block device read raw", raw_disks),
    probe(
        "module-load",
        "init_module reaching the kernel's loader",
        module_load,
    ),
    probe("port-io", "iopl(3) for port I/O", port_io),
    probe("sysrq", "a sysrq the host's kernel log shows", sysrq),
    probe(
        "core-pattern",
        "the host's core_pattern rewritten",
        core_pattern,
    ),
    probe(
        "release-agent",
        "a cgroup v1 release_agent set on the host",
        release_agent,
    ),
    probe(
        "vsock",
        "vsock to host CIDs on ports other than the agent's",
        net::vsock,
    ),
    probe(
        "host-service",
        "TCP to a host service on 0.0.0.0 via the gateway",
        net::host_service,
    ),
    probe(
        "other-network-group",
        "TCP to a group of another network",
        net::other_network_group,
    ),
    probe(
        "other-network-dns",
        "the DNS of another network",
        net::other_network_dns,
    ),
    // Last: these change the container's address and MAC (and put them
    // back).
    probe(
        "ip-spoof",
        "the gateway's DNS from an address not its own",
        net::ip_spoof,
    ),
    probe(
        "mac-spoof",
        "the gateway's DNS from a MAC not its own",
        net::mac_spoof,
    ),
];

pub fn run(args: &ProbeArgs) -> anyhow::Result<()> {
    let _ = fs::create_dir_all(WORK);
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let context = Context {
        args,
        host_kernel: boot_id.trim() == args.boot_id,
    };
    let mut out = std::io::stdout().lock();
    for probe in PROBES {
        let line = serde_json::to_string(&(probe.run)(&context))?;
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(())
}

fn kernel(c: &Context) -> Finding {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    if c.host_kernel {
        finding(
            "kernel",
            Outcome::Escaped,
            format!("the host's kernel answers ({release}, the host's boot id)"),
        )
    } else {
        finding(
            "kernel",
            Outcome::Contained,
            format!("a kernel of its own answers ({release}, another boot id)"),
        )
    }
}

fn host_files(c: &Context) -> Finding {
    let name = "host-files";
    let wanted = c.args.token.as_bytes();
    if fs::read(&c.args.marker).is_ok_and(|got| got == wanted) {
        return finding(name, Outcome::Escaped, "the host's marker file is readable");
    }
    // A privileged container may mount a block device it can name.
    let mut tried = Vec::new();
    let relative = c.args.marker.trim_start_matches('/');
    for (kind, node) in block_devices() {
        let target = format!("{WORK}/mnt");
        let _ = fs::create_dir_all(&target);
        for fstype in disk_filesystems() {
            if mount(&node, &target, &fstype, libc::MS_RDONLY, "").is_ok() {
                let found = fs::read(format!("{target}/{relative}")).is_ok_and(|g| g == wanted);
                let _ = umount(&target);
                if found {
                    return finding(
                        name,
                        Outcome::Escaped,
                        format!("the marker is on {kind} ({fstype}), mounted from the container"),
                    );
                }
                tried.push(format!("{kind} ({fstype})"));
                break;
            }
        }
    }
    let mounted = if tried.is_empty() {
        "no block device mounted".to_string()
    } else {
        format!("mounted {} without the marker", tried.join(", "))
    };
    finding(
        name,
        Outcome::Contained,
        format!("the marker is not at its path; {mounted}"),
    )
}

fn host_pids(c: &Context) -> Finding {
    let wanted = format!("capsa-pid-{}", c.args.token);
    let mut seen = 0;
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        seen += 1;
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&wanted) {
            return finding(
                "host-pids",
                Outcome::Escaped,
                format!("the host's marker process is visible (pid {name:?})"),
            );
        }
    }
    finding(
        "host-pids",
        Outcome::Contained,
        format!("{seen} processes visible, the host's marker process not among them"),
    )
}

/// Opens a device node at `path`, made (major, minor) if it is missing.
fn open_device(
    path: &str,
    block: bool,
    major: u32,
    minor: u32,
    write: bool,
) -> std::io::Result<fs::File> {
    if fs::metadata(path).is_err() {
        make_node(path, block, major, minor)?;
    }
    fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// The verdict on a device that opened or did not.
fn device_finding(c: &Context, name: &str, what: &str, opened: std::io::Result<()>) -> Finding {
    match opened {
        Ok(()) if c.host_kernel => {
            finding(name, Outcome::Escaped, format!("{what} of the host opened"))
        }
        Ok(()) => finding(
            name,
            Outcome::Contained,
            format!("{what} opened, the guest kernel's own"),
        ),
        Err(e) => finding(
            name,
            Outcome::Contained,
            format!("{what}: {}", errno_text(&e)),
        ),
    }
}

fn dev_mem(c: &Context) -> Finding {
    let opened = open_device(&format!("{WORK}/mem"), false, 1, 1, true).and_then(|mut f| {
        let mut byte = [0u8; 1];
        f.read(&mut byte).map(|_| ())
    });
    device_finding(c, "dev-mem", "/dev/mem (read and write)", opened)
}

fn dev_kvm(c: &Context) -> Finding {
    let opened = open_device(&format!("{WORK}/kvm"), false, 10, 232, true).map(|_| ());
    device_finding(c, "dev-kvm", "/dev/kvm", opened)
}

/// The block devices the kernel lists, made as nodes under `WORK`.
fn block_devices() -> Vec<(String, String)> {
    let text = fs::read_to_string("/proc/partitions").unwrap_or_default();
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let [major, minor, _, name] = words.as_slice() else {
                return None;
            };
            let (major, minor) = (major.parse().ok()?, minor.parse().ok()?);
            if !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return None;
            }
            let node = format!("{WORK}/blk-{name}");
            if fs::metadata(&node).is_err() {
                make_node(&node, true, major, minor).ok()?;
            }
            Some((name.to_string(), node))
        })
        .collect()
}

fn disk_filesystems() -> Vec<String> {
    let text = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with("nodev"))
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn raw_disks(c: &Context) -> Finding {
    let devices = block_devices();
    if devices.is_empty() {
        return finding("raw-disks", Outcome::Contained, "no block device listed");
    }
    let mut read = Vec::new();
    let mut refused = Vec::new();
    for (name, node) in &devices {
        let got = fs::File::open(node).and_then(|mut f| {
            let mut sector = [0u8; 512];
            f.read(&mut sector).map(|_| ())
        });
        match got {
            Ok(()) => read.push(name.clone()),
            Err(e) => refused.push(format!("{name}: {}", errno_text(&e))),
        }
    }
    let evidence = format!(
        "read: [{}]; refused: [{}]",
        read.join(", "),
        refused.join(", ")
    );
    let outcome = if !read.is_empty() && c.host_kernel {
        Outcome::Escaped
    } else {
        Outcome::Contained
    };
    let whose = if c.host_kernel {
        "the host's"
    } else {
        "the guest's own"
    };
    finding("raw-disks", outcome, format!("{whose} disks: {evidence}"))
}

fn module_load(c: &Context) -> Finding {
    let image = [0u8; 64];
    let params = c"";
    // SAFETY: init_module reads `image.len()` bytes of `image` and the
    // empty parameter string; a zeroed image is no module, so nothing is
    // loaded whatever the kernel decides.
    let result = unsafe {
        libc::syscall(
            libc::SYS_init_module,
            image.as_ptr(),
            image.len(),
            params.as_ptr(),
        )
    };
    let error = std::io::Error::last_os_error();
    let code = error.raw_os_error().unwrap_or(0);
    if result == 0 || !(code == libc::EPERM || code == libc::ENOSYS) {
        // The loader took the call and judged the image.
        let outcome = if c.host_kernel {
            Outcome::Escaped
        } else {
            Outcome::Contained
        };
        let whose = if c.host_kernel { "host" } else { "guest" };
        return finding(
            "module-load",
            outcome,
            format!("the {whose} kernel's module loader took the call ({error})"),
        );
    }
    finding(
        "module-load",
        Outcome::Contained,
        format!("init_module: {error}"),
    )
}

fn port_io(c: &Context) -> Finding {
    // SAFETY: iopl changes this thread's I/O privilege level only; it is
    // put back at once and no port is touched.
    let result = unsafe { libc::syscall(libc::SYS_iopl, 3) };
    let error = std::io::Error::last_os_error();
    if result != 0 {
        return finding("port-io", Outcome::Contained, format!("iopl(3): {error}"));
    }
    // SAFETY: as above, back to no port access.
    unsafe { libc::syscall(libc::SYS_iopl, 0) };
    if c.host_kernel {
        finding(
            "port-io",
            Outcome::Escaped,
            "iopl(3) granted by the host's kernel (no port was written)",
        )
    } else {
        finding(
            "port-io",
            Outcome::Contained,
            "iopl(3) granted by the guest kernel: its ports are the VMM's",
        )
    }
}

/// Writes `text` to `relative` under /proc, or, when that is refused
/// (read-only, masked), under a procfs of the probe's own mounting.
fn write_proc(relative: &str, text: &str) -> Result<String, String> {
    let direct = format!("/proc/{relative}");
    let first = match fs::write(&direct, text) {
        Ok(()) => return Ok(direct),
        Err(e) => format!("{direct}: {}", errno_text(&e)),
    };
    let target = format!("{WORK}/proc");
    let _ = fs::create_dir_all(&target);
    if let Err(e) = mount("proc", &target, "proc", 0, "") {
        return Err(format!("{first}; mounting a procfs: {e}"));
    }
    let again = format!("{target}/{relative}");
    let result = fs::write(&again, text)
        .map(|()| again.clone())
        .map_err(|e| format!("{first}; {again}: {}", errno_text(&e)));
    let _ = umount(&target);
    result
}

/// A probe whose effect the host looks for: `Escaped` here means only
/// "written", which the host confirms or not.
fn tried(name: &str, written: Result<String, String>) -> Finding {
    match written {
        Ok(path) => finding(name, Outcome::Escaped, format!("wrote {path}")),
        Err(why) => finding(name, Outcome::Contained, why),
    }
}

fn sysrq(_: &Context) -> Finding {
    tried("sysrq", write_proc("sysrq-trigger", "h"))
}

fn core_pattern(c: &Context) -> Finding {
    let pattern = format!("|/bin/false capsa-core-{}", c.args.token);
    tried(
        "core-pattern",
        write_proc("sys/kernel/core_pattern", &pattern),
    )
}

fn release_agent(c: &Context) -> Finding {
    let target = format!("{WORK}/cgroup");
    let _ = fs::create_dir_all(&target);
    let written = mount(
        "cgroup",
        &target,
        "cgroup",
        0,
        super::RELEASE_AGENT_HIERARCHY,
    )
    .map_err(|e| format!("mounting a cgroup v1 hierarchy: {e}"))
    .and_then(|()| {
        let path = format!("{target}/release_agent");
        let agent = format!("/capsa-release-{}", c.args.token);
        let result = fs::write(&path, agent)
            .map(|()| path.clone())
            .map_err(|e| format!("{path}: {}", errno_text(&e)));
        let _ = umount(&target);
        result
    });
    tried("release-agent", written)
}

fn make_node(path: &str, block: bool, major: u32, minor: u32) -> std::io::Result<()> {
    let path = CString::new(path).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let kind = if block { libc::S_IFBLK } else { libc::S_IFCHR };
    // SAFETY: mknod reads the NUL-terminated path only.
    let result = unsafe { libc::mknod(path.as_ptr(), kind | 0o600, libc::makedev(major, minor)) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> std::io::Result<()> {
    let c = |s: &str| {
        CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (source, target, fstype, data) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call.
    let result = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) fn umount(target: &str) -> std::io::Result<()> {
    let target = CString::new(target).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: the path is NUL-terminated and outlives the call.
    let result = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    data: &str,
) -> std::io::Result<()> {
    mount(source, target, fstype, 0, data)
}
