#!/usr/bin/env bash
# Decode-bound benchmark (issue: foundation): generate a corpus with `bench gen` and run
# pipelines/decode-only.yaml over it with the release binary, then print the figures
# from the JSON report. Usage: scripts/bench-decode.sh [ROWS] [SHARDS]
# The corpus is cached under ~/.cache/trustflow/bench (deterministic for its seed).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
rows="${1:-20000}"
shards="${2:-16}"
cargo build --release --locked --quiet --bin trustflow
tf="$CARGO_TARGET_DIR/release/trustflow"
corpus="$TRUSTFLOW_CACHE/bench/corpus-$rows-$shards"
out="$TRUSTFLOW_CACHE/bench/out-decode-$rows-$shards"
if [ ! -f "$corpus/_gen.json" ]; then
    echo "generating $rows rows in $shards shards into $corpus" >&2
    "$tf" bench gen --rows "$rows" --shards "$shards" --seed 2026 --out "$corpus" >/dev/null
fi
rm -rf "$out"
"$tf" run --quiet --force pipelines/decode-only.yaml --input "$corpus" --out "$out" >/dev/null
python3 - "$out/_report.json" "$corpus/_gen.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); g = json.load(open(sys.argv[2]))
mib = lambda b: f"{b / 2**20:.1f} MiB" if b is not None else "n/a"
print(f"corpus: {r['rows_in']} rows, {len(r['shards'])} shards, "
      f"{g['summary']['bytes_written'] / 2**20:.0f} MiB on disk")
print(f"wall {r['wall_s']:.2f} s, {r['rows_per_s']:.0f} rows/s end to end, "
      f"CPU {r['cpu_seconds']:.1f} s ({r['cpu_utilisation']:.2f} cores), peak RSS {mib(r['peak_rss_bytes'])}")
print(f"rows out {r['rows_out']}, quarantined {r['rows_quarantined']}, invariant "
      f"{'holds' if r['invariant_holds'] else 'BROKEN'}; peak in flight "
      f"{r['peak_rows_in_flight']} rows / {mib(r['peak_bytes_in_flight'])}; bottleneck {r['bottleneck']}")
print(f"{'step':<10} {'workers':>7} {'rows':>8} {'rows/s':>8} {'busy':>6} {'blocked':>8} {'starved':>8} {'queue':>6}")
for s in r['steps']:
    print(f"{s['name']:<10} {s['workers']:>7} {s['rows_out']:>8} {s['rows_per_s']:>8.0f} "
          f"{s['busy_fraction']:>6.0%} {s['blocked_fraction']:>8.0%} {s['starved_fraction']:>8.0%} "
          f"{s['queue_fill_mean']:>6.0%}")
PY
echo "report: $out/_report.json"
