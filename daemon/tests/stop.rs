//! capsad stops on SIGTERM (a service manager's stop) with exit status 0,
//! even while a client follows its events and never hangs up.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn sigterm_stops_the_daemon_though_a_client_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initrd) = (dir.path().join("vmlinux"), dir.path().join("initrd"));
    std::fs::write(&kernel, b"").unwrap();
    std::fs::write(&initrd, b"").unwrap();
    let socket = dir.path().join("capsad.sock");
    let config = dir.path().join("capsad.toml");
    std::fs::write(
        &config,
        format!(
            "kernel = {:?}\ninitrd = {:?}\nroot = {:?}\nsocket = {:?}\nno-network = true\ncgroup-parent = {:?}\n",
            kernel,
            initrd,
            dir.path().join("root"),
            socket,
            dir.path().join("no-cgroup"),
        ),
    )
    .unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_capsad"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut follower = loop {
        match UnixStream::connect(&socket) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                let _ = daemon.kill();
                let mut stderr = String::new();
                let _ = daemon.stderr.take().unwrap().read_to_string(&mut stderr);
                panic!("capsad never listened ({e}): {stderr}");
            }
        }
    };
    follower
        .write_all(b"GET /v1/events HTTP/1.1\r\nhost: capsad\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    follower.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // SAFETY: kill(2) on our own child's pid, which has not been waited for.
    assert_eq!(unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) }, 0);
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(20) {
            let _ = daemon.kill();
            panic!("capsad was still running 20 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
