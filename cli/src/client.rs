//! HTTP/1.1 to capsad over its Unix socket (hyper), one connection per
//! request; errors come back as the API's JSON errors.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use std::io::Write;

use capsa_api::exec::{self, ExecRequest, Frame};
use capsa_api::{ApiError, ProgressEvent, PROGRESS_MEDIA_TYPE};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

pub use crate::endpoint::Endpoint;

pub struct Client {
    endpoint: Endpoint,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    /// A client of capsad's Unix socket.
    pub fn new(socket: &Path) -> Result<Self> {
        Client::to(Endpoint::Unix(socket.to_path_buf()))
    }

    pub fn to(endpoint: Endpoint) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        Ok(Client { endpoint, runtime })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// A request to capsad with its host and, where there is one, its
    /// bearer token.
    fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        let builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "capsad");
        match self.endpoint.authorization() {
            Some(value) => builder.header("authorization", value),
            None => builder,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        accept: &str,
    ) -> Result<Response<Incoming>> {
        let body = Bytes::from(body.unwrap_or_default());
        self.send_raw(method, path, body, "application/json", accept)
            .await
    }

    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        content_type: &str,
        accept: &str,
    ) -> Result<Response<Incoming>> {
        let stream = self.endpoint.connect().await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = self
            .request(method, path)
            .header("content-type", content_type)
            .header("accept", accept)
            .body(Full::new(body))?;
        Ok(sender.send_request(request).await?)
    }

    /// A call whose body is raw bytes of `content_type` (an archive); the
    /// answer is JSON.
    pub fn call_bytes<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<T> {
        self.runtime.block_on(async {
            let response = self
                .send_raw(
                    method,
                    path,
                    Bytes::from(body),
                    content_type,
                    "application/json",
                )
                .await?;
            answer(path, response).await
        })
    }

    /// A JSON call; an error status becomes the API's error.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<T> {
        self.runtime.block_on(async {
            let response = self.send(method, path, body, "application/json").await?;
            answer(path, response).await
        })
    }

    /// A streamed response, handed to `each` chunk by chunk.
    pub fn stream(&self, path: &str, each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let pending = self.begin(Method::GET, path, None)?;
        self.drain(pending, each)
    }

    /// A long operation: its progress lines go to `progress` as they come,
    /// then its result is returned (or its error).
    pub fn call_with_progress<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        progress: impl FnMut(&str),
    ) -> Result<T> {
        let pending = self.begin(method, path, body)?;
        self.finish(pending, progress)
    }

    /// Sends a request whose answer streams, and returns once capsad has
    /// answered its head: a wait or a log follower holds its group from
    /// then on (an auto-removed group is kept until they are done).
    pub fn begin(&self, method: Method, path: &str, body: Option<String>) -> Result<Pending> {
        self.runtime.block_on(async {
            let response = self.send(method, path, body, PROGRESS_MEDIA_TYPE).await?;
            let status = response.status();
            let body = response.into_body();
            if !status.is_success() {
                let bytes = body.collect().await?.to_bytes();
                return Err(match serde_json::from_slice::<ApiError>(&bytes) {
                    Ok(error) => anyhow::Error::new(error),
                    Err(_) => anyhow!("capsad answered {status}"),
                });
            }
            Ok(Pending {
                path: path.to_string(),
                body,
            })
        })
    }

    /// The rest of a streamed answer, handed to `each` chunk by chunk.
    pub fn drain(&self, pending: Pending, mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let mut body = pending.body;
        self.runtime.block_on(async {
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    each(&data)?;
                }
            }
            Ok(())
        })
    }

    /// The rest of a long operation's answer: its progress lines go to
    /// `progress`, then its result is returned (or its error).
    pub fn finish<T: DeserializeOwned>(
        &self,
        pending: Pending,
        mut progress: impl FnMut(&str),
    ) -> Result<T> {
        self.finish_with(pending, |note| {
            if let Note::Line(text) = note {
                progress(text);
            }
        })
    }

    /// A long operation whose notes (lines, and the bytes of each blob
    /// moved) go to `note` as they come; then its result.
    pub fn call_with_notes<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        note: impl FnMut(Note),
    ) -> Result<T> {
        let pending = self.begin(method, path, body)?;
        self.finish_with(pending, note)
    }

    pub fn finish_with<T: DeserializeOwned>(
        &self,
        pending: Pending,
        mut note: impl FnMut(Note),
    ) -> Result<T> {
        let path = pending.path.clone();
        let mut outcome: Option<Result<T>> = None;
        let mut lines = Vec::new();
        self.drain(pending, |chunk| {
            lines.extend_from_slice(chunk);
            while let Some(end) = lines.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = lines.drain(..=end).collect();
                match serde_json::from_slice::<ProgressEvent<T>>(&line)
                    .with_context(|| format!("reading the answer to {path}"))?
                {
                    ProgressEvent::Progress(text) => note(Note::Line(&text)),
                    ProgressEvent::Transfer(moved) => note(Note::Transfer(&moved)),
                    ProgressEvent::Result(result) => outcome = Some(Ok(result)),
                    ProgressEvent::Error(e) => outcome = Some(Err(anyhow::Error::new(e))),
                }
            }
            Ok(())
        })?;
        outcome.with_context(|| format!("capsad ended {path} without a result"))?
    }
}

