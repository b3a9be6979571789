//! Snapshots of a running microVM (issue 20): a VM booted to its agent's
//! answer is snapshotted when asked on its control socket; two VMs are
//! restored from that one snapshot side by side, each answering its agent
//! from where the snapshot left it and running a container; a damaged
//! snapshot is refused with a clear error.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use capsa_guest_client::{Guest, OciImage, Streams};
use capsa_protocol::stdio::StreamKind;
use capsa_vmm_config::{RestoreFrom, SnapshotTo, VmmArgs, VsockConfig};

use crate::suite::{unanswered_is_fault, Suite};
use crate::vm::{Artifacts, Background};

const BOOT_PATIENCE: Duration = Duration::from_secs(120);
const RESTORE_PATIENCE: Duration = Duration::from_secs(60);
const CLONES: usize = 2;

/// `command` with `fds` open in its child.
fn with_fds(mut command: Command, fds: Vec<RawFd>) -> Command {
    capsa_vm_process::inherit_fds(&mut command, fds);
    command
}

fn private_file(path: &Path) -> Result<File> {
    capsa_vm_process::snapshot_file(path).with_context(|| format!("creating {}", path.display()))
}

struct Snapshot {
    state: PathBuf,
    memory: PathBuf,
    /// The guest's uptime when it was asked, in ms.
    uptime_ms: u64,
}

fn vm(artifacts: &Artifacts, socket: &Path) -> VmmArgs {
    VmmArgs {
        vsock: Some(VsockConfig::at(socket)),
        ..artifacts.vm(1, 256)
    }
}

/// Boots a VM to its agent's answer and snapshots it.
fn take(artifacts: &Artifacts, work: &Path) -> Result<Snapshot> {
    let socket = work.join("template.sock");
    let state_path = work.join("template.state");
    let memory_path = work.join("template.memory");
    let (mut control, theirs) = UnixStream::pair().context("making the control socket")?;
    let state = private_file(&state_path)?;
    let memory = private_file(&memory_path)?;
    let args = VmmArgs {
        snapshot_to: Some(SnapshotTo {
            control: theirs.as_raw_fd(),
            state: state.as_raw_fd(),
            memory: memory.as_raw_fd(),
        }),
        ..vm(artifacts, &socket)
    };
    let fds = vec![theirs.as_raw_fd(), state.as_raw_fd(), memory.as_raw_fd()];
    let command = with_fds(
        artifacts.command_in(None, &artifacts.vmm(), &args.to_args()?),
        fds,
    );
    let vmm = Background::spawn(command)?;
    drop((theirs, state, memory));
    let guest =
        Guest::connect(&socket, BOOT_PATIENCE).map_err(|e| unanswered_is_fault(e.into()))?;
    let uptime_ms = guest.ping().map_err(|e| unanswered_is_fault(e.into()))?;
    drop(guest);
    control.write_all(b"s").context("asking for the snapshot")?;
    control.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut answer = String::new();
    BufReader::new(&control)
        .read_line(&mut answer)
        .context("reading the VMM's answer")?;
    let run = vmm.finish(Duration::from_secs(30))?;
    if let Some(fault) = run.fault() {
        return Err(fault.into());
    }
    ensure!(
        answer.trim() == "ok" && run.status == Some(0),
        "answer {:?}, status {:?}: {}",
        answer.trim(),
        run.status,
        run.tail(20)
    );
    Ok(Snapshot {
        state: state_path,
        memory: memory_path,
        uptime_ms,
    })
}

/// A VMM restoring `snapshot`, its vsock at `socket`.
fn restore(
    artifacts: &Artifacts,
    snapshot: &Snapshot,
    state: &Path,
    socket: &Path,
) -> Result<Background> {
    let state = File::open(state).context("opening the state")?;
    let memory = File::open(&snapshot.memory).context("opening the memory")?;
    let args = VmmArgs {
        restore_from: Some(RestoreFrom {
            state: state.as_raw_fd(),
            memory: memory.as_raw_fd(),
        }),
        ..vm(artifacts, socket)
    };
    let fds = vec![state.as_raw_fd(), memory.as_raw_fd()];
    let command = with_fds(
        artifacts.command_in(None, &artifacts.vmm(), &args.to_args()?),
        fds,
    );
    Background::spawn(command)
}

/// Runs `args` in a busybox container of `guest`; returns its output.
fn run_in(guest: &Guest, image: &OciImage, args: &[&str]) -> Result<String> {
    let chain = guest.push_image(image).context("sending the image")?;
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let spec = image.spec(Some(&args))?;
    guest.create("probe", &chain, &spec, Streams::OUTPUT)?;
    let mut stdout = guest.attach("probe", "", StreamKind::Stdout)?;
    let _stderr = guest.attach("probe", "", StreamKind::Stderr)?;
    guest.start("probe")?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut out)?;
    let exit = guest.wait("probe", "")?;
    guest.delete("probe")?;
    ensure!(exit.code == 0, "{args:?} exited {}", exit.code);
    Ok(out.trim().to_string())
}

