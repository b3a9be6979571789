//! `exec` through the daemon: the client asks for an HTTP upgrade to
//! `capsa-exec/1` with the request in the `Capsa-Exec` header, and the
//! connection then carries frames both ways: one kind byte, a big-endian
//! u32 length, the payload.

use serde::{Deserialize, Serialize};

pub const UPGRADE_PROTOCOL: &str = "capsa-exec/1";
pub const REQUEST_HEADER: &str = "capsa-exec";
/// A frame's payload is never longer than this.
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct ExecRequest {
    pub command: Vec<String>,
    /// Run it on a terminal (stdout carries it; there is no stderr).
    pub tty: bool,
    /// Forward the client's input.
    pub stdin: bool,
    /// The terminal's size at the start.
    pub rows: u16,
    pub columns: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client to daemon.
    Stdin(Vec<u8>),
    StdinEnd,
    Resize {
        rows: u16,
        columns: u16,
    },
    /// Daemon to client.
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The last frame: the process's exit code (128 + signal when killed).
    Exit(i32),
    /// The exec could not go on; the last frame.
    Error(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown exec frame kind {0}")]
    Kind(u8),
    #[error("exec frame of {0} bytes, over the limit")]
    TooLong(usize),
    #[error("malformed exec frame")]
    Malformed,
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Stdin(_) => 1,
            Frame::StdinEnd => 2,
            Frame::Resize { .. } => 3,
            Frame::Stdout(_) => 4,
            Frame::Stderr(_) => 5,
            Frame::Exit(_) => 6,
            Frame::Error(_) => 7,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let payload: Vec<u8> = match self {
            Frame::Stdin(data) | Frame::Stdout(data) | Frame::Stderr(data) => data.clone(),
            Frame::StdinEnd => Vec::new(),
            Frame::Resize { rows, columns } => [rows.to_be_bytes(), columns.to_be_bytes()].concat(),
            Frame::Exit(code) => code.to_be_bytes().to_vec(),
            Frame::Error(message) => message.as_bytes().to_vec(),
        };
        let mut frame = Vec::with_capacity(5 + payload.len());
        frame.push(self.kind());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        frame
    }

    /// Takes one whole frame off the front of `buffer`, if it holds one.
    pub fn decode(buffer: &mut Vec<u8>) -> Result<Option<Frame>, FrameError> {
        if buffer.len() < 5 {
            return Ok(None);
        }
        let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
        if length > MAX_FRAME {
            return Err(FrameError::TooLong(length));
        }
        if buffer.len() < 5 + length {
            return Ok(None);
        }
        let kind = buffer[0];
        let payload: Vec<u8> = buffer[5..5 + length].to_vec();
        buffer.drain(..5 + length);
        let frame = match kind {
            1 => Frame::Stdin(payload),
            2 => Frame::StdinEnd,
            3 => {
                let [a, b, c, d] = payload[..] else {
                    return Err(FrameError::Malformed);
                };
                Frame::Resize {
                    rows: u16::from_be_bytes([a, b]),
                    columns: u16::from_be_bytes([c, d]),
                }
            }
            4 => Frame::Stdout(payload),
            5 => Frame::Stderr(payload),
            6 => {
                let bytes: [u8; 4] = payload.try_into().map_err(|_| FrameError::Malformed)?;
                Frame::Exit(i32::from_be_bytes(bytes))
            }
            7 => Frame::Error(String::from_utf8_lossy(&payload).into_owned()),
            other => return Err(FrameError::Kind(other)),
        };
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_pieces_and_garbage_is_refused() {
        let frames = [
            Frame::Stdin(b"ls\n".to_vec()),
            Frame::StdinEnd,
            Frame::Resize {
                rows: 40,
                columns: 100,
            },
            Frame::Stdout(vec![0, 1, 2]),
            Frame::Stderr(Vec::new()),
            Frame::Exit(-3),
            Frame::Error("gone".into()),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let mut buffer = Vec::new();
        let mut decoded = Vec::new();
        for byte in wire {
            buffer.push(byte);
            while let Some(frame) = Frame::decode(&mut buffer).unwrap() {
                decoded.push(frame);
            }
        }
        assert_eq!(decoded, frames);
        assert_eq!(
            Frame::decode(&mut vec![9, 0, 0, 0, 0]),
            Err(FrameError::Kind(9))
        );
        assert_eq!(
            Frame::decode(&mut vec![1, 0xff, 0, 0, 0]),
            Err(FrameError::TooLong(0xff00_0000))
        );
        assert_eq!(
            Frame::decode(&mut vec![3, 0, 0, 0, 1, 7]),
            Err(FrameError::Malformed)
        );
    }
}
