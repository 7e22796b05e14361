#!/usr/bin/env bash
# The test command (README, and CI through .ci/run): native setup, formatting, lints,
# then every test. Works on a fresh machine of this kind: the setup script installs
# what the build needs, and the debug build takes about 5 minutes cold.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The engine-only binary (no trainer, no libtorch) must keep building: GPU scoring
# nodes and the cluster runner ship it.
cargo clippy -p trustflow --no-default-features --bin trustflow --locked -- -D warnings
cargo test --workspace --locked
# The wheel users install (scripts/build-wheel.sh; from the debug build here): the
# Python tests install it into a fresh virtualenv (python/tests/test_wheel.py).
TRUSTFLOW_WHEEL="$(bash scripts/build-wheel.sh --debug "$CARGO_TARGET_DIR/wheel")"
export TRUSTFLOW_WHEEL
# The Ray cluster runner (python/trustflow_ray, docs/ray.md) on local multi-node Ray
# clusters the tests start and stop, against the debug binary built above.
PYTHONPATH="$TRUSTFLOW_RAY_DIR:python" python3 -m unittest discover -s python/tests -v
