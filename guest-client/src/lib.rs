//! The host's side of a Capsa guest, over the VMM's vsock socket: sends an
//! OCI image's layers to the agent, creates and runs containers, attaches
//! their stdio. The daemon, the containerd shim and the checks build on it.

pub mod image;

use std::io::Read;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capsa_protocol::agent::*;
use capsa_protocol::agent_ttrpc::AgentClient;
use capsa_protocol::stdio::{attach, AttachError, Resume, StreamHeader, StreamKind};
use capsa_protocol::{
    check_version, vmm_socket, AgentConnectError, COPY_CHUNK_BYTES, LAYER_CHUNK_BYTES,
    MAX_COPY_BYTES,
};
use oci_spec::runtime::{Process, Spec};

pub use image::{ImageError, ImageLayer, OciImage};

/// Calls that return at once get this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const STATS_TIMEOUT: Duration = Duration::from_secs(5);
/// Packing or unpacking a copy (up to MAX_COPY_BYTES) in the guest.
const COPY_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Connect(#[from] AgentConnectError),
    #[error("{call}: {}", describe(.source))]
    Call {
        call: &'static str,
        #[source]
        source: ttrpc::Error,
    },
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("reading layer {}: {source}", path.display())]
    Layer {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding the spec: {0}")]
    Spec(#[from] serde_json::Error),
    #[error("copy: {message}")]
    Copy { message: String },
    #[error("reading the host's /dev/urandom: {0}")]
    Entropy(#[source] std::io::Error),
}

impl GuestError {
    /// Whether the agent answered that what was named does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(ttrpc::Code::NOT_FOUND)
    }

    /// Whether the agent gave no answer at all (the call timed out or the
    /// connection broke), as opposed to refusing the request: a sign the
    /// guest itself is in trouble.
    pub fn is_unanswered(&self) -> bool {
        match self {
            GuestError::Connect(_) => true,
            GuestError::Call { source, .. } => match source {
                ttrpc::Error::Socket(_)
                | ttrpc::Error::LocalClosed
                | ttrpc::Error::RemoteClosed => true,
                // ttrpc's sync client reports its timeout only as text.
                ttrpc::Error::Others(text) => text.contains("timeout"),
                _ => false,
            },
            _ => false,
        }
    }

    /// The ttrpc status code of a refused call.
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            GuestError::Call {
                source: ttrpc::Error::RpcStatus(status),
                ..
            } => Some(status.code()),
            _ => None,
        }
    }
}

/// A ttrpc error in words: the agent's message and its code for a refused
/// call (never the status's debug form).
fn describe(error: &ttrpc::Error) -> String {
    match error {
        ttrpc::Error::RpcStatus(status) => {
            let code = format!("{:?}", status.code())
                .to_lowercase()
                .replace('_', " ");
            format!("{} (the agent said: {code})", status.message())
        }
        other => other.to_string(),
    }
}

/// How a process exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: i32,
    /// Nonzero when a signal ended it.
    pub signal: i32,
    pub oom_killed: bool,
}

/// The most processes `process_table` reports.
pub const MAX_PROCESSES: usize = 10_000;
/// The longest command line `process_table` reports, in bytes.
pub const MAX_COMMAND_BYTES: usize = 4096;

/// Which of a process's streams to attach.
#[derive(Debug, Clone, Copy, Default)]
pub struct Streams {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl Streams {
    pub const OUTPUT: Streams = Streams {
        stdin: false,
        stdout: true,
        stderr: true,
    };

    fn request(self) -> Stdio {
        Stdio {
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
            ..Default::default()
        }
    }
}

/// What the agent is told of a layer before its bytes.
#[derive(Debug, Clone, Copy)]
pub struct LayerBlob<'a> {
    /// "sha256:<hex>" of the bytes as sent.
    pub digest: &'a str,
    /// "sha256:<hex>" of the uncompressed tar.
    pub diff_id: &'a str,
    pub media_type: &'a str,
    pub size: u64,
}

