//! `capsa-agent`: PID 1 inside every Capsa microVM.
//!
//! It brings up the basic filesystems, reports that the guest is ready
//! (with its CPU count and memory) on the console, and serves the ttrpc API
//! of `capsa-protocol` on vsock port 1024 (or powers the VM off at once when
//! the kernel command line asks it to).

mod api;
mod init;
mod kmsg;
mod params;
mod ready;

use std::io::Write;

use anyhow::{Context, Result};

fn main() {
    kmsg::install_panic_hook();
    if let Err(e) = run() {
        // As PID 1 our exit panics the kernel; the VMM then reports that
        // panic with this message in the console tail.
        kmsg::error(&format!("fatal: {e:#}"));
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    init::mount_basics()?;
    init::attach_console();
    let params = params::BootParams::from_proc()?;
    let report = ready::ReadyReport::collect()?;
    // writeln! rather than println!: a console write error must be reported,
    // not turned into a panic of PID 1.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", report.line())
        .and_then(|()| stdout.flush())
        .context("cannot write the ready line to the console")?;
    // The tty sends output from a buffer; let it drain before power-off.
    init::drain_console();
    if params.exit_after_ready {
        init::power_off()?;
    }
    // Kept alive for as long as PID 1 runs.
    let _server = api::serve()?;
    init::reap_forever()
}
