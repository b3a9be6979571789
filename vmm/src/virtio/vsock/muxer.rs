//! The vsock device's worker: moves packets between the guest's queues and
//! the host's Unix sockets, one `Connection` per stream.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{ReadVolatile, VolatileSlice};
use vmm_sys_util::epoll::EventSet;

use super::connection::{Connection, State, Violation, HOST_BUF_ALLOC};
use super::packet::*;
use super::{VsockConfig, HOST_CID, RX_QUEUE, TX_QUEUE};
use crate::virtio::worker::{DeviceBroken, QueueHandler, Registrar, FIRST_BACKEND_TOKEN};
use crate::virtio::{complete, next_chain, notify, Interrupt, Memory};

const LISTENER_TOKEN: u64 = FIRST_BACKEND_TOKEN;
/// The timer that looks, while host clients wait for the guest to take a
/// transport reset, whether it has.
const RESET_TIMER_TOKEN: u64 = FIRST_BACKEND_TOKEN + 1;
/// How often the event queue is looked at for the reset's buffer.
const RESET_POLL: std::time::Duration = std::time::Duration::from_millis(5);
/// How long host clients wait, at most, for the guest to take a reset (a
/// guest that never does is not to hold them forever).
const RESET_PATIENCE: std::time::Duration = std::time::Duration::from_secs(15);
/// Bounds what a guest (or host clients) can make the VMM hold.
const MAX_CONNECTIONS: usize = 1024;
const MAX_QUEUED_CONTROL: usize = 4096;
/// `CONNECT <u32>\n` fits easily; longer is not a CONNECT line.
const MAX_CONNECT_LINE: usize = 32;
/// Host ports for host-initiated connections are picked from here up, away
/// from the low ports guest services listen on.
const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;

/// The event queue, and its one event's ID (virtio spec 5.10.6.4).
const EVENT_QUEUE: usize = 2;
const TRANSPORT_RESET_EVENT: u32 = 0;

/// (host port, guest port)
type Key = (u32, u32);

/// A host client that has not finished its `CONNECT <port>` line yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

enum Owner {
    Handshake,
    Connection(Key),
}

pub struct VsockMuxer {
    config: VsockConfig,
    listener: Arc<UnixListener>,
    memory: Memory,
    queues: Vec<Queue>,
    interrupt: Interrupt,
    connections: HashMap<Key, Connection>,
    handshakes: HashMap<u64, Handshake>,
    owners: HashMap<u64, Owner>,
    control: VecDeque<Control>,
    /// Connections whose host side may have data to read for the guest.
    rx_ready: VecDeque<Key>,
    next_token: u64,
    next_host_port: u32,
    scratch: Vec<u8>,
    bad_packets: u64,
    /// A transport reset the guest has not taken yet: host clients are
    /// not served until it has (a connection made before would be reset
    /// with the old ones), or until RESET_PATIENCE is over.
    reset_timer: Option<PendingReset>,
}

/// A transport reset told to the guest and not taken yet.
struct PendingReset {
    timer: vmm_sys_util::timerfd::TimerFd,
    /// The event queue's available index when the reset's buffer was
    /// used: the guest posts a buffer again once it has reset its
    /// connections (and kicks, unless notifications are suppressed, which
    /// is why the index is looked at too).
    avail_then: std::num::Wrapping<u16>,
    give_up_at: std::time::Instant,
}

