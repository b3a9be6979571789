//! The HTTP/JSON API on the daemon's Unix socket (docs/api.json describes
//! it), one file per resource. Handlers run the daemon's blocking calls on
//! the blocking pool.

mod access;
mod attach;
mod containers;
mod groups;
mod images;
#[cfg(test)]
mod live_document;
mod networks;
mod system;
#[cfg(test)]
mod tenancy_tests;
pub mod tls;
mod volumes;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use capsa_api::{ApiError, ErrorCode, ProgressEvent, Transfer, VersionView, PROGRESS_MEDIA_TYPE};
use serde::Serialize;

use crate::errors::error;
use crate::groups::Daemon;
use crate::tenants::{Caller, Tenants};

pub struct Failure(pub ApiError);

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

pub(crate) type Reply<T> = Result<Json<T>, Failure>;

/// Runs blocking daemon work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Failure(error(ErrorCode::Internal, format!("worker failed: {e}"))))?
        .map_err(Failure)
}

/// The API as the host's admin has it (the Unix socket).
pub fn router(daemon: Arc<Daemon>) -> Router {
    routes(daemon).layer(axum::Extension(Caller::Admin))
}

/// The API as tenants have it (the TLS listener): each request carries a
/// tenant's bearer token.
pub fn tenant_router(daemon: Arc<Daemon>, tenants: Arc<Tenants>) -> Router {
    routes(daemon).layer(axum::middleware::from_fn_with_state(
        tenants,
        access::authenticate,
    ))
}

fn routes(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route(
            "/v1/images",
            get(images::list_images).delete(images::remove_image),
        )
        .route("/v1/images/import", post(images::import_image))
        .route("/v1/images/pull", post(images::pull_image))
        .route("/v1/registries/login", post(images::login))
        .route("/v1/images/tag", post(system::tag_image))
        .route("/v1/images/push", post(images::push_image))
        .route("/v1/images/prune", post(system::prune_images))
        .route("/v1/system/info", get(system::info))
        .route("/v1/system/df", get(system::disk_usage))
        .route("/v1/system/prune", post(system::prune))
        .route(
            "/v1/groups",
            get(groups::list_groups).post(groups::create_group),
        )
        .route(
            "/v1/groups/{name}",
            get(groups::inspect_group).delete(groups::delete_group),
        )
        .route("/v1/groups/{name}/start", post(groups::start_group))
        .route("/v1/groups/{name}/stats", get(groups::group_stats))
        .route("/v1/events", get(groups::events))
        .route("/metrics", get(metrics))
        .route(
            "/v1/volumes",
            get(volumes::list_volumes).post(volumes::create_volume),
        )
        .route(
            "/v1/volumes/{name}",
            axum::routing::delete(volumes::remove_volume),
        )
        .route("/v1/volumes/{name}/grow", post(volumes::grow_volume))
        .route(
            "/v1/networks",
            get(networks::list_networks).post(networks::create_network),
        )
        .route(
            "/v1/networks/{name}",
            get(networks::inspect_network).delete(networks::remove_network),
        )
        .route("/v1/groups/{name}/stop", post(groups::stop_group))
        .route(
            "/v1/groups/{name}/containers/{container}/wait",
            post(containers::wait_container),
        )
        .route(
            "/v1/groups/{name}/containers/{container}/attach",
            post(attach::attach),
        )
        .route(
            "/v1/groups/{name}/containers/{container}/archive",
            get(containers::get_archive).put(containers::put_archive),
        )
        .route(
            "/v1/groups/{name}/containers/{container}/top",
            get(containers::top_container),
        )
        .route(
            "/v1/groups/{name}/containers/{container}/kill",
            post(containers::kill_container),
        )
        .route(
            "/v1/groups/{name}/containers/{container}/logs",
            get(containers::container_logs),
        )
        .route(
            "/v1/groups/{name}/containers/{container}/exec",
            post(containers::exec),
        )
        .fallback(|| async {
            Failure(error(
                ErrorCode::NotFound,
                "no such route (see docs/api.json)",
            ))
        })
        .layer(axum::middleware::from_fn_with_state(
            daemon.clone(),
            access::gate,
        ))
        .with_state(daemon)
}

async fn version(axum::Extension(caller): axum::Extension<Caller>) -> Json<VersionView> {
    Json(VersionView {
        version: env!("CARGO_PKG_VERSION").to_string(),
        api: capsa_api::API_PREFIX.trim_start_matches('/').to_string(),
        tenant: caller.tenant().map(str::to_string),
    })
}

/// Runs a long operation off the async threads. A client that accepts
/// PROGRESS_MEDIA_TYPE gets JSON lines of ProgressEvent: the progress as it
/// goes, then the result or the error; any other client gets the result
/// as one JSON answer.
pub(crate) async fn long_operation<T: Serialize + Send + 'static>(
    headers: &HeaderMap,
    work: impl FnOnce(&mut dyn FnMut(String)) -> Result<T, ApiError> + Send + 'static,
) -> Response {
    long_operation_with_transfers(headers, move |report, _| work(report)).await
}

/// As `long_operation`, with the bytes of each blob moved as they go
/// (`ProgressEvent::Transfer`), for progress bars.
pub(crate) async fn long_operation_with_transfers<T: Serialize + Send + 'static>(
    headers: &HeaderMap,
    work: impl FnOnce(&mut dyn FnMut(String), &mut dyn FnMut(Transfer)) -> Result<T, ApiError>
        + Send
        + 'static,
) -> Response {
    let wants_progress = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains(PROGRESS_MEDIA_TYPE));
    if !wants_progress {
        return match blocking(move || work(&mut |_| {}, &mut |_| {})).await {
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
        let mut transfer = |moved: Transfer| {
            let _ = events.blocking_send(ProgressEvent::Transfer(moved));
        };
        let last = match work(&mut report, &mut transfer) {
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use capsa_api::ImageView;
    use http_body_util::BodyExt;
    use std::path::Path;
    use tower::ServiceExt;

    const METHODS: &[&str] = &["GET", "POST", "DELETE", "PUT", "PATCH"];

    pub(in crate::http) fn daemon(dir: &Path) -> Arc<Daemon> {
        let images = capsa_image_store::ImageStore::open(&dir.join("images")).unwrap();
        let layer_images =
            capsa_image_store::layer_images::LayerImages::open(&dir.join("layer-images")).unwrap();
        Daemon::new(
            dir.to_path_buf(),
            images,
            layer_images,
            capsa_vm_process::VmConfig {
                vmm: "/nonexistent/capsa-vmm".into(),
                kernel: "/nonexistent/vmlinux".into(),
                initrd: "/nonexistent/initrd".into(),
                seccomp: capsa_vmm_config::Seccomp::Kill,
            },
            None,
            capsa_volumes::VolumeStore::open(&dir.join("volumes")).unwrap(),
            Default::default(),
        )
        .unwrap()
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
            serde_json::from_str(include_str!("../../../docs/api.json")).unwrap();
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
    pub(crate) async fn long_operations_stream_progress_when_asked() {
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
