//! The agent's ttrpc API on vsock (capsa_protocol::agent_ttrpc::Agent).

use std::sync::Arc;

use anyhow::{Context, Result};
use capsa_protocol::agent::{
    PingRequest, PingResponse, ShutdownRequest, ShutdownResponse, VersionRequest, VersionResponse,
};
use capsa_protocol::{agent_ttrpc, AGENT_VSOCK_PORT, API_VERSION};

use crate::{init, kmsg, ready};

struct AgentService;

impl agent_ttrpc::Agent for AgentService {
    fn version(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        _request: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        // The host judges compatibility from our answer (check_version).
        Ok(VersionResponse {
            api_version: API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn ping(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        _request: PingRequest,
    ) -> ttrpc::Result<PingResponse> {
        let uptime_ms = ready::current_uptime_ms().map_err(internal)?;
        Ok(PingResponse {
            uptime_ms,
            ..Default::default()
        })
    }

    fn shutdown(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        _request: ShutdownRequest,
    ) -> ttrpc::Result<ShutdownResponse> {
        // Reply first: power-off ends the VM, and with it the connection.
        std::thread::spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            init::drain_console();
            if let Err(e) = init::power_off() {
                kmsg::error(&format!("shutdown: {e:#}"));
            }
        });
        Ok(ShutdownResponse::default())
    }
}

fn internal(e: anyhow::Error) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INTERNAL, format!("{e:#}")))
}

/// Starts serving the API on vsock; the server runs on its own threads.
pub fn serve() -> Result<ttrpc::Server> {
    let service = agent_ttrpc::create_agent(Arc::new(AgentService));
    let mut server = ttrpc::Server::new()
        .bind(&format!("vsock://-1:{AGENT_VSOCK_PORT}"))
        .context("cannot listen on vsock")?
        .register_service(service);
    server.start().context("cannot start the API server")?;
    Ok(server)
}
