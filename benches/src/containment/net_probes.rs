//! The containment probes of the network (`super::probes` has the
//! rest): vsock to the host, a host service, another network's group and
//! DNS, and the gateway's DNS asked from an address or a MAC not the
//! container's own. Each finding is the probe's own: a packet that comes
//! back is the escape.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::probes::{finding, Context};
use super::{Finding, Outcome};

/// vsock ports the agent and its stdio use: connections to them are the
/// product, not an escape.
const AGENT_PORTS: [u32; 2] = [
    capsa_protocol::AGENT_VSOCK_PORT,
    capsa_protocol::STDIO_VSOCK_PORT,
];
const VSOCK_PORTS: [u32; 8] = [1, 22, 80, 443, 1023, 1026, 8080, 10000];

pub(super) fn vsock(_: &Context) -> Finding {
    let mut refused = 0;
    for cid in [libc::VMADDR_CID_HOST, 1] {
        for port in VSOCK_PORTS {
            if AGENT_PORTS.contains(&port) {
                continue;
            }
            match vsock_connect(cid, port) {
                Ok(()) => {
                    return finding(
                        "vsock",
                        Outcome::Escaped,
                        format!("connected to CID {cid} port {port}"),
                    )
                }
                Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                    return finding("vsock", Outcome::NotApplicable, "no vsock in this kernel")
                }
                Err(_) => refused += 1,
            }
        }
    }
    finding(
        "vsock",
        Outcome::Contained,
        format!("{refused} connections to the host's CIDs (2, 1) on ports other than the agent's refused or unanswered"),
    )
}

fn vsock_connect(cid: u32, port: u32) -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned
    // at once.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just made and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: the option value is a timeval of the size given.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    // SAFETY: sockaddr_vm is plain data; all zeroes is a valid start.
    let mut address: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    address.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    address.svm_cid = cid;
    address.svm_port = port;
    // SAFETY: the address is a sockaddr_vm of the size given.
    let result = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) fn host_service(c: &Context) -> Finding {
    let Some((_, gateway)) = default_route() else {
        return finding(
            "host-service",
            Outcome::NotApplicable,
            "no route out of the container's network",
        );
    };
    let address = SocketAddr::from((gateway, c.args.host_port));
    match TcpStream::connect_timeout(&address, Duration::from_secs(3)) {
        Ok(_) => finding(
            "host-service",
            Outcome::Escaped,
            format!("connected to {address}"),
        ),
        Err(e) => finding(
            "host-service",
            Outcome::Contained,
            format!("{address} (a host service on 0.0.0.0): {e}"),
        ),
    }
}

/// The interface of the default route and its gateway, from
/// /proc/net/route.
fn default_route() -> Option<(String, Ipv4Addr)> {
    let text = fs::read_to_string("/proc/net/route").ok()?;
    text.lines().skip(1).find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.get(1) != Some(&"00000000") {
            return None;
        }
        let raw = u32::from_str_radix(words.get(2)?, 16).ok()?;
        Some((words.first()?.to_string(), Ipv4Addr::from(raw.swap_bytes())))
    })
}

/// Whether the DNS server at `server` answers a query at all (any answer,
/// a name error included: the packet got there and back).
fn dns_responds(server: Ipv4Addr) -> bool {
    let Ok(socket) = std::net::UdpSocket::bind("0.0.0.0:0") else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
    // A query for "capsa-probe." of type A, id 0x4350, recursion desired.
    let mut query = vec![0x43, 0x50, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    query.push(11);
    query.extend_from_slice(b"capsa-probe");
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    for _ in 0..2 {
        if socket.send_to(&query, (server, 53)).is_err() {
            return false;
        }
        let mut answer = [0u8; 512];
        if let Ok((n, _)) = socket.recv_from(&mut answer) {
            if n >= 12 && answer[..2] == query[..2] {
                return true;
            }
        }
    }
    false
}

/// What a probe of another network aims at, or why it does not apply
/// (no other network made, no route out of this one).
fn other_network<T>(name: &str, target: Option<T>) -> Result<T, Finding> {
    let Some(target) = target else {
        return Err(finding(
            name,
            Outcome::NotApplicable,
            "no other network was made",
        ));
    };
    if default_route().is_none() {
        return Err(finding(
            name,
            Outcome::NotApplicable,
            "no route out of the container's network",
        ));
    }
    Ok(target)
}

pub(super) fn other_network_group(c: &Context) -> Finding {
    let name = "other-network-group";
    let target = match other_network(name, c.args.other_group) {
        Ok(target) => target,
        Err(not_applicable) => return not_applicable,
    };
    match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
        Ok(_) => finding(
            name,
            Outcome::Escaped,
            format!("connected to {target}, a group of another network"),
        ),
        Err(e) => finding(
            name,
            Outcome::Contained,
            format!("{target} (a group of another network): {e}"),
        ),
    }
}

