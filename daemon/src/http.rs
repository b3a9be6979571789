//! The HTTP/JSON API on the daemon's Unix socket (docs/api.json describes
//! it). Handlers run the daemon's blocking calls on the blocking pool.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use capsa_api::exec::{self, ExecRequest, Frame};
use capsa_api::{
    ApiError, ErrorCode, GroupSpec, ImageView, ImportRequest, ProgressEvent, PullRequest,
    VolumeRequest, VolumeView, PROGRESS_MEDIA_TYPE,
};
use serde::{Deserialize, Serialize};

use crate::groups::{error, is_running, Daemon, Exec, DEFAULT_STOP_GRACE};
use crate::logs;
use crate::volumes::volume_error;

pub struct Failure(ApiError);

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

type Reply<T> = Result<Json<T>, Failure>;

/// Runs blocking daemon work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Failure(error(ErrorCode::Internal, format!("worker failed: {e}"))))?
        .map_err(Failure)
}

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/images", get(list_images).delete(remove_image))
        .route("/v1/images/import", post(import_image))
        .route("/v1/images/pull", post(pull_image))
        .route("/v1/groups", get(list_groups).post(create_group))
        .route("/v1/groups/{name}", get(inspect_group).delete(delete_group))
        .route("/v1/groups/{name}/start", post(start_group))
        .route("/v1/groups/{name}/stats", get(group_stats))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", axum::routing::delete(remove_volume))
        .route("/v1/volumes/{name}/grow", post(grow_volume))
        .route("/v1/groups/{name}/stop", post(stop_group))
        .route(
            "/v1/groups/{name}/containers/{container}/wait",
            post(wait_container),
        )
        .route(
            "/v1/groups/{name}/containers/{container}/logs",
            get(container_logs),
        )
        .route("/v1/groups/{name}/containers/{container}/exec", post(exec))
        .fallback(|| async {
            Failure(error(
                ErrorCode::NotFound,
                "no such route (see docs/api.json)",
            ))
        })
        .with_state(daemon)
}

async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({"version": env!("CARGO_PKG_VERSION"), "api": "v1"}))
}

async fn list_images(State(daemon): State<Arc<Daemon>>) -> Reply<Vec<ImageView>> {
    let images = blocking(move || {
        daemon
            .images
            .list()
            .map_err(|e| error(ErrorCode::Internal, e.to_string()))
    })
    .await?;
    Ok(Json(images.into_iter().map(view_of).collect()))
}

fn view_of(summary: capsa_image_store::ImageSummary) -> ImageView {
    ImageView {
        name: summary.name,
        digest: summary.manifest_digest,
        size: summary.size,
        layers: summary.layers,
    }
}

async fn import_image(
    State(daemon): State<Arc<Daemon>>,
    headers: HeaderMap,
    Json(request): Json<ImportRequest>,
) -> Response {
    long_operation(&headers, move |report| {
        let path = Path::new(&request.path);
        let store_error = |e: capsa_image_store::StoreError| {
            error(
                ErrorCode::InvalidRequest,
                format!("importing {}: {e}", request.path),
            )
        };
        let mut progress = |p: capsa_image_store::Progress| report(p.to_string());
        let summary = if path.is_dir() {
            let name = request.name.clone().ok_or_else(|| {
                error(
                    ErrorCode::InvalidRequest,
                    "importing a layout directory needs a name",
                )
            })?;
            daemon
                .images
                .import_layout(path, None, &name, &mut progress)
                .map_err(store_error)
        } else if path.is_file() {
            daemon
                .images
                .import_archive(path, request.name.as_deref(), &mut progress)
                .map_err(store_error)
        } else {
            Err(error(
                ErrorCode::InvalidRequest,
                format!(
                    "{}: no such file or directory on the daemon's host",
                    request.path
                ),
            ))
        }?;
        Ok(view_of(summary))
    })
    .await
}

async fn pull_image(
    State(daemon): State<Arc<Daemon>>,
    headers: HeaderMap,
    Json(request): Json<PullRequest>,
) -> Response {
    long_operation(&headers, move |report| {
        let options = capsa_image_store::registry::PullOptions {
            credentials: request.username.clone().zip(request.password.clone()),
            insecure: request.insecure,
        };
        match daemon.images.pull(
            &request.reference,
            request.name.as_deref(),
            &options,
            &mut |p| report(p.to_string()),
        ) {
            Ok(summary) => Ok(view_of(summary)),
            Err(capsa_image_store::StoreError::NotFound(what)) => Err(error(
                ErrorCode::ImageNotFound,
                format!("the registry has no {what}"),
            )),
            Err(e) => Err(error(
                ErrorCode::InvalidRequest,
                format!("pulling {}: {e}", request.reference),
            )),
        }
    })
    .await
}

