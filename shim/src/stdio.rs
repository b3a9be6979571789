//! A process's stdio between containerd's FIFOs and the agent's streams.
//! Output streams are copied into the FIFOs containerd reads; the copy
//! ends when the agent closes the stream, after the process's last byte,
//! so an exit is reported only once its output is through. Stdin is
//! copied from its FIFO until the writer closes it (or CloseIO).

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use capsa_guest_client::{Guest, GuestError, Streams};
use capsa_protocol::stdio::StreamKind;

/// The FIFOs containerd gave a process (empty: not wanted).
#[derive(Debug, Clone, Default)]
pub struct Fifos {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl Fifos {
    /// Which agent streams these FIFOs need; a terminal has no stderr.
    pub fn streams(&self) -> Streams {
        Streams {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.stderr.is_empty() && !self.terminal,
        }
    }
}

/// The copies of one process's streams.
#[derive(Default)]
pub struct Copies {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<Arc<Mutex<Option<UnixStream>>>>,
    stdin_fifo: PathBuf,
    stdin_copy: Option<JoinHandle<()>>,
}

impl Copies {
    /// Attaches the streams `fifos` asks for and starts copying.
    pub fn start(
        guest: &Guest,
        id: &str,
        exec_id: &str,
        fifos: &Fifos,
    ) -> Result<Self, GuestError> {
        let streams = fifos.streams();
        let mut copies = Copies::default();
        for (wanted, kind, fifo) in [
            (streams.stdout, StreamKind::Stdout, &fifos.stdout),
            (streams.stderr, StreamKind::Stderr, &fifos.stderr),
        ] {
            if wanted {
                let stream = guest.attach(id, exec_id, kind)?;
                let fifo = PathBuf::from(fifo);
                copies.outputs.push(std::thread::spawn(move || {
                    if let Err(e) = copy_out(stream, &fifo) {
                        log::warn!("copying output to {}: {e}", fifo.display());
                    }
                }));
            }
        }
        if streams.stdin {
            let stream = guest.attach(id, exec_id, StreamKind::Stdin)?;
            let slot = Arc::new(Mutex::new(Some(stream.try_clone().map_err(attach_io)?)));
            copies.stdin = Some(slot.clone());
            let fifo = PathBuf::from(&fifos.stdin);
            copies.stdin_fifo = fifo.clone();
            copies.stdin_copy = Some(std::thread::spawn(move || {
                if let Err(e) = copy_in(&fifo, stream) {
                    log::warn!("copying input from {}: {e}", fifo.display());
                }
                close(&slot);
            }));
        }
        Ok(copies)
    }

    /// Tells the process its input has ended (containerd's CloseIO).
    pub fn close_stdin(&self) {
        if let Some(slot) = &self.stdin {
            close(slot);
        }
    }

    /// Ends the stdin copy even if no client ever opened the FIFO's
    /// writing end (its open would wait forever): once the process is
    /// gone, it has nobody to feed.
    pub fn release(&self) {
        self.close_stdin();
        let waiting = self.stdin_copy.as_ref().is_some_and(|c| !c.is_finished());
        if waiting {
            // Opening the writing end completes the copier's open; closing
            // it again gives the copier its end of file.
            let _ = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.stdin_fifo);
        }
    }

    /// Waits until every output byte is in its FIFO.
    pub fn finish_output(&mut self) {
        for copy in self.outputs.drain(..) {
            let _ = copy.join();
        }
    }
}

fn attach_io(source: io::Error) -> GuestError {
    GuestError::Attach(capsa_protocol::stdio::AttachError::Io {
        stream: "stdin".into(),
        source,
    })
}

fn close(slot: &Mutex<Option<UnixStream>>) {
    if let Some(stream) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = stream.shutdown(Shutdown::Write);
    }
}

fn copy_out(mut stream: UnixStream, fifo: &Path) -> io::Result<()> {
    // containerd holds the reading end open already, so this does not block.
    let mut out = OpenOptions::new().write(true).open(fifo)?;
    io::copy(&mut stream, &mut out).map(|_| ())
}

fn copy_in(fifo: &Path, mut stream: UnixStream) -> io::Result<()> {
    // Blocks until containerd's client opens its writing end.
    let mut input = File::open(fifo)?;
    io::copy(&mut input, &mut stream).map(|_| ())
}
