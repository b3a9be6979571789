//! Process stdio over vsock: the host connects to STDIO_VSOCK_PORT once
//! per stream, names it in one line, and the connection then carries that
//! stream's bytes (see protos/agent.proto). Separate connections keep each
//! stream's flow control and end-of-file its own.
//!
//! A process's output is copied only once the host has attached, and the
//! process's exit is published only after its output reached the host
//! (end-of-file on the stream), so nothing written before exit is lost.
//!
//! An output stream may be attached again: the host daemon restarts and
//! picks its containers' logs up where they were. While the host is away,
//! output waits in the pipe and the process blocks when it is full, rather
//! than the output being dropped.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept, bind, listen, recv, shutdown, socket, AddressFamily, Backlog, MsgFlags, Shutdown,
    SockFlag, SockType, VsockAddr,
};

use capsa_protocol::stdio::{
    read_line, Resume, StreamHeader, StreamKind, ACK_BYTES, ACK_WINDOW, OUTPUT_CHUNK,
};

use crate::kmsg;

/// How long a connection may take to name its stream.
const HEADER_PATIENCE: Duration = Duration::from_secs(10);
/// How long output waits for the host to attach once its process has
/// exited; after that it is dropped rather than hold up the exit forever.
/// Long enough for the host daemon to restart.
pub const ATTACH_GRACE_AFTER_EXIT: Duration = Duration::from_secs(30);

/// Streams are registered under their header.
pub type StreamKey = StreamHeader;

/// A host connection to a stream.
pub struct Attachment {
    pub connection: File,
    /// The host acknowledges what it kept, and resumes here (output
    /// streams only).
    pub acked: Option<Resume>,
}

/// Where a host connection waits to be picked up by its copier; a newer
/// connection for an output stream replaces the one in use.
pub struct Slot {
    /// This stream's id, unique across the guest's boots (see `Resume`).
    stream_id: u64,
    state: Mutex<SlotState>,
    changed: Condvar,
}

#[derive(Default)]
struct SlotState {
    connection: Option<Attachment>,
    attached: bool,
    /// Set when the process exited: how long to keep waiting for an attach.
    give_up_at: Option<Instant>,
    /// Set once the stream has ended and the host has all of it: its
    /// length. A later attach (a restarted daemon's) gets just the end.
    ended_at: Option<u64>,
}

