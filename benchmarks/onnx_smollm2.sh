#!/usr/bin/env bash
# ONNX export + validation of smollm2-135m KVP at keep 0.50 and 0.25 (fp32, int8, int4), on this CPU,
# from the predictors of benchmarks/quality_smollm2.sh; the keep-0.50 aux also with the cheaper
# kv-input predictor (fp32, int8); then optimum's export of the base as the reference, the
# BENCHMARKS.md tables (benchmarks/render_onnx.py) and the kvp compare table + Pareto plot.
# Usage: benchmarks/onnx_smollm2.sh [QUALITY_DIR] [OUT_DIR]
# Knobs (BENCHMARKS.md's run: REPEATS=3 QUALITY_N=32; keep 0.25 with BATCHES=1,4): THREADS, REPEATS,
# QUALITY_N, BATCHES, NICE (e.g. -10 to keep other work off the timed runs).
set -euo pipefail
QUALITY=${1:-runs/bench-quality}
OUT=${2:-runs/bench-onnx}
THREADS=${THREADS:-2}
REPEATS=${REPEATS:-5}
BATCHES=${BATCHES:-1,4,8}
export OMP_NUM_THREADS=$THREADS
run() {  # run CMD... under NICE when set
    if [ -n "${NICE:-}" ]; then nice -n "$NICE" "$@"; else "$@"; fi
}
validate() {  # validate DIR [extra args]
    local dir=$1; shift
    run kvp validate "$dir/onnx" -o "$dir/validate" --overwrite --threads "$THREADS" --repeats "$REPEATS" \
        --batches "$BATCHES" ${QUALITY_N:+--quality-n "$QUALITY_N"} "$@" > /dev/null
}
for keep in 0.5 0.25; do
    dir=$OUT/keep-$keep
    [ -f "$dir/onnx/manifest.json" ] || kvp export onnx --predictor "$QUALITY/keep-$keep/predictor" -o "$dir/onnx" --overwrite
    validate "$dir"
done
# the cheaper predictor: the paper's K/V input on the same keep-0.50 aux
[ -f "$QUALITY/keep-0.5-kv/predictor/manifest.json" ] || \
    kvp fit --aux "$QUALITY/keep-0.5/aux" --input kv -o "$QUALITY/keep-0.5-kv/predictor" --overwrite
dir=$OUT/keep-0.5-kv
[ -f "$dir/onnx/manifest.json" ] || \
    kvp export onnx --predictor "$QUALITY/keep-0.5-kv/predictor" --variant int8 -o "$dir/onnx" --overwrite
validate "$dir" --lengths 512,1024
run python "$(dirname "$0")/optimum_reference.py" "$OUT/keep-0.5/onnx" --out "$OUT/optimum" \
    --threads "$THREADS" --lengths 128,512,1024 > /dev/null
python "$(dirname "$0")/render_onnx.py" "$OUT"
kvp compare "$OUT"/keep-0.25/validate "$OUT"/keep-0.5/validate "$OUT"/keep-0.5-kv/validate \
    -o benchmarks/compare-smollm2 --at 1x512 --title "smollm2-135m KVP, onnxruntime, 2-core CPU" > /dev/null
