//! The group's environment, set once by the host: hostname, DNS, volumes
//! and the guest clock. Containers get the sandbox's hostname, hosts and
//! resolv.conf files bound in unless their spec mounts their own.

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use capsa_protocol::agent::{volume, SetupSandboxRequest, Volume};
use capsa_protocol::VOLUMES_DIR;
use nix::mount::{mount, MsFlags};
use oci_spec::runtime::{Mount, MountBuilder};

use crate::errors::ApiError;
use crate::net;

const SANDBOX_FILES_DIR: &str = "/run/capsa/sandbox";
/// The files containers get from the sandbox, by their path in the
/// container.
const SANDBOX_FILES: &[(&str, &str)] = &[
    ("hostname", "/etc/hostname"),
    ("hosts", "/etc/hosts"),
    ("resolv.conf", "/etc/resolv.conf"),
];

#[derive(Default)]
pub struct Sandbox {
    set_up: Mutex<bool>,
}

impl Sandbox {
    pub fn setup(&self, request: &SetupSandboxRequest) -> Result<(), ApiError> {
        let mut set_up = self.set_up.lock().unwrap_or_else(|e| e.into_inner());
        if *set_up {
            return Err(ApiError::precondition(
                "the sandbox is already set up".into(),
            ));
        }
        let hostname = if request.hostname.is_empty() {
            "capsa"
        } else {
            request.hostname.as_str()
        };
        validate_hostname(hostname)?;
        let dns = request.dns.as_ref();
        let resolv = resolv_conf(
            dns.map(|d| d.servers.as_slice()).unwrap_or_default(),
            dns.map(|d| d.search.as_slice()).unwrap_or_default(),
            dns.map(|d| d.options.as_slice()).unwrap_or_default(),
        )?;
        for volume in &request.volumes {
            validate_volume(volume)?;
        }
        if request.time_unix_ns != 0 {
            set_time(request.time_unix_ns)?;
        }
        net::configure(&request.interfaces, &request.routes)?;
        nix::unistd::sethostname(hostname)
            .map_err(|e| ApiError::internal(format!("setting the hostname: {e}")))?;
        let addresses: Vec<String> = request
            .interfaces
            .iter()
            .flat_map(|i| i.addresses.iter())
            .filter_map(|a| a.split('/').next().map(str::to_string))
            .collect();
        let mut hosts =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        for address in addresses {
            hosts.push_str(&format!("{address}\t{hostname}\n"));
        }
        write_sandbox_file("hostname", &format!("{hostname}\n"))?;
        write_sandbox_file("hosts", &hosts)?;
        write_sandbox_file("resolv.conf", &resolv)?;
        for volume in &request.volumes {
            mount_volume(volume)?;
        }
        if request.scratch_disk.is_empty() {
            crate::disks::mount_scratch_in_memory()?;
        } else {
            crate::disks::mount_scratch(&request.scratch_disk)?;
        }
        *set_up = true;
        Ok(())
    }

    /// Bind mounts of the sandbox's files, once it is set up.
    pub fn container_mounts(&self) -> Vec<Mount> {
        if !*self.set_up.lock().unwrap_or_else(|e| e.into_inner()) {
            return Vec::new();
        }
        SANDBOX_FILES
            .iter()
            .filter_map(|(name, destination)| {
                MountBuilder::default()
                    .destination(destination)
                    .typ("bind")
                    .source(Path::new(SANDBOX_FILES_DIR).join(name))
                    .options(vec!["rbind".to_string(), "ro".to_string()])
                    .build()
                    .ok()
            })
            .collect()
    }
}