impl Slot {
    fn new() -> Self {
        Slot {
            stream_id: next_stream_id(),
            state: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    /// Waits for the host's connection; None when it did not come in time
    /// after the process exited.
    pub fn wait_for_host(&self) -> Option<Attachment> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(connection) = state.connection.take() {
                return Some(connection);
            }
            let timeout = match state.give_up_at {
                Some(at) => at.checked_duration_since(Instant::now())?,
                None => Duration::from_secs(3600),
            };
            state = self
                .changed
                .wait_timeout(state, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A connection attached since the copier last looked, if any.
    fn newer_connection(&self) -> Option<Attachment> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.connection.take()
    }

    /// The stream has ended at offset `end`, all of it with the host (or
    /// dropped): later attaches get only the end.
    fn ended(&self, end: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.ended_at = Some(end);
        // A connection that came meanwhile gets the end too.
        state.connection = None;
    }

    /// The process has exited: stop waiting for an attach after the grace.
    pub fn process_exited(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.give_up_at = Some(Instant::now() + ATTACH_GRACE_AFTER_EXIT);
        self.changed.notify_all();
    }
}

#[derive(Default)]
pub struct StdioHub {
    slots: Mutex<HashMap<StreamKey, Arc<Slot>>>,
}

impl StdioHub {
    pub fn register(&self, key: StreamKey) -> Arc<Slot> {
        let slot = Arc::new(Slot::new());
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.insert(key, slot.clone());
        slot
    }

    /// Forgets every stream of a container.
    pub fn forget_container(&self, container_id: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|key, _| key.container_id != container_id);
    }

    /// Accepts stream connections on vsock `port`, each on its own thread.
    pub fn serve(self: &Arc<Self>, port: u32) -> Result<()> {
        let listener = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("cannot create the stdio vsock socket")?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&listener),
            &VsockAddr::new(libc::VMADDR_CID_ANY, port),
        )
        .with_context(|| format!("cannot bind vsock port {port}"))?;
        listen(&listener, Backlog::new(64).unwrap_or(Backlog::MAXCONN))
            .context("cannot listen for stdio")?;
        let hub = self.clone();
        std::thread::Builder::new()
            .name("stdio-accept".into())
            .spawn(move || hub.accept_forever(listener))
            .context("cannot start the stdio thread")?;
        Ok(())
    }

    fn accept_forever(self: Arc<Self>, listener: OwnedFd) {
        loop {
            let raw = match accept(std::os::fd::AsRawFd::as_raw_fd(&listener)) {
                Ok(fd) => fd,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    kmsg::error(&format!("stdio: accept failed: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            // SAFETY: accept just returned this descriptor and nothing else
            // owns it.
            let connection = unsafe { File::from_raw_fd(raw) };
            let _ = nix::fcntl::fcntl(
                raw,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            let hub = self.clone();
            let _ = std::thread::Builder::new()
                .name("stdio-attach".into())
                .spawn(move || hub.attach(connection));
        }
    }

    fn attach(&self, mut connection: File) {
        let reply = match self.route(&mut connection) {
            Ok((slot, acked)) => {
                if connection.write_all(b"OK\n").is_err() {
                    return;
                }
                let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(end) = state.ended_at {
                    // Nothing more will come: say where it ended, and end.
                    drop(state);
                    if acked.is_some() {
                        let preamble = Resume {
                            stream_id: slot.stream_id,
                            offset: end,
                        };
                        let _ = connection.write_all(&preamble.to_bytes());
                    }
                    let _ = shutdown(connection.as_raw_fd(), Shutdown::Write);
                    return;
                }
                state.connection = Some(Attachment { connection, acked });
                slot.changed.notify_all();
                return;
            }
            Err(reason) => reason,
        };
        let _ = connection.write_all(format!("ERR {reply}\n").as_bytes());
    }

    /// Reads the header line and claims the slot it names.
    fn route(&self, connection: &mut File) -> Result<(Arc<Slot>, Option<Resume>), String> {
        let line =
            read_header(connection).map_err(|e| format!("reading the stream header: {e}"))?;
        let (header, acked) = StreamHeader::parse(&line)?;
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots
            .get(&header)
            .ok_or_else(|| format!("no such stream: {header}"))?
            .clone();
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        // Two writers into one process's input would interleave; output
        // goes to whoever attached last.
        if state.attached && header.kind == StreamKind::Stdin {
            return Err(format!("{header} is already attached"));
        }
        state.attached = true;
        drop(state);
        Ok((slot, acked))
    }
}

fn read_header(connection: &mut File) -> io::Result<String> {
    set_receive_timeout(connection, Some(HEADER_PATIENCE))?;
    let line = read_line(connection)?.ok_or(io::ErrorKind::UnexpectedEof)?;
    set_receive_timeout(connection, None)?;
    Ok(line)
}

fn set_receive_timeout(connection: &File, timeout: Option<Duration>) -> io::Result<()> {
    let value = nix::sys::time::TimeVal::new(
        timeout.map_or(0, |t| t.as_secs() as i64),
        timeout.map_or(0, |t| t.subsec_micros() as i64),
    );
    nix::sys::socket::setsockopt(
        connection,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &value,
    )
    .map_err(io::Error::from)
}

/// Copies a process's output to the host once it attaches, then ends the
/// stream. Without a slot the output is only drained.
pub fn copy_output(source: File, slot: Option<Arc<Slot>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut output = slot.map(Output::new);
        let mut buffer = vec![0u8; OUTPUT_CHUNK];
        loop {
            if let Some(output) = output.as_mut() {
                // A silent process must not keep a re-attached host waiting
                // for what an earlier connection left unacknowledged.
                if !readable(&source, REATTACH_POLL) {
                    output.take_newer();
                    continue;
                }
            }
            let n = match (&source).read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EIO: a pty whose other side has closed.
                Err(_) => break,
            };
            if let Some(output) = output.as_mut() {
                output.send(&buffer[..n]);
            }
        }
        if let Some(output) = output {
            output.finish();
        }
    })
}

/// How often a silent process's output looks for a newer host connection.
const REATTACH_POLL: Duration = Duration::from_secs(1);
// ACK_WINDOW (capsa-protocol): how much acknowledged-mode output may wait
// unacknowledged before the copy stops reading the process's output (which
// then blocks); the host acknowledges at least every half window.

