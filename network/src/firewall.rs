//! The host's packet filter for group networks, in nftables (through the
//! `nft` program, one transaction per change). Each daemon owns two tables
//! named after it:
//!
//! - `bridge`: a frame that enters one of the daemon's bridges from a tap
//!   must carry that tap's group's MAC, and its ARP and IPv4 that group's
//!   address; everything else a guest sends (IPv6 with its neighbour
//!   messages and router advertisements, other ether types, spoofed ARP
//!   answers) is dropped. A tap can so teach its bridge one MAC, no more.
//! - `inet`: the host is closed to guests but for their own gateway's DNS
//!   and the replies of connections the host made; nothing is routed into
//!   a network but replies (and published ports' translated connections);
//!   a network with egress sends out, masqueraded, and one without sends
//!   nothing beyond its bridge. A port published on a host address other
//!   than loopback is translated (DNAT) to its group, so the service sees
//!   the client's real address; loopback stays with the userspace proxy.
//!
//! The tables are built afresh when the daemon starts; after that only the
//! elements of their sets change, one network or one tap at a time.
//!
//! Which frames are the daemon's is told by the bridge they enter (`meta
//! ibrname`, nft_meta_bridge). A kernel built without that module gets the
//! same rules for every port named like a group's tap (`capsa*`), which
//! holds this daemon's taps as well but also refuses the taps of a second
//! daemon on the same host; the daemon says so when it starts.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};

use capsa_vmm_config::MacAddr;
use ipnet::Ipv4Net;

use crate::NetworkError;

/// A group network as the filter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub egress: bool,
}

/// A group's tap, held to its group's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub tap: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
}

pub struct Firewall {
    table: String,
    /// Set when the kernel cannot tell a frame's bridge (see above).
    by_tap_name: std::sync::atomic::AtomicBool,
}

/// Connections at once to one published port on the DNAT path, as the
/// proxy caps its own (more are dropped).
pub const DNAT_CONNECTIONS: usize = 1024;

/// Interface names go into the rules quoted: only what an interface may be
/// called by us.
fn check_ifname(name: &str) -> Result<&str, NetworkError> {
    let fine = !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if fine {
        Ok(name)
    } else {
        Err(NetworkError::Firewall {
            what: format!("naming interface {name:?}"),
            message: "an interface name here is 1 to 15 letters, digits, '-', '_' or '.'".into(),
        })
    }
}

impl Firewall {
    /// The filter of the daemon whose default bridge is `bridge`.
    pub fn new(bridge: &str) -> Result<Self, NetworkError> {
        let name = check_ifname(bridge)?;
        let table = format!(
            "capsa_{}",
            name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        Ok(Firewall {
            table,
            by_tap_name: Default::default(),
        })
    }

    /// Whether the taps are told by their names rather than their bridge.
    pub fn by_tap_name(&self) -> bool {
        self.by_tap_name.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Replaces the daemon's tables with ones that hold `segments` and no
    /// tap: every tap is closed until it is added.
    pub fn reset(&self, segments: &[Segment]) -> Result<(), NetworkError> {
        let by_bridge = "meta ibrname != @bridges accept".to_string();
        match self.build(segments, &by_bridge) {
            Err(NetworkError::Firewall { message, .. }) if message.contains("not supported") => {
                let by_name = format!("iifname != \"{}*\" accept", crate::TAP_PREFIX);
                self.build(segments, &by_name)?;
                self.by_tap_name
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            built => built,
        }
    }

    fn build(&self, segments: &[Segment], ours: &str) -> Result<(), NetworkError> {
        let t = &self.table;
        let mut script = String::new();
        // Declaring a table first makes deleting it safe when it is new.
        let _ = writeln!(script, "table bridge {t} {{}}\ndelete table bridge {t}");
        let _ = writeln!(script, "table inet {t} {{}}\ndelete table inet {t}");
        let _ = writeln!(
            script,
            r#"table bridge {t} {{
    set bridges {{ type ifname; }}
    set port_macs {{ type ifname . ether_addr; }}
    set port_ips {{ type ifname . ipv4_addr; }}
    chain prerouting {{
        type filter hook prerouting priority -300; policy accept;
        {ours}
        iifname . ether saddr != @port_macs counter drop
        ether type arp iifname . arp saddr ether != @port_macs counter drop
        ether type arp iifname . arp saddr ip != @port_ips counter drop
        ether type ip iifname . ip saddr != @port_ips counter drop
        ether type != {{ ip, arp }} counter drop
    }}
}}
table inet {t} {{
    set bridges {{ type ifname; }}
    set within {{ type ifname . ifname; }}
    set dns {{ type ifname . ipv4_addr; }}
    set egress {{ type ipv4_addr; flags interval; }}
    set dnat_conns {{ type ipv4_addr . inet_service; size 65535; flags dynamic; }}
    map tcp_any {{ type inet_service : ipv4_addr . inet_service; }}
    map tcp_at {{ type ipv4_addr . inet_service : ipv4_addr . inet_service; }}
    map udp_any {{ type inet_service : ipv4_addr . inet_service; }}
    map udp_at {{ type ipv4_addr . inet_service : ipv4_addr . inet_service; }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        fib daddr type local dnat ip to tcp dport map @tcp_any
        dnat ip to ip daddr . tcp dport map @tcp_at
        fib daddr type local dnat ip to udp dport map @udp_any
        dnat ip to ip daddr . udp dport map @udp_at
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname != @bridges accept
        ct state established,related accept
        iifname . ip daddr @dns udp dport 53 accept
        counter drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname . oifname @within accept
        oifname @bridges ct state established,related accept
        oifname @bridges ct state new ct status dnat add @dnat_conns {{ ip daddr . th dport ct count over {DNAT_CONNECTIONS} }} counter drop
        oifname @bridges ct status dnat accept
        oifname @bridges counter drop
        iifname @bridges ct status dnat accept
        iifname @bridges ip saddr @egress accept
        iifname @bridges counter drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr @egress oifname != @bridges masquerade
    }}
}}"#
        );
        for segment in segments {
            segment_elements(&mut script, "add", t, segment)?;
        }
        self.apply(&script, "building its tables")
    }

