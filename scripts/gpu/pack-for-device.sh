#!/usr/bin/env bash
# Packs a prebuilt trustflow binary and the GPU build of ONNX Runtime into a bundle for
# a machine that has a GPU but no cargo and no internet (docs/gpu.md): one xz-compressed
# tar, split into part folders small enough that each travels with the working tree in
# one call of a transfer limited to 64 MiB in all (scripts/gpu/unpack-on-device.sh puts
# them back together there).
#
#     bash scripts/gpu/pack-for-device.sh BINARY [--out DIR] [--ort-dir DIR]
#         [--part-mib N] [--threads N] [--level L] [--allow-large]
#
#   BINARY     the trustflow binary (stripped copy packed when `strip` is there)
#   --out      bundle folder (default .gpu-bundle in the repository root, git-ignored);
#              emptied first
#   --ort-dir  folder of libonnxruntime.so.1.31.1, libonnxruntime_providers_cuda.so and
#              libonnxruntime_providers_shared.so (default: the onnxruntime-gpu wheel that
#              `TRUSTFLOW_CUDA=1 source scripts/setup.sh` installs,
#              $TRUSTFLOW_CACHE/native-cuda/onnxruntime/capi)
#   --part-mib largest part in MiB (default: 64 MiB less what the working tree weighs,
#              tracked and untracked-not-ignored files and shared/, less 1 MiB, at most 60)
#   --threads  xz threads (default 0: one per core; 1 gives the smallest output)
#   --level    xz preset (default 9e). Measured on 2 busy cores with a binary built
#              with the trainer (882 MB to pack): 9e 287.1 MB in 15 min (5 parts),
#              0 336.5 MB in 1.7 min (6 parts)
#
# What goes in (under bin/, ort/, lib/): the binary, the three ONNX Runtime libraries,
# and, when the binary links libtorch (a build with the trainer), libtorch's CPU
# libraries it needs (libtorch_cpu.so, libc10.so, libgomp.so.1: about 440 MB
# uncompressed). A binary that links libtorch_cuda.so (built with TRUSTFLOW_CUDA=1) would
# need several GB of libtorch and is refused unless --allow-large. The CUDA runtime
# libraries are not packed: the device machine's Python packages provide them.
#
# Compression: xz -9e, because python3's lzma module can decompress it on any machine
# with Python (zstd is often missing there). Measured on libonnxruntime_providers_cuda.so
# (284,014,752 bytes, mostly CUDA kernels for six GPU architectures): xz -9e 185,391,248
# bytes (269 s, one thread), zstd -19 --long=27 185,588,642 (156 s): no real difference.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${TRUSTFLOW_CACHE:-$HOME/.cache/trustflow}"
BINARY=""
OUT="$ROOT/.gpu-bundle"
ORT_DIR="$CACHE/native-cuda/onnxruntime/capi"
PART_MIB=""
THREADS=0
LEVEL=9e
ALLOW_LARGE=false

usage() { sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --ort-dir) ORT_DIR="$2"; shift 2 ;;
        --part-mib) PART_MIB="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --level) LEVEL="$2"; shift 2 ;;
        --allow-large) ALLOW_LARGE=true; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "pack-for-device: unknown option $1" >&2; exit 2 ;;
        *) BINARY="$1"; shift ;;
    esac
done
[ -n "$BINARY" ] || { usage >&2; exit 2; }
[ -x "$BINARY" ] || { echo "pack-for-device: $BINARY is not an executable" >&2; exit 1; }
for f in libonnxruntime.so.1.31.1 libonnxruntime_providers_cuda.so libonnxruntime_providers_shared.so; do
    [ -f "$ORT_DIR/$f" ] || {
        echo "pack-for-device: $ORT_DIR/$f is missing (run: TRUSTFLOW_CUDA=1 source scripts/setup.sh)" >&2
        exit 1
    }
done
command -v xz >/dev/null || { echo "pack-for-device: xz is needed (apt-get install xz-utils)" >&2; exit 1; }

