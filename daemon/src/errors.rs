//! Every error the daemon answers with, mapped to its API code here and
//! nowhere else.

use std::path::Path;

use capsa_api::{ApiError, ErrorCode};
use capsa_guest_client::GuestError;

use crate::groups::lifecycle::Refused;

pub fn error(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        message: message.into(),
        details: Vec::new(),
    }
}

pub fn internal(e: impl std::fmt::Display) -> ApiError {
    error(ErrorCode::Internal, e.to_string())
}

pub fn invalid(e: impl std::fmt::Display) -> ApiError {
    error(ErrorCode::InvalidRequest, e.to_string())
}

pub fn conflict(e: impl std::fmt::Display) -> ApiError {
    error(ErrorCode::Conflict, e.to_string())
}

pub fn no_group(name: &str) -> ApiError {
    error(ErrorCode::NotFound, format!("no group {name:?}"))
}

pub fn no_container(group: &str, container: &str) -> ApiError {
    error(
        ErrorCode::NotFound,
        format!("no container {container:?} in {group:?}"),
    )
}

/// A transition the group's state does not allow.
pub fn refused(e: Refused) -> ApiError {
    match e {
        Refused::NoContainer { group, container } => no_container(&group, &container),
        other => conflict(other),
    }
}

/// A failed guest call while a group starts; when the guest gave no answer
/// at all, its console's last lines are the best clue to why.
pub fn guest_failed(console: &Path, what: &str, e: GuestError) -> ApiError {
    let mut message = format!("{what}: {e}");
    if e.is_unanswered() {
        message.push_str("; console:\n");
        message.push_str(&capsa_vm_process::console_tail(console));
    }
    internal(message)
}

pub fn volume_error(e: capsa_volumes::VolumeError) -> ApiError {
    use capsa_volumes::VolumeError;
    let code = match &e {
        VolumeError::NotFound(_) => ErrorCode::NotFound,
        VolumeError::Exists(_) => ErrorCode::AlreadyExists,
        VolumeError::InvalidName(_) | VolumeError::BadSize { .. } => ErrorCode::InvalidRequest,
        VolumeError::Io { .. } | VolumeError::Tool { .. } => ErrorCode::Internal,
    };
    error(code, e.to_string())
}

/// A network error: what is missing is not found, what clashes a
/// conflict, a bad name or subnet the request's fault, the host's own
/// failures (netlink, nftables, files) internal.
pub fn network_error(e: capsa_network::NetworkError) -> ApiError {
    use capsa_network::NetworkError as N;
    let code = match &e {
        N::NotFound(_) => ErrorCode::NotFound,
        N::Exists(_) => ErrorCode::AlreadyExists,
        N::InvalidName(_) | N::SubnetTooSmall(_) | N::DefaultIsFixed => ErrorCode::InvalidRequest,
        N::SubnetOverlaps { .. }
        | N::NoSubnetLeft
        | N::Exhausted(_)
        | N::PortUnavailable { .. } => ErrorCode::Conflict,
        _ => ErrorCode::Internal,
    };
    error(code, e.to_string())
}

/// An image store error of a pull or a removal: what is missing is not
/// found, what is in use a conflict, the rest the request's fault.
pub fn store_error(e: capsa_image_store::StoreError) -> ApiError {
    use capsa_image_store::StoreError;
    match e {
        StoreError::NotFound(_) => error(ErrorCode::ImageNotFound, e.to_string()),
        StoreError::InUse(..) => conflict(e),
        other => invalid(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_conflicts_but_a_missing_container_is_not_found() {
        let e = refused(Refused::AlreadyRunning { group: "g".into() });
        assert_eq!(e.code, ErrorCode::Conflict);
        assert_eq!(e.message, "group \"g\" is already running");
        let e = refused(Refused::NoContainer {
            group: "g".into(),
            container: "c".into(),
        });
        assert_eq!(e.code, ErrorCode::NotFound);
    }

    #[test]
    fn volume_errors_keep_their_meaning() {
        let e = volume_error(capsa_volumes::VolumeError::NotFound("v".into()));
        assert_eq!(e.code, ErrorCode::NotFound);
    }
}
