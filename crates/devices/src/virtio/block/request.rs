//! Parsing a virtio-blk request out of a descriptor chain. Everything here
//! treats the chain as hostile: loops, out-of-memory buffers, wrong
//! read/write flags and out-of-range sectors are errors, never panics.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryError};

use crate::GuestMemory;

/// Bytes per virtio-blk sector, whatever the disk's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header (type, reserved, sector).
const HEADER_SIZE: u32 = 16;
/// Size of one discard / write-zeroes segment.
pub const DISCARD_SEGMENT_SIZE: u64 = 16;

/// A request the device rejects; the guest gets an error status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("descriptor chain is empty or its head index is out of range")]
    EmptyChain,
    #[error("descriptor chain does not end within the queue size (a loop or a bad next index)")]
    Unterminated,
    #[error("descriptor chain has {0} descriptors; a request needs a header and a status")]
    TooShort(usize),
    #[error("descriptor {index}: a device-readable buffer follows a device-writable one")]
    ReadableAfterWritable { index: usize },
    #[error("the header descriptor is device-writable or shorter than 16 bytes")]
    BadHeader,
    #[error("the status descriptor is not device-writable")]
    StatusNotWritable,
    #[error("descriptor {index}: {len} bytes at {addr:#x} lie outside guest memory")]
    OutsideMemory { index: usize, addr: u64, len: u32 },
    #[error("reading the header: {0}")]
    Header(String),
    #[error("{kind} request carries data buffers in the wrong direction")]
    WrongDirection { kind: &'static str },
    #[error("data length {0} is not a multiple of 512 bytes")]
    Unaligned(u64),
    #[error("sectors {sector}..+{count} lie beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
}

/// The operation a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl RequestType {
    fn from_u32(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }

    fn name(self) -> &'static str {
        match self {
            RequestType::In => "IN",
            RequestType::Out => "OUT",
            RequestType::Flush => "FLUSH",
            RequestType::GetId => "GET_ID",
            RequestType::Discard => "DISCARD",
            RequestType::WriteZeroes => "WRITE_ZEROES",
            RequestType::Unsupported(_) => "unsupported",
        }
    }

    /// Whether the data buffers are device-writable (the device fills them).
    fn data_is_writable(self) -> bool {
        matches!(self, RequestType::In | RequestType::GetId)
    }
}

/// A guest buffer, checked to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A well-formed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// The data buffers, in order (device-writable for IN and GET_ID,
    /// device-readable otherwise).
    pub data: Vec<Segment>,
}

impl Request {
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// What parsing a chain found: the status byte's address, where the chain
/// has one, and the request or why it is unusable.
#[derive(Debug)]
pub struct Parsed {
    pub status: Option<GuestAddress>,
    pub request: Result<Request, RequestError>,
}

/// Walks the chain once, refusing one that does not terminate.
fn collect(chain: DescriptorChain<&GuestMemory>) -> Result<Vec<Descriptor>, RequestError> {
    let descs: Vec<Descriptor> = chain.collect();
    match descs.last() {
        None => Err(RequestError::EmptyChain),
        Some(last) if last.has_next() => Err(RequestError::Unterminated),
        Some(_) => Ok(descs),
    }
}

fn check_in_memory(mem: &GuestMemory, index: usize, d: &Descriptor) -> Result<(), RequestError> {
    if d.len() == 0 || mem.check_range(d.addr(), d.len() as usize) {
        return Ok(());
    }
    Err(RequestError::OutsideMemory {
        index,
        addr: d.addr().0,
        len: d.len(),
    })
}

fn read_header(mem: &GuestMemory, addr: GuestAddress) -> Result<(u32, u64), GuestMemoryError> {
    let kind: u32 = mem.read_obj(addr)?;
    let sector: u64 = mem.read_obj(addr.unchecked_add(8))?;
    Ok((u32::from_le(kind), u64::from_le(sector)))
}

/// Parses the chain of one request for a disk of `capacity` sectors.
pub fn parse(chain: DescriptorChain<&GuestMemory>, capacity: u64) -> Parsed {
    let mem = chain.memory();
    let descs = match collect(chain.clone()) {
        Ok(d) => d,
        Err(e) => {
            return Parsed {
                status: None,
                request: Err(e),
            }
        }
    };
    match locate_status(mem, &descs) {
        Ok(addr) => Parsed {
            status: Some(addr),
            request: parse_body(mem, &descs, capacity),
        },
        Err(e) => Parsed {
            status: None,
            request: Err(e),
        },
    }
}

/// The status byte: the last byte of the last descriptor, which must be
/// device-writable and inside guest memory.
fn locate_status(mem: &GuestMemory, descs: &[Descriptor]) -> Result<GuestAddress, RequestError> {
    if descs.len() < 2 {
        return Err(RequestError::TooShort(descs.len()));
    }
    let index = descs.len() - 1;
    let last = &descs[index];
    if !last.is_write_only() || last.len() == 0 {
        return Err(RequestError::StatusNotWritable);
    }
    check_in_memory(mem, index, last)?;
    Ok(last.addr().unchecked_add(u64::from(last.len()) - 1))
}

fn parse_body(
    mem: &GuestMemory,
    descs: &[Descriptor],
    capacity: u64,
) -> Result<Request, RequestError> {
    if let Some(index) =
        (1..descs.len()).find(|&i| !descs[i].is_write_only() && descs[i - 1].is_write_only())
    {
        return Err(RequestError::ReadableAfterWritable { index });
    }
    let head = &descs[0];
    if head.is_write_only() || head.len() < HEADER_SIZE {
        return Err(RequestError::BadHeader);
    }
    for (index, d) in descs.iter().enumerate() {
        check_in_memory(mem, index, d)?;
    }
    let (kind, sector) =
        read_header(mem, head.addr()).map_err(|e| RequestError::Header(e.to_string()))?;
    let kind = RequestType::from_u32(kind);
    let (readable, writable) = data_segments(descs);
    let data = if kind.data_is_writable() {
        if !readable.is_empty() {
            return Err(RequestError::WrongDirection { kind: kind.name() });
        }
        writable
    } else {
        if !writable.is_empty() && kind != RequestType::Flush {
            return Err(RequestError::WrongDirection { kind: kind.name() });
        }
        readable
    };
    let request = Request { kind, sector, data };
    if matches!(kind, RequestType::In | RequestType::Out) {
        check_sectors(sector, request.data_len(), capacity)?;
    }
    Ok(request)
}

/// Splits the buffers between header and status into device-readable and
/// device-writable data, taking the header's and status's bytes out of the
/// first and last descriptors.
fn data_segments(descs: &[Descriptor]) -> (Vec<Segment>, Vec<Segment>) {
    let last = descs.len() - 1;
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for (i, d) in descs.iter().enumerate() {
        let mut seg = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        if i == 0 {
            seg.addr = seg.addr.unchecked_add(u64::from(HEADER_SIZE));
            seg.len -= HEADER_SIZE;
        }
        if i == last {
            seg.len -= 1;
        }
        if seg.len == 0 {
            continue;
        }
        if d.is_write_only() {
            writable.push(seg);
        } else {
            readable.push(seg);
        }
    }
    (readable, writable)
}

/// Checks that `len` bytes from `sector` are whole sectors inside the disk.
pub fn check_sectors(sector: u64, len: u64, capacity: u64) -> Result<(), RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Unaligned(len));
    }
    let count = len / SECTOR_SIZE;
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            count,
            capacity,
        }),
    }
}
