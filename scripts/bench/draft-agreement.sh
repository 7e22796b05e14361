#!/usr/bin/env bash
# How far `jpeg_draft: true` moves the outputs from the exact path, on a corpus of real
# photos: the same clip_score + uncertainty pipeline runs twice over CORPUS_DIR, exact
# and with the draft decode, and the two outputs are compared row by row (by id):
# cosine of the image embeddings, |difference| of clip_similarity and of the weight
# pseudo_weight, over all rows and over the rows whose JPEG the draft shrank. Prints
# one JSON object.
#
#     bash scripts/bench/draft-agreement.sh TRUSTFLOW_EXE CORPUS_DIR [MODEL_DIR]
#
# MODEL_DIR: a CLIP export (default the tiny test CLIP). CORPUS_DIR is made with
# `trustflow bench gen --rows 1500 --shards 4 --seed 2026` when absent. Needs
# $TRUSTFLOW_PYLIBS (pyarrow; `source scripts/setup.sh`).
set -euo pipefail
EXE="$1" CORPUS="$2"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
MODEL="${3:-$ROOT/tests/fixtures/clip/model}"
if [ ! -d "$CORPUS" ]; then
    "$EXE" bench gen --rows 1500 --shards 4 --seed 2026 --out "$CORPUS" >/dev/null
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
for side in exact draft; do
    draft=false
    [ "$side" = draft ] && draft=true
    cat > "$WORK/$side.yaml" <<YAML
name: draft-agreement-$side
source:
  paths: ["$CORPUS"]
stages:
  - type: clip_score
    model: "$MODEL"
    workers: 2
    intra_op_threads: 1
    logit_scale: 100.0
    jpeg_draft: $draft
  - type: uncertainty
    group_size: 8
    temperature: 3.0
    logit_scale: 100.0
sink:
  path: out
  compression: snappy
runtime:
  batch_size: 32
YAML
    "$EXE" run --quiet "$WORK/$side.yaml" --out "$WORK/$side" >/dev/null
done
PYTHONPATH="${TRUSTFLOW_PYLIBS:-}" python3 - "$WORK/exact" "$WORK/draft" "$CORPUS" <<'PY'
import glob, json, math, struct, sys
import pyarrow.parquet as pq

def table(folder):
    rows = {}
    for path in sorted(glob.glob(folder + "/*.parquet")):
        if path.endswith(".quarantine.parquet"):
            continue
        t = pq.read_table(path, columns=["id", "image", "clip_similarity", "pseudo_weight",
                                         "clip_image_embedding"]).to_pylist()
        for r in t:
            rows[r["id"]] = r
    return rows

def jpeg_size(data):
    """(width, height) from a JPEG's SOF marker, or None for other formats."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    return None

def stats(values):
    if not values:
        return None
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(p * len(v)))]
    return {"n": len(v), "mean": sum(v) / len(v), "median": q(0.5), "p99": q(0.99),
            "min": v[0], "max": v[-1]}

exact, draft = table(sys.argv[1]), table(sys.argv[2])
shared = sorted(set(exact) & set(draft))
groups = {"all": [], "drafted": []}
for key in shared:
    a, b = exact[key], draft[key]
    cos = sum(x * y for x, y in zip(a["clip_image_embedding"], b["clip_image_embedding"]))
    row = (cos, abs(a["clip_similarity"] - b["clip_similarity"]),
           abs(a["pseudo_weight"] - b["pseudo_weight"]))
    groups["all"].append(row)
    size = jpeg_size(a["image"])
    # A JPEG whose embedding moved: the draft decoded it smaller.
    if size and a["clip_image_embedding"] != b["clip_image_embedding"]:
        groups["drafted"].append(row)
out = {"rows_exact": len(exact), "rows_draft": len(draft), "rows_compared": len(shared)}
for name, rows in groups.items():
    out[name] = {
        "rows": len(rows),
        "image_embedding_cosine": stats([r[0] for r in rows]),
        "clip_similarity_abs_diff": stats([r[1] for r in rows]),
        "pseudo_weight_abs_diff": stats([r[2] for r in rows]),
    }
print(json.dumps(out, indent=1))
PY
