#!/usr/bin/env bash
# The test command of the README: builds every binary and runs every test
# (unit tests and the integration tests that start the real daemons).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo test --workspace
