//! Reaching a guest vsock port from the host through capsa-vmm's Unix
//! socket: connect, write `CONNECT <port>\n`, read `OK <host port>\n`; the
//! socket then carries the guest connection's bytes.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to the VMM's vsock socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("nothing listens on guest vsock port {0} (the VMM closed the connection)")]
    NotListening(u32),
    #[error("unexpected reply to CONNECT: {0:?}")]
    Handshake(String),
    #[error("vsock handshake failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A stream to guest port `port`.
pub fn connect(path: &Path, port: u32) -> Result<UnixStream, ConnectError> {
    let mut stream = UnixStream::connect(path).map_err(|source| ConnectError::Socket {
        path: path.to_path_buf(),
        source,
    })?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Whatever follows the line is the guest's.
    let line = match crate::stdio::read_line(&mut stream)? {
        Some(line) => line,
        None => return Err(ConnectError::NotListening(port)),
    };
    if !line.starts_with("OK ") {
        return Err(ConnectError::Handshake(line));
    }
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
        match connect(path, port) {
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
}
