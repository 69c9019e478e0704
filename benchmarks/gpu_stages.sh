# Shared helpers of the GPU pipelines (benchmarks/issue11_gpu.sh, benchmarks/gemma3_gpu.sh); sourced.
# The caller sets PY (python), W (work folder, with W/logs), TAG (the log lines' prefix) and, for
# `finish`, DEADLINE (epoch seconds; optional) and RESERVE (minutes); `train_args` and
# `eval_baseline` read TOKENS BATCH SEQ LR DEVICE EVAL_EVERY EVAL_TOKENS PATIENCE and EV.
kvp() { "$PY" -m kvp_export.cli "$@"; }
log() { echo "[$TAG $(date +%H:%M:%S)] $*" >&2; }
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
finish() {  # the --finish-after minutes left until RESERVE minutes before DEADLINE (nothing without one)
  [ -n "${DEADLINE:-}" ] && echo "--finish-after $(( (DEADLINE - RESERVE * 60 - $(date +%s)) / 6 ))e-1"
}
train_args() {  # train_args CORPUS: the TRAIN array both trainings (KVP, OE-LP) share, so their budgets match
  TRAIN=(--data "$1" --tokens "$TOKENS" --batch "$BATCH" --seq-len "$SEQ" --lr "$LR" --device "$DEVICE"
         --eval-every "$EVAL_EVERY" --eval-tokens "$EVAL_TOKENS" --patience "$PATIENCE" --checkpoint-every 1000000)
}
eval_baseline() {  # eval_baseline [PREFIX...]: the OE-LP aux's held-out eval once fit's ridge exists (it reads it)
  for _ in $(seq 240); do [ -e "$W/ridge" ] && break; sleep 5; done
  stage eval-baseline "$W/eval-baseline" "$@" kvp eval --predictor "$W/ridge" --aux "$W/baseline" "${EV[@]}" \
    -o "$W/eval-baseline"
}
