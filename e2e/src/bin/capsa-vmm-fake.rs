//! A stand-in for a capsa-vmm whose guest has turned hostile, for the
//! hostile suite: it serves a group's vsock socket as capsa-vmm does
//! (`CONNECT <port>` answered `OK <port>`) and answers as an agent gone bad
//! would, in one of four ways (`--mode`):
//!
//! - `silent`: takes connections and never answers, not even the CONNECT;
//! - `garbage`: answers the CONNECT, then sends ttrpc frames with random
//!   bodies, random bytes, and hangs up;
//! - `unacked`: a working API (Version; WaitProcess never returns), whose
//!   output streams send line after line and never read the host's
//!   acknowledgements;
//! - `endless`: the same API, whose stdout stream sends `--bytes` bytes
//!   (2 GiB by default) without a newline, reading the acknowledgements.
//!
//! Its name holds "capsa-vmm", which is what capsad looks for in a VMM's
//! command line when it adopts one. It prints `listening` once the socket
//! is bound, and one line per output stream when that stream ends (`sent N
//! bytes, then ...`), for the suite to read.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use capsa_protocol::agent::{ProcessRequest, VersionRequest, VersionResponse, WaitProcessResponse};
use capsa_protocol::agent_ttrpc::{create_agent, Agent};
use capsa_protocol::stdio::{Resume, StreamHeader};
use capsa_protocol::{AGENT_VSOCK_PORT, API_VERSION, STDIO_VSOCK_PORT};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Silent,
    Garbage,
    Unacked,
    Endless,
}

#[derive(Parser)]
struct Args {
    /// The group's vsock socket (replaced).
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, value_enum)]
    mode: Mode,
    /// What `endless` sends without a newline.
    #[arg(long, default_value_t = 2 << 30)]
    bytes: u64,
}

/// The API the `unacked` and `endless` modes answer: enough for capsad to
/// adopt the group and attach its containers' output.
struct Api;

impl Agent for Api {
    fn version(
        &self,
        _: &ttrpc::TtrpcContext,
        _: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        Ok(VersionResponse {
            api_version: API_VERSION,
            agent_version: "capsa-vmm-fake".into(),
            ..Default::default()
        })
    }

    fn wait_process(
        &self,
        _: &ttrpc::TtrpcContext,
        _: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        // The container never ends (the suite kills this process).
        std::thread::sleep(Duration::from_secs(3600));
        Err(ttrpc::Error::Others("no exit".into()))
    }
}

/// A little xorshift: garbage needs no quality.
fn garbage(seed: &mut u64, out: &mut [u8]) {
    for byte in out {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *byte = *seed as u8;
    }
}

fn send_garbage(mut connection: UnixStream, port: u32) -> Result<()> {
    connection.write_all(format!("OK {port}\n").as_bytes())?;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(port);
    // Frames whose headers parse (length, stream id, type response) and
    // whose bodies are noise, then noise.
    for stream_id in (1u32..64).step_by(2) {
        let mut body = [0u8; 48];
        garbage(&mut seed, &mut body);
        connection.write_all(&(body.len() as u32).to_be_bytes())?;
        connection.write_all(&stream_id.to_be_bytes())?;
        connection.write_all(&[2, 0])?;
        connection.write_all(&body)?;
    }
    let mut noise = vec![0u8; 1 << 20];
    garbage(&mut seed, &mut noise);
    connection.write_all(&noise)?;
    Ok(())
}