needed() { readelf -d "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
runpath() { readelf -d "$1" 2>/dev/null | sed -n 's/.*(R\(UN\)\{0,1\}PATH).*\[\(.*\)\]/\2/p' | head -1; }

# Bytes that travel with every call besides the part: tracked files, untracked files
# git does not ignore, and shared/ (docs of the device tool).
tree_bytes() {
    local total=0 size
    total="$(cd "$ROOT" && { git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -r stat -c %s -- 2>/dev/null || true; } | awk '{ s += $1 } END { print s + 0 }')"
    if [ -d "$ROOT/shared" ]; then
        size="$(du -sb "$ROOT/shared" | cut -f1)"
        total=$((total + size))
    fi
    echo "$total"
}

MIB=$((1024 * 1024))
TREE="$(tree_bytes)"
if [ -z "$PART_MIB" ]; then
    PART_BYTES=$((64 * MIB - TREE - MIB))
    if [ "$PART_BYTES" -gt $((60 * MIB)) ]; then PART_BYTES=$((60 * MIB)); fi
    if [ "$PART_BYTES" -lt $((8 * MIB)) ]; then
        echo "pack-for-device: the working tree ($TREE bytes) leaves too little room for parts" >&2
        exit 1
    fi
else
    PART_BYTES=$((PART_MIB * MIB))
    if [ "$PART_BYTES" -le 0 ]; then echo "pack-for-device: --part-mib must be at least 1" >&2; exit 2; fi
fi

rm -rf "$OUT"
STAGE="$OUT/.stage"
mkdir -p "$STAGE/bin" "$STAGE/ort"
if command -v strip >/dev/null; then
    strip -o "$STAGE/bin/trustflow" "$BINARY"
else
    cp "$BINARY" "$STAGE/bin/trustflow"
fi
chmod 755 "$STAGE/bin/trustflow"
for f in libonnxruntime.so.1.31.1 libonnxruntime_providers_cuda.so libonnxruntime_providers_shared.so; do
    cp "$ORT_DIR/$f" "$STAGE/ort/$f"
done

# libtorch libraries the binary needs (and theirs, from the same folder).
if needed "$BINARY" | grep -q '^libtorch_cuda'; then
    if [ "$ALLOW_LARGE" != true ]; then
        echo "pack-for-device: $BINARY links libtorch_cuda.so (a TRUSTFLOW_CUDA=1 build): its libtorch is several GB; pack a CPU-libtorch or trainer-less build, or pass --allow-large" >&2
        exit 1
    fi
fi
TORCH_LIB=""
if needed "$BINARY" | grep -q '^libtorch\|^libc10'; then
    for dir in $(runpath "$BINARY" | tr ':' ' ') "${LIBTORCH:-}/lib" "$CACHE/native/torch/lib"; do
        if [ -f "$dir/libtorch_cpu.so" ]; then TORCH_LIB="$dir"; break; fi
    done
    [ -n "$TORCH_LIB" ] || { echo "pack-for-device: the binary links libtorch but no libtorch_cpu.so was found (set LIBTORCH)" >&2; exit 1; }
    mkdir -p "$STAGE/lib"
    queue=("$BINARY")
    while [ "${#queue[@]}" -gt 0 ]; do
        item="${queue[0]}"
        queue=("${queue[@]:1}")
        for lib in $(needed "$item"); do
            if [ -f "$TORCH_LIB/$lib" ] && [ ! -f "$STAGE/lib/$lib" ]; then
                cp "$TORCH_LIB/$lib" "$STAGE/lib/$lib"
                queue+=("$TORCH_LIB/$lib")
            fi
        done
    done
fi

{
    echo "trustflow GPU bundle"
    echo "made: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    echo "binary: $BINARY ($("$STAGE/bin/trustflow" --version 2>/dev/null | head -1 || echo 'version unknown'))"
    echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "onnxruntime: $ORT_DIR"
    if [ -n "$TORCH_LIB" ]; then echo "libtorch: $TORCH_LIB"; fi
    echo "files:"
    (cd "$STAGE" && find . -type f -printf '%s %p\n' | sort -k2)
} >"$STAGE/BUNDLE.txt"

echo "pack-for-device: compressing $(du -sb "$STAGE" | cut -f1) bytes with xz -$LEVEL -T$THREADS" >&2
started=$(date +%s)
tar -C "$STAGE" -cf - . | xz -"$LEVEL" -T"$THREADS" -c >"$OUT/bundle.tar.xz"
echo "pack-for-device: $(stat -c %s "$OUT/bundle.tar.xz") bytes compressed in $(($(date +%s) - started)) s" >&2

# Parts: partNN/bundle.tar.xz.NN, each folder also holding the manifest.
(cd "$OUT" && split -b "$PART_BYTES" -d -a 2 bundle.tar.xz piece.)
count=$(find "$OUT" -maxdepth 1 -name 'piece.*' | wc -l)
whole_sha=$(sha256sum "$OUT/bundle.tar.xz" | cut -d' ' -f1)
manifest="$OUT/MANIFEST"
{
    echo "parts $count"
    echo "whole $whole_sha $(stat -c %s "$OUT/bundle.tar.xz")"
} >"$manifest"
for piece in "$OUT"/piece.*; do
    nn="${piece##*.}"
    echo "part $nn $(sha256sum "$piece" | cut -d' ' -f1) $(stat -c %s "$piece")" >>"$manifest"
done
for piece in "$OUT"/piece.*; do
    nn="${piece##*.}"
    mkdir -p "$OUT/part$nn"
    mv "$piece" "$OUT/part$nn/bundle.tar.xz.$nn"
    cp "$manifest" "$OUT/part$nn/MANIFEST"
done
cp "$STAGE/BUNDLE.txt" "$OUT/part00/BUNDLE.txt"
rm -rf "$STAGE" "$OUT/bundle.tar.xz"

rel="${OUT#"$ROOT"/}"
echo
echo "Bundle: $OUT ($count parts of at most $PART_BYTES bytes; the working tree weighs $TREE bytes)"
cat "$manifest"
echo
echo "Device calls, one per part, in order (each carries one part folder):"
for ((i = 0; i < count; i++)); do
    nn=$(printf '%02d' "$i")
    if [ "$i" -lt $((count - 1)) ]; then
        echo "  carry [\"$rel/part$nn\"]  command: bash scripts/gpu/unpack-on-device.sh --bundle $rel"
    else
        echo "  carry [\"$rel/part$nn\"]  command: bash scripts/gpu/unpack-on-device.sh --bundle $rel && . /tmp/tf-gpu/env.sh && bash scripts/gpu-check.sh --out \$OUT"
    fi
done
