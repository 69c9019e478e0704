"""Parity: each graph of a variant against the PyTorch reference outputs stored at export time.

The reference (reference.npz) comes from the HF models and the PyTorch KVP runtime, on two
real held-out prompts, the second left-padded. Checked per variant:
- base_prefill / aux_prefill: last-position logits; base_decode / aux_decode: top-1
  agreement with the reference's greedy tokens, teacher-forced along them (the decoder
  reads the reference's tokens, so one flip does not derail the rest);
- kvp_prefill: the predicted cache (rotated keys, values) at every real, non-sink position,
  over all layers;
- kvp end to end (kvp_prefill -> base first step): first-token logits and top-1 agreement.
Logits are compared by relative error ||a - b|| / ||b|| per row (worst row) and max
abs; tokens by top-1 agreement, where a near tie (the reference token's logit within
TIE of the row's best, in units of the row's RMS) counts as agreement: float
reassociation on another CPU may flip an exact tie of a random-weight model, which says
nothing about the graph. Tolerances per precision; quantized graphs are compared
with the same fp32 PyTorch reference, so the numbers show what quantization costs.
"""

from __future__ import annotations

import numpy as np

from .artifact import OnnxArtifact
from .runtime import OnnxKVP

# Per precision: worst-row relative error of logits / of the predicted cache (all layers), and
# the share of reference tokens that must be the graph's top-1. fp32 must reproduce PyTorch
# (1e-4: float reassociation only). The quantized limits sit about twice above what
# quantization measurably costs on smollm2-135m (keep 0.25 / 0.50 and the kv predictor; see
# BENCHMARKS.md): int8 logits <= 0.16, cache <= 0.08, top-1 >= 0.75; int4 HQQ logits <= 0.37,
# cache <= 0.16, top-1 >= 0.56; and well below a broken graph (a wrong RoPE, mask or layer
# map gives errors >= 1 and top-1 near 0). 16 tokens are too few to measure what quantization
# costs (the logits error does that); the token limit catches broken decoders, and int4's
# sits lower because an aux healed on 8k tokens (the quick look) measured 0.31 there.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"logits_rel": 1e-4, "kv_rel": 1e-4, "token_agreement": 1.0},
    "int8": {"logits_rel": 0.3, "kv_rel": 0.2, "token_agreement": 0.5},
    "int4": {"logits_rel": 0.5, "kv_rel": 0.35, "token_agreement": 0.25},
}


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Worst row's ||a - b|| / ||b|| (rows = leading axis)."""
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    return float((np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)).max())


# A reference token whose logit is within TIE x the row's RMS of the best counts as top-1.
TIE = 1e-4


def top1_agreement(logits: np.ndarray, tokens: np.ndarray, tie: float = TIE) -> float:
    """Share of positions where `tokens` [B, T] is the argmax of `logits` [B, T, V], up to near ties."""
    logits = logits.astype(np.float64)
    chosen = np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    margin = tie * np.sqrt((logits**2).mean(-1))
    return float((chosen >= logits.max(-1) - margin).mean())


def check(graph: str, metric: str, value: float, limit: float, higher_is_better: bool = False) -> dict:
    ok = value >= limit if higher_is_better else value <= limit
    return {"graph": graph, "metric": metric, "value": value, "limit": limit, "ok": bool(ok)}


def run_parity(art: OnnxArtifact, variant: str, threads: int = 2, tolerances: dict | None = None) -> dict:
    tol = {**TOLERANCES.get(variant, TOLERANCES["int4"]), **(tolerances or {})}
    ref = np.load(art.folder / art.manifest["reference"]["file"], allow_pickle=False)
    rt = OnnxKVP(art, variant, threads)
    ids, mask = ref["input_ids"], ref["attention_mask"]
    n_tok = ref["base.tokens"].shape[1]
    checks = []
    for mode, prefill, decoder in (("base", "base_prefill", "base_decode"), ("aux", "aux_prefill", "aux_decode"),
                                   ("kvp", "kvp_prefill", "base_decode (first step)")):
        state = rt.prefill(ids, mask, mode)
        logits = state.logits
        name = prefill if mode != "kvp" else "kvp_prefill + base_decode"
        checks.append(check(name, "logits_rel", rel_error(logits, ref[f"{mode}.logits"]), tol["logits_rel"]))
        checks[-1]["max_abs"] = float(np.abs(logits - ref[f"{mode}.logits"]).max())
        tokens = ref[f"{mode}.tokens"].astype(np.int64)
        agree = top1_agreement(rt.score(state, tokens), tokens)
        checks.append(check(decoder, f"top1_{n_tok}_agreement", agree, tol["token_agreement"], higher_is_better=True))
    checks.append(_kv_check(rt, ref, ids, mask, tol["kv_rel"]))
    return {"variant": variant, "tolerances": tol, "checks": checks, "ok": all(c["ok"] for c in checks)}


def _kv_check(rt: OnnxKVP, ref, ids, mask, limit: float) -> dict:
    """The predicted cache at real positions past the sink (padding and sink slots are not predictions).

    The value is ||error|| / ||reference|| over every layer's keys and values (worst row);
    the worst single tensor is reported beside it. A predictor fitted on little data has a
    few ill-conditioned layers whose quantized outputs stray while the logits hold, so one
    layer alone would gate on noise; a broken graph (wrong RoPE, mask or layer map) is off
    by >= 1 either way."""
    out = rt.session("kvp_prefill").run(None, {"input_ids": ids, "attention_mask": mask})
    ctx_mask = mask[:, :-1]
    pos = np.cumsum(ctx_mask, -1) - 1
    keep = (ctx_mask == 1) & (pos >= rt.sink_len)
    names = rt.art.manifest["io"]["kvp_prefill"]["outputs"][:-3]
    err, norm = np.zeros(len(keep)), np.zeros(len(keep))
    worst, worst_name = 0.0, ""
    for name, got in zip(names, out[:-3]):
        want = ref["kvp." + name]
        for b in range(got.shape[0]):
            g, w = got[b][:, keep[b]].astype(np.float64), want[b][:, keep[b]].astype(np.float64)
            e, n = float(((g - w) ** 2).sum()), float((w**2).sum())
            err[b], norm[b] = err[b] + e, norm[b] + n
            if np.sqrt(e / max(n, 1e-24)) > worst:
                worst, worst_name = float(np.sqrt(e / max(n, 1e-24))), name
    result = check("kvp_prefill", "kv_rel", float(np.sqrt(err / np.maximum(norm, 1e-24)).max()), limit)
    return {**result, "worst_tensor": worst_name, "worst_tensor_rel": worst}
