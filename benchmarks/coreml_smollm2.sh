#!/usr/bin/env bash
# Core ML export of a KVP predictor (issue: Core ML export): the iOS 18 multifunction package in
# fp16 / int8 / int4 / palettize4 and the iOS 17 stateless pair in fp16 / int8, then the
# validator's Core ML section on each, then benchmarks/render_coreml.py prints the
# BENCHMARKS.md table (conversion seconds and package sizes) from the manifests.
# Usage: benchmarks/coreml_smollm2.sh PREDICTOR_DIR [OUT_DIR]
set -euo pipefail
PRED=$1
OUT=${2:-runs/coreml-keep-0.5}
export OMP_NUM_THREADS=${THREADS:-1}
kvp export coreml --predictor "$PRED" --target ios18 --compress fp16 --compress int8 --compress int4 \
    --compress palettize4 -o "$OUT/ios18" --overwrite
kvp export coreml --predictor "$PRED" --target ios17 --compress fp16 --compress int8 -o "$OUT/ios17" --overwrite
for t in ios18 ios17; do
    kvp validate-coreml "$OUT/$t" -o "$OUT/$t-report" --overwrite > /dev/null
done
python "$(dirname "$0")/render_coreml.py" "$OUT/ios18" "$OUT/ios17"