/// Runs a long operation off the async threads. A client that accepts
/// PROGRESS_MEDIA_TYPE gets JSON lines of ProgressEvent: the progress as it
/// goes, then the result or the error; any other client gets the result
/// as one JSON answer.
async fn long_operation<T: Serialize + Send + 'static>(
    headers: &HeaderMap,
    work: impl FnOnce(&mut dyn FnMut(String)) -> Result<T, ApiError> + Send + 'static,
) -> Response {
    let wants_progress = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains(PROGRESS_MEDIA_TYPE));
    if !wants_progress {
        return match blocking(move || work(&mut |_| {})).await {
            Ok(result) => Json(result).into_response(),
            Err(failure) => failure.into_response(),
        };
    }
    let (events, receiver) = tokio::sync::mpsc::channel::<ProgressEvent<T>>(64);
    tokio::task::spawn_blocking(move || {
        let mut report = |text: String| {
            // A client that went away stops nothing: the work finishes.
            let _ = events.blocking_send(ProgressEvent::Progress(text));
        };
        let last = match work(&mut report) {
            Ok(result) => ProgressEvent::Result(result),
            Err(e) => ProgressEvent::Error(e),
        };
        let _ = events.blocking_send(last);
    });
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        let event = receiver.recv().await?;
        let mut line = serde_json::to_string(&event).unwrap_or_default();
        line.push('\n');
        Some((Ok::<_, std::io::Error>(line), receiver))
    });
    (
        [(header::CONTENT_TYPE, PROGRESS_MEDIA_TYPE)],
        Body::from_stream(stream),
    )
        .into_response()
}

#[derive(Deserialize)]
struct NameQuery {
    name: String,
}

async fn remove_image(
    State(daemon): State<Arc<Daemon>>,
    Query(query): Query<NameQuery>,
) -> Reply<serde_json::Value> {
    blocking(move || {
        daemon
            .images
            .remove(&query.name, |name| daemon.image_user(name))
            .map_err(|e| match e {
                capsa_image_store::StoreError::NotFound(_) => {
                    error(ErrorCode::ImageNotFound, e.to_string())
                }
                capsa_image_store::StoreError::InUse(..) => {
                    error(ErrorCode::Conflict, e.to_string())
                }
                other => error(ErrorCode::InvalidRequest, other.to_string()),
            })?;
        let (blobs, bytes) = daemon
            .images
            .garbage_collect()
            .map_err(|e| error(ErrorCode::Internal, e.to_string()))?;
        Ok(serde_json::json!({"removed": query.name, "blobs_freed": blobs, "bytes_freed": bytes}))
    })
    .await
    .map(Json)
}

async fn list_groups(State(daemon): State<Arc<Daemon>>) -> Reply<Vec<capsa_api::GroupView>> {
    Ok(Json(blocking(move || Ok(daemon.list())).await?))
}

async fn create_group(
    State(daemon): State<Arc<Daemon>>,
    body: String,
) -> Reply<capsa_api::GroupView> {
    let spec: GroupSpec = serde_json::from_str(&body).map_err(|e| ApiError {
        code: ErrorCode::InvalidSpec,
        message: "invalid container group spec".into(),
        details: vec![e.to_string()],
    })?;
    Ok(Json(blocking(move || daemon.create(spec)).await?))
}

async fn inspect_group(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
) -> Reply<capsa_api::GroupView> {
    Ok(Json(blocking(move || daemon.inspect(&name)).await?))
}

async fn start_group(
    State(daemon): State<Arc<Daemon>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    long_operation(&headers, move |report| daemon.start(&name, report)).await
}

async fn metrics(State(daemon): State<Arc<Daemon>>) -> Response {
    match blocking(move || Ok(crate::metrics::render(&daemon))).await {
        Ok(text) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Err(failure) => failure.into_response(),
    }
}

/// Only /metrics, for a TCP listener (`capsad --metrics-address`).
pub fn metrics_router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(daemon)
}

fn volume_view(daemon: &Daemon, volume: capsa_volumes::Volume) -> VolumeView {
    VolumeView {
        attached_to: daemon.volume_users(&volume.name),
        name: volume.name,
        size_bytes: volume.size_bytes,
        created_at: volume.created_at,
    }
}

async fn list_volumes(State(daemon): State<Arc<Daemon>>) -> Reply<Vec<VolumeView>> {
    blocking(move || {
        let volumes = daemon.volumes.list().map_err(volume_error)?;
        Ok(volumes
            .into_iter()
            .map(|v| volume_view(&daemon, v))
            .collect())
    })
    .await
    .map(Json)
}