pub struct Guest {
    socket: PathBuf,
    agent: AgentClient,
}

fn timeout(duration: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(duration.as_nanos().min(i64::MAX as u128) as i64)
}

impl Guest {
    /// Connects to the agent of the VM whose vsock socket is `socket`,
    /// waiting up to `patience` for it to boot, and checks its API version.
    pub fn connect(socket: &Path, patience: Duration) -> Result<Self, GuestError> {
        let (agent, _) = capsa_protocol::connect_agent(socket, patience)?;
        Ok(Guest {
            socket: socket.to_path_buf(),
            agent,
        })
    }

    /// A second, independent API connection to the same agent.
    pub fn reconnect(&self) -> Result<Self, GuestError> {
        let stream = vmm_socket::connect(&self.socket, capsa_protocol::AGENT_VSOCK_PORT)
            .map_err(AgentConnectError::from)?;
        let client = ttrpc::Client::new(stream.into_raw_fd()).map_err(AgentConnectError::from)?;
        let agent = AgentClient::new(client);
        check_version(&agent, CALL_TIMEOUT.as_nanos() as i64).map_err(AgentConnectError::from)?;
        Ok(Guest {
            socket: self.socket.clone(),
            agent,
        })
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends the image's layers the agent does not have yet; returns the
    /// chain id of its top layer, which containers are created from.
    pub fn push_image(&self, image: &OciImage) -> Result<String, GuestError> {
        let mut parent = String::new();
        for layer in &image.layers {
            parent = self.push_layer(layer, &parent)?;
        }
        Ok(parent)
    }

    fn push_layer(&self, layer: &ImageLayer, parent: &str) -> Result<String, GuestError> {
        let blob = LayerBlob {
            digest: &layer.digest,
            diff_id: &layer.diff_id,
            media_type: &layer.media_type,
            size: layer.size,
        };
        self.push_layer_from(&blob, parent, &layer.path, || image::open_layer(layer))
    }

    /// Sends one layer whose bytes `open` produces (they must hash to
    /// `blob.digest`), unless the agent has its chain already; returns the
    /// chain id. `source` names where the bytes come from, for errors.
    pub fn push_layer_from<R: Read>(
        &self,
        blob: &LayerBlob,
        parent: &str,
        source: &Path,
        open: impl FnOnce() -> std::io::Result<R>,
    ) -> Result<String, GuestError> {
        let started = self
            .agent
            .start_layer(
                timeout(CALL_TIMEOUT),
                &StartLayerRequest {
                    digest: blob.digest.to_string(),
                    diff_id: blob.diff_id.to_string(),
                    media_type: blob.media_type.to_string(),
                    size: blob.size,
                    parent_chain_id: parent.to_string(),
                    ..Default::default()
                },
            )
            .map_err(call("StartLayer"))?;
        if started.already_present {
            return Ok(started.chain_id);
        }
        let upload = |upload_id| AbortLayerRequest {
            upload_id,
            ..Default::default()
        };
        let sent = open()
            .map_err(|source| GuestError::Layer {
                path: PathBuf::new(),
                source,
            })
            .and_then(|data| self.send_blob(started.upload_id, data));
        if let Err(e) = sent {
            // Leaves nothing half done in the guest; the first error is the
            // one worth reporting.
            let _ = self
                .agent
                .abort_layer(timeout(CALL_TIMEOUT), &upload(started.upload_id));
            return Err(match e {
                GuestError::Layer { source: err, .. } => GuestError::Layer {
                    path: source.to_path_buf(),
                    source: err,
                },
                other => other,
            });
        }
        let committed = self
            .agent
            .commit_layer(
                timeout(CALL_TIMEOUT),
                &CommitLayerRequest {
                    upload_id: started.upload_id,
                    ..Default::default()
                },
            )
            .map_err(call("CommitLayer"))?;
        Ok(committed.chain_id)
    }

    /// Streams `blob` into upload `upload_id` in chunks.
    pub fn send_blob(&self, upload_id: u64, mut blob: impl Read) -> Result<(), GuestError> {
        let mut offset = 0u64;
        let mut chunk = vec![0u8; LAYER_CHUNK_BYTES];
        loop {
            let n = read_full(&mut blob, &mut chunk).map_err(|source| GuestError::Layer {
                path: PathBuf::new(),
                source,
            })?;
            if n == 0 {
                return Ok(());
            }
            self.agent
                .write_layer(
                    timeout(CALL_TIMEOUT),
                    &WriteLayerRequest {
                        upload_id,
                        offset,
                        data: chunk[..n].to_vec(),
                        ..Default::default()
                    },
                )
                .map_err(call("WriteLayer"))?;
            offset += n as u64;
        }
    }

    /// Creates container `id` on the image layers the agent holds as
    /// chain `chain_id` (sent with `push_image`).
    pub fn create(
        &self,
        id: &str,
        chain_id: &str,
        spec: &Spec,
        streams: Streams,
    ) -> Result<(), GuestError> {
        self.create_raw(id, chain_id, serde_json::to_vec(spec)?, streams)
    }

    /// Creates container `id` on the image layers attached as read-only
    /// disks with serials `layer_disks`, topmost first.
    pub fn create_on_disks(
        &self,
        id: &str,
        layer_disks: &[String],
        spec: &Spec,
        streams: Streams,
    ) -> Result<(), GuestError> {
        self.send_create(CreateContainerRequest {
            container_id: id.to_string(),
            layer_disks: layer_disks.to_vec(),
            oci_spec_json: serde_json::to_vec(spec)?,
            stdio: protobuf::MessageField::some(streams.request()),
            ..Default::default()
        })
    }

    /// Create with the spec as bytes, valid or not.
    pub fn create_raw(
        &self,
        id: &str,
        chain_id: &str,
        spec_json: Vec<u8>,
        streams: Streams,
    ) -> Result<(), GuestError> {
        self.send_create(CreateContainerRequest {
            container_id: id.to_string(),
            image_chain_id: chain_id.to_string(),
            oci_spec_json: spec_json,
            stdio: protobuf::MessageField::some(streams.request()),
            ..Default::default()
        })
    }

    fn send_create(&self, request: CreateContainerRequest) -> Result<(), GuestError> {
        self.agent
            .create_container(timeout(CALL_TIMEOUT), &request)
            .map_err(call("CreateContainer"))?;
        Ok(())
    }

    pub fn start(&self, id: &str) -> Result<(), GuestError> {
        self.agent
            .start_container(timeout(CALL_TIMEOUT), &container(id))
            .map_err(call("StartContainer"))?;
        Ok(())
    }

    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &Process,
        streams: Streams,
    ) -> Result<(), GuestError> {
        self.agent
            .exec_process(
                timeout(CALL_TIMEOUT),
                &ExecProcessRequest {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                    oci_process_json: serde_json::to_vec(process)?,
                    stdio: protobuf::MessageField::some(streams.request()),
                    ..Default::default()
                },
            )
            .map_err(call("ExecProcess"))?;
        Ok(())
    }

