//! Group networks: list, create, inspect, remove.

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::Json;
use capsa_api::{NetworkRequest, NetworkView};

use super::{blocking, Reply};
use crate::groups::Daemon;

pub(super) async fn list_networks(State(daemon): State<Arc<Daemon>>) -> Reply<Vec<NetworkView>> {
    blocking(move || daemon.list_networks()).await.map(Json)
}

pub(super) async fn create_network(
    State(daemon): State<Arc<Daemon>>,
    Json(request): Json<NetworkRequest>,
) -> Reply<NetworkView> {
    blocking(move || daemon.create_network(request))
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
