#!/usr/bin/env bash
# The main job (README): native setup, build, and `trustflow demo`, which generates a
# corpus with bad rows, runs pipelines/demo.yaml over it with live progress, and
# prints what came out. Extra arguments go to `trustflow demo` (e.g. --rows 5000).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --locked --quiet
exec "$CARGO_TARGET_DIR/debug/trustflow" demo "$@"