    pub fn add_segment(&self, segment: &Segment) -> Result<(), NetworkError> {
        let what = format!("opening network {}", segment.bridge);
        self.change(&what, false, |script, verb| {
            segment_elements(script, verb, &self.table, segment)
        })
    }

    pub fn remove_segment(&self, segment: &Segment) -> Result<(), NetworkError> {
        let what = format!("closing network {}", segment.bridge);
        self.change(&what, true, |script, verb| {
            segment_elements(script, verb, &self.table, segment)
        })
    }

    pub fn add_port(&self, port: &Port) -> Result<(), NetworkError> {
        let what = format!("opening tap {}", port.tap);
        self.change(&what, false, |script, verb| {
            port_elements(script, verb, &self.table, port)
        })
    }

    pub fn remove_port(&self, port: &Port) -> Result<(), NetworkError> {
        let what = format!("closing tap {}", port.tap);
        self.change(&what, true, |script, verb| {
            port_elements(script, verb, &self.table, port)
        })
    }

    /// Translates what reaches `forward.listen` to `forward.target`.
    pub fn add_forward(&self, forward: &Forward) -> Result<(), NetworkError> {
        let what = format!("publishing {}", forward.listen);
        self.change(&what, false, |script, verb| {
            forward_element(script, verb, &self.table, forward);
            Ok(())
        })
    }

    pub fn remove_forward(&self, forward: &Forward) -> Result<(), NetworkError> {
        let what = format!("closing {}", forward.listen);
        self.change(&what, true, |script, verb| {
            forward_element(script, verb, &self.table, forward);
            Ok(())
        })
    }

    /// One transaction over some set elements: added, or removed (added
    /// first, so that deleting cannot fail for a missing element).
    fn change(
        &self,
        what: &str,
        remove: bool,
        elements: impl Fn(&mut String, &str) -> Result<(), NetworkError>,
    ) -> Result<(), NetworkError> {
        let mut script = String::new();
        elements(&mut script, "add")?;
        if remove {
            elements(&mut script, "delete")?;
        }
        self.apply(&script, what)
    }

    /// Deletes the daemon's tables (what a test cleans up with).
    pub fn remove(&self) -> Result<(), NetworkError> {
        let t = &self.table;
        let script = format!(
            "table bridge {t} {{}}\ndelete table bridge {t}\ntable inet {t} {{}}\ndelete table inet {t}\n"
        );
        self.apply(&script, "removing its tables")
    }

