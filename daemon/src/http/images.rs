//! Images: list, import, pull, remove.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Json;
use capsa_api::{ErrorCode, ImageView, ImportRequest, PullRequest};
use serde::Deserialize;

use super::{blocking, long_operation, Reply};
use crate::errors::{error, internal, store_error};
use crate::groups::Daemon;

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
        prepared(&daemon, summary, report)
    })
    .await
}

/// The imported or pulled image with its layers converted to disk images
/// (reported), so that no start converts them. An image that cannot be
/// converted cannot run: its tag is removed again, with the reason.
fn prepared(
    daemon: &Daemon,
    summary: capsa_image_store::ImageSummary,
    report: &mut dyn FnMut(String),
) -> Result<ImageView, capsa_api::ApiError> {
    let converted = daemon.open_image(&summary.name).and_then(|image| {
        crate::groups::layers::prepare(&daemon.layer_images, &image, &mut |event| report(event))
    });
    if let Err(e) = converted {
        let untagged = daemon.images.remove(&summary.name, |_| None);
        let _ = daemon.images.garbage_collect();
        return Err(error(
            ErrorCode::InvalidRequest,
            format!(
                "image {} cannot be run, so it was {}: {}",
                summary.name,
                if untagged.is_ok() {
                    "not kept"
                } else {
                    "kept, but unusable"
                },
                e.message
            ),
        ));
    }
    Ok(view_of(summary))
}

pub(super) async fn pull_image(
    State(daemon): State<Arc<Daemon>>,
    headers: HeaderMap,
    Json(request): Json<PullRequest>,
) -> Response {
    long_operation(&headers, move |report| {
        let options = capsa_image_store::registry::PullOptions {
            credentials: request.username.clone().zip(request.password.clone()),
            insecure: request.insecure,
            mirrors: daemon.registry_mirrors.clone(),
        };
        match daemon.images.pull(
            &request.reference,
            request.name.as_deref(),
            &options,
            &mut |p| report(p.to_string()),
        ) {
            Ok(summary) => prepared(&daemon, summary, report),
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