fn readable(source: &File, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(source.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    // Errors and hang-ups count as readable: the read then says what.
    !matches!(poll(&mut fds, timeout), Ok(0))
}

/// A stream id no other stream of this guest, nor of any other boot, has:
/// the boot's random id plus a count.
fn next_stream_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static BOOT: OnceLock<u64> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(1);
    let boot = *BOOT.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let hex: String = text
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(16)
            .collect();
        u64::from_str_radix(&hex, 16).unwrap_or_else(|_| {
            // No boot id: the clock still differs between boots.
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        })
    });
    boot.wrapping_add(COUNT.fetch_add(1, Ordering::Relaxed) << 20)
}

/// One output stream's way to the host. When the host goes away, the
/// copy waits for it to attach again and the process blocks on its full
/// pipe meanwhile; once the process has exited, that wait is bounded by
/// ATTACH_GRACE_AFTER_EXIT and what is left is dropped. On an acked
/// connection, bytes stay queued until the host acknowledges them (by
/// their offset in the stream) and a new connection resumes where the
/// host says it has them up to; on a plain one, what was in flight when it
/// broke is lost with it.
struct Output {
    slot: Arc<Slot>,
    sink: Option<Sink>,
    /// Bytes not yet acknowledged (plain connections: not yet written).
    queue: Vec<u8>,
    /// The stream offset of `queue`'s first byte.
    base: u64,
    /// How much of `queue` went out on the current connection.
    written: usize,
}

struct Sink {
    connection: File,
    acked: bool,
    /// The preamble (stream id and start offset) is still to be sent.
    preamble_due: bool,
    /// The stream offset the host has acknowledged up to.
    acknowledged: u64,
    partial: [u8; ACK_BYTES],
    partial_len: usize,
}

impl Output {
    fn new(slot: Arc<Slot>) -> Self {
        let mut output = Output {
            slot,
            sink: None,
            queue: Vec::new(),
            base: 0,
            written: 0,
        };
        if let Some(first) = output.slot.wait_for_host() {
            output.use_connection(first);
        }
        output
    }

    /// Forgets what the host has up to stream offset `offset`.
    fn kept_until(&mut self, offset: u64) {
        let kept = usize::try_from(offset.saturating_sub(self.base))
            .unwrap_or(usize::MAX)
            .min(self.queue.len());
        self.queue.drain(..kept);
        self.base += kept as u64;
        self.written = self.written.saturating_sub(kept);
    }

    /// The stream offset after the last byte written to the connection.
    fn sent_until(&self) -> u64 {
        self.base + self.written as u64
    }

    fn take_newer(&mut self) {
        if let Some(newer) = self.slot.newer_connection() {
            self.use_connection(newer);
            self.deliver();
        }
    }

    fn use_connection(&mut self, attachment: Attachment) {
        // Acknowledgements the old connection still holds spare resending
        // what the host already kept.
        let sent = self.sent_until();
        if let Some(mut old) = self.sink.take().filter(|old| old.acked) {
            if let Ok(kept) = old.read_acks(false, sent) {
                self.kept_until(kept);
            }
        }
        match attachment.acked {
            // A plain reader never acknowledges: hold nothing for it.
            None => {
                let all = self.base + self.queue.len() as u64;
                self.kept_until(all);
            }
            // The host kept this stream up to there.
            Some(resume) if resume.stream_id == self.slot.stream_id => {
                self.kept_until(resume.offset)
            }
            // The host has nothing of this stream: all that is held goes.
            Some(_) => {}
        }
        self.sink = Some(Sink::new(attachment, self.base));
        self.written = 0;
    }

    fn send(&mut self, chunk: &[u8]) {
        if let Some(newer) = self.slot.newer_connection() {
            self.use_connection(newer);
        }
        if self.sink.is_none() {
            // Nobody attached in time: drain.
            self.base += chunk.len() as u64;
            return;
        }
        self.queue.extend_from_slice(chunk);
        self.deliver();
    }

    /// Writes what is queued, and waits for acknowledgements while the
    /// window is full; on a broken connection waits for the next one.
    fn deliver(&mut self) {
        while self.sink.is_some() {
            match self.try_deliver() {
                Ok(()) => return,
                Err(_) => self.reconnect(),
            }
        }
        let all = self.base + self.queue.len() as u64;
        self.kept_until(all);
    }

