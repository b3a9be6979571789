//! Descriptors the VMM inherits for its devices (`fd=N`), opened by
//! whoever started it (capsad or the shim), so that a jailed VMM never
//! opens a host file or makes a tap itself.

use std::os::fd::{FromRawFd, OwnedFd};

/// Takes ownership of the inherited descriptor `fd`. Each is named by one
/// device only (`VmConfig::validate` refuses a number given twice), and
/// each device adopts its own once.
pub fn adopt(fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: F_GETFD and F_SETFD take and return numbers only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::other(format!(
            "descriptor {fd} was not passed to the VMM: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: as above. Not passed on to anything the VMM might start.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: `fd` is open (checked above), nothing else in this process
    // owns it (it was inherited, and only its device adopts it).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