    /// One stream of a process (exec_id empty: the container's own).
    pub fn attach(
        &self,
        id: &str,
        exec_id: &str,
        kind: StreamKind,
    ) -> Result<UnixStream, GuestError> {
        self.open_stream(&StreamHeader::new(id, exec_id, kind), None)
    }

    /// Attaches an output stream whose reader acknowledges what it kept
    /// (capsa_protocol::stdio::ack) and resumes from `resume`, the last
    /// point it kept: the connection starts with the agent's preamble
    /// (`Resume::read_from`), then the bytes from there.
    pub fn attach_acked(
        &self,
        id: &str,
        exec_id: &str,
        kind: StreamKind,
        resume: Resume,
    ) -> Result<UnixStream, GuestError> {
        self.open_stream(&StreamHeader::new(id, exec_id, kind), Some(resume))
    }

    fn open_stream(
        &self,
        header: &StreamHeader,
        acked: Option<Resume>,
    ) -> Result<UnixStream, GuestError> {
        Ok(attach(&self.socket, header, acked)?)
    }

    /// Waits for the process to exit, with no time limit.
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<ExitInfo, GuestError> {
        let response = self
            .agent
            .wait_process(ttrpc::context::with_timeout(0), &process(id, exec_id))
            .map_err(call("WaitProcess"))?;
        Ok(ExitInfo {
            code: response.exit_code,
            signal: response.signal,
            oom_killed: response.oom_killed,
        })
    }

