//! Runs OCI containers inside a Capsa guest: each on an overlay of its
//! image's layers, in its own mount, PID, IPC and UTS namespaces (the
//! network namespace is the group's), in its own cgroup v2, with the user,
//! capabilities, limits and mounts its runtime spec asks for.
//!
//! The setup itself happens in a helper process (`init::main`, started by
//! running the agent's binary again), which may fork and change namespaces
//! freely; the runtime drives it over a socket.

pub mod cgroup;
mod channel;
mod config;
mod container;
pub mod init;
pub mod reaper;
pub mod seccomp;
pub mod stdio;
pub mod user;

pub use cgroup::{Cgroup, CgroupError, CgroupStats};
pub use container::{
    is_cgroup2, validate_id, Container, ProcessEntry, Runtime, RuntimeConfig, RuntimeError,
};
pub use oci_spec::runtime::{Process, Spec};
pub use reaper::{ExitStatus, Reaper};
pub use stdio::{resize, ProcessIo, StdioRequest};
