//! Byte layout of an image (ECMA-119, SUSP/RRIP 1991A, Joliet level 3),
//! for names and sizes `IsoImage::check` accepted.

use super::{IsoImage, SECTOR};

const PVD: u32 = 16;
const JOLIET_SVD: u32 = 17;
const TERMINATOR: u32 = 18;
const PATH_TABLES: [u32; 4] = [19, 20, 21, 22];
const ROOT: u32 = 23;
/// Size of the one-entry path table (the root directory).
const PATH_TABLE_SIZE: u32 = 10;

const DIR_FLAG: u8 = 0x02;
const DIR_MODE: u32 = 0o040555;
const FILE_MODE: u32 = 0o100444;

const ER_ID: &[u8] = b"RRIP_1991A";
const ER_DESCRIPTION: &[u8] =
    b"THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS";
const ER_SOURCE: &[u8] = b"PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  SEE PUBLISHER IDENTIFIER IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.";

/// Where each file's contents and each directory live.
struct Plan {
    iso_root: Vec<u8>,
    joliet_root: Vec<u8>,
    iso_root_lba: u32,
    joliet_root_lba: u32,
    /// The Rock Ridge continuation area (after the directories: libarchive
    /// reads in one pass and refuses one that lies behind it).
    continuation_lba: u32,
    /// First sector of each file, in `IsoImage::files` order.
    extents: Vec<u32>,
    total_sectors: u32,
}

/// The whole image.
pub(super) fn build(image: &IsoImage) -> Vec<u8> {
    let time = DirTime::from_unix(image.recorded);
    let plan = plan(image, &time);
    let mut out = vec![0u8; plan.total_sectors as usize * SECTOR];
    let mut put = |lba: u32, bytes: &[u8]| {
        let at = lba as usize * SECTOR;
        out[at..at + bytes.len()].copy_from_slice(bytes);
    };
    let volume_date = volume_date(&time);
    put(
        PVD,
        &volume_descriptor(image, &plan, &volume_date, Flavor::Primary),
    );
    put(
        JOLIET_SVD,
        &volume_descriptor(image, &plan, &volume_date, Flavor::Joliet),
    );
    put(TERMINATOR, &terminator());
    let [iso_l, iso_m, joliet_l, joliet_m] = PATH_TABLES;
    put(iso_l, &path_table(plan.iso_root_lba, false));
    put(iso_m, &path_table(plan.iso_root_lba, true));
    put(joliet_l, &path_table(plan.joliet_root_lba, false));
    put(joliet_m, &path_table(plan.joliet_root_lba, true));
    put(plan.continuation_lba, &er_entry());
    put(plan.iso_root_lba, &plan.iso_root);
    put(plan.joliet_root_lba, &plan.joliet_root);
    for (file, &lba) in image.files.iter().zip(&plan.extents) {
        put(lba, &file.data);
    }
    out
}

fn sectors(bytes: usize) -> u32 {
    bytes.div_ceil(SECTOR) as u32
}

/// Directories first (their size does not depend on where files go), then
/// the files in name order.
fn plan(image: &IsoImage, time: &DirTime) -> Plan {
    let iso_names = iso_names(image);
    // Sizes do not depend on extents: lay out once with zeros to measure.
    let zeros = vec![0; image.files.len()];
    let measure = |flavor| {
        let at = Place {
            lba: ROOT,
            size: 0,
            continuation: 0,
        };
        directory(image, &iso_names, &zeros, at, time, flavor).len()
    };
    let (iso_len, joliet_len) = (measure(Flavor::Primary), measure(Flavor::Joliet));
    let iso_root_lba = ROOT;
    let joliet_root_lba = iso_root_lba + sectors(iso_len);
    let continuation_lba = joliet_root_lba + sectors(joliet_len);
    let first_file = continuation_lba + 1;
    let mut extents = Vec::with_capacity(image.files.len());
    let mut next = first_file;
    for file in &image.files {
        extents.push(next);
        next += sectors(file.data.len());
    }
    let iso_at = Place {
        lba: iso_root_lba,
        size: iso_len,
        continuation: continuation_lba,
    };
    let joliet_at = Place {
        lba: joliet_root_lba,
        size: joliet_len,
        continuation: continuation_lba,
    };
    Plan {
        iso_root: directory(image, &iso_names, &extents, iso_at, time, Flavor::Primary),
        joliet_root: directory(image, &iso_names, &extents, joliet_at, time, Flavor::Joliet),
        iso_root_lba,
        joliet_root_lba,
        continuation_lba,
        extents,
        total_sectors: next,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// ISO 9660 names plus Rock Ridge entries.
    Primary,
    /// UCS-2 names.
    Joliet,
}

/// The 8.3 names of the primary tree, made unique.
fn iso_names(image: &IsoImage) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(image.files.len());
    for file in &image.files {
        let mut name = iso_name(&file.name, None);
        let mut n = 0;
        while names.contains(&name) {
            name = iso_name(&file.name, Some(n));
            n += 1;
        }
        names.push(name);
    }
    names
}

