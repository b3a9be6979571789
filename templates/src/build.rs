//! Building a template: its VM booted to its agent with no group's
//! identity (an empty disk in every slot, the template's MAC on a tap
//! bridged nowhere), its agent left at once, then snapshotted.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use capsa_vm_process::{self as vm, sandbox, JailSpec, Snapshot, VmConfig, VmSpec};
use capsa_vmm_config::NetConfig;

use crate::{io_error, Claim, Meta, Template, TemplateError, MEMORY, META, PARTIAL, STATE};

/// The guest's console of the build, kept beside the snapshot.
pub(crate) const CONSOLE: &str = "console.log";

/// A file only root may read, made empty.
fn private_file(path: &Path) -> Result<File, TemplateError> {
    vm::snapshot_file(path).map_err(io_error("creating", path))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Waits up to `within` for `child` to end; kills it after.
fn reap(child: &mut std::process::Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

impl Claim<'_> {
    /// Boots the template's VM with `vm` (jailed as `jail_id`, if given),
    /// waits up to `patience` for its agent and for its snapshot, and
    /// keeps the template. Nothing is left of a build that failed.
    pub fn build(
        self,
        vm: &VmConfig,
        jail_id: Option<u32>,
        patience: Duration,
    ) -> Result<Template, TemplateError> {
        let began = Instant::now();
        let final_dir = self.templates.dir.join(&self.id);
        let partial = self.templates.dir.join(format!("{}{PARTIAL}", self.id));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir(&partial).map_err(io_error("creating", &partial))?;
        let built = self.boot_and_snapshot(vm, jail_id, patience, &partial);
        let kept = built.and_then(|()| {
            let meta = Meta {
                shape: self.shape.clone(),
                built_at_ms: now_ms(),
                build_ms: began.elapsed().as_millis() as u64,
            };
            let meta_path = partial.join(META);
            let mut file = private_file(&meta_path)?;
            file.write_all(&serde_json::to_vec_pretty(&meta).unwrap_or_default())
                .and_then(|()| file.sync_all())
                .map_err(io_error("writing", &meta_path))?;
            // Only the snapshot, its meta and the console are kept.
            for entry in std::fs::read_dir(&partial)
                .map_err(io_error("listing", &partial))?
                .flatten()
            {
                let name = entry.file_name();
                if ![META, STATE, MEMORY, CONSOLE].iter().any(|k| name == *k) {
                    let path = entry.path();
                    let removed = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    removed.map_err(io_error("cleaning up", &path))?;
                }
            }
            std::fs::rename(&partial, &final_dir).map_err(io_error("keeping", &final_dir))?;
            File::open(&self.templates.dir)
                .and_then(|dir| dir.sync_all())
                .map_err(io_error("syncing", &self.templates.dir))?;
            Ok(Template {
                id: self.id.clone(),
                shape: meta.shape,
                built_at_ms: meta.built_at_ms,
                build_ms: meta.build_ms,
                dir: final_dir.clone(),
            })
        });
        if kept.is_err() {
            let _ = std::fs::remove_dir_all(&partial);
        }
        kept
    }

    fn boot_and_snapshot(
        &self,
        config: &VmConfig,
        jail_id: Option<u32>,
        patience: Duration,
        dir: &Path,
    ) -> Result<(), TemplateError> {
        let state = private_file(&dir.join(STATE))?;
        let memory = private_file(&dir.join(MEMORY))?;
        let slots = dir.join("slots");
        crate::slots::make_empty_disks(&slots).map_err(io_error("making", &slots))?;
        let disks = crate::slots::all_empty(&slots);
        let (control, theirs) =
            UnixStream::pair().map_err(io_error("making the control socket in", dir))?;
        let jail_root = dir.join("jail");
        let vsock = dir.join("v.sock");
        let console = dir.join(CONSOLE);
        let shape = &self.shape;
        let (booting, mut child) = sandbox::boot(
            config,
            &VmSpec {
                cpus: shape.cpus,
                memory_mib: shape.memory_mib,
                // Bridged nowhere: the template's guest sends nothing
                // anywhere, and its tap goes with its VMM.
                net: shape.nic.then(|| NetConfig {
                    tap: format!("tpl-{}", &self.id[..11]),
                    mac: crate::TEMPLATE_MAC,
                    bridge: None,
                    fd: None,
                    rate: None,
                }),
                disks: &disks,
                vsock: &vsock,
                console: &console,
                cgroup_procs: None,
                jail: jail_id.map(|id| JailSpec {
                    root: &jail_root,
                    uid: id,
                    gid: id,
                }),
                snapshot: Snapshot::To {
                    control: theirs.as_fd(),
                    state: state.as_fd(),
                    memory: memory.as_fd(),
                },
            },
        )?;
        drop(theirs);
        let snapshotted = (|| {
            // Up and answering; the connection is closed before the
            // snapshot, so that no clone starts with one.
            drop(booting.connect(patience)?);
            let mut control = control;
            control
                .write_all(b"s")
                .and_then(|()| control.set_read_timeout(Some(patience)))
                .map_err(io_error("asking for the snapshot on", dir))?;
            let mut answer = String::new();
            BufReader::new(std::io::Read::take(&control, 256))
                .read_line(&mut answer)
                .map_err(io_error("reading the VMM's answer in", dir))?;
            if answer.trim() != "ok" {
                return Err(TemplateError::Snapshot(format!(
                    "the VMM answered {:?}; console:\n{}",
                    answer.trim(),
                    vm::console_tail(&console)
                )));
            }
            match reap(&mut child, patience) {
                Some(status) if status.success() => Ok(()),
                Some(status) => Err(TemplateError::Snapshot(format!(
                    "the VMM ended with {}",
                    vm::describe_exit(status)
                ))),
                None => Err(TemplateError::Snapshot(
                    "the VMM did not end after its snapshot".into(),
                )),
            }
        })();
        if snapshotted.is_err() {
            vm::kill_and_wait(child.id(), Duration::from_secs(10));
            let _ = child.wait();
        }
        snapshotted?;
        for (file, name) in [(&state, STATE), (&memory, MEMORY)] {
            file.sync_all()
                .map_err(io_error("syncing", &dir.join(name)))?;
        }
        Ok(())
    }
}
