//! A Linux tap device opened with a virtio-net header, so frames and their
//! offload metadata pass between the guest and the host stack unchanged.
//! The daemon makes the tap and bridges it (which takes CAP_NET_ADMIN);
//! the VMM, which has no capabilities, gets its descriptor
//! ([`Tap::from_fd`]) and only reads and writes frames.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

ioctl_iow_nr!(TUNSETIFF, b'T' as u32, 202, libc::c_int);
/// Adds the interface with ifr_ifindex to the bridge named in ifr_name
/// (linux/sockios.h).
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
ioctl_iow_nr!(TUNSETOFFLOAD, b'T' as u32, 208, libc::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, b'T' as u32, 216, libc::c_int);

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// virtio_net_hdr_v1: what precedes every frame, on the queues and on the tap.
pub const VNET_HDR_LEN: usize = 12;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is empty or longer than 15 bytes")]
    Name(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error("cannot attach to tap {name:?}: {source} (does it exist, and may this user use it?)")]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot add tap {name:?} to bridge {bridge:?}: {source}")]
    Bridge {
        name: String,
        bridge: String,
        source: std::io::Error,
    },
    #[error("cannot configure tap {name:?}: {what}: {source}")]
    Configure {
        name: String,
        what: &'static str,
        source: std::io::Error,
    },
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the tap `name` (creating it if the caller may).
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is, laid
        // out as the kernel's struct.
        let rc = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
        if rc < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Self::prepared(file, name)
    }

    /// The tap whose descriptor `fd` is (attached by whoever opened it),
    /// named `name` in messages.
    pub fn from_fd(fd: OwnedFd, name: &str) -> Result<Self, TapError> {
        Self::prepared(File::from(fd), name)
    }

    /// Sets the header size frames carry and turns offloads off until the
    /// guest's driver asks for them.
    fn prepared(file: File, name: &str) -> Result<Self, TapError> {
        let tap = Self {
            file,
            name: name.to_string(),
        };
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        let rc = unsafe { ioctl_with_ref(&tap.file, TUNSETVNETHDRSZ(), &size) };
        tap.check(rc, "set the virtio-net header size")?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A descriptor of this tap of its own, to hand to another process.
    pub fn as_fd_owned(&self) -> std::io::Result<OwnedFd> {
        Ok(self.file.try_clone()?.into())
    }

    /// Adds the tap to `bridge` and brings it up.
    pub fn join_bridge(&self, bridge: &str) -> Result<(), TapError> {
        let failed = |source| TapError::Bridge {
            name: self.name.clone(),
            bridge: bridge.to_string(),
            source,
        };
        if bridge.is_empty() || bridge.len() >= libc::IFNAMSIZ {
            return Err(failed(std::io::Error::from(
                std::io::ErrorKind::InvalidInput,
            )));
        }
        // SAFETY: socket() takes no pointers; the descriptor it returns is
        // owned by the File at once.
        let control =
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if control < 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
        // SAFETY: `control` was just created and nothing else owns it.
        let control = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(control) };
        let request = |name: &str| {
            // SAFETY: ifreq is plain data; all zeroes is a valid value.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (slot, byte) in req.ifr_name.iter_mut().zip(name.bytes()) {
                *slot = byte as libc::c_char;
            }
            req
        };
        let call = |code: libc::c_ulong, req: &mut libc::ifreq| {
            // SAFETY: each of these socket ioctls reads or writes one ifreq,
            // which `req` is.
            if unsafe { libc::ioctl(control.as_raw_fd(), code as _, req as *mut libc::ifreq) } < 0 {
                Err(failed(std::io::Error::last_os_error()))
            } else {
                Ok(())
            }
        };
        let mut tap = request(&self.name);
        call(libc::SIOCGIFINDEX, &mut tap)?;
        let mut port = request(bridge);
        // SAFETY: SIOCGIFINDEX filled the union's ifindex member.
        port.ifr_ifru.ifru_ifindex = unsafe { tap.ifr_ifru.ifru_ifindex };
        call(SIOCBRADDIF, &mut port)?;
        let mut flags = request(&self.name);
        call(libc::SIOCGIFFLAGS, &mut flags)?;
        // SAFETY: SIOCGIFFLAGS filled the union's flags member.
        unsafe { flags.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        call(libc::SIOCSIFFLAGS, &mut flags)
    }

    /// Which offloaded frames (partial checksums, TSO) the tap may hand us.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), libc::c_ulong::from(flags)) };
        self.check(rc, "set offloads")
    }

    fn check(&self, rc: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if rc < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// Reads one frame (with its header); WouldBlock when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (with its header).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Test support: a tap in a network namespace of its own.
pub mod testing {
    use super::Tap;

    /// Runs `f` with a tap inside a network namespace of its own (on a
    /// thread that unshares it), so tests never touch the host's network.
    /// None when this process may not create namespaces or taps.
    pub fn in_private_netns<T: Send + 'static>(
        f: impl FnOnce(Tap) -> T + Send + 'static,
    ) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare only changes this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            let tap = Tap::open("capsa-test0").ok()?;
            Some(f(tap))
        })
        .join()
        .ok()
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::in_private_netns;
    use super::*;

    #[test]
    fn a_tap_joins_its_bridge_and_comes_up() {
        let seen = in_private_netns(|tap| {
            // `ip` runs in this thread's namespace: it forks from here.
            let ip = |args: &[&str]| {
                std::process::Command::new("ip")
                    .args(args)
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            };
            ip(&["link", "add", "capsa-br0", "type", "bridge"]).ok()?;
            let missing = tap.join_bridge("capsa-nobr").unwrap_err().to_string();
            tap.join_bridge("capsa-br0").ok()?;
            Some((ip(&["-o", "link", "show", "capsa-test0"]).ok()?, missing))
        })
        .flatten();
        let Some((link, missing)) = seen else {
            eprintln!("skipped: no namespaces, taps or ip here");
            return;
        };
        assert!(
            link.contains("master capsa-br0") && link.contains(",UP"),
            "{link}"
        );
        assert!(missing.contains("capsa-nobr"), "{missing}");
    }

    #[test]
    fn a_passed_descriptor_is_the_same_tap() {
        let seen = in_private_netns(|tap| {
            let fd = tap.file.try_clone().ok()?;
            let adopted = Tap::from_fd(fd.into(), "capsa-test0").ok()?;
            Some(adopted.name().to_string())
        })
        .flatten();
        if let Some(name) = seen {
            assert_eq!(name, "capsa-test0");
        }
    }
}