/// ISO 9660 level 1 name of `name` (upper case, d-characters, 8.3, with
/// version `;1`), as genisoimage makes it: `user-data` -> `USER_DAT.;1`.
/// `unique` replaces the end of the base name with a number.
pub fn iso_name(name: &str, unique: Option<u32>) -> String {
    let d_chars = |s: &str| -> String {
        s.chars()
            .map(|c| match c.to_ascii_uppercase() {
                c @ ('A'..='Z' | '0'..='9') => c,
                _ => '_',
            })
            .collect()
    };
    let (base, ext) = match name.rsplit_once('.') {
        Some((b, e)) if !b.is_empty() => (d_chars(b), d_chars(e)),
        _ => (d_chars(name), String::new()),
    };
    let mut base: String = base.chars().take(8).collect();
    if let Some(n) = unique {
        let suffix = n.to_string();
        let keep = 8usize.saturating_sub(suffix.len()).min(base.len());
        base.truncate(keep);
        base.push_str(&suffix);
    }
    let ext: String = ext.chars().take(3).collect();
    format!("{base}.{ext};1")
}

/// Where a directory lies: its first sector, its size in bytes, and the
/// continuation area its "." record points to.
#[derive(Clone, Copy)]
struct Place {
    lba: u32,
    size: usize,
    continuation: u32,
}

/// A directory extent: ".", "..", then the files sorted by their name in
/// this tree; records never straddle a sector.
fn directory(
    image: &IsoImage,
    iso_names: &[String],
    extents: &[u32],
    at: Place,
    time: &DirTime,
    flavor: Flavor,
) -> Vec<u8> {
    let mut records = vec![
        dot_record(at, time, flavor, true),
        dot_record(at, time, flavor, false),
    ];
    let mut order: Vec<usize> = (0..image.files.len()).collect();
    let id = |i: usize| match flavor {
        Flavor::Primary => iso_names[i].as_bytes().to_vec(),
        Flavor::Joliet => ucs2(&image.files[i].name),
    };
    order.sort_by_key(|&i| id(i));
    for i in order {
        let file = &image.files[i];
        let su = match flavor {
            Flavor::Primary => rock_ridge(FILE_MODE, 1, Some(&file.name), time, None),
            Flavor::Joliet => Vec::new(),
        };
        let len = file.data.len() as u32;
        records.push(dir_record(extents[i], len, 0, &id(i), &su, time));
    }
    let mut out = Vec::new();
    for record in records {
        let room = SECTOR - out.len() % SECTOR;
        if record.len() > room {
            out.resize(out.len() + room, 0);
        }
        out.extend_from_slice(&record);
    }
    out.resize(out.len().div_ceil(SECTOR) * SECTOR, 0);
    out
}

/// "." (`dot`) or "..": the root is its own parent. The primary root's
/// "." carries SP (Rock Ridge is in use) and CE (the ER entry lies in the
/// continuation sector).
fn dot_record(at: Place, time: &DirTime, flavor: Flavor, dot: bool) -> Vec<u8> {
    let id = if dot { [0u8] } else { [1u8] };
    let su = match flavor {
        Flavor::Joliet => Vec::new(),
        Flavor::Primary => {
            let mut su = Vec::new();
            if dot {
                su.extend_from_slice(&[b'S', b'P', 7, 1, 0xBE, 0xEF, 0]);
            }
            let ce = dot.then_some(at.continuation);
            su.extend(rock_ridge(DIR_MODE, 2, None, time, ce));
            su
        }
    };
    let size = at.size.max(SECTOR) as u32;
    dir_record(at.lba, size, DIR_FLAG, &id, &su, time)
}

