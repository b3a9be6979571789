//! The stdio stream header (see protos/agent.proto): the first line a
//! host sends on a connection to STDIO_VSOCK_PORT, and the agent's answer.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::vmm_socket::{self, ConnectError};
use crate::STDIO_VSOCK_PORT;

/// Header and reply lines are never longer than this.
pub const MAX_LINE: usize = 512;
/// How long the agent gets to answer a stream header, and to send an
/// acknowledged stream's preamble: it does both at once, so only a guest
/// in trouble (or a hostile one) takes this long.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The most acknowledged-mode output the agent keeps unacknowledged: past
/// it, it stops reading the process's output until the host catches up.
pub const ACK_WINDOW: usize = 1 << 20;
/// What the agent reads from a process at once; it may queue one such
/// read past the window before it waits.
pub const OUTPUT_CHUNK: usize = 64 << 10;
/// The exec id that names a container's own process.
const INIT_PROCESS: &str = "-";
/// The header's word, before the resume point, when the host acknowledges
/// what it kept.
const ACKED: &str = "acked";

/// Where an acknowledged output stream picks up: which stream (an id the
/// agent draws when the process starts, so that a restarted container's
/// new output is never taken for its old) and the offset in it of the
/// first byte the host still needs. The host sends the last it kept; the
/// agent answers, in the connection's first bytes (`PREAMBLE_BYTES`),
/// where it really starts: its stream's id and the offset of its first
/// byte, at or after what the host asked for unless those bytes are gone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Resume {
    pub stream_id: u64,
    pub offset: u64,
}

/// The size of the agent's preamble on an acknowledged connection.
pub const PREAMBLE_BYTES: usize = 16;

impl Resume {
    pub fn to_bytes(self) -> [u8; PREAMBLE_BYTES] {
        let mut bytes = [0u8; PREAMBLE_BYTES];
        bytes[..8].copy_from_slice(&self.stream_id.to_le_bytes());
        bytes[8..].copy_from_slice(&self.offset.to_le_bytes());
        bytes
    }

    /// Reads the agent's preamble.
    pub fn read_from(reader: &mut impl Read) -> io::Result<Self> {
        let mut bytes = [0u8; PREAMBLE_BYTES];
        reader.read_exact(&mut bytes)?;
        let word = |range: std::ops::Range<usize>| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[range]);
            u64::from_le_bytes(word)
        };
        Ok(Resume {
            stream_id: word(0..8),
            offset: word(8..16),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        }
    }
}

/// Which stream of which process a connection carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamHeader {
    pub container_id: String,
    /// Empty for the container's own process.
    pub exec_id: String,
    pub kind: StreamKind,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("attaching {stream}: {source}")]
    Io {
        stream: String,
        #[source]
        source: io::Error,
    },
    #[error("the agent refused {stream}: {reason}")]
    Refused { stream: String, reason: String },
    #[error("attaching {stream}: the agent did not answer within {} s", waited.as_secs())]
    NoReply { stream: String, waited: Duration },
}

impl StreamHeader {
    pub fn new(container_id: &str, exec_id: &str, kind: StreamKind) -> Self {
        StreamHeader {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            kind,
        }
    }

    /// The header line; `acked` asks the agent to keep output until the
    /// host acknowledges it, resuming where it says (output streams only).
    pub fn line(&self, acked: Option<Resume>) -> String {
        let exec = if self.exec_id.is_empty() {
            INIT_PROCESS
        } else {
            &self.exec_id
        };
        let suffix = match acked {
            Some(r) => format!(" {ACKED} {:x} {}", r.stream_id, r.offset),
            None => String::new(),
        };
        format!(
            "{} {exec} {}{suffix}\n",
            self.container_id,
            self.kind.as_str()
        )
    }

    /// The header in `line` (without its newline) and where the host
    /// resumes when it acknowledges, or why it is not one.
    pub fn parse(line: &str) -> Result<(Self, Option<Resume>), String> {
        let malformed = || format!("malformed stream header {line:?}");
        let fields: Vec<&str> = line.split(' ').collect();
        let (container_id, exec_id, kind, rest) = match fields.as_slice() {
            [c, e, k, rest @ ..] => (*c, *e, *k, rest),
            _ => return Err(malformed()),
        };
        let acked = match rest {
            [] => None,
            [ACKED, id, offset] if kind != "stdin" => Some(Resume {
                stream_id: u64::from_str_radix(id, 16).map_err(|_| malformed())?,
                offset: offset.parse().map_err(|_| malformed())?,
            }),
            _ => return Err(malformed()),
        };
        let kind = match kind {
            "stdin" => StreamKind::Stdin,
            "stdout" => StreamKind::Stdout,
            "stderr" => StreamKind::Stderr,
            other => return Err(format!("unknown stream {other:?}")),
        };
        let exec_id = if exec_id == INIT_PROCESS { "" } else { exec_id };
        if container_id.is_empty() || exec_id.contains(char::is_whitespace) {
            return Err(format!("malformed stream header {line:?}"));
        }
        Ok((StreamHeader::new(container_id, exec_id, kind), acked))
    }
}

