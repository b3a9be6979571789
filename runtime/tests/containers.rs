//! Real containers on this host (as root, which the agent is in the
//! guest): a busybox root filesystem, the runtime's helper, the host's
//! cgroup v2 hierarchy. Limits need cgroup controllers that a hybrid host
//! does not delegate to v2; the guest tests cover those.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use capsa_runtime::{
    resize, Container, ExitStatus, ProcessIo, Reaper, Runtime, RuntimeConfig, RuntimeError,
    StdioRequest,
};
use oci_spec::runtime::{
    LinuxBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, RootBuilder, Spec, UserBuilder,
};

const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "ls", "sleep", "id", "stty", "touch", "grep", "hostname", "ps", "kill",
    "mkdir",
];

struct Fixture {
    _dir: tempfile::TempDir,
    layer: PathBuf,
    runtime: Runtime,
    cgroup_parent: PathBuf,
    /// A file outside every container.
    host_secret: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.cgroup_parent);
    }
}

fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .expect("this host has no cgroup v2 mount");
    PathBuf::from(line.split_whitespace().nth(1).unwrap())
}

fn fixture() -> Fixture {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    fs::create_dir_all(layer.join("bin")).unwrap();
    fs::create_dir_all(layer.join("tmp")).unwrap();
    fs::copy("/bin/busybox", layer.join("bin/busybox")).expect("needs busybox-static");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", layer.join("bin").join(applet)).unwrap();
    }
    let host_secret = dir.path().join("host-secret");
    fs::write(&host_secret, "host only").unwrap();
    let cgroup_parent = cgroup2_mount().join(format!(
        "capsa-runtime-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let runtime = Runtime::new(RuntimeConfig {
        helper: PathBuf::from(env!("CARGO_BIN_EXE_capsa-container-init")),
        helper_args: Vec::new(),
        state_dir: dir.path().join("state"),
        cgroup_parent: cgroup_parent.clone(),
    });
    Fixture {
        _dir: dir,
        layer,
        runtime,
        cgroup_parent,
        host_secret,
    }
}

/// The default OCI spec (runc's) running `args`.
fn spec(args: &[&str]) -> Spec {
    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap();
    process.set_args(Some(args.iter().map(|a| a.to_string()).collect()));
    process.set_env(Some(vec!["PATH=/bin".into()]));
    spec.set_process(Some(process));
    spec.set_hostname(Some("box".into()));
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(false)
            .build()
            .unwrap(),
    ));
    spec
}

fn output_request() -> StdioRequest {
    StdioRequest {
        stdin: false,
        stdout: true,
        stderr: true,
    }
}

fn read_all(file: Option<std::fs::File>) -> String {
    let mut text = String::new();
    if let Some(mut file) = file {
        file.read_to_string(&mut text).unwrap();
    }
    text
}

/// Creates, starts and waits for a container; returns stdout, stderr and
/// the exit status.
fn run(fixture: &Fixture, id: &str, spec: Spec) -> (String, String, ExitStatus) {
    let (container, io) = create(fixture, id, spec);
    run_created(container, io)
}

fn create(fixture: &Fixture, id: &str, spec: Spec) -> (Container, ProcessIo) {
    fixture
        .runtime
        .create(id, spec, vec![fixture.layer.clone()], output_request())
        .unwrap()
}

fn run_created(mut container: Container, mut io: ProcessIo) -> (String, String, ExitStatus) {
    container.start().unwrap();
    let stderr = io.stderr.take();
    let reader = std::thread::spawn(move || read_all(stderr));
    let stdout = read_all(io.stdout.take());
    let stderr = reader.join().unwrap();
    let status = Reaper::global().wait(container.init_pid());
    container.destroy().unwrap();
    (stdout, stderr, status)
}

#[test]
fn echo_hello_reaches_stdout() {
    let f = fixture();
    let (stdout, stderr, status) = run(&f, "hello", spec(&["echo", "hello"]));
    assert_eq!(
        (stdout.as_str(), status),
        ("hello\n", ExitStatus::Exited(0)),
        "{stderr}"
    );
}

