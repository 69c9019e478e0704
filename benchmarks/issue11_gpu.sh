#!/usr/bin/env bash
# Issue 11, deliverable 3 on one GPU or two: qwen2.5-coder-0.5b at one keep ratio, on the pinned
# `pypi-code` corpus (calibration, training and held-out loss; held-out projects for the evals).
#
#   benchmarks/issue11_gpu.sh WORK KEEP TOKENS [CALIB_TOKENS]
#
# 1. the model is converted (`kvp models pull`, from the cached GGUF), beside the corpus's
#    tokenisation for it (`kvp data build`; with TOKENIZER, a folder holding the same tokenizer,
#    both run at once); then HumanEval of the base (all 164, greedy, sandboxed) starts;
# 2. derive (SELECT layer selection, HEAL healing), then fit (ridge), both with --device cuda (on
#    failure: again on the CPU with at most 100k calibration tokens, and the log says so);
# 3. then, all on the same GPU and at the same time:
#    - the OE-LP baseline (the aux alone, plain CE) as soon as derive is done, KVP training (aux +
#      predictor through the frozen base) as soon as fit is done: TOKENS each, sequences of SEQ
#      tokens, held-out loss every EVAL_EVERY steps on the corpus's held-out projects, the best
#      step's weights kept, PATIENCE evaluations without a new best stop a run; with DEADLINE
#      (epoch seconds) each run ends RESERVE minutes before it at the latest (--finish-after)
#      and still writes its output;
#    - HumanEval and the held-out NLL / agreement eval (`kvp eval --device cuda`) of the closed
#      form (and, with HE_AUX, HumanEval of the healed aux alone); then those of each trained
#      path as soon as its training ends;
#    - with TAIL=W, the same HumanEval and eval of the closed form and of the trained KVP with
#      `--tail W` (the base reads the prompt's last W tokens exactly), beside those without; with
#      TAILS="0 8 32 ...", benchmarks/tail_agreement.py of both at each of those W;
#    - with ONNX_HE=N, on the CPU (niced, one export at a time): the paths in ONNX_PATHS (the
#      closed form "ridge", then the trained KVP "kvp") exported to ONNX (fp32 + int8) and
#      validated through onnxruntime (int8: parity, and HumanEval on the first N problems;
#      VAL_THREADS threads).
# With NPROC=2 (two GPUs) step 3 runs in order instead: GPU 1 takes every HumanEval and eval; GPU 0
# first trains KVP alone for PROBE steps (one process, the same global batch through --accum: the
# one-GPU throughput), then both train under torchrun (DDP over NCCL), the OE-LP baseline first,
# then KVP (the --finish-after guard applies to it); the trained paths' HumanEval and evals follow.
# Every stage skips an output that exists, so the script resumes. Logs: WORK/logs/<stage>.log,
# one line per stage on stderr. HumanEval runs in the OS sandbox where the machine gives one,
# else with --allow-unsafe-execution (the log says which). Env: KVP_PY (python), M (model,
# qwen2.5-coder-0.5b), HE_FLAGS (extra humaneval_gpu.py flags, e.g. --limit 2), BATCH (32),
# SEQ (256), LR (1e-4), KL (KVP's --kl weight; none by default), EVAL_EVERY (200), EVAL_TOKENS
# (65536), PATIENCE (4), DEADLINE, RESERVE (0), TOKENIZER, HE_AUX, TAIL, TAILS, ONNX_HE, ONNX_PATHS
# ("ridge kvp"), VAL_THREADS (12), BASELINE (1; 0 skips the OE-LP baseline), DEVICE (cuda; cpu for
# a smoke test), SELECT (regular), HEAL (bridge), NPROC (1), PROBE (100), EVAL_N (64: held-out pairs),
# HEALS (with NPROC > 1, e.g. "bridge none": candidates, the better closed form is trained).
set -u
W=$1 KEEP=$2 TOKENS=$3 CALIB=${4:-200000}
PY=${KVP_PY:-python3}
M=${M:-qwen2.5-coder-0.5b}
HERE=$(cd "$(dirname "$0")" && pwd)
BATCH=${BATCH:-32} SEQ=${SEQ:-256} LR=${LR:-1e-4} EVAL_EVERY=${EVAL_EVERY:-200} EVAL_TOKENS=${EVAL_TOKENS:-65536}
PATIENCE=${PATIENCE:-4} RESERVE=${RESERVE:-0} VAL_THREADS=${VAL_THREADS:-12} DEVICE=${DEVICE:-cuda}
ONNX_PATHS=${ONNX_PATHS:-ridge kvp} BASELINE=${BASELINE:-1} TAIL=${TAIL:-}
SELECT=${SELECT:-regular} HEAL=${HEAL:-bridge} NPROC=${NPROC:-1} PROBE=${PROBE:-100}
G0= G1=  # with NPROC > 1: the GPU of the first stages and probe, and the GPU of HumanEval and evals
[ "$NPROC" -gt 1 ] && G0=0 G1=1
AUX_RUN=aux_$([ "$HEAL" = none ] && echo unhealed || echo healed)  # the aux alone's HumanEval name
mkdir -p "$W/logs"

