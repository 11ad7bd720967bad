#!/usr/bin/env bash
# The README's test command: set up, build everything, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The probe guest and the release binary are test inputs.
cargo build --release --workspace
# The probe with its virtio workloads is built on its own (see
# guest/probe/Cargo.toml); testkit::probe_kernel_virtio finds it here.
cargo build --release -p oxvirt-probe --features virtio \
    --target-dir "${CARGO_TARGET_DIR:-target}/probe-virtio"
cargo nextest run --workspace --no-fail-fast "$@"
