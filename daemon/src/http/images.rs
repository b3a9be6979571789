//! Images: list, import, pull, remove.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::{Extension, Json};
use capsa_api::{ErrorCode, ImageView, ImportRequest, PullRequest};
use serde::Deserialize;

use super::{blocking, long_operation_with_transfers, Reply};
use crate::errors::{error, internal, store_error};
use crate::groups::Daemon;
use crate::tenants::Caller;

pub(super) async fn list_images(State(daemon): State<Arc<Daemon>>) -> Reply<Vec<ImageView>> {
    let images = blocking(move || daemon.images.list().map_err(internal)).await?;
    Ok(Json(images.into_iter().map(view_of).collect()))
}

pub(super) fn view_of(summary: capsa_image_store::ImageSummary) -> ImageView {
    ImageView {
        name: summary.name,
        digest: summary.manifest_digest,
        size: summary.size,
        layers: summary.layers,
    }
}

pub(super) async fn import_image(
    State(daemon): State<Arc<Daemon>>,
    headers: HeaderMap,
    Json(request): Json<ImportRequest>,
) -> Response {
    long_operation_with_transfers(&headers, move |report, transfer| {
        let path = Path::new(&request.path);
        let store_error = |e: capsa_image_store::StoreError| {
            error(
                ErrorCode::InvalidRequest,
                format!("importing {}: {e}", request.path),
            )
        };
        let previous = current(&daemon, request.name.as_deref());
        let mut progress = |p| progress_of(p, report, transfer);
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
        prepared(&daemon, summary, previous, report)
    })
    .await
}

/// The imported or pulled image with its layers converted to disk images
/// (reported), so that no start converts them. An image that cannot be
/// converted cannot run: the name goes back to the image it had before
/// (`previous`), or away, with the reason.
fn prepared(
    daemon: &Daemon,
    summary: capsa_image_store::ImageSummary,
    previous: Option<capsa_image_store::ImageSummary>,
    report: &mut dyn FnMut(String),
) -> Result<ImageView, capsa_api::ApiError> {
    let converted = daemon
        .open_image(&summary.name)
        .and_then(|image| crate::groups::layers::prepare(&daemon.layer_images, &image, report));
    let Err(e) = converted else {
        return Ok(view_of(summary));
    };
    let undone = match &previous {
        Some(previous) => daemon
            .images
            .retag(&summary.name, &previous.manifest_digest)
            .map(|()| format!("{} is still {}", summary.name, previous.manifest_digest)),
        None => daemon
            .images
            .remove(&summary.name, |_| None)
            .map(|()| "it was not kept".to_string()),
    };
    let _ = daemon.images.garbage_collect();
    Err(error(
        ErrorCode::InvalidRequest,
        format!(
            "image {} cannot be run ({}): {}",
            summary.name,
            undone.unwrap_or_else(|e| format!("and undoing the import failed: {e}")),
            e.message
        ),
    ))
}

/// A store's progress as the client gets it: bytes as transfers, the
/// rest as lines.
fn progress_of(
    progress: capsa_image_store::Progress,
    report: &mut dyn FnMut(String),
    transfer: &mut dyn FnMut(capsa_api::Transfer),
) {
    match progress {
        capsa_image_store::Progress::Fetching {
            digest,
            done,
            total,
        } => transfer(capsa_api::Transfer {
            id: digest,
            done,
            total,
        }),
        other => report(other.to_string()),
    }
}

/// What `name` is now, if anything: what a failed import puts back.
fn current(daemon: &Daemon, name: Option<&str>) -> Option<capsa_image_store::ImageSummary> {
    daemon.images.summary(name?).ok()
}

