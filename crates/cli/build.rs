//! Link settings for the `oxvirt` binary.

use std::path::Path;
use std::{env, fs};

fn main() {
    // Packed relative relocations (DT_RELR; glibc 2.36, binutils 2.38): at
    // every start ld.so then reads a few KiB of relocations instead of
    // ~600 KiB of RELA entries, pages that `oxvirt vmm` would otherwise keep
    // resident for its VM's whole life (docs/benchmarks.md, VMM memory).
    println!("cargo:rustc-link-arg-bin=oxvirt=-Wl,-z,pack-relative-relocs");
    // Release builds only: the order comes from release code, and the
    // linker spends ~3 s matching its patterns.
    if env::var("PROFILE").as_deref() == Ok("release") {
        vmm_text_first();
    }
}

/// Links the functions `oxvirt vmm` runs (vmm-text.order, written by
/// scripts/vmm-text-order.sh) together at the start of the text. The kernel
/// maps a binary's code in 64 KiB fault-around windows, so the ~330 KiB a
/// VMM runs, spread over the 10 MB of code of every tool, kept ~2.6 MiB of
/// it resident in each VMM process; packed, ~0.5 MiB (docs/benchmarks.md,
/// session 5). Every function has its own section, `.text.<symbol>` or
/// `.text.unlikely.<symbol>` for cold ones, so a linker script picks them by
/// name; the other sections then join the same `.text` after them. A
/// pattern that matches nothing (code that changed) only leaves that
/// function where it was.
fn vmm_text_first() {
    let order = Path::new("vmm-text.order");
    println!("cargo:rerun-if-changed={}", order.display());
    let patterns = fs::read_to_string(order).expect("crates/cli/vmm-text.order is readable");
    let mut script = String::from("SECTIONS\n{\n  .text : {\n");
    for pattern in patterns
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        script.push_str(&format!(
            "    *(.text.{pattern} .text.unlikely.{pattern})\n"
        ));
    }
    script.push_str("  }\n}\nINSERT BEFORE .init;\n");
    let path = Path::new(&env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("vmm-text.ld");
    fs::write(&path, script).expect("OUT_DIR is writable");
    println!("cargo:rustc-link-arg-bin=oxvirt=-Wl,-T,{}", path.display());
}
