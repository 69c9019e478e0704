"""Analytic FLOPs of each path (multiply-add = 2 FLOPs), for the speedup ceiling.

Counts the matrix products that dominate: projections, attention scores and mixing,
MLP, the LM head where a path computes it (last position only), and the predictor.
Norms, RoPE and softmax are ignored (well under 1%).
"""

from __future__ import annotations

from .models.arch import ArchSpec


def layer_flops(spec: ArchSpec, inter: int, n_tokens: int, past: int = 0) -> int:
    """One decoder layer over n_tokens new tokens that follow `past` cached ones."""
    q_dim = spec.n_heads * spec.head_dim
    proj = 2 * spec.hidden * (q_dim + 2 * spec.kv_dim) + 2 * q_dim * spec.hidden
    mlp = 3 * 2 * spec.hidden * inter
    # token t attends to past + t + 1 keys: QK^T and AV each 2 * q_dim per key
    keys = n_tokens * past + n_tokens * (n_tokens + 1) // 2
    return n_tokens * (proj + mlp) + 4 * q_dim * keys


def prefill_flops(model_or_config, n_tokens: int, past: int = 0, lm_head: bool = True) -> int:
    cfg = getattr(model_or_config, "config", model_or_config)
    spec = ArchSpec.of(cfg)
    total = spec.n_layers * layer_flops(spec, cfg.intermediate_size, n_tokens, past)
    return total + (2 * spec.hidden * spec.vocab if lm_head else 0)


def predictor_flops(predictor, n_tokens: int) -> int:
    """Every base layer's maps over n_tokens: all their sources, and both factors of a reduced rank."""
    return n_tokens * predictor.flops_per_token()


def kvp_flops(base, aux, predictor, n_tokens: int, tail: int = 0) -> dict[str, int]:
    """KVP's TTFT work for a prompt of n_tokens: aux over N-1 tokens, predictor, base on the last one
    (with a `tail` W, runtime.kvp.prefill_kvp: aux and predictor over N-1-W, base over the last W+1).

    The exact sink's KV is a constant per sink prefix (memoised), so it adds nothing per call.
    """
    w = min(tail, max(n_tokens - 2, 0))
    predicted = n_tokens - 1 - w
    parts = {
        "aux_prefill": prefill_flops(aux, predicted, lm_head=False),
        "predictor": predictor_flops(predictor, predicted) if predictor is not None else 0,
        "base_step": prefill_flops(base, w + 1, past=predicted),
    }
    parts["total"] = sum(parts.values())
    return parts
