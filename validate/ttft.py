"""Time to first token on onnxruntime (CPU), measured: base prefill vs KVP vs the aux alone.

For each prompt length x batch: fixed intra-op threads, warm-up runs, then `repeats`
rounds in which every path runs once (interleaved, so drift on a noisy machine hits all
paths alike); medians per path, and ratios of medians from the same run. Every path runs
through the runtime's own calls (`OnnxKVP.prefill` / `run`), so all of them read and write
through the same IO path (IO binding by default: cache outputs stay where onnxruntime wrote
them, only the logits are copied out) and their ratios compare the graphs, not two IO paths:
- base:  base_prefill over N tokens (last-position logits);
- kvp:   kvp_prefill over N tokens + the base's first step (sink + last token), and its parts;
         with the export's exact tail W (`model.tail`), kvp_prefill over N - W tokens and a first
         step over the sink and the last W + 1 tokens, as the runtime runs it;
- aux:   aux_prefill over N tokens (the aux alone, what KVP's cost tends to);
- aux_ctx: aux_prefill over the N-1-W context tokens: KVP's aux share, so the predictor's
  share is kvp_prefill - aux_ctx (approximate: the two graphs differ by the aux's last-token
  LM head and by what the fused predictor adds);
- base_step: one ordinary decode step after N tokens (per-token decode cost), through the
  runtime's own step (IO binding: the cache is read in place, only the logits copied out).
FLOPs come from the export's counts of the graphs themselves (manifest "flops").
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from tqdm.auto import tqdm

from .artifact import OnnxArtifact
from .crossover import crossover_from, lengths_for, measure_paths
from .errors import KvpError
from .options import DEFAULTS as D
from .options import check
from .runtime import OnnxKVP, positions


def poly(coef: list[float], x: float) -> float:
    return float(sum(c * x**i for i, c in enumerate(coef)))


def graph_flops(art: OnnxArtifact, batch: int, n: int) -> dict[str, float]:
    """Counted FLOPs per path at prompt length n; KVP with the export's tail W (kvp_prefill over
    n - W tokens, the first step's count includes the W tokens)."""
    f, w = art.manifest.flops, art.manifest.model.tail
    base = batch * poly(f["base_prefill"].coef, n)
    aux = batch * poly(f["aux_prefill"].coef, n)
    kvp_prefill = batch * poly(f["kvp_prefill"].coef, n - w)
    first = batch * poly(f["base_decode"].first_step, n - w - 1)
    return {"base": base, "aux": aux, "kvp": kvp_prefill + first, "kvp_prefill": kvp_prefill, "base_first_step": first}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def prefill_timer(rt: OnnxKVP, batch: int = 1, seed: int = 0):
    """time_ms(path, n): one prefill of `batch` random prompts of n tokens. Paths: "base"
    (base_prefill), "kvp", "base_decoder" (the base prompt through base_decode with an empty
    cache: the default mode's path below the crossover) and "auto" (the default mode)."""
    rng = np.random.default_rng(seed)

    def time_ms(path: str, n: int) -> float:
        ids = rng.integers(0, rt.model["vocab"], size=(batch, n), dtype=np.int64)
        mask = np.ones_like(ids)
        if path == "base_decoder":
            return _timed(lambda: rt.prefill_with_decoder(ids, mask)) * 1e3
        return _timed(lambda: rt.prefill(ids, mask, path)) * 1e3

    return time_ms


