//! The `networks` suite: tenant networks against real microVMs. Two
//! groups of one network talk by name; a group of another network reaches
//! neither them nor their DNS (TCP, UDP, ICMP, ARP); a privileged guest
//! that takes a neighbour's address, changes its MAC or claims the gateway
//! reaches no one and disturbs no one; the host's services are closed to
//! guests; egress reaches an emulated upstream server only where the
//! network has it; and after a daemon restart and the groups' and
//! networks' removal no filter element, tap or address is left.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{ensure, Context, Result};
use capsa_api::NetworkView;
use hyper::Method;

use super::harness::{Capsad, NETNS};
use super::netns::{
    Server, Upstream, ROUTER_ADDRESS, ROUTER_NETNS, UPLINK_ADDRESS, UPSTREAM_PAGE, UPSTREAM_URL,
};
use crate::suite::Suite;

/// Shell helpers for the probes: each prints `KEY=RESULT`. A probe that
/// fails for any reason but the one tested (a tool that crashes or is
/// missing, a bad option) prints `broken-…`, which no check accepts.
/// Busybox 1.35's `wget -T` crashes (SIGSEGV), so `timeout` bounds wget.
const PROBES: &str = r#"
t() { r=$(timeout 5 wget -q -O - "$2" 2>/dev/null); c=$?; case $c in 0) echo "$1=$r";; 1|143) echo "$1=unreachable";; *) echo "$1=broken-$c";; esac; }
p() { ping -c 1 -W 2 "$2" >/dev/null 2>&1; c=$?; case $c in 0) echo "$1=reachable";; 1) echo "$1=unreachable";; *) echo "$1=broken-$c";; esac; }
n() { o=$(nslookup "$2" $3 2>&1); case "$o" in *"Name:"*) echo "$1=resolved";; *"can't find"*|*"timed out"*) echo "$1=unresolved";; *) echo "$1=broken";; esac; }
a() { arping -c 2 -w 3 -I eth0 "$2" >/dev/null 2>&1; c=$?; case $c in 0) echo "$1=reachable";; 1) echo "$1=unreachable";; *) echo "$1=broken-$c";; esac; }
"#;

/// a1's port, published on every host address.
const PUBLISHED_PORT: u16 = 18081;

/// a1: a page, and a CGI that prints the client's address as the service
/// sees it.
const A1_SERVER: &str = r#"mkdir -p /www/cgi-bin && echo served-by-a1 > /www/index.html
printf '#!/bin/sh\necho Content-Type: text/plain\necho\necho $REMOTE_ADDR\n' > /www/cgi-bin/peer
chmod +x /www/cgi-bin/peer && exec httpd -f -p 80 -h /www"#;

/// A port nothing but the suite's own server listens on.
const HOST_SERVICE_PORT: u16 = 18099;

type Results = BTreeMap<String, String>;