/// Serves one stdio stream the way `mode` misbehaves.
fn serve_stream(mut connection: UnixStream, mode: Mode, bytes: u64) -> Result<String> {
    let mut reader = BufReader::new(connection.try_clone()?);
    let mut line = String::new();
    reader.by_ref().take(4096).read_line(&mut line)?;
    let (header, acked) = StreamHeader::parse(line.trim_end()).map_err(anyhow::Error::msg)?;
    connection.write_all(b"OK\n")?;
    let Some(resume) = acked else {
        // stdin and the like: held open, never answered.
        std::thread::sleep(Duration::from_secs(3600));
        return Ok(format!("{header}: held"));
    };
    connection.write_all(
        &Resume {
            stream_id: 7,
            offset: resume.offset,
        }
        .to_bytes(),
    )?;
    let mut sent = 0u64;
    let how = match mode {
        Mode::Unacked => {
            // Never reads what the host sends back.
            let line = b"an agent that takes no acknowledgements\n";
            loop {
                if let Err(e) = connection.write_all(line) {
                    break format!("the host closed it ({e})");
                }
                sent += line.len() as u64;
                if sent > 8 << 30 {
                    break "all sent".to_string();
                }
            }
        }
        Mode::Endless if header.kind == capsa_protocol::stdio::StreamKind::Stdout => {
            // Takes the acknowledgements, so that only the line's length
            // is what capsad meets.
            std::thread::spawn(move || {
                let mut acks = [0u8; 4096];
                while matches!(reader.read(&mut acks), Ok(n) if n > 0) {}
            });
            let chunk = vec![b'x'; 1 << 20];
            loop {
                let left = bytes - sent;
                if left == 0 {
                    break "all sent".to_string();
                }
                let piece = &chunk[..chunk.len().min(left as usize)];
                if let Err(e) = connection.write_all(piece) {
                    break format!("the host closed it ({e})");
                }
                sent += piece.len() as u64;
            }
        }
        _ => {
            std::thread::sleep(Duration::from_secs(3600));
            "held".to_string()
        }
    };
    Ok(format!("{header}: sent {sent} bytes, then {how}"))
}

/// Carries a connection to the agent's port to the ttrpc server.
fn relay(connection: UnixStream, api: &Path) -> Result<()> {
    let server = UnixStream::connect(api)?;
    let (mut from_host, mut to_server) = (connection.try_clone()?, server.try_clone()?);
    std::thread::spawn(move || std::io::copy(&mut from_host, &mut to_server));
    let (mut from_server, mut to_host) = (server, connection);
    std::io::copy(&mut from_server, &mut to_host)?;
    Ok(())
}

fn handle(connection: UnixStream, args: &Args, api: &Path) -> Result<()> {
    let mut reader = BufReader::new(connection.try_clone()?);
    let mut line = String::new();
    reader.by_ref().take(64).read_line(&mut line)?;
    let port: u32 = line
        .trim_end()
        .strip_prefix("CONNECT ")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("not a CONNECT: {line:?}"))?;
    if args.mode == Mode::Garbage {
        return send_garbage(connection, port);
    }
    match port {
        AGENT_VSOCK_PORT => {
            (&connection).write_all(format!("OK {port}\n").as_bytes())?;
            relay(connection, api)
        }
        STDIO_VSOCK_PORT => {
            (&connection).write_all(format!("OK {port}\n").as_bytes())?;
            let told = serve_stream(connection, args.mode, args.bytes)?;
            println!("{told}");
            Ok(())
        }
        other => bail!("no port {other}"),
    }
}

fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let _ = std::fs::remove_file(&args.socket);
    let listener = UnixListener::bind(&args.socket)
        .with_context(|| format!("binding {}", args.socket.display()))?;
    let api = args.socket.with_extension("fake-ttrpc");
    let _ = std::fs::remove_file(&api);
    let mut server = ttrpc::Server::new()
        .bind(&format!("unix://{}", api.display()))?
        .register_service(create_agent(Arc::new(Api)));
    server.start()?;
    println!("listening");
    for connection in listener.incoming() {
        let connection = connection?;
        if args.mode == Mode::Silent {
            // Held, unread, for as long as this process lives.
            std::mem::forget(connection);
            continue;
        }
        let (args, api) = (args.clone(), api.clone());
        std::thread::spawn(move || {
            if let Err(e) = handle(connection, &args, &api) {
                eprintln!("capsa-vmm-fake: {e:#}");
            }
        });
    }
    Ok(())
}
