//! Reading and writing cgroup interface files, with errors naming the file.

use std::path::Path;

use super::CgroupError;

/// v1 reports "no limit" as a huge page-rounded number; anything this large is
/// treated as unlimited.
const V1_UNLIMITED_FLOOR: u64 = 1 << 62;

pub fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

pub fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    tracing::debug!(path = %path.display(), value, "cgroup write");
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

pub fn parse_error(path: &Path, reason: impl Into<String>) -> CgroupError {
    CgroupError::Parse {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

pub fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = read(path)?;
    text.trim()
        .parse()
        .map_err(|_| parse_error(path, format!("{:?} is not a number", text.trim())))
}

/// A limit: `max` (v2), `-1` or a huge number (v1) mean none.
pub fn read_limit(path: &Path) -> Result<Option<u64>, CgroupError> {
    let text = read(path)?;
    parse_limit(text.trim())
        .ok_or_else(|| parse_error(path, format!("{:?} is not a limit", text.trim())))
}

pub fn parse_limit(value: &str) -> Option<Option<u64>> {
    match value {
        "max" | "-1" => Some(None),
        n => n
            .parse::<u64>()
            .ok()
            .map(|n| (n < V1_UNLIMITED_FLOOR).then_some(n)),
    }
}

/// `key value` lines (`cpu.stat`, `memory.events`, `memory.oom_control`).
pub fn read_keyed(path: &Path, key: &str) -> Result<Option<u64>, CgroupError> {
    let text = read(path)?;
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(' ') {
            if k == key {
                return v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| parse_error(path, format!("{key} has value {v:?}")));
            }
        }
    }
    Ok(None)
}

/// The task ids listed in `tasks`, `cgroup.threads` or `cgroup.procs`.
pub fn read_ids(path: &Path) -> Result<Vec<u32>, CgroupError> {
    let text = read(path)?;
    text.lines()
        .map(|l| {
            l.trim()
                .parse()
                .map_err(|_| parse_error(path, format!("{l:?} is not a task id")))
        })
        .collect()
}

pub fn mkdir(path: &Path) -> Result<bool, CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(CgroupError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes an empty cgroup folder; a missing one counts as removed.
pub fn rmdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CgroupError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}
