#!/usr/bin/env bash
# The GPU checks, as one prepared script that always ends with one JSON summary
# (docs/gpu.md). Each check is independent: one that fails records its error and the
# script goes on; the summary is written even when the script is interrupted.
#
#     bash scripts/gpu-check.sh [--out DIR] [--work DIR] [--vit-rows N] [--skip CHECK]...
#         [--deadline-s S]
#
# Two modes:
#   repo:   a CUDA machine with this repository, cargo and PyPI: sources scripts/setup.sh
#           with TRUSTFLOW_CUDA=1 (libtorch and ONNX Runtime with CUDA) and builds
#           `cargo build --release --locked --bin trustflow`.
#   bundle: a machine without cargo or internet, from a prebuilt bundle
#           (scripts/gpu/pack-for-device.sh, scripts/gpu/unpack-on-device.sh): chosen
#           when TRUSTFLOW_BIN is set.
#             TRUSTFLOW_BIN          the prebuilt trustflow binary
#             TRUSTFLOW_ORT_GPU_DIR  folder with libonnxruntime.so.1.31.1,
#                                    libonnxruntime_providers_cuda.so and
#                                    libonnxruntime_providers_shared.so (onnxruntime-gpu)
#             TRUSTFLOW_LIB_DIR      optional: more libraries the binary needs (libtorch's
#                                    CPU libraries for a binary built with the trainer);
#                                    default: BIN/../lib when it exists
#           The CUDA libraries (cuBLAS, cuDNN, ...) come from the machine's Python
#           packages: every site-packages/nvidia/*/lib goes on LD_LIBRARY_PATH.
#
# Checks (names for --skip), in order; each is one entry of the summary with its status
# (pass, fail or skip), wall time, numbers and, when it did not pass, the reason:
#   environment   the binary starts and finds its libraries; mode, paths, versions
#   nvidia_smi    GPU name, driver, memory, compute capability (skipped without it)
#   cuda_libs     every library ONNX Runtime's CUDA provider needs resolves (ldd)
#   corpus        two 256-row `bench gen` corpora (one with 90% missing captions)
#   parity_clip_score, parity_pseudo_label, parity_caption
#                 the pipelines scripts/gpu/parity-*.yaml with the committed tiny models,
#                 once with `execution_provider: cpu`, once with `cuda` and
#                 `fallback: none` (no silent CPU run), compared by
#                 scripts/gpu/compare_outputs.py (atol 1e-3; argmax flips only on
#                 near-ties; share of identical greedy captions)
#   trainer       one TRUST training step on CPU and on CUDA
#                 (scripts/gpu/train-one-step.yaml), losses compared; skipped when the
#                 binary has no `train` command or its libtorch has no CUDA
#   clip_vitb32   throughput: the ViT-B/32-shaped CLIP (scripts/bench/make_clip_vitb32.py,
#                 needs a Python with torch and transformers) over a --vit-rows corpus
#                 (default 20000) on CUDA, workers = nproc; rows/s from _report.json
#   clip_vitb32_ceiling  `trustflow bench ceiling` on the same pipeline and corpus: the
#                 models alone on pre-made inputs vs the whole pipeline (one repetition)
#   clip_vitb32_fast  the clip_vitb32 run again with `tf32: true` and `jpeg_draft: true`:
#                 the fastest configuration (approximate: TF32 products, JPEGs decoded at
#                 reduced scale), for the 2,500 images/s goal, which float32 and the
#                 CPU-bound exact decode missed
#
# --deadline-s S (default 540, 0 for none) bounds the whole run, so that it ends with its
# summary inside a caller's time limit: every command's timeout is cut to the time left,
# and a check that would start with less than 20 s left is skipped with that reason.
#
# Output: DIR/gpu-check.json (the summary) and DIR/gpu-check.log (every command's
# output), nothing else, so that DIR can be a small results folder. Corpora, models and
# pipeline outputs go to --work (default ${TMPDIR:-/tmp}/trustflow-gpu-check); the
# ViT-B/32 model and its corpus are reused from there by a later run. Exit code 0 when
# no check failed, 1 otherwise, 2 for a bad argument.

