"""Quality of KVP against the base, the aux alone and the two trivial baselines.

On held-out (prompt, continuation) pairs never used for calibration:
- continuation NLL given the prompt (teacher forcing), in nats per token;
- first-token agreement with the base (argmax after the prompt);
- greedy n-token agreement with the base (share of matching positions, and of
  sequences that match all n tokens);
- per-layer K and V relative error of the predicted cache (pre-RoPE, non-sink positions);
- FLOPs of each path for the prompt length.
Baselines share KVP's exact sink: "no prompt" keeps only the sink, "mean KV" fills the
rest with the calibration mean per layer. A predictor that loses to them is useless.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import flops
from ..config import EvalConfig, default_of
from ..models import arch
from ..predictor.features import predictor_inputs, true_kv
from ..runtime.decode import decode
from ..runtime.kvp import SinkCache, prefill_full, prefill_kvp, score_continuation

PATHS = ("base", "aux", "kvp", "no_prompt", "mean_kv")


def _nll(logits: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """Summed NLL per sequence [B]."""
    return F.cross_entropy(logits.flatten(0, 1), cont.flatten(), reduction="none").view(cont.shape).sum(1)


def _prefill(path: str, base, aux, predictor, prompt, *, sink_len, sinks, tail):
    if path == "base":
        return base, prefill_full(base, prompt)
    if path == "aux":
        return aux, prefill_full(aux, prompt)
    source = {"kvp": "predictor", "no_prompt": "none", "mean_kv": "mean"}[path]
    return base, prefill_kvp(base, aux, predictor, prompt, sink_len=sink_len, sinks=sinks, kv_source=source,
                             tail=tail if path == "kvp" else 0)


@torch.no_grad()
def kv_errors(base, aux, predictor, prompt: torch.Tensor, sink_len: int) -> tuple[torch.Tensor, ...]:
    """Per base layer: squared error and squared norm of predicted K and V (pre-RoPE), summed."""
    ctx = prompt[:, :-1]
    true_k, true_v = true_kv(base, input_ids=ctx)
    pred = predictor(*predictor_inputs(aux, predictor.input_mode, input_ids=ctx))
    n = len(pred)
    ek, nk, ev, nv = (torch.zeros(n, dtype=torch.float64) for _ in range(4))
    for i, (k, v) in enumerate(pred):
        tk, tv = true_k[i][:, sink_len:].double(), true_v[i][:, sink_len:].double()
        ek[i] += ((k[:, sink_len:] - tk) ** 2).sum()
        nk[i] += (tk**2).sum()
        ev[i] += ((v[:, sink_len:] - tv) ** 2).sum()
        nv[i] += (tv**2).sum()
    return ek, nk, ev, nv


@dataclass
class PathRuns:
    """Per path and pair: summed continuation NLL, the first token, the greedy tokens; prefill seconds."""

    nll: dict[str, torch.Tensor]
    first: dict[str, torch.Tensor]
    gen: dict[str, torch.Tensor]
    seconds: dict[str, float]

    def summary(self, path: str, done: int, cont_len: int, ref: str = "base") -> dict:
        """The path's metrics on the first `done` pairs, agreement measured against `ref`."""
        match = (self.gen[path][:done] == self.gen[ref][:done]).double()
        g = self.gen[path].shape[1]
        return {
            "nll": float(self.nll[path][:done].sum() / (done * cont_len)),
            "first_token_agreement": float((self.first[path][:done] == self.first[ref][:done]).double().mean()),
            f"greedy{g}_agreement": float(match.mean()),
            f"greedy{g}_exact": float(match.all(dim=1).double().mean()),
            "prefill_seconds_total": self.seconds[path],  # includes the first batch's warm-up
        }


