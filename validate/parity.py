"""Parity: is each exported graph the computation it claims to be?

fp32 is checked strictly against the PyTorch reference stored at export time (reference.npz:
the HF models and the PyTorch KVP runtime on two real held-out prompts, the second
left-padded):
- base_prefill / aux_prefill: last-position logits; base_decode / aux_decode: top-1
  agreement with the reference's greedy tokens, teacher-forced along them (one flip does not
  derail the rest); kvp_prefill: the predicted cache (rotated keys, values) at every real,
  non-sink position over all layers; kvp_prefill + base_decode: first-token logits.
fp32 must reproduce PyTorch up to float reassociation (relative 1e-4) on any CPU.

A quantized variant (int8, int4) is judged by what a user of it sees, against the fp32 graphs
run on the same machine and on the same inputs (the fp32 graphs being the strict reference's
proxy, so the variant fails when fp32 does): on the first `n` held-out (prompt,
continuation) pairs of the export, for each path (base, aux alone, KVP) with the continuation
teacher-forced,
- kl_vs_fp32: mean KL(fp32 || variant) of the next-token distributions, nats per position;
- top1_vs_fp32: share of positions whose argmax is fp32's (near ties count);
- nll_vs_fp32: the variant's continuation NLL minus fp32's, nats per token (on these few pairs;
  quality's delta_nll_vs_fp32 is the same difference over all held-out pairs);
and for kvp_prefill the predicted cache against fp32's (kv_rel_vs_fp32). These measure what
quantization costs in the units that matter and do not depend on the CPU's int8 arithmetic
beyond that cost, while a broken graph (a zeroed layer, swapped K/V, a wrong RoPE base) is
off by a nat or more. The quantized graphs' errors against the PyTorch reference are reported
beside them, not gated: they mix quantization's cost with the CPU's int8 kernels (AVX2
without VNNI sums in saturating int16; see BENCHMARKS.md).
"""

from __future__ import annotations

import logging

import numpy as np

from .artifact import OnnxArtifact
from .errors import KvpError
from .metrics import DELTA_NLL_VS_FP32, NLL_VS_FP32
from .options import DEFAULTS
from .protocol import PATHS, positions
from .quality import log_softmax
from .runtime import OnnxKVP

# fp32: relative error of logits / of the predicted cache and the share of reference tokens
# that must be the graph's top-1 (float reassociation only).
FP32_TOLERANCES = {"logits_rel": 1e-4, "kv_rel": 1e-4, "token_agreement": 1.0}
# Quantized variants against fp32 on the same machine: bounds that tell a working quantized graph
# from a broken one, set with room above what quantization measurably costs on smollm2-135m
# (BENCHMARKS.md, "int8 across CPUs": int8 KL <= 0.04, top-1 >= 0.85, NLL delta <= 0.06; int4 HQQ
# KL <= 0.25, top-1 >= 0.64, NLL delta <= 0.12) and far below a broken graph (KL >= 1). What
# quantization may cost a given model is the recipe's quality gate (quality.<v>.<path>.
# delta_nll_vs_fp32 on all held-out pairs), not parity's nll_vs_fp32.
QUANT_TOLERANCES: dict[str, dict[str, float]] = {
    "int8": {"kl_vs_fp32": 0.15, "top1_vs_fp32": 0.75, NLL_VS_FP32: 0.15, "kv_rel_vs_fp32": 0.35},
    "int4": {"kl_vs_fp32": 0.5, "top1_vs_fp32": 0.5, NLL_VS_FP32: 0.4, "kv_rel_vs_fp32": 0.5},
}
PATH_GRAPHS = {"base": "base_prefill + base_decode", "aux": "aux_prefill + aux_decode",
               "kvp": "kvp_prefill + base_decode"}
N_PAIRS = 8  # held-out pairs compared against fp32 (x the continuation's positions)

# A reference token whose logit is within TIE x the row's RMS of the best counts as top-1.
TIE = 1e-4
# Limits renamed within 0.3 (one name per figure: metrics.py); an override by an old name still
# applies, with a deprecation line.
RENAMED = {"nll_delta_vs_fp32": NLL_VS_FP32, DELTA_NLL_VS_FP32: NLL_VS_FP32}


def _renamed(name: str, variant: str) -> str:
    if name in RENAMED:
        logging.getLogger("kvp.validate").warning(
            f"deprecated: parity tolerance '{variant}.{name}' is now '{variant}.{RENAMED[name]}'")
    return RENAMED.get(name, name)