set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

OUT_DIR="out/gpu-check"
WORK=""
VIT_ROWS=20000
VIT_BATCH=256
VIT_SESSIONS=4
# The throughput runs' provider: cuda; cpu only to try the script on a machine without
# a GPU (with TRUSTFLOW_VITB32_DIR=tests/fixtures/clip/model and a small --vit-rows).
VIT_EP="${GPU_CHECK_VIT_EP:-cuda}"
SKIP=" "
DEADLINE_S=540

usage() {
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
        --work) WORK="${2:?--work needs a folder}"; shift 2 ;;
        --vit-rows) VIT_ROWS="${2:?--vit-rows needs a number}"; shift 2 ;;
        --vit-batch) VIT_BATCH="${2:?--vit-batch needs a number}"; shift 2 ;;
        --vit-sessions) VIT_SESSIONS="${2:?--vit-sessions needs a number}"; shift 2 ;;
        --skip) SKIP="$SKIP${2:?--skip needs a check name} "; shift 2 ;;
        --deadline-s) DEADLINE_S="${2:?--deadline-s needs seconds}"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="${WORK:-${TMPDIR:-/tmp}/trustflow-gpu-check}"
mkdir -p "$WORK" || exit 2
WORK="$(cd "$WORK" && pwd)"
LOG="$OUT_DIR/gpu-check.log"
SUMMARY="$OUT_DIR/gpu-check.json"
CHECKS="$WORK/checks"
rm -rf "$CHECKS" && mkdir -p "$CHECKS" || exit 2
: >"$LOG"
rm -f "$SUMMARY"

PY="${TRUSTFLOW_PYTHON:-python3}"
RECORD=("$PY" "$ROOT/scripts/gpu/record.py")
STARTED="$(date +%s.%N)"
MODE="repo"
[ -n "${TRUSTFLOW_BIN:-}" ] && MODE="bundle"
BIN=""
ORT_DIR=""
NPROC="$(nproc 2>/dev/null || echo 4)"
export NO_COLOR=1

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
log() { echo "[gpu-check $(date +%T)] $*" | tee -a "$LOG" >&2; }
# Whole seconds left before --deadline-s (a large number without a deadline).
time_left() {
    if [ "$DEADLINE_S" = 0 ]; then echo 999999; return; fi
    awk -v a="$STARTED" -v b="$(now)" -v d="$DEADLINE_S" 'BEGIN { printf "%d", d - (b - a) }'
}
# True when CHECK is to be left out: named by --skip, or (recorded as skipped) too
# little time left.
skipped() {
    case "$SKIP" in *" $1 "*) return 0 ;; esac
    if [ "$(time_left)" -lt 20 ]; then
        record "$1" skip "$(now)" --reason "no time left (--deadline-s $DEADLINE_S)"
        return 0
    fi
    return 1
}
# record NAME STATUS START [record.py check arguments]...
record() {
    local name="$1" status="$2" start="$3"
    shift 3
    "${RECORD[@]}" check "$CHECKS" "$name" "$status" "$(since "$start")" "$@" >>"$LOG" 2>&1
    log "$name: $status"
}
# The last lines of a command's log, for a reason.
tail_of() {
    tail -n "${2:-6}" "$1" 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' | tr '\n' ' ' | tail -c 700
}
# run_logged LOGFILE TIMEOUT_S COMMAND...: output to LOGFILE, copied into the main log.
run_logged() {
    local file="$1" limit="$2" left
    shift 2
    left="$(time_left)"
    if [ "$left" -lt "$limit" ]; then limit="$left"; fi
    if [ "$limit" -lt 1 ]; then limit=1; fi
    echo "+ $*" >"$file"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$file" 2>&1
    local rc=$?
    if [ "$rc" = 124 ]; then echo "timed out after ${limit}s" >>"$file"; fi
    { echo "----- $(basename "$file") (rc $rc)"; cat "$file"; } >>"$LOG"
    return "$rc"
}

