#!/usr/bin/env bash
# Object store vs local disk, side by side in one run: the same pipeline over the same
# corpus, once from local disk to local disk and once from a local S3 server
# (moto_server on 127.0.0.1, started and stopped here) to it, alternating, REPS times
# each. Writes one JSON with wall time, rows/s and the storage counters of every run
# (benches/README.md, "Object store vs local disk").
#
#     source scripts/setup.sh
#     cargo build --release --locked --bin trustflow
#     bash scripts/bench/s3-vs-local.sh [PIPELINE] [CORPUS_DIR] [OUT_JSON] [REPS]
#
# Defaults: pipelines/decode-only.yaml, ~/.cache/trustflow/bench/clip-1500 (made with
# `trustflow bench gen --rows 1500 --shards 4 --seed 2026` when absent),
# out/s3-vs-local.json, 3. The binary is $TRUSTFLOW_EXE or the release build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PIPELINE="${1:-$ROOT/pipelines/decode-only.yaml}"
CORPUS="${2:-$HOME/.cache/trustflow/bench/clip-1500}"
OUT_JSON="${3:-$ROOT/out/s3-vs-local.json}"
REPS="${4:-3}"
EXE="${TRUSTFLOW_EXE:-${CARGO_TARGET_DIR:-$HOME/.cache/trustflow/target}/release/trustflow}"
: "${TRUSTFLOW_MOTO_DIR:?source scripts/setup.sh first (it installs moto_server)}"
[ -x "$EXE" ] || { echo "s3-vs-local: no binary at $EXE (cargo build --release)" >&2; exit 1; }
if [ ! -d "$CORPUS" ]; then
    "$EXE" bench gen --rows 1500 --shards 4 --seed 2026 --out "$CORPUS" >/dev/null
fi

WORK="$(mktemp -d)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
PYTHONPATH="$TRUSTFLOW_MOTO_DIR" python3 -m moto.server -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null; wait $MOTO 2>/dev/null; rm -rf "$WORK"' EXIT

export AWS_ACCESS_KEY_ID=AKIABENCH AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT"
PYTHONPATH="$TRUSTFLOW_MOTO_DIR" python3 - "$CORPUS" <<'PY'
import glob, os, sys, time, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
for attempt in range(100):
    try:
        s3.create_bucket(Bucket="bench")
        break
    except Exception:
        time.sleep(0.2)
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.parquet"))):
    s3.upload_file(path, "bench", "corpus/" + os.path.basename(path))
PY

runs=()
for rep in $(seq 1 "$REPS"); do
    for where in local s3; do
        if [ "$where" = local ]; then
            input="$CORPUS"; out="$WORK/out-local-$rep"
        else
            input="s3://bench/corpus/"; out="s3://bench/out-$rep"
        fi
        "$EXE" run --quiet --force "$PIPELINE" --input "$input" --out "$out" \
            --report "$WORK/report-$where-$rep.json" >/dev/null
        runs+=("$WORK/report-$where-$rep.json")
        echo "s3-vs-local: $where repetition $rep done" >&2
    done
done

mkdir -p "$(dirname "$OUT_JSON")"
python3 - "$OUT_JSON" "$PIPELINE" "$CORPUS" "${runs[@]}" <<'PY'
import json, statistics, sys
out, pipeline, corpus, *reports = sys.argv[1:]
rows = []
for path in reports:
    r = json.load(open(path))
    rows.append({
        "where": "s3" if "-s3-" in path else "local",
        "wall_s": r["wall_s"], "rows_in": r["rows_in"], "rows_per_s": r["rows_per_s"],
        "cpu_utilisation": r.get("cpu_utilisation"), "peak_rss_bytes": r.get("peak_rss_bytes"),
        "bottleneck": r.get("bottleneck"), "storage": r.get("storage"),
    })
def median(where, key):
    return statistics.median(x[key] for x in rows if x["where"] == where)
summary = {
    "pipeline": pipeline, "corpus": corpus, "runs": rows,
    "median_rows_per_s": {w: median(w, "rows_per_s") for w in ("local", "s3")},
}
summary["s3_over_local"] = summary["median_rows_per_s"]["s3"] / summary["median_rows_per_s"]["local"]
json.dump(summary, open(out, "w"), indent=2)
print(json.dumps({k: summary[k] for k in ("median_rows_per_s", "s3_over_local")}, indent=2))
PY
