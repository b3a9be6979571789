//! Boots real microVMs with the Capsa guest kernel and initramfs.
//!
//! Needs /dev/kvm, the kernel from `guest-kernel/build.sh` and the initramfs
//! from `rootfs/build.sh` (or CAPSA_KERNEL / CAPSA_INITRD). Where /dev/kvm is
//! missing these tests fail, unless CAPSA_SKIP_KVM_TESTS=1 asks to skip them.
//! CAPSA_SKIP_BOOT_TESTS=1 skips only the tests that run a guest, for hosts
//! whose KVM cannot run a stock Linux guest (PVM; see README).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const READY_PREFIX: &str = "CAPSA_READY ";

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ sits in the workspace")
        .to_path_buf()
}

fn asked_to_skip(var: &str) -> bool {
    let skip = std::env::var(var).as_deref() == Ok("1");
    if skip {
        eprintln!("skipping: {var}=1");
    }
    skip
}

/// None when the caller explicitly asked to skip tests that boot a guest.
fn guest_boots_available() -> Option<()> {
    if asked_to_skip("CAPSA_SKIP_BOOT_TESTS") {
        return None;
    }
    kvm_available()
}

/// None when the caller explicitly asked to skip KVM tests.
fn kvm_available() -> Option<()> {
    if asked_to_skip("CAPSA_SKIP_KVM_TESTS") {
        return None;
    }
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests boot real microVMs (set CAPSA_SKIP_KVM_TESTS=1 to skip them)"
    );
    Some(())
}

fn kernel() -> PathBuf {
    if let Some(path) = std::env::var_os("CAPSA_KERNEL") {
        return path.into();
    }
    let out = Command::new(workspace_root().join("guest-kernel/build.sh"))
        .arg("--path")
        .output()
        .expect("run guest-kernel/build.sh --path");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.exists(),
        "guest kernel {} is not built: run guest-kernel/build.sh",
        path.display()
    );
    path
}

fn initrd() -> PathBuf {
    let path = std::env::var_os("CAPSA_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/capsa/initramfs.cpio"));
    assert!(
        path.exists(),
        "initramfs {} is not built: run rootfs/build.sh",
        path.display()
    );
    path
}

