//! Who a request comes from, and the gate every request passes: the Unix
//! socket's requests are the host admin's; the TLS listener's carry a
//! tenant's bearer token. A tenant reaches only the groups, volumes and
//! networks it made (anything else answers as missing) and none of the
//! host-wide operations.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use capsa_api::{ApiError, ErrorCode};

use super::Failure;
use crate::errors::error;
use crate::groups::Daemon;
use crate::tenants::access::forbidden;
use crate::tenants::owners::Kind;
use crate::tenants::{Caller, Tenants};

/// The TLS listener's first step: the bearer token names the tenant, or
/// the request ends here with 401.
pub(super) async fn authenticate(
    State(tenants): State<Arc<Tenants>>,
    mut request: Request,
    next: Next,
) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(tenant) = token.and_then(|token| tenants.authenticate(token.trim())) else {
        let message = if token.is_some() {
            "this token names no tenant of capsad"
        } else {
            "capsad's TLS listener wants a tenant's bearer token (capsa --token, or CAPSA_TOKEN)"
        };
        let mut response = Failure(error(ErrorCode::Unauthorized, message)).into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"capsad\""),
        );
        return response;
    };
    request.extensions_mut().insert(Caller::Tenant(tenant));
    next.run(request).await
}

/// Refuses what the caller may not reach, before any handler runs.
pub(super) async fn gate(
    State(daemon): State<Arc<Daemon>>,
    request: Request,
    next: Next,
) -> Response {
    let caller = request
        .extensions()
        .get::<Caller>()
        .cloned()
        // A router built without a caller layer serves no one.
        .unwrap_or_else(|| Caller::Tenant(Arc::new(crate::tenants::Tenant::nobody())));
    if let Err(e) = check(&daemon, &caller, request.method(), request.uri().path()) {
        return Failure(e).into_response();
    }
    next.run(request).await
}

fn check(daemon: &Daemon, caller: &Caller, method: &Method, path: &str) -> Result<(), ApiError> {
    if matches!(caller, Caller::Admin) {
        return Ok(());
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "groups", name, ..] => daemon.reach(caller, Kind::Group, name),
        ["v1", "volumes", name, ..] => daemon.reach(caller, Kind::Volume, name),
        ["v1", "networks", name, ..] => daemon.reach(caller, Kind::Network, name),
        ["v1", "images", "import"] => Err(forbidden("importing an image from a host path")),
        ["v1", "images"] if method == Method::DELETE => {
            Err(forbidden("removing an image from the host's store"))
        }
        ["v1", "images", "tag"] => Err(forbidden("naming an image of the host's store")),
        ["v1", "images", "prune"] => Err(forbidden("pruning the host's images")),
        ["v1", "images", "push"] => Err(forbidden("pushing an image of the host's store")),
        ["v1", "system", "df" | "prune"] => Err(forbidden("the host's disk")),
        ["metrics"] => Err(forbidden("the metrics of every group")),
        _ => Ok(()),
    }
}