def tolerances_for(variant: str, overrides: dict | None = None) -> dict:
    """The variant's limits with `overrides` applied; an override naming no limit of it is refused."""
    base = FP32_TOLERANCES if variant == "fp32" else QUANT_TOLERANCES.get(variant, QUANT_TOLERANCES["int4"])
    overrides = {_renamed(k, variant): v for k, v in (overrides or {}).items()}
    unknown = sorted(set(overrides or {}) - set(base))
    if unknown:
        raise KvpError(f"unknown parity tolerance '{variant}.{unknown[0]}' (the {variant} limits are "
                       f"{', '.join(base)})")
    return {**base, **(overrides or {})}


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Worst row's ||a - b|| / ||b|| (rows = leading axis)."""
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    return float((np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)).max())


def top1_agreement(logits: np.ndarray, tokens: np.ndarray, tie: float = TIE) -> float:
    """Share of positions where `tokens` [B, T] is the argmax of `logits` [B, T, V], up to near ties."""
    logits = logits.astype(np.float64)
    chosen = np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    margin = tie * np.sqrt((logits**2).mean(-1))
    return float((chosen >= logits.max(-1) - margin).mean())


def check(graph: str, metric: str, value: float, limit: float | None, higher_is_better: bool = False) -> dict:
    """One check; limit None = reported, not gated."""
    ok = True if limit is None else (value >= limit if higher_is_better else value <= limit)
    return {"graph": graph, "metric": metric, "value": value, "limit": limit, "ok": bool(ok)}


def run_parity(art: OnnxArtifact, variant: str, threads: int = DEFAULTS["threads"], tolerances: dict | None = None, *,
               n_pairs: int = N_PAIRS, fp32: dict | None = None, cache: dict | None = None) -> dict:
    """Parity of one variant. For a quantized variant `fp32` may pass the fp32 result already
    computed in this validation (it is the variant's prerequisite), and `cache` a dict that keeps
    the fp32 graphs' outputs on the held-out pairs from one quantized variant to the next."""
    tol = tolerances_for(variant, tolerances)
    if variant == "fp32":
        checks = reference_checks(art, "fp32", threads, tol)
        return {"variant": variant, "tolerances": tol, "checks": checks, "ok": all(c["ok"] for c in checks)}
    fp32 = fp32 if fp32 is not None else run_parity(art, "fp32", threads, n_pairs=n_pairs)
    checks = [check("fp32 graphs (the reference)", "ok", float(fp32["ok"]), 1.0, higher_is_better=True)]
    checks += against_fp32(art, variant, threads, tol, n_pairs, cache)
    checks += [{**c, "limit": None, "ok": True, "informative": True} for c in reference_checks(art, variant, threads)]
    return {"variant": variant, "tolerances": tol, "checks": checks,
            "ok": all(c["ok"] for c in checks), "pairs": n_pairs}


def reference_checks(art: OnnxArtifact, variant: str, threads: int, tol: dict | None = None) -> list[dict]:
    """Every graph of `variant` against the PyTorch reference (limits from `tol`, or none)."""
    tol = tol or {}
    ref = np.load(art.path(art.manifest.reference.file), allow_pickle=False)
    rt = OnnxKVP(art, variant, threads)
    rt.verify()  # every graph's hash, before any of them runs
    ids, mask = ref["input_ids"], ref["attention_mask"]
    n_tok = ref["base.tokens"].shape[1]
    checks = []
    for mode, prefill, decoder in (("base", "base_prefill", "base_decode"), ("aux", "aux_prefill", "aux_decode"),
                                   ("kvp", "kvp_prefill", "base_decode (first step)")):
        state = rt.prefill(ids, mask, mode)
        logits = state.logits
        name = prefill if mode != "kvp" else "kvp_prefill + base_decode"
        checks.append(check(name, "logits_rel", rel_error(logits, ref[f"{mode}.logits"]), tol.get("logits_rel")))
        checks[-1]["max_abs"] = float(np.abs(logits - ref[f"{mode}.logits"]).max())
        tokens = ref[f"{mode}.tokens"].astype(np.int64)
        agree = top1_agreement(rt.score(state, tokens), tokens)
        checks.append(check(decoder, f"top1_{n_tok}_agreement", agree, tol.get("token_agreement"),
                            higher_is_better=True))
    want = {name: ref["kvp." + name] for name in _kv_names(rt)}
    checks.append(_kv_check(rt, ids, mask, want, "kv_rel", tol.get("kv_rel")))
    return checks


