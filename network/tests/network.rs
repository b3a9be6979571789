//! The networks for real, inside a network namespace of the test's own (a
//! thread that unshares one): bridges, networks made, kept and removed,
//! published TCP and UDP ports, the DNS responders, and the packet filter
//! against a "guest" (a veth pair, one end on the bridge named as a tap,
//! the other in a namespace of its own). Skipped where namespaces cannot
//! be made.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use capsa_network::{NetworkConfig, NetworkError, Networks, Protocol, DEFAULT_NETWORK};

fn in_private_netns(test: impl FnOnce() + Send + 'static) {
    let ran = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return false;
        }
        // `ip` forks from this thread, so it acts on this namespace.
        let up = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        if !up.is_ok_and(|s| s.success()) {
            return false;
        }
        test();
        true
    })
    .join()
    .expect("the test failed");
    if !ran {
        eprintln!("skipped: this process may not create network namespaces");
    }
}

fn start_in(store: &std::path::Path) -> Networks {
    Networks::start(NetworkConfig {
        bridge: "capsa-t0".into(),
        subnet: "10.99.0.0/24".parse().unwrap(),
        egress: true,
        upstream_dns: Vec::new(),
        store: store.to_path_buf(),
    })
    .unwrap()
}

fn start() -> Networks {
    let store = tempfile::tempdir().unwrap().keep();
    start_in(&store)
}

fn ip(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().unwrap();
    assert!(output.status.success(), "ip {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// How many elements the daemon's filter sets hold in all.
fn elements(table: &str) -> usize {
    let mut count = 0;
    for family in ["bridge", "inet"] {
        let output = Command::new("nft")
            .args(["-j", "list", "table", family, table])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        for item in json["nftables"].as_array().unwrap() {
            if let Some(elem) = item["set"]["elem"].as_array() {
                count += elem.len();
            }
        }
    }
    count
}

#[test]
fn the_bridge_is_made_once_with_the_gateway() {
    in_private_netns(|| {
        let network = start();
        let addressing = network.addressing(DEFAULT_NETWORK).unwrap();
        assert_eq!(addressing.gateway, Ipv4Addr::new(10, 99, 0, 1));
        let shown = Command::new("ip")
            .args(["-o", "addr", "show", "dev", "capsa-t0"])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout);
        assert!(shown.contains("10.99.0.1/24"), "{shown}");
        let first = network.allocate(DEFAULT_NETWORK, []).unwrap();
        assert_eq!(first, Ipv4Addr::new(10, 99, 0, 2));
        assert_eq!(
            network.allocate(DEFAULT_NETWORK, [first]).unwrap(),
            Ipv4Addr::new(10, 99, 0, 3)
        );
        let all: Vec<Ipv4Addr> = (2..=254).map(|d| Ipv4Addr::new(10, 99, 0, d)).collect();
        assert!(matches!(
            network.allocate(DEFAULT_NETWORK, all),
            Err(NetworkError::Exhausted(_))
        ));
        drop(network);
        // A second start (a restarted daemon) finds it as it is.
        start();
    });
}

#[test]
fn published_ports_forward_and_a_taken_port_is_refused() {
    in_private_netns(|| {
        let network = start();
        // The "group": a server on the gateway's address.
        let server = TcpListener::bind("10.99.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in server.incoming().take(2) {
                let mut stream = stream.unwrap();
                let mut line = [0u8; 5];
                stream.read_exact(&mut line).unwrap();
                stream.write_all(&line.to_ascii_uppercase()).unwrap();
            }
        });
        let listen: SocketAddr = "127.0.0.1:18080".parse().unwrap();
        let published = network.publish(Protocol::Tcp, listen, target).unwrap();
        let mut client = TcpStream::connect(listen).unwrap();
        client.write_all(b"hello").unwrap();
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"HELLO");

        let taken = network.publish(Protocol::Tcp, listen, target).unwrap_err();
        assert!(
            taken.to_string().contains("tcp port 127.0.0.1:18080"),
            "{taken}"
        );
        drop(published);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            TcpStream::connect(listen).is_err(),
            "closed with its handle"
        );

        let echo = UdpSocket::bind("10.99.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 64];
            let (n, from) = echo.recv_from(&mut buffer).unwrap();
            echo.send_to(&buffer[..n].to_ascii_uppercase(), from)
                .unwrap();
        });
        let listen: SocketAddr = "127.0.0.1:18081".parse().unwrap();
        let _udp = network.publish(Protocol::Udp, listen, target).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.send_to(b"ping", listen).unwrap();
        let mut buffer = [0u8; 64];
        let n = client.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"PING");
    });
}

