//! Access log files, shared by path so several servers can write one file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
#[error("cannot open access log {path}: {source}")]
pub struct LogError {
    path: PathBuf,
    source: std::io::Error,
}

#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

impl LogFile {
    /// Appends one line; a failing log never stops the proxying.
    pub fn write_line(&self, line: &str) {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        if let Err(e) = file.write_all(&bytes) {
            tracing::warn!(path = %self.path.display(), "access log write failed: {e}");
        }
    }
}

/// Opens each distinct path once.
#[derive(Default)]
pub struct LogFiles {
    open: HashMap<PathBuf, Arc<LogFile>>,
}

impl LogFiles {
    pub fn get(&mut self, path: &Path) -> Result<Arc<LogFile>, LogError> {
        if let Some(f) = self.open.get(path) {
            return Ok(f.clone());
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| LogError {
                path: path.to_path_buf(),
                source,
            })?;
        let log = Arc::new(LogFile {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        });
        self.open.insert(path.to_path_buf(), log.clone());
        Ok(log)
    }
}
