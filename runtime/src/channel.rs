//! The socket between the runtime and its container-init helper: one
//! length-prefixed JSON message at a time (length-prefixed, so nothing is
//! read ahead of a fork).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};

use crate::config::InitConfig;

/// The helper finds its end of the channel here.
pub const HELPER_FD: i32 = 3;

/// Longer than any spec we send; a bound so garbage cannot make us allocate.
const MAX_MESSAGE: u32 = 16 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// Runtime → helper: what to set up.
    Config(Box<InitConfig>),
    /// Helper → runtime: the container process's PID (in the agent's
    /// namespace).
    Pid(i32),
    /// Helper → runtime: set up, waiting for Start.
    Ready,
    /// Runtime → helper: exec the process now.
    Start,
    /// Helper → runtime: setup failed; the helper exits.
    Error(String),
}

pub struct Channel(UnixStream);

impl Channel {
    pub fn new(stream: UnixStream) -> Self {
        Channel(stream)
    }

    pub fn send(&mut self, message: &Message) -> io::Result<()> {
        let body = serde_json::to_vec(message).map_err(io::Error::other)?;
        let length = u32::try_from(body.len())
            .ok()
            .filter(|&n| n <= MAX_MESSAGE)
            .ok_or_else(|| io::Error::other("message too large"))?;
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&length.to_le_bytes());
        frame.extend_from_slice(&body);
        self.0.write_all(&frame)
    }

    /// The next message, or None when the other end closed the channel
    /// (for the runtime after Start: the helper exec'd the process).
    pub fn receive(&mut self) -> io::Result<Option<Message>> {
        let mut length = [0u8; 4];
        match self.0.read_exact(&mut length) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let length = u32::from_le_bytes(length);
        if length > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a message of {length} bytes"),
            ));
        }
        let mut body = vec![0u8; length as usize];
        self.0.read_exact(&mut body)?;
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}
