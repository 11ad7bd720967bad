//! The migration stream: a header (magic, version) and checked sections.
//!
//! ```text
//! header:  magic "OXMG" | version u32
//! section: kind u8 | length u32 | payload (length bytes) | crc32c u32
//! ```
//! Integers are little-endian. The CRC32C covers kind, length and payload,
//! so a flipped byte anywhere in a section is caught before it is parsed.

use std::io::{self, Read, Write};

use super::PAGE_SIZE;

pub const MAGIC: [u8; 4] = *b"OXMG";
pub const VERSION: u32 = 2;
/// Sections longer than this are refused before any allocation.
pub const MAX_SECTION_LEN: u32 = 16 << 20;
const HEADER_LEN: u64 = 8;
const SECTION_OVERHEAD: u64 = 9;

/// Errors reading or writing a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("migration stream I/O at offset {offset}: {source}")]
    Io { offset: u64, source: io::Error },
    #[error("migration stream truncated at offset {offset}: {what} is incomplete")]
    Truncated { offset: u64, what: String },
    #[error(
        "not a migration stream: magic {found:02x?} at offset 0, expected {MAGIC:02x?} (\"OXMG\")"
    )]
    BadMagic { found: [u8; 4] },
    #[error(
        "migration stream version {found} is not supported (this build reads version {VERSION})"
    )]
    UnsupportedVersion { found: u32 },
    #[error("migration stream section at offset {offset} declares length {len}, more than the maximum {MAX_SECTION_LEN}")]
    TooLong { offset: u64, len: u32 },
    #[error("migration stream section at offset {offset} is corrupt: CRC32C {found:#010x}, computed {computed:#010x}")]
    BadCrc {
        offset: u64,
        found: u32,
        computed: u32,
    },
    #[error("migration stream section at offset {offset} has unknown kind {kind}")]
    UnknownKind { offset: u64, kind: u8 },
    #[error("migration stream {section} section at offset {offset}: {problem}")]
    BadPayload {
        section: &'static str,
        offset: u64,
        problem: String,
    },
    #[error(
        "migration stream: {section} section at offset {offset} where {expected} was expected"
    )]
    Unexpected {
        section: &'static str,
        offset: u64,
        expected: &'static str,
    },
}

/// What a section carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// First section of every channel: who it is and what RAM it carries.
    Setup = 1,
    /// A batch of RAM pages.
    Ram = 2,
    /// One vCPU's saved state.
    Vcpu = 3,
    /// One device's saved state.
    Device = 4,
    /// The sender has nothing more to say on this channel.
    End = 5,
}

impl SectionKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => SectionKind::Setup,
            2 => SectionKind::Ram,
            3 => SectionKind::Vcpu,
            4 => SectionKind::Device,
            5 => SectionKind::End,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Setup => "setup",
            SectionKind::Ram => "ram",
            SectionKind::Vcpu => "vcpu",
            SectionKind::Device => "device",
            SectionKind::End => "end-of-stream",
        }
    }
}

