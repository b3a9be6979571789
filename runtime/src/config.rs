//! What the runtime tells its container-init helper to set up.

use std::path::PathBuf;

use oci_spec::runtime::{LinuxSeccomp, Process, Spec};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct InitConfig {
    pub mode: Mode,
    /// The cgroup v2 directory the process joins before anything else.
    pub cgroup: Option<PathBuf>,
    pub process: Process,
    /// The container's seccomp profile, for its every process.
    pub seccomp: Option<LinuxSeccomp>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Mode {
    /// A new container: namespaces, root filesystem and mounts from `spec`.
    Create {
        spec: Box<Spec>,
        rootfs: RootfsLayout,
    },
    /// A further process in the namespaces of the container whose first
    /// process is `init_pid`.
    Exec { init_pid: i32 },
}

/// The overlay that becomes the container's root.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsLayout {
    /// Image layers, topmost first.
    pub lower: Vec<PathBuf>,
    /// The container's writable layer and overlayfs' work directory.
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Where the overlay is mounted before pivot_root.
    pub target: PathBuf,
}
