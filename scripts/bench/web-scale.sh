#!/usr/bin/env bash
# The web-scale rehearsal (benches/README.md, "Web-scale rehearsal"): SHARDS small
# shards in a local S3 server (moto_server on 127.0.0.1) behind the latency stand-in
# (scripts/s3_proxy.py, DELAY_MS per request), planned once by the Ray driver and run by
# a Ray job of PARTS parts on a local cluster, beside one `trustflow run` process over
# the same corpus. Reports plan time, requests per shard, wall times and the peak memory
# of the driver and of a part, as one JSON.
#
#     source scripts/setup.sh
#     cargo build --release --locked --bin trustflow
#     bash scripts/bench/web-scale.sh [OUT_JSON]
#
# Environment: SHARDS (10000), ROWS_PER_SHARD (2), DELAY_MS (25), PARTS (8), and
# TRUSTFLOW_EXE (default: the release build). Everything it starts listens on
# 127.0.0.1 only and is stopped when it ends.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT_JSON="${1:-$ROOT/out/web-scale.json}"
SHARDS="${SHARDS:-10000}"
ROWS_PER_SHARD="${ROWS_PER_SHARD:-2}"
DELAY_MS="${DELAY_MS:-25}"
PARTS="${PARTS:-8}"
EXE="${TRUSTFLOW_EXE:-${CARGO_TARGET_DIR:-$HOME/.cache/trustflow/target}/release/trustflow}"
: "${TRUSTFLOW_MOTO_DIR:?source scripts/setup.sh first (it installs moto_server)}"
: "${TRUSTFLOW_RAY_DIR:?source scripts/setup.sh first (it installs Ray)}"
[ -x "$EXE" ] || { echo "web-scale: no binary at $EXE (cargo build --release)" >&2; exit 1; }

CORPUS="$HOME/.cache/trustflow/bench/web-$SHARDS"
if [ ! -d "$CORPUS" ]; then
    echo "web-scale: generating $SHARDS shards into $CORPUS" >&2
    "$EXE" bench gen --rows $((SHARDS * ROWS_PER_SHARD)) --shards "$SHARDS" --seed 2026 \
        --min-side 24 --max-side 32 --out "$CORPUS" >/dev/null
fi

WORK="$(mktemp -d)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
PYTHONPATH="$TRUSTFLOW_MOTO_DIR" python3 -m moto.server -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
PIDS=("$!")
cleanup() {
    PYTHONPATH="$TRUSTFLOW_RAY_DIR" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$TRUSTFLOW_RAY_DIR/bin/ray" stop --force >/dev/null 2>&1 || true
    kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"
}
trap cleanup EXIT
MOTO="http://127.0.0.1:$PORT"
python3 "$ROOT/scripts/s3_proxy.py" --upstream "$MOTO" --delay-ms "$DELAY_MS" \
    --stats-file "$WORK/proxy.json" >"$WORK/proxy.out" &
PIDS+=("$!")
for _ in $(seq 100); do grep -q listening "$WORK/proxy.out" 2>/dev/null && break; sleep 0.1; done
PROXY="$(sed -n 's/^listening //p' "$WORK/proxy.out")"

export AWS_ACCESS_KEY_ID=AKIABENCH AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
echo "web-scale: uploading $SHARDS shards" >&2
AWS_ENDPOINT_URL="$MOTO" PYTHONPATH="$TRUSTFLOW_MOTO_DIR" python3 "$ROOT/scripts/bench/upload_to_s3.py" web raw "$CORPUS"
export AWS_ENDPOINT_URL="$PROXY"
cat >"$WORK/p.yaml" <<YAML
source:
  paths: ["s3://web/raw/"]
stages:
  - type: decode
  - type: clean_caption
sink:
  path: s3://web/out-ray
YAML

measure() {  # measure NAME CMD...: wall seconds and peak RSS of CMD into $WORK/NAME.time
    local name="$1"; shift
    /usr/bin/time -f '{"wall_s": %e, "peak_rss_kb": %M}' -o "$WORK/$name.time" "$@"
}
echo "web-scale: planning (trustflow plan, $DELAY_MS ms per request)" >&2
measure plan "$EXE" plan "$WORK/p.yaml" >"$WORK/plan.json"

echo "web-scale: Ray job, $PARTS parts" >&2
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
measure ray env PYTHONPATH="$TRUSTFLOW_RAY_DIR:$ROOT/python" python3 -m trustflow_ray run "$WORK/p.yaml" \
    --binary "$EXE" --parts "$PARTS" --env AWS_ACCESS_KEY_ID --env AWS_SECRET_ACCESS_KEY \
    --report "$WORK/ray-report.json" --quiet

echo "web-scale: one process" >&2
measure single "$EXE" run --quiet "$WORK/p.yaml" --out s3://web/out-single \
    --report "$WORK/single-report.json"

mkdir -p "$(dirname "$OUT_JSON")"
python3 - "$WORK" "$OUT_JSON" "$SHARDS" "$DELAY_MS" "$PARTS" <<'PY'
import json, os, sys
work, out, shards, delay, parts = sys.argv[1:]
shards = int(shards)
load = lambda name: json.load(open(os.path.join(work, name)))
ray, single = load("ray-report.json"), load("single-report.json")
part_storage = [p.get("storage") or {} for p in ray.get("part_reports", [])]
part_requests = sum(s.get("requests", 0) for s in part_storage)
result = {
    "shards": shards, "delay_ms": int(delay), "parts": int(parts),
    "plan": dict(load("plan.time"), shards_planned=len(load("plan.json")["shards"])),
    "ray_job": dict(load("ray.time"), complete=ray.get("complete"),
                    rows_in=ray.get("rows_in"),
                    part_requests=part_requests,
                    part_requests_per_shard=part_requests / shards,
                    part_ranged_gets=sum(s.get("ranged_gets", 0) for s in part_storage),
                    part_lists=sum(s.get("lists", 0) for s in part_storage),
                    part_peak_rss_bytes=max((p.get("peak_rss_bytes") or 0)
                                            for p in ray.get("part_reports", [])) or None),
    "single_process": dict(load("single.time"), rows_in=single["rows_in"],
                           storage=single.get("storage"),
                           requests_per_shard=single["storage"]["requests"] / shards),
    "proxy": load("proxy.json") if os.path.exists(os.path.join(work, "proxy.json")) else None,
}
result["ray_over_single_wall"] = result["ray_job"]["wall_s"] / result["single_process"]["wall_s"]
json.dump(result, open(out, "w"), indent=2)
print(json.dumps(result, indent=2))
PY