fn crc(kind: u8, payload: &[u8]) -> u32 {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

/// Writes a stream, counting the bytes it puts on the wire.
pub struct StreamWriter<W: Write> {
    inner: W,
    written: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the header.
    pub fn new(mut inner: W) -> Result<Self, StreamError> {
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&MAGIC);
        header[4..].copy_from_slice(&VERSION.to_le_bytes());
        inner
            .write_all(&header)
            .map_err(|source| StreamError::Io { offset: 0, source })?;
        Ok(StreamWriter {
            inner,
            written: HEADER_LEN,
        })
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes one section; returns its size on the wire.
    pub fn section(&mut self, kind: SectionKind, payload: &[u8]) -> Result<u64, StreamError> {
        debug_assert!(payload.len() <= MAX_SECTION_LEN as usize);
        let offset = self.written;
        let io = |source| StreamError::Io { offset, source };
        let mut head = [0u8; 5];
        head[0] = kind as u8;
        head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        self.inner.write_all(&head).map_err(io)?;
        self.inner.write_all(payload).map_err(io)?;
        self.inner
            .write_all(&crc(kind as u8, payload).to_le_bytes())
            .map_err(io)?;
        let size = SECTION_OVERHEAD + payload.len() as u64;
        self.written += size;
        Ok(size)
    }

    pub fn flush(&mut self) -> Result<(), StreamError> {
        let offset = self.written;
        self.inner
            .flush()
            .map_err(|source| StreamError::Io { offset, source })
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// One checked section.
#[derive(Debug)]
pub struct Section {
    pub kind: SectionKind,
    /// Offset of the section's first byte in the stream.
    pub offset: u64,
    pub payload: Vec<u8>,
}

impl Section {
    /// An error about this section's contents.
    pub fn bad(&self, problem: impl Into<String>) -> StreamError {
        StreamError::BadPayload {
            section: self.kind.name(),
            offset: self.offset,
            problem: problem.into(),
        }
    }

    /// An error saying this section came where another was expected.
    pub fn unexpected(&self, expected: &'static str) -> StreamError {
        StreamError::Unexpected {
            section: self.kind.name(),
            offset: self.offset,
            expected,
        }
    }
}

/// Reads and checks a stream.
pub struct StreamReader<R: Read> {
    inner: R,
    offset: u64,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header.
    pub fn new(inner: R) -> Result<Self, StreamError> {
        let mut reader = StreamReader { inner, offset: 0 };
        let mut header = [0u8; 8];
        reader.fill(&mut header, "stream header")?;
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&header[..4]);
        if magic != MAGIC {
            return Err(StreamError::BadMagic { found: magic });
        }
        let version = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if version != VERSION {
            return Err(StreamError::UnsupportedVersion { found: version });
        }
        Ok(reader)
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<(), StreamError> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(StreamError::Truncated {
                        offset: self.offset + done as u64,
                        what: what.to_string(),
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(StreamError::Io {
                        offset: self.offset + done as u64,
                        source,
                    })
                }
            }
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Reads the next section and checks its length and CRC.
    pub fn next_section(&mut self) -> Result<Section, StreamError> {
        let offset = self.offset;
        let mut head = [0u8; 5];
        self.fill(
            &mut head,
            &format!("section header at offset {offset} (no end-of-stream section yet)"),
        )?;
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if len > MAX_SECTION_LEN {
            return Err(StreamError::TooLong { offset, len });
        }
        let mut payload = vec![0u8; len as usize];
        let what = format!("section at offset {offset} ({len}-byte payload)");
        self.fill(&mut payload, &what)?;
        let mut tail = [0u8; 4];
        self.fill(&mut tail, &what)?;
        let found = u32::from_le_bytes(tail);
        let computed = crc(head[0], &payload);
        if found != computed {
            return Err(StreamError::BadCrc {
                offset,
                found,
                computed,
            });
        }
        let kind = SectionKind::from_u8(head[0]).ok_or(StreamError::UnknownKind {
            offset,
            kind: head[0],
        })?;
        Ok(Section {
            kind,
            offset,
            payload,
        })
    }
}

/// The setup section: which channel this is and what the sender migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// 0 for the main channel, 1..=multifd_channels for page channels.
    pub channel: u8,
    pub multifd_channels: u8,
    /// Total guest RAM in bytes; the destination must have the same.
    pub ram_total: u64,
    pub page_size: u32,
}

impl Setup {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(14);
        out.push(self.channel);
        out.push(self.multifd_channels);
        out.extend_from_slice(&self.ram_total.to_le_bytes());
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out
    }

    pub fn decode(section: &Section) -> Result<Self, StreamError> {
        if section.kind != SectionKind::Setup {
            return Err(section.unexpected("setup"));
        }
        let p = &section.payload;
        if p.len() != 14 {
            return Err(section.bad(format!("payload is {} bytes, expected 14", p.len())));
        }
        let mut ram = [0u8; 8];
        ram.copy_from_slice(&p[2..10]);
        Ok(Setup {
            channel: p[0],
            multifd_channels: p[1],
            ram_total: u64::from_le_bytes(ram),
            page_size: u32::from_le_bytes([p[10], p[11], p[12], p[13]]),
        })
    }
}

/// How one page travels in a RAM section (the low bits of its address word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageData<'a> {
    /// This many pages from the address on are all zeros: no data.
    Zeros(u32),
    Full(&'a [u8]),
    /// XBZRLE delta against the page the destination already holds.
    Xbzrle(&'a [u8]),
}

const KIND_ZEROS: u64 = 1;
const KIND_FULL: u64 = 2;
const KIND_XBZRLE: u64 = 3;
const KIND_MASK: u64 = PAGE_SIZE as u64 - 1;

/// Batches pages into RAM section payloads.
#[derive(Default)]
pub struct RamBatch {
    buf: Vec<u8>,
    pages: usize,
    /// The zero run the batch ends with: where its count is in `buf` and
    /// the address of the page after it.
    zero_run: Option<(usize, u64)>,
}

/// A batch is sent when its payload reaches this size.
pub const BATCH_BYTES: usize = 256 << 10;
/// Room for a batch and the record that makes it full.
const BATCH_CAPACITY: usize = BATCH_BYTES + 16 + PAGE_SIZE;

impl RamBatch {
    /// Adds a page with data (a zero page: [`RamBatch::push_zero`]).
    pub fn push(&mut self, addr: u64, page: &PageData) {
        debug_assert_eq!(addr & KIND_MASK, 0);
        let (kind, data, with_len) = match page {
            PageData::Zeros(count) => {
                for page in 0..u64::from(*count) {
                    self.push_zero(addr + page * PAGE_SIZE as u64);
                }
                return;
            }
            PageData::Full(d) => (KIND_FULL, *d, false),
            PageData::Xbzrle(d) => (KIND_XBZRLE, *d, true),
        };
        self.zero_run = None;
        self.buf.extend_from_slice(&(addr | kind).to_le_bytes());
        if with_len {
            self.buf
                .extend_from_slice(&(data.len() as u16).to_le_bytes());
        }
        self.buf.extend_from_slice(data);
        self.pages += 1;
    }

    /// Adds a zero page: one more page of the run the batch ends with, or
    /// a new run.
    pub fn push_zero(&mut self, addr: u64) {
        debug_assert_eq!(addr & KIND_MASK, 0);
        self.pages += 1;
        if let Some((at, next)) = self.zero_run.filter(|&(_, next)| next == addr) {
            let count = u32::from_le_bytes(self.buf[at..at + 4].try_into().unwrap_or_default());
            if count < u32::MAX {
                self.buf[at..at + 4].copy_from_slice(&(count + 1).to_le_bytes());
                self.zero_run = Some((at, next + PAGE_SIZE as u64));
                return;
            }
        }
        self.buf
            .extend_from_slice(&(addr | KIND_ZEROS).to_le_bytes());
        self.zero_run = Some((self.buf.len(), addr + PAGE_SIZE as u64));
        self.buf.extend_from_slice(&1u32.to_le_bytes());
    }

    /// Adds the page at `addr` as `fill` reads it straight into the batch
    /// (one copy); an all-zero page becomes a zero record. Returns whether
    /// it was zero.
    pub fn push_read<E>(
        &mut self,
        addr: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        let start = self.buf.len();
        self.buf
            .extend_from_slice(&(addr | KIND_FULL).to_le_bytes());
        self.buf.resize(start + 8 + PAGE_SIZE, 0);
        let filled = fill(&mut self.buf[start + 8..]);
        let zero = filled.is_ok() && super::is_zero(&self.buf[start + 8..]);
        if filled.is_err() || zero {
            self.buf.truncate(start);
        }
        filled?;
        if zero {
            self.push_zero(addr);
        } else {
            self.zero_run = None;
            self.pages += 1;
        }
        Ok(zero)
    }

    pub fn is_full(&self) -> bool {
        self.buf.len() >= BATCH_BYTES
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Pages in the batch.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The payload so far; the batch is empty afterwards.
    pub fn take(&mut self) -> Vec<u8> {
        self.pages = 0;
        self.zero_run = None;
        std::mem::replace(&mut self.buf, Vec::with_capacity(BATCH_CAPACITY))
    }

    /// Gives a payload back once it is written, so that the next batch
    /// reuses its memory instead of growing a new one.
    pub fn recycle(&mut self, mut payload: Vec<u8>) {
        if self.buf.is_empty() && payload.capacity() >= BATCH_CAPACITY {
            payload.clear();
            self.buf = payload;
        }
    }
}

/// Parses a RAM section's records, checking every length.
pub fn parse_ram<'a>(
    section: &'a Section,
    mut each: impl FnMut(u64, PageData<'a>) -> Result<(), StreamError>,
) -> Result<(), StreamError> {
    let p = &section.payload[..];
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize, what: &str| -> Result<&'a [u8], StreamError> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= p.len())
            .ok_or_else(|| section.bad(format!("{what} at payload byte {at} runs past the end")))?;
        let s = &section.payload[*at..end];
        *at = end;
        Ok(s)
    };
    while at < p.len() {
        let record = at;
        let word = take(&mut at, 8, "page address")?;
        let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
        let addr = word & !KIND_MASK;
        let page = match word & KIND_MASK {
            KIND_ZEROS => {
                let count = take(&mut at, 4, "zero run length")?;
                let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]);
                let fits = (u64::from(count).checked_mul(PAGE_SIZE as u64))
                    .and_then(|len| addr.checked_add(len));
                if count == 0 || fits.is_none() {
                    return Err(section.bad(format!(
                        "zero run at payload byte {record} of {count} pages from {addr:#x} is invalid"
                    )));
                }
                PageData::Zeros(count)
            }
            KIND_FULL => PageData::Full(take(&mut at, PAGE_SIZE, "full page")?),
            KIND_XBZRLE => {
                let len = take(&mut at, 2, "xbzrle length")?;
                let len = u16::from_le_bytes([len[0], len[1]]) as usize;
                if len > PAGE_SIZE {
                    return Err(section.bad(format!(
                        "xbzrle page at payload byte {record} is {len} bytes, more than a page"
                    )));
                }
                PageData::Xbzrle(take(&mut at, len, "xbzrle data")?)
            }
            other => {
                return Err(section.bad(format!(
                    "page record at payload byte {record} has unknown kind {other}"
                )))
            }
        };
        each(addr, page)?;
    }
    Ok(())
}

