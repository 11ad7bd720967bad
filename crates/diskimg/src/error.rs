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
    /// A header or metadata field holds a value the format does not allow.
    #[error("{path}: {field}: {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
    /// Valid for the format, but a feature this implementation lacks.
    #[error("{path}: unsupported: {what}")]
    Unsupported { path: PathBuf, what: String },
    /// Metadata that contradicts itself (found while reading or writing).
    #[error("{path}: corrupt image: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: backing file {backing}: {problem}")]
    Backing {
        path: PathBuf,
        backing: PathBuf,
        problem: String,
    },
    /// A caller's argument (size, option) the operation cannot use.
    #[error("{0}")]
    Usage(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Wraps an I/O error with the file it happened on.
pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn invalid(path: &std::path::Path, field: &str, problem: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_path_buf(),
        field: field.to_string(),
        problem: problem.into(),
    }
}

pub(crate) fn corrupt(path: &std::path::Path, what: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        what: what.into(),
    }
}
