//! `pow`, `log2` and `log10` for the whole binary, from the `libm` crate
//! (a Rust port of musl's). They are the only libm functions `oxvirt`
//! calls, so with them defined here the linker (`--as-needed`) drops
//! glibc's libm.so.6: loading it made the dynamic linker run its IFUNC
//! resolvers and fault ~300 KiB of it in, resident in every process,
//! `oxvirt vmm` included, for the VM's whole life (docs/benchmarks.md).

#[no_mangle]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[no_mangle]
pub extern "C" fn log2(x: f64) -> f64 {
    libm::log2(x)
}

#[no_mangle]
pub extern "C" fn log10(x: f64) -> f64 {
    libm::log10(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_functions_agree_with_known_values() {
        assert_eq!(pow(2.0, 10.0), 1024.0);
        assert_eq!(pow(9.0, 0.5), 3.0);
        assert!(pow(-8.0, 0.5).is_nan());
        assert_eq!(log2(1024.0), 10.0);
        assert_eq!(log10(1e-3), -3.0);
        assert_eq!(log2(0.0), f64::NEG_INFINITY);
        assert!(log10(-1.0).is_nan());
    }
}