/// A named state blob (vCPU index or device name) in a section payload.
pub fn encode_blob(name: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + name.len() + data.len());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(data);
    out
}

pub fn decode_blob(section: &Section) -> Result<(String, Vec<u8>), StreamError> {
    let p = &section.payload;
    if p.len() < 2 {
        return Err(section.bad("payload shorter than its name length"));
    }
    let n = u16::from_le_bytes([p[0], p[1]]) as usize;
    let name = p
        .get(2..2 + n)
        .ok_or_else(|| section.bad(format!("name of {n} bytes runs past the payload")))?;
    let name = std::str::from_utf8(name)
        .map_err(|_| section.bad("name is not UTF-8"))?
        .to_string();
    Ok((name, p[2 + n..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_stream() -> (Vec<u8>, Vec<u64>) {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        let mut boundaries = vec![w.written()];
        let setup = Setup {
            channel: 0,
            multifd_channels: 0,
            ram_total: 1 << 20,
            page_size: PAGE_SIZE as u32,
        };
        w.section(SectionKind::Setup, &setup.encode()).unwrap();
        boundaries.push(w.written());
        let mut batch = RamBatch::default();
        batch.push_zero(0);
        batch.push(4096, &PageData::Full(&[7u8; PAGE_SIZE]));
        batch.push(8192, &PageData::Xbzrle(&[0, 1, 9]));
        w.section(SectionKind::Ram, &batch.take()).unwrap();
        boundaries.push(w.written());
        w.section(SectionKind::Vcpu, &encode_blob("0", b"regs"))
            .unwrap();
        boundaries.push(w.written());
        w.section(SectionKind::Device, &encode_blob("virtio-blk", b"{}"))
            .unwrap();
        boundaries.push(w.written());
        w.section(SectionKind::End, &[]).unwrap();
        boundaries.push(w.written());
        (w.into_inner(), boundaries)
    }

    /// Reads a whole stream and parses every section the way the destination does.
    fn read_all(bytes: &[u8]) -> Result<usize, StreamError> {
        let mut r = StreamReader::new(bytes)?;
        let mut n = 0;
        loop {
            let s = r.next_section()?;
            n += 1;
            match s.kind {
                SectionKind::Setup => {
                    Setup::decode(&s)?;
                }
                SectionKind::Ram => parse_ram(&s, |_, _| Ok(()))?,
                SectionKind::Vcpu | SectionKind::Device => {
                    decode_blob(&s)?;
                }
                SectionKind::End => return Ok(n),
            }
        }
    }

    #[test]
    fn round_trip() {
        let (bytes, boundaries) = sample_stream();
        assert_eq!(*boundaries.last().unwrap(), bytes.len() as u64);
        assert_eq!(read_all(&bytes).unwrap(), 5);
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        assert_eq!(
            Setup::decode(&r.next_section().unwrap()).unwrap().ram_total,
            1 << 20
        );
        let ram = r.next_section().unwrap();
        let mut pages = Vec::new();
        parse_ram(&ram, |a, p| {
            pages.push((a, p));
            Ok(())
        })
        .unwrap();
        assert_eq!(pages.len(), 3);
        assert_eq!(pages[0], (0, PageData::Zeros(1)));
        assert_eq!(pages[1], (4096, PageData::Full(&[7u8; PAGE_SIZE])));
        assert_eq!(pages[2], (8192, PageData::Xbzrle(&[0, 1, 9])));
        let vcpu = r.next_section().unwrap();
        assert_eq!(decode_blob(&vcpu).unwrap(), ("0".into(), b"regs".to_vec()));
    }

    #[test]
    fn zero_pages_in_a_row_are_one_record() {
        let mut batch = RamBatch::default();
        for page in [0u64, 1, 2, 5] {
            batch.push_zero(page * PAGE_SIZE as u64);
        }
        let zero = batch.push_read(6 * PAGE_SIZE as u64, |p| {
            p.fill(0);
            Ok::<_, ()>(())
        });
        assert_eq!(zero, Ok(true));
        let data = batch.push_read(7 * PAGE_SIZE as u64, |p| {
            p[9] = 1;
            Ok::<_, ()>(())
        });
        assert_eq!(data, Ok(false));
        assert_eq!(
            batch.push_read(8 * PAGE_SIZE as u64, |_| Err("gone")),
            Err("gone")
        );
        batch.push(9 * PAGE_SIZE as u64, &PageData::Zeros(2));
        assert_eq!(batch.pages(), 8);
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.section(SectionKind::Ram, &batch.take()).unwrap();
        let bytes = w.into_inner();
        let section = StreamReader::new(&bytes[..])
            .unwrap()
            .next_section()
            .unwrap();
        let mut records = Vec::new();
        parse_ram(&section, |a, p| {
            records.push((a / PAGE_SIZE as u64, p));
            Ok(())
        })
        .unwrap();
        let mut page = [0u8; PAGE_SIZE];
        page[9] = 1;
        assert_eq!(
            records,
            [
                (0, PageData::Zeros(3)),
                (5, PageData::Zeros(2)),
                (7, PageData::Full(&page)),
                (9, PageData::Zeros(2)),
            ]
        );
    }

    #[test]
    fn bad_magic_and_version_are_named() {
        let (mut bytes, _) = sample_stream();
        bytes[0] = b'X';
        let err = read_all(&bytes).unwrap_err();
        assert!(matches!(err, StreamError::BadMagic { .. }), "{err}");
        let (mut bytes, _) = sample_stream();
        bytes[4] = 1;
        let err = read_all(&bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "migration stream version 1 is not supported (this build reads version 2)"
        );
    }

    #[test]
    fn truncation_anywhere_is_an_error() {
        let (bytes, boundaries) = sample_stream();
        for cut in 0..bytes.len() {
            let err = read_all(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, StreamError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
        // Cut exactly at a section boundary: the message names where it ended.
        let cut = boundaries[2] as usize;
        let err = read_all(&bytes[..cut]).unwrap_err().to_string();
        assert!(err.contains(&format!("offset {cut}")), "{err}");
        assert!(err.contains("no end-of-stream"), "{err}");
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let (bytes, _) = sample_stream();
        for at in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[at] ^= bit;
                assert!(read_all(&bad).is_err(), "flip {bit:#x} at {at} accepted");
            }
        }
    }

    #[test]
    fn crc_error_names_the_section_offset() {
        let (mut bytes, boundaries) = sample_stream();
        let ram = boundaries[1] as usize;
        bytes[ram + 20] ^= 0xff;
        let err = read_all(&bytes).unwrap_err();
        assert!(matches!(err, StreamError::BadCrc { offset, .. } if offset == ram as u64));
        assert!(err.to_string().contains(&format!("offset {ram}")));
    }

    #[test]
    fn huge_length_is_refused_without_allocating() {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.section(SectionKind::End, &[]).unwrap();
        let mut bytes = w.into_inner();
        bytes[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = read_all(&bytes).unwrap_err();
        assert!(
            matches!(err, StreamError::TooLong { offset: 8, .. }),
            "{err}"
        );
    }

    /// A section with a valid CRC but hostile contents (as a buggy or
    /// malicious sender could produce) is rejected by the parsers.
    #[test]
    fn hostile_payloads_with_valid_crc_are_rejected() {
        let hostile: Vec<(SectionKind, Vec<u8>)> = vec![
            (SectionKind::Ram, vec![2, 0, 0, 0, 0, 0, 0, 0, 1, 2]),
            (
                SectionKind::Ram,
                vec![3, 0x10, 0, 0, 0, 0, 0, 0, 0xff, 0xff],
            ),
            (SectionKind::Ram, vec![7, 0, 0, 0, 0, 0, 0, 0]),
            (SectionKind::Ram, vec![1, 0, 0]),
            (SectionKind::Ram, vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            (
                SectionKind::Ram,
                vec![
                    1, 0xf0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                ],
            ),
            (SectionKind::Ram, vec![1, 0, 0, 0, 0, 0, 0, 0, 1]),
            (SectionKind::Vcpu, vec![9, 0, b'a']),
            (SectionKind::Device, vec![1]),
            (SectionKind::Setup, vec![0; 3]),
        ];
        for (kind, payload) in hostile {
            let mut w = StreamWriter::new(Vec::new()).unwrap();
            w.section(kind, &payload).unwrap();
            w.section(SectionKind::End, &[]).unwrap();
            let err = read_all(&w.into_inner()).unwrap_err();
            assert!(
                matches!(err, StreamError::BadPayload { offset: 8, .. }),
                "{kind:?} {payload:?}: {err}"
            );
        }
    }
}
