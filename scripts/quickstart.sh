#!/usr/bin/env bash
# Quick start: smollm2-135m -> aux (keep 0.5, bridge healing) -> KV predictor -> report.
# Outputs go under ./runs/quickstart (override with RUNS=...). N held-out sequences (default 16)
# and CALIB_TOKENS calibration tokens for healing and fitting (default 100000, the product default)
# set the run time.
set -euo pipefail
RUNS=${RUNS:-runs/quickstart}
N=${N:-16}
CALIB_TOKENS=${CALIB_TOKENS:-100000}

kvp models pull smollm2-135m
kvp derive --base smollm2-135m --keep 0.5 --heal bridge --calib-tokens "$CALIB_TOKENS" \
    -o "$RUNS/aux" --overwrite
kvp fit --aux "$RUNS/aux" --calib-tokens "$CALIB_TOKENS" -o "$RUNS/predictor" --overwrite
kvp generate --predictor "$RUNS/predictor" --max-new-tokens 24 \
    'def fibonacci(n):' 'The three most important things about a garden are'
kvp eval --predictor "$RUNS/predictor" --n "$N" -o "$RUNS/report" --overwrite
