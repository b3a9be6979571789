//! The stdio of a container process: pipes for the streams the host
//! attaches, /dev/null for the others, or one pty for a terminal.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::pty::{openpty, Winsize};
use nix::unistd::pipe2;

/// Which streams the host attaches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StdioRequest {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// The runtime's ends of a process's stdio. With a terminal, `terminal`
/// is the pty's master (input and output both) and the rest are None.
#[derive(Debug, Default)]
pub struct ProcessIo {
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    pub terminal: Option<File>,
}

/// The child's ends, placed on its fds 0, 1 and 2.
pub(crate) struct ChildIo {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

pub(crate) fn prepare(
    request: StdioRequest,
    terminal: Option<(u16, u16)>,
) -> io::Result<(ChildIo, ProcessIo)> {
    if let Some((rows, columns)) = terminal {
        let size = Winsize {
            ws_row: rows,
            ws_col: columns,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&size), None)?;
        // Other processes spawned meanwhile must not inherit either end.
        for fd in [&pty.master, &pty.slave] {
            fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        }
        let child = ChildIo {
            stdin: pty.slave.try_clone()?,
            stdout: pty.slave.try_clone()?,
            stderr: pty.slave,
        };
        let ours = ProcessIo {
            terminal: Some(File::from(pty.master)),
            ..ProcessIo::default()
        };
        return Ok((child, ours));
    }
    let mut ours = ProcessIo::default();
    let stdin = if request.stdin {
        let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
        ours.stdin = Some(File::from(write));
        read
    } else {
        null()?
    };
    let output = |wanted: bool, slot: &mut Option<File>| -> io::Result<OwnedFd> {
        if !wanted {
            return null();
        }
        let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
        *slot = Some(File::from(read));
        Ok(write)
    };
    let stdout = output(request.stdout, &mut ours.stdout)?;
    let stderr = output(request.stderr, &mut ours.stderr)?;
    Ok((
        ChildIo {
            stdin,
            stdout,
            stderr,
        },
        ours,
    ))
}

fn null() -> io::Result<OwnedFd> {
    Ok(File::options()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

/// Sets a terminal's size (the process gets SIGWINCH).
pub fn resize(terminal: &File, rows: u16, columns: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points
    // at a live local.
    let result = unsafe { libc::ioctl(terminal.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
