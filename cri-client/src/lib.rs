//! A CRI client, kubelet's side of the Container Runtime Interface, over a
//! Unix socket (containerd's): the services generated from the CRI protos
//! (`k8s-cri`) on tonic, each call run to its end within a bound, and the
//! pod steps kubelet takes (a pod sandbox on a runtime handler, a
//! container created and started in it, the pod stopped and removed).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
pub use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("starting the CRI client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("connecting to the CRI at {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{what}: {message} ({code:?})")]
    Status {
        what: String,
        message: String,
        code: tonic::Code,
    },
    #[error("{what}: no answer in {} s", .bound.as_secs())]
    Timeout { what: String, bound: Duration },
}

pub struct CriClient {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    /// How long one call may take.
    bound: Duration,
}

impl CriClient {
    /// Connects to the CRI served on `socket`; each call may take `bound`.
    pub fn connect(socket: &Path, bound: Duration) -> Result<Self, CriError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let path = socket.to_path_buf();
        let endpoint = Endpoint::from_static("http://[::]");
        let channel = runtime
            .block_on(
                endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                })),
            )
            .map_err(|source| CriError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(CriClient {
            runtime,
            channel,
            bound,
        })
    }

    pub fn runtime_service(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    pub fn image_service(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    /// Runs one CRI call to its end, within the client's bound.
    pub fn call<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CriError> {
        let bound = self.bound;
        let answer = self
            .runtime
            .block_on(async { tokio::time::timeout(bound, call).await });
        match answer {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(CriError::Status {
                what: what.to_string(),
                message: status.message().to_string(),
                code: status.code(),
            }),
            Err(_) => Err(CriError::Timeout {
                what: what.to_string(),
                bound,
            }),
        }
    }

    /// RunPodSandbox on runtime `handler`; returns the pod's id.
    pub fn run_pod(
        &self,
        config: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, CriError> {
        Ok(self
            .call(
                "RunPodSandbox",
                self.runtime_service()
                    .run_pod_sandbox(cri::RunPodSandboxRequest {
                        config: Some(config.clone()),
                        runtime_handler: handler.into(),
                    }),
            )?
            .pod_sandbox_id)
    }

    /// CreateContainer and StartContainer in pod `pod_id`; returns the
    /// container's id.
    pub fn start_container(
        &self,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> Result<String, CriError> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self
            .call(
                &format!("CreateContainer {name}"),
                self.runtime_service()
                    .create_container(cri::CreateContainerRequest {
                        pod_sandbox_id: pod_id.into(),
                        config: Some(config),
                        sandbox_config: Some(pod.clone()),
                    }),
            )?
            .container_id;
        self.call(
            &format!("StartContainer {name}"),
            self.runtime_service()
                .start_container(cri::StartContainerRequest {
                    container_id: id.clone(),
                }),
        )?;
        Ok(id)
    }

    /// StopPodSandbox, then RemovePodSandbox.
    pub fn end_pod(&self, pod_id: &str) -> Result<(), CriError> {
        self.call(
            "StopPodSandbox",
            self.runtime_service()
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: pod_id.into(),
                }),
        )?;
        self.call(
            "RemovePodSandbox",
            self.runtime_service()
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: pod_id.into(),
                }),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_nobody_serves_is_an_error_that_names_it() {
        let dir = std::env::temp_dir().join(format!("capsa-cri-client-{}", std::process::id()));
        let socket = dir.join("missing.sock");
        let err = CriClient::connect(&socket, Duration::from_secs(1))
            .err()
            .expect("connected to nothing");
        assert!(err.to_string().contains("missing.sock"), "{err}");
    }
}