fn parse(stdout: &str) -> Results {
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Runs `script` (after the probe helpers) in a group of its own on
/// `network` (its main process, with Docker's default capabilities).
fn probe(d: &Capsad, network: &str, script: &str) -> Result<Results> {
    let out = d.capsa(&[
        "run",
        "--rm",
        "--network",
        network,
        "busybox",
        "sh",
        "-c",
        &format!("{PROBES}{script}"),
    ])?;
    ensure!(
        out.code == Some(0),
        "a probe on {network}: {}",
        out.describe()
    );
    Ok(parse(&out.stdout))
}

/// Ok when every key of `wanted` has its value in `got`.
fn expect(got: &Results, wanted: &[(&str, &str)]) -> Result<String> {
    let wrong: Vec<String> = wanted
        .iter()
        .filter(|(k, v)| got.get(*k).map(String::as_str) != Some(*v))
        .map(|(k, v)| format!("{k}: wanted {v}, got {:?}", got.get(*k)))
        .collect();
    ensure!(wrong.is_empty(), "{}; all: {got:?}", wrong.join("; "));
    Ok(format!("{got:?}"))
}

fn networks(d: &Capsad) -> Result<Vec<NetworkView>> {
    d.client()?.call(Method::GET, "/v1/networks", None)
}

fn network(d: &Capsad, name: &str) -> Result<NetworkView> {
    d.client()?
        .call(Method::GET, &format!("/v1/networks/{name}"), None)
}

fn address(d: &Capsad, group: &str) -> Result<Ipv4Addr> {
    d.group(group)?
        .ip
        .with_context(|| format!("group {group} has no address"))
}

/// What capsad leaves in its namespace: the filter's set elements, the
/// group taps and created networks' bridges, and their addresses.
#[derive(Debug, PartialEq, Eq)]
struct Leftovers {
    elements: usize,
    links: Vec<String>,
    addresses: Vec<String>,
}

fn leftovers(d: &Capsad) -> Result<Leftovers> {
    let mut elements = 0;
    for family in ["bridge", "inet"] {
        let args: Vec<std::ffi::OsString> = ["-j", "list", "table", family, "capsa_capsa0"]
            .iter()
            .map(Into::into)
            .collect();
        let command = d
            .artifacts
            .command_in(Some(NETNS), &d.artifacts.tool("nft"), &args);
        let run = crate::vm::run(command, std::time::Duration::from_secs(20))?;
        ensure!(run.status == Some(0), "nft list: {}", run.tail(5));
        let json: serde_json::Value = serde_json::from_str(&run.stdout).context("nft's JSON")?;
        for item in json["nftables"].as_array().into_iter().flatten() {
            elements += item["set"]["elem"].as_array().map_or(0, Vec::len);
        }
    }
    let ip = |args: &[&str]| -> Result<String> {
        let mut all: Vec<std::ffi::OsString> = vec!["-n".into(), NETNS.into()];
        all.extend(args.iter().map(Into::into));
        let mut command = std::process::Command::new(&d.artifacts.ip);
        command.args(&all);
        Ok(crate::vm::run(command, std::time::Duration::from_secs(10))?.stdout)
    };
    let links = ip(&["-o", "link"])?
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| n.starts_with("capsa") && n != "capsa0")
        .collect();
    let addresses = ip(&["-o", "-4", "addr"])?
        .lines()
        .filter(|l| l.contains(" 10.89."))
        .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
        .collect();
    Ok(Leftovers {
        elements,
        links,
        addresses,
    })
}

/// a2 fetches a1's page by name (retried while the httpd starts).
fn a1_page(d: &Capsad) -> Result<String> {
    let mut last = Results::new();
    for _ in 0..3 {
        last = probe(
            d,
            "blue",
            "n name a1; t page http://a1/; echo \"why=$(timeout 5 wget -O /dev/null http://a1/ 2>&1 | tail -1)\"; echo \"neigh=$(ip neigh | tr '\\n' ' ')\"",
        )?;
        if last.get("page").map(String::as_str) == Some("served-by-a1") {
            break;
        }
    }
    expect(&last, &[("name", "resolved"), ("page", "served-by-a1")]).map_err(|e| with_drops(d, e))
}

