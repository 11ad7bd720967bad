//! Links the probe as a freestanding, statically placed ELF (see link.ld).
//! `-bins` keeps these flags off the host-side integration tests.

fn main() {
    let script = format!("{}/link.ld", env!("CARGO_MANIFEST_DIR"));
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,--no-dynamic-linker",
        &format!("-Wl,-T,{script}"),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=link.ld");
}