/// What a long operation says as it goes.
#[derive(Debug, Clone, Copy)]
pub enum Note<'a> {
    Line(&'a str),
    Transfer(&'a capsa_api::Transfer),
}

/// A JSON answer; an error status becomes the API's error.
async fn answer<T: DeserializeOwned>(path: &str, response: Response<Incoming>) -> Result<T> {
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(error) => anyhow::Error::new(error),
            Err(_) => anyhow!(
                "capsad answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ),
        });
    }
    serde_json::from_slice(&bytes).with_context(|| format!("reading the answer to {path}"))
}

/// A request whose answer's head has come; its body is still to read.
pub struct Pending {
    path: String,
    body: Incoming,
}

/// Puts the local terminal in raw mode until dropped, so keys reach the
/// remote terminal as typed.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enter() -> Self {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawTerminal(None);
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// The local terminal's size, if stdout is one.
pub fn terminal_size() -> Option<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the pointer, which points
    // at a live local.
    let result = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (result == 0 && size.ws_row > 0).then_some((size.ws_row, size.ws_col))
}

/// A line read from the terminal without echoing it.
pub fn read_secret(prompt: &str) -> Result<String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    eprint!("{prompt}");
    let saved = tcgetattr(&stdin).ok();
    if let Some(saved) = &saved {
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &quiet);
    }
    let mut line = String::new();
    let read = stdin.read_line(&mut line);
    if let Some(saved) = &saved {
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, saved);
    }
    eprintln!();
    read?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

pub fn stdin_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

/// How an interactive session relays this terminal.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    /// Send this process's input (then its end).
    pub stdin: bool,
    /// The remote side is a terminal: raw mode here, window sizes sent,
    /// Ctrl-P Ctrl-Q detaches.
    pub tty: bool,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The process exited with this code.
    Exited(i32),
    /// Ctrl-P Ctrl-Q: the process goes on.
    Detached,
}

/// Ctrl-P then Ctrl-Q, as docker's default detach keys.
const DETACH_KEYS: [u8; 2] = [0x10, 0x11];

impl Client {
    /// Runs an exec over an upgraded connection, relaying stdin, output
    /// and (on a terminal) window sizes; returns the exit code.
    pub fn exec(&self, path: &str, request: &ExecRequest) -> Result<i32> {
        let session = Session {
            stdin: request.stdin,
            tty: request.tty,
        };
        match self.interactive(path, Some(serde_json::to_string(request)?), session, || {})? {
            Ended::Exited(code) => Ok(code),
            Ended::Detached => Ok(0),
        }
    }

