#!/usr/bin/env python3
"""HumanEval pass@1 (all 164 problems, greedy, executed in the sandbox) for base, aux alone and KVP,
with batched generation on a GPU through the PyTorch runtime (kvp_export.runtime).

Each `--run NAME=KIND[:FOLDER]` is one path; its full result goes to OUT/NAME.json and a run
whose file exists is skipped (so the command resumes). KIND is
  base               the base alone (ordinary prefill and decoding);
  aux:FOLDER         an aux folder alone (derive or `kvp train --baseline` output), as a model;
  kvp:FOLDER         a predictor folder (kvp fit, or kvp train's KVP output, which names its
                     trained aux): aux + predictor read the prompt, the base generates.
OUT/summary.json lists pass@1 per path and relative to the base's.

  python benchmarks/humaneval_gpu.py --base qwen2.5-coder-0.5b --out runs/he \\
      --run base=base --run aux_baseline=aux:runs/t/baseline --run kvp_ridge=kvp:runs/t/ridge

Prompts are sorted by length and generated in batches (left padding), greedy, up to
--max-new-tokens; a batch stops once every row has reached EOS or a line at column 0 (where
`truncate` cuts the completion anyway), so early stopping never changes a result.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from kvp_export.artifacts import read_manifest
from kvp_export.models import check_same_tokenizer, load
from kvp_export.predictor.module import KVPredictor
from kvp_export.runtime.decode import decode
from kvp_export.runtime.kvp import SinkCache, prefill_full, prefill_kvp
from kvp_export.runtime.pipeline import _eos_ids
from kvp_export.stage import ref_spec
from kvp_validate.errors import KvpError
from kvp_validate.humaneval import _TOP_LEVEL, run_humaneval
from kvp_validate.sandbox import layers

from _bench import parser

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def batched_generate(tok, decode_model, prefill, *, batch: int, max_new: int, eos_ids: set[int], device, log):
    """A run_humaneval generator: greedy, batched by prompt length, early stop at column-0 lines."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def until_eos(row: list[int]) -> list[int]:
        return next((row[:i] for i, t in enumerate(row) if t in eos_ids), row)

    def finished(rows: list[list[int]]) -> list[bool]:
        out = []
        for r in rows:
            cut = until_eos(r)
            out.append(len(cut) < len(r) or _TOP_LEVEL.search(tok.decode(cut, skip_special_tokens=True)) is not None)
        return out

    def generate(prompts: list[str], n: int) -> list[list[str]]:
        assert n == 1, "greedy: one sample per problem"
        lengths = [len(tok(p).input_ids) for p in prompts]
        order = sorted(range(len(prompts)), key=lengths.__getitem__)
        out: list[list[str] | None] = [None] * len(prompts)
        for b0 in range(0, len(order), batch):
            idx = order[b0:b0 + batch]
            t0 = time.perf_counter()
            enc = tok([prompts[i] for i in idx], padding=True, return_tensors="pt")
            ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
            pre = prefill(ids, mask)
            gen = decode(decode_model, pre, max_new, eos_ids=eos_ids, pad_id=tok.pad_token_id, stop=finished)
            for i, row in zip(idx, gen.tolist()):
                out[i] = [tok.decode(until_eos(row), skip_special_tokens=True)]
            log(f"  batch {b0 // batch + 1}: {len(idx)} prompts of <= {ids.shape[1]} tokens, {gen.shape[1]} steps, "
                f"{time.perf_counter() - t0:.1f}s")
        return out  # type: ignore[return-value]

    return generate


