//! `capsa cp` in the guest: archives unpacked into, and packed from, a
//! running container's files as the container sees them. The packing and
//! unpacking run in a helper (this binary again, `copy-in` or `copy-out`)
//! that joins the container's mount namespace first, so that paths, its
//! volumes and its symbolic links resolve as in the container, and never
//! into the guest's own tree.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use capsa_protocol::agent::CopyInRequest;
use capsa_protocol::{COPY_CHUNK_BYTES, MAX_COPY_BYTES};

use crate::containers::Containers;
use crate::errors::ApiError;

pub const COPY_IN: &str = "copy-in";
pub const COPY_OUT: &str = "copy-out";
/// Where archives wait, unlinked at once (a tmpfs: the guest's memory).
const SPOOL: &str = "/run/capsa/copies";
/// Archives packed and not yet released; the oldest goes past this.
const MAX_PENDING_OUT: usize = 8;
/// What a helper's error may say.
const MAX_MESSAGE: u64 = 4096;

struct Incoming {
    file: File,
    len: u64,
}

#[derive(Default)]
pub struct Copies {
    incoming: Mutex<HashMap<(String, u64), Incoming>>,
    outgoing: Mutex<BTreeMap<u64, File>>,
    next: AtomicU64,
}

fn spool_file() -> Result<File, ApiError> {
    std::fs::create_dir_all(SPOOL)
        .map_err(|e| ApiError::internal(format!("creating {SPOOL}: {e}")))?;
    let path = format!(
        "{SPOOL}/{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| ApiError::internal(format!("creating {path}: {e}")))?;
    let _ = std::fs::remove_file(&path);
    Ok(file)
}

impl Copies {
    pub fn copy_in(
        &self,
        containers: &Containers,
        request: &CopyInRequest,
    ) -> Result<(), ApiError> {
        let key = (request.container_id.clone(), request.copy_id);
        let mut incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        if request.offset == 0 {
            incoming.insert(
                key.clone(),
                Incoming {
                    file: spool_file()?,
                    len: 0,
                },
            );
        }
        let Some(archive) = incoming.get_mut(&key) else {
            return Err(ApiError::precondition(format!(
                "copy {}: a chunk at offset {} before one at 0",
                request.copy_id, request.offset
            )));
        };
        let held = archive.len;
        let len = held + request.data.len() as u64;
        if held != request.offset || request.data.len() > COPY_CHUNK_BYTES || len > MAX_COPY_BYTES {
            incoming.remove(&key);
            return Err(ApiError::invalid(format!(
                "copy {}: a chunk of {} bytes at offset {} (expected offset {held}, at most {COPY_CHUNK_BYTES} bytes, {MAX_COPY_BYTES} in all)",
                request.copy_id,
                request.data.len(),
                request.offset,
            )));
        }
        archive
            .file
            .write_all(&request.data)
            .map_err(|e| ApiError::internal(format!("spooling copy {}: {e}", request.copy_id)))?;
        archive.len = len;
        if !request.last {
            return Ok(());
        }
        let Some(Incoming { mut file, .. }) = incoming.remove(&key) else {
            return Ok(());
        };
        drop(incoming);
        file.rewind()
            .map_err(|e| ApiError::internal(format!("copy {}: {e}", request.copy_id)))?;
        let pid = containers.init_pid(&request.container_id)?;
        helper(
            COPY_IN,
            pid,
            &request.path,
            Stdio::from(file),
            Stdio::null(),
        )
    }

    /// Packs `path` of the container; returns the archive's id and size.
    pub fn copy_out(
        &self,
        containers: &Containers,
        id: &str,
        path: &str,
    ) -> Result<(u64, u64), ApiError> {
        let pid = containers.init_pid(id)?;
        let file = spool_file()?;
        let out = file
            .try_clone()
            .map_err(|e| ApiError::internal(format!("copy: {e}")))?;
        helper(COPY_OUT, pid, path, Stdio::null(), Stdio::from(out))?;
        let size = file
            .metadata()
            .map_err(|e| ApiError::internal(format!("copy: {e}")))?
            .len();
        let copy_id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut outgoing = self.outgoing.lock().unwrap_or_else(|e| e.into_inner());
        while outgoing.len() >= MAX_PENDING_OUT {
            outgoing.pop_first();
        }
        outgoing.insert(copy_id, file);
        Ok((copy_id, size))
    }

    pub fn read(&self, copy_id: u64, offset: u64) -> Result<Vec<u8>, ApiError> {
        let outgoing = self.outgoing.lock().unwrap_or_else(|e| e.into_inner());
        let file = outgoing
            .get(&copy_id)
            .ok_or_else(|| ApiError::not_found(format!("no copy {copy_id}")))?;
        let mut data = vec![0u8; COPY_CHUNK_BYTES];
        let n = file
            .read_at(&mut data, offset)
            .map_err(|e| ApiError::internal(format!("copy {copy_id}: {e}")))?;
        data.truncate(n);
        Ok(data)
    }

    pub fn end(&self, copy_id: u64) {
        let mut outgoing = self.outgoing.lock().unwrap_or_else(|e| e.into_inner());
        outgoing.remove(&copy_id);
    }
}

/// Runs this binary as the copy helper for the container whose init is
/// `pid`; its error, if it fails, is the answer's.
fn helper(mode: &str, pid: i32, path: &str, stdin: Stdio, stdout: Stdio) -> Result<(), ApiError> {
    let mut child = Command::new("/proc/self/exe")
        .args([mode, &pid.to_string(), path])
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ApiError::internal(format!("starting the copy helper: {e}")))?;
    let mut message = String::new();
    if let Some(stderr) = child.stderr.take() {
        let _ = stderr.take(MAX_MESSAGE).read_to_string(&mut message);
    }
    // PID 1's reaper collects every child; it hands us this one's status.
    let status = capsa_runtime::Reaper::global().wait(child.id() as i32);
    if status.code() != 0 {
        return Err(ApiError::invalid(format!("{path}: {}", message.trim())));
    }
    Ok(())
}

/// The helper's own main: `copy-in PID PATH` unpacks stdin at PATH,
/// `copy-out PID PATH` packs PATH to stdout, in PID's mount namespace.
pub fn helper_main(mode: &str) -> ! {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let result = (|| -> Result<(), String> {
        let [pid, path] = args.as_slice() else {
            return Err("usage: copy-in|copy-out PID PATH".into());
        };
        let namespace = File::open(format!("/proc/{pid}/ns/mnt"))
            .map_err(|e| format!("the container's mount namespace: {e}"))?;
        nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNS)
            .map_err(|e| format!("joining the container's mount namespace: {e}"))?;
        std::env::set_current_dir("/").map_err(|e| e.to_string())?;
        let path = std::path::Path::new(path);
        if mode == COPY_IN {
            capsa_copy::unpack(std::io::stdin().lock(), path)
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            capsa_copy::pack(path, &mut out).map_err(|e| e.to_string())?;
            out.flush().map_err(|e| e.to_string())
        }
    })();
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    }
}
