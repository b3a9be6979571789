//! The network for real, inside a network namespace of the test's own (a
//! thread that unshares one): the bridge, published TCP and UDP ports,
//! and the DNS responder. Skipped where namespaces cannot be made.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use capsa_network::{Network, NetworkConfig, NetworkError, Protocol};

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

fn start() -> Network {
    Network::start(NetworkConfig {
        bridge: "capsa-t0".into(),
        subnet: "10.99.0.0/24".parse().unwrap(),
        upstream_dns: Vec::new(),
    })
    .unwrap()
}

#[test]
fn the_bridge_is_made_once_with_the_gateway() {
    in_private_netns(|| {
        let network = start();
        assert_eq!(network.gateway(), Ipv4Addr::new(10, 99, 0, 1));
        let shown = Command::new("ip")
            .args(["-o", "addr", "show", "dev", "capsa-t0"])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout);
        assert!(shown.contains("10.99.0.1/24"), "{shown}");
        let first = network.allocate([]).unwrap();
        assert_eq!(first, Ipv4Addr::new(10, 99, 0, 2));
        assert_eq!(
            network.allocate([first]).unwrap(),
            Ipv4Addr::new(10, 99, 0, 3)
        );
        let all: Vec<Ipv4Addr> = (2..=254).map(|d| Ipv4Addr::new(10, 99, 0, d)).collect();
        assert!(matches!(
            network.allocate(all),
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
        network.register_name("web", Ipv4Addr::new(10, 99, 0, 7));
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
        network.forget_name("web");
        client.send_to(&query, "10.99.0.1:53").unwrap();
        let n = client.recv(&mut buffer).unwrap();
        assert_eq!(buffer[3] & 0x0f, 3, "NXDOMAIN once forgotten ({n} bytes)");
    });
}
