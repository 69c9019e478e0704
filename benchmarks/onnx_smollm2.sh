#!/usr/bin/env bash
# ONNX export + validation of smollm2-135m KVP at keep 0.50 and 0.25 (fp32, int8, int4), on this CPU,
# from the predictors of benchmarks/quality_smollm2.sh, then optimum's export of the base as the
# reference, then the BENCHMARKS.md tables (benchmarks/render_onnx.py).
# Usage: benchmarks/onnx_smollm2.sh [QUALITY_DIR] [OUT_DIR]     (THREADS, REPEATS, NICE to tune)
set -euo pipefail
QUALITY=${1:-runs/bench-quality}
OUT=${2:-runs/bench-onnx}
THREADS=${THREADS:-2}
REPEATS=${REPEATS:-5}
export OMP_NUM_THREADS=$THREADS
for keep in 0.5 0.25; do
    dir=$OUT/keep-$keep
    [ -f "$dir/onnx/manifest.json" ] || kvp export onnx --predictor "$QUALITY/keep-$keep/predictor" -o "$dir/onnx" --overwrite
    ${NICE:+nice -n "$NICE"} kvp validate "$dir/onnx" -o "$dir/validate" --overwrite --threads "$THREADS" \
        --repeats "$REPEATS" > /dev/null
done
${NICE:+nice -n "$NICE"} python "$(dirname "$0")/optimum_reference.py" "$OUT/keep-0.5/onnx" --out "$OUT/optimum" \
    --threads "$THREADS" > /dev/null
python "$(dirname "$0")/render_onnx.py" "$OUT"
