//! TCP throughput into a group: through its published port (from another
//! host, translated by the packet filter's DNAT, and from the host itself,
//! through the daemon's userspace proxy), straight to its address on the
//! bridge, and host loopback as the reference. A target may be measured
//! from a named network namespace (`@NETNS`), which plays the other host. The sink (`capsa-bench sink`, run in the
//! group) reads to the end and answers how much it got, so a run is timed
//! until every byte has arrived.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::stats::{cell, Summary};

#[derive(Args)]
pub struct NetworkArgs {
    /// NAME=ADDRESS:PORT[@NETNS] of a sink to measure (repeatable),
    /// connected to from network namespace NETNS (`ip netns`) if given.
    #[arg(long = "target", value_parser = parse_target)]
    targets: Vec<Target>,
    /// MiB sent per run.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct SinkArgs {
    #[arg(long, default_value = "0.0.0.0:5001")]
    listen: SocketAddr,
}

#[derive(Debug, Clone)]
struct Target {
    name: String,
    address: SocketAddr,
    netns: Option<String>,
}

fn parse_target(text: &str) -> Result<Target, String> {
    let (name, rest) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=ADDRESS:PORT[@NETNS]"))?;
    let (address, netns) = match rest.split_once('@') {
        Some((address, netns)) if !netns.is_empty() && !netns.contains('/') => {
            (address, Some(netns.to_string()))
        }
        Some(_) => return Err(format!("{rest:?}: a namespace is a name under /run/netns")),
        None => (rest, None),
    };
    let address = address.parse().map_err(|e| format!("{address:?}: {e}"))?;
    Ok(Target {
        name: name.to_string(),
        address,
        netns,
    })
}

/// `transfer`, from network namespace `netns` if given (on a thread of its
/// own, which alone enters it).
fn transfer_from(netns: Option<&str>, address: SocketAddr, bytes: u64) -> Result<f64> {
    let Some(netns) = netns else {
        return transfer(address, bytes);
    };
    let path = format!("/run/netns/{netns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                use std::os::fd::AsRawFd;
                // SAFETY: setns only reads the descriptor, which `file`
                // keeps open; it moves this thread alone.
                let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if entered != 0 {
                    bail!("entering {path}: {}", std::io::Error::last_os_error());
                }
                transfer(address, bytes)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the transfer from {netns} panicked"))?
    })
}

/// Accepts connections one after another, each read to its end, and
/// answers each with the byte count (8 bytes, little-endian).
pub fn sink(args: &SinkArgs) -> Result<()> {
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("binding {}", args.listen))?;
    eprintln!("sink: listening on {}", listener.local_addr()?);
    serve(listener);
    Ok(())
}

fn serve(listener: TcpListener) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut buffer = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        let _ = stream.write_all(&total.to_le_bytes());
    }
}

/// One timed transfer of `bytes` to the sink at `address`, in MB/s.
fn transfer(address: SocketAddr, bytes: u64) -> Result<f64> {
    let chunk = vec![0x5au8; 256 * 1024];
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(10))
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut answer = [0u8; 8];
    stream
        .read_exact(&mut answer)
        .with_context(|| format!("{address} did not say how much it got"))?;
    let seconds = started.elapsed().as_secs_f64();
    let got = u64::from_le_bytes(answer);
    ensure!(got == bytes, "{address} got {got} of {bytes} bytes");
    Ok(bytes as f64 / seconds / 1e6)
}

#[derive(Serialize)]
struct Row {
    path: String,
    address: String,
    mb_per_s: Option<Summary>,
    error: Option<String>,
}

pub fn run(args: &NetworkArgs) -> Result<()> {
    if args.runs == 0 || args.mib == 0 {
        bail!("--runs and --mib must be above 0");
    }
    let bytes = args.mib << 20;
    // The reference: a sink on host loopback.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let loopback = listener.local_addr()?;
    std::thread::spawn(move || serve(listener));
    let mut targets = vec![Target {
        name: "host loopback".to_string(),
        address: loopback,
        netns: None,
    }];
    targets.extend(args.targets.iter().cloned());
    let mut rows = Vec::new();
    for target in targets {
        let mut samples = Vec::new();
        let mut error = None;
        for _ in 0..args.runs {
            match transfer_from(target.netns.as_deref(), target.address, bytes) {
                Ok(rate) => samples.push(rate),
                Err(e) => {
                    error = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        rows.push(Row {
            path: target.name,
            address: match &target.netns {
                Some(netns) => format!("{} from {netns}", target.address),
                None => target.address.to_string(),
            },
            mb_per_s: Summary::of(&samples),
            error,
        });
    }
    println!(
        "TCP throughput into a group, {} MiB per run, {} runs, MB/s median (min-max)",
        args.mib, args.runs
    );
    println!("{:<34} {:<34} {:>26}", "path", "address", "MB/s");
    for row in &rows {
        let figure = match &row.error {
            Some(e) => format!("failed: {e}"),
            None => cell(&row.mb_per_s),
        };
        println!("{:<34} {:<34} {:>26}", row.path, row.address, figure);
    }
    let json = args
        .json
        .clone()
        .unwrap_or_else(|| crate::default_json("network"));
    crate::write_json(&json, &rows)?;
    if let Some(row) = rows.iter().find(|r| r.error.is_some()) {
        bail!("{} failed", row.path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_is_timed_until_the_sink_has_everything() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || serve(listener));
        let rate = transfer(address, 4 << 20).unwrap();
        assert!(rate > 0.0);
        assert!(parse_target("direct=10.88.0.2:5001").is_ok());
        assert!(parse_target("10.88.0.2:5001").is_err());
        let far = parse_target("dnat=192.0.2.1:15001@peer").unwrap();
        assert_eq!(far.netns.as_deref(), Some("peer"));
        assert!(parse_target("dnat=192.0.2.1:15001@../x").is_err());
        assert!(parse_target("dnat=192.0.2.1:15001@").is_err());
    }
}
