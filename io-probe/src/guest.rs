//! The probe as PID 1 of a test microVM: it mounts what it needs, runs the
//! steps the kernel command line gives it, prints one `PROBE` line per step
//! and powers the VM off.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};

use crate::pattern::{read_and_check, write_pattern, Pattern};
use crate::stream::{self, Mode};
use crate::vsock;

const BUSYBOX: &str = "/bin/busybox";

pub fn run(steps: &[String]) -> ! {
    if let Err(e) = mount_basics() {
        println!("PROBE init FAIL {e:#}");
    }
    let mut failed = 0;
    let mut servers: Vec<JoinHandle<Result<String>>> = Vec::new();
    for step in steps {
        let (name, arg) = step.split_once('=').unwrap_or((step.as_str(), ""));
        let result = match name {
            "rng" => rng(),
            "blk-read" => blk_read(arg),
            "blk-write" => blk_write(arg),
            "blk-bench" => blk_bench(arg),
            "vsock-serve" => vsock_serve(arg).map(|handle| {
                servers.push(handle);
                "listening".to_string()
            }),
            "vsock-wait" => wait_servers(&mut servers),
            "vsock-connect" => vsock_connect(arg),
            "vsock-bulk" => vsock_bulk(arg),
            "net" => net(arg),
            _ => Err(anyhow::anyhow!("unknown step")),
        };
        match result {
            Ok(detail) => println!("PROBE {name} ok {detail}"),
            Err(e) => {
                failed += 1;
                println!("PROBE {name} FAIL {e:#}");
            }
        }
    }
    println!("PROBE done failed={failed}");
    let _ = std::io::stdout().flush();
    // Let the console drain before the power goes.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(1)
}

fn mount_basics() -> Result<()> {
    let none: Option<&str> = None;
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        std::fs::create_dir_all(target)?;
        mount(Some(source), target, Some(fstype), MsFlags::empty(), none)
            .with_context(|| format!("mounting {target}"))?;
    }
    Ok(())
}

fn fields<const N: usize>(arg: &str) -> Result<[&str; N]> {
    let parts: Vec<&str> = arg.split(':').collect();
    parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected {N} ':'-separated fields in {arg:?}"))
}

fn number(text: &str) -> Result<u64> {
    text.parse().with_context(|| format!("bad number {text:?}"))
}

/// The CRNG is ready at boot (getrandom does not block) and the kernel
/// uses the virtio-rng.
fn rng() -> Result<String> {
    let mut buf = [0u8; 32];
    nix::errno::Errno::result(unsafe_getrandom_nonblock(&mut buf))
        .context("getrandom(GRND_NONBLOCK) would block: the CRNG is not ready")?;
    let current = std::fs::read_to_string("/sys/class/misc/hw_random/rng_current")
        .context("no hw_random device")?;
    if !current.starts_with("virtio_rng") {
        bail!("hw_random source is {current:?}");
    }
    let mut hw = [0u8; 64];
    File::open("/dev/hwrng")?.read_exact(&mut hw)?;
    if hw.iter().all(|&b| b == 0) {
        bail!("/dev/hwrng returned zeroes");
    }
    Ok(format!("source={}", current.trim()))
}

fn unsafe_getrandom_nonblock(buf: &mut [u8]) -> i64 {
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    unsafe {
        nix::libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), nix::libc::GRND_NONBLOCK) as i64
    }
}

/// `DEV:LEN:SEED`: the disk holds LEN pattern bytes from the host.
fn blk_read(arg: &str) -> Result<String> {
    let [dev, len, seed] = fields(arg)?;
    let (len, seed) = (number(len)?, number(seed)?);
    let mut disk = File::open(format!("/dev/{dev}"))?;
    let bad =
        read_and_check(&mut disk, len, seed).with_context(|| format!("reading /dev/{dev}"))?;
    if let Some(at) = bad {
        bail!("/dev/{dev} byte {at} is not what the host wrote");
    }
    Ok(format!("{len} bytes match"))
}

/// `DEV:LEN:SEED`: write LEN pattern bytes for the host to check.
fn blk_write(arg: &str) -> Result<String> {
    let [dev, len, seed] = fields(arg)?;
    let (len, seed) = (number(len)?, number(seed)?);
    let mut disk = OpenOptions::new().write(true).open(format!("/dev/{dev}"))?;
    write_pattern(&mut disk, len, seed)?;
    disk.sync_all().context("flushing the disk")?;
    Ok(format!("{len} bytes written and flushed"))
}

/// `DEV:MIB:OPS`: sequential write and read of MIB MiB in 1 MiB direct
/// requests, then OPS random 4 KiB direct reads.
fn blk_bench(arg: &str) -> Result<String> {
    let [dev, mib, ops] = fields(arg)?;
    let path = format!("/dev/{dev}");
    bench_file(&path, number(mib)?, number(ops)?)
}

