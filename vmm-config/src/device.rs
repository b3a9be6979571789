//! The device forms of the command line: `HEAD[,OPTION]...`, where the
//! head is a path or a name and each option is a word or `KEY=VALUE`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::rate::RateLimit;

/// The guest CID a vsock gets unless told otherwise (0-2 are reserved).
pub const DEFAULT_GUEST_CID: u64 = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("unknown {device} option {option:?} (expected {expected})")]
    UnknownOption {
        device: &'static str,
        option: String,
        expected: &'static str,
    },
    #[error("bad MAC address {0:?} (expected six hex bytes like 02:ca:95:00:00:01)")]
    BadMac(String),
    #[error("MAC address {0} is a multicast address")]
    MulticastMac(String),
    #[error("bad vsock CID {0:?}")]
    BadCid(String),
    #[error("bad descriptor {0:?} (expected a number above 2)")]
    BadFd(String),
    #[error("bad jail user or group id {0:?} (expected a number other than 0)")]
    BadId(String),
    #[error("bad rate limit {0:?} (expected a number above 0)")]
    BadRate(String),
    #[error("descriptor {0} is given to more than one device")]
    SharedFd(i32),
    #[error(
        "{what} {value:?} cannot be passed to the VMM: it is empty, not UTF-8, or has a comma"
    )]
    Unrepresentable { what: &'static str, value: String },
}

/// Splits `HEAD[,OPTION]...` into its head, which must be there, and its
/// options.
pub(crate) fn split<'a>(
    spec: &'a str,
    what: &'static str,
) -> Result<(&'a str, std::str::Split<'a, char>), ArgError> {
    let mut parts = spec.split(',');
    let head = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or(ArgError::Missing(what))?;
    Ok((head, parts))
}

/// A head or an option value as it goes into a device argument: text
/// with no comma, so that it parses back as itself.
pub(crate) fn field<'a>(
    what: &'static str,
    value: &'a std::ffi::OsStr,
) -> Result<&'a str, ArgError> {
    value
        .to_str()
        .filter(|v| !v.is_empty() && !v.contains(','))
        .ok_or_else(|| ArgError::Unrepresentable {
            what,
            value: value.to_string_lossy().into_owned(),
        })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered unicast address, random in its last bytes.
    pub fn random() -> Self {
        let mut mac = [0x02, 0xca, 0x95, 0, 0, 0];
        // Without randomness the address is still valid, only less unique.
        let _ = getrandom::fill(&mut mac[3..]);
        MacAddr(mac)
    }
}

impl FromStr for MacAddr {
    type Err = ArgError;

    fn from_str(text: &str) -> Result<Self, ArgError> {
        let bad = || ArgError::BadMac(text.to_string());
        let bytes: Vec<u8> = text
            .split(':')
            .map(|b| {
                (b.len() == 2)
                    .then(|| u8::from_str_radix(b, 16).ok())
                    .flatten()
            })
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        let mac: [u8; 6] = bytes.try_into().map_err(|_| bad())?;
        if mac[0] & 1 != 0 {
            return Err(ArgError::MulticastMac(text.to_string()));
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// `--disk PATH[,ro][,id=SERIAL][,fd=N][,bps=N][,ops=N][,burst-ms=N]`: a
/// raw image as virtio-blk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// What GET_ID answers (the disk's serial in the guest), at most 20 bytes.
    pub id: Option<String>,
    /// The image is already open as this inherited descriptor (opened by
    /// whoever started the VMM, with the access `read_only` says); `path`
    /// then only names it.
    pub fd: Option<i32>,
    /// What the guest may read and write, together, per second.
    pub rate: Option<RateLimit>,
}

impl DiskConfig {
    /// The image at `path`, opened by the VMM.
    pub fn at(path: impl Into<PathBuf>, read_only: bool, id: Option<String>) -> Self {
        DiskConfig {
            path: path.into(),
            read_only,
            id,
            fd: None,
            rate: None,
        }
    }
}

/// `fd=N` as an option: a descriptor the VMM inherits (0 to 2 are its
/// standard streams).
pub(crate) fn parse_fd(text: &str) -> Result<i32, ArgError> {
    text.parse::<i32>()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| ArgError::BadFd(text.to_string()))
}

impl FromStr for DiskConfig {
    type Err = ArgError;

