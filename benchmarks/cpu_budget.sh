#!/usr/bin/env bash
# Issue 11, deliverable 5: what `kvp train` buys a user without a GPU in 5, 15 and 30 minutes.
# Three independent runs from the same closed-form predictor (each a user's "train for T minutes":
# a token budget sized to finish in T at this machine's measured rate, with --finish-after T as the
# guard), then `kvp eval` (64 held-out pairs) of the closed form and of each run.
# Usage: benchmarks/cpu_budget.sh FIT_FOLDER OUT
#   FIT_FOLDER: a `kvp fit` output (e.g. the default recipe's runs/<run>/stages/fit-*); OUT: a new folder.
#   STEPS="20 69 144": optimizer steps of 4 x 256 tokens for the 5, 15 and 30 minute runs. The default
#   fits the 85 tokens/s that a 6-step probe measured on the 2-core AMD EPYC of BENCHMARKS.md, with
#   room for the five held-out evaluations (loading took ~3 s there); scale them to your machine's rate.
# Render: python benchmarks/render_budget.py OUT
set -euo pipefail
FIT=$1; OUT=$2; read -r -a STEPS <<< "${STEPS:-20 69 144}"
KVP=${KVP:-kvp}
mkdir -p "$OUT"
{ date -u; lscpu | grep -E "Model name|^CPU\(s\)|Flags"; python -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"; } > "$OUT/machine.txt"
BUDGETS=(5 15 30)
for i in 0 1 2; do
  T=${BUDGETS[$i]}; steps=${STEPS[$i]}  # five held-out evaluations of 2,048 tokens per run
  /usr/bin/time -v "$KVP" train --predictor "$FIT" --tokens $(( steps * 1024 )) --batch 4 --seq-len 256 \
      --eval-every $(( (steps + 2) / 5 > 0 ? (steps + 2) / 5 : 1 )) --eval-tokens 2048 --finish-after "$T" \
      -o "$OUT/train-$T" > "$OUT/train-$T.log" 2>&1
done
for p in "$FIT" "$OUT"/train-5 "$OUT"/train-15 "$OUT"/train-30; do
  "$KVP" eval --predictor "$p" -o "$OUT/eval-$(basename "$p")" > "$OUT/eval-$(basename "$p").log" 2>&1
done