def against_fp32(art: OnnxArtifact, variant: str, threads: int, tol: dict, n_pairs: int,
                 cache: dict | None = None) -> list[dict]:
    """The variant against the fp32 graphs on the first `n_pairs` held-out pairs, per path.
    `cache` keeps the fp32 outputs for the next variant (float32 log-probabilities)."""
    cache = {} if cache is None else cache
    prompts, conts = (a.astype(np.int64) for a in art.eval_pairs(n_pairs))
    ref_rt, rt = OnnxKVP(art, "fp32", threads), OnnxKVP(art, variant, threads)
    ref_rt.verify(), rt.verify()  # every graph's hash, before any of them runs
    checks = []
    for mode in PATHS:
        kl = agree = nll_delta = 0.0
        count = 0
        for s in range(0, len(prompts), 4):  # 4 rows at a time bounds memory (two [4, T, V] float64 arrays)
            p, c = prompts[s : s + 4], conts[s : s + 4]
            key = (mode, s, len(p))
            if key not in cache:
                cache[key] = log_softmax(ref_rt.score(ref_rt.prefill(p, None, mode), c)).astype(np.float32)
            lp_ref = cache[key].astype(np.float64)
            lp = log_softmax(rt.score(rt.prefill(p, None, mode), c))
            kl += float((np.exp(lp_ref) * (lp_ref - lp)).sum())
            agree += top1_agreement(lp, lp_ref.argmax(-1)) * c.size
            gold = c[..., None]
            nll_delta += float((np.take_along_axis(lp_ref, gold, -1) - np.take_along_axis(lp, gold, -1)).sum())
            count += c.size
        graph = PATH_GRAPHS[mode]
        checks += [check(graph, "kl_vs_fp32", kl / count, tol.get("kl_vs_fp32")),
                   check(graph, "top1_vs_fp32", agree / count, tol.get("top1_vs_fp32"), higher_is_better=True),
                   check(graph, NLL_VS_FP32, nll_delta / count, tol.get(NLL_VS_FP32))]
    ids = prompts
    mask = np.ones_like(ids)
    if "kv" not in cache:
        cache["kv"] = dict(zip(_kv_names(ref_rt), ref_rt.session("kvp_prefill").run(None, {"input_ids": ids,
                                                                                           "attention_mask": mask})))
    want = cache["kv"]
    checks.append(_kv_check(rt, ids, mask, want, "kv_rel_vs_fp32", tol.get("kv_rel_vs_fp32")))
    return checks


def _kv_names(rt: OnnxKVP) -> list[str]:
    return rt.art.manifest.io["kvp_prefill"].outputs[:-3]


def _kv_check(rt: OnnxKVP, ids, mask, want: dict, metric: str, limit: float | None) -> dict:
    """The predicted cache at real positions past the sink (padding and sink slots are not predictions).

    The value is ||error|| / ||reference|| over every layer's keys and values (worst row);
    the worst single tensor is reported beside it. A predictor fitted on little data has a
    few ill-conditioned layers whose quantized outputs stray while the logits hold, so one
    layer alone would gate on noise; a broken graph (wrong RoPE, mask or layer map, swapped
    K/V) is off by >= 1 either way."""
    out = rt.session("kvp_prefill").run(None, {"input_ids": ids, "attention_mask": mask})
    ctx_mask = mask[:, :-1]
    pos = positions(ctx_mask)
    keep = (ctx_mask == 1) & (pos >= rt.sink_len)
    err, norm = np.zeros(len(keep)), np.zeros(len(keep))
    worst, worst_name = 0.0, ""
    for name, got in zip(_kv_names(rt), out[:-3]):
        for b in range(got.shape[0]):
            g, w = got[b][:, keep[b]].astype(np.float64), want[name][b][:, keep[b]].astype(np.float64)
            e, n = float(((g - w) ** 2).sum()), float((w**2).sum())
            err[b], norm[b] = err[b] + e, norm[b] + n
            if np.sqrt(e / max(n, 1e-24)) > worst:
                worst, worst_name = float(np.sqrt(e / max(n, 1e-24))), name
    result = check("kvp_prefill", metric, float(np.sqrt(err / np.maximum(norm, 1e-24)).max()), limit)
    return {**result, "worst_tensor": worst_name, "worst_tensor_rel": worst}
