//! Helpers shared by the diskimg integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// A small deterministic generator (xorshift64*), so failures replay.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Runs qemu-img; None (after a loud SKIP) when it is not installed.
pub fn qemu_img(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("qemu-img").args(args).output() {
        Ok(out) => Some(out),
        Err(_) => {
            eprintln!("SKIP: qemu-img is not installed (scripts/setup.sh installs qemu-utils)");
            None
        }
    }
}

/// `qemu-img check` must find the image clean: exit 0.
pub fn assert_qemu_clean(path: &Path) {
    let Some(out) = qemu_img(&["check", path.to_str().unwrap()]) else {
        return;
    };
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img check {}:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn qemu_ok(args: &[&str]) -> bool {
    match qemu_img(args) {
        Some(out) => {
            if !out.status.success() {
                eprintln!(
                    "qemu-img {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            out.status.success()
        }
        None => false,
    }
}
