# Shared helpers of the GPU pipelines (benchmarks/issue11_gpu.sh, benchmarks/gemma3_gpu.sh); sourced.
# The caller sets PY (python), W (work folder, with W/logs), TAG (the log lines' prefix) and, for
# `finish`, DEADLINE (epoch seconds; optional) and RESERVE (minutes).
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
