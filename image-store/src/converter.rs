//! Where a layer's conversion into an EROFS image runs. The tar is the
//! image author's: a daemon running as root does not parse it with root's
//! privileges. It runs its own program again as a conversion child
//! (`CONVERT_ARG`), which, before it reads a byte of the layer, chroots
//! into an empty directory, drops every group and takes an unprivileged
//! uid and gid (so it holds no capability), sets `no_new_privs` and low
//! rlimits; it reads the blob on stdin and writes the image to stdout
//! (both opened by the daemon), and reports on stderr one JSON line, read
//! bounded. The layer's checks and refusals are the same either way
//! (`capsa_layers::erofs::convert_layer`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use capsa_layers::erofs::{convert_layer, ConvertSummary};
use capsa_layers::{Compression, LayerSpec};
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// The first argument that makes a program a conversion child.
pub const CONVERT_ARG: &str = "--convert-layer";

/// nobody and nogroup.
pub const UNPRIVILEGED_ID: u32 = 65534;

/// The most a child may say on stderr.
const MAX_REPORT: u64 = 64 << 10;

#[derive(Debug, Clone)]
pub enum Converter {
    /// In this process (a daemon that is not root has nothing to drop).
    InProcess,
    /// In `program` run as a conversion child (see the module's doc).
    Child {
        program: PathBuf,
        uid: u32,
        gid: u32,
        /// An empty directory the child chroots into.
        empty_dir: PathBuf,
    },
}

/// What the child is asked: the layer's checks.
#[derive(Serialize, Deserialize)]
struct Job {
    digest: String,
    diff_id: String,
    compression: String,
    size: Option<u64>,
    uid: u32,
    gid: u32,
    empty_dir: PathBuf,
}

/// What the child answers.
#[derive(Serialize, Deserialize)]
enum Outcome {
    Converted {
        entries: u64,
        file_bytes: u64,
        image_bytes: u64,
        xattrs_dropped: u64,
        /// The uid it converted as.
        uid: u32,
    },
    Failed {
        message: String,
    },
}

fn compression_name(compression: Compression) -> &'static str {
    match compression {
        Compression::None => "none",
        Compression::Gzip => "gzip",
        Compression::Zstd => "zstd",
    }
}

/// `message` about `layer`, naming it once.
fn failed(layer: &LayerSpec, message: impl Into<String>) -> StoreError {
    let (digest, message) = (layer.digest.to_string(), message.into());
    StoreError::Conversion {
        message: if message.contains(&digest) {
            message
        } else {
            format!("layer {digest}: {message}")
        },
        layer: digest,
    }
}

impl Converter {
    /// A child for a daemon running as root (`program`: the daemon's own
    /// binary, which calls `serve_if_asked` first), else in-process.
    pub fn for_daemon(program: PathBuf, empty_dir: PathBuf) -> Converter {
        if nix::unistd::geteuid().is_root() {
            Converter::Child {
                program,
                uid: UNPRIVILEGED_ID,
                gid: UNPRIVILEGED_ID,
                empty_dir,
            }
        } else {
            Converter::InProcess
        }
    }

    /// Converts `blob` (checked against `layer`) into `out`; returns the
    /// summary and the uid the conversion ran as.
    pub fn convert(
        &self,
        layer: &LayerSpec,
        blob: File,
        out: File,
    ) -> Result<(ConvertSummary, u32), StoreError> {
        let Converter::Child {
            program,
            uid,
            gid,
            empty_dir,
        } = self
        else {
            let mut writer = BufWriter::new(out);
            let (summary, _) =
                convert_layer(layer, BufReader::new(blob), &mut writer).map_err(|source| {
                    StoreError::Layer {
                        layer: layer.digest.to_string(),
                        source: Box::new(source),
                    }
                })?;
            writer
                .flush()
                .map_err(|e| failed(layer, format!("writing the image: {e}")))?;
            return Ok((summary, nix::unistd::geteuid().as_raw()));
        };
        let job = Job {
            digest: layer.digest.to_string(),
            diff_id: layer.diff_id.to_string(),
            compression: compression_name(layer.compression).to_string(),
            size: layer.size,
            uid: *uid,
            gid: *gid,
            empty_dir: empty_dir.clone(),
        };
        let job = serde_json::to_string(&job).map_err(|e| failed(layer, e.to_string()))?;
        let mut child = Command::new(program)
            .arg(CONVERT_ARG)
            .arg(job)
            .env_clear()
            .current_dir("/")
            .stdin(blob)
            .stdout(out)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                failed(
                    layer,
                    format!("starting the conversion ({}): {e}", program.display()),
                )
            })?;
        let mut report = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            // Read to the end (bounded), so the child never blocks on it.
            let mut bounded = stderr.take(MAX_REPORT);
            let _ = bounded.read_to_end(&mut report);
            let _ = std::io::copy(&mut bounded.into_inner(), &mut std::io::sink());
        }
        let status = child
            .wait()
            .map_err(|e| failed(layer, format!("waiting for the conversion: {e}")))?;
        let last = report
            .split(|&b| b == b'\n')
            .rev()
            .find(|line| !line.is_empty())
            .unwrap_or_default();
        match serde_json::from_slice::<Outcome>(last) {
            Ok(Outcome::Converted {
                entries,
                file_bytes,
                image_bytes,
                xattrs_dropped,
                uid,
            }) if status.success() => Ok((
                ConvertSummary {
                    entries,
                    file_bytes,
                    image_bytes,
                    xattrs_dropped,
                },
                uid,
            )),
            Ok(Outcome::Failed { message }) => Err(failed(layer, message)),
            _ => Err(failed(
                layer,
                format!(
                    "the conversion process ended ({status}) without a result: {}",
                    String::from_utf8_lossy(last).trim()
                ),
            )),
        }
    }
}

