//! VMDK, read only: monolithicSparse and streamOptimized (one sparse
//! extent with an embedded descriptor) and descriptor files with FLAT
//! extents (monolithicFlat, twoGbMaxExtentFlat).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use flate2::{Decompress, FlushDecompress};

use crate::block::BlockDevice;
use crate::disk::Disk;
use crate::error::{corrupt, invalid, io, Error, Result};
use crate::image::resolve_backing;

const SECTOR: u64 = 512;
const GD_AT_END: u64 = u64::MAX;
const FLAG_COMPRESSED: u32 = 1 << 16;
/// Largest grain accepted (2 MiB; QEMU writes 64 KiB grains).
const MAX_GRAIN_SECTORS: u64 = 4096;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

struct Sparse {
    disk: Disk,
    grain_sectors: u64,
    gtes_per_gt: u64,
    compressed: bool,
    directory: Vec<u32>,
    tables: Mutex<HashMap<u32, Vec<u32>>>,
}

struct Flat {
    disk: Disk,
    start: u64,
    len: u64,
    file_offset: u64,
}

enum Extents {
    Sparse(Box<Sparse>),
    Flat(Vec<Flat>),
}

pub struct Vmdk {
    path: std::path::PathBuf,
    size: u64,
    extents: Extents,
}

impl Vmdk {
    pub fn open(path: &Path) -> Result<Vmdk> {
        let file = File::open(path).map_err(io(path))?;
        let disk = Disk::new(file, path);
        let mut head = [0u8; 512];
        let n = disk.len()?.min(512) as usize;
        disk.read_meta(&mut head[..n], 0, "VMDK header")?;
        if head.starts_with(b"KDMV") {
            let sparse = Sparse::open(disk)?;
            return Ok(Vmdk {
                path: path.into(),
                size: sparse.0,
                extents: Extents::Sparse(Box::new(sparse.1)),
            });
        }
        let len = disk.len()?;
        if len > 1 << 20 {
            return Err(invalid(
                path,
                "descriptor",
                "text descriptor larger than 1 MiB",
            ));
        }
        let mut text = vec![0u8; len as usize];
        disk.read_meta(&mut text, 0, "VMDK descriptor")?;
        let text = String::from_utf8_lossy(&text).into_owned();
        let flats = parse_flat_extents(path, &text)?;
        let size = flats.last().map_or(0, |f| f.start + f.len);
        Ok(Vmdk {
            path: path.into(),
            size,
            extents: Extents::Flat(flats),
        })
    }

    pub fn size_of(&self) -> u64 {
        self.size
    }

    fn read_only_err(&self) -> Error {
        Error::ReadOnly {
            path: self.path.clone(),
        }
    }
}

/// Parses `RW <sectors> FLAT "<file>" <offset>` extent lines.
fn parse_flat_extents(path: &Path, text: &str) -> Result<Vec<Flat>> {
    let mut flats = Vec::new();
    let mut start = 0;
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        if !matches!(words.first(), Some(&("RW" | "RDONLY" | "NOACCESS"))) {
            continue;
        }
        let field = format!("descriptor line {}", no + 1);
        if words.len() < 4 || words[2] != "FLAT" {
            return Err(Error::Unsupported {
                path: path.into(),
                what: format!("{field}: extent type other than FLAT in a descriptor file: {line}"),
            });
        }
        let sectors: u64 = words[1]
            .parse()
            .map_err(|_| invalid(path, &field, format!("bad sector count '{}'", words[1])))?;
        let name = line
            .split('"')
            .nth(1)
            .ok_or_else(|| invalid(path, &field, "extent file name not quoted"))?;
        let file_offset: u64 = match words.last() {
            Some(w) if !w.ends_with('"') => w
                .parse()
                .map_err(|_| invalid(path, &field, format!("bad offset '{w}'")))?,
            _ => 0,
        };
        let extent = resolve_backing(path, name);
        let file = File::open(&extent).map_err(io(&extent))?;
        flats.push(Flat {
            disk: Disk::new(file, &extent),
            start,
            len: sectors * SECTOR,
            file_offset: file_offset * SECTOR,
        });
        start += sectors * SECTOR;
    }
    if flats.is_empty() {
        return Err(invalid(path, "descriptor", "no extents found"));
    }
    Ok(flats)
}

