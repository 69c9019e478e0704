#!/usr/bin/env python3
"""KVP with an exact tail (runtime.kvp.prefill_kvp `tail`) at several W, against the base, in one process.

`kvp eval --tail W` measures one W beside every baseline path; this loads the models once,
generates the base's greedy tokens once, and then measures only KVP at each W on the same
held-out pairs: continuation NLL, first-token and greedy-N agreement with the base, and KVP's
prefill FLOPs relative to the base's (the cost of the tail: W more base tokens).

  python benchmarks/tail_agreement.py PREDICTOR --tails 0 8 32 --heldout pypi-code -o OUT.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from kvp_export import data, flops
from kvp_export.evaluate.quality import _nll, _pad
from kvp_export.runtime.decode import decode
from kvp_export.runtime.kvp import SinkCache, prefill_full, prefill_kvp, score_continuation
from kvp_export.runtime.pipeline import KVPPipeline


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("predictor", type=Path)
    p.add_argument("--tails", type=int, nargs="+", default=[0, 8, 32])
    p.add_argument("--heldout", default="pypi-code")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=192)
    p.add_argument("--cont-len", type=int, default=64)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu or cuda (float32 on either, as kvp eval)")
    p.add_argument("-o", "--out", type=Path, required=True)
    a = p.parse_args()
    torch.manual_seed(0)
    pipe = KVPPipeline.from_predictor(a.predictor, device=a.device)
    base, aux, pred = pipe.base, pipe.aux, pipe.predictor
    corpus = data.corpus_from_spec([a.heldout], "heldout")
    prompts, conts = (t.to(a.device) for t in data.eval_pairs(pipe.tokenizer, corpus, a.n, a.prompt_len, a.cont_len))
    sinks = SinkCache(base)
    paths = ["base", *(f"tail{w}" for w in a.tails)]
    nll = {k: torch.zeros(a.n, dtype=torch.float64, device=a.device) for k in paths}
    first = {k: torch.zeros(a.n, dtype=torch.long, device=a.device) for k in paths}
    gen = {k: torch.zeros(a.n, a.greedy_tokens, dtype=torch.long, device=a.device) for k in paths}
    seconds = dict.fromkeys(paths, 0.0)
    for s in range(0, a.n, a.batch):
        sl = slice(s, s + a.batch)
        pr, c = prompts[sl], conts[sl]
        for k in paths:
            t0 = time.perf_counter()
            pre = (prefill_full(base, pr) if k == "base" else
                   prefill_kvp(base, aux, pred, pr, sink_len=pipe.sink_len, sinks=sinks, tail=int(k[4:])))
            seconds[k] += time.perf_counter() - t0
            first[k][sl] = pre.logits.argmax(-1)
            dec = copy.deepcopy(pre)
            nll[k][sl] = _nll(score_continuation(base, pre, c), c).double()
            gen[k][sl] = _pad(decode(base, dec, a.greedy_tokens), a.greedy_tokens)
        done = s + pr.shape[0]
        print(f"{done}/{a.n} pairs", flush=True)
        # written after every batch: a run stopped early still leaves the pairs it measured
        write(a, pipe, corpus, paths, (nll, first, gen, seconds), done)
    print(json.dumps(json.loads(a.out.read_text())["paths"], indent=1))


def write(a, pipe, corpus, paths, measured, done: int) -> None:
    """OUT as measured on the first `done` pairs."""
    nll, first, gen, seconds = measured
    base_flops = flops.prefill_flops(pipe.base, a.prompt_len)
    out = {"predictor": str(a.predictor.resolve()), "heldout": corpus.description, "n": done, "n_planned": a.n,
           "prompt_len": a.prompt_len, "cont_len": a.cont_len, "greedy_tokens": a.greedy_tokens,
           "sink_len": pipe.sink_len, "device": a.device, "threads": torch.get_num_threads(), "paths": {}}
    for k in paths:
        match = (gen[k][:done] == gen["base"][:done]).double()
        kvp = (None if k == "base" else
               flops.kvp_flops(pipe.base, pipe.aux, pipe.predictor, a.prompt_len, int(k[4:]))["total"])
        out["paths"][k] = {
            "nll": float(nll[k][:done].sum() / (done * a.cont_len)),
            "first_token_agreement": float((first[k][:done] == first["base"][:done]).double().mean()),
            f"greedy{a.greedy_tokens}_agreement": float(match.mean()),
            f"greedy{a.greedy_tokens}_exact": float(match.all(dim=1).double().mean()),
            "prefill_flops_vs_base": 1.0 if kvp is None else kvp / base_flops,
            "prefill_seconds_total": seconds[k],  # includes the first batch's warm-up
        }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(a.out)


if __name__ == "__main__":
    main()