/// Unmounts the group's volumes, once their containers are gone, so a
/// persistent volume's file system is left clean (a later read-only
/// attach cannot replay a journal).
pub fn unmount_volumes() {
    let Ok(entries) = std::fs::read_dir(VOLUMES_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let target = entry.path();
        if nix::mount::umount2(&target, nix::mount::MntFlags::empty()).is_err() {
            // Still in use somewhere: at least detach it and write back.
            let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    nix::unistd::sync();
}

pub fn set_time(unix_ns: i64) -> Result<(), ApiError> {
    if unix_ns <= 0 {
        return Err(ApiError::invalid(format!(
            "time {unix_ns} is not after 1970"
        )));
    }
    let time = nix::sys::time::TimeSpec::new(unix_ns / 1_000_000_000, unix_ns % 1_000_000_000);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, time)
        .map_err(|e| ApiError::internal(format!("setting the clock: {e}")))
}

/// Bytes of host entropy a reseed takes: enough to matter, bounded.
const RESEED_BYTES: std::ops::RangeInclusive<usize> = 16..=4096;

// RNDADDENTROPY and RNDRESEEDCRNG (linux/random.h).
nix::ioctl_write_ptr!(add_entropy, b'R', 0x03, [libc::c_int; 2]);
nix::ioctl_none!(reseed_crng, b'R', 0x07);

/// Mixes `entropy` into the kernel's pool, credited, and reseeds the CRNG
/// from it, so that what /dev/urandom and getrandom give from now on
/// differs from any other VM restored from the same snapshot.
pub fn reseed(entropy: &[u8]) -> Result<(), ApiError> {
    if !RESEED_BYTES.contains(&entropy.len()) {
        return Err(ApiError::invalid(format!(
            "{} bytes of entropy: give {} to {}",
            entropy.len(),
            RESEED_BYTES.start(),
            RESEED_BYTES.end()
        )));
    }
    // struct rand_pool_info: entropy_count (bits), buf_size (bytes), buf.
    let mut info: Vec<libc::c_int> = vec![
        (entropy.len() * 8) as libc::c_int,
        entropy.len() as libc::c_int,
    ];
    for word in entropy.chunks(4) {
        let mut bytes = [0u8; 4];
        bytes[..word.len()].copy_from_slice(word);
        info.push(libc::c_int::from_ne_bytes(bytes));
    }
    let urandom = std::fs::File::open("/dev/urandom")
        .map_err(|e| ApiError::internal(format!("opening /dev/urandom: {e}")))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&urandom);
    // SAFETY: `info` is a rand_pool_info header followed by `buf_size`
    // bytes of buffer, all of it owned and alive for the call; the kernel
    // reads no more than the header says.
    unsafe { add_entropy(fd, info.as_ptr().cast()) }
        .map_err(|e| ApiError::internal(format!("adding entropy: {e}")))?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    unsafe { reseed_crng(fd) }
        .map_err(|e| ApiError::internal(format!("reseeding the CRNG: {e}")))?;
    Ok(())
}

fn validate_hostname(hostname: &str) -> Result<(), ApiError> {
    let valid = hostname.len() <= 64
        && hostname.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid(format!("invalid hostname {hostname:?}")))
    }
}

fn resolv_conf(
    servers: &[String],
    search: &[String],
    options: &[String],
) -> Result<String, ApiError> {
    let mut text = String::new();
    for server in servers {
        let address: IpAddr = server.parse().map_err(|_| {
            ApiError::invalid(format!("DNS server {server:?} is not an IP address"))
        })?;
        text.push_str(&format!("nameserver {address}\n"));
    }
    let word = |w: &String| !w.is_empty() && !w.chars().any(char::is_whitespace);
    if let Some(bad) = search.iter().chain(options).find(|w| !word(w)) {
        return Err(ApiError::invalid(format!(
            "invalid DNS search or option {bad:?}"
        )));
    }
    if !search.is_empty() {
        text.push_str(&format!("search {}\n", search.join(" ")));
    }
    if !options.is_empty() {
        text.push_str(&format!("options {}\n", options.join(" ")));
    }
    Ok(text)
}

fn write_sandbox_file(name: &str, content: &str) -> Result<(), ApiError> {
    let dir = Path::new(SANDBOX_FILES_DIR);
    fs::create_dir_all(dir)
        .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
    let path = dir.join(name);
    fs::write(&path, content)
        .map_err(|e| ApiError::internal(format!("writing {}: {e}", path.display())))
}

