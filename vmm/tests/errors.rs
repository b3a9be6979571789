//! The VMM's clear errors on bad input (a missing or corrupt kernel, too
//! little memory, bad vCPU counts, arguments that do not parse), on this
//! host's /dev/kvm without booting a guest. Booting guests is the e2e
//! suites' (capsa-e2e, `cargo xtask e2e`).
//!
//! Needs /dev/kvm and the kernel from `guest-kernel/build.sh` (or
//! CAPSA_KERNEL); where /dev/kvm is missing these tests fail, unless
//! CAPSA_SKIP_KVM_TESTS=1 asks to skip them.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Run {
    code: Option<i32>,
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
    // What the guest printed (nothing: none boots here) is not looked at.
    let _ = out.join();
    Run {
        code,
        stderr: err.join().expect("stderr reader"),
    }
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
