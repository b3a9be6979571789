//! The container's root filesystem, from inside its new mount namespace:
//! the overlay of image layers, the spec's mounts, device nodes, then
//! pivot_root and the masked and read-only paths.

use std::fs::{self, File};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chdir, pivot_root};
use oci_spec::runtime::{LinuxDeviceType, Mount, Spec};

use super::{Context, Failure};
use crate::config::RootfsLayout;

/// The nodes every container gets (as runc and crun give them).
const DEFAULT_DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

const DEFAULT_DEV_LINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// Symlinks followed while resolving one path inside the root, as the
/// kernel's own limit.
const MAX_SYMLINKS: usize = 40;

const NONE: Option<&str> = None;

pub fn prepare_root(spec: &Spec, layout: &RootfsLayout, console: bool) -> Result<(), Failure> {
    // Nothing mounted from here on may propagate back to the agent.
    mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE)
        .context(|| "making the mounts private".into())?;
    let root = &layout.target;
    mount_overlay(layout)?;
    for entry in spec.mounts().iter().flatten() {
        mount_entry(root, entry)?;
    }
    create_default_devices(root)?;
    create_spec_devices(root, spec)?;
    if console {
        bind_console(root)?;
    }
    enter_root(root)?;

    let linux = spec.linux().as_ref();
    for path in linux
        .and_then(|l| l.masked_paths().as_ref())
        .into_iter()
        .flatten()
    {
        mask(path)?;
    }
    for path in linux
        .and_then(|l| l.readonly_paths().as_ref())
        .into_iter()
        .flatten()
    {
        make_read_only(path)?;
    }
    for (key, value) in linux
        .and_then(|l| l.sysctl().as_ref())
        .into_iter()
        .flatten()
    {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        fs::write(&path, value).context(|| format!("setting sysctl {key}"))?;
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        mount(
            NONE,
            "/",
            NONE,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            NONE,
        )
        .context(|| "making the root read-only".into())?;
    }
    Ok(())
}

fn mount_overlay(layout: &RootfsLayout) -> Result<(), Failure> {
    let lower: Vec<String> = layout
        .lower
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        layout.upper.display(),
        layout.work.display()
    );
    mount(
        Some("overlay"),
        &layout.target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .context(|| format!("mounting the image's {} layers as an overlay", lower.len()))
}

/// Mount options split into flags, propagation changes and the rest.
struct Options {
    flags: MsFlags,
    propagation: Vec<MsFlags>,
    data: Vec<String>,
}

fn parse_options(options: &[String]) -> Options {
    let mut parsed = Options {
        flags: MsFlags::empty(),
        propagation: Vec::new(),
        data: Vec::new(),
    };
    for option in options {
        let (set, clear) = match option.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            other => {
                let propagation = match other {
                    "private" => Some(MsFlags::MS_PRIVATE),
                    "rprivate" => Some(MsFlags::MS_PRIVATE | MsFlags::MS_REC),
                    "shared" => Some(MsFlags::MS_SHARED),
                    "rshared" => Some(MsFlags::MS_SHARED | MsFlags::MS_REC),
                    "slave" => Some(MsFlags::MS_SLAVE),
                    "rslave" => Some(MsFlags::MS_SLAVE | MsFlags::MS_REC),
                    "unbindable" => Some(MsFlags::MS_UNBINDABLE),
                    "runbindable" => Some(MsFlags::MS_UNBINDABLE | MsFlags::MS_REC),
                    _ => None,
                };
                match propagation {
                    Some(flag) => parsed.propagation.push(flag),
                    None => parsed.data.push(other.to_string()),
                }
                continue;
            }
        };
        parsed.flags.insert(set);
        parsed.flags.remove(clear);
    }
    parsed
}

