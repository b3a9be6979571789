//! `attach`: a client joined to a container's main process over a
//! `capsa-exec/1` connection (see capsa_api::exec): its output as its log
//! gets it, from the moment of the attach (a container not started yet:
//! all of it), its input into the container's open stdin, its terminal's
//! size, and its exit code last.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::Response;
use capsa_api::exec::Frame;
use capsa_api::ContainerStatus;

use super::containers::require_upgrade;
use super::{blocking, Failure};
use crate::errors::internal;
use crate::groups::{ContainerInput, Daemon, Group, Hold};
use crate::logs;

/// How often the log is read for what the container wrote.
const POLL: Duration = Duration::from_millis(50);

pub(super) async fn attach(
    State(daemon): State<Arc<Daemon>>,
    UrlPath((name, container)): UrlPath<(String, String)>,
    mut request: axum::extract::Request,
) -> Result<Response, Failure> {
    require_upgrade(&request, "attach")?;
    let (path, group) = {
        let daemon = daemon.clone();
        let (name, container) = (name.clone(), container.clone());
        blocking(move || daemon.log_path(&name, &container)).await?
    };
    // From the end of what is there now.
    let offset = {
        let path = path.clone();
        blocking(move || {
            logs::read(&path, Some(0), None)
                .map(|(_, end)| end)
                .map_err(internal)
        })
        .await?
    };
    let attached = Attached {
        hold: group.hold(),
        daemon,
        group,
        name,
        container,
        path,
        offset,
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => bridge(hyper_util::rt::TokioIo::new(upgraded), attached).await,
            Err(e) => tracing::warn!("attach upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", capsa_api::exec::UPGRADE_PROTOCOL)
        .body(Body::empty())
        .map_err(|e| Failure(internal(e)))
}

/// What an attached client is joined to.
struct Attached {
    /// An auto-removed group stays until this client has the exit.
    hold: Hold,
    daemon: Arc<Daemon>,
    group: Arc<Group>,
    name: String,
    container: String,
    path: PathBuf,
    offset: u64,
}

async fn bridge<S>(client: S, attached: Attached)
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
    let Attached {
        hold,
        daemon,
        group,
        name,
        container,
        path,
        offset,
    } = attached;
    let resizing = (group.clone(), container.clone());
    let mut output = tokio::spawn(async move {
        let _hold = hold;
        let mut offset = offset;
        loop {
            // Whether it had ended before this read: then whatever the
            // read finds is the last of it.
            let ended = daemon.wait_done(&name, &container) || group.is_over();
            let mut lines = Vec::new();
            offset = logs::read_lines(&path, offset, &mut lines).unwrap_or(offset);
            for line in lines {
                let mut data = line.line.into_bytes();
                if !line.partial {
                    data.push(b'\n');
                }
                let frame = if line.stream == "stderr" {
                    Frame::Stderr(data)
                } else {
                    Frame::Stdout(data)
                };
                if frames.send(frame).await.is_err() {
                    return;
                }
            }
            if ended {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        let record = group.snapshot();
        let exited = record
            .containers
            .iter()
            .find(|c| c.name == container && c.status == ContainerStatus::Exited);
        let last = match exited {
            Some(c) => Frame::Exit(c.exit_code.unwrap_or(-1)),
            None => Frame::Error(format!(
                "group {name} stopped before container {container} exited"
            )),
        };
        let _ = frames.send(last).await;
    });
    let mut relay = tokio::spawn(async move {
        let (group, container) = resizing;
        let mut input: Option<Option<ContainerInput>> = None;
        let mut buffer = Vec::new();
        let mut chunk = vec![0u8; 32 * 1024];
        loop {
            let n = match client_in.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buffer.extend_from_slice(&chunk[..n]);
            while let Ok(Some(frame)) = Frame::decode(&mut buffer) {
                // Input and sizes wait for the start: a client may attach
                // before it (`run -it`), type ahead and give its size.
                if matches!(
                    frame,
                    Frame::Stdin(_) | Frame::StdinEnd | Frame::Resize { .. }
                ) && input.is_none()
                {
                    input = Some(input_of(&group, &container).await);
                }
                let input = input.clone().flatten();
                match frame {
                    Frame::Stdin(data) => {
                        if let Some(input) = input {
                            let _ = tokio::task::spawn_blocking(move || {
                                let mut input = input.lock().unwrap_or_else(|e| e.into_inner());
                                if let Some(stream) = input.as_mut() {
                                    // A guest that reads nothing costs
                                    // the write timeout, then the input.
                                    if stream.write_all(&data).is_err() {
                                        input.take();
                                    }
                                }
                            })
                            .await;
                        }
                    }
                    Frame::StdinEnd => {
                        if let Some(input) = input {
                            let _ = tokio::task::spawn_blocking(move || {
                                let taken = input.lock().unwrap_or_else(|e| e.into_inner()).take();
                                if let Some(stream) = taken {
                                    let _ = stream.shutdown(std::net::Shutdown::Write);
                                }
                            })
                            .await;
                        }
                    }
                    Frame::Resize { rows, columns } => {
                        if let Some(guest) = group.guest() {
                            let container = container.clone();
                            let _ = tokio::task::spawn_blocking(move || {
                                guest.resize(&container, "", rows.into(), columns.into())
                            })
                            .await;
                        }
                    }
                    _ => {}
                }
            }
        }
    });
    // The exit sent, or the client gone (detached): either ends the other.
    tokio::select! {
        _ = &mut output => relay.abort(),
        _ = &mut relay => output.abort(),
    }
    let _ = writer.await;
}

/// The open input of `container`, once it has started; None when it
/// keeps none (or never starts).
async fn input_of(group: &Group, container: &str) -> Option<ContainerInput> {
    loop {
        if let Some(input) = group.lock().stdin.get(container).cloned() {
            return Some(input);
        }
        let started = group
            .snapshot()
            .containers
            .iter()
            .any(|c| c.name == container && c.status != ContainerStatus::Created);
        if started || group.is_over() {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}
