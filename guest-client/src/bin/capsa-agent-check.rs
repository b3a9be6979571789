//! `capsa-agent-check --socket VSOCK_SOCKET --image OCI_LAYOUT`: runs the
//! agent's container scenarios (capsa_guest_client::check) against a
//! booted guest, then shuts it down. Exits 1 when any scenario failed.

use std::path::PathBuf;
use std::process::ExitCode;

use capsa_guest_client::check::{self, Nic, Options};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The VMM's vsock Unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// An OCI image layout holding a busybox image.
    #[arg(long)]
    image: PathBuf,
    /// MAC of a NIC the guest has, for the sandbox scenario to configure.
    #[arg(long, requires = "host_address")]
    nic: Option<String>,
    /// The host's IPv4 address on that NIC's link (the guest gets the next).
    #[arg(long)]
    host_address: Option<std::net::Ipv4Addr>,
    /// Serial of an empty ext4 disk the guest has, for a block volume.
    #[arg(long)]
    ext4_disk: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let nic = args
        .nic
        .zip(args.host_address)
        .map(|(mac, host_address)| Nic { mac, host_address });
    let options = Options {
        nic,
        ext4_disk: args.ext4_disk,
    };
    match check::run(&args.socket, &args.image, options) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            println!("agent-check: setup FAIL {e:#}");
            ExitCode::FAILURE
        }
    }
}
