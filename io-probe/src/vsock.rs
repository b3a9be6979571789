//! Opening vsock streams: from the guest with AF_VSOCK sockets, from the
//! host through the VMM's Unix socket and its `CONNECT <port>` handshake.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    accept, bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

pub const HOST_CID: u32 = 2;

/// Like `host_connect`, retrying for up to `patience` while the guest is
/// still booting (nothing listens on the port yet).
pub fn host_connect_patiently(path: &Path, port: u32, patience: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + patience;
    loop {
        match host_connect(path, port) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A host process's connection to guest port `port`.
pub fn host_connect(path: &Path, port: u32) -> Result<UnixStream> {
    let mut stream = UnixStream::connect(path)
        .with_context(|| format!("connecting to the VMM's vsock socket {}", path.display()))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        if stream.read(&mut byte)? == 0 {
            bail!("the VMM closed the connection: nothing listens on guest port {port}");
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line);
    if !line.starts_with("OK ") {
        bail!("unexpected handshake reply {line:?}");
    }
    Ok(stream)
}

/// A guest connection to host port `port`.
pub fn guest_connect(port: u32) -> Result<File> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a vsock socket")?;
    connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, port))
        .with_context(|| format!("connecting to host vsock port {port}"))?;
    Ok(File::from(fd))
}

pub struct GuestListener {
    fd: OwnedFd,
}

impl GuestListener {
    pub fn bind(port: u32) -> Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc_vmaddr_cid_any(), port))
            .with_context(|| format!("binding vsock port {port}"))?;
        listen(&fd, Backlog::new(128)?)?;
        Ok(Self { fd })
    }

    pub fn accept(&self) -> Result<File> {
        let raw = accept(self.fd.as_raw_fd())?;
        // SAFETY: accept returned a new descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(raw) })
    }
}

/// VMADDR_CID_ANY: listen on whatever CID the guest has.
fn libc_vmaddr_cid_any() -> u32 {
    u32::MAX
}
