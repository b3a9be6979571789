//! A tiny request/response protocol over any byte stream (vsock, a Unix
//! socket, TCP), used to prove data crosses intact in both directions.
//!
//! The client sends a 17-byte request `[mode][len u64 LE][seed u64 LE]`:
//! - `E` echo: the client sends `len` pattern bytes, the server returns
//!   each byte as it arrives;
//! - `S` sink: the client sends `len` bytes, the server checks them and
//!   answers `OK\n` or `BAD <offset>\n`;
//! - `G` generate: the server sends `len` pattern bytes for the client to
//!   check.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::pattern::{read_and_check, write_pattern};

const CHUNK: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Echo,
    Sink,
    Generate,
}

impl Mode {
    fn byte(self) -> u8 {
        match self {
            Mode::Echo => b'E',
            Mode::Sink => b'S',
            Mode::Generate => b'G',
        }
    }

    fn from_byte(b: u8) -> Result<Self> {
        Ok(match b {
            b'E' => Mode::Echo,
            b'S' => Mode::Sink,
            b'G' => Mode::Generate,
            other => bail!("unknown mode byte {other:#x}"),
        })
    }
}

/// A stream that can be split for concurrent reading and writing.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    fn split(&self) -> Result<Self>;
}

impl Duplex for std::fs::File {
    fn split(&self) -> Result<Self> {
        Ok(self.try_clone()?)
    }
}

impl Duplex for std::os::unix::net::UnixStream {
    fn split(&self) -> Result<Self> {
        Ok(self.try_clone()?)
    }
}

impl Duplex for std::net::TcpStream {
    fn split(&self) -> Result<Self> {
        Ok(self.try_clone()?)
    }
}

/// Serves one request on `stream`.
pub fn serve<S: Duplex>(mut stream: S) -> Result<()> {
    let mut request = [0u8; 17];
    stream
        .read_exact(&mut request)
        .context("reading the request")?;
    let mode = Mode::from_byte(request[0])?;
    let len = u64::from_le_bytes(request[1..9].try_into()?);
    let seed = u64::from_le_bytes(request[9..17].try_into()?);
    let mut buf = vec![0u8; CHUNK];
    match mode {
        Mode::Echo => {
            let mut left = len;
            while left > 0 {
                let want = left.min(CHUNK as u64) as usize;
                let n = stream.read(&mut buf[..want])?;
                if n == 0 {
                    bail!("echo: peer closed with {left} bytes to go");
                }
                stream.write_all(&buf[..n])?;
                left -= n as u64;
            }
        }
        Mode::Sink => {
            let reply = match read_and_check(&mut stream, len, seed)? {
                None => "OK\n".to_string(),
                Some(at) => format!("BAD {at}\n"),
            };
            stream.write_all(reply.as_bytes())?;
        }
        Mode::Generate => write_pattern(&mut stream, len, seed)?,
    }
    stream.flush()?;
    Ok(())
}

/// What a finished client request measured.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Transfer {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs one request as the client and checks what comes back.
pub fn request<S: Duplex>(mut stream: S, mode: Mode, len: u64, seed: u64) -> Result<Transfer> {
    let start = Instant::now();
    let mut header = [0u8; 17];
    header[0] = mode.byte();
    header[1..9].copy_from_slice(&len.to_le_bytes());
    header[9..17].copy_from_slice(&seed.to_le_bytes());
    stream.write_all(&header)?;
    match mode {
        Mode::Echo => {
            let writer = stream.split()?;
            let sender = std::thread::spawn(move || write_pattern(&mut { writer }, len, seed));
            receive_pattern(&mut stream, len, seed).context("echo")?;
            sender
                .join()
                .map_err(|_| anyhow::anyhow!("echo sender panicked"))??;
        }
        Mode::Sink => {
            write_pattern(&mut stream, len, seed)?;
            let mut reply = Vec::new();
            let mut byte = [0u8; 1];
            while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
                reply.push(byte[0]);
            }
            let reply = String::from_utf8_lossy(&reply);
            if reply != "OK" {
                bail!("sink: the server reported {reply:?}");
            }
        }
        Mode::Generate => receive_pattern(&mut stream, len, seed).context("generate")?,
    }
    Ok(Transfer {
        bytes: len,
        elapsed: start.elapsed(),
    })
}

/// Runs `streams` echo requests of `bytes` each at once, each on its own
/// connection from `connect`, and fails if any stream does.
pub fn echo_streams<S: Duplex>(
    streams: u64,
    bytes: u64,
    seed_base: u64,
    connect: impl Fn() -> Result<S> + Send + Sync + Clone + 'static,
) -> Result<()> {
    let handles: Vec<_> = (0..streams)
        .map(|i| {
            let connect = connect.clone();
            std::thread::spawn(move || -> Result<()> {
                request(connect()?, Mode::Echo, bytes, seed_base + i)?;
                Ok(())
            })
        })
        .collect();
    for (i, handle) in handles.into_iter().enumerate() {
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("stream {i} panicked"))?
            .with_context(|| format!("stream {i}"))?;
    }
    Ok(())
}

/// Reads back what the peer was to send and fails on the first wrong byte.
fn receive_pattern<R: Read>(reader: &mut R, len: u64, seed: u64) -> Result<()> {
    if let Some(at) = read_and_check(reader, len, seed)? {
        bail!("byte {at} differs from what was sent");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::Pattern;
    use std::os::unix::net::UnixStream;

    fn roundtrip(mode: Mode, len: u64) -> Result<Transfer> {
        let (client, server) = UnixStream::pair()?;
        let handle = std::thread::spawn(move || serve(server));
        let result = request(client, mode, len, 7);
        handle.join().unwrap()?;
        result
    }

    #[test]
    fn every_mode_moves_data_intact() {
        for mode in [Mode::Echo, Mode::Sink, Mode::Generate] {
            let t = roundtrip(mode, 3 * CHUNK as u64 + 17).unwrap();
            assert_eq!(t.bytes, 3 * CHUNK as u64 + 17);
        }
    }

    #[test]
    fn a_corrupted_byte_is_reported() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let handle = std::thread::spawn(move || serve(server));
        let mut header = [0u8; 17];
        header[0] = b'S';
        header[1..9].copy_from_slice(&100u64.to_le_bytes());
        header[9..17].copy_from_slice(&7u64.to_le_bytes());
        client.write_all(&header).unwrap();
        let mut data = vec![0u8; 100];
        Pattern::new(7).fill(&mut data);
        data[42] ^= 0xff;
        client.write_all(&data).unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "BAD 42\n");
        handle.join().unwrap().unwrap();
    }

    #[test]
    fn a_short_stream_is_an_error() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let handle = std::thread::spawn(move || serve(server));
        let mut header = [0u8; 17];
        header[0] = b'S';
        header[1..9].copy_from_slice(&100u64.to_le_bytes());
        client.write_all(&header).unwrap();
        client.write_all(&[0u8; 10]).unwrap();
        drop(client);
        let err = handle.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("after 10 of 100"), "{err}");
    }
}
