#!/usr/bin/env bash
# Training-free KVP quality on smollm2-135m (issue: closed-form healing + ridge), keep 0.50 and 0.25.
# Each ratio runs derive -> fit -> eval with the product defaults (100k calibration tokens,
# 64 held-out pairs of 192 + 64 tokens, greedy 32), then benchmarks/render_quality.py
# prints the BENCHMARKS.md table from the reports and manifests.
# Usage: benchmarks/quality_smollm2.sh [OUT_DIR]   (THREADS=1 runs the two ratios side by side)
set -euo pipefail
OUT=${1:-runs/bench-quality}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS
run() {
    local keep=$1 dir=$OUT/keep-$1
    kvp derive --base smollm2-135m --keep "$keep" --heal bridge -o "$dir/aux" --overwrite
    kvp fit --aux "$dir/aux" -o "$dir/predictor" --overwrite
    kvp eval --predictor "$dir/predictor" --n 64 -o "$dir/report" --overwrite > /dev/null
}
if [ "$THREADS" = 1 ]; then
    run 0.5 > "$OUT.0.5.log" 2>&1 & run 0.25 > "$OUT.0.25.log" 2>&1 & wait
else
    run 0.5; run 0.25
fi
python "$(dirname "$0")/render_quality.py" "$OUT"/keep-*/report
