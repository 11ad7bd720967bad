//! `qemu-img info`: the same fields, in JSON and in human form.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use crate::error::{io, Result};
use crate::image::{probe, resolve_backing, Chain, Format};
use crate::qcow2::header::INCOMPAT_CORRUPT;
use crate::qcow2::snapshot;

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub icount: Option<u64>,
    pub vm_clock_nsec: u64,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_sec: u64,
    pub id: String,
    pub vm_state_size: u64,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    pub compat: String,
    pub compression_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum FormatSpecific {
    Qcow2(Qcow2Specific),
    File {},
}

#[derive(Clone, Debug, Serialize)]
pub struct Child {
    pub name: String,
    pub info: Box<ImageInfo>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub children: Vec<Child>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotInfo>>,
    pub virtual_size: u64,
    pub filename: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    pub format: String,
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    pub dirty_flag: bool,
}

fn file_node(path: &Path) -> Result<ImageInfo> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let size = std::fs::File::open(path)
        .and_then(|f| crate::disk::file_size(&f))
        .map_err(io(path))?;
    Ok(ImageInfo {
        children: Vec::new(),
        backing_filename_format: None,
        snapshots: None,
        virtual_size: size.div_ceil(512) * 512,
        filename: path.display().to_string(),
        cluster_size: None,
        format: "file".into(),
        actual_size: meta.blocks() * 512,
        format_specific: Some(FormatSpecific::File {}),
        full_backing_filename: None,
        backing_filename: None,
        dirty_flag: false,
    })
}

/// Describes one image (its backing file is named, not opened).
pub fn info(path: &Path, format: Option<Format>) -> Result<ImageInfo> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    let file = file_node(path)?;
    let mut out = ImageInfo {
        children: Vec::new(),
        format: format.name().into(),
        ..file.clone()
    };
    out.format_specific = None;
    match format {
        Format::Raw => {}
        Format::Vmdk => out.virtual_size = crate::vmdk::Vmdk::open(path)?.size_of(),
        Format::Qcow2 => qcow2_info(path, &mut out)?,
    }
    out.children.push(Child {
        name: "file".into(),
        info: Box::new(file),
    });
    Ok(out)
}

fn qcow2_info(path: &Path, out: &mut ImageInfo) -> Result<()> {
    let q = Chain::without_backing().open_qcow2(path, true)?;
    let h = q.header();
    out.virtual_size = h.size;
    out.cluster_size = Some(h.cluster_size());
    out.dirty_flag = h.incompatible & crate::qcow2::header::INCOMPAT_DIRTY != 0;
    let v3 = h.version >= 3;
    out.format_specific = Some(FormatSpecific::Qcow2(Qcow2Specific {
        compat: if v3 { "1.1" } else { "0.10" }.into(),
        compression_type: h.compression.name().into(),
        lazy_refcounts: v3.then_some(h.lazy_refcounts()),
        refcount_bits: h.refcount_bits(),
        corrupt: v3.then_some(h.incompatible & INCOMPAT_CORRUPT != 0),
        extended_l2: v3.then_some(h.extended_l2()),
    }));
    if let Some(name) = &h.backing_file {
        out.backing_filename = Some(name.clone());
        out.full_backing_filename = Some(resolve_backing(path, name).display().to_string());
        out.backing_filename_format = h.backing_format.clone();
    }
    if h.nb_snapshots > 0 {
        let (snaps, _) = snapshot::read_table(
            q.disk(),
            h.snapshots_offset,
            h.nb_snapshots,
            h.cluster_size(),
        )?;
        out.snapshots = Some(
            snaps
                .into_iter()
                .map(|s| SnapshotInfo {
                    icount: s.icount.filter(|&i| i != u64::MAX),
                    vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
                    name: s.name,
                    date_sec: s.date_sec,
                    date_nsec: s.date_nsec,
                    vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
                    id: s.id,
                    vm_state_size: s.vm_state_size,
                })
                .collect(),
        );
    }
    Ok(())
}

