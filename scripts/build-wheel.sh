#!/usr/bin/env bash
# Builds dist/trustflow-<version>-py3-none-<platform>.whl: the engine binary without
# libtorch (`cargo build --no-default-features`), stripped, inside the Python package
# `trustflow`, with the cluster runner `trustflow_ray` (scripts/wheel/build_wheel.py).
# `pip install` of the wheel gives the `trustflow` and `trustflow-ray` commands in any
# virtualenv; ONNX Runtime comes from the pinned `onnxruntime` wheel it depends on.
#
#     source scripts/setup.sh              # the Rust toolchain's set-up, nasm, auditwheel
#     bash scripts/build-wheel.sh [--debug] [OUT_DIR]     # OUT_DIR: dist/
#
# --debug packs the debug build (what CI tests, minutes instead of a release build).
# The platform tag is the one `auditwheel show` finds the binary consistent with.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE=release
if [ "${1:-}" = "--debug" ]; then PROFILE=debug; shift; fi
OUT="${1:-$ROOT/dist}"
: "${CARGO_TARGET_DIR:?source scripts/setup.sh first}"
: "${TRUSTFLOW_WHEELTOOLS:?source scripts/setup.sh first (it installs auditwheel)}"
cd "$ROOT"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)"
flags=(--locked --bin trustflow)
[ "$PROFILE" = release ] && flags+=(--release)

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
cargo build "${flags[@]}" --no-default-features
cp "$CARGO_TARGET_DIR/$PROFILE/trustflow" "$STAGE/trustflow"
strip "$STAGE/trustflow"
# The engine-only build replaced target/$PROFILE/trustflow: put the full binary back
# (cargo only links it again; nothing is recompiled).
cargo build "${flags[@]}"

auditwheel() { PYTHONPATH="$TRUSTFLOW_WHEELTOOLS" python3 -m auditwheel "$@"; }
provisional="$(python3 scripts/wheel/build_wheel.py --binary "$STAGE/trustflow" \
    --version "$VERSION" --out "$STAGE/provisional")"
shown="$(auditwheel show "$provisional")"
TAG="$(grep -o 'manylinux_[0-9]*_[0-9]*_x86_64' <<<"$shown" | head -1 || true)"
if [ -z "$TAG" ]; then
    echo "build-wheel: auditwheel found no manylinux tag for the binary:" >&2
    echo "$shown" >&2
    exit 1
fi
mkdir -p "$OUT"
rm -f "$OUT"/trustflow-"$VERSION"-*.whl
wheel="$(python3 scripts/wheel/build_wheel.py --binary "$STAGE/trustflow" \
    --version "$VERSION" --platform "$TAG" --out "$OUT")"
echo "build-wheel: $wheel ($(du -h "$wheel" | cut -f1), $PROFILE build, tag $TAG)" >&2
echo "$wheel"
