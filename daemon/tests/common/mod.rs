//! A real capsad for the integration tests: no network, no cgroups, empty
//! kernel and initrd files (nothing here boots a VM), in a directory of
//! the test's own.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts capsad in `dir` with `args` besides the usual ones; returns once
/// its socket (`dir/capsad.sock`) accepts.
pub fn start(dir: &Path, args: &[&str]) -> Daemon {
    std::fs::write(dir.join("vmlinux"), b"").unwrap();
    std::fs::write(dir.join("initrd"), b"").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_capsad"))
        .args([
            "--kernel", "vmlinux", "--initrd", "initrd", "--root", "root",
        ])
        .args(["--socket", "capsad.sock", "--no-network"])
        .args(["--cgroup-parent", "no-cgroup"])
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(dir.join("capsad.sock")).is_err() {
        if Instant::now() > deadline || daemon.0.try_wait().unwrap().is_some() {
            let _ = daemon.0.kill();
            let mut stderr = String::new();
            let _ =
                std::io::Read::read_to_string(&mut daemon.0.stderr.take().unwrap(), &mut stderr);
            panic!("capsad never listened: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon
}

/// What capsad wrote on stderr, once it has been killed.
// Each test binary uses part of this module.
#[allow(dead_code)]
pub fn stderr_of(mut daemon: Daemon) -> String {
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(&mut daemon.0.stderr.take().unwrap(), &mut stderr);
    stderr
}