#[test]
fn group_names_resolve_on_the_gateway() {
    in_private_netns(|| {
        let network = start();
        network
            .attach(DEFAULT_NETWORK, "web", Ipv4Addr::new(10, 99, 0, 7))
            .unwrap();
        let client = UdpSocket::bind("10.99.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // A query for web/A, id 0x1234, recursion desired.
        let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3];
        query.extend_from_slice(b"web\0");
        query.extend_from_slice(&[0, 1, 0, 1]);
        client.send_to(&query, "10.99.0.1:53").unwrap();
        let mut buffer = [0u8; 512];
        let n = client.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..2], &[0x12, 0x34]);
        assert_eq!(&buffer[n - 4..n], &[10, 99, 0, 7], "the answer's address");
        network
            .detach(DEFAULT_NETWORK, "web", Ipv4Addr::new(10, 99, 0, 7))
            .unwrap();
        client.send_to(&query, "10.99.0.1:53").unwrap();
        let n = client.recv(&mut buffer).unwrap();
        assert_eq!(buffer[3] & 0x0f, 3, "NXDOMAIN once forgotten ({n} bytes)");
    });
}

#[test]
fn networks_are_made_kept_and_removed_without_leftovers() {
    in_private_netns(|| {
        let store = tempfile::tempdir().unwrap();
        let networks = start_in(store.path());
        let table = networks.firewall_table().to_string();
        let baseline = elements(&table);
        let blue = networks.create("blue", None, false).unwrap();
        assert_eq!(blue.subnet.to_string(), "10.89.0.0/24");
        assert_eq!(blue.gateway, Ipv4Addr::new(10, 89, 0, 1));
        assert!(ip(&["-o", "addr", "show", "dev", &blue.bridge]).contains("10.89.0.1/24"));
        let next = networks.create("green", None, true).unwrap();
        assert_eq!(next.subnet.to_string(), "10.89.1.0/24", "the next free /24");
        for (subnet, overlaps) in [
            ("10.89.0.128/25", "network blue"),
            ("10.99.0.0/16", "network default"),
        ] {
            let refused = networks
                .create("red", Some(subnet.parse().unwrap()), true)
                .unwrap_err()
                .to_string();
            assert!(refused.contains(overlaps), "{refused}");
        }
        assert!(matches!(
            networks.create("blue", None, true),
            Err(NetworkError::Exists(_))
        ));
        assert!(matches!(
            networks.create("Not_A_Name", None, true),
            Err(NetworkError::InvalidName(_))
        ));
        assert!(matches!(
            networks.remove(DEFAULT_NETWORK),
            Err(NetworkError::DefaultIsFixed)
        ));
        // Taps come and go as groups do.
        let address = networks.allocate("blue", []).unwrap();
        assert_eq!(address, Ipv4Addr::new(10, 89, 0, 2));
        networks.attach("blue", "web", address).unwrap();
        assert_eq!(
            networks.nic("blue", address).unwrap().bridge,
            Some(blue.bridge.clone())
        );
        networks.detach("blue", "web", address).unwrap();
        networks.detach("blue", "web", address).unwrap();
        drop(networks);
        // A restarted daemon builds the same networks again.
        let networks = start_in(store.path());
        let names: Vec<String> = networks.list().into_iter().map(|n| n.name).collect();
        assert_eq!(names, ["blue", "default", "green"]);
        assert_eq!(networks.info("blue").unwrap(), blue);
        for _ in 0..10 {
            let cycled = networks.create("cycle", None, true).unwrap();
            let address = networks.allocate("cycle", []).unwrap();
            networks.attach("cycle", "c", address).unwrap();
            networks.detach("cycle", "c", address).unwrap();
            networks.remove("cycle").unwrap();
            assert!(
                !ip(&["-o", "link"]).contains(&cycled.bridge),
                "bridge {} left",
                cycled.bridge
            );
        }
        networks.remove("blue").unwrap();
        networks.remove("green").unwrap();
        assert_eq!(elements(&table), baseline, "no filter element left");
        assert!(!ip(&["-o", "link"]).contains(&blue.bridge));
        assert!(matches!(
            networks.remove("blue"),
            Err(NetworkError::NotFound(_))
        ));
        drop(networks);
        let networks = start_in(store.path());
        assert_eq!(networks.list().len(), 1, "removed networks stay removed");
    });
}

/// Runs `f` on a thread inside network namespace `name` (from `ip netns`).
fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns only changes this thread's network namespace; the
        // descriptor is open for the call.
        let entered = unsafe {
            use std::os::fd::AsRawFd;
            libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET)
        };
        assert_eq!(entered, 0, "entering {path}");
        f()
    })
    .join()
    .unwrap()
}

/// A DNS query for `name`/A to `server`; the answer's last four bytes
/// when one came.
fn resolve(server: &str, name: &str) -> Option<[u8; 4]> {
    let client = UdpSocket::bind("0.0.0.0:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut query = vec![
        0x12,
        0x34,
        0x01,
        0x00,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        name.len() as u8,
    ];
    query.extend_from_slice(name.as_bytes());
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    client.send_to(&query, server).unwrap();
    let mut buffer = [0u8; 512];
    let n = client.recv(&mut buffer).ok()?;
    (n >= 4 && buffer[3] & 0x0f == 0).then(|| buffer[n - 4..n].try_into().unwrap())
}

