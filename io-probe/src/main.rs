//! `capsa-io-probe`: drives a Capsa microVM's virtio devices from both
//! sides, for the integration tests and the device benchmarks.
//!
//! As PID 1 of a test VM (`rdinit=/bin/capsa-io-probe -- STEP...`) it runs
//! guest steps (see `guest.rs`). On the host it is the other end:
//!
//! ```text
//! capsa-io-probe fill FILE LEN SEED          write LEN pattern bytes
//! capsa-io-probe verify FILE LEN SEED        check them
//! capsa-io-probe serve-unix PATH COUNT       serve COUNT streams on a Unix socket
//! capsa-io-probe serve-tcp ADDR COUNT        the same over TCP
//! capsa-io-probe connect-vsock PATH PORT STREAMS BYTES
//!                                            STREAMS echo streams into the guest
//! capsa-io-probe bulk-unix BYTES             reference: sink + generate over a socketpair
//! capsa-io-probe blk-bench FILE MIB OPS      reference: the guest's disk benchmark on a host file
//! ```

mod guest;
mod pattern;
mod stream;
mod vsock;

use std::fs::{File, OpenOptions};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use pattern::{read_and_check, write_pattern};
use stream::Mode;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::process::id() == 1 {
        guest::run(&args);
    }
    match host(&args) {
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("capsa-io-probe: {e:#}");
            std::process::exit(1);
        }
    }
}

fn arg<'a>(args: &'a [String], index: usize, what: &str) -> Result<&'a str> {
    args.get(index)
        .map(String::as_str)
        .with_context(|| format!("missing argument: {what}"))
}

fn num(args: &[String], index: usize, what: &str) -> Result<u64> {
    let text = arg(args, index, what)?;
    text.parse()
        .with_context(|| format!("{what}: bad number {text:?}"))
}

fn host(args: &[String]) -> Result<String> {
    let command = arg(args, 0, "command")?;
    match command {
        "fill" => {
            let (path, len, seed) = (
                arg(args, 1, "FILE")?,
                num(args, 2, "LEN")?,
                num(args, 3, "SEED")?,
            );
            fill(Path::new(path), len, seed)?;
            Ok(format!("fill: {len} bytes"))
        }
        "verify" => {
            let (path, len, seed) = (
                arg(args, 1, "FILE")?,
                num(args, 2, "LEN")?,
                num(args, 3, "SEED")?,
            );
            verify(Path::new(path), len, seed)?;
            Ok(format!("verify: {len} bytes match"))
        }
        "serve-unix" => {
            let (path, count) = (arg(args, 1, "PATH")?, num(args, 2, "COUNT")?);
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path).with_context(|| format!("binding {path}"))?;
            serve_all(count, || Ok(listener.accept()?.0))?;
            Ok(format!("serve-unix: served {count} streams"))
        }
        "serve-tcp" => {
            let (addr, count) = (arg(args, 1, "ADDR")?, num(args, 2, "COUNT")?);
            let listener =
                std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            serve_all(count, || Ok(listener.accept()?.0))?;
            Ok(format!("serve-tcp: served {count} streams"))
        }
        "connect-vsock" => {
            let path = arg(args, 1, "PATH")?.to_string();
            let port = num(args, 2, "PORT")? as u32;
            let (streams, bytes) = (num(args, 3, "STREAMS")?, num(args, 4, "BYTES")?);
            stream::echo_streams(streams, bytes, 2000, move || {
                // The guest may still be booting: retry until it listens.
                Ok(capsa_protocol::vmm_socket::connect_patiently(
                    Path::new(&path),
                    port,
                    Duration::from_secs(120),
                )?)
            })?;
            Ok(format!(
                "connect-vsock: {streams} streams of {bytes} bytes echoed intact"
            ))
        }
        "bulk-unix" => {
            let bytes = num(args, 1, "BYTES")?;
            let mut rates = Vec::new();
            for mode in [Mode::Sink, Mode::Generate] {
                let (client, server) = UnixStream::pair()?;
                let handle = std::thread::spawn(move || stream::serve(server));
                let t = stream::request(client, mode, bytes, 9)?;
                handle
                    .join()
                    .map_err(|_| anyhow::anyhow!("server panicked"))??;
                rates.push(t.mib_per_s());
            }
            Ok(format!(
                "bulk-unix: bytes={bytes} send_mib_s={:.1} receive_mib_s={:.1}",
                rates[0], rates[1]
            ))
        }
        "blk-bench" => {
            let (path, mib, ops) = (
                arg(args, 1, "FILE")?,
                num(args, 2, "MIB")?,
                num(args, 3, "OPS")?,
            );
            Ok(format!("blk-bench: {}", guest::bench_file(path, mib, ops)?))
        }
        other => bail!("unknown command {other:?} (see the source's header for usage)"),
    }
}

/// Accepts `count` streams and serves each on its own thread.
fn serve_all<S: stream::Duplex>(count: u64, mut accept: impl FnMut() -> Result<S>) -> Result<()> {
    let mut handles = Vec::new();
    for _ in 0..count {
        let conn = accept()?;
        handles.push(std::thread::spawn(move || stream::serve(conn)));
    }
    let mut failures = Vec::new();
    for handle in handles {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(_) => failures.push("a server thread panicked".into()),
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {count} streams failed: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

fn fill(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    write_pattern(&mut file, len, seed)?;
    file.sync_all()?;
    Ok(())
}

fn verify(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if let Some(at) = read_and_check(&mut file, len, seed)? {
        bail!("{} byte {at} is not what the guest wrote", path.display());
    }
    Ok(())
}
