#!/usr/bin/env bash
# Runs every check and test of the project, installing what they need first. This is the README's test command
# and what CI (.ci/run) runs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-test-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
cargo nextest run --workspace --locked --no-fail-fast "$@"
# The fuzz targets are their own workspace (docs/FUZZING.md): type-check them so they cannot rot.
CARGO_TARGET_DIR=target/fuzz-check cargo check --manifest-path fuzz/Cargo.toml --bins --quiet
.venv/bin/python scripts/test_helm_chart.py
