use std::path::PathBuf;

/// The workspace root (the folder holding the top Cargo.toml).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root exists")
}

/// Cargo's target folder, honouring `CARGO_TARGET_DIR`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("target"),
    }
}

/// Where `scripts/fetch-*.sh` unpack peer programs and guest kernels.
pub fn peer_dir() -> PathBuf {
    workspace_root().join(".peer")
}

/// The probe guest ELF: `$OXVIRT_PROBE`, else the release build
/// (`cargo build --release` makes it; scripts/test.sh runs that first).
pub fn probe_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("OXVIRT_PROBE") {
        return PathBuf::from(path);
    }
    target_dir().join("release/oxvirt-probe")
}