#[test]
fn exit_codes_and_signals_are_reported() {
    let f = fixture();
    let (_, _, status) = run(&f, "code", spec(&["sh", "-c", "exit 42"]));
    assert_eq!(status, ExitStatus::Exited(42));
    // SIGKILL from outside: PID 1 of a namespace is immune to it from
    // inside.
    let (mut container, _io) = create(&f, "killed", spec(&["sleep", "60"]));
    container.start().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(container.init_pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = Reaper::global().wait(container.init_pid());
    container.destroy().unwrap();
    assert_eq!(status, ExitStatus::Signaled(9));
    assert_eq!(status.code(), 137);
}

#[test]
fn the_container_sees_only_its_own_processes_and_files() {
    let f = fixture();
    let script = format!(
        "echo pid=$$; hostname; ls /proc | grep -c '^[0-9]'; ls /; cat {} || echo no-secret",
        f.host_secret.display()
    );
    let (stdout, stderr, status) = run(&f, "isolated", spec(&["sh", "-c", &script]));
    assert_eq!(status, ExitStatus::Exited(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "pid=1", "PID 1 of its own namespace");
    assert_eq!(lines[1], "box", "its own hostname");
    // sh, and the ls/grep pair at most.
    let visible: u32 = lines[2].parse().unwrap();
    assert!(visible <= 3, "sees {visible} processes");
    assert!(stdout.contains("no-secret"), "{stdout}");
    assert!(!stdout.contains("host only"));
    assert!(stdout.lines().any(|l| l == "busybox") || stdout.contains("bin"));
}

#[test]
fn exec_shares_the_filesystem_and_processes_of_the_container() {
    let f = fixture();
    let (mut container, io) = create(
        &f,
        "exec-target",
        spec(&["sh", "-c", "echo shared > /tmp/marker; exec sleep 60"]),
    );
    container.start().unwrap();
    drop(io);
    let mut process = spec(&["cat", "/tmp/marker", "/proc/1/cmdline"])
        .process()
        .clone()
        .unwrap();
    // The marker may not be written yet; retry briefly.
    let mut seen = String::new();
    for _ in 0..50 {
        let (pid, mut io) = f
            .runtime
            .exec(&container, process.clone(), output_request())
            .unwrap();
        seen = read_all(io.stdout.take());
        Reaper::global().wait(pid);
        if seen.starts_with("shared") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(seen, "shared\nsleep\u{0}60\u{0}");
    process.set_args(Some(vec!["sh".into(), "-c".into(), "echo $$".into()]));
    let (pid, mut io) = f
        .runtime
        .exec(&container, process, output_request())
        .unwrap();
    let inner_pid: u32 = read_all(io.stdout.take()).trim().parse().unwrap();
    assert!(
        inner_pid > 1,
        "exec runs inside the container's PID namespace"
    );
    Reaper::global().wait(pid);
    let pids = container.processes().unwrap();
    assert_eq!(pids, vec![1], "only the container's sleep is left");
    let table = container.process_table().unwrap();
    assert_eq!(
        table
            .iter()
            .map(|p| (p.pid, p.uid, p.command.as_str()))
            .collect::<Vec<_>>(),
        [(1, 0, "sleep 60")],
        "top sees it as the container does"
    );
    let init = container.init_pid();
    container.destroy().unwrap();
    assert_eq!(Reaper::global().wait(init), ExitStatus::Signaled(9));
}

#[test]
fn a_terminal_session_sees_its_resized_size() {
    let f = fixture();
    let mut spec = spec(&["sh", "-c", "stty size; read line; stty size"]);
    let mut process = spec.process().clone().unwrap();
    process.set_terminal(Some(true));
    spec.set_process(Some(process));
    let (mut container, mut io) = f
        .runtime
        .create("tty", spec, vec![f.layer.clone()], StdioRequest::default())
        .unwrap();
    let mut terminal = io.terminal.take().expect("a pty");
    container.start().unwrap();
    let mut output = Vec::new();
    let mut buffer = [0u8; 256];
    while !String::from_utf8_lossy(&output).contains("24 80") {
        let n = terminal.read(&mut buffer).unwrap();
        assert!(
            n > 0,
            "terminal closed early: {:?}",
            String::from_utf8_lossy(&output)
        );
        output.extend_from_slice(&buffer[..n]);
    }
    resize(&terminal, 40, 100).unwrap();
    terminal.write_all(b"go\n").unwrap();
    while !String::from_utf8_lossy(&output).contains("40 100") {
        // EIO once the process exits and the pty hangs up.
        let n = terminal.read(&mut buffer).unwrap_or(0);
        assert!(
            n > 0,
            "no resized size in {:?}",
            String::from_utf8_lossy(&output)
        );
        output.extend_from_slice(&buffer[..n]);
    }
    assert_eq!(
        Reaper::global().wait(container.init_pid()),
        ExitStatus::Exited(0)
    );
    container.destroy().unwrap();
}

#[test]
fn user_capabilities_and_read_only_root_apply() {
    let f = fixture();
    let mut spec = spec(&[
        "sh",
        "-c",
        "id -u; id -G; grep CapEff /proc/self/status; touch /x || echo read-only",
    ]);
    let mut process = spec.process().clone().unwrap();
    process.set_user(
        UserBuilder::default()
            .uid(1000u32)
            .gid(1000u32)
            .additional_gids(vec![1000u32, 2000])
            .build()
            .unwrap(),
    );
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(true)
            .build()
            .unwrap(),
    ));
    let (stdout, stderr, status) = run(&f, "user", spec);
    assert_eq!(status, ExitStatus::Exited(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[1], "1000 2000");
    // The default set: AUDIT_WRITE (29), KILL (5), NET_BIND_SERVICE (10).
    let expected = (1u64 << 29) | (1 << 5) | (1 << 10);
    assert_eq!(lines[2], format!("CapEff:\t{expected:016x}"));
    assert_eq!(lines[3], "read-only");
}

#[test]
fn bad_specs_and_ids_are_clear_errors() {
    let f = fixture();
    let layers = || vec![f.layer.clone()];
    let error = f
        .runtime
        .create("empty", spec(&[]), layers(), output_request())
        .err()
        .unwrap();
    assert!(
        error.to_string().contains("process.args is empty"),
        "{error}"
    );

    let mut with_user_ns = spec(&["true"]);
    let mut linux = LinuxBuilder::default().build().unwrap();
    linux.set_namespaces(Some(vec![LinuxNamespaceBuilder::default()
        .typ(LinuxNamespaceType::User)
        .build()
        .unwrap()]));
    with_user_ns.set_linux(Some(linux));
    let error = f
        .runtime
        .create("userns", with_user_ns, layers(), output_request())
        .err()
        .unwrap();
    assert!(
        error
            .to_string()
            .contains("user namespaces are not supported"),
        "{error}"
    );

    // A notifier would need a listener on the host: refused by name.
    let notifying = with_seccomp(
        spec(&["true"]),
        serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}),
    );
    let error = f
        .runtime
        .create("seccomp", notifying, layers(), output_request())
        .err()
        .unwrap();
    assert!(error.to_string().contains("SCMP_ACT_NOTIFY"), "{error}");

    for id in ["", "../escape", "a/b", ".hidden"] {
        let error = f
            .runtime
            .create(id, spec(&["true"]), layers(), output_request())
            .err()
            .unwrap();
        assert!(
            matches!(error, RuntimeError::InvalidId(_)),
            "{id:?}: {error}"
        );
    }

    let (container, _io) = create(&f, "twice", spec(&["true"]));
    let error = f
        .runtime
        .create("twice", spec(&["true"]), layers(), output_request())
        .err()
        .unwrap();
    assert!(matches!(error, RuntimeError::Exists(_)), "{error}");
    container.destroy().unwrap();

    // A program that is not there fails at start, with its name.
    let (mut container, _io) = create(&f, "missing", spec(&["no-such-program"]));
    let error = container.start().unwrap_err();
    assert!(error.to_string().contains("no-such-program"), "{error}");
    container.destroy().unwrap();

    // A mount whose source does not exist fails at create, naming it.
    let mut bad_mount = spec(&["true"]);
    let mut mounts = bad_mount.mounts().clone().unwrap();
    mounts.push(
        oci_spec::runtime::MountBuilder::default()
            .destination("/data")
            .typ("bind")
            .source("/nonexistent/volume")
            .options(vec!["rbind".to_string()])
            .build()
            .unwrap(),
    );
    bad_mount.set_mounts(Some(mounts));
    let error = f
        .runtime
        .create("badmount", bad_mount, layers(), output_request())
        .err()
        .unwrap();
    assert!(error.to_string().contains("/nonexistent/volume"), "{error}");
    assert!(
        !Path::new(&f.cgroup_parent.join("badmount")).exists(),
        "nothing is left"
    );
}

