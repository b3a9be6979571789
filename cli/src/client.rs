//! HTTP/1.1 to capsad over its Unix socket (hyper), one connection per
//! request; errors come back as the API's JSON errors.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use capsa_api::ApiError;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

pub struct Client {
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    pub fn new(socket: &Path) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        Ok(Client {
            socket: socket.to_path_buf(),
            runtime,
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Response<Incoming>> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(|e| {
            anyhow!(
                "cannot reach capsad at {}: {e}\nIs the daemon running? Start it with: capsad --kernel VMLINUX --initrd INITRAMFS (see README)",
                self.socket.display()
            )
        })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "capsad")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        Ok(sender.send_request(request).await?)
    }

    /// A JSON call; an error status becomes the API's error.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<T> {
        self.runtime.block_on(async {
            let response = self.send(method, path, body).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                return Err(match serde_json::from_slice::<ApiError>(&bytes) {
                    Ok(error) => anyhow::Error::new(error),
                    Err(_) => anyhow!(
                        "capsad answered {status}: {}",
                        String::from_utf8_lossy(&bytes)
                    ),
                });
            }
            serde_json::from_slice(&bytes).with_context(|| format!("reading the answer to {path}"))
        })
    }

    /// A streamed response, handed to `each` chunk by chunk.
    pub fn stream(&self, path: &str, mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.runtime.block_on(async {
            let response = self.send(Method::GET, path, None).await?;
            let status = response.status();
            let mut body = response.into_body();
            if !status.is_success() {
                let bytes = body.collect().await?.to_bytes();
                return Err(match serde_json::from_slice::<ApiError>(&bytes) {
                    Ok(error) => anyhow::Error::new(error),
                    Err(_) => anyhow!("capsad answered {status}"),
                });
            }
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    each(&data)?;
                }
            }
            Ok(())
        })
    }
}