impl VsockMuxer {
    pub fn new(
        config: VsockConfig,
        listener: Arc<UnixListener>,
        memory: Memory,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Self {
        Self {
            config,
            listener,
            memory,
            queues,
            interrupt,
            connections: HashMap::new(),
            handshakes: HashMap::new(),
            owners: HashMap::new(),
            control: VecDeque::new(),
            rx_ready: VecDeque::new(),
            next_token: RESET_TIMER_TOKEN + 1,
            next_host_port: FIRST_EPHEMERAL_PORT,
            scratch: vec![0u8; MAX_PACKET_DATA as usize],
            bad_packets: 0,
            reset_timer: None,
        }
    }

    /// Tells the guest, on its event queue, that every connection it had
    /// is gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET): a VM restored from a
    /// snapshot still believes in the connections of the VMM that took it.
    /// The guest then drops them and reads its CID again.
    pub fn reset_guest_transport(&mut self) -> Result<(), DeviceBroken> {
        use std::io::Write as _;
        let memory = self.memory.clone();
        let queue = &mut self.queues[EVENT_QUEUE];
        let Some(chain) = next_chain(queue, &memory)? else {
            // No event buffer posted: nothing the guest could be told.
            return Ok(());
        };
        let head = chain.head_index();
        let written = match chain.writer(&memory) {
            Ok(mut writer) => writer
                .write_all(&TRANSPORT_RESET_EVENT.to_le_bytes())
                .map_or(0, |()| 4),
            Err(_) => 0,
        };
        complete(queue, &memory, head, written)?;
        notify(queue, &memory, &self.interrupt)?;
        use virtio_queue::QueueT;
        let avail_then = queue
            .avail_idx(&memory, std::sync::atomic::Ordering::Acquire)
            .map_err(|e| DeviceBroken(format!("cannot read the event queue: {e}")))?;
        // With event indexes the driver kicks only past the index the
        // device asks for: ask for the buffer the guest gives back.
        queue
            .enable_notification(&memory)
            .map_err(|e| DeviceBroken(format!("cannot ask for the event queue's kick: {e}")))?;
        let mut timer = vmm_sys_util::timerfd::TimerFd::new()
            .map_err(|e| DeviceBroken(format!("cannot make the reset timer: {e}")))?;
        timer
            .reset(RESET_POLL, Some(RESET_POLL))
            .map_err(|e| DeviceBroken(format!("cannot arm the reset timer: {e}")))?;
        self.reset_timer = Some(PendingReset {
            timer,
            avail_then,
            give_up_at: std::time::Instant::now() + RESET_PATIENCE,
        });
        Ok(())
    }

    /// Whether the guest has taken the pending reset: it posted an event
    /// buffer again, or it had its time.
    fn reset_is_taken(&self) -> bool {
        use virtio_queue::QueueT;
        let Some(pending) = &self.reset_timer else {
            return true;
        };
        let reposted = self.queues[EVENT_QUEUE]
            .avail_idx(&self.memory, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|now| now != pending.avail_then);
        reposted || std::time::Instant::now() >= pending.give_up_at
    }

    /// The guest took the transport reset (or was waited for long
    /// enough): host clients are served from now on.
    fn reset_taken(&mut self, registrar: &Registrar) {
        if let Some(PendingReset { timer, .. }) = self.reset_timer.take() {
            registrar.remove(timer.as_raw_fd());
            // Failing that, host clients cannot reach the guest; there is
            // nobody to tell but the client, who sees no answer.
            let _ = registrar.add(self.listener.as_raw_fd(), LISTENER_TOKEN, EventSet::IN);
        }
    }

    fn guest_cid(&self) -> u64 {
        self.config.guest_cid
    }

    fn push_control(&mut self, host_port: u32, guest_port: u32, op: u16, flags: u32) {
        if self.control.len() >= MAX_QUEUED_CONTROL {
            // The guest is not taking packets: dropping a reply (an RST to
            // a bogus packet, say) is its own doing.
            return;
        }
        self.control.push_back(Control {
            host_port,
            guest_port,
            op,
            flags,
        });
    }

    fn reset(&mut self, key: Key) {
        self.push_control(key.0, key.1, OP_RST, 0);
    }

    fn remove(&mut self, key: Key, registrar: &Registrar) {
        if let Some(conn) = self.connections.remove(&key) {
            registrar.remove(conn.stream.as_raw_fd());
            self.owners.remove(&conn.token);
        }
    }

    fn schedule_rx(&mut self, key: Key) {
        if let Some(conn) = self.connections.get_mut(&key) {
            if !conn.wants_rx {
                conn.wants_rx = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    fn allocate_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    fn allocate_host_port(&mut self, guest_port: u32) -> Option<u32> {
        for _ in 0..MAX_CONNECTIONS + 1 {
            let port = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_EPHEMERAL_PORT);
            if !self.connections.contains_key(&(port, guest_port)) {
                return Some(port);
            }
        }
        None
    }

    // ---- guest to host -------------------------------------------------

    fn process_tx(&mut self, registrar: &Registrar) -> Result<(), DeviceBroken> {
        let memory = self.memory.clone();
        let mut served = false;
        while let Some(mut chain) = next_chain(&mut self.queues[TX_QUEUE], &memory)? {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(&memory, &mut chain, MAX_PACKET_DATA) {
                Ok(packet) => {
                    let data_len = match packet.data_slice() {
                        Some(slice) if !packet.is_empty() => {
                            let len = slice.len().min(self.scratch.len());
                            match slice.subslice(0, len) {
                                Ok(s) => {
                                    s.copy_to(&mut self.scratch[..len]);
                                    len
                                }
                                Err(_) => 0,
                            }
                        }
                        _ => 0,
                    };
                    let header = Header::of(&packet);
                    self.handle_tx_packet(header, data_len, registrar);
                }
                Err(_) => {
                    // No trustworthy header, so nobody to reset: drop it.
                    self.bad_packets += 1;
                    if self.bad_packets == 1 {
                        eprintln!(
                            "capsa-vmm: virtio-vsock: dropping malformed packets from the guest"
                        );
                    }
                }
            }
            complete(&mut self.queues[TX_QUEUE], &memory, head, 0)?;
            served = true;
        }
        if served {
            notify(&mut self.queues[TX_QUEUE], &memory, &self.interrupt)?;
        }
        Ok(())
    }

    fn handle_tx_packet(&mut self, header: Header, data_len: usize, registrar: &Registrar) {
        let key = (header.dst_port, header.src_port);
        if header.src_cid != self.guest_cid() || header.dst_cid != HOST_CID {
            // Spoofed or misdirected: not for any connection of ours.
            self.bad_packets += 1;
            return;
        }
        if header.type_ != TYPE_STREAM {
            if header.op != OP_RST {
                self.reset(key);
            }
            return;
        }
        if let Some(conn) = self.connections.get_mut(&key) {
            // Any packet, not only CREDIT_UPDATE, may carry the credit a
            // stalled host-to-guest direction waits for.
            conn.update_peer_credit(header.buf_alloc, header.fwd_cnt);
            if conn.peer_credit() > 0 {
                self.wake_rx(key);
            }
        }
        match header.op {
            OP_REQUEST => self.guest_connect(key, header, registrar),
            OP_RESPONSE => self.guest_accepted(key, registrar),
            OP_RW => self.guest_data(key, data_len, registrar),
            OP_CREDIT_UPDATE => {
                if self
                    .connections
                    .get(&key)
                    .is_some_and(|c| c.peer_credit() > 0)
                {
                    self.wake_rx(key);
                } else if !self.connections.contains_key(&key) {
                    self.reset(key);
                }
            }
            OP_CREDIT_REQUEST => {
                if self.connections.contains_key(&key) {
                    self.push_control(key.0, key.1, OP_CREDIT_UPDATE, 0);
                } else {
                    self.reset(key);
                }
            }
            OP_SHUTDOWN => self.guest_shutdown(key, header.flags, registrar),
            OP_RST => self.remove(key, registrar),
            _ => {
                self.remove(key, registrar);
                self.reset(key);
            }
        }
    }

    /// Re-queues a connection whose reads stopped for lack of credit.
    fn wake_rx(&mut self, key: Key) {
        if let Some(conn) = self.connections.get_mut(&key) {
            if conn.wants_rx && !self.rx_ready.contains(&key) {
                self.rx_ready.push_back(key);
            }
        }
    }

    fn guest_connect(&mut self, key: Key, header: Header, registrar: &Registrar) {
        if self.connections.contains_key(&key) || self.connections.len() >= MAX_CONNECTIONS {
            self.reset(key);
            return;
        }
        let path = format!("{}_{}", self.config.path.display(), key.0);
        let stream = match UnixStream::connect(&path) {
            Ok(stream) if stream.set_nonblocking(true).is_ok() => stream,
            _ => {
                self.reset(key);
                return;
            }
        };
        let token = self.allocate_token();
        let interest = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
        if registrar.add(stream.as_raw_fd(), token, interest).is_err() {
            self.reset(key);
            return;
        }
        let mut conn = Connection::new(stream, token, State::Established);
        conn.update_peer_credit(header.buf_alloc, header.fwd_cnt);
        self.connections.insert(key, conn);
        self.owners.insert(token, Owner::Connection(key));
        self.push_control(key.0, key.1, OP_RESPONSE, 0);
    }

    fn guest_accepted(&mut self, key: Key, registrar: &Registrar) {
        let Some(conn) = self.connections.get_mut(&key) else {
            self.reset(key);
            return;
        };
        if conn.state != State::Connecting {
            self.remove(key, registrar);
            self.reset(key);
            return;
        }
        conn.state = State::Established;
        let reply = format!("OK {}\n", key.0);
        // The client waits for this line before sending, so the socket
        // buffer is empty and takes it whole.
        if conn.stream.write_all(reply.as_bytes()).is_err() {
            self.remove(key, registrar);
            self.reset(key);
            return;
        }
        self.schedule_rx(key);
    }

    fn guest_data(&mut self, key: Key, data_len: usize, registrar: &Registrar) {
        let Some(conn) = self.connections.get_mut(&key) else {
            self.reset(key);
            return;
        };
        if conn.state != State::Established || conn.guest_done_sending {
            self.remove(key, registrar);
            self.reset(key);
            return;
        }
        match conn.receive_from_guest(&self.scratch[..data_len]) {
            Ok(()) => {
                if conn.credit_update_due() {
                    self.push_control(key.0, key.1, OP_CREDIT_UPDATE, 0);
                }
            }
            Err(Violation::CreditOverrun) => {
                self.remove(key, registrar);
                self.reset(key);
            }
        }
    }

    fn guest_shutdown(&mut self, key: Key, flags: u32, registrar: &Registrar) {
        let Some(conn) = self.connections.get_mut(&key) else {
            self.reset(key);
            return;
        };
        conn.guest_done_receiving |= flags & SHUTDOWN_RCV != 0;
        conn.guest_done_sending |= flags & SHUTDOWN_SEND != 0;
        self.finish_if_done(key, registrar);
    }

    /// Once the guest will send nothing more and all it sent reached the
    /// host, pass the end of stream on; once both directions are done,
    /// reset (which the guest waits for) and forget the connection.
    fn finish_if_done(&mut self, key: Key, registrar: &Registrar) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if !conn.guest_done_sending || conn.has_pending() {
            return;
        }
        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        if conn.guest_done_receiving || conn.host_eof {
            self.remove(key, registrar);
            self.reset(key);
        }
    }

    // ---- host to guest -------------------------------------------------

    fn process_rx(&mut self, registrar: &Registrar) -> Result<(), DeviceBroken> {
        let memory = self.memory.clone();
        let mut served = false;
        loop {
            if self.control.is_empty() && self.rx_ready.is_empty() {
                break;
            }
            let Some(mut chain) = next_chain(&mut self.queues[RX_QUEUE], &memory)? else {
                break;
            };
            let head = chain.head_index();
            let used = match VsockPacket::from_rx_virtq_chain(&memory, &mut chain, MAX_PACKET_DATA)
            {
                Ok(mut packet) => match self.fill_rx_packet(&mut packet, registrar) {
                    Some(len) => len,
                    None => {
                        // Nothing to send after all: give the buffer back.
                        self.queues[RX_QUEUE].go_to_previous_position();
                        break;
                    }
                },
                Err(_) => {
                    self.bad_packets += 1;
                    0
                }
            };
            complete(&mut self.queues[RX_QUEUE], &memory, head, used)?;
            served = true;
        }
        if served {
            notify(&mut self.queues[RX_QUEUE], &memory, &self.interrupt)?;
        }
        Ok(())
    }

    /// Writes the next packet owed to the guest into `packet`; returns its
    /// length, or None when there is nothing to send.
    fn fill_rx_packet(
        &mut self,
        packet: &mut VsockPacket<'_, ()>,
        registrar: &Registrar,
    ) -> Option<u32> {
        if let Some(control) = self.control.pop_front() {
            let key = (control.host_port, control.guest_port);
            let credit = self
                .connections
                .get_mut(&key)
                .map_or((HOST_BUF_ALLOC, 0), |c| c.credit_fields());
            self.write_header(packet, key, control.op, control.flags, 0, credit);
            return Some(PKT_HEADER_SIZE as u32);
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.connections.get_mut(&key) else {
                continue;
            };
            if conn.state != State::Established || conn.guest_done_receiving || conn.host_eof {
                conn.wants_rx = false;
                continue;
            }
            let credit = conn.peer_credit();
            if credit == 0 {
                // Resumed by the guest's next credit update (wake_rx).
                continue;
            }
            let Some(data) = packet.data_slice() else {
                // A buffer with no room for data: use it for nothing.
                self.rx_ready.push_front(key);
                return None;
            };
            let room = data
                .len()
                .min(credit as usize)
                .min(MAX_PACKET_DATA as usize);
            let target: VolatileSlice<'_, ()> = match data.subslice(0, room) {
                Ok(s) => s,
                Err(_) => return None,
            };
            match read_into(&mut conn.stream, &target) {
                Ok(0) => {
                    conn.host_eof = true;
                    conn.wants_rx = false;
                    let fields = conn.credit_fields();
                    self.write_header(packet, key, OP_SHUTDOWN, SHUTDOWN_BOTH, 0, fields);
                    self.finish_if_done(key, registrar);
                    return Some(PKT_HEADER_SIZE as u32);
                }
                Ok(n) => {
                    conn.record_sent(n as u32);
                    let fields = conn.credit_fields();
                    self.write_header(packet, key, OP_RW, 0, n as u32, fields);
                    self.rx_ready.push_back(key);
                    return Some((PKT_HEADER_SIZE + n) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    conn.wants_rx = false;
                    continue;
                }
                Err(_) => {
                    self.remove(key, registrar);
                    self.write_header(packet, key, OP_RST, 0, 0, (HOST_BUF_ALLOC, 0));
                    return Some(PKT_HEADER_SIZE as u32);
                }
            }
        }
        None
    }

    fn write_header(
        &self,
        packet: &mut VsockPacket<'_, ()>,
        key: Key,
        op: u16,
        flags: u32,
        len: u32,
        (buf_alloc, fwd_cnt): (u32, u32),
    ) {
        packet
            .set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid())
            .set_src_port(key.0)
            .set_dst_port(key.1)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_flags(flags)
            .set_len(len)
            .set_buf_alloc(buf_alloc)
            .set_fwd_cnt(fwd_cnt);
    }

    // ---- host clients --------------------------------------------------

    fn accept_clients(&mut self, registrar: &Registrar) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // WouldBlock, or the process is out of descriptors: the
                // listener stays readable and we try again later.
                Err(_) => return,
            };
            if self.handshakes.len() + self.connections.len() >= MAX_CONNECTIONS
                || stream.set_nonblocking(true).is_err()
            {
                continue;
            }
            let token = self.allocate_token();
            if registrar
                .add(stream.as_raw_fd(), token, EventSet::IN)
                .is_ok()
            {
                self.owners.insert(token, Owner::Handshake);
                self.handshakes.insert(
                    token,
                    Handshake {
                        stream,
                        line: Vec::new(),
                    },
                );
            }
        }
    }

    fn read_handshake(&mut self, token: u64, registrar: &Registrar) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte, so that nothing after the newline (the client's
        // first data) is consumed here.
        let outcome = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => break Ok(true),
                Ok(_) if hs.line.len() >= MAX_CONNECT_LINE => break Err(()),
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(false),
                Err(_) => break Err(()),
            }
        };
        let port = match outcome {
            Ok(false) => return,
            Ok(true) => parse_connect(&hs.line),
            Err(()) => None,
        };
        let Some(hs) = self.handshakes.remove(&token) else {
            return;
        };
        self.owners.remove(&token);
        registrar.remove(hs.stream.as_raw_fd());
        let Some(guest_port) = port else {
            let mut stream = hs.stream;
            let _ = stream.write_all(b"ERROR expected CONNECT <port>\n");
            return;
        };
        let Some(host_port) = self.allocate_host_port(guest_port) else {
            return;
        };
        let key = (host_port, guest_port);
        let interest = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
        if registrar
            .add(hs.stream.as_raw_fd(), token, interest)
            .is_err()
        {
            return;
        }
        let mut conn = Connection::new(hs.stream, token, State::Connecting);
        // We know nothing of the guest's buffer until it answers.
        conn.update_peer_credit(0, 0);
        self.connections.insert(key, conn);
        self.owners.insert(token, Owner::Connection(key));
        self.push_control(host_port, guest_port, OP_REQUEST, 0);
    }

    fn connection_event(&mut self, key: Key, events: EventSet, registrar: &Registrar) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::OUT) && conn.has_pending() && conn.flush() {
            if conn.credit_update_due() {
                self.push_control(key.0, key.1, OP_CREDIT_UPDATE, 0);
            }
            self.finish_if_done(key, registrar);
        }
        if events
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
        {
            self.schedule_rx(key);
        }
    }
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.trim_end_matches('\r').strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