/// 16 bytes of the guest's /dev/urandom, in hex, drawn in a container.
fn random_bytes(guest: &Guest, image: &OciImage) -> Result<String> {
    run_in(
        guest,
        image,
        &[
            "sh",
            "-c",
            "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        ],
    )
}

/// 64 bytes of the host's entropy.
fn host_entropy() -> Result<Vec<u8>> {
    let mut bytes = vec![0u8; 64];
    std::io::Read::read_exact(
        &mut File::open("/dev/urandom").context("opening the host's /dev/urandom")?,
        &mut bytes,
    )?;
    Ok(bytes)
}

pub fn run(suite: &mut Suite, artifacts: &Artifacts) {
    let work = std::env::temp_dir().join("capsa-e2e-snapshot");
    let _ = std::fs::remove_dir_all(&work);
    if let Err(e) = std::fs::create_dir_all(&work) {
        return suite.check("setup", || Err(e.into()));
    }
    let mut snapshot = None;
    suite.check(
        "a VM booted to its agent's answer is snapshotted when asked: the VMM answers ok and exits 0",
        || {
            let taken = take(artifacts, &work)?;
            let bytes = std::fs::metadata(&taken.memory)?.len();
            let on_disk = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&taken.memory)?) * 512;
            let detail = format!(
                "agent up {} ms; memory file {} MiB, {} MiB of it on disk",
                taken.uptime_ms,
                bytes >> 20,
                on_disk >> 20
            );
            snapshot = Some(taken);
            Ok(detail)
        },
    );
    let Some(snapshot) = snapshot else { return };
    let mut clones = Vec::new();
    suite.check(
        "two VMs restored side by side from that snapshot each answer their agent, its uptime going on from the snapshot's",
        || {
            for n in 1..=CLONES {
                let socket = work.join(format!("clone-{n}.sock"));
                let vmm = restore(artifacts, &snapshot, &snapshot.state, &socket)?;
                clones.push((vmm, socket));
            }
            let mut uptimes = Vec::new();
            for (_, socket) in &clones {
                let answer = Guest::connect(socket, RESTORE_PATIENCE)
                    .and_then(|guest| guest.ping());
                let uptime = match answer {
                    Ok(uptime) => uptime,
                    Err(e) => {
                        // What the VMMs said is the best clue.
                        let said: Vec<String> = clones
                            .drain(..)
                            .map(|(vmm, _)| match vmm.finish(Duration::from_secs(5)) {
                                Ok(run) => format!("status {:?}: {}", run.status, run.tail(10)),
                                Err(e) => format!("{e:#}"),
                            })
                            .collect();
                        bail!("{e}; the VMMs: {}", said.join(" | "));
                    }
                };
                ensure!(
                    uptime >= snapshot.uptime_ms,
                    "uptime {uptime} ms, below the snapshot's {} ms",
                    snapshot.uptime_ms
                );
                uptimes.push(uptime);
            }
            Ok(format!("uptimes {uptimes:?} ms, the snapshot's {} ms", snapshot.uptime_ms))
        },
    );
    suite.check(
        "each restored VM runs containers, and once reseeded from the host the two draw different random bytes",
        || {
            let image = OciImage::open(&artifacts.path("busybox-oci"), None)?;
            let mut before = Vec::new();
            let mut after = Vec::new();
            for (_, socket) in &clones {
                let guest = Guest::connect(socket, RESTORE_PATIENCE)
                    .map_err(|e| unanswered_is_fault(e.into()))?;
                before.push(random_bytes(&guest, &image)?);
                guest
                    .reseed(&host_entropy()?)
                    .map_err(|e| unanswered_is_fault(e.into()))?;
                after.push(random_bytes(&guest, &image)?);
            }
            ensure!(
                after.iter().all(|b| b.len() == 32),
                "not 16 bytes each: {after:?}"
            );
            ensure!(after[0] != after[1], "both drew {} after the reseed", after[0]);
            Ok(format!(
                "before the reseed the clones drew {} bytes; after it {} and {}",
                if before[0] == before[1] { "the same" } else { "different" },
                after[0],
                after[1]
            ))
        },
    );
    suite.check("and each powers off cleanly, its VMM exiting 0", || {
        let mut statuses = Vec::new();
        for (vmm, socket) in clones.drain(..) {
            if let Ok(guest) = Guest::connect(&socket, Duration::from_secs(5)) {
                let _ = guest.shutdown(Duration::from_secs(2));
            }
            let run = vmm.finish(Duration::from_secs(60))?;
            if let Some(fault) = run.fault() {
                return Err(fault.into());
            }
            ensure!(
                run.status == Some(0),
                "status {:?}: {}",
                run.status,
                run.tail(20)
            );
            statuses.push(0);
        }
        Ok(format!("{} VMMs exited 0", statuses.len()))
    });
    suite.check(
        "a damaged snapshot is refused with a clear error: the VMM exits 1 naming it",
        || {
            let damaged = work.join("damaged.state");
            let text = std::fs::read(&snapshot.state)?;
            std::fs::write(&damaged, &text[..text.len() / 2])?;
            let vmm = restore(artifacts, &snapshot, &damaged, &work.join("damaged.sock"))?;
            let run = vmm.finish(Duration::from_secs(30))?;
            let tail = run.tail(5);
            if run.status != Some(1) || !tail.contains("the snapshot is damaged") {
                bail!("status {:?}: {tail}", run.status);
            }
            Ok(tail.trim().to_string())
        },
    );
}
