//! A tap device opened for virtio-net: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
//! with the 12-byte virtio 1.x network header, non-blocking.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::NetError;

/// Size of `struct virtio_net_hdr_v1` (with num_buffers), which virtio 1.x
/// always uses and which the tap is told to use.
pub const VNET_HDR_LEN: usize = 12;

// _IOW('T', n, int) from <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating it if needed) the tap interface `name`.
    pub fn open(name: &str) -> Result<Self, NetError> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('/') {
            return Err(NetError::TapName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| NetError::Tap {
                name: name.to_owned(),
                what: "opening /dev/net/tun",
                source,
            })?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq`
        // lays out in full (40 bytes); `req` outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(NetError::Tap {
                name: name.to_owned(),
                what: "TUNSETIFF",
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.to_owned(),
        };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// Wraps a tap fd opened by someone else (e.g. a manager passing fds);
    /// it must have been set up with IFF_VNET_HDR. Non-blocking mode and
    /// the header size are set here.
    pub fn from_fd(fd: OwnedFd, name: &str) -> Result<Self, NetError> {
        let tap = Tap {
            file: File::from(fd),
            name: name.to_owned(),
        };
        // SAFETY: F_SETFL on a valid fd we own, with integer flags.
        let rc = unsafe { libc::fcntl(tap.file.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if rc < 0 {
            return Err(NetError::Tap {
                name: name.to_owned(),
                what: "setting O_NONBLOCK",
                source: io::Error::last_os_error(),
            });
        }
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    fn set_vnet_hdr_len(&self) -> Result<(), NetError> {
        let len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at `len`, alive for the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &len) };
        if rc < 0 {
            return Err(NetError::Tap {
                name: self.name.clone(),
                what: "TUNSETVNETHDRSZ",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header first); `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header first).
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