#[test]
fn a_bind_mount_through_a_symlink_stays_inside_the_root() {
    let f = fixture();
    // The image points /data at the host's /etc; the volume must land in
    // the container's /etc instead, and the host's stay untouched.
    std::os::unix::fs::symlink("/etc", f.layer.join("data")).unwrap();
    let volume = tempfile::tempdir().unwrap();
    fs::write(volume.path().join("file"), "from the volume").unwrap();
    let mut spec = spec(&["cat", "/etc/volume/file"]);
    let mut mounts = spec.mounts().clone().unwrap();
    mounts.push(
        oci_spec::runtime::MountBuilder::default()
            .destination("/data/volume")
            .typ("bind")
            .source(volume.path())
            .options(vec!["rbind".to_string(), "ro".to_string()])
            .build()
            .unwrap(),
    );
    spec.set_mounts(Some(mounts));
    let (stdout, stderr, status) = run(&f, "symlinked", spec);
    assert_eq!(
        (stdout.as_str(), status),
        ("from the volume", ExitStatus::Exited(0)),
        "{stderr}"
    );
    assert!(!Path::new("/etc/volume").exists());
}

/// `spec` with the seccomp profile `profile` (JSON, as containerd writes it).
fn with_seccomp(mut spec: Spec, profile: serde_json::Value) -> Spec {
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_seccomp(Some(serde_json::from_value(profile).unwrap()));
    spec.set_linux(Some(linux));
    spec
}

