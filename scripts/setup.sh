#!/usr/bin/env bash
# Idempotent native setup: ONNX Runtime and libtorch from their PyPI wheels (see
# ../shared/SETUP.md), plus the small Python bits the tests use (pyarrow to read our
# output back, scikit-learn for the two photos it ships). Everything goes into one
# cache folder; nothing outside it is touched. Source it to get the exports:
#     source scripts/setup.sh
# A second run finds the stamp file and does nothing. It is meant to be sourced, so it
# changes no shell options (no `set -e`): each step checks its own errors.

TRUSTFLOW_CACHE="${TRUSTFLOW_CACHE:-$HOME/.cache/trustflow}"
_TF_NATIVE="$TRUSTFLOW_CACHE/native"
_TF_PYLIBS="$TRUSTFLOW_CACHE/pylibs"
_TF_STAMP_VERSION="1"

_tf_setup_native() {
    local stamp="$_TF_NATIVE/.trustflow-setup-$_TF_STAMP_VERSION"
    [ -f "$stamp" ] && return 0
    echo "trustflow setup: installing libtorch 2.13.0 and onnxruntime 1.31.1 into $_TF_NATIVE" >&2
    mkdir -p "$_TF_NATIVE" || return 1
    python3 -m pip install --quiet --no-deps --upgrade --target "$_TF_NATIVE" \
        torch==2.13.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 onnxruntime==1.31.1 \
        || { echo "trustflow setup: pip install of the native libraries failed" >&2; return 1; }
    # The wheel is a CUDA build; the CPU engine needs none of these (-550 MB).
    local lib="$_TF_NATIVE/torch/lib"
    rm -f "$lib"/libtorch_cuda*.so "$lib"/libc10_cuda.so "$lib"/libtorch_python.so \
        "$lib"/libtorch_nvshmem.so "$lib"/libcaffe2_nvrtc.so
    echo "2.13.0" > "$_TF_NATIVE/torch/build-version" || return 1
    touch "$stamp"
}

_tf_setup_pylibs() {
    local stamp="$_TF_PYLIBS/.trustflow-setup-$_TF_STAMP_VERSION"
    [ -f "$stamp" ] && return 0
    echo "trustflow setup: installing pyarrow and scikit-learn data into $_TF_PYLIBS" >&2
    mkdir -p "$_TF_PYLIBS" || return 1
    python3 -m pip install --quiet --no-deps --upgrade --target "$_TF_PYLIBS" \
        pyarrow==26.0.1 scikit-learn==1.9.1 \
        || { echo "trustflow setup: pip install of pyarrow/scikit-learn failed" >&2; return 1; }
    touch "$stamp"
}

if ! _tf_setup_native || ! _tf_setup_pylibs; then
    echo "trustflow setup: failed (see above)" >&2
    return 1 2>/dev/null || exit 1
fi

export LIBTORCH="$_TF_NATIVE/torch"
export ORT_DYLIB_PATH="$_TF_NATIVE/onnxruntime/capi/libonnxruntime.so.1.31.1"
export TRUSTFLOW_PYLIBS="$_TF_PYLIBS"
export TRUSTFLOW_PHOTOS_DIR="$_TF_PYLIBS/sklearn/datasets/images"
# One target dir outside the clone so CI reuses what earlier builds compiled here.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TRUSTFLOW_CACHE/target}"
