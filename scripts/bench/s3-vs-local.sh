#!/usr/bin/env bash
# Object store vs local disk, side by side in one run: each case (a pipeline over a
# corpus) runs from local disk to local disk, and from a local S3 server (moto_server
# on 127.0.0.1, started and stopped here) to it, directly and behind the latency
# stand-in scripts/s3_proxy.py at each DELAYS_MS value, alternating, REPS times each.
# Writes one JSON with wall time, rows/s and the storage counters of every run, and the
# median S3 / local ratio per case and delay (benches/README.md, "Object store vs local
# disk").
#
#     source scripts/setup.sh
#     cargo build --release --locked --bin trustflow
#     bash scripts/bench/s3-vs-local.sh [OUT_JSON]
#
# Environment: CASES, space-separated `PIPELINE=CORPUS_DIR` (default: decode-only and
# clip-tiny over ~/.cache/trustflow/bench/clip-1500, and decode-only over
# ~/.cache/trustflow/bench/small-500, 500 shards of 4 rows; corpora are made with
# `trustflow bench gen` when absent); DELAYS_MS (default "0 25"); REPS (default 3).
# The binary is $TRUSTFLOW_EXE or the release build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT_JSON="${1:-$ROOT/out/s3-vs-local.json}"
REPS="${REPS:-3}"
DELAYS_MS="${DELAYS_MS:-0 25}"
BENCH="$HOME/.cache/trustflow/bench"
CASES="${CASES:-$ROOT/pipelines/decode-only.yaml=$BENCH/clip-1500 $ROOT/benches/pipelines/clip-tiny.yaml=$BENCH/clip-1500 $ROOT/pipelines/decode-only.yaml=$BENCH/small-500}"
EXE="${TRUSTFLOW_EXE:-${CARGO_TARGET_DIR:-$HOME/.cache/trustflow/target}/release/trustflow}"
: "${TRUSTFLOW_MOTO_DIR:?source scripts/setup.sh first (it installs moto_server)}"
[ -x "$EXE" ] || { echo "s3-vs-local: no binary at $EXE (cargo build --release)" >&2; exit 1; }
[ -d "$BENCH/clip-1500" ] || "$EXE" bench gen --rows 1500 --shards 4 --seed 2026 --out "$BENCH/clip-1500" >/dev/null
[ -d "$BENCH/small-500" ] || "$EXE" bench gen --rows 2000 --shards 500 --seed 2026 --out "$BENCH/small-500" >/dev/null

WORK="$(mktemp -d)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
PYTHONPATH="$TRUSTFLOW_MOTO_DIR" python3 -m moto.server -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
PIDS=("$!")
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
MOTO="http://127.0.0.1:$PORT"
# One proxy per delay, started once (0: the server itself).
declare -A ENDPOINT
for delay in $DELAYS_MS; do
    if [ "$delay" = 0 ]; then ENDPOINT[$delay]="$MOTO"; continue; fi
    python3 "$ROOT/scripts/s3_proxy.py" --upstream "$MOTO" --delay-ms "$delay" >"$WORK/proxy-$delay.out" &
    PIDS+=("$!")
    for _ in $(seq 100); do grep -q listening "$WORK/proxy-$delay.out" 2>/dev/null && break; sleep 0.1; done
    ENDPOINT[$delay]="$(sed -n 's/^listening //p' "$WORK/proxy-$delay.out")"
done

export AWS_ACCESS_KEY_ID=AKIABENCH AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
# Upload each corpus once, straight to the server (boto3 ships with moto).
corpora=()
for case in $CASES; do corpora+=("${case#*=}"); done
AWS_ENDPOINT_URL="$MOTO" PYTHONPATH="$TRUSTFLOW_MOTO_DIR" python3 "$ROOT/scripts/bench/upload_to_s3.py" bench - "${corpora[@]}"

runs=()
n=0
for rep in $(seq 1 "$REPS"); do
    for case in $CASES; do
        pipeline="${case%%=*}"; corpus="${case#*=}"; name="$(basename "$corpus")"
        for where in local $DELAYS_MS; do
            n=$((n + 1))
            report="$WORK/report-$n.json"
            if [ "$where" = local ]; then
                input="$corpus"; out="$WORK/out-$n"; endpoint="$MOTO"
            else
                input="s3://bench/$name/"; out="s3://bench/out-$n"; endpoint="${ENDPOINT[$where]}"
            fi
            AWS_ENDPOINT_URL="$endpoint" "$EXE" run --quiet --force "$pipeline" --input "$input" \
                --out "$out" --report "$report" >/dev/null
            python3 - "$report" "$pipeline" "$corpus" "$where" <<'PY'
import json, sys
path, pipeline, corpus, where = sys.argv[1:]
r = json.load(open(path))
r["_case"] = {"pipeline": pipeline, "corpus": corpus, "where": where}
json.dump(r, open(path, "w"))
PY
            runs+=("$report")
            rm -rf "$WORK/out-$n"
            echo "s3-vs-local: $(basename "$pipeline") on $name, $where, repetition $rep: $(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['rows_per_s']))" "$report") rows/s" >&2
        done
    done
done

mkdir -p "$(dirname "$OUT_JSON")"
python3 - "$OUT_JSON" "${runs[@]}" <<'PY'
import json, statistics, sys
out, *reports = sys.argv[1:]
rows = []
for path in reports:
    r = json.load(open(path))
    rows.append(dict(r["_case"], wall_s=r["wall_s"], rows_in=r["rows_in"],
                     rows_per_s=r["rows_per_s"], cpu_utilisation=r.get("cpu_utilisation"),
                     peak_rss_bytes=r.get("peak_rss_bytes"), bottleneck=r.get("bottleneck"),
                     storage=r.get("storage")))
cases = []
for key in dict.fromkeys((x["pipeline"], x["corpus"]) for x in rows):
    mine = [x for x in rows if (x["pipeline"], x["corpus"]) == key]
    med = {w: statistics.median(x["rows_per_s"] for x in mine if x["where"] == w)
           for w in dict.fromkeys(x["where"] for x in mine)}
    cases.append({"pipeline": key[0], "corpus": key[1], "median_rows_per_s": med,
                  "s3_over_local": {f"{w} ms": med[w] / med["local"] for w in med if w != "local"}})
json.dump({"cases": cases, "runs": rows}, open(out, "w"), indent=2)
print(json.dumps(cases, indent=2))
PY