    pub fn signal(&self, id: &str, exec_id: &str, signal: i32) -> Result<(), GuestError> {
        self.agent
            .signal_process(
                timeout(CALL_TIMEOUT),
                &SignalProcessRequest {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                    signal,
                    ..Default::default()
                },
            )
            .map_err(call("SignalProcess"))?;
        Ok(())
    }

    pub fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), GuestError> {
        self.agent
            .resize_tty(
                timeout(CALL_TIMEOUT),
                &ResizeTtyRequest {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                    rows,
                    columns,
                    ..Default::default()
                },
            )
            .map_err(call("ResizeTty"))?;
        Ok(())
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), GuestError> {
        self.agent
            .close_stdin(timeout(CALL_TIMEOUT), &process(id, exec_id))
            .map_err(call("CloseStdin"))?;
        Ok(())
    }

    pub fn processes(&self, id: &str) -> Result<Vec<u32>, GuestError> {
        Ok(self
            .agent
            .list_processes(timeout(CALL_TIMEOUT), &container(id))
            .map_err(call("ListProcesses"))?
            .pids)
    }

    /// A container's processes with their users and command lines, as
    /// `top` shows them: at most MAX_PROCESSES, each command cut at
    /// MAX_COMMAND_BYTES (the guest says what they are).
    pub fn process_table(&self, id: &str) -> Result<Vec<ProcessInfo>, GuestError> {
        let mut processes = self
            .agent
            .list_processes(timeout(CALL_TIMEOUT), &container(id))
            .map_err(call("ListProcesses"))?
            .processes;
        processes.truncate(MAX_PROCESSES);
        for process in &mut processes {
            if process.command.len() > MAX_COMMAND_BYTES {
                let mut end = MAX_COMMAND_BYTES;
                while !process.command.is_char_boundary(end) {
                    end -= 1;
                }
                process.command.truncate(end);
            }
        }
        Ok(processes)
    }

    /// A container's figures; a guest gets a few seconds to give them
    /// (metrics and stats must not wait on one that does not answer).
    pub fn stats(&self, id: &str) -> Result<StatsResponse, GuestError> {
        self.agent
            .stats(timeout(STATS_TIMEOUT), &container(id))
            .map_err(call("Stats"))
    }

    /// New cgroup limits (OCI LinuxResources as JSON) for container `id`.
    pub fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<(), GuestError> {
        let request = UpdateContainerRequest {
            container_id: id.to_string(),
            resources_json,
            ..Default::default()
        };
        self.agent
            .update_container(timeout(CALL_TIMEOUT), &request)
            .map_err(call("UpdateContainer"))?;
        Ok(())
    }

    /// Makes the guest's shared directory `name` hold what the tar `tree`
    /// holds, the directory itself with `mode`, `uid` and `gid`.
    pub fn sync_directory(
        &self,
        name: &str,
        (mode, uid, gid): (u32, u32, u32),
        tree: &[u8],
    ) -> Result<(), GuestError> {
        let chunks: Vec<&[u8]> = tree.chunks(LAYER_CHUNK_BYTES).collect();
        let count = chunks.len();
        for (i, data) in chunks.into_iter().enumerate() {
            let last = i + 1 == count;
            let request = SyncDirectoryRequest {
                name: name.to_string(),
                offset: (i * LAYER_CHUNK_BYTES) as u64,
                data: data.to_vec(),
                last,
                mode: if last { mode } else { 0 },
                uid,
                gid,
                ..Default::default()
            };
            self.agent
                .sync_directory(timeout(CALL_TIMEOUT), &request)
                .map_err(call("SyncDirectory"))?;
        }
        Ok(())
    }

    /// Sends `archive` (capsa-copy's) for container `id` to unpack at
    /// `path`; `copy_id` tells this copy's chunks from another's. The host
    /// reads at most MAX_COPY_BYTES of it.
    pub fn copy_in(
        &self,
        id: &str,
        copy_id: u64,
        path: &str,
        mut archive: impl Read,
    ) -> Result<u64, GuestError> {
        let mut offset = 0u64;
        let mut chunk = vec![0u8; COPY_CHUNK_BYTES];
        loop {
            let filled = read_full(&mut archive, &mut chunk).map_err(|e| GuestError::Copy {
                message: format!("reading the archive: {e}"),
            })?;
            let last = filled < chunk.len();
            if offset + filled as u64 > MAX_COPY_BYTES {
                return Err(GuestError::Copy {
                    message: format!("the archive is over {MAX_COPY_BYTES} bytes"),
                });
            }
            let request = CopyInRequest {
                container_id: id.to_string(),
                copy_id,
                path: path.to_string(),
                offset,
                data: chunk[..filled].to_vec(),
                last,
                ..Default::default()
            };
            // The last chunk waits for the unpacking.
            let patience = if last { COPY_TIMEOUT } else { CALL_TIMEOUT };
            self.agent
                .copy_in(timeout(patience), &request)
                .map_err(call("CopyIn"))?;
            offset += filled as u64;
            if last {
                return Ok(offset);
            }
        }
    }

    /// Packs `path` of container `id` and hands the archive to `sink` chunk
    /// by chunk. The guest's answers are held to what it announced: a size
    /// within `limit`, chunks of at most COPY_CHUNK_BYTES that add up to it.
    pub fn copy_out(
        &self,
        id: &str,
        path: &str,
        limit: u64,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, GuestError> {
        let request = CopyOutRequest {
            container_id: id.to_string(),
            path: path.to_string(),
            ..Default::default()
        };
        let started = self
            .agent
            .copy_out(timeout(COPY_TIMEOUT), &request)
            .map_err(call("CopyOut"))?;
        let copy_id = started.copy_id;
        let result = (|| {
            if started.size > limit.min(MAX_COPY_BYTES) {
                return Err(GuestError::Copy {
                    message: format!(
                        "{path} packs to {} bytes, above the limit of {}",
                        started.size,
                        limit.min(MAX_COPY_BYTES)
                    ),
                });
            }
            let mut offset = 0u64;
            while offset < started.size {
                let request = ReadCopyRequest {
                    copy_id,
                    offset,
                    ..Default::default()
                };
                let data = self
                    .agent
                    .read_copy(timeout(CALL_TIMEOUT), &request)
                    .map_err(call("ReadCopy"))?
                    .data;
                let end = offset + data.len() as u64;
                if data.is_empty() || data.len() > COPY_CHUNK_BYTES || end > started.size {
                    return Err(GuestError::Copy {
                        message: format!(
                            "the agent sent {} bytes at offset {offset} of an archive of {}",
                            data.len(),
                            started.size
                        ),
                    });
                }
                sink(&data).map_err(|e| GuestError::Copy {
                    message: format!("passing the archive on: {e}"),
                })?;
                offset = end;
            }
            Ok(offset)
        })();
        let release = ReadCopyRequest {
            copy_id,
            ..Default::default()
        };
        let _ = self.agent.end_copy(timeout(CALL_TIMEOUT), &release);
        result
    }

    /// Sets the sandbox up once, before its first container: hostname,
    /// DNS, interfaces, volumes, clock.
    pub fn setup_sandbox(&self, request: &SetupSandboxRequest) -> Result<(), GuestError> {
        self.agent
            .setup_sandbox(timeout(CALL_TIMEOUT), request)
            .map_err(call("SetupSandbox"))?;
        Ok(())
    }

    /// The containers the agent has, with their status and init PID.
    pub fn containers(&self) -> Result<Vec<ContainerInfo>, GuestError> {
        Ok(self
            .agent
            .list_containers(timeout(CALL_TIMEOUT), &Empty::default())
            .map_err(call("ListContainers"))?
            .containers)
    }

    pub fn delete(&self, id: &str) -> Result<(), GuestError> {
        self.agent
            .delete_container(timeout(CALL_TIMEOUT), &container(id))
            .map_err(call("DeleteContainer"))?;
        Ok(())
    }

    pub fn ping(&self) -> Result<u64, GuestError> {
        Ok(self
            .agent
            .ping(timeout(CALL_TIMEOUT), &PingRequest::default())
            .map_err(call("Ping"))?
            .uptime_ms)
    }

    /// Gives the guest's CRNG fresh entropy from the host (`entropy`: 16
    /// to 4096 bytes the caller drew): after a restore, each clone's
    /// random bytes are its own from then on.
    pub fn reseed(&self, entropy: &[u8]) -> Result<(), GuestError> {
        self.agent
            .reseed(
                timeout(CALL_TIMEOUT),
                &ReseedRequest {
                    entropy: entropy.to_vec(),
                    ..Default::default()
                },
            )
            .map_err(call("Reseed"))?;
        Ok(())
    }

    /// [`Guest::reseed`] with 64 bytes of the host's /dev/urandom.
    pub fn reseed_from_host(&self) -> Result<(), GuestError> {
        let mut entropy = [0u8; 64];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut random| std::io::Read::read_exact(&mut random, &mut entropy))
            .map_err(GuestError::Entropy)?;
        self.reseed(&entropy)
    }

    /// Stops every container (SIGTERM, then SIGKILL after `grace`) and
    /// powers the VM off.
    pub fn shutdown(&self, grace: Duration) -> Result<(), GuestError> {
        self.agent
            .shutdown(
                timeout(CALL_TIMEOUT),
                &ShutdownRequest {
                    grace_ms: grace.as_millis().min(u32::MAX as u128) as u32,
                    ..Default::default()
                },
            )
            .map_err(call("Shutdown"))?;
        Ok(())
    }
}