    fn apply(&self, script: &str, what: &str) -> Result<(), NetworkError> {
        let failed = |message: String| NetworkError::Firewall {
            what: what.to_string(),
            message,
        };
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("cannot run nft (nftables): {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(|e| failed(format!("writing to nft: {e}")))?;
        }
        let output = child
            .wait_with_output()
            .map_err(|e| failed(format!("waiting for nft: {e}")))?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first = stderr
            .lines()
            .find(|l| l.contains("Error"))
            .unwrap_or("nft failed without saying why");
        Err(failed(first.trim().chars().take(300).collect()))
    }
}

fn segment_elements(
    script: &mut String,
    verb: &str,
    table: &str,
    segment: &Segment,
) -> Result<(), NetworkError> {
    let bridge = check_ifname(&segment.bridge)?;
    let _ = writeln!(
        script,
        "{verb} element bridge {table} bridges {{ \"{bridge}\" }}"
    );
    let _ = writeln!(
        script,
        "{verb} element inet {table} bridges {{ \"{bridge}\" }}"
    );
    let _ = writeln!(
        script,
        "{verb} element inet {table} within {{ \"{bridge}\" . \"{bridge}\" }}"
    );
    let _ = writeln!(
        script,
        "{verb} element inet {table} dns {{ \"{bridge}\" . {} }}",
        segment.gateway
    );
    if segment.egress {
        let _ = writeln!(
            script,
            "{verb} element inet {table} egress {{ {} }}",
            segment.subnet.trunc()
        );
    }
    Ok(())
}

/// A published port on the DNAT path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub protocol: crate::Protocol,
    /// Its address; unspecified for every local address.
    pub listen: SocketAddrV4,
    pub target: SocketAddrV4,
}

impl Forward {
    /// The DNAT path serves a host address, not loopback (which only the
    /// host's own processes reach, through the proxy).
    pub fn serves(listen: &SocketAddr) -> Option<SocketAddrV4> {
        match listen {
            SocketAddr::V4(v4) if !v4.ip().is_loopback() => Some(*v4),
            _ => None,
        }
    }
}

fn forward_element(script: &mut String, verb: &str, table: &str, forward: &Forward) {
    let (target, port) = (forward.target.ip(), forward.target.port());
    let protocol = forward.protocol;
    let _ = if forward.listen.ip().is_unspecified() {
        writeln!(
            script,
            "{verb} element inet {table} {protocol}_any {{ {} : {target} . {port} }}",
            forward.listen.port()
        )
    } else {
        writeln!(
            script,
            "{verb} element inet {table} {protocol}_at {{ {} . {} : {target} . {port} }}",
            forward.listen.ip(),
            forward.listen.port()
        )
    };
}

fn port_elements(
    script: &mut String,
    verb: &str,
    table: &str,
    port: &Port,
) -> Result<(), NetworkError> {
    let tap = check_ifname(&port.tap)?;
    let _ = writeln!(
        script,
        "{verb} element bridge {table} port_macs {{ \"{tap}\" . {} }}",
        port.mac
    );
    let _ = writeln!(
        script,
        "{verb} element bridge {table} port_ips {{ \"{tap}\" . {} }}",
        port.ip
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_break_a_rule_are_refused() {
        assert!(Firewall::new("capsa0").is_ok());
        assert_eq!(
            Firewall::new("br-x.1").map(|f| f.table).ok(),
            Some("capsa_br_x_1".into())
        );
        for bad in [
            "",
            "a\"b",
            "x y",
            "a;b",
            "sixteen-letters!",
            "toolongforaniface",
        ] {
            assert!(Firewall::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_segment_without_egress_adds_no_egress_element() {
        let segment = Segment {
            bridge: "capsa0".into(),
            gateway: Ipv4Addr::new(10, 88, 0, 1),
            subnet: "10.88.0.0/24".parse().unwrap(),
            egress: false,
        };
        let mut script = String::new();
        segment_elements(&mut script, "add", "t", &segment).unwrap();
        assert!(!script.contains("egress"));
        assert!(script.contains("dns { \"capsa0\" . 10.88.0.1 }"));
        let mut script = String::new();
        segment_elements(
            &mut script,
            "add",
            "t",
            &Segment {
                egress: true,
                ..segment
            },
        )
        .unwrap();
        assert!(script.contains("egress { 10.88.0.0/24 }"));
    }
}
