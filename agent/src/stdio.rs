//! Process stdio over vsock: the host connects to STDIO_VSOCK_PORT once
//! per stream, names it in one line, and the connection then carries that
//! stream's bytes (see protos/agent.proto). Separate connections keep each
//! stream's flow control and end-of-file its own.
//!
//! A process's output is copied only once the host has attached, and the
//! process's exit is published only after its output reached the host
//! (end-of-file on the stream), so nothing written before exit is lost.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::socket::{
    accept, bind, listen, shutdown, socket, AddressFamily, Backlog, Shutdown, SockFlag, SockType,
    VsockAddr,
};

use capsa_protocol::stdio::{read_line, StreamHeader};

use crate::kmsg;

/// How long a connection may take to name its stream.
const HEADER_PATIENCE: Duration = Duration::from_secs(10);
/// How long output waits for the host to attach once its process has
/// exited; after that it is dropped rather than hold up the exit forever.
pub const ATTACH_GRACE_AFTER_EXIT: Duration = Duration::from_secs(10);

/// Streams are registered under their header.
pub type StreamKey = StreamHeader;

/// Where a host connection waits to be picked up by its copier.
#[derive(Default)]
pub struct Slot {
    state: Mutex<SlotState>,
    changed: Condvar,
}

#[derive(Default)]
struct SlotState {
    connection: Option<File>,
    attached: bool,
    /// Set when the process exited: how long to keep waiting for an attach.
    give_up_at: Option<Instant>,
}

impl Slot {
    /// Waits for the host's connection; None when it did not come in time
    /// after the process exited.
    pub fn wait_for_host(&self) -> Option<File> {
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
        let slot = Arc::new(Slot::default());
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
            Ok(slot) => {
                if connection.write_all(b"OK\n").is_err() {
                    return;
                }
                let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
                state.connection = Some(connection);
                slot.changed.notify_all();
                return;
            }
            Err(reason) => reason,
        };
        let _ = connection.write_all(format!("ERR {reply}\n").as_bytes());
    }

    /// Reads the header line and claims the slot it names.
    fn route(&self, connection: &mut File) -> Result<Arc<Slot>, String> {
        let line =
            read_header(connection).map_err(|e| format!("reading the stream header: {e}"))?;
        let header = StreamHeader::parse(&line)?;
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots
            .get(&header)
            .ok_or_else(|| format!("no such stream: {header}"))?
            .clone();
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.attached {
            return Err(format!("{header} is already attached"));
        }
        state.attached = true;
        drop(state);
        Ok(slot)
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
/// stream. When the host goes away the output is still drained, so the
/// process never blocks on a full pipe.
/// Without a slot the output is only drained.
pub fn copy_output(source: File, slot: Option<Arc<Slot>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut source = source;
        let mut sink = slot.and_then(|slot| slot.wait_for_host());
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match source.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EIO: a pty whose other side has closed.
                Err(_) => break,
            };
            if let Some(connection) = sink.as_mut() {
                if connection.write_all(&buffer[..n]).is_err() {
                    sink = None;
                }
            }
        }
        if let Some(connection) = sink {
            let _ = shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&connection.as_fd()),
                Shutdown::Write,
            );
        }
    })
}

/// Copies the host's input into the process until the host ends it (or
/// `close` is requested), then closes the process's stdin.
pub fn copy_input(
    target: Arc<Mutex<Option<File>>>,
    slot: Arc<Slot>,
    terminal: bool,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(mut connection) = slot.wait_for_host() else {
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
