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
pub use capsa_vmm_config::DEFAULT_GUEST_CID;
const QUEUE_SIZES: &[u16] = &[256, 256, 256];
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

pub use capsa_vmm_config::VsockConfig;

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
    /// Restored from a snapshot: the guest's connections are to be reset
    /// at the next activation.
    reset_guest: bool,
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
        let listener = match config.listener_fd {
            Some(fd) => UnixListener::from(crate::fds::adopt(fd).map_err(listen_error)?),
            None => {
                remove_stale_socket(&config.path).map_err(listen_error)?;
                UnixListener::bind(&config.path).map_err(listen_error)?
            }
        };
        listener.set_nonblocking(true).map_err(listen_error)?;
        Ok(Self {
            config: config.clone(),
            listener: Arc::new(listener),
            config_space: config.guest_cid.to_le_bytes(),
            reset_guest: false,
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

// The socket file stays when the VMM ends: under its seccomp filter a
// running VMM removes no file. Whoever starts the next VMM on that path
// removes it (`remove_stale_socket`, and the starters themselves).

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

    fn restored(&mut self) {
        self.reset_guest = true;
    }

    fn activate(&mut self, context: ActivateContext) -> Result<Worker, ActivateError> {
        let mut muxer = self.muxer(context.memory, context.queues, context.interrupt.clone());
        if std::mem::take(&mut self.reset_guest) {
            muxer
                .reset_guest_transport()
                .map_err(|e| ActivateError::Backend(e.to_string()))?;
        }
        Worker::spawn(
            muxer,
            context.queue_events,
            context.interrupt,
            &context.thread,
        )
    }
}

impl Vsock {
    /// What serves the queues and the host sockets.
    pub fn muxer(
        &self,
        memory: crate::virtio::Memory,
        queues: Vec<virtio_queue::Queue>,
        interrupt: crate::virtio::Interrupt,
    ) -> VsockMuxer {
        VsockMuxer::new(
            self.config.clone(),
            self.listener.clone(),
            memory,
            queues,
            interrupt,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::packet::*;
    use super::*;
    use crate::virtio::testing::{readable, writable, Guest, DATA_START};
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    const GUEST_CID: u64 = 3;
    const TX_HEADER: u64 = DATA_START;
    const TX_DATA: u64 = DATA_START + 0x1000;
    const RX_BUFFERS: u64 = DATA_START + 0x10_0000;

    struct Harness {
        g: Guest,
        dir: tempfile::TempDir,
        rx_heads: HashMap<u32, u64>,
        rx_seen: u16,
        tx_sent: u16,
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Packet {
        src_port: u32,
        dst_port: u32,
        op: u16,
        flags: u32,
        data: Vec<u8>,
        buf_alloc: u32,
    }

    impl Harness {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let config = VsockConfig {
                guest_cid: GUEST_CID,
                ..VsockConfig::at(dir.path().join("vsock.sock"))
            };
            let mut g = Guest::new(Box::new(Vsock::new(&config).unwrap()));
            g.activate(0, 3, 64);
            let mut h = Self {
                g,
                dir,
                rx_heads: HashMap::new(),
                rx_seen: 0,
                tx_sent: 0,
            };
            for i in 0..16 {
                h.post_rx(i);
            }
            h
        }

        fn path(&self) -> std::path::PathBuf {
            self.dir.path().join("vsock.sock")
        }

        fn post_rx(&mut self, slot: u64) {
            let header = RX_BUFFERS + slot * 0x2000;
            let head = self.g.add_chain(
                RX_QUEUE,
                &[writable(header, 44), writable(header + 0x1000, 4096)],
            );
            self.rx_heads.insert(u32::from(head), header);
            self.g.notify(RX_QUEUE as u32);
        }

        fn send(
            &mut self,
            src_cid: u64,
            src_port: u32,
            dst_port: u32,
            op: u16,
            flags: u32,
            data: &[u8],
        ) {
            let mut h = [0u8; 44];
            h[0..8].copy_from_slice(&src_cid.to_le_bytes());
            h[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
            h[16..20].copy_from_slice(&src_port.to_le_bytes());
            h[20..24].copy_from_slice(&dst_port.to_le_bytes());
            h[24..28].copy_from_slice(&(data.len() as u32).to_le_bytes());
            h[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
            h[30..32].copy_from_slice(&op.to_le_bytes());
            h[32..36].copy_from_slice(&flags.to_le_bytes());
            h[36..40].copy_from_slice(&65536u32.to_le_bytes());
            self.send_raw(&h, data);
        }

        fn send_raw(&mut self, header: &[u8], data: &[u8]) {
            self.g.write(TX_HEADER, header);
            self.g.write(TX_DATA, data);
            let mut descs = vec![readable(TX_HEADER, header.len() as u32)];
            if !data.is_empty() {
                descs.push(readable(TX_DATA, data.len() as u32));
            }
            self.g.add_chain(TX_QUEUE, &descs);
            self.g.notify(TX_QUEUE as u32);
            self.tx_sent += 1;
            assert!(self.g.wait_used(TX_QUEUE, self.tx_sent), "tx completes");
        }

        /// The next packet the device put on the RX queue.
        fn receive(&mut self) -> Packet {
            assert!(
                self.g.wait_used(RX_QUEUE, self.rx_seen + 1),
                "no packet for the guest"
            );
            let (head, len) = self.g.used_entry(RX_QUEUE, self.rx_seen);
            self.rx_seen += 1;
            let at = self.rx_heads[&head];
            let h = self.g.read(at, 44);
            let field32 = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
            let data_len = field32(24) as usize;
            assert_eq!(len as usize, 44 + data_len);
            assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), GUEST_CID);
            let packet = Packet {
                src_port: field32(16),
                dst_port: field32(20),
                op: u16::from_le_bytes([h[30], h[31]]),
                flags: field32(32),
                data: self.g.read(at + 0x1000, data_len),
                buf_alloc: field32(36),
            };
            self.post_rx(u64::from(self.rx_seen) + 16);
            packet
        }

        fn nothing_received(&self) -> bool {
            std::thread::sleep(Duration::from_millis(50));
            self.g.used_idx(RX_QUEUE) == self.rx_seen
        }
    }

    #[test]
    fn guest_connects_to_a_host_listener_and_both_sides_talk() {
        let mut h = Harness::new();
        let listener =
            std::os::unix::net::UnixListener::bind(format!("{}_5000", h.path().display())).unwrap();
        h.send(GUEST_CID, 1234, 5000, OP_REQUEST, 0, &[]);
        let reply = h.receive();
        assert_eq!(
            (reply.op, reply.src_port, reply.dst_port),
            (OP_RESPONSE, 5000, 1234)
        );
        let (mut host, _) = listener.accept().unwrap();
        h.send(GUEST_CID, 1234, 5000, OP_RW, 0, b"hello host");
        let mut buf = [0u8; 10];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello host");
        host.write_all(b"hello guest").unwrap();
        let data = h.receive();
        assert_eq!(
            (data.op, data.data.as_slice()),
            (OP_RW, &b"hello guest"[..])
        );
        h.send(GUEST_CID, 1234, 5000, OP_SHUTDOWN, SHUTDOWN_BOTH, &[]);
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(host.read(&mut buf).unwrap(), 0, "host sees end of stream");
        assert_eq!(h.receive().op, OP_RST);
    }

    #[test]
    fn host_connects_with_connect_and_gets_ok_once_the_guest_accepts() {
        let mut h = Harness::new();
        let mut host = UnixStream::connect(h.path()).unwrap();
        host.write_all(b"CONNECT 6000\n").unwrap();
        let request = h.receive();
        assert_eq!((request.op, request.dst_port), (OP_REQUEST, 6000));
        h.send(GUEST_CID, 6000, request.src_port, OP_RESPONSE, 0, &[]);
        let mut reply = [0u8; 64];
        let n = host.read(&mut reply).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&reply[..n]),
            format!("OK {}\n", request.src_port)
        );
        host.write_all(b"ping").unwrap();
        let data = h.receive();
        assert_eq!(data.data, b"ping");
        drop(host);
        let shutdown = h.receive();
        assert_eq!((shutdown.op, shutdown.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
    }

    /// A restored device whose guest has just got the transport reset, 16
    /// RX buffers posted; and where its event buffer is.
    fn restored() -> (Harness, u64) {
        use crate::virtio::VirtioDevice;
        const EVENT_BUFFER: u64 = DATA_START + 0x20_0000;
        let dir = tempfile::tempdir().unwrap();
        let config = VsockConfig {
            guest_cid: GUEST_CID,
            ..VsockConfig::at(dir.path().join("vsock.sock"))
        };
        let mut device = Vsock::new(&config).unwrap();
        device.restored();
        let mut g = Guest::new(Box::new(device));
        g.negotiate(crate::virtio::VIRTIO_F_VERSION_1);
        for index in 0..3 {
            g.setup_queue(index, 64);
        }
        g.write(EVENT_BUFFER, &[0xff; 4]);
        g.add_chain(2, &[writable(EVENT_BUFFER, 4)]);
        g.driver_ok();
        assert!(g.wait_used(2, 1), "the reset event is delivered");
        assert_eq!(g.read(EVENT_BUFFER, 4), 0u32.to_le_bytes());
        let mut h = Harness {
            g,
            dir,
            rx_heads: HashMap::new(),
            rx_seen: 0,
            tx_sent: 0,
        };
        for i in 0..16 {
            h.post_rx(i);
        }
        (h, EVENT_BUFFER)
    }

    #[test]
    fn a_restored_device_resets_the_guest_and_serves_host_clients_once_it_took_that() {
        let (mut h, event_buffer) = restored();
        // A host client now waits: the guest has not taken the reset.
        let mut host = UnixStream::connect(h.path()).unwrap();
        host.write_all(b"CONNECT 6000\n").unwrap();
        assert!(h.nothing_received(), "a request before the reset was taken");
        // The guest gives the event buffer back: it took the reset.
        h.g.add_chain(2, &[writable(event_buffer, 4)]);
        h.g.notify(2);
        let request = h.receive();
        assert_eq!((request.op, request.dst_port), (OP_REQUEST, 6000));
    }

    #[test]
    fn a_reset_taken_without_a_kick_is_seen_in_the_event_queue() {
        let (mut h, event_buffer) = restored();
        let mut host = UnixStream::connect(h.path()).unwrap();
        host.write_all(b"CONNECT 6000\n").unwrap();
        assert!(h.nothing_received(), "a request before the reset was taken");
        // The buffer is posted again, but the driver does not kick (its
        // notifications suppressed): the device sees the index move.
        h.g.add_chain(2, &[writable(event_buffer, 4)]);
        let request = h.receive();
        assert_eq!((request.op, request.dst_port), (OP_REQUEST, 6000));
    }

    #[test]
    fn host_data_waits_for_guest_credit() {
        let mut h = Harness::new();
        let listener =
            std::os::unix::net::UnixListener::bind(format!("{}_5001", h.path().display())).unwrap();
        // The guest advertises 65536 bytes of buffer in `send`.
        h.send(GUEST_CID, 1, 5001, OP_REQUEST, 0, &[]);
        assert_eq!(h.receive().op, OP_RESPONSE);
        let (mut host, _) = listener.accept().unwrap();
        host.write_all(&vec![7u8; 100_000]).unwrap();
        let mut got = 0;
        while got < 65536 {
            let p = h.receive();
            assert_eq!(p.op, OP_RW);
            got += p.data.len();
        }
        assert_eq!(got, 65536, "never more than the credit");
        assert!(h.nothing_received());
        // The guest consumed everything: credit for the rest.
        let mut header = [0u8; 44];
        header[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
        header[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
        header[16..20].copy_from_slice(&1u32.to_le_bytes());
        header[20..24].copy_from_slice(&5001u32.to_le_bytes());
        header[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        header[30..32].copy_from_slice(&OP_CREDIT_UPDATE.to_le_bytes());
        header[36..40].copy_from_slice(&65536u32.to_le_bytes());
        header[40..44].copy_from_slice(&65536u32.to_le_bytes());
        h.send_raw(&header, &[]);
        while got < 100_000 {
            got += h.receive().data.len();
        }
        assert_eq!(got, 100_000);
    }

    #[test]
    fn credit_carried_by_a_data_packet_resumes_a_stalled_stream() {
        let mut h = Harness::new();
        let listener =
            std::os::unix::net::UnixListener::bind(format!("{}_5002", h.path().display())).unwrap();
        h.send(GUEST_CID, 1, 5002, OP_REQUEST, 0, &[]);
        assert_eq!(h.receive().op, OP_RESPONSE);
        let (mut host, _) = listener.accept().unwrap();
        host.write_all(&vec![7u8; 70_000]).unwrap();
        let mut got = 0;
        while got < 65536 {
            got += h.receive().data.len();
        }
        assert!(h.nothing_received(), "stalled on credit");
        // The guest's next data packet says it consumed everything.
        let mut header = [0u8; 44];
        header[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
        header[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
        header[16..20].copy_from_slice(&1u32.to_le_bytes());
        header[20..24].copy_from_slice(&5002u32.to_le_bytes());
        header[24..28].copy_from_slice(&3u32.to_le_bytes());
        header[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        header[30..32].copy_from_slice(&OP_RW.to_le_bytes());
        header[36..40].copy_from_slice(&65536u32.to_le_bytes());
        header[40..44].copy_from_slice(&65536u32.to_le_bytes());
        h.send_raw(&header, b"abc");
        while got < 70_000 {
            got += h.receive().data.len();
        }
        let mut buf = [0u8; 3];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abc");
    }

    #[test]
    fn connections_to_nothing_and_packets_for_no_connection_are_reset() {
        let mut h = Harness::new();
        h.send(GUEST_CID, 1, 5999, OP_REQUEST, 0, &[]);
        assert_eq!(h.receive().op, OP_RST, "nobody listens on 5999");
        h.send(GUEST_CID, 2, 5000, OP_RW, 0, b"stray");
        assert_eq!(h.receive().op, OP_RST);
        h.send(GUEST_CID, 3, 5000, 99, 0, &[]);
        assert_eq!(h.receive().op, OP_RST, "unknown op");
        // An RST for nothing gets no answer.
        h.send(GUEST_CID, 4, 5000, OP_RST, 0, &[]);
        assert!(h.nothing_received());
    }

    #[test]
    fn spoofed_and_malformed_packets_are_dropped_and_the_device_keeps_working() {
        let mut h = Harness::new();
        let listener =
            std::os::unix::net::UnixListener::bind(format!("{}_5000", h.path().display())).unwrap();
        listener.set_nonblocking(true).unwrap();
        h.send(99, 1, 5000, OP_REQUEST, 0, &[]);
        assert!(h.nothing_received(), "wrong source CID");
        assert!(listener.accept().is_err(), "no connection was made for it");
        h.send_raw(&[0u8; 10], &[]);
        // Header claims more data than the packet carries.
        let mut header = [0u8; 44];
        header[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
        header[24..28].copy_from_slice(&1_000_000u32.to_le_bytes());
        h.send_raw(&header, b"short");
        // A header in a device-writable buffer.
        h.g.add_chain(TX_QUEUE, &[writable(TX_HEADER, 44)]);
        h.g.notify(TX_QUEUE as u32);
        h.tx_sent += 1;
        assert!(h.g.wait_used(TX_QUEUE, h.tx_sent));
        assert!(h.nothing_received());
        h.send(GUEST_CID, 1, 5000, OP_REQUEST, 0, &[]);
        assert_eq!(h.receive().op, OP_RESPONSE, "still serving");
    }

    #[test]
    fn a_guest_overrunning_its_credit_is_reset() {
        let mut h = Harness::new();
        let listener =
            std::os::unix::net::UnixListener::bind(format!("{}_5000", h.path().display())).unwrap();
        h.send(GUEST_CID, 1, 5000, OP_REQUEST, 0, &[]);
        let response = h.receive();
        assert_eq!(response.buf_alloc, super::connection::HOST_BUF_ALLOC);
        let (host, _) = listener.accept().unwrap();
        // The host never reads: its socket fills, then our buffer, then
        // the guest is past its credit.
        let chunk = vec![1u8; 4096];
        let mut reset = false;
        for _ in 0..2048 {
            h.send(GUEST_CID, 1, 5000, OP_RW, 0, &chunk);
            if h.g.used_idx(RX_QUEUE) > h.rx_seen {
                let p = h.receive();
                if p.op == OP_RST {
                    reset = true;
                    break;
                }
            }
        }
        assert!(reset, "overrun reset");
        drop(host);
    }

    #[test]
    fn bad_connect_lines_are_answered_and_closed() {
        let h = Harness::new();
        let mut host = UnixStream::connect(h.path()).unwrap();
        host.write_all(b"HELLO\n").unwrap();
        let mut reply = String::new();
        host.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("ERROR"), "{reply}");
        let mut host = UnixStream::connect(h.path()).unwrap();
        host.write_all(&[b'x'; 100]).unwrap();
        let mut reply = String::new();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Closed with the rest unread: the reply may be cut by a reset.
        match host.read_to_string(&mut reply) {
            Ok(_) => assert!(reply.starts_with("ERROR"), "{reply}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }

    #[test]
    fn reserved_cids_and_occupied_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = VsockConfig {
            guest_cid: 2,
            ..VsockConfig::at(dir.path().join("v.sock"))
        };
        assert!(matches!(
            Vsock::new(&config),
            Err(VsockError::ReservedCid(2))
        ));
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let config = VsockConfig::at(file);
        let err = Vsock::new(&config).err().unwrap();
        assert!(err.to_string().contains("not a socket"), "{err}");
    }
}