# shellcheck disable=SC2317 # called by the EXIT trap
finish() {
    local rc=$? passed
    trap - EXIT INT TERM
    "${RECORD[@]}" summary "$CHECKS" "$SUMMARY" \
        "mode=$MODE" "binary=$BIN" "ort_dir=$ORT_DIR" "work=$WORK" "interrupted=$INTERRUPTED" \
        "wall_s=$(since "$STARTED")" "host=$(hostname 2>/dev/null)" "nproc=$NPROC" \
        "git_commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
        "ld_library_path=${LD_LIBRARY_PATH:-}" >"$WORK/summary.txt" 2>>"$LOG"
    passed=$?
    tee -a "$LOG" <"$WORK/summary.txt" >&2
    if [ ! -s "$SUMMARY" ]; then
        printf '{"pass": false, "error": "record.py summary failed; see gpu-check.log"}\n' >"$SUMMARY"
        passed=1
    fi
    if [ "$rc" -gt 1 ]; then exit "$rc"; fi
    [ "$passed" = 0 ] && exit 0
    exit 1
}
trap finish EXIT
INTERRUPTED=false
trap 'INTERRUPTED=true; log "interrupted"; exit 130' INT TERM

# ----------------------------------------------------------------------- environment

# Library folders of the machine's Python CUDA packages (site-packages/nvidia/*/lib).
python_nvidia_libs() {
    "$PY" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = []
for base in list(nvidia.__path__):
    dirs += sorted(d for d in glob.glob(os.path.join(base, "*", "lib")) if os.path.isdir(d))
print(":".join(dirs))
EOF
}

prepend_path() {
    local dir
    for dir in "$@"; do
        if [ -z "$dir" ] || [ ! -d "$dir" ]; then continue; fi
        case ":${LD_LIBRARY_PATH:-}:" in
            *":$dir:"*) ;;
            *) LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
        esac
    done
    export LD_LIBRARY_PATH
}

setup_repo() {
    local t0
    t0="$(now)"
    log "mode repo: TRUSTFLOW_CUDA=1 source scripts/setup.sh"
    export TRUSTFLOW_CUDA=1
    # shellcheck source=/dev/null
    if ! source "$ROOT/scripts/setup.sh" >>"$LOG" 2>&1; then
        record build fail "$t0" --reason "TRUSTFLOW_CUDA=1 scripts/setup.sh failed: $(tail_of "$LOG" 3)"
        return 1
    fi
    log "cargo build --release --locked --bin trustflow (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    if ! run_logged "$WORK/build.log" 3600 cargo build --release --locked --bin trustflow; then
        record build fail "$t0" --reason "cargo build failed: $(tail_of "$WORK/build.log")"
        return 1
    fi
    BIN="$CARGO_TARGET_DIR/release/trustflow"
    ORT_DIR="$(dirname "$ORT_DYLIB_PATH")"
    record build pass "$t0" "cargo_target_dir=$CARGO_TARGET_DIR" "libtorch=$LIBTORCH"
}

setup_bundle() {
    BIN="$TRUSTFLOW_BIN"
    ORT_DIR="${TRUSTFLOW_ORT_GPU_DIR:-}"
    if [ -z "$ORT_DIR" ]; then
        ORT_DIR="$(dirname "$BIN")/../ort"
    fi
    ORT_DIR="$(cd "$ORT_DIR" 2>/dev/null && pwd || echo "$ORT_DIR")"
    export ORT_DYLIB_PATH="$ORT_DIR/libonnxruntime.so.1.31.1"
    local extra="${TRUSTFLOW_LIB_DIR:-}"
    [ -z "$extra" ] && [ -d "$(dirname "$BIN")/../lib" ] && extra="$(cd "$(dirname "$BIN")/../lib" && pwd)"
    local nvidia_dirs=()
    IFS=: read -r -a nvidia_dirs <<<"$(python_nvidia_libs)"
    prepend_path "${nvidia_dirs[@]}"
    prepend_path "$extra"
    if [ -z "${TRUSTFLOW_PHOTOS_DIR:-}" ]; then
        TRUSTFLOW_PHOTOS_DIR="$("$PY" -c 'import os, sklearn; print(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images"))' 2>/dev/null)"
        export TRUSTFLOW_PHOTOS_DIR
    fi
    log "mode bundle: binary $BIN, ONNX Runtime $ORT_DIR, extra libraries ${extra:-none}"
}

