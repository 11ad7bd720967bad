//! `qemu-img resize`.

use std::path::Path;

use crate::error::{io, Error, Result};
use crate::image::{probe, Chain, Format};

/// Resizes an image to `size` bytes. Shrinking needs `shrink` (data past
/// the new end is lost, as with qemu-img).
pub fn resize(path: &Path, format: Option<Format>, size: u64, shrink: bool) -> Result<()> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    match format {
        Format::Raw => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io(path))?;
            let old = f.metadata().map_err(io(path))?.len();
            if size < old && !shrink {
                return Err(shrink_refused());
            }
            f.set_len(size).map_err(io(path))
        }
        Format::Qcow2 => {
            let q = Chain::new().open_qcow2(path, false)?;
            if size < q.header().size && !shrink {
                return Err(shrink_refused());
            }
            q.resize(size)
        }
        Format::Vmdk => Err(Error::Unsupported {
            path: path.into(),
            what: "resizing VMDK images".into(),
        }),
    }
}

fn shrink_refused() -> Error {
    Error::Usage("Use the --shrink option to perform a shrink operation.".into())
}
