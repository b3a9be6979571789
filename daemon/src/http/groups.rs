//! Groups: create, list, inspect, start, stop, delete, stats, and the event stream.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use capsa_api::{ApiError, ErrorCode, GroupSpec};
use serde::Deserialize;

use super::{blocking, long_operation, Reply};
use crate::groups::{Daemon, DEFAULT_STOP_GRACE};
use crate::tenants::owners::Kind;
use crate::tenants::Caller;

pub(super) async fn list_groups(
    State(daemon): State<Arc<Daemon>>,
    Extension(caller): Extension<Caller>,
) -> Reply<Vec<capsa_api::GroupView>> {
    Ok(Json(
        blocking(move || Ok(daemon.visible(&caller, Kind::Group, daemon.list(), |g| &g.name)))
            .await?,
    ))
}

pub(super) async fn create_group(
    State(daemon): State<Arc<Daemon>>,
    Extension(caller): Extension<Caller>,
    body: String,
) -> Reply<capsa_api::GroupView> {
    let spec: GroupSpec = serde_json::from_str(&body).map_err(|e| ApiError {
        code: ErrorCode::InvalidSpec,
        message: "invalid container group spec".into(),
        details: vec![e.to_string()],
    })?;
    Ok(Json(
        blocking(move || daemon.create_as(&caller, spec)).await?,
    ))
}

pub(super) async fn inspect_group(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
) -> Reply<capsa_api::GroupView> {
    Ok(Json(blocking(move || daemon.inspect(&name)).await?))
}

pub(super) async fn start_group(
    State(daemon): State<Arc<Daemon>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    long_operation(&headers, move |report| daemon.start(&name, report)).await
}

#[derive(Deserialize)]
pub(super) struct StopQuery {
    /// Seconds between SIGTERM and SIGKILL.
    timeout: Option<u64>,
}

pub(super) async fn stop_group(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<StopQuery>,
) -> Reply<capsa_api::GroupView> {
    let grace = query
        .timeout
        .map_or(DEFAULT_STOP_GRACE, Duration::from_secs);
    Ok(Json(blocking(move || daemon.stop(&name, grace)).await?))
}

pub(super) async fn delete_group(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
) -> Reply<serde_json::Value> {
    let deleted = name.clone();
    blocking(move || daemon.delete(&name)).await?;
    Ok(Json(serde_json::json!({"deleted": deleted})))
}

pub(super) async fn group_stats(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(name): UrlPath<String>,
) -> Reply<capsa_api::GroupStats> {
    Ok(Json(blocking(move || daemon.stats(&name)).await?))
}

/// JSON lines of events as they happen, until the client goes away.
pub(super) async fn events(
    State(daemon): State<Arc<Daemon>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let receiver = daemon.subscribe();
    let state = (receiver, daemon, caller);
    let stream = futures::stream::unfold(state, |(mut receiver, daemon, caller)| async move {
        loop {
            match receiver.recv().await {
                Ok(event) if !daemon.sees(&caller, Kind::Group, &event.group) => continue,
                Ok(event) => {
                    let mut line = serde_json::to_string(&event).unwrap_or_default();
                    line.push('\n');
                    return Some((Ok::<_, std::io::Error>(line), (receiver, daemon, caller)));
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
