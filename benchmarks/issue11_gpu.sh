#!/usr/bin/env bash
# Issue 11, deliverable 3 on one GPU: qwen2.5-coder-0.5b at one keep ratio, on the pinned
# `pypi-code` corpus (calibration, training and held-out loss; held-out projects for the evals).
#
#   benchmarks/issue11_gpu.sh WORK KEEP TOKENS [CALIB_TOKENS]
#
# 1. the model is converted (`kvp models pull`, from the cached GGUF); HumanEval of the base (all
#    164, greedy, sandboxed) starts, beside the corpus's tokenisation for it (`kvp data build`) and
# 2. derive (bridge healing) and fit (ridge), both with --device cuda (on failure: again on the
#    CPU with at most 100k calibration tokens, and the log says so);
# 3. then, all on the same GPU and at the same time:
#    - KVP training (aux + predictor through the frozen base) and the OE-LP baseline (the aux
#      alone, plain CE), TOKENS each, held-out loss every EVAL_EVERY steps on the corpus's
#      held-out projects, the best step's weights kept, PATIENCE evaluations without a new best
#      stop a run; if DEADLINE (epoch seconds) is set, each run ends there at the latest
#      (--finish-after) and still writes its output;
#    - HumanEval and the held-out NLL / agreement eval (`kvp eval --device cuda`) of the closed
#      form; then those of each trained path as soon as its training ends.
# Every stage skips an output that exists, so the script resumes. Logs: WORK/logs/<stage>.log,
# one line per stage on stderr. Env: KVP_PY (python), HE_FLAGS (extra humaneval_gpu.py flags,
# e.g. --allow-unsafe-execution where no bubblewrap sandbox exists), BATCH (32), LR (1e-4),
# EVAL_EVERY (200), EVAL_TOKENS (65536), PATIENCE (4), DEADLINE.
set -u
W=$1 KEEP=$2 TOKENS=$3 CALIB=${4:-200000}
PY=${KVP_PY:-python3}
M=qwen2.5-coder-0.5b
HERE=$(cd "$(dirname "$0")" && pwd)
BATCH=${BATCH:-32} LR=${LR:-1e-4} EVAL_EVERY=${EVAL_EVERY:-200} EVAL_TOKENS=${EVAL_TOKENS:-65536}
PATIENCE=${PATIENCE:-4}
mkdir -p "$W/logs"

kvp() { "$PY" -m kvp_export.cli "$@"; }
log() { echo "[issue11 $(date +%H:%M:%S)] $*" >&2; }
stage() {  # stage NAME OUTPUT COMMAND...: run unless OUTPUT exists; the command's output to logs/NAME.log
  local name=$1 out=$2 t0=$SECONDS rc
  shift 2
  if [ -e "$out" ]; then log "$name: exists"; return 0; fi
  log "$name: start"
  "$@" >"$W/logs/$name.log" 2>&1
  rc=$?
  log "$name: rc $rc after $((SECONDS - t0)) s"
  return $rc
}
he() {  # he NAME=KIND[:FOLDER]...: HumanEval of these paths into WORK/humaneval
  "$PY" "$HERE/humaneval_gpu.py" --base $M --out "$W/humaneval" --batch 32 ${HE_FLAGS:-} \
    $(for r in "$@"; do printf -- '--run %s ' "$r"; done)
}
finish() {  # the --finish-after minutes left until DEADLINE (nothing without one)
  [ -n "${DEADLINE:-}" ] && echo "--finish-after $(( (DEADLINE - $(date +%s)) / 6 ))e-1"
}
EV=(--heldout pypi-code --n 64 --prompt-len 192 --cont-len 64 --greedy-tokens 32 --device cuda)

log "work $W, keep $KEEP, tokens $TOKENS, calibration $CALIB, batch $BATCH, lr $LR"
log "model: $(kvp models pull $M 2>"$W/logs/pull.log")"
if [ -z "${HE_FLAGS+x}" ]; then  # the OS sandbox if this machine gives one, else the documented opt-in
  why=$("$PY" -c "from kvp_validate.sandbox import os_sandbox_error as e; print(e() or '')")
  HE_FLAGS=${why:+--allow-unsafe-execution}
  log "HumanEval sandbox: ${why:-bubblewrap layers available}${why:+; running with --allow-unsafe-execution}"
fi
stage he-base "$W/humaneval/base.json" he base=base &
BASE_HE=$!
stage data-build "$W/logs/data-build.done" sh -c "\"$PY\" -m kvp_export.cli data build --tokenizer $M \
    && touch \"$W/logs/data-build.done\"" || exit 1
stage derive "$W/aux" kvp derive --base $M -k "$KEEP" --heal bridge --calib pypi-code --calib-tokens "$CALIB" \
    --device cuda -o "$W/aux" \
  || stage derive-cpu "$W/aux" kvp derive --base $M -k "$KEEP" --heal bridge --calib pypi-code \
    --calib-tokens $((CALIB < 100000 ? CALIB : 100000)) -o "$W/aux" || exit 1
stage fit "$W/ridge" kvp fit --aux "$W/aux" --calib pypi-code --calib-tokens "$CALIB" --device cuda -o "$W/ridge" \
  || stage fit-cpu "$W/ridge" kvp fit --aux "$W/aux" --calib pypi-code \
    --calib-tokens $((CALIB < 100000 ? CALIB : 100000)) -o "$W/ridge" || exit 1

TRAIN=(--predictor "$W/ridge" --data pypi-code --tokens "$TOKENS" --batch "$BATCH" --seq-len 256 --lr "$LR"
       --device cuda --eval-every "$EVAL_EVERY" --eval-tokens "$EVAL_TOKENS" --patience "$PATIENCE"
       --checkpoint-every 1000000)
(
  stage train-kvp "$W/kvp" kvp train "${TRAIN[@]}" $(finish) -o "$W/kvp" || exit 1
  stage he-kvp "$W/humaneval/kvp_trained.json" he "kvp_trained=kvp:$W/kvp"
  stage eval-kvp "$W/eval-kvp" kvp eval --predictor "$W/kvp" "${EV[@]}" -o "$W/eval-kvp"
) &
(
  stage train-baseline "$W/baseline" kvp train --baseline "${TRAIN[@]}" $(finish) -o "$W/baseline" || exit 1
  stage he-baseline "$W/humaneval/aux_baseline.json" he "aux_baseline=aux:$W/baseline"
  stage eval-baseline "$W/eval-baseline" kvp eval --predictor "$W/ridge" --aux "$W/baseline" "${EV[@]}" \
    -o "$W/eval-baseline"
) &
(
  stage he-ridge "$W/humaneval/kvp_ridge.json" he "kvp_ridge=kvp:$W/ridge"
  stage eval-ridge "$W/eval-ridge" kvp eval --predictor "$W/ridge" "${EV[@]}" -o "$W/eval-ridge"
) &
wait
# one summary over every path (all exist now: nothing is generated again)
he base=base "aux_baseline=aux:$W/baseline" "kvp_ridge=kvp:$W/ridge" "kvp_trained=kvp:$W/kvp" \
  >"$W/logs/he-summary.log" 2>&1
log "done"