/// In a program's `main`, first: when run as a conversion child, converts
/// and returns the exit code; otherwise None.
pub fn serve_if_asked() -> Option<i32> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != CONVERT_ARG {
        return None;
    }
    let outcome = match args.next().map(|a| a.into_string()) {
        Some(Ok(job)) => serve(&job),
        _ => Err("no job given".to_string()),
    };
    let (code, outcome) = match outcome {
        Ok(outcome) => (0, outcome),
        Err(message) => (1, Outcome::Failed { message }),
    };
    let line = serde_json::to_string(&outcome).unwrap_or_default();
    let _ = writeln!(std::io::stderr(), "{line}");
    Some(code)
}

/// Drops what the child can drop, then converts stdin into stdout.
fn serve(job: &str) -> Result<Outcome, String> {
    let job: Job = serde_json::from_str(job).map_err(|e| format!("the job: {e}"))?;
    drop_privileges(&job.empty_dir, job.uid, job.gid)?;
    let parse = |what: &str, text: &str| {
        text.parse()
            .map_err(|e| format!("the job's {what} {text:?}: {e}"))
    };
    let spec = LayerSpec {
        digest: parse("digest", &job.digest)?,
        diff_id: parse("diff id", &job.diff_id)?,
        compression: match job.compression.as_str() {
            "none" => Compression::None,
            "gzip" => Compression::Gzip,
            "zstd" => Compression::Zstd,
            other => return Err(format!("the job's compression {other:?}")),
        },
        size: job.size,
        parent: None,
    };
    let dup = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .map(File::from)
            .map_err(|e| format!("its standard streams: {e}"))
    };
    let blob = dup(std::io::stdin().as_fd())?;
    let out = dup(std::io::stdout().as_fd())?;
    let (summary, uid) = Converter::InProcess
        .convert(&spec, blob, out)
        .map_err(|e| e.to_string())?;
    Ok(Outcome::Converted {
        entries: summary.entries,
        file_bytes: summary.file_bytes,
        image_bytes: summary.image_bytes,
        xattrs_dropped: summary.xattrs_dropped,
        uid,
    })
}

fn drop_privileges(empty_dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    use nix::sys::resource::{setrlimit, Resource};
    use nix::unistd::{chdir, chroot, setgroups, setresgid, setresuid, Gid, Uid};
    fn step(what: &'static str) -> impl Fn(nix::errno::Errno) -> String {
        move |e| format!("{what}: {e}")
    }
    chroot(empty_dir).map_err(step("chroot into the empty directory"))?;
    chdir("/").map_err(step("chdir /"))?;
    setgroups(&[]).map_err(step("dropping the groups"))?;
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setresgid(gid, gid, gid).map_err(step("setting the gid"))?;
    setresuid(uid, uid, uid).map_err(step("setting the uid"))?;
    if uid.is_root() || nix::unistd::geteuid().is_root() {
        return Err("refusing to convert as root".into());
    }
    nix::sys::prctl::set_no_new_privs().map_err(step("no_new_privs"))?;
    // Its three streams, nothing to open (the root is empty), no core.
    setrlimit(Resource::RLIMIT_NOFILE, 8, 8).map_err(step("RLIMIT_NOFILE"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(step("RLIMIT_CORE"))?;
    Ok(())
}
