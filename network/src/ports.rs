//! Published ports: a userspace proxy from a host address to a group's,
//! which serves the host's own clients (loopback above all), and beside it,
//! for host addresses other than loopback, a DNAT translation in the packet
//! filter (`firewall`) that serves other hosts' clients and keeps their
//! address. The listening socket is bound when the port is published, so a
//! port already taken is refused then, not when the group starts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;

use crate::firewall::{Firewall, Forward};
use crate::NetworkError;

/// How long a connection to the group may take to open.
const CONNECT_PATIENCE: Duration = Duration::from_secs(5);
/// A UDP client's relay is dropped after this long without traffic.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// At most this many UDP clients are relayed at once per port.
const UDP_CLIENTS: usize = 1024;
/// At most this many TCP connections are proxied at once per port; more
/// are closed as they come, so one client cannot take the daemon's
/// descriptors.
const TCP_CONNECTIONS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A published port; dropping it closes the port and its connections,
/// and its DNAT translation when it has one.
pub struct Published {
    task: tokio::task::AbortHandle,
    pub listen: SocketAddr,
    pub(crate) dnat: Option<(Arc<Firewall>, Forward)>,
}

impl std::fmt::Debug for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Published")
            .field("listen", &self.listen)
            .field("dnat", &self.dnat.as_ref().map(|(_, forward)| forward))
            .finish()
    }
}

impl Published {
    /// Whether clients from other hosts reach it through DNAT (keeping
    /// their address) rather than through the proxy.
    pub fn translated(&self) -> bool {
        self.dnat.is_some()
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        self.task.abort();
        if let Some((firewall, forward)) = self.dnat.take() {
            if let Err(e) = firewall.remove_forward(&forward) {
                eprintln!("capsad: {e}");
            }
        }
    }
}

/// Must run inside the network's runtime.
pub fn publish(
    protocol: Protocol,
    listen: SocketAddr,
    target: SocketAddr,
) -> Result<Published, NetworkError> {
    let unavailable = |source| NetworkError::PortUnavailable {
        protocol,
        address: listen,
        source,
    };
    let task = match protocol {
        Protocol::Tcp => {
            let socket = std::net::TcpListener::bind(listen).map_err(unavailable)?;
            socket.set_nonblocking(true).map_err(unavailable)?;
            let listener = TcpListener::from_std(socket).map_err(unavailable)?;
            tokio::spawn(forward_tcp(listener, target, TCP_CONNECTIONS))
        }
        Protocol::Udp => {
            let socket = std::net::UdpSocket::bind(listen).map_err(unavailable)?;
            socket.set_nonblocking(true).map_err(unavailable)?;
            let socket = UdpSocket::from_std(socket).map_err(unavailable)?;
            tokio::spawn(forward_udp(Arc::new(socket), target))
        }
    };
    Ok(Published {
        task: task.abort_handle(),
        listen,
        dnat: None,
    })
}

async fn forward_tcp(listener: TcpListener, target: SocketAddr, cap: usize) {
    // Owned here: aborting this task ends every connection too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut inbound, _)) = accepted else {
                    // Out of descriptors, say: wait rather than spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                if connections.len() >= cap {
                    // Closed at once: the client sees the end.
                    drop(inbound);
                    continue;
                }
                connections.spawn(async move {
                    let Ok(Ok(mut outbound)) =
                        tokio::time::timeout(CONNECT_PATIENCE, TcpStream::connect(target)).await
                    else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Each client gets a socket of its own towards the group, so replies find
/// their way back.
async fn forward_udp(socket: Arc<UdpSocket>, target: SocketAddr) {
    let mut relays: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut buffer = vec![0u8; 65536];
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buffer) => {
                let Ok((n, client)) = received else { continue };
                let relay = match relays.get(&client) {
                    Some(relay) => relay.clone(),
                    None => {
                        if relays.len() >= UDP_CLIENTS {
                            continue;
                        }
                        let Ok(relay) = connected_udp(target).await else { continue };
                        let relay = Arc::new(relay);
                        relays.insert(client, relay.clone());
                        tasks.spawn(relay_replies(relay.clone(), socket.clone(), client));
                        relay
                    }
                };
                let _ = relay.send(&buffer[..n]).await;
            }
            Some(Ok(client)) = tasks.join_next(), if !tasks.is_empty() => {
                relays.remove(&client);
            }
        }
    }
}

async fn connected_udp(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().map_err(std::io::Error::other)?
    } else {
        "[::]:0".parse().map_err(std::io::Error::other)?
    };
    let relay = UdpSocket::bind(any).await?;
    relay.connect(target).await?;
    Ok(relay)
}

/// Sends the group's replies back to `client` until it goes quiet.
async fn relay_replies(
    relay: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
) -> SocketAddr {
    let mut buffer = vec![0u8; 65536];
    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, relay.recv(&mut buffer)).await {
        let _ = socket.send_to(&buffer[..n], client).await;
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_and_the_others_served() {
        // The group: echoes what it reads.
        let group = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = group.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = group.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 64];
                    while let Ok(n) = stream.read(&mut buffer).await {
                        if n == 0 || stream.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = listener.local_addr().unwrap();
        tokio::spawn(forward_tcp(listener, target, 3));
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut client = TcpStream::connect(listen).await.unwrap();
            client.write_all(b"hi").await.unwrap();
            let mut echo = [0u8; 2];
            client.read_exact(&mut echo).await.unwrap();
            assert_eq!(&echo, b"hi");
            held.push(client);
        }
        let mut refused = TcpStream::connect(listen).await.unwrap();
        let mut buffer = [0u8; 2];
        let read = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buffer))
            .await
            .expect("closed, not left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // One goes, and a new one is served.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut again = TcpStream::connect(listen).await.unwrap();
        again.write_all(b"ok").await.unwrap();
        again.read_exact(&mut buffer).await.unwrap();
        assert_eq!(&buffer, b"ok");
    }
}