# The NVIDIA driver's libcuda.so.1: normally in the loader's cache; else from the
# usual driver folders.
find_driver() {
    ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 ' && return
    local dir
    for dir in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/compat; do
        if [ -e "$dir/libcuda.so.1" ]; then
            prepend_path "$dir"
            return
        fi
    done
}

check_environment() {
    local t0 problems=() missing version
    t0="$(now)"
    [ -x "$BIN" ] || problems+=("no executable trustflow binary at ${BIN:-<unset>}")
    [ -f "${ORT_DYLIB_PATH:-}" ] || problems+=("ORT_DYLIB_PATH ${ORT_DYLIB_PATH:-<unset>} is not a file")
    if [ -x "$BIN" ]; then
        missing="$(ldd "$BIN" 2>&1 | awk '/not found/ { print $1 }' | sort -u | tr '\n' ' ')"
        [ -n "$missing" ] && problems+=("the binary's libraries not found: $missing")
        version="$("$BIN" --version 2>>"$LOG")" || problems+=("$BIN --version failed")
    fi
    local status=pass reason=()
    if [ "${#problems[@]}" -gt 0 ]; then
        status=fail
        reason=(--reason "${problems[*]}")
    fi
    record environment "$status" "$t0" "${reason[@]}" \
        "mode=$MODE" "binary=$BIN" "version=${version:-}" "ort_dylib_path=${ORT_DYLIB_PATH:-}" \
        "python=$("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)" \
        "photos_dir=${TRUSTFLOW_PHOTOS_DIR:-}" "nproc=$NPROC" \
        "uname=$(uname -srm)"
    [ "$status" = pass ]
}

check_nvidia_smi() {
    local t0 facts
    t0="$(now)"
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        record nvidia_smi skip "$t0" --reason "nvidia-smi is not on the PATH"
        return
    fi
    if facts="$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1)"; then
        record nvidia_smi pass "$t0" "gpus=$(echo "$facts" | grep -c .)" \
            "name=$(echo "$facts" | head -1 | cut -d, -f1 | xargs)" \
            "driver=$(echo "$facts" | head -1 | cut -d, -f2 | xargs)" \
            "memory_total=$(echo "$facts" | head -1 | cut -d, -f3 | xargs)" \
            "compute_cap=$(echo "$facts" | head -1 | cut -d, -f4 | xargs)" \
            "cuda_visible_devices=${CUDA_VISIBLE_DEVICES:-}"
    else
        record nvidia_smi fail "$t0" --reason "nvidia-smi failed: $(echo "$facts" | head -3 | tr '\n' ' ')"
    fi
}

check_cuda_libs() {
    local t0 lib missing
    t0="$(now)"
    lib="$ORT_DIR/libonnxruntime_providers_cuda.so"
    if [ ! -f "$lib" ]; then
        record cuda_libs fail "$t0" --reason "$lib is missing (not an onnxruntime-gpu build?)"
        return
    fi
    missing="$(ldd "$lib" 2>&1 | awk '/not found/ { print $1 }' | sort -u | tr '\n' ' ')"
    if [ -n "$missing" ]; then
        record cuda_libs fail "$t0" --reason "not found for $lib: $missing" "missing=$missing"
    else
        record cuda_libs pass "$t0" "provider=$lib" \
            "resolved=$(ldd "$lib" | awk '/=>/ && /cu|nv/ { print $1 "=" $3 }' | tr '\n' ' ')"
    fi
}

# ----------------------------------------------------------------------- data

CORPUS="$WORK/data/corpus"
CORPUS_CAPTION="$WORK/data/corpus-caption"