@torch.no_grad()
def run_paths(prefills: dict, prompts: torch.Tensor, conts: torch.Tensor, *, greedy_tokens: int, batch: int,
              progress: bool = True, after_batch=None) -> PathRuns:
    """Runs every path on the pairs, batch by batch. `prefills[path](prompt)` returns (the model that
    scores and decodes after it, its Prefilled); `after_batch(slice, prompt, runs)` sees each batch."""
    n, dev = prompts.shape[0], prompts.device
    runs = PathRuns({k: torch.zeros(n, dtype=torch.float64, device=dev) for k in prefills},
                    {k: torch.zeros(n, dtype=torch.long, device=dev) for k in prefills},
                    {k: torch.zeros(n, greedy_tokens, dtype=torch.long, device=dev) for k in prefills},
                    dict.fromkeys(prefills, 0.0))
    bar = tqdm(total=n, desc="eval", unit="seq", disable=not progress)
    for s in range(0, n, batch):
        sl = slice(s, s + batch)
        p, c = prompts[sl], conts[sl]
        for path, prefill in prefills.items():
            t0 = time.perf_counter()
            model, pre = prefill(p)
            runs.seconds[path] += time.perf_counter() - t0
            runs.first[path][sl] = pre.logits.argmax(-1)
            dec = copy.deepcopy(pre)
            runs.nll[path][sl] = _nll(score_continuation(model, pre, c), c).double()
            runs.gen[path][sl] = _pad(decode(model, dec, greedy_tokens), greedy_tokens)
        if after_batch is not None:
            after_batch(sl, p, runs)
        bar.update(p.shape[0])
    bar.close()
    return runs


@torch.no_grad()
def evaluate(base, aux, predictor, prompts: torch.Tensor, conts: torch.Tensor, *, sink_len: int = 1,
             greedy_tokens: int = default_of(EvalConfig, "greedy_tokens"),
             batch: int = default_of(EvalConfig, "batch"), tail: int = 0, progress: bool = True) -> dict:
    """`tail`: KVP's base reads the prompt's last `tail` + 1 tokens (runtime.kvp.prefill_kvp); the
    trivial baselines keep their one-token step."""
    n, plen = prompts.shape
    sinks = SinkCache(base)
    n_base = len(predictor.sources)
    ek, nk, ev, nv = (torch.zeros(n_base, dtype=torch.float64) for _ in range(4))  # summed over batches

    def kv_batch(sl, p, runs):
        for total, part in zip((ek, nk, ev, nv), kv_errors(base, aux, predictor, p, sink_len)):
            total += part

    prefills = {path: functools.partial(_prefill, path, base, aux, predictor, sink_len=sink_len, sinks=sinks,
                                        tail=tail) for path in PATHS}
    runs = run_paths(prefills, prompts, conts, greedy_tokens=greedy_tokens, batch=batch, progress=progress,
                     after_batch=kv_batch)

    spec = arch.ArchSpec.of(base)
    kvp_parts = flops.kvp_flops(base, aux, predictor, plen, tail)
    path_flops = {
        "base": flops.prefill_flops(base, plen),
        "aux": flops.prefill_flops(aux, plen),
        "kvp": kvp_parts["total"],
        "no_prompt": flops.prefill_flops(base, 1, past=min(sink_len, plen - 1)),
        "mean_kv": flops.prefill_flops(base, 1, past=plen - 1),
    }
    results = {}
    for path in PATHS:
        results[path] = runs.summary(path, n, conts.shape[1])
        results[path].update(prefill_flops=path_flops[path], flops_ratio_vs_base=path_flops["base"] / path_flops[path])
    return {
        "paths": results,
        "kvp_flops_parts": kvp_parts,
        "kv_rel_error": {
            "k": (ek / nk).sqrt().tolist(),
            "v": (ev / nv).sqrt().tolist(),
            "k_mean": float((ek / nk).sqrt().mean()),
            "v_mean": float((ev / nv).sqrt().mean()),
        },
        "data": {"sequences": n, "prompt_len": plen, "cont_len": conts.shape[1], "greedy_tokens": greedy_tokens},
        "sink_len": sink_len,
        "tail": tail,
        "base_layers": spec.n_layers,
        "aux_layers": arch.ArchSpec.of(aux).n_layers,
    }


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[1] == n else F.pad(t, (0, n - t.shape[1]), value=-1)
