#!/usr/bin/env python3
"""KVP with an exact tail (runtime.kvp.prefill_kvp `tail`) at several W, against the base, in one process.

`kvp eval --tail W` measures one W beside every baseline path; this loads the models once,
generates the base's greedy tokens once, and then measures only KVP at each W on the same
held-out pairs: continuation NLL, first-token and greedy-N agreement with the base, and KVP's
prefill FLOPs relative to the base's (the cost of the tail: W more base tokens).

  python benchmarks/tail_agreement.py PREDICTOR --tails 0 8 32 --heldout pypi-code -o OUT.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvp_export import data, flops
from kvp_export.config import EvalConfig
from kvp_export.evaluate.quality import PathRuns, run_paths
from kvp_export.runtime.kvp import SinkCache, prefill_full, prefill_kvp
from kvp_export.runtime.pipeline import KVPPipeline

from _bench import config_args, parser, write_result


@torch.no_grad()
def main() -> None:
    p = parser(__doc__, out_required=True)
    p.add_argument("predictor", type=Path)
    p.add_argument("--tails", type=int, nargs="+", default=[0, 8, 32])
    p.add_argument("--heldout", default="pypi-code")
    config_args(p, EvalConfig, "n", "prompt_len", "cont_len", "greedy_tokens", "batch")
    p.add_argument("--device", default="cpu", help="cpu or cuda (float32 on either, as kvp eval)")
    a = p.parse_args()
    torch.manual_seed(0)
    pipe = KVPPipeline.from_predictor(a.predictor, device=a.device)
    base, aux, pred = pipe.base, pipe.aux, pipe.predictor
    corpus = data.corpus_from_spec([a.heldout], "heldout")
    prompts, conts = (t.to(a.device) for t in data.eval_pairs(pipe.tokenizer, corpus, a.n, a.prompt_len, a.cont_len))
    sinks = SinkCache(base)

    def with_tail(w: int):
        return lambda pr: (base, prefill_kvp(base, aux, pred, pr, sink_len=pipe.sink_len, sinks=sinks, tail=w))

    prefills = {"base": lambda pr: (base, prefill_full(base, pr)), **{f"tail{w}": with_tail(w) for w in a.tails}}

    def progress(sl, pr, runs):
        done = sl.start + pr.shape[0]
        print(f"{done}/{a.n} pairs", flush=True)
        # written after every batch: a run stopped early still leaves the pairs it measured
        write(a, pipe, corpus, runs, done)

    run_paths(prefills, prompts, conts, greedy_tokens=a.greedy_tokens, batch=a.batch, progress=False,
              after_batch=progress)
    print(json.dumps(json.loads(a.out.read_text())["paths"], indent=1))


def write(a, pipe, corpus, runs: PathRuns, done: int) -> None:
    """OUT as measured on the first `done` pairs."""
    base_flops = flops.prefill_flops(pipe.base, a.prompt_len)
    out = {"predictor": str(a.predictor.resolve()), "heldout": corpus.description, "n": done, "n_planned": a.n,
           "prompt_len": a.prompt_len, "cont_len": a.cont_len, "greedy_tokens": a.greedy_tokens,
           "sink_len": pipe.sink_len, "device": a.device, "threads": torch.get_num_threads(), "paths": {}}
    for k in runs.seconds:
        kvp = (None if k == "base" else
               flops.kvp_flops(pipe.base, pipe.aux, pipe.predictor, a.prompt_len, int(k[4:]))["total"])
        out["paths"][k] = runs.summary(k, done, a.cont_len)
        out["paths"][k]["prefill_flops_vs_base"] = 1.0 if kvp is None else kvp / base_flops
    write_result(a.out, out)


if __name__ == "__main__":
    main()
