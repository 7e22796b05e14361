#!/usr/bin/env bash
# Regenerates the small sample corpora under pipelines/samples/ that the example
# pipelines read (so `trustflow validate pipelines/*.yaml` and `run` work from a clean
# checkout). Deterministic: the same seed gives byte-identical shards.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --quiet
tf="$CARGO_TARGET_DIR/debug/trustflow"
common=(--rows 24 --min-side 48 --max-side 96 --corrupt-rate 0.1 --missing-caption-rate 0.1)
rm -rf pipelines/samples
"$tf" bench gen "${common[@]}" --shards 2 --seed 11 --layout bytes --out pipelines/samples/bytes >/dev/null
"$tf" bench gen "${common[@]}" --shards 1 --seed 12 --layout hf --out pipelines/samples/hf >/dev/null
"$tf" bench gen "${common[@]}" --shards 1 --seed 13 --layout path --out pipelines/samples/paths >/dev/null
"$tf" bench gen "${common[@]}" --shards 1 --seed 14 --layout img2dataset --out pipelines/samples/img2dataset >/dev/null
# Enriched training shards for pipelines/train/*.yaml.
"$tf" bench gen-train --rows-source 96 --rows-target 96 --rows-eval 48 --shards 2 --bad-image-rate 0.05 --seed 3 --out pipelines/samples/train >/dev/null
# The generator records its wall time; drop it so the committed files never change.
for f in pipelines/samples/*/_gen.json; do rm -f "$f"; done
du -sh pipelines/samples
