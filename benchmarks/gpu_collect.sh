#!/usr/bin/env bash
# Pack what a benchmarks/issue11_gpu.sh WORK folder (or a `kvp run` folder) holds that may leave the
# machine: manifests, reports, train logs, HumanEval JSON, stage logs, the recipe as run. Never weights,
# graphs, tokenizers or caches.
#
#   benchmarks/gpu_collect.sh WORK OUT.tgz
set -eu
W=$1 OUT=$2
cd "$W"
find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' -o -name 'recipe.yaml' \) \
  ! -name 'tokenizer*.json' ! -name 'vocab.json' ! -name 'special_tokens_map.json' ! -path '*.ckpt/*' -print0 \
  | tar czf "$OUT" --null -T -