impl Sparse {
    fn open(disk: Disk) -> Result<(u64, Sparse)> {
        let path = disk.path.clone();
        let mut h = [0u8; 512];
        disk.read_meta(&mut h, 0, "VMDK sparse header")?;
        let mut gd_offset = le64(&h, 56);
        if gd_offset == GD_AT_END {
            // streamOptimized: the real header is the footer, 1 KiB before the end.
            let len = disk.len()?;
            if len < 1536 {
                return Err(invalid(
                    &path,
                    "footer",
                    "file too short for a streamOptimized footer",
                ));
            }
            disk.read_meta(&mut h, len - 1024, "VMDK footer")?;
            if !h.starts_with(b"KDMV") {
                return Err(invalid(&path, "footer", "no KDMV magic in the footer"));
            }
            gd_offset = le64(&h, 56);
        }
        let version = le32(&h, 4);
        if !(1..=3).contains(&version) {
            return Err(invalid(
                &path,
                "version",
                format!("{version} (supported: 1 to 3)"),
            ));
        }
        let flags = le32(&h, 8);
        let capacity = le64(&h, 12);
        let grain_sectors = le64(&h, 20);
        let gtes_per_gt = u64::from(le32(&h, 44));
        if grain_sectors == 0
            || grain_sectors > MAX_GRAIN_SECTORS
            || !grain_sectors.is_power_of_two()
        {
            return Err(invalid(
                &path,
                "grainSize",
                format!("{grain_sectors} sectors"),
            ));
        }
        if gtes_per_gt != 512 {
            return Err(invalid(
                &path,
                "numGTEsPerGT",
                format!("{gtes_per_gt} (must be 512)"),
            ));
        }
        if capacity > (1 << 41) {
            return Err(invalid(
                &path,
                "capacity",
                format!("{capacity} sectors is too large"),
            ));
        }
        let entries = capacity.div_ceil(grain_sectors * gtes_per_gt) as usize;
        if entries as u64 * 4 > disk.len()? {
            return Err(invalid(
                &path,
                "capacity",
                format!("{capacity} sectors needs a grain directory larger than the file"),
            ));
        }
        let mut raw = vec![0u8; entries * 4];
        disk.read_meta(
            &mut raw,
            gd_offset.saturating_mul(SECTOR),
            "VMDK grain directory",
        )?;
        let directory = (0..entries).map(|i| le32(&raw, i * 4)).collect();
        let compressed = flags & FLAG_COMPRESSED != 0 && le16(&h, 77) == 1;
        let sparse = Sparse {
            disk,
            grain_sectors,
            gtes_per_gt,
            compressed,
            directory,
            tables: Mutex::new(HashMap::new()),
        };
        Ok((capacity * SECTOR, sparse))
    }

    fn grain_sector(&self, grain: u64) -> Result<u32> {
        let gd = (grain / self.gtes_per_gt) as usize;
        let gt_sector = self.directory.get(gd).copied().unwrap_or(0);
        if gt_sector == 0 {
            return Ok(0);
        }
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let std::collections::hash_map::Entry::Vacant(e) = tables.entry(gt_sector) {
            let mut raw = vec![0u8; self.gtes_per_gt as usize * 4];
            self.disk.read_meta(
                &mut raw,
                u64::from(gt_sector) * SECTOR,
                &format!("grain table {gd}"),
            )?;
            e.insert(
                (0..self.gtes_per_gt as usize)
                    .map(|i| le32(&raw, i * 4))
                    .collect(),
            );
        }
        Ok(tables[&gt_sector][(grain % self.gtes_per_gt) as usize])
    }

    fn read_grain(&self, sector: u32, out: &mut [u8]) -> Result<()> {
        let at = u64::from(sector) * SECTOR;
        if !self.compressed {
            return self.disk.read_data(out, at);
        }
        let mut marker = [0u8; 12];
        self.disk.read_meta(&mut marker, at, "grain marker")?;
        let len = le32(&marker, 8) as u64;
        if len > out.len() as u64 * 2 + 4096 {
            return Err(corrupt(
                &self.disk.path,
                format!("grain at sector {sector}: compressed size {len} too large"),
            ));
        }
        let mut data = vec![0u8; len as usize];
        self.disk
            .read_meta(&mut data, at + 12, "compressed grain")?;
        let mut d = Decompress::new(true);
        let res = d.decompress(&data, out, FlushDecompress::Finish);
        if res.is_err() || d.total_out() != out.len() as u64 {
            return Err(corrupt(
                &self.disk.path,
                format!("grain at sector {sector}: bad deflate data"),
            ));
        }
        Ok(())
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let grain_bytes = self.grain_sectors * SECTOR;
        let mut done = 0usize;
        while done < buf.len() {
            let g = offset + done as u64;
            let in_grain = g % grain_bytes;
            let n = ((buf.len() - done) as u64).min(grain_bytes - in_grain) as usize;
            let chunk = &mut buf[done..done + n];
            match self.grain_sector(g / grain_bytes)? {
                0 | 1 => chunk.fill(0),
                s if self.compressed => {
                    let mut grain = vec![0u8; grain_bytes as usize];
                    self.read_grain(s, &mut grain)?;
                    chunk.copy_from_slice(&grain[in_grain as usize..in_grain as usize + n]);
                }
                s => self
                    .disk
                    .read_data(chunk, u64::from(s) * SECTOR + in_grain)?,
            }
            done += n;
        }
        Ok(())
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl BlockDevice for Vmdk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(Error::OutOfRange {
                path: self.path.clone(),
                offset,
                len: buf.len() as u64,
                size: self.size,
            });
        }
        match &self.extents {
            Extents::Sparse(s) => s.read(buf, offset),
            Extents::Flat(flats) => {
                let mut done = 0usize;
                while done < buf.len() {
                    let g = offset + done as u64;
                    let f = flats
                        .iter()
                        .find(|f| g >= f.start && g < f.start + f.len)
                        .ok_or_else(|| {
                            corrupt(&self.path, format!("no extent covers offset {g}"))
                        })?;
                    let n = ((buf.len() - done) as u64).min(f.start + f.len - g) as usize;
                    f.disk
                        .read_data(&mut buf[done..done + n], f.file_offset + g - f.start)?;
                    done += n;
                }
                Ok(())
            }
        }
    }

    fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
        Err(self.read_only_err())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, _: u64, _: u64) -> Result<()> {
        Err(self.read_only_err())
    }

    fn write_zeroes(&self, _: u64, _: u64) -> Result<()> {
        Err(self.read_only_err())
    }

    fn read_only(&self) -> bool {
        true
    }
}