    fn try_deliver(&mut self) -> io::Result<()> {
        let stream_id = self.slot.stream_id;
        let base = self.base;
        let Some(sink) = self.sink.as_mut() else {
            return Ok(());
        };
        if sink.preamble_due {
            let preamble = Resume {
                stream_id,
                offset: base,
            };
            sink.connection.write_all(&preamble.to_bytes())?;
            sink.preamble_due = false;
        }
        sink.connection.write_all(&self.queue[self.written..])?;
        self.written = self.queue.len();
        if !sink.acked {
            let all = self.base + self.queue.len() as u64;
            self.kept_until(all);
            return Ok(());
        }
        let mut blocking = false;
        loop {
            let sent = self.sent_until();
            let Some(sink) = self.sink.as_mut() else {
                return Ok(());
            };
            let kept = sink.read_acks(blocking, sent)?;
            self.kept_until(kept);
            if self.queue.len() <= ACK_WINDOW {
                return Ok(());
            }
            blocking = true;
        }
    }

    fn reconnect(&mut self) {
        self.sink = None;
        if let Some(next) = self.slot.wait_for_host() {
            self.use_connection(next);
        }
    }

    /// The process's output ended: deliver the rest, end the stream, and on
    /// an acked connection wait until the host has kept all of it.
    fn finish(mut self) {
        self.deliver_the_end();
        let end = self.base + self.queue.len() as u64;
        self.slot.ended(end);
    }

    fn deliver_the_end(&mut self) {
        loop {
            self.take_newer();
            self.deliver();
            let Some(sink) = self.sink.as_mut() else {
                return;
            };
            let _ = shutdown(sink.connection.as_raw_fd(), Shutdown::Write);
            if !sink.acked {
                return;
            }
            while !self.queue.is_empty() {
                let sent = self.sent_until();
                let Some(sink) = self.sink.as_mut() else {
                    break;
                };
                match sink.read_acks(true, sent) {
                    Ok(kept) => self.kept_until(kept),
                    Err(_) => break,
                }
            }
            if self.queue.is_empty() {
                return;
            }
            self.reconnect();
        }
    }
}

impl Sink {
    fn new(attachment: Attachment, start: u64) -> Self {
        Sink {
            connection: attachment.connection,
            acked: attachment.acked.is_some(),
            preamble_due: attachment.acked.is_some(),
            acknowledged: start,
            partial: [0; ACK_BYTES],
            partial_len: 0,
        }
    }

    /// Reads the acknowledgements that arrived (waiting for one when
    /// `blocking`) and returns the stream offset the host has kept up to.
    /// An acknowledgement beyond `sent`, or going backwards, breaks the
    /// connection: the host is confused and a fresh attach is safer.
    fn read_acks(&mut self, blocking: bool, sent: u64) -> io::Result<u64> {
        let fd = self.connection.as_raw_fd();
        let mut flags = if blocking {
            MsgFlags::empty()
        } else {
            MsgFlags::MSG_DONTWAIT
        };
        let mut any = false;
        loop {
            let n = match recv(fd, &mut self.partial[self.partial_len..], flags) {
                Ok(n) if n > 0 => n,
                Err(nix::errno::Errno::EAGAIN) => return Ok(self.acknowledged),
                Err(nix::errno::Errno::EINTR) => continue,
                // What was acknowledged before the end counts; the next
                // call meets the end again.
                _ if any => return Ok(self.acknowledged),
                Ok(_) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Err(e) => return Err(e.into()),
            };
            self.partial_len += n;
            if self.partial_len < ACK_BYTES {
                continue;
            }
            self.partial_len = 0;
            let kept = u64::from_le_bytes(self.partial);
            if kept < self.acknowledged || kept > sent {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "acknowledged unsent output",
                ));
            }
            self.acknowledged = kept;
            any = true;
            // One acknowledgement is what a blocking caller waited for.
            flags = MsgFlags::MSG_DONTWAIT;
        }
    }
}

/// Copies the host's input into the process until the host ends it (or
/// `close` is requested), then closes the process's stdin.
pub fn copy_input(
    target: Arc<Mutex<Option<File>>>,
    slot: Arc<Slot>,
    terminal: bool,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(Attachment { mut connection, .. }) = slot.wait_for_host() else {
            return;
        };
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match connection.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut guard = target.lock().unwrap_or_else(|e| e.into_inner());
            let Some(input) = guard.as_mut() else { return };
            if input.write_all(&buffer[..n]).is_err() {
                return;
            }
        }
        close_input(&target, terminal);
    })
}

/// Ends a process's input: closes the pipe, or types end-of-file (^D) on
/// a terminal, whose master must stay open for the output.
pub fn close_input(target: &Mutex<Option<File>>, terminal: bool) {
    let mut guard = target.lock().unwrap_or_else(|e| e.into_inner());
    if terminal {
        if let Some(input) = guard.as_mut() {
            let _ = input.write_all(&[4]);
        }
    } else {
        *guard = None;
    }
}