/// Shared with the host-side reference run.
pub fn bench_file(path: &str, mib: u64, ops: u64) -> Result<String> {
    let open = |flags| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
    };
    // tmpfs (a nested test host's only filesystem) refuses O_DIRECT.
    let (file, direct) = match open(nix::libc::O_DIRECT) {
        Ok(file) => (file, 1),
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => (open(0)?, 0),
        Err(e) => return Err(e).with_context(|| format!("opening {path}")),
    };
    let mut block = AlignedBuf::new(1 << 20);
    Pattern::new(1).fill(block.as_mut());
    let start = Instant::now();
    for i in 0..mib {
        file.write_all_at(block.as_mut(), i << 20)?;
    }
    file.sync_all()?;
    let write = mib as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for i in 0..mib {
        file.read_exact_at(block.as_mut(), i << 20)?;
    }
    let read = mib as f64 / start.elapsed().as_secs_f64();
    let mut small = AlignedBuf::new(4096);
    let blocks = (mib << 20) / 4096;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let start = Instant::now();
    for _ in 0..ops {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        file.read_exact_at(small.as_mut(), (state % blocks) * 4096)?;
    }
    let iops = ops as f64 / start.elapsed().as_secs_f64();
    Ok(format!(
        "seq_write_mib_s={write:.1} seq_read_mib_s={read:.1} rand_read_4k_iops={iops:.0} direct={direct}"
    ))
}

/// A page-aligned buffer, as O_DIRECT needs.
struct AlignedBuf {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + 4096];
        let offset = storage.as_ptr().align_offset(4096);
        Self {
            storage,
            offset,
            len,
        }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// `PORT:COUNT`: serve COUNT host-initiated connections in the background.
fn vsock_serve(arg: &str) -> Result<JoinHandle<Result<String>>> {
    let [port, count] = fields(arg)?;
    let (port, count) = (number(port)? as u32, number(count)?);
    let listener = vsock::GuestListener::bind(port)?;
    Ok(std::thread::spawn(move || {
        let mut handles = Vec::new();
        for _ in 0..count {
            let conn = listener.accept()?;
            handles.push(std::thread::spawn(move || stream::serve(conn)));
        }
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
        }
        Ok(format!("served {count} host connections"))
    }))
}

fn wait_servers(servers: &mut Vec<JoinHandle<Result<String>>>) -> Result<String> {
    let mut details = Vec::new();
    for handle in servers.drain(..) {
        details.push(
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("server panicked"))??,
        );
    }
    Ok(details.join("; "))
}

/// `PORT:STREAMS:BYTES`: STREAMS concurrent echo streams to the host.
fn vsock_connect(arg: &str) -> Result<String> {
    let [port, streams, bytes] = fields(arg)?;
    let (port, streams, bytes) = (number(port)? as u32, number(streams)?, number(bytes)?);
    stream::echo_streams(streams, bytes, 1000, move || vsock::guest_connect(port))?;
    Ok(format!("{streams} streams of {bytes} bytes echoed intact"))
}

/// `PORT:BYTES`: BYTES to the host and BYTES back, each checked.
fn vsock_bulk(arg: &str) -> Result<String> {
    let [port, bytes] = fields(arg)?;
    let (port, bytes) = (number(port)? as u32, number(bytes)?);
    let up = stream::request(vsock::guest_connect(port)?, Mode::Sink, bytes, 77)?;
    let down = stream::request(vsock::guest_connect(port)?, Mode::Generate, bytes, 78)?;
    Ok(format!(
        "bytes={bytes} guest_to_host_mib_s={:.1} host_to_guest_mib_s={:.1}",
        up.mib_per_s(),
        down.mib_per_s()
    ))
}

/// `ADDR/PREFIX:PEER:PORT`: bring eth0 up with ADDR, ping PEER, then run an
/// echo request over TCP to PEER:PORT.
fn net(arg: &str) -> Result<String> {
    let [cidr, peer, port] = fields(arg)?;
    busybox(&["ip", "link", "set", "lo", "up"])?;
    busybox(&["ip", "addr", "add", cidr, "dev", "eth0"])?;
    busybox(&["ip", "link", "set", "eth0", "up"])?;
    busybox(&["ping", "-c", "3", "-W", "5", peer]).context("ping")?;
    let addr = format!("{peer}:{port}");
    let conn =
        std::net::TcpStream::connect(&addr).with_context(|| format!("connecting to {addr}"))?;
    let t = stream::request(conn, Mode::Echo, 1 << 20, 5)?;
    Ok(format!(
        "pinged {peer}; 1 MiB echoed over TCP in {:?}",
        t.elapsed
    ))
}

fn busybox(args: &[&str]) -> Result<()> {
    let out = Command::new(BUSYBOX)
        .args(args)
        .output()
        .with_context(|| format!("running busybox {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "busybox {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
