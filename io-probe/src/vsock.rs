//! Opening vsock streams from the guest with AF_VSOCK sockets (the host
//! side uses `capsa_protocol::vmm_socket`).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};
use nix::sys::socket::{
    accept, bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

pub const HOST_CID: u32 = 2;

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
