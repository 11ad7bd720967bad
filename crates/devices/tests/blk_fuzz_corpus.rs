//! Replays the virtio-blk fuzz corpus on stable Rust, plus deterministic
//! byte-flip mutations of every seed, through the fuzz target's harness.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/blk_request");
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            (path.display().to_string(), std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    seeds
}

#[test]
fn corpus_replays_without_panics() {
    let seeds = corpus();
    assert!(seeds.len() >= 7, "corpus went missing");
    for (name, data) in &seeds {
        let accepted = harness::run(data);
        // Seeds named after a hostile case must be refused, the others taken.
        let expected = match name.rsplit('/').next().unwrap_or_default() {
            "loop" | "outside_memory" => 0,
            "flush_x3" => 3,
            _ => 1,
        };
        assert_eq!(accepted, expected, "{name}");
    }
}

#[test]
fn mutated_seeds_never_panic_the_parser() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (_, seed) in corpus() {
        for _ in 0..300 {
            let mut data = seed.clone();
            for _ in 0..1 + next() % 8 {
                // Mostly the descriptor table, rings and header.
                let at = (next() % 0x500) as usize % data.len();
                data[at] = next() as u8;
            }
            let _ = harness::run(&data);
        }
    }
}
