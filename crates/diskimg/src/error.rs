use std::path::PathBuf;

/// Errors from opening, reading or writing a disk image. Each variant names
/// the file and, where there is one, the field or offset at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: offset {offset} + length {len} is beyond the end of the {size}-byte image")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{path}: the image is read-only")]
    ReadOnly { path: PathBuf },
}

pub type Result<T> = std::result::Result<T, Error>;