/// The image and every backing file under it, top first.
pub fn info_chain(path: &Path, format: Option<Format>) -> Result<Vec<ImageInfo>> {
    let mut chain = vec![info(path, format)?];
    while let Some(last) = chain.last() {
        let Some(next) = last.full_backing_filename.clone() else {
            break;
        };
        let fmt = match &last.backing_filename_format {
            Some(f) => Some(f.parse()?),
            None => None,
        };
        if chain.len() > 1000 || chain.iter().any(|i| i.filename == next) {
            return Err(crate::Error::Backing {
                path: Path::new(&last.filename).into(),
                backing: next.into(),
                problem: "the backing chain loops back to this file".into(),
            });
        }
        chain.push(info(Path::new(&next), fmt)?);
    }
    Ok(chain)
}

/// qemu's size_to_str: three significant digits and a binary unit.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut i = 0;
    while i + 1 < UNITS.len() && u128::from(n) >= 1000u128 << (10 * i) {
        i += 1;
    }
    let v = n as f64 / (1u64 << (10 * i)) as f64;
    format!("{} {}B", g3(v), UNITS[i])
}

/// C's "%0.3g" for the values sizes produce.
fn g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits = v.abs().log10().floor() as i32;
    let decimals = (2 - digits).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn civil(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The snapshot table as `qemu-img snapshot -l` and `info` print it.
pub fn snapshot_table(snaps: &[SnapshotInfo]) -> String {
    let mut s = format!(
        "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snaps {
        let secs = sn.vm_clock_sec;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            sn.vm_clock_nsec / 1_000_000
        );
        let icount = sn.icount.map_or(String::new(), |i| i.to_string());
        s.push_str(&format!(
            "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            human_size(sn.vm_state_size),
            civil(u64::from(sn.date_sec)),
            clock,
            icount
        ));
    }
    s
}

/// `qemu-img info`'s human output.
pub fn human(i: &ImageInfo) -> String {
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        i.filename,
        i.format,
        human_size(i.virtual_size),
        i.virtual_size,
        human_size(i.actual_size)
    );
    if let Some(cs) = i.cluster_size {
        s.push_str(&format!("cluster_size: {cs}\n"));
    }
    if let (Some(b), Some(full)) = (&i.backing_filename, &i.full_backing_filename) {
        if b == full {
            s.push_str(&format!("backing file: {b}\n"));
        } else {
            s.push_str(&format!("backing file: {b} (actual path: {full})\n"));
        }
    }
    if let Some(f) = &i.backing_filename_format {
        s.push_str(&format!("backing file format: {f}\n"));
    }
    if let Some(snaps) = &i.snapshots {
        s.push_str("Snapshot list:\n");
        s.push_str(&snapshot_table(snaps));
    }
    if let Some(FormatSpecific::Qcow2(q)) = &i.format_specific {
        s.push_str("Format specific information:\n");
        s.push_str(&format!(
            "    compat: {}\n    compression type: {}\n",
            q.compat, q.compression_type
        ));
        if let Some(l) = q.lazy_refcounts {
            s.push_str(&format!("    lazy refcounts: {l}\n"));
        }
        s.push_str(&format!("    refcount bits: {}\n", q.refcount_bits));
        if let Some(c) = q.corrupt {
            s.push_str(&format!("    corrupt: {c}\n"));
        }
        if let Some(e) = q.extended_l2 {
            s.push_str(&format!("    extended l2: {e}\n"));
        }
    }
    for c in &i.children {
        s.push_str(&format!(
            "Child node '/{}':\n    filename: {}\n    protocol type: file\n    file length: {} ({} bytes)\n    disk size: {}\n",
            c.name,
            c.info.filename,
            human_size(c.info.virtual_size),
            c.info.virtual_size,
            human_size(c.info.actual_size)
        ));
    }
    s
}