TAG=issue11
source "$HERE/gpu_stages.sh"
on() {  # on GPU COMMAND...: COMMAND sees only that GPU (no GPU given: all, as without NPROC)
  local g=$1
  shift
  if [ -n "$g" ]; then CUDA_VISIBLE_DEVICES=$g "$@"; else "$@"; fi
}
he() {  # he NAME=KIND[:FOLDER]...: HumanEval of these paths into WORK/humaneval
  "$PY" "$HERE/humaneval_gpu.py" --base "$M" --out "$W/humaneval" --batch 32 ${HE_FLAGS:-} $UNSAFE \
    $(for r in "$@"; do printf -- '--run %s ' "$r"; done)
}
onnx() {  # onnx NAME PREDICTOR: export (fp32 + int8), then validate int8 (parity, HumanEval first ONNX_HE)
  local name=$1 pred=$2
  [ -n "${ONNX_HE:-}" ] && [[ " $ONNX_PATHS " == *" $name "* ]] || return 0
  (
    flock 9  # one export or validation at a time: they share the CPU with the GPU stages' feeders
    stage "export-$name" "$W/onnx-$name" nice -n 5 "$PY" -m kvp_export.cli export onnx --predictor "$pred" \
      --variant int8 --heldout pypi-code -o "$W/onnx-$name" || exit 1
    stage "validate-$name" "$W/validate-$name" nice -n 5 "$PY" -m kvp_export.cli validate "$W/onnx-$name" \
      --variant int8 --check parity --check humaneval --humaneval-limit "$ONNX_HE" --threads "$VAL_THREADS" \
      $UNSAFE -o "$W/validate-$name"
    find "$W/onnx-$name" -name '*.onnx*' -delete  # tens of GB of graphs; the manifest stays
  ) 9>"$W/logs/onnx.lock"
}
summary() {  # one summary over every path (all exist now: nothing is generated again)
  he base=base ${HE_AUX:+"$AUX_RUN=aux:$W/aux"} $([ "$BASELINE" = 1 ] && echo "aux_baseline=aux:$W/baseline") \
    "kvp_ridge=kvp:$W/ridge" $([ "$NPROC" = 1 ] && echo ${TAIL:+"kvp_ridge_tail$TAIL=kvp:$W/ridge"}) \
    "kvp_trained=kvp:$W/kvp" ${TAIL:+"kvp_trained_tail$TAIL=kvp:$W/kvp"} >"$W/logs/he-summary.log" 2>&1
  log "done"
}
candidates() {  # candidates HEAL...: one aux per healing, derived, fitted and evaluated (EV) on GPU 0 and 1
  # in turn, at once; WORK/aux, ridge and eval-ridge then link the one whose closed form agrees best with
  # the base (greedy-32 agreement, then first-token agreement, then NLL), and HEAL is its healing
  local h g pids=() n=0
  for h in "$@"; do
    g=$([ $((n % 2)) = 0 ] && echo "$G0" || echo "$G1")
    n=$((n + 1))
    (
      c=$W/cand-$h
      stage "derive-$h" "$c/aux" on "$g" kvp derive --base "$M" -k "$KEEP" --select "$SELECT" --heal "$h" \
          --calib pypi-code --calib-tokens "$CALIB" --device "$DEVICE" -o "$c/aux" \
        && stage "fit-$h" "$c/ridge" on "$g" kvp fit --aux "$c/aux" --calib pypi-code --calib-tokens "$CALIB" \
          --device "$DEVICE" -o "$c/ridge" \
        && stage "eval-$h" "$c/eval" on "$g" kvp eval --predictor "$c/ridge" "${EV[@]}" -o "$c/eval"
    ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  HEAL=$("$PY" - "$W" "$@" <<'EOF'
import json, sys
from pathlib import Path
w, heals = Path(sys.argv[1]), sys.argv[2:]
def score(h):
    k = json.loads((w / f"cand-{h}" / "eval" / "report.json").read_text())["results"]["paths"]["kvp"]
    return k["greedy32_agreement"], k["first_token_agreement"], -k["nll"]
print(max((h for h in heals if (w / f"cand-{h}" / "eval" / "report.json").exists()), key=score))
EOF
  ) || exit 1
  ln -sfn "cand-$HEAL/aux" "$W/aux" && ln -sfn "cand-$HEAL/ridge" "$W/ridge" && ln -sfn "cand-$HEAL/eval" "$W/eval-ridge"
  AUX_RUN=aux_$([ "$HEAL" = none ] && echo unhealed || echo healed)
  log "candidates $*: heal $HEAL goes on"
}
two_gpus() {  # step 3 with NPROC GPUs (header); the fit is done
  local tr=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m kvp_export.cli train) jobs=()
  (
    stage he-ridge "$W/humaneval/kvp_ridge.json" on "$G1" he "kvp_ridge=kvp:$W/ridge"
    [ -n "${HE_AUX:-}" ] && stage he-aux "$W/humaneval/$AUX_RUN.json" on "$G1" he "$AUX_RUN=aux:$W/aux"
    stage eval-ridge "$W/eval-ridge" on "$G1" kvp eval --predictor "$W/ridge" "${EV[@]}" -o "$W/eval-ridge"
  ) &
  jobs+=($!)
  stage train-probe "$W/kvp-1gpu" on "$G0" kvp train --predictor "$W/ridge" --data pypi-code --batch "$BATCH" \
    --accum "$NPROC" --seq-len "$SEQ" --lr "$LR" --device "$DEVICE" --tokens $((PROBE * BATCH * NPROC * SEQ)) \
    --eval-every 0 --checkpoint-every 1000000 ${KL:+--kl "$KL"} -o "$W/kvp-1gpu"
  rm -f "$W"/kvp-1gpu/*.safetensors "$W"/kvp-1gpu/aux/*.safetensors  # a throughput probe: no path of its own
  if [ "$BASELINE" = 1 ]; then
    stage train-baseline "$W/baseline" "${tr[@]}" --baseline --aux "$W/aux" "${TRAIN[@]}" -o "$W/baseline" || exit 1
    (
      stage he-baseline "$W/humaneval/aux_baseline.json" on "$G1" he "aux_baseline=aux:$W/baseline"
      eval_baseline on "$G1"
    ) &
    jobs+=($!)
  fi
  stage train-kvp "$W/kvp" "${tr[@]}" --predictor "$W/ridge" "${TRAIN[@]}" ${KL:+--kl "$KL"} $(finish) -o "$W/kvp" \
    || exit 1
  onnx kvp "$W/kvp" &
  on "$G0" with_tail kvp kvp_trained &
  jobs+=($!)
  stage he-kvp "$W/humaneval/kvp_trained.json" on "$G1" he "kvp_trained=kvp:$W/kvp"
  stage eval-kvp "$W/eval-kvp" on "$G1" kvp eval --predictor "$W/kvp" "${EV[@]}" -o "$W/eval-kvp"
  wait "$HE_BASE" "${jobs[@]}"
  summary  # "done" when every GPU path is measured; the CPU's ONNX export and validation may still run
  wait
  log "onnx: done"
}
EV=(--heldout pypi-code --n "${EVAL_N:-64}" --prompt-len 192 --cont-len 64 --greedy-tokens 32 --device "$DEVICE")
with_tail() {  # with_tail NAME HE_PATH: with TAIL, HumanEval and eval of WORK/NAME with --tail TAIL; TAILS
  if [ -n "$TAIL" ]; then
    HE_FLAGS="${HE_FLAGS:-} --tail $TAIL" stage "he-$1-tail" "$W/humaneval/$2_tail$TAIL.json" he "$2_tail$TAIL=kvp:$W/$1"
    stage "eval-$1-tail" "$W/eval-$1-tail$TAIL" kvp eval --predictor "$W/$1" "${EV[@]}" --tail "$TAIL" \
      -o "$W/eval-$1-tail$TAIL"
  fi
  [ -z "${TAILS:-}" ] || stage "tails-$1" "$W/tails-$1.json" "$PY" "$HERE/tail_agreement.py" "$W/$1" --tails $TAILS \
    --device "$DEVICE" -o "$W/tails-$1.json"
}

log "work $W, model $M, keep $KEEP ($SELECT, heal $HEAL), tokens $TOKENS, calibration $CALIB, batch $BATCH x $SEQ \
x $NPROC processes, lr $LR, kl ${KL:-none}"
EARLY=
if [ -n "${TOKENIZER:-}" ]; then  # the same tokenizer (same SHA-256) as the model's, so these are its shards
  stage data-early "$W/logs/data-early.done" sh -c "\"$PY\" -m kvp_export.cli data build --tokenizer \"$TOKENIZER\" \
      && touch \"$W/logs/data-early.done\"" &
  EARLY=$!
fi
log "model: $(kvp models pull "$M" 2>"$W/logs/pull.log")"
# the OS sandbox if this machine gives one, else the documented opt-in
why=$("$PY" -c "from kvp_validate.sandbox import os_sandbox_error as e; print(e() or '')")
UNSAFE=${why:+--allow-unsafe-execution}
log "HumanEval sandbox: ${why:-bubblewrap layers available}${why:+; running with --allow-unsafe-execution}"
stage he-base "$W/humaneval/base.json" on "$G1" he base=base &
HE_BASE=$!
[ -n "$EARLY" ] && wait "$EARLY"
stage data-build "$W/logs/data-build.done" sh -c "\"$PY\" -m kvp_export.cli data build --tokenizer $M \
    && touch \"$W/logs/data-build.done\"" || exit 1
[ "$NPROC" -gt 1 ] && [ -n "${HEALS:-}" ] && candidates $HEALS
SEL=(--base "$M" -k "$KEEP" --select "$SELECT" --heal "$HEAL" --calib pypi-code)
stage derive "$W/aux" on "$G0" kvp derive "${SEL[@]}" --calib-tokens "$CALIB" --device "$DEVICE" -o "$W/aux" \
  || stage derive-cpu "$W/aux" kvp derive "${SEL[@]}" \
    --calib-tokens $((CALIB < 100000 ? CALIB : 100000)) -o "$W/aux" || exit 1

train_args pypi-code
[ "$NPROC" = 1 ] && [ "$BASELINE" = 1 ] && (
  stage train-baseline "$W/baseline" kvp train --baseline --aux "$W/aux" "${TRAIN[@]}" $(finish) -o "$W/baseline" \
    || exit 1
  stage he-baseline "$W/humaneval/aux_baseline.json" he "aux_baseline=aux:$W/baseline"
  eval_baseline
) &
stage fit "$W/ridge" on "$G0" kvp fit --aux "$W/aux" --calib pypi-code --calib-tokens "$CALIB" --device "$DEVICE" -o "$W/ridge" \
  || stage fit-cpu "$W/ridge" kvp fit --aux "$W/aux" --calib pypi-code \
    --calib-tokens $((CALIB < 100000 ? CALIB : 100000)) -o "$W/ridge" || exit 1
[ "$NPROC" -gt 1 ] && { two_gpus; exit; }
(
  stage train-kvp "$W/kvp" kvp train --predictor "$W/ridge" "${TRAIN[@]}" ${KL:+--kl "$KL"} $(finish) -o "$W/kvp" \
    || exit 1
  onnx kvp "$W/kvp" &
  with_tail kvp kvp_trained &
  stage he-kvp "$W/humaneval/kvp_trained.json" he "kvp_trained=kvp:$W/kvp"
  stage eval-kvp "$W/eval-kvp" kvp eval --predictor "$W/kvp" "${EV[@]}" -o "$W/eval-kvp"
  wait
) &
(
  with_tail ridge kvp_ridge &
  stage he-ridge "$W/humaneval/kvp_ridge.json" he "kvp_ridge=kvp:$W/ridge"
  [ -n "${HE_AUX:-}" ] && stage he-aux "$W/humaneval/$AUX_RUN.json" he "$AUX_RUN=aux:$W/aux"
  stage eval-ridge "$W/eval-ridge" kvp eval --predictor "$W/ridge" "${EV[@]}" -o "$W/eval-ridge"
  wait
) &
onnx ridge "$W/ridge" &
wait
summary
