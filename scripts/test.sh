#!/usr/bin/env bash
# The README's test command: set up, build everything, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The probe guest and the release binary are test inputs.
cargo build --release --workspace
cargo nextest run --workspace --no-fail-fast "$@"