fn boot_timeout() -> Duration {
    let secs = std::env::var("CAPSA_BOOT_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

/// Drains a pipe on its own thread so a chatty child never blocks on it.
fn read_in_background(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

fn vmm(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsa-vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start capsa-vmm");
    let out = read_in_background(child.stdout.take().expect("stdout piped"));
    let err = read_in_background(child.stderr.take().expect("stderr piped"));
    let deadline = Instant::now() + boot_timeout();
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait for capsa-vmm") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "capsa-vmm still running after {:?}; stdout so far:\n{}",
                boot_timeout(),
                out.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn boot(cpus: u8, memory_mib: u64, cmdline: &str) -> Run {
    boot_with(cpus, memory_mib, cmdline, &[])
}

fn boot_with(cpus: u8, memory_mib: u64, cmdline: &str, extra: &[&str]) -> Run {
    let kernel = kernel();
    let initrd = initrd();
    let cpus = cpus.to_string();
    let memory_mib = memory_mib.to_string();
    let mut args = vec![
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--initrd",
        initrd.to_str().expect("utf-8 path"),
        "--cpus",
        &cpus,
        "--memory-mib",
        &memory_mib,
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    vmm(&args)
}

/// The JSON fields of the agent's ready line.
fn ready_field(stdout: &str, field: &str) -> u64 {
    let line = stdout
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(READY_PREFIX))
        .unwrap_or_else(|| panic!("no ready line in guest output:\n{stdout}"));
    let key = format!("\"{field}\":");
    let start = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {field} in {line}"))
        + key.len();
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad {field} in {line}"))
}

fn assert_boots_and_powers_off(cpus: u8) {
    let memory_mib = 128;
    let run = boot(cpus, memory_mib, "quiet capsa.exit_after_ready=1");
    assert_eq!(
        run.code,
        Some(0),
        "VMM should exit 0 on guest power-off\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(ready_field(&run.stdout, "cpus"), u64::from(cpus));
    let mem_total_mib = ready_field(&run.stdout, "mem_total_kib") / 1024;
    // MemTotal excludes the kernel image, reserved areas and early
    // allocations, but most of the RAM must be there.
    assert!(
        (memory_mib * 3 / 4..memory_mib).contains(&mem_total_mib),
        "MemTotal {mem_total_mib} MiB is not consistent with {memory_mib} MiB of guest memory"
    );
}

#[test]
fn boots_with_one_vcpu_and_powers_off() {
    if guest_boots_available().is_none() {
        return;
    }
    assert_boots_and_powers_off(1);
}

#[test]
fn boots_with_two_vcpus_and_powers_off() {
    if guest_boots_available().is_none() {
        return;
    }
    assert_boots_and_powers_off(2);
}

#[test]
fn guest_panic_exits_nonzero_with_the_panic_text() {
    if guest_boots_available().is_none() {
        return;
    }
    // No init in the initramfs and no root device: the kernel panics.
    let run = boot(1, 128, "quiet rdinit=/does-not-exist root=/dev/nothing");
    assert_eq!(run.code, Some(2), "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains("guest kernel panicked"),
        "stderr:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("Kernel panic - not syncing"),
        "console tail must carry the panic text; stderr:\n{}",
        run.stderr
    );
}

fn assert_clear_error(run: &Run, expected: &str) {
    assert_eq!(run.code, Some(1), "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains(expected),
        "expected {expected:?} in stderr:\n{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("panicked at"),
        "VMM panicked:\n{}",
        run.stderr
    );
}

#[test]
fn missing_kernel_is_a_clear_error() {
    if kvm_available().is_none() {
        return;
    }
    let run = vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_clear_error(&run, "cannot open kernel /nonexistent/vmlinux");
}

#[test]
fn corrupt_kernel_is_a_clear_error() {
    if kvm_available().is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("capsa-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let garbage = dir.join("vmlinux");
    std::fs::write(&garbage, b"MZ this is not an ELF kernel at all").expect("write garbage");
    let run = vmm(&["--kernel", garbage.to_str().expect("utf-8")]);
    assert_clear_error(&run, "is not an x86-64 ELF kernel");

    // A real ELF header cut short of its program headers.
    let real = std::fs::read(kernel()).expect("read kernel");
    std::fs::write(&garbage, &real[..80]).expect("write truncated kernel");
    let run = vmm(&["--kernel", garbage.to_str().expect("utf-8")]);
    assert_clear_error(&run, "is not an x86-64 ELF kernel");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn too_little_memory_is_a_clear_error() {
    if kvm_available().is_none() {
        return;
    }
    let kernel = kernel();
    let run = vmm(&[
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--memory-mib",
        "40",
    ]);
    assert_clear_error(&run, "MiB of guest memory is too little");
    let run = vmm(&[
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--memory-mib",
        "8",
    ]);
    assert_clear_error(&run, "8 MiB of guest memory requested");
}

#[test]
fn bad_vcpu_counts_are_clear_errors() {
    if kvm_available().is_none() {
        return;
    }
    let kernel = kernel();
    let run = vmm(&["--kernel", kernel.to_str().expect("utf-8"), "--cpus", "0"]);
    assert_clear_error(&run, "0 vCPUs requested");
    let run = vmm(&["--kernel", kernel.to_str().expect("utf-8"), "--cpus", "255"]);
    assert_clear_error(&run, "255 vCPUs requested");
}

#[test]
fn unparsable_arguments_are_rejected_by_the_cli() {
    let run = vmm(&["--kernel", "k", "--cpus", "many"]);
    assert_eq!(run.code, Some(2), "clap exits 2 on usage errors");
    assert!(
        run.stderr.contains("invalid value 'many'"),
        "{}",
        run.stderr
    );
    let run = vmm(&[]);
    assert!(run.stderr.contains("--kernel"), "{}", run.stderr);
}

#[test]
fn agent_answers_its_api_over_vsock_and_shuts_down_on_request() {
    use capsa_protocol::agent::{PingRequest, ShutdownRequest};
    if guest_boots_available().is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("vsock.sock");
    let socket_arg = socket.to_str().expect("utf-8 path").to_string();
    let vm = std::thread::spawn(move || boot_with(1, 128, "quiet", &["--vsock", &socket_arg]));
    let (client, version) =
        capsa_protocol::connect_agent(&socket, boot_timeout()).expect("agent reachable");
    assert_eq!(version.api_version, capsa_protocol::API_VERSION);
    let ctx = || ttrpc::context::with_timeout(boot_timeout().as_nanos() as i64);
    let ping = client.ping(ctx(), &PingRequest::new()).expect("ping");
    assert!(ping.uptime_ms > 0);
    client
        .shutdown(ctx(), &ShutdownRequest::new())
        .expect("shutdown");
    let run = vm.join().expect("VMM thread");
    assert_eq!(
        run.code,
        Some(0),
        "VMM should exit 0 after the agent's shutdown\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
}

/// The agent's container scenarios (capsa_guest_client::check) on a
/// busybox image built with umoci (scripts/busybox-image.sh).
#[test]
fn agent_runs_containers_from_an_oci_image() {
    if guest_boots_available().is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let layout = dir.path().join("busybox-oci");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/busybox-image.sh");
    let built = std::process::Command::new(script)
        .arg(&layout)
        .status()
        .expect("running busybox-image.sh");
    assert!(built.success(), "building the busybox image failed");
    let socket = dir.path().join("vsock.sock");
    let socket_arg = socket.to_str().expect("utf-8 path").to_string();
    let vm = std::thread::spawn(move || boot_with(2, 512, "quiet", &["--vsock", &socket_arg]));
    let failed = capsa_guest_client::check::run(&socket, &layout, Default::default())
        .expect("scenarios ran");
    let run = vm.join().expect("VMM thread");
    assert_eq!(
        failed, 0,
        "scenarios failed (see the agent-check lines above)"
    );
    assert_eq!(run.code, Some(0), "VMM exit\nstderr:\n{}", run.stderr);
}
