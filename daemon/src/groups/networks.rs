//! Group networks as the API serves them: made, listed and removed here,
//! with the groups on each; a network is removed only when no group (in
//! any state) is on it, under the same lock as group creation.

use capsa_api::{ApiError, ErrorCode, NetworkRequest, NetworkView};
use capsa_network::{NetworkInfo, Networks};

use super::Daemon;
use crate::errors::{error, network_error};

impl Daemon {
    fn networks(&self) -> Result<&Networks, ApiError> {
        self.network.as_ref().ok_or_else(|| {
            error(
                ErrorCode::InvalidRequest,
                "this capsad runs without networking (--no-network)",
            )
        })
    }

    fn network_view(&self, info: NetworkInfo) -> NetworkView {
        NetworkView {
            groups: self.network_users(&info.name),
            name: info.name,
            subnet: info.subnet.to_string(),
            gateway: info.gateway,
            bridge: info.bridge,
            egress: info.egress,
            created_at: info.created_at,
        }
    }

    pub fn list_networks(&self) -> Result<Vec<NetworkView>, ApiError> {
        Ok(self
            .networks()?
            .list()
            .into_iter()
            .map(|info| self.network_view(info))
            .collect())
    }

    pub fn inspect_network(&self, name: &str) -> Result<NetworkView, ApiError> {
        let info = self.networks()?.info(name).map_err(network_error)?;
        Ok(self.network_view(info))
    }

    pub fn create_network(&self, request: NetworkRequest) -> Result<NetworkView, ApiError> {
        let subnet = request
            .subnet
            .as_deref()
            .map(|text| {
                text.parse().map_err(|_| {
                    error(
                        ErrorCode::InvalidRequest,
                        format!("subnet {text:?} is not an IPv4 subnet such as 10.89.7.0/24"),
                    )
                })
            })
            .transpose()?;
        let info = self
            .networks()?
            .create(&request.name, subnet, request.egress.unwrap_or(true))
            .map_err(network_error)?;
        Ok(self.network_view(info))
    }

    pub fn remove_network(&self, name: &str) -> Result<(), ApiError> {
        let networks = self.networks()?;
        // Held so that no group joins it meanwhile.
        let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let users: Vec<String> = groups
            .values()
            .map(|g| g.snapshot().spec)
            .filter(|spec| spec.network() == name)
            .map(|spec| spec.name)
            .collect();
        if !users.is_empty() {
            return Err(error(
                ErrorCode::Conflict,
                format!(
                    "network {name:?} has groups: {} (delete them first)",
                    users.join(", ")
                ),
            ));
        }
        networks.remove(name).map_err(network_error)
    }
}
