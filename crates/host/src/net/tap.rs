//! Tap devices on `/dev/net/tun`: the one tap type of the project. The
//! manager creates persistent taps with it and attaches them to bridges;
//! virtio-net (`devices`) reads and writes the guest's Ethernet frames on it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use super::link::validate_ifname;
use super::{NetError, NetNs};

/// The virtio-net header a modern (VERSION_1) device puts before each
/// frame: `virtio_net_hdr_v1`, with `num_buffers`.
pub const VNET_HDR_LEN: usize = 12;

const TUN_PATH: &str = "/dev/net/tun";

/// What tap to make.
#[derive(Debug, Clone)]
pub struct TapConfig<'a> {
    /// The interface name; a `%d` in it lets the kernel pick a free number.
    pub name: &'a str,
    /// Keep the interface after the file is closed (until deleted).
    pub persistent: bool,
    /// The user and group allowed to open it (for a non-root VMM).
    pub owner: Option<u32>,
    pub group: Option<u32>,
    /// Frames carry a virtio-net header (IFF_VNET_HDR).
    pub vnet_hdr: bool,
    /// Create it in this namespace instead of the caller's.
    pub netns: Option<&'a NetNs>,
}

impl Default for TapConfig<'_> {
    fn default() -> Self {
        TapConfig {
            name: "oxtap%d",
            persistent: false,
            owner: None,
            group: None,
            vnet_hdr: true,
            netns: None,
        }
    }
}

/// An open tap device. Dropping it removes a non-persistent tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `struct ifreq` as TUNSETIFF reads and writes it: the name, then the
/// flags, padded to the union's 24 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    pub fn create(config: &TapConfig) -> Result<Tap, NetError> {
        let tap = match config.netns {
            Some(ns) => ns.run(|| Self::create_here(config))??,
            None => Self::create_here(config)?,
        };
        tracing::info!(tap = %tap.name, persistent = config.persistent, "opened tap");
        Ok(tap)
    }

    fn create_here(config: &TapConfig) -> Result<Tap, NetError> {
        validate_ifname(config.name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(TUN_PATH)
            .map_err(|source| NetError::Open {
                path: Path::new(TUN_PATH).to_owned(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        if config.vnet_hdr {
            req.flags |= libc::IFF_VNET_HDR as libc::c_short;
        }
        req.name[..config.name.len()].copy_from_slice(config.name.as_bytes());
        let mut tap = Tap {
            file,
            name: config.name.to_owned(),
        };
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one
        // (same layout, 40 bytes) and lives across the call.
        let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        tap.check(rc, "TUNSETIFF")?;
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        tap.name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        if let Some(uid) = config.owner {
            tap.ioctl_value(libc::TUNSETOWNER, uid.into(), "TUNSETOWNER")?;
        }
        if let Some(gid) = config.group {
            tap.ioctl_value(libc::TUNSETGROUP, gid.into(), "TUNSETGROUP")?;
        }
        if config.persistent {
            tap.ioctl_value(libc::TUNSETPERSIST, 1, "TUNSETPERSIST")?;
        }
        if config.vnet_hdr {
            tap.set_vnet_hdr_size(VNET_HDR_LEN)?;
        }
        Ok(tap)
    }

    /// Wraps a tap someone else opened with IFF_VNET_HDR (a manager passing
    /// fds) and sets the modern header size on it.
    pub fn from_fd(fd: OwnedFd, name: &str) -> Result<Tap, NetError> {
        let tap = Tap {
            file: File::from(fd),
            name: name.to_owned(),
        };
        tap.set_vnet_hdr_size(VNET_HDR_LEN)?;
        Ok(tap)
    }

    /// The name the kernel gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn into_file(self) -> File {
        self.file
    }

    /// Reads one frame, virtio-net header first; `WouldBlock` when none is
    /// queued on a non-blocking tap.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame, virtio-net header first.
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }

    /// Makes reads and writes return `WouldBlock` instead of waiting (for
    /// an event loop).
    pub fn set_nonblocking(&self, on: bool) -> Result<(), NetError> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let fd = self.file.as_raw_fd();
        let tap_error = |source: nix::Error| NetError::Tap {
            name: self.name.clone(),
            op: "fcntl(O_NONBLOCK)",
            source: source.into(),
        };
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).map_err(tap_error)?);
        let flags = if on {
            flags | OFlag::O_NONBLOCK
        } else {
            flags - OFlag::O_NONBLOCK
        };
        fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(tap_error)?;
        Ok(())
    }

    /// Sets the virtio-net header length (10 for legacy devices, 12 for
    /// modern ones).
    pub fn set_vnet_hdr_size(&self, size: usize) -> Result<(), NetError> {
        let size = size as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at `size` for the duration of the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        self.check(rc, "TUNSETVNETHDRSZ")
    }

    /// Tells the kernel which offloads the guest accepts (TUN_F_* flags).
    pub fn set_offload(&self, flags: u32) -> Result<(), NetError> {
        self.ioctl_value(libc::TUNSETOFFLOAD, flags.into(), "TUNSETOFFLOAD")
    }

    /// Makes the tap non-persistent, so it goes away with the last open file.
    pub fn set_transient(&self) -> Result<(), NetError> {
        self.ioctl_value(libc::TUNSETPERSIST, 0, "TUNSETPERSIST")
    }

    fn ioctl_value(
        &self,
        request: libc::Ioctl,
        value: libc::c_ulong,
        op: &'static str,
    ) -> Result<(), NetError> {
        // SAFETY: these TUN ioctls take their integer argument by value and
        // touch no memory of ours.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request, value) };
        self.check(rc, op)
    }

    fn check(&self, rc: libc::c_int, op: &'static str) -> Result<(), NetError> {
        if rc < 0 {
            return Err(NetError::Tap {
                name: self.name.clone(),
                op,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
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
