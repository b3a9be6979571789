//! `capsa-agent-check --socket VSOCK_SOCKET --image OCI_LAYOUT`: runs the
//! agent's container scenarios (capsa_guest_client::check) against a
//! booted guest, then shuts it down. Exits 1 when any scenario failed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The VMM's vsock Unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// An OCI image layout holding a busybox image.
    #[arg(long)]
    image: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match capsa_guest_client::check::run(&args.socket, &args.image) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            println!("agent-check: setup FAIL {e:#}");
            ExitCode::FAILURE
        }
    }
}