async fn create_volume(
    State(daemon): State<Arc<Daemon>>,
    Json(request): Json<VolumeRequest>,
) -> Reply<VolumeView> {
    blocking(move || {
        let volume = daemon
            .volumes
            .create(&request.name, request.size_mib)
            .map_err(volume_error)?;
        Ok(volume_view(&daemon, volume))
    })
    .await
    .map(Json)
}

/// Refused while a running group has the volume attached.
fn not_attached(daemon: &Daemon, name: &str) -> Result<(), ApiError> {
    let users = daemon.volume_users(name);
    if users.is_empty() {
        Ok(())
    } else {
        Err(error(
            ErrorCode::Conflict,
            format!(
                "volume {name:?} is attached to running group(s) {}",
                users.join(", ")
            ),
        ))
    }
}

async fn grow_volume(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
    Json(request): Json<capsa_api::VolumeGrowRequest>,
) -> Reply<VolumeView> {
    blocking(move || {
        not_attached(&daemon, &name)?;
        let volume = daemon
            .volumes
            .grow(&name, request.size_mib)
            .map_err(volume_error)?;
        Ok(volume_view(&daemon, volume))
    })
    .await
    .map(Json)
}

async fn remove_volume(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
) -> Reply<serde_json::Value> {
    blocking(move || {
        not_attached(&daemon, &name)?;
        daemon.volumes.remove(&name).map_err(volume_error)?;
        Ok(serde_json::json!({ "removed": name }))
    })
    .await
    .map(Json)
}

#[derive(Deserialize)]
struct StopQuery {
    /// Seconds between SIGTERM and SIGKILL.
    timeout: Option<u64>,
}

async fn stop_group(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<StopQuery>,
) -> Reply<capsa_api::GroupView> {
    let grace = query
        .timeout
        .map_or(DEFAULT_STOP_GRACE, Duration::from_secs);
    Ok(Json(blocking(move || daemon.stop(&name, grace)).await?))
}

async fn delete_group(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
) -> Reply<serde_json::Value> {
    let deleted = name.clone();
    blocking(move || daemon.delete(&name)).await?;
    Ok(Json(serde_json::json!({"deleted": deleted})))
}

async fn group_stats(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
) -> Reply<capsa_api::GroupStats> {
    Ok(Json(blocking(move || daemon.stats(&name)).await?))
}