impl std::fmt::Display for StreamHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let process = if self.exec_id.is_empty() {
            "init"
        } else {
            &self.exec_id
        };
        write!(
            f,
            "{} of {}/{process}",
            self.kind.as_str(),
            self.container_id
        )
    }
}

/// Reads one line, byte by byte so nothing after it is consumed; None at
/// end of file before any newline.
pub fn read_line<R: Read>(reader: &mut R) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if reader.read(&mut byte)? == 0 {
            return Ok(None);
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "line is not UTF-8"))
}

/// Opens one stdio stream through the VMM's vsock socket at `vmm_socket`;
/// with `acked` the caller reads the preamble (`Resume::read_from`) and
/// sends acknowledgements (see `ack`). The agent's answer to the header
/// must come within REPLY_TIMEOUT; the stream's bytes after it have no
/// deadline (the agent sends an acked stream's preamble with its first
/// output, which a quiet process may never print).
pub fn attach(
    vmm_socket: &Path,
    header: &StreamHeader,
    acked: Option<Resume>,
) -> Result<UnixStream, AttachError> {
    let mut stream = vmm_socket::connect(vmm_socket, STDIO_VSOCK_PORT)?;
    let io_error = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            return AttachError::NoReply {
                stream: header.to_string(),
                waited: REPLY_TIMEOUT,
            };
        }
        AttachError::Io {
            stream: header.to_string(),
            source,
        }
    };
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(io_error)?;
    stream
        .write_all(header.line(acked).as_bytes())
        .map_err(io_error)?;
    match read_line(&mut stream).map_err(io_error)? {
        Some(reply) if reply == "OK" => {
            stream.set_read_timeout(None).map_err(io_error)?;
            Ok(stream)
        }
        Some(reply) => Err(AttachError::Refused {
            stream: header.to_string(),
            reason: reply.strip_prefix("ERR ").unwrap_or(&reply).to_string(),
        }),
        None => Err(AttachError::Refused {
            stream: header.to_string(),
            reason: "the connection closed".into(),
        }),
    }
}

/// Tells the agent that its stream's bytes before offset `kept` are safe
/// with the host.
pub fn ack(connection: &mut impl Write, kept: u64) -> io::Result<()> {
    connection.write_all(&kept.to_le_bytes())
}

/// The size of one acknowledgement on the wire.
pub const ACK_BYTES: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_garbage_is_refused() {
        let resume = Resume {
            stream_id: 0xfeed_beef,
            offset: 4096,
        };
        for (header, acked) in [
            (StreamHeader::new("web", "", StreamKind::Stdout), None),
            (
                StreamHeader::new("web", "", StreamKind::Stderr),
                Some(resume),
            ),
            (
                StreamHeader::new("web", "", StreamKind::Stdout),
                Some(Resume::default()),
            ),
            (StreamHeader::new("web", "debug-1", StreamKind::Stdin), None),
        ] {
            let line = header.line(acked);
            assert_eq!(
                StreamHeader::parse(line.trim_end()).unwrap(),
                (header, acked)
            );
        }
        for bad in [
            "",
            "web",
            "web - ",
            "web - stdweird",
            "web - stdout extra",
            "web - stdout acked",
            "web - stdin acked 0 0",
            "web - stdout acked 0 0 extra",
            "web - stdout acked zz 0",
            "web - stdout acked 0 -1",
            " - stdout",
        ] {
            assert!(StreamHeader::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn preambles_round_trip() {
        let resume = Resume {
            stream_id: u64::MAX,
            offset: 7,
        };
        let bytes = resume.to_bytes();
        assert_eq!(Resume::read_from(&mut &bytes[..]).unwrap(), resume);
        assert!(Resume::read_from(&mut &bytes[..15]).is_err());
    }

    #[test]
    fn lines_stop_at_newline_and_at_the_limit() {
        let mut input = &b"first\nrest"[..];
        assert_eq!(read_line(&mut input).unwrap().as_deref(), Some("first"));
        assert_eq!(input, b"rest");
        assert_eq!(read_line(&mut &b"no newline"[..]).unwrap(), None);
        let long = vec![b'x'; MAX_LINE + 2];
        assert!(read_line(&mut long.as_slice()).is_err());
    }
}
