//! What the host sees of a jailed VMM from /proc: each of its processes
//! (the one capsad started, which only waits, and the VMM in the jail's
//! PID namespace) and each of their threads.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use capsa_jail::TaskStatus;

/// Checks every thread of the VMM started as `pid`, whose jail is `jail`,
/// and every descriptor either process holds: each must be KVM's, an
/// eventfd, epoll, a socket or pipe, the tap, /dev/null, or a file of its
/// own group (`group_dir`) or of the daemon's layer images and volumes
/// under `root`. Returns a summary.
pub fn inspect(pid: u32, jail: &Path, group_dir: &Path, root: &Path) -> Result<String> {
    let processes = capsa_vm_process::vmm_processes(pid);
    ensure!(
        processes.len() == 2,
        "expected the waiter and the VMM, found processes {processes:?}"
    );
    let jail_id = std::fs::metadata(jail)
        .with_context(|| format!("the jail {}", jail.display()))
        .map(|m| (m.dev(), m.ino()))?;
    let mut uids = Vec::new();
    let mut threads = 0;
    let mut fds = Vec::new();
    for process in &processes {
        let root_id = std::fs::metadata(format!("/proc/{process}/root"))
            .map(|m| (m.dev(), m.ino()))
            .with_context(|| format!("the root of process {process}"))?;
        ensure!(
            root_id == jail_id,
            "process {process}'s root is not its jail {}",
            jail.display()
        );
        for task in std::fs::read_dir(format!("/proc/{process}/task"))?.flatten() {
            let thread = TaskStatus::parse(&std::fs::read_to_string(task.path().join("status"))?);
            let id: u32 = thread
                .uids
                .split(' ')
                .next()
                .and_then(|id| id.parse().ok())
                .unwrap_or(0);
            ensure!(thread.is_jailed_as(id), "process {process}: {thread:?}");
            uids.push(id);
            threads += 1;
        }
        for fd in std::fs::read_dir(format!("/proc/{process}/fd"))?.flatten() {
            let target = std::fs::read_link(fd.path())?;
            fds.push((*process, target));
        }
    }
    uids.dedup();
    ensure!(
        uids.len() == 1,
        "the threads run as different users: {uids:?}"
    );
    let expected = |target: &Path| {
        let text = target.to_string_lossy();
        ["anon_inode:", "socket:", "pipe:"]
            .iter()
            .any(|kind| text.starts_with(kind))
            || ["/dev/kvm", "/dev/net/tun", "/dev/null"]
                .iter()
                .any(|dev| target == Path::new(dev))
            || target.starts_with(group_dir)
            || target.starts_with(root.join("layer-images"))
            || target.starts_with(root.join("volumes"))
    };
    let unexpected: Vec<_> = fds.iter().filter(|(_, t)| !expected(t)).collect();
    ensure!(
        unexpected.is_empty(),
        "unexpected descriptors: {unexpected:?}"
    );
    let waiter = fds.iter().filter(|(p, _)| *p == processes[0]).count();
    ensure!(
        waiter == 2,
        "the waiter holds {waiter} descriptors, not 2 (standard error and its pipe)"
    );
    Ok(format!(
        "{} processes, {threads} threads, uid and gid {}; {} descriptors, all its own",
        processes.len(),
        uids[0],
        fds.len()
    ))
}
