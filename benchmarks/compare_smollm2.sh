#!/usr/bin/env bash
# The three smollm2-135m recipes (keep 0.25 / 0.50 / 0.75), then one table and Pareto plot over
# them for BENCHMARKS.md. Each `kvp run` is cached: rerunning this script after an interruption
# resumes where it stopped. Extra arguments go to every `kvp run` (e.g. --set validate.threads=2).
# Outputs: runs/smollm2-135m-keep-*/ and benchmarks/compare-smollm2/{compare.md,compare.json,pareto.png}.
set -uo pipefail
runs=()
for k in 0.25 0.50 0.75; do
    kvp run "recipes/smollm2-135m/keep-$k.yaml" "$@"
    rc=$?
    [[ $rc -ne 0 && $rc -ne 3 ]] && exit $rc   # a failed gate (3) still gives a row to compare
    runs+=("runs/smollm2-135m-keep-$k")
done
kvp compare "${runs[@]}" -o benchmarks/compare-smollm2 --title "smollm2-135m: KVP-LP keep 0.25 / 0.50 / 0.75 (kvp run, onnxruntime CPU)"
