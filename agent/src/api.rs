//! The agent's ttrpc API on vsock (capsa_protocol::agent_ttrpc::Agent):
//! each call checks its request and hands it to the part that does the
//! work.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use capsa_protocol::agent::*;
use capsa_protocol::{agent_ttrpc, AGENT_VSOCK_PORT, API_VERSION};
use capsa_runtime::{ExitStatus, StdioRequest};
use ttrpc::TtrpcContext;

use crate::containers::Containers;
use crate::copy::Copies;
use crate::errors::ApiError;
use crate::images::Images;
use crate::sandbox::Sandbox;
use crate::shared::SharedDirs;
use crate::{init, kmsg, ready};

/// How long containers get between SIGTERM and SIGKILL at shutdown when
/// the request does not say.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub struct AgentService {
    pub images: Arc<Images>,
    pub containers: Arc<Containers>,
    pub sandbox: Arc<Sandbox>,
    pub shared: SharedDirs,
    pub copies: Copies,
}

type Reply<T> = ttrpc::Result<T>;

fn stdio_request(stdio: &protobuf::MessageField<Stdio>) -> StdioRequest {
    stdio
        .as_ref()
        .map_or(StdioRequest::default(), |s| StdioRequest {
            stdin: s.stdin,
            stdout: s.stdout,
            stderr: s.stderr,
        })
}

