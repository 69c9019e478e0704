#!/usr/bin/env bash
# Issue 16 on one GPU: gemma3-270m KVP trained end to end against its baselines, on the pinned
# `pypi-code` corpus (calibration, training and held-out loss; held-out projects for the evals).
#
#   benchmarks/gemma3_gpu.sh WORK KEEP TOKENS [CALIB_TOKENS]
#
# 1. the model is converted (`kvp models pull`, from the cached GGUF), then the corpus tokenised for it;
# 2. derive (importance selection: it keeps Gemma's critical layers 1 and 3; HEAL healing), then fit
#    (ridge), both on the GPU; beside them the same aux unhealed (`--heal none`) and its fit, a
#    control for the healing;
# 3. then, on the same GPU at the same time: the OE-LP baseline (the aux alone, plain CE) as soon as
#    derive is done and KVP training (aux + predictor through the frozen base) as soon as fit is
#    done, TOKENS each, sequences of SEQ, held-out loss every EVAL_EVERY steps, the best step kept,
#    PATIENCE evaluations without a new best stop a run; with DEADLINE (epoch seconds) each run ends
#    RESERVE minutes before it at the latest (--finish-after) and still writes its output;
# 4. `kvp eval` on the held-out pairs (N of them, prompt 192 + 64, greedy 8) of every path: the
#    closed form (its report also holds base, aux alone healed, no prompt and mean KV), the unhealed
#    closed form, the OE-LP aux alone, and the trained KVP.
# Every stage skips an output that exists, so the script resumes. Logs: WORK/logs/<stage>.log, one
# line per stage on stderr. Env: KVP_PY, M (gemma3-270m), HEAL (bridge), BATCH (16), SEQ (512), LR
# (1e-4), KL (KVP's --kl weight; none by default), EVAL_EVERY (200), EVAL_TOKENS (65536), PATIENCE
# (4), N (128), DEADLINE, RESERVE (0), DEVICE (cuda), CORPUS (pypi-code; for a CPU smoke test, DEVICE=cpu
# and a folder of text, which skips `kvp data build`).
set -u
W=$1 KEEP=$2 TOKENS=$3 CALIB=${4:-200000}
PY=${KVP_PY:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
M=${M:-gemma3-270m} HEAL=${HEAL:-bridge}
BATCH=${BATCH:-16} SEQ=${SEQ:-512} LR=${LR:-1e-4} EVAL_EVERY=${EVAL_EVERY:-200} EVAL_TOKENS=${EVAL_TOKENS:-65536}
PATIENCE=${PATIENCE:-4} RESERVE=${RESERVE:-0} DEVICE=${DEVICE:-cuda} N=${N:-128} CORPUS=${CORPUS:-pypi-code}
mkdir -p "$W/logs"

TAG=gemma3
source "$HERE/gpu_stages.sh"
EV=(--heldout "$CORPUS" --n "$N" --prompt-len 192 --cont-len 64 --greedy-tokens 8 --device "$DEVICE")
SEL=(--base "$M" -k "$KEEP" --select importance --calib "$CORPUS" --calib-tokens "$CALIB" --device "$DEVICE")

log "work $W, model $M, keep $KEEP, heal $HEAL, tokens $TOKENS, calibration $CALIB, batch $BATCH x $SEQ, lr $LR, kl ${KL:-none}"
log "model: $(kvp models pull "$M" 2>"$W/logs/pull.log")"
[ "$CORPUS" != pypi-code ] || stage data-build "$W/logs/data-build.done" sh -c "\"$PY\" -m kvp_export.cli data build --tokenizer $M \
    && touch \"$W/logs/data-build.done\"" || exit 1
stage derive "$W/aux" kvp derive "${SEL[@]}" --heal "$HEAL" -o "$W/aux" || exit 1

train_args "$CORPUS"
(
  stage train-baseline "$W/baseline" kvp train --baseline --aux "$W/aux" "${TRAIN[@]}" $(finish) -o "$W/baseline" \
    || exit 1
  eval_baseline
) &
stage fit "$W/ridge" kvp fit --aux "$W/aux" --calib "$CORPUS" --calib-tokens "$CALIB" --device "$DEVICE" -o "$W/ridge" \
  || exit 1
(
  stage train-kvp "$W/kvp" kvp train --predictor "$W/ridge" "${TRAIN[@]}" ${KL:+--kl "$KL"} $(finish) -o "$W/kvp" \
    || exit 1
  stage eval-kvp "$W/eval-kvp" kvp eval --predictor "$W/kvp" "${EV[@]}" -o "$W/eval-kvp"
) &
stage eval-ridge "$W/eval-ridge" kvp eval --predictor "$W/ridge" "${EV[@]}" -o "$W/eval-ridge"
if [ "$HEAL" != none ]; then  # the control: the same layers, no healing
  stage derive-none "$W/aux-none" kvp derive "${SEL[@]}" --heal none -o "$W/aux-none" \
    && stage fit-none "$W/ridge-none" kvp fit --aux "$W/aux-none" --calib "$CORPUS" --calib-tokens "$CALIB" \
      --device "$DEVICE" -o "$W/ridge-none" \
    && stage eval-none "$W/eval-none" kvp eval --predictor "$W/ridge-none" "${EV[@]}" -o "$W/eval-none"
fi
wait
log "done"