check_corpus() {
    local t0
    t0="$(now)"
    rm -rf "$CORPUS" "$CORPUS_CAPTION"
    if run_logged "$WORK/corpus.log" 120 "$BIN" bench gen --rows 256 --shards 2 --seed 1 --out "$CORPUS" \
        && run_logged "$WORK/corpus-caption.log" 120 "$BIN" bench gen --rows 256 --shards 2 --seed 2 \
            --missing-caption-rate 0.9 --corrupt-rate 0.05 --out "$CORPUS_CAPTION"; then
        record corpus pass "$t0" "rows=256" "shards=2" "photos_dir=${TRUSTFLOW_PHOTOS_DIR:-}"
        return 0
    fi
    record corpus fail "$t0" --reason "bench gen failed: $(tail_of "$WORK/corpus.log") $(tail_of "$WORK/corpus-caption.log")"
    return 1
}

# How many models a run's log says were loaded on each provider ("loaded ONNX model").
providers_loaded() {
    local file="$1" which="$2" n
    n="$(sed 's/\x1b\[[0-9;]*m//g' "$file" 2>/dev/null | grep 'loaded ONNX model' \
        | grep -cE "provider=\"?$which\"?( |$)")"
    echo "${n:-0}"
}

# parity STAGE CORPUS [compare_outputs.py arguments]...
parity() {
    local stage="$1" corpus="$2" name="parity_$1" t0 dir ep rc
    shift 2
    skipped "$name" && return
    t0="$(now)"
    dir="$WORK/parity/$stage"
    rm -rf "$dir" && mkdir -p "$dir"
    local kv=()
    for ep in cpu cuda; do
        log "$name: run with execution_provider $ep"
        TF_GPU_CORPUS="$corpus" TF_GPU_EP="$ep" TF_GPU_OUT="$dir/$ep" \
            TRUSTFLOW_LOG="warn,trustflow_engine=info" \
            run_logged "$dir/$ep.log" 300 "$BIN" run "scripts/gpu/parity-$stage.yaml" --force --quiet
        rc=$?
        if [ "$rc" -ne 0 ]; then
            record "$name" fail "$t0" --reason "the $ep run failed (exit $rc): $(tail_of "$dir/$ep.log")" "${kv[@]}"
            return
        fi
        mapfile -t -O "${#kv[@]}" kv < <("${RECORD[@]}" report "$dir/$ep/_report.json" "${ep}_" \
            rows_in rows_out rows_quarantined wall_s rows_per_s)
    done
    local on_cuda on_cpu
    on_cuda="$(providers_loaded "$dir/cuda.log" cuda)"
    on_cpu="$(providers_loaded "$dir/cuda.log" cpu)"
    kv+=("cuda_run_models_on_cuda=$on_cuda" "cuda_run_models_on_cpu=$on_cpu")
    "$PY" scripts/gpu/compare_outputs.py "$dir/cpu" "$dir/cuda" --json "$dir/compare.json" "$@" >/dev/null 2>>"$LOG"
    rc=$?
    local status=pass reason=()
    if [ "$rc" -ne 0 ]; then
        status=fail
        reason=(--reason "outputs differ (compare_outputs.py exit $rc): $("$PY" -c 'import json, sys
r = json.load(open(sys.argv[1]))
print("; ".join(r.get("problems", [])[:4]) or r.get("error", ""))' "$dir/compare.json" 2>/dev/null)")
    elif [ "$on_cuda" -lt 1 ] || [ "$on_cpu" -ne 0 ]; then
        status=fail
        reason=(--reason "the cuda run's log shows $on_cuda models loaded on cuda and $on_cpu on cpu")
    fi
    record "$name" "$status" "$t0" "${reason[@]}" --json "compare=$dir/compare.json" "${kv[@]}"
}

# ----------------------------------------------------------------------- trainer

check_trainer() {
    local t0 dir dev rc
    t0="$(now)"
    if ! "$BIN" train --help >/dev/null 2>&1; then
        record trainer skip "$t0" --reason "this trustflow binary has no train command (an engine-only build, --no-default-features)"
        return
    fi
    if ! readelf -d "$BIN" 2>/dev/null | grep -q 'libtorch_cuda' \
        && ! ldd "$BIN" 2>/dev/null | grep -q 'libtorch_cuda'; then
        record trainer skip "$t0" --reason "the binary's libtorch has no CUDA (libtorch_cuda.so is not linked; build with TRUSTFLOW_CUDA=1 source scripts/setup.sh)"
        return
    fi
    dir="$WORK/trainer"
    rm -rf "$dir" && mkdir -p "$dir"
    if ! run_logged "$dir/gen.log" 120 "$BIN" bench gen-train --out "$dir/data" --rows-source 32 \
        --rows-target 32 --rows-eval 32 --shards 1 --classes 4 --image-size 16 --seed 0; then
        record trainer fail "$t0" --reason "bench gen-train failed: $(tail_of "$dir/gen.log")"
        return
    fi
    for dev in cpu cuda; do
        log "trainer: one step on $dev"
        TF_GPU_TRAIN_DATA="$dir/data" TF_GPU_DEVICE="$dev" TF_GPU_OUT="$dir/$dev" \
            run_logged "$dir/$dev.log" 300 "$BIN" train scripts/gpu/train-one-step.yaml --fresh
        rc=$?
        if [ "$rc" -ne 0 ]; then
            record trainer fail "$t0" --reason "the $dev training failed (exit $rc): $(tail_of "$dir/$dev.log")"
            return
        fi
    done
    "$PY" - "$dir/cpu/_report.json" "$dir/cuda/_report.json" "$dir/losses.json" <<'EOF' 2>>"$LOG"
import json, sys
cpu, cuda = (json.load(open(p)) for p in sys.argv[1:3])
out = {"device_cpu": cpu.get("device"), "device_cuda": cuda.get("device"),
       "steps": [cpu.get("global_step"), cuda.get("global_step")], "terms": {}}
worst = 0.0
a, b = cpu["history"][0]["loss"], cuda["history"][0]["loss"]
for term in ("total", "src", "tgt", "self_train", "ctr"):
    x, y = a.get(term), b.get(term)
    if x is None or y is None:
        out["terms"][term] = {"cpu": x, "cuda": y}
        continue
    rel = abs(x - y) / max(abs(x), 1e-6)
    worst = max(worst, rel)
    out["terms"][term] = {"cpu": x, "cuda": y, "abs_diff": abs(x - y), "rel_diff": rel}
out["max_rel_diff"] = worst
out["rtol"] = 1e-3
out["pass"] = worst <= 1e-3
json.dump(out, open(sys.argv[3], "w"), indent=2)
EOF
    if grep -q '"pass": true' "$dir/losses.json" 2>/dev/null; then
        record trainer pass "$t0" --json "losses=$dir/losses.json"
    else
        # The initial weights are drawn on the training device (tch's VarStore on CUDA
        # uses CUDA's generator), so CPU and CUDA start from different weights.
        record trainer fail "$t0" --reason "one-step losses differ by more than rtol 1e-3" \
            --json "losses=$dir/losses.json" \
            "known_cause=the model is initialised on the training device: CUDA's random generator gives other initial weights than the CPU's for the same seed"
    fi
}

# ----------------------------------------------------------------------- throughput

# A Python that can import torch and transformers, for make_clip_vitb32.py.
torch_python() {
    local py
    for py in "${TRUSTFLOW_TORCH_PYTHON:-}" "$PY"; do
        [ -n "$py" ] || continue
        if "$py" -c 'import torch, transformers' >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
    done
    if [ "$MODE" = repo ]; then
        # The reference venv (torch 2.13.0 and transformers 5.24.0 from PyPI).
        py="$(bash "$ROOT/scripts/fixtures/setup-venv.sh" 2>>"$LOG")" && echo "$py" && return 0
    fi
    return 1
}

# One run of scripts/gpu/clip-vitb32-cuda.yaml for check NAME (started at T0) into DIR,
# with `tf32` and `jpeg_draft` as given, nvidia-smi sampled while it runs. Appends the
# run's figures to the caller's `kv`; on failure records NAME as failed and returns 1.
vit_run() {
    local name="$1" t0="$2" dir="$3" corpus="$4" model="$5" tf32="$6" draft="$7"
    local rc smi_pid=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
            >"$dir/smi.csv" 2>/dev/null &
        smi_pid=$!
    fi
    log "$name: trustflow run on $VIT_EP ($NPROC workers, batch $VIT_BATCH, $VIT_SESSIONS sessions, tf32 $tf32, jpeg_draft $draft)"
    TF_GPU_CORPUS="$corpus" TF_GPU_MODEL="$model" TF_GPU_OUT="$dir/out" TF_GPU_EP="$VIT_EP" \
        TF_GPU_WORKERS="$NPROC" TF_GPU_SESSIONS="$VIT_SESSIONS" TF_GPU_BATCH="$VIT_BATCH" \
        TF_GPU_TF32="$tf32" TF_GPU_JPEG_DRAFT="$draft" \
        TRUSTFLOW_LOG="warn,trustflow_engine=info" \
        run_logged "$dir/run.log" 300 "$BIN" run scripts/gpu/clip-vitb32-cuda.yaml --force --quiet
    rc=$?
    if [ -n "$smi_pid" ]; then
        kill "$smi_pid" 2>/dev/null
        wait "$smi_pid" 2>/dev/null
        # Sampled every 0.5 s over the run (model loading included).
        mapfile -t -O "${#kv[@]}" kv < <(awk -F', *' 'NF >= 2 { n++; u += $1; if ($1 > umax) umax = $1; if ($2 > m) m = $2 }
            END { if (n) printf "gpu_util_mean_pct=%.1f\ngpu_util_max_pct=%d\ngpu_mem_max_mib=%d\n", u / n, umax, m }' \
            "$dir/smi.csv")
    fi
    if [ "$rc" -ne 0 ]; then
        record "$name" fail "$t0" --reason "the $VIT_EP run failed (exit $rc): $(tail_of "$dir/run.log")" "${kv[@]}"
        return 1
    fi
    mapfile -t -O "${#kv[@]}" kv < <("${RECORD[@]}" report "$dir/out/_report.json" "run_" \
        rows_in rows_out rows_quarantined wall_s rows_per_s cpu_utilisation peak_rss_bytes bottleneck steps)
    kv+=("execution_provider=$VIT_EP" "models_on_cuda=$(providers_loaded "$dir/run.log" cuda)")
}

check_clip_vitb32() {
    local t0 model corpus dir py
    t0="$(now)"
    model="${TRUSTFLOW_VITB32_DIR:-$WORK/models/clip-vitb32-random}"
    # Absolute: the pipeline resolves a relative model path against its own folder.
    case "$model" in /*) ;; *) model="$ROOT/$model" ;; esac
    corpus="$WORK/data/corpus-vitb32-$VIT_ROWS"
    dir="$WORK/clip_vitb32"
    rm -rf "$dir" && mkdir -p "$dir"
    local kv=("rows=$VIT_ROWS" "batch_size=$VIT_BATCH" "sessions=$VIT_SESSIONS" "workers=$NPROC")
    if [ ! -f "$model/vision_model.onnx" ] || [ ! -f "$model/text_model.onnx" ]; then
        if ! py="$(torch_python)"; then
            record clip_vitb32 skip "$t0" --reason "no Python with torch and transformers to make the ViT-B/32 model (set TRUSTFLOW_TORCH_PYTHON or TRUSTFLOW_VITB32_DIR)"
            return
        fi
        log "clip_vitb32: making the ViT-B/32-shaped model with $py"
        local tm
        tm="$(now)"
        if ! run_logged "$dir/make-model.log" 300 "$py" scripts/bench/make_clip_vitb32.py --out "$model"; then
            record clip_vitb32 fail "$t0" --reason "make_clip_vitb32.py failed: $(tail_of "$dir/make-model.log")"
            return
        fi
        kv+=("make_model_s=$(since "$tm")")
    fi
    if [ ! -f "$corpus/_gen.json" ]; then
        log "clip_vitb32: generating $VIT_ROWS rows"
        local tg
        tg="$(now)"
        rm -rf "$corpus"
        if ! run_logged "$dir/gen.log" 300 "$BIN" bench gen --rows "$VIT_ROWS" --shards "$NPROC" \
            --seed 2026 --out "$corpus"; then
            rm -rf "$corpus"
            record clip_vitb32 fail "$t0" --reason "bench gen failed: $(tail_of "$dir/gen.log")"
            return
        fi
        kv+=("gen_s=$(since "$tg")")
    fi
    kv+=("corpus_bytes=$(du -sb "$corpus" | cut -f1)")
    vit_run clip_vitb32 "$t0" "$dir" "$corpus" "$model" false false || return 0
    record clip_vitb32 pass "$t0" "${kv[@]}"
    VIT_READY=("$corpus" "$model")
}

# `trustflow bench ceiling` on the same pipeline: the models alone on pre-made inputs
# (same batch, callers and sessions) against the whole pipeline, alternating.
check_clip_vitb32_ceiling() {
    local t0 dir rc
    t0="$(now)"
    if [ "${#VIT_READY[@]}" -ne 2 ]; then
        record clip_vitb32_ceiling skip "$t0" --reason "clip_vitb32 did not pass"
        return
    fi
    dir="$WORK/clip_vitb32_ceiling"
    rm -rf "$dir" && mkdir -p "$dir"
    TF_GPU_CORPUS="${VIT_READY[0]}" TF_GPU_MODEL="${VIT_READY[1]}" TF_GPU_OUT="$dir/out" TF_GPU_EP="$VIT_EP" \
        TF_GPU_WORKERS="$NPROC" TF_GPU_SESSIONS="$VIT_SESSIONS" TF_GPU_BATCH="$VIT_BATCH" \
        run_logged "$dir/ceiling.log" 300 "$BIN" bench ceiling scripts/gpu/clip-vitb32-cuda.yaml \
        --repetitions 1 --calls 4 --scratch "$dir/scratch"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        record clip_vitb32_ceiling fail "$t0" --reason "bench ceiling failed (exit $rc): $(tail_of "$dir/ceiling.log")"
        return
    fi
    # The report is the JSON object the command prints.
    "$PY" - "$dir/ceiling.log" "$dir/ceiling.json" <<'EOF' 2>>"$LOG"
import json, sys
text = open(sys.argv[1]).read()
start = text.find("{")
report = {}
while start != -1:
    try:
        report, _ = json.JSONDecoder().raw_decode(text[start:])
        break
    except ValueError:
        start = text.find("{", start + 1)
json.dump(report, open(sys.argv[2], "w"), indent=2)
EOF
    record clip_vitb32_ceiling pass "$t0" --json "ceiling=$dir/ceiling.json"
}

# The clip_vitb32 run again on its corpus and model, with TF32 and the JPEG draft decode.
check_clip_vitb32_fast() {
    local t0 dir
    t0="$(now)"
    if [ "${#VIT_READY[@]}" -ne 2 ]; then
        record clip_vitb32_fast skip "$t0" --reason "clip_vitb32 did not pass"
        return
    fi
    dir="$WORK/clip_vitb32_fast"
    rm -rf "$dir" && mkdir -p "$dir"
    local kv=("rows=$VIT_ROWS" "batch_size=$VIT_BATCH" "sessions=$VIT_SESSIONS" "workers=$NPROC"
        "tf32=true" "jpeg_draft=true")
    vit_run clip_vitb32_fast "$t0" "$dir" "${VIT_READY[0]}" "${VIT_READY[1]}" true true || return 0
    record clip_vitb32_fast pass "$t0" "${kv[@]}"
}

# ----------------------------------------------------------------------- main

log "gpu-check: mode $MODE, results in $OUT_DIR, work in $WORK"
if [ "$MODE" = repo ]; then
    setup_repo || exit 1
else
    setup_bundle
fi
find_driver
check_environment || exit 1
skipped nvidia_smi || check_nvidia_smi
skipped cuda_libs || check_cuda_libs
if ! skipped corpus && check_corpus; then
    parity clip_score "$CORPUS"
    parity pseudo_label "$CORPUS" --classifier-onnx tests/fixtures/text_classifier/model/model.onnx
    parity caption "$CORPUS_CAPTION"
fi
skipped trainer || check_trainer
VIT_READY=()
skipped clip_vitb32 || check_clip_vitb32
skipped clip_vitb32_ceiling || check_clip_vitb32_ceiling
skipped clip_vitb32_fast || check_clip_vitb32_fast
exit 0
