//! Creating qcow2 images with qemu-img's options and layout.

use std::fs::OpenOptions;
use std::path::Path;

use super::header::{
    Compression, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2,
};
use super::refcount::Refcounts;
use super::Qcow2;
use crate::disk::Disk;
use crate::error::{io, Error, Result};
use crate::image::Chain;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preallocation {
    Off,
    Metadata,
    Falloc,
    Full,
}

impl std::str::FromStr for Preallocation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            _ => Err(Error::Usage(format!(
                "invalid preallocation mode '{s}' (off, metadata, falloc, full)"
            ))),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub size: u64,
    /// 2 for compat=0.10, 3 for compat=1.1.
    pub version: u32,
    pub cluster_size: u64,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub preallocation: Preallocation,
    pub lazy_refcounts: bool,
    pub refcount_bits: u32,
    pub compression: Compression,
    pub extended_l2: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            version: 3,
            cluster_size: 65536,
            backing_file: None,
            backing_format: None,
            preallocation: Preallocation::Off,
            lazy_refcounts: false,
            refcount_bits: 16,
            compression: Compression::Zlib,
            extended_l2: false,
        }
    }
}

impl CreateOptions {
    fn validate(&self) -> Result<()> {
        let fail = |m: &str| Err(Error::Usage(m.to_string()));
        if !self.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&self.cluster_size) {
            return fail("Cluster size must be a power of two between 512 and 2048k");
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return fail("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if self.version == 2 {
            if self.refcount_bits != 16 {
                return fail("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)");
            }
            if self.lazy_refcounts {
                return fail("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
            }
            if self.extended_l2 {
                return fail("Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
            }
            if self.compression != Compression::Zlib {
                return fail("Compression type can only be zlib with compatibility level 0.10 (use compat=1.1 or greater)");
            }
        }
        if self.extended_l2 && self.cluster_size < 16384 {
            return fail(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return fail("Backing format cannot be used without backing file");
        }
        super::validate_size(Path::new("size"), self.size)
    }

    fn header(&self) -> Header {
        let mut incompatible = 0;
        if self.extended_l2 {
            incompatible |= INCOMPAT_EXTL2;
        }
        if self.compression != Compression::Zlib {
            incompatible |= INCOMPAT_COMPRESSION;
        }
        Header {
            version: self.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: self.cluster_size.trailing_zeros(),
            size: self.size,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: self.cluster_size,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible,
            compatible: if self.lazy_refcounts {
                COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear: 0,
            refcount_order: self.refcount_bits.trailing_zeros(),
            header_length: super::header::V3_HEADER_LEN,
            compression: self.compression,
            backing_file: self.backing_file.clone(),
            backing_format: self.backing_format.clone(),
            features: Vec::new(),
        }
    }
}

/// Creates (or truncates) `path` as an empty qcow2 image: header, one
/// refcount table cluster, one refcount block, then the L1 table.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    // QEMU rounds every virtual size up to whole 512-byte sectors.
    let opts = &CreateOptions {
        size: opts.size.div_ceil(512) * 512,
        ..opts.clone()
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io(path))?;
    let disk = Disk::new(file, path);
    let cs = opts.cluster_size;
    let mut header = opts.header();
    write_header(&disk, &header)?;
    disk.write(&(2 * cs).to_be_bytes(), cs)?;
    disk.write(&vec![0u8; cs as usize - 8], cs + 8)?;
    disk.write(&vec![0u8; cs as usize], 2 * cs)?;
    let mut refs = Refcounts::load(&disk, header.refcount_order, header.cluster_bits, cs, 1)?;
    for c in 0..3 {
        refs.set(&disk, c, 1)?;
    }
    let l1_entries = header.l1_entries_for(opts.size);
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    let l1 = refs.alloc(&disk, l1_clusters)? * cs;
    disk.write(&vec![0u8; (l1_clusters * cs) as usize], l1)?;
    header.l1_size = l1_entries as u32;
    header.l1_table_offset = l1;
    header.refcount_table_offset = refs.table_offset;
    header.refcount_table_clusters = refs.table_clusters() as u32;
    write_header(&disk, &header)?;
    disk.sync()?;
    drop(disk);
    if opts.preallocation != Preallocation::Off {
        preallocate(path, opts.preallocation)?;
    }
    Ok(())
}

fn write_header(disk: &Disk, header: &Header) -> Result<()> {
    let raw = header
        .encode()
        .map_err(|m| Error::Usage(format!("{}: {m}", disk.path.display())))?;
    disk.write(&raw, 0)
}

fn preallocate(path: &Path, mode: Preallocation) -> Result<()> {
    let q = Qcow2::open(path, false, &mut Chain::without_backing())?;
    let ranges = q.preallocate()?;
    let end = ranges.iter().map(|(o, l)| o + l).max().unwrap_or(0);
    let file = &q.disk().file;
    if end > q.disk().len()? {
        file.set_len(end).map_err(io(path))?;
    }
    for (offset, len) in ranges {
        match mode {
            Preallocation::Falloc => {
                rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), offset, len)
                    .map_err(|e| io(path)(e.into()))?;
            }
            Preallocation::Full => {
                let zeroes = vec![0u8; 1 << 20];
                let mut at = 0;
                while at < len {
                    let n = (len - at).min(zeroes.len() as u64) as usize;
                    q.disk().write(&zeroes[..n], offset + at)?;
                    at += n as u64;
                }
            }
            _ => {}
        }
    }
    q.disk().sync()
}
