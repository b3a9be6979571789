//! A process's stdio between containerd's FIFOs and the agent's streams.
//! Output streams are copied into the FIFOs containerd reads; the copy
//! ends when the agent closes the stream, after the process's last byte,
//! so an exit is reported only once its output is through. Stdin is
//! copied from its FIFO until the writer closes it (or CloseIO).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long `release` tries to free a stdin copier.
const RELEASE_PATIENCE: Duration = Duration::from_secs(2);

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
        let mut outputs = Vec::new();
        for (wanted, kind, fifo) in [
            (streams.stdout, StreamKind::Stdout, &fifos.stdout),
            (streams.stderr, StreamKind::Stderr, &fifos.stderr),
        ] {
            if wanted {
                outputs.push((guest.attach(id, exec_id, kind)?, PathBuf::from(fifo)));
            }
        }
        let stdin = if streams.stdin {
            let stream = guest.attach(id, exec_id, StreamKind::Stdin)?;
            Some((stream, PathBuf::from(&fifos.stdin)))
        } else {
            None
        };
        Self::copy(outputs, stdin).map_err(attach_io)
    }

    /// Copies each output stream into its FIFO, and the stdin FIFO into
    /// its stream.
    fn copy(
        outputs: Vec<(UnixStream, PathBuf)>,
        stdin: Option<(UnixStream, PathBuf)>,
    ) -> io::Result<Self> {
        let mut copies = Copies::default();
        for (stream, fifo) in outputs {
            copies.outputs.push(std::thread::spawn(move || {
                if let Err(e) = copy_out(stream, &fifo) {
                    log::warn!("copying output to {}: {e}", fifo.display());
                }
            }));
        }
        if let Some((stream, fifo)) = stdin {
            let slot = Arc::new(Mutex::new(Some(stream.try_clone()?)));
            copies.stdin = Some(slot.clone());
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
        let Some(copy) = &self.stdin_copy else {
            return;
        };
        // Opening the writing end completes the copier's open; closing it
        // again gives the copier its end of file. Until the copier is in
        // its open, there is no reader and the open fails: try again.
        let deadline = Instant::now() + RELEASE_PATIENCE;
        while !copy.is_finished() && Instant::now() < deadline {
            let _ = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.stdin_fifo);
            std::thread::sleep(Duration::from_millis(10));
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
    pump(&mut stream, &mut out)
}

fn copy_in(fifo: &Path, mut stream: UnixStream) -> io::Result<()> {
    // Blocks until containerd's client opens its writing end.
    let mut input = File::open(fifo)?;
    pump(&mut input, &mut stream)
}

/// Copies chunk by chunk as the bytes come, until end of file. Not
/// io::copy: between the VMM's vsock socket and a FIFO std splices, and a
/// running container's output then reached containerd (and CRI's log
/// file) only when the stream ended.
fn pump(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buffer[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn fifo(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        path
    }

    fn read_all_within(mut stream: UnixStream, limit: Duration) -> Vec<u8> {
        stream.set_read_timeout(Some(limit)).unwrap();
        let mut all = Vec::new();
        stream
            .read_to_end(&mut all)
            .expect("the stream ended in time");
        all
    }

    #[test]
    fn output_reaches_the_fifo_before_finish_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path(), "stdout");
        // containerd's side: the reader is open before the copy starts.
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let (guest_end, shim_end) = UnixStream::pair().unwrap();
        let mut copies = Copies::copy(vec![(shim_end, path)], None).unwrap();
        let mut guest_end = guest_end;
        guest_end.write_all(b"hello\n").unwrap();
        drop(guest_end);
        copies.finish_output();
        let mut out = String::new();
        reader.read_to_string(&mut out).unwrap();
        assert_eq!(out, "hello\n");
    }

    #[test]
    fn stdin_is_copied_until_its_writer_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path(), "stdin");
        let (guest_end, shim_end) = UnixStream::pair().unwrap();
        let _copies = Copies::copy(vec![], Some((shim_end, path.clone()))).unwrap();
        let mut writer = OpenOptions::new().write(true).open(&path).unwrap();
        writer.write_all(b"typed").unwrap();
        drop(writer);
        assert_eq!(
            read_all_within(guest_end, Duration::from_secs(10)),
            b"typed"
        );
    }

    #[test]
    fn close_io_ends_stdin_while_the_writer_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path(), "stdin");
        let (guest_end, shim_end) = UnixStream::pair().unwrap();
        let copies = Copies::copy(vec![], Some((shim_end, path.clone()))).unwrap();
        let _writer = OpenOptions::new().write(true).open(&path).unwrap();
        copies.close_stdin();
        assert_eq!(read_all_within(guest_end, Duration::from_secs(10)), b"");
    }

    #[test]
    fn release_frees_a_copier_whose_fifo_never_got_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path(), "stdin");
        let (guest_end, shim_end) = UnixStream::pair().unwrap();
        let copies = Copies::copy(vec![], Some((shim_end, path))).unwrap();
        copies.release();
        assert_eq!(read_all_within(guest_end, Duration::from_secs(10)), b"");
        assert!(copies.stdin_copy.as_ref().unwrap().is_finished());
    }
}