    fn from_str(spec: &str) -> Result<Self, ArgError> {
        let (path, options) = split(spec, "the disk image path")?;
        let mut disk = DiskConfig::at(path, false, None);
        for option in options {
            match option.split_once('=') {
                None if option == "ro" => disk.read_only = true,
                Some(("id", id)) => disk.id = Some(id.to_string()),
                Some(("fd", fd)) => disk.fd = Some(parse_fd(fd)?),
                Some((key, value)) if RateLimit::take_option(&mut disk.rate, key, value)? => {}
                _ => {
                    return Err(ArgError::UnknownOption {
                        device: "disk",
                        option: option.to_string(),
                        expected: "ro, id=SERIAL, fd=N, bps=N, ops=N or burst-ms=N",
                    })
                }
            }
        }
        Ok(disk)
    }
}

impl DiskConfig {
    pub fn to_arg(&self) -> Result<String, ArgError> {
        let mut arg = field("disk image path", self.path.as_os_str())?.to_string();
        if self.read_only {
            arg.push_str(",ro");
        }
        if let Some(id) = &self.id {
            arg.push_str(",id=");
            arg.push_str(field("disk serial", id.as_ref())?);
        }
        if let Some(fd) = self.fd {
            arg.push_str(&format!(",fd={fd}"));
        }
        RateLimit::push_options(&self.rate, &mut arg);
        Ok(arg)
    }
}

/// `--net TAP[,mac=MAC][,bridge=NAME][,fd=N][,bps=N][,ops=N][,burst-ms=N]`:
/// a virtio-net on a host tap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of the host tap device to attach to.
    pub tap: String,
    /// Random (locally administered) when the argument names none.
    pub mac: MacAddr,
    /// A host bridge to add the tap to, brought up: the tap then lives
    /// exactly as long as this VMM, and nothing is left to clean up.
    pub bridge: Option<String>,
    /// The tap is already attached as this inherited descriptor (made and
    /// bridged by whoever started the VMM).
    pub fd: Option<i32>,
    /// What may pass per second, each way (frames for ops).
    pub rate: Option<RateLimit>,
}

impl FromStr for NetConfig {
    type Err = ArgError;

    fn from_str(spec: &str) -> Result<Self, ArgError> {
        let (tap, options) = split(spec, "the tap name")?;
        let mut net = NetConfig {
            tap: tap.to_string(),
            mac: MacAddr::random(),
            bridge: None,
            fd: None,
            rate: None,
        };
        for option in options {
            match option.split_once('=') {
                Some(("mac", mac)) => net.mac = mac.parse()?,
                Some(("bridge", bridge)) if !bridge.is_empty() => {
                    net.bridge = Some(bridge.to_string())
                }
                Some(("fd", fd)) => net.fd = Some(parse_fd(fd)?),
                Some((key, value)) if RateLimit::take_option(&mut net.rate, key, value)? => {}
                _ => {
                    return Err(ArgError::UnknownOption {
                        device: "net",
                        option: option.to_string(),
                        expected: "mac=..., bridge=..., fd=N, bps=N, ops=N or burst-ms=N",
                    })
                }
            }
        }
        Ok(net)
    }
}

impl NetConfig {
    pub fn to_arg(&self) -> Result<String, ArgError> {
        let mut arg = format!("{},mac={}", field("tap name", self.tap.as_ref())?, self.mac);
        if let Some(bridge) = &self.bridge {
            arg.push_str(",bridge=");
            arg.push_str(field("bridge name", bridge.as_ref())?);
        }
        if let Some(fd) = self.fd {
            arg.push_str(&format!(",fd={fd}"));
        }
        RateLimit::push_options(&self.rate, &mut arg);
        Ok(arg)
    }
}

/// `--vsock PATH[,cid=N][,fd=N]`: a virtio-vsock bridged to a Unix socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The Unix socket host processes connect through; guest-initiated
    /// connections go to `<path>_<port>` (which a jailed VMM cannot reach:
    /// they are refused).
    pub path: PathBuf,
    pub guest_cid: u64,
    /// The socket is already bound and listening at `path` as this
    /// inherited descriptor.
    pub listener_fd: Option<i32>,
}

impl VsockConfig {
    /// A vsock on `path` with the default guest CID.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        VsockConfig {
            path: path.into(),
            guest_cid: DEFAULT_GUEST_CID,
            listener_fd: None,
        }
    }

    pub fn to_arg(&self) -> Result<String, ArgError> {
        let mut arg = format!(
            "{},cid={}",
            field("vsock socket path", self.path.as_os_str())?,
            self.guest_cid
        );
        if let Some(fd) = self.listener_fd {
            arg.push_str(&format!(",fd={fd}"));
        }
        Ok(arg)
    }
}

impl FromStr for VsockConfig {
    type Err = ArgError;