def main() -> int:
    p = parser(__doc__, out_required=True, out_help="folder: one JSON per path, then summary.json")
    p.add_argument("--base", help="base model spec (default: the one the first kvp folder names)")
    p.add_argument("--run", action="append", required=True, metavar="NAME=KIND[:FOLDER]")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--limit", type=int, help="first N problems only (smoke tests)")
    p.add_argument("--workers", type=int, default=8, help="sandboxes at a time")
    p.add_argument("--sink-len", type=int, help="exact sink positions (default: the predictor's)")
    p.add_argument("--tail", type=int, default=0,
                   help="KVP: the base reads the prompt's last TAIL + 1 tokens exactly (runtime.kvp.prefill_kvp)")
    p.add_argument("--allow-unsafe-execution", action="store_true",
                   help="execute completions even where no OS sandbox (bubblewrap) is available (docs/sandbox.md)")
    a = p.parse_args()
    try:
        layers(a.allow_unsafe_execution)  # refused here, before any model loads, on a host with no OS sandbox
    except KvpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    a.out.mkdir(parents=True, exist_ok=True)
    dtype, device = DTYPES[a.dtype], torch.device(a.device)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    runs = []
    for r in a.run:
        name, _, spec = r.partition("=")
        kind, _, folder = spec.partition(":")
        if kind not in ("base", "aux", "kvp") or (kind != "base") != bool(folder) or not name:
            p.error(f"bad --run {r!r}")
        runs.append((name, kind, folder))
    base_spec = a.base or next((ref_spec(read_manifest(f, "predictor")["inputs"]["base"])
                                for _, k, f in runs if k == "kvp"), None)
    if base_spec is None:
        p.error("give --base")

    todo = [r for r in runs if not (a.out / f"{r[0]}.json").exists()]
    base = tok = None
    if any(k in ("base", "kvp") for _, k, _ in todo):
        t0 = time.perf_counter()
        base, tok = load(base_spec, dtype=dtype)
        base = base.to(device)
        log(f"base {base_spec} loaded in {time.perf_counter() - t0:.1f}s")
    for name, kind, folder in todo:
        t0 = time.perf_counter()
        info: dict = {"kind": kind, "folder": folder or None, "base": base_spec}
        if kind == "base":
            model, mtok = base, tok
            prefill = lambda ids, mask, m=base: prefill_full(m, ids, mask)
        elif kind == "aux":
            model, mtok = load(folder, dtype=dtype)
            model = model.to(device)
            prefill = lambda ids, mask, m=model: prefill_full(m, ids, mask)
        else:
            man = read_manifest(folder, "predictor")
            aux_dir = man["inputs"]["aux"]["path"]
            aux, aux_tok = load(aux_dir, dtype=dtype)
            aux = aux.to(device)
            check_same_tokenizer(tok, aux_tok)
            pred = KVPredictor.load(folder).to(device)
            sink = a.sink_len if a.sink_len is not None else man.get("sink_len", 1)
            sinks = SinkCache(base)
            info.update(aux=aux_dir, sink_len=sink, tail=a.tail)
            model, mtok = base, tok
            prefill = (lambda ids, mask, aux=aux, pred=pred, sink=sink, sinks=sinks:
                       prefill_kvp(base, aux, pred, ids, mask, sink_len=sink, sinks=sinks, tail=a.tail))
        log(f"[{name}] {kind} {folder or ''}")
        gen = batched_generate(mtok, model, prefill, batch=a.batch, max_new=a.max_new_tokens,
                               eos_ids=_eos_ids(mtok, model), device=device, log=log)
        with torch.inference_mode():
            report = run_humaneval(gen, limit=a.limit, workers=a.workers, progress=False,
                                   allow_unsafe=a.allow_unsafe_execution)
        info.update(pass_at_1=report["pass_at_k"]["pass@1"], passed=report["problems_passed"],
                    n_problems=report["n_problems"], status_counts=report["status_counts"], sandbox=report["sandbox"],
                    seconds={**report["seconds"], "total_with_load": time.perf_counter() - t0},
                    device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    dtype=a.dtype, batch=a.batch, max_new_tokens=a.max_new_tokens)
        report["run"] = info
        (a.out / f"{name}.json.tmp").write_text(json.dumps(report, indent=1) + "\n")
        (a.out / f"{name}.json.tmp").rename(a.out / f"{name}.json")
        log(f"[{name}] pass@1 {info['pass_at_1']:.4f} ({info['passed']}/{info['n_problems']}), "
            f"generate {report['seconds']['generate']:.1f}s, check {report['seconds']['check']:.1f}s")
        if kind == "aux":
            del model
        elif kind == "kvp":
            del aux, pred
        if device.type == "cuda":
            torch.cuda.empty_cache()

    summary = {}
    for name, _, _ in runs:
        f = a.out / f"{name}.json"
        if f.exists():
            summary[name] = json.loads(f.read_text())["run"]
    if "base" in summary and summary["base"]["pass_at_1"] > 0:
        for s in summary.values():
            s["relative_to_base"] = s["pass_at_1"] / summary["base"]["pass_at_1"]
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: {x: v.get(x) for x in ("pass_at_1", "passed", "relative_to_base")}
                      for k, v in summary.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