fn mount_entry(root: &Path, entry: &Mount) -> Result<(), Failure> {
    let destination = entry.destination();
    let target = resolve_in_root(root, destination)?;
    let options = parse_options(entry.options().as_deref().unwrap_or_default());
    let kind = entry.typ().as_deref().unwrap_or("");
    let what = || format!("mounting {} ({kind})", destination.display());
    if kind == "bind" || options.flags.contains(MsFlags::MS_BIND) {
        let source = entry
            .source()
            .as_ref()
            .ok_or_else(|| format!("{}: a bind mount needs a source", what()))?;
        let source_is_dir = fs::metadata(source)
            .context(|| format!("{}: its source {}", what(), source.display()))?
            .is_dir();
        create_mount_point(&target, source_is_dir).context(what)?;
        let recursive = options.flags & MsFlags::MS_REC;
        mount(
            Some(source),
            &target,
            NONE,
            MsFlags::MS_BIND | recursive,
            NONE,
        )
        .context(what)?;
        let extra = options.flags - MsFlags::MS_BIND - MsFlags::MS_REC;
        if !extra.is_empty() {
            // Bind mounts take their flags only on a remount.
            mount(
                NONE,
                &target,
                NONE,
                extra | MsFlags::MS_BIND | MsFlags::MS_REMOUNT | recursive,
                NONE,
            )
            .context(what)?;
        }
    } else {
        create_mount_point(&target, true).context(what)?;
        // The guest has only cgroup v2, whichever the spec names.
        let kind = if kind == "cgroup" { "cgroup2" } else { kind };
        let source = entry
            .source()
            .as_ref()
            .map(|s| s.display().to_string())
            .unwrap_or_else(|| kind.to_string());
        let data = options.data.join(",");
        mount(
            Some(source.as_str()),
            &target,
            Some(kind),
            options.flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .context(what)?;
    }
    for flag in options.propagation {
        mount(NONE, &target, NONE, flag, NONE).context(what)?;
    }
    Ok(())
}

fn create_mount_point(target: &Path, directory: bool) -> std::io::Result<()> {
    if directory {
        return fs::create_dir_all(target);
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    if !target.exists() {
        File::create(target)?;
    }
    Ok(())
}

/// `path` inside `root`, with symlinks resolved as if `root` were `/`, so
/// a link in the image cannot send a mount onto the agent's filesystem.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, Failure> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<PathBuf> = path
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        match part.components().next() {
            Some(Component::Normal(name)) => {
                let candidate = root.join(&resolved).join(name);
                match fs::symlink_metadata(&candidate) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        links += 1;
                        if links > MAX_SYMLINKS {
                            return Err(format!("{}: too many levels of symlinks", path.display()));
                        }
                        let target = fs::read_link(&candidate)
                            .context(|| format!("reading the symlink {}", candidate.display()))?;
                        if target.is_absolute() {
                            resolved = PathBuf::new();
                        }
                        pending.extend(
                            target
                                .components()
                                .rev()
                                .map(|c| PathBuf::from(c.as_os_str())),
                        );
                    }
                    _ => resolved.push(name),
                }
            }
            Some(Component::ParentDir) => {
                resolved.pop();
            }
            _ => {}
        }
    }
    Ok(root.join(resolved))
}

fn create_default_devices(root: &Path) -> Result<(), Failure> {
    let dev = root.join("dev");
    fs::create_dir_all(&dev).context(|| "creating /dev".into())?;
    for (name, major, minor) in DEFAULT_DEVICES {
        make_node(
            &dev.join(name),
            SFlag::S_IFCHR,
            0o666,
            makedev(*major, *minor),
        )?;
    }
    for (name, target) in DEFAULT_DEV_LINKS {
        let link = dev.join(name);
        if fs::symlink_metadata(&link).is_err() {
            symlink(target, &link).context(|| format!("linking /dev/{name}"))?;
        }
    }
    Ok(())
}

fn create_spec_devices(root: &Path, spec: &Spec) -> Result<(), Failure> {
    let devices = spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default();
    for device in devices {
        let kind = match device.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            LinuxDeviceType::A => continue,
        };
        let path = resolve_in_root(root, device.path())?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
        }
        let mode = device.file_mode().unwrap_or(0o666);
        let number = makedev(device.major() as u64, device.minor() as u64);
        make_node(&path, kind, mode, number)?;
        let uid = device.uid().map(nix::unistd::Uid::from_raw);
        let gid = device.gid().map(nix::unistd::Gid::from_raw);
        nix::unistd::chown(&path, uid, gid)
            .context(|| format!("owning {}", device.path().display()))?;
    }
    Ok(())
}

fn make_node(path: &Path, kind: SFlag, mode: u32, number: u64) -> Result<(), Failure> {
    if fs::symlink_metadata(path).is_ok() {
        fs::remove_file(path).context(|| format!("replacing {}", path.display()))?;
    }
    mknod(path, kind, Mode::from_bits_truncate(mode), number)
        .context(|| format!("creating the device {}", path.display()))?;
    // mknod's mode went through the umask.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .context(|| format!("setting the mode of {}", path.display()))
}

/// Binds the terminal on our stdin over /dev/console, as runc does.
fn bind_console(root: &Path) -> Result<(), Failure> {
    let tty = fs::read_link("/proc/self/fd/0").context(|| "finding the terminal".into())?;
    let console = root.join("dev/console");
    create_mount_point(&console, false).context(|| "creating /dev/console".into())?;
    mount(Some(&tty), &console, NONE, MsFlags::MS_BIND, NONE)
        .context(|| "binding the terminal to /dev/console".into())
}

/// pivot_root into `root` and detach the old root, so nothing outside the
/// container's filesystem stays reachable.
fn enter_root(root: &Path) -> Result<(), Failure> {
    chdir(root).context(|| format!("entering {}", root.display()))?;
    pivot_root(".", ".").context(|| "pivot_root".into())?;
    umount2(".", MntFlags::MNT_DETACH).context(|| "detaching the old root".into())?;
    chdir("/").context(|| "entering /".into())
}

fn mask(path: &str) -> Result<(), Failure> {
    let Ok(meta) = fs::metadata(path) else {
        return Ok(());
    };
    let result = if meta.is_dir() {
        mount(Some("tmpfs"), path, Some("tmpfs"), MsFlags::MS_RDONLY, NONE)
    } else {
        mount(Some("/dev/null"), path, NONE, MsFlags::MS_BIND, NONE)
    };
    result.context(|| format!("masking {path}"))
}

fn make_read_only(path: &str) -> Result<(), Failure> {
    if fs::metadata(path).is_err() {
        return Ok(());
    }
    let what = || format!("making {path} read-only");
    mount(
        Some(path),
        path,
        NONE,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        NONE,
    )
    .context(what)?;
    mount(
        NONE,
        path,
        NONE,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        NONE,
    )
    .context(what)
}