#[test]
fn a_seccomp_profile_denies_its_syscalls_with_its_errno_in_execs_too() {
    let f = fixture();
    let profile = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["no_such_syscall"], "action": "SCMP_ACT_ERRNO"}
        ]
    });
    let script =
        "mkdir /tmp/made; echo mkdir=$?; touch /tmp/touched && echo touched; exec sleep 60";
    let (mut container, io) = create(
        &f,
        "seccomp-errno",
        with_seccomp(spec(&["sh", "-c", script]), profile),
    );
    container.start().unwrap();
    let mut stdout = io.stdout;
    let mut first = [0u8; 16];
    stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"mkdir=1\ntouched\n");
    let mut process = spec(&["mkdir", "/tmp/by-exec"]).process().clone().unwrap();
    process.set_env(Some(vec!["PATH=/bin".into()]));
    let (pid, mut exec_io) = f
        .runtime
        .exec(&container, process, output_request())
        .unwrap();
    let stderr = read_all(exec_io.stderr.take());
    assert_eq!(Reaper::global().wait(pid), ExitStatus::Exited(1));
    // EACCES, the profile's errnoRet, not the default EPERM.
    assert!(stderr.contains("Permission denied"), "{stderr}");
    let init = container.init_pid();
    container.destroy().unwrap();
    Reaper::global().wait(init);
}

#[test]
fn seccomp_argument_conditions_and_a_default_deny_hold() {
    let f = fixture();
    // kill(2) is denied only for SIGUSR1 (its second argument).
    let conditional = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["kill"], "action": "SCMP_ACT_ERRNO",
                      "args": [{"index": 1, "value": 10, "op": "SCMP_CMP_EQ"}]}]
    });
    let script = "kill -0 $$ && echo zero; kill -USR1 $$; echo usr1=$?";
    let (stdout, stderr, status) = run(
        &f,
        "seccomp-args",
        with_seccomp(spec(&["sh", "-c", script]), conditional),
    );
    assert_eq!(
        (stdout.as_str(), status),
        ("zero\nusr1=1\n", ExitStatus::Exited(0)),
        "{stderr}"
    );

    // Everything but what is listed fails with EPERM, and the process
    // cannot lift its filter (seccomp and prctl are not on the list).
    let deny_by_default = serde_json::json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["execve", "brk", "arch_prctl", "set_tid_address", "exit_group",
                                "write", "getuid", "mmap", "rt_sigprocmask", "rt_sigaction",
                                "getpid", "getppid", "uname", "readlink", "prlimit64",
                                "ioctl", "close", "capget", "capset", "setgroups", "setgid",
                                "setuid", "setresuid", "setresgid", "prctl", "getcwd", "stat",
                                "newfstatat", "fstat", "geteuid", "getgid", "getegid", "umask",
                                "set_robust_list", "rseq", "mprotect", "munmap"],
                      "action": "SCMP_ACT_ALLOW"}]
    });
    let (stdout, stderr, status) = run(
        &f,
        "seccomp-deny",
        with_seccomp(spec(&["echo", "listed"]), deny_by_default.clone()),
    );
    assert_eq!(
        (stdout.as_str(), status),
        ("listed\n", ExitStatus::Exited(0)),
        "{stderr}"
    );
    let (_, stderr, status) = run(
        &f,
        "seccomp-deny-ls",
        with_seccomp(spec(&["ls", "/"]), deny_by_default),
    );
    assert_ne!(
        status,
        ExitStatus::Exited(0),
        "ls needs open, which is denied: {stderr}"
    );
}
