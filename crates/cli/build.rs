//! Link settings for the `oxvirt` binary.

fn main() {
    // Packed relative relocations (DT_RELR; glibc 2.36, binutils 2.38): at
    // every start ld.so then reads a few KiB of relocations instead of
    // ~600 KiB of RELA entries, pages that `oxvirt vmm` would otherwise keep
    // resident for its VM's whole life (docs/benchmarks.md, VMM memory).
    println!("cargo:rustc-link-arg-bin=oxvirt=-Wl,-z,pack-relative-relocs");
}
