#!/usr/bin/env bash
# Quick start: the default recipe, recipes/smollm2-135m/keep-0.50.yaml, end to end with `kvp run`:
# pull smollm2-135m -> aux (keep 0.5, bridge healing) -> ridge KV predictor -> ONNX fp32/int8/int4
# -> validation (parity, accuracy, TTFT) and its gates. The run folder (default
# runs/smollm2-135m-keep-0.50) gets report.md, pareto.png and run.json; a second call reuses
# every finished stage and takes seconds.
# Knobs: RUN=folder; CALIB_TOKENS (default: the recipe's 100000) and N (held-out pairs, default
# the recipe's 64) for a quicker look, e.g. CALIB_TOKENS=8192 N=8 scripts/quickstart.sh.
# Extra arguments go to `kvp run` (e.g. --set validate.lengths=[128,512] --junit junit.xml).
set -euo pipefail
RECIPE=${RECIPE:-recipes/smollm2-135m/keep-0.50.yaml}
args=()
[[ -n "${RUN:-}" ]] && args+=(-o "$RUN")
[[ -n "${CALIB_TOKENS:-}" ]] && args+=(--set "data.calib_tokens=$CALIB_TOKENS")
[[ -n "${N:-}" ]] && args+=(--set "export.onnx.eval_n=$N")
exec kvp run "$RECIPE" "${args[@]}" "$@"
