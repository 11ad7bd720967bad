//! Opening images of any format, with their backing chains.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::block::BlockDevice;
use crate::error::{io, Error, Result};
use crate::qcow2::Qcow2;
use crate::raw::Raw;
use crate::vmdk::Vmdk;

/// Longest backing chain followed (QEMU has no fixed limit; this one
/// keeps a hostile chain from exhausting the stack).
const MAX_CHAIN: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    Vmdk,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "vmdk" => Ok(Format::Vmdk),
            _ => Err(Error::Usage(format!(
                "Unknown file format '{s}' (supported: raw, qcow2, vmdk)"
            ))),
        }
    }
}

/// Guesses a file's format from its first bytes, as qemu-img does.
pub fn probe(path: &Path) -> Result<Format> {
    let mut head = [0u8; 512];
    let mut f = File::open(path).map_err(io(path))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]).map_err(io(path))? {
            0 => break,
            k => n += k,
        }
    }
    let head = &head[..n];
    Ok(if head.starts_with(b"QFI\xfb") {
        Format::Qcow2
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        Format::Vmdk
    } else {
        Format::Raw
    })
}

/// The files already opened along one backing chain.
pub struct Chain {
    seen: Vec<PathBuf>,
    follow: bool,
    direct: bool,
}

impl Chain {
    pub fn new() -> Chain {
        Chain {
            seen: Vec::new(),
            follow: true,
            direct: false,
        }
    }

    /// Opens images without their backing files (for metadata work).
    pub fn without_backing() -> Chain {
        Chain {
            follow: false,
            ..Chain::new()
        }
    }

    /// Opens every file of the chain with O_DIRECT (`cache=none`).
    pub fn direct() -> Chain {
        Chain {
            direct: true,
            ..Chain::new()
        }
    }

    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    fn enter(&mut self, path: &Path) -> Result<()> {
        let canon = path.canonicalize().map_err(io(path))?;
        if self.seen.contains(&canon) {
            return Err(Error::Backing {
                path: self.seen.last().cloned().unwrap_or_default(),
                backing: path.to_path_buf(),
                problem: "the backing chain loops back to this file".into(),
            });
        }
        if self.seen.len() >= MAX_CHAIN {
            return Err(Error::Backing {
                path: path.to_path_buf(),
                backing: path.to_path_buf(),
                problem: format!("backing chain longer than {MAX_CHAIN} images"),
            });
        }
        self.seen.push(canon);
        Ok(())
    }

    pub(crate) fn open_backing(
        &mut self,
        image: &Path,
        name: &str,
        format: Option<&str>,
    ) -> Result<Option<Box<dyn BlockDevice>>> {
        if !self.follow {
            return Ok(None);
        }
        let path = resolve_backing(image, name);
        let fail = |problem: String| Error::Backing {
            path: image.to_path_buf(),
            backing: path.clone(),
            problem,
        };
        if !path.exists() {
            return Err(fail("No such file or directory".into()));
        }
        let format = match format {
            Some(f) => Some(f.parse::<Format>().map_err(|e| fail(e.to_string()))?),
            None => None,
        };
        self.open(&path, true, format).map(Some)
    }

    pub fn open(
        &mut self,
        path: &Path,
        read_only: bool,
        format: Option<Format>,
    ) -> Result<Box<dyn BlockDevice>> {
        self.enter(path)?;
        let format = match format {
            Some(f) => f,
            None => probe(path)?,
        };
        Ok(match format {
            Format::Raw => Box::new(Raw::open(path, read_only, self.direct)?),
            Format::Qcow2 => Box::new(Qcow2::open(path, read_only, self)?),
            Format::Vmdk => {
                if !read_only {
                    return Err(Error::Unsupported {
                        path: path.into(),
                        what: "writing VMDK images".into(),
                    });
                }
                if self.direct {
                    return Err(Error::Unsupported {
                        path: path.into(),
                        what: "O_DIRECT (cache=none) on VMDK images".into(),
                    });
                }
                Box::new(Vmdk::open(path)?)
            }
        })
    }

    pub fn open_qcow2(&mut self, path: &Path, read_only: bool) -> Result<Qcow2> {
        self.enter(path)?;
        Qcow2::open(path, read_only, self)
    }
}

impl Default for Chain {
    fn default() -> Self {
        Chain::new()
    }
}

/// A relative backing file name is relative to the image's directory.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => name.to_path_buf(),
    }
}

/// How [`open_with`] opens an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    /// The format; probed from the first bytes where None.
    pub format: Option<Format>,
    /// O_DIRECT on the image and every backing file (the VMM's
    /// `cache=none`); fails on filesystems without O_DIRECT.
    pub direct: bool,
}

/// Opens an image (probing its format unless given) with its backing chain.
pub fn open(path: &Path, read_only: bool, format: Option<Format>) -> Result<Box<dyn BlockDevice>> {
    Chain::new().open(path, read_only, format)
}

/// Opens an image with its backing chain as `opts` say.
pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    let mut chain = if opts.direct {
        Chain::direct()
    } else {
        Chain::new()
    };
    chain.open(path, opts.read_only, opts.format)
}