/// What the filter dropped so far, for a failed check's detail.
fn with_drops(d: &Capsad, e: anyhow::Error) -> anyhow::Error {
    let args: Vec<std::ffi::OsString> = ["list", "ruleset"].iter().map(Into::into).collect();
    let command = d
        .artifacts
        .command_in(Some(NETNS), &d.artifacts.tool("nft"), &args);
    let dropped = crate::vm::run(command, std::time::Duration::from_secs(20))
        .map(|run| {
            run.stdout
                .lines()
                .filter(|l| l.contains("counter packets") && !l.contains("packets 0 "))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .unwrap_or_default();
    let mut neigh = std::process::Command::new(&d.artifacts.ip);
    neigh.args(["-n", NETNS, "neigh"]);
    let neighbours = crate::vm::run(neigh, std::time::Duration::from_secs(10))
        .map(|run| run.stdout.replace('\n', " | "))
        .unwrap_or_default();
    e.context(format!(
        "filter drops: {dropped}; the host's neighbours: {neighbours}"
    ))
}

fn run_detached(d: &Capsad, args: &[&str]) -> Result<()> {
    let mut all = vec!["run", "-d"];
    all.extend_from_slice(args);
    let out = d.capsa(&all)?;
    ensure!(
        out.code == Some(0),
        "capsa {}: {}",
        all.join(" "),
        out.describe()
    );
    Ok(())
}

pub fn run(s: &mut Suite, d: &mut Capsad) -> Result<()> {
    super::tenants::configure(d)?;
    d.start()?;
    let import = d.import_busybox()?;
    ensure!(import.code == Some(0), "import: {}", import.describe());
    let baseline = leftovers(d)?;
    let upstream = Upstream::new(d.artifacts, NETNS)?;
    let host_service = Server::start(
        NETNS,
        &format!("0.0.0.0:{HOST_SERVICE_PORT}"),
        "host-service",
    )?;

    s.check("networks are made, each with a subnet of its own", || {
        for args in [
            &["network", "create", "blue", "--egress", "off"][..],
            &["network", "create", "red"],
        ] {
            let out = d.capsa(args)?;
            ensure!(out.code == Some(0), "{}", out.describe());
        }
        let all = networks(d)?;
        let names: Vec<&str> = all.iter().map(|n| n.name.as_str()).collect();
        ensure!(names == ["blue", "default", "red"], "{names:?}");
        let subnets: std::collections::BTreeSet<&str> =
            all.iter().map(|n| n.subnet.as_str()).collect();
        ensure!(subnets.len() == 3, "{all:?}");
        let blue = network(d, "blue")?;
        ensure!(!blue.egress && network(d, "red")?.egress, "{all:?}");
        Ok(format!("{all:?}"))
    });
    run_detached(
        d,
        &[
            "--name",
            "a1",
            "--network",
            "blue",
            "-p",
            &format!("0.0.0.0:{PUBLISHED_PORT}:80"),
            "busybox",
            "sh",
            "-c",
            A1_SERVER,
        ],
    )?;
    run_detached(
        d,
        &[
            "--name",
            "a2",
            "--network",
            "blue",
            "busybox",
            "sleep",
            "3600",
        ],
    )?;
    run_detached(
        d,
        &[
            "--name",
            "r1",
            "--network",
            "red",
            "busybox",
            "sleep",
            "3600",
        ],
    )?;
    let (a1, a2, r1) = (address(d, "a1")?, address(d, "a2")?, address(d, "r1")?);
    let (blue, red) = (network(d, "blue")?, network(d, "red")?);

    s.check("two groups on one network talk by name", || a1_page(d));
    s.check(
        "a group of another network reaches neither them nor their DNS (TCP, UDP, ICMP, ARP)",
        || {
            let got = probe(
                d,
                "red",
                &format!(
                    "n name a1; n their-dns a1 {}; t tcp http://{a1}/; p icmp {a1}; a arp {a1}",
                    blue.gateway
                ),
            )?;
            let back = probe(d, "blue", &format!("p icmp {r1}; t tcp http://{r1}/"))?;
            expect(&back, &[("icmp", "unreachable"), ("tcp", "unreachable")])?;
            expect(
                &got,
                &[
                    ("name", "unresolved"),
                    ("their-dns", "unresolved"),
                    ("tcp", "unreachable"),
                    ("icmp", "unreachable"),
                    ("arp", "unreachable"),
                ],
            )
        },
    );
    s.check(
        "a guest opens no TCP connection to a host service on 0.0.0.0 (its gateway's DNS answers)",
        || {
            let port = HOST_SERVICE_PORT;
            let blue_try = probe(
                d,
                "blue",
                &format!(
                    "n dns a1; t gateway http://{}:{port}/; t uplink http://{UPLINK_ADDRESS}:{port}/; t other-gateway http://{}:{port}/",
                    blue.gateway, red.gateway
                ),
            )?;
            let red_try = probe(
                d,
                "red",
                &format!(
                    "t gateway http://{}:{port}/; t uplink http://{UPLINK_ADDRESS}:{port}/",
                    red.gateway
                ),
            )?;
            expect(
                &blue_try,
                &[
                    ("dns", "resolved"),
                    ("gateway", "unreachable"),
                    ("uplink", "unreachable"),
                    ("other-gateway", "unreachable"),
                ],
            )?;
            expect(
                &red_try,
                &[("gateway", "unreachable"), ("uplink", "unreachable")],
            )?;
            let peers = host_service.peers();
            ensure!(peers.is_empty(), "the host service was reached by {peers:?}");
            Ok(format!("{blue_try:?} {red_try:?}"))
        },
    );
    s.check(
        "with egress a group fetches a page from the upstream server; without, it cannot",
        || {
            let out = probe(
                d,
                "red",
                &format!("t up {UPSTREAM_URL}; echo \"route=$(ip route | tr '\\n' ' ')\""),
            )?;
            let closed = probe(d, "blue", &format!("t up {UPSTREAM_URL}"))?;
            expect(&out, &[("up", UPSTREAM_PAGE)]).map_err(|e| with_drops(d, e))?;
            expect(&closed, &[("up", "unreachable")])?;
            let peers = upstream.server.peers();
            ensure!(
                peers.len() == 1 && peers[0].ip().to_string() == UPLINK_ADDRESS,
                "the server saw {peers:?}: one connection, masqueraded to {UPLINK_ADDRESS}"
            );
            Ok(format!("served {peers:?}"))
        },
    );
    s.check(
        "a privileged guest that takes a neighbour's address or MAC or claims the gateway reaches no one, and the neighbour is unaffected",
        || {
            let gateway = blue.gateway;
            let script = format!(
                "{PROBES}
                n before-dns a1
                own=$(ip -4 -o addr show dev eth0 | awk '{{print $4}}')
                mac=$(cat /sys/class/net/eth0/address)
                ip addr flush dev eth0; ip addr add {a1}/24 dev eth0; ip route add default via {gateway}
                arping -U -c 2 -I eth0 -s {a1} {a1} >/dev/null 2>&1
                echo ip-now=$(ip -4 -o addr show dev eth0 | awk '{{print $4}}')
                n as-neighbour-dns a1; p as-neighbour-icmp {a2}
                ip addr flush dev eth0; ip addr add $own dev eth0; ip route add default via {gateway}
                n dns-ip-back a1
                setmac() {{ ip link set eth0 down; ip link set eth0 address $1 2>/dev/null || ifconfig eth0 hw ether $1; ip link set eth0 up; ip route add default via {gateway} 2>/dev/null; }}
                setmac 02:ca:95:ff:ff:66
                echo mac-now=$(cat /sys/class/net/eth0/address)
                n other-mac-dns a1; p other-mac-icmp {a2}
                setmac $mac
                echo mac-back=$(cat /sys/class/net/eth0/address)
                n dns-mac-back a1
                echo \"neigh-mac-back=$(ip neigh | tr '\\n' ' ')\"
                ip addr add {gateway}/32 dev eth0
                arping -U -c 3 -I eth0 -s {gateway} {gateway} >/dev/null 2>&1
                ip addr del {gateway}/32 dev eth0
                n honest-dns a1
                echo \"end-neigh=$(ip neigh | tr '\\n' ' ')\"; echo \"end-route=$(ip route | tr '\\n' ' ')\"; echo \"end-addr=$(ip -4 -o addr | tr '\\n' ' ')\""
            );
            let out = d.capsa(&[
                "run", "--rm", "--name", "evil", "--network", "blue", "--cap-add", "NET_ADMIN",
                "--cap-add", "NET_RAW", "busybox", "sh", "-c", &script,
            ])?;
            ensure!(out.code == Some(0), "{}", out.describe());
            let evil = parse(&out.stdout);
            expect(
                &evil,
                &[
                    ("before-dns", "resolved"),
                    ("as-neighbour-dns", "unresolved"),
                    ("as-neighbour-icmp", "unreachable"),
                    ("other-mac-dns", "unresolved"),
                    ("other-mac-icmp", "unreachable"),
                    ("dns-ip-back", "resolved"),
                    ("dns-mac-back", "resolved"),
                    ("honest-dns", "resolved"),
                    ("ip-now", &format!("{a1}/24")),
                    ("mac-now", "02:ca:95:ff:ff:66"),
                ],
            )
            .map_err(|e| with_drops(d, e))?;
            let after = a1_page(d)?;
            Ok(format!("{evil:?}; then a2: {after}"))
        },
    );
    s.check(
        "a published port shows the service the client's own address (DNAT), and the host's own clients get through the proxy",
        || {
            let fetch = |netns: &str, host: &str| -> Result<String> {
                let url = format!("http://{host}:{PUBLISHED_PORT}/cgi-bin/peer");
                let args: Vec<std::ffi::OsString> =
                    ["-sf", "--max-time", "5", url.as_str()].iter().map(Into::into).collect();
                let command = d
                    .artifacts
                    .command_in(Some(netns), &d.artifacts.tool("curl"), &args);
                let run = crate::vm::run(command, std::time::Duration::from_secs(10))?;
                ensure!(run.status == Some(0), "curl {url} in {netns}: {}", run.tail(3));
                Ok(run.stdout.trim().to_string())
            };
            let remote = fetch(ROUTER_NETNS, UPLINK_ADDRESS)?;
            ensure!(remote == ROUTER_ADDRESS, "the service saw {remote:?}, not {ROUTER_ADDRESS}");
            let local = fetch(NETNS, "127.0.0.1")?;
            ensure!(
                local == blue.gateway.to_string(),
                "through the proxy the service saw {local:?}, not the gateway"
            );
            Ok(format!("from the router: {remote}; from the host: {local} (proxy)"))
        },
    );
    let refused = d.capsa(&["network", "rm", "blue"])?;
    d.kill();
    d.start()?;
    s.check(
        "a network with groups is not removed; a restarted capsad keeps the networks and their groups' paths",
        || {
            ensure!(refused.code == Some(125), "{}", refused.describe());
            let names: Vec<String> = networks(d)?.into_iter().map(|n| n.name).collect();
            ensure!(names == ["blue", "default", "red"], "{names:?}");
            a1_page(d)
        },
    );
    super::tenants::run(s, d)?;
    s.check(
        "no filter element, tap, bridge or address is left after the groups, the networks and 50 network cycles",
        || {
            for group in ["a1", "a2", "r1"] {
                for verb in ["stop", "rm"] {
                    let out = d.capsa(&[verb, group])?;
                    ensure!(out.code == Some(0), "{verb} {group}: {}", out.describe());
                }
            }
            for _ in 0..50 {
                for args in [&["network", "create", "cycle"][..], &["network", "rm", "cycle"]] {
                    let out = d.capsa(args)?;
                    ensure!(out.code == Some(0), "{}", out.describe());
                }
            }
            for name in ["blue", "red"] {
                let out = d.capsa(&["network", "rm", name])?;
                ensure!(out.code == Some(0), "{}", out.describe());
            }
            let left = leftovers(d)?;
            ensure!(left == baseline, "before: {baseline:?}; after: {left:?}");
            Ok(format!("{left:?}"))
        },
    );
    Ok(())
}