fn container(id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: id.to_string(),
        ..Default::default()
    }
}

fn process(id: &str, exec_id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    }
}

fn call(name: &'static str) -> impl FnOnce(ttrpc::Error) -> GuestError {
    move |source| GuestError::Call { call: name, source }
}

/// Fills `buffer` unless the reader ends first; returns how much it read.
fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod describe_tests {
    use super::*;

    #[test]
    fn a_refused_call_reads_as_a_sentence() {
        let status = ttrpc::get_status(ttrpc::Code::DATA_LOSS, "layer x: no space left on device");
        let error = GuestError::Call {
            call: "CommitLayer",
            source: ttrpc::Error::RpcStatus(status),
        };
        assert_eq!(
            error.to_string(),
            "CommitLayer: layer x: no space left on device (the agent said: data loss)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_call_the_guest_never_answers_is_unanswered_and_a_refusal_is_not() {
        // An agent that takes the connection and never replies.
        let (ours, _silent) = UnixStream::pair().unwrap();
        let agent = AgentClient::new(ttrpc::Client::new(ours.into_raw_fd()).unwrap());
        let err = agent
            .ping(timeout(Duration::from_millis(200)), &PingRequest::default())
            .map_err(call("Ping"))
            .unwrap_err();
        assert!(err.is_unanswered(), "{err}");

        let refused = GuestError::Call {
            call: "DeleteContainer",
            source: ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::NOT_FOUND,
                "no such container",
            )),
        };
        assert!(!refused.is_unanswered());
        assert!(refused.is_not_found());
    }
}
