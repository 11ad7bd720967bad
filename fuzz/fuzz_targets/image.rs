//! Header and metadata parsers of every format: arbitrary bytes as an image.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    diskimg::fuzzing::exercise(data);
});
