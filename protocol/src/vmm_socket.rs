//! Reaching a guest vsock port from the host through capsa-vmm's Unix
//! socket: connect, write `CONNECT <port>\n`, read `OK <host port>\n`; the
//! socket then carries the guest connection's bytes.

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A read timeout of zero means none, so the last try still gets this.
const MIN_WAIT: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to the VMM's vsock socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("nothing listens on guest vsock port {0} (the VMM closed the connection)")]
    NotListening(u32),
    #[error(
        "guest vsock port {port} took no connection within {:.1} s: the guest is not responding",
        waited.as_secs_f64()
    )]
    NoAnswer { port: u32, waited: Duration },
    #[error("unexpected reply to CONNECT: {0:?}")]
    Handshake(String),
    #[error("vsock handshake failed: {0}")]
    Io(#[from] std::io::Error),
}

/// How long a running guest gets to take a connection: its kernel answers
/// for the agent, so only a stuck guest takes this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// A stream to guest port `port`.
pub fn connect(path: &Path, port: u32) -> Result<UnixStream, ConnectError> {
    connect_within(path, port, HANDSHAKE_TIMEOUT)
}

/// `connect`, giving up when the guest has not answered within `limit`:
/// the VMM holds the request until the guest takes it, which a guest that
/// hangs never does.
fn connect_within(path: &Path, port: u32, limit: Duration) -> Result<UnixStream, ConnectError> {
    let mut stream = UnixStream::connect(path).map_err(|source| ConnectError::Socket {
        path: path.to_path_buf(),
        source,
    })?;
    let limit = limit.max(MIN_WAIT);
    stream.set_read_timeout(Some(limit))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Whatever follows the line is the guest's.
    let line = match crate::stdio::read_line(&mut stream) {
        Ok(Some(line)) => line,
        Ok(None) => return Err(ConnectError::NotListening(port)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return Err(ConnectError::NoAnswer {
                port,
                waited: limit,
            })
        }
        Err(e) => return Err(e.into()),
    };
    if !line.starts_with("OK ") {
        return Err(ConnectError::Handshake(line));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// Like `connect`, retrying for up to `patience` while the guest boots.
pub fn connect_patiently(
    path: &Path,
    port: u32,
    patience: Duration,
) -> Result<UnixStream, ConnectError> {
    let deadline = Instant::now() + patience;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match connect_within(path, port, left) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    #[test]
    fn handshake_ok_error_and_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for reply in [&b"OK 1073741824\nhello"[..], b"ERROR no\n", b""] {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 13];
                s.read_exact(&mut buf).unwrap();
                assert_eq!(&buf, b"CONNECT 1024\n");
                s.write_all(reply).unwrap();
            }
        });
        let mut stream = connect(&path, 1024).unwrap();
        let mut rest = [0u8; 5];
        stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello", "bytes after the line are the guest's");
        assert!(matches!(
            connect(&path, 1024),
            Err(ConnectError::Handshake(_))
        ));
        assert!(matches!(
            connect(&path, 1024),
            Err(ConnectError::NotListening(1024))
        ));
        server.join().unwrap();
    }

    #[test]
    fn a_guest_that_never_answers_is_given_up_on_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        // The VMM takes the connection but the guest never answers it.
        let listener = UnixListener::bind(&path).unwrap();
        let held = std::thread::spawn(move || {
            let mut streams = Vec::new();
            listener.set_nonblocking(true).unwrap();
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                if let Ok((s, _)) = listener.accept() {
                    streams.push(s);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            streams.len()
        });
        let began = Instant::now();
        let err = connect_patiently(&path, 1024, Duration::from_millis(700)).unwrap_err();
        let waited = began.elapsed();
        assert!(
            matches!(err, ConnectError::NoAnswer { port: 1024, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("not responding"), "{err}");
        assert!(waited >= Duration::from_millis(700), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "kept waiting: {waited:?}");
        assert!(held.join().unwrap() >= 1);
    }
}
