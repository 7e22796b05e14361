#!/usr/bin/env bash
# Enrichment then training (two steps) against one pass (benches/README.md, "One pass:
# enrichment feeding the trainer"), on the digits target: caption -> pseudo_label ->
# clip_score -> uncertainty, then one TRUST epoch, for seeds 0,1,2 side by side in one
# process. Three configurations, each one JSON in OUT_DIR:
#   default.json  the training file as it is (libtorch on 2 threads, shuffle buffer 1,024);
#   split.json    the trainer on one thread and a 128-row shuffle buffer (the corpus many
#                 times the buffer, as at web scale; each side about one core);
#   demo15.json   the demo's 15 epochs, the training file as it is.
#
#     source scripts/setup.sh
#     cargo build --release --locked --bin trustflow
#     bash scripts/bench/one-pass.sh [OUT_DIR]
#
# TRUSTFLOW_EXE overrides the binary (default: the release build). The shared
# preparation (digits data, text head, enriched source, weight calibration) goes to
# out/bench-one-pass and is not timed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT_DIR="${1:-$ROOT/out/bench-one-pass/results}"
EXE="${TRUSTFLOW_EXE:-${CARGO_TARGET_DIR:-$HOME/.cache/trustflow/target}/release/trustflow}"
[ -x "$EXE" ] || { echo "one-pass: no binary at $EXE (cargo build --release)" >&2; exit 1; }
cd "$ROOT"
mkdir -p "$OUT_DIR"
run() {
    local name="$1"; shift
    echo "one-pass: $name" >&2
    "$EXE" bench one-pass --data out/digits/data --work out/bench-one-pass \
        --seeds 0,1,2 "$@" >"$OUT_DIR/$name.json"
}
run default
run split --train-threads 1 --shuffle-buffer 128
run demo15 --epochs 15
python3 - "$OUT_DIR" <<'PY'
import json, sys
for name in ["default", "split", "demo15"]:
    r = json.load(open(f"{sys.argv[1]}/{name}.json"))
    print(f"{name:8} one pass / two steps {r['ratio']['mean']:.2f} +- {r['ratio']['std']:.2f}"
          f"  (perfect overlap on these cores: {r['overlap_bound']['mean']:.2f});"
          f"  enrich {r['enrich_s']['mean']:.1f} s, train {r['train_s']['mean']:.1f} s;"
          f"  accuracy {100*r['accuracy_two_step']['mean']:.1f} vs {100*r['accuracy_one_pass']['mean']:.1f} %")
PY