/// RR, NM (files), PX, TF and optionally CE entries.
fn rock_ridge(
    mode: u32,
    links: u32,
    name: Option<&str>,
    time: &DirTime,
    continuation: Option<u32>,
) -> Vec<u8> {
    const RR_PX: u8 = 0x01;
    const RR_NM: u8 = 0x08;
    const RR_TF: u8 = 0x80;
    let mut flags = RR_PX | RR_TF;
    if name.is_some() {
        flags |= RR_NM;
    }
    let mut su = vec![b'R', b'R', 5, 1, flags];
    if let Some(name) = name {
        su.extend_from_slice(&[b'N', b'M', 5 + name.len() as u8, 1, 0]);
        su.extend_from_slice(name.as_bytes());
    }
    su.extend_from_slice(&[b'P', b'X', 36, 1]);
    for value in [mode, links, 0, 0] {
        su.extend_from_slice(&both32(value));
    }
    // Modify, access and attribute-change times.
    su.extend_from_slice(&[b'T', b'F', 5 + 3 * 7, 1, 0x0E]);
    for _ in 0..3 {
        su.extend_from_slice(&time.bytes());
    }
    if let Some(block) = continuation {
        su.extend_from_slice(&[b'C', b'E', 28, 1]);
        su.extend_from_slice(&both32(block));
        su.extend_from_slice(&both32(0));
        su.extend_from_slice(&both32(er_entry().len() as u32));
    }
    su
}

/// The extension reference naming RRIP 1991A (Linux reads Rock Ridge names
/// only once it has seen one).
fn er_entry() -> Vec<u8> {
    let len = 8 + ER_ID.len() + ER_DESCRIPTION.len() + ER_SOURCE.len();
    let mut er = vec![
        b'E',
        b'R',
        len as u8,
        1,
        ER_ID.len() as u8,
        ER_DESCRIPTION.len() as u8,
        ER_SOURCE.len() as u8,
        1,
    ];
    er.extend_from_slice(ER_ID);
    er.extend_from_slice(ER_DESCRIPTION);
    er.extend_from_slice(ER_SOURCE);
    er
}

/// A directory record (ECMA-119 9.1), padded to an even length.
fn dir_record(extent: u32, size: u32, flags: u8, id: &[u8], su: &[u8], time: &DirTime) -> Vec<u8> {
    let mut r = vec![0u8; 33];
    r[2..10].copy_from_slice(&both32(extent));
    r[10..18].copy_from_slice(&both32(size));
    r[18..25].copy_from_slice(&time.bytes());
    r[25] = flags;
    r[28..32].copy_from_slice(&both16(1));
    r[32] = id.len() as u8;
    r.extend_from_slice(id);
    if id.len().is_multiple_of(2) {
        r.push(0);
    }
    r.extend_from_slice(su);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r[0] = r.len() as u8;
    r
}

fn volume_descriptor(image: &IsoImage, plan: &Plan, date: &[u8; 17], flavor: Flavor) -> Vec<u8> {
    let mut d = vec![0u8; SECTOR];
    d[0] = if flavor == Flavor::Primary { 1 } else { 2 };
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    let text = |s: &str, len: usize| match flavor {
        Flavor::Primary => a_chars(s, len),
        Flavor::Joliet => ucs2_field(s, len),
    };
    d[8..40].copy_from_slice(&text("LINUX", 32));
    d[40..72].copy_from_slice(&text(&image.volume_id, 32));
    d[80..88].copy_from_slice(&both32(plan.total_sectors));
    let [iso_l, iso_m, joliet_l, joliet_m] = PATH_TABLES;
    let (root_lba, root_len, l_table, m_table) = match flavor {
        Flavor::Primary => (plan.iso_root_lba, plan.iso_root.len(), iso_l, iso_m),
        Flavor::Joliet => {
            // Escape sequence: UCS-2 level 3.
            d[88..91].copy_from_slice(b"%/E");
            (
                plan.joliet_root_lba,
                plan.joliet_root.len(),
                joliet_l,
                joliet_m,
            )
        }
    };
    d[120..124].copy_from_slice(&both16(1));
    d[124..128].copy_from_slice(&both16(1));
    d[128..132].copy_from_slice(&both16(SECTOR as u16));
    d[132..140].copy_from_slice(&both32(PATH_TABLE_SIZE));
    d[140..144].copy_from_slice(&l_table.to_le_bytes());
    d[148..152].copy_from_slice(&m_table.to_be_bytes());
    let time = DirTime::from_date(date);
    let root = dir_record(root_lba, root_len as u32, DIR_FLAG, &[0], &[], &time);
    d[156..190].copy_from_slice(&root);
    for (at, len) in [
        (190, 128),
        (318, 128),
        (446, 128),
        (702, 37),
        (739, 37),
        (776, 37),
    ] {
        d[at..at + len].copy_from_slice(&text("", len));
    }
    d[574..702].copy_from_slice(&text("OXVIRT CLOUD-LOCALDS", 128));
    d[813..830].copy_from_slice(date);
    d[830..847].copy_from_slice(date);
    let mut unset = [b'0'; 17];
    unset[16] = 0;
    d[847..864].copy_from_slice(&unset);
    d[864..881].copy_from_slice(date);
    d[881] = 1;
    d[883..1395].fill(b' ');
    d
}

