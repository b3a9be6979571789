//! The wire API between the Capsa host side (daemon, shim, tests) and the
//! guest agent: ttrpc services generated from `protos/` at build time, and
//! the API version both sides check on connect.

#[allow(clippy::all, unused, nonstandard_style, missing_docs)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(clippy::all, unused, nonstandard_style, missing_docs)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub mod stdio;
pub mod vmm_socket;

/// The API version this build speaks. Bump it with any change that an
/// older peer would misread.
pub const API_VERSION: u32 = 5;

/// The vsock port the agent serves its ttrpc API on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The vsock port for process stdio streams (see protos/agent.proto).
pub const STDIO_VSOCK_PORT: u32 = 1025;

/// Where the agent mounts the group's volumes; container specs bind-mount
/// them from `VOLUMES_DIR/<name>`.
pub const VOLUMES_DIR: &str = "/run/capsa/volumes";

/// Where the agent keeps the host directories the host shares by copy
/// (SyncDirectory); container specs bind-mount them from
/// `SHARED_DIRS_DIR/<name>`.
pub const SHARED_DIRS_DIR: &str = "/run/capsa/shared";

/// The most a shared directory's tar may hold: it lives in the guest's
/// memory.
pub const MAX_SHARED_DIR_BYTES: u64 = 64 << 20;

/// A container spec annotation: the paths (comma-separated) whose files
/// its image brings itself, which the sandbox's own files (/etc/hosts,
/// /etc/hostname, /etc/resolv.conf) must not cover. The containerd shim
/// sets it for host files it copies into a container's root filesystem.
pub const OWN_FILES_ANNOTATION: &str = "io.capsa.own-files";

/// A container spec annotation: the signal (its number) the agent stops
/// the container's process with, before SIGKILL after the grace; SIGTERM
/// without it.
pub const STOP_SIGNAL_ANNOTATION: &str = "io.capsa.stop-signal";

/// Layer blobs travel in WriteLayer chunks of at most this size, well under
/// ttrpc's 4 MiB message limit.
pub const LAYER_CHUNK_BYTES: usize = 1 << 20;
/// The most one CopyIn chunk or ReadCopy answer carries.
pub const COPY_CHUNK_BYTES: usize = 1 << 20;
/// The largest archive one copy moves, either way.
pub const MAX_COPY_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("the agent speaks API version {agent} (build {build}), this host speaks {host}: upgrade the older side")]
    Mismatch {
        agent: u32,
        host: u32,
        build: String,
    },
    #[error("cannot ask the agent for its version: {0}")]
    Call(#[from] ttrpc::Error),
}

/// A client for the agent of the VM whose vsock Unix socket is `path`,
/// retrying while the guest boots, with the API version checked.
pub fn connect_agent(
    path: &std::path::Path,
    patience: std::time::Duration,
) -> Result<(agent_ttrpc::AgentClient, agent::VersionResponse), AgentConnectError> {
    use std::os::fd::IntoRawFd;
    let stream = vmm_socket::connect_patiently(path, AGENT_VSOCK_PORT, patience)?;
    let client = agent_ttrpc::AgentClient::new(ttrpc::Client::new(stream.into_raw_fd())?);
    let version = check_version(&client, patience.as_nanos().min(i64::MAX as u128) as i64)?;
    Ok((client, version))
}

#[derive(Debug, thiserror::Error)]
pub enum AgentConnectError {
    #[error(transparent)]
    Connect(#[from] vmm_socket::ConnectError),
    #[error("cannot set up the ttrpc client: {0}")]
    Client(#[from] ttrpc::Error),
    #[error(transparent)]
    Version(#[from] VersionError),
}

/// Asks the agent for its API version and refuses a mismatch.
pub fn check_version(
    client: &agent_ttrpc::AgentClient,
    timeout_nanos: i64,
) -> Result<agent::VersionResponse, VersionError> {
    let request = agent::VersionRequest {
        host_api_version: API_VERSION,
        ..Default::default()
    };
    let response = client.version(ttrpc::context::with_timeout(timeout_nanos), &request)?;
    if response.api_version != API_VERSION {
        return Err(VersionError::Mismatch {
            agent: response.api_version,
            host: API_VERSION,
            build: response.agent_version.clone(),
        });
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// An agent that claims `api_version`.
    struct FakeAgent {
        api_version: u32,
    }

    impl agent_ttrpc::Agent for FakeAgent {
        fn version(
            &self,
            _ctx: &ttrpc::TtrpcContext,
            request: agent::VersionRequest,
        ) -> ttrpc::Result<agent::VersionResponse> {
            assert_eq!(request.host_api_version, API_VERSION);
            Ok(agent::VersionResponse {
                api_version: self.api_version,
                agent_version: "test".into(),
                ..Default::default()
            })
        }
    }

    fn serve(api_version: u32) -> (tempfile::TempDir, ttrpc::Server, agent_ttrpc::AgentClient) {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix://{}", dir.path().join("agent.sock").display());
        let service = agent_ttrpc::create_agent(Arc::new(FakeAgent { api_version }));
        let mut server = ttrpc::Server::new()
            .bind(&address)
            .unwrap()
            .register_service(service);
        server.start().unwrap();
        let client = agent_ttrpc::AgentClient::new(ttrpc::Client::connect(&address).unwrap());
        (dir, server, client)
    }

    const SECOND: i64 = 1_000_000_000;

    #[test]
    fn matching_versions_connect() {
        let (_dir, server, client) = serve(API_VERSION);
        let response = check_version(&client, SECOND).unwrap();
        assert_eq!(response.agent_version, "test");
        server.shutdown();
    }

    #[test]
    fn a_version_mismatch_is_a_clear_error() {
        let (_dir, server, client) = serve(API_VERSION + 1);
        let err = check_version(&client, SECOND).unwrap_err();
        assert!(matches!(err, VersionError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("upgrade the older side"), "{err}");
        server.shutdown();
    }

    #[test]
    fn unimplemented_calls_are_errors_not_hangs() {
        let (_dir, server, client) = serve(API_VERSION);
        let err = client
            .ping(
                ttrpc::context::with_timeout(SECOND),
                &agent::PingRequest::new(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");
        server.shutdown();
    }
}
