//! ISO 9660 images holding a few files in the root directory, with Rock
//! Ridge and Joliet names: what `genisoimage -volid cidata -joliet -rock`
//! writes for a cloud-init NoCloud seed (see [`nocloud`]).
//!
//! Layout (2048-byte sectors): 0-15 system area, 16 primary volume
//! descriptor, 17 Joliet supplementary descriptor, 18 terminator, 19-22
//! path tables (ISO L/M, Joliet L/M), from 23 the ISO root directory, the
//! Joliet root directory, the Rock Ridge continuation area (the ER entry)
//! and the file contents, each file from a sector boundary.

pub mod nocloud;

mod layout;

use std::io::Write;
use std::path::{Path, PathBuf};

pub use layout::iso_name;

/// Sector size of an ISO 9660 image.
pub const SECTOR: usize = 2048;
/// The largest file an image may hold. Seeds are a few KiB; the limit keeps
/// a mistaken input (a disk image named as user-data) from being copied in.
pub const MAX_FILE_SIZE: u64 = 64 << 20;
/// The longest file name: Joliet's 64 UCS-2 characters.
pub const MAX_NAME_LEN: usize = 64;
/// Joliet keeps 16 UCS-2 characters of the volume id; the primary
/// descriptor would take 32.
pub const MAX_VOLUME_ID_LEN: usize = 16;
/// Files in one image: the root directory must fit the sectors we give it.
pub const MAX_FILES: usize = 64;

/// Errors building or writing an image; each names the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    #[error("volume id {id:?}: {reason}")]
    VolumeId { id: String, reason: String },
    #[error("file name {name:?}: {reason}")]
    Name { name: String, reason: String },
    #[error("file name {name:?} is given twice ({first} and {second})")]
    Clash {
        name: String,
        first: String,
        second: String,
    },
    #[error(
        "{origin}: {size} bytes is more than the {MAX_FILE_SIZE}-byte limit of a file in the image"
    )]
    TooLarge { origin: String, size: u64 },
    #[error("{count} files: an image holds at most {MAX_FILES}")]
    TooManyFiles { count: usize },
    #[error("{path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One file of the image's root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoFile {
    /// The name readers see (Rock Ridge and Joliet), e.g. `user-data`.
    pub name: String,
    pub data: Vec<u8>,
    /// Where the contents came from, for error messages.
    pub origin: String,
}

impl IsoFile {
    pub fn new(name: &str, data: Vec<u8>) -> Self {
        IsoFile {
            name: name.to_owned(),
            data,
            origin: name.to_owned(),
        }
    }

    /// Reads `path` (a regular file of at most [`MAX_FILE_SIZE`] bytes).
    pub fn read(name: &str, path: &Path) -> Result<Self, IsoError> {
        let io = |source| IsoError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(IsoError::NotAFile {
                path: path.to_owned(),
            });
        }
        let origin = path.display().to_string();
        check_size(&origin, meta.len())?;
        let data = read_limited(file, &origin).map_err(io)??;
        Ok(IsoFile {
            name: name.to_owned(),
            data,
            origin,
        })
    }

    /// Reads everything from `reader` (standard input), within the limit.
    pub fn read_from(
        name: &str,
        reader: impl std::io::Read,
        origin: &str,
    ) -> Result<Self, IsoError> {
        let data = read_limited(reader, origin).map_err(|source| IsoError::Io {
            path: origin.into(),
            source,
        })??;
        Ok(IsoFile {
            name: name.to_owned(),
            data,
            origin: origin.to_owned(),
        })
    }
}

fn check_size(origin: &str, size: u64) -> Result<(), IsoError> {
    if size > MAX_FILE_SIZE {
        return Err(IsoError::TooLarge {
            origin: origin.to_owned(),
            size,
        });
    }
    Ok(())
}

/// Reads at most one byte past the limit: a file that grew since its
/// `stat`, or a pipe, is caught without reading it all.
fn read_limited(
    reader: impl std::io::Read,
    origin: &str,
) -> std::io::Result<Result<Vec<u8>, IsoError>> {
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut reader.take(MAX_FILE_SIZE + 1), &mut data)?;
    Ok(check_size(origin, data.len() as u64).map(|()| data))
}

/// An image: a volume id and the files of its root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoImage {
    pub volume_id: String,
    /// Recording time of the volume and its files, in seconds since the
    /// Unix epoch (UTC). The same inputs and time give the same bytes.
    pub recorded: i64,
    pub files: Vec<IsoFile>,
}

impl IsoImage {
    /// Checks the volume id and the names, then lays the image out.
    pub fn to_bytes(&self) -> Result<Vec<u8>, IsoError> {
        self.check()?;
        Ok(layout::build(self))
    }

    fn check(&self) -> Result<(), IsoError> {
        check_volume_id(&self.volume_id)?;
        if self.files.len() > MAX_FILES {
            return Err(IsoError::TooManyFiles {
                count: self.files.len(),
            });
        }
        for (i, file) in self.files.iter().enumerate() {
            check_name(&file.name)?;
            check_size(&file.origin, file.data.len() as u64)?;
            if let Some(first) = self.files[..i].iter().find(|f| f.name == file.name) {
                return Err(IsoError::Clash {
                    name: file.name.clone(),
                    first: first.origin.clone(),
                    second: file.origin.clone(),
                });
            }
        }
        Ok(())
    }

    /// Writes the image to `path` so that it appears whole or not at all:
    /// a temporary file beside it, fsync, rename. On failure nothing is
    /// left behind (an existing `path` is unchanged).
    pub fn write(&self, path: &Path) -> Result<(), IsoError> {
        let bytes = self.to_bytes()?;
        write_atomic(path, &bytes)
    }
}

fn check_volume_id(id: &str) -> Result<(), IsoError> {
    let bad = |reason: &str| IsoError::VolumeId {
        id: id.to_owned(),
        reason: reason.to_owned(),
    };
    if id.is_empty() || id.len() > MAX_VOLUME_ID_LEN {
        return Err(bad("must be 1 to 16 characters"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(bad("only letters, digits, '_', '-' and '.' are allowed"));
    }
    Ok(())
}

/// Names every reader takes the same way: printable ASCII without the
/// characters Joliet forbids.
fn check_name(name: &str) -> Result<(), IsoError> {
    let bad = |reason: String| IsoError::Name {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(bad(format!("must be 1 to {MAX_NAME_LEN} characters")));
    }
    if name == "." || name == ".." {
        return Err(bad("names the directory itself".into()));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !c.is_ascii_graphic() || "*/:;?\\".contains(c))
    {
        return Err(bad(format!(
            "{c:?} is not allowed (printable ASCII without * / : ; ? \\ or spaces)"
        )));
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IsoError> {
    let io = |source| IsoError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("not a file name")))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Ours, and incomplete.
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests;