fn terminator() -> Vec<u8> {
    let mut d = vec![0u8; SECTOR];
    d[0] = 255;
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d
}

/// The path table's one entry: the root directory.
fn path_table(root_lba: u32, big_endian: bool) -> Vec<u8> {
    let (lba, parent) = if big_endian {
        (root_lba.to_be_bytes(), 1u16.to_be_bytes())
    } else {
        (root_lba.to_le_bytes(), 1u16.to_le_bytes())
    };
    let mut t = vec![1, 0];
    t.extend_from_slice(&lba);
    t.extend_from_slice(&parent);
    t.extend_from_slice(&[0, 0]);
    t
}

fn both16(v: u16) -> [u8; 4] {
    let [a, b] = v.to_le_bytes();
    [a, b, b, a]
}

fn both32(v: u32) -> [u8; 8] {
    let le = v.to_le_bytes();
    let be = v.to_be_bytes();
    [le[0], le[1], le[2], le[3], be[0], be[1], be[2], be[3]]
}

fn a_chars(s: &str, len: usize) -> Vec<u8> {
    let mut out = s.as_bytes().to_vec();
    out.resize(len, b' ');
    out
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

/// A Joliet text field: UCS-2 big endian, padded with spaces; an odd
/// length ends in one zero byte.
fn ucs2_field(s: &str, len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = ucs2(s).into_iter().take(len / 2 * 2).collect();
    while out.len() + 2 <= len {
        out.extend_from_slice(&[0, b' ']);
    }
    out.resize(len, 0);
    out
}

/// A UTC time as directory records write it (years since 1900, month,
/// day, hour, minute, second, offset 0).
struct DirTime {
    year: u16,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl DirTime {
    /// Clamped to the years a directory record can hold (1970..=2155).
    fn from_unix(secs: i64) -> Self {
        let max = 6_000_000_000; // in 2160
        let secs = secs.clamp(0, max);
        let days = secs / 86_400;
        let rest = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        let year = year.min(2155) as u16;
        DirTime {
            year,
            month,
            day,
            hour: (rest / 3600) as u8,
            minute: (rest / 60 % 60) as u8,
            second: (rest % 60) as u8,
        }
    }

    fn from_date(date: &[u8; 17]) -> Self {
        let num = |a: usize, b: usize| -> u16 {
            date[a..b]
                .iter()
                .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'))
        };
        DirTime {
            year: num(0, 4),
            month: num(4, 6) as u8,
            day: num(6, 8) as u8,
            hour: num(8, 10) as u8,
            minute: num(10, 12) as u8,
            second: num(12, 14) as u8,
        }
    }

    fn bytes(&self) -> [u8; 7] {
        [
            (self.year - 1900) as u8,
            self.month,
            self.day,
            self.hour,
            self.minute,
            self.second,
            0,
        ]
    }
}

/// The volume descriptor date "YYYYMMDDHHMMSScc" plus the zone byte.
fn volume_date(t: &DirTime) -> [u8; 17] {
    let text = format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}00",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    );
    let mut out = [0u8; 17];
    out[..16].copy_from_slice(text.as_bytes());
    out
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        let t = DirTime::from_unix(1_700_000_000);
        assert_eq!(t.bytes(), [123, 11, 14, 22, 13, 20, 0]);
        assert_eq!(&volume_date(&t)[..16], b"2023111422132000");
        assert_eq!(DirTime::from_date(&volume_date(&t)).bytes(), t.bytes());
    }

    #[test]
    fn iso_names_follow_genisoimage() {
        assert_eq!(iso_name("user-data", None), "USER_DAT.;1");
        assert_eq!(iso_name("network-config", None), "NETWORK_.;1");
        assert_eq!(iso_name("a.tar.gz", None), "A_TAR.GZ;1");
        assert_eq!(iso_name(".hidden", None), "_HIDDEN.;1");
        assert_eq!(iso_name("user-data", Some(12)), "USER_D12.;1");
    }
}
