#!/usr/bin/env bash
# The device side of scripts/gpu/pack-for-device.sh: run once per call, each call
# carrying one part folder of the bundle. It copies the parts it finds into
# DEST/parts (outside the repository copy, so they outlast the call while the machine
# stays up), and once every part is there, checks them, joins them and unpacks the
# bundle into DEST, writing DEST/env.sh with the variables scripts/gpu-check.sh reads
# (TRUSTFLOW_BIN, TRUSTFLOW_ORT_GPU_DIR, TRUSTFLOW_LIB_DIR).
#
#     bash scripts/gpu/unpack-on-device.sh [--bundle .gpu-bundle] [--dest /tmp/tf-gpu]
#
# Exit code: 0 when the bundle is unpacked (now or before) or when this call's part was
# taken and others are still to come (it names them); 3 when this call carried no part
# and parts are missing; 1 on a damaged part. Needs only bash, coreutils, tar and
# either xz or python3 (its lzma module), as on a stock Ubuntu with Python.

set -euo pipefail

BUNDLE=".gpu-bundle"
DEST="/tmp/tf-gpu"
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE="$2"; shift 2 ;;
        --dest) DEST="$2"; shift 2 ;;
        -h | --help) sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unpack-on-device: unknown argument $1" >&2; exit 2 ;;
    esac
done

sha256() {
    if command -v sha256sum >/dev/null; then
        sha256sum "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib, sys; h = hashlib.sha256(); f = open(sys.argv[1], "rb")
for b in iter(lambda: f.read(1 << 20), b""): h.update(b)
print(h.hexdigest())' "$1"
    fi
}

mkdir -p "$DEST/parts"
if [ -f "$DEST/env.sh" ] && [ -x "$DEST/bin/trustflow" ]; then
    echo "unpack-on-device: already unpacked in $DEST"
    cat "$DEST/env.sh"
    exit 0
fi

# Take in the parts this call carried.
took=0
for dir in "$BUNDLE"/part[0-9][0-9]; do
    [ -d "$dir" ] || continue
    cp "$dir"/MANIFEST "$DEST/parts/MANIFEST"
    if [ -f "$dir/BUNDLE.txt" ]; then cp "$dir/BUNDLE.txt" "$DEST/parts/BUNDLE.txt"; fi
    for piece in "$dir"/bundle.tar.xz.[0-9][0-9]; do
        [ -f "$piece" ] || continue
        nn="${piece##*.}"
        want="$(awk -v n="$nn" '$1 == "part" && $2 == n { print $3 }' "$dir/MANIFEST")"
        have="$(sha256 "$piece")"
        if [ "$want" != "$have" ]; then
            echo "unpack-on-device: $piece is damaged (sha256 $have, expected $want)" >&2
            exit 1
        fi
        cp "$piece" "$DEST/parts/"
        took=$((took + 1))
        echo "unpack-on-device: took part $nn ($(stat -c %s "$piece") bytes)"
    done
done

if [ ! -f "$DEST/parts/MANIFEST" ]; then
    echo "unpack-on-device: no part found under $BUNDLE (carry one part folder per call)" >&2
    exit 3
fi
count="$(awk '$1 == "parts" { print $2 }' "$DEST/parts/MANIFEST")"
missing=()
for ((i = 0; i < count; i++)); do
    nn="$(printf '%02d' "$i")"
    [ -f "$DEST/parts/bundle.tar.xz.$nn" ] || missing+=("part$nn")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "unpack-on-device: have $((count - ${#missing[@]})) of $count parts; still to carry: ${missing[*]}"
    if [ "$took" -gt 0 ]; then exit 0; fi
    exit 3
fi

started=$(date +%s)
cat "$DEST"/parts/bundle.tar.xz.[0-9][0-9] >"$DEST/bundle.tar.xz"
want="$(awk '$1 == "whole" { print $2 }' "$DEST/parts/MANIFEST")"
have="$(sha256 "$DEST/bundle.tar.xz")"
if [ "$want" != "$have" ]; then
    echo "unpack-on-device: the joined bundle is damaged (sha256 $have, expected $want)" >&2
    exit 1
fi
if command -v xz >/dev/null; then
    xz -dc "$DEST/bundle.tar.xz" | tar -x -C "$DEST" -f -
else
    python3 - "$DEST/bundle.tar.xz" "$DEST" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as tar:
    try:
        tar.extractall(sys.argv[2], filter="data")
    except TypeError:  # Python without extraction filters
        tar.extractall(sys.argv[2])
EOF
fi
rm -f "$DEST/bundle.tar.xz"
chmod 755 "$DEST/bin/trustflow"
{
    echo "export TRUSTFLOW_BIN=$DEST/bin/trustflow"
    echo "export TRUSTFLOW_ORT_GPU_DIR=$DEST/ort"
    if [ -d "$DEST/lib" ]; then echo "export TRUSTFLOW_LIB_DIR=$DEST/lib"; fi
} >"$DEST/env.sh"
echo "unpack-on-device: unpacked $count parts into $DEST in $(($(date +%s) - started)) s"
head -8 "$DEST/BUNDLE.txt" 2>/dev/null || true
cat "$DEST/env.sh"
