//! virtio-vsock, emulated in the VMM (no vhost-vsock needed) and bridged to
//! Unix sockets, in the style Firecracker made common:
//!
//! - the guest connecting to host port P reaches whoever listens on the Unix
//!   socket `<path>_P`;
//! - a host process connects to the guest by opening the Unix socket
//!   `<path>`, writing `CONNECT <port>\n` and reading `OK <host_port>\n`;
//!   from then on the Unix stream carries the connection's bytes.
//!
//! Streams only, with the spec's credit-based flow control both ways.

mod connection;
mod muxer;
mod packet;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

use super::worker::Worker;
use super::{read_config_bytes, ActivateContext, ActivateError};
pub use muxer::VsockMuxer;

/// Guest CIDs 0-2 are reserved (hypervisor, local, host).
pub const HOST_CID: u64 = 2;
pub const DEFAULT_GUEST_CID: u64 = 3;
const QUEUE_SIZES: &[u16] = &[256, 256, 256];
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The Unix socket host processes connect through; guest-initiated
    /// connections go to `<path>_<port>`.
    pub path: PathBuf,
    pub guest_cid: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved: use 3 or more")]
    ReservedCid(u64),
    #[error("cannot listen on vsock socket {}: {source}", path.display())]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct Vsock {
    config: VsockConfig,
    listener: Arc<UnixListener>,
    config_space: [u8; 8],
}

impl Vsock {
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid <= HOST_CID || config.guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid(config.guest_cid));
        }
        let listen_error = |source| VsockError::Listen {
            path: config.path.clone(),
            source,
        };
        remove_stale_socket(&config.path).map_err(listen_error)?;
        let listener = UnixListener::bind(&config.path).map_err(listen_error)?;
        listener.set_nonblocking(true).map_err(listen_error)?;
        Ok(Self {
            config: config.clone(),
            listener: Arc::new(listener),
            config_space: config.guest_cid.to_le_bytes(),
        })
    }
}

/// A socket file left by a VMM that died is in the way of bind(); anything
/// else at that path is not ours to remove.
fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process is serving this socket",
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config.path);
    }
}

impl super::VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn activate(&mut self, context: ActivateContext) -> Result<Worker, ActivateError> {
        let muxer = VsockMuxer::new(
            self.config.clone(),
            self.listener.clone(),
            context.memory,
            context.queues,
            context.interrupt.clone(),
        );
        Worker::spawn(muxer, context.queue_events, context.interrupt)
    }
}