/// JSON lines of events as they happen, until the client goes away.
async fn events(State(daemon): State<Arc<Daemon>>) -> Response {
    let receiver = daemon.subscribe();
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(event) => {
                    let mut line = serde_json::to_string(&event).unwrap_or_default();
                    line.push('\n');
                    return Some((Ok::<_, std::io::Error>(line), receiver));
                }
                // A slow reader missed some; carry on with the rest.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    (
        [("content-type", "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn wait_container(
    State(daemon): State<Arc<Daemon>>,
    UrlPath((name, container)): UrlPath<(String, String)>,
) -> Reply<capsa_api::WaitResponse> {
    Ok(Json(
        blocking(move || daemon.wait(&name, &container)).await?,
    ))
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
    tail: Option<usize>,
    /// Unix milliseconds.
    since: Option<u64>,
}

/// JSON lines; with `follow`, the response goes on until the container
/// has exited and its last line has been sent.
async fn container_logs(
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
        blocking(move || {
            logs::read(&path, query.tail, query.since)
                .map_err(|e| error(ErrorCode::Internal, e.to_string()))
        })
        .await?
    };
    let mut first = String::new();
    for line in &lines {
        first.push_str(&serde_json::to_string(line).unwrap_or_default());
        first.push('\n');
    }
    if !query.follow {
        return Ok(([("content-type", "application/x-ndjson")], first).into_response());
    }
    let stream = futures::stream::unfold(
        (Some(first), offset, false),
        move |(pending, offset, finished)| {
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
                    let ended = daemon.wait_done(&name, &container) || !is_running(&group);
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
async fn exec(
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
    let upgrade = request
        .headers()
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(exec::UPGRADE_PROTOCOL));
    if !upgrade {
        return Err(Failure(error(
            ErrorCode::InvalidRequest,
            format!("exec needs Upgrade: {}", exec::UPGRADE_PROTOCOL),
        )));
    }
    let started = blocking(move || daemon.exec_start(&name, &container, &exec_request)).await?;
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => bridge(hyper_util::rt::TokioIo::new(upgraded), started).await,
            Err(e) => eprintln!("capsad: exec upgrade failed: {e}"),
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", exec::UPGRADE_PROTOCOL)
        .body(Body::empty())
        .map_err(|e| error(ErrorCode::Internal, e.to_string()))?)
}

async fn bridge<S>(client: S, started: Exec)
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const METHODS: &[&str] = &["GET", "POST", "DELETE", "PUT", "PATCH"];

    fn daemon(dir: &Path) -> Arc<Daemon> {
        let images = capsa_image_store::ImageStore::open(&dir.join("images")).unwrap();
        Daemon::new(
            dir.to_path_buf(),
            images,
            capsa_vm_process::VmConfig {
                vmm: "/nonexistent/capsa-vmm".into(),
                kernel: "/nonexistent/vmlinux".into(),
                initrd: "/nonexistent/initrd".into(),
            },
            None,
            capsa_volumes::VolumeStore::open(&dir.join("volumes")).unwrap(),
        )
    }

    async fn call(router: &Router, method: &str, path: &str) -> (StatusCode, String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let streamed = response
            .headers()
            .get("content-type")
            .is_some_and(|t| t == "application/x-ndjson");
        if streamed {
            // The events stream never ends; its status says enough.
            return (status, String::new());
        }
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// docs/api.json against the real router: every documented operation
    /// is routed, and no other method is on a documented path.
    #[tokio::test]
    async fn the_openapi_document_matches_the_routes() {
        let dir = tempfile::tempdir().unwrap();
        let router = router(daemon(dir.path()));
        let document: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/api.json")).unwrap();
        let paths = document["paths"].as_object().unwrap();
        assert!(paths.len() >= 9, "the document lost its paths");
        for (path, operations) in paths {
            let concrete = path.replace("{name}", "nope").replace("{container}", "c");
            let documented: Vec<String> = operations
                .as_object()
                .unwrap()
                .keys()
                .map(|m| m.to_uppercase())
                .collect();
            for method in METHODS {
                let (status, body) = call(&router, method, &concrete).await;
                if documented.iter().any(|m| m == method) {
                    assert!(
                        !body.contains("no such route") && status != StatusCode::METHOD_NOT_ALLOWED,
                        "{method} {path} is documented but not routed: {status} {body}"
                    );
                } else {
                    assert_eq!(
                        status,
                        StatusCode::METHOD_NOT_ALLOWED,
                        "{method} {path} is routed but not documented"
                    );
                }
            }
        }
        let (status, body) = call(&router, "GET", "/v1/nothing-here").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let error: ApiError = serde_json::from_str(&body).unwrap();
        assert_eq!(error.code, ErrorCode::NotFound);
    }

    #[tokio::test]
    async fn bad_specs_get_field_errors_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let router = router(daemon(dir.path()));
        let request = Request::builder()
            .method("POST")
            .uri("/v1/groups")
            .body(Body::from(
                r#"{"name":"x","containers":[{"name":"a","image":"nope"}]}"#,
            ))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let error: ApiError = serde_json::from_slice(&body).unwrap();
        assert_eq!(error.code, ErrorCode::ImageNotFound);
        assert!(
            error.details[0].starts_with("containers[0].image"),
            "{error:?}"
        );
    }

    /// Long operations answer one JSON document, or JSON lines of progress
    /// ending in the result or the error for clients that accept them.
    #[tokio::test]
    async fn long_operations_stream_progress_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let router = router(daemon(dir.path()));
        let body = r#"{"path": "/nonexistent/image.tar", "name": "x"}"#;
        let request = |accept: &str| {
            Request::builder()
                .method("POST")
                .uri("/v1/images/import")
                .header("content-type", "application/json")
                .header("accept", accept)
                .body(Body::from(body))
                .unwrap()
        };
        let plain = router
            .clone()
            .oneshot(request("application/json"))
            .await
            .unwrap();
        assert_eq!(plain.status(), StatusCode::BAD_REQUEST);
        let bytes = plain.into_body().collect().await.unwrap().to_bytes();
        let error: ApiError = serde_json::from_slice(&bytes).unwrap();
        assert!(error.message.contains("no such file"), "{error:?}");

        let streamed = router
            .clone()
            .oneshot(request(PROGRESS_MEDIA_TYPE))
            .await
            .unwrap();
        assert_eq!(streamed.status(), StatusCode::OK);
        let bytes = streamed.into_body().collect().await.unwrap().to_bytes();
        let lines: Vec<ProgressEvent<ImageView>> = bytes
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).unwrap())
            .collect();
        assert!(
            matches!(lines.as_slice(), [ProgressEvent::Error(e)] if e.message.contains("no such file")),
            "{lines:?}"
        );
    }
}
