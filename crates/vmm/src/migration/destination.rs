//! The destination side: reads the stream(s) into guest memory, collects
//! the state blobs and confirms over the return path once the VMM has
//! restored them (the guest must not start before).

use std::io::{Read, Write};

use devices::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::pagemap::{Pagemap, CHUNK_PAGES};
use super::stream::{
    decode_blob, parse_ram, PageData, Section, SectionKind, Setup, StreamError, StreamReader,
};
use super::transport::{Incoming, IncomingConn, Interrupt, MigrationUri, TransportError};
use super::xbzrle;
use super::PAGE_SIZE;

/// Errors of an incoming migration.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("incoming migration does not fit this VM: {0}")]
    Mismatch(String),
    #[error("incoming migration, multifd channel {channel}: {source}")]
    Multifd { channel: u8, source: StreamError },
    #[error("incoming migration: sending the confirmation: {0}")]
    Confirm(std::io::Error),
}

/// What arrived: memory is written; the VMM restores these, then confirms.
pub struct Received {
    /// vCPU blobs in vCPU order.
    pub vcpus: Vec<Vec<u8>>,
    pub devices: Vec<(String, Vec<u8>)>,
    /// Pages written into guest memory.
    pub pages: u64,
    return_path: Option<Box<dyn Write + Send>>,
}

impl Received {
    /// Tells the source the guest runs here now (no-op for one-way transports).
    pub fn confirm(self) -> Result<(), DestinationError> {
        match self.return_path {
            Some(mut rp) => rp
                .write_all(b"OK")
                .and_then(|()| rp.flush())
                .map_err(DestinationError::Confirm),
            None => Ok(()),
        }
    }

    /// Tells the source that restoring failed: it resumes the guest.
    pub fn reject(self, reason: &str) {
        if let Some(rp) = self.return_path {
            send_error(rp, reason);
        }
    }
}

fn send_error(mut rp: Box<dyn Write + Send>, reason: &str) {
    // The source may be gone already; it then fails on its own.
    let _ = rp
        .write_all(b"ER")
        .and_then(|()| rp.write_all(reason.as_bytes()));
}

/// What one channel's reader reuses from page to page.
struct Applier<'m> {
    memory: &'m GuestMemory,
    scratch: Vec<u8>,
    pagemap: Pagemap,
    untouched: Vec<bool>,
}

impl<'m> Applier<'m> {
    fn new(memory: &'m GuestMemory) -> Self {
        Applier {
            memory,
            scratch: vec![0; PAGE_SIZE],
            pagemap: Pagemap::open(),
            untouched: Vec::new(),
        }
    }

    /// Writes one record into guest memory.
    fn apply(&mut self, section: &Section, addr: u64, page: PageData) -> Result<(), StreamError> {
        let at = GuestAddress(addr);
        let outside = |e: vm_memory::GuestMemoryError| {
            section.bad(format!("page {addr:#x} is outside guest memory ({e})"))
        };
        match page {
            PageData::Zeros(count) => self.zeros(section, addr, count),
            PageData::Full(data) => self.memory.write_slice(data, at).map_err(outside),
            PageData::Xbzrle(encoded) => {
                self.memory
                    .read_slice(&mut self.scratch, at)
                    .map_err(outside)?;
                xbzrle::decode(encoded, &mut self.scratch)
                    .map_err(|e| section.bad(format!("page {addr:#x}: {e}")))?;
                self.memory.write_slice(&self.scratch, at).map_err(outside)
            }
        }
    }

    /// A zero run. Most zero pages land on RAM nobody touched: those are
    /// skipped unread; a touched page is read and cleared only if needed
    /// (writing would allocate memory the guest never used).
    fn zeros(&mut self, section: &Section, addr: u64, count: u32) -> Result<(), StreamError> {
        let mut done = 0u64;
        while done < u64::from(count) {
            let pages = (u64::from(count) - done).min(CHUNK_PAGES as u64) as usize;
            let first = addr + done * PAGE_SIZE as u64;
            let mut untouched = std::mem::take(&mut self.untouched);
            self.pagemap
                .untouched(self.memory, first, pages, &mut untouched);
            let cleared = (untouched.iter().enumerate())
                .filter(|(_, &u)| !u)
                .try_for_each(|(i, _)| self.clear(section, first + (i * PAGE_SIZE) as u64));
            self.untouched = untouched;
            cleared?;
            done += pages as u64;
        }
        Ok(())
    }

    fn clear(&mut self, section: &Section, addr: u64) -> Result<(), StreamError> {
        let at = GuestAddress(addr);
        let outside = |e: vm_memory::GuestMemoryError| {
            section.bad(format!("page {addr:#x} is outside guest memory ({e})"))
        };
        self.memory
            .read_slice(&mut self.scratch, at)
            .map_err(outside)?;
        if super::is_zero(&self.scratch) {
            return Ok(());
        }
        self.scratch.fill(0);
        self.memory.write_slice(&self.scratch, at).map_err(outside)
    }
}

/// The state sections of the main channel.
#[derive(Default)]
struct Collected {
    vcpus: Vec<Vec<u8>>,
    devices: Vec<(String, Vec<u8>)>,
    pages: u64,
}

