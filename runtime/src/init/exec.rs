//! The process's own setup, then its identity and the exec.

use std::collections::HashSet;
use std::convert::Infallible;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{access, setgid, setgroups, setsid, setuid, AccessFlags, Gid, Uid};
use oci_spec::runtime::{Capabilities, PosixRlimitType, Process};

use super::{Context, Failure};
use crate::seccomp::Filters;
use crate::user;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What must happen while still root and before Ready, inside the
/// container's root: session and terminal, limits, working directory, and
/// the user as the container's /etc/passwd and /etc/group say (see
/// `user`). Returns the process with its user resolved and HOME set when
/// its environment has none, as runc and crun do.
pub fn prepare(process: &Process) -> Result<Process, Failure> {
    setsid().context(|| "starting a session".into())?;
    if process.terminal().unwrap_or(false) {
        // SAFETY: TIOCSCTTY takes an integer argument and touches no memory
        // of ours; fd 0 is the pty the runtime gave us.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(format!(
                "taking the terminal as controlling terminal: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    for rlimit in process.rlimits().iter().flatten() {
        let resource = resource_of(rlimit.typ());
        setrlimit(resource, rlimit.soft(), rlimit.hard())
            .context(|| format!("setting {:?}", rlimit.typ()))?;
    }
    if let Some(score) = process.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", score.to_string())
            .context(|| "setting oom_score_adj".into())?;
    }
    let process = with_resolved_user(process)?;
    let cwd = process.cwd();
    nix::unistd::chdir(cwd)
        .context(|| format!("entering the working directory {}", cwd.display()))?;
    Ok(process)
}

/// The process with numeric ids for its user: a `username` (the unresolved
/// `user[:group]` an image or a spec gives) is looked up; without one the
/// ids stand as given. HOME comes from the user's passwd entry.
fn with_resolved_user(process: &Process) -> Result<Process, Failure> {
    let read = |path: &str| user::read_database(Path::new(path)).map_err(|e| e.to_string());
    let (passwd, group) = (read("/etc/passwd")?, read("/etc/group")?);
    let mut process = process.clone();
    let mut spec_user = process.user().clone();
    let (wanted, by_name) = match spec_user.username() {
        Some(name) => (name.clone(), true),
        None => (spec_user.uid().to_string(), false),
    };
    let resolved = user::resolve(&wanted, &passwd, &group).map_err(|e| e.to_string())?;
    if by_name {
        spec_user.set_uid(resolved.uid);
        spec_user.set_gid(resolved.gid);
        let mut gids = resolved.additional_gids.clone();
        gids.extend(spec_user.additional_gids().iter().flatten());
        spec_user.set_additional_gids(Some(gids));
        spec_user.set_username(None);
        process.set_user(spec_user);
    }
    let mut env = process.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", resolved.home));
        process.set_env(Some(env));
    }
    Ok(process)
}

fn resource_of(kind: PosixRlimitType) -> Resource {
    match kind {
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
    }
}

/// Becomes the spec's user with its capabilities and execs the process,
/// under the container's seccomp filters if it has any: last of all where
/// no_new_privs is set, else while the process still has CAP_SYS_ADMIN
/// (which installing a filter without no_new_privs needs), as runc does.
pub fn become_process(process: &Process, filters: Option<&Filters>) -> Result<Infallible, Failure> {
    // Found while still root: the user may not be able to search PATH.
    let (program, args, env) = command_of(process)?;
    let no_new_privs = process.no_new_privileges().unwrap_or(false);
    let install = |filters: Option<&Filters>| -> Result<(), Failure> {
        match filters {
            Some(filters) => filters
                .install()
                .context(|| "installing the seccomp filters".into()),
            None => Ok(()),
        }
    };
    if !no_new_privs {
        install(filters)?;
    }
    let capabilities = process.capabilities().as_ref();
    if let Some(capabilities) = capabilities {
        let bounding = to_caps(capabilities.bounding().as_ref())?;
        for capability in caps::all() {
            if !bounding.contains(&capability) {
                // A capability this kernel does not know is already gone.
                let _ = caps::drop(None, CapSet::Bounding, capability);
            }
        }
        // Keep the permitted set across setuid; the sets are set after.
        nix::sys::prctl::set_keepcaps(true).context(|| "keeping capabilities".into())?;
    }

    let user = process.user();
    let groups: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|&g| Gid::from_raw(g))
        .collect();
    setgroups(&groups).context(|| "setting the additional groups".into())?;
    setgid(Gid::from_raw(user.gid())).context(|| format!("setting gid {}", user.gid()))?;
    setuid(Uid::from_raw(user.uid())).context(|| format!("setting uid {}", user.uid()))?;
    if let Some(mask) = user.umask() {
        umask(Mode::from_bits_truncate(mask));
    }

    if let Some(capabilities) = capabilities {
        // Effective first: it must stay within permitted at every step.
        let sets = [
            (CapSet::Effective, capabilities.effective()),
            (CapSet::Permitted, capabilities.permitted()),
            (CapSet::Inheritable, capabilities.inheritable()),
        ];
        for (set, wanted) in sets {
            caps::set(None, set, &to_caps(wanted.as_ref())?)
                .context(|| format!("setting the {set:?} capabilities"))?;
        }
        caps::clear(None, CapSet::Ambient).context(|| "clearing ambient capabilities".into())?;
        for capability in to_caps(capabilities.ambient().as_ref())? {
            caps::raise(None, CapSet::Ambient, capability)
                .context(|| format!("raising ambient {capability}"))?;
        }
    }
    if no_new_privs {
        nix::sys::prctl::set_no_new_privs().context(|| "setting no_new_privs".into())?;
        install(filters)?;
    }
    let error = nix::unistd::execve(&program, &args, &env).unwrap_err();
    Err(format!("exec {}: {error}", program.to_string_lossy()))
}

fn to_caps(set: Option<&Capabilities>) -> Result<CapsHashSet, Failure> {
    let mut converted = HashSet::new();
    for capability in set.into_iter().flatten() {
        let name = format!("CAP_{capability}");
        let parsed: Capability = name
            .parse()
            .map_err(|_| format!("unknown capability {name}"))?;
        converted.insert(parsed);
    }
    Ok(converted)
}

/// The program (found on the process's PATH), argv and environment.
fn command_of(process: &Process) -> Result<(CString, Vec<CString>, Vec<CString>), Failure> {
    let args = process
        .args()
        .as_ref()
        .filter(|a| !a.is_empty())
        .ok_or("the process has no args")?;
    let env: Vec<String> = process.env().clone().unwrap_or_default();
    let to_c = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"));
    let search_path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let program = find_program(&args[0], search_path)?;
    let program = CString::new(program.as_os_str().as_bytes())
        .map_err(|_| format!("{:?} contains a NUL byte", args[0]))?;
    let args = args.iter().map(|a| to_c(a)).collect::<Result<_, _>>()?;
    let env = env.iter().map(|e| to_c(e)).collect::<Result<_, _>>()?;
    Ok((program, args, env))
}

fn find_program(name: &str, search_path: &str) -> Result<PathBuf, Failure> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    search_path
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| candidate.is_file() && access(candidate, AccessFlags::X_OK).is_ok())
        .ok_or_else(|| format!("executable file {name:?} not found in PATH {search_path}"))
}