fn read_into(stream: &mut UnixStream, target: &VolatileSlice<'_, ()>) -> std::io::Result<usize> {
    loop {
        match stream.read_volatile(&mut target.clone()) {
            Ok(n) => return Ok(n),
            Err(vm_memory::VolatileMemoryError::IOError(e))
                if e.kind() == ErrorKind::Interrupted =>
            {
                continue
            }
            Err(vm_memory::VolatileMemoryError::IOError(e)) => return Err(e),
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
}

/// The header fields the muxer acts on, copied out of the guest's buffer.
#[derive(Clone, Copy, Debug)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Header {
    fn of(packet: &VsockPacket<'_, ()>) -> Self {
        Self {
            src_cid: packet.src_cid(),
            dst_cid: packet.dst_cid(),
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            type_: packet.type_(),
            op: packet.op(),
            flags: packet.flags(),
            buf_alloc: packet.buf_alloc(),
            fwd_cnt: packet.fwd_cnt(),
        }
    }
}

impl QueueHandler for VsockMuxer {
    fn name(&self) -> &'static str {
        "virtio-vsock"
    }

    fn register(&mut self, registrar: &Registrar) -> std::io::Result<()> {
        match &self.reset_timer {
            Some(pending) => {
                registrar.add(pending.timer.as_raw_fd(), RESET_TIMER_TOKEN, EventSet::IN)
            }
            None => registrar.add(self.listener.as_raw_fd(), LISTENER_TOKEN, EventSet::IN),
        }
    }

    fn queue_event(&mut self, index: usize, registrar: &Registrar) -> Result<(), DeviceBroken> {
        if index == TX_QUEUE {
            self.process_tx(registrar)?;
        }
        if index == EVENT_QUEUE {
            self.reset_taken(registrar);
        }
        // New RX buffers, or replies the TX packets produced.
        self.process_rx(registrar)
    }

    fn backend_event(
        &mut self,
        token: u64,
        events: EventSet,
        registrar: &Registrar,
    ) -> Result<(), DeviceBroken> {
        if token == LISTENER_TOKEN {
            self.accept_clients(registrar);
        } else if token == RESET_TIMER_TOKEN {
            if let Some(pending) = &mut self.reset_timer {
                // Read, or the expired timer stays readable.
                let _ = pending.timer.wait();
            }
            if self.reset_is_taken() {
                self.reset_taken(registrar);
            }
        } else {
            match self.owners.get(&token) {
                Some(Owner::Handshake) => self.read_handshake(token, registrar),
                Some(Owner::Connection(key)) => {
                    let key = *key;
                    self.connection_event(key, events, registrar)
                }
                None => {}
            }
        }
        self.process_rx(registrar)
    }

    fn quiesce(&mut self, registrar: &Registrar) {
        registrar.remove(self.listener.as_raw_fd());
        if let Some(pending) = self.reset_timer.take() {
            registrar.remove(pending.timer.as_raw_fd());
        }
        for (_, hs) in self.handshakes.drain() {
            registrar.remove(hs.stream.as_raw_fd());
        }
        for (_, conn) in self.connections.drain() {
            registrar.remove(conn.stream.as_raw_fd());
        }
        self.owners.clear();
    }
}
