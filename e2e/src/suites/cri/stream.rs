//! CRI streaming as `kubectl exec` / `crictl exec -it` reach it: the CRI's
//! Exec answers with a URL on containerd's streaming server, which the
//! client upgrades to a WebSocket speaking `v4.channel.k8s.io`: each
//! binary frame is a channel byte and data (0 stdin, 1 stdout, 2 stderr,
//! 3 the end as a JSON Status, 4 the terminal's size as JSON).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

const PROTOCOL: &str = "v4.channel.k8s.io";
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const RESIZE: u8 = 4;

pub struct Session {
    socket: WebSocket<TcpStream>,
}

/// What a streamed exec gave: its output by stream, and its exit code
/// from the Status (0 for Success).
#[derive(Debug)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: Option<i64>,
}

impl Session {
    /// Upgrades the streaming server's `url` (http://HOST:PORT/exec/TOKEN).
    pub fn open(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("not a plain http URL: {url}"))?;
        let host = rest.split('/').next().unwrap_or_default();
        let stream = TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut request = format!("ws://{rest}").into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", PROTOCOL.parse()?);
        let (socket, _) = tungstenite::client::client(request, stream)
            .map_err(|e| anyhow::anyhow!("the WebSocket upgrade of {url}: {e}"))?;
        Ok(Session { socket })
    }

    fn send(&mut self, channel: u8, data: &[u8]) -> Result<()> {
        let mut frame = vec![channel];
        frame.extend_from_slice(data);
        self.socket.send(Message::Binary(frame.into()))?;
        Ok(())
    }

    pub fn stdin(&mut self, data: &[u8]) -> Result<()> {
        self.send(STDIN, data)
    }

    pub fn resize(&mut self, width: u16, height: u16) -> Result<()> {
        let size = serde_json::json!({"Width": width, "Height": height}).to_string();
        self.send(RESIZE, size.as_bytes())
    }

    /// Reads until the Status arrives (or the connection closes), `within`
    /// at most.
    pub fn finish(mut self, within: Duration) -> Result<Outcome> {
        let deadline = Instant::now() + within;
        let mut outcome = Outcome {
            stdout: String::new(),
            stderr: String::new(),
            exit_code: None,
        };
        let mut status = None;
        while status.is_none() {
            if Instant::now() > deadline {
                bail!("no end after {} s: {outcome:?}", within.as_secs());
            }
            let frame = match self.socket.read() {
                Ok(Message::Binary(frame)) => frame,
                Ok(Message::Close(_)) => break,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(tungstenite::Error::ConnectionClosed) => break,
                Err(e) => bail!("reading the stream: {e} (so far {outcome:?})"),
            };
            let Some((&channel, data)) = frame.split_first() else {
                continue;
            };
            let text = String::from_utf8_lossy(data);
            match channel {
                STDOUT => outcome.stdout.push_str(&text),
                STDERR => outcome.stderr.push_str(&text),
                STATUS if !data.is_empty() => status = Some(serde_json::from_slice(data)?),
                _ => {}
            }
        }
        let status: serde_json::Value = status.context("the stream ended without a status")?;
        outcome.exit_code = exit_code(&status);
        Ok(outcome)
    }
}

/// The exit code a v4 Status gives: 0 for Success, else its ExitCode
/// cause.
fn exit_code(status: &serde_json::Value) -> Option<i64> {
    if status["status"] == "Success" {
        return Some(0);
    }
    status["details"]["causes"]
        .as_array()?
        .iter()
        .find(|cause| cause["reason"] == "ExitCode")?["message"]
        .as_str()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_read_off_the_status() {
        let success = serde_json::json!({"metadata": {}, "status": "Success"});
        assert_eq!(exit_code(&success), Some(0));
        let failure = serde_json::json!({"status": "Failure", "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}});
        assert_eq!(exit_code(&failure), Some(3));
        assert_eq!(exit_code(&serde_json::json!({"status": "Failure"})), None);
    }
}