/// Reads sections until the end of stream; RAM goes to memory.
fn read_channel<R: Read>(
    reader: &mut StreamReader<R>,
    memory: &GuestMemory,
    main: bool,
) -> Result<Collected, StreamError> {
    let mut out = Collected::default();
    let mut applier = Applier::new(memory);
    loop {
        let section = reader.next_section()?;
        match section.kind {
            SectionKind::Ram => parse_ram(&section, |addr, page| {
                out.pages += match page {
                    PageData::Zeros(count) => u64::from(count),
                    _ => 1,
                };
                applier.apply(&section, addr, page)
            })?,
            SectionKind::Vcpu if main => {
                let (name, blob) = decode_blob(&section)?;
                if name != out.vcpus.len().to_string() {
                    return Err(section.bad(format!(
                        "vCPU {name} where vCPU {} was expected",
                        out.vcpus.len()
                    )));
                }
                out.vcpus.push(blob);
            }
            SectionKind::Device if main => out.devices.push(decode_blob(&section)?),
            SectionKind::End => return Ok(out),
            _ => {
                return Err(section.unexpected(if main {
                    "ram, vcpu, device or end-of-stream"
                } else {
                    "ram or end-of-stream"
                }))
            }
        }
    }
}

fn read_setup<R: Read>(conn: R) -> Result<(StreamReader<R>, Setup), StreamError> {
    let mut reader = StreamReader::new(conn)?;
    let section = reader.next_section()?;
    let setup = Setup::decode(&section)?;
    Ok((reader, setup))
}

fn check_fit(setup: &Setup, memory: &GuestMemory) -> Result<(), DestinationError> {
    let total: u64 = memory.iter().map(|r| r.len()).sum();
    if setup.ram_total != total {
        return Err(DestinationError::Mismatch(format!(
            "the source has {} bytes of RAM, this VM {total}",
            setup.ram_total
        )));
    }
    if setup.page_size != PAGE_SIZE as u32 {
        return Err(DestinationError::Mismatch(format!(
            "page size {} (expected {PAGE_SIZE})",
            setup.page_size
        )));
    }
    if setup.channel != 0 {
        return Err(DestinationError::Mismatch(format!(
            "the first connection is multifd channel {}, not the main channel",
            setup.channel
        )));
    }
    Ok(())
}

/// Receives a migration on `incoming` into `memory`. On error the source
/// is told over the return path (where there is one).
pub fn receive(
    incoming: &mut Incoming,
    uri: &MigrationUri,
    memory: &GuestMemory,
) -> Result<Received, DestinationError> {
    let IncomingConn {
        reader,
        return_path,
        interrupt,
    } = incoming.accept(uri)?;
    match receive_main(incoming, uri, memory, reader) {
        Ok(c) => Ok(Received {
            vcpus: c.vcpus,
            devices: c.devices,
            pages: c.pages,
            return_path,
        }),
        Err(e) => {
            tracing::warn!("incoming migration failed: {e}");
            if let Some(rp) = return_path {
                send_error(rp, &e.to_string());
            }
            if let Some(i) = interrupt {
                i.interrupt();
            }
            Err(e)
        }
    }
}

fn receive_main(
    incoming: &mut Incoming,
    uri: &MigrationUri,
    memory: &GuestMemory,
    reader: Box<dyn Read + Send>,
) -> Result<Collected, DestinationError> {
    let (mut main, setup) = read_setup(reader)?;
    check_fit(&setup, memory)?;
    let mut extra = Vec::new();
    for _ in 0..setup.multifd_channels {
        let conn = incoming.accept_extra(uri)?;
        let (stream, ch) = read_setup(conn.reader)?;
        if ch.channel == 0
            || ch.channel > setup.multifd_channels
            || extra.iter().any(|(c, _, _)| *c == ch.channel)
        {
            return Err(DestinationError::Mismatch(format!(
                "unexpected multifd channel number {}",
                ch.channel
            )));
        }
        extra.push((ch.channel, stream, conn.interrupt));
    }
    let interrupts: Vec<Interrupt> = extra.iter_mut().filter_map(|(_, _, i)| i.take()).collect();
    std::thread::scope(|scope| {
        let threads: Vec<_> = extra
            .into_iter()
            .map(|(channel, mut stream, _)| {
                (
                    channel,
                    scope.spawn(move || read_channel(&mut stream, memory, false)),
                )
            })
            .collect();
        let main_result = read_channel(&mut main, memory, true);
        if main_result.is_err() {
            // Readers blocked on a source that stalls must not hold us.
            interrupts.iter().for_each(Interrupt::interrupt);
        }
        let mut collected = main_result?;
        for (channel, thread) in threads {
            let pages = thread
                .join()
                .unwrap_or_else(|_| {
                    Err(StreamError::Truncated {
                        offset: 0,
                        what: "multifd reader panicked".into(),
                    })
                })
                .map_err(|source| DestinationError::Multifd { channel, source })?;
            collected.pages += pages.pages;
        }
        Ok(collected)
    })
}
