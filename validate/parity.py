"""Parity: each graph of a variant against the PyTorch reference outputs stored at export time.

The reference (reference.npz) comes from the HF models and the PyTorch KVP runtime, on two
real held-out prompts, the second left-padded. Checked per variant:
- base_prefill / aux_prefill: last-position logits; base_decode / aux_decode: the greedy
  tokens generated from them (every step after the first runs the decoder);
- kvp_prefill: the predicted cache (rotated keys, values) at every real, non-sink position;
- kvp end to end (kvp_prefill -> base first step): first-token logits and greedy tokens.
Logits are compared by relative error ||a - b|| / ||b|| per row (worst row) and max
abs; tokens by greedy agreement. Tolerances per precision; quantized graphs are compared
with the same fp32 PyTorch reference, so the numbers show what quantization costs.
"""

from __future__ import annotations

import numpy as np

from .artifact import OnnxArtifact
from .runtime import OnnxKVP

# Per precision: worst-row relative error of logits / of the predicted cache, and the share
# of greedy tokens that must match the reference. fp32 must reproduce PyTorch (1e-4: float
# reassociation only). The quantized limits sit above what quantization measurably costs on
# smollm2-135m (int8: logits <= 0.16, cache 0.22; int4 HQQ: logits <= 0.34, cache 0.51; see
# BENCHMARKS.md) and well below a broken graph (a wrong RoPE, mask or layer map gives
# errors >= 1). Greedy tokens of a quantized model drift for good after one flip, so the token
# check only asks that the first tokens hold (2 rows x 8 tokens: 0.125 = one row's first two);
# the logits and cache errors are the measure. Measured: int8 0.50-0.69, int4 0.19-0.38.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"logits_rel": 1e-4, "kv_rel": 1e-4, "token_agreement": 1.0},
    "int8": {"logits_rel": 0.3, "kv_rel": 0.4, "token_agreement": 0.125},
    "int4": {"logits_rel": 0.5, "kv_rel": 0.7, "token_agreement": 0.125},
}


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Worst row's ||a - b|| / ||b|| (rows = leading axis)."""
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    return float((np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)).max())


def token_agreement(a: np.ndarray, b: np.ndarray) -> float:
    n = min(a.shape[1], b.shape[1])
    return float((a[:, :n] == b[:, :n]).mean())


def check(graph: str, metric: str, value: float, limit: float, higher_is_better: bool = False) -> dict:
    ok = value >= limit if higher_is_better else value <= limit
    return {"graph": graph, "metric": metric, "value": value, "limit": limit, "ok": bool(ok)}


def run_parity(art: OnnxArtifact, variant: str, threads: int = 2, tolerances: dict | None = None) -> dict:
    tol = {**TOLERANCES.get(variant, TOLERANCES["int4"]), **(tolerances or {})}
    ref = np.load(art.folder / art.manifest["reference"]["file"], allow_pickle=False)
    rt = OnnxKVP(art, variant, threads)
    ids, mask = ref["input_ids"], ref["attention_mask"]
    n_tok = ref["base.tokens"].shape[1]
    pad = int(art.model["pad_token_id"] or 0)
    checks = []
    for mode, prefill, decoder in (("base", "base_prefill", "base_decode"), ("aux", "aux_prefill", "aux_decode"),
                                   ("kvp", "kvp_prefill", "base_decode (first step)")):
        state = rt.prefill(ids, mask, mode)
        logits = state.logits
        name = prefill if mode != "kvp" else "kvp_prefill + base_decode"
        checks.append(check(name, "logits_rel", rel_error(logits, ref[f"{mode}.logits"]), tol["logits_rel"]))
        checks[-1]["max_abs"] = float(np.abs(logits - ref[f"{mode}.logits"]).max())
        toks = rt.decode(state, n_tok, pad_id=pad)
        checks.append(check(decoder, f"greedy{n_tok}_agreement", token_agreement(toks, ref[f"{mode}.tokens"]),
                            tol["token_agreement"], higher_is_better=True))
    checks.append(_kv_check(rt, ref, ids, mask, tol["kv_rel"]))
    return {"variant": variant, "tolerances": tol, "checks": checks, "ok": all(c["ok"] for c in checks)}


def _kv_check(rt: OnnxKVP, ref, ids, mask, limit: float) -> dict:
    """The predicted cache at real positions past the sink (padding and sink slots are not predictions)."""
    out = rt.session("kvp_prefill").run(None, {"input_ids": ids, "attention_mask": mask})
    ctx_mask = mask[:, :-1]
    pos = np.cumsum(ctx_mask, -1) - 1
    keep = (ctx_mask == 1) & (pos >= rt.sink_len)
    worst = 0.0
    names = rt.art.manifest["io"]["kvp_prefill"]["outputs"][:-3]
    for name, got in zip(names, out[:-3]):
        want = ref["kvp." + name]
        for b in range(got.shape[0]):
            sel = keep[b]
            worst = max(worst, rel_error(got[b][:, sel][None], want[b][:, sel][None]))
    return check("kvp_prefill", "kv_rel", worst, limit)
