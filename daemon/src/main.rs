//! `capsad`: the Capsa daemon. Runs each container group in a microVM of
//! its own, keeps images (an OCI store), logs and state under its root,
//! and serves an HTTP/JSON API on a Unix socket (0600) for `capsa`.

mod groups;
mod http;
mod logs;
mod state;
mod vm;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(name = "capsad", about = "The Capsa daemon")]
struct Args {
    /// State: images, groups, logs.
    #[arg(long, default_value = "/var/lib/capsa")]
    root: PathBuf,
    /// The API socket.
    #[arg(long, default_value = "/run/capsa/capsad.sock")]
    socket: PathBuf,
    /// The guest kernel (vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// The guest initramfs (with capsa-agent as /init).
    #[arg(long)]
    initrd: PathBuf,
    /// capsa-vmm (default: beside capsad, then PATH).
    #[arg(long)]
    vmm: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    for file in [&args.kernel, &args.initrd] {
        anyhow::ensure!(file.is_file(), "{} does not exist", file.display());
    }
    let vmm = args.vmm.clone().unwrap_or_else(|| {
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("capsa-vmm")));
        beside
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("capsa-vmm"))
    });
    let images = capsa_image_store::ImageStore::open(&args.root.join("images"))
        .context("opening the image store")?;
    let daemon = groups::Daemon::new(
        args.root.clone(),
        images,
        vm::VmConfig {
            vmm,
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
        },
    );
    daemon.restore();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        if let Some(dir) = args.socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&args.socket);
        let listener = tokio::net::UnixListener::bind(&args.socket)
            .with_context(|| format!("listening on {}", args.socket.display()))?;
        std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600))?;
        eprintln!("capsad: listening on {}", args.socket.display());
        axum::serve(listener, http::router(daemon))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving the API")
    })
}
