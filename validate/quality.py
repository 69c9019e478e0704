"""Accuracy through the runtime: the core's quality metrics on the exported graphs.

On the held-out (prompt, continuation) pairs stored with the export (eval_pairs.npz, never
used for calibration), for the base, the aux alone and KVP:
- continuation NLL given the prompt (teacher forcing), nats per token;
- first-token agreement with the base;
- greedy n-token agreement with the base (share of matching positions; share of exact rows).
"""

from __future__ import annotations

import time

import numpy as np
from tqdm.auto import tqdm

from .artifact import OnnxArtifact
from .options import DEFAULTS as D
from .protocol import PATHS
from .runtime import OnnxKVP


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def run_quality(art: OnnxArtifact, variant: str, *, n: int | None = None, greedy_tokens: int = D["greedy_tokens"],
                batch: int = 8, threads: int = D["threads"], progress: bool = False) -> dict:
    prompts, conts = art.eval_pairs(n)
    rt = OnnxKVP(art, variant, threads)
    pad = int(art.model["pad_token_id"] or 0)
    nll = dict.fromkeys(PATHS, 0.0)
    first = {m: [] for m in PATHS}
    gen = {m: [] for m in PATHS}
    bar = tqdm(total=len(prompts), desc=f"quality {variant}", unit="seq", disable=not progress)
    for s in range(0, len(prompts), batch):
        p, c = prompts[s : s + batch], conts[s : s + batch]
        for mode in PATHS:
            state = rt.prefill(p, None, mode)
            lp = log_softmax(rt.score(state, c))
            nll[mode] += float(-np.take_along_axis(lp, c[..., None], -1).sum())
            first[mode].append(state.logits.argmax(-1))
            gen[mode].append(_pad(rt.decode(state, greedy_tokens, eos_ids=set(), pad_id=pad), greedy_tokens))
        bar.update(len(p))
    bar.close()
    first_all = {m: np.concatenate(v) for m, v in first.items()}
    gen_all = {m: np.concatenate(v) for m, v in gen.items()}
    out = {}
    for mode in PATHS:
        match = gen_all[mode] == gen_all["base"]
        out[mode] = {
            "nll": nll[mode] / conts.size,
            "first_token_agreement": float((first_all[mode] == first_all["base"]).mean()),
            f"greedy{greedy_tokens}_agreement": float(match.mean()),
            f"greedy{greedy_tokens}_exact": float(match.all(1).mean()),
        }
    return {"variant": variant, "sequences": len(prompts), "prompt_len": int(prompts.shape[1]),
            "cont_len": int(conts.shape[1]), "greedy_tokens": greedy_tokens, "paths": out}


def _pad(t: np.ndarray, n: int) -> np.ndarray:
    return t if t.shape[1] == n else np.pad(t, ((0, 0), (0, n - t.shape[1])), constant_values=-1)


def quality_job(folder, variant: str, n: int | None, greedy_tokens: int, threads: int) -> tuple[dict, float]:
    """run_quality on the export in `folder`, for a worker process (parallel.py): (result, seconds)."""
    t0 = time.perf_counter()
    res = run_quality(OnnxArtifact.open(folder), variant, n=n, greedy_tokens=greedy_tokens, threads=threads)
    return res, round(time.perf_counter() - t0, 1)
