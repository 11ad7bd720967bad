//! Replays the cargo-fuzz corpus (fuzz/corpus/image) through the fuzz
//! target's entry point, plus deterministic byte mutations of each seed:
//! no input may panic.

mod common;

use common::Rng;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/image");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn corpus_replays_without_panic() {
    let seeds = corpus();
    assert!(seeds.len() >= 5, "corpus too small");
    for (name, data) in &seeds {
        eprintln!("seed {name}");
        diskimg::fuzzing::exercise(data);
    }
}

#[test]
fn heavy_mutated_seeds_never_panic() {
    let mut rng = Rng(0xf022);
    for (name, data) in corpus() {
        if data.len() > 32 << 10 {
            continue;
        }
        eprintln!("mutating {name}");
        // Every header byte set to a few hostile values, then random flips.
        for at in 0..data.len().min(256) {
            for v in [0x00, 0xff, data[at] ^ 0x80] {
                let mut m = data.clone();
                m[at] = v;
                diskimg::fuzzing::exercise(&m);
            }
        }
        for _ in 0..200 {
            let mut m = data.clone();
            for _ in 0..4 {
                let at = rng.below(m.len() as u64) as usize;
                m[at] = rng.next_u64() as u8;
            }
            diskimg::fuzzing::exercise(&m);
        }
        for len in [0, 1, 72, 104, 511, data.len() / 2] {
            diskimg::fuzzing::exercise(&data[..len.min(data.len())]);
        }
    }
}
