#!/usr/bin/env bash
# The cost of a change, side by side in one run: two trustflow binaries (built from
# the commits before and after it) run the same pipeline over the same corpus,
# alternating, REPS times each, each into a fresh output folder. Prints one JSON
# object with every run's wall time and rows/s, the medians and their ratio.
#
#     bash scripts/bench/binaries-ab.sh BEFORE_EXE AFTER_EXE PIPELINE CORPUS_DIR [REPS]
#
# CORPUS_DIR is made with `trustflow bench gen --rows 1500 --shards 4 --seed 2026`
# when absent.
set -euo pipefail
BEFORE="$1" AFTER="$2" PIPELINE="$3" CORPUS="$4" REPS="${5:-5}"
if [ ! -d "$CORPUS" ]; then
    "$AFTER" bench gen --rows 1500 --shards 4 --seed 2026 --out "$CORPUS" >/dev/null
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
runs=()
for rep in $(seq 1 "$REPS"); do
    for side in before after; do
        exe="$BEFORE"
        [ "$side" = after ] && exe="$AFTER"
        out="$WORK/$side-$rep"
        start=$(date +%s.%N)
        "$exe" run --quiet "$PIPELINE" --input "$CORPUS" --out "$out" --report "$WORK/$side-$rep.json" >/dev/null
        end=$(date +%s.%N)
        rows=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["rows_in"])' "$WORK/$side-$rep.json")
        runs+=("{\"side\":\"$side\",\"rep\":$rep,\"wall_s\":$(python3 -c "print(round($end-$start,3))"),\"rows\":$rows}")
    done
done
python3 - "$PIPELINE" "$CORPUS" "${runs[@]}" <<'PY'
import json, statistics, sys
pipeline, corpus, runs = sys.argv[1], sys.argv[2], [json.loads(r) for r in sys.argv[3:]]
for r in runs:
    r["rows_per_s"] = round(r["rows"] / r["wall_s"], 1)
med = {s: statistics.median(r["rows_per_s"] for r in runs if r["side"] == s) for s in ("before", "after")}
print(json.dumps({"pipeline": pipeline, "corpus": corpus, "runs": runs,
                  "median_rows_per_s": med,
                  "after_over_before": round(med["after"] / med["before"], 3)}, indent=1))
PY