    fn from_str(spec: &str) -> Result<Self, ArgError> {
        let (path, options) = split(spec, "the vsock socket path")?;
        let mut vsock = VsockConfig::at(path);
        for option in options {
            match option.split_once('=') {
                Some(("cid", cid)) => {
                    vsock.guest_cid = cid.parse().map_err(|_| ArgError::BadCid(cid.into()))?
                }
                Some(("fd", fd)) => vsock.listener_fd = Some(parse_fd(fd)?),
                _ => {
                    return Err(ArgError::UnknownOption {
                        device: "vsock",
                        option: option.to_string(),
                        expected: "cid=N or fd=N",
                    })
                }
            }
        }
        Ok(vsock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_./-]{1,24}"
    }

    fn rate() -> impl Strategy<Value = RateLimit> {
        (
            proptest::option::of(1..u64::MAX),
            proptest::option::of(1..u64::MAX),
            1..u32::MAX,
        )
            .prop_filter("limits something", |(b, o, _)| b.is_some() || o.is_some())
            .prop_map(|(bytes_per_sec, ops_per_sec, burst_ms)| RateLimit {
                bytes_per_sec,
                ops_per_sec,
                burst_ms,
            })
    }

    proptest! {
        #[test]
        fn disks_round_trip(path in name(), read_only: bool, id in proptest::option::of("[a-z0-9=-]{1,20}"), fd in proptest::option::of(3..1000i32), rate in proptest::option::of(rate())) {
            let disk = DiskConfig { path: format!("/{path}").into(), read_only, id, fd, rate };
            prop_assert_eq!(disk.to_arg().unwrap().parse::<DiskConfig>().unwrap(), disk);
        }

        #[test]
        fn nets_round_trip(tap in name(), mac: [u8; 6], bridge in proptest::option::of(name()), fd in proptest::option::of(3..1000i32)) {
            let mut mac = mac;
            mac[0] &= !1;
            let net = NetConfig { tap, mac: MacAddr(mac), bridge, fd, rate: None };
            prop_assert_eq!(net.to_arg().unwrap().parse::<NetConfig>().unwrap(), net);
        }

        #[test]
        fn vsocks_round_trip(path in name(), guest_cid: u64, listener_fd in proptest::option::of(3..1000i32)) {
            let vsock = VsockConfig { path: format!("/{path}").into(), guest_cid, listener_fd };
            prop_assert_eq!(vsock.to_arg().unwrap().parse::<VsockConfig>().unwrap(), vsock);
        }
    }

    #[test]
    fn the_short_forms_parse_with_their_defaults() {
        let disk: DiskConfig = "/d.img".parse().unwrap();
        assert_eq!((disk.read_only, disk.id), (false, None));
        let vsock: VsockConfig = "/v.sock".parse().unwrap();
        assert_eq!(vsock.guest_cid, DEFAULT_GUEST_CID);
        let net: NetConfig = "tap0".parse().unwrap();
        assert_eq!(net.mac.0[..3], [0x02, 0xca, 0x95]);
        assert_eq!(net.bridge, None);
    }

    #[test]
    fn bad_forms_are_clear_errors() {
        let err = |s: &str| s.parse::<NetConfig>().unwrap_err();
        assert_eq!(err(""), ArgError::Missing("the tap name"));
        assert_eq!(
            err("tap0,mac=01:00:00:00:00:01"),
            ArgError::MulticastMac("01:00:00:00:00:01".into())
        );
        assert_eq!(err("tap0,mac=zz"), ArgError::BadMac("zz".into()));
        assert!(matches!(
            err("tap0,speed=10"),
            ArgError::UnknownOption { .. }
        ));
        assert!(matches!(
            "/d,rw".parse::<DiskConfig>(),
            Err(ArgError::UnknownOption { .. })
        ));
        assert_eq!(
            "/v,cid=x".parse::<VsockConfig>(),
            Err(ArgError::BadCid("x".into()))
        );
        assert_eq!(
            "/d,fd=1".parse::<DiskConfig>(),
            Err(ArgError::BadFd("1".into()))
        );
        assert_eq!(
            "/d,bps=0".parse::<DiskConfig>(),
            Err(ArgError::BadRate("bps=0".into()))
        );
        let limited: DiskConfig = "/d,ops=100".parse().unwrap();
        assert_eq!(
            limited.rate,
            Some(RateLimit {
                ops_per_sec: Some(100),
                ..RateLimit::default()
            })
        );
    }

    #[test]
    fn macs_print_as_they_parse() {
        let mac = MacAddr([0x02, 0xca, 0x95, 0x0a, 0xff, 0x01]);
        assert_eq!(mac.to_string(), "02:ca:95:0a:ff:01");
        assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
    }
}
