//! Group networks: list, create, inspect, remove.

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::{Extension, Json};
use capsa_api::{NetworkRequest, NetworkView};

use super::{blocking, Reply};
use crate::groups::Daemon;
use crate::tenants::owners::Kind;
use crate::tenants::Caller;

pub(super) async fn list_networks(
    State(daemon): State<Arc<Daemon>>,
    Extension(caller): Extension<Caller>,
) -> Reply<Vec<NetworkView>> {
    blocking(move || {
        let networks = daemon.list_networks()?;
        Ok(daemon.visible(&caller, Kind::Network, networks, |n| &n.name))
    })
    .await
    .map(Json)
}

pub(super) async fn create_network(
    State(daemon): State<Arc<Daemon>>,
    Extension(caller): Extension<Caller>,
    Json(request): Json<NetworkRequest>,
) -> Reply<NetworkView> {
    blocking(move || daemon.create_network_as(caller.tenant(), request))
        .await
        .map(Json)
}

pub(super) async fn inspect_network(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
) -> Reply<NetworkView> {
    blocking(move || daemon.inspect_network(&name))
        .await
        .map(Json)
}

pub(super) async fn remove_network(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
) -> Reply<serde_json::Value> {
    blocking(move || {
        daemon.remove_network(&name)?;
        Ok(serde_json::json!({ "removed": name }))
    })
    .await
    .map(Json)
}