    /// Upgrades `path` to `capsa-exec/1` (with `header` as the request,
    /// when given), calls `attached` once the daemon has agreed, then
    /// relays this terminal until the process exits or Ctrl-P Ctrl-Q.
    pub fn interactive(
        &self,
        path: &str,
        header: Option<String>,
        session: Session,
        attached: impl FnOnce(),
    ) -> Result<Ended> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let on_terminal = session.tty && stdin_is_terminal();
        // Raw only when the keys go to the container: Ctrl-C must stop
        // this command otherwise.
        let _raw = (on_terminal && session.stdin).then(RawTerminal::enter);
        self.runtime.block_on(async {
            let stream = self.endpoint.connect().await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection.with_upgrades());
            let mut http_request = self
                .request(Method::POST, path)
                .header("connection", "upgrade")
                .header("upgrade", exec::UPGRADE_PROTOCOL);
            if let Some(header) = header {
                http_request = http_request.header(exec::REQUEST_HEADER, header);
            }
            let response = sender
                .send_request(http_request.body(Full::new(Bytes::new()))?)
                .await?;
            if response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
                let status = response.status();
                let bytes = response.into_body().collect().await?.to_bytes();
                return Err(match serde_json::from_slice::<ApiError>(&bytes) {
                    Ok(error) => anyhow::Error::new(error),
                    Err(_) => anyhow!("capsad answered {status} to {path}"),
                });
            }
            let upgraded = hyper::upgrade::on(response).await?;
            attached();
            let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
            let (frames, mut outgoing) = tokio::sync::mpsc::channel::<Frame>(16);
            // Ended with the session, so that the connection closes then
            // rather than when this command exits.
            let mut tasks = Vec::new();
            tasks.push(tokio::spawn(async move {
                while let Some(frame) = outgoing.recv().await {
                    if writer.write_all(&frame.encode()).await.is_err() {
                        break;
                    }
                }
            }));
            let detach = std::sync::Arc::new(tokio::sync::Notify::new());
            if session.stdin {
                let frames = frames.clone();
                let detach = detach.clone();
                // Read by a thread of its own: one blocked on a terminal
                // must not hold this command's exit (tokio's stdin would:
                // its runtime waits for its blocking reads).
                let (keys, mut typed) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
                std::thread::spawn(move || {
                    use std::io::Read;
                    let mut stdin = std::io::stdin();
                    let mut chunk = vec![0u8; 32 * 1024];
                    loop {
                        match stdin.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if keys.blocking_send(chunk[..n].to_vec()).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                tasks.push(tokio::spawn(async move {
                    let mut last = 0u8;
                    while let Some(chunk) = typed.recv().await {
                        let mut data = chunk.as_slice();
                        if session.tty {
                            let keys = std::iter::once(last)
                                .chain(data.iter().copied())
                                .collect::<Vec<u8>>();
                            if let Some(at) = keys.windows(2).position(|w| w == DETACH_KEYS) {
                                // What came before the keys still goes.
                                data = &data[..at.saturating_sub(1)];
                                if !data.is_empty() {
                                    let _ = frames.send(Frame::Stdin(data.to_vec())).await;
                                }
                                detach.notify_one();
                                return;
                            }
                            last = data.last().copied().unwrap_or(last);
                        }
                        if frames.send(Frame::Stdin(data.to_vec())).await.is_err() {
                            return;
                        }
                    }
                    let _ = frames.send(Frame::StdinEnd).await;
                }));
            }
            if on_terminal {
                if let Some((rows, columns)) = terminal_size() {
                    let _ = frames.send(Frame::Resize { rows, columns }).await;
                }
                if let Ok(mut resized) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
                {
                    let frames = frames.clone();
                    tasks.push(tokio::spawn(async move {
                        while resized.recv().await.is_some() {
                            if let Some((rows, columns)) = terminal_size() {
                                let _ = frames.send(Frame::Resize { rows, columns }).await;
                            }
                        }
                    }));
                }
            }
            let mut buffer = Vec::new();
            let mut chunk = vec![0u8; 32 * 1024];
            let ended = async {
                loop {
                    while let Some(frame) = Frame::decode(&mut buffer)? {
                        match frame {
                            Frame::Stdout(data) => {
                                let mut out = std::io::stdout().lock();
                                out.write_all(&data)?;
                                out.flush()?;
                            }
                            Frame::Stderr(data) => {
                                let _ = std::io::stderr().write_all(&data);
                            }
                            Frame::Exit(code) => return Ok(Ended::Exited(code)),
                            Frame::Error(message) => return Err(anyhow!("{path}: {message}")),
                            _ => {}
                        }
                    }
                    let n = tokio::select! {
                        read = reader.read(&mut chunk) => read?,
                        () = detach.notified() => return Ok(Ended::Detached),
                    };
                    if n == 0 {
                        return Err(anyhow!(
                            "{path}: capsad closed the connection before the exit code"
                        ));
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                }
            }
            .await;
            for task in tasks {
                task.abort();
                let _ = task.await;
            }
            ended
        })
    }
}