pub(super) fn other_network_dns(c: &Context) -> Finding {
    let name = "other-network-dns";
    let server = match other_network(name, c.args.other_dns) {
        Ok(server) => server,
        Err(not_applicable) => return not_applicable,
    };
    if dns_responds(server) {
        finding(
            name,
            Outcome::Escaped,
            format!("the other network's DNS at {server} answered"),
        )
    } else {
        finding(
            name,
            Outcome::Contained,
            format!("the other network's DNS at {server} gave no answer"),
        )
    }
}

/// Runs a busybox shell line in the container (the probe image's tools).
fn shell(line: &str) -> bool {
    std::process::Command::new("/bin/sh")
        .args(["-c", line])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn shell_output(line: &str) -> String {
    std::process::Command::new("/bin/sh")
        .args(["-c", line])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Sends from an address or a MAC not its own (`spoof`, then `restore`)
/// and asks its gateway's DNS, which answers the honest container.
fn spoofed_dns(name: &str, what: &str, spoof: &str, restore: &str) -> Finding {
    let Some((_, gateway)) = default_route() else {
        return finding(
            name,
            Outcome::NotApplicable,
            "no route out of the container's network",
        );
    };
    if !dns_responds(gateway) {
        return finding(
            name,
            Outcome::NotApplicable,
            format!("the gateway's DNS at {gateway} does not answer the honest container"),
        );
    }
    if !shell(spoof) {
        return finding(name, Outcome::Contained, format!("could not take {what}"));
    }
    let answered = dns_responds(gateway);
    let restored = shell(restore) && dns_responds(gateway);
    let after = if restored {
        "; put back, the DNS answers again"
    } else {
        "; put back, the DNS does not answer again"
    };
    if answered {
        finding(
            name,
            Outcome::Escaped,
            format!("with {what} the gateway's DNS answered{after}"),
        )
    } else {
        finding(
            name,
            Outcome::Contained,
            format!("with {what} nothing came back{after}"),
        )
    }
}

pub(super) fn ip_spoof(_: &Context) -> Finding {
    let Some((dev, gateway)) = default_route() else {
        return finding(
            "ip-spoof",
            Outcome::NotApplicable,
            "no route out of the container's network",
        );
    };
    let own = shell_output(&format!(
        "ip -4 -o addr show dev {dev} | awk '{{print $4}}' | head -1"
    ));
    let [a, b, c3, _] = gateway.octets();
    let spoofed = Ipv4Addr::new(a, b, c3, 200);
    let set = |address: &str| {
        format!("ip addr flush dev {dev} && ip addr add {address} dev {dev} && ip route add default via {gateway}")
    };
    spoofed_dns(
        "ip-spoof",
        &format!("address {spoofed} (its own {own})"),
        &set(&format!("{spoofed}/24")),
        &set(&own),
    )
}

pub(super) fn mac_spoof(_: &Context) -> Finding {
    let Some((dev, gateway)) = default_route() else {
        return finding(
            "mac-spoof",
            Outcome::NotApplicable,
            "no route out of the container's network",
        );
    };
    let own = shell_output(&format!("cat /sys/class/net/{dev}/address"));
    let set = |mac: &str| {
        format!(
            "ip link set {dev} down && (ip link set {dev} address {mac} || ifconfig {dev} hw ether {mac}) && ip link set {dev} up && ip route add default via {gateway} && [ \"$(cat /sys/class/net/{dev}/address)\" = {mac} ]"
        )
    };
    spoofed_dns(
        "mac-spoof",
        &format!("MAC 02:ca:95:ff:ff:77 (its own {own})"),
        &set("02:ca:95:ff:ff:77"),
        &set(&own),
    )
}
