//! Where capsad is: its Unix socket (the host's admin), or its TLS
//! listener (a tenant, with a bearer token).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

/// A connection to capsad, whichever way it goes.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tls {
        /// host:port, as given.
        address: String,
        server_name: ServerName<'static>,
        connector: tokio_rustls::TlsConnector,
        token: Option<String>,
    },
}

impl Endpoint {
    /// `--host`: `unix:///PATH`, or `https://HOST:PORT` with the CA that
    /// signed capsad's certificate (the system's web roots otherwise) and
    /// the tenant's token.
    pub fn parse(host: &str, ca: Option<&Path>, token: Option<String>) -> Result<Endpoint> {
        if let Some(path) = host.strip_prefix("unix://") {
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let Some(address) = host.strip_prefix("https://") else {
            bail!("--host {host:?}: give unix:///PATH or https://HOST:PORT");
        };
        let address = address.trim_end_matches('/').to_string();
        let (name, port) = address
            .rsplit_once(':')
            .with_context(|| format!("--host {host:?}: give the port (https://HOST:PORT)"))?;
        port.parse::<u16>()
            .map_err(|_| anyhow!("--host {host:?}: {port:?} is not a port"))?;
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| anyhow!("--host {host:?}: {name:?} is not a host name or address"))?;
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(ca) => {
                for certificate in CertificateDer::pem_file_iter(ca)
                    .with_context(|| format!("reading --tls-ca {}", ca.display()))?
                {
                    let certificate = certificate
                        .with_context(|| format!("reading --tls-ca {}", ca.display()))?;
                    roots
                        .add(certificate)
                        .with_context(|| format!("--tls-ca {}", ca.display()))?;
                }
                if roots.is_empty() {
                    bail!("--tls-ca {}: no certificate in it", ca.display());
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Endpoint::Tls {
            address,
            server_name,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            token,
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Endpoint::Unix(path) => path.display().to_string(),
            Endpoint::Tls { address, .. } => format!("https://{address}"),
        }
    }

    /// The Authorization header's value, where there is one.
    pub fn authorization(&self) -> Option<String> {
        match self {
            Endpoint::Tls {
                token: Some(token), ..
            } => Some(format!("Bearer {token}")),
            _ => None,
        }
    }

    pub async fn connect(&self) -> Result<Box<dyn Io>> {
        match self {
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                    anyhow!(
                        "cannot reach capsad at {}: {e}\nIs the daemon running? Start it with: capsad --kernel VMLINUX --initrd INITRAMFS (see README)",
                        path.display()
                    )
                })?;
                Ok(Box::new(stream))
            }
            Endpoint::Tls {
                address,
                server_name,
                connector,
                ..
            } => {
                let stream = tokio::net::TcpStream::connect(address.as_str())
                    .await
                    .with_context(|| format!("cannot reach capsad at https://{address}"))?;
                let tls = connector
                    .connect(server_name.clone(), stream)
                    .await
                    .with_context(|| format!("TLS with capsad at https://{address}"))?;
                Ok(Box::new(tls))
            }
        }
    }
}
