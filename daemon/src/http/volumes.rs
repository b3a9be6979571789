//! Persistent volumes: list, create, grow, remove.

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::{Extension, Json};
use capsa_api::{ApiError, ErrorCode, VolumeRequest, VolumeView};

use super::{blocking, Reply};
use crate::errors::{error, volume_error};
use crate::groups::Daemon;
use crate::tenants::owners::Kind;
use crate::tenants::Caller;

pub(super) fn volume_view(daemon: &Daemon, volume: capsa_volumes::Volume) -> VolumeView {
    VolumeView {
        attached_to: daemon.volume_users(&volume.name),
        name: volume.name,
        size_bytes: volume.size_bytes,
        created_at: volume.created_at,
    }
}

pub(super) async fn list_volumes(
    State(daemon): State<Arc<Daemon>>,
    Extension(caller): Extension<Caller>,
) -> Reply<Vec<VolumeView>> {
    blocking(move || {
        let volumes = daemon.volumes.list().map_err(volume_error)?;
        Ok(daemon
            .visible(&caller, Kind::Volume, volumes, |v| &v.name)
            .into_iter()
            .map(|v| volume_view(&daemon, v))
            .collect())
    })
    .await
    .map(Json)
}

pub(super) async fn create_volume(
    State(daemon): State<Arc<Daemon>>,
    Extension(caller): Extension<Caller>,
    Json(request): Json<VolumeRequest>,
) -> Reply<VolumeView> {
    blocking(move || {
        let volume = daemon.create_volume_as(&caller, &request.name, request.size_mib)?;
        Ok(volume_view(&daemon, volume))
    })
    .await
    .map(Json)
}

/// Refused while a running group has the volume attached.
pub(super) fn not_attached(daemon: &Daemon, name: &str) -> Result<(), ApiError> {
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

pub(super) async fn grow_volume(
    State(daemon): State<Arc<Daemon>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    Json(request): Json<capsa_api::VolumeGrowRequest>,
) -> Reply<VolumeView> {
    blocking(move || {
        not_attached(&daemon, &name)?;
        let volume = daemon.grow_volume_as(&caller, &name, request.size_mib)?;
        Ok(volume_view(&daemon, volume))
    })
    .await
    .map(Json)
}

pub(super) async fn remove_volume(
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
