#!/usr/bin/env bash
# Idempotent native setup: ONNX Runtime and libtorch from their PyPI wheels (see
# ../shared/SETUP.md), plus the small Python bits the tests use (pyarrow to read our
# output back, scikit-learn for the two photos it ships). Everything goes into one
# cache folder; nothing outside it is touched. Source it to get the exports:
#     source scripts/setup.sh
# A second run finds the stamp file and does nothing.
set -euo pipefail 2>/dev/null || true

TRUSTFLOW_CACHE="${TRUSTFLOW_CACHE:-$HOME/.cache/trustflow}"
NATIVE="$TRUSTFLOW_CACHE/native"
PYLIBS="$TRUSTFLOW_CACHE/pylibs"
STAMP_VERSION="1"

_tf_setup_native() {
    local stamp="$NATIVE/.trustflow-setup-$STAMP_VERSION"
    [ -f "$stamp" ] && return 0
    echo "trustflow setup: installing libtorch 2.13.0 and onnxruntime 1.31.1 into $NATIVE" >&2
    mkdir -p "$NATIVE"
    python3 -m pip install --quiet --no-deps --upgrade --target "$NATIVE" \
        torch==2.13.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 onnxruntime==1.31.1
    # The wheel is a CUDA build; the CPU engine needs none of these (-550 MB).
    local lib="$NATIVE/torch/lib"
    rm -f "$lib"/libtorch_cuda*.so "$lib"/libc10_cuda.so "$lib"/libtorch_python.so \
        "$lib"/libtorch_nvshmem.so "$lib"/libcaffe2_nvrtc.so
    echo "2.13.0" > "$NATIVE/torch/build-version"
    touch "$stamp"
}

_tf_setup_pylibs() {
    local stamp="$PYLIBS/.trustflow-setup-$STAMP_VERSION"
    [ -f "$stamp" ] && return 0
    echo "trustflow setup: installing pyarrow and scikit-learn data into $PYLIBS" >&2
    mkdir -p "$PYLIBS"
    python3 -m pip install --quiet --no-deps --upgrade --target "$PYLIBS" \
        pyarrow==26.0.1 scikit-learn==1.9.1
    touch "$stamp"
}

_tf_setup_native
_tf_setup_pylibs

export LIBTORCH="$NATIVE/torch"
export LIBTORCH_BYPASS_VERSION_CHECK="${LIBTORCH_BYPASS_VERSION_CHECK:-0}"
export ORT_DYLIB_PATH="$NATIVE/onnxruntime/capi/libonnxruntime.so.1.31.1"
export TRUSTFLOW_PYLIBS="$PYLIBS"
export TRUSTFLOW_PHOTOS_DIR="$PYLIBS/sklearn/datasets/images"
# One target dir outside the clone so CI reuses what earlier builds compiled here.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TRUSTFLOW_CACHE/target}"
