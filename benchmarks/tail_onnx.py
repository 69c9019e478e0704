#!/usr/bin/env python3
"""KVP's exact tail through onnxruntime at several W, in one process, on one export (the graphs do
not depend on W: the runtime's `tail` is set per call).

1. parity: KVP's first-token logits through the ONNX runtime against PyTorch's
   `prefill_kvp(tail=W)` on the first `--parity-n` held-out prompts (one row left-padded), and
   their greedy tokens;
2. quality: on the export's held-out pairs, continuation NLL, first-token and greedy-N
   agreement with the base (all through the graphs), as `kvp validate --check quality`;
3. TTFT: KVP at each W and the base, batch 1, random prompts of each length, timed interleaved
   (every path once per round, `--repeats` rounds after `--warmup`): medians and ratios to W=0.

  python benchmarks/tail_onnx.py EXPORT --tails 0 8 32 --lengths 128 512 -o OUT.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kvp_export.runtime.decode import decode
from kvp_export.runtime.kvp import prefill_kvp
from kvp_export.runtime.pipeline import KVPPipeline
from kvp_validate.artifact import OnnxArtifact
from kvp_validate.parity import rel_error
from kvp_validate.quality import _pad, log_softmax
from kvp_validate.runtime import OnnxKVP

from _bench import parser, write_result


def parity(rt: OnnxKVP, pipe: KVPPipeline, prompts: np.ndarray, tails, greedy: int = 8) -> dict:
    ids = prompts.copy()
    mask = np.ones_like(ids)
    ids[-1, :5], mask[-1, :5] = 0, 0  # one left-padded row
    out = {}
    for w in tails:
        rt.tail = w
        state = rt.prefill(ids, mask, "kvp")
        want = prefill_kvp(pipe.base, pipe.aux, pipe.predictor, torch.from_numpy(ids), torch.from_numpy(mask),
                           sink_len=pipe.sink_len, sinks=pipe.sinks, tail=w)
        got = rt.decode(state, greedy, eos_ids=set())
        ref = decode(pipe.base, want, greedy, eos_ids=set()).numpy()
        out[f"tail{w}"] = {"mode": state.mode, "logits_rel": rel_error(state.logits, want.logits.numpy()),
                           "max_abs": float(np.abs(state.logits - want.logits.numpy()).max()),
                           f"greedy{greedy}_equal": float((got == ref).mean()), "rows": len(ids)}
    return out


def quality(rt: OnnxKVP, prompts: np.ndarray, conts: np.ndarray, tails, greedy: int, batch: int = 8) -> dict:
    paths = ["base", *(f"tail{w}" for w in tails)]
    nll = dict.fromkeys(paths, 0.0)
    first, gen = {k: [] for k in paths}, {k: [] for k in paths}
    for s in range(0, len(prompts), batch):
        p, c = prompts[s : s + batch], conts[s : s + batch]
        for k in paths:
            if k != "base":
                rt.tail = int(k[4:])
            state = rt.prefill(p, None, "base" if k == "base" else "kvp")
            lp = log_softmax(rt.score(state, c))
            nll[k] += float(-np.take_along_axis(lp, c[..., None], -1).sum())
            first[k].append(state.logits.argmax(-1))
            gen[k].append(_pad(rt.decode(state, greedy, eos_ids=set()), greedy))
        done = summary(nll, first, gen, conts[: s + len(p)].size, greedy)
        print(f"quality {s + len(p)}/{len(prompts)}: {json.dumps(done)}", flush=True)  # so far: a stopped run says it
    return done


def summary(nll: dict, first: dict, gen: dict, n_tokens: int, greedy: int) -> dict:
    first = {k: np.concatenate(v) for k, v in first.items()}
    gen = {k: np.concatenate(v) for k, v in gen.items()}
    return {k: {"nll": nll[k] / n_tokens, "first_token_agreement": float((first[k] == first["base"]).mean()),
                f"greedy{greedy}_agreement": float((gen[k] == gen["base"]).mean()),
                f"greedy{greedy}_exact": float((gen[k] == gen["base"]).all(1).mean())} for k in first}


def ttft(rt: OnnxKVP, tails, lengths, warmup: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for n in lengths:
        ids = rng.integers(0, rt.model["vocab"], size=(1, n), dtype=np.int64)
        mask = np.ones_like(ids)
        times: dict[str, list[float]] = {"base": [], **{f"tail{w}": [] for w in tails}}
        for r in range(warmup + repeats):
            for k in times:
                if k != "base":
                    rt.tail = int(k[4:])
                t0 = time.perf_counter()
                rt.prefill(ids, mask, "base" if k == "base" else "kvp")
                if r >= warmup:
                    times[k].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"1x{n}"] = {"ms": med, "vs_tail0": {k: med[k] / med[f"tail{tails[0]}"] for k in med},
                         "kvp_speedup": {k: med["base"] / med[k] for k in med if k != "base"}}
        print(f"ttft 1x{n}: {out[f'1x{n}']}", flush=True)
    return out


def main() -> None:
    p = parser(__doc__, out_required=True)
    p.add_argument("export", type=Path)
    p.add_argument("--variant", default="fp32")
    p.add_argument("--tails", type=int, nargs="+", default=[0, 8, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parity-n", type=int, default=4)
    p.add_argument("--n", type=int, default=None, help="held-out pairs for quality (default: all the export's)")
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--skip", nargs="*", default=[], choices=["parity", "quality", "ttft"])
    a = p.parse_args()
    art = OnnxArtifact.open(a.export)
    rt = OnnxKVP(art, a.variant, a.threads)
    rt.load("kvp"), rt.session("base_prefill")
    prompts, conts = (x.astype(np.int64) for x in art.eval_pairs(a.n))
    out = {"export": str(a.export.resolve()), "variant": a.variant, "threads": a.threads, "tails": a.tails,
           "torch_threads": torch.get_num_threads()}

    def save() -> None:  # after every section: a run stopped early keeps what it measured
        write_result(a.out, out)

    if "parity" not in a.skip:
        pipe = KVPPipeline.from_predictor(art.manifest.inputs["predictor"]["path"])
        out["parity"] = parity(rt, pipe, prompts[: a.parity_n], a.tails)
        print(json.dumps(out["parity"], indent=1), flush=True)
        del pipe
        save()
    if "ttft" not in a.skip:
        out["ttft"] = {"warmup": a.warmup, "repeats": a.repeats, **ttft(rt, a.tails, a.lengths, a.warmup, a.repeats)}
        save()
    if "quality" not in a.skip:
        out["quality"] = {"pairs": len(prompts), "prompt_len": int(prompts.shape[1]),
                          "paths": quality(rt, prompts, conts, a.tails, a.greedy_tokens)}
        print(json.dumps(out["quality"], indent=1), flush=True)
        save()


if __name__ == "__main__":
    main()
