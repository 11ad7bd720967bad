//! The qcow2 header and its extensions (docs/interop/qcow2.txt in QEMU).

use std::path::Path;

use crate::error::{invalid, Error, Result};

pub const MAGIC: u32 = 0x5146_49fb;
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 112;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_CRYPTO: u32 = 0x0537_be77;

/// Largest backing file name qemu accepts.
const MAX_BACKING_NAME: u32 = 1023;
/// Largest L1 table qemu accepts (32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table qemu accepts (8 MiB).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// One entry of the feature name table extension.
#[derive(Clone, Debug)]
pub struct FeatureName {
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub features: Vec<FeatureName>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        let entry = if self.extended_l2() { 16 } else { 8 };
        (self.cluster_size() / entry) * self.cluster_size()
    }

    /// L1 entries needed for a virtual size.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }

    /// Parses and validates a header from the image's first cluster (or
    /// as much of the file as there is, when it is shorter).
    pub fn parse(path: &Path, buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(invalid(
                path,
                "header",
                format!("file is {} bytes, shorter than a qcow2 header", buf.len()),
            ));
        }
        if be32(buf, 0) != MAGIC {
            return Err(invalid(path, "magic", "not a qcow2 image"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(invalid(
                path,
                "version",
                format!("{version} (only 2 and 3 exist)"),
            ));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(
                path,
                "cluster_bits",
                format!("{cluster_bits} (must be 9 to 21)"),
            ));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression: Compression::Zlib,
            backing_file: None,
            backing_format: None,
            features: Vec::new(),
        };
        if be32(buf, 32) != 0 {
            return Err(Error::Unsupported {
                path: path.into(),
                what: "encrypted qcow2 images (crypt_method is not 0)".into(),
            });
        }
        if version == 3 {
            h.parse_v3(path, buf)?;
        }
        h.parse_backing_name(path, buf)?;
        h.parse_extensions(path, buf)?;
        h.check_features(path)?;
        h.check_layout(path, file_len)?;
        Ok(h)
    }

    fn parse_v3(&mut self, path: &Path, buf: &[u8]) -> Result<()> {
        if buf.len() < 104 {
            return Err(invalid(
                path,
                "header_length",
                "file too short for a version 3 header",
            ));
        }
        self.incompatible = be64(buf, 72);
        self.compatible = be64(buf, 80);
        self.autoclear = be64(buf, 88);
        self.refcount_order = be32(buf, 96);
        self.header_length = be32(buf, 100);
        if self.refcount_order > 6 {
            return Err(invalid(
                path,
                "refcount_order",
                format!("{} (must be 0 to 6)", self.refcount_order),
            ));
        }
        let hl = self.header_length;
        if hl < 104 || u64::from(hl) > self.cluster_size() || hl as usize > buf.len() {
            return Err(invalid(
                path,
                "header_length",
                format!("{hl} (must be 104 up to the cluster size)"),
            ));
        }
        let ctype = if hl > 104 { buf[104] } else { 0 };
        self.compression = match ctype {
            0 => Compression::Zlib,
            1 => Compression::Zstd,
            n => {
                return Err(invalid(
                    path,
                    "compression_type",
                    format!("{n} (known: 0 zlib, 1 zstd)"),
                ))
            }
        };
        let flagged = self.incompatible & INCOMPAT_COMPRESSION != 0;
        if flagged != (ctype != 0) {
            return Err(invalid(
                path,
                "compression_type",
                "does not match incompatible feature bit 3",
            ));
        }
        Ok(())
    }

    fn parse_extensions(&mut self, path: &Path, buf: &[u8]) -> Result<()> {
        let mut at = self.header_length as usize;
        // Extensions end at the backing file name, or at the cluster end.
        let end = if self.backing_file_offset != 0 {
            (self.backing_file_offset as usize).min(buf.len())
        } else {
            buf.len()
        };
        while at + 8 <= end {
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            at += 8;
            if kind == EXT_END {
                return Ok(());
            }
            if at + len > end {
                return Err(invalid(
                    path,
                    "header extension",
                    format!("0x{kind:08x} at byte {} runs past the header area", at - 8),
                ));
            }
            let data = &buf[at..at + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned())
                }
                EXT_FEATURE_TABLE => self.features = parse_feature_table(data),
                EXT_DATA_FILE => {
                    return Err(Error::Unsupported {
                        path: path.into(),
                        what: "external data files".into(),
                    })
                }
                EXT_CRYPTO => {
                    return Err(Error::Unsupported {
                        path: path.into(),
                        what: "encryption".into(),
                    })
                }
                _ => {}
            }
            at += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn check_features(&self, path: &Path) -> Result<()> {
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1 << b) != 0)
                .map(|b| {
                    self.features
                        .iter()
                        .find(|f| f.kind == 0 && u32::from(f.bit) == b)
                        .map_or(format!("bit {b}"), |f| format!("bit {b} ({})", f.name))
                })
                .collect();
            return Err(invalid(
                path,
                "incompatible_features",
                format!("unknown feature {}", names.join(", ")),
            ));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::Unsupported {
                path: path.into(),
                what: "external data files".into(),
            });
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(invalid(
                path,
                "cluster_bits",
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        Ok(())
    }

    fn check_layout(&self, path: &Path, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let aligned = |field: &str, off: u64| -> Result<()> {
            if !off.is_multiple_of(cs) {
                return Err(invalid(
                    path,
                    field,
                    format!("0x{off:x} is not aligned to the {cs}-byte cluster size"),
                ));
            }
            Ok(())
        };
        let within = |field: &str, off: u64, len: u64| -> Result<()> {
            match off.checked_add(len) {
                Some(end) if end <= file_len => Ok(()),
                _ => Err(invalid(
                    path,
                    field,
                    format!(
                        "0x{off:x} + {len} bytes lies beyond the end of the {file_len}-byte file"
                    ),
                )),
            }
        };
        if self.size > (1u64 << 61) {
            return Err(invalid(path, "size", format!("{} is too large", self.size)));
        }
        let needed = self.l1_entries_for(self.size);
        if u64::from(self.l1_size) < needed {
            return Err(invalid(
                path,
                "l1_size",
                format!(
                    "{} entries cannot map {} bytes (need {needed})",
                    self.l1_size, self.size
                ),
            ));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(invalid(
                path,
                "l1_size",
                format!("{} entries is larger than qemu allows", self.l1_size),
            ));
        }
        aligned("l1_table_offset", self.l1_table_offset)?;
        if self.l1_size > 0 {
            within(
                "l1_table_offset",
                self.l1_table_offset,
                u64::from(self.l1_size) * 8,
            )?;
        }
        aligned("refcount_table_offset", self.refcount_table_offset)?;
        if self.refcount_table_clusters == 0 {
            return Err(invalid(path, "refcount_table_clusters", "is 0"));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES.max(cs) {
            return Err(invalid(
                path,
                "refcount_table_clusters",
                format!(
                    "{} is larger than qemu allows",
                    self.refcount_table_clusters
                ),
            ));
        }
        within(
            "refcount_table_offset",
            self.refcount_table_offset,
            rt_bytes,
        )?;
        if self.nb_snapshots > 65536 {
            return Err(invalid(
                path,
                "nb_snapshots",
                format!("{} (at most 65536)", self.nb_snapshots),
            ));
        }
        if self.nb_snapshots > 0 {
            aligned("snapshots_offset", self.snapshots_offset)?;
            within("snapshots_offset", self.snapshots_offset, 40)?;
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, path: &Path, buf: &[u8]) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let len = self.backing_file_size;
        if len > MAX_BACKING_NAME {
            return Err(invalid(
                path,
                "backing_file_size",
                format!("{len} (at most {MAX_BACKING_NAME})"),
            ));
        }
        let start = self.backing_file_offset;
        let end = start + u64::from(len);
        if end > buf.len() as u64 || end > self.cluster_size() {
            return Err(invalid(
                path,
                "backing_file_offset",
                format!("0x{start:x} + {len} lies outside the first cluster"),
            ));
        }
        let name = &buf[start as usize..end as usize];
        self.backing_file = Some(
            String::from_utf8(name.to_vec())
                .map_err(|_| invalid(path, "backing_file", "not UTF-8"))?,
        );
        Ok(())
    }

    /// The header, its extensions and the backing file name, as written
    /// into the first cluster. Fails if they do not fit.
    pub fn encode(&self) -> std::result::Result<Vec<u8>, String> {
        let mut b = Vec::with_capacity(4096);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&[0; 12]); // backing name offset and size, filled in below
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&V3_HEADER_LEN.to_be_bytes());
            b.push(match self.compression {
                Compression::Zlib => 0,
                Compression::Zstd => 1,
            });
            b.resize(V3_HEADER_LEN as usize, 0);
        }
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        if self.version >= 3 {
            push_ext(&mut b, EXT_FEATURE_TABLE, &feature_table());
        }
        push_ext(&mut b, EXT_END, &[]);
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(format!(
                    "backing file name is longer than {MAX_BACKING_NAME} bytes"
                ));
            }
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(format!(
                "header and backing file name ({} bytes) do not fit in one cluster",
                b.len()
            ));
        }
        Ok(b)
    }
}

fn push_ext(b: &mut Vec<u8>, kind: u32, data: &[u8]) {
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b.resize(b.len().div_ceil(8) * 8, 0);
}

fn parse_feature_table(data: &[u8]) -> Vec<FeatureName> {
    data.chunks_exact(48)
        .map(|e| FeatureName {
            kind: e[0],
            bit: e[1],
            name: String::from_utf8_lossy(&e[2..])
                .trim_end_matches('\0')
                .to_string(),
        })
        .collect()
}

/// The feature names qemu writes, so its error messages can name them.
fn feature_table() -> Vec<u8> {
    let names: [(u8, u8, &str); 7] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
    ];
    let mut t = Vec::new();
    for (kind, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        t.extend_from_slice(&e);
    }
    t
}
