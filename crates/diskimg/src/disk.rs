//! A file with the path it came from, so every I/O error names it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{corrupt, io, Result};

pub struct Disk {
    pub file: File,
    pub path: PathBuf,
}

impl Disk {
    pub fn new(file: File, path: &Path) -> Disk {
        Disk {
            file,
            path: path.to_path_buf(),
        }
    }

    pub fn len(&self) -> Result<u64> {
        Ok(self.file.metadata().map_err(io(&self.path))?.len())
    }

    /// Reads metadata; a short read means the metadata points past the end
    /// of the file, which is corruption, not an I/O error.
    pub fn read_meta(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(corrupt(
                &self.path,
                format!(
                    "{what} at offset 0x{offset:x} ({} bytes) lies beyond the end of the file",
                    buf.len()
                ),
            )),
            Err(e) => Err(io(&self.path)(e)),
        }
    }

    /// Reads guest data; bytes past the end of the file read as zeroes
    /// (a sparse or preallocated image need not extend its file).
    pub fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(&self.path)(e)),
            }
        }
        Ok(())
    }

    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(io(&self.path))
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io(&self.path))
    }
}

pub fn be64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}
