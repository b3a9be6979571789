//! A group's containers: wait, logs, exec.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use capsa_api::exec::{self, ExecRequest, Frame};
use capsa_api::ErrorCode;
use serde::Deserialize;

use super::{blocking, long_operation, Failure};
use crate::errors::{error, internal};
use crate::groups::{Daemon, Exec};
use crate::logs;

/// Blocks until the container has exited. A client that accepts
/// PROGRESS_MEDIA_TYPE gets the answer's head at once: from then on it
/// holds the group, so that an auto-removed group that stops meanwhile is
/// kept until the exit has been sent.
pub(super) async fn wait_container(
    State(daemon): State<Arc<Daemon>>,
    UrlPath((name, container)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let hold = daemon.group(&name)?.hold();
    Ok(long_operation(&headers, move |_| {
        let _hold = hold;
        daemon.wait(&name, &container)
    })
    .await)
}

#[derive(Deserialize)]
pub(super) struct KillQuery {
    /// A name (`SIGTERM`, `TERM`) or a number; SIGKILL unless given.
    signal: Option<String>,
}

/// Sends a signal to a running container's main process.
pub(super) async fn kill_container(
    State(daemon): State<Arc<Daemon>>,
    UrlPath((name, container)): UrlPath<(String, String)>,
    Query(query): Query<KillQuery>,
) -> Result<Json<serde_json::Value>, Failure> {
    let signal = match query.signal.as_deref() {
        None => libc::SIGKILL,
        Some(text) => capsa_api::signal::number(text).ok_or_else(|| {
            error(
                ErrorCode::InvalidRequest,
                format!("signal: {text:?} is not a signal"),
            )
        })?,
    };
    blocking(move || daemon.kill(&name, &container, signal)).await?;
    Ok(Json(serde_json::json!({ "signal": signal })))
}

/// The processes of a running container.
pub(super) async fn top_container(
    State(daemon): State<Arc<Daemon>>,
    UrlPath((name, container)): UrlPath<(String, String)>,
) -> Result<Json<Vec<capsa_api::ProcessView>>, Failure> {
    Ok(Json(blocking(move || daemon.top(&name, &container)).await?))
}

#[derive(Deserialize)]
pub(super) struct LogsQuery {
    #[serde(default)]
    follow: bool,
    tail: Option<usize>,
    /// Unix milliseconds.
    since: Option<u64>,
}

/// JSON lines; with `follow`, the response goes on until the container
/// has exited (or its group has stopped) and its last line has been sent:
/// a container not started yet is waited for.
pub(super) async fn container_logs(
    State(daemon): State<Arc<Daemon>>,
    UrlPath((name, container)): UrlPath<(String, String)>,
    Query(query): Query<LogsQuery>,
) -> Result<Response, Failure> {
    let (path, group) = {
        let daemon = daemon.clone();
        let (name, container) = (name.clone(), container.clone());
        blocking(move || daemon.log_path(&name, &container)).await?
    };
    let (lines, offset) = {
        let path = path.clone();
        blocking(move || logs::read(&path, query.tail, query.since).map_err(internal)).await?
    };
    let mut first = String::new();
    for line in &lines {
        first.push_str(&serde_json::to_string(line).unwrap_or_default());
        first.push('\n');
    }
    if !query.follow {
        return Ok(([("content-type", "application/x-ndjson")], first).into_response());
    }
    // A follower holds the group (see wait_container) until its stream
    // ends or is dropped: it gets every line an auto-removed group wrote.
    let hold = group.hold();
    let stream = futures::stream::unfold(
        (Some(first), offset, false),
        move |(pending, offset, finished)| {
            let _held = &hold;
            let path = path.clone();
            let daemon = daemon.clone();
            let group = group.clone();
            let (name, container) = (name.clone(), container.clone());
            async move {
                if let Some(text) = pending {
                    return Some((Ok::<_, std::io::Error>(text), (None, offset, false)));
                }
                if finished {
                    return None;
                }
                let mut offset = offset;
                loop {
                    // Whether it had ended before this read: then whatever
                    // the read finds is the last of it.
                    let ended = daemon.wait_done(&name, &container) || group.is_over();
                    let mut lines = Vec::new();
                    offset = logs::read_lines(&path, offset, &mut lines).unwrap_or(offset);
                    if !lines.is_empty() || ended {
                        let mut text = String::new();
                        for line in &lines {
                            text.push_str(&serde_json::to_string(line).unwrap_or_default());
                            text.push('\n');
                        }
                        return Some((Ok(text), (None, offset, ended)));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        },
    );
    Ok((
        [("content-type", "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Upgrades the connection to `capsa-exec/1` and bridges its frames to
/// the exec'd process's streams (see capsa_api::exec).
pub(super) async fn exec(
    State(daemon): State<Arc<Daemon>>,
    UrlPath((name, container)): UrlPath<(String, String)>,
    mut request: axum::extract::Request,
) -> Result<Response, Failure> {
    let header = request
        .headers()
        .get(exec::REQUEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            error(
                ErrorCode::InvalidRequest,
                "exec needs the capsa-exec header",
            )
        })?;
    let exec_request: ExecRequest = serde_json::from_str(header)
        .map_err(|e| error(ErrorCode::InvalidRequest, format!("capsa-exec header: {e}")))?;
    require_upgrade(&request, "exec")?;
    let started = blocking(move || daemon.exec_start(&name, &container, &exec_request)).await?;
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => bridge(hyper_util::rt::TokioIo::new(upgraded), started).await,
            Err(e) => tracing::warn!("exec upgrade failed: {e}"),
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", exec::UPGRADE_PROTOCOL)
        .body(Body::empty())
        .map_err(internal)?)
}

/// `what` (exec, attach) is asked for with `Upgrade: capsa-exec/1`.
pub(super) fn require_upgrade(request: &axum::extract::Request, what: &str) -> Result<(), Failure> {
    let upgrade = request
        .headers()
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(exec::UPGRADE_PROTOCOL));
    if upgrade {
        Ok(())
    } else {
        Err(Failure(error(
            ErrorCode::InvalidRequest,
            format!("{what} needs Upgrade: {}", exec::UPGRADE_PROTOCOL),
        )))
    }
}

pub(super) async fn bridge<S>(client: S, started: Exec)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_in, mut client_out) = tokio::io::split(client);
    let (frames, mut outgoing) = tokio::sync::mpsc::channel::<Frame>(16);
    let writer = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            let last = matches!(frame, Frame::Exit(_) | Frame::Error(_));
            if client_out.write_all(&frame.encode()).await.is_err() || last {
                break;
            }
        }
        let _ = client_out.shutdown().await;
    });
    let to_async = |stream: std::os::unix::net::UnixStream| {
        stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(stream))
    };
    let mut pumps = Vec::new();
    let outputs = [(Some(started.stdout), true), (started.stderr, false)];
    for (stream, is_stdout) in outputs {
        let Some(Ok(mut stream)) = stream.map(to_async) else {
            continue;
        };
        let frames = frames.clone();
        pumps.push(tokio::spawn(async move {
            let mut buffer = vec![0u8; 32 * 1024];
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let data = buffer[..n].to_vec();
                        let frame = if is_stdout {
                            Frame::Stdout(data)
                        } else {
                            Frame::Stderr(data)
                        };
                        if frames.send(frame).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    let guest = started.guest.clone();
    let (container, exec_id) = (started.container.clone(), started.exec_id.clone());
    let mut stdin = started.stdin.map(to_async).and_then(Result::ok);
    let input = tokio::spawn(async move {
        let mut buffer = Vec::new();
        let mut chunk = vec![0u8; 32 * 1024];
        loop {
            let n = match client_in.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buffer.extend_from_slice(&chunk[..n]);
            while let Ok(Some(frame)) = Frame::decode(&mut buffer) {
                match frame {
                    Frame::Stdin(data) => {
                        if let Some(stdin) = stdin.as_mut() {
                            let _ = stdin.write_all(&data).await;
                        }
                    }
                    Frame::StdinEnd => {
                        if let Some(mut stdin) = stdin.take() {
                            let _ = stdin.shutdown().await;
                        }
                    }
                    Frame::Resize { rows, columns } => {
                        let (guest, container, exec_id) =
                            (guest.clone(), container.clone(), exec_id.clone());
                        let _ = tokio::task::spawn_blocking(move || {
                            guest.resize(&container, &exec_id, rows.into(), columns.into())
                        })
                        .await;
                    }
                    _ => {}
                }
            }
        }
    });
    for pump in pumps {
        let _ = pump.await;
    }
    let (guest, container, exec_id) = (started.guest, started.container, started.exec_id);
    let exit = tokio::task::spawn_blocking(move || guest.wait(&container, &exec_id)).await;
    let last = match exit {
        Ok(Ok(exit)) => Frame::Exit(exit.code),
        Ok(Err(e)) => Frame::Error(e.to_string()),
        Err(e) => Frame::Error(e.to_string()),
    };
    let _ = frames.send(last).await;
    drop(frames);
    let _ = writer.await;
    input.abort();
}

#[derive(Deserialize)]
pub(super) struct ArchiveQuery {
    /// The path in the container.
    path: String,
}

/// A blocking reader of a request body's chunks, for the blocking pool.
struct BodyReader {
    chunks: tokio::sync::mpsc::Receiver<Result<axum::body::Bytes, std::io::Error>>,
    current: axum::body::Bytes,
}

impl std::io::Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// `capsa cp` into a container: the body is capsa-copy's archive, unpacked
/// at `path` in the running container.
pub(super) async fn put_archive(
    State(daemon): State<Arc<Daemon>>,
    UrlPath((name, container)): UrlPath<(String, String)>,
    Query(query): Query<ArchiveQuery>,
    body: Body,
) -> Result<Json<serde_json::Value>, Failure> {
    use futures::StreamExt;
    let (sender, chunks) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(std::io::Error::other);
            if sender.send(chunk).await.is_err() {
                return;
            }
        }
    });
    let reader = BodyReader {
        chunks,
        current: Default::default(),
    };
    let path = query.path.clone();
    let bytes = blocking(move || daemon.copy_in(&name, &container, &query.path, reader)).await?;
    Ok(Json(serde_json::json!({ "path": path, "bytes": bytes })))
}

/// `capsa cp` out of a container: `path`, packed by the guest as
/// capsa-copy's archive, streamed as it comes (at most MAX_COPY_BYTES).
pub(super) async fn get_archive(
    State(daemon): State<Arc<Daemon>>,
    UrlPath((name, container)): UrlPath<(String, String)>,
    Query(query): Query<ArchiveQuery>,
) -> Result<Response, Failure> {
    let (sender, mut chunks) =
        tokio::sync::mpsc::channel::<Result<axum::body::Bytes, capsa_api::ApiError>>(4);
    tokio::task::spawn_blocking(move || {
        let sink = sender.clone();
        let copied = daemon.copy_out(
            &name,
            &container,
            &query.path,
            capsa_protocol::MAX_COPY_BYTES,
            move |data| {
                sink.blocking_send(Ok(axum::body::Bytes::copy_from_slice(data)))
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            },
        );
        if let Err(e) = copied {
            let _ = sender.blocking_send(Err(e));
        }
    });
    // The first answer decides the status: an error before any byte is
    // the API's error; after, the body just ends short.
    let first = match chunks.recv().await {
        Some(Ok(chunk)) => chunk,
        Some(Err(e)) => return Err(Failure(e)),
        None => return Err(Failure(internal("the copy ended without an archive"))),
    };
    let rest = futures::stream::unfold(chunks, |mut chunks| async move {
        let next = chunks.recv().await?;
        Some((next.map_err(|e| std::io::Error::other(e.message)), chunks))
    });
    let stream = futures::StreamExt::chain(
        futures::stream::once(async move { Ok::<_, std::io::Error>(first) }),
        rest,
    );
    Ok((
        [("content-type", "application/x-tar")],
        Body::from_stream(stream),
    )
        .into_response())
}
