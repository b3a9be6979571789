//! Network namespaces the networks suite makes around capsad's: an
//! upstream router and a server behind it (the "internet" for egress, never
//! a real address), and TCP servers in any namespace that count who
//! connected.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::vm::Artifacts;

/// A namespace from `ip netns add`, deleted when dropped.
pub struct Namespace<'a> {
    artifacts: &'a Artifacts,
    pub name: String,
}

impl<'a> Namespace<'a> {
    pub fn new(artifacts: &'a Artifacts, name: &str) -> Result<Self> {
        let _ = artifacts.ip(&["netns", "delete", name]);
        artifacts.ip(&["netns", "add", name])?;
        artifacts.ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(Namespace {
            artifacts,
            name: name.to_string(),
        })
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        self.artifacts.ip(&all)
    }

    /// Lets the namespace route between its interfaces.
    pub fn forward(&self) -> Result<()> {
        let name = self.name.clone();
        in_netns(&name, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1").context("turning forwarding on")
        })?
    }
}

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        let _ = self.artifacts.ip(&["netns", "delete", &self.name]);
    }
}

/// Runs `f` on a thread of its own inside network namespace `name`.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns changes only this thread's network namespace; the
        // descriptor stays open for the call.
        let entered = unsafe {
            use std::os::fd::AsRawFd;
            libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET)
        };
        anyhow::ensure!(
            entered == 0,
            "entering {path}: {}",
            std::io::Error::last_os_error()
        );
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in {name} panicked"))?
}

/// A TCP server in a namespace: it answers each connection with an HTTP
/// page and keeps who connected; it stops when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

/// A server answers at most this many connections (a bounded loop).
const MOST_CONNECTIONS: usize = 256;

impl Server {
    pub fn start(netns: &str, listen: &str, page: &'static str) -> Result<Self> {
        let listen: SocketAddr = listen.parse().context("a listen address")?;
        let listener = in_netns(netns, move || TcpListener::bind(listen))?
            .with_context(|| format!("listening on {listen} in {netns}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (stopping, seen) = (stop.clone(), peers.clone());
        std::thread::spawn(move || {
            let mut served = 0;
            while !stopping.load(Ordering::Relaxed) && served < MOST_CONNECTIONS {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        served += 1;
                        seen.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut request = [0u8; 1024];
                        let _ = stream.read(&mut request);
                        let _ = write!(
                            stream,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{page}",
                            page.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        Ok(Server { stop, peers })
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The outside world of capsad's namespace `daemon_netns`: a router at
/// 192.0.2.2 (its default route), and behind it a server at
/// 198.51.100.10:8080 serving `upstream-page`.
pub struct Upstream<'a> {
    pub server: Server,
    _router: Namespace<'a>,
    _far: Namespace<'a>,
}

pub const UPSTREAM_URL: &str = "http://198.51.100.10:8080/";
pub const UPSTREAM_PAGE: &str = "upstream-page";
/// capsad's namespace's own address towards the router.
pub const UPLINK_ADDRESS: &str = "192.0.2.1";
/// The router: a client from another host, to capsad's published ports.
pub const ROUTER_NETNS: &str = "capsa-e2e-router";
pub const ROUTER_ADDRESS: &str = "192.0.2.2";

impl<'a> Upstream<'a> {
    pub fn new(artifacts: &'a Artifacts, daemon_netns: &str) -> Result<Self> {
        let router = Namespace::new(artifacts, ROUTER_NETNS)?;
        let far = Namespace::new(artifacts, "capsa-e2e-far")?;
        let ip = |args: &[&str]| {
            let mut all = vec!["-n", daemon_netns];
            all.extend_from_slice(args);
            artifacts.ip(&all)
        };
        ip(&[
            "link",
            "add",
            "uplink0",
            "type",
            "veth",
            "peer",
            "name",
            "wan0",
            "netns",
            &router.name,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{UPLINK_ADDRESS}/24"),
            "dev",
            "uplink0",
        ])?;
        ip(&["link", "set", "uplink0", "up"])?;
        ip(&["route", "add", "default", "via", "192.0.2.2"])?;
        router.ip(&["addr", "add", "192.0.2.2/24", "dev", "wan0"])?;
        router.ip(&["link", "set", "wan0", "up"])?;
        router.ip(&[
            "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", &far.name,
        ])?;
        router.ip(&["addr", "add", "198.51.100.1/24", "dev", "lan0"])?;
        router.ip(&["link", "set", "lan0", "up"])?;
        router.forward()?;
        far.ip(&["addr", "add", "198.51.100.10/24", "dev", "eth0"])?;
        far.ip(&["link", "set", "eth0", "up"])?;
        far.ip(&["route", "add", "default", "via", "198.51.100.1"])?;
        let server = Server::start(&far.name, "198.51.100.10:8080", UPSTREAM_PAGE)?;
        Ok(Upstream {
            server,
            _router: router,
            _far: far,
        })
    }
}