def measure_point(rt: OnnxKVP, batch: int, n: int, *, warmup: int, repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vocab = rt.model["vocab"]
    ids = rng.integers(0, vocab, size=(batch, n), dtype=np.int64)
    mask = np.ones_like(ids)
    pos = positions(mask)
    c = n - 1 - rt.tail  # the tokens KVP's aux reads
    ctx = {"input_ids": ids[:, :c], "attention_mask": mask[:, :c], "position_ids": pos[:, :c]}
    rt.session("base_prefill"), rt.session("aux_prefill")  # created here, never inside a timed call
    kvp_first = {}

    def run_kvp():
        state = rt.prefill(ids, mask, "kvp")
        kvp_first.update(state.seconds)
        return state

    state = run_kvp()  # also the cache for the decode step below (read in place under IO binding)
    step_mask = np.concatenate([state.mask, np.ones((batch, 1), np.int64)], 1)
    paths = {
        "base": lambda: rt.prefill(ids, mask, "base"),
        "aux": lambda: rt.prefill(ids, mask, "aux"),
        "aux_ctx": lambda: rt.run("aux_prefill", ctx),
        "kvp": run_kvp,
        "base_step": lambda: rt.step("base", ids[:, -1:], step_mask, state.next_pos[:, None], state.past),
    }
    if rt.resolve("auto", ids, mask) != "kvp":  # the default mode's own path here (else it is "kvp")
        paths["auto"] = lambda: rt.prefill(ids, mask, "auto")
    times: dict[str, list[float]] = {k: [] for k in [*paths, "kvp_prefill", "base_first_step"]}
    for r in range(warmup + repeats):
        for name, fn in paths.items():
            dt = _timed(fn)
            if r >= warmup:
                times[name].append(dt)
                if name == "kvp":
                    times["kvp_prefill"].append(kvp_first["kvp_prefill"])
                    times["base_first_step"].append(kvp_first["base_first_step"])
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    med["predictor_est"] = max(med["kvp_prefill"] - med["aux_ctx"], 0.0)
    med.setdefault("auto", med["kvp"])
    return med


def run_sweep(rt: OnnxKVP, lengths: tuple[int, ...], repeats: int = 3) -> dict:
    """Batch 1 over short prompts: base, KVP and the default mode ("auto", which switches at the
    export's crossover), so the report shows where KVP starts to pay on this machine (the
    crossover measured here) and that the default mode is never slower than the base."""
    lengths = lengths_for(1, rt.model.get("context"), lengths)
    # a 5-token prefill takes ~35 ms and one run moves by 10% on a busy core: the short prompts
    # get more rounds (cheap), so their medians do not read noise as the default mode losing
    short = tuple(n for n in lengths if n <= SHORT)
    long_ = tuple(n for n in lengths if n > SHORT)
    timer = prefill_timer(rt)
    points = measure_paths(timer, short, ("base", "kvp", "auto"), repeats=max(repeats, SHORT_REPEATS)) if short else []
    points += measure_paths(timer, long_, ("base", "kvp", "auto"), repeats=repeats) if long_ else []
    kvp_points = [p for p in points if p["prompt_len"] >= rt.min_kvp_len]
    return {"export_crossover": rt.crossover, "measured_crossover": crossover_from(kvp_points), "points": points}


SWEEP = (5, 16, 32, 64, 128, 256)  # the short prompts of the default mode's check (batch 1)
SHORT, SHORT_REPEATS = 64, 9  # sweep lengths up to SHORT are timed over at least SHORT_REPEATS rounds


def check_lengths(rt: OnnxKVP, lengths, what: str = "TTFT") -> None:
    """Every prompt length to time fits the context and is long enough for KVP (one-line errors)."""
    for n in lengths:
        rt.check_context(n, 1)
        if n < rt.min_kvp_len:
            raise KvpError(f"{what} prompt length {n} is too short for KVP (sink {rt.sink_len}, tail {rt.tail}): "
                           f"use >= {rt.min_kvp_len}")


def run_ttft(art: OnnxArtifact, variant: str, *, lengths=D["lengths"], batches=D["batches"], threads: int = D["threads"],
             warmup: int = D["warmup"], repeats: int = D["repeats"], sweep: tuple[int, ...] = SWEEP, progress: bool = False) -> dict:
    check(lengths=lengths, batches=batches, warmup=warmup, repeats=repeats)
    rt = OnnxKVP(art, variant, threads)
    check_lengths(rt, lengths)
    points = []
    grid = [(b, n) for n in lengths for b in batches]
    for b, n in tqdm(grid, desc=f"ttft {variant}", unit="point", disable=not progress):
        ms = measure_point(rt, b, n, warmup=warmup, repeats=repeats)
        fl = graph_flops(art, b, n)
        speedup = ms["base"] / ms["kvp"]
        flops_ratio = fl["base"] / fl["kvp"]
        points.append({
            "batch": b, "prompt_len": n, "ms": ms, "flops": fl,
            "kvp_speedup": speedup, "kvp_flops_ratio": flops_ratio, "kvp_efficiency": speedup / flops_ratio,
            "aux_speedup": ms["base"] / ms["aux"], "aux_flops_ratio": fl["base"] / fl["aux"],
            "kvp_over_aux": ms["kvp"] / ms["aux"], "auto_vs_base": ms["auto"] / ms["base"],
        })
    out = {"variant": variant, "threads": threads, "tail": rt.tail, "warmup": warmup, "repeats": repeats, "points": points}
    if sweep:
        sw = run_sweep(rt, tuple(sweep))
        ratios = [p["auto_ms"] / p["base_ms"] for p in sw["points"]]
        ratios += [p["auto_vs_base"] for p in points if p["batch"] == 1]
        out["auto"] = {**sw, "worst_vs_base": max(ratios)}
    return out