pub(super) async fn pull_image(
    State(daemon): State<Arc<Daemon>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Json(request): Json<PullRequest>,
) -> Response {
    // The store is the host's: a name of a tenant's choosing could stand
    // for another tenant's image (busybox) from then on.
    if caller.tenant().is_some() && request.name.is_some() {
        return super::Failure(crate::tenants::access::forbidden(
            "naming a pulled image other than by its reference",
        ))
        .into_response();
    }
    long_operation_with_transfers(&headers, move |report, transfer| {
        let options = capsa_image_store::registry::PullOptions {
            credentials: request.username.clone().zip(request.password.clone()),
            insecure: request.insecure,
            mirrors: daemon.settings.registry_mirrors.clone(),
        };
        let previous = current(
            &daemon,
            Some(request.name.as_deref().unwrap_or(&request.reference)),
        );
        match daemon.images.pull(
            &request.reference,
            request.name.as_deref(),
            &options,
            &mut |p| progress_of(p, report, transfer),
        ) {
            Ok(summary) => prepared(&daemon, summary, previous, report),
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

#[derive(Deserialize)]
pub(super) struct NameQuery {
    name: String,
}

pub(super) async fn remove_image(
    State(daemon): State<Arc<Daemon>>,
    Query(query): Query<NameQuery>,
) -> Reply<serde_json::Value> {
    blocking(move || {
        daemon
            .images
            .remove(&query.name, |name| daemon.image_user(name))
            .map_err(store_error)?;
        let (blobs, bytes) = daemon.images.garbage_collect().map_err(internal)?;
        let in_use = daemon.images.chains_in_use().map_err(store_error)?;
        let layer_images = daemon.layer_images.retain(&in_use).map_err(store_error)?;
        Ok(serde_json::json!({
            "removed": query.name,
            "blobs_freed": blobs,
            "bytes_freed": bytes,
            "layer_images_freed": layer_images,
        }))
    })
    .await
    .map(Json)
}

/// Pushes an image of the store to a registry (the admin's: the store is
/// the host's).
pub(super) async fn push_image(
    State(daemon): State<Arc<Daemon>>,
    headers: HeaderMap,
    Json(request): Json<capsa_api::PushRequest>,
) -> Response {
    long_operation_with_transfers(&headers, move |report, _| {
        let options = capsa_image_store::registry::PullOptions {
            credentials: request.username.clone().zip(request.password.clone()),
            insecure: request.insecure,
            mirrors: Vec::new(),
        };
        let target = request
            .target
            .clone()
            .unwrap_or_else(|| request.name.clone());
        let digest = daemon
            .images
            .push(&request.name, &target, &options, &mut |p| {
                report(p.to_string())
            })
            .map_err(|e| match e {
                capsa_image_store::StoreError::NotFound(what) => {
                    error(ErrorCode::ImageNotFound, format!("no image {what}"))
                }
                other => error(
                    ErrorCode::InvalidRequest,
                    format!("pushing {} to {target}: {other}", request.name),
                ),
            })?;
        Ok(capsa_api::PushView { target, digest })
    })
    .await
}

/// Checks a registry's credentials, as `docker login` does; keeps none.
pub(super) async fn login(
    Json(request): Json<capsa_api::LoginRequest>,
) -> Reply<capsa_api::LoginView> {
    blocking(move || {
        let options = capsa_image_store::registry::PullOptions {
            credentials: Some((request.username.clone(), request.password.clone())),
            insecure: request.insecure,
            mirrors: Vec::new(),
        };
        capsa_image_store::ImageStore::check_login(&request.registry, &options)
            .map_err(login_refused)?;
        Ok(capsa_api::LoginView {
            registry: request.registry,
            username: request.username,
        })
    })
    .await
    .map(Json)
}

/// A registry that refuses the credentials is the caller's problem (401
/// would say capsad refused them): a 400 that says so.
fn login_refused(e: capsa_image_store::StoreError) -> capsa_api::ApiError {
    error(ErrorCode::InvalidRequest, format!("login: {e}"))
}

#[cfg(test)]
pub(in crate::http) mod tests {
    use std::path::Path;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use capsa_api::ApiError;
    use capsa_layers::Digest;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::super::{router, tests::daemon};

    fn blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
        let digest = Digest::of(bytes);
        std::fs::write(layout.join("blobs/sha256").join(digest.hex()), bytes).unwrap();
        (digest.to_string(), bytes.len())
    }

    /// A one-layer OCI layout (uncompressed layer) of regular files; the
    /// paths go into the headers unchecked.
    pub(in crate::http) fn layout(layout: &Path, files: &[(&str, &[u8])]) {
        std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        std::fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        for (path, content) in files {
            let mut header = tar::Header::new_gnu();
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_700_000_000);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_cksum();
            builder.append(&header, *content).unwrap();
        }
        let tar = builder.into_inner().unwrap();
        let (layer, layer_size) = blob(layout, &tar);
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer]},
        });
        let (config, config_size) = blob(layout, config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size}],
        });
        let (manifest, manifest_size) = blob(layout, manifest.to_string().as_bytes());
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest, "size": manifest_size}]});
        std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    }

    async fn import(router: &axum::Router, path: &Path, name: &str) -> (StatusCode, String) {
        let body = serde_json::json!({"path": path, "name": name}).to_string();
        let request = Request::builder()
            .method("POST")
            .uri("/v1/images/import")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn an_image_whose_layer_cannot_be_converted_is_refused_and_its_name_keeps_its_image() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = daemon(dir.path());
        let router = router(daemon.clone());
        let (good, evil) = (dir.path().join("good"), dir.path().join("evil"));
        layout(&good, &[("etc/motd", b"hello")]);
        layout(&evil, &[("../escape", b"x")]);

        let (status, body) = import(&router, &good, "app").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let before = daemon.images.summary("app").unwrap();
        let converted = std::fs::read_dir(dir.path().join("layer-images"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "erofs"))
            .count();
        assert_eq!(converted, 1, "converted at import");

        // Over an existing name: refused, and the name keeps its image.
        let (status, body) = import(&router, &evil, "app").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let e: ApiError = serde_json::from_str(&body).unwrap();
        assert!(
            e.message.contains("cannot be run")
                && e.message.contains("is still")
                && e.message.contains("escape")
                && !e.message.contains('{'),
            "{}",
            e.message
        );
        assert_eq!(daemon.images.summary("app").unwrap(), before);

        // A new name: refused, and not kept.
        let (status, body) = import(&router, &evil, "other").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let e: ApiError = serde_json::from_str(&body).unwrap();
        assert!(e.message.contains("not kept"), "{}", e.message);
        assert!(daemon.images.summary("other").is_err());
    }
}
