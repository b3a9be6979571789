//! `capsa cp`: archives into and out of a running container, relayed
//! between the client and the guest's agent without being read here
//! (what the guest packs is unpacked by the client, as its user).

use std::io::Read;

use capsa_api::{ApiError, ErrorCode};
use capsa_guest_client::GuestError;

use super::Daemon;
use crate::errors::{error, guest_failed};

/// A copy the agent refused says why in the answer; one it never
/// answered is the guest's trouble, with its console.
fn copy_failed(console: &std::path::Path, e: GuestError) -> ApiError {
    let code = match e.code() {
        Some(ttrpc::Code::INVALID_ARGUMENT) => ErrorCode::InvalidRequest,
        Some(ttrpc::Code::NOT_FOUND) => ErrorCode::NotFound,
        Some(ttrpc::Code::FAILED_PRECONDITION) => ErrorCode::Conflict,
        _ => return guest_failed(console, "copying", e),
    };
    let message = match &e {
        GuestError::Call {
            source: ttrpc::Error::RpcStatus(status),
            ..
        } => status.message.clone(),
        other => other.to_string(),
    };
    error(code, message)
}

impl Daemon {
    /// Unpacks `archive` (capsa-copy's) at `path` in `container` of `name`,
    /// which must be running; the bytes sent.
    pub fn copy_in(
        &self,
        name: &str,
        container: &str,
        path: &str,
        archive: impl Read,
    ) -> Result<u64, ApiError> {
        let group = self.group(name)?;
        let guest = self.running_guest(&group, name, container)?;
        let copy_id = self
            .next_exec
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        guest
            .copy_in(container, copy_id, path, archive)
            .map_err(|e| match e {
                GuestError::Copy { message } => error(ErrorCode::InvalidRequest, message),
                other => copy_failed(&group.paths.console(), other),
            })
    }

    /// Packs `path` of `container` of `name`, which must be running, and
    /// hands the archive to `sink` chunk by chunk; at most `limit` bytes.
    pub fn copy_out(
        &self,
        name: &str,
        container: &str,
        path: &str,
        limit: u64,
        sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, ApiError> {
        let group = self.group(name)?;
        let guest = self.running_guest(&group, name, container)?;
        guest
            .copy_out(container, path, limit, sink)
            .map_err(|e| match e {
                GuestError::Copy { message } => error(ErrorCode::InvalidRequest, message),
                other => copy_failed(&group.paths.console(), other),
            })
    }
}