#[test]
fn a_guest_reaches_its_gateway_dns_and_nothing_else_and_cannot_spoof() {
    in_private_netns(|| {
        let networks = start();
        let bridge = networks.addressing(DEFAULT_NETWORK).unwrap().bridge;
        let address = networks.allocate(DEFAULT_NETWORK, []).unwrap();
        let tap = capsa_network::tap_name(address);
        let mac = capsa_network::mac_for(address).to_string();
        // The guest: a namespace behind a veth whose host end is the tap.
        let guest = format!("capsa-guest-{}", std::process::id());
        ip(&["netns", "add", &guest]);
        ip(&[
            "link", "add", &tap, "type", "veth", "peer", "name", "eth0", "netns", &guest,
        ]);
        ip(&["link", "set", &tap, "master", &bridge, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", guest.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["link", "set", "eth0", "address", &mac, "up"]);
        inside(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
        inside(&["route", "add", "default", "via", "10.99.0.1"]);
        // A host service on every address.
        let service = TcpListener::bind("0.0.0.0:18090").unwrap();
        service.set_nonblocking(true).unwrap();
        let reach = |guest: &str| {
            in_netns(guest, || {
                let dns = resolve("10.99.0.1:53", "web");
                let tcp = TcpStream::connect_timeout(
                    &"10.99.0.1:18090".parse().unwrap(),
                    Duration::from_millis(1500),
                )
                .is_ok();
                (dns, tcp)
            })
        };
        networks.attach(DEFAULT_NETWORK, "web", address).unwrap();
        let (dns, tcp) = reach(&guest);
        assert_eq!(dns, Some(address.octets()), "the gateway's DNS answers");
        assert!(!tcp, "a host service on 0.0.0.0 is closed to guests");
        // Another address on the same tap: nothing it sends gets through.
        inside(&["addr", "flush", "dev", "eth0"]);
        inside(&["addr", "add", "10.99.0.77/24", "dev", "eth0"]);
        assert_eq!(
            reach(&guest),
            (None, false),
            "a spoofed address reaches no one"
        );
        inside(&["addr", "flush", "dev", "eth0"]);
        inside(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
        inside(&["route", "add", "default", "via", "10.99.0.1"]);
        inside(&["link", "set", "eth0", "address", "02:ca:95:00:00:99"]);
        assert_eq!(reach(&guest), (None, false), "a spoofed MAC reaches no one");
        inside(&["link", "set", "eth0", "address", &mac]);
        assert_eq!(
            reach(&guest).0,
            Some(address.octets()),
            "honest again, answered again"
        );
        // A published port: another host's client keeps its address (DNAT),
        // the host's own reaches it through the proxy.
        let served = in_netns(&guest, move || {
            TcpListener::bind(SocketAddr::new(address.into(), 8080)).unwrap()
        });
        let peers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = peers.clone();
        std::thread::spawn(move || {
            for stream in served.incoming().take(2) {
                let mut stream = stream.unwrap();
                seen.lock().unwrap().push(stream.peer_addr().unwrap().ip());
                stream.write_all(b"hi").unwrap();
            }
        });
        let outside = format!("capsa-outside-{}", std::process::id());
        ip(&["netns", "add", &outside]);
        ip(&[
            "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns", &outside,
        ]);
        ip(&["addr", "add", "192.0.2.1/24", "dev", "uplink0"]);
        ip(&["link", "set", "uplink0", "up"]);
        ip(&["-n", &outside, "addr", "add", "192.0.2.2/24", "dev", "eth0"]);
        ip(&["-n", &outside, "link", "set", "eth0", "up"]);
        let target = SocketAddr::new(address.into(), 8080);
        let published = networks
            .publish(Protocol::Tcp, "0.0.0.0:18111".parse().unwrap(), target)
            .unwrap();
        assert!(published.translated());
        let fetch = |to: &'static str| {
            move || {
                let mut stream =
                    TcpStream::connect_timeout(&to.parse().unwrap(), Duration::from_secs(3))?;
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut reply = [0u8; 2];
                stream.read_exact(&mut reply)?;
                Ok::<_, std::io::Error>(reply)
            }
        };
        assert_eq!(
            in_netns(&outside, fetch("192.0.2.1:18111")).unwrap(),
            *b"hi"
        );
        assert_eq!(fetch("127.0.0.1:18111")().unwrap(), *b"hi");
        let seen: Vec<IpAddr> = peers.lock().unwrap().clone();
        assert_eq!(
            seen,
            [IpAddr::from([192, 0, 2, 2]), IpAddr::from([10, 99, 0, 1])],
            "the outside client's own address, then the proxy's"
        );
        drop(published);
        assert!(
            in_netns(&outside, fetch("192.0.2.1:18111")).is_err(),
            "closed with its handle, translation included"
        );
        ip(&["netns", "del", &outside]);
        // A tap of no attached group sends nothing.
        networks.detach(DEFAULT_NETWORK, "web", address).unwrap();
        assert_eq!(reach(&guest), (None, false), "a detached tap is closed");
        ip(&["netns", "del", &guest]);
        drop(service);
    });
}