fn validate_volume(volume: &Volume) -> Result<(), ApiError> {
    capsa_runtime::validate_id(&volume.name)
        .map_err(|_| ApiError::invalid(format!("invalid volume name {:?}", volume.name)))?;
    match &volume.source {
        Some(volume::Source::Secret(secret)) => {
            for file in &secret.files {
                relative_path(&file.path).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "secret volume {}: file path {:?} must be relative and stay inside",
                        volume.name, file.path
                    ))
                })?;
            }
            Ok(())
        }
        Some(volume::Source::Block(block)) if block.serial.is_empty() => Err(ApiError::invalid(
            format!("block volume {}: no serial", volume.name),
        )),
        Some(_) => Ok(()),
        None => Err(ApiError::invalid(format!(
            "volume {} has no source",
            volume.name
        ))),
    }
}

fn relative_path(text: &str) -> Option<PathBuf> {
    let path = Path::new(text);
    let normal = path.components().all(|c| matches!(c, Component::Normal(_)));
    (normal && !text.is_empty()).then(|| path.to_path_buf())
}

fn mount_volume(volume: &Volume) -> Result<(), ApiError> {
    let target = Path::new(VOLUMES_DIR).join(&volume.name);
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        ApiError::internal(format!("volume {}: {what}: {e}", volume.name))
    };
    fs::create_dir_all(&target).map_err(|e| failed("creating its directory", &e))?;
    let nodev = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    match &volume.source {
        Some(volume::Source::EmptyDir(empty)) => {
            let mut options = String::from("mode=0777");
            if empty.size_limit_bytes > 0 {
                options.push_str(&format!(",size={}", empty.size_limit_bytes));
            }
            mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                nodev,
                Some(options.as_str()),
            )
            .map_err(|e| failed("mounting its tmpfs", &e))
        }
        Some(volume::Source::Secret(secret)) => {
            let total: usize = secret.files.iter().map(|f| f.content.len()).sum();
            // Room for the files plus their directories' pages.
            let options = format!(
                "mode=0755,size={}",
                total + 64 * 1024 * (secret.files.len() + 1)
            );
            mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                nodev | MsFlags::MS_NOEXEC,
                Some(options.as_str()),
            )
            .map_err(|e| failed("mounting its tmpfs", &e))?;
            for file in &secret.files {
                let relative = relative_path(&file.path).expect("validated before");
                let path = target.join(relative);
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(|e| failed("creating a directory", &e))?;
                }
                fs::write(&path, &file.content).map_err(|e| failed("writing a file", &e))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o400))
                    .map_err(|e| failed("setting a file's mode", &e))?;
            }
            // Nothing may be added later.
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nodev | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .map_err(|e| failed("making it read-only", &e))
        }
        Some(volume::Source::Block(block)) => {
            let device = crate::disks::find(&block.serial).ok_or_else(|| {
                failed(
                    "finding its disk",
                    &format!("no virtio disk has serial {:?}", block.serial),
                )
            })?;
            let device = crate::disks::sized(device).map_err(|e| failed("finding its disk", &e))?;
            let mut flags = nodev;
            let fstype = if block.fstype.is_empty() {
                "ext4"
            } else {
                block.fstype.as_str()
            };
            let ext4 = fstype == "ext4";
            // A read-only disk cannot take a journal replay: it is left
            // for the next read-write mount, where this kernel replays it.
            let options = (block.read_only && ext4).then_some("noload");
            if block.read_only {
                flags |= MsFlags::MS_RDONLY;
            }
            mount(Some(&device), &target, Some(fstype), flags, options)
                .map_err(|e| failed(&format!("mounting {} ({fstype})", device.display()), &e))?;
            if ext4 && !block.read_only {
                crate::disks::grow_ext4(&device, &target)
                    .map_err(|e| failed("growing its file system to its disk", &e))?;
            }
            Ok(())
        }
        _ => Err(ApiError::invalid(format!(
            "volume {} has no known source",
            volume.name
        ))),
    }
}