impl agent_ttrpc::Agent for AgentService {
    fn version(&self, _ctx: &TtrpcContext, _request: VersionRequest) -> Reply<VersionResponse> {
        // The host judges compatibility from our answer (check_version).
        Ok(VersionResponse {
            api_version: API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn ping(&self, _ctx: &TtrpcContext, _request: PingRequest) -> Reply<PingResponse> {
        let uptime_ms =
            ready::current_uptime_ms().map_err(|e| ApiError::internal(format!("{e:#}")))?;
        Ok(PingResponse {
            uptime_ms,
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, request: ShutdownRequest) -> Reply<ShutdownResponse> {
        let grace = match request.grace_ms {
            0 => DEFAULT_SHUTDOWN_GRACE,
            ms => Duration::from_millis(ms.into()),
        };
        let containers = self.containers.clone();
        // Reply first: power-off ends the VM, and with it the connection.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            containers.stop_all(grace);
            crate::sandbox::unmount_volumes();
            init::drain_console();
            if let Err(e) = init::power_off() {
                kmsg::error(&format!("shutdown: {e:#}"));
            }
        });
        Ok(ShutdownResponse::default())
    }

    fn setup_sandbox(&self, _ctx: &TtrpcContext, request: SetupSandboxRequest) -> Reply<Empty> {
        self.sandbox.setup(&request)?;
        Ok(Empty::default())
    }

    fn set_time(&self, _ctx: &TtrpcContext, request: SetTimeRequest) -> Reply<Empty> {
        crate::sandbox::set_time(request.time_unix_ns)?;
        Ok(Empty::default())
    }

    fn reseed(&self, _ctx: &TtrpcContext, request: ReseedRequest) -> Reply<Empty> {
        crate::sandbox::reseed(&request.entropy)?;
        Ok(Empty::default())
    }

    fn start_layer(
        &self,
        _ctx: &TtrpcContext,
        request: StartLayerRequest,
    ) -> Reply<StartLayerResponse> {
        let started = self.images.start(
            &request.digest,
            &request.diff_id,
            &request.media_type,
            request.size,
            &request.parent_chain_id,
        )?;
        Ok(StartLayerResponse {
            chain_id: started.chain_id.to_string(),
            already_present: started.already_present,
            upload_id: started.upload_id,
            ..Default::default()
        })
    }

    fn write_layer(&self, _ctx: &TtrpcContext, request: WriteLayerRequest) -> Reply<Empty> {
        self.images
            .write(request.upload_id, request.offset, request.data)?;
        Ok(Empty::default())
    }

    fn commit_layer(
        &self,
        _ctx: &TtrpcContext,
        request: CommitLayerRequest,
    ) -> Reply<CommitLayerResponse> {
        let imported = self.images.commit(request.upload_id)?;
        Ok(CommitLayerResponse {
            chain_id: imported.chain_id.to_string(),
            entries: imported.summary.entries,
            file_bytes: imported.summary.file_bytes,
            blob_bytes: imported.blob_bytes,
            ..Default::default()
        })
    }

    fn abort_layer(&self, _ctx: &TtrpcContext, request: AbortLayerRequest) -> Reply<Empty> {
        self.images.abort(request.upload_id)?;
        Ok(Empty::default())
    }

    fn create_container(
        &self,
        _ctx: &TtrpcContext,
        request: CreateContainerRequest,
    ) -> Reply<Empty> {
        self.containers.create(
            &request.container_id,
            &request.image_chain_id,
            &request.layer_disks,
            &request.oci_spec_json,
            stdio_request(&request.stdio),
            &self.sandbox.container_mounts(),
        )?;
        Ok(Empty::default())
    }

    fn start_container(&self, _ctx: &TtrpcContext, request: ContainerRequest) -> Reply<Empty> {
        self.containers.start(&request.container_id)?;
        Ok(Empty::default())
    }

    fn exec_process(&self, _ctx: &TtrpcContext, request: ExecProcessRequest) -> Reply<Empty> {
        self.containers.exec(
            &request.container_id,
            &request.exec_id,
            &request.oci_process_json,
            stdio_request(&request.stdio),
        )?;
        Ok(Empty::default())
    }

    fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        request: ProcessRequest,
    ) -> Reply<WaitProcessResponse> {
        let process = self
            .containers
            .process(&request.container_id, &request.exec_id)?;
        let exit = process.wait();
        let signal = match exit.status {
            ExitStatus::Signaled(signal) => signal,
            ExitStatus::Exited(_) => 0,
        };
        Ok(WaitProcessResponse {
            exit_code: exit.status.code(),
            signal,
            oom_killed: exit.oom_killed,
            ..Default::default()
        })
    }

    fn signal_process(&self, _ctx: &TtrpcContext, request: SignalProcessRequest) -> Reply<Empty> {
        self.containers
            .signal(&request.container_id, &request.exec_id, request.signal)?;
        Ok(Empty::default())
    }

    fn resize_tty(&self, _ctx: &TtrpcContext, request: ResizeTtyRequest) -> Reply<Empty> {
        self.containers.resize(
            &request.container_id,
            &request.exec_id,
            request.rows,
            request.columns,
        )?;
        Ok(Empty::default())
    }

    fn close_stdin(&self, _ctx: &TtrpcContext, request: ProcessRequest) -> Reply<Empty> {
        self.containers
            .close_stdin(&request.container_id, &request.exec_id)?;
        Ok(Empty::default())
    }

    fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        request: ContainerRequest,
    ) -> Reply<ListProcessesResponse> {
        let processes = self
            .containers
            .process_table(&request.container_id)?
            .into_iter()
            .map(|p| ProcessInfo {
                pid: p.pid,
                uid: p.uid,
                command: p.command,
                ..Default::default()
            })
            .collect::<Vec<_>>();
        Ok(ListProcessesResponse {
            pids: processes.iter().map(|p| p.pid).collect(),
            processes,
            ..Default::default()
        })
    }

    fn stats(&self, _ctx: &TtrpcContext, request: ContainerRequest) -> Reply<StatsResponse> {
        let stats = self.containers.stats(&request.container_id)?;
        Ok(StatsResponse {
            cpu_usage_usec: stats.cpu_usage_usec,
            cpu_user_usec: stats.cpu_user_usec,
            cpu_system_usec: stats.cpu_system_usec,
            memory_current_bytes: stats.memory_current_bytes,
            memory_limit_bytes: stats.memory_limit_bytes,
            pids_current: stats.pids_current,
            io_read_bytes: stats.io_read_bytes,
            io_write_bytes: stats.io_write_bytes,
            oom_kills: stats.oom_kills,
            ..Default::default()
        })
    }

    fn update_container(
        &self,
        _ctx: &TtrpcContext,
        request: UpdateContainerRequest,
    ) -> Reply<Empty> {
        self.containers
            .update(&request.container_id, &request.resources_json)?;
        Ok(Empty::default())
    }

    fn sync_directory(&self, _ctx: &TtrpcContext, request: SyncDirectoryRequest) -> Reply<Empty> {
        self.shared.sync(&request)?;
        Ok(Empty::default())
    }

    fn list_containers(
        &self,
        _ctx: &TtrpcContext,
        _request: Empty,
    ) -> Reply<ListContainersResponse> {
        let containers = self
            .containers
            .list()
            .into_iter()
            .map(|summary| ContainerInfo {
                container_id: summary.id,
                status: summary.status.to_string(),
                pid: summary.pid,
                ..Default::default()
            })
            .collect();
        Ok(ListContainersResponse {
            containers,
            ..Default::default()
        })
    }

    fn copy_in(&self, _ctx: &TtrpcContext, request: CopyInRequest) -> Reply<Empty> {
        self.copies.copy_in(&self.containers, &request)?;
        Ok(Empty::default())
    }

    fn copy_out(&self, _ctx: &TtrpcContext, request: CopyOutRequest) -> Reply<CopyOutResponse> {
        let (copy_id, size) =
            self.copies
                .copy_out(&self.containers, &request.container_id, &request.path)?;
        Ok(CopyOutResponse {
            copy_id,
            size,
            ..Default::default()
        })
    }

    fn read_copy(&self, _ctx: &TtrpcContext, request: ReadCopyRequest) -> Reply<ReadCopyResponse> {
        Ok(ReadCopyResponse {
            data: self.copies.read(request.copy_id, request.offset)?,
            ..Default::default()
        })
    }

    fn end_copy(&self, _ctx: &TtrpcContext, request: ReadCopyRequest) -> Reply<Empty> {
        self.copies.end(request.copy_id);
        Ok(Empty::default())
    }

    fn delete_container(&self, _ctx: &TtrpcContext, request: ContainerRequest) -> Reply<Empty> {
        self.containers.delete(&request.container_id)?;
        Ok(Empty::default())
    }
}

/// Starts serving the API on vsock; the server runs on its own threads.
pub fn serve(service: AgentService) -> Result<ttrpc::Server> {
    let service = agent_ttrpc::create_agent(Arc::new(service));
    let mut server = ttrpc::Server::new()
        .bind(&format!("vsock://-1:{AGENT_VSOCK_PORT}"))
        .context("cannot listen on vsock")?
        .register_service(service);
    server.start().context("cannot start the API server")?;
    Ok(server)
}
