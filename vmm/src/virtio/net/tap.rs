//! A Linux tap device opened with a virtio-net header, so frames and their
//! offload metadata pass between the guest and the host stack unchanged.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
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
