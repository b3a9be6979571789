//! Processes started in a running container (`capsa exec`), their streams
//! attached.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use capsa_api::exec::ExecRequest;
use capsa_api::{ApiError, ContainerStatus, ErrorCode};
use capsa_guest_client::{Guest, Streams};
use capsa_protocol::stdio::StreamKind;

use super::{oci, Daemon};
use crate::errors::{conflict, error, internal, invalid, no_container};

/// A process started by `exec`, with its streams attached.
pub struct Exec {
    pub guest: Arc<Guest>,
    pub container: String,
    pub exec_id: String,
    pub stdin: Option<UnixStream>,
    pub stdout: UnixStream,
    pub stderr: Option<UnixStream>,
}

impl Daemon {
    /// Starts `request.command` in a running container and attaches its
    /// streams (stdin when asked, stdout, and stderr unless on a terminal).
    pub fn exec_start(
        &self,
        name: &str,
        container: &str,
        request: &ExecRequest,
    ) -> Result<Exec, ApiError> {
        let group = self.group(name)?;
        let guest = group.guest_within(super::ADOPTION_PATIENCE);
        let record = group.snapshot();
        let spec = record
            .spec
            .containers
            .iter()
            .find(|c| c.name == container)
            .ok_or_else(|| no_container(name, container))?;
        let running = record
            .containers
            .iter()
            .any(|c| c.name == container && c.status == ContainerStatus::Running);
        let (Some(guest), true) = (guest, running) else {
            return Err(conflict(format!(
                "container {name}/{container} is not running"
            )));
        };
        if request.command.is_empty() {
            return Err(error(ErrorCode::InvalidRequest, "exec needs a command"));
        }
        let image = self.open_image(&spec.image)?;
        let mut process = oci::spec_for(&image, spec, name)
            .map_err(internal)?
            .process()
            .clone()
            .unwrap_or_default();
        process.set_args(Some(request.command.clone()));
        process.set_terminal(Some(request.tty));
        if request.tty {
            process.set_console_size(Some(
                oci_spec::runtime::BoxBuilder::default()
                    .height(u64::from(request.rows.max(1)))
                    .width(u64::from(request.columns.max(1)))
                    .build()
                    .map_err(internal)?,
            ));
        }
        let exec_id = format!(
            "exec-{}",
            self.next_exec
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let streams = Streams {
            stdin: request.stdin,
            stdout: true,
            stderr: !request.tty,
        };
        guest
            .exec(container, &exec_id, &process, streams)
            .map_err(invalid)?;
        let attach = |kind| guest.attach(container, &exec_id, kind).map_err(internal);
        let stdin = if request.stdin {
            Some(attach(StreamKind::Stdin)?)
        } else {
            None
        };
        let stdout = attach(StreamKind::Stdout)?;
        let stderr = if request.tty {
            None
        } else {
            Some(attach(StreamKind::Stderr)?)
        };
        Ok(Exec {
            guest,
            container: container.to_string(),
            exec_id,
            stdin,
            stdout,
            stderr,
        })
    }
}
